//! `GET /metrics`: the process's metrics ([`crate::metrics`]) with the gauges that are
//! read when scraped (jobs by state, the oldest due job, targets, groups, monitors), and
//! the attempt observer that counts every attempt and every finished job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::broadcast::groups::Groups;
use crate::clock::Time;
use crate::delivery::observe::{Attempted, Observer};
use crate::delivery::targets::Targets;
use crate::metrics::{
    self, AttemptOutcome, CircuitLabels, Finished, GroupLabel, MonitorLabel, StateLabel,
    TargetLabel, UptimeLabels,
};
use crate::monitor::Monitors;
use crate::store::{Next, Store};

/// Counts attempts, finished jobs and notifications: an attempt observer.
#[derive(Debug, Default)]
pub struct Recorder;

impl Observer for Recorder {
    fn attempted(&self, a: &Attempted<'_>) {
        let m = metrics::get();
        let kind = a.job.kind.name();
        let (outcome, finished) = match a.next {
            Next::Delivered => (AttemptOutcome::Delivered, Some(Finished::Delivered)),
            Next::Retry { .. } => (AttemptOutcome::Retry, None),
            Next::Failed { .. } => (AttemptOutcome::Failed, Some(Finished::Failed)),
        };
        // A failure without an answer carries Knocker's code, not the target's.
        let status = if a.outcome.error.is_some() {
            0
        } else {
            a.outcome.status
        };
        m.attempted(a.job.host(), kind, outcome, status, a.outcome.latency);
        if let Some(result) = finished {
            let age = a.now.saturating_sub(a.job.created_at);
            m.finished(kind, result, Duration::from_millis(age));
            if let Some(notifier) = a.job.config.get("notifier").and_then(|n| n.as_str()) {
                m.notified(notifier, result);
            }
        }
    }
}

/// What the scrape reads besides the recorded families.
pub struct Sources {
    pub store: Arc<dyn Store>,
    pub targets: Arc<Targets>,
    pub groups: Arc<Groups>,
    pub monitors: Arc<Monitors>,
    pub time: Time,
}

/// How long a group's DNS lookup may hold up a scrape.
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

impl Sources {
    /// Sets the scrape-time gauges, then encodes everything.
    pub async fn render(&self) -> String {
        let m = metrics::get();
        let now = self.time.now_ms();
        if let Ok(stats) = self.store.stats().await {
            for (state, n) in [
                ("pending", stats.pending),
                ("in_flight", stats.in_flight),
                ("delivered", stats.delivered),
                ("failed", stats.failed),
            ] {
                m.jobs.get_or_create(&StateLabel { state }).set(n as i64);
            }
        }
        if let Ok(oldest) = self.store.oldest_due().await {
            let age = oldest.map_or(0, |at| now.saturating_sub(at));
            m.oldest_pending_seconds.set(age as f64 / 1000.0);
        }
        self.targets_now(now);
        self.groups_now().await;
        self.monitors_now().await;
        m.encode()
    }

    fn targets_now(&self, now: crate::clock::Millis) {
        let m = metrics::get();
        m.target_in_flight.clear();
        m.target_circuit.clear();
        let mut in_flight: HashMap<String, i64> = HashMap::new();
        for view in self.targets.view(now) {
            let target = m.target_label(&view.target);
            *in_flight.entry(target.clone()).or_default() += view.in_flight as i64;
            if target == "other" {
                continue;
            }
            for state in ["closed", "open", "probing", "paused"] {
                m.target_circuit
                    .get_or_create(&CircuitLabels {
                        target: target.clone(),
                        state,
                    })
                    .set(i64::from(view.circuit.name() == state));
            }
        }
        for (target, n) in in_flight {
            m.target_in_flight
                .get_or_create(&TargetLabel { target })
                .set(n);
        }
    }

    async fn groups_now(&self) {
        let m = metrics::get();
        m.group_members.clear();
        let names: Vec<String> = self.groups.names().cloned().collect();
        for group in names {
            if let Ok(Ok(members)) =
                tokio::time::timeout(LOOKUP_WAIT, self.groups.members(&group)).await
            {
                m.group_members
                    .get_or_create(&GroupLabel { group })
                    .set(members.len() as i64);
            }
        }
    }

    async fn monitors_now(&self) {
        let m = metrics::get();
        m.monitor_up.clear();
        m.monitor_uptime.clear();
        for name in self.monitors.names() {
            let Ok(status) = self.monitors.status(&name, false).await else {
                continue;
            };
            let monitor = m.monitor_label(&name);
            match status["health"].as_str() {
                Some("up") => m
                    .monitor_up
                    .get_or_create(&MonitorLabel {
                        monitor: monitor.clone(),
                    })
                    .set(1),
                Some("down") => m
                    .monitor_up
                    .get_or_create(&MonitorLabel {
                        monitor: monitor.clone(),
                    })
                    .set(0),
                _ => continue, // pending: no checks yet
            };
            for window in ["24h", "7d", "30d"] {
                if let Some(ratio) = status["uptime"][window].as_f64() {
                    m.monitor_uptime
                        .get_or_create(&UptimeLabels {
                            monitor: monitor.clone(),
                            window,
                        })
                        .set(ratio);
                }
            }
        }
    }
}
