//! Who hears of every attempt: an [`Observer`] is told each outcome and what comes next,
//! after the attempt and before it is recorded. The log ([`Log`]) is one; Sentry's
//! failure reports (`telemetry::sentry`) and metrics plug in the same way, so the
//! delivery loop knows none of them.

use super::attempt::Outcome;
use super::targets::Change;
use crate::clock::Millis;
use crate::job::{Job, Kind};
use crate::redact;
use crate::store::Next;

/// One attempt as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct Attempted<'a> {
    pub job: &'a Job,
    /// 1 for the first attempt.
    pub number: u32,
    pub outcome: &'a Outcome,
    /// Delivered, a retry at a time, or failed (with its callback, if any).
    pub next: &'a Next,
    pub now: Millis,
}

pub trait Observer: Send + Sync + 'static {
    fn attempted(&self, attempt: &Attempted<'_>);

    /// A target's circuit opened or closed.
    fn target_changed(&self, _change: &Change) {}
}

/// Every attempt, one log line: info when delivered or retried, a warning when the
/// job failed, an error when a failure callback failed (its report is lost).
#[derive(Debug, Default)]
pub struct Log;

impl Observer for Log {
    fn target_changed(&self, change: &Change) {
        match change {
            Change::Paused { target, reason, .. } => tracing::warn!(
                target_host = %target, reason = %reason,
                "target paused: its jobs wait, their attempts unspent, until a probe goes through"
            ),
            Change::Resumed {
                target,
                paused_since,
                since,
            } => tracing::info!(
                target_host = %target, paused_ms = since.saturating_sub(*paused_since),
                "target resumed"
            ),
        }
    }

    fn attempted(&self, a: &Attempted<'_>) {
        let latency_ms = a.outcome.latency.as_millis() as u64;
        // Omitted from the line when there is none.
        let error = a.outcome.error.as_deref();
        let kind = a.job.kind.name();
        match a.next {
            Next::Delivered => tracing::info!(
                job_id = %a.job.id, kind, url = %redact::url(&a.job.request.url), attempt = a.number, status = a.outcome.status,
                latency_ms, "delivered"
            ),
            Next::Retry { at } => tracing::info!(
                job_id = %a.job.id, kind, url = %redact::url(&a.job.request.url), attempt = a.number, status = a.outcome.status,
                error, latency_ms, retry_in_ms = at.saturating_sub(a.now), "attempt failed; will retry"
            ),
            Next::Failed { .. } if a.job.kind == Kind::Callback => tracing::error!(
                job_id = %a.job.knocker_id(), kind, url = %redact::url(&a.job.request.url), attempt = a.number, status = a.outcome.status,
                error, latency_ms, "callback failed after its last attempt; the failure report is lost"
            ),
            Next::Failed { callback } => tracing::warn!(
                job_id = %a.job.id, kind, url = %redact::url(&a.job.request.url), attempt = a.number, status = a.outcome.status,
                error, latency_ms, callback = callback.is_some(), "attempt failed; no attempts left"
            ),
        }
    }
}
