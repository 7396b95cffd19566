//! Target health and limits, per target (`host[:port]` as the job's URL writes it):
//!
//! - **Concurrency** — at most `KNOCKER_HOST_CONCURRENCY` attempts in flight.
//! - **Circuit** — consecutive failures (5xx, 408, 429, no answer) open it after
//!   `failure_threshold`, a `410 Gone` at once: the target's due jobs are parked, not
//!   attempted (their attempts are not spent; their maximum age still runs). After the
//!   cool-down one probe goes through; success closes the circuit, failure doubles the
//!   cool-down (up to `max_cooldown_s`). An operator can pause and resume a target.
//! - **Rate** — `rate_per_s` and `burst` (of the target, or of the rule or group a job
//!   came from: the lowest applies), as a GCRA schedule: attempts are reserved in claim
//!   order, each at its turn, so a backlog drains in order at the rate. A control plane
//!   starts every schedule empty (no burst after a restart), and control planes on one
//!   NATS server reserve on one shared schedule, so the rate holds across restarts and
//!   across the cluster.
//! - **Retry-After** — a 429 or 503 with `Retry-After` slows the whole target that long.
//!
//! The delivery loop asks for [`HostCaps`] before each claim (how many jobs each target
//! may take now), then [`Targets::admit`]s each claimed job. Transitions of the circuit
//! are returned as [`Change`]s: observers turn them into `target.paused` /
//! `target.resumed` notifications, and a [`Board`] shares them between control planes.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::attempt::Outcome;
use super::signing::target_key;
use crate::clock::Millis;
use crate::job::{Job, Rate};
use crate::store::HostCaps;

/// How targets are watched (`[targets]` in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSettings {
    /// Consecutive failures that open a target's circuit; 0: failures never do.
    pub failure_threshold: u32,
    /// Wait before the first probe of an open circuit (ms); doubles after a failed probe.
    pub cooldown_ms: u64,
    pub max_cooldown_ms: u64,
    /// Rate limits by target (`host:port`, lower-case).
    pub rates: HashMap<String, Rate>,
    /// Longest a `Retry-After` slows a target (ms).
    pub max_slow_ms: u64,
}

impl Default for TargetSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown_ms: 30_000,
            max_cooldown_ms: 600_000,
            rates: HashMap::new(),
            max_slow_ms: 3_600_000,
        }
    }
}

/// A target's circuit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    /// Parked until `retry_at`, then one probe.
    Open {
        since: Millis,
        retry_at: Millis,
        reason: String,
    },
    /// The probe is in flight.
    Probing {
        since: Millis,
        reason: String,
    },
    /// Paused by an operator until resumed.
    Paused {
        since: Millis,
    },
}

impl Circuit {
    pub fn name(&self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open { .. } => "open",
            Circuit::Probing { .. } => "probing",
            Circuit::Paused { .. } => "paused",
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, Circuit::Closed)
    }
}

/// A transition others must hear of.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The circuit opened (or an operator paused the target).
    Paused {
        target: String,
        since: Millis,
        reason: String,
    },
    /// The circuit closed (a probe went through, or an operator resumed it).
    Resumed {
        target: String,
        since: Millis,
        paused_since: Millis,
    },
}

/// What the loop does with a claimed job.
#[derive(Debug)]
pub enum Admit {
    /// Send it at this time (now, or its turn under the rate limit), holding the
    /// target's slot. `probe`: it is the one attempt that tests an open circuit.
    At { at: Millis, probe: bool, slot: Slot },
    /// Give it back untouched: the target is parked.
    Park,
}

impl Admit {
    /// When and whether as a probe (tests).
    pub fn turn(&self) -> Option<(Millis, bool)> {
        match self {
            Admit::At { at, probe, .. } => Some((*at, *probe)),
            Admit::Park => None,
        }
    }
}

/// The last failure of a target, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastError {
    pub at: Millis,
    pub status: u16,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Target {
    circuit: CircuitState,
    /// Attempts being sent.
    in_flight: usize,
    /// Admitted, waiting for one of the target's slots.
    queued: usize,
    failures: u32,
    /// GCRA: the theoretical arrival time of the next attempt.
    tat: Millis,
    rate: Option<Rate>,
    slow_until: Millis,
    last_error: Option<LastError>,
    attempts: u64,
}

#[derive(Debug)]
struct CircuitState {
    circuit: Circuit,
    cooldown_ms: u64,
}

impl Default for CircuitState {
    fn default() -> Self {
        Self {
            circuit: Circuit::Closed,
            cooldown_ms: 0,
        }
    }
}

/// A target as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetView {
    pub target: String,
    #[serde(flatten)]
    pub circuit: Circuit,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    pub rate_per_s: Option<f64>,
    pub burst: Option<u32>,
    /// Slowed by a `Retry-After` until then.
    pub slow_until: Option<Millis>,
    pub last_error: Option<LastError>,
    pub attempts: u64,
}

/// Shares circuit transitions between control planes (NATS); the embedded engines
/// have one control plane and share nothing.
#[async_trait::async_trait]
pub trait Board: Send + Sync + 'static {
    /// Tells the others that `target`'s circuit is now `circuit`. `false` when another
    /// control plane made the same transition first (it sent the event).
    async fn publish(&self, target: &str, circuit: &Circuit) -> bool;
    /// Takes the right to probe `target` (only one control plane probes); `true` when
    /// this one may.
    async fn take_probe(&self, target: &str, now: Millis) -> bool;
    /// Reserves the next attempt to `target` under `rate` on the schedule the control
    /// planes share (`local`: this one's schedule, where none is shared yet): its start
    /// and the schedule after it. `None` when nothing is shared or the board cannot be
    /// reached: the local schedule decides.
    async fn reserve(
        &self,
        target: &str,
        rate: Rate,
        local: Millis,
        now: Millis,
    ) -> Option<(Millis, Millis)>;
}

/// Shares nothing: one control plane.
pub struct Alone;

#[async_trait::async_trait]
impl Board for Alone {
    async fn publish(&self, _: &str, _: &Circuit) -> bool {
        true
    }
    async fn take_probe(&self, _: &str, _: Millis) -> bool {
        true
    }
    async fn reserve(&self, _: &str, _: Rate, _: Millis, _: Millis) -> Option<(Millis, Millis)> {
        None
    }
}

/// Every target's state.
pub struct Targets {
    settings: TargetSettings,
    host_concurrency: usize,
    state: Mutex<HashMap<String, Target>>,
    /// A target's slot freed, or a circuit changed.
    changed: Notify,
    /// A target's slot freed (admitted attempts wait for one).
    freed: Notify,
    pub board: Arc<dyn Board>,
    /// When this control plane started: rate schedules start empty then.
    started: Option<Millis>,
}

/// How far ahead attempts are reserved under a rate limit (they wait in the process
/// for their turn), so a claim does not take more than the rate gives soon.
const RATE_LOOKAHEAD_MS: u64 = 1_000;

impl Targets {
    pub fn new(settings: TargetSettings, host_concurrency: usize) -> Self {
        Self {
            settings,
            host_concurrency: host_concurrency.max(1),
            state: Mutex::default(),
            changed: Notify::new(),
            freed: Notify::new(),
            board: Arc::new(Alone),
            started: None,
        }
    }

    /// Rate schedules start empty at `now`: the first attempt to a limited target goes
    /// one interval later and no burst follows a restart, so the rate holds across it.
    #[must_use]
    pub fn with_start(mut self, now: Millis) -> Self {
        self.started = Some(now);
        self
    }

    /// A schedule never used: empty since the start (full when no start was given).
    fn fresh_tat(&self, rate: Rate) -> Millis {
        self.started
            .map_or(0, |s| s + tolerance_ms(rate) + step_ms(rate))
    }

    #[must_use]
    pub fn with_board(mut self, board: Arc<dyn Board>) -> Self {
        self.board = board;
        self
    }

    fn configured_rate(&self, host: &str) -> Option<Rate> {
        if self.settings.rates.is_empty() {
            return None;
        }
        self.settings
            .rates
            .get(&target_key(&format!("http://{host}/")))
            .or_else(|| self.settings.rates.get(host))
            .copied()
    }

    /// How many jobs each known target may take in the next claim: none while parked
    /// or slowed, one to probe, what its concurrency and rate allow otherwise. Targets
    /// not listed take any number.
    pub fn caps(&self, now: Millis) -> HostCaps {
        let mut caps = HostCaps::default();
        let state = self.state.lock();
        for (host, t) in state.iter() {
            let circuit_cap = match &t.circuit.circuit {
                Circuit::Closed => usize::MAX,
                Circuit::Open { retry_at, .. } if *retry_at <= now => 1,
                _ => 0,
            };
            // Up to as many again as its slots wait in the process for a slot (claims
            // come in batches, not one per finished attempt); a host with less room
            // than half its slots waits for more.
            let room = (2 * self.host_concurrency).saturating_sub(t.in_flight + t.queued);
            let batch = (self.host_concurrency / 2).max(1);
            let room = if room >= batch || t.in_flight + t.queued == 0 {
                room
            } else {
                0
            };
            let mut cap = circuit_cap.min(room);
            if t.slow_until > now {
                cap = 0;
            }
            if let Some(rate) = t.rate.or_else(|| self.configured_rate(host)) {
                let tat = if t.tat == 0 {
                    self.fresh_tat(rate)
                } else {
                    t.tat
                };
                cap = cap.min(rate_room(tat, rate, now, now + RATE_LOOKAHEAD_MS));
            }
            if cap != usize::MAX {
                caps.cap(host, cap);
            }
        }
        drop(state);
        // Targets with a rate limit but no attempt yet.
        for (key, rate) in &self.settings.rates {
            if !caps.contains(key) && !self.state.lock().contains_key(key) {
                let room = rate_room(self.fresh_tat(*rate), *rate, now, now + RATE_LOOKAHEAD_MS);
                caps.cap(key, room);
            }
        }
        caps
    }

    /// The earliest time a parked, slowed or rate-limited target may take a job again.
    pub fn next_change(&self, now: Millis) -> Option<Millis> {
        let state = self.state.lock();
        state
            .values()
            .filter_map(|t| {
                let mut at: Option<Millis> = None;
                let mut earliest = |m: Millis| {
                    if m > now {
                        at = Some(at.map_or(m, |a| a.min(m)));
                    }
                };
                if let Circuit::Open { retry_at, .. } = t.circuit.circuit {
                    earliest(retry_at);
                }
                earliest(t.slow_until);
                if let Some(rate) = t.rate {
                    earliest(t.tat.saturating_sub(tolerance_ms(rate)));
                }
                at
            })
            .min()
    }

    /// Wakes the loop when a slot frees or a circuit changes.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Decides a claimed job's turn, in claim order (rate reservations follow it); an
    /// admitted job holds one of its target's slots until the [`Slot`] is dropped.
    pub async fn admit(self: &Arc<Self>, job: &Job, now: Millis) -> Admit {
        let host = job.host();
        let probe_due = {
            let mut state = self.state.lock();
            let t = state.entry(host.to_owned()).or_default();
            let probe_due = match &t.circuit.circuit {
                Circuit::Paused { .. } | Circuit::Probing { .. } => return Admit::Park,
                Circuit::Open { retry_at, .. } if *retry_at > now => return Admit::Park,
                Circuit::Open { .. } => true,
                Circuit::Closed => false,
            };
            // Slowed by a Retry-After: parked before a turn is reserved for it.
            if t.slow_until > now && !probe_due {
                return Admit::Park;
            }
            probe_due
        };
        if probe_due && !self.board.take_probe(host, now).await {
            // Another control plane probes it: ask again after a cool-down, not at once.
            let mut state = self.state.lock();
            if let Some(t) = state.get_mut(host) {
                let wait = t.circuit.cooldown_ms.max(1_000);
                if let Circuit::Open { retry_at, .. } = &mut t.circuit.circuit {
                    *retry_at = now + wait;
                }
            }
            return Admit::Park;
        }
        let configured = self.configured_rate(host);
        let rate = match (configured, job.policy.rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Under a rate, the shared schedule first (other control planes reserve on it).
        let shared = match rate {
            Some(rate) => {
                let local = {
                    let mut state = self.state.lock();
                    let t = state.entry(host.to_owned()).or_default();
                    if t.tat == 0 {
                        t.tat = self.fresh_tat(rate);
                    }
                    t.tat
                };
                self.board.reserve(host, rate, local, now).await
            }
            None => None,
        };
        let mut state = self.state.lock();
        let t = state.entry(host.to_owned()).or_default();
        if t.slow_until > now && !probe_due {
            return Admit::Park;
        }
        if probe_due {
            let Circuit::Open { since, reason, .. } = &t.circuit.circuit else {
                return Admit::Park; // changed meanwhile (resumed, or another probe)
            };
            t.circuit.circuit = Circuit::Probing {
                since: *since,
                reason: reason.clone(),
            };
        }
        t.rate = rate;
        let at = match (rate, shared) {
            (Some(_), Some((at, tat))) => {
                t.tat = tat;
                at
            }
            (Some(rate), None) => {
                if t.tat == 0 {
                    t.tat = self.fresh_tat(rate);
                }
                reserve(&mut t.tat, rate, now)
            }
            (None, _) => now,
        };
        t.queued += 1;
        t.attempts += 1;
        Admit::At {
            at,
            probe: probe_due,
            slot: Slot {
                targets: Arc::clone(self),
                host: host.to_owned(),
                sending: false,
            },
        }
    }

    /// Records what an attempt to `job`'s target came to; returns the circuit's
    /// transition, if any.
    pub fn record(&self, job: &Job, outcome: &Outcome, now: Millis) -> Option<Change> {
        if outcome.is_denied() || outcome.local_shortage {
            return None;
        }
        let host = job.host();
        let mut state = self.state.lock();
        let t = state.entry(host.to_owned()).or_default();
        if let Some(ra) = outcome.retry_after_s.filter(|ra| *ra > 0.0) {
            let ms = ((ra * 1000.0) as u64).min(self.settings.max_slow_ms);
            t.slow_until = t.slow_until.max(now + ms);
        }
        let failure =
            !outcome.is_success() && is_target_failure(outcome.status, outcome.error.is_some());
        if !failure {
            if outcome.is_success() || outcome.status != 410 {
                t.failures = 0;
            }
        } else {
            t.failures = t.failures.saturating_add(1);
            t.last_error = Some(LastError {
                at: now,
                status: outcome.status,
                error: outcome.error.clone(),
            });
        }
        let gone = outcome.status == 410 && outcome.error.is_none();
        if gone {
            t.last_error = Some(LastError {
                at: now,
                status: 410,
                error: None,
            });
        }
        let reason = || match &outcome.error {
            Some(e) => format!("{} ({e})", outcome.status),
            None => format!("status {}", outcome.status),
        };
        let threshold = self.settings.failure_threshold;
        let change = match t.circuit.circuit.clone() {
            Circuit::Paused { .. } => None,
            Circuit::Probing { since, .. } | Circuit::Open { since, .. } if !failure && !gone => {
                t.circuit = CircuitState::default();
                Some(Change::Resumed {
                    target: host.to_owned(),
                    since: now,
                    paused_since: since,
                })
            }
            Circuit::Probing { since, .. } => {
                let cooldown = (t.circuit.cooldown_ms * 2).min(self.settings.max_cooldown_ms);
                t.circuit = CircuitState {
                    circuit: Circuit::Open {
                        since,
                        retry_at: now + cooldown,
                        reason: reason(),
                    },
                    cooldown_ms: cooldown,
                };
                None
            }
            Circuit::Closed if gone || (threshold > 0 && failure && t.failures >= threshold) => {
                let cooldown = self.settings.cooldown_ms;
                let reason = if gone {
                    "410 Gone".to_owned()
                } else {
                    format!("{} consecutive failures, the last {}", t.failures, reason())
                };
                t.circuit = CircuitState {
                    circuit: Circuit::Open {
                        since: now,
                        retry_at: now + cooldown,
                        reason: reason.clone(),
                    },
                    cooldown_ms: cooldown,
                };
                Some(Change::Paused {
                    target: host.to_owned(),
                    since: now,
                    reason,
                })
            }
            _ => None,
        };
        drop(state);
        self.changed.notify_one();
        change
    }

    /// An operator pauses `host`: nothing is attempted until it is resumed.
    pub fn pause(&self, host: &str, now: Millis) -> Option<Change> {
        let mut state = self.state.lock();
        let t = state.entry(host.to_owned()).or_default();
        if matches!(t.circuit.circuit, Circuit::Paused { .. }) {
            return None;
        }
        let was_closed = t.circuit.circuit.is_closed();
        t.circuit = CircuitState {
            circuit: Circuit::Paused { since: now },
            cooldown_ms: 0,
        };
        was_closed.then(|| Change::Paused {
            target: host.to_owned(),
            since: now,
            reason: "paused by an operator".into(),
        })
    }

    /// An operator resumes `host`: its circuit closes, its jobs go out.
    pub fn resume(&self, host: &str, now: Millis) -> Option<Change> {
        let mut state = self.state.lock();
        let t = state.get_mut(host)?;
        let since = match t.circuit.circuit {
            Circuit::Closed => return None,
            Circuit::Open { since, .. }
            | Circuit::Probing { since, .. }
            | Circuit::Paused { since } => since,
        };
        t.circuit = CircuitState::default();
        t.failures = 0;
        t.slow_until = 0;
        drop(state);
        self.changed.notify_one();
        Some(Change::Resumed {
            target: host.to_owned(),
            since: now,
            paused_since: since,
        })
    }

    /// Another control plane's transition (NATS): taken over without an event.
    pub fn apply(&self, host: &str, circuit: Circuit) {
        let mut state = self.state.lock();
        let t = state.entry(host.to_owned()).or_default();
        if circuit.is_closed() {
            t.failures = 0;
        }
        t.circuit.cooldown_ms = match &circuit {
            Circuit::Open {
                since, retry_at, ..
            } => retry_at.saturating_sub(*since).max(1),
            _ => 0,
        }
        .max(t.circuit.cooldown_ms.min(self.settings.max_cooldown_ms));
        t.circuit.circuit = circuit;
        drop(state);
        self.changed.notify_one();
    }

    /// The circuit of `host` now.
    pub fn circuit(&self, host: &str) -> Circuit {
        self.state
            .lock()
            .get(host)
            .map_or(Circuit::Closed, |t| t.circuit.circuit.clone())
    }

    /// Every target seen, and every one with a configured rate, in name order.
    pub fn view(&self, now: Millis) -> Vec<TargetView> {
        let state = self.state.lock();
        let mut views: Vec<TargetView> = state
            .iter()
            .map(|(host, t)| self.view_of(host, t, now))
            .collect();
        let default = Target::default();
        for key in self.settings.rates.keys() {
            if !state.contains_key(key) {
                views.push(self.view_of(key, &default, now));
            }
        }
        views.sort_by(|a, b| a.target.cmp(&b.target));
        views
    }

    /// One target (closed and idle when never seen).
    pub fn view_one(&self, host: &str, now: Millis) -> TargetView {
        let state = self.state.lock();
        match state.get(host) {
            Some(t) => self.view_of(host, t, now),
            None => self.view_of(host, &Target::default(), now),
        }
    }

    fn view_of(&self, host: &str, t: &Target, now: Millis) -> TargetView {
        let rate = t.rate.or_else(|| self.configured_rate(host));
        TargetView {
            target: host.to_owned(),
            circuit: t.circuit.circuit.clone(),
            in_flight: t.in_flight,
            consecutive_failures: t.failures,
            rate_per_s: rate.map(|r| r.per_s),
            burst: rate.map(|r| r.burst),
            slow_until: (t.slow_until > now).then_some(t.slow_until),
            last_error: t.last_error.clone(),
            attempts: t.attempts,
        }
    }
}

/// One attempt admitted to a target; dropping it frees the target's slot (a panic
/// included).
#[derive(Debug)]
pub struct Slot {
    targets: Arc<Targets>,
    host: String,
    /// Holding one of the target's slots (sending), not only admitted.
    sending: bool,
}

impl Slot {
    /// Waits for one of the target's `KNOCKER_HOST_CONCURRENCY` slots.
    pub async fn turn(&mut self) {
        if self.sending {
            return;
        }
        loop {
            let freed = self.targets.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut state = self.targets.state.lock();
                let t = state.entry(self.host.clone()).or_default();
                if t.in_flight < self.targets.host_concurrency {
                    t.in_flight += 1;
                    t.queued = t.queued.saturating_sub(1);
                    self.sending = true;
                    return;
                }
            }
            freed.await;
        }
    }
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Targets").finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(t) = self.targets.state.lock().get_mut(&self.host) {
            if self.sending {
                t.in_flight = t.in_flight.saturating_sub(1);
            } else {
                t.queued = t.queued.saturating_sub(1);
            }
        }
        if self.sending {
            self.targets.freed.notify_waiters();
        }
        self.targets.changed.notify_one();
    }
}

/// A failure that says the target is unwell: 5xx, 408, 429, or no answer at all. Other
/// 4xx answers say it is up (the request was wrong).
fn is_target_failure(status: u16, no_answer: bool) -> bool {
    no_answer || status >= 500 || status == 408 || status == 429
}

fn interval_ms(rate: Rate) -> f64 {
    1000.0 / rate.per_s
}

fn tolerance_ms(rate: Rate) -> Millis {
    (interval_ms(rate) * f64::from(rate.burst.saturating_sub(1))) as Millis
}

/// The whole milliseconds one attempt moves a schedule.
fn step_ms(rate: Rate) -> Millis {
    interval_ms(rate).round().max(1.0) as Millis
}

/// GCRA: the time the next attempt may start, reserving it (`tat`: the theoretical
/// arrival time of the next attempt).
pub(super) fn reserve(tat: &mut Millis, rate: Rate, now: Millis) -> Millis {
    let at = now.max(tat.saturating_sub(tolerance_ms(rate)));
    *tat = (*tat).max(now) + step_ms(rate);
    at
}

/// How many attempts may start by `until`, at `now`: the burst at most on a schedule
/// that fell behind, one per interval after it.
fn rate_room(tat: Millis, rate: Rate, now: Millis, until: Millis) -> usize {
    let first = tat.max(now).saturating_sub(tolerance_ms(rate));
    if first > until {
        return 0;
    }
    let interval = interval_ms(rate).max(1.0);
    1 + ((until - first) as f64 / interval) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::test_job;
    use std::time::Duration;

    fn outcome(status: u16) -> Outcome {
        Outcome {
            status,
            error: None,
            retry_after_s: None,
            latency: Duration::ZERO,
            local_shortage: false,
        }
    }

    fn settings() -> TargetSettings {
        TargetSettings {
            failure_threshold: 3,
            cooldown_ms: 1_000,
            max_cooldown_ms: 4_000,
            ..TargetSettings::default()
        }
    }

    fn targets(settings: TargetSettings, host_concurrency: usize) -> Arc<Targets> {
        Arc::new(Targets::new(settings, host_concurrency))
    }

    #[tokio::test]
    async fn failures_open_the_circuit_a_probe_closes_it() {
        let targets = targets(settings(), 8);
        let job = test_job("j", "POST", "http://t:1/");
        assert_eq!(targets.record(&job, &outcome(500), 0), None);
        assert_eq!(
            targets.record(&job, &outcome(404), 0),
            None,
            "a 404: it is up"
        );
        assert_eq!(targets.record(&job, &outcome(503), 0), None);
        assert_eq!(targets.record(&job, &outcome(502), 0), None);
        let opened = targets.record(&job, &outcome(500), 10);
        assert!(
            matches!(opened, Some(Change::Paused { ref target, since: 10, .. }) if target == "t:1")
        );
        assert_eq!(targets.caps(500).get("t:1"), Some(0), "parked");
        assert_eq!(targets.admit(&job, 500).await.turn(), None);
        // After the cool-down: one probe.
        assert_eq!(targets.caps(1_010).get("t:1"), Some(1));
        let probe = targets.admit(&job, 1_010).await;
        assert_eq!(probe.turn(), Some((1_010, true)));
        assert_eq!(
            targets.admit(&job, 1_010).await.turn(),
            None,
            "one probe only"
        );
        drop(probe);
        // A failed probe doubles the cool-down, without a second event.
        assert_eq!(targets.record(&job, &outcome(500), 1_100), None);
        assert!(matches!(
            targets.circuit("t:1"),
            Circuit::Open {
                retry_at: 3_100,
                ..
            }
        ));
        assert_eq!(targets.admit(&job, 3_100).await.turn(), Some((3_100, true)));
        let closed = targets.record(&job, &outcome(200), 3_200);
        assert_eq!(
            closed,
            Some(Change::Resumed {
                target: "t:1".into(),
                since: 3_200,
                paused_since: 10
            })
        );
        assert_eq!(
            targets.caps(3_200).get("t:1"),
            Some(16),
            "twice the host's concurrency: its slots and as many waiting"
        );
    }

    #[tokio::test]
    async fn gone_opens_at_once_and_pause_holds_until_resumed() {
        let targets = targets(settings(), 8);
        let job = test_job("j", "POST", "http://t:1/");
        assert!(matches!(
            targets.record(&job, &outcome(410), 0),
            Some(Change::Paused { ref reason, .. }) if reason == "410 Gone"
        ));
        let other = test_job("k", "POST", "http://u:1/");
        assert!(targets.pause("u:1", 5).is_some());
        assert_eq!(targets.admit(&other, 1_000_000).await.turn(), None);
        assert_eq!(
            targets.record(&other, &outcome(200), 6),
            None,
            "stays paused"
        );
        assert!(matches!(
            targets.resume("u:1", 7),
            Some(Change::Resumed {
                paused_since: 5,
                ..
            })
        ));
        assert_eq!(targets.admit(&other, 8).await.turn(), Some((8, false)));
        let views = targets.view(8);
        assert_eq!(views[0].target, "t:1");
        assert_eq!(views[0].circuit.name(), "open");
        assert_eq!(views[0].last_error.as_ref().map(|e| e.status), Some(410));
        assert_eq!(views[1].circuit.name(), "closed");
    }

    #[tokio::test]
    async fn a_rate_spaces_attempts_in_claim_order_after_the_burst() {
        let mut s = settings();
        s.rates.insert(
            "t:1".into(),
            Rate {
                per_s: 10.0,
                burst: 2,
            },
        );
        let targets = targets(s, 64);
        assert_eq!(
            targets.caps(1_000).get("t:1"),
            Some(12),
            "the burst, then ten within the next second"
        );
        let job = test_job("j", "POST", "http://t:1/");
        let mut at = Vec::new();
        for _ in 0..5 {
            at.push(targets.admit(&job, 1_000).await.turn().expect("admitted").0);
        }
        assert_eq!(at, [1_000, 1_000, 1_100, 1_200, 1_300]);
        // A job's own rate (its rule's) is lower: it wins.
        let mut slow = test_job("s", "POST", "http://v:1/");
        slow.policy.rate = Some(Rate {
            per_s: 1.0,
            burst: 1,
        });
        let a = targets.admit(&slow, 0).await.turn();
        let b = targets.admit(&slow, 0).await.turn();
        assert_eq!((a, b), (Some((0, false)), Some((1_000, false))));
        // The next turn is at 2 s: none within the lookahead now, one a second later.
        assert_eq!(targets.caps(0).get("v:1"), Some(0));
        assert_eq!(targets.caps(1_000).get("v:1"), Some(1));
    }

    #[tokio::test]
    async fn a_schedule_starts_empty_so_a_restart_lets_no_burst_through() {
        let rate = Rate {
            per_s: 10.0,
            burst: 5,
        };
        let mut s = settings();
        s.rates.insert("t:1".into(), rate);
        // Started at 10 s: the first attempt one interval later, then one per interval.
        let targets = Arc::new(Targets::new(s, 64).with_start(10_000));
        assert_eq!(
            targets.caps(10_000).get("t:1"),
            Some(10),
            "what falls within the next second, no burst"
        );
        let job = test_job("j", "POST", "http://t:1/");
        let mut at = Vec::new();
        for _ in 0..4 {
            at.push(
                targets
                    .admit(&job, 10_000)
                    .await
                    .turn()
                    .expect("admitted")
                    .0,
            );
        }
        assert_eq!(at, [10_100, 10_200, 10_300, 10_400]);
        // Long idle: the burst is back.
        let later: Vec<Millis> = futures_util::future::join_all(
            (0..6).map(|_| async { targets.admit(&job, 60_000).await.turn().unwrap().0 }),
        )
        .await;
        assert_eq!(later, [60_000, 60_000, 60_000, 60_000, 60_000, 60_100]);
        // A stale schedule offers the burst and what the next second adds, no more.
        assert_eq!(targets.caps(120_000).get("t:1"), Some(15));
    }

    /// A board whose schedule is another control plane's: it has reserved up to 5 s.
    struct Busy(parking_lot::Mutex<Millis>);

    #[async_trait::async_trait]
    impl Board for Busy {
        async fn publish(&self, _: &str, _: &Circuit) -> bool {
            true
        }
        async fn take_probe(&self, _: &str, _: Millis) -> bool {
            true
        }
        async fn reserve(
            &self,
            _: &str,
            rate: Rate,
            _local: Millis,
            now: Millis,
        ) -> Option<(Millis, Millis)> {
            let mut tat = self.0.lock();
            let at = reserve(&mut tat, rate, now);
            Some((at, *tat))
        }
    }

    #[tokio::test]
    async fn a_shared_schedule_decides_and_the_local_one_follows_it() {
        let mut s = settings();
        s.rates.insert(
            "t:1".into(),
            Rate {
                per_s: 10.0,
                burst: 1,
            },
        );
        let targets = Arc::new(
            Targets::new(s, 64).with_board(Arc::new(Busy(parking_lot::Mutex::new(5_000)))),
        );
        let job = test_job("j", "POST", "http://t:1/");
        let at: Vec<Millis> = [
            targets.admit(&job, 1_000).await.turn().unwrap().0,
            targets.admit(&job, 1_000).await.turn().unwrap().0,
        ]
        .into();
        assert_eq!(at, [5_000, 5_100], "after the other control plane's turns");
        assert_eq!(
            targets.caps(1_000).get("t:1"),
            Some(0),
            "nothing within the next second: claim none"
        );
    }

    #[tokio::test]
    async fn retry_after_slows_the_whole_target() {
        let targets = targets(settings(), 8);
        let job = test_job("j", "POST", "http://t:1/");
        let mut busy = outcome(429);
        busy.retry_after_s = Some(2.0);
        targets.record(&job, &busy, 100);
        assert_eq!(targets.caps(200).get("t:1"), Some(0));
        assert_eq!(targets.admit(&job, 200).await.turn(), None);
        assert_eq!(targets.next_change(200), Some(2_100));
        assert_eq!(targets.caps(2_100).get("t:1"), Some(16));
    }

    #[tokio::test]
    async fn admitted_attempts_wait_for_a_slot_and_count_until_it_drops() {
        let targets = targets(settings(), 2);
        let job = test_job("j", "POST", "http://t:1/");
        let admit = |t: &Arc<Targets>| {
            let t = Arc::clone(t);
            let job = job.clone();
            async move {
                match t.admit(&job, 0).await {
                    Admit::At { slot, .. } => slot,
                    Admit::Park => panic!("parked"),
                }
            }
        };
        assert_eq!(targets.caps(0).get("t:1"), None, "never seen: no cap");
        let mut a = admit(&targets).await;
        let mut b = admit(&targets).await;
        // Two slots and two more waiting: room for two.
        assert_eq!(targets.caps(0).get("t:1"), Some(2));
        a.turn().await;
        b.turn().await;
        let mut c = admit(&targets).await;
        let waiting = tokio::spawn(async move {
            c.turn().await;
            c
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "both slots are taken");
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("a freed slot goes to the waiting attempt")
            .unwrap();
        assert_eq!(targets.view_one("t:1", 0).in_flight, 2);
        drop((b, c));
        assert_eq!(targets.caps(0).get("t:1"), Some(4));
        // Released on every path, a panic included.
        let t = Arc::clone(&targets);
        let task = tokio::spawn(async move {
            let Admit::At { mut slot, .. } =
                t.admit(&test_job("p", "POST", "http://t:1/"), 0).await
            else {
                return;
            };
            slot.turn().await;
            panic!("an attempt that panics");
        });
        assert!(task.await.is_err());
        assert_eq!(targets.caps(0).get("t:1"), Some(4), "the slot came back")
    }
}
