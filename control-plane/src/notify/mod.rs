//! Notifications of monitor transitions: webhooks and email, both delivered through the
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

pub mod email;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map};

use crate::clock::Millis;
use crate::job::policy::{
    default_backoff_factor, default_max_age_s, default_max_backoff_s, default_timeout_s,
    DeliveryPolicy,
};
use crate::job::{Job, Kind, Request, State, Trust};
use crate::monitor::alert::{Health, Transition};
use crate::monitor::store::CheckResult;

/// A notifier from the configuration file: a webhook or an email, and the delivery
/// policy of what it sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: f64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

impl NotifierConfig {
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let field = |f: &str| format!("notifiers.{name}.{f}");
        match (&self.webhook, &self.email) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(format!(
                "notifiers.{name}: needs `webhook` (a URL) or `email` (SMTP settings), one of them"
            ))
            }
            (Some(url), None) if !crate::job::spec::is_http_url(url) => {
                return Err(format!(
                    "{} `{url}` is not an http:// or https:// URL",
                    field("webhook")
                ))
            }
            (None, Some(email)) => email.validate(&field("email"))?,
            _ => {}
        }
        if self.email.is_some() && (self.callback.is_some() || !self.headers.is_empty()) {
            return Err(format!(
                "{} and {} apply to webhooks only",
                field("callback"),
                field("headers")
            ));
        }
        if let Some(cb) = &self.callback {
            if !crate::job::spec::is_http_url(cb) {
                return Err(format!(
                    "{} `{cb}` is not an http:// or https:// URL",
                    field("callback")
                ));
            }
        }
        for (h, v) in &self.headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                return Err(format!("{} `{h}` is not a valid header", field("headers")));
            }
        }
        self.delivery().validate(field)
    }

    fn delivery(&self) -> DeliveryPolicy {
        DeliveryPolicy {
            max_age_s: self.max_age_s,
            retries: self.retries,
            backoff_factor: self.backoff_factor,
            max_backoff_s: self.max_backoff_s,
            timeout_s: self.timeout_s,
        }
    }

    /// What it sends to (validated: exactly one of them).
    fn channel(&self) -> Option<Channel<'_>> {
        match (&self.webhook, &self.email) {
            (Some(url), None) => Some(Channel::Webhook(url)),
            (None, Some(email)) => Some(Channel::Email(email)),
            _ => None,
        }
    }
}

enum Channel<'a> {
    Webhook(&'a str),
    Email(&'a email::EmailConfig),
}

/// What happened, for the notification's text.
pub struct Event<'a> {
    pub monitor: &'a str,
    /// When the monitor's state began (part of the notification ids).
    pub since: u64,
    pub url: &'a str,
    pub transition: Transition,
    pub result: &'a CheckResult,
    /// Consecutive failed (down) or good (up) checks that led to it.
    pub checks: u32,
}

impl Event<'_> {
    fn word(&self) -> &'static str {
        match self.transition.to {
            Health::Down => "down",
            Health::Up => "resolved",
        }
    }

    fn status(&self) -> &'static str {
        match self.transition.to {
            Health::Down => "down",
            Health::Up => "up",
        }
    }

    fn summary(&self) -> String {
        match self.transition.to {
            Health::Down => format!(
                "{} is DOWN: {} ({} failed checks in a row)",
                self.monitor,
                self.result
                    .failed_condition
                    .as_deref()
                    .unwrap_or("check failed"),
                self.checks
            ),
            Health::Up => format!(
                "{} is UP again ({} good checks in a row)",
                self.monitor, self.checks
            ),
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
                event.monitor, event.since, event.transition.number
            );
            let (kind, request) = match notifier.channel()? {
                Channel::Webhook(url) => (Kind::Target, webhook(event, notifier, url)),
                Channel::Email(mail) => (Kind::Email, email::request(mail, &mail_message(event))),
            };
            let mut config = Map::new();
            config.insert("id".into(), json!(id));
            config.insert("monitor".into(), json!(event.monitor));
            config.insert("event".into(), json!(event.word()));
            config.insert("notifier".into(), json!(name));
            config.insert("callback".into(), json!(notifier.callback));
            Some(Job {
                id,
                kind,
                request,
                policy: notifier
                    .delivery()
                    .policy(notifier.callback.clone(), Trust::Operator, now),
                config,
                state: State::Pending,
                attempts: Vec::new(),
                next_attempt_at: now,
                created_at: now,
                finished_at: None,
                lane: None,
                trust: Trust::Operator,
            })
        })
        .collect()
}

fn webhook(event: &Event<'_>, notifier: &NotifierConfig, url: &str) -> Request {
    let body = json!({
        "monitor": event.monitor,
        "event": event.word(),
        "status": event.status(),
        "url": event.url,
        "reason": event.result.failed_condition,
        "http_status": event.result.status,
        "checks": event.checks,
        "transition": event.transition.number,
        "at": crate::api::time(event.result.at),
        "message": event.summary(),
    });
    let mut headers: Vec<(String, Vec<u8>)> = notifier
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    headers.push(("content-type".into(), b"application/json".to_vec()));
    Request {
        method: "POST".into(),
        url: url.to_owned(),
        headers,
        body: body.to_string().into_bytes(),
    }
}

fn mail_message(event: &Event<'_>) -> email::Message {
    let headline = match event.transition.to {
        Health::Down => "DOWN",
        Health::Up => "RESOLVED",
    };
    email::Message {
        subject: format!("[Knocker] {headline}: {}", event.monitor),
        text: format!(
            "{}\n\nMonitor: {}\nURL: {}\nAt: {}\nHTTP status: {}\nLatency: {} ms\nTransition: #{}\n",
            event.summary(),
            event.monitor,
            event.url,
            crate::api::time(event.result.at),
            event
                .result
                .status
                .map_or_else(|| "no answer".to_owned(), |s| s.to_string()),
            event.result.latency_ms,
            event.transition.number,
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
        let result = CheckResult {
            at: 1_000,
            ok: false,
            status: Some(503),
            latency_ms: 12,
            failed_condition: Some("status 503 not in 200–299".into()),
        };
        let event = Event {
            monitor: "api",
            since: 77,
            url: "http://t/health",
            transition: Transition {
                to: Health::Down,
                number: 3,
            },
            result: &result,
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
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
