//! Delivery: takes due jobs from the store, sends each attempt, and records what comes
//! next — delivered, retry later (backoff), or failed (callback job, Sentry report).
//!
//! - [`attempt`] — one HTTP attempt and the failure classification.
//! - [`backoff`] — the retry schedule.
//! - [`callback`] — the failure callback job.
//!
//! At-least-once: every attempt carries `x-knocker-id`, so a target can de-duplicate.

pub mod attempt;
pub mod backoff;
pub mod callback;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Time;
use crate::job::{Attempt, Job};
use crate::store::{Next, Store};
use crate::telemetry::sentry::FailureReporter;
use attempt::{Clients, Outcome};

pub struct Delivery {
    pub store: Arc<dyn Store>,
    pub time: Time,
    pub clients: Clients,
    /// Notified when a job may have become due earlier than the loop planned.
    pub wake: Arc<Notify>,
    /// In-flight attempts, across all targets.
    pub slots: Arc<Semaphore>,
    /// `RETRIES_BACKOFF_FACTOR_MAX`: caps every delay.
    pub backoff_cap_s: f64,
    pub reporter: Option<Arc<FailureReporter>>,
}

/// How long to sleep when the store fails, before asking it again.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Longest sleep with nothing due (a wake-up comes sooner when a job arrives).
const IDLE: Duration = Duration::from_secs(60);

impl Delivery {
    /// Runs until `shutdown`, then waits (bounded) for attempts in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let total_slots = self.slots.available_permits();
        loop {
            let first = tokio::select! {
                permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let limit = 1 + self.slots.available_permits();
            let jobs = match self.store.claim_due(self.time.now_ms(), limit).await {
                Ok(jobs) => jobs,
                Err(e) => {
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
                let wait = match self.store.next_due().await {
                    Ok(Some(at)) => self.time.until(at).min(IDLE),
                    Ok(None) => IDLE,
                    Err(_) => STORE_ERROR_PAUSE,
                };
                tokio::select! {
                    () = self.wake.notified() => {}
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
                let me = Arc::clone(&self);
                tokio::spawn(async move {
                    me.deliver(job).await;
                    drop(permit);
                });
            }
        }
        // Give attempts in flight a moment to finish and record their outcome; what does
        // not finish is attempted again after a restart (at-least-once).
        let all = u32::try_from(total_slots).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.slots.acquire_many(all)).await;
    }

    /// One attempt of `job`, and its outcome recorded.
    pub async fn deliver(&self, job: Job) {
        let at = self.time.now_ms();
        let outcome = attempt::send(&self.clients, &job).await;
        let number = job.attempts.len() as u32 + 1;
        let now = self.time.now_ms();
        let next = self.next_step(&job, number, &outcome, now);
        log_attempt(&job, number, &outcome, &next, now);
        if let (Next::Failed { .. }, Some(reporter)) = (&next, &self.reporter) {
            reporter.job_failed(&job, &outcome);
        }
        let record = Attempt {
            at,
            status: outcome.status,
            error: outcome.error.clone(),
            latency_ms: outcome.latency.as_millis() as u64,
        };
        if let Err(e) = self.store.finish_attempt(&job.id, record, next).await {
            tracing::error!(job_id = %job.id, error = %e, "cannot record the attempt; the job will be attempted again");
        }
        self.wake.notify_one();
    }

    fn next_step(&self, job: &Job, number: u32, outcome: &Outcome, now: u64) -> Next {
        if outcome.is_success() {
            return Next::Delivered;
        }
        if number <= job.policy.retries {
            let delay = backoff::delay_s(
                number,
                job.policy.backoff_factor,
                self.backoff_cap_s,
                self.time.jitter.sample(),
                outcome.retry_after_s,
            );
            return Next::Retry {
                at: now + (delay * 1000.0).round() as u64,
            };
        }
        Next::Failed {
            callback: callback::callback_job(job, outcome.status, now).map(Box::new),
        }
    }
}

fn log_attempt(job: &Job, number: u32, outcome: &Outcome, next: &Next, now: u64) {
    let latency_ms = outcome.latency.as_millis() as u64;
    let error = outcome.error.as_deref().unwrap_or("");
    let kind = format!("{:?}", job.kind).to_lowercase();
    match next {
        Next::Delivered => tracing::info!(
            job_id = %job.id, kind, url = %job.request.url, attempt = number, status = outcome.status,
            latency_ms, "delivered"
        ),
        Next::Retry { at } => tracing::info!(
            job_id = %job.id, kind, url = %job.request.url, attempt = number, status = outcome.status,
            error, latency_ms, retry_in_ms = at.saturating_sub(now), "attempt failed; will retry"
        ),
        Next::Failed { callback } => tracing::warn!(
            job_id = %job.id, kind, url = %job.request.url, attempt = number, status = outcome.status,
            error, latency_ms, callback = callback.is_some(), "attempt failed; no attempts left"
        ),
    }
}
