//! The Knocker protocol's request rules: which headers configure the job, which are
//! forwarded, and the validation with the exact messages Knocker 1.4.1 clients parse.
//! Every failing header is reported at once.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::{Headers, Job, Kind, Policy, Request, Trust, CALLBACK_SUFFIX};
use crate::clock::Millis;
use crate::hosts_only::HostsOnly;
use crate::validate::Invalid;

pub use super::submission::{BroadcastRule, Submission};

/// Validation errors: lower-case header name → messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Errors(pub BTreeMap<String, Vec<String>>);

impl Errors {
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0
            .entry(field.to_owned())
            .or_default()
            .push(message.into());
    }

    /// The 400 body: `{"errors": {...}, "status": false}`.
    pub fn to_json(&self) -> Value {
        json!({ "errors": self.0, "status": false })
    }
}

pub const MISSING: &str = "Missing data for required field.";
pub const NOT_A_NUMBER: &str = "Not a valid number.";
pub const SPECIAL_NUMBER: &str = "Special numeric values (nan or infinity) are not permitted.";
pub const NOT_AN_INTEGER: &str = "Not a valid integer.";
pub const BAD_SCHEME: &str = "Must be one of: https, http.";
pub const BAD_URL: &str = "Not a valid URL.";
pub const BAD_HOST: &str = "Not a valid host.";
pub const NOT_A_STRING: &str = "Not a valid string.";
pub const EMPTY: &str = "Field may not be empty.";

/// Longest `Knocker-Id` accepted (ids are store keys and travel in headers).
pub const MAX_ID_LEN: usize = 256;

/// Headers never forwarded: set by the connection, not by the client.
const HOP_BY_HOP: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// Splits headers: names lower-cased; hop-by-hop, `host`, `content-length` and Envoy's
/// internal `x-envoy-*` dropped; `knocker-*` become config (first value wins); the rest
/// is forwarded in its original order.
pub fn split_headers(headers: &[(String, Vec<u8>)]) -> (BTreeMap<String, Vec<u8>>, Headers) {
    split_owned_headers(headers.to_vec())
}

/// [`split_headers`] of headers the caller gives up: names are lower-cased in place and
/// values moved, nothing is copied.
pub fn split_owned_headers(headers: Headers) -> (BTreeMap<String, Vec<u8>>, Headers) {
    // Headers named by `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    let connection_named: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut config = BTreeMap::new();
    let mut forwarded = Vec::with_capacity(headers.len());
    for (mut name, value) in headers {
        name.make_ascii_lowercase();
        if name.starts_with(':')
            || HOP_BY_HOP.contains(&name.as_str())
            || name.starts_with("x-envoy-")
            || connection_named.contains(&name)
        {
            continue;
        }
        if name.starts_with("knocker-") {
            config.entry(name).or_insert(value);
        } else {
            forwarded.push((name, value));
        }
    }
    (config, forwarded)
}

/// The `Knocker-Id` header, when given and valid (else its error is added).
pub fn knocker_id(raw: &BTreeMap<String, Vec<u8>>, errors: &mut Errors) -> Option<String> {
    match raw.get("knocker-id").map(|v| std::str::from_utf8(v)) {
        None => None,
        Some(Err(_)) => {
            errors.add("knocker-id", NOT_A_STRING);
            None
        }
        Some(Ok("")) => {
            errors.add("knocker-id", EMPTY);
            None
        }
        Some(Ok(id)) if id.len() > MAX_ID_LEN => {
            errors.add(
                "knocker-id",
                format!("Longer than maximum length {MAX_ID_LEN}."),
            );
            None
        }
        Some(Ok(id)) => match reserved_id(id) {
            Some(why) => {
                errors.add("knocker-id", why);
                None
            }
            None => Some(id.to_owned()),
        },
    }
}

/// Why a client may not choose `id`: it holds a control character, or it lies in a
/// namespace the control plane makes its own ids in — a job's failure callback
/// (`<id>:callback`), a broadcast's members (`<id>.<n>`), monitor alerts
/// (`monitor.…`) — so that nobody can take such an id first and swallow what it is for.
pub fn reserved_id(id: &str) -> Option<String> {
    if id.chars().any(char::is_control) {
        return Some("Control characters are not allowed.".into());
    }
    if id.ends_with(CALLBACK_SUFFIX) {
        return Some(format!(
            "Ids ending in `{CALLBACK_SUFFIX}` are reserved for failure callbacks."
        ));
    }
    if id.starts_with("monitor.") {
        return Some("Ids starting with `monitor.` are reserved for monitor alerts.".into());
    }
    if let Some((_, n)) = id.rsplit_once('.') {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Some(
                "Ids ending in `.<number>` are reserved for the members of broadcasts.".into(),
            );
        }
    }
    None
}

/// The bytes of an HTTP token (RFC 9110 §5.6.2), and `:` (of pseudo-headers).
const TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
                    | b':'
            );
        i += 1;
    }
    table
};

/// The first header a client may not send as it is: a name that is not an HTTP token,
/// or a value with a control character (tab aside) — nothing of the kind is stored or
/// forwarded. Returns the field to name and why.
pub fn unsafe_header(headers: &[(String, Vec<u8>)]) -> Option<(String, &'static str)> {
    headers.iter().find_map(|(name, value)| {
        let is_token = !name.is_empty() && name.bytes().all(|b| TOKEN[usize::from(b)]);
        if !is_token {
            let shown: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
            return Some((shown, "Not a valid header name."));
        }
        // Without an early exit the loop is vectorised: a value is short, and clean.
        let control = value.iter().fold(false, |seen, &b| {
            seen | (b < 0x20 && b != b'\t') | (b == 0x7f)
        });
        if control {
            return Some((
                name.to_ascii_lowercase(),
                "Control characters are not allowed.",
            ));
        }
        None
    })
}

/// What a submission gets for each `Knocker-*` setting it leaves out, and the most it may
/// ask for: Knocker 1.4.1's `SCHEME`, `TIMEOUT(_MAX)`, `RETRIES(_MAX)`,
/// `RETRIES_BACKOFF_FACTOR(_MAX)` and `HOSTS_ONLY`.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub scheme: String,
    pub hosts_only: HostsOnly,
    pub timeout: f64,
    pub timeout_max: f64,
    pub retries: u32,
    pub retries_max: u32,
    pub backoff_factor: f64,
    pub backoff_factor_max: f64,
}

impl Default for Defaults {
    /// Knocker 1.4.1's.
    fn default() -> Self {
        Self {
            scheme: "https".into(),
            hosts_only: HostsOnly::default(),
            timeout: 10.0,
            timeout_max: 60.0,
            retries: 2,
            retries_max: 10,
            backoff_factor: 0.5,
            backoff_factor_max: 600.0,
        }
    }
}

/// Builds the job a submission asks for, or every reason it cannot. The job takes the
/// submission's headers and body as they are.
pub fn build_job(
    defaults: &Defaults,
    submission: Submission,
    now: Millis,
    new_id: impl FnOnce() -> String,
) -> Result<Job, Errors> {
    let Submission {
        method,
        path,
        headers,
        body,
        ..
    } = submission;
    let (raw, forwarded) = split_owned_headers(headers);
    let mut errors = Errors::default();
    let text = |name: &str, errors: &mut Errors| -> Option<String> {
        let value = raw.get(name)?;
        match std::str::from_utf8(value) {
            Ok(s) => Some(s.to_owned()),
            Err(_) => {
                errors.add(name, NOT_A_STRING);
                None
            }
        }
    };

    let host = match text("knocker-host", &mut errors) {
        None if !raw.contains_key("knocker-host") => {
            errors.add("knocker-host", MISSING);
            None
        }
        None => None,
        Some(h) => match parse_host(&h) {
            Some(parsed) => Some(parsed),
            None => {
                errors.add("knocker-host", BAD_HOST);
                None
            }
        },
    };
    if let Some((host_port, bare)) = &host {
        if !defaults.hosts_only.allows(host_port, bare) {
            errors.add(
                "knocker-host",
                format!(
                    "Host '{host_port}' is not in allowed hosts: {}",
                    defaults.hosts_only.0.join(", ")
                ),
            );
        }
    }

    let scheme = match text("knocker-scheme", &mut errors) {
        None => defaults.scheme.clone(),
        Some(s) if s == "http" || s == "https" => s,
        Some(_) => {
            errors.add("knocker-scheme", BAD_SCHEME);
            defaults.scheme.clone()
        }
    };

    let timeout = text("knocker-timeout", &mut errors)
        .and_then(|v| {
            float_in_range(&v, defaults.timeout_max, true)
                .map_err(|e| errors.add("knocker-timeout", e.0))
                .ok()
        })
        .unwrap_or(defaults.timeout);
    let retries = text("knocker-retries", &mut errors)
        .and_then(|v| {
            integer_in_range(&v, defaults.retries_max)
                .map_err(|e| errors.add("knocker-retries", e.0))
                .ok()
        })
        .unwrap_or(defaults.retries);
    let backoff_factor = text("knocker-backoff-factor", &mut errors)
        .and_then(|v| {
            float_in_range(&v, defaults.backoff_factor_max, false)
                .map_err(|e| errors.add("knocker-backoff-factor", e.0))
                .ok()
        })
        .unwrap_or(defaults.backoff_factor);

    let callback = text("knocker-callback", &mut errors).and_then(|v| {
        if is_http_url(&v) {
            Some(v)
        } else {
            errors.add("knocker-callback", BAD_URL);
            None
        }
    });

    let id = knocker_id(&raw, &mut errors);

    let Some((host_port, _)) = host.filter(|_| errors.0.is_empty()) else {
        return Err(errors);
    };
    let id = id.unwrap_or_else(new_id);

    let mut config = Map::new();
    config.insert("host".into(), json!(host_port));
    config.insert("scheme".into(), json!(scheme));
    config.insert("callback".into(), json!(callback));
    config.insert("id".into(), json!(id));
    config.insert("timeout".into(), json!(timeout));
    config.insert("retries".into(), json!(retries));
    config.insert("backoff_factor".into(), json!(backoff_factor));
    for (name, value) in &raw {
        if !KNOWN.contains(&name.as_str()) {
            config.insert(name.clone(), json!(String::from_utf8_lossy(value)));
        }
    }

    let slash = if path.starts_with('/') { "" } else { "/" };
    let request = Request {
        method,
        url: format!("{scheme}://{host_port}{slash}{path}"),
        headers: forwarded,
        body,
    };
    let policy = Policy {
        timeout,
        retries,
        backoff_factor,
        callback,
        deadline: None,
        max_backoff_s: None,
        callback_trust: Trust::Client,
        retry: crate::job::retry::RetryRules::default(),
        source: None,
        rate: None,
    };
    Ok(Job::new_pending(id, Kind::Target, request, policy, Trust::Client, now).with_config(config))
}

/// The Knocker headers of the protocol (any other `knocker-*` is kept in the config).
pub const KNOWN: &[&str] = &[
    "knocker-host",
    "knocker-scheme",
    "knocker-timeout",
    "knocker-retries",
    "knocker-backoff-factor",
    "knocker-callback",
    "knocker-id",
];

/// `Knocker-Host`: a leading `http://`/`https://` is dropped; what remains must be a
/// host name, IPv4 address or bracketed IPv6 address with an optional port.
/// Returns (`host[:port]`, `host`).
fn parse_host(value: &str) -> Option<(String, String)> {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    let v = if lower.starts_with("http://") {
        &v[7..]
    } else if lower.starts_with("https://") {
        &v[8..]
    } else {
        v
    };
    if v.is_empty() || v.contains(['@', '/', '?', '#', ' ', '\\']) {
        return None;
    }
    let authority: http::uri::Authority = v.parse().ok()?;
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    let valid_host = if host.starts_with('[') {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    } else {
        host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    };
    if !valid_host {
        return None;
    }
    // Whatever follows the host must be `:<1..=65535>`.
    let after_host = &authority.as_str()[host.len()..];
    if let Some(port) = after_host.strip_prefix(':') {
        if !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
            return None;
        }
    } else if !after_host.is_empty() {
        return None;
    }
    Some((authority.as_str().to_owned(), host.to_owned()))
}

/// An http(s) URL with a host and neither query nor fragment: a base that paths are
/// appended to (rule targets, group members).
pub fn is_http_base_url(value: &str) -> bool {
    match reqwest::Url::parse(value) {
        Ok(url) => is_http_url(value) && url.query().is_none() && url.fragment().is_none(),
        Err(_) => false,
    }
}

pub fn is_http_url(value: &str) -> bool {
    match reqwest::Url::parse(value.trim()) {
        Ok(url) => {
            matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|h| !h.is_empty())
        }
        Err(_) => false,
    }
}

/// Python's float(): surrounding white space allowed, `nan`/`inf` recognised (and refused).
fn float_in_range(value: &str, max: f64, max_as_float: bool) -> Result<f64, Invalid> {
    let v: f64 = value
        .trim()
        .parse()
        .map_err(|_| Invalid::new(NOT_A_NUMBER))?;
    if !v.is_finite() {
        return Err(Invalid::new(SPECIAL_NUMBER));
    }
    if !(0.0..=max).contains(&v) {
        let max = if max_as_float {
            python_float(max)
        } else {
            python_number(max)
        };
        return Err(Invalid(range_message(&max)));
    }
    Ok(v)
}

/// Python's int() on a string: no fraction, no exponent.
fn integer_in_range(value: &str, max: u32) -> Result<u32, Invalid> {
    let t = value.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid::new(NOT_AN_INTEGER));
    }
    match t.parse::<i64>() {
        Ok(v) if (0..=i64::from(max)).contains(&v) => Ok(v as u32),
        _ => Err(Invalid(range_message(&max.to_string()))), // out of range, or too many digits
    }
}

fn range_message(max: &str) -> String {
    format!("Must be greater than or equal to 0 and less than or equal to {max}.")
}

/// `60.0`, `0.5`: how Python prints a float.
fn python_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// `600` for a whole number, else as a float.
fn python_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Defaults {
        Defaults::default()
    }

    fn submit(headers: &[(&str, &str)]) -> Result<Job, Errors> {
        let sub = Submission {
            method: "POST".into(),
            path: "/p/a%2Fb?x=1&y=%3F".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: b"body".to_vec(),
            remote: None,
            authority: None,
            rule: None,
            broadcast_rule: None,
        };
        build_job(&settings(), sub, 1000, || "generated".into())
    }

    fn errors(headers: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        submit(headers).expect_err("should be rejected").0
    }

    #[test]
    fn builds_a_job_with_defaults() {
        let job = submit(&[
            ("Knocker-Host", "https://t.example:8443"),
            ("X-A", "1"),
            ("Host", "h"),
            ("Content-Length", "4"),
        ])
        .unwrap();
        assert_eq!(job.id, "generated");
        assert_eq!(job.request.url, "https://t.example:8443/p/a%2Fb?x=1&y=%3F");
        assert_eq!(job.request.headers, vec![("x-a".to_owned(), b"1".to_vec())]);
        assert_eq!(
            job.policy,
            Policy {
                timeout: 10.0,
                retries: 2,
                backoff_factor: 0.5,
                callback: None,
                deadline: None,
                max_backoff_s: None,
                callback_trust: crate::job::Trust::Client,
                retry: crate::job::retry::RetryRules::default(),
                source: None,
                rate: None,
            }
        );
        // Knocker-Host and Knocker-Callback are the client's choice.
        assert_eq!(job.trust, crate::job::Trust::Client);
        assert_eq!(job.config["host"], "t.example:8443");
        assert_eq!(job.config["timeout"].to_string(), "10.0");
        assert_eq!(job.config["callback"], Value::Null);
        assert_eq!(job.next_attempt_at, 1000);
    }

    #[test]
    fn config_headers_first_value_wins_and_extras_are_kept() {
        let job = submit(&[
            ("knocker-host", "a.example"),
            ("knocker-retries", "3"),
            ("knocker-retries", "5"),
            ("Knocker-Trace", "xyz"),
            ("knocker-scheme", "http"),
            ("knocker-timeout", " 1.5 "),
            ("knocker-backoff-factor", "0"),
            ("knocker-callback", "http://127.0.0.1:9000/cb?x=1"),
            ("knocker-id", "my-id"),
        ])
        .unwrap();
        assert_eq!(job.policy.retries, 3);
        assert_eq!(job.policy.timeout, 1.5);
        assert_eq!(job.policy.backoff_factor, 0.0);
        assert_eq!(
            job.policy.callback.as_deref(),
            Some("http://127.0.0.1:9000/cb?x=1")
        );
        assert_eq!(job.id, "my-id");
        assert_eq!(job.config["knocker-trace"], "xyz");
        assert!(job.request.url.starts_with("http://a.example/"));
        assert!(
            job.request.headers.is_empty(),
            "knocker-* headers are never forwarded"
        );
    }

    #[test]
    fn every_failing_header_is_reported_at_once() {
        let e = errors(&[
            ("knocker-timeout", "abc"),
            ("knocker-retries", "1.5"),
            ("knocker-backoff-factor", "nan"),
            ("knocker-scheme", "ftp"),
            ("knocker-callback", "not a url"),
        ]);
        assert_eq!(e["knocker-host"], [MISSING]);
        assert_eq!(e["knocker-timeout"], [NOT_A_NUMBER]);
        assert_eq!(e["knocker-retries"], [NOT_AN_INTEGER]);
        assert_eq!(e["knocker-backoff-factor"], [SPECIAL_NUMBER]);
        assert_eq!(e["knocker-scheme"], [BAD_SCHEME]);
        assert_eq!(e["knocker-callback"], [BAD_URL]);
        assert_eq!(e.len(), 6);
    }

    #[test]
    fn numbers_like_python() {
        let h = ("knocker-host", "t");
        assert_eq!(
            errors(&[h, ("knocker-timeout", "inf")])["knocker-timeout"],
            [SPECIAL_NUMBER]
        );
        assert_eq!(
            errors(&[h, ("knocker-timeout", "-Infinity")])["knocker-timeout"],
            [SPECIAL_NUMBER]
        );
        assert_eq!(
            errors(&[h, ("knocker-timeout", "60.5")])["knocker-timeout"],
            ["Must be greater than or equal to 0 and less than or equal to 60.0."]
        );
        assert_eq!(
            errors(&[h, ("knocker-timeout", "-1")])["knocker-timeout"],
            ["Must be greater than or equal to 0 and less than or equal to 60.0."]
        );
        assert_eq!(
            errors(&[h, ("knocker-retries", "2.0")])["knocker-retries"],
            [NOT_AN_INTEGER]
        );
        assert_eq!(
            errors(&[h, ("knocker-retries", "")])["knocker-retries"],
            [NOT_AN_INTEGER]
        );
        assert_eq!(
            errors(&[h, ("knocker-retries", "11")])["knocker-retries"],
            ["Must be greater than or equal to 0 and less than or equal to 10."]
        );
        assert_eq!(
            errors(&[h, ("knocker-retries", "99999999999999999999999")])["knocker-retries"],
            ["Must be greater than or equal to 0 and less than or equal to 10."]
        );
        assert_eq!(
            errors(&[h, ("knocker-retries", "-1")])["knocker-retries"],
            ["Must be greater than or equal to 0 and less than or equal to 10."]
        );
        assert_eq!(
            errors(&[h, ("knocker-backoff-factor", "601")])["knocker-backoff-factor"],
            ["Must be greater than or equal to 0 and less than or equal to 600."]
        );
        assert!(submit(&[
            h,
            ("knocker-retries", "+10"),
            ("knocker-timeout", "60"),
            ("knocker-backoff-factor", "1e2")
        ])
        .is_ok());
    }

    #[test]
    fn hosts() {
        for good in [
            "t",
            "a.example",
            "a.example:8080",
            "http://a.example",
            "HTTPS://a.example:1",
            "127.0.0.1:80",
            "[::1]:8080",
            "my_host",
        ] {
            assert!(parse_host(good).is_some(), "{good}");
        }
        for bad in [
            "",
            " ",
            "http://",
            "a.example/",
            "a b",
            "u@a.example",
            "a.example:",
            "a.example:0",
            "a.example:99999",
            "a..b",
            "[zz]",
            "a.example:x",
        ] {
            assert!(parse_host(bad).is_none(), "{bad:?}");
        }
        assert_eq!(errors(&[("knocker-host", "")])["knocker-host"], [BAD_HOST]);
        assert_eq!(
            parse_host("https://A.example:8443"),
            Some(("A.example:8443".into(), "A.example".into()))
        );
    }

    #[test]
    fn hosts_only_names_host_and_list() {
        let mut s = settings();
        s.hosts_only = HostsOnly(vec!["a.example".into(), "b.example".into()]);
        let sub = Submission {
            headers: vec![("knocker-host".into(), b"c.example".to_vec())],
            ..Submission::default()
        };
        let e = build_job(&s, sub, 0, String::new).unwrap_err();
        assert_eq!(
            e.0["knocker-host"],
            ["Host 'c.example' is not in allowed hosts: a.example, b.example"]
        );
        let ok = Submission {
            headers: vec![("knocker-host".into(), b"a.example:8443".to_vec())],
            ..Submission::default()
        };
        assert!(build_job(&s, ok, 0, String::new).is_ok());
    }

    #[test]
    fn ids() {
        assert_eq!(
            errors(&[("knocker-host", "t"), ("knocker-id", "")])["knocker-id"],
            [EMPTY]
        );
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            errors(&[("knocker-host", "t"), ("knocker-id", &long)])["knocker-id"],
            ["Longer than maximum length 256."]
        );
        for reserved in [
            "abc:callback",
            "abc.1",
            "x.y.22",
            "monitor.api.1.1.hook",
            "a\u{1}b",
            "a\u{85}b",
        ] {
            let e = errors(&[("knocker-host", "t"), ("knocker-id", reserved)]);
            assert!(e.contains_key("knocker-id"), "{reserved:?} was accepted");
        }
        for fine in [
            "order.abc",
            "v1.2a",
            "callback",
            "my-monitor.x",
            "2024-01-01",
        ] {
            assert!(
                submit(&[("knocker-host", "t"), ("knocker-id", fine)]).is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn unsafe_headers_are_named() {
        let h = |n: &str, v: &[u8]| vec![(n.to_owned(), v.to_vec())];
        assert_eq!(unsafe_header(&h("x-a", b"ok\tfine")), None);
        assert_eq!(
            unsafe_header(&h("X-A", b"a\r\nx-injected: 1")),
            Some(("x-a".into(), "Control characters are not allowed."))
        );
        assert_eq!(
            unsafe_header(&h("bad name", b"v")).unwrap().1,
            "Not a valid header name."
        );
        assert_eq!(unsafe_header(&h("x", b"\x00")).unwrap().0, "x");
        assert!(unsafe_header(&h("x", b"a\x7fb")).is_some(), "DEL");
        assert_eq!(unsafe_header(&h("x", "é, obs-text".as_bytes())), None);
    }

    /// Every byte, in a name and in a value, against RFC 9110's definitions.
    #[test]
    fn header_bytes_are_judged_one_by_one() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b);
            let name = String::from_utf8_lossy(&[b'x', b]).into_owned();
            let judged = unsafe_header(&[(name, b"v".to_vec())]);
            assert_eq!(judged.is_none(), tchar, "byte {b:#04x} in a name");
            let control = (b < 0x20 && b != b'\t') || b == 0x7f;
            let judged =
                unsafe_header(&[("x".into(), vec![b'v'; 40].into_iter().chain([b]).collect())]);
            assert_eq!(judged.is_some(), control, "byte {b:#04x} in a value");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let job = submit(&[
            ("knocker-host", "t"),
            ("Connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("Transfer-Encoding", "chunked"),
            ("x-envoy-internal", "true"),
            ("x-b", "2"),
            ("x-a", "1"),
            ("x-b", "3"),
        ])
        .unwrap();
        let names: Vec<&str> = job
            .request
            .headers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["x-b", "x-a", "x-b"]);
    }

    #[test]
    fn errors_json_shape() {
        let e = submit(&[]).unwrap_err();
        assert_eq!(
            e.to_json(),
            json!({"errors": {"knocker-host": [MISSING]}, "status": false})
        );
    }
}
