//! How attempts leave the process: a [`Transport`] per job kind, found in one registry
//! ([`Transports`]). HTTP ([`super::http`]) carries targets and callbacks, SMTP
//! ([`super::email`]) carries email notifications; a new transport is one file and one
//! line where the registry is built. Schedule tests put a fake in its place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::attempt::{code, Outcome};
use crate::job::{Job, Kind};

/// Sends one attempt of a job and says what came of it; never fails otherwise.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn send(&self, job: &Job) -> Outcome;
}

/// The transports by job kind.
#[derive(Default)]
pub struct Transports {
    by_kind: HashMap<Kind, Arc<dyn Transport>>,
}

impl Transports {
    /// `transport` carries the jobs of `kind` from now on.
    #[must_use]
    pub fn with(mut self, kind: Kind, transport: Arc<dyn Transport>) -> Self {
        self.by_kind.insert(kind, transport);
        self
    }
}

#[async_trait::async_trait]
impl Transport for Transports {
    async fn send(&self, job: &Job) -> Outcome {
        match self.by_kind.get(&job.kind) {
            Some(transport) => transport.send(job).await,
            None => Outcome::failed(
                code::PROTOCOL,
                format!("no transport carries jobs of kind {:?}", job.kind),
                Duration::ZERO,
            ),
        }
    }
}
