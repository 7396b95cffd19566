//! Notifications of monitor transitions (and, in [`target`], of targets paused and
//! resumed): webhooks and email, both delivered through the
//! durable job queue — stored before the alert state moves on, retried with backoff
//! until they go through or their maximum age passes, visible in the jobs API.
//!
//! - A webhook is an ordinary job: `POST` of a JSON report to the notifier's URL (with
//!   its callback, if any, after the last failure).
//! - An email is a job of kind `email`, sent by [`email`] over SMTP with the notifier's
//!   server settings, read at send time (credentials never enter the job store).
//!
//! Job ids are `monitor.<name>.<since>.<transition number>.<notifier>` (`since`: when the
//! monitor's state began): a check recorded twice (a crash between the two commits)
//! stores its notifications once, and a monitor created again never reuses an id.

pub mod target;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::clock::Millis;
use crate::delivery::email;
use crate::job::policy::DeliveryPolicy;
use crate::job::{Job, Kind, Request, Trust};
use crate::validate::unknown_fields;
use crate::validate::Invalid;

/// A notifier from the configuration file: a webhook or an email, and the delivery
/// policy of what it sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NotifierConfig {
    /// POST a JSON report here.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Extra headers of the webhook request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Send an email through this SMTP server.
    #[serde(default)]
    pub email: Option<email::EmailConfig>,
    /// Where a webhook's failure report goes after its last attempt.
    #[serde(default)]
    pub callback: Option<String>,
    /// How what it sends is delivered: `max_age_s`, `retries`, `backoff_factor`,
    /// `max_backoff_s`, `timeout_s`.
    #[serde(flatten)]
    pub delivery: DeliveryPolicy,
    /// Anything else is a mistake, named in the error.
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

impl NotifierConfig {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let field = |f: &str| format!("notifiers.{name}.{f}");
        unknown_fields(&self.unknown, &format!("notifiers.{name}"))?;
        match (&self.webhook, &self.email) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Invalid(format!(
                "notifiers.{name}: needs `webhook` (a URL) or `email` (SMTP settings), one of them"
            )))
            }
            (Some(url), None) if !crate::job::spec::is_http_url(url) => {
                return Err(Invalid(format!(
                    "{} `{url}` is not an http:// or https:// URL",
                    field("webhook")
                )))
            }
            (None, Some(email)) => email.validate(&field("email"))?,
            _ => {}
        }
        if self.email.is_some() && (self.callback.is_some() || !self.headers.is_empty()) {
            return Err(Invalid(format!(
                "{} and {} apply to webhooks only",
                field("callback"),
                field("headers")
            )));
        }
        if let Some(cb) = &self.callback {
            if !crate::job::spec::is_http_url(cb) {
                return Err(Invalid(format!(
                    "{} `{cb}` is not an http:// or https:// URL",
                    field("callback")
                )));
            }
        }
        for (h, v) in &self.headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                return Err(Invalid(format!(
                    "{} `{h}` is not a valid header",
                    field("headers")
                )));
            }
        }
        self.delivery.validate(field)
    }

    /// What it sends to (validated: exactly one of them).
    fn channel(&self) -> Option<Channel<'_>> {
        match (&self.webhook, &self.email) {
            (Some(url), None) => Some(Channel::Webhook(url)),
            (None, Some(email)) => Some(Channel::Email(email)),
            _ => None,
        }
    }

    /// The job that sends one notification through this notifier, `name`: `report`
    /// POSTed as JSON to its webhook (with its `headers`), or `mail` through its SMTP
    /// server; delivered by its own policy. `config` is what the job's receipt carries.
    /// `None` for a notifier without a channel (validation refuses one).
    pub(crate) fn job(
        &self,
        name: &str,
        id: String,
        config: Map<String, Value>,
        report: impl FnOnce() -> Value,
        mail: impl FnOnce() -> email::Message,
        now: Millis,
    ) -> Option<Job> {
        let (kind, request) = match self.channel()? {
            Channel::Webhook(url) => (Kind::Target, self.webhook(url, &report())),
            Channel::Email(smtp) => (Kind::Email, email::request(smtp, &mail())),
        };
        let policy = self.delivery.policy(
            format!("notifier:{name}"),
            self.callback.clone(),
            Trust::Operator,
            now,
        );
        Some(Job::new_pending(id, kind, request, policy, Trust::Operator, now).with_config(config))
    }

    fn webhook(&self, url: &str, report: &Value) -> Request {
        let mut headers: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec()))
            .collect();
        headers.push(("content-type".into(), b"application/json".to_vec()));
        Request {
            method: "POST".into(),
            url: url.to_owned(),
            headers,
            body: report.to_string().into_bytes(),
        }
    }
}

enum Channel<'a> {
    Webhook(&'a str),
    Email(&'a email::EmailConfig),
}

/// What happened, for the notification's text: an endpoint went down or came back up.
/// Self-contained, so anything that watches endpoints can send one.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub monitor: &'a str,
    /// When the monitor's state began (part of the notification ids).
    pub since: u64,
    pub url: &'a str,
    /// Down, or up again.
    pub down: bool,
    /// The transition's number, counted per monitor (part of the notification ids).
    pub number: u64,
    /// The check that caused it: when, its HTTP status, its latency, why it failed.
    pub at: Millis,
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub reason: Option<&'a str>,
    /// Consecutive failed (down) or good (up) checks that led to it.
    pub checks: u32,
}

impl Event<'_> {
    fn word(&self) -> &'static str {
        if self.down {
            "down"
        } else {
            "resolved"
        }
    }

    fn status(&self) -> &'static str {
        if self.down {
            "down"
        } else {
            "up"
        }
    }

    fn summary(&self) -> String {
        if self.down {
            format!(
                "{} is DOWN: {} ({} failed checks in a row)",
                self.monitor,
                self.reason.unwrap_or("check failed"),
                self.checks
            )
        } else {
            format!(
                "{} is UP again ({} good checks in a row)",
                self.monitor, self.checks
            )
        }
    }
}

/// The notification jobs for one transition, one per notifier.
pub fn jobs(event: &Event<'_>, notifiers: &[(&str, &NotifierConfig)], now: Millis) -> Vec<Job> {
    notifiers
        .iter()
        .filter_map(|(name, notifier)| {
            let id = format!(
                "monitor.{}.{}.{}.{name}",
                event.monitor, event.since, event.number
            );
            let mut config = Map::new();
            config.insert("id".into(), json!(id));
            config.insert("monitor".into(), json!(event.monitor));
            config.insert("event".into(), json!(event.word()));
            config.insert("notifier".into(), json!(name));
            config.insert("callback".into(), json!(notifier.callback));
            notifier.job(
                name,
                id,
                config,
                || report(event),
                || mail_message(event),
                now,
            )
        })
        .collect()
}

/// A webhook's JSON body.
fn report(event: &Event<'_>) -> Value {
    json!({
        "monitor": event.monitor,
        "event": event.word(),
        "status": event.status(),
        "url": event.url,
        "reason": event.reason,
        "http_status": event.status,
        "checks": event.checks,
        "transition": event.number,
        "at": crate::clock::rfc3339(event.at),
        "message": event.summary(),
    })
}

fn mail_message(event: &Event<'_>) -> email::Message {
    let headline = if event.down { "DOWN" } else { "RESOLVED" };
    email::Message {
        subject: format!("[Knocker] {headline}: {}", event.monitor),
        text: format!(
            "{}\n\nMonitor: {}\nURL: {}\nAt: {}\nHTTP status: {}\nLatency: {} ms\nTransition: #{}\n",
            event.summary(),
            event.monitor,
            event.url,
            crate::clock::rfc3339(event.at),
            event
                .status
                .map_or_else(|| "no answer".to_owned(), |s| s.to_string()),
            event.latency_ms,
            event.number,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifiers() -> BTreeMap<String, NotifierConfig> {
        let map: BTreeMap<String, NotifierConfig> = toml::from_str(
            r#"
            [hook]
            webhook = "http://hooks.example/ops"
            headers = { "X-Token" = "t" }
            callback = "http://cb.example/"
            [mail]
            email = { host = "127.0.0.1", port = 2525, tls = "none", from = "k@example.com", to = ["ops@example.com"] }
            max_age_s = 600
            "#,
        )
        .unwrap();
        for (name, n) in &map {
            n.validate(name).unwrap();
        }
        map
    }

    #[test]
    fn one_job_per_notifier_with_a_stable_id() {
        let notifiers = notifiers();
        let list: Vec<(&str, &NotifierConfig)> =
            notifiers.iter().map(|(n, c)| (n.as_str(), c)).collect();
        let event = Event {
            monitor: "api",
            since: 77,
            url: "http://t/health",
            down: true,
            number: 3,
            at: 1_000,
            status: Some(503),
            latency_ms: 12,
            reason: Some("status 503 not in 200–299"),
            checks: 2,
        };
        let jobs = jobs(&event, &list, 5_000);
        assert_eq!(jobs.len(), 2);
        let hook = &jobs[0];
        assert_eq!(hook.id, "monitor.api.77.3.hook");
        assert_eq!(hook.kind, Kind::Target);
        assert_eq!(hook.request.url, "http://hooks.example/ops");
        assert!(hook
            .request
            .headers
            .contains(&("x-token".into(), b"t".to_vec())));
        assert_eq!(hook.policy.callback.as_deref(), Some("http://cb.example/"));
        let body: serde_json::Value = serde_json::from_slice(&hook.request.body).unwrap();
        assert_eq!(body["event"], "down");
        assert_eq!(body["reason"], "status 503 not in 200–299");
        let mail = &jobs[1];
        assert_eq!(mail.id, "monitor.api.77.3.mail");
        assert_eq!(mail.kind, Kind::Email);
        assert_eq!(mail.request.url, "smtp://127.0.0.1:2525");
        assert_eq!(mail.policy.deadline, Some(605_000));
        assert!(String::from_utf8_lossy(&mail.request.body).contains("api is DOWN"));
    }

    #[test]
    fn a_notifier_is_a_webhook_or_an_email() {
        for (text, field) in [
            ("", "needs `webhook`"),
            ("webhook = \"ftp://x\"", "notifiers.n.webhook"),
            (
                "webhook = \"http://x\"\nmax_age_s = 0",
                "notifiers.n.retries",
            ),
            (
                "webhook = \"http://x\"\nheaders = { \"a b\" = \"1\" }",
                "notifiers.n.headers",
            ),
            (
                "email = { host = \"h\", from = \"a@b\", to = [\"c@d\"] }\ncallback = \"http://x\"",
                "webhooks only",
            ),
        ] {
            let n: NotifierConfig = toml::from_str(text).unwrap();
            let e = n.validate("n").unwrap_err();
            assert!(e.0.contains(field), "{text}: {e}");
        }
    }
}
