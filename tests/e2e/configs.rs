//! Every Envoy file users copy from `envoy/` is valid for the Envoy we ship against, and
//! its knocker plugin configuration is valid for the filter.

use knocker_e2e::process::validate_envoy_config;
use knocker_e2e::repo_root;

#[test]
fn every_envoy_config_validates() {
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("envoy"))
        .expect("envoy/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    for expected in ["knocker.yaml", "capture.yaml", "fallback.yaml"] {
        assert!(files.contains(&expected.to_owned()), "{files:?}");
    }
    for file in &files {
        let text = std::fs::read_to_string(repo_root().join("envoy").join(file)).unwrap();
        let configs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("value: '"))
            .filter_map(|l| l.strip_suffix('\''))
            .collect();
        assert_eq!(configs.len(), 1, "envoy/{file}: one plugin configuration");
        for config in configs {
            if let Err(e) = knocker_filter::config::PluginConfig::parse(config.as_bytes()) {
                panic!("envoy/{file}: {e}");
            }
        }
    }
    for file in files {
        if let Err(output) = validate_envoy_config(&file) {
            panic!("envoy/{file} does not validate:\n{output}");
        }
    }
}
