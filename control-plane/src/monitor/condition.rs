//! Monitor conditions: what a healthy answer looks like. Every condition is checked;
//! the first one that fails is named in the result.

use serde::{Deserialize, Serialize};

use crate::validate::Invalid;

/// One condition, as written in the configuration (exactly one field set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The status is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<u16>>,
    /// The status is within `[low, high]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_range: Option<[u16; 2]>,
    /// The body contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// The body matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_regex: Option<String>,
    /// The body is JSON and the value at this pointer (RFC 6901) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<String>,
    /// … equals this JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    /// The answer took less than this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_time_below_ms: Option<u64>,
}

/// A condition ready to evaluate (the regular expression compiled once).
#[derive(Debug, Clone)]
pub enum Check {
    Status(Vec<u16>),
    StatusRange(u16, u16),
    BodyContains(String),
    BodyRegex(regex::Regex),
    JsonPointer(String, serde_json::Value),
    ResponseTimeBelow(u64),
}

/// What a check observed.
pub struct Observed<'a> {
    pub status: u16,
    pub body: &'a [u8],
    pub latency_ms: u64,
}

impl Condition {
    /// Compiles the condition; the error says what is wrong with it (`at` names it).
    pub fn compile(&self, at: &str) -> Result<Check, Invalid> {
        let set = [
            self.status.is_some(),
            self.status_range.is_some(),
            self.body_contains.is_some(),
            self.body_regex.is_some(),
            self.json_pointer.is_some(),
            self.response_time_below_ms.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            return Err(Invalid(format!(
                "{at}: one of status, status_range, body_contains, body_regex, json_pointer \
                 (with equals), response_time_below_ms per condition"
            )));
        }
        if self.equals.is_some() != self.json_pointer.is_some() {
            return Err(Invalid(format!(
                "{at}: json_pointer and equals go together"
            )));
        }
        Ok(if let Some(statuses) = &self.status {
            if statuses.is_empty() {
                return Err(Invalid(format!("{at}.status: must not be empty")));
            }
            Check::Status(statuses.clone())
        } else if let Some([low, high]) = self.status_range {
            if low > high {
                return Err(Invalid(format!(
                    "{at}.status_range: [low, high] with low ≤ high"
                )));
            }
            Check::StatusRange(low, high)
        } else if let Some(text) = &self.body_contains {
            Check::BodyContains(text.clone())
        } else if let Some(pattern) = &self.body_regex {
            Check::BodyRegex(
                regex::Regex::new(pattern).map_err(|e| Invalid(format!("{at}.body_regex: {e}")))?,
            )
        } else if let (Some(pointer), Some(value)) = (&self.json_pointer, &self.equals) {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(Invalid(format!("{at}.json_pointer: must start with `/`")));
            }
            Check::JsonPointer(pointer.clone(), value.clone())
        } else {
            Check::ResponseTimeBelow(self.response_time_below_ms.unwrap_or_default())
        })
    }
}

impl Check {
    /// `None` when it holds, else why not.
    pub fn failure(&self, seen: &Observed<'_>) -> Option<String> {
        match self {
            Self::Status(set) => (!set.contains(&seen.status)).then(|| {
                let set: Vec<String> = set.iter().map(u16::to_string).collect();
                format!("status {} not in [{}]", seen.status, set.join(", "))
            }),
            Self::StatusRange(low, high) => (!(low..=high).contains(&&seen.status))
                .then(|| format!("status {} not in {low}–{high}", seen.status)),
            Self::BodyContains(text) => (!contains(seen.body, text.as_bytes()))
                .then(|| format!("body does not contain {text:?}")),
            Self::BodyRegex(re) => (!re.is_match(&String::from_utf8_lossy(seen.body)))
                .then(|| format!("body does not match /{}/", re.as_str())),
            Self::JsonPointer(pointer, want) => {
                let body: Result<serde_json::Value, _> = serde_json::from_slice(seen.body);
                match body {
                    Err(_) => Some(format!("body is not JSON (json_pointer {pointer})")),
                    Ok(json) => match json.pointer(pointer) {
                        None => Some(format!("json_pointer {pointer} not found")),
                        Some(got) if got == want => None,
                        Some(got) => Some(format!(
                            "json_pointer {pointer} is {}, not {want}",
                            quote(&got.to_string())
                        )),
                    },
                }
            }
            Self::ResponseTimeBelow(limit) => (seen.latency_ms >= *limit)
                .then(|| format!("response time {} ms not below {limit} ms", seen.latency_ms)),
        }
    }
}

/// Most characters of what a check read that a failed condition quotes: enough to see
/// what was there, never a whole document (the result is stored and shown by the API).
pub const QUOTE_CHARS: usize = 64;

fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_condition_quotes_only_a_short_prefix_of_what_it_read() {
        let doc = serde_json::json!({"secret": "x".repeat(10_000)}).to_string();
        let check = Check::JsonPointer(String::new(), serde_json::json!("up"));
        let seen = Observed {
            status: 200,
            body: doc.as_bytes(),
            latency_ms: 1,
        };
        let why = check.failure(&seen).unwrap();
        assert!(why.len() < 200, "{why}");
        assert!(why.contains(&format!("({} bytes)", doc.len())), "{why}");
    }

    fn check(toml_cond: &str) -> Check {
        let c: Condition = toml::from_str(toml_cond).unwrap();
        c.compile("c").unwrap()
    }

    fn seen(status: u16, body: &str, latency_ms: u64) -> Observed<'_> {
        Observed {
            status,
            body: body.as_bytes(),
            latency_ms,
        }
    }

    #[test]
    fn each_condition_says_why_it_failed() {
        assert_eq!(
            check("status = [200, 204]").failure(&seen(204, "", 1)),
            None
        );
        assert_eq!(
            check("status = [200, 204]")
                .failure(&seen(503, "", 1))
                .as_deref(),
            Some("status 503 not in [200, 204]")
        );
        assert_eq!(
            check("status_range = [200, 299]").failure(&seen(299, "", 1)),
            None
        );
        assert_eq!(
            check("status_range = [200, 299]")
                .failure(&seen(302, "", 1))
                .as_deref(),
            Some("status 302 not in 200–299")
        );
        assert_eq!(
            check("body_contains = \"ok\"").failure(&seen(200, "is ok", 1)),
            None
        );
        assert!(check("body_contains = \"ok\"")
            .failure(&seen(200, "bad", 1))
            .is_some());
        assert_eq!(
            check("body_regex = \"^v[0-9]+$\"").failure(&seen(200, "v12", 1)),
            None
        );
        assert!(check("body_regex = \"^v[0-9]+$\"")
            .failure(&seen(200, "x", 1))
            .is_some());
        let pointer = "json_pointer = \"/db/status\"\nequals = \"up\"";
        assert_eq!(
            check(pointer).failure(&seen(200, r#"{"db":{"status":"up"}}"#, 1)),
            None
        );
        assert_eq!(
            check(pointer)
                .failure(&seen(200, r#"{"db":{"status":"down"}}"#, 1))
                .as_deref(),
            Some("json_pointer /db/status is \"down\", not \"up\"")
        );
        assert!(check(pointer)
            .failure(&seen(200, "{}", 1))
            .unwrap()
            .contains("not found"));
        assert!(check(pointer)
            .failure(&seen(200, "<html>", 1))
            .unwrap()
            .contains("not JSON"));
        let numbers = "json_pointer = \"/n\"\nequals = 3";
        assert_eq!(check(numbers).failure(&seen(200, r#"{"n":3}"#, 1)), None);
        assert_eq!(
            check("response_time_below_ms = 100").failure(&seen(200, "", 99)),
            None
        );
        assert!(check("response_time_below_ms = 100")
            .failure(&seen(200, "", 100))
            .is_some());
    }

    #[test]
    fn bad_conditions_are_refused_with_their_place() {
        for text in [
            "",
            "status = [200]\nbody_contains = \"x\"",
            "status = []",
            "status_range = [300, 200]",
            "body_regex = \"(\"",
            "json_pointer = \"/a\"",
            "equals = 1",
            "json_pointer = \"a\"\nequals = 1",
        ] {
            let c: Condition = toml::from_str(text).unwrap();
            let e = c.compile("monitors.api.conditions[1]").unwrap_err();
            assert!(
                e.0.starts_with("monitors.api.conditions[1]"),
                "{text:?}: {e}"
            );
        }
        assert!(toml::from_str::<Condition>("stat = 1").is_err());
    }
}
