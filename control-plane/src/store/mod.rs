//! Where jobs live between acceptance and their final outcome.
//!
//! One trait, [`Store`], so the delivery code never knows which engine it runs on.
//! A receipt is only given after [`Store::insert`] returns: for a durable engine that
//! means the job is on disk.
//!
//! - [`sqlite`] — the embedded default: one crash-safe SQLite file (WAL, fsync on
//!   commit), one writer thread committing many requests per fsync (group commit).
//! - [`nats`] — NATS JetStream (`KNOCKER_STORE=nats://…`): many control planes share
//!   the jobs and the work.
//! - [`memory`] — keeps jobs in memory (`KNOCKER_STORE=memory`): fast, not durable.

/// `KNOCKER_MAX_STORE_BYTES=auto` (the default): a size cap chosen at open, so that
/// history under sustained load neither fills the disk nor, being removed oldest first,
/// refuses work. The embedded store: the database's size plus half the space free on its
/// file system. NATS: the finished history, as [`nats::NatsOptions::max_history_bytes`].
pub const AUTO_CAP: u64 = u64::MAX;

pub mod memory;
pub mod nats;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::job::{Attempt, Job, State};

/// Which engine keeps the jobs: chosen once, from `KNOCKER_STORE`.
#[derive(Debug, Clone, PartialEq)]
pub enum Engine {
    /// The embedded default, in `dir` (`KNOCKER_DATA_DIR`).
    Sqlite {
        dir: PathBuf,
        limits: sqlite::Limits,
    },
    /// NATS JetStream, shared by every control plane on it.
    Nats(nats::NatsOptions),
    /// In memory: not durable (tests, benchmarks of the rest).
    Memory,
}

impl Engine {
    /// Opens (or connects to) the engine.
    pub async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            Engine::Nats(options) => {
                let store = nats::NatsStore::open(options.clone()).await?;
                tracing::info!(server = %options.server, "job store: NATS JetStream");
                Arc::new(store)
            }
            Engine::Memory => {
                tracing::warn!("KNOCKER_STORE=memory: jobs are lost when the process stops");
                Arc::new(memory::MemoryStore::default())
            }
            Engine::Sqlite { dir, limits } => {
                let store = sqlite::SqliteStore::open(dir, *limits)?;
                tracing::info!(path = %store.path().display(), "job store open");
                Arc::new(store)
            }
        })
    }

    /// The NATS server, for the parts that share it (agents, monitors, circuits).
    pub fn nats(&self) -> Option<&nats::NatsAccess> {
        match self {
            Engine::Nats(options) => Some(&options.server),
            _ => None,
        }
    }

    /// Where files of this control plane go; `None` when nothing is kept on disk.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        match self {
            Engine::Sqlite { dir, .. } => Some(dir),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine cannot commit now (I/O error, disk full, connection lost).
    #[error("the job store cannot commit: {0}")]
    Unavailable(String),
    /// Back-pressure: the configured pending limit is reached.
    #[error("the job store is full ({0} pending jobs)")]
    Full(u64),
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// The job is committed. It is the store's now (an engine may hand it straight to the
    /// delivery loop): a caller keeps what it needs of it (its id, its receipt) beforehand.
    Created,
    /// A job with this id was already there: it is returned, nothing is added.
    Existing(Box<Job>),
}

/// How an attempt ends a job's turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry {
        at: Millis,
    },
    /// No attempts left. A callback job, if any, is committed in the same step.
    Failed {
        callback: Option<Box<Job>>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub failed: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits a new pending job, or returns the stored job with the same id.
    async fn insert(&self, job: Job) -> Result<Inserted, StoreError>;

    /// Commits several new jobs in one commit — all of them or none (a broadcast's member
    /// jobs). A job whose id is already stored is returned as stored, not added.
    async fn insert_all(&self, jobs: Vec<Job>) -> Result<Vec<Inserted>, StoreError>;

    /// Jobs whose id starts with `prefix`, in arrival order, at most `limit`.
    async fn find_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Job>, StoreError>;

    /// Marks up to `limit` pending jobs due at `now` as in flight and returns them,
    /// earliest first, taking no more jobs of a target host than `caps` allows (none
    /// of one that is parked, at its concurrency limit or out of rate).
    async fn claim_due(
        &self,
        now: Millis,
        limit: usize,
        caps: &HostCaps,
    ) -> Result<Vec<Job>, StoreError>;

    /// Gives a claimed job back untouched — pending, due when it was, no attempt
    /// recorded: its target is parked.
    async fn release(&self, job: &Job) -> Result<(), StoreError>;

    /// Records an attempt of a claimed `job` (as claimed: its earlier attempts included)
    /// and what comes next.
    async fn finish_attempt(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError>;

    /// [`Self::finish_attempt`]; and when the outcome ends the job and so hands its
    /// ordered lane on, the lane's next job, claimed (in flight) in the same commit, for
    /// the caller to attempt next. `None` when there is no such job, or when the engine
    /// leaves the hand-over to the next claim (the default; on NATS the lane's consumer
    /// releases the next job).
    async fn finish_and_take_next(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<Option<Job>, StoreError> {
        self.finish_attempt(job, attempt, next).await.map(|()| None)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// When the earliest pending job is due, leaving out the target hosts `caps` gives
    /// no room (their jobs wait for the host, not for a time).
    async fn next_due(&self, caps: &HostCaps) -> Result<Option<Millis>, StoreError>;

    async fn stats(&self) -> Result<Stats, StoreError>;

    /// When the longest-waiting pending job became due (parked lane jobs aside); on
    /// NATS, when the oldest unfinished job was submitted. `None` when there is none.
    async fn oldest_due(&self) -> Result<Option<Millis>, StoreError>;

    /// Pending jobs of one target host (`None`: this engine does not count them).
    async fn backlog(&self, _host: &str) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Jobs in `state`, oldest first, after the cursor `after` (a job id), at most `limit`.
    async fn list(
        &self,
        state: State,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;

    /// Makes a finished job pending again, due now, with its history kept. Returns the job,
    /// or `None` when there is no such job; a job that is not finished is left alone.
    async fn replay(&self, id: &str, now: Millis) -> Result<Option<Job>, StoreError>;

    /// Removes a job. Returns whether it existed. A job of an ordered lane hands the
    /// lane to the next job (due at `now`).
    async fn delete(&self, id: &str, now: Millis) -> Result<bool, StoreError>;

    /// Removes finished jobs that finished before `before`; returns how many.
    async fn purge_finished(&self, before: Millis) -> Result<u64, StoreError>;
}

/// How many jobs of each target host a claim may take; hosts not listed, any number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostCaps {
    caps: std::collections::HashMap<String, usize>,
}

impl HostCaps {
    /// No jobs of these hosts.
    pub fn skipping(hosts: &[String]) -> Self {
        let mut caps = Self::default();
        for h in hosts {
            caps.cap(h, 0);
        }
        caps
    }

    /// At most `n` jobs of `host` (the lowest cap given wins).
    pub fn cap(&mut self, host: &str, n: usize) {
        let cap = self.caps.entry(host.to_owned()).or_insert(n);
        *cap = (*cap).min(n);
    }

    pub fn get(&self, host: &str) -> Option<usize> {
        self.caps.get(host).copied()
    }

    pub fn contains(&self, host: &str) -> bool {
        self.caps.contains_key(host)
    }

    /// Every capped host and its cap.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, usize)> {
        self.caps.iter().map(|(h, n)| (h.as_str(), *n))
    }

    /// Hosts that take nothing.
    pub fn skipped(&self) -> impl Iterator<Item = &str> {
        self.caps
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(h, _)| h.as_str())
    }

    /// How many more jobs of `host` fit beside those counted in `taken`; `None`: any
    /// number (the host has no cap).
    pub fn room(
        &self,
        taken: &std::collections::HashMap<String, usize>,
        host: &str,
    ) -> Option<usize> {
        let cap = self.get(host)?;
        Some(cap.saturating_sub(taken.get(host).copied().unwrap_or(0)))
    }

    /// Whether one more job of `host` fits, counting it in `taken` when it does.
    pub fn take(&self, taken: &mut std::collections::HashMap<String, usize>, host: &str) -> bool {
        match self.room(taken, host) {
            None => true,
            Some(0) => false,
            Some(_) => {
                *taken.entry(host.to_owned()).or_default() += 1;
                true
            }
        }
    }
}

/// Whether the store can hand out due jobs now. The delivery loop says so after each
/// claim; while it cannot, the ingress refuses submissions (503) rather than take jobs
/// that would not be delivered.
#[derive(Debug, Default)]
pub struct ClaimHealth {
    failing: parking_lot::Mutex<Option<String>>,
}

impl ClaimHealth {
    pub fn claimed(&self) {
        if self.failing.lock().take().is_some() {
            tracing::info!("the store hands out due jobs again");
        }
    }

    pub fn failed(&self, error: &StoreError) {
        *self.failing.lock() = Some(error.to_string());
    }

    /// Why claims fail, while they do.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().clone()
    }
}

#[cfg(test)]
mod contract_tests;
