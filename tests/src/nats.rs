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
    pub fn start() -> Self {
        let port = free_port();
        let store_dir = temp_dir("nats").join("jetstream");
        let mut command = Command::new("nats-server");
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store_dir);
        Self::spawn(command, port, store_dir)
    }

    /// With `conf` added to its configuration file (an `authorization` or `tls` block,
    /// say); `url` is still `nats://127.0.0.1:<port>`.
    pub fn start_with(conf: &str) -> Self {
        let port = free_port();
        let dir = temp_dir("nats");
        let store_dir = dir.join("jetstream");
        let file = dir.join("nats.conf");
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{conf}\n",
            store_dir.display().to_string()
        );
        std::fs::write(&file, text).expect("write nats.conf");
        let mut command = Command::new("nats-server");
        command.arg("-c").arg(&file);
        Self::spawn(command, port, store_dir)
    }

    fn spawn(mut command: Command, port: u16, store_dir: std::path::PathBuf) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be on PATH: run `scripts/setup.sh` (make test does it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening"
            );
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
