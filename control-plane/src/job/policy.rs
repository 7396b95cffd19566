//! A delivery policy as people configure it — for a filter rule, a broadcast group or a
//! notifier: a maximum age or a number of retries, the backoff, the per-attempt timeout.
//! One place checks it and turns it into a job's [`Policy`].

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Policy, Trust};
use crate::clock::Millis;
use crate::validate::Invalid;

/// The one type of a configured delivery policy: a broadcast group and a notifier
/// flatten it into their TOML tables, a filter rule's arrives in its gRPC submission.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct DeliveryPolicy {
    /// Give up this long after acceptance; 0 for no age limit.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    /// Attempts after the first; `None`: as many as the maximum age allows.
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: f64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_age_s: DEFAULT_MAX_AGE_S,
            retries: None,
            backoff_factor: DEFAULT_BACKOFF_FACTOR,
            max_backoff_s: DEFAULT_MAX_BACKOFF_S,
            timeout_s: DEFAULT_TIMEOUT_S,
        }
    }
}

/// The largest values a policy may hold, from any source (plugin config, TOML, gRPC).
pub const MAX_AGE_S: u64 = 315_360_000;
pub const MAX_BACKOFF_S: f64 = 86_400.0;
pub const MAX_TIMEOUT_S: f64 = 3600.0;

/// The defaults every configured policy starts from.
pub const DEFAULT_MAX_AGE_S: u64 = 86_400;
pub const DEFAULT_BACKOFF_FACTOR: f64 = 0.5;
pub const DEFAULT_MAX_BACKOFF_S: f64 = 60.0;
pub const DEFAULT_TIMEOUT_S: f64 = 10.0;

fn default_max_age_s() -> u64 {
    DEFAULT_MAX_AGE_S
}
fn default_backoff_factor() -> f64 {
    DEFAULT_BACKOFF_FACTOR
}
fn default_max_backoff_s() -> f64 {
    DEFAULT_MAX_BACKOFF_S
}
fn default_timeout_s() -> f64 {
    DEFAULT_TIMEOUT_S
}

impl DeliveryPolicy {
    /// Checks the values; `field` names a field where the policy lives (e.g.
    /// `groups.web.max_age_s`) so the error says where to look.
    pub fn validate(&self, field: impl Fn(&str) -> String) -> Result<(), Invalid> {
        if self.max_age_s == 0 && self.retries.is_none() {
            return Err(Invalid(format!(
                "{} is 0 (no age limit), so {} must be given",
                field("max_age_s"),
                field("retries")
            )));
        }
        if self.max_age_s > MAX_AGE_S {
            return Err(Invalid(format!(
                "{} must be at most {MAX_AGE_S} seconds (ten years)",
                field("max_age_s")
            )));
        }
        for (f, v) in [
            ("backoff_factor", self.backoff_factor),
            ("max_backoff_s", self.max_backoff_s),
        ] {
            if !(v.is_finite() && (0.0..=MAX_BACKOFF_S).contains(&v)) {
                return Err(Invalid(format!(
                    "{} must be a number from 0 to {MAX_BACKOFF_S}",
                    field(f)
                )));
            }
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= MAX_TIMEOUT_S)
        {
            return Err(Invalid(format!(
                "{} must be a number above 0 and at most {MAX_TIMEOUT_S}",
                field("timeout_s")
            )));
        }
        Ok(())
    }

    /// The job policy of something accepted at `now`.
    pub fn policy(&self, callback: Option<String>, callback_trust: Trust, now: Millis) -> Policy {
        let max_age_ms = self.max_age_s.saturating_mul(1000);
        Policy {
            timeout: self.timeout_s,
            retries: self.retries.unwrap_or(u32::MAX),
            backoff_factor: self.backoff_factor,
            callback,
            deadline: (max_age_ms > 0).then(|| now.saturating_add(max_age_ms)),
            max_backoff_s: Some(self.max_backoff_s),
            callback_trust,
        }
    }

    /// The policy's fields in a receipt's `config`.
    pub fn describe(&self, config: &mut Map<String, Value>) {
        config.insert("timeout".into(), json!(self.timeout_s));
        config.insert("retries".into(), json!(self.retries));
        config.insert(
            "max_age".into(),
            json!((self.max_age_s > 0).then_some(self.max_age_s)),
        );
        config.insert("backoff_factor".into(), json!(self.backoff_factor));
        config.insert("max_backoff".into(), json!(self.max_backoff_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            max_age_s: 60,
            retries: None,
            backoff_factor: DEFAULT_BACKOFF_FACTOR,
            max_backoff_s: 5.0,
            timeout_s: 2.0,
        }
    }

    #[test]
    fn a_maximum_age_becomes_a_deadline_and_unlimited_retries() {
        let p = policy().policy(Some("http://cb/".into()), Trust::Operator, 1_000);
        assert_eq!(p.deadline, Some(61_000));
        assert_eq!(p.retries, u32::MAX);
        assert_eq!(p.max_backoff_s, Some(5.0));
        assert_eq!(p.callback.as_deref(), Some("http://cb/"));
        let bounded = DeliveryPolicy {
            max_age_s: 0,
            retries: Some(3),
            ..policy()
        };
        let p = bounded.policy(None, Trust::Operator, 1_000);
        assert_eq!((p.deadline, p.retries), (None, 3));
        let mut config = Map::new();
        bounded.describe(&mut config);
        assert_eq!(config["max_age"], Value::Null);
        assert_eq!(config["retries"], 3);
    }

    #[test]
    fn errors_name_the_field() {
        let at = |f: &str| format!("groups.g.{f}");
        for (bad, field) in [
            (
                DeliveryPolicy {
                    max_age_s: 0,
                    ..policy()
                },
                "groups.g.retries",
            ),
            (
                DeliveryPolicy {
                    backoff_factor: -1.0,
                    ..policy()
                },
                "groups.g.backoff_factor",
            ),
            (
                DeliveryPolicy {
                    max_backoff_s: f64::NAN,
                    ..policy()
                },
                "groups.g.max_backoff_s",
            ),
            (
                DeliveryPolicy {
                    timeout_s: 0.0,
                    ..policy()
                },
                "groups.g.timeout_s",
            ),
        ] {
            let e = bad.validate(at).unwrap_err().0;
            assert!(e.contains(field), "{e}");
        }
        assert_eq!(policy().validate(at), Ok(()));
        for (bad, field) in [
            (
                DeliveryPolicy {
                    timeout_s: 1e300,
                    ..policy()
                },
                "groups.g.timeout_s",
            ),
            (
                DeliveryPolicy {
                    max_age_s: 300_000_000_000,
                    ..policy()
                },
                "groups.g.max_age_s",
            ),
            (
                DeliveryPolicy {
                    backoff_factor: 1e300,
                    ..policy()
                },
                "groups.g.backoff_factor",
            ),
            (
                DeliveryPolicy {
                    max_backoff_s: f64::INFINITY,
                    ..policy()
                },
                "groups.g.max_backoff_s",
            ),
        ] {
            let e = bad.validate(at).unwrap_err().0;
            assert!(e.contains(field), "{e}");
        }
    }
}
