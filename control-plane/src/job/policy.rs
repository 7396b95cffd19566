//! A delivery policy as people configure it — for a filter rule, a broadcast group or a
//! notifier: a maximum age or a number of retries, the backoff or an explicit schedule,
//! which statuses are retried or final, the per-attempt timeout, the rate its targets
//! take. One place checks it and turns it into a job's [`Policy`].

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::retry::{statuses, RetryRules, StatusEntry, Statuses};
use super::{Policy, Rate, Trust};
use crate::clock::Millis;
use crate::validate::Invalid;

/// The one type of a configured delivery policy: a broadcast group and a notifier
/// flatten it into their TOML tables, a filter rule's arrives in its gRPC submission.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// Delays between attempts (seconds, the last one repeated) instead of the factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_s: Option<Vec<f64>>,
    /// Only these statuses are retried (`410`, `"5xx"`, `"500-504"`); default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<StatusEntry>>,
    /// These statuses end the job at once; default `[410]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_on: Option<Vec<StatusEntry>>,
    /// Attempts a second its targets take, on average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// Attempts its targets take at once after a quiet spell (default: the rate, at
    /// least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_age_s: DEFAULT_MAX_AGE_S,
            retries: None,
            backoff_factor: DEFAULT_BACKOFF_FACTOR,
            max_backoff_s: DEFAULT_MAX_BACKOFF_S,
            timeout_s: DEFAULT_TIMEOUT_S,
            schedule_s: None,
            retry_on: None,
            stop_on: None,
            rate_per_s: None,
            burst: None,
        }
    }
}

/// The largest values a policy may hold, from any source (plugin config, TOML, gRPC).
pub const MAX_AGE_S: u64 = 315_360_000;
pub const MAX_BACKOFF_S: f64 = 86_400.0;
pub const MAX_TIMEOUT_S: f64 = 3600.0;
pub const MAX_RATE_PER_S: f64 = 100_000.0;
pub const MAX_BURST: u32 = 100_000;

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
        if let Some(schedule) = &self.schedule_s {
            RetryRules::validate_schedule(schedule, &field("schedule_s"), MAX_BACKOFF_S)?;
        }
        self.retry_rules(&field)?;
        self.rate(&field)?;
        Ok(())
    }

    /// Which failures are retried, and when.
    fn retry_rules(&self, field: &impl Fn(&str) -> String) -> Result<RetryRules, Invalid> {
        Ok(RetryRules {
            schedule_s: self.schedule_s.clone().unwrap_or_default(),
            retry_on: match &self.retry_on {
                Some(r) => Some(statuses(r, &field("retry_on"))?),
                None => None,
            },
            stop_on: match &self.stop_on {
                Some(s) => statuses(s, &field("stop_on"))?,
                None => Statuses::gone(),
            },
        })
    }

    /// The rate limit it asks for its targets.
    pub fn rate(&self, field: &impl Fn(&str) -> String) -> Result<Option<Rate>, Invalid> {
        rate(self.rate_per_s, self.burst, field)
    }

    /// The job policy of something from `source` (`rule:orders`, `group:caches`,
    /// `notifier:ops`) accepted at `now`. The policy was validated; a value that is not
    /// valid falls back to its default.
    pub fn policy(
        &self,
        source: String,
        callback: Option<String>,
        callback_trust: Trust,
        now: Millis,
    ) -> Policy {
        let max_age_ms = self.max_age_s.saturating_mul(1000);
        let named = |f: &str| f.to_owned();
        Policy {
            timeout: self.timeout_s,
            retries: self.retries.unwrap_or(u32::MAX),
            backoff_factor: self.backoff_factor,
            callback,
            deadline: (max_age_ms > 0).then(|| now.saturating_add(max_age_ms)),
            max_backoff_s: Some(self.max_backoff_s),
            callback_trust,
            retry: self.retry_rules(&named).unwrap_or_default(),
            source: Some(source),
            rate: self.rate(&named).ok().flatten(),
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
        if let Some(schedule) = &self.schedule_s {
            config.insert("schedule".into(), json!(schedule));
        }
        let named = |f: &str| f.to_owned();
        if let Ok(rules) = self.retry_rules(&named) {
            if let Some(retry_on) = &rules.retry_on {
                config.insert("retry_on".into(), json!(retry_on.describe()));
            }
            config.insert("stop_on".into(), json!(rules.stop_on.describe()));
        }
        if let Ok(Some(rate)) = self.rate(&named) {
            config.insert("rate_per_s".into(), json!(rate.per_s));
            config.insert("burst".into(), json!(rate.burst));
        }
    }
}

/// A configured rate limit (`rate_per_s`, `burst`), checked; `field` names where it is.
pub fn rate(
    per_s: Option<f64>,
    burst: Option<u32>,
    field: &impl Fn(&str) -> String,
) -> Result<Option<Rate>, Invalid> {
    match (per_s, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Invalid(format!(
            "{} needs {}",
            field("burst"),
            field("rate_per_s")
        ))),
        (Some(per_s), burst) => {
            if !(per_s.is_finite() && per_s > 0.0 && per_s <= MAX_RATE_PER_S) {
                return Err(Invalid(format!(
                    "{} must be a number above 0 and at most {MAX_RATE_PER_S}",
                    field("rate_per_s")
                )));
            }
            let burst = burst.unwrap_or_else(|| (per_s.ceil() as u32).max(1));
            if !(1..=MAX_BURST).contains(&burst) {
                return Err(Invalid(format!(
                    "{} must be from 1 to {MAX_BURST}",
                    field("burst")
                )));
            }
            Ok(Some(Rate { per_s, burst }))
        }
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
            ..DeliveryPolicy::default()
        }
    }

    #[test]
    fn a_maximum_age_becomes_a_deadline_and_unlimited_retries() {
        let p = policy().policy(
            "rule:r".into(),
            Some("http://cb/".into()),
            Trust::Operator,
            1_000,
        );
        assert_eq!(p.deadline, Some(61_000));
        assert_eq!(p.retries, u32::MAX);
        assert_eq!(p.max_backoff_s, Some(5.0));
        assert_eq!(p.callback.as_deref(), Some("http://cb/"));
        let bounded = DeliveryPolicy {
            max_age_s: 0,
            retries: Some(3),
            ..policy()
        };
        let p = bounded.policy("rule:r".into(), None, Trust::Operator, 1_000);
        assert_eq!((p.deadline, p.retries), (None, 3));
        let mut config = Map::new();
        bounded.describe(&mut config);
        assert_eq!(config["max_age"], Value::Null);
        assert_eq!(config["retries"], 3);
        assert_eq!(config["stop_on"], json!(["410"]));
    }

    #[test]
    fn schedules_statuses_and_rates_reach_the_job() {
        let configured: DeliveryPolicy = toml::from_str(
            r#"
            schedule_s = [5, 300, 1800]
            retry_on = ["5xx", 429]
            stop_on = [410, "501"]
            rate_per_s = 2.5
            "#,
        )
        .unwrap();
        assert_eq!(configured.validate(|f| f.to_owned()), Ok(()));
        let p = configured.policy("group:g".into(), None, Trust::Operator, 0);
        assert_eq!(p.retry.schedule_s, [5.0, 300.0, 1800.0]);
        assert!(p.retry.retries(503) && p.retry.retries(429) && !p.retry.retries(404));
        assert!(!p.retry.retries(501) && !p.retry.retries(410));
        assert_eq!(
            p.rate,
            Some(Rate {
                per_s: 2.5,
                burst: 3
            })
        );
        assert_eq!(p.source.as_deref(), Some("group:g"));
        let mut config = Map::new();
        configured.describe(&mut config);
        assert_eq!(config["schedule"], json!([5.0, 300.0, 1800.0]));
        assert_eq!(config["retry_on"], json!(["5xx", "429"]));
        assert_eq!(config["burst"], 3);
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
        for (bad, field) in [
            (
                DeliveryPolicy {
                    schedule_s: Some(vec![1.0, -2.0]),
                    ..policy()
                },
                "groups.g.schedule_s[1]",
            ),
            (
                DeliveryPolicy {
                    retry_on: Some(vec![StatusEntry::Text("6xx".into())]),
                    ..policy()
                },
                "groups.g.retry_on[0]",
            ),
            (
                DeliveryPolicy {
                    stop_on: Some(vec![StatusEntry::Code(99)]),
                    ..policy()
                },
                "groups.g.stop_on[0]",
            ),
            (
                DeliveryPolicy {
                    rate_per_s: Some(0.0),
                    ..policy()
                },
                "groups.g.rate_per_s",
            ),
            (
                DeliveryPolicy {
                    burst: Some(3),
                    ..policy()
                },
                "groups.g.rate_per_s",
            ),
            (
                DeliveryPolicy {
                    rate_per_s: Some(1.0),
                    burst: Some(0),
                    ..policy()
                },
                "groups.g.burst",
            ),
        ] {
            let e = bad.validate(at).unwrap_err().0;
            assert!(e.contains(field), "{e}");
        }
    }
}
