//! The embedded store: one SQLite file under `KNOCKER_DATA_DIR`, crash-safe.
//!
//! - WAL journal with `synchronous=FULL`: a commit returns after the WAL is fsync'd, so
//!   a job whose insert returned survives a crash or power loss. A batch of only claims
//!   and outcomes skips the fsync (see the writer's `Sync`): a power loss can take back
//!   an outcome (the job is attempted again), never a receipt.
//! - One writer thread owns the write connection. Requests (insert, claim, finish, …)
//!   queue up while it commits; it takes everything waiting (up to [`MAX_BATCH`]) into
//!   one transaction: many submissions share one fsync (group commit).
//! - A claim's room goes to new jobs: a job due on arrival, written while the delivery
//!   loop has free slots, is written in flight and handed to its next claim as it is,
//!   not read back from the table (the writer's `Handover`).
//! - Reads (lookups, lists, next due time) go through a second connection; WAL lets
//!   them run beside the writer.
//! - One process owns the database (SQLite's `unix-excl` VFS, see [`schema`]): its
//!   connections lock each other in memory, and a second control plane started on the
//!   same directory is refused.
//! - Under the size cap, history makes room (the oldest finished jobs go first), and
//!   new jobs stop a sixteenth of the cap short of it: the jobs already accepted keep
//!   room to be claimed and to have their outcomes recorded, and a batch whose
//!   submissions find no room commits without them (the writer's `Room` and `Admit`);
//!   their refusal names what is full, the cap or the disk (`Limit`).
//! - Jobs live on disk: the scheduler asks for what is due, so a million pending jobs
//!   need no million in RAM.
//! - Each job's record carries its layout's version ([`record`]): a database of an
//!   earlier release opens and delivers.
//! - On open, jobs left in flight by a crash become pending again (at-least-once; they
//!   keep their id, so targets see the same `x-knocker-id`).
//!
//! Files: [`schema`] (tables, opening, upgrades, integrity), [`record`] (a job's stored
//! form), [`writer`] (the writer thread, group commit, counts, recovery), [`due`] (which
//! due jobs a claim takes, passing by hosts that take no more), and here the [`Store`]
//! implementation and its reads.

mod due;
mod record;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{HostCaps, Inserted, Next, Stats, Store, StoreError, AUTO_CAP};
use crate::clock::Millis;
use crate::job::{Attempt, Job, State, PARKED};
use record::{job_from_row, state_code, COLUMNS};
use schema::{check_integrity, migrate, open_connection, unopenable, INDEXES, TABLES};
#[cfg(test)]
use writer::PURGE;
use writer::{checkpoint_loop, load, recover, write_loop, AttemptRow, Command, Counts, Reply};
#[cfg(test)]
use writer::{TAKE_LANE, WAKE_LANE};

pub use writer::QUARANTINED;

/// Most requests committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Limits of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pending + in-flight jobs above which submissions are refused (503).
    pub max_pending: u64,
    /// Size cap of the database file; 0 for none, [`AUTO_CAP`] for one chosen at open.
    /// Near the cap (a sixteenth of it is kept for the claims and outcomes of the jobs
    /// already accepted) the oldest finished jobs make room; only when none are left do
    /// submissions fail (503).
    pub max_bytes: u64,
}

/// Floor of the automatic cap (a nearly full disk still gets a working store).
const AUTO_CAP_FLOOR: u64 = 64 << 20;

/// Finished jobs removed per commit by retention; other commits go between chunks.
const PURGE_CHUNK: usize = 5_000;

/// The cap in bytes for `limits.max_bytes` (0: none).
fn resolve_cap(dir: &Path, path: &Path, max_bytes: u64) -> u64 {
    if max_bytes != AUTO_CAP {
        return max_bytes;
    }
    let used = std::fs::metadata(path).map_or(0, |m| m.len());
    match rustix::fs::statvfs(dir) {
        Ok(fs) => {
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            let cap = used.saturating_add(free / 2).max(AUTO_CAP_FLOOR);
            tracing::info!(
                cap_bytes = cap,
                free_bytes = free,
                "store size cap: the database plus half the free space (KNOCKER_MAX_STORE_BYTES=auto)"
            );
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the free space of KNOCKER_DATA_DIR; the store has no size cap");
            0
        }
    }
}

fn sql_error(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub struct SqliteStore {
    commands: mpsc::UnboundedSender<Command>,
    reader: Arc<Mutex<Connection>>,
    counts: Arc<Counts>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (or creates) `<dir>/knocker.db`, recovers jobs left in flight, and starts
    /// the writer thread.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("KNOCKER_DATA_DIR {}: {e}", dir.display()))
        })?;
        let path = dir.join("knocker.db");
        let limits = Limits {
            max_bytes: resolve_cap(dir, &path, limits.max_bytes),
            ..limits
        };
        let writer = open_connection(&path, &limits).map_err(|e| unopenable(&path, &e))?;
        check_integrity(&writer, &path)?;
        // A cap too small for the tables themselves is named, not reported as a full disk.
        let too_small = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) if limits.max_bytes > 0 => {
                StoreError::Unavailable(format!(
                    "KNOCKER_MAX_STORE_BYTES ({} bytes) is too small for the job database's \
                     tables; give it at least 1 MiB",
                    limits.max_bytes
                ))
            }
            _ => sql_error(e),
        };
        writer.execute_batch(TABLES).map_err(too_small)?;
        migrate(&writer).map_err(too_small)?;
        writer.execute_batch(INDEXES).map_err(too_small)?;
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

    /// Records an attempt's outcome; with `take_next`, the lane's next job it hands on
    /// to ([`Store::finish_and_take_next`]).
    async fn finish(
        &self,
        job: &Job,
        attempt: &Attempt,
        next: Next,
        take_next: bool,
    ) -> Result<Option<Job>, StoreError> {
        let row = AttemptRow::new(job, attempt)?;
        self.ask(|reply| Command::Finish {
            row,
            next,
            take_next,
            reply,
        })
        .await
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
        caps: &HostCaps,
    ) -> Result<Vec<Job>, StoreError> {
        let caps = caps.clone();
        self.ask(|reply| Command::Claim {
            now,
            limit,
            caps,
            reply,
        })
        .await
    }

    async fn release(&self, job: &Job) -> Result<(), StoreError> {
        let id = job.id.clone();
        self.ask(|reply| Command::Release { id, reply }).await
    }

    async fn finish_attempt(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<(), StoreError> {
        self.finish(job, &attempt, next, false).await.map(|_| ())
    }

    async fn finish_and_take_next(
        &self,
        job: &Job,
        attempt: Attempt,
        next: Next,
    ) -> Result<Option<Job>, StoreError> {
        self.finish(job, &attempt, next, true).await
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| load(c, &id)).await
    }

    async fn next_due(&self, caps: &HostCaps) -> Result<Option<Millis>, StoreError> {
        let skipped: std::collections::HashSet<String> =
            caps.skipped().map(str::to_owned).collect();
        self.read(move |c| due::next_due(c, &skipped, due::WALK))
            .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        Ok(self.counts.stats())
    }

    async fn oldest_due(&self) -> Result<Option<Millis>, StoreError> {
        // The first column of the partial index `jobs_due`: one seek.
        self.read(|c| {
            c.prepare_cached(
                "SELECT min(next_attempt_at) FROM jobs WHERE state = 0 AND next_attempt_at < ?1",
            )?
            .query_row([PARKED as i64], |r| r.get::<_, Option<i64>>(0))
            .map(|at| at.map(|at| at as Millis))
        })
        .await
    }

    async fn backlog(&self, host: &str) -> Result<Option<u64>, StoreError> {
        let host = host.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT count(*) FROM jobs WHERE state = 0 AND host = ?1")?
                .query_row([host], |r| r.get::<_, i64>(0))
                .map(|n| Some(n.max(0) as u64))
        })
        .await
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

    /// In chunks of [`PURGE_CHUNK`], each its own commit, so that a big purge (a day's
    /// jobs coming of age at once) never holds the writer for long: submissions and
    /// outcomes commit between the chunks.
    async fn purge_finished(&self, before: Millis) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let n = self
                .ask(|reply| Command::Purge {
                    before,
                    limit: PURGE_CHUNK,
                    reply,
                })
                .await?;
            removed += n;
            if n < PURGE_CHUNK as u64 {
                return Ok(removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1000 pending jobs, no size cap.
    const LIMITS: Limits = Limits {
        max_pending: 1000,
        max_bytes: 0,
    };

    /// The store in `dir`, opened again.
    fn reopen(dir: &Path) -> SqliteStore {
        SqliteStore::open(dir, LIMITS).unwrap()
    }

    /// A store in a fresh directory `<temp>/<name>-<pid>` (1000 pending, no size cap).
    fn open_fresh(name: &str) -> (PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = reopen(&dir);
        (dir, store)
    }

    /// SQLite's plan for `sql` on the store's database, a line per step.
    fn query_plan(store: &SqliteStore, sql: &str, params: impl rusqlite::Params) -> String {
        let conn = Connection::open(store.path()).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params, |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        plan.join("\n")
    }

    #[test]
    fn handing_a_lane_on_seeks_its_indexes_instead_of_reading_its_parked_jobs() {
        let (dir, store) = open_fresh("knocker-lane-plan");
        // Made due for the next claim, or taken at once by the attempt that ended the
        // lane's active job: the same seeks.
        for sql in [&*WAKE_LANE, &*TAKE_LANE] {
            let plan = query_plan(&store, sql, params!["lane", 1i64, PARKED as i64]);
            // The lane's first open job by `jobs_lane`; whether one is active by
            // `jobs_lane_active`, over the lane's active range only (a lane with 20,000
            // parked broadcast copies once took 12 ms per hand-over reading them all).
            assert!(plan.contains("USING INDEX jobs_lane "), "{plan}");
            assert!(
                plan.contains(
                    "USING COVERING INDEX jobs_lane_active (lane=? AND next_attempt_at<?)"
                ) || plan.contains("USING INDEX jobs_lane_active (lane=? AND next_attempt_at<?)"),
                "{plan}"
            );
            assert!(!plan.contains("SCAN"), "{plan}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Retention runs in the writer, which holds every commit meanwhile: it walks the
    /// finished jobs' index, never the table (a scan of 545,210 jobs took 80–300 ms,
    /// once a minute, and showed as a stall of every receipt).
    #[test]
    fn retention_reads_the_finished_jobs_index_not_the_table() {
        let (dir, store) = open_fresh("knocker-purge-plan");
        let plan = query_plan(&store, PURGE, params![1i64, 10i64]);
        assert!(plan.contains("USING INDEX jobs_finished"), "{plan}");
        assert!(!plan.contains("SCAN jobs"), "{plan}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// More finished jobs than one chunk: all of them go (over several commits), the
    /// newer and the open ones stay, and the counts follow.
    #[tokio::test]
    async fn retention_removes_a_big_history_in_chunks_and_keeps_the_counts() {
        let (dir, store) = open_fresh("knocker-purge-chunks");
        let path = store.path().to_owned();
        drop(store);
        let total = PURGE_CHUNK as i64 + 100;
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            let mut insert = tx
                .prepare(
                    "INSERT INTO jobs (id, state, next_attempt_at, created_at, finished_at, \
                     host, spec, attempts) VALUES (?1, ?2, 0, 0, ?3, 'h', x'', x'')",
                )
                .unwrap();
            for i in 1..=total {
                // Every tenth one failed, the others delivered; finished at `i`.
                let state = if i % 10 == 0 { 3 } else { 2 };
                insert.execute(params![format!("j{i}"), state, i]).unwrap();
            }
            insert
                .execute(params!["open", 0, Option::<i64>::None])
                .unwrap();
            drop(insert);
            tx.execute_batch(&format!(
                "UPDATE counts SET n = 1 WHERE state = 0;
                 UPDATE counts SET n = {} WHERE state = 2;
                 UPDATE counts SET n = {} WHERE state = 3;",
                total - total / 10,
                total / 10
            ))
            .unwrap();
            tx.commit().unwrap();
        }
        let store = reopen(&dir);
        // Finished before `total - 50`: all but the last 51.
        let removed = store.purge_finished((total - 50) as u64).await.unwrap();
        assert_eq!(removed, (total - 51) as u64);
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.pending, 1);
        assert_eq!(stats.delivered + stats.failed, 51);
        // Finished at total - 50 ..= total (5,050 to 5,100): six multiples of ten.
        assert_eq!(stats.failed, 6);
        let left: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 52);
        assert_eq!(store.purge_finished((total - 50) as u64).await.unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_quarantined_not_a_stall_of_every_claim() {
        let (dir, store) = open_fresh("knocker-quarantine");
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
        let claimed = store
            .claim_due(u64::MAX / 2, 10, &HostCaps::default())
            .await
            .unwrap();
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

    /// A lane's next job that cannot be read, met when an outcome hands the lane on to it:
    /// quarantined as a claim would, nothing handed over, and the lane goes on to the job
    /// after it.
    #[tokio::test]
    async fn a_lane_job_that_cannot_be_read_is_quarantined_when_handed_over_and_the_lane_goes_on() {
        let (dir, store) = open_fresh("knocker-quarantine-lane");
        for (i, id) in ["a1", "bad", "a3"].into_iter().enumerate() {
            let mut job = crate::job::test_job(id, "POST", "http://t/");
            job.lane = Some("A".into());
            job.created_at = i as u64;
            job.next_attempt_at = 10;
            store.insert(job).await.unwrap();
        }
        let raw = Connection::open(dir.join("knocker.db")).unwrap();
        raw.execute("UPDATE jobs SET spec = x'ffffffff00' WHERE id = 'bad'", [])
            .unwrap();
        let claimed = store.claim_due(10, 10, &HostCaps::default()).await.unwrap();
        assert_eq!(
            claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["a1"]
        );
        let attempt = Attempt {
            at: 20,
            status: 200,
            error: None,
            latency_ms: 1,
        };
        let taken = store
            .finish_and_take_next(&claimed[0], attempt, Next::Delivered)
            .await
            .unwrap();
        assert!(taken.is_none(), "nothing readable to hand over");
        let bad = store.get("bad").await.unwrap().unwrap();
        assert_eq!(bad.state, State::Failed);
        let error = bad.attempts[0].error.as_deref().unwrap();
        assert!(error.starts_with(QUARANTINED), "{error}");
        let a3 = store.get("a3").await.unwrap().unwrap();
        assert!(!a3.is_parked(), "the lane goes on");
        let next = store.claim_due(20, 10, &HostCaps::default()).await.unwrap();
        assert_eq!(
            next.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["a3"]
        );
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                pending: 0,
                in_flight: 1,
                delivered: 1,
                failed: 1
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new database has the page size chosen for its WAL writes; one made with
    /// SQLite's default keeps it, and opens and works as before.
    #[tokio::test]
    async fn a_new_database_has_its_page_size_and_an_older_one_keeps_its_own() {
        let (dir, store) = open_fresh("knocker-page-size");
        let page_size = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(page_size(store.path()), schema::PAGE_SIZE);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);

        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("knocker.db");
        let older = Connection::open(&path).unwrap();
        older
            .execute_batch("PRAGMA page_size = 4096; VACUUM;")
            .unwrap();
        drop(older);
        let store = reopen(&dir);
        assert_eq!(page_size(store.path()), 4096);
        store.insert(submitted("a", "h", 10)).await.unwrap();
        assert_eq!(claim_ids(&store, 10, &HostCaps::default()).await, ["a"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A claim binds its limit, which changes with every claim: the statement stays
    /// compiled (a plan that depended on the value was compiled again at each new one).
    #[test]
    fn a_new_limit_does_not_compile_the_claim_again() {
        let (dir, store) = open_fresh("knocker-no-reprepare");
        let conn = schema::open_connection(store.path(), &LIMITS).unwrap();
        let mut claim = conn
            .prepare(
                "SELECT seq FROM jobs WHERE state = 0 AND next_attempt_at <= ?1 \
                 ORDER BY next_attempt_at, seq LIMIT ?2",
            )
            .unwrap();
        for limit in 1..=5i64 {
            claim.query(params![10i64, limit]).unwrap().next().unwrap();
        }
        assert_eq!(
            claim.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "compiled again for a new limit"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job of `host`, submitted at 10, due at `due`.
    fn submitted(id: &str, host: &str, due: Millis) -> Job {
        let mut job = crate::job::test_job(id, "POST", &format!("http://{host}/p"));
        job.request.body = id.as_bytes().to_vec();
        job.created_at = 10;
        job.next_attempt_at = due;
        job
    }

    async fn claim_ids(store: &SqliteStore, limit: usize, caps: &HostCaps) -> Vec<String> {
        let jobs = store.claim_due(10, limit, caps).await.unwrap();
        assert!(jobs.iter().all(|j| j.state == State::InFlight));
        jobs.into_iter().map(|j| j.id).collect()
    }

    async fn state(store: &SqliteStore, id: &str) -> State {
        store.get(id).await.unwrap().unwrap().state
    }

    /// The store's connections share their WAL index in this process's memory (the
    /// `unix-excl` VFS): no `-shm` file, and no lock system call per transaction. The
    /// writer and the reader still see each other's commits.
    #[tokio::test]
    async fn the_wal_index_is_kept_in_memory_and_shared_by_the_stores_connections() {
        let (dir, store) = open_fresh("knocker-excl");
        assert!(matches!(
            store.insert(submitted("a", "h", 1_000)).await.unwrap(),
            Inserted::Created
        ));
        assert_eq!(state(&store, "a").await, State::Pending);
        assert!(dir.join("knocker.db-wal").exists(), "the WAL is a file");
        assert!(
            !dir.join("knocker.db-shm").exists(),
            "the WAL index is a file: the store is not on unix-excl"
        );
        assert!(store.delete("a", 2_000).await.unwrap());
        assert_eq!(
            store.get("a").await.unwrap(),
            None,
            "the reader sees the delete"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The room a claim leaves goes to new jobs due on arrival: written in flight and
    /// kept, whole, for the next claim, ahead of the rows it reads. A delayed job, a job
    /// of an ordered lane and the jobs past the room are written pending.
    #[tokio::test]
    async fn new_jobs_due_on_arrival_fill_the_room_the_last_claim_left() {
        let (dir, store) = open_fresh("knocker-handover");
        assert!(claim_ids(&store, 3, &HostCaps::default()).await.is_empty());
        let mut laned = submitted("l", "h", 10);
        laned.lane = Some("lane".into());
        for job in [
            submitted("a", "h", 10),
            submitted("b", "h", 10),
            submitted("later", "h", 1_000),
            laned,
            submitted("c", "h", 10),
            submitted("past-the-room", "h", 10),
        ] {
            assert!(matches!(
                store.insert(job).await.unwrap(),
                Inserted::Created
            ));
        }
        for id in ["a", "b", "c"] {
            assert_eq!(state(&store, id).await, State::InFlight, "{id}");
        }
        for id in ["later", "l", "past-the-room"] {
            assert_eq!(state(&store, id).await, State::Pending, "{id}");
        }
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending, stats.in_flight), (3, 3));
        let claimed = store.claim_due(10, 10, &HostCaps::default()).await.unwrap();
        let ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "l", "past-the-room"]);
        // Handed over as submitted, not a copy of less.
        let mut expected = submitted("a", "h", 10);
        expected.state = State::InFlight;
        assert_eq!(claimed[0], expected);
        // Each once: the next claim has nothing but what is due by then.
        assert!(claim_ids(&store, 10, &HostCaps::default()).await.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The claim's caps hold for the jobs handed over after it; a resubmitted id takes
    /// no place.
    #[tokio::test]
    async fn jobs_handed_over_keep_to_the_claims_caps() {
        let (dir, store) = open_fresh("knocker-handover-caps");
        let mut caps = HostCaps::default();
        caps.cap("capped", 2);
        caps.cap("parked", 0);
        assert!(claim_ids(&store, 10, &caps).await.is_empty());
        for (id, host) in [
            ("p", "parked"),
            ("c1", "capped"),
            ("c1", "capped"),
            ("c2", "capped"),
            ("c3", "capped"),
            ("free", "other"),
        ] {
            store.insert(submitted(id, host, 10)).await.unwrap();
        }
        for (id, expected) in [
            ("p", State::Pending),
            ("c1", State::InFlight),
            ("c2", State::InFlight),
            ("c3", State::Pending),
            ("free", State::InFlight),
        ] {
            assert_eq!(state(&store, id).await, expected, "{id}");
        }
        assert_eq!(claim_ids(&store, 10, &caps).await, ["c1", "c2", "free"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job handed over is in flight on disk: if the process stops before a claim
    /// takes it, it is pending again at the next start. A job deleted before the next
    /// claim is not handed over.
    #[tokio::test]
    async fn jobs_kept_for_the_next_claim_survive_a_restart_and_a_deletion_withdraws_them() {
        let (dir, store) = open_fresh("knocker-handover-restart");
        assert!(claim_ids(&store, 10, &HostCaps::default()).await.is_empty());
        for id in ["kept", "deleted"] {
            store.insert(submitted(id, "h", 10)).await.unwrap();
        }
        assert!(store.delete("deleted", 10).await.unwrap());
        assert_eq!(state(&store, "kept").await, State::InFlight);
        drop(store); // the process "dies" before the next claim
        let store = reopen(&dir);
        assert_eq!(state(&store, "kept").await, State::Pending);
        assert_eq!(claim_ids(&store, 10, &HostCaps::default()).await, ["kept"]);

        // And in one life: the deleted job is withdrawn from the ones kept.
        for id in ["one", "two"] {
            store.insert(submitted(id, "h", 10)).await.unwrap();
        }
        assert!(store.delete("one", 10).await.unwrap());
        assert_eq!(claim_ids(&store, 10, &HostCaps::default()).await, ["two"]);
        assert_eq!(store.stats().await.unwrap().in_flight, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
