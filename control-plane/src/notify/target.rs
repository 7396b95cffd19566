//! `target.paused` and `target.resumed`: a target's circuit opened (or an operator paused
//! it) or closed again. The notifiers named in `[targets] notify` receive one job each,
//! committed to the job store like every notification, so it is retried until it goes
//! through. Ids are `target.<target>.<paused since>.<event>.<notifier>`: the same
//! transition recorded twice makes its notifications once.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::NotifierConfig;
use crate::clock::{rfc3339, Millis, Time};
use crate::delivery::email;
use crate::delivery::observe::{Attempted, Observer};
use crate::delivery::targets::Change;
use crate::job::Job;
use crate::store::Store;

/// Turns circuit transitions into notification jobs.
pub struct TargetNotifier {
    pub store: Arc<dyn Store>,
    pub wake: Arc<Notify>,
    pub time: Time,
    /// The notifiers of `[targets] notify`, by name.
    pub notifiers: Vec<(String, NotifierConfig)>,
}

impl TargetNotifier {
    pub fn new(
        store: Arc<dyn Store>,
        wake: Arc<Notify>,
        time: Time,
        names: &[String],
        all: &BTreeMap<String, NotifierConfig>,
    ) -> Self {
        let notifiers = names
            .iter()
            .filter_map(|n| all.get(n).map(|c| (n.clone(), c.clone())))
            .collect();
        Self {
            store,
            wake,
            time,
            notifiers,
        }
    }
}

impl Observer for TargetNotifier {
    fn attempted(&self, _: &Attempted<'_>) {}

    fn target_changed(&self, change: &Change) {
        if self.notifiers.is_empty() {
            return;
        }
        let jobs = jobs(change, &self.notifiers, self.time.now_ms());
        let store = Arc::clone(&self.store);
        let wake = Arc::clone(&self.wake);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_millis(100);
            // Retried until committed: a lost event would leave operators unaware.
            for _ in 0..20 {
                match store.insert_all(jobs.clone()).await {
                    Ok(_) => {
                        wake.notify_one();
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot store a target notification; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        });
    }
}

/// What a transition says.
struct Event<'a> {
    target: &'a str,
    word: &'static str,
    paused_since: Millis,
    at: Millis,
    reason: Option<&'a str>,
}

impl Event<'_> {
    fn summary(&self) -> String {
        match self.reason {
            Some(reason) => format!(
                "{} is paused: {reason}; its deliveries wait (their attempts unspent) until a probe goes through",
                self.target
            ),
            None => format!(
                "{} is delivered to again (paused for {} s)",
                self.target,
                self.at.saturating_sub(self.paused_since) / 1000
            ),
        }
    }
}

/// One notification job per notifier.
pub fn jobs(change: &Change, notifiers: &[(String, NotifierConfig)], now: Millis) -> Vec<Job> {
    let event = match change {
        Change::Paused {
            target,
            since,
            reason,
        } => Event {
            target,
            word: "target.paused",
            paused_since: *since,
            at: *since,
            reason: Some(reason),
        },
        Change::Resumed {
            target,
            since,
            paused_since,
        } => Event {
            target,
            word: "target.resumed",
            paused_since: *paused_since,
            at: *since,
            reason: None,
        },
    };
    let safe: String = event
        .target
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    notifiers
        .iter()
        .filter_map(|(name, notifier)| {
            let id = format!(
                "target.{safe}.{}.{}.{name}",
                event.paused_since,
                event.word.trim_start_matches("target.")
            );
            let mut config = Map::new();
            config.insert("id".into(), json!(id));
            config.insert("target".into(), json!(event.target));
            config.insert("event".into(), json!(event.word));
            config.insert("notifier".into(), json!(name));
            notifier.job(
                name,
                id,
                config,
                || report(&event),
                || mail_message(&event),
                now,
            )
        })
        .collect()
}

/// A webhook's JSON body.
fn report(event: &Event<'_>) -> Value {
    json!({
        "event": event.word,
        "target": event.target,
        "reason": event.reason,
        "paused_since": rfc3339(event.paused_since),
        "at": rfc3339(event.at),
        "message": event.summary(),
    })
}

fn mail_message(event: &Event<'_>) -> email::Message {
    email::Message {
        subject: format!("[Knocker] {}: {}", event.word, event.target),
        text: format!(
            "{}\n\nTarget: {}\nAt: {}\n",
            event.summary(),
            event.target,
            rfc3339(event.at)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Kind;

    #[test]
    fn one_job_per_notifier_with_ids_that_repeat_for_the_same_transition() {
        let notifiers: BTreeMap<String, NotifierConfig> = toml::from_str(
            r#"
            [hook]
            webhook = "http://hooks.example/ops"
            [mail]
            email = { host = "127.0.0.1", port = 2525, tls = "none", from = "k@example.com", to = ["ops@example.com"] }
            "#,
        )
        .unwrap();
        let list: Vec<(String, NotifierConfig)> = notifiers.into_iter().collect();
        let paused = Change::Paused {
            target: "api.example:443".into(),
            since: 5_000,
            reason: "410 Gone".into(),
        };
        let jobs = jobs(&paused, &list, 6_000);
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "target.api_example_443.5000.paused.hook",
                "target.api_example_443.5000.paused.mail"
            ]
        );
        assert_eq!(jobs[0].kind, Kind::Target);
        assert_eq!(jobs[1].kind, Kind::Email);
        assert_eq!(jobs[0].policy.source.as_deref(), Some("notifier:hook"));
        let body: serde_json::Value = serde_json::from_slice(&jobs[0].request.body).unwrap();
        assert_eq!(body["event"], "target.paused");
        assert_eq!(body["reason"], "410 Gone");
        let resumed = Change::Resumed {
            target: "api.example:443".into(),
            since: 9_000,
            paused_since: 5_000,
        };
        let jobs = super::jobs(&resumed, &list, 9_000);
        assert_eq!(jobs[0].id, "target.api_example_443.5000.resumed.hook");
        let body: serde_json::Value = serde_json::from_slice(&jobs[0].request.body).unwrap();
        assert_eq!(body["event"], "target.resumed");
        assert!(body["message"].as_str().unwrap().contains("paused for 4 s"));
    }
}
