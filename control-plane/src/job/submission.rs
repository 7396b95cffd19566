//! A request handed over for delivery, as either door received it: its method, path,
//! headers and body, and — when a filter rule took it over rather than `Knocker-*`
//! headers — the rule's part.

use super::policy::DeliveryPolicy;
use super::Headers;

/// A request as either ingress received it.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub method: String,
    /// The path with its raw query, byte for byte as received.
    pub path: String,
    /// Headers in arrival order; names in any case.
    pub headers: Headers,
    pub body: Vec<u8>,
    /// The downstream peer, when known.
    pub remote: Option<String>,
    /// The request's authority (`Host`), when known.
    pub authority: Option<String>,
    /// Set when a filter rule (not `Knocker-*` headers) took the request over.
    pub rule: Option<RuleSubmission>,
    /// Set when a filter rule in `broadcast` mode took the request over.
    pub broadcast_rule: Option<BroadcastRule>,
}

impl Submission {
    /// The path with its query, starting with `/`.
    pub fn absolute_path(&self) -> String {
        if self.path.starts_with('/') {
            self.path.clone()
        } else {
            format!("/{}", self.path)
        }
    }
}

/// A filter rule in `broadcast` mode: its name and the group it fans out to.
#[derive(Debug, Clone, PartialEq)]
pub struct BroadcastRule {
    pub rule: String,
    pub group: String,
}

/// Why the filter handed the request over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleMode {
    /// Stored and answered at once; delivered to the target.
    Capture,
    /// Its upstream failed; delivered to the target instead of failing the caller.
    Fallback,
}

impl RuleMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Fallback => "fallback",
        }
    }
}

/// The rule part of a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSubmission {
    pub name: String,
    pub mode: RuleMode,
    /// Base URL; the request's path and query are appended.
    pub target: String,
    pub delivery: DeliveryPolicy,
    pub callback: Option<String>,
    pub ordered: bool,
    /// Fallback: the upstream's status, 0 for a reset or timeout.
    pub upstream_status: u32,
}
