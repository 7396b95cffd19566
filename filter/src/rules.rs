//! Filter rules: requests without `Knocker-Host` that the plugin configuration selects
//! by host, path prefix, method and header presence, each with a mode and the delivery
//! policy the control plane applies.
//!
//! ```json
//! {"rules": [{
//!   "name": "orders", "mode": "capture",
//!   "match": {"host": "orders.example", "path_prefix": "/orders", "methods": ["POST"],
//!             "headers": ["x-tenant"]},
//!   "delivery": {"target": "http://orders:8080", "max_age_s": 86400, "ordered": true}
//! }]}
//! ```
//!
//! The first matching rule wins. A request carrying `x-knocker` (one that Knocker itself
//! delivers) is never taken by a rule, so a target that routes back through this Envoy
//! cannot loop.

use knocker_proto::v1::{Mode, RulePolicy};
use serde::Deserialize;

/// What the filter does with a request a rule selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    /// Store the request and answer `202` with a receipt at once; deliver to the target.
    Capture,
    /// Send the request upstream as usual; on a retryable failure hand it to the control
    /// plane and answer `202` with a receipt instead of the error. The filter keeps a copy
    /// of each body until the upstream answers.
    Fallback,
    /// The second half of a fallback that Envoy's retry policy makes: the request already
    /// failed upstream and Envoy retried it to the listener this rule runs on. Store it
    /// as a fallback job and answer `202` with a receipt; healthy traffic never reaches
    /// the filter (`envoy/sidecar.yaml`).
    Handover,
    /// Store the request once per member of a group (the control plane's configuration)
    /// and answer `202` with a receipt listing the members.
    Broadcast,
}

impl RuleMode {
    pub fn proto(self) -> Mode {
        match self {
            Self::Capture => Mode::Capture,
            Self::Fallback | Self::Handover => Mode::Fallback,
            Self::Broadcast => Mode::Broadcast,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub mode: RuleMode,
    #[serde(default, rename = "match")]
    pub matcher: Match,
    /// Capture and fallback: where and how the request is delivered.
    #[serde(default)]
    pub delivery: Option<Delivery>,
    /// Broadcast: the group to fan out to (its policy is the control plane's).
    #[serde(default)]
    pub group: Option<String>,
    /// Fallback only: upstream statuses that count as failures (resets and timeouts
    /// always do).
    #[serde(default)]
    pub retry_on: Option<Vec<u32>>,
    /// Fallback only: the largest request body held until it has ended (then sent
    /// upstream, a copy kept). A larger request streams on uncopied and is not taken
    /// over; its response says so in `knocker-fallback`.
    #[serde(default)]
    pub buffer_limit_bytes: Option<usize>,
}

/// Which requests a rule selects; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// `:authority`: exact (`orders.example`, port ignored unless given) or a suffix
    /// wildcard (`*.example.com`), case-insensitive.
    pub host: Option<String>,
    /// Path prefix (query excluded), case-sensitive.
    pub path_prefix: Option<String>,
    /// Methods, any of them (upper-case).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header names that must all be present.
    #[serde(default)]
    pub headers: Vec<String>,
}

/// The delivery policy, sent with each request the rule takes over.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Base URL: the request's path and query are appended.
    pub target: String,
    /// Attempts after the first; when absent, as many as `max_age_s` allows.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Give up this long after acceptance; 0 for no age limit (then `retries` is needed).
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: f64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    #[serde(default)]
    pub callback: Option<String>,
    /// One delivery in flight per target, in arrival order.
    #[serde(default)]
    pub ordered: bool,
    /// Retry delays in seconds (the last one repeated) instead of the backoff factor.
    #[serde(default)]
    pub schedule_s: Vec<f64>,
    /// Only these delivery statuses are retried (`410`, `"5xx"`, `"500-504"`).
    #[serde(default)]
    pub retry_on: Option<Vec<Status>>,
    /// These delivery statuses end the job at once (default `[410]`).
    #[serde(default)]
    pub stop_on: Option<Vec<Status>>,
    /// Attempts a second the target takes on average.
    #[serde(default)]
    pub rate_per_s: Option<f64>,
    /// Attempts at once after a quiet spell (default: the rate, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A status in a delivery policy: a code (`410`) or text (`"5xx"`, `"500-504"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Status {
    Code(u32),
    Text(String),
}

impl Status {
    fn text(&self) -> String {
        match self {
            Status::Code(c) => c.to_string(),
            Status::Text(t) => t.trim().to_owned(),
        }
    }

    /// A code between 100 and 599, a class `1xx`..`5xx`, or a range `lo-hi` of codes.
    fn is_valid(&self) -> bool {
        let code = |s: &str| s.parse::<u32>().is_ok_and(|c| (100..=599).contains(&c));
        let t = self.text();
        if let Some(class) = t.strip_suffix("xx").or_else(|| t.strip_suffix("XX")) {
            return class.parse::<u32>().is_ok_and(|c| (1..=5).contains(&c));
        }
        match t.split_once('-') {
            Some((lo, hi)) => {
                code(lo.trim())
                    && code(hi.trim())
                    && lo.trim().parse::<u32>().ok() <= hi.trim().parse::<u32>().ok()
            }
            None => code(&t),
        }
    }
}

/// The largest rate and burst a rule may ask for.
pub const MAX_RATE_PER_S: f64 = 100_000.0;
pub const MAX_BURST: u32 = 100_000;
pub const MAX_SCHEDULE_STEPS: usize = 100;

/// The largest values a delivery policy may hold (the control plane refuses larger).
pub const MAX_AGE_S: u64 = 315_360_000;
pub const MAX_BACKOFF_S: f64 = 86_400.0;
pub const MAX_TIMEOUT_S: f64 = 3600.0;

fn default_max_age_s() -> u64 {
    86_400
}
fn default_backoff_factor() -> f64 {
    0.5
}
fn default_max_backoff_s() -> f64 {
    60.0
}
fn default_timeout_s() -> f64 {
    10.0
}

/// Upstream statuses a fallback rule treats as failures by default.
pub const DEFAULT_RETRY_ON: [u32; 3] = [502, 503, 504];
/// Body kept for a fallback rule by default.
pub const DEFAULT_BUFFER_LIMIT_BYTES: usize = 1024 * 1024;

fn status_list(statuses: &[Status]) -> knocker_proto::v1::StatusList {
    knocker_proto::v1::StatusList {
        statuses: statuses.iter().map(Status::text).collect(),
    }
}

/// The request attributes rules look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub authority: &'a str,
    pub path: &'a str,
    pub method: &'a str,
}

impl Rule {
    /// Whether the rule selects the request; `has_header` answers header presence.
    pub fn matches(&self, request: RequestView<'_>, has_header: impl Fn(&str) -> bool) -> bool {
        let m = &self.matcher;
        if let Some(host) = &m.host {
            if !host_matches(host, request.authority) {
                return false;
            }
        }
        if let Some(prefix) = &m.path_prefix {
            let path = request.path.split('?').next().unwrap_or_default();
            if !path.starts_with(prefix.as_str()) {
                return false;
            }
        }
        if !m.methods.is_empty() && !m.methods.iter().any(|x| x == request.method) {
            return false;
        }
        m.headers.iter().all(|h| has_header(h))
    }

    pub fn retry_on(&self) -> &[u32] {
        self.retry_on.as_deref().unwrap_or(&DEFAULT_RETRY_ON)
    }

    pub fn buffer_limit_bytes(&self) -> usize {
        self.buffer_limit_bytes
            .unwrap_or(DEFAULT_BUFFER_LIMIT_BYTES)
    }

    pub fn policy(&self) -> RulePolicy {
        let group = self.group.clone().unwrap_or_default();
        match &self.delivery {
            Some(d) => RulePolicy {
                target: d.target.clone(),
                retries: d.retries,
                max_age_s: d.max_age_s,
                backoff_factor: d.backoff_factor,
                max_backoff_s: d.max_backoff_s,
                timeout_s: d.timeout_s,
                callback: d.callback.clone().unwrap_or_default(),
                ordered: d.ordered,
                group,
                schedule_s: d.schedule_s.clone(),
                retry_on: d.retry_on.as_deref().map(status_list),
                stop_on: d.stop_on.as_deref().map(status_list),
                rate_per_s: d.rate_per_s.unwrap_or_default(),
                burst: d.burst.unwrap_or_default(),
            },
            None => RulePolicy {
                group,
                ..RulePolicy::default()
            },
        }
    }

    /// Checks one rule; the error names the rule and the field.
    pub fn validate(&self, index: usize) -> Result<(), String> {
        self.validate_fields(index)?;
        let Some(d) = &self.delivery else {
            return Ok(());
        };
        let at = |field: &str| format!("`rules[{index}].{field}` (rule `{}`)", self.name);
        if d.schedule_s.len() > MAX_SCHEDULE_STEPS {
            return Err(format!(
                "{} has more than {MAX_SCHEDULE_STEPS} steps",
                at("delivery.schedule_s")
            ));
        }
        if let Some(i) = d
            .schedule_s
            .iter()
            .position(|s| !s.is_finite() || !(0.0..=MAX_BACKOFF_S).contains(s))
        {
            return Err(format!(
                "{} must be a number of seconds from 0 to {MAX_BACKOFF_S}",
                at(&format!("delivery.schedule_s[{i}]"))
            ));
        }
        for (field, list) in [("retry_on", &d.retry_on), ("stop_on", &d.stop_on)] {
            if let Some(i) = list.iter().flatten().position(|s| !s.is_valid()) {
                return Err(format!(
                    "{}: use a status (`410`), a class (`5xx`) or a range (`500-504`) between 100 and 599",
                    at(&format!("delivery.{field}[{i}]"))
                ));
            }
        }
        match (d.rate_per_s, d.burst) {
            (None, Some(_)) => {
                return Err(format!(
                    "{} needs {}",
                    at("delivery.burst"),
                    at("delivery.rate_per_s")
                ))
            }
            (Some(r), _) if !(r.is_finite() && r > 0.0 && r <= MAX_RATE_PER_S) => {
                return Err(format!(
                    "{} must be a number above 0 and at most {MAX_RATE_PER_S}",
                    at("delivery.rate_per_s")
                ))
            }
            (_, Some(b)) if !(1..=MAX_BURST).contains(&b) => {
                return Err(format!(
                    "{} must be from 1 to {MAX_BURST}",
                    at("delivery.burst")
                ))
            }
            _ => {}
        }
        Ok(())
    }

    fn validate_fields(&self, index: usize) -> Result<(), String> {
        let at = |field: &str| format!("`rules[{index}].{field}` (rule `{}`)", self.name);
        if self.name.trim().is_empty() {
            return Err(format!("`rules[{index}].name` must not be empty"));
        }
        if self.mode == RuleMode::Broadcast {
            if self.delivery.is_some() {
                return Err(format!(
                    "{} does not apply to broadcast rules: the group's policy does",
                    at("delivery")
                ));
            }
            let group_ok = self.group.as_deref().is_some_and(|g| {
                !g.is_empty()
                    && g.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
            if !group_ok {
                return Err(format!(
                    "{} must name a group (letters, digits, `-`, `_`)",
                    at("group")
                ));
            }
            return self.validate_match_and_fallback(index);
        }
        if self.group.is_some() {
            return Err(format!("{} applies to broadcast rules only", at("group")));
        }
        let Some(d) = &self.delivery else {
            return Err(format!("{} is required", at("delivery")));
        };
        if !is_http_url(&d.target) {
            return Err(format!(
                "{} must be an http:// or https:// URL with a host, got `{}`",
                at("delivery.target"),
                d.target
            ));
        }
        if let Some(callback) = &d.callback {
            if !is_http_url(callback) {
                return Err(format!(
                    "{} must be an http:// or https:// URL with a host, got `{callback}`",
                    at("delivery.callback")
                ));
            }
        }
        if d.max_age_s > MAX_AGE_S {
            return Err(format!(
                "{} must be at most {MAX_AGE_S} (ten years)",
                at("delivery.max_age_s")
            ));
        }
        if d.max_age_s == 0 && d.retries.is_none() {
            return Err(format!(
                "{} is 0 (no age limit), so {} must be given",
                at("delivery.max_age_s"),
                at("delivery.retries")
            ));
        }
        for (field, value) in [
            ("delivery.backoff_factor", d.backoff_factor),
            ("delivery.max_backoff_s", d.max_backoff_s),
        ] {
            if !value.is_finite() || !(0.0..=MAX_BACKOFF_S).contains(&value) {
                return Err(format!(
                    "{} must be a number from 0 to {MAX_BACKOFF_S}",
                    at(field)
                ));
            }
        }
        if !d.timeout_s.is_finite() || d.timeout_s <= 0.0 || d.timeout_s > MAX_TIMEOUT_S {
            return Err(format!(
                "{} must be a number above 0 and at most {MAX_TIMEOUT_S}",
                at("delivery.timeout_s")
            ));
        }
        self.validate_match_and_fallback(index)
    }

    fn validate_match_and_fallback(&self, index: usize) -> Result<(), String> {
        let at = |field: &str| format!("`rules[{index}].{field}` (rule `{}`)", self.name);
        if let Some(prefix) = &self.matcher.path_prefix {
            if !prefix.starts_with('/') {
                return Err(format!("{} must start with `/`", at("match.path_prefix")));
            }
        }
        if self
            .matcher
            .methods
            .iter()
            .any(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-'))
        {
            return Err(format!(
                "{} must be upper-case method names",
                at("match.methods")
            ));
        }
        if self.mode != RuleMode::Fallback {
            if self.retry_on.is_some() {
                return Err(format!("{} applies to fallback rules only", at("retry_on")));
            }
            if self.buffer_limit_bytes.is_some() {
                return Err(format!(
                    "{} applies to fallback rules only",
                    at("buffer_limit_bytes")
                ));
            }
        }
        if let Some(statuses) = &self.retry_on {
            if statuses.iter().any(|s| !(100..=599).contains(s)) {
                return Err(format!("{} must hold HTTP statuses", at("retry_on")));
            }
        }
        Ok(())
    }
}

fn host_matches(pattern: &str, authority: &str) -> bool {
    let authority = authority.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    // Without a port in the pattern, compare the host part only.
    let candidate = if pattern.contains(':') {
        authority.as_str()
    } else {
        strip_port(&authority)
    };
    match pattern.strip_prefix("*.") {
        Some(suffix) => candidate
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => candidate == pattern,
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .and_then(|end| authority.get(..=end))
            .unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn is_http_url(value: &str) -> bool {
    let rest = if let Some(rest) = value.strip_prefix("http://") {
        rest
    } else if let Some(rest) = value.strip_prefix("https://") {
        rest
    } else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    !host.is_empty() && !host.contains(['@', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        serde_json::from_str(json).unwrap()
    }

    fn view<'a>(authority: &'a str, path: &'a str, method: &'a str) -> RequestView<'a> {
        RequestView {
            authority,
            path,
            method,
        }
    }

    #[test]
    fn matches_host_path_method_and_headers() {
        let r = rule(
            r#"{"name":"o","mode":"capture","delivery":{"target":"http://t"},
                "match":{"host":"*.example.com","path_prefix":"/orders","methods":["POST"],
                         "headers":["x-tenant"]}}"#,
        );
        let yes = |_: &str| true;
        assert!(r.matches(view("a.example.com:8080", "/orders/1?x", "POST"), yes));
        assert!(r.matches(view("A.Example.COM", "/orders", "POST"), yes));
        assert!(!r.matches(view("example.com", "/orders", "POST"), yes));
        assert!(!r.matches(view("a.example.com", "/order", "POST"), yes));
        assert!(!r.matches(view("a.example.com", "/x?/orders", "POST"), yes));
        assert!(!r.matches(view("a.example.com", "/orders", "GET"), yes));
        assert!(!r.matches(view("a.example.com", "/orders", "POST"), |h| h
            != "x-tenant"));
    }

    #[test]
    fn exact_host_ignores_the_port_unless_given() {
        let r = rule(
            r#"{"name":"o","mode":"capture","delivery":{"target":"http://t"},"match":{"host":"h"}}"#,
        );
        assert!(r.matches(view("h:10000", "/", "GET"), |_| false));
        assert!(!r.matches(view("hh", "/", "GET"), |_| false));
        let r = rule(
            r#"{"name":"o","mode":"capture","delivery":{"target":"http://t"},"match":{"host":"h:1"}}"#,
        );
        assert!(r.matches(view("h:1", "/", "GET"), |_| false));
        assert!(!r.matches(view("h:2", "/", "GET"), |_| false));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn an_empty_match_selects_everything() {
        let r = rule(r#"{"name":"all","mode":"fallback","delivery":{"target":"http://t"}}"#);
        assert!(r.matches(view("x", "/", "DELETE"), |_| false));
        assert_eq!(r.retry_on(), DEFAULT_RETRY_ON);
        assert_eq!(r.buffer_limit_bytes(), DEFAULT_BUFFER_LIMIT_BYTES);
    }

    #[test]
    fn policy_carries_the_delivery_fields() {
        let r = rule(
            r#"{"name":"o","mode":"capture","delivery":{"target":"http://t:1/base",
                "retries":3,"max_age_s":60,"backoff_factor":1.5,"max_backoff_s":5,
                "timeout_s":2,"callback":"http://cb/","ordered":true}}"#,
        );
        let p = r.policy();
        assert_eq!(p.target, "http://t:1/base");
        assert_eq!(p.retries, Some(3));
        assert_eq!(p.max_age_s, 60);
        assert_eq!(p.backoff_factor, 1.5);
        assert_eq!(p.max_backoff_s, 5.0);
        assert_eq!(p.timeout_s, 2.0);
        assert_eq!(p.callback, "http://cb/");
        assert!(p.ordered);
        assert!(p.schedule_s.is_empty() && p.retry_on.is_none() && p.stop_on.is_none());
        assert_eq!((p.rate_per_s, p.burst), (0.0, 0));
        let r = rule(
            r#"{"name":"o","mode":"capture","delivery":{"target":"http://t",
                "schedule_s":[5,300,1800],"retry_on":["5xx",429],"stop_on":[],
                "rate_per_s":2.5,"burst":4}}"#,
        );
        assert_eq!(r.validate(0), Ok(()));
        let p = r.policy();
        assert_eq!(p.schedule_s, [5.0, 300.0, 1800.0]);
        assert_eq!(
            p.retry_on.map(|l| l.statuses),
            Some(vec!["5xx".into(), "429".into()])
        );
        assert_eq!(
            p.stop_on.map(|l| l.statuses),
            Some(vec![]),
            "[]: nothing is final"
        );
        assert_eq!((p.rate_per_s, p.burst), (2.5, 4));
    }

    #[test]
    fn broadcast_rules_send_their_group() {
        let r = rule(
            r#"{"name":"purge","mode":"broadcast","group":"caches","match":{"methods":["PURGE"]}}"#,
        );
        assert_eq!(r.validate(0), Ok(()));
        let p = r.policy();
        assert_eq!(p.group, "caches");
        assert_eq!(p.target, "");
        assert_eq!(r.mode.proto(), Mode::Broadcast);
    }

    #[test]
    fn validation_names_the_rule_and_field() {
        let cases = [
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"ftp://x"}}"#,
                "delivery.target",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://"}}"#,
                "delivery.target",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","callback":"x"}}"#,
                "delivery.callback",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","max_age_s":0}}"#,
                "delivery.retries",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","timeout_s":0}}"#,
                "delivery.timeout_s",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t"},"retry_on":[503]}"#,
                "retry_on",
            ),
            (
                r#"{"name":"a","mode":"fallback","delivery":{"target":"http://t"},"retry_on":[5]}"#,
                "retry_on",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t"},"match":{"path_prefix":"x"}}"#,
                "match.path_prefix",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t"},"match":{"methods":["post"]}}"#,
                "match.methods",
            ),
            (
                r#"{"name":" ","mode":"capture","delivery":{"target":"http://t"}}"#,
                "name",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","schedule_s":[1,-1]}}"#,
                "delivery.schedule_s[1]",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","retry_on":["5xx","6xx"]}}"#,
                "delivery.retry_on[1]",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","stop_on":[99]}}"#,
                "delivery.stop_on[0]",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","stop_on":["504-500"]}}"#,
                "delivery.stop_on[0]",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","rate_per_s":0}}"#,
                "delivery.rate_per_s",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","burst":3}}"#,
                "delivery.rate_per_s",
            ),
            (
                r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","rate_per_s":1,"burst":0}}"#,
                "delivery.burst",
            ),
        ];
        for (json, field) in cases {
            let e = rule(json).validate(2).unwrap_err();
            assert!(e.contains(&format!("rules[2].{field}")), "{json}: {e}");
        }
        assert!(
            rule(r#"{"name":"a","mode":"capture","delivery":{"target":"http://t","max_age_s":0,"retries":2}}"#)
                .validate(0)
                .is_ok()
        );
    }
}
