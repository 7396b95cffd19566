//! The images, tested without a container engine: `make image` (scripts/image.sh) builds
//! their contents, and these tests read the filter's OCI image back as a registry client
//! would, and start the control plane from the staged root as the Dockerfile's container
//! would (its user, environment and command), health check included.

use std::path::{Path, PathBuf};
use std::process::Command;

use knocker_e2e::process::wasm_path;
use knocker_e2e::{repo_root, temp_dir};
use serde_json::Value;

fn sha256(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("the blob");
    assert_eq!(sha256(&bytes), digest, "a blob is named by its digest");
    bytes
}

fn build_filter_image(out: &Path) -> String {
    let run = Command::new(repo_root().join("scripts/oci-filter.sh"))
        .arg(wasm_path())
        .arg(out)
        .output()
        .expect("scripts/oci-filter.sh");
    assert!(run.status.success(), "{run:?}");
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

#[test]
fn the_filter_image_is_one_layer_holding_plugin_wasm() {
    let layout: PathBuf = temp_dir("oci").join("knocker-filter");
    let manifest_digest = build_filter_image(&layout);
    assert_eq!(
        std::fs::read_to_string(layout.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        version
    );
    let manifest_bytes = blob(&layout, &manifest_digest);
    assert_eq!(entry["size"], manifest_bytes.len());
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&layout, layers[0]["digest"].as_str().unwrap());
    assert_eq!(layers[0]["size"], layer.len());

    // The layer: exactly /plugin.wasm, the filter the tests run.
    let mut tar_bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&layer[..]),
        &mut tar_bytes,
    )
    .expect("gzip");
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut files = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        files.push((path, content));
    }
    assert_eq!(
        files.len(),
        1,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert_eq!(files[0].0, "plugin.wasm");
    assert!(
        files[0].1 == std::fs::read(wasm_path()).unwrap(),
        "the built filter"
    );

    // The config names the uncompressed layer, as registries check.
    let config = blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar_bytes));

    // Reproducible: the same filter gives the same image.
    let again = build_filter_image(&temp_dir("oci").join("again"));
    assert_eq!(again, manifest_digest);

    // What deploy/filter.Dockerfile builds with an engine is the same: FROM scratch,
    // the filter as /plugin.wasm, nothing else.
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/filter.Dockerfile")).unwrap();
    let steps: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        steps,
        [
            "FROM scratch",
            "COPY target/wasm/knocker_filter.wasm /plugin.wasm"
        ]
    );
}

/// The Dockerfile's final stage, read: its `ENV` pairs and the exec arrays of
/// `ENTRYPOINT`, `CMD` and `HEALTHCHECK … CMD`.
struct FinalStage {
    user: String,
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    health: Vec<String>,
}

fn final_stage() -> FinalStage {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    let last_from = joined.rfind("\nFROM ").expect("a final stage");
    let stage = &joined[last_from..];
    let array = |line: &str| -> Vec<String> {
        let start = line.find('[').expect("an exec array");
        serde_json::from_str(&line[start..]).expect("JSON exec array")
    };
    let mut out = FinalStage {
        user: String::new(),
        env: Vec::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        health: Vec::new(),
    };
    for line in stage.lines().map(str::trim) {
        if let Some(user) = line.strip_prefix("USER ") {
            out.user = user.trim().to_owned();
        } else if let Some(pairs) = line.strip_prefix("ENV ") {
            for pair in pairs.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV k=v");
                out.env.push((k.to_owned(), v.to_owned()));
            }
        } else if line.starts_with("ENTRYPOINT ") {
            out.entrypoint = array(line);
        } else if line.starts_with("CMD ") {
            out.cmd = array(line);
        } else if line.starts_with("HEALTHCHECK ") {
            let at = line.find(" CMD ").expect("HEALTHCHECK … CMD");
            out.health = array(&line[at..]);
        }
    }
    out
}

#[test]
fn the_control_plane_image_starts_as_its_user_and_passes_its_health_check() {
    let stage = final_stage();
    assert_eq!(stage.user, "65532:65532", "not root");
    assert_eq!(stage.entrypoint, ["knocker"]);
    assert_eq!(stage.cmd, ["serve"]);
    assert_eq!(stage.health[..2], ["knocker", "status"]);
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("ca-certificates"),
        "HTTPS targets need CA certificates"
    );

    // The staged root, as `make image` leaves it.
    let run = Command::new(repo_root().join("scripts/image.sh"))
        .output()
        .expect("image.sh");
    assert!(run.status.success(), "{run:?}");
    let bin = repo_root().join("target/image/control-plane/rootfs/usr/local/bin");
    assert!(bin.join("knocker").exists());

    // Its data directory (the image's volume) belongs to its user.
    let dir = temp_dir("image");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let chown = Command::new("chown")
        .args(["65532:65532"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(chown.success());

    // In its own network namespace (the image's fixed ports), as its user, with its
    // environment (the data directory moved to the test's), nothing else.
    let (uid, gid) = stage.user.split_once(':').unwrap();
    let as_user = format!(
        "setpriv --reuid {uid} --regid {gid} --clear-groups env -i PATH={}",
        bin.display()
    );
    let env: Vec<String> = stage
        .env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "KNOCKER_DATA_DIR" => format!("{k}={}", data.display()),
            _ => format!("{k}={v}"),
        })
        .collect();
    let env = env.join(" ");
    let start = format!("{} {}", stage.entrypoint.join(" "), stage.cmd.join(" "));
    let health = stage.health.join(" ");
    let d = dir.display();
    let script = format!(
        "ip link set lo up\n\
         {as_user} {env} {start} > {d}/no-token.log 2>&1; echo $? > {d}/no-token.rc\n\
         {as_user} {env} KNOCKER_ADMIN_TOKEN=a-long-admin-secret KNOCKER_GRPC_TOKEN=a-long-grpc-secret {start} > {d}/serve.log 2>&1 &\n\
         server=$!\n\
         for i in $(seq 1 100); do {as_user} {health} > /dev/null 2>&1 && break; sleep 0.1; done\n\
         {as_user} {health} > {d}/healthy.out 2>&1; echo $? > {d}/healthy.rc\n\
         kill $server; wait $server\n\
         {as_user} {health} > {d}/stopped.out 2>&1; echo $? > {d}/stopped.rc\n\
         ls -ln {data} > {d}/data.ls\n",
        data = data.display(),
    );
    let script_path = dir.join("container.sh");
    std::fs::write(&script_path, script).unwrap();
    let out = Command::new("timeout")
        .args(["60", "unshare", "-n", "bash"])
        .arg(&script_path)
        .output()
        .expect("unshare");
    assert!(out.status.success(), "{out:?}");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert_ne!(
        read("no-token.rc").trim(),
        "0",
        "beyond loopback, no tokens: it must refuse"
    );
    assert!(
        read("no-token.log").contains("KNOCKER_ADMIN_TOKEN"),
        "{}",
        read("no-token.log")
    );
    assert_eq!(
        read("healthy.rc").trim(),
        "0",
        "{}\n{}",
        read("healthy.out"),
        read("serve.log")
    );
    assert!(
        read("healthy.out").contains("status"),
        "{}",
        read("healthy.out")
    );
    assert_ne!(
        read("stopped.rc").trim(),
        "0",
        "a stopped control plane is unhealthy"
    );
    // What it wrote is its user's.
    let listing = read("data.ls");
    assert!(listing.contains(" 65532 65532 "), "{listing}");
}
