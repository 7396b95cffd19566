//! Every Envoy file users copy from `envoy/` is valid for the Envoy we ship against, and
//! its knocker plugin configuration is valid for the filter.

use knocker_e2e::process::{render_envoy_config, validate_envoy_config_with};
use knocker_e2e::{repo_root, EnvoyOptions, TestCert};

#[test]
fn every_envoy_config_validates() {
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("envoy"))
        .expect("envoy/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    for expected in [
        "knocker.yaml",
        "capture.yaml",
        "fallback.yaml",
        "sidecar.yaml",
        "gateway.yaml",
    ] {
        assert!(files.contains(&expected.to_owned()), "{files:?}");
    }
    // The gateway's certificate must exist for Envoy to load it; every other variable
    // keeps its default.
    let cert = TestCert::new(&["gateway.example"]);
    let (cert_path, key_path) = (
        cert.cert_path.display().to_string(),
        cert.key_path.display().to_string(),
    );
    let vars = [
        ("KNOCKER_TLS_CERT", cert_path.as_str()),
        ("KNOCKER_TLS_KEY", key_path.as_str()),
    ];
    let defaults = EnvoyOptions {
        grpc_port: 9090,
        http_port: 8000,
        upstream_port: 8080,
        ..EnvoyOptions::default()
    };
    for file in &files {
        // As Envoy gets it: with sidecar.yaml's and gateway.yaml's variables rendered.
        let text = render_envoy_config(file, &defaults, 10000, 9901);
        assert!(
            !text.contains("${"),
            "envoy/{file}: a variable left unrendered"
        );
        let configs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("value: '"))
            .filter_map(|l| l.strip_suffix('\''))
            .collect();
        // The handover listener of the sidecar and the gateway has its own.
        let expected = if ["sidecar.yaml", "gateway.yaml"].contains(&file.as_str()) {
            2
        } else {
            1
        };
        assert_eq!(
            configs.len(),
            expected,
            "envoy/{file}: {expected} plugin configuration(s)"
        );
        for config in configs {
            if let Err(e) = knocker_filter::config::PluginConfig::parse(config.as_bytes()) {
                panic!("envoy/{file}: {e}");
            }
        }
    }
    for file in files {
        if let Err(output) = validate_envoy_config_with(&file, &vars) {
            panic!("envoy/{file} does not validate:\n{output}");
        }
    }
}
