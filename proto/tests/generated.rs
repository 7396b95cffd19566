//! Regenerates `src/gen/` from the `.proto` files and fails when the checked-in code
//! differs. `KNOCKER_REGENERATE=1 cargo test -p knocker-proto --test generated` rewrites it.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out: &Path) {
    let fds = protox::compile(["knocker/v1/ingress.proto"], [root()]).expect("compile protos");

    // Messages only: what the wasm filter uses.
    let messages = out.join("messages");
    std::fs::create_dir_all(&messages).unwrap();
    prost_build::Config::new()
        .out_dir(&messages)
        .compile_fds(fds.clone())
        .expect("generate messages");

    // The tonic service, referring to the messages above instead of repeating them.
    let grpc = out.join("grpc");
    std::fs::create_dir_all(&grpc).unwrap();
    tonic_prost_build::configure()
        .out_dir(&grpc)
        .extern_path(".knocker.v1", "crate::v1")
        .compile_fds(fds)
        .expect("generate service");
}

#[test]
fn generated_code_is_fresh() {
    let tmp = std::env::temp_dir().join(format!("knocker-proto-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    generate(&tmp);
    let pairs = [
        (
            tmp.join("messages/knocker.v1.rs"),
            root().join("src/gen/knocker.v1.rs"),
        ),
        (
            tmp.join("grpc/knocker.v1.rs"),
            root().join("src/gen/knocker.v1.grpc.rs"),
        ),
    ];
    let regenerate = std::env::var_os("KNOCKER_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (fresh, checked_in) in pairs {
        let fresh_text = std::fs::read_to_string(&fresh).unwrap();
        let old = std::fs::read_to_string(&checked_in).unwrap_or_default();
        if fresh_text != old {
            if regenerate {
                std::fs::write(&checked_in, fresh_text).unwrap();
            } else {
                stale.push(checked_in.display().to_string());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        stale.is_empty(),
        "generated code is stale: {stale:?}; rerun with KNOCKER_REGENERATE=1"
    );
}
