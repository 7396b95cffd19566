//! Which failures are retried, which end a job, and when the next attempt comes: a
//! job's [`RetryRules`], as stored and as configured (`schedule_s`, `retry_on`,
//! `stop_on`).

use serde::{Deserialize, Serialize};

use crate::validate::Invalid;

/// A set of statuses, as configured: `410`, `"5xx"`, `"500-504"`. Stored as inclusive
/// ranges. A failure without an HTTP response has its Knocker code (502 refused, 503
/// network, 504 timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statuses(pub Vec<(u16, u16)>);

impl Statuses {
    /// `410 Gone`: the target says the resource will not come back.
    pub fn gone() -> Self {
        Self(vec![(410, 410)])
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }

    /// Reads configured entries; `field` names where they are (`rules[0].retry_on`).
    pub fn parse<S: AsRef<str>>(entries: &[S], field: &str) -> Result<Self, Invalid> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                parse_entry(e.as_ref().trim()).ok_or_else(|| {
                    Invalid(format!(
                        "{field}[{i}] `{}`: use a status (`410`), a class (`5xx`) or a range (`500-504`) between 100 and 599",
                        e.as_ref()
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The entries as configured (for receipts and the API).
    pub fn describe(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(lo, hi)| match (lo, hi) {
                (lo, hi) if lo == hi => lo.to_string(),
                (lo, hi) if lo % 100 == 0 && *hi == lo + 99 => format!("{}xx", lo / 100),
                (lo, hi) => format!("{lo}-{hi}"),
            })
            .collect()
    }
}

fn parse_entry(e: &str) -> Option<(u16, u16)> {
    let status = |s: &str| s.parse::<u16>().ok().filter(|s| (100..=599).contains(s));
    if let Some(class) = e.strip_suffix("xx").or_else(|| e.strip_suffix("XX")) {
        let c = class.parse::<u16>().ok().filter(|c| (1..=5).contains(c))?;
        return Some((c * 100, c * 100 + 99));
    }
    if let Some((lo, hi)) = e.split_once('-') {
        let (lo, hi) = (status(lo.trim())?, status(hi.trim())?);
        return (lo <= hi).then_some((lo, hi));
    }
    status(e).map(|s| (s, s))
}

/// A status as configured: a number or a string (`410`, `"5xx"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StatusEntry {
    Code(u16),
    Text(String),
}

impl StatusEntry {
    fn text(&self) -> String {
        match self {
            StatusEntry::Code(c) => c.to_string(),
            StatusEntry::Text(t) => t.clone(),
        }
    }
}

/// Reads a configured list of [`StatusEntry`].
pub fn statuses(entries: &[StatusEntry], field: &str) -> Result<Statuses, Invalid> {
    let texts: Vec<String> = entries.iter().map(StatusEntry::text).collect();
    Statuses::parse(&texts, field)
}

/// The longest explicit schedule and its longest step.
pub const MAX_SCHEDULE_STEPS: usize = 100;

/// How failures of one job are treated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRules {
    /// Delays between attempts (seconds), the last one repeated; empty: the backoff
    /// factor's exponential schedule.
    #[serde(default)]
    pub schedule_s: Vec<f64>,
    /// Only these statuses are retried (`None`: every failure).
    #[serde(default)]
    pub retry_on: Option<Statuses>,
    /// These statuses end the job at once (default `410`).
    #[serde(default = "Statuses::gone")]
    pub stop_on: Statuses,
}

impl Default for RetryRules {
    fn default() -> Self {
        Self {
            schedule_s: Vec::new(),
            retry_on: None,
            stop_on: Statuses::gone(),
        }
    }
}

impl RetryRules {
    /// Whether a failure with `status` may be tried again.
    pub fn retries(&self, status: u16) -> bool {
        !self.stop_on.contains(status) && self.retry_on.as_ref().is_none_or(|r| r.contains(status))
    }

    /// The explicit delay after failed attempt `k` (1-based), if there is a schedule.
    pub fn scheduled_delay_s(&self, k: u32) -> Option<f64> {
        let last = self.schedule_s.len().checked_sub(1)?;
        let i = usize::try_from(k.saturating_sub(1)).map_or(last, |i| i.min(last));
        self.schedule_s.get(i).copied()
    }

    /// Checks a configured schedule; `field` names it.
    pub fn validate_schedule(schedule: &[f64], field: &str, max_s: f64) -> Result<(), Invalid> {
        if schedule.len() > MAX_SCHEDULE_STEPS {
            return Err(Invalid(format!(
                "{field} has {} steps; at most {MAX_SCHEDULE_STEPS}",
                schedule.len()
            )));
        }
        for (i, s) in schedule.iter().enumerate() {
            if !(s.is_finite() && (0.0..=max_s).contains(s)) {
                return Err(Invalid(format!(
                    "{field}[{i}] must be a number of seconds from 0 to {max_s}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_codes_classes_and_ranges() {
        let s = Statuses::parse(&["410", "5xx", "420-429"], "f").unwrap();
        assert!(s.contains(410) && s.contains(503) && s.contains(425));
        assert!(!s.contains(404) && !s.contains(430));
        assert_eq!(s.describe(), ["410", "5xx", "420-429"]);
        for bad in ["6xx", "99", "600", "429-420", "x", "", "5x"] {
            let e = Statuses::parse(&[bad], "rules[0].stop_on").unwrap_err().0;
            assert!(e.contains("rules[0].stop_on[0]"), "{bad}: {e}");
        }
        let mixed: Vec<StatusEntry> =
            serde_json::from_str(r#"[410, "5xx"]"#).expect("numbers and strings");
        assert_eq!(statuses(&mixed, "f").unwrap().describe(), ["410", "5xx"]);
    }

    #[test]
    fn gone_is_final_by_default_and_retry_on_narrows() {
        let rules = RetryRules::default();
        assert!(rules.retries(500) && rules.retries(404) && !rules.retries(410));
        let narrow = RetryRules {
            retry_on: Some(Statuses::parse(&["5xx", "429"], "f").unwrap()),
            stop_on: Statuses::default(),
            ..RetryRules::default()
        };
        assert!(narrow.retries(503) && narrow.retries(429));
        assert!(!narrow.retries(404) && !narrow.retries(400));
        let stop_wins = RetryRules {
            retry_on: Some(Statuses::parse(&["5xx"], "f").unwrap()),
            stop_on: Statuses::parse(&["501"], "f").unwrap(),
            ..RetryRules::default()
        };
        assert!(!stop_wins.retries(501) && stop_wins.retries(502));
    }

    #[test]
    fn a_schedule_repeats_its_last_step() {
        let rules = RetryRules {
            schedule_s: vec![5.0, 300.0, 1800.0],
            ..RetryRules::default()
        };
        let delays: Vec<_> = (1..=5).map(|k| rules.scheduled_delay_s(k)).collect();
        assert_eq!(
            delays,
            [
                Some(5.0),
                Some(300.0),
                Some(1800.0),
                Some(1800.0),
                Some(1800.0)
            ]
        );
        assert_eq!(RetryRules::default().scheduled_delay_s(1), None);
        assert!(RetryRules::validate_schedule(&[1.0, -1.0], "s", 10.0)
            .unwrap_err()
            .0
            .contains("s[1]"));
        assert!(RetryRules::validate_schedule(&[f64::NAN], "s", 10.0).is_err());
        assert!(RetryRules::validate_schedule(&vec![1.0; 101], "s", 10.0).is_err());
    }
}
