//! The email transport: SMTP, plain, STARTTLS or implicit TLS, with optional
//! authentication.
//!
//! An email job holds the message (subject and text) and the notifier's name; the
//! server, sender, recipients and credentials are read from the configuration when the
//! job is sent, so a password never enters the job store.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::time::Instant;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use serde::Deserialize;

use super::attempt::{code, Outcome};
use super::transport::Transport;
use crate::job::{Job, Request};
use crate::validate::Invalid;

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain SMTP (a relay on the same host or network).
    None,
    /// Plain connection upgraded with STARTTLS, required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// An email notifier's server and addresses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub host: String,
    /// Default: 25 without TLS, 587 with STARTTLS, 465 with implicit TLS.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub username: Option<String>,
    /// The password itself, or (better) the environment variable holding it.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    pub from: String,
    pub to: Vec<String>,
}

impl EmailConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Implicit => 465,
        })
    }

    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        if self.host.trim().is_empty() || self.host.contains(['/', ' ']) {
            return Err(Invalid(format!(
                "{at}.host `{}` is not a host name",
                self.host
            )));
        }
        Mailbox::from_str(&self.from)
            .map_err(|e| Invalid(format!("{at}.from `{}` is not an address: {e}", self.from)))?;
        if self.to.is_empty() {
            return Err(Invalid(format!("{at}.to must list at least one address")));
        }
        for (i, to) in self.to.iter().enumerate() {
            Mailbox::from_str(to)
                .map_err(|e| Invalid(format!("{at}.to[{i}] `{to}` is not an address: {e}")))?;
        }
        if self.password.is_some() && self.password_env.is_some() {
            return Err(Invalid(format!(
                "{at}.password and {at}.password_env: one or the other"
            )));
        }
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            return Err(Invalid(format!("{at}.username is needed with a password")));
        }
        if let Some(var) = &self.password_env {
            if std::env::var_os(var).is_none() {
                return Err(Invalid(format!(
                    "{at}.password_env: the variable {var} is not set"
                )));
            }
        }
        Ok(())
    }

    fn credentials(&self) -> Option<Credentials> {
        let user = self.username.clone()?;
        let password = match (&self.password, &self.password_env) {
            (Some(p), _) => p.clone(),
            (None, Some(var)) => std::env::var(var).unwrap_or_default(),
            (None, None) => String::new(),
        };
        Some(Credentials::new(user, password))
    }
}

/// What an email says.
pub struct Message {
    pub subject: String,
    pub text: String,
}

/// The job request of an email: `SMTP smtp://host:port`, the subject as a header, the
/// text as the body.
pub fn request(config: &EmailConfig, message: &Message) -> Request {
    Request {
        method: "SMTP".into(),
        url: format!("smtp://{}:{}", config.host, config.port()),
        headers: vec![
            ("subject".into(), message.subject.as_bytes().to_vec()),
            ("to".into(), config.to.join(", ").into_bytes()),
        ],
        body: message.text.as_bytes().to_vec(),
    }
}

/// Sends email jobs with the SMTP settings of the notifier each names.
pub struct Mailer {
    servers: BTreeMap<String, EmailConfig>,
}

impl Mailer {
    /// `servers`: the email notifiers' settings, by notifier name.
    pub fn new(servers: BTreeMap<String, EmailConfig>) -> Self {
        Self { servers }
    }

    /// One attempt: accepted by the server is a success (reported as 200); a refused
    /// connection, a timeout or a rejection are failures with Knocker's codes (502, 504,
    /// 503 for a transient or 418 for a permanent rejection), retried like any job.
    pub async fn send(&self, job: &Job) -> Outcome {
        let started = Instant::now();
        let fail = |status: u16, error: String| Outcome::failed(status, error, started.elapsed());
        let name = job
            .config
            .get("notifier")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let Some(config) = self.servers.get(name) else {
            return fail(
                code::PROTOCOL,
                format!("email notifier `{name}` is no longer configured"),
            );
        };
        let subject = job
            .request
            .headers
            .iter()
            .find(|(n, _)| n == "subject")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let message = match build(config, &subject, &job.request.body, job.knocker_id()) {
            Ok(m) => m,
            Err(e) => return fail(code::PROTOCOL, e.to_string()),
        };
        let transport = match transport(config, job.policy.timeout) {
            Ok(t) => t,
            Err(e) => return fail(code::PROTOCOL, format!("SMTP set-up: {e}")),
        };
        match transport.send(message).await {
            Ok(_) => Outcome {
                status: 200,
                error: None,
                retry_after_s: None,
                latency: started.elapsed(),
                local_shortage: false,
            },
            Err(e) => {
                let status = if e.is_timeout() {
                    code::TIMEOUT
                } else if e.is_permanent() {
                    code::PROTOCOL
                } else if e.is_transient() || e.is_response() {
                    code::NETWORK
                } else {
                    code::REFUSED
                };
                fail(
                    status,
                    format!("SMTP {}:{}: {e}", config.host, config.port()),
                )
            }
        }
    }
}

#[async_trait::async_trait]
impl Transport for Mailer {
    async fn send(&self, job: &Job) -> Outcome {
        Mailer::send(self, job).await
    }
}

fn build(
    config: &EmailConfig,
    subject: &str,
    text: &[u8],
    id: &str,
) -> Result<lettre::Message, Invalid> {
    let mut builder = lettre::Message::builder()
        .from(Mailbox::from_str(&config.from).map_err(|e| Invalid(format!("from: {e}")))?)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &config.to {
        builder = builder.to(Mailbox::from_str(to).map_err(|e| Invalid(format!("to: {e}")))?);
    }
    // The same id on every attempt: a server (or a reader) can tell a retry from a
    // second alert.
    let domain = config.from.rsplit('@').next().unwrap_or("knocker");
    builder = builder.message_id(Some(format!("<{}@{}>", id, domain.trim_end_matches('>'))));
    builder
        .body(String::from_utf8_lossy(text).into_owned())
        .map_err(|e| Invalid(format!("cannot build the message: {e}")))
}

fn transport(
    config: &EmailConfig,
    timeout_s: f64,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, lettre::transport::smtp::Error> {
    let builder = match config.tls {
        TlsMode::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host),
        TlsMode::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host)?,
        TlsMode::Implicit => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host)?,
    };
    let mut builder = builder
        .port(config.port())
        .timeout(Some(crate::outbound::timeout(timeout_s.max(0.1))));
    if let Some(credentials) = config.credentials() {
        builder = builder.credentials(credentials);
    }
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> EmailConfig {
        toml::from_str(&format!(
            "host = \"mail.example\"\nfrom = \"Knocker <k@example.com>\"\nto = [\"ops@example.com\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn ports_follow_the_tls_mode() {
        assert_eq!(config("").port(), 587);
        assert_eq!(config("tls = \"none\"").port(), 25);
        assert_eq!(config("tls = \"implicit\"").port(), 465);
        assert_eq!(config("tls = \"none\"\nport = 2525").port(), 2525);
        for tls in ["", "tls = \"none\"", "tls = \"implicit\""] {
            assert!(transport(&config(tls), 1.0).is_ok(), "{tls}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        for (extra, field) in [
            (
                "username = \"u\"\npassword = \"p\"\npassword_env = \"X\"",
                "password_env",
            ),
            ("password = \"p\"", "username"),
            (
                "password_env = \"KNOCKER_TEST_SURELY_UNSET\"\nusername = \"u\"",
                "KNOCKER_TEST_SURELY_UNSET",
            ),
        ] {
            let e = config(extra).validate("notifiers.mail.email").unwrap_err();
            assert!(e.0.contains(field), "{extra}: {e}");
        }
        let mut bad = config("");
        bad.to = vec!["not an address".into()];
        assert!(bad.validate("n").unwrap_err().0.contains("n.to[0]"));
        bad.to = vec![];
        assert!(bad.validate("n").unwrap_err().0.contains("n.to"));
        assert_eq!(
            config("username = \"u\"\npassword = \"p\"").validate("n"),
            Ok(())
        );
    }

    #[test]
    fn messages_carry_subject_text_and_a_stable_id() {
        let m = build(
            &config(""),
            "[Knocker] DOWN: api",
            b"api is down",
            "monitor.api.1.mail",
        )
        .unwrap();
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(text.contains("Subject: [Knocker] DOWN: api"), "{text}");
        assert!(
            text.contains("Message-ID: <monitor.api.1.mail@example.com>"),
            "{text}"
        );
        assert!(text.contains("To: ops@example.com"), "{text}");
        assert!(text.contains("api is down"), "{text}");
    }
}
