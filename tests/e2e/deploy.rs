//! The manifests in `deploy/` (Istio, Envoy Gateway, Kubernetes, the Helm chart) as a
//! cluster would take them, without one: `scripts/check-manifests.py` checks every
//! document against its schema (the kustomizations built with the real kubectl, the
//! chart rendered with the real helm); the Envoy configuration they amount to is loaded
//! by the real Envoy (`--mode validate`, on the Envoy under test); every knocker plugin
//! configuration in them is parsed by the filter's own parser; the control plane's file
//! in the ConfigMap starts a control plane.

use std::path::{Path, PathBuf};
use std::process::Command;

use knocker_e2e::process::{envoy_bin, wasm_path};
use knocker_e2e::{repo_root, temp_dir, ControlPlane};

/// `scripts/check-manifests.py` on `paths` (all of `deploy/` when empty), writing what
/// Envoy and the filter must accept under `out`; its output and whether it passed.
fn check_manifests(paths: &[&Path], out: &Path) -> (bool, String) {
    let output = Command::new(repo_root().join(".tools/venv/bin/python"))
        .arg(repo_root().join("scripts/check-manifests.py"))
        .arg("--envoy-out")
        .arg(out)
        .args(paths)
        .output()
        .expect("run scripts/check-manifests.py (scripts/setup.sh installs what it needs)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    found.sort();
    found
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect()
}

/// `envoy --mode validate` on a bootstrap with the built module in place of `@WASM@`.
fn envoy_validates(bootstrap: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(bootstrap).unwrap();
    let path = bootstrap.with_extension("local.yaml");
    std::fs::write(
        &path,
        text.replace("@WASM@", &wasm_path().display().to_string()),
    )
    .unwrap();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_manifest_matches_its_schema_and_what_it_configures_loads_in_envoy_and_the_filter() {
    let out = temp_dir("manifests");
    let (ok, report) = check_manifests(&[], &out);
    assert!(ok, "scripts/check-manifests.py:\n{report}");
    // Each part of deploy/ was looked at, the kustomizations as built.
    for expected in [
        "deploy/istio/sidecar-inbound.yaml#1  networking.istio.io/v1alpha3 EnvoyFilter default/knocker-inbound",
        "deploy/istio/gateway.yaml#1  networking.istio.io/v1alpha3 EnvoyFilter istio-system/knocker-gateway",
        "deploy/istio/wasmplugin.reference.yaml#1  extensions.istio.io/v1alpha1 WasmPlugin",
        "EnvoyExtensionPolicy default/knocker",
        "EnvoyExtensionPolicy knocker/knocker",
        "EnvoyPatchPolicy default/knocker",
        "HTTPRoute default/orders-writes",
        "kubectl kustomize deploy/kubernetes/embedded#5  apps/v1 StatefulSet knocker/knocker",
        "kubectl kustomize deploy/kubernetes/nats#6  apps/v1 Deployment knocker/knocker",
        "PodDisruptionBudget knocker/knocker",
        "NetworkPolicy knocker/knocker-control-plane",
        "deploy/kubernetes/base/secret.example.yaml#1  v1 Secret knocker/knocker-tokens",
        "kubectl kustomize deploy/kubernetes/sidecar#3  apps/v1 Deployment default/orders",
        "helm template deploy/helm/knocker#6  apps/v1 StatefulSet knocker",
        "helm template deploy/helm/knocker nats-values.yaml#6  apps/v1 Deployment knocker",
        "helm template deploy/helm/knocker nats-accounts-values.yaml#6  apps/v1 Deployment knocker",
        "helm template deploy/helm/knocker nats-tls-values.yaml#6  apps/v1 Deployment knocker",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with("OK") && l.contains(expected)),
            "no OK line for {expected}:\n{report}"
        );
    }
    assert!(!report.contains("FAIL"), "{report}");

    // The Envoy configuration of each: Istio's patches as the proxy gets them, Envoy
    // Gateway's filters with the patch policy applied, the sidecar's bootstrap.
    let bootstraps = files(&out.join("envoy"));
    assert_eq!(
        names(&bootstraps),
        [
            "envoy-gateway.yaml",
            "istio_gateway.yaml_1.yaml",
            "istio_sidecar-inbound.yaml_1.yaml",
            "kubernetes_sidecar_1-envoy.yaml",
        ],
        "{report}"
    );
    for bootstrap in &bootstraps {
        let text = std::fs::read_to_string(bootstrap).unwrap();
        assert!(
            text.contains("allow_on_headers_stop_iteration: true"),
            "{}: the flag Knocker needs",
            bootstrap.display()
        );
        if let Err(e) = envoy_validates(bootstrap) {
            panic!("{} does not load in Envoy:\n{e}", bootstrap.display());
        }
    }

    // Every plugin configuration, by the filter's own parser (the sidecar has two: its
    // inbound listener's and its handover listener's).
    let plugins = files(&out.join("plugin"));
    assert_eq!(plugins.len(), 7, "{:?}", names(&plugins));
    for plugin in plugins {
        let text = std::fs::read(&plugin).unwrap();
        if let Err(e) = knocker_filter::config::PluginConfig::parse(&text) {
            panic!("{}: {e}", plugin.display());
        }
    }
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_mistake_in_a_manifest_or_in_the_envoy_config_it_carries_is_caught() {
    let dir = temp_dir("bad-manifests");
    let istio = std::fs::read_to_string(repo_root().join("deploy/istio/gateway.yaml")).unwrap();

    // A field the EnvoyFilter schema does not have (kubectl apply refuses it).
    let typo = dir.join("typo.yaml");
    std::fs::write(
        &typo,
        istio.replace("  workloadSelector:", "  workloadSelecter:"),
    )
    .unwrap();
    let (ok, report) = check_manifests(&[&typo], &dir.join("out1"));
    assert!(!ok, "{report}");
    assert!(
        report.contains("FAIL") && report.contains("workloadSelecter"),
        "{report}"
    );

    // Something that is not a Kubernetes object at all.
    let list = dir.join("list.yaml");
    std::fs::write(&list, "- a\n- b\n").unwrap();
    let (ok, report) = check_manifests(&[&list], &dir.join("out0"));
    assert!(!ok, "{report}");
    assert!(report.contains("not a Kubernetes object"), "{report}");

    // A Deployment with a string where a number belongs.
    let deployment =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/nats/deployment.yaml"))
            .unwrap()
            .replace("replicas: 3", "replicas: three");
    let bad_deployment = dir.join("deployment.yaml");
    std::fs::write(&bad_deployment, deployment).unwrap();
    let (ok, report) = check_manifests(&[&bad_deployment], &dir.join("out2"));
    assert!(!ok, "{report}");
    assert!(report.contains("replicas"), "{report}");

    // The schema cannot see into a patch's value: Envoy can. A cluster field Envoy does
    // not know passes the schema and fails in Envoy.
    let cluster_typo = dir.join("cluster.yaml");
    std::fs::write(
        &cluster_typo,
        istio.replace(
            "connect_timeout: 1s",
            "connect_timeout: 1s\n        conect_timeout: 1s",
        ),
    )
    .unwrap();
    let out = dir.join("out3");
    let (ok, report) = check_manifests(&[&cluster_typo], &out);
    assert!(ok, "{report}");
    let bootstraps = files(&out.join("envoy"));
    assert_eq!(bootstraps.len(), 1);
    let error = envoy_validates(&bootstraps[0]).expect_err("Envoy refuses an unknown field");
    assert!(error.contains("conect_timeout"), "{error}");

    // Envoy Gateway: without the patch that sets the flag, the check says so.
    let eg = dir.join("eg");
    std::fs::create_dir_all(&eg).unwrap();
    for name in ["gateway.yaml", "httproutes.yaml", "extension-policies.yaml"] {
        std::fs::copy(
            repo_root().join("deploy/envoy-gateway").join(name),
            eg.join(name),
        )
        .unwrap();
    }
    let (ok, report) = check_manifests(&[&eg], &dir.join("out4"));
    assert!(!ok, "{report}");
    assert!(
        report.contains("allow_on_headers_stop_iteration"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The sidecar example's Envoy file is `envoy/sidecar.yaml` rendered with the variables
/// its kustomization documents (so the two cannot drift apart).
#[test]
fn the_kubernetes_sidecar_example_is_envoy_sidecar_yaml_rendered() {
    let committed =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/sidecar/envoy.yaml")).unwrap();
    let kustomization =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/sidecar/kustomization.yaml"))
            .unwrap();
    let vars: Vec<(String, String)> = kustomization
        .lines()
        .filter_map(|l| {
            let l = l
                .trim_start_matches('#')
                .trim()
                .trim_end_matches('\\')
                .trim();
            let (name, value) = l.split_once('=')?;
            name.starts_with("KNOCKER_")
                .then(|| (name.to_owned(), value.to_owned()))
        })
        .map(|(k, v)| match k.as_str() {
            "KNOCKER_GRPC_TOKEN" => (k, "replace-with-the-grpc-token".to_owned()),
            _ => (k, v),
        })
        .collect();
    assert_eq!(vars.len(), 4, "{vars:?}");
    let out = Command::new(repo_root().join("scripts/envoy-config.sh"))
        .arg(repo_root().join("envoy/sidecar.yaml"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars)
        .output()
        .expect("run scripts/envoy-config.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let first_difference = committed
        .lines()
        .zip(rendered.lines())
        .position(|(a, b)| a != b);
    assert!(
        committed == rendered,
        "deploy/kubernetes/sidecar/envoy.yaml is out of date (line {:?}): render it again as \
         its kustomization.yaml says",
        first_difference.map(|i| i + 1)
    );
}

/// The control plane's file in the ConfigMap is one the control plane starts with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmaps_control_plane_file_is_accepted() {
    let configmap =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/base/configmap.yaml")).unwrap();
    let toml: String = configmap
        .split_once("knocker.toml: |\n")
        .expect("knocker.toml in the ConfigMap")
        .1
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let path = crate::write_config(&toml);
    let cp = ControlPlane::start(&[("KNOCKER_CONFIG", &path)]);
    let monitors = crate::get_json(cp.url("/knocker/monitors")).await;
    assert!(monitors.to_string().contains("\"knocker\""), "{monitors}");
    let groups = crate::get_json(cp.url("/knocker/groups")).await;
    assert!(groups.to_string().contains("\"web\""), "{groups}");
}

/// `helm template` of the chart with `values` (a file under the chart's `ci/`).
fn helm_template(values: &str) -> String {
    let root = repo_root();
    let out = Command::new(root.join(".tools/bin/helm"))
        .args(["template", "knocker", "deploy/helm/knocker", "-f"])
        .arg(format!("deploy/helm/knocker/ci/{values}"))
        .current_dir(&root)
        .output()
        .expect("run helm (installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart takes NATS's login and TLS from Secrets: the address (with its login) or a
/// credentials file from one, the TLS files from another, mounted where the variables
/// point.
#[test]
fn the_helm_chart_takes_the_nats_login_and_tls_files_from_secrets() {
    let tls = helm_template("nats-tls-values.yaml");
    for expected in [
        "- name: KNOCKER_STORE\n          valueFrom: { secretKeyRef: { name: \"knocker-nats-login\", key: url } }",
        "- { name: KNOCKER_NATS_CA, value: /etc/knocker-nats/ca.crt }",
        "- { name: KNOCKER_NATS_CERT, value: /etc/knocker-nats/tls.crt }",
        "- { name: KNOCKER_NATS_KEY, value: /etc/knocker-nats/tls.key }",
        "- { name: nats-tls, mountPath: /etc/knocker-nats, readOnly: true }",
        "- name: nats-tls\n        secret: { secretName: \"knocker-nats-tls\" }",
    ] {
        assert!(tls.contains(expected), "no `{expected}` in:\n{tls}");
    }
    assert!(
        !tls.contains("nats://nats:4222"),
        "nats.url is not used beside urlSecret"
    );
    assert!(!tls.contains("KNOCKER_NATS_CREDS"), "{tls}");

    let accounts = helm_template("nats-accounts-values.yaml");
    for expected in [
        "- { name: KNOCKER_STORE, value: \"nats://nats:4222\" }",
        "- { name: KNOCKER_NATS_CREDS, value: /etc/knocker-nats-login/nats.creds }",
        "- { name: nats-login, mountPath: /etc/knocker-nats-login, readOnly: true }",
        "- name: nats-login\n        secret: { secretName: \"knocker-nats-creds\" }",
        "- { name: KNOCKER_NATS_CA, value: /etc/knocker-nats/ca.crt }",
    ] {
        assert!(
            accounts.contains(expected),
            "no `{expected}` in:\n{accounts}"
        );
    }
    assert!(!accounts.contains("KNOCKER_NATS_CERT"), "{accounts}");
}
