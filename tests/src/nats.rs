//! nats-server with JetStream on a loopback port (installed by the set-up).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{free_port, temp_dir};

/// A running server; killed when dropped.
pub struct NatsServer {
    pub url: String,
    /// Its JetStream store directory.
    pub store_dir: std::path::PathBuf,
    child: Child,
}

impl NatsServer {
    /// The newer server `scripts/setup.sh` installs beside Debian's (the one the manifests
    /// in deploy/ run), relative to the repository.
    pub const NEWEST: &'static str = ".tools/nats-server-2.12.8/nats-server";

    pub fn start() -> Self {
        Self::start_with("")
    }

    /// `binary` instead of the `nats-server` on PATH.
    pub fn start_binary(binary: &std::path::Path) -> Self {
        Self::start_binary_with(binary, "")
    }

    /// With `conf` added to its configuration file (an `authorization` or `tls` block,
    /// say); `url` is still `nats://127.0.0.1:<port>`. Its log goes into the panic when
    /// it stops or does not listen in time.
    pub fn start_with(conf: &str) -> Self {
        Self::start_binary_with("nats-server".as_ref(), conf)
    }

    /// `binary` instead of the `nats-server` on PATH, with `conf` as in [`Self::start_with`].
    pub fn start_binary_with(binary: &std::path::Path, conf: &str) -> Self {
        let port = free_port();
        let dir = temp_dir("nats");
        let store_dir = dir.join("jetstream");
        let file = dir.join("nats.conf");
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{conf}\n",
            store_dir.display().to_string()
        );
        std::fs::write(&file, text).expect("write nats.conf");
        let log_path = dir.join("nats.log");
        let log = std::fs::File::create(&log_path).expect("nats-server log");
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary:?} ({e}): run `scripts/setup.sh` (make test does it)")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("nats-server did not start listening ({exited:?}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            url: format!("nats://127.0.0.1:{port}"),
            store_dir,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NATS accounts, as an operator sets them up: an operator, its system account, one
/// account with JetStream (unlimited), one user of it. `conf` is the server's part (the
/// operator's JWT, the two accounts' preloaded); `creds` the user's credentials file.
pub struct Accounts {
    pub conf: String,
    pub creds: String,
}

impl Accounts {
    pub fn new() -> Self {
        use nkeys::KeyPair;
        use serde_json::json;
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            json!({"type": "operator", "version": 2}),
        );
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            json!({"limits": unlimited, "type": "account", "version": 2}),
        );
        // The server's own account (JetStream needs one).
        let system = KeyPair::new_account();
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            json!({"type": "account", "version": 2}),
        );
        let user_jwt = jwt(
            &account,
            &user.public_key(),
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                   "type": "user", "version": 2}),
        );
        let conf = format!(
            "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system}: {system_jwt}\n  {account}: {account_jwt}\n}}\n",
            system = system.public_key(),
            account = account.public_key(),
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("a user's seed")
        );
        Self { conf, creds }
    }
}

impl Default for Accounts {
    fn default() -> Self {
        Self::new()
    }
}

/// A NATS JWT: `claims` (the `nats` part) about `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, claims: serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = serde_json::json!({
        "jti": format!("{now}-{subject}"), // not checked by the server; unique here
        "iat": now,
        "iss": issuer.public_key(),
        "name": "knocker-test",
        "sub": subject,
        "nats": claims,
    });
    let payload = URL_SAFE_NO_PAD.encode(body.to_string());
    let signed = format!("{header}.{payload}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign a JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}
