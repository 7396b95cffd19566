//! Time and randomness, injected so the retry schedule can be tested with paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: how times are stored.
pub type Millis = u64;

/// A stored time as the API and notifications show it: RFC 3339, UTC, milliseconds.
pub fn rfc3339(ms: Millis) -> String {
    const LAST: Millis = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.min(LAST))).to_string()
}

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as Millis)
    }
}

/// A wall clock driven by tokio's clock: it stands still under `tokio::time::pause()`
/// and jumps with `advance`, so schedules are tested without sleeping.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start_wall: Millis,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self {
            start_wall: SystemClock.now_ms(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> Millis {
        self.start_wall + self.start.elapsed().as_millis() as Millis
    }
}

/// The random part of each backoff delay: uniform in `[0, 1)` seconds.
pub trait Jitter: Send + Sync + 'static {
    fn sample(&self) -> f64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn sample(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// A fixed jitter, for tests.
#[derive(Debug, Clone, Copy)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn sample(&self) -> f64 {
        self.0
    }
}

/// The clock and jitter a running instance uses.
#[derive(Clone)]
pub struct Time {
    pub clock: Arc<dyn Clock>,
    pub jitter: Arc<dyn Jitter>,
}

impl Time {
    pub fn system() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            jitter: Arc::new(RandomJitter),
        }
    }

    pub fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    /// How long until `at` (zero when it has passed).
    pub fn until(&self, at: Millis) -> Duration {
        Duration::from_millis(at.saturating_sub(self.now_ms()))
    }
}
