//! Delivery: takes due jobs from the store, sends each attempt, and records what comes
//! next — delivered, retry later (backoff), or failed (callback job, Sentry report).
//!
//! - [`transport`] — a transport per job kind, in one registry: [`http`] (targets and
//!   callbacks, and the failure classification) and [`email`] (SMTP).
//! - [`attempt`] — what an attempt came to ([`attempt::Outcome`]), whatever carried it.
//! - [`observe`] — who hears of every attempt: the log, Sentry, metrics.
//! - [`signing`] — Standard Webhooks signatures, made at send time.
//! - [`targets`] — target health (circuits), rate limits, per-target concurrency.
//! - [`backoff`] — the retry schedule.
//! - [`callback`] — the failure callback job.
//!
//! At-least-once: every attempt carries `x-knocker-id`, so a target can de-duplicate.

pub mod attempt;
pub mod backoff;
pub mod board;
pub mod callback;
pub mod email;
pub mod http;
pub mod observe;
pub mod signing;
pub mod targets;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Time;
use crate::job::{Attempt, Job};
use crate::store::{ClaimHealth, Next, Store};
use attempt::Outcome;
use observe::Observer;
use targets::{Admit, Change, Slot, Targets};
use transport::Transport;

/// How the delivery loop runs (`KNOCKER_DELIVERY`, `KNOCKER_CONCURRENCY`,
/// `KNOCKER_HOST_CONCURRENCY`, `RETRIES_BACKOFF_FACTOR_MAX`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryConfig {
    /// Off: jobs are accepted and stored, not delivered.
    pub enabled: bool,
    /// Attempts in flight at once, across all targets.
    pub concurrency: usize,
    /// Attempts in flight at once to one target host.
    pub host_concurrency: usize,
    /// Caps every retry delay (seconds).
    pub backoff_cap_s: f64,
}

pub struct Delivery {
    pub store: Arc<dyn Store>,
    pub time: Time,
    pub transport: Arc<dyn Transport>,
    /// Notified when a job may have become due earlier than the loop planned.
    pub wake: Arc<Notify>,
    /// In-flight attempts, across all targets.
    pub slots: Arc<Semaphore>,
    /// `RETRIES_BACKOFF_FACTOR_MAX`: caps every delay.
    pub backoff_cap_s: f64,
    /// Hear of every attempt's outcome ([`observe::Log`] first).
    pub observers: Vec<Arc<dyn Observer>>,
    /// Per target: health (circuit), rate, attempts in flight (at most
    /// `KNOCKER_HOST_CONCURRENCY`).
    pub targets: Arc<Targets>,
    /// Told whether claims succeed (the ingress refuses submissions while they fail).
    pub health: Arc<ClaimHealth>,
}

/// The attempt record of a job failed by its maximum age.
pub const EXPIRED: &str = "expired: the maximum age passed before this attempt";

/// How long to sleep when the store fails, before asking it again.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// First and longest pause between tries to record an outcome the store refused.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(100);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);
/// First and longest pause before sending again an attempt this process had no
/// resources for (descriptors).
const LOCAL_SHORTAGE_FIRST: Duration = Duration::from_millis(200);
const LOCAL_SHORTAGE_MAX: Duration = Duration::from_secs(10);
/// How soon to look again when due jobs were left unclaimed although their host had
/// room (a claim that raced a slot coming free).
const BUSY_HOST_POLL: Duration = Duration::from_millis(50);
/// Longest sleep with nothing due (a wake-up comes sooner when a job arrives).
const IDLE: Duration = Duration::from_secs(60);

impl Delivery {
    /// Runs until `shutdown`, then waits (bounded) for attempts in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let total_slots = self.slots.available_permits();
        loop {
            // Stopping first: with a slot free as well, nothing new is claimed.
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let limit = 1 + self.slots.available_permits();
            let now = self.time.now_ms();
            let caps = self.targets.caps(now);
            let jobs = match self.store.claim_due(now, limit, &caps).await {
                Ok(jobs) => {
                    self.health.claimed();
                    jobs
                }
                Err(e) => {
                    self.health.failed(&e);
                    tracing::error!(error = %e, "cannot read due jobs");
                    drop(first);
                    tokio::select! {
                        () = tokio::time::sleep(STORE_ERROR_PAUSE) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            };
            if jobs.is_empty() {
                drop(first);
                let now = self.time.now_ms();
                // Due jobs a target cannot take now wait for it (a slot, its rate, its
                // circuit: `targets.changed`, `next_change`), the others for their time.
                let caps = self.targets.caps(now);
                let mut wait = match self.store.next_due(&caps).await {
                    Ok(Some(at)) if at > now => self.time.until(at).min(IDLE),
                    // Due, yet not claimed: a host with some room took less than its
                    // due jobs; look again soon.
                    Ok(Some(_)) => BUSY_HOST_POLL,
                    Ok(None) => IDLE,
                    Err(_) => STORE_ERROR_PAUSE,
                };
                if let Some(at) = self.targets.next_change(now) {
                    wait = wait.min(self.time.until(at));
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = self.targets.changed().notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
            let mut permit = Some(first);
            for job in jobs {
                // Only this loop takes permits, so the ones counted above are still free.
                let permit = match permit.take() {
                    Some(p) => p,
                    None => match Arc::clone(&self.slots).acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                // In claim order, so rate-limited turns follow arrival.
                let admitted = self.targets.admit(&job, self.time.now_ms()).await;
                let me = Arc::clone(&self);
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    me.attempt(job, admitted, &shutdown).await;
                    drop(permit);
                });
            }
        }
        // Give attempts in flight a moment to finish and record their outcome; what does
        // not finish is attempted again after a restart (at-least-once).
        let all = u32::try_from(total_slots).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.slots.acquire_many(all)).await;
    }

    /// Attempts a claimed `job` as the targets `admitted` it; then, while each outcome
    /// hands the job's ordered lane on, the lane's next job, in the same slot of the
    /// loop. Not while the process stops: a job handed over then is given back.
    async fn attempt(&self, mut job: Job, mut admitted: Admit, shutdown: &CancellationToken) {
        loop {
            let next = match admitted {
                Admit::At { at, slot, .. } => {
                    let wait = self.time.until(at);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    self.deliver(job, slot).await
                }
                Admit::Park => {
                    self.release(&job).await;
                    None
                }
            };
            let Some(next) = next else { return };
            if shutdown.is_cancelled() {
                self.release(&next).await;
                return;
            }
            admitted = self.targets.admit(&next, self.time.now_ms()).await;
            job = next;
        }
    }

    /// One attempt of `job`, holding its target's `slot`, and its outcome recorded.
    /// When that outcome ends the job and hands its ordered lane on, the lane's next job
    /// comes back, claimed in the same commit, for the caller to attempt next: a lane
    /// goes from one job to the next without waiting for a claim (a broadcast member's
    /// copies, an ordered rule's jobs). Otherwise the delivery loop is woken: a slot is
    /// free.
    pub async fn deliver(&self, job: Job, slot: Slot) -> Option<Job> {
        if let Some(deadline) = job.policy.deadline {
            let now = self.time.now_ms();
            if now >= deadline {
                return self.expire(&job, now).await;
            }
        }
        let mut slot = slot;
        slot.turn().await;
        let at = self.time.now_ms();
        let outcome = self.send_when_resources_allow(&job).await;
        // The target's slot is free again (on every path, a panic included).
        drop(slot);
        let number = job.attempts.len() as u32 + 1;
        let now = self.time.now_ms();
        if let Some(change) = self.targets.record(&job, &outcome, now) {
            self.target_changed(&change).await;
        }
        let mut next = self.next_step(&job, number, &outcome, now);
        // Its target is parked now (this failure opened the circuit, or it was the probe
        // and failed): the circuit decides when the target is tried again, so the job
        // keeps its place in the queue instead of going behind the backlog.
        if let Next::Retry { at } = &mut next {
            if !self.targets.circuit(job.host()).is_closed() {
                *at = (*at).min(job.next_attempt_at);
            }
        }
        let attempted = observe::Attempted {
            job: &job,
            number,
            outcome: &outcome,
            next: &next,
            now,
        };
        for observer in &self.observers {
            observer.attempted(&attempted);
        }
        let record = Attempt {
            at,
            status: outcome.status,
            error: outcome.error.clone(),
            latency_ms: outcome.latency.as_millis() as u64,
        };
        self.record(&job, record, next).await
    }

    /// A circuit opened or closed: shared with the other control planes, heard by the
    /// observers (the log, `target.paused` / `target.resumed` notifications).
    pub async fn target_changed(&self, change: &Change) {
        let (target, circuit) = match change {
            Change::Paused { target, .. } | Change::Resumed { target, .. } => {
                (target, self.targets.circuit(target))
            }
        };
        if !self.targets.board.publish(target, &circuit).await {
            return; // another control plane made this transition and told of it
        }
        for observer in &self.observers {
            observer.target_changed(change);
        }
    }

    /// An operator pauses a target: nothing goes to it until it is resumed. `false`
    /// when it was paused already.
    pub async fn pause_target(&self, target: &str) -> bool {
        let was_paused = matches!(
            self.targets.circuit(target),
            targets::Circuit::Paused { .. }
        );
        match self.targets.pause(target, self.time.now_ms()) {
            Some(change) => self.target_changed(&change).await,
            // Its circuit was open already (the event went out then): only shared.
            None if !was_paused => {
                let circuit = self.targets.circuit(target);
                self.targets.board.publish(target, &circuit).await;
            }
            None => {}
        }
        !was_paused
    }

    /// An operator resumes a target (paused, or its circuit open). `false` when it
    /// was neither.
    pub async fn resume_target(&self, target: &str) -> bool {
        match self.targets.resume(target, self.time.now_ms()) {
            Some(change) => {
                self.target_changed(&change).await;
                self.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Gives back a job whose target is parked, retrying while the store cannot
    /// commit (like [`Self::record`]).
    async fn release(&self, job: &Job) {
        let mut wait = RECORD_RETRY_FIRST;
        while let Err(e) = self.store.release(job).await {
            tracing::error!(
                job_id = %job.id, error = %e, retry_in_ms = wait.as_millis() as u64,
                "cannot give back a job of a parked target; retrying"
            );
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RECORD_RETRY_MAX);
        }
    }

    /// Sends the attempt; when it failed for want of a resource of this process (no file
    /// descriptor, no buffer), sends it again after a pause instead of spending one of
    /// the job's attempts: a shortage here delays deliveries, it never fails a job.
    async fn send_when_resources_allow(&self, job: &Job) -> Outcome {
        let mut pause = LOCAL_SHORTAGE_FIRST;
        loop {
            let outcome = self.transport.send(job).await;
            if !outcome.local_shortage {
                return outcome;
            }
            tracing::warn!(
                job_id = %job.id, error = outcome.error.as_deref().unwrap_or(""),
                retry_in_ms = pause.as_millis() as u64,
                "no resources to send the attempt; trying again, the attempt is not counted"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LOCAL_SHORTAGE_MAX);
        }
    }

    /// A job claimed after its maximum age (the control plane was down, or it waited in
    /// an ordered lane): failed without another attempt, its callback sent. Its lane's
    /// next job, as [`Self::deliver`].
    async fn expire(&self, job: &Job, now: u64) -> Option<Job> {
        let last_status = job.attempts.last().map_or(0, |a| a.status);
        tracing::warn!(
            job_id = %job.id, url = %crate::redact::url(&job.request.url), attempts = job.attempts.len(),
            "maximum age passed before the next attempt; the job failed"
        );
        let record = Attempt {
            at: now,
            status: 0,
            error: Some(EXPIRED.into()),
            latency_ms: 0,
        };
        let next = Next::Failed {
            callback: callback::callback_job(job, last_status, now).map(Box::new),
        };
        self.record(job, record, next).await
    }

    /// Records an attempt's outcome, retrying while the store cannot commit (disk full,
    /// size cap): giving up would leave the job marked in flight, never attempted again
    /// before a restart. The attempt's slot stays taken meanwhile, which slows delivery
    /// down while the store is in trouble. The lane's next job if the outcome handed it
    /// over; otherwise the delivery loop is woken.
    ///
    /// A lane keeps its slot only while the loop has slots to spare: with none free,
    /// other due jobs may be waiting for one, so the lane's next job becomes due like
    /// theirs and takes its turn in the due order (many busy lanes never hold every
    /// slot between them).
    async fn record(&self, job: &Job, attempt: Attempt, next: Next) -> Option<Job> {
        let mut wait = RECORD_RETRY_FIRST;
        loop {
            let (attempt, next) = (attempt.clone(), next.clone());
            let recorded = if self.slots.available_permits() > 0 {
                self.store.finish_and_take_next(job, attempt, next).await
            } else {
                self.store
                    .finish_attempt(job, attempt, next)
                    .await
                    .map(|()| None)
            };
            match recorded {
                Ok(Some(taken)) => return Some(taken),
                Ok(None) => {
                    self.wake.notify_one();
                    return None;
                }
                Err(e) => {
                    tracing::error!(
                        job_id = %job.id, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "cannot record the attempt's outcome; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RECORD_RETRY_MAX);
                }
            }
        }
    }

    fn next_step(&self, job: &Job, number: u32, outcome: &Outcome, now: u64) -> Next {
        if outcome.is_success() {
            return Next::Delivered;
        }
        // A destination the outbound policy refuses is refused again, and a status the
        // job's rules call final (410 by default) ends it: no retry.
        let retryable = !outcome.is_denied() && job.policy.retry.retries(outcome.status);
        if number <= job.policy.retries && retryable {
            let cap = job
                .policy
                .max_backoff_s
                .map_or(self.backoff_cap_s, |m| m.min(self.backoff_cap_s));
            let delay = match job.policy.retry.scheduled_delay_s(number) {
                Some(step) => backoff::scheduled_s(step, cap, outcome.retry_after_s),
                None => backoff::delay_s(
                    number,
                    job.policy.backoff_factor,
                    cap,
                    self.time.jitter.sample(),
                    outcome.retry_after_s,
                ),
            };
            let at = now + (delay * 1000.0).round() as u64;
            // No attempt starts after the maximum age.
            if job.policy.deadline.is_none_or(|deadline| at < deadline) {
                return Next::Retry { at };
            }
        }
        Next::Failed {
            callback: callback::callback_job(job, outcome.status, now).map(Box::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock as _, FixedJitter, TokioClock};
    use crate::job::{test_job, Kind, Policy, State};
    use crate::store::memory::MemoryStore;
    use crate::store::HostCaps;
    use parking_lot::Mutex;
    use targets::TargetSettings;

    /// Fails the first `failures` attempts with `status` (and `retry_after_s`), then
    /// succeeds; records when each attempt happened and for which job.
    struct FakeTransport {
        failures: usize,
        status: u16,
        retry_after_s: Option<f64>,
        calls: Mutex<Vec<(tokio::time::Instant, String, Kind)>>,
    }

    #[async_trait::async_trait]
    impl Transport for FakeTransport {
        async fn send(&self, job: &Job) -> Outcome {
            let mut calls = self.calls.lock();
            calls.push((tokio::time::Instant::now(), job.id.clone(), job.kind));
            let failed = calls.iter().filter(|c| c.2 == Kind::Target).count() <= self.failures
                && job.kind == Kind::Target;
            Outcome {
                status: if failed { self.status } else { 200 },
                error: None,
                retry_after_s: if failed { self.retry_after_s } else { None },
                latency: Duration::ZERO,
                local_shortage: false,
            }
        }
    }

    impl FakeTransport {
        /// Every attempt succeeds.
        fn succeeding() -> Self {
            Self {
                failures: 0,
                status: 200,
                retry_after_s: None,
                calls: Mutex::default(),
            }
        }

        /// The ids sent, in order.
        fn ids(&self) -> Vec<String> {
            self.calls.lock().iter().map(|c| c.1.clone()).collect()
        }
    }

    fn job(retries: u32, backoff_factor: f64, callback: Option<&str>) -> Job {
        let policy = Policy {
            timeout: 1.0,
            retries,
            backoff_factor,
            callback: callback.map(Into::into),
            deadline: None,
            max_backoff_s: None,
            callback_trust: crate::job::Trust::Operator,
            retry: crate::job::retry::RetryRules::default(),
            source: None,
            rate: None,
        };
        Job {
            policy,
            ..test_job("j", "POST", "http://t/")
        }
    }

    async fn run(
        job: Job,
        transport: FakeTransport,
        jitter: f64,
        cap: f64,
    ) -> (Arc<FakeTransport>, Arc<dyn Store>, tokio::time::Instant) {
        run_on(
            Arc::new(MemoryStore::default()),
            job,
            transport,
            jitter,
            cap,
        )
        .await
    }

    /// A delivery loop over `store` with `slots`, whose circuits stay closed (the
    /// schedule alone is under test).
    fn delivery_over(
        store: &Arc<dyn Store>,
        transport: Arc<dyn Transport>,
        clock: &TokioClock,
        jitter: f64,
        cap: f64,
        slots: usize,
    ) -> Arc<Delivery> {
        Arc::new(Delivery {
            store: Arc::clone(store),
            time: Time {
                clock: Arc::new(clock.clone()),
                jitter: Arc::new(FixedJitter(jitter)),
            },
            transport,
            wake: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(slots)),
            backoff_cap_s: cap,
            observers: Vec::new(),
            health: Arc::default(),
            targets: Arc::new(Targets::new(
                TargetSettings {
                    failure_threshold: 0,
                    ..TargetSettings::default()
                },
                8,
            )),
        })
    }

    /// Runs the delivery loop over `store` for an hour of virtual time with `job` in it
    /// (its `next_attempt_at` and `deadline` counted from the start).
    async fn run_on(
        store: Arc<dyn Store>,
        job: Job,
        transport: FakeTransport,
        jitter: f64,
        cap: f64,
    ) -> (Arc<FakeTransport>, Arc<dyn Store>, tokio::time::Instant) {
        let clock = TokioClock::new();
        let transport = Arc::new(transport);
        let delivery = delivery_over(
            &store,
            Arc::clone(&transport) as Arc<dyn Transport>,
            &clock,
            jitter,
            cap,
            4,
        );
        let start = tokio::time::Instant::now();
        let now = clock.now_ms();
        let policy = Policy {
            deadline: job.policy.deadline.map(|d| now + d),
            ..job.policy.clone()
        };
        store
            .insert(Job {
                next_attempt_at: now + job.next_attempt_at,
                created_at: now,
                policy,
                ..job
            })
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&delivery).run(shutdown.clone()));
        // Virtual time: an hour passes at once, unless the schedule is wrong.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        shutdown.cancel();
        task.await.unwrap();
        (transport, store, start)
    }

    /// A 200 at once.
    fn delivered() -> Outcome {
        Outcome {
            status: 200,
            error: None,
            retry_after_s: None,
            latency: Duration::ZERO,
            local_shortage: false,
        }
    }

    /// Out of descriptors for the first `shortages` sends, then a 200.
    struct ShortOfDescriptors {
        shortages: usize,
        calls: Mutex<usize>,
    }

    #[async_trait::async_trait]
    impl Transport for ShortOfDescriptors {
        async fn send(&self, _job: &Job) -> Outcome {
            let mut calls = self.calls.lock();
            *calls += 1;
            if *calls <= self.shortages {
                return Outcome {
                    local_shortage: true,
                    ..Outcome::failed(
                        503,
                        "Too many open files (os error 24)".into(),
                        Duration::ZERO,
                    )
                };
            }
            delivered()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_descriptors_delays_a_job_without_spending_its_attempts() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let transport = Arc::new(ShortOfDescriptors {
            shortages: 5,
            calls: Mutex::new(0),
        });
        let delivery = Delivery {
            store: Arc::clone(&store),
            time: Time::system(),
            transport: Arc::clone(&transport) as Arc<dyn Transport>,
            wake: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(4)),
            backoff_cap_s: 1.0,
            observers: Vec::new(),
            health: Arc::default(),
            targets: Arc::new(Targets::new(TargetSettings::default(), 1)),
        };
        let mut job = test_job("j", "POST", "http://t/");
        job.policy.retries = 0; // one attempt: a counted shortage would fail the job
        store.insert(job).await.unwrap();
        let claimed = store
            .claim_due(u64::MAX / 2, 1, &HostCaps::default())
            .await
            .unwrap();
        let job = claimed.into_iter().next().unwrap();
        let Admit::At { slot, .. } = delivery.targets.admit(&job, 0).await else {
            panic!("not admitted")
        };
        delivery.deliver(job, slot).await;
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(job.state, State::Delivered);
        assert_eq!(job.attempts.len(), 1, "the shortages were not counted");
        assert_eq!(*transport.calls.lock(), 6);
        // The host's slot went back.
        assert_eq!(
            delivery.targets.caps(0).get("t"),
            Some(2),
            "its slot (and the one waiting) free"
        );
    }

    fn offsets_ms(transport: &FakeTransport, start: tokio::time::Instant) -> Vec<u128> {
        transport
            .calls
            .lock()
            .iter()
            .map(|(at, _, _)| (*at - start).as_millis())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_follow_the_backoff_schedule_exactly() {
        let transport = FakeTransport {
            failures: 3,
            status: 500,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let (transport, store, start) = run(job(3, 1.0, None), transport, 0.25, 600.0).await;
        // Delays after attempts 1, 2, 3: 1·2^0+.25, 1·2^1+.25, 1·2^2+.25 seconds.
        assert_eq!(offsets_ms(&transport, start), [0, 1250, 3500, 7750]);
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(job.state, State::Delivered);
        let statuses: Vec<u16> = job.attempts.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [500, 500, 500, 200]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_explicit_schedule_replaces_the_factor_and_repeats_its_last_step() {
        let transport = FakeTransport {
            failures: 4,
            status: 500,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let mut job = job(4, 1.0, None);
        job.policy.retry.schedule_s = vec![5.0, 300.0, 600.0];
        // Neither the job's backoff cap nor the global one shortens a configured step.
        job.policy.max_backoff_s = Some(60.0);
        let (transport, store, start) = run(job, transport, 0.9, 120.0).await;
        assert_eq!(
            offsets_ms(&transport, start),
            [0, 5_000, 305_000, 905_000, 1_505_000]
        );
        assert_eq!(
            store.get("j").await.unwrap().unwrap().state,
            State::Delivered
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gone_and_statuses_outside_retry_on_end_the_job_at_once() {
        for (status, retry_on, attempts) in [
            (410, None, 1),
            (404, Some(&["5xx", "429"][..]), 1),
            (503, Some(&["5xx", "429"][..]), 4),
            (404, None, 4),
        ] {
            let transport = FakeTransport {
                failures: usize::MAX,
                status,
                retry_after_s: None,
                calls: Mutex::default(),
            };
            let mut job = job(3, 0.1, Some("http://cb/"));
            job.policy.retry.retry_on =
                retry_on.map(|r| crate::job::retry::Statuses::parse(r, "retry_on").unwrap());
            let (transport, store, _) = run(job, transport, 0.0, 600.0).await;
            let targets = transport
                .calls
                .lock()
                .iter()
                .filter(|c| c.2 == Kind::Target)
                .count();
            assert_eq!(targets, attempts, "{status} with {retry_on:?}");
            assert_eq!(store.get("j").await.unwrap().unwrap().state, State::Failed);
            let cb = store.get("j:callback").await.unwrap().unwrap();
            assert_eq!(cb.state, State::Delivered, "the failure is reported");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_maximum_age_ends_retries_and_caps_each_delay() {
        let transport = FakeTransport {
            failures: usize::MAX,
            status: 503,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let mut job = job(u32::MAX, 1.0, Some("http://cb/"));
        job.policy.deadline = Some(20_000);
        job.policy.max_backoff_s = Some(4.0);
        let (transport, store, start) = run(job, transport, 0.0, 600.0).await;
        // Delays 1, 2, 4, then capped at 4 s; the attempt due at 23 s would be past 20 s.
        let offsets = offsets_ms(&transport, start);
        assert_eq!(
            offsets.get(..7),
            Some(&[0, 1000, 3000, 7000, 11000, 15000, 19000][..])
        );
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(job.state, State::Failed);
        assert_eq!(job.attempts.len(), 7);
        let callback = store.get("j:callback").await.unwrap().unwrap();
        assert_eq!(callback.state, State::Delivered);
        assert_eq!(
            callback.policy.deadline.map(|d| d - callback.created_at),
            Some(20_000),
            "the callback gets the same maximum age"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_claimed_after_its_maximum_age_fails_without_an_attempt() {
        let transport = FakeTransport::succeeding();
        let mut job = job(u32::MAX, 1.0, Some("http://cb/"));
        job.next_attempt_at = 5_000;
        job.policy.deadline = Some(1_000);
        let (transport, store, _) = run(job, transport, 0.0, 600.0).await;
        let kinds: Vec<Kind> = transport.calls.lock().iter().map(|c| c.2).collect();
        assert_eq!(kinds, [Kind::Callback], "only the failure report is sent");
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(job.state, State::Failed);
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].error.as_deref(), Some(EXPIRED));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_retries_plus_one_and_the_callback_follows() {
        let transport = FakeTransport {
            failures: usize::MAX,
            status: 502,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let (transport, store, start) =
            run(job(2, 0.5, Some("http://cb/")), transport, 0.0, 600.0).await;
        let calls = transport.calls.lock().clone();
        let kinds: Vec<Kind> = calls.iter().map(|c| c.2).collect();
        assert_eq!(
            kinds,
            [Kind::Target, Kind::Target, Kind::Target, Kind::Callback]
        );
        // The callback goes out right after the last failure.
        assert_eq!(offsets_ms(&transport, start), [0, 500, 1500, 1500]);
        assert_eq!(store.get("j").await.unwrap().unwrap().state, State::Failed);
        let cb = store.get("j:callback").await.unwrap().unwrap();
        assert_eq!(cb.state, State::Delivered);
        let body: serde_json::Value = serde_json::from_slice(&cb.request.body).unwrap();
        assert_eq!(body["status_code"], 502);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_within_the_cap() {
        let transport = FakeTransport {
            failures: 2,
            status: 503,
            retry_after_s: Some(30.0),
            calls: Mutex::default(),
        };
        let (transport, store, start) = run(job(2, 0.1, None), transport, 0.0, 20.0).await;
        // Retry-After 30 s is longer than the backoff: the job's own retry is capped at
        // 20 s, but its target stays slowed for the whole 30 s, so it goes then.
        assert_eq!(offsets_ms(&transport, start), [0, 30_000, 60_000]);
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(
            job.attempts.len(),
            3,
            "waiting for the target spent no attempt"
        );
        let scheduled = job.attempts[1].at - job.attempts[0].at;
        assert_eq!(scheduled, 30_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_keeps_failing_is_parked_and_one_probe_closes_it() {
        let transport = FakeTransport {
            failures: 7,
            status: 500,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let clock = TokioClock::new();
        let targets = Arc::new(Targets::new(
            TargetSettings {
                failure_threshold: 3,
                cooldown_ms: 100_000,
                max_cooldown_ms: 400_000,
                ..TargetSettings::default()
            },
            8,
        ));
        let transport = Arc::new(transport);
        let delivery = Arc::new(Delivery {
            store: Arc::clone(&store),
            time: Time {
                clock: Arc::new(clock.clone()),
                jitter: Arc::new(FixedJitter(0.0)),
            },
            transport: Arc::clone(&transport) as Arc<dyn Transport>,
            wake: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(4)),
            backoff_cap_s: 600.0,
            observers: Vec::new(),
            health: Arc::default(),
            targets: Arc::clone(&targets),
        });
        let start = tokio::time::Instant::now();
        let now = clock.now_ms();
        // Retries every second: without the circuit, all seven failures come in 7 s.
        let mut j = job(u32::MAX, 0.0, None);
        j.policy.retry.schedule_s = vec![1.0];
        store
            .insert(Job {
                created_at: now,
                next_attempt_at: now,
                ..j
            })
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&delivery).run(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        shutdown.cancel();
        task.await.unwrap();
        // Three failures open it; probes after 100 s, then 200 s, 400 s, 400 s, 400 s
        // (the cool-down doubles up to its cap); the fifth probe finds it back.
        let offsets: Vec<u128> = offsets_ms(&transport, start)
            .into_iter()
            .map(|ms| ms / 1000)
            .collect();
        assert_eq!(offsets, [0, 1, 2, 102, 302, 702, 1102, 1502]);
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(job.state, State::Delivered);
        assert_eq!(job.attempts.len(), 8, "parked time spent no attempts");
        assert_eq!(targets.circuit("t"), targets::Circuit::Closed);
    }

    /// A memory store whose first `refusals` outcomes fail, and which notes the jobs
    /// each claim hands out.
    #[derive(Default)]
    struct RefusingStore {
        inner: MemoryStore,
        refusals: Mutex<usize>,
        claimed: Mutex<Vec<String>>,
    }

    impl RefusingStore {
        fn refuse(&self) -> Result<(), crate::store::StoreError> {
            let mut left = self.refusals.lock();
            if *left > 0 {
                *left -= 1;
                return Err(crate::store::StoreError::Unavailable("disk full".into()));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Store for RefusingStore {
        async fn insert(
            &self,
            job: Job,
        ) -> Result<crate::store::Inserted, crate::store::StoreError> {
            self.inner.insert(job).await
        }
        async fn claim_due(
            &self,
            now: u64,
            limit: usize,
            caps: &HostCaps,
        ) -> Result<Vec<Job>, crate::store::StoreError> {
            let jobs = self.inner.claim_due(now, limit, caps).await?;
            self.claimed
                .lock()
                .extend(jobs.iter().map(|j| j.id.clone()));
            Ok(jobs)
        }
        async fn release(&self, job: &Job) -> Result<(), crate::store::StoreError> {
            self.inner.release(job).await
        }
        async fn finish_attempt(
            &self,
            job: &Job,
            a: Attempt,
            n: Next,
        ) -> Result<(), crate::store::StoreError> {
            self.refuse()?;
            self.inner.finish_attempt(job, a, n).await
        }
        async fn finish_and_take_next(
            &self,
            job: &Job,
            a: Attempt,
            n: Next,
        ) -> Result<Option<Job>, crate::store::StoreError> {
            self.refuse()?;
            self.inner.finish_and_take_next(job, a, n).await
        }
        async fn get(&self, id: &str) -> Result<Option<Job>, crate::store::StoreError> {
            self.inner.get(id).await
        }
        async fn next_due(&self, caps: &HostCaps) -> Result<Option<u64>, crate::store::StoreError> {
            self.inner.next_due(caps).await
        }
        async fn stats(&self) -> Result<crate::store::Stats, crate::store::StoreError> {
            self.inner.stats().await
        }
        async fn oldest_due(
            &self,
        ) -> Result<Option<crate::clock::Millis>, crate::store::StoreError> {
            self.inner.oldest_due().await
        }
        async fn list(
            &self,
            s: State,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<Job>, crate::store::StoreError> {
            self.inner.list(s, after, limit).await
        }
        async fn replay(
            &self,
            id: &str,
            now: u64,
        ) -> Result<Option<Job>, crate::store::StoreError> {
            self.inner.replay(id, now).await
        }
        async fn insert_all(
            &self,
            jobs: Vec<Job>,
        ) -> Result<Vec<crate::store::Inserted>, crate::store::StoreError> {
            self.inner.insert_all(jobs).await
        }
        async fn find_prefix(
            &self,
            prefix: &str,
            limit: usize,
        ) -> Result<Vec<Job>, crate::store::StoreError> {
            self.inner.find_prefix(prefix, limit).await
        }
        async fn delete(&self, id: &str, now: u64) -> Result<bool, crate::store::StoreError> {
            self.inner.delete(id, now).await
        }
        async fn purge_finished(&self, before: u64) -> Result<u64, crate::store::StoreError> {
            self.inner.purge_finished(before).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_the_store_refuses_is_recorded_once_it_can() {
        let store: Arc<dyn Store> = Arc::new(RefusingStore {
            refusals: Mutex::new(3),
            ..RefusingStore::default()
        });
        let transport = FakeTransport::succeeding();
        let (transport, store, _) = run_on(store, job(0, 0.0, None), transport, 0.0, 600.0).await;
        assert_eq!(transport.calls.lock().len(), 1, "sent once");
        let job = store.get("j").await.unwrap().unwrap();
        assert_eq!(
            job.state,
            State::Delivered,
            "recorded after three refusals, not left in flight"
        );
        assert_eq!(job.attempts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_bounds_every_delay() {
        let transport = FakeTransport {
            failures: 3,
            status: 500,
            retry_after_s: None,
            calls: Mutex::default(),
        };
        let (transport, _, start) = run(job(3, 600.0, None), transport, 0.9, 2.0).await;
        assert_eq!(offsets_ms(&transport, start), [0, 2000, 4000, 6000]);
    }

    /// Sends every attempt (200); the first one cancels `stop` (the process stops
    /// while it is in flight).
    struct StopsOnFirst {
        stop: CancellationToken,
        sent: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Transport for StopsOnFirst {
        async fn send(&self, job: &Job) -> Outcome {
            let mut sent = self.sent.lock();
            if sent.is_empty() {
                self.stop.cancel();
            }
            sent.push(job.id.clone());
            delivered()
        }
    }

    /// Runs a delivery loop with `slots` over `store` for a minute of virtual time, jobs
    /// `ids` in it (of the ordered lane their first letter names, target host `t`), due
    /// at once; it stops on `shutdown` (cancelled after the minute, if `transport` did
    /// not do it first).
    async fn run_lanes(
        store: &Arc<dyn Store>,
        ids: &[&str],
        transport: Arc<dyn Transport>,
        shutdown: CancellationToken,
        slots: usize,
    ) {
        let clock = TokioClock::new();
        for id in ids {
            let mut j = job(0, 0.0, None);
            j.id = (*id).to_owned();
            j.lane = Some(id[..1].to_owned());
            j.created_at = clock.now_ms();
            j.next_attempt_at = clock.now_ms();
            store.insert(j).await.unwrap();
        }
        let delivery = delivery_over(store, transport, &clock, 0.0, 600.0, slots);
        let task = tokio::spawn(Arc::clone(&delivery).run(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_ordered_lane_goes_on_to_its_next_job_without_a_claim() {
        let refusing = Arc::new(RefusingStore::default());
        let store: Arc<dyn Store> = Arc::clone(&refusing) as Arc<dyn Store>;
        let ids = ["l1", "l2", "l3", "l4"];
        let transport = Arc::new(FakeTransport::succeeding());
        let sending = Arc::clone(&transport) as Arc<dyn Transport>;
        run_lanes(&store, &ids, sending, CancellationToken::new(), 4).await;
        let sent = transport.ids();
        assert_eq!(sent, ids, "each once, in the lane's order");
        for id in ids {
            let job = store.get(id).await.unwrap().unwrap();
            assert_eq!(job.state, State::Delivered, "{id}");
        }
        // Each outcome handed the lane's next job to the attempt's own task: only the
        // lane's head came from a claim.
        assert_eq!(*refusing.claimed.lock(), ["l1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_keep_no_slot_when_none_is_spare_and_take_turns_in_the_due_order() {
        let refusing = Arc::new(RefusingStore::default());
        let store: Arc<dyn Store> = Arc::clone(&refusing) as Arc<dyn Store>;
        let transport = Arc::new(FakeTransport::succeeding());
        let sending = Arc::clone(&transport) as Arc<dyn Transport>;
        // Arriving in turns, all due at once.
        let ids = ["a1", "b1", "a2", "b2", "a3", "b3"];
        run_lanes(&store, &ids, sending, CancellationToken::new(), 1).await;
        let sent = transport.ids();
        // One slot, and it is taken: neither lane keeps it, each next job becomes due
        // and takes its turn behind the other lane's, which came first (a lane keeping
        // the slot would send a1, a2, a3 before b1).
        assert_eq!(sent, ids);
        assert_eq!(*refusing.claimed.lock(), sent, "every job from a claim");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_job_handed_over_while_the_process_stops_is_given_back_unattempted() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let transport = Arc::new(StopsOnFirst {
            stop: shutdown.clone(),
            sent: Mutex::default(),
        });
        let sending = Arc::clone(&transport) as Arc<dyn Transport>;
        run_lanes(&store, &["l1", "l2", "l3"], sending, shutdown, 4).await;
        assert_eq!(
            *transport.sent.lock(),
            ["l1"],
            "nothing new starts while stopping"
        );
        let state = |job: Option<Job>| job.map(|j| (j.state, j.attempts.len(), j.is_parked()));
        assert_eq!(
            state(store.get("l1").await.unwrap()),
            Some((State::Delivered, 1, false))
        );
        assert_eq!(
            state(store.get("l2").await.unwrap()),
            Some((State::Pending, 0, false)),
            "the lane's next job, pending again, due: the lane's head after a restart"
        );
        assert_eq!(
            state(store.get("l3").await.unwrap()),
            Some((State::Pending, 0, true)),
            "still waiting behind it"
        );
    }
}
