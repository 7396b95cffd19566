//! Every Envoy file users copy from `envoy/` is valid for the Envoy we ship against.

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
    assert!(files.contains(&"knocker.yaml".to_owned()), "{files:?}");
    for file in files {
        if let Err(output) = validate_envoy_config(&file) {
            panic!("envoy/{file} does not validate:\n{output}");
        }
    }
}
