//! The distributed engine: NATS JetStream (`KNOCKER_STORE=nats://host:port`), shared by
//! every control plane that points at the same server. Works with nats-server 2.9 and newer
//! (`make test` runs its tests on 2.9 and on 2.12).
//!
//! - Job records live in key-value buckets: `KNOCKER_JOBS` (open jobs), and
//!   `KNOCKER_DELIVERED` / `KNOCKER_FAILED` (finished ones, removed by the buckets' own
//!   age limit, `KNOCKER_RETENTION`). Keys are `j` + the id in hex. A finished job
//!   leaves a marker on its key in `KNOCKER_JOBS` (it tells a used id from a new one);
//!   retention sweeps the markers once they are as old as the finished records. The
//!   finished buckets share a size cap (`KNOCKER_MAX_STORE_BYTES`): at its limit a
//!   bucket's oldest records make room, and retention sweeps the other bucket's older
//!   records and the markers of the jobs gone (`history.rs`).
//! - Work is a stream, `KNOCKER_WORK` (work-queue retention): one message per job to
//!   attempt, carrying its id, published with `Nats-Msg-Id` so a resubmission within the
//!   duplicate window is stored once, on its target's subject (`knocker.work.<hash of
//!   host:port>`), so a target's backlog is the count of its subject. All control planes
//!   pull from one durable consumer (`knocker-work`), so they share the load; a message
//!   not acknowledged within the ack wait (its control plane died) goes to another one:
//!   at-least-once, with the same id. Messages of earlier versions, on `knocker.work`
//!   itself, are still pulled (consumer `knocker-delivery`) while there are any.
//! - A claim pulls no more messages than its capped targets have room for (a message's
//!   subject names its target, so one over the cap goes back unread), and a few for
//!   targets it has no cap for yet only while such targets have work (the stream's
//!   subjects are counted at most every 100 ms).
//! - A retry is a NAK with a delay: the server redelivers the message when it is due,
//!   to whichever control plane asks first.
//! - Ordered lanes: each lane has a subject (`knocker.lane.<hash>`) and a durable
//!   consumer with one message in flight; its holder keeps the head (reporting progress)
//!   through its retries and acknowledges it only when it is delivered or failed, so the
//!   next job of the lane is released in order, cluster-wide.
//!
//! Accepting a job is two requests: the record is created (only if its key has never been
//! used: a key seen before takes the slower path that looks for a finished job of that id),
//! then its work message is published; the receipt follows the message's acknowledgement.
//! The work message carries the record as created and its revision (headers
//! `Knocker-Record`, `Knocker-Record-Revision`; records up to 16 KiB), so the first
//! delivery claims the job with one compare-and-set write over that revision and no read;
//! a record changed meanwhile fails the write and is read. Outcomes are three requests:
//! the finished record, the open one's removal, the acknowledgement.
//! Most of the server's time in a drain goes to the two writes over a key of the open-jobs
//! bucket, the claim and the removal: each makes the server find the key's last message
//! and drop it (reading the key instead of writing it costs about as much). Left out by
//! hand, the claim alone took the server from ~110 to ~70 µs per delivered job and both
//! to ~50 (the drain 1.4× and 1.7× as fast). The claim stays: it is what a deleted job's
//! message, another message of the job and the state the API shows are checked against;
//! leaving it out needs another way to stop the message of a job deleted while pending.
//! A job can end up with two work messages (a resubmission after the duplicate window
//! whose first submission died before publishing, a replay while an old message is still
//! around): the one that claims the job names itself in the record (`claimed_by`), and
//! any other message of the job that comes while it is in flight is dropped. A record
//! written by an earlier version names its message instead (`msg_seq`), and only that
//! message may claim it.
//!
//! One file per part: `connect.rs` (the server's address, login and TLS, for every NATS
//! connection of the control plane), `record.rs` (the job records, their keys and
//! writes), `submit.rs` (accepting a job), `claim.rs` (pulling work and taking its jobs),
//! `held.rs` (claimed messages until their outcome), `outcome.rs` (finished, retried,
//! given back), `retention.rs` (markers swept), `history.rs` (the finished history's
//! size cap); this file opens the engine and answers the `Store` contract.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType,
};
use async_trait::async_trait;
use futures_util::StreamExt as _;
use parking_lot::Mutex;

use super::{HostCaps, Inserted, Next, Stats, Store, StoreError};
use crate::clock::{Clock as _, Millis, SystemClock};
use crate::job::{Attempt, Job, State, PARKED};

mod claim;
mod connect;
mod held;
mod history;
mod outcome;
mod record;
mod retention;
mod submit;
#[cfg(test)]
pub(crate) mod tests;

use claim::{consumer, subject_count, Uncapped};
pub use connect::{is_nats, NatsAccess, NatsFiles};
use held::{keep_alive, Held};
pub(crate) use record::key;
use record::{id_of, in_arrival_order, remove};
use submit::target_subject;

const JOBS: &str = "KNOCKER_JOBS";
const DELIVERED: &str = "KNOCKER_DELIVERED";
const FAILED: &str = "KNOCKER_FAILED";
const WORK: &str = "KNOCKER_WORK";
/// Where work messages of earlier versions are (one subject for every target).
const LEGACY_SUBJECT: &str = "knocker.work";
const LEGACY_CONSUMER: &str = "knocker-delivery";
const WORK_SUBJECTS: &str = "knocker.work.>";
const LANE_SUBJECTS: &str = "knocker.lane.>";
const CONSUMER: &str = "knocker-work";

/// How the engine is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsOptions {
    /// Where the server is, and how to log in to it.
    pub server: NatsAccess,
    /// Jobs waiting or in flight above which submissions are refused (503).
    pub max_pending: u64,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// Size cap of the finished history (`KNOCKER_MAX_STORE_BYTES`): bytes, 0 for none,
    /// or [`crate::store::AUTO_CAP`] (half the account's storage limit, else 1 GiB); each
    /// finished bucket holds up to half of it, its oldest records making room.
    pub max_history_bytes: u64,
    /// How long a claimed job may go without word from its control plane before another
    /// one gets it.
    pub ack_wait: Duration,
}

pub struct NatsStore {
    js: jetstream::Context,
    jobs: kv::Store,
    delivered: kv::Store,
    failed: kv::Store,
    /// Byte limit of each finished bucket (0: none).
    bucket_cap: u64,
    work: Consumer<PullConfig>,
    /// Pulls what earlier versions left on `knocker.work`, while anything is left there.
    legacy: Mutex<Option<Consumer<PullConfig>>>,
    /// When the legacy subject was last counted (ms).
    legacy_checked: Mutex<Millis>,
    options: NatsOptions,
    held: Arc<Mutex<HashMap<String, Held>>>,
    lanes: Mutex<HashMap<String, Consumer<PullConfig>>>,
    /// When the lane subjects were last listed (ms), to list them at most every 200 ms.
    lanes_listed: Mutex<Millis>,
    /// When claims pull messages for targets without a cap.
    uncapped: Mutex<Uncapped>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

fn now_ms() -> Millis {
    SystemClock.now_ms()
}

impl NatsStore {
    pub async fn open(options: NatsOptions) -> Result<Self, StoreError> {
        let client = options.server.connect("knocker").await?;
        let largest = client.server_info().max_payload as u64;
        let js = jetstream::new(client);
        let jobs = open_bucket(&js, JOBS, Duration::ZERO).await?;
        let cap = options.max_history_bytes;
        let finished = history::open_finished(&js, options.retention, cap, largest).await?;
        let config = StreamConfig {
            name: WORK.to_owned(),
            subjects: vec![
                LEGACY_SUBJECT.to_owned(),
                WORK_SUBJECTS.to_owned(),
                LANE_SUBJECTS.to_owned(),
            ],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            max_messages: i64::try_from(options.max_pending).unwrap_or(i64::MAX),
            discard: DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let mut stream = stream_made(&js, config.clone())
            .await
            .map_err(|e| unavailable(format!("stream {WORK}: {e}")))?;
        let existing = stream
            .info()
            .await
            .map_err(|e| unavailable(format!("stream {WORK}: {e}")))?
            .config
            .clone();
        if config
            .subjects
            .iter()
            .any(|s| !existing.subjects.contains(s))
        {
            // Made by an earlier version: add the target subjects.
            js.update_stream(StreamConfig {
                subjects: config.subjects.clone(),
                ..existing
            })
            .await
            .map_err(|e| unavailable(format!("stream {WORK}: {e}")))?;
        }
        let work = consumer(&stream, CONSUMER, WORK_SUBJECTS, &options).await?;
        let legacy = if subject_count(&stream, LEGACY_SUBJECT).await? > 0 {
            Some(consumer(&stream, LEGACY_CONSUMER, LEGACY_SUBJECT, &options).await?)
        } else {
            None
        };
        let held: Arc<Mutex<HashMap<String, Held>>> = Arc::default();
        tokio::spawn(keep_alive(Arc::downgrade(&held), options.ack_wait));
        Ok(Self {
            js,
            jobs,
            delivered: finished.delivered,
            failed: finished.failed,
            bucket_cap: finished.bucket_cap,
            work,
            legacy: Mutex::new(legacy),
            legacy_checked: Mutex::new(now_ms()),
            options,
            held,
            lanes: Mutex::default(),
            lanes_listed: Mutex::new(0),
            uncapped: Mutex::default(),
        })
    }
}

/// Opens a key-value bucket, creating its stream first when it is missing. The stream
/// is made here, as the client would make it, because the client's own bucket creation
/// asks for account details that nats-server 2.9 answers in an older shape.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
) -> Result<kv::Store, StoreError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    stream_made(js, bucket_config(bucket, max_age))
        .await
        .map_err(|e| unavailable(format!("bucket {bucket}: {e}")))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| unavailable(format!("bucket {bucket}: {e}")))
}

/// The stream of a key-value bucket, as the client would make it.
fn bucket_config(bucket: &str, max_age: Duration) -> StreamConfig {
    StreamConfig {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        // The server refuses a duplicate window longer than the age limit.
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        ..Default::default()
    }
}

/// Creations of a stream tried before giving up, and the pause after the first refusal.
const STREAM_TRIES: u32 = 4;
const STREAM_PAUSE: Duration = Duration::from_millis(100);

/// The stream `config` names, created when it is missing. A refused creation is not the
/// end: the stream is looked for again after a pause (made by then), a few times.
/// nats-server 2.9 refused a control plane's creation of a bucket with "subjects overlap
/// with an existing stream" while another control plane, started at the same moment, was
/// making the same one; the refused control plane exited.
pub(crate) async fn stream_made(
    js: &jetstream::Context,
    config: StreamConfig,
) -> Result<jetstream::stream::Stream, jetstream::context::CreateStreamError> {
    let mut pause = STREAM_PAUSE;
    let mut tries = 1;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            // A server without room for it says so again: no use looking.
            Err(e) if tries < STREAM_TRIES && !history::for_room(&e) => {
                tracing::debug!(stream = %config.name, error = %e, "cannot make a stream yet; looking again");
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        tries += 1;
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn insert(&self, job: Job) -> Result<Inserted, StoreError> {
        self.submit(job).await
    }

    async fn insert_all(&self, jobs: Vec<Job>) -> Result<Vec<Inserted>, StoreError> {
        // One by one: NATS 2.9 has no batch commit. A failure leaves some stored and
        // returns an error (no receipt); resubmitting the same ids completes the set.
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.insert(job).await?);
        }
        Ok(out)
    }

    async fn find_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Job>, StoreError> {
        let wanted = key(prefix);
        let mut found = Vec::new();
        for bucket in [&self.jobs, &self.delivered, &self.failed] {
            let mut keys = bucket.keys().await.map_err(unavailable)?;
            while let Some(k) = keys.next().await {
                let k = k.map_err(unavailable)?;
                if !k.starts_with(&wanted) {
                    continue;
                }
                if let Some(id) = id_of(&k) {
                    if let Some((record, _)) = self.read(bucket, &id).await? {
                        found.push(record);
                    }
                }
            }
        }
        Ok(in_arrival_order(found).take(limit).collect())
    }

    async fn claim_due(
        &self,
        now: Millis,
        limit: usize,
        caps: &HostCaps,
    ) -> Result<Vec<Job>, StoreError> {
        let mut claimed = Vec::new();
        match self.claim_into(&mut claimed, now, limit, caps).await {
            Ok(()) => Ok(claimed),
            Err(e) if claimed.is_empty() => Err(e),
            Err(e) => {
                // What is claimed is held: it must be attempted, or it would never be.
                tracing::warn!(error = %e, claimed = claimed.len(), "claim cut short");
                Ok(claimed)
            }
        }
    }

    async fn finish_attempt(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError> {
        self.record_attempt(job, attempt, next).await
    }

    async fn release(&self, job: &Job) -> Result<(), StoreError> {
        self.release_parked(job).await
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.find(id).await?.map(|r| r.job))
    }

    async fn next_due(&self, _caps: &HostCaps) -> Result<Option<Millis>, StoreError> {
        // The server schedules retries: ask again soon (or when a held head is due).
        let soon = now_ms() + 100;
        let head = self.held.lock().values().filter_map(|h| h.due).min();
        Ok(Some(head.map_or(soon, |d| d.min(soon))))
    }

    /// The messages on the target's subject, less the ones this control plane holds in
    /// flight. A job in flight on another control plane counts; a job of an ordered lane
    /// does not (its messages are on its lane's subject).
    async fn backlog(&self, host: &str) -> Result<Option<u64>, StoreError> {
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let waiting = subject_count(&stream, &target_subject(host)).await?;
        let in_flight_here = self
            .held
            .lock()
            .values()
            .filter(|h| h.due.is_none() && h.host == host)
            .count() as u64;
        Ok(Some(waiting.saturating_sub(in_flight_here)))
    }

    async fn oldest_due(&self) -> Result<Option<Millis>, StoreError> {
        // A job's messages stay on the work stream until it is finished.
        let mut stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let state = &stream.info().await.map_err(unavailable)?.state;
        Ok((state.messages > 0)
            .then(|| (state.first_timestamp.unix_timestamp_nanos() / 1_000_000).max(0) as Millis))
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let mut stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let waiting = stream.info().await.map_err(unavailable)?.state.messages;
        let in_flight = self
            .held
            .lock()
            .values()
            .filter(|h| h.due.is_none())
            .count() as u64;
        let count = |bucket: &'static str| {
            let js = self.js.clone();
            async move {
                let stream = js
                    .get_stream(format!("KV_{bucket}"))
                    .await
                    .map_err(unavailable)?;
                Ok::<u64, StoreError>(stream.cached_info().state.messages)
            }
        };
        Ok(Stats {
            pending: waiting.saturating_sub(in_flight),
            in_flight,
            delivered: count(DELIVERED).await?,
            failed: count(FAILED).await?,
        })
    }

    async fn list(
        &self,
        state: State,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let bucket = match state {
            State::Delivered => &self.delivered,
            State::Failed => &self.failed,
            State::Pending | State::InFlight => &self.jobs,
        };
        let mut jobs = Vec::new();
        let mut keys = bucket.keys().await.map_err(unavailable)?;
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            if let Some(id) = id_of(&k) {
                if let Some((record, _)) = self.read(bucket, &id).await? {
                    if record.job.state == state {
                        jobs.push(record);
                    }
                }
            }
        }
        let jobs: Vec<Job> = in_arrival_order(jobs).collect();
        let start = after
            .and_then(|a| jobs.iter().position(|j| j.id == a))
            .map_or(0, |i| i + 1);
        Ok(jobs.into_iter().skip(start).take(limit).collect())
    }

    async fn replay(&self, id: &str, now: Millis) -> Result<Option<Job>, StoreError> {
        if let Some((record, _)) = self.read(&self.jobs, id).await? {
            return Ok(Some(record.job)); // not finished: left alone
        }
        for bucket in [&self.failed, &self.delivered] {
            if let Some((mut record, _)) = self.read(bucket, id).await? {
                record.job.state = State::Pending;
                record.job.finished_at = None;
                record.job.next_attempt_at = if record.job.lane.is_some() {
                    PARKED
                } else {
                    now
                };
                // Any message may claim it again: the replay's, or one left over.
                record.msg_seq = None;
                record.claimed_by = None;
                self.write(&self.jobs, &record).await?;
                remove(bucket, id).await?;
                let msg_id = format!("{id}#replay{}", record.job.attempts.len());
                self.publish(&record.job, msg_id, None).await?;
                return Ok(Some(record.job));
            }
        }
        Ok(None)
    }

    async fn delete(&self, id: &str, _now: Millis) -> Result<bool, StoreError> {
        let mut existed = false;
        for bucket in [&self.jobs, &self.delivered, &self.failed] {
            if self.read(bucket, id).await?.is_some() {
                remove(bucket, id).await?;
                existed = true;
            }
        }
        // A lane head we hold: release the lane to its next job.
        let held = self.held.lock().remove(id);
        if let Some(h) = held {
            let _ = h.answer(Some(AckKind::Ack)).await;
        }
        Ok(existed)
    }

    async fn purge_finished(&self, before: Millis) -> Result<u64, StoreError> {
        // The finished buckets remove their records themselves (max age = retention, and
        // their oldest at their byte limit); what a finished job leaves in the open-jobs
        // bucket goes here, once its record is gone: past retention, or before the
        // history's horizon (the older records of the other bucket removed first).
        let horizon = self.history_horizon().await?;
        let before = horizon.map_or(before, |h| h.max(before));
        self.sweep_markers(before, retention::SWEEP_MOVES).await
    }
}
