//! The file's `[targets]` table: when a target's circuit opens, how long it waits
//! before a probe, who hears of it, and rate limits by target.
//!
//! ```toml
//! [targets]
//! failure_threshold = 5      # consecutive failures that open a circuit (0: never; 410 always)
//! cooldown_s = 30            # before the first probe; doubles after a failed probe
//! max_cooldown_s = 600
//! notify = ["ops-hook"]      # notifiers told of target.paused and target.resumed
//! [targets.hosts."api.example:443"]
//! rate_per_s = 10
//! burst = 20
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::signing::host_port;
use crate::delivery::targets::TargetSettings;
use crate::job::policy::rate;
use crate::validate::Invalid;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsConfig {
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "default_cooldown_s")]
    pub cooldown_s: f64,
    #[serde(default = "default_max_cooldown_s")]
    pub max_cooldown_s: f64,
    #[serde(default)]
    pub notify: Vec<String>,
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
}

fn default_threshold() -> u32 {
    5
}
fn default_cooldown_s() -> f64 {
    30.0
}
fn default_max_cooldown_s() -> f64 {
    600.0
}

impl Default for TargetsConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_threshold(),
            cooldown_s: default_cooldown_s(),
            max_cooldown_s: default_max_cooldown_s(),
            notify: Vec::new(),
            hosts: BTreeMap::new(),
        }
    }
}

const MAX_THRESHOLD: u32 = 1_000_000;
const MAX_COOLDOWN_S: f64 = 86_400.0;

impl TargetsConfig {
    /// Checks the table; `notifier` says whether a notifier of that name exists.
    pub fn settings(&self, notifier: &dyn Fn(&str) -> bool) -> Result<TargetSettings, Invalid> {
        if self.failure_threshold > MAX_THRESHOLD {
            return Err(Invalid(format!(
                "targets.failure_threshold must be at most {MAX_THRESHOLD}"
            )));
        }
        for (field, v) in [
            ("cooldown_s", self.cooldown_s),
            ("max_cooldown_s", self.max_cooldown_s),
        ] {
            if !(v.is_finite() && (0.1..=MAX_COOLDOWN_S).contains(&v)) {
                return Err(Invalid(format!(
                    "targets.{field} must be a number from 0.1 to {MAX_COOLDOWN_S}"
                )));
            }
        }
        if self.max_cooldown_s < self.cooldown_s {
            return Err(Invalid(
                "targets.max_cooldown_s must not be below targets.cooldown_s".into(),
            ));
        }
        for (i, name) in self.notify.iter().enumerate() {
            if !notifier(name) {
                return Err(Invalid(format!(
                    "targets.notify[{i}]: there is no notifier `{name}` in the file"
                )));
            }
        }
        let mut rates = HashMap::new();
        for (host, h) in &self.hosts {
            let at = format!("targets.hosts.\"{host}\"");
            let key = host_port(host).ok_or_else(|| {
                Invalid(format!(
                    "{at}: name a target as host:port (`api.example:443`)"
                ))
            })?;
            let field = |f: &str| format!("{at}.{f}");
            match rate(h.rate_per_s, h.burst, &field)? {
                Some(r) => {
                    rates.insert(key, r);
                }
                None => {
                    return Err(Invalid(format!("{at}: give rate_per_s (and burst)")));
                }
            }
        }
        Ok(TargetSettings {
            failure_threshold: self.failure_threshold,
            cooldown_ms: (self.cooldown_s * 1000.0) as u64,
            max_cooldown_ms: (self.max_cooldown_s * 1000.0) as u64,
            rates,
            ..TargetSettings::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> TargetsConfig {
        #[derive(Deserialize)]
        struct File {
            targets: TargetsConfig,
        }
        toml::from_str::<File>(text).unwrap().targets
    }

    #[test]
    fn reads_thresholds_notifiers_and_rates() {
        let c = parse(
            r#"
            [targets]
            failure_threshold = 3
            cooldown_s = 2
            notify = ["ops"]
            [targets.hosts."API.example:443"]
            rate_per_s = 5
            "#,
        );
        let s = c.settings(&|n| n == "ops").unwrap();
        assert_eq!(
            (s.failure_threshold, s.cooldown_ms, s.max_cooldown_ms),
            (3, 2_000, 600_000)
        );
        let r = s.rates["api.example:443"];
        assert_eq!((r.per_s, r.burst), (5.0, 5));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("failure_threshold = 2000000", "targets.failure_threshold"),
            ("cooldown_s = 0", "targets.cooldown_s"),
            (
                "cooldown_s = 60\nmax_cooldown_s = 30",
                "targets.max_cooldown_s",
            ),
            ("notify = [\"nope\"]", "targets.notify[0]"),
            ("hosts.api = { rate_per_s = 1 }", "host:port"),
            (
                "hosts.\"a:1\" = { rate_per_s = -1 }",
                "targets.hosts.\"a:1\".rate_per_s",
            ),
            (
                "hosts.\"a:1\" = { burst = 2 }",
                "targets.hosts.\"a:1\".rate_per_s",
            ),
        ] {
            let e = parse(&format!("[targets]\n{text}"))
                .settings(&|n| n == "ops")
                .unwrap_err()
                .0;
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
