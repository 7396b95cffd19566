//! The distributed engine: NATS JetStream (`KNOCKER_STORE=nats://host:port`), shared by
//! every control plane that points at the same server. Works with nats-server 2.9.
//!
//! - Job records live in key-value buckets: `KNOCKER_JOBS` (open jobs), and
//!   `KNOCKER_DELIVERED` / `KNOCKER_FAILED` (finished ones, removed by the buckets' own
//!   age limit, `KNOCKER_RETENTION`). Keys are `j` + the id in hex. A finished job
//!   leaves a marker on its key in `KNOCKER_JOBS` (it tells a used id from a new one);
//!   retention sweeps the markers once they are as old as the finished records.
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
//! A job can end up with two work messages (a resubmission after the duplicate window
//! whose first submission died before publishing, a replay while an old message is still
//! around): the one that claims the job names itself in the record (`claimed_by`), and
//! any other message of the job that comes while it is in flight is dropped. A record
//! written by an earlier version names its message instead (`msg_seq`), and only that
//! message may claim it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::{AckKind, PublishMessage};
use async_nats::jetstream::stream::{
    Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self, Message};
use async_trait::async_trait;
use futures_util::StreamExt as _;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{HostCaps, Inserted, Next, Stats, Store, StoreError};
use crate::clock::{Clock as _, Millis, SystemClock};
use crate::job::{Attempt, Job, State, PARKED};

const JOBS: &str = "KNOCKER_JOBS";
const DELIVERED: &str = "KNOCKER_DELIVERED";
const FAILED: &str = "KNOCKER_FAILED";
const WORK: &str = "KNOCKER_WORK";
/// Entries of the open-jobs bucket read at a time while it is swept of old markers, and
/// purges of markers under way at once.
const SWEEP_BATCH: usize = 5000;
const SWEEP_CONCURRENCY: usize = 64;
/// Where work messages of earlier versions are (one subject for every target).
const LEGACY_SUBJECT: &str = "knocker.work";
const LEGACY_CONSUMER: &str = "knocker-delivery";
const WORK_SUBJECTS: &str = "knocker.work.>";
const LANE_SUBJECTS: &str = "knocker.lane.>";
const CONSUMER: &str = "knocker-work";
/// How long one pull waits for messages.
const PULL_WAIT: Duration = Duration::from_millis(50);
/// Messages a claim pulls beyond its capped targets' room, for targets it has no cap for
/// yet, while there is work of such targets (see [`Uncapped`]).
const UNCAPPED_PER_CLAIM: usize = 16;
/// How often the work stream's subjects are counted to learn whether targets without a
/// cap have work (ms).
const UNCAPPED_EVERY: Millis = 100;
/// Compare-and-set writes of a job record tried before giving up on a busy record.
const WRITE_TRIES: usize = 5;
/// Headers of a new job's work message carrying its record as created, and that
/// record's revision: its first delivery claims the job over that revision without
/// reading the record (a changed record fails the claim, which then reads it). Records
/// larger than [`CARRIED_MAX`] bytes are not carried.
const RECORD_HEADER: &str = "Knocker-Record";
const REVISION_HEADER: &str = "Knocker-Record-Revision";
const CARRIED_MAX: usize = 16 * 1024;

/// How the engine is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsOptions {
    pub url: String,
    /// Jobs waiting or in flight above which submissions are refused (503).
    pub max_pending: u64,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// How long a claimed job may go without word from its control plane before another
    /// one gets it.
    pub ack_wait: Duration,
}

/// A job record as stored.
#[derive(Serialize, Deserialize, Clone)]
struct Record {
    job: Job,
    /// Earlier versions: the stream sequence of the work message that owns the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    msg_seq: Option<u64>,
    /// The job's place in arrival order: the revision its record was created at (kept
    /// from its first claim on; while unclaimed, it is the record's own revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    order: Option<u64>,
    /// The stream sequence of the work message whose delivery claimed the job last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claimed_by: Option<u64>,
}

impl Record {
    fn new(job: Job) -> Self {
        Self {
            job,
            msg_seq: None,
            order: None,
            claimed_by: None,
        }
    }

    /// Where the job sorts among jobs accepted in the same millisecond.
    fn place(&self) -> u64 {
        self.msg_seq.or(self.order).unwrap_or(u64::MAX)
    }
}

/// A claimed message, held until its job's outcome is recorded.
struct Held {
    message: Message,
    /// The job's target (host:port), to leave it out of the target's backlog.
    host: String,
    /// Lane heads only: when the held job is due again (its holder retries it).
    due: Option<Millis>,
    /// Set once the message is answered (acknowledged or sent back), under this lock,
    /// so that no progress report follows the answer: the server would take a progress
    /// report after a NAK with a delay as "still working" and redeliver only after the
    /// whole ack wait.
    answered: Arc<tokio::sync::Mutex<bool>>,
    /// The record as this claim wrote it, and its revision: its outcome is recorded
    /// without reading it again, unless it changed meanwhile (deleted while in flight).
    claim: Option<(Record, u64)>,
}

impl Held {
    fn new(message: Message, host: String, due: Option<Millis>) -> Self {
        Self {
            message,
            host,
            due,
            answered: Arc::default(),
            claim: None,
        }
    }

    /// Answers the server for this message: `None` acknowledges it; `Some(kind)` sends
    /// that answer.
    async fn answer(self, kind: Option<AckKind>) -> Result<(), StoreError> {
        let mut answered = self.answered.lock().await;
        *answered = true;
        match kind {
            None => self.message.ack().await,
            Some(kind) => self.message.ack_with(kind).await,
        }
        .map_err(unavailable)
    }

    /// Tells the server the message is still being worked on, unless it was answered.
    async fn keep(message: &Message, answered: &tokio::sync::Mutex<bool>) {
        let answered = answered.lock().await;
        if !*answered {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

pub struct NatsStore {
    js: jetstream::Context,
    jobs: kv::Store,
    delivered: kv::Store,
    failed: kv::Store,
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

/// Whether targets without a cap have work: only then does a claim pull
/// [`UNCAPPED_PER_CLAIM`] messages beyond its capped targets' room. When all the work is
/// the capped targets', each of those messages would only be sent back, to be delivered
/// again and its record read (in a drain to one target, 16 of every 79 messages pulled).
#[derive(Default)]
struct Uncapped {
    /// What the last count of the work stream's subjects, or a pull since, found.
    found: bool,
    /// When the subjects were last counted (ms).
    counted: Millis,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

/// The key of a job id: `j` + the id in hex (any id, valid as a key, prefixes kept).
pub(crate) fn key(id: &str) -> String {
    // By hand: a `format!` per byte was a string allocated and formatted per character
    // of every id, several times per job (3% of the control plane's CPU in a drain).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = String::with_capacity(1 + id.len() * 2);
    k.push('j');
    for b in id.bytes() {
        k.push(char::from(HEX[usize::from(b >> 4)]));
        k.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    k
}

fn id_of(key: &str) -> Option<String> {
    let hex = key.strip_prefix('j')?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// FNV-1a: a stable name for a lane's or a target's subject (and a lane's consumer).
fn subject_hash(lane: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lane.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn subject_of(job: &Job) -> String {
    match &job.lane {
        Some(lane) => format!("knocker.lane.{}", subject_hash(lane)),
        None => target_subject(job.host()),
    }
}

/// The subject of a target's work messages.
fn target_subject(host: &str) -> String {
    format!("knocker.work.{}", subject_hash(host))
}

fn now_ms() -> Millis {
    SystemClock.now_ms()
}

impl NatsStore {
    pub async fn open(options: NatsOptions) -> Result<Self, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .name("knocker")
            .connect(options.url.as_str())
            .await
            .map_err(|e| StoreError::Unavailable(format!("KNOCKER_STORE {}: {e}", options.url)))?;
        let js = jetstream::new(client);
        let jobs = open_bucket(&js, JOBS, Duration::ZERO).await?;
        let delivered = open_bucket(&js, DELIVERED, options.retention).await?;
        let failed = open_bucket(&js, FAILED, options.retention).await?;
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
        let mut stream = js
            .get_or_create_stream(config.clone())
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
            delivered,
            failed,
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

    async fn read(
        &self,
        bucket: &kv::Store,
        id: &str,
    ) -> Result<Option<(Record, u64)>, StoreError> {
        let Some(entry) = bucket.entry(key(id)).await.map_err(unavailable)? else {
            return Ok(None);
        };
        if entry.value.is_empty() || !matches!(entry.operation, kv::Operation::Put) {
            return Ok(None);
        }
        let mut record: Record = serde_json::from_slice(&entry.value)
            .map_err(|e| unavailable(format!("job record {id} unreadable: {e}")))?;
        record.order.get_or_insert(entry.revision);
        Ok(Some((record, entry.revision)))
    }

    /// The job, wherever it is: open, delivered or failed.
    async fn find(&self, id: &str) -> Result<Option<Record>, StoreError> {
        for bucket in [&self.jobs, &self.delivered, &self.failed] {
            if let Some((record, _)) = self.read(bucket, id).await? {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    async fn write(&self, bucket: &kv::Store, record: &Record) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        bucket
            .put(key(&record.job.id), value.into())
            .await
            .map_err(unavailable)
    }

    /// Writes `record` only over the revision it was read at: `None` when another writer
    /// came first (the caller reads again and decides).
    async fn write_if(
        &self,
        bucket: &kv::Store,
        record: &Record,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        match bucket
            .update(key(&record.job.id), value.into(), revision)
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Writes a held job's open record back, changed by `change`, over the revision it
    /// was read at (`read`, or read here), so that a job deleted between the read and the
    /// write is not brought back; a record changed otherwise meanwhile is read again.
    /// The record as written, or `None` when the job is gone.
    async fn rewrite_open(
        &self,
        id: &str,
        mut read: Option<(Record, u64)>,
        change: impl Fn(&mut Record),
    ) -> Result<Option<Record>, StoreError> {
        for _ in 0..WRITE_TRIES {
            let found = match read.take() {
                Some(found) => Some(found),
                None => self.read(&self.jobs, id).await?,
            };
            let Some((mut record, revision)) = found else {
                return Ok(None);
            };
            change(&mut record);
            if self
                .write_if(&self.jobs, &record, revision)
                .await?
                .is_some()
            {
                return Ok(Some(record));
            }
        }
        Err(unavailable(format!("job record {id} kept changing")))
    }

    /// Answers the message of a held job that is gone (deleted while in flight): nothing
    /// is left to attempt or record.
    async fn drop_held(&self, id: &str) {
        let held = self.held.lock().remove(id);
        if let Some(h) = held {
            let _ = h.answer(Some(AckKind::Ack)).await;
        }
    }

    /// Publishes the job's work message (`msg_id` makes a second publish within the
    /// duplicate window a no-op) and waits for the server to have stored it. `created` is
    /// the record as just created and its revision, carried for the first claim.
    async fn publish(
        &self,
        job: &Job,
        msg_id: String,
        created: Option<(&[u8], u64)>,
    ) -> Result<(), StoreError> {
        let mut message = PublishMessage::build()
            .payload(job.id.clone().into_bytes().into())
            .message_id(msg_id);
        let carried = created
            .filter(|(value, _)| value.len() <= CARRIED_MAX)
            .and_then(|(value, revision)| {
                let value = std::str::from_utf8(value).ok()?;
                Some((value.parse::<async_nats::HeaderValue>().ok()?, revision))
            });
        if let Some((value, revision)) = carried {
            message = message
                .header(RECORD_HEADER, value)
                .header(REVISION_HEADER, revision.to_string());
        }
        self.js
            .send_publish(subject_of(job), message)
            .await
            .map_err(unavailable)?
            .await
            .map_err(|e| {
                if is_stream_full(&e) {
                    StoreError::Full(self.options.max_pending)
                } else {
                    unavailable(e)
                }
            })?;
        Ok(())
    }

    /// The job already stored under `id`, open or finished, if any. A resubmission of a
    /// job no message has claimed yet publishes its work message again, under the same
    /// message id (stored once within the duplicate window): its first submission may
    /// have died before publishing.
    async fn resubmitted(&self, id: &str) -> Result<Option<Job>, StoreError> {
        if let Some((record, _)) = self.read(&self.jobs, id).await? {
            let unclaimed = record.msg_seq.is_none() && record.claimed_by.is_none();
            if unclaimed && record.job.state == State::Pending {
                self.publish(&record.job, id.to_owned(), None).await?;
            }
            return Ok(Some(record.job));
        }
        for bucket in [&self.delivered, &self.failed] {
            if let Some((record, _)) = self.read(bucket, id).await? {
                return Ok(Some(record.job));
            }
        }
        Ok(None)
    }

    /// Records a finished outcome from the open record at `revision`: the one this control
    /// plane's claim wrote (no read), or the one just read. The finished record is written,
    /// then the open one removed only if it is still at that revision (one request each,
    /// in that order: a job is never without a record). When the open record changed
    /// meanwhile:
    /// - gone without a trace (deleted while in flight): it leaves no finished record
    ///   either;
    /// - a delete marker (the job was finished already: by an earlier try of this outcome
    ///   whose answer was lost, or by another control plane that claimed it again): the
    ///   finished record stays;
    /// - a newer record (claimed again, its message having come back to another control
    ///   plane): the record is left to that claim, whose outcome overwrites this one.
    ///
    /// The removal is a delete marker, not a purge: the bucket keeps one message per key,
    /// so the marker replaces the record either way, but a purge makes the server look
    /// for the key's earlier messages through the bucket's blocks (9% of its CPU in a
    /// drain of 120,000 jobs: 5 of its 60 µs per job).
    async fn finish(
        &self,
        mut record: Record,
        revision: u64,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError> {
        let id = record.job.id.clone();
        record.job.finished_at = Some(attempt.at);
        record.job.attempts.push(attempt);
        let bucket = match next {
            Next::Failed { callback } => {
                record.job.state = State::Failed;
                if let Some(callback) = callback {
                    self.insert(*callback).await?;
                }
                &self.failed
            }
            _ => {
                record.job.state = State::Delivered;
                &self.delivered
            }
        };
        self.write(bucket, &record).await?;
        match self
            .jobs
            .delete_expect_revision(key(&id), Some(revision))
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
                let entry = self.jobs.entry(key(&id)).await.map_err(unavailable)?;
                if entry.is_none_or(|e| e.operation == kv::Operation::Purge) {
                    remove(bucket, &id).await?; // deleted while in flight
                }
            }
            Err(e) => return Err(unavailable(e)),
        }
        let held = self.held.lock().remove(&id);
        if let Some(h) = held {
            h.answer(None).await?;
        }
        Ok(())
    }

    /// Removes the markers finished jobs left in the open-jobs bucket before
    /// `before` (their finished records have passed the same age limit by then), so the
    /// bucket holds open jobs and recent markers, not one marker per job ever finished.
    /// The markers are what tells a used id from a new one; past retention an id is new
    /// again, as in the embedded store. The bucket is read in order (headers only) up to
    /// the first entry not older than `before`. Markers before the first record in flight
    /// go with one purge of the stream per batch; those after it with a purge of their key
    /// up to their own sequence, so a record created on the key since is kept. How many
    /// went.
    async fn sweep_markers(&self, before: Millis) -> Result<u64, StoreError> {
        let stream = &self.jobs.stream;
        let state = stream.get_info().await.map_err(unavailable)?.state;
        let mut removed = 0;
        let mut from = state.first_sequence;
        let mut open_seen = false;
        while state.messages > 0 && from <= state.last_sequence {
            // A purge moves the stream's consumers on, so each batch is read by a reader
            // of its own from where the last one ended: ephemeral, unacknowledged, headers
            // only, and without a subject filter (a filtered one makes the server count
            // its pending entries through the whole stream).
            let reader: Consumer<PullConfig> = stream
                .create_consumer(PullConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ack_policy: AckPolicy::None,
                    headers_only: true,
                    inactive_threshold: Duration::from_secs(60),
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            let batch = fetch(&reader, SWEEP_BATCH).await;
            let _ = stream.delete_consumer(&reader.cached_info().name).await;
            let batch = batch?;
            // An open record this old (a job retrying for longer than the retention) is
            // written again, so that it moves past the markers (unless it is in flight).
            // While every entry read so far is a marker, they all go with one purge of the
            // stream up to there (the stream holds this bucket only; a purge without a
            // subject filter drops whole blocks, one with a filter cost the server ~60 µs
            // an entry); markers after an open record go one by one (~120 µs each).
            let mut below = None;
            let mut markers = Vec::new();
            let mut done = batch.is_empty();
            for entry in &batch {
                let info = entry.info().map_err(unavailable)?;
                let seq = info.stream_sequence;
                if info.published.unix_timestamp_nanos() / 1_000_000 >= i128::from(before) {
                    done = true;
                    break;
                }
                let marker = entry
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| matches!(op.as_str(), "PURGE" | "DEL"));
                // Past a record in flight nothing goes in bulk: nothing to move either.
                let open = !marker && (open_seen || self.stays_at(&entry.subject, seq).await?);
                match (marker, open_seen) {
                    (true, true) => markers.push((entry.subject.to_string(), seq)),
                    (_, false) if !open => below = Some(seq + 1),
                    _ => open_seen = true,
                }
                removed += u64::from(marker);
                from = seq + 1;
                done |= info.pending == 0;
            }
            if let Some(below) = below {
                stream.purge().sequence(below).await.map_err(unavailable)?;
            }
            let mut purges = futures_util::stream::iter(markers)
                .map(|(subject, seq)| async move {
                    stream.purge().filter(subject).sequence(seq + 1).await
                })
                .buffer_unordered(SWEEP_CONCURRENCY);
            while let Some(purged) = purges.next().await {
                purged.map_err(unavailable)?;
            }
            if done {
                break;
            }
        }
        Ok(removed)
    }

    /// Whether the open record on `subject` is still at `seq` after the sweep tried to
    /// move it: a record not in flight is written again over that revision (a claim that
    /// races it sees another writer came first, as with any concurrent write). `false`
    /// when it is gone or has moved since.
    async fn stays_at(&self, subject: &str, seq: u64) -> Result<bool, StoreError> {
        let Some(id) = subject
            .strip_prefix(self.jobs.prefix.as_str())
            .and_then(id_of)
        else {
            return Ok(true); // not a job's key: left where it is
        };
        match self.read(&self.jobs, &id).await? {
            Some((record, revision)) if revision == seq => {
                if record.job.state == State::InFlight {
                    return Ok(true);
                }
                Ok(self
                    .write_if(&self.jobs, &record, revision)
                    .await?
                    .is_none()
                    && self
                        .read(&self.jobs, &id)
                        .await?
                        .is_some_and(|(_, now)| now == seq))
            }
            _ => Ok(false),
        }
    }

    /// Creates the lane's consumer once (one message in flight, in order).
    async fn lane_consumer(&self, hash: &str) -> Result<Consumer<PullConfig>, StoreError> {
        if let Some(c) = self.lanes.lock().get(hash) {
            return Ok(c.clone());
        }
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let name = format!("lane-{hash}");
        let consumer = stream
            .get_or_create_consumer(
                &name,
                PullConfig {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("knocker.lane.{hash}"),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 1,
                    // A lane nobody pulls from for an hour has no open jobs left.
                    inactive_threshold: Duration::from_secs(3600),
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        self.lanes.lock().insert(hash.to_owned(), consumer.clone());
        Ok(consumer)
    }

    /// [`Self::take`], and a message it could not take (the server did not answer) is
    /// given back at once, to be delivered again, rather than left for the ack wait; the
    /// jobs taken before it are still returned, or they would be held and never attempted.
    async fn take_or_return(
        &self,
        message: Message,
        now: Millis,
        caps: Option<(&HostCaps, &Mutex<HashMap<String, usize>>)>,
        lane: bool,
    ) -> Option<Job> {
        let back = message.clone();
        match self.take(message, now, caps, lane).await {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(error = %e, "a work message could not be taken; given back");
                let _ = back.ack_with(AckKind::Nak(None)).await;
                None
            }
        }
    }

    /// Takes a delivered message: the job to attempt, or `None` when the message is
    /// stale (acknowledged and dropped), not due yet (NAK'd until it is), or the job is
    /// being attempted already (here, or by a control plane that claimed it first).
    async fn take(
        &self,
        message: Message,
        now: Millis,
        caps: Option<(&HostCaps, &Mutex<HashMap<String, usize>>)>,
        lane: bool,
    ) -> Result<Option<Job>, StoreError> {
        let id = String::from_utf8_lossy(&message.payload).into_owned();
        let seq = message.info().map(|i| i.stream_sequence).ok();
        let ours = {
            // Ours already: the server sent it again (a progress report came late). The
            // attempt goes on; answers go to this, the newest delivery.
            let mut held = self.held.lock();
            held.get_mut(&id).map(|h| {
                let same = h.message.info().map(|i| i.stream_sequence).ok() == seq;
                if same && h.due.is_none() {
                    h.message = message.clone();
                }
                same
            })
        };
        match ours {
            Some(true) => return Ok(None),
            // Another message of a job we hold: the one we hold stays.
            Some(false) => {
                let _ = message.ack().await;
                return Ok(None);
            }
            None => {}
        }
        // A first delivery carries the record as created: the claim below is written over
        // its revision, so a record changed since (claimed, deleted) fails it and is read.
        let carried = if lane { None } else { carried(&message, &id) };
        let read = match carried {
            Some(carried) => Some(carried),
            None => self.read(&self.jobs, &id).await?,
        };
        let Some((mut record, mut revision)) = read else {
            let _ = message.ack().await; // deleted or finished meanwhile
            return Ok(None);
        };
        let mut tries = 0;
        loop {
            if record.msg_seq.is_some() && seq.is_some() && record.msg_seq != seq {
                let _ = message.ack().await; // not the message an earlier version named
                return Ok(None);
            }
            if record.job.is_finished() {
                let _ = message.ack().await;
                return Ok(None);
            }
            if record.job.state == State::InFlight
                && record.claimed_by.is_some()
                && seq.is_some()
                && record.claimed_by != seq
            {
                // Another message of this job claimed it; that one stays until the job's
                // outcome (its holder answers it, or it comes again if the holder died).
                let _ = message.ack().await;
                return Ok(None);
            }
            let job = &mut record.job;
            if lane && job.next_attempt_at == PARKED {
                job.next_attempt_at = now; // the lane's head: its turn now
            }
            let over_cap =
                caps.is_some_and(|(caps, taken)| !caps.take(&mut taken.lock(), job.host()));
            if !lane && over_cap {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                    .await;
                return Ok(None);
            }
            if job.next_attempt_at > now {
                let wait = Duration::from_millis(job.next_attempt_at - now);
                if lane {
                    // The head stays with us until it is due (its previous holder died).
                    // Nothing is written: its claim, when due, reads the record again.
                    let host = record.job.host().to_owned();
                    let due = Some(record.job.next_attempt_at);
                    self.held.lock().insert(id, Held::new(message, host, due));
                } else {
                    let _ = message.ack_with(nak(wait)).await;
                }
                return Ok(None);
            }
            record.job.state = State::InFlight;
            record.claimed_by = seq.or(record.claimed_by);
            if let Some(written) = self.write_if(&self.jobs, &record, revision).await? {
                revision = written;
                break;
            }
            // Another writer came first: the submitter recording this message, or another
            // control plane that was sent an earlier delivery of it and claimed the job
            // (its progress reports keep the message; this delivery is left unanswered).
            tries += 1;
            let Some((fresh, r)) = self.read(&self.jobs, &id).await? else {
                let _ = message.ack().await;
                return Ok(None);
            };
            let theirs = fresh.claimed_by.is_some() && fresh.claimed_by != seq;
            if fresh.job.state == State::InFlight && theirs && seq.is_some() {
                let _ = message.ack().await; // claimed through another message of the job
                return Ok(None);
            }
            if fresh.job.state == State::InFlight || tries >= WRITE_TRIES {
                return Ok(None);
            }
            (record, revision) = (fresh, r);
        }
        let host = record.job.host().to_owned();
        let job = record.job.clone();
        let mut held = Held::new(message, host, None);
        held.claim = Some((record, revision));
        self.held.lock().insert(id, held);
        Ok(Some(job))
    }

    /// Claims into `claimed`: lane heads we hold that are due, then work messages, then
    /// the heads of other lanes.
    async fn claim_into(
        &self,
        claimed: &mut Vec<Job>,
        now: Millis,
        limit: usize,
        caps: &HostCaps,
    ) -> Result<(), StoreError> {
        let taken = Mutex::new(HashMap::new());
        // Lane heads we hold whose retry is due.
        let due_heads: Vec<String> = self
            .held
            .lock()
            .iter()
            .filter(|(_, h)| h.due.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due_heads {
            if claimed.len() >= limit {
                break;
            }
            let in_flight = |record: &mut Record| record.job.state = State::InFlight;
            match self.rewrite_open(&id, None, in_flight).await? {
                Some(record) => {
                    if let Some(h) = self.held.lock().get_mut(&id) {
                        h.due = None;
                    }
                    claimed.push(record.job);
                }
                // Deleted meanwhile (through any control plane): the lane goes on.
                None => self.drop_held(&id).await,
            }
        }
        // No more than the capped targets have room for, and a few for targets without a
        // cap while they have work (see [`Uncapped`]): a message pulled over its target's
        // cap is only sent back. A target's subject names it: the capped targets by
        // subject serve the count of that work and the pull below.
        let capped: HashMap<String, &str> = caps
            .hosts()
            .map(|(host, _)| (target_subject(host), host))
            .collect();
        let mut room = limit.saturating_sub(claimed.len());
        if !capped.is_empty() {
            let room_of_caps = caps
                .hosts()
                .fold(0, |sum: usize, (_, n)| sum.saturating_add(n));
            let extra = if self.uncapped_work(now, &capped).await {
                UNCAPPED_PER_CLAIM
            } else {
                0
            };
            room = room.min(room_of_caps.saturating_add(extra));
        }
        if room > 0 {
            // Each take is a few round trips to the server: run them side by side.
            let mut messages = pull(&self.work, room).await?;
            if messages.len() < room {
                // Not `?`: the messages pulled above must be taken or given back.
                match self.pull_legacy(now, room - messages.len()).await {
                    Ok(more) => messages.extend(more),
                    Err(e) => tracing::warn!(error = %e, "cannot pull earlier versions' work"),
                }
            }
            // A capped target's messages over its cap go back before their records are
            // read; only earlier versions' messages, all on one subject, are counted once
            // their record says where they go.
            if messages
                .iter()
                .any(|m| !capped.contains_key(m.subject.as_str()))
            {
                self.uncapped.lock().found = true;
            }
            let mut ready = Vec::new();
            for message in newest_deliveries(messages) {
                match capped.get(message.subject.as_str()) {
                    Some(host) if !caps.take(&mut taken.lock(), host) => {
                        let wait = Some(Duration::from_millis(100));
                        let _ = message.ack_with(AckKind::Nak(wait)).await;
                    }
                    _ => ready.push(message),
                }
            }
            let mut takes = futures_util::stream::iter(ready)
                .map(|m| {
                    let legacy = m.subject.as_str() == LEGACY_SUBJECT;
                    let caps = legacy.then_some((caps, &taken));
                    self.take_or_return(m, now, caps, false)
                })
                .buffer_unordered(64);
            while let Some(taken) = takes.next().await {
                claimed.extend(taken);
            }
        }
        for hash in self.lane_hashes(now).await? {
            if claimed.len() >= limit {
                break;
            }
            let consumer = self.lane_consumer(&hash).await?;
            let messages = pull(&consumer, 1).await?;
            for message in messages {
                let id = String::from_utf8_lossy(&message.payload).into_owned();
                if self.held.lock().contains_key(&id) {
                    continue; // ours already (redelivered after a progress gap)
                }
                claimed.extend(self.take_or_return(message, now, None, true).await);
            }
        }
        Ok(())
    }

    /// Whether targets not in `capped` (by subject) have work on the stream: counted at
    /// most every [`UNCAPPED_EVERY`] ms, and known at once when a pull brings some. Work
    /// of earlier versions counts (its target is only known once its record is read);
    /// when the count fails, they are assumed to.
    async fn uncapped_work(&self, now: Millis, capped: &HashMap<String, &str>) -> bool {
        if self.legacy.lock().is_some() {
            return true;
        }
        {
            let mut uncapped = self.uncapped.lock();
            let fresh = now < uncapped.counted + UNCAPPED_EVERY && uncapped.counted <= now;
            if fresh {
                return uncapped.found;
            }
            uncapped.counted = now;
        }
        let found = self.work_beyond(capped).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot count the work stream's subjects");
            true
        });
        self.uncapped.lock().found = found;
        found
    }

    /// Whether the work stream holds messages on a target subject not in `capped`: read
    /// up to the first one (the server lists the subjects in pages).
    async fn work_beyond(&self, capped: &HashMap<String, &str>) -> Result<bool, StoreError> {
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let mut subjects = stream
            .info_with_subjects(WORK_SUBJECTS)
            .await
            .map_err(unavailable)?;
        while let Some(subject) = subjects.next().await {
            let (subject, count) = subject.map_err(unavailable)?;
            if count > 0 && !capped.contains_key(&subject) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Work an earlier version left on `knocker.work`, while there is any: once a pull
    /// finds nothing and the subject is empty, it is not pulled from, only looked at
    /// every 10 s (a control plane of an earlier version may still be publishing there
    /// during an upgrade).
    async fn pull_legacy(&self, now: Millis, n: usize) -> Result<Vec<Message>, StoreError> {
        let legacy = self.legacy.lock().clone();
        let messages = match &legacy {
            Some(consumer) => pull(consumer, n).await?,
            None => Vec::new(),
        };
        if !messages.is_empty() {
            return Ok(messages);
        }
        let every = if legacy.is_some() { 1_000 } else { 10_000 };
        let look = {
            let mut checked = self.legacy_checked.lock();
            let look = now >= *checked + every || now < *checked;
            if look {
                *checked = now;
            }
            look
        };
        if look {
            let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
            let left = subject_count(&stream, LEGACY_SUBJECT).await?;
            match (left, legacy.is_some()) {
                (0, true) => *self.legacy.lock() = None,
                (1.., false) => {
                    let c = consumer(&stream, LEGACY_CONSUMER, LEGACY_SUBJECT, &self.options);
                    *self.legacy.lock() = Some(c.await?);
                }
                _ => {}
            }
        }
        Ok(messages)
    }

    /// Lane heads to pull: the lanes with messages, at most every 200 ms.
    async fn lane_hashes(&self, now: Millis) -> Result<Vec<String>, StoreError> {
        {
            let mut listed = self.lanes_listed.lock();
            if now < *listed + 200 && *listed <= now {
                return Ok(Vec::new());
            }
            *listed = now;
        }
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let mut subjects = stream
            .info_with_subjects(LANE_SUBJECTS)
            .await
            .map_err(unavailable)?;
        let mut hashes = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(unavailable)?;
            if let Some(hash) = subject.strip_prefix("knocker.lane.") {
                hashes.push(hash.to_owned());
            }
        }
        Ok(hashes)
    }
}

/// Sends a message back to be delivered again after `wait`. A zero delay is sent as a
/// plain NAK: nats-server 2.9 left a NAK with `delay: 0` undelivered until the ack wait
/// ran out (found by the shared-circuit test, where a parked job's retry is due at once).
/// The record a new job's work message carries, and its revision, on the message's first
/// delivery only (a message delivered again has seen its record change, or may have).
fn carried(message: &Message, id: &str) -> Option<(Record, u64)> {
    if message.info().ok()?.delivered != 1 {
        return None;
    }
    let headers = message.headers.as_ref()?;
    let revision = headers.get(REVISION_HEADER)?.as_str().parse().ok()?;
    let mut record: Record = serde_json::from_str(headers.get(RECORD_HEADER)?.as_str()).ok()?;
    if record.job.id != id {
        return None;
    }
    record.order.get_or_insert(revision);
    Some((record, revision))
}

fn nak(wait: Duration) -> AckKind {
    if wait.is_zero() {
        AckKind::Nak(None)
    } else {
        AckKind::Nak(Some(wait))
    }
}

/// The durable consumer every control plane pulls `subject`'s work from.
async fn consumer(
    stream: &jetstream::stream::Stream,
    name: &str,
    subject: &str,
    options: &NatsOptions,
) -> Result<Consumer<PullConfig>, StoreError> {
    stream
        .get_or_create_consumer(
            name,
            PullConfig {
                durable_name: Some(name.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| unavailable(format!("consumer {name}: {e}")))
}

/// How many messages the work stream holds on exactly `subject`.
async fn subject_count(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<u64, StoreError> {
    let mut subjects = stream
        .info_with_subjects(subject)
        .await
        .map_err(unavailable)?;
    let mut n = 0;
    while let Some(entry) = subjects.next().await {
        let (name, count) = entry.map_err(unavailable)?;
        if name == subject {
            n += count as u64;
        }
    }
    Ok(n)
}

/// Up to `n` messages that are there now, waiting at most [`PULL_WAIT`] for the first.
///
/// A claim waits for the answer at most four times that. A request is never abandoned,
/// though: a message the server hands to a request its client has stopped reading is
/// lost to everyone until the ack wait runs out (cutting pulls short at 200 ms once left a
/// parked target's job 30 s late), and nats-server 2.9 at times answers a request only
/// seconds after its expiry. So the request runs on in its own task, and what it brings
/// after the claim has moved on is given back at once.
async fn pull(consumer: &Consumer<PullConfig>, n: usize) -> Result<Vec<Message>, StoreError> {
    let consumer = consumer.clone();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(Ok(late)) = tx.send(fetch(&consumer, n).await) {
            give_back(late).await;
        }
    });
    match tokio::time::timeout(PULL_WAIT * 4, &mut rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(unavailable("a pull ended without an answer")),
        Err(_) => {
            // Too slow for this claim; what came just now is still taken.
            rx.close();
            match rx.try_recv() {
                Ok(result) => result,
                Err(_) => Ok(Vec::new()),
            }
        }
    }
}

/// One pull request, read until the server ends it (`n` messages, or [`PULL_WAIT`]).
///
/// A plain request, not a "no wait" one: nats-server 2.9 answers a no-wait request at
/// once with "408 Requests Pending" while another control plane's bigger request waits,
/// so one control plane took all the work and the other none.
async fn fetch(consumer: &Consumer<PullConfig>, n: usize) -> Result<Vec<Message>, StoreError> {
    let mut batch = consumer
        .batch()
        .max_messages(n)
        .expires(PULL_WAIT)
        .messages()
        .await
        .map_err(unavailable)?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            // What came is kept (taken or given back); the rest comes again.
            Err(e) if !messages.is_empty() => {
                tracing::debug!(error = %e, "a pull ended early");
                break;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    Ok(messages)
}

/// One delivery per message: a pull can bring the same message twice (sent back, or its
/// ack wait over, while an earlier delivery was on its way); the newest delivery is the
/// one the server answers to, the older ones are left unanswered. In pull order.
fn newest_deliveries(messages: Vec<Message>) -> Vec<Message> {
    let mut newest: HashMap<u64, (usize, i64)> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        if let Ok(info) = m.info() {
            let slot = newest
                .entry(info.stream_sequence)
                .or_insert((i, info.delivered));
            if info.delivered >= slot.1 {
                *slot = (i, info.delivered);
            }
        }
    }
    messages
        .into_iter()
        .enumerate()
        .filter(|(i, m)| {
            m.info().map_or(true, |info| {
                newest.get(&info.stream_sequence).map(|s| s.0) == Some(*i)
            })
        })
        .map(|(_, m)| m)
        .collect()
}

/// Sends messages back to be delivered again at once (to any control plane).
async fn give_back(messages: Vec<Message>) {
    for m in messages {
        let _ = m.ack_with(AckKind::Nak(None)).await;
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
    js.get_or_create_stream(StreamConfig {
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
    })
    .await
    .map_err(|e| unavailable(format!("bucket {bucket}: {e}")))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| unavailable(format!("bucket {bucket}: {e}")))
}

/// Tells the server that held messages are still being worked on, so they are not
/// redelivered to another control plane while a long attempt or a lane head's retries
/// go on. Ends with the store.
async fn keep_alive(held: std::sync::Weak<Mutex<HashMap<String, Held>>>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(held) = held.upgrade() else { return };
        let messages: Vec<_> = held
            .lock()
            .values()
            .map(|h| (h.message.clone(), Arc::clone(&h.answered)))
            .collect();
        drop(held);
        for (message, answered) in messages {
            Held::keep(&message, &answered).await;
        }
    }
}

/// Jobs in the order they arrived: by acceptance time, then by their place (jobs accepted
/// together — a broadcast's members — share a time; their ids would sort `b.10` before
/// `b.2`).
fn in_arrival_order(mut records: Vec<Record>) -> impl Iterator<Item = Job> {
    records.sort_by(|a, b| {
        let order = |r: &Record| (r.job.created_at, r.place());
        order(a)
            .cmp(&order(b))
            .then_with(|| a.job.id.cmp(&b.job.id))
    });
    records.into_iter().map(|r| r.job)
}

/// Removes a key and every message it had, leaving no delete marker behind: the
/// finished buckets are counted by their messages ([`Store::stats`]), so a marker would
/// count as a job.
async fn remove(bucket: &kv::Store, id: &str) -> Result<(), StoreError> {
    bucket
        .stream
        .purge()
        .filter(format!("{}{}", bucket.prefix, key(id)))
        .await
        .map(|_| ())
        .map_err(unavailable)
}

/// The work stream refused a message for its message limit (`KNOCKER_MAX_PENDING`,
/// discard-new): the server answers with the stream-store-failed error code, whose
/// description is its `ErrMaxMsgs` (the limit has no code of its own). Any other store
/// failure — a full disk — is not back-pressure but the store being unavailable.
fn is_stream_full(e: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|js| {
            js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
                && js.to_string().contains("maximum messages")
        })
}

#[async_trait]
impl Store for NatsStore {
    async fn insert(&self, job: Job) -> Result<Inserted, StoreError> {
        let started = std::time::Instant::now();
        let mut job = job;
        if job.lane.is_some() {
            job.next_attempt_at = PARKED; // its lane's consumer says when it is its turn
        }
        let record = Record::new(job);
        let value: bytes::Bytes = serde_json::to_vec(&record).map_err(unavailable)?.into();
        // A key never used before (no message at all on its subject, not even the marker
        // a finished job leaves) is a new job: one request. Any other goes the long way.
        let created = match self
            .jobs
            .update(key(&record.job.id), value.clone(), 0)
            .await
        {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match self.resubmitted(&record.job.id).await? {
                    Some(existing) => return Ok(Inserted::Existing(Box::new(existing))),
                    None => match self.jobs.create(key(&record.job.id), value.clone()).await {
                        Ok(revision) => revision,
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                            // Created meanwhile by another submission.
                            return match self.find(&record.job.id).await? {
                                Some(r) => Ok(Inserted::Existing(Box::new(r.job))),
                                None => Err(unavailable("job vanished while being created")),
                            };
                        }
                        Err(e) => return Err(unavailable(e)),
                    },
                }
            }
            Err(e) => return Err(unavailable(e)),
        };
        let id = record.job.id.clone();
        let created = Some((&value[..], created));
        match self.publish(&record.job, id.clone(), created).await {
            Ok(()) => {
                crate::metrics::get().committed(1, started.elapsed());
                Ok(Inserted::Created)
            }
            Err(e) => {
                // No receipt is given: leave no record that looks accepted.
                let _ = self.jobs.purge(key(&id)).await;
                Err(e)
            }
        }
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
        let finished = matches!(next, Next::Delivered | Next::Failed { .. });
        let claim = finished
            .then(|| self.held.lock().get(&job.id).and_then(|h| h.claim.clone()))
            .flatten();
        let read = match claim {
            Some(claimed) => Some(claimed),
            None => self.read(&self.jobs, &job.id).await?,
        };
        let Some((record, revision)) = read else {
            // Deleted while in flight: nothing to record, the message is done.
            self.drop_held(&job.id).await;
            return Ok(());
        };
        match next {
            Next::Delivered | Next::Failed { .. } => {
                self.finish(record, revision, attempt, next).await?;
            }
            Next::Retry { at: due } => {
                let pending = |record: &mut Record| {
                    record.job.attempts.push(attempt.clone());
                    record.job.state = State::Pending;
                    record.job.next_attempt_at = due;
                };
                let written = self
                    .rewrite_open(&job.id, Some((record, revision)), pending)
                    .await?;
                if written.is_none() {
                    self.drop_held(&job.id).await;
                    return Ok(());
                }
                let released = {
                    let mut held = self.held.lock();
                    if job.lane.is_some() {
                        if let Some(h) = held.get_mut(&job.id) {
                            h.due = Some(due); // the head stays with us: the lane waits
                            h.claim = None; // its record moved on: read it again
                        }
                        None
                    } else {
                        held.remove(&job.id)
                    }
                };
                if let Some(h) = released {
                    let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                    h.answer(Some(nak(wait))).await?;
                }
            }
        }
        Ok(())
    }

    async fn release(&self, job: &Job) -> Result<(), StoreError> {
        let pending = |record: &mut Record| record.job.state = State::Pending;
        if self.rewrite_open(&job.id, None, pending).await?.is_none() {
            self.drop_held(&job.id).await;
            return Ok(());
        }
        // Its target is parked: asked again in a second (a lane keeps its head).
        let again = Duration::from_secs(1);
        let released = {
            let mut held = self.held.lock();
            if job.lane.is_some() {
                if let Some(h) = held.get_mut(&job.id) {
                    h.due = Some(now_ms() + again.as_millis() as Millis);
                    h.claim = None;
                }
                None
            } else {
                held.remove(&job.id)
            }
        };
        if let Some(h) = released {
            h.answer(Some(AckKind::Nak(Some(again)))).await?;
        }
        Ok(())
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
        // The finished buckets remove their records themselves (max age = retention);
        // what a finished job leaves in the open-jobs bucket goes here.
        self.sweep_markers(before).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::test_job;
    use crate::store::nats_tests::{attempt, claim_n, NatsServer};

    /// A server set up by an earlier version: one work subject for every target, its
    /// consumer, and a job waiting there.
    async fn earlier_version_with_a_job(server: &NatsServer, job: &Job) {
        let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
        let stream = js
            .get_or_create_stream(StreamConfig {
                name: WORK.to_owned(),
                subjects: vec![LEGACY_SUBJECT.to_owned(), LANE_SUBJECTS.to_owned()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
        let options = NatsOptions {
            url: server.url.clone(),
            max_pending: 1000,
            retention: Duration::from_secs(60),
            ack_wait: Duration::from_secs(30),
        };
        consumer(&stream, LEGACY_CONSUMER, LEGACY_SUBJECT, &options)
            .await
            .unwrap();
        earlier_version_submits(server, job).await;
    }

    /// A job submitted by a control plane of an earlier version.
    async fn earlier_version_submits(server: &NatsServer, job: &Job) {
        let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
        let jobs = open_bucket(&js, JOBS, Duration::ZERO).await.unwrap();
        // As an earlier version wrote it.
        let record = serde_json::json!({ "job": job, "msg_seq": null });
        jobs.put(key(&job.id), serde_json::to_vec(&record).unwrap().into())
            .await
            .unwrap();
        js.publish(LEGACY_SUBJECT, job.id.clone().into_bytes().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// A job of `id` due now.
    /// Whether `store` finds nothing to claim within 300 ms.
    async fn nothing_to_claim(store: &NatsStore) -> bool {
        claim_n(store, 1, Duration::from_millis(300))
            .await
            .is_empty()
    }

    fn due_job(id: &str) -> Job {
        let mut job = test_job(id, "POST", "http://t:1/p");
        job.next_attempt_at = now_ms();
        job
    }

    /// Messages this store's connection has sent so far (after a flush: an
    /// acknowledgement is sent without waiting).
    async fn sent(store: &NatsStore) -> u64 {
        store.js.client().flush().await.unwrap();
        let stats = store.js.client().statistics();
        stats
            .out_messages
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new job costs two messages to the server (its record, its work message) and its
    /// outcome three (the finished record, the open one's removal, the acknowledgement):
    /// no reads. A resubmission of its id, open or finished, goes the long way and finds it.
    #[tokio::test]
    async fn a_new_job_is_two_messages_to_the_server_and_its_outcome_three() {
        let server = NatsServer::start("round-trips");
        let store = server.store(Duration::from_secs(30)).await;
        let job = due_job("j");
        let before = sent(&store).await;
        assert!(matches!(
            store.insert(job.clone()).await.unwrap(),
            Inserted::Created
        ));
        assert_eq!(sent(&store).await - before, 2, "record and work message");
        assert!(matches!(
            store.insert(job.clone()).await.unwrap(),
            Inserted::Existing(_)
        ));
        let claimed = claim_n(&store, 1, Duration::from_secs(5)).await;
        assert_eq!(claimed.len(), 1);
        let before = sent(&store).await;
        store
            .finish_attempt(
                &claimed[0],
                crate::store::nats_tests::attempt(200),
                Next::Delivered,
            )
            .await
            .unwrap();
        assert_eq!(
            sent(&store).await - before,
            3,
            "finished record, removal, ack"
        );
        let found = store.get("j").await.unwrap().unwrap();
        assert_eq!(found.state, State::Delivered);
        assert_eq!(found.attempts.len(), 1);
        assert!(store.read(&store.jobs, "j").await.unwrap().is_none());
        // Finished: a resubmission is answered with it, and nothing is published.
        let again = store.insert(job).await.unwrap();
        assert!(matches!(again, Inserted::Existing(j) if j.state == State::Delivered));
        assert!(nothing_to_claim(&store).await);
        assert_eq!(store.stats().await.unwrap().pending, 0);
    }

    /// New due jobs, inserted and claimed.
    async fn claim_new(store: &NatsStore, ids: &[&str]) -> Vec<Job> {
        for id in ids {
            store.insert(due_job(id)).await.unwrap();
        }
        let claimed = claim_n(store, ids.len(), Duration::from_secs(5)).await;
        assert_eq!(claimed.len(), ids.len());
        claimed
    }

    /// The work messages still on the work stream (held ones included).
    async fn work_messages(store: &NatsStore) -> u64 {
        let mut stream = store.js.get_stream(WORK).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// An outcome can find the open record changed when it comes to remove it. A job
    /// deleted while in flight (its key purged) leaves no finished record; one whose key
    /// holds a delete marker was finished already (by an earlier try of this outcome
    /// whose answer was lost, or by another control plane that claimed it again), and its
    /// finished record stays: before, it was removed too, and a delivered job vanished.
    #[tokio::test]
    async fn an_outcome_over_a_changed_open_record_keeps_the_finished_record_only_if_the_job_was_finished(
    ) {
        let server = NatsServer::start("changed-open");
        let store = server.store(Duration::from_secs(30)).await;
        let claimed = claim_new(&store, &["deleted", "marked"]).await;
        assert!(store.delete("deleted", now_ms()).await.unwrap());
        store.jobs.delete(key("marked")).await.unwrap();
        for job in &claimed {
            store
                .finish_attempt(job, attempt(200), Next::Delivered)
                .await
                .unwrap();
        }
        assert!(
            store.get("deleted").await.unwrap().is_none(),
            "a job deleted while in flight leaves nothing"
        );
        let marked = store.get("marked").await.unwrap().expect("finished record");
        assert_eq!(marked.state, State::Delivered);
        assert_eq!(marked.attempts.len(), 1);
        assert_eq!(work_messages(&store).await, 0, "both messages answered");
    }

    /// The server refuses the finished record: the open record stays as it was (in
    /// flight, its attempt not counted), the message stays held, and the outcome tried
    /// again is recorded once. A job is never left without a record.
    #[tokio::test]
    async fn a_finished_record_the_server_refuses_leaves_the_job_open_and_held_for_the_retry() {
        let server = NatsServer::start("refused-finish");
        let store = server.store(Duration::from_secs(30)).await;
        let claimed = claim_new(&store, &["j"]).await;
        let delivered_limit = |size: i32| {
            let js = store.js.clone();
            async move {
                let mut stream = js.get_stream(format!("KV_{DELIVERED}")).await.unwrap();
                let mut config = stream.info().await.unwrap().config.clone();
                config.max_message_size = size;
                js.update_stream(config).await.unwrap();
            }
        };
        delivered_limit(16).await;
        let refused = store
            .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
            .await;
        assert!(refused.is_err(), "the finished record was refused");
        let (open, _) = store
            .read(&store.jobs, "j")
            .await
            .unwrap()
            .expect("the open record stays");
        assert_eq!(open.job.state, State::InFlight);
        assert!(open.job.attempts.is_empty() && open.job.finished_at.is_none());
        assert!(store.get("j").await.unwrap().is_some());
        assert_eq!(work_messages(&store).await, 1, "the message stays held");

        delivered_limit(-1).await;
        store
            .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
            .await
            .unwrap();
        let done = store.get("j").await.unwrap().expect("finished record");
        assert_eq!(done.state, State::Delivered);
        assert_eq!(done.attempts.len(), 1);
        assert!(store.read(&store.jobs, "j").await.unwrap().is_none());
        assert_eq!(work_messages(&store).await, 0);
    }

    /// A retry or a release writes the open record back over the revision it was read at:
    /// a job deleted between that read and the write stays deleted (written blindly, it
    /// came back pending and was attempted again), and a record changed otherwise is read
    /// again and written over.
    #[tokio::test]
    async fn a_record_read_before_its_job_was_deleted_is_not_written_back() {
        let server = NatsServer::start("rewrite-open");
        let store = server.store(Duration::from_secs(30)).await;
        claim_new(&store, &["deleted", "edited"]).await;
        let pending = |record: &mut Record| record.job.state = State::Pending;

        let stale = store.read(&store.jobs, "deleted").await.unwrap();
        assert!(store.delete("deleted", now_ms()).await.unwrap());
        let written = store.rewrite_open("deleted", stale, pending).await.unwrap();
        assert!(written.is_none());
        assert!(
            store.get("deleted").await.unwrap().is_none(),
            "stays deleted"
        );

        let stale = store.read(&store.jobs, "edited").await.unwrap();
        let (mut edited, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
        edited.job.request.url = "http://t:1/edited".into();
        store.write(&store.jobs, &edited).await.unwrap();
        let written = store.rewrite_open("edited", stale, pending).await.unwrap();
        assert_eq!(written.map(|r| r.job.state), Some(State::Pending));
        let (now, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
        assert_eq!(now.job.state, State::Pending);
        assert_eq!(
            now.job.request.url, "http://t:1/edited",
            "written over the edit"
        );
    }

    /// Two jobs on lane `L`, `h` then `n`: the head, `h`, claimed.
    async fn claim_lane_head(store: &NatsStore) -> Job {
        for id in ["h", "n"] {
            let mut job = due_job(id);
            job.lane = Some("L".into());
            store.insert(job).await.unwrap();
        }
        let mut head = claim_n(store, 1, Duration::from_secs(5)).await;
        assert_eq!(
            head.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["h"]
        );
        head.remove(0)
    }

    /// A lane's head waiting here for its retry, deleted meanwhile through another control
    /// plane (its key purged; this one still holds its message): when the retry is due,
    /// its message is answered and the lane goes on to its next job. Before, the head
    /// stayed held, kept alive, and the lane waited for ever.
    #[tokio::test]
    async fn a_lane_head_deleted_elsewhere_while_it_waits_for_its_retry_lets_the_lane_go_on() {
        let server = NatsServer::start("lane-deleted");
        let store = server.store(Duration::from_secs(30)).await;
        let head = claim_lane_head(&store).await;
        store
            .finish_attempt(&head, attempt(503), Next::Retry { at: now_ms() + 200 })
            .await
            .unwrap();
        remove(&store.jobs, "h").await.unwrap(); // what a delete elsewhere does
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = claim_n(&store, 1, Duration::from_secs(5)).await;
        assert_eq!(
            next.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["n"]
        );
        assert!(store.get("h").await.unwrap().is_none());
        assert!(!store.held.lock().contains_key("h"), "its message answered");
    }

    /// A lane's head whose holder died while it waited for its retry is taken over by
    /// another control plane and held there until it is due, without writing its record:
    /// a blind write of the record as read would bring back a job deleted meanwhile.
    /// When the retry is due, the head is claimed and attempted again.
    #[tokio::test]
    async fn a_lane_head_taken_over_before_its_retry_is_held_without_writing_its_record() {
        let server = NatsServer::start("lane-takeover");
        let one = server.store(Duration::from_secs(1)).await;
        let two = server.store(Duration::from_secs(1)).await;
        let head = claim_lane_head(&one).await;
        let due = now_ms() + 6000;
        one.finish_attempt(&head, attempt(503), Next::Retry { at: due })
            .await
            .unwrap();
        let revision = || async { two.read(&two.jobs, "h").await.unwrap().unwrap().1 };
        let before = revision().await;
        drop(one); // dies holding the head: after the ack wait its message goes to `two`
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !two.held.lock().contains_key("h") && tokio::time::Instant::now() < deadline {
            let claimed = claim_n(&two, 1, Duration::from_millis(100)).await;
            assert!(claimed.is_empty(), "nothing before the head's retry");
        }
        assert!(
            two.held.lock().get("h").is_some_and(|h| h.due == Some(due)),
            "the head is held until its retry"
        );
        assert_eq!(revision().await, before, "its record is not written");
        let retried = claim_n(&two, 1, Duration::from_secs(10)).await;
        assert_eq!(
            retried.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["h"]
        );
        assert_eq!(retried[0].attempts.len(), 1);
    }

    /// A new job's first delivery carries its record: claiming it is one write, over the
    /// revision the record was created at, no read. A record changed since (edited,
    /// deleted) fails that write and is read: the claim never runs on a stale copy.
    #[tokio::test]
    async fn a_first_delivery_claims_its_job_without_reading_it_and_never_from_a_stale_copy() {
        let server = NatsServer::start("carried");
        let store = server.store(Duration::from_secs(30)).await;
        let take_next = || async {
            let mut messages = pull(&store.work, 1).await.unwrap();
            assert_eq!(messages.len(), 1, "one work message");
            let message = messages.remove(0);
            let before = sent(&store).await;
            let taken = store.take(message, now_ms(), None, false).await.unwrap();
            (taken, sent(&store).await - before)
        };

        store.insert(due_job("new")).await.unwrap();
        let (taken, requests) = take_next().await;
        assert_eq!(taken.map(|j| j.state), Some(State::InFlight));
        assert_eq!(requests, 1, "the claim only");
        let (record, _) = store.read(&store.jobs, "new").await.unwrap().unwrap();
        assert_eq!(record.job.state, State::InFlight, "the claim is stored");

        store.insert(due_job("edited")).await.unwrap();
        let (mut record, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
        record.job.request.url = "http://t:1/edited".into();
        store.write(&store.jobs, &record).await.unwrap();
        let (taken, requests) = take_next().await;
        let taken = taken.expect("claimed from the stored record");
        assert_eq!(taken.request.url, "http://t:1/edited");
        assert_eq!(requests, 3, "the refused claim, the read, the claim");

        store.insert(due_job("deleted")).await.unwrap();
        assert!(store.delete("deleted", now_ms()).await.unwrap());
        let (taken, _) = take_next().await;
        assert!(taken.is_none(), "a deleted job is not attempted");
        assert!(store.read(&store.jobs, "deleted").await.unwrap().is_none());
        let mut stream = store.js.get_stream(WORK).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().state.messages,
            2,
            "the deleted job's message is answered; the two claimed are held"
        );
    }

    /// Retention sweeps the open-jobs bucket of the markers finished jobs left there,
    /// once they are past it; open jobs and recent markers stay. (A deleted job leaves
    /// none.)
    #[tokio::test]
    async fn retention_removes_the_markers_of_finished_jobs_from_the_open_bucket() {
        let server = NatsServer::start("markers");
        let store = server.store(Duration::from_secs(30)).await;
        let finish = |job: Job| {
            let store = &store;
            async move {
                store
                    .finish_attempt(&job, attempt(200), Next::Delivered)
                    .await
                    .unwrap()
            }
        };
        // A job waiting (a retry an hour away) older than the markers after it: it is
        // written again, so it does not hold up their purge. Then a marker with only
        // markers before it (they go with one purge of the stream), then one after an
        // open record in flight (it goes by its key).
        let mut waiting = due_job("waiting");
        waiting.next_attempt_at = now_ms() + 3_600_000;
        store.insert(waiting).await.unwrap();
        let (_, was_at) = store.read(&store.jobs, "waiting").await.unwrap().unwrap();
        store.insert(due_job("early")).await.unwrap();
        finish(claim_n(&store, 1, Duration::from_secs(5)).await.remove(0)).await;
        for id in ["open", "done", "gone"] {
            store.insert(due_job(id)).await.unwrap();
        }
        let claimed = claim_n(&store, 3, Duration::from_secs(5)).await;
        finish(claimed.iter().find(|j| j.id == "done").unwrap().clone()).await;
        assert!(store.delete("gone", now_ms()).await.unwrap());
        let count = |id: &'static str| {
            let subject = format!("{}{}", store.jobs.prefix, key(id));
            let stream = store.jobs.stream.clone();
            async move { subject_count(&stream, &subject).await.unwrap() }
        };
        let markers = || async { (count("early").await, count("done").await) };
        assert_eq!(markers().await, (1, 1), "a finished job leaves a marker");
        assert_eq!(count("gone").await, 0, "a deleted one none");

        // Not yet past retention: nothing goes.
        let an_hour_ago = now_ms() - 3_600_000;
        assert_eq!(store.purge_finished(an_hour_ago).await.unwrap(), 0);
        assert_eq!(markers().await, (1, 1));

        // Past it: the markers go, the open job stays.
        let later = now_ms() + 1_000;
        assert_eq!(store.purge_finished(later).await.unwrap(), 2);
        assert_eq!(markers().await, (0, 0));
        assert_eq!(count("open").await, 1);
        let (waiting, now_at) = store.read(&store.jobs, "waiting").await.unwrap().unwrap();
        assert_eq!(waiting.job.state, State::Pending);
        assert!(
            now_at > was_at,
            "moved past the markers: {was_at} → {now_at}"
        );
        let first = store
            .jobs
            .stream
            .get_info()
            .await
            .unwrap()
            .state
            .first_sequence;
        assert!(first > was_at, "purged up to there: {first}");
        let open = store.get("open").await.unwrap().unwrap();
        assert_eq!(open.state, State::InFlight);
        assert_eq!(
            store.purge_finished(later).await.unwrap(),
            0,
            "nothing left"
        );
        // Its outcome is recorded as ever.
        finish(claimed.iter().find(|j| j.id == "open").unwrap().clone()).await;
        assert_eq!(
            store.get("open").await.unwrap().unwrap().state,
            State::Delivered
        );
    }

    /// A job with two work messages (a resubmission published again after the duplicate
    /// window): the one that claims it names itself in the record, the other is dropped
    /// when it comes while the job is in flight, so the job is attempted once.
    #[tokio::test]
    async fn a_second_work_message_of_a_job_is_dropped_not_attempted() {
        let server = NatsServer::start("second-message");
        let one = server.store(Duration::from_secs(30)).await;
        let two = server.store(Duration::from_secs(30)).await;
        let job = due_job("j");
        one.insert(job.clone()).await.unwrap();
        one.publish(&job, "j#again".into(), None).await.unwrap();
        let mut claimed = claim_n(&one, 1, Duration::from_secs(5)).await;
        claimed.extend(claim_n(&two, 1, Duration::from_millis(500)).await);
        claimed.extend(claim_n(&one, 1, Duration::from_millis(300)).await);
        assert_eq!(claimed.len(), 1, "attempted once");
        let holder = if one.held.lock().contains_key("j") {
            &one
        } else {
            &two
        };
        holder
            .finish_attempt(
                &claimed[0],
                crate::store::nats_tests::attempt(200),
                Next::Delivered,
            )
            .await
            .unwrap();
        assert!(nothing_to_claim(&one).await);
        assert!(nothing_to_claim(&two).await);
        let mut stream = one.js.get_stream(WORK).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().state.messages,
            0,
            "both answered"
        );
    }

    /// A claim pulls no more than its capped targets have room for when no other target
    /// has work: the rest stays on the server for the next claim, not pulled only to be
    /// sent back (and delivered again, and its record read).
    #[tokio::test]
    async fn a_claim_pulls_no_more_than_its_targets_have_room_for() {
        let server = NatsServer::start("room");
        let store = server.store(Duration::from_secs(30)).await;
        let now = now_ms();
        let jobs: Vec<Job> = (0..60)
            .map(|i| {
                let mut job = test_job(&format!("j{i}"), "POST", "http://t:1/p");
                job.next_attempt_at = now;
                job
            })
            .collect();
        store.insert_all(jobs).await.unwrap();
        let host = test_job("x", "POST", "http://t:1/p").host().to_owned();
        let mut caps = HostCaps::default();
        caps.cap(&host, 4);
        let mut consumer = store.work.clone();
        let claimed = store.claim_due(now_ms(), 60, &caps).await.unwrap();
        assert_eq!(claimed.len(), 4);
        let first = consumer.info().await.unwrap().delivered.consumer_sequence;
        assert_eq!(first, 4, "nothing pulled only to be sent back");
        let claimed = store.claim_due(now_ms(), 60, &caps).await.unwrap();
        assert_eq!(claimed.len(), 4);
        let info = consumer.info().await.unwrap();
        assert_eq!(info.delivered.consumer_sequence, 8);
        assert_eq!(info.num_pending, 60 - 8, "the rest is left on the server");
    }

    /// Work of a target without a cap, queued behind a capped target's backlog whose
    /// cap is used up, is still found and claimed.
    #[tokio::test]
    async fn a_target_without_a_cap_is_found_behind_a_capped_backlog() {
        let server = NatsServer::start("uncapped");
        let store = server.store(Duration::from_secs(30)).await;
        let now = now_ms();
        let mut jobs: Vec<Job> = (0..40)
            .map(|i| {
                let mut job = test_job(&format!("t{i}"), "POST", "http://t:1/p");
                job.next_attempt_at = now;
                job
            })
            .collect();
        let mut other = test_job("u", "POST", "http://u:1/p");
        other.next_attempt_at = now;
        jobs.push(other);
        store.insert_all(jobs).await.unwrap();
        let host = test_job("x", "POST", "http://t:1/p").host().to_owned();
        let caps = HostCaps::skipping(&[host]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = Vec::new();
        while found.is_empty() && std::time::Instant::now() < deadline {
            found = store.claim_due(now_ms(), 60, &caps).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids: Vec<&str> = found.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["u"], "only the uncapped target's job, within 5 s");
    }

    /// The server sends a held job's message again (here: sent back by hand, as a late
    /// progress report or a pull that brought it twice would): the holder keeps its one
    /// attempt, answers the newest delivery when it finishes, and no one attempts it
    /// twice.
    #[tokio::test]
    async fn a_held_job_sent_again_is_not_attempted_twice() {
        let server = NatsServer::start("sent-again");
        let one = server.store(Duration::from_secs(30)).await;
        let two = server.store(Duration::from_secs(30)).await;
        let job = due_job("j");
        one.insert(job).await.unwrap();
        let claimed = claim_n(&one, 1, Duration::from_secs(5)).await;
        assert_eq!(claimed.len(), 1);
        let held = one.held.lock().get("j").unwrap().message.clone();
        held.ack_with(AckKind::Nak(None)).await.unwrap();
        // The same control plane gets it again: not a second claim.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..5 {
            let again = one
                .claim_due(now_ms(), 10, &HostCaps::default())
                .await
                .unwrap();
            assert!(again.is_empty(), "claimed twice: {again:?}");
        }
        // Nor does another control plane claim it meanwhile (the holder reports progress
        // on the newest delivery).
        let other = claim_n(&two, 1, Duration::from_millis(500)).await;
        assert!(
            other.is_empty(),
            "claimed by a second control plane: {other:?}"
        );
        one.finish_attempt(&claimed[0], attempt(200), Next::Delivered)
            .await
            .unwrap();
        // Answered: nothing comes back to anyone.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(nothing_to_claim(&one).await);
        assert!(nothing_to_claim(&two).await);
        assert_eq!(one.stats().await.unwrap().pending, 0);
    }

    #[tokio::test]
    async fn a_message_that_cannot_be_taken_is_given_back_not_left_for_the_ack_wait() {
        let server = NatsServer::start("give-back");
        let store = server.store(Duration::from_secs(30)).await;
        let job = due_job("j");
        store.insert(job.clone()).await.unwrap();
        // Its record cannot be read when its message comes: it cannot be taken.
        let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
        let jobs = open_bucket(&js, JOBS, Duration::ZERO).await.unwrap();
        jobs.put(key("j"), "not a record".into()).await.unwrap();
        let claimed = store
            .claim_due(now_ms(), 10, &HostCaps::default())
            .await
            .unwrap();
        assert!(claimed.is_empty());
        // Readable again: back within a moment, not after the 30 s ack wait.
        let record = Record::new(job);
        jobs.put(key("j"), serde_json::to_vec(&record).unwrap().into())
            .await
            .unwrap();
        assert_eq!(claim_n(&store, 1, Duration::from_secs(5)).await.len(), 1);
    }

    #[tokio::test]
    async fn work_an_earlier_version_left_or_still_submits_is_delivered() {
        let server = NatsServer::start("legacy");
        let now = now_ms();
        let mut old = test_job("old", "POST", "http://t:1/p");
        old.next_attempt_at = now;
        earlier_version_with_a_job(&server, &old).await;

        let store = server.store(Duration::from_secs(30)).await;
        let mut new = test_job("new", "POST", "http://t:1/p");
        new.next_attempt_at = now;
        store.insert(new).await.unwrap();
        assert_eq!(store.backlog("t:1").await.unwrap(), Some(1), "the new one");

        let claimed = claim_n(&store, 2, Duration::from_secs(5)).await;
        let mut ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["new", "old"]);
        for job in &claimed {
            store
                .finish_attempt(job, attempt(200), Next::Delivered)
                .await
                .unwrap();
        }
        assert_eq!(
            store.get("old").await.unwrap().map(|j| j.state),
            Some(State::Delivered)
        );
        // Once the old subject is found empty, it is not pulled from again.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.legacy.lock().is_some() && std::time::Instant::now() < deadline {
            store
                .claim_due(now_ms(), 10, &HostCaps::default())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(store.legacy.lock().is_none());

        // During an upgrade, a control plane of the earlier version submits again: its
        // job is found (the subject is looked at every 10 s) and delivered.
        let mut late = test_job("late", "POST", "http://t:1/p");
        late.next_attempt_at = now_ms();
        earlier_version_submits(&server, &late).await;
        let claimed = claim_n(&store, 1, Duration::from_secs(15)).await;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, "late");
    }

    #[test]
    fn keys_round_trip_and_keep_prefixes() {
        for id in ["abc", "a.b:callback", "ü/x y", ""] {
            assert_eq!(id_of(&key(id)).as_deref(), Some(id));
        }
        // The keys records already have: `j` and each byte in lower-case hex.
        assert_eq!(key("a.Z/ü"), "j612e5a2fc3bc");
        assert!(key("bc.1").starts_with(&key("bc.")));
        assert!(!key("bcx").starts_with(&key("bc.")));
        assert_eq!(subject_hash("a"), subject_hash("a"));
        assert_ne!(subject_hash("a"), subject_hash("b"));
    }
}
