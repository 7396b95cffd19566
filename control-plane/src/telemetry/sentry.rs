//! Sentry: with `SENTRY_DSN` set, errors (error-level log events and panics) are
//! reported; with `SENTRY_FAILED_REQUESTS=true`, so is every job that finally failed.

use crate::delivery::attempt::Outcome;
use crate::delivery::observe::{Attempted, Observer};
use crate::job::Job;
use crate::store::Next;

/// `SENTRY_DSN` and `SENTRY_FAILED_REQUESTS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentryConfig {
    /// Empty: no Sentry.
    pub dsn: String,
    /// Report every job that finally failed.
    pub report_failed_jobs: bool,
}

/// Starts the Sentry client; keep the guard alive for the life of the process (it
/// flushes pending events when dropped). `None` without a DSN.
pub fn init(config: &SentryConfig) -> anyhow::Result<Option<sentry::ClientInitGuard>> {
    if config.dsn.trim().is_empty() {
        return Ok(None);
    }
    let dsn: sentry::types::Dsn = config
        .dsn
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("SENTRY_DSN is not a valid DSN: {e}"))?;
    let mut options =
        sentry::ClientOptions::new().release(format!("knocker@{}", crate::job::VERSION));
    options.dsn = Some(dsn);
    let guard = sentry::init(options);
    Ok(Some(guard))
}

/// Error-level log events go to Sentry as events, with the info and warning lines
/// before them as breadcrumbs. Without a DSN the layers do nothing.
pub fn tracing_layers<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{filter_fn, LevelFilter};
    use tracing_subscriber::Layer as _;
    sentry_tracing::BreadcrumbLayer::new()
        .with_filter(filter_fn(|m| {
            matches!(*m.level(), tracing::Level::WARN | tracing::Level::INFO)
        }))
        .and_then(sentry_tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR))
}

/// Reports jobs that finally failed (`SENTRY_FAILED_REQUESTS`): an attempt observer.
#[derive(Debug, Default)]
pub struct FailureReporter;

impl Observer for FailureReporter {
    fn attempted(&self, a: &Attempted<'_>) {
        if let Next::Failed { .. } = a.next {
            self.job_failed(a.job, a.outcome);
        }
    }
}

impl FailureReporter {
    pub fn job_failed(&self, job: &Job, outcome: &Outcome) {
        // The URL as the API shows it: Sentry is outside this stack.
        let url = crate::redact::url(&job.request.url);
        sentry::with_scope(
            |scope| {
                scope.set_tag("knocker.job_id", &job.id);
                scope.set_tag("knocker.kind", job.kind.name());
                scope.set_tag("knocker.status_code", outcome.status);
                scope.set_extra("url", url.clone().into());
                scope.set_extra("method", job.request.method.clone().into());
                scope.set_extra("attempts", (job.attempts.len() + 1).into());
                if let Some(error) = &outcome.error {
                    scope.set_extra("error", error.clone().into());
                }
            },
            || {
                sentry::capture_message(
                    &format!(
                        "Knocker job failed: {} {} ({})",
                        job.request.method, url, outcome.status
                    ),
                    sentry::Level::Warning,
                )
            },
        );
    }
}
