//! The embedded store: one SQLite file under `KNOCKER_DATA_DIR`, crash-safe.
//!
//! - WAL journal with `synchronous=FULL`: a commit returns after the WAL is fsync'd, so
//!   a job whose insert returned survives a crash or power loss.
//! - One writer thread owns the write connection. Requests (insert, claim, finish, …)
//!   queue up while it commits; it takes everything waiting (up to [`MAX_BATCH`]) into
//!   one transaction: many submissions share one fsync (group commit).
//! - Reads (lookups, lists, next due time) go through a second connection; WAL lets
//!   them run beside the writer.
//! - Jobs live on disk: the scheduler asks for what is due, so a million pending jobs
//!   need no million in RAM.
//! - On open, jobs left in flight by a crash become pending again (at-least-once; they
//!   keep their id, so targets see the same `x-knocker-id`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Inserted, Next, Stats, Store, StoreError};
use crate::clock::Millis;
use crate::job::{Attempt, Headers, Job, Kind, Policy, Request, State, Trust, PARKED};

/// Most requests committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Limits of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pending + in-flight jobs above which submissions are refused (503).
    pub max_pending: u64,
    /// Size cap of the database file; 0 for none. Over it, commits fail (503).
    pub max_bytes: u64,
}

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    state           INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    host            TEXT    NOT NULL,
    spec            BLOB    NOT NULL,
    attempts        BLOB    NOT NULL,
    lane            TEXT
);
-- Jobs per state, kept in the same commits as the jobs: opening a store with a million
-- jobs must not count them.
CREATE TABLE IF NOT EXISTS counts (state INTEGER PRIMARY KEY, n INTEGER NOT NULL);
-- Stored jobs that could not be read, as they were, and why.
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY, spec BLOB, attempts BLOB, reason TEXT NOT NULL, at INTEGER NOT NULL
);
";

const INDEXES: &str = "
-- Partial indexes: a new (pending) job touches only jobs_due besides the keys.
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_attempt_at, seq, host) WHERE state = 0;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (seq) WHERE state = 3;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE state >= 2;
CREATE INDEX IF NOT EXISTS jobs_in_flight ON jobs (seq) WHERE state = 1;
-- Open jobs of ordered lanes, in arrival order.
CREATE INDEX IF NOT EXISTS jobs_lane ON jobs (lane, seq) WHERE lane IS NOT NULL AND state <= 1;
";

const COLUMNS: &str = "id, state, next_attempt_at, created_at, finished_at, spec, attempts, lane";

/// What a job is, as stored (its state lives in columns).
#[derive(Serialize, Deserialize)]
struct Spec {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    /// The receipt config, as JSON text (postcard cannot hold free-form JSON).
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
    trust: Trust,
    callback_trust: Trust,
}

/// The spec before destinations carried their trust: read as chosen by a client, the
/// safe side (the outbound policy applies to them).
#[derive(Deserialize)]
struct SpecV2 {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
}

impl From<SpecV2> for Spec {
    fn from(v2: SpecV2) -> Self {
        Self {
            kind: v2.kind,
            method: v2.method,
            url: v2.url,
            headers: v2.headers,
            body: v2.body,
            timeout: v2.timeout,
            retries: v2.retries,
            backoff_factor: v2.backoff_factor,
            callback: v2.callback,
            config: v2.config,
            deadline: v2.deadline,
            max_backoff_s: v2.max_backoff_s,
            trust: Trust::Client,
            callback_trust: Trust::Client,
        }
    }
}

/// The spec as the first release stored it (before maximum ages and backoff caps);
/// postcard has no optional trailing fields, so old rows are read with this.
#[derive(Deserialize)]
struct SpecV1 {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    config: String,
}

impl From<SpecV1> for Spec {
    fn from(v1: SpecV1) -> Self {
        Self {
            kind: v1.kind,
            method: v1.method,
            url: v1.url,
            headers: v1.headers,
            body: v1.body,
            timeout: v1.timeout,
            retries: v1.retries,
            backoff_factor: v1.backoff_factor,
            callback: v1.callback,
            config: v1.config,
            deadline: None,
            max_backoff_s: None,
            trust: Trust::Client,
            callback_trust: Trust::Client,
        }
    }
}

/// Newest layout first: an older row is too short for a newer layout (postcard has no
/// optional trailing fields), so the first that decodes is the row's own.
fn decode_spec(bytes: &[u8]) -> Result<Spec, postcard::Error> {
    match postcard::from_bytes::<Spec>(bytes) {
        Ok(spec) => Ok(spec),
        Err(e) => postcard::from_bytes::<SpecV2>(bytes)
            .map(Spec::from)
            .or_else(|_| postcard::from_bytes::<SpecV1>(bytes).map(Spec::from))
            .map_err(|_| e),
    }
}

fn state_code(state: State) -> i64 {
    match state {
        State::Pending => 0,
        State::InFlight => 1,
        State::Delivered => 2,
        State::Failed => 3,
    }
}

fn state_from(code: i64) -> State {
    match code {
        0 => State::Pending,
        1 => State::InFlight,
        2 => State::Delivered,
        _ => State::Failed,
    }
}

fn encode_spec(job: &Job) -> Result<Vec<u8>, StoreError> {
    let spec = Spec {
        kind: job.kind,
        method: job.request.method.clone(),
        url: job.request.url.clone(),
        headers: job.request.headers.clone(),
        body: job.request.body.clone(),
        timeout: job.policy.timeout,
        retries: job.policy.retries,
        backoff_factor: job.policy.backoff_factor,
        callback: job.policy.callback.clone(),
        config: serde_json::Value::Object(job.config.clone()).to_string(),
        deadline: job.policy.deadline,
        max_backoff_s: job.policy.max_backoff_s,
        trust: job.trust,
        callback_trust: job.policy.callback_trust,
    };
    postcard::to_stdvec(&spec)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode job: {e}")))
}

fn corrupt(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("corrupt job row: {e}").into())
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let spec: Vec<u8> = row.get(5)?;
    let spec = decode_spec(&spec).map_err(corrupt)?;
    let attempts: Vec<u8> = row.get(6)?;
    let attempts: Vec<Attempt> = if attempts.is_empty() {
        Vec::new()
    } else {
        postcard::from_bytes(&attempts).map_err(corrupt)?
    };
    let config = match serde_json::from_str(&spec.config).map_err(corrupt)? {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    Ok(Job {
        id: row.get(0)?,
        kind: spec.kind,
        request: Request {
            method: spec.method,
            url: spec.url,
            headers: spec.headers,
            body: spec.body,
        },
        policy: Policy {
            timeout: spec.timeout,
            retries: spec.retries,
            backoff_factor: spec.backoff_factor,
            callback: spec.callback,
            deadline: spec.deadline,
            max_backoff_s: spec.max_backoff_s,
            callback_trust: spec.callback_trust,
        },
        config,
        state: state_from(row.get(1)?),
        attempts,
        next_attempt_at: row.get::<_, i64>(2)? as Millis,
        created_at: row.get::<_, i64>(3)? as Millis,
        finished_at: row.get::<_, Option<i64>>(4)?.map(|v| v as Millis),
        lane: row.get(7)?,
        trust: spec.trust,
    })
}

fn sql_error(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Live counts by state, kept by the writer after each commit.
#[derive(Debug, Default)]
struct Counts {
    pending: AtomicU64,
    in_flight: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn slot(&self, state: State) -> &AtomicU64 {
        match state {
            State::Pending => &self.pending,
            State::InFlight => &self.in_flight,
            State::Delivered => &self.delivered,
            State::Failed => &self.failed,
        }
    }

    fn stats(&self) -> Stats {
        Stats {
            pending: self.pending.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// State changes of one batch, applied to [`Counts`] only once it is committed.
#[derive(Default)]
struct Deltas([i64; 4]);

impl Deltas {
    /// `n` jobs more (or fewer, when negative) in `state`.
    fn add(&mut self, state: State, n: i64) {
        self.0[state_code(state) as usize] += n;
    }

    /// One job moved from a state (none: it is new) to another (none: it is gone).
    fn moved(&mut self, from: Option<State>, to: Option<State>) {
        if let Some(f) = from {
            self.add(f, -1);
        }
        if let Some(t) = to {
            self.add(t, 1);
        }
    }

    /// Adds the changes to the `counts` table (inside the batch's transaction).
    fn store(&self, tx: &Connection) -> rusqlite::Result<()> {
        let mut update = tx.prepare_cached("UPDATE counts SET n = n + ?2 WHERE state = ?1")?;
        for (state, delta) in self.0.iter().enumerate() {
            if *delta != 0 {
                update.execute(params![state as i64, delta])?;
            }
        }
        Ok(())
    }

    fn apply(&self, counts: &Counts) {
        for (i, delta) in self.0.iter().enumerate() {
            let slot = counts.slot(state_from(i as i64));
            if *delta >= 0 {
                slot.fetch_add(*delta as u64, Ordering::Relaxed);
            } else {
                slot.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            }
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Insert(Box<Job>, Reply<Inserted>),
    InsertAll(Vec<Job>, Reply<Vec<Inserted>>),
    Claim {
        now: Millis,
        limit: usize,
        skip_hosts: Vec<String>,
        reply: Reply<Vec<Job>>,
    },
    Finish {
        job: Box<Job>,
        attempt: Attempt,
        next: Next,
        reply: Reply<()>,
    },
    Replay {
        id: String,
        now: Millis,
        reply: Reply<Option<Job>>,
    },
    Delete {
        id: String,
        now: Millis,
        reply: Reply<bool>,
    },
    Purge {
        before: Millis,
        reply: Reply<u64>,
    },
}

pub struct SqliteStore {
    commands: mpsc::UnboundedSender<Command>,
    reader: Arc<Mutex<Connection>>,
    counts: Arc<Counts>,
    path: PathBuf,
}

fn open_connection(path: &Path, limits: &Limits) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -32_768)?; // 32 MiB
    if limits.max_bytes > 0 {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        conn.pragma_update(
            None,
            "max_page_count",
            (limits.max_bytes as i64 / page_size).max(1),
        )?;
    }
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) `<dir>/knocker.db`, recovers jobs left in flight, and starts
    /// the writer thread.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("KNOCKER_DATA_DIR {}: {e}", dir.display()))
        })?;
        let path = dir.join("knocker.db");
        let writer = open_connection(&path, &limits).map_err(|e| damaged(&path, &e.to_string()))?;
        check_integrity(&writer, &path)?;
        writer.execute_batch(TABLES).map_err(sql_error)?;
        migrate(&writer).map_err(sql_error)?;
        writer.execute_batch(INDEXES).map_err(sql_error)?;
        let counts = Arc::new(Counts::default());
        let recovered = recover(&writer, &counts).map_err(sql_error)?;
        if recovered > 0 {
            tracing::warn!(
                jobs = recovered,
                "jobs in flight at the last stop are pending again"
            );
        }
        // WAL checkpoints: a background connection copies the log into the database
        // file every CHECKPOINT_EVERY (PASSIVE, beside the writer), so that the writer's
        // own automatic checkpoint (SQLite's default, every 1000 pages) finds little left
        // to copy. Only the writer's checkpoint lets the log restart from the beginning;
        // without it the WAL file grows for as long as writes continue.
        let checkpointer = open_connection(&path, &limits).map_err(sql_error)?;
        std::thread::Builder::new()
            .name("knocker-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the store checkpointer: {e}"))
            })?;
        let reader = open_connection(&path, &limits).map_err(sql_error)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let writer_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("knocker-store-writer".into())
            .spawn(move || write_loop(writer, rx, &writer_counts, &limits))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store writer: {e}")))?;
        Ok(Self {
            commands,
            reader: Arc::new(Mutex::new(reader)),
            counts,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || f(&reader.lock()).map_err(sql_error))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store reader failed: {e}")))?
    }
}

/// Brings a database of an earlier release up to the current tables.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_lane = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'lane'")?
        .exists([])?;
    if !has_lane {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN lane TEXT")?;
    }
    Ok(())
}

/// Makes jobs left in flight pending again and loads the counts by state (computing them
/// once if the table is empty). Returns how many jobs were recovered.
fn recover(conn: &Connection, counts: &Counts) -> rusqlite::Result<usize> {
    let tx = conn.unchecked_transaction()?;
    let stored: i64 = tx.query_row("SELECT count(*) FROM counts", [], |r| r.get(0))?;
    if stored == 0 {
        tx.execute(
            "INSERT INTO counts (state, n) SELECT state, count(*) FROM jobs GROUP BY state",
            [],
        )?;
        for state in 0..4 {
            tx.execute(
                "INSERT OR IGNORE INTO counts (state, n) VALUES (?1, 0)",
                [state],
            )?;
        }
    }
    let recovered = tx.execute("UPDATE jobs SET state = 0 WHERE state = 1", [])?;
    if recovered > 0 {
        let mut deltas = Deltas::default();
        deltas.add(State::InFlight, -(recovered as i64));
        deltas.add(State::Pending, recovered as i64);
        deltas.store(&tx)?;
    }
    {
        let mut stmt = tx.prepare("SELECT state, n FROM counts")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            counts
                .slot(state_from(state))
                .store(n.max(0) as u64, Ordering::Relaxed);
        }
    }
    tx.commit()?;
    Ok(recovered)
}

/// How often the WAL is copied into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// PASSIVE checkpoints run beside the writer without blocking it. The loop ends when the
/// store is gone (the database cannot be opened by this connection any more) — in
/// practice with the process.
fn checkpoint_loop(conn: &Connection) {
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
}

/// A command's own refusal (not the batch's): the rest of the batch still commits.
enum Refusal {
    Full(u64),
}

fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Command>,
    counts: &Counts,
    limits: &Limits,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let mut deltas = Deltas::default();
        let outcome = (|| -> rusqlite::Result<Vec<Outcome>> {
            let tx = conn.transaction()?;
            let mut outcomes = Vec::with_capacity(batch.len());
            for command in &batch {
                outcomes.push(execute(&tx, command, counts, limits, &mut deltas)?);
            }
            deltas.store(&tx)?;
            tx.commit()?;
            Ok(outcomes)
        })();
        match outcome {
            Ok(outcomes) => {
                deltas.apply(counts);
                for (command, outcome) in batch.into_iter().zip(outcomes) {
                    outcome.send(command);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "the store could not commit; the batch is refused");
                for command in batch {
                    Outcome::Failed(e.to_string()).send(command);
                }
            }
        }
    }
}

/// The result of one command inside a batch, sent once the batch is committed.
enum Outcome {
    /// `Ok(None)`: created (the job is moved out of the command); `Ok(Some)`: existing.
    Inserted(Result<Option<Job>, Refusal>),
    /// The same, per job of an `InsertAll`.
    InsertedAll(Result<Vec<Option<Job>>, Refusal>),
    Claimed(Vec<Job>),
    Finished,
    Replayed(Option<Job>),
    Deleted(bool),
    Purged(u64),
    Failed(String),
}

impl Outcome {
    fn send(self, command: Command) {
        let failed = |e: &str| StoreError::Unavailable(e.to_owned());
        match (command, self) {
            (Command::Insert(job, reply), Self::Inserted(r)) => {
                let _ = reply.send(match r {
                    Ok(None) => Ok(Inserted::Created(*job)),
                    Ok(Some(existing)) => Ok(Inserted::Existing(existing)),
                    Err(Refusal::Full(n)) => Err(StoreError::Full(n)),
                });
            }
            (Command::InsertAll(jobs, reply), Self::InsertedAll(r)) => {
                let _ = reply.send(match r {
                    Ok(existing) => Ok(jobs
                        .into_iter()
                        .zip(existing)
                        .map(|(job, existing)| match existing {
                            None => Inserted::Created(job),
                            Some(stored) => Inserted::Existing(stored),
                        })
                        .collect()),
                    Err(Refusal::Full(n)) => Err(StoreError::Full(n)),
                });
            }
            (Command::Claim { reply, .. }, Self::Claimed(jobs)) => drop(reply.send(Ok(jobs))),
            (Command::Finish { reply, .. }, Self::Finished) => drop(reply.send(Ok(()))),
            (Command::Replay { reply, .. }, Self::Replayed(job)) => drop(reply.send(Ok(job))),
            (Command::Delete { reply, .. }, Self::Deleted(existed)) => {
                drop(reply.send(Ok(existed)))
            }
            (Command::Purge { reply, .. }, Self::Purged(n)) => drop(reply.send(Ok(n))),
            (command, Self::Failed(e)) => match command {
                Command::Insert(_, r) => drop(r.send(Err(failed(&e)))),
                Command::InsertAll(_, r) => drop(r.send(Err(failed(&e)))),
                Command::Claim { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Finish { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Replay { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Delete { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Purge { reply, .. } => drop(reply.send(Err(failed(&e)))),
            },
            _ => {}
        }
    }
}

fn load(tx: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_from_row)
        .optional()
}

/// Inserts a new pending job; one joining an ordered lane with open jobs waits parked.
fn insert_row(tx: &Connection, job: &Job) -> rusqlite::Result<bool> {
    let spec = encode_spec(job).map_err(corrupt)?;
    let mut due = job.next_attempt_at;
    if let Some(lane) = &job.lane {
        let busy = tx
            .prepare_cached("SELECT 1 FROM jobs WHERE lane = ?1 AND state <= 1 LIMIT 1")?
            .exists([lane])?;
        if busy {
            due = PARKED;
        }
    }
    let changed = tx
        .prepare_cached(
            "INSERT INTO jobs (id, state, next_attempt_at, created_at, host, spec, attempts, lane)
             VALUES (?1, 0, ?2, ?3, ?4, ?5, x'', ?6) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            job.id,
            due as i64,
            job.created_at as i64,
            job.host(),
            spec,
            job.lane
        ])?;
    Ok(changed == 1)
}

/// Gives an ordered lane its next job when none of its open jobs is active: the oldest
/// parked one becomes due at `now`.
/// Takes a job whose stored form cannot be read out of the queue: its bytes move to the
/// `quarantine` table with the reason, and the row becomes a failed job whose one
/// attempt record says why — visible in the API, never claimed again.
fn quarantine(
    tx: &Connection,
    id: &str,
    lane: Option<&str>,
    reason: &str,
    now: Millis,
) -> rusqlite::Result<()> {
    tracing::error!(job_id = ?id, reason, "a stored job cannot be read; it is quarantined as failed");
    tx.execute(
        "INSERT OR REPLACE INTO quarantine (id, spec, attempts, reason, at)
         SELECT id, spec, attempts, ?2, ?3 FROM jobs WHERE id = ?1",
        params![id, reason, now as i64],
    )?;
    let error = format!("{QUARANTINED}: {reason}");
    let placeholder = Spec {
        kind: Kind::Target,
        method: String::new(),
        url: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout: 0.0,
        retries: 0,
        backoff_factor: 0.0,
        callback: None,
        config: serde_json::json!({ "quarantined": error }).to_string(),
        deadline: None,
        max_backoff_s: None,
        trust: Trust::Client,
        callback_trust: Trust::Client,
    };
    let attempts = vec![Attempt {
        at: now,
        status: 0,
        error: Some(error),
        latency_ms: 0,
    }];
    tx.execute(
        "UPDATE jobs SET state = 3, finished_at = ?2, spec = ?3, attempts = ?4 WHERE id = ?1",
        params![
            id,
            now as i64,
            postcard::to_stdvec(&placeholder).map_err(corrupt)?,
            postcard::to_stdvec(&attempts).map_err(corrupt)?
        ],
    )?;
    if let Some(lane) = lane {
        wake_lane(tx, lane, now)?;
    }
    Ok(())
}

/// The attempt record of a quarantined job begins with this.
pub const QUARANTINED: &str = "quarantined: the stored job cannot be read";

/// `PRAGMA quick_check`: a damaged file is refused when it opens (naming it), not found
/// out by a claim loop that fails for ever.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| damaged(path, &e.to_string()))?;
    if found.len() == 1 && found[0] == "ok" {
        Ok(())
    } else {
        Err(damaged(path, &found.join("; ")))
    }
}

fn damaged(path: &Path, why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the job database {} is damaged ({why}); restore it from a backup, or move it \
         away to start empty",
        path.display()
    ))
}

fn wake_lane(tx: &Connection, lane: &str, now: Millis) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE jobs SET next_attempt_at = ?2
         WHERE seq = (SELECT min(seq) FROM jobs WHERE lane = ?1 AND state <= 1 AND state = 0)
           AND NOT EXISTS (SELECT 1 FROM jobs
                           WHERE lane = ?1 AND state <= 1 AND next_attempt_at < ?3)",
    )?
    .execute(params![lane, now as i64, PARKED as i64])?;
    Ok(())
}

fn execute(
    tx: &Connection,
    command: &Command,
    counts: &Counts,
    limits: &Limits,
    deltas: &mut Deltas,
) -> rusqlite::Result<Outcome> {
    let open = i128::from(counts.pending.load(Ordering::Relaxed))
        + i128::from(counts.in_flight.load(Ordering::Relaxed))
        + i128::from(deltas.0[0])
        + i128::from(deltas.0[1]);
    Ok(match command {
        Command::InsertAll(jobs, _) => {
            if open + jobs.len() as i128 > i128::from(limits.max_pending) {
                return Ok(Outcome::InsertedAll(Err(Refusal::Full(open.max(0) as u64))));
            }
            let mut existing = Vec::with_capacity(jobs.len());
            for job in jobs {
                if insert_row(tx, job)? {
                    deltas.moved(None, Some(State::Pending));
                    existing.push(None);
                } else {
                    existing.push(load(tx, &job.id)?);
                }
            }
            Outcome::InsertedAll(Ok(existing))
        }
        Command::Insert(job, _) => {
            if open >= i128::from(limits.max_pending) {
                // Full — but a resubmission of a stored job still gets its receipt.
                return Ok(Outcome::Inserted(match load(tx, &job.id)? {
                    Some(existing) => Ok(Some(existing)),
                    None => Err(Refusal::Full(open.max(0) as u64)),
                }));
            }
            if insert_row(tx, job)? {
                deltas.moved(None, Some(State::Pending));
                Outcome::Inserted(Ok(None))
            } else {
                let existing = load(tx, &job.id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                Outcome::Inserted(Ok(Some(existing)))
            }
        }
        Command::Claim {
            now,
            limit,
            skip_hosts,
            ..
        } => {
            let mut sql =
                format!("SELECT {COLUMNS} FROM jobs WHERE state = 0 AND next_attempt_at <= ?1");
            if !skip_hosts.is_empty() {
                let marks = vec!["?"; skip_hosts.len()].join(", ");
                sql.push_str(&format!(" AND host NOT IN ({marks})"));
            }
            sql.push_str(&format!(" ORDER BY next_attempt_at, seq LIMIT {limit}"));
            let mut values: Vec<rusqlite::types::Value> = vec![(*now as i64).into()];
            values.extend(skip_hosts.iter().map(|h| h.clone().into()));
            // A row that cannot be read is taken out of the queue (quarantined), not
            // left to fail every claim after it.
            let rows: Vec<(String, Option<String>, rusqlite::Result<Job>)> = tx
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), |row| {
                    Ok((row.get(0)?, row.get(7)?, job_from_row(row)))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut jobs = Vec::with_capacity(rows.len());
            for (id, lane, job) in rows {
                match job {
                    Ok(job) => jobs.push(job),
                    Err(e) => {
                        quarantine(tx, &id, lane.as_deref(), &e.to_string(), *now)?;
                        deltas.moved(Some(State::Pending), Some(State::Failed));
                    }
                }
            }
            let mut mark = tx.prepare_cached("UPDATE jobs SET state = 1 WHERE id = ?1")?;
            for job in &mut jobs {
                mark.execute([&job.id])?;
                job.state = State::InFlight;
                deltas.moved(Some(State::Pending), Some(State::InFlight));
            }
            Outcome::Claimed(jobs)
        }
        Command::Finish {
            job, attempt, next, ..
        } => {
            let mut attempts = job.attempts.clone();
            attempts.push(attempt.clone());
            let attempts = postcard::to_stdvec(&attempts).map_err(corrupt)?;
            let (state, next_at, finished_at) = match next {
                Next::Delivered => (State::Delivered, job.next_attempt_at, Some(attempt.at)),
                Next::Retry { at } => (State::Pending, *at, None),
                Next::Failed { .. } => (State::Failed, job.next_attempt_at, Some(attempt.at)),
            };
            let changed = tx
                .prepare_cached(
                    "UPDATE jobs SET state = ?2, next_attempt_at = ?3, finished_at = ?4, attempts = ?5
                     WHERE id = ?1 AND state = 1",
                )?
                .execute(params![job.id, state_code(state), next_at as i64, finished_at.map(|f| f as i64), attempts])?;
            if changed == 1 {
                deltas.moved(Some(State::InFlight), Some(state));
                if let Next::Failed { callback: Some(cb) } = next {
                    if insert_row(tx, cb)? {
                        deltas.moved(None, Some(State::Pending));
                    }
                }
                if let (Some(lane), Some(at)) = (&job.lane, finished_at) {
                    wake_lane(tx, lane, at)?;
                }
            }
            Outcome::Finished
        }
        Command::Replay { id, now, .. } => {
            let Some(before) = load(tx, id)? else {
                return Ok(Outcome::Replayed(None));
            };
            if before.is_finished() {
                // A job of an ordered lane queues up parked behind the lane's open jobs.
                let due = if before.lane.is_some() { PARKED } else { *now };
                tx.prepare_cached("UPDATE jobs SET state = 0, next_attempt_at = ?2, finished_at = NULL WHERE id = ?1")?
                    .execute(params![id, due as i64])?;
                deltas.moved(Some(before.state), Some(State::Pending));
                if let Some(lane) = &before.lane {
                    wake_lane(tx, lane, *now)?;
                }
            }
            Outcome::Replayed(load(tx, id)?)
        }
        Command::Delete { id, now, .. } => {
            let found: Option<(i64, Option<String>)> = tx
                .prepare_cached("SELECT state, lane FROM jobs WHERE id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((state, lane)) = &found {
                tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute([id])?;
                deltas.moved(Some(state_from(*state)), None);
                if let Some(lane) = lane {
                    wake_lane(tx, lane, *now)?;
                }
            }
            Outcome::Deleted(found.is_some())
        }
        Command::Purge { before, .. } => {
            let mut removed = 0u64;
            for state in [State::Delivered, State::Failed] {
                let n = tx
                    .prepare_cached("DELETE FROM jobs WHERE state = ?1 AND finished_at < ?2")?
                    .execute(params![state_code(state), *before as i64])?;
                deltas.add(state, -(n as i64));
                removed += n as u64;
            }
            Outcome::Purged(removed)
        }
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, job: Job) -> Result<Inserted, StoreError> {
        self.ask(|reply| Command::Insert(Box::new(job), reply))
            .await
    }

    async fn insert_all(&self, jobs: Vec<Job>) -> Result<Vec<Inserted>, StoreError> {
        self.ask(|reply| Command::InsertAll(jobs, reply)).await
    }

    async fn find_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Job>, StoreError> {
        // Ids with the prefix form one range of the unique index: [prefix, prefix + 1).
        let mut end = prefix.as_bytes().to_vec();
        let Some(last) = end.pop() else {
            return Err(StoreError::Unavailable("empty id prefix".into()));
        };
        let lower = prefix.to_owned();
        let upper = if last == u8::MAX {
            None
        } else {
            end.push(last + 1);
            String::from_utf8(end).ok()
        };
        self.read(move |c| {
            let upper = upper.unwrap_or_else(|| format!("{lower}\u{10FFFF}"));
            let mut jobs: Vec<(i64, Job)> = c
                .prepare_cached(&format!(
                    "SELECT {COLUMNS}, seq FROM jobs WHERE id >= ?1 AND id < ?2 LIMIT ?3"
                ))?
                .query_map(params![lower, upper, limit as i64], |row| {
                    Ok((row.get(8)?, job_from_row(row)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            jobs.retain(|(_, job)| job.id.starts_with(&lower));
            jobs.sort_by_key(|(seq, _)| *seq);
            Ok(jobs.into_iter().map(|(_, job)| job).collect())
        })
        .await
    }

    async fn claim_due(
        &self,
        now: Millis,
        limit: usize,
        skip_hosts: &[String],
    ) -> Result<Vec<Job>, StoreError> {
        let skip_hosts = skip_hosts.to_vec();
        self.ask(|reply| Command::Claim {
            now,
            limit,
            skip_hosts,
            reply,
        })
        .await
    }

    async fn finish_attempt(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError> {
        let job = Box::new(job.clone());
        self.ask(|reply| Command::Finish {
            job,
            attempt,
            next,
            reply,
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| load(c, &id)).await
    }

    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT next_attempt_at FROM jobs WHERE state = 0 AND next_attempt_at < ?1
                 ORDER BY next_attempt_at LIMIT 1",
            )?
            .query_row([PARKED as i64], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(|v| v as Millis))
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        Ok(self.counts.stats())
    }

    async fn list(
        &self,
        state: State,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let after = after.map(str::to_owned);
        self.read(move |c| {
            let after_seq: i64 = match &after {
                Some(id) => c
                    .prepare_cached("SELECT seq FROM jobs WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))
                    .optional()?
                    .unwrap_or(i64::MAX),
                None => 0,
            };
            // The state is inlined (our own integer) so that SQLite can use the partial
            // index on failed jobs, which it cannot prove for a bound parameter.
            let code = state_code(state);
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE state = {code} AND seq > ?1 ORDER BY seq LIMIT ?2"
            ))?
            .query_map(params![after_seq, limit as i64], job_from_row)?
            .collect()
        })
        .await
    }

    async fn replay(&self, id: &str, now: Millis) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Command::Replay { id, now, reply }).await
    }

    async fn delete(&self, id: &str, now: Millis) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Command::Delete { id, now, reply }).await
    }

    async fn purge_finished(&self, before: Millis) -> Result<u64, StoreError> {
        self.ask(|reply| Command::Purge { before, reply }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_quarantined_not_a_stall_of_every_claim() {
        let dir = std::env::temp_dir().join(format!("knocker-quarantine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let limits = Limits {
            max_pending: 1000,
            max_bytes: 0,
        };
        let store = SqliteStore::open(&dir, limits).unwrap();
        for id in ["bad", "good"] {
            store
                .insert(crate::job::test_job(id, "POST", "http://t/"))
                .await
                .unwrap();
        }
        // Junk where the first job's spec was, written behind the store's back.
        let raw = Connection::open(dir.join("knocker.db")).unwrap();
        raw.execute("UPDATE jobs SET spec = x'ffffffff00' WHERE id = 'bad'", [])
            .unwrap();
        let claimed = store.claim_due(u64::MAX / 2, 10, &[]).await.unwrap();
        assert_eq!(
            claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        let bad = store.get("bad").await.unwrap().unwrap();
        assert_eq!(bad.state, State::Failed);
        let error = bad.attempts[0].error.as_deref().unwrap();
        assert!(error.starts_with(QUARANTINED), "{error}");
        assert!(bad.config["quarantined"].is_string());
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.failed, stats.pending), (1, 0));
        // The bytes are kept for whoever repairs it.
        let kept: Vec<u8> = raw
            .query_row("SELECT spec FROM quarantine WHERE id = 'bad'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(kept, vec![0xff, 0xff, 0xff, 0xff, 0x00]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn specs_of_the_first_release_still_decode() {
        // The first release's layout, field for field.
        #[derive(Serialize)]
        struct V1<'a> {
            kind: Kind,
            method: &'a str,
            url: &'a str,
            headers: Headers,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
            timeout: f64,
            retries: u32,
            backoff_factor: f64,
            callback: Option<&'a str>,
            config: &'a str,
        }
        let bytes = postcard::to_stdvec(&V1 {
            kind: Kind::Target,
            method: "POST",
            url: "http://t/",
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: b"hi",
            timeout: 2.0,
            retries: 3,
            backoff_factor: 0.5,
            callback: Some("http://cb/"),
            config: "{}",
        })
        .unwrap();
        let spec = decode_spec(&bytes).unwrap();
        assert_eq!((spec.url.as_str(), spec.retries), ("http://t/", 3));
        assert_eq!(spec.callback.as_deref(), Some("http://cb/"));
        assert_eq!((spec.deadline, spec.max_backoff_s), (None, None));
        assert_eq!(
            (spec.trust, spec.callback_trust),
            (Trust::Client, Trust::Client)
        );
    }

    #[test]
    fn specs_without_trust_decode_as_client_chosen_and_new_ones_keep_it() {
        #[derive(Serialize)]
        struct V2<'a> {
            kind: Kind,
            method: &'a str,
            url: &'a str,
            headers: Headers,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
            timeout: f64,
            retries: u32,
            backoff_factor: f64,
            callback: Option<&'a str>,
            config: &'a str,
            deadline: Option<Millis>,
            max_backoff_s: Option<f64>,
        }
        let bytes = postcard::to_stdvec(&V2 {
            kind: Kind::Target,
            method: "POST",
            url: "http://t/",
            headers: vec![],
            body: b"",
            timeout: 2.0,
            retries: 3,
            backoff_factor: 0.5,
            callback: None,
            config: "{}",
            deadline: Some(9),
            max_backoff_s: Some(1.0),
        })
        .unwrap();
        let spec = decode_spec(&bytes).unwrap();
        assert_eq!((spec.deadline, spec.trust), (Some(9), Trust::Client));
        let mut job = crate::job::test_job("j", "GET", "http://t/");
        job.trust = Trust::Operator;
        job.policy.callback_trust = Trust::Client;
        let spec = decode_spec(&encode_spec(&job).unwrap()).unwrap();
        assert_eq!(
            (spec.trust, spec.callback_trust),
            (Trust::Operator, Trust::Client)
        );
    }
}
