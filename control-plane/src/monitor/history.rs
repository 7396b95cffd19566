//! What is kept of a monitor's checks, whichever store keeps it: each result, each
//! transition, the share of good checks per hour.

use serde::{Deserialize, Serialize};

use super::alert::Health;
use crate::clock::Millis;

/// Where a monitor's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `KNOCKER_CONFIG`: replaced from the file at every start, not changed by the API.
    File,
    Api,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub at: Millis,
    pub ok: bool,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// Why the check failed: the first condition that did not hold, or the error.
    pub failed_condition: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub number: u64,
    pub at: Millis,
    pub health: Health,
    pub reason: Option<String>,
}

/// Share of good checks over the last 24 hours, 7 and 30 days (`None`: no checks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Uptime {
    pub day: Option<f64>,
    pub week: Option<f64>,
    pub month: Option<f64>,
}

pub(crate) const HOUR_MS: Millis = 3_600_000;
pub(crate) const MONTH_HOURS: i64 = 30 * 24;

/// Why the monitors' store cannot answer: its SQLite file or its NATS buckets (the text
/// says which, and what failed).
#[derive(Debug, thiserror::Error)]
pub enum MonitorStoreError {
    #[error("{0}")]
    Failed(String),
    #[error("monitor store: cannot encode or decode: {0}")]
    Codec(#[from] serde_json::Error),
    /// The NATS buckets are opened like the job store's.
    #[error(transparent)]
    Buckets(#[from] crate::store::StoreError),
}

pub type StoreResult<T> = Result<T, MonitorStoreError>;

/// A [`MonitorStoreError`] from a format string.
macro_rules! store_error {
    ($($arg:tt)*) => {
        $crate::monitor::history::MonitorStoreError::Failed(format!($($arg)*))
    };
}
pub(crate) use store_error;
