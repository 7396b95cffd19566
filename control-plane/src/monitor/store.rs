//! Where monitors keep their definitions, state and history: this control plane's own
//! SQLite file ([`LocalStore`]) or, on the NATS engine, buckets every control plane
//! shares ([`SharedStore`]). Both answer the same calls.

use super::alert::{AlertState, Transition};
use super::history::{CheckResult, Source, StoreResult, TransitionRecord, Uptime};
use super::MonitorConfig;
use crate::clock::Millis;

pub use super::local::LocalStore;
pub use super::shared::SharedStore;

/// Where monitors keep their definitions and state: this control plane's own SQLite
/// file, or (NATS engine) buckets every control plane shares, with a lease per monitor.
pub enum MonitorStore {
    Local(LocalStore),
    Shared(Box<SharedStore>),
}

/// Both engines answer the same calls.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            MonitorStore::Local($store) => $call,
            MonitorStore::Shared($store) => $call,
        }
    };
}

impl MonitorStore {
    pub async fn definitions(&self) -> StoreResult<Vec<(String, Source, MonitorConfig)>> {
        delegate!(self, s => s.definitions().await)
    }
    pub async fn put(&self, name: &str, source: Source, config: &MonitorConfig) -> StoreResult<()> {
        delegate!(self, s => s.put(name, source, config).await)
    }
    pub async fn remove(&self, name: &str) -> StoreResult<bool> {
        delegate!(self, s => s.remove(name).await)
    }
    pub async fn state(&self, name: &str) -> StoreResult<AlertState> {
        delegate!(self, s => s.state(name).await)
    }
    pub async fn record(
        &self,
        name: &str,
        result: &CheckResult,
        state: &AlertState,
        transition: Option<Transition>,
    ) -> StoreResult<()> {
        delegate!(self, s => s.record(name, result, state, transition).await)
    }
    pub async fn results(&self, name: &str, limit: usize) -> StoreResult<Vec<CheckResult>> {
        delegate!(self, s => s.results(name, limit).await)
    }
    pub async fn transitions(&self, name: &str) -> StoreResult<Vec<TransitionRecord>> {
        delegate!(self, s => s.transitions(name).await)
    }
    pub async fn uptime(&self, name: &str, now: Millis) -> StoreResult<Uptime> {
        delegate!(self, s => s.uptime(name, now).await)
    }

    /// Whether this control plane runs the monitor's next check: always with the local
    /// store; with the shared one, while it holds the monitor's lease.
    pub async fn lease(&self, name: &str) -> StoreResult<bool> {
        match self {
            Self::Local(_) => Ok(true),
            Self::Shared(s) => s.lease(name).await,
        }
    }

    /// Whether other control planes may change the definitions.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Shared(_))
    }
}
