//! What one delivery attempt came to, whatever carried it: the [`Outcome`] every
//! transport reports, and Knocker's codes for failures without an HTTP status.

use std::time::Duration;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The HTTP status, or Knocker's code for a failure without one.
    pub status: u16,
    /// Why there was no HTTP status.
    pub error: Option<String>,
    /// `Retry-After` of a 429/503, in seconds.
    pub retry_after_s: Option<f64>,
    pub latency: Duration,
    /// The attempt failed for want of a resource of this process (file descriptors),
    /// not because of the target: it does not count.
    pub local_shortage: bool,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status)
    }

    /// The outbound policy refused the destination.
    pub fn is_denied(&self) -> bool {
        self.error.is_some() && self.status == code::DENIED
    }

    /// A failure without an HTTP answer.
    pub fn failed(status: u16, error: String, latency: Duration) -> Self {
        Self {
            status,
            error: Some(error),
            retry_after_s: None,
            latency,
            local_shortage: false,
        }
    }
}

/// Knocker's codes for failures without an HTTP response.
pub mod code {
    pub const REFUSED: u16 = 502;
    pub const NETWORK: u16 = 503;
    pub const TIMEOUT: u16 = 504;
    pub const PROTOCOL: u16 = 418;
    /// The outbound policy refused the destination (a client-chosen hop to a denied
    /// address, port or host): final, no retry.
    pub const DENIED: u16 = 403;
}
