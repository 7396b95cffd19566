//! The two doors requests come in by, both onto the one submit path ([`crate::submit`]):
//!
//! - [`grpc`] — the Envoy filter's: a long-lived stream per Envoy worker, and a unary
//!   call while it (re)opens; callers present `KNOCKER_GRPC_TOKEN`.
//! - [`http`] — the Knocker protocol for clients without Envoy, the status URL and the
//!   admin API ([`crate::api`]) under `/knocker/`.
//! - [`conn`] — what both do to every connection: a cap, an idle deadline, `TCP_NODELAY`.

pub mod conn;
pub mod grpc;
pub mod http;

use std::time::Duration;

/// Both doors' limits and the callers they admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doors {
    /// Largest request body (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// Request headers must arrive within this.
    pub header_timeout: Duration,
    /// A request body must arrive within this (408).
    pub body_timeout: Duration,
    /// A connection that sends nothing this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once per door.
    pub max_connections: usize,
    /// Bearer token of every API call; empty: none.
    pub admin_token: String,
    /// Bearer token of the gRPC door; empty: none.
    pub grpc_token: String,
}

impl Default for Doors {
    /// The defaults of `knocker serve`, without tokens.
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            admin_token: String::new(),
            grpc_token: String::new(),
        }
    }
}

/// The 413 text, the same on both doors.
pub fn body_too_large(limit: usize) -> String {
    format!("Request body is larger than the limit of {limit} bytes.")
}
