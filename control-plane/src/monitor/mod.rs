//! Endpoint monitoring: periodic checks with conditions, thresholds, history, uptime and
//! notifications on down and resolved.
//!
//! - [`condition`] — what a healthy answer looks like (status set or range, body text or
//!   regex, JSON pointer, response time); a failed check names the condition.
//! - [`check`] — one request and its verdict.
//! - [`alert`] — thresholds: down after `failure_threshold` failures in a row, up after
//!   `success_threshold` good checks.
//! - [`store`] — definitions from the API, alert state, results, transitions, uptime;
//!   [`shared`] — the same in NATS for many control planes, with a lease per monitor so
//!   each check runs once across them.
//! - [`api`] — `/knocker/monitors`: list, status, create, update, delete.
//!
//! Monitors come from `KNOCKER_CONFIG` (`[monitors.<name>]`) and from the API. Each runs
//! as its own task. A transition's notifications (see `notify`) are committed to the job
//! queue before the new alert state is, so an alert is never lost, and a restart neither
//! repeats one (the stored state says it was sent) nor forgets a resolution.

pub mod alert;
pub mod check;
pub mod condition;
pub mod history;
pub mod local;
pub mod shared;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Time;
use crate::job::Trust;
use crate::notify::{self, NotifierConfig};
use crate::outbound::Outbound;
use crate::redact;
use crate::store::Store;
use crate::validate::Invalid;
use alert::Health;
use condition::{Check, Condition};
use history::{store_error, MonitorStoreError, Source, StoreResult};
use store::MonitorStore;

/// A monitor's definition (a `[monitors.<name>]` table, or the JSON body of the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Seconds between checks.
    #[serde(default = "default_interval_s")]
    pub interval_s: f64,
    /// Seconds a check waits for the whole answer.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// All must hold; none given means status 200–299.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Also notify when the monitor is up again.
    #[serde(default)]
    pub send_on_resolved: bool,
    /// Notifier names (`[notifiers.<name>]`).
    #[serde(default)]
    pub notify: Vec<String>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_interval_s() -> f64 {
    30.0
}
fn default_timeout_s() -> f64 {
    10.0
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_success_threshold() -> u32 {
    2
}

/// How often a control plane reads the shared monitor definitions (NATS engine).
const SYNC_EVERY: Duration = Duration::from_secs(2);

/// Shortest interval between checks of a monitor in the file.
pub const MIN_INTERVAL_S: f64 = 0.1;
/// Where a transition's notifications go: the job queue, its wake-up, the notifiers.
pub struct Queue {
    pub jobs: Arc<dyn Store>,
    pub wake: Arc<Notify>,
    pub notifiers: Arc<BTreeMap<String, NotifierConfig>>,
    pub time: Time,
}

/// How checks are sent, and what the API may make.
pub struct CheckSettings {
    pub outbound: Arc<Outbound>,
    pub api: ApiLimits,
}

/// What monitors made through the API may be: how many, how often they check.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub max_monitors: usize,
    pub min_interval_s: f64,
}
/// Longest interval between checks, and longest check.
pub const MAX_INTERVAL_S: f64 = 86_400.0;
pub const MAX_TIMEOUT_S: f64 = 3600.0;

/// Monitor names: letters, digits, `-` and `_` (they are part of job ids and URLs).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl MonitorConfig {
    /// Validates the definition and compiles its conditions. Errors name the field
    /// (`at` is where the definition lives: `monitors.api` in the file, `monitor` in
    /// the API).
    pub fn compile(
        &self,
        at: &str,
        notifiers: &BTreeMap<String, NotifierConfig>,
    ) -> Result<Vec<Check>, Invalid> {
        let field = |f: &str| format!("{at}.{f}");
        if !crate::job::spec::is_http_url(&self.url) || self.url.chars().any(char::is_control) {
            return Err(Invalid(format!(
                "{} `{}` is not an http:// or https:// URL",
                field("url"),
                self.url
            )));
        }
        if reqwest::Method::from_bytes(self.method.as_bytes()).is_err() {
            return Err(Invalid(format!(
                "{} `{}` is not a method",
                field("method"),
                self.method
            )));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(Invalid(format!(
                    "{} `{name}` is not a valid header",
                    field("headers")
                )));
            }
        }
        if !(self.interval_s.is_finite()
            && (MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&self.interval_s))
        {
            return Err(Invalid(format!(
                "{} must be a number of seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}",
                field("interval_s")
            )));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= MAX_TIMEOUT_S)
        {
            return Err(Invalid(format!(
                "{} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}",
                field("timeout_s")
            )));
        }
        if self.failure_threshold == 0 {
            return Err(Invalid(format!(
                "{} must be at least 1",
                field("failure_threshold")
            )));
        }
        if self.success_threshold == 0 {
            return Err(Invalid(format!(
                "{} must be at least 1",
                field("success_threshold")
            )));
        }
        for (i, name) in self.notify.iter().enumerate() {
            if !notifiers.contains_key(name) {
                let known: Vec<&str> = notifiers.keys().map(String::as_str).collect();
                return Err(Invalid(format!(
                    "{}[{i}]: no notifier `{name}` (configured: {})",
                    field("notify"),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        if self.conditions.is_empty() {
            return Ok(vec![Check::StatusRange(200, 299)]);
        }
        self.conditions
            .iter()
            .enumerate()
            .map(|(i, c)| c.compile(&format!("{}[{i}]", field("conditions"))))
            .collect()
    }
}

/// Why an API change to a monitor was refused.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("no monitor named '{0}'")]
    NotFound(String),
    #[error("a monitor named '{0}' exists")]
    Exists(String),
    #[error("monitor '{0}' is defined in KNOCKER_CONFIG; change it there")]
    FromFile(String),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("at most {0} monitors can be made through the API (KNOCKER_MAX_MONITORS)")]
    Limit(usize),
    #[error(transparent)]
    Store(#[from] MonitorStoreError),
}

struct Running {
    source: Source,
    config: MonitorConfig,
    stop: CancellationToken,
}

/// The running monitors.
pub struct Monitors {
    store: MonitorStore,
    jobs: Arc<dyn Store>,
    wake: Arc<Notify>,
    notifiers: Arc<BTreeMap<String, NotifierConfig>>,
    time: Time,
    outbound: Arc<Outbound>,
    /// What the API may make.
    api: ApiLimits,
    running: Mutex<HashMap<String, Running>>,
    shutdown: CancellationToken,
}

impl Monitors {
    /// Loads the definitions (the file's replace the stored file ones; those made through
    /// the API are kept) and starts every monitor.
    pub async fn start(
        store: MonitorStore,
        queue: Queue,
        from_file: BTreeMap<String, MonitorConfig>,
        checks: CheckSettings,
        shutdown: CancellationToken,
    ) -> StoreResult<Arc<Self>> {
        let Queue {
            jobs,
            wake,
            notifiers,
            time,
        } = queue;
        let CheckSettings { outbound, api } = checks;
        let monitors = Arc::new(Self {
            store,
            jobs,
            wake,
            notifiers,
            time,
            outbound,
            api,
            running: Mutex::new(HashMap::new()),
            shutdown,
        });
        for (name, source, _) in monitors.store.definitions().await? {
            if source == Source::File && !from_file.contains_key(&name) {
                monitors.store.remove(&name).await?;
                tracing::info!(monitor = %name, "monitor removed from KNOCKER_CONFIG; its history is gone");
            }
        }
        for (name, config) in &from_file {
            monitors.store.put(name, Source::File, config).await?;
        }
        monitors.sync().await?;
        if monitors.store.is_shared() {
            // Other control planes create, change and delete monitors too.
            let me = Arc::clone(&monitors);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(SYNC_EVERY) => {}
                        () = me.shutdown.cancelled() => return,
                    }
                    if let Err(e) = me.sync().await {
                        tracing::warn!(error = %e, "cannot read the shared monitors");
                    }
                }
            });
        }
        Ok(monitors)
    }

    /// Runs what the store defines: starts new and changed monitors, stops removed ones.
    async fn sync(self: &Arc<Self>) -> StoreResult<()> {
        let defined = self.store.definitions().await?;
        let gone: Vec<String> = {
            let running = self.running.lock();
            running
                .keys()
                .filter(|name| !defined.iter().any(|(n, _, _)| n == *name))
                .cloned()
                .collect()
        };
        for name in gone {
            if let Some(r) = self.running.lock().remove(&name) {
                r.stop.cancel();
            }
        }
        for (name, source, config) in defined {
            let unchanged = self
                .running
                .lock()
                .get(&name)
                .is_some_and(|r| r.config == config && r.source == source);
            if unchanged {
                continue;
            }
            match config.compile(&format!("monitors.{name}"), &self.notifiers) {
                Ok(checks) => self.spawn(&name, source, config, checks),
                // An API monitor whose notifier left the file: reported, not run.
                Err(e) => tracing::error!(monitor = %name, error = %e, "monitor not started"),
            }
        }
        Ok(())
    }

    fn spawn(
        self: &Arc<Self>,
        name: &str,
        source: Source,
        config: MonitorConfig,
        checks: Vec<Check>,
    ) {
        let stop = self.shutdown.child_token();
        let previous = self.running.lock().insert(
            name.to_owned(),
            Running {
                source,
                config: config.clone(),
                stop: stop.clone(),
            },
        );
        if let Some(previous) = previous {
            previous.stop.cancel();
        }
        let me = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move { me.run(name, config, checks, stop).await });
    }

    async fn run(
        self: Arc<Self>,
        name: String,
        config: MonitorConfig,
        checks: Vec<Check>,
        stop: CancellationToken,
    ) {
        let interval = crate::outbound::timeout(config.interval_s).max(Duration::from_millis(100));
        // A monitor made through the API checks a URL a client chose.
        let trust = match self.running.lock().get(&name).map(|r| r.source) {
            Some(Source::File) => Trust::Operator,
            _ => Trust::Client,
        };
        tracing::info!(monitor = %name, url = %redact::url(&config.url), interval_s = config.interval_s, "monitor started");
        loop {
            let started = tokio::time::Instant::now();
            let ours = match self.store.lease(&name).await {
                Ok(ours) => ours,
                Err(e) => {
                    tracing::warn!(monitor = %name, error = %e, "cannot take the monitor's lease");
                    false
                }
            };
            if !ours {
                // Another control plane runs this monitor's checks now.
                tokio::select! {
                    () = tokio::time::sleep_until(started + interval) => continue,
                    () = stop.cancelled() => return,
                }
            }
            let result = tokio::select! {
                r = check::run(&self.outbound, trust, &config, &checks, self.time.now_ms()) => r,
                () = stop.cancelled() => return,
            };
            crate::metrics::get().checked(
                &name,
                result.ok,
                std::time::Duration::from_millis(result.latency_ms),
            );
            if let Err(e) = self.observe(&name, &config, &result).await {
                // Nothing recorded: the next check finds the same state and tries again.
                tracing::error!(monitor = %name, error = %e, "cannot record the check");
            }
            tokio::select! {
                () = tokio::time::sleep_until(started + interval) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Takes one result: thresholds, then the transition's notifications (committed to
    /// the job queue first), then the result and the new state.
    async fn observe(
        &self,
        name: &str,
        config: &MonitorConfig,
        result: &history::CheckResult,
    ) -> StoreResult<()> {
        let mut state = self.store.state(name).await?;
        if state.since == 0 {
            state.since = result.at;
        }
        let transition = state.observe(
            result.ok,
            config.failure_threshold,
            config.success_threshold,
        );
        if let Some(t) = transition {
            let checks = match t.to {
                Health::Down => state.failures,
                Health::Up => state.successes,
            };
            let reason = result.failed_condition.as_deref();
            match t.to {
                Health::Down => tracing::warn!(monitor = %name, reason, checks, "monitor down"),
                Health::Up => tracing::info!(monitor = %name, checks, "monitor up again"),
            }
            let wanted = t.to == Health::Down || config.send_on_resolved;
            let notifiers: Vec<(&str, &NotifierConfig)> = config
                .notify
                .iter()
                .filter_map(|n| Some((n.as_str(), self.notifiers.get(n)?)))
                .collect();
            if wanted && !notifiers.is_empty() {
                let event = notify::Event {
                    monitor: name,
                    since: state.since,
                    url: &config.url,
                    down: t.to == Health::Down,
                    number: t.number,
                    at: result.at,
                    status: result.status,
                    latency_ms: result.latency_ms,
                    reason: result.failed_condition.as_deref(),
                    checks,
                };
                let jobs = notify::jobs(&event, &notifiers, self.time.now_ms());
                self.jobs
                    .insert_all(jobs)
                    .await
                    .map_err(|e| store_error!("cannot queue the notifications: {e}"))?;
                self.wake.notify_one();
            }
        }
        self.store.record(name, result, &state, transition).await
    }

    fn validate(&self, name: &str, config: &MonitorConfig) -> Result<Vec<Check>, MonitorError> {
        if !valid_name(name) {
            return Err(MonitorError::Invalid(Invalid(format!(
                "name: `{name}` — use 1 to 64 letters, digits, `-` and `_`"
            ))));
        }
        if config.interval_s.is_finite() && config.interval_s < self.api.min_interval_s {
            return Err(MonitorError::Invalid(Invalid(format!(
                "monitor.interval_s must be at least {} seconds for a monitor made through the API (KNOCKER_MONITOR_MIN_INTERVAL)",
                self.api.min_interval_s
            ))));
        }
        config
            .compile("monitor", &self.notifiers)
            .map_err(MonitorError::Invalid)
    }

    /// Creates a monitor through the API and starts it.
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        config: MonitorConfig,
    ) -> Result<(), MonitorError> {
        let checks = self.validate(name, &config)?;
        {
            let running = self.running.lock();
            if running.contains_key(name) {
                return Err(MonitorError::Exists(name.to_owned()));
            }
            let made = running.values().filter(|r| r.source == Source::Api).count();
            if made >= self.api.max_monitors {
                return Err(MonitorError::Limit(self.api.max_monitors));
            }
        }
        self.store.put(name, Source::Api, &config).await?;
        self.spawn(name, Source::Api, config, checks);
        Ok(())
    }

    /// Replaces an API monitor's definition (its state and history are kept).
    pub async fn update(
        self: &Arc<Self>,
        name: &str,
        config: MonitorConfig,
    ) -> Result<(), MonitorError> {
        let checks = self.validate(name, &config)?;
        self.api_owned(name)?;
        self.store.put(name, Source::Api, &config).await?;
        self.spawn(name, Source::Api, config, checks);
        Ok(())
    }

    /// Stops an API monitor and removes it with its history.
    pub async fn delete(&self, name: &str) -> Result<(), MonitorError> {
        self.api_owned(name)?;
        if let Some(running) = self.running.lock().remove(name) {
            running.stop.cancel();
        }
        self.store.remove(name).await?;
        Ok(())
    }

    fn api_owned(&self, name: &str) -> Result<(), MonitorError> {
        match self.running.lock().get(name).map(|r| r.source) {
            None => Err(MonitorError::NotFound(name.to_owned())),
            Some(Source::File) => Err(MonitorError::FromFile(name.to_owned())),
            Some(Source::Api) => Ok(()),
        }
    }

    /// Names of the monitors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// A monitor's status: health, last result, uptime; with `detail`, its results
    /// (newest first), transitions and definition.
    pub async fn status(&self, name: &str, detail: bool) -> Result<Value, MonitorError> {
        let (source, config) = {
            let running = self.running.lock();
            let r = running
                .get(name)
                .ok_or_else(|| MonitorError::NotFound(name.to_owned()))?;
            (r.source, r.config.clone())
        };
        let state = self.store.state(name).await?;
        let results = self
            .store
            .results(name, if detail { usize::MAX >> 1 } else { 1 })
            .await?;
        let uptime = self.store.uptime(name, self.time.now_ms()).await?;
        let result_json = |r: &history::CheckResult| {
            json!({
                "at": crate::clock::rfc3339(r.at),
                "ok": r.ok,
                "status": r.status,
                "latency_ms": r.latency_ms,
                "failed_condition": r.failed_condition,
            })
        };
        let mut view = json!({
            "name": name,
            "source": source,
            "url": crate::redact::url(&config.url),
            "method": config.method,
            "interval_s": config.interval_s,
            // Until its first check has ended, neither up nor down.
            "health": if results.is_empty() { json!("pending") } else { json!(state.health) },
            "failures_in_a_row": state.failures,
            "successes_in_a_row": state.successes,
            "last": results.first().map(result_json),
            "uptime": { "24h": uptime.day, "7d": uptime.week, "30d": uptime.month },
        });
        if detail {
            let transitions = self.store.transitions(name).await?;
            view["results"] = json!(results.iter().map(result_json).collect::<Vec<_>>());
            view["transitions"] = json!(transitions
                .iter()
                .map(|t| json!({
                    "number": t.number,
                    "at": crate::clock::rfc3339(t.at),
                    "health": t.health,
                    "reason": t.reason,
                }))
                .collect::<Vec<_>>());
            view["config"] = crate::redact::json(&json!(config));
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifiers() -> BTreeMap<String, NotifierConfig> {
        toml::from_str("[hook]\nwebhook = \"http://h/\"\n").unwrap()
    }

    #[test]
    fn definitions_have_defaults_and_errors_name_the_field() {
        let c: MonitorConfig = toml::from_str("url = \"http://t/health\"").unwrap();
        assert_eq!(
            (c.method.as_str(), c.interval_s, c.timeout_s),
            ("GET", 30.0, 10.0)
        );
        assert_eq!((c.failure_threshold, c.success_threshold), (3, 2));
        assert!(!c.send_on_resolved);
        let checks = c.compile("monitors.api", &notifiers()).unwrap();
        assert!(matches!(checks[..], [Check::StatusRange(200, 299)]));
        for (text, field) in [
            ("url = \"ftp://x\"", "monitors.api.url"),
            (
                "url = \"http://t\"\nmethod = \"BAD METHOD\"",
                "monitors.api.method",
            ),
            (
                "url = \"http://t\"\ninterval_s = 0.01",
                "monitors.api.interval_s",
            ),
            (
                "url = \"http://t\"\ntimeout_s = 0",
                "monitors.api.timeout_s",
            ),
            (
                "url = \"http://t\"\nfailure_threshold = 0",
                "monitors.api.failure_threshold",
            ),
            (
                "url = \"http://t\"\nnotify = [\"hook\", \"pager\"]",
                "monitors.api.notify[1]",
            ),
            (
                "url = \"http://t\"\nconditions = [{ status = [200] }, { body_regex = \"(\" }]",
                "monitors.api.conditions[1]",
            ),
        ] {
            let c: MonitorConfig = toml::from_str(text).unwrap();
            let e = c.compile("monitors.api", &notifiers()).unwrap_err();
            assert!(e.0.contains(field), "{text}: {e}");
        }
        assert!(toml::from_str::<MonitorConfig>("url = \"http://t\"\nintervl = 1").is_err());
        assert!(valid_name("api-1_x") && !valid_name("a.b") && !valid_name(""));
    }
}
