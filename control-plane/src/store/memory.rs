//! An in-memory [`Store`]: for tests and for throw-away runs. Not durable.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Inserted, Next, Stats, Store, StoreError};
use crate::clock::Millis;
use crate::job::{Attempt, Job, State};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Pending jobs by due time.
    due: BTreeSet<(Millis, String)>,
    stats: Stats,
}

impl Inner {
    fn add(&mut self, job: Job) {
        self.due.insert((job.next_attempt_at, job.id.clone()));
        self.stats.pending += 1;
        self.jobs.insert(job.id.clone(), job);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(&self, job: Job) -> Result<Inserted, StoreError> {
        let mut inner = self.inner.lock();
        if let Some(existing) = inner.jobs.get(&job.id) {
            return Ok(Inserted::Existing(existing.clone()));
        }
        inner.add(job.clone());
        Ok(Inserted::Created(job))
    }

    async fn claim_due(&self, now: Millis, limit: usize) -> Result<Vec<Job>, StoreError> {
        let mut inner = self.inner.lock();
        let keys: Vec<(Millis, String)> = inner
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .cloned()
            .collect();
        let mut claimed = Vec::with_capacity(keys.len());
        for key in keys {
            inner.due.remove(&key);
            if let Some(job) = inner.jobs.get_mut(&key.1) {
                job.state = State::InFlight;
                claimed.push(job.clone());
            }
        }
        inner.stats.pending -= claimed.len() as u64;
        inner.stats.in_flight += claimed.len() as u64;
        Ok(claimed)
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let Some(job) = inner.jobs.get_mut(id) else {
            return Err(StoreError::Unavailable(format!("job {id} vanished")));
        };
        job.attempts.push(attempt);
        let mut callback_job = None;
        match next {
            Next::Delivered => job.state = State::Delivered,
            Next::Retry { at } => {
                job.state = State::Pending;
                job.next_attempt_at = at;
            }
            Next::Failed { callback } => {
                job.state = State::Failed;
                callback_job = callback.map(|cb| *cb);
            }
        }
        let (state, at) = (job.state, job.next_attempt_at);
        inner.stats.in_flight -= 1;
        match state {
            State::Pending => {
                inner.due.insert((at, id.to_owned()));
                inner.stats.pending += 1;
            }
            State::Delivered => inner.stats.delivered += 1,
            State::Failed => inner.stats.failed += 1,
            State::InFlight => {}
        }
        if let Some(cb) = callback_job {
            if !inner.jobs.contains_key(&cb.id) {
                inner.add(cb);
            }
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.inner.lock().jobs.get(id).cloned())
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.inner.lock().due.first().map(|(at, _)| *at))
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        Ok(self.inner.lock().stats)
    }
}
