//! Jobs: what a submission becomes, and the Knocker rules that build one.
//!
//! - [`spec`] — parses and validates a submission's `Knocker-*` headers (the protocol's
//!   error messages live there) and splits the headers to forward.
//! - [`policy`] — a delivery policy as configured (max age, retries, backoff), checked
//!   and turned into a job's [`Policy`].
//! - [`rule`] — builds the job for a request a filter rule took over (capture, fallback).
//! - [`receipt`] — the receipt JSON a client gets once the job is committed.
//!
//! A [`Job`] holds everything needed to deliver it after a restart: the request, the
//! policy, the config echoed in the receipt and sent to the callback, its state and its
//! attempt history.

pub mod policy;
pub mod receipt;
pub mod retry;
pub mod rule;
pub mod spec;
pub mod submission;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// The version sent in `x-knocker` and shown by the status URL.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Store key: the Knocker id, or `<id>:callback` for a callback job.
    pub id: String,
    /// What this job delivers.
    pub kind: Kind,
    pub request: Request,
    pub policy: Policy,
    /// The receipt's `config` object (also the callback's, minus `callback`).
    pub config: serde_json::Map<String, serde_json::Value>,
    pub state: State,
    pub attempts: Vec<Attempt>,
    /// When the next attempt is due (ms since the epoch); meaningful while pending.
    pub next_attempt_at: Millis,
    pub created_at: Millis,
    /// When it was delivered or failed.
    #[serde(default)]
    pub finished_at: Option<Millis>,
    /// Ordered delivery: jobs of one lane are delivered one at a time in arrival order
    /// (a rule's target with `ordered: true`). While a job waits for the ones ahead of
    /// it, its `next_attempt_at` is [`PARKED`].
    #[serde(default)]
    pub lane: Option<String>,
    /// Who chose the URL: a client's choice passes the outbound policy on every hop.
    #[serde(default)]
    pub trust: Trust,
}

/// Who chose a destination. The operator's configuration (rule targets, group members,
/// notifiers, monitors in the file) is trusted; a client's choice (`Knocker-Host`,
/// `Knocker-Callback`, an API-made monitor) passes the outbound policy
/// (`crate::outbound`). Jobs stored before this existed read as `Client`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    #[default]
    Client,
    Operator,
}

/// `next_attempt_at` of a job waiting for its turn in an ordered lane.
pub const PARKED: Millis = i64::MAX as Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The request a client submitted, to its target.
    Target,
    /// The failure callback of the job `id` minus its `:callback` suffix.
    Callback,
    /// An email notification, sent over SMTP (see `notify::email`).
    Email,
}

impl Kind {
    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Target => "target",
            Self::Callback => "callback",
            Self::Email => "email",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    InFlight,
    Delivered,
    Failed,
}

/// The HTTP request to deliver, exactly as it will be sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    pub url: String,
    /// Forwarded headers in order (lower-case names). The `x-knocker*` headers are added
    /// at send time, in front.
    pub headers: Headers,
    #[serde(with = "body_base64")]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Per-attempt timeout (seconds).
    pub timeout: f64,
    /// Attempts after the first.
    pub retries: u32,
    pub backoff_factor: f64,
    /// Where to POST after the final failure.
    pub callback: Option<String>,
    /// No attempt starts after this time (ms since the epoch): a rule's maximum age.
    #[serde(default)]
    pub deadline: Option<Millis>,
    /// Longest delay between attempts (seconds), below the global cap.
    #[serde(default)]
    pub max_backoff_s: Option<f64>,
    /// Who chose `callback`.
    #[serde(default)]
    pub callback_trust: Trust,
    /// Which failures are retried and when: a configured schedule, statuses.
    #[serde(default)]
    pub retry: retry::RetryRules,
    /// The rule, group or notifier it came from (`rule:orders`, `group:caches`,
    /// `notifier:ops`): names its signing secrets.
    #[serde(default)]
    pub source: Option<String>,
    /// The rate its source allows its target.
    #[serde(default)]
    pub rate: Option<Rate>,
}

/// A rate limit: `per_s` attempts a second on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub per_s: f64,
    pub burst: u32,
}

impl Rate {
    /// The lower of two limits.
    pub fn min(self, other: Rate) -> Rate {
        Rate {
            per_s: self.per_s.min(other.per_s),
            burst: self.burst.min(other.burst),
        }
    }
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: Millis,
    /// The HTTP status, or the Knocker code for a failure without one (502 refused,
    /// 503 network, 504 timeout, 418 protocol).
    pub status: u16,
    /// A short reason when there was no HTTP response.
    #[serde(default)]
    pub error: Option<String>,
    pub latency_ms: u64,
}

impl Job {
    /// A new job: pending, due at `now`, no attempts yet, in no lane, with an empty
    /// config (see [`Job::with_config`], [`Job::in_lane`]). Every job is made here.
    pub fn new_pending(
        id: String,
        kind: Kind,
        request: Request,
        policy: Policy,
        trust: Trust,
        now: Millis,
    ) -> Self {
        Self {
            id,
            kind,
            request,
            policy,
            config: serde_json::Map::new(),
            state: State::Pending,
            attempts: Vec::new(),
            next_attempt_at: now,
            created_at: now,
            finished_at: None,
            lane: None,
            trust,
        }
    }

    /// The receipt's `config` object.
    #[must_use]
    pub fn with_config(mut self, config: serde_json::Map<String, serde_json::Value>) -> Self {
        self.config = config;
        self
    }

    /// Delivered in order with the other jobs of `lane`, one at a time.
    #[must_use]
    pub fn in_lane(mut self, lane: Option<String>) -> Self {
        self.lane = lane;
        self
    }

    /// The id targets see in `x-knocker-id`: a callback carries its job's id.
    pub fn knocker_id(&self) -> &str {
        match self.kind {
            Kind::Target | Kind::Email => &self.id,
            Kind::Callback => self.id.strip_suffix(CALLBACK_SUFFIX).unwrap_or(&self.id),
        }
    }

    /// Waiting for the jobs ahead of it in its ordered lane.
    pub fn is_parked(&self) -> bool {
        self.state == State::Pending && self.next_attempt_at == PARKED
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Delivered | State::Failed)
    }

    /// The target's `host[:port]`: what the per-host concurrency limit counts.
    pub fn host(&self) -> &str {
        authority(&self.request.url)
    }
}

/// Header fields in order: lower-case name, raw value.
pub type Headers = Vec<(String, Vec<u8>)>;

pub const CALLBACK_SUFFIX: &str = ":callback";

/// The authority of an absolute URL (`http://a:1/x` → `a:1`), without parsing the rest.
///
/// Byte by byte: it is read several times per attempt (store, metrics, host limits), and a
/// substring search (`split_once("://")`) cost more than the rest of it.
pub fn authority(url: &str) -> &str {
    let bytes = url.as_bytes();
    let start = bytes
        .windows(3)
        .position(|w| w == b"://")
        .map_or(0, |i| i + 3);
    let len = bytes[start..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(bytes.len() - start);
    &url[start..start + len]
}

/// A pending job to `url` with a neutral policy, for tests: set the fields a test needs.
#[cfg(test)]
pub(crate) fn test_job(id: &str, method: &str, url: &str) -> Job {
    let request = Request {
        method: method.into(),
        url: url.into(),
        headers: vec![],
        body: vec![],
    };
    let policy = Policy {
        timeout: 1.0,
        retries: 0,
        backoff_factor: 0.0,
        callback: None,
        deadline: None,
        max_backoff_s: None,
        callback_trust: Trust::Operator,
        retry: retry::RetryRules::default(),
        source: None,
        rate: None,
    };
    Job::new_pending(id.into(), Kind::Target, request, policy, Trust::Operator, 0)
}

/// Bodies are bytes; JSON holds them as base64.
mod body_base64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(body))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        STANDARD
            .decode(String::deserialize(d)?)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_through_json_with_binary_bodies() {
        for body in [
            vec![],
            vec![0u8],
            vec![0xff, 0, 1],
            (0..=255u8).collect::<Vec<_>>(),
        ] {
            let mut job = test_job("a", "POST", "http://t/");
            job.request.body = body;
            let text = serde_json::to_string(&job).unwrap();
            assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
        }
    }

    #[test]
    fn callback_jobs_carry_their_jobs_id() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": "abc:callback", "kind": "callback",
            "request": {"method": "POST", "url": "http://c/", "headers": [], "body": ""},
            "policy": {"timeout": 1.0, "retries": 0, "backoff_factor": 0.0, "callback": null},
            "config": {}, "state": "pending", "attempts": [], "next_attempt_at": 0, "created_at": 0
        }))
        .unwrap();
        assert_eq!(job.knocker_id(), "abc");
        job.kind = Kind::Target;
        assert_eq!(job.knocker_id(), "abc:callback");
    }

    #[test]
    fn authority_of_urls() {
        assert_eq!(authority("http://a.example:8080/x?y"), "a.example:8080");
        assert_eq!(authority("https://a.example?q"), "a.example");
        assert_eq!(authority("http://[::1]:9/"), "[::1]:9");
        assert_eq!(authority("http://h"), "h");
        assert_eq!(authority("h:1/x"), "h:1");
        assert_eq!(authority("http://h#f"), "h");
        assert_eq!(authority(""), "");
    }
}
