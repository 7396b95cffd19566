//! End-to-end harness: starts the real programs on free loopback ports and stops them
//! when dropped.
//!
//! - [`ControlPlane`] — the built `knocker` binary (`target/release/knocker`).
//! - [`Envoy`] — the Envoy from the project's virtualenv, running a file from `envoy/`
//!   with its ports and the filter path substituted.
//! - [`Target`] — an HTTP/1.1 server on a raw socket that records every request byte for
//!   byte (header order and case included) and answers as a test scripts it: a status,
//!   a redirect, a hang, or a closed connection.
//! - [`DnsServer`] — a DNS server on loopback whose A/AAAA answers a test changes.
//! - [`SmtpServer`] — aiosmtpd on loopback, its messages read back from a maildir.
//! - [`NatsServer`] — nats-server with JetStream on loopback.
//! - [`TestCert`] — a self-signed certificate and key in PEM files, for a TLS listener.
//!
//! `make test` builds the binaries first; a missing binary is a set-up failure and the
//! tests say so instead of skipping.

pub mod dns;
pub mod nats;
pub mod process;
pub mod smtp;
pub mod target;
pub mod tls;

pub use dns::DnsServer;
pub use nats::{Accounts, NatsServer};
pub use process::{free_port, knocker_bin, repo_root, temp_dir, ControlPlane, Envoy, EnvoyOptions};
pub use smtp::{Email, SmtpServer};
pub use target::{Received, Reply, Target};
pub use tls::TestCert;

/// Waits for `check` to hold, polling every 20 ms, up to `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
