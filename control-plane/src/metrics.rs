//! The control plane's Prometheus metrics (OpenMetrics text, `GET /metrics`).
//!
//! One registry for the process ([`get`]): every layer records what it does here, as
//! `tracing` events are recorded wherever they happen, and the `/metrics` handler
//! (`telemetry::metrics`) adds the gauges read at scrape time (jobs by state, targets,
//! groups, monitors) before encoding. Label sets stay bounded: a label whose values come
//! from clients (a target's `host:port`) keeps its first [`MAX_LABEL_VALUES`] values and
//! names every later one `other`.
//!
//! | family | type | labels |
//! | --- | --- | --- |
//! | `knocker_submissions_total` | counter | door, mode, result |
//! | `knocker_submission_duration_seconds` | histogram | door, result (arrival to answer) |
//! | `knocker_jobs` | gauge | state |
//! | `knocker_oldest_pending_age_seconds` | gauge | |
//! | `knocker_attempts_total` | counter | target, kind, outcome, status_class |
//! | `knocker_attempt_duration_seconds` | histogram | kind |
//! | `knocker_jobs_finished_total` | counter | kind, result |
//! | `knocker_job_duration_seconds` | histogram | kind, result (submission to the end) |
//! | `knocker_store_commit_duration_seconds` | histogram | |
//! | `knocker_store_commit_batch_size` | histogram | |
//! | `knocker_target_in_flight` | gauge | target |
//! | `knocker_target_circuit` | gauge | target, state (1 for its state now: closed, open, probing, paused) |
//! | `knocker_broadcast_group_members` | gauge | group |
//! | `knocker_monitor_up` | gauge | monitor (1 up, 0 down, absent while pending) |
//! | `knocker_monitor_check_duration_seconds` | histogram | monitor |
//! | `knocker_monitor_checks_total` | counter | monitor, result |
//! | `knocker_monitor_uptime_ratio` | gauge | monitor, window (24h, 7d, 30d) |
//! | `knocker_notifications_total` | counter | notifier, result |

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Most distinct values a client-chosen label keeps; later ones are `other`.
pub const MAX_LABEL_VALUES: usize = 200;

/// The door a submission came in by.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Door {
    Http,
    Grpc,
}

/// Why a request became a job.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Mode {
    /// `Knocker-*` headers.
    Knock,
    Capture,
    Fallback,
    Broadcast,
}

/// How a submission was answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Submitted {
    /// Committed: a receipt.
    Accepted,
    /// The request was refused (a 4xx naming the field).
    Rejected,
    /// The store could not take it (503).
    Unavailable,
}

impl Submitted {
    /// From the status the client was answered with.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 => Self::Accepted,
            500..=599 => Self::Unavailable,
            _ => Self::Rejected,
        }
    }
}

/// How an attempt ended the job's turn.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    Failed,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Finished {
    Delivered,
    Failed,
}

/// Label values in lower case (the derive would write the variants' names).
macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $text:literal),+ $(,)? })+) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, match self { $(Self::$variant => $text),+ })
            }
        }
    )+};
}

impl Door {
    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Knock => "knock",
            Self::Capture => "capture",
            Self::Fallback => "fallback",
            Self::Broadcast => "broadcast",
        }
    }
}

label_values! {
    Door { Http => "http", Grpc => "grpc" }
    Mode { Knock => "knock", Capture => "capture", Fallback => "fallback", Broadcast => "broadcast" }
    Submitted { Accepted => "accepted", Rejected => "rejected", Unavailable => "unavailable" }
    AttemptOutcome { Delivered => "delivered", Retry => "retry", Failed => "failed" }
    Finished { Delivered => "delivered", Failed => "failed" }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubmissionLabels {
    door: Door,
    mode: Mode,
    result: Submitted,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubmissionTimeLabels {
    door: Door,
    result: Submitted,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    target: String,
    kind: &'static str,
    outcome: AttemptOutcome,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    kind: &'static str,
    result: Finished,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircuitLabels {
    pub target: String,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MonitorLabel {
    pub monitor: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    monitor: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UptimeLabels {
    pub monitor: String,
    pub window: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    notifier: String,
    result: Finished,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every family; recorded through the methods, the scrape-time gauges set by the
/// `/metrics` handler.
pub struct Metrics {
    registry: Registry,
    submissions: Family<SubmissionLabels, Counter>,
    submission_seconds: Histograms<SubmissionTimeLabels>,
    attempts: Family<AttemptLabels, Counter>,
    attempt_seconds: Histograms<KindLabel>,
    finished: Family<FinishedLabels, Counter>,
    job_seconds: Histograms<FinishedLabels>,
    commit_seconds: Histogram,
    commit_batch: Histogram,
    checks: Family<CheckLabels, Counter>,
    check_seconds: Histograms<MonitorLabel>,
    notifications: Family<NotificationLabels, Counter>,
    pub jobs: Family<StateLabel, Gauge>,
    pub oldest_pending_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub target_in_flight: Family<TargetLabel, Gauge>,
    pub target_circuit: Family<CircuitLabels, Gauge>,
    pub group_members: Family<GroupLabel, Gauge>,
    pub monitor_up: Family<MonitorLabel, Gauge>,
    pub monitor_uptime: Family<UptimeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    targets_seen: Bounded,
    monitors_seen: Bounded,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

fn short_histogram() -> Histogram {
    // 100 µs to ~3.3 s: what waits for a commit.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

fn age_histogram() -> Histogram {
    // 10 ms to ~1.8 days: a job's life can be its retries.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 4.0, 12,
    ))
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("knocker");
        let m = Self {
            submissions: Family::default(),
            submission_seconds: Family::new_with_constructor(short_histogram),
            attempts: Family::default(),
            attempt_seconds: Family::new_with_constructor(latency_histogram),
            finished: Family::default(),
            job_seconds: Family::new_with_constructor(age_histogram),
            commit_seconds: short_histogram(),
            commit_batch: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 12),
            ),
            checks: Family::default(),
            check_seconds: Family::new_with_constructor(latency_histogram),
            notifications: Family::default(),
            jobs: Family::default(),
            oldest_pending_seconds: Gauge::default(),
            target_in_flight: Family::default(),
            target_circuit: Family::default(),
            group_members: Family::default(),
            monitor_up: Family::default(),
            monitor_uptime: Family::default(),
            targets_seen: Bounded::default(),
            monitors_seen: Bounded::default(),
            registry: Registry::default(),
        };
        registry.register(
            "submissions",
            "Requests handed to the control plane, by door, mode and how they were answered",
            m.submissions.clone(),
        );
        registry.register_with_unit(
            "submission_duration",
            "From a submission's arrival at the control plane to its answer (an accepted one: \
             read, committed, the receipt), by door and how it was answered",
            Unit::Seconds,
            m.submission_seconds.clone(),
        );
        registry.register("jobs", "Jobs in the store, by state", m.jobs.clone());
        registry.register_with_unit(
            "oldest_pending_age",
            "How long the oldest pending job has waited",
            Unit::Seconds,
            m.oldest_pending_seconds.clone(),
        );
        registry.register(
            "attempts",
            "Delivery attempts, by target, job kind, what came next and the status class",
            m.attempts.clone(),
        );
        registry.register_with_unit(
            "attempt_duration",
            "How long one attempt took",
            Unit::Seconds,
            m.attempt_seconds.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs delivered or failed for good",
            m.finished.clone(),
        );
        registry.register_with_unit(
            "job_duration",
            "From submission to delivered or failed",
            Unit::Seconds,
            m.job_seconds.clone(),
        );
        registry.register_with_unit(
            "store_commit_duration",
            "How long one store commit took (a SQLite transaction, a NATS publish)",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Changes in one store commit",
            m.commit_batch.clone(),
        );
        registry.register(
            "target_in_flight",
            "Attempts under way to a target",
            m.target_in_flight.clone(),
        );
        registry.register(
            "target_circuit",
            "A target's circuit: 1 for the state it is in (closed, open, probing, paused)",
            m.target_circuit.clone(),
        );
        registry.register(
            "broadcast_group_members",
            "Members of each broadcast group now",
            m.group_members.clone(),
        );
        registry.register(
            "monitor_up",
            "1 while a monitor's endpoint is up, 0 while down (absent until its first check)",
            m.monitor_up.clone(),
        );
        registry.register_with_unit(
            "monitor_check_duration",
            "How long one monitor check took",
            Unit::Seconds,
            m.check_seconds.clone(),
        );
        registry.register(
            "monitor_checks",
            "Monitor checks, by monitor and result (ok, failed)",
            m.checks.clone(),
        );
        registry.register(
            "monitor_uptime_ratio",
            "Share of good checks over a window (24h, 7d, 30d)",
            m.monitor_uptime.clone(),
        );
        registry.register(
            "notifications",
            "Notifications sent (delivered) or given up (failed), by notifier",
            m.notifications.clone(),
        );
        Self { registry, ..m }
    }

    /// A submission, how it was answered, and how long after its arrival.
    pub fn submitted(&self, door: Door, mode: Mode, status: u16, took: Duration) {
        let result = Submitted::from_status(status);
        self.submissions
            .get_or_create(&SubmissionLabels { door, mode, result })
            .inc();
        self.submission_seconds
            .get_or_create(&SubmissionTimeLabels { door, result })
            .observe(took.as_secs_f64());
    }

    /// One attempt: `status` 0 when there was no answer.
    pub fn attempted(
        &self,
        target: &str,
        kind: &'static str,
        outcome: AttemptOutcome,
        status: u16,
        took: Duration,
    ) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.attempts
            .get_or_create(&AttemptLabels {
                target: self.targets_seen.label(target),
                kind,
                outcome,
                status_class,
            })
            .inc();
        self.attempt_seconds
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    /// A job delivered or failed for good, `age` after its submission.
    pub fn finished(&self, kind: &'static str, result: Finished, age: Duration) {
        let labels = FinishedLabels { kind, result };
        self.finished.get_or_create(&labels).inc();
        self.job_seconds
            .get_or_create(&labels)
            .observe(age.as_secs_f64());
    }

    /// A notification job ended.
    pub fn notified(&self, notifier: &str, result: Finished) {
        self.notifications
            .get_or_create(&NotificationLabels {
                notifier: notifier.to_owned(),
                result,
            })
            .inc();
    }

    /// One store commit of `changes` changes.
    pub fn committed(&self, changes: usize, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_batch.observe(changes as f64);
    }

    /// One monitor check.
    pub fn checked(&self, monitor: &str, ok: bool, took: Duration) {
        let monitor = self.monitors_seen.label(monitor);
        self.check_seconds
            .get_or_create(&MonitorLabel {
                monitor: monitor.clone(),
            })
            .observe(took.as_secs_f64());
        self.checks
            .get_or_create(&CheckLabels {
                monitor,
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// A target's label: its own name among the first [`MAX_LABEL_VALUES`], else `other`.
    pub fn target_label(&self, target: &str) -> String {
        self.targets_seen.label(target)
    }

    /// A monitor's label, bounded the same way.
    pub fn monitor_label(&self, monitor: &str) -> String {
        self.monitors_seen.label(monitor)
    }

    /// Everything, as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The first [`MAX_LABEL_VALUES`] values of a label keep their names.
#[derive(Default)]
struct Bounded(Mutex<HashSet<String>>);

impl Bounded {
    fn label(&self, value: &str) -> String {
        let mut seen = self.0.lock();
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < MAX_LABEL_VALUES {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_chosen_label_keeps_its_first_values_then_says_other() {
        let b = Bounded::default();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(b.label(&format!("h{i}:80")), format!("h{i}:80"));
        }
        assert_eq!(b.label("new:80"), "other");
        assert_eq!(b.label("h0:80"), "h0:80");
    }

    #[test]
    fn families_encode_as_openmetrics_with_their_labels() {
        let m = Metrics::new();
        m.submitted(Door::Grpc, Mode::Capture, 202, Duration::from_micros(900));
        m.submitted(Door::Http, Mode::Knock, 400, Duration::from_micros(50));
        m.attempted(
            "t:80",
            "target",
            AttemptOutcome::Retry,
            503,
            Duration::from_millis(3),
        );
        m.finished("target", Finished::Delivered, Duration::from_secs(2));
        m.committed(7, Duration::from_micros(300));
        let text = m.encode();
        for line in [
            "knocker_submissions_total{door=\"grpc\",mode=\"capture\",result=\"accepted\"} 1",
            "knocker_submissions_total{door=\"http\",mode=\"knock\",result=\"rejected\"} 1",
            "knocker_submission_duration_seconds_count{door=\"grpc\",result=\"accepted\"} 1",
            "knocker_submission_duration_seconds_bucket{le=\"0.0001\",door=\"http\",result=\"rejected\"} 1",
            "knocker_submission_duration_seconds_bucket{le=\"0.0008\",door=\"grpc\",result=\"accepted\"} 0",
            "knocker_submission_duration_seconds_bucket{le=\"0.0016\",door=\"grpc\",result=\"accepted\"} 1",
            "knocker_attempts_total{target=\"t:80\",kind=\"target\",outcome=\"retry\",status_class=\"5xx\"} 1",
            "knocker_jobs_finished_total{kind=\"target\",result=\"delivered\"} 1",
            "knocker_attempt_duration_seconds_count{kind=\"target\"} 1",
            "knocker_store_commit_batch_size_sum 7.0",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
