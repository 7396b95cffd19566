//! The writer thread: it owns the write connection and commits every change. Requests
//! queue up while it commits; it takes everything waiting (up to [`super::MAX_BATCH`])
//! into one transaction, so many submissions share one fsync (group commit). Also the
//! live counts by state, the recovery of jobs left in flight, the WAL checkpoints and
//! the quarantine of rows that cannot be read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::due;
use super::record::{corrupt, encode_spec, job_from_row, state_code, state_from, COLUMNS};
use super::{Limits, MAX_BATCH};
use crate::clock::Millis;
use crate::job::{Attempt, Job, State, PARKED};
use crate::store::{HostCaps, Inserted, Next, Stats, StoreError};

/// Live counts by state, kept by the writer after each commit.
#[derive(Debug, Default)]
pub(super) struct Counts {
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

    pub(super) fn stats(&self) -> Stats {
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

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Command {
    Insert(Box<Job>, Reply<Inserted>),
    InsertAll(Vec<Job>, Reply<Vec<Inserted>>),
    Claim {
        now: Millis,
        limit: usize,
        caps: HostCaps,
        reply: Reply<Vec<Job>>,
    },
    Release {
        id: String,
        reply: Reply<()>,
    },
    /// An attempt's outcome. With `take_next`, an outcome that ends the job and hands
    /// its ordered lane on claims the lane's next job in the same commit and answers it.
    Finish {
        row: AttemptRow,
        next: Next,
        take_next: bool,
        reply: Reply<Option<Job>>,
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
    /// Removes up to `limit` jobs finished before `before`, the longest finished first.
    Purge {
        before: Millis,
        limit: usize,
        reply: Reply<u64>,
    },
}

/// What an attempt's outcome writes to its job's row. Not the job: its request, body and
/// policy stay as they were written, so finishing an attempt copies none of them.
pub(super) struct AttemptRow {
    id: String,
    /// The job's attempts, this one last, encoded as the row keeps them.
    attempts: Vec<u8>,
    /// When this attempt was made (the finish time of a job it ends).
    at: Millis,
    /// The job's due time as it stands (kept when the attempt ends the job).
    next_attempt_at: Millis,
    lane: Option<String>,
}

impl AttemptRow {
    pub(super) fn new(job: &Job, attempt: &Attempt) -> Result<Self, StoreError> {
        let attempts = postcard::to_stdvec(&Appended(&job.attempts, attempt))
            .map_err(|e| StoreError::Unavailable(format!("cannot encode the attempts: {e}")))?;
        Ok(Self {
            id: job.id.clone(),
            attempts,
            at: attempt.at,
            next_attempt_at: job.next_attempt_at,
            lane: job.lane.clone(),
        })
    }
}

/// A job's attempts and a new one, written as one list without copying the others.
struct Appended<'a>(&'a [Attempt], &'a Attempt);

impl serde::Serialize for Appended<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.len() + 1))?;
        for attempt in self.0.iter().chain([self.1]) {
            seq.serialize_element(attempt)?;
        }
        seq.end()
    }
}

/// Makes jobs left in flight pending again and loads the counts by state (computing them
/// once if the table is empty). Returns how many jobs were recovered.
pub(super) fn recover(conn: &Connection, counts: &Counts) -> rusqlite::Result<usize> {
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
pub(super) fn checkpoint_loop(conn: &Connection) {
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
}

/// A command's own refusal (not the batch's): the rest of the batch still commits.
enum Refusal {
    /// `KNOCKER_MAX_PENDING`: this many jobs are open.
    Full(u64),
    /// No room for a new job: the store is full up to this limit.
    NoRoom(Limit),
}

impl Refusal {
    fn error(self) -> StoreError {
        match self {
            Self::Full(open) => StoreError::Full(open),
            Self::NoRoom(Limit::Disk) => StoreError::Unavailable(
                "the disk of KNOCKER_DATA_DIR is full and the store holds no finished jobs \
                 to remove; new jobs are refused until open ones finish or space is freed"
                    .into(),
            ),
            Self::NoRoom(Limit::Cap(cap)) => StoreError::Unavailable(format!(
                "the store is at its size cap (KNOCKER_MAX_STORE_BYTES, {cap} bytes) and holds \
                 no finished jobs to remove; new jobs are refused until open ones finish"
            )),
        }
    }
}

/// Which new jobs a batch may write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Admit {
    /// All of them, within the room [`Room`] leaves them.
    All,
    /// None: the store is full up to this limit, and the batch's claims, outcomes and
    /// the rest commit without its submissions, which are refused ([`Refusal::NoRoom`]).
    OpenOnly(Limit),
}

/// What a store that takes no more new jobs is full up to. SQLite answers "database or
/// disk is full" for both; the refusal names the one to act on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Limit {
    /// The size cap (`KNOCKER_MAX_STORE_BYTES`), in bytes.
    Cap(u64),
    /// The file system of `KNOCKER_DATA_DIR`.
    Disk,
}

impl Limit {
    /// The disk when there is no cap, or when its file system has less space free than
    /// the database may still grow by under the cap (then the cap is not what stops it);
    /// the cap otherwise, or when the free space cannot be read.
    fn binding(conn: &Connection, limits: &Limits) -> Self {
        if limits.max_bytes == 0 {
            return Self::Disk;
        }
        match disk_below_cap(conn) {
            Ok(true) => Self::Disk,
            Ok(false) => Self::Cap(limits.max_bytes),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the space free for the store");
                Self::Cap(limits.max_bytes)
            }
        }
    }
}

/// Whether the file system holding the database has less space free than the database
/// may still grow by under its page limit.
fn disk_below_cap(conn: &Connection) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let (max, count, size): (i64, i64, i64) = conn.query_row(
        "SELECT m.max_page_count, p.page_count, s.page_size \
         FROM pragma_max_page_count() AS m, pragma_page_count() AS p, pragma_page_size() AS s",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let path = conn
        .path()
        .filter(|p| !p.is_empty())
        .context("the database has no file")?;
    let dir = std::path::Path::new(path)
        .parent()
        .context("the database file has no directory")?;
    let fs = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let growth = max.saturating_sub(count).max(0).saturating_mul(size);
    Ok(free < u64::try_from(growth).unwrap_or(u64::MAX))
}

/// Pages kept under the size cap for what the jobs already accepted still write: their
/// claims, outcomes (an attempt record, an index entry) and failure callbacks. New jobs
/// stop this far below the cap, so a store that open jobs fill keeps recording their
/// outcomes, which then become history that makes room. Without it the submission that
/// filled the last page would leave an outcome that needs a page nowhere to go: the jobs
/// would stay in flight, and nothing would ever make room.
#[derive(Clone, Copy, Debug)]
struct Room {
    /// Pages new jobs may fill (the cap less the reserve).
    pages: i64,
}

impl Room {
    /// A sixteenth of the cap, at least two pages (one for a table, one for an index).
    fn under(conn: &Connection, limits: &Limits) -> rusqlite::Result<Option<Self>> {
        if limits.max_bytes == 0 {
            return Ok(None);
        }
        let max: i64 = conn.query_row("PRAGMA max_page_count", [], |r| r.get(0))?;
        Ok(Some(Self {
            pages: max - (max / 16).max(2),
        }))
    }

    /// Whether the pages in use in `tx` (its own writes included) pass the room.
    fn passed(&self, tx: &Connection) -> rusqlite::Result<bool> {
        let used: i64 = tx
            .prepare_cached(
                "SELECT p.page_count - f.freelist_count \
                 FROM pragma_page_count() AS p, pragma_freelist_count() AS f",
            )?
            .query_row([], |r| r.get(0))?;
        Ok(used > self.pages)
    }
}

/// SQLite's own "full" error, for a batch whose new jobs pass the [`Room`].
fn past_room() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("new jobs would use the room kept for open jobs".into()),
    )
}

/// Whether a batch carries submissions (what [`Admit`] and [`Room`] hold back).
fn submits(batch: &[Command]) -> bool {
    batch
        .iter()
        .any(|c| matches!(c, Command::Insert(..) | Command::InsertAll(..)))
}

pub(super) fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Command>,
    counts: &Counts,
    limits: &Limits,
) {
    let mut sync = Sync::Full;
    let mut handover = Handover::default();
    let room = match Room::under(&conn, limits) {
        Ok(room) => room,
        Err(e) => {
            // Unreadable settings of an open connection: run on the hard cap alone.
            tracing::warn!(error = %e, "cannot read the store's page limit; no room is kept for open jobs");
            None
        }
    };
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let commit = |conn: &mut Connection, admit| {
            let batch = Batch {
                commands: &batch,
                admit,
                room: room.as_ref(),
            };
            commit_batch(conn, batch, counts, limits, &handover)
        };
        // A batch whose sync mode cannot be set is refused, never committed less safely.
        let mut outcome = sync
            .choose(&conn, &batch)
            .and_then(|()| commit(&mut conn, Admit::All));
        // Full (the size cap, or the disk): history makes room before work is refused.
        // The oldest finished jobs go, and the batch is tried once more. If it is still
        // full, the batch commits without its submissions: the claims and outcomes of
        // the jobs already accepted never wait for room that only they can make.
        if outcome.as_ref().is_err_and(is_full) {
            match make_room(&mut conn, counts, ROOM_JOBS) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        jobs = n,
                        "the store is full: the oldest finished jobs were removed to make room"
                    );
                    outcome = commit(&mut conn, Admit::All);
                }
                Err(e) => tracing::warn!(error = %e, "the store is full and no room could be made"),
            }
            if outcome.as_ref().is_err_and(is_full) && submits(&batch) {
                let limit = Limit::binding(&conn, limits);
                outcome = commit(&mut conn, Admit::OpenOnly(limit));
            }
        }
        match outcome {
            Ok(committed) => {
                crate::metrics::get().committed(batch.len(), started.elapsed());
                committed.deltas.apply(counts);
                committed.answer(batch, &mut handover);
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

/// How a commit reaches the disk. A batch that carries new or changed work (a
/// submission, a replay, a deletion) is fsync'd before anyone hears of it: a receipt
/// means the job survives a power loss. A batch of only claims, outcomes and releases
/// (a drain, the hand-over of ordered lanes) is written to the WAL without waiting for
/// the disk: it survives the process being killed (the kernel has it), and a power loss
/// can only take back the latest outcomes, whose jobs are then attempted again
/// (at-least-once, with the same `x-knocker-id`). Each fsync'd commit makes every
/// earlier one durable too.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sync {
    Full,
    Normal,
}

impl Sync {
    fn needed(batch: &[Command]) -> Self {
        let new_work = batch.iter().any(|c| {
            !matches!(
                c,
                Command::Claim { .. } | Command::Finish { .. } | Command::Release { .. }
            )
        });
        if new_work {
            Self::Full
        } else {
            Self::Normal
        }
    }

    /// Sets the connection's `synchronous` for `batch` when it differs from now.
    fn choose(&mut self, conn: &Connection, batch: &[Command]) -> rusqlite::Result<()> {
        let needed = Self::needed(batch);
        if needed != *self {
            let value = match needed {
                Self::Full => "FULL",
                Self::Normal => "NORMAL",
            };
            conn.pragma_update(None, "synchronous", value)?;
            *self = needed;
        }
        Ok(())
    }
}

/// Finished jobs removed at a time when the store is full (oldest first).
const ROOM_JOBS: usize = 1000;

/// One batch in one transaction: each command's outcome and the counts it moved.
///
/// Claims run first. A claim takes the jobs kept for it (see [`Handover`]), then the
/// earliest due rows; the slots it leaves spare go to new jobs due on arrival, in this
/// batch and the ones after it until the next claim: they are written in flight and
/// handed over as they are, not written pending and then read back, decoded and marked
/// by the next claim. Nothing of `handover` changes here: what the batch did to it is
/// applied by [`Committed::answer`] once it is committed.
fn commit_batch(
    conn: &mut Connection,
    Batch {
        commands: batch,
        admit,
        room,
    }: Batch<'_>,
    counts: &Counts,
    limits: &Limits,
    handover: &Handover,
) -> rusqlite::Result<Committed> {
    let mut deltas = Deltas::default();
    let tx = conn.transaction()?;
    let mut spare = handover.spare.clone();
    let mut claims = Vec::new();
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
    let mut kept = handover.ready.iter();
    for command in batch {
        outcomes.push(match command {
            Command::Claim {
                now, limit, caps, ..
            } => {
                let mut taken = std::collections::HashMap::new();
                let from_ready = kept.by_ref().take(*limit).fold(0, |n, job| {
                    caps.take(&mut taken, job.host());
                    n + 1
                });
                let rows = claim(
                    &tx,
                    *now,
                    *limit - from_ready,
                    caps,
                    &mut taken,
                    &mut deltas,
                )?;
                spare = Some(Spare {
                    now: *now,
                    left: *limit - from_ready - rows.len(),
                    caps: caps.clone(),
                    taken,
                });
                claims.push(from_ready);
                Some(Outcome::Claimed(rows))
            }
            _ => None,
        });
    }
    for (command, outcome) in batch.iter().zip(outcomes.iter_mut()) {
        if outcome.is_none() {
            *outcome = Some(match (admit, command) {
                (Admit::OpenOnly(limit), Command::Insert(job, _)) => {
                    Outcome::Inserted(existing_or(&tx, &job.id, Refusal::NoRoom(limit))?)
                }
                (Admit::OpenOnly(limit), Command::InsertAll(..)) => {
                    Outcome::InsertedAll(Err(Refusal::NoRoom(limit)))
                }
                _ => execute(&tx, command, counts, limits, &mut deltas, spare.as_mut())?,
            });
        }
    }
    if let (Admit::All, Some(room)) = (admit, room) {
        if submits(batch) && room.passed(&tx)? {
            return Err(past_room());
        }
    }
    deltas.store(&tx)?;
    tx.commit()?;
    Ok(Committed {
        outcomes: outcomes.into_iter().flatten().collect(),
        deltas,
        spare,
        claims,
    })
}

/// One batch as [`commit_batch`] writes it.
struct Batch<'a> {
    commands: &'a [Command],
    admit: Admit,
    room: Option<&'a Room>,
}

/// What the writer keeps between batches for the delivery loop's claims: the slots the
/// latest claim left spare, and the new jobs written in flight into them since, which
/// the next claim takes first. Bounded by that claim's limit (the delivery loop's free
/// slots). A job kept here is in flight in the database: if the process stops before
/// the next claim, it is recovered as pending, like any claimed job.
#[derive(Default)]
struct Handover {
    spare: Option<Spare>,
    ready: Vec<Job>,
}

/// The slots a claim left spare, and what has filled them in the current batch.
#[derive(Clone)]
struct Spare {
    now: Millis,
    left: usize,
    caps: HostCaps,
    /// Jobs taken per capped host, the claim's own included.
    taken: std::collections::HashMap<String, usize>,
}

impl Spare {
    /// Whether a new job can be handed over as it is written: due on arrival (the
    /// claim's clock may have read a moment before the job's), outside any ordered lane
    /// (its turn is the lane's to give), and its host has room. Counts it if so.
    fn takes(&mut self, job: &Job) -> bool {
        self.left > 0
            && job.lane.is_none()
            && job.next_attempt_at <= self.now.max(job.created_at)
            && self.caps.take(&mut self.taken, job.host())
    }

    /// Gives back a place [`Self::takes`] counted for a job that was not written after
    /// all (its id was stored already).
    fn untake(&mut self, job: &Job) {
        if let Some(n) = self.taken.get_mut(job.host()) {
            *n = n.saturating_sub(1);
        }
    }

    /// Counts a slot filled by a new job written in flight. The job itself moves out of
    /// its command once the batch is committed ([`Committed::answer`]).
    fn hand_over(&mut self) {
        self.left -= 1;
    }
}

/// A committed batch.
struct Committed {
    outcomes: Vec<Outcome>,
    deltas: Deltas,
    /// The slots left spare after it.
    spare: Option<Spare>,
    /// How many kept jobs each of its claims takes, in batch order.
    claims: Vec<usize>,
}

impl Committed {
    /// Answers each command of the batch and applies the batch to `handover`. The new
    /// jobs written in flight move out of their commands (the store is their owner now,
    /// see [`Inserted::Created`]); each claim gets its kept jobs first and the last one
    /// the batch's new jobs; without a claim, they are kept for the next one. Jobs
    /// deleted in the batch are not kept.
    fn answer(self, batch: Vec<Command>, handover: &mut Handover) {
        let mut fresh = Vec::new();
        let mut claimed = Vec::with_capacity(self.claims.len());
        let mut deleted = Vec::new();
        for (command, outcome) in batch.into_iter().zip(self.outcomes) {
            match (command, outcome) {
                (
                    Command::Insert(job, reply),
                    Outcome::Inserted(Ok(Stored::New { handed_over: true })),
                ) => {
                    fresh.push(in_flight(*job));
                    let _ = reply.send(Ok(Inserted::Created));
                }
                (Command::InsertAll(jobs, reply), Outcome::InsertedAll(Ok(stored))) => {
                    let answers = jobs
                        .into_iter()
                        .zip(stored)
                        .map(|(job, stored)| match stored {
                            Stored::New { handed_over } => {
                                if handed_over {
                                    fresh.push(in_flight(job));
                                }
                                Inserted::Created
                            }
                            Stored::Existing(existing) => Inserted::Existing(existing),
                        })
                        .collect();
                    let _ = reply.send(Ok(answers));
                }
                (Command::Claim { reply, .. }, Outcome::Claimed(rows)) => {
                    claimed.push((reply, rows));
                }
                (command, outcome) => {
                    if let (Command::Delete { id, .. }, Outcome::Deleted(true)) =
                        (&command, &outcome)
                    {
                        deleted.push(id.clone());
                    }
                    outcome.send(command);
                }
            }
        }
        let last = claimed.len().saturating_sub(1);
        for (k, ((reply, rows), from_ready)) in claimed.into_iter().zip(self.claims).enumerate() {
            let mut jobs: Vec<Job> = handover.ready.drain(..from_ready).collect();
            jobs.extend(rows);
            if k == last {
                jobs.append(&mut fresh);
            }
            let _ = reply.send(Ok(jobs));
        }
        handover.ready.append(&mut fresh);
        handover.spare = self.spare;
        for id in deleted {
            handover.ready.retain(|job| job.id != id);
        }
    }
}

fn in_flight(mut job: Job) -> Job {
    job.state = State::InFlight;
    job
}

/// Marks up to `limit` due jobs in flight (earliest first, within `caps`, counting
/// them in `taken`); rows that cannot be read are quarantined.
fn claim(
    tx: &Connection,
    now: Millis,
    limit: usize,
    caps: &HostCaps,
    taken: &mut std::collections::HashMap<String, usize>,
    deltas: &mut Deltas,
) -> rusqlite::Result<Vec<Job>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows = due::claim_rows(tx, now, limit, caps, taken, due::WALK)?;
    let mut jobs = Vec::with_capacity(rows.len());
    for (id, seq, lane, job) in rows {
        match job {
            Ok(job) => jobs.push((seq, job)),
            Err(e) => {
                quarantine(tx, &id, lane.as_deref(), &e.to_string(), now)?;
                deltas.moved(Some(State::Pending), Some(State::Failed));
            }
        }
    }
    // By key: the row is found without a seek of the id index.
    let mut mark = tx.prepare_cached("UPDATE jobs SET state = 1 WHERE seq = ?1")?;
    jobs.into_iter()
        .map(|(seq, mut job)| {
            mark.execute([seq])?;
            job.state = State::InFlight;
            deltas.moved(Some(State::Pending), Some(State::InFlight));
            Ok(job)
        })
        .collect()
}

/// SQLite's "database or disk is full": the size cap (`max_page_count`) or the disk.
fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Finished jobs past their retention, the longest finished first, a chunk at a time.
pub(super) const PURGE: &str = "DELETE FROM jobs WHERE seq IN \
     (SELECT seq FROM jobs INDEXED BY jobs_finished \
      WHERE state >= 2 AND finished_at < ?1 ORDER BY finished_at LIMIT ?2) \
     RETURNING state";

/// Removes up to `n` finished jobs, the longest finished first (pending and in-flight
/// jobs are never touched); their pages are reused by what comes next. How many went.
fn make_room(conn: &mut Connection, counts: &Counts, n: usize) -> rusqlite::Result<u64> {
    let mut deltas = Deltas::default();
    let tx = conn.transaction()?;
    // `state >= 2` as a literal: the finished jobs' index (by finished_at) serves it.
    let removed = delete_finished(
        &tx,
        "DELETE FROM jobs WHERE seq IN \
         (SELECT seq FROM jobs WHERE state >= 2 ORDER BY finished_at LIMIT ?1) \
         RETURNING state",
        [n as i64],
        &mut deltas,
    )?;
    deltas.store(&tx)?;
    tx.commit()?;
    deltas.apply(counts);
    Ok(removed)
}

/// Runs a `DELETE … RETURNING state` of finished jobs: each row gone moves its state's
/// count. How many went.
fn delete_finished(
    tx: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    deltas: &mut Deltas,
) -> rusqlite::Result<u64> {
    let mut delete = tx.prepare_cached(sql)?;
    let mut rows = delete.query(params)?;
    let mut removed = 0;
    while let Some(row) = rows.next()? {
        deltas.add(state_from(row.get(0)?), -1);
        removed += 1;
    }
    Ok(removed)
}

/// The result of one command inside a batch, sent once the batch is committed.
enum Outcome {
    Inserted(Result<Stored, Refusal>),
    /// The same, per job of an `InsertAll`.
    InsertedAll(Result<Vec<Stored>, Refusal>),
    Claimed(Vec<Job>),
    /// An outcome recorded; the lane's next job, when it was taken.
    Finished(Option<Box<Job>>),
    Released,
    Replayed(Option<Box<Job>>),
    Deleted(bool),
    Purged(u64),
    Failed(String),
}

impl Outcome {
    fn send(self, command: Command) {
        let failed = |e: &str| StoreError::Unavailable(e.to_owned());
        match (command, self) {
            (Command::Insert(_, reply), Self::Inserted(r)) => {
                let _ = reply.send(r.map(Into::into).map_err(Refusal::error));
            }
            (Command::InsertAll(_, reply), Self::InsertedAll(r)) => {
                let _ = reply.send(
                    r.map(|stored| stored.into_iter().map(Into::into).collect())
                        .map_err(Refusal::error),
                );
            }
            (Command::Claim { reply, .. }, Self::Claimed(jobs)) => drop(reply.send(Ok(jobs))),
            (Command::Finish { reply, .. }, Self::Finished(next)) => {
                drop(reply.send(Ok(next.map(|job| *job))))
            }
            (Command::Release { reply, .. }, Self::Released) => drop(reply.send(Ok(()))),
            (Command::Replay { reply, .. }, Self::Replayed(job)) => {
                drop(reply.send(Ok(job.map(|job| *job))))
            }
            (Command::Delete { reply, .. }, Self::Deleted(existed)) => {
                drop(reply.send(Ok(existed)))
            }
            (Command::Purge { reply, .. }, Self::Purged(n)) => drop(reply.send(Ok(n))),
            (command, Self::Failed(e)) => match command {
                Command::Insert(_, r) => drop(r.send(Err(failed(&e)))),
                Command::InsertAll(_, r) => drop(r.send(Err(failed(&e)))),
                Command::Claim { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Finish { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Release { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Replay { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Delete { reply, .. } => drop(reply.send(Err(failed(&e)))),
                Command::Purge { reply, .. } => drop(reply.send(Err(failed(&e)))),
            },
            _ => {}
        }
    }
}

pub(super) fn load(tx: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_from_row)
        .optional()
}

/// Bytes a new row keeps for its first outcome, in its `slack` column, which the outcome
/// clears. The outcome adds a state that is no longer 0 or 1 (a byte), `finished_at`
/// (six) and the first attempt record (eleven or so): without the slack the row grows,
/// and its page, filled by the rows appended after it, splits and rebalances with its
/// neighbours; with it the row is rewritten in its place. That took the WAL writes per
/// job from 2.8 to 2.56 (a write per page header and page).
const SLACK: usize = 24;

const INSERT: &str =
    "INSERT INTO jobs (id, state, next_attempt_at, created_at, host, spec, attempts, lane, slack)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, x'', ?7, zeroblob(?8)) ON CONFLICT (id) DO NOTHING";

/// What a submission found: its job is new (and whether it was written in flight for
/// the batch's claim), or the job stored with its id.
enum Stored {
    New { handed_over: bool },
    Existing(Box<Job>),
}

impl From<Stored> for Inserted {
    fn from(stored: Stored) -> Self {
        match stored {
            Stored::New { .. } => Self::Created,
            Stored::Existing(job) => Self::Existing(job),
        }
    }
}

/// What [`insert_row`] did.
#[derive(PartialEq)]
enum Written {
    /// A new pending job (or parked, behind its ordered lane).
    Pending,
    /// A new job, written in flight and handed to the batch's claim.
    HandedOver,
    /// Its id was stored already: nothing was written.
    Exists,
}

impl Written {
    fn state(&self) -> State {
        match self {
            Self::HandedOver => State::InFlight,
            Self::Pending | Self::Exists => State::Pending,
        }
    }
}

/// Inserts a new job: pending, parked when it joins an ordered lane with open jobs, or
/// in flight and handed over when a claim left a slot spare for it.
fn insert_row(tx: &Connection, job: &Job, spare: Option<&mut Spare>) -> rusqlite::Result<Written> {
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
    let spare = spare.and_then(|h| h.takes(job).then_some(h));
    let state = if spare.is_some() {
        State::InFlight
    } else {
        State::Pending
    };
    let changed = tx.prepare_cached(INSERT)?.execute(params![
        job.id,
        state_code(state),
        due as i64,
        job.created_at as i64,
        job.host(),
        spec,
        job.lane,
        SLACK as i64
    ])?;
    Ok(match (changed == 1, spare) {
        (true, Some(h)) => {
            h.hand_over();
            Written::HandedOver
        }
        (true, None) => Written::Pending,
        (false, Some(h)) => {
            h.untake(job);
            Written::Exists
        }
        (false, None) => Written::Exists,
    })
}

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
    // What is left in its place: an empty request whose config says why.
    let mut config = serde_json::Map::new();
    config.insert(
        "quarantined".into(),
        serde_json::Value::String(error.clone()),
    );
    let placeholder = Job::new_pending(
        id.to_owned(),
        crate::job::Kind::Target,
        crate::job::Request {
            method: String::new(),
            url: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
        },
        crate::job::Policy {
            timeout: 0.0,
            retries: 0,
            backoff_factor: 0.0,
            callback: None,
            deadline: None,
            max_backoff_s: None,
            callback_trust: crate::job::Trust::Client,
            retry: crate::job::retry::RetryRules::default(),
            source: None,
            rate: None,
        },
        crate::job::Trust::Client,
        now,
    )
    .with_config(config);
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
            encode_spec(&placeholder).map_err(corrupt)?,
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

/// Gives an ordered lane its next job when none of its open jobs is active: the oldest
/// parked one becomes due at `now`.
fn wake_lane(tx: &Connection, lane: &str, now: Millis) -> rusqlite::Result<()> {
    tx.prepare_cached(&WAKE_LANE)?
        .execute(params![lane, now as i64, PARKED as i64])?;
    Ok(())
}

/// A lane's next job (`?1` the lane, `?3` [`PARKED`]): its oldest parked one, unless one
/// of its open jobs is active. Both parts are index seeks (`jobs_lane`,
/// `jobs_lane_active`): the cost of handing a lane on does not grow with the jobs
/// parked in it.
const LANES_NEXT: &str =
    "WHERE seq = (SELECT min(seq) FROM jobs WHERE lane = ?1 AND state <= 1 AND state = 0)
      AND NOT EXISTS (SELECT 1 FROM jobs
                      WHERE lane = ?1 AND state <= 1 AND next_attempt_at < ?3)";

/// The lane's next job becomes due at `?2`. (The statements are made once: they run
/// at every hand-over of a lane.)
pub(super) static WAKE_LANE: LazyLock<String> =
    LazyLock::new(|| format!("UPDATE jobs SET next_attempt_at = ?2 {LANES_NEXT}"));

/// Hands an ordered lane on to its next job and claims it (in flight) for the attempt
/// that just ended the lane's active job: the [`wake_lane`] seeks, but the job goes
/// straight to in flight instead of becoming due, and is answered to that attempt's
/// task, which attempts it next. A lane handed on this way costs one commit and no
/// claim, where [`wake_lane`] leaves the job to the next claim, a commit of its own.
fn take_lane(
    tx: &Connection,
    lane: &str,
    now: Millis,
    deltas: &mut Deltas,
) -> rusqlite::Result<Option<Job>> {
    let taken = tx
        .prepare_cached(&TAKE_LANE)?
        .query_row(params![lane, now as i64, PARKED as i64], |row| {
            Ok((row.get::<_, String>(0)?, job_from_row(row)))
        })
        .optional()?;
    Ok(match taken {
        None => None,
        Some((_, Ok(job))) => {
            deltas.moved(Some(State::Pending), Some(State::InFlight));
            Some(job)
        }
        Some((id, Err(e))) => {
            quarantine(tx, &id, Some(lane), &e.to_string(), now)?;
            deltas.moved(Some(State::Pending), Some(State::Failed));
            None
        }
    })
}

/// The lane's next job taken in flight at once, due at `?2`; it answers the job as
/// stored.
pub(super) static TAKE_LANE: LazyLock<String> = LazyLock::new(|| {
    format!("UPDATE jobs SET state = 1, next_attempt_at = ?2 {LANES_NEXT} RETURNING {COLUMNS}")
});

/// A refused submission — but a resubmission of a stored job still gets its receipt.
fn existing_or(
    tx: &Connection,
    id: &str,
    refusal: Refusal,
) -> rusqlite::Result<Result<Stored, Refusal>> {
    Ok(match load(tx, id)? {
        Some(existing) => Ok(Stored::Existing(Box::new(existing))),
        None => Err(refusal),
    })
}

fn execute(
    tx: &Connection,
    command: &Command,
    counts: &Counts,
    limits: &Limits,
    deltas: &mut Deltas,
    mut spare: Option<&mut Spare>,
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
            let mut stored = Vec::with_capacity(jobs.len());
            for job in jobs {
                stored.push(match insert_row(tx, job, spare.as_deref_mut())? {
                    Written::Exists => Stored::Existing(Box::new(
                        load(tx, &job.id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?,
                    )),
                    written => {
                        deltas.moved(None, Some(written.state()));
                        Stored::New {
                            handed_over: written == Written::HandedOver,
                        }
                    }
                });
            }
            Outcome::InsertedAll(Ok(stored))
        }
        Command::Insert(job, _) => {
            if open >= i128::from(limits.max_pending) {
                let full = Refusal::Full(open.max(0) as u64);
                return Ok(Outcome::Inserted(existing_or(tx, &job.id, full)?));
            }
            match insert_row(tx, job, spare)? {
                Written::Exists => {
                    let existing =
                        load(tx, &job.id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                    Outcome::Inserted(Ok(Stored::Existing(Box::new(existing))))
                }
                written => {
                    deltas.moved(None, Some(written.state()));
                    Outcome::Inserted(Ok(Stored::New {
                        handed_over: written == Written::HandedOver,
                    }))
                }
            }
        }
        // Run before the rest of the batch (`commit_batch`).
        Command::Claim { .. } => Outcome::Claimed(Vec::new()),
        Command::Finish {
            row,
            next,
            take_next,
            ..
        } => {
            let (state, next_at, finished_at) = match next {
                Next::Delivered => (State::Delivered, row.next_attempt_at, Some(row.at)),
                Next::Retry { at } => (State::Pending, *at, None),
                Next::Failed { .. } => (State::Failed, row.next_attempt_at, Some(row.at)),
            };
            let changed = tx
                .prepare_cached(
                    "UPDATE jobs SET state = ?2, next_attempt_at = ?3, finished_at = ?4, attempts = ?5,
                     slack = NULL WHERE id = ?1 AND state = 1",
                )?
                .execute(params![row.id, state_code(state), next_at as i64, finished_at.map(|f| f as i64), row.attempts])?;
            let mut taken = None;
            if changed == 1 {
                deltas.moved(Some(State::InFlight), Some(state));
                if let Next::Failed { callback: Some(cb) } = next {
                    if insert_row(tx, cb, None)? == Written::Pending {
                        deltas.moved(None, Some(State::Pending));
                    }
                }
                if let (Some(lane), Some(at)) = (&row.lane, finished_at) {
                    if *take_next {
                        taken = take_lane(tx, lane, at, deltas)?;
                    } else {
                        wake_lane(tx, lane, at)?;
                    }
                }
            }
            Outcome::Finished(taken.map(Box::new))
        }
        Command::Release { id, .. } => {
            let changed = tx
                .prepare_cached("UPDATE jobs SET state = 0 WHERE id = ?1 AND state = 1")?
                .execute([id])?;
            if changed == 1 {
                deltas.moved(Some(State::InFlight), Some(State::Pending));
            }
            Outcome::Released
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
            Outcome::Replayed(load(tx, id)?.map(Box::new))
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
        Command::Purge { before, limit, .. } => {
            // By the finished jobs' index, never a scan of the table: the writer holds
            // every commit while this runs (`state = ?` alone, bound, did not let SQLite
            // use the partial index; a scan of 545,210 jobs took 80–300 ms, each minute).
            let params = params![*before as i64, *limit as i64];
            Outcome::Purged(delete_finished(tx, PURGE, params, deltas)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Command {
        Command::Claim {
            now: 0,
            limit: 1,
            caps: HostCaps::default(),
            reply: oneshot::channel().0,
        }
    }

    fn release() -> Command {
        Command::Release {
            id: "a".into(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn only_batches_of_claims_and_outcomes_skip_the_fsync() {
        assert_eq!(Sync::needed(&[claim(), release()]), Sync::Normal);
        let job = crate::job::test_job("a", "POST", "http://t/");
        let submission = Command::Insert(Box::new(job), oneshot::channel().0);
        assert_eq!(Sync::needed(&[claim(), submission]), Sync::Full);
        let deletion = Command::Delete {
            id: "a".into(),
            now: 0,
            reply: oneshot::channel().0,
        };
        assert_eq!(Sync::needed(&[deletion, release()]), Sync::Full);
    }

    /// The slack a new row keeps covers what its first outcome adds, so the row is
    /// rewritten in its place; the outcome clears it.
    #[test]
    fn a_new_row_keeps_room_for_its_first_outcome() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::schema::TABLES).unwrap();
        conn.execute_batch(super::super::schema::INDEXES).unwrap();
        conn.execute_batch("INSERT INTO counts (state, n) VALUES (0, 0), (1, 0), (2, 0), (3, 0)")
            .unwrap();
        let mut job = crate::job::test_job("a", "POST", "http://t/");
        job.created_at = 1_764_900_000_000;
        job.next_attempt_at = job.created_at;
        let tx = conn.transaction().unwrap();
        assert!(insert_row(&tx, &job, None).unwrap() == Written::Pending);
        tx.commit().unwrap();
        let row = |conn: &Connection| -> (i64, i64, Option<i64>) {
            conn.query_row(
                "SELECT length(slack), length(attempts), finished_at FROM jobs",
                [],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?.unwrap_or(0),
                        r.get(1)?,
                        r.get(2)?,
                    ))
                },
            )
            .unwrap()
        };
        assert_eq!(row(&conn), (SLACK as i64, 0, None));
        conn.execute("UPDATE jobs SET state = 1", []).unwrap();
        job.state = State::InFlight;
        // A slow, failed first attempt: the longest record of the usual ones.
        let attempt = Attempt {
            at: job.created_at + 30_000,
            status: 503,
            error: None,
            latency_ms: 30_000,
        };
        let finish = Command::Finish {
            row: AttemptRow::new(&job, &attempt).unwrap(),
            next: Next::Delivered,
            take_next: false,
            reply: oneshot::channel().0,
        };
        let tx = conn.transaction().unwrap();
        let limits = Limits {
            max_pending: 10,
            max_bytes: 0,
        };
        execute(
            &tx,
            &finish,
            &Counts::default(),
            &limits,
            &mut Deltas::default(),
            None,
        )
        .unwrap();
        tx.commit().unwrap();
        let (slack, attempts, finished_at) = row(&conn);
        assert_eq!(slack, 0, "the outcome clears the slack");
        assert!(finished_at.is_some());
        // A state byte, a six-byte time and the attempt record fit in what was kept.
        assert!(
            1 + 6 + attempts <= SLACK as i64,
            "{attempts}-byte attempt record"
        );
    }

    /// A 256 KiB store filled with open jobs by submissions, one at a time, then a batch
    /// that brings a claim, an outcome and one more submission together.
    #[test]
    fn a_full_store_commits_a_batchs_claims_and_outcomes_without_its_submissions() {
        use super::super::schema::{open_connection, INDEXES, TABLES};
        let dir = std::env::temp_dir().join(format!("knocker-room-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("knocker.db");
        let limits = Limits {
            max_pending: u64::MAX,
            max_bytes: 256 * 1024,
        };
        let connect = || {
            let conn = open_connection(&path, &limits).unwrap();
            conn.execute_batch(TABLES).unwrap();
            conn.execute_batch(INDEXES).unwrap();
            let counts = Counts::default();
            recover(&conn, &counts).unwrap();
            (conn, counts)
        };
        let big = |id: String| {
            let mut job = crate::job::test_job(&id, "POST", "http://t/");
            job.request.body = vec![7; 4096];
            job
        };

        // Submissions stop short of the cap: the reserve stays free.
        let (conn, counts) = connect();
        let (commands, rx) = mpsc::unbounded_channel();
        let writer = std::thread::spawn(move || write_loop(conn, rx, &counts, &limits));
        let mut open = Vec::new();
        let refusal = loop {
            let job = big(format!("open{}", open.len()));
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Insert(Box::new(job.clone()), reply))
                .unwrap();
            match answer.blocking_recv().unwrap() {
                Ok(_) => open.push(job),
                Err(e) => break e,
            }
            assert!(open.len() < 100, "the capped store never refused");
        };
        drop(commands);
        writer.join().unwrap();
        assert!(
            refusal.to_string().contains("KNOCKER_MAX_STORE_BYTES"),
            "{refusal}"
        );
        let (conn, counts) = connect();
        let (max, used): (i64, i64) = conn
            .query_row(
                "SELECT m.max_page_count, p.page_count - f.freelist_count FROM \
                 pragma_max_page_count() AS m, pragma_page_count() AS p, pragma_freelist_count() AS f",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(max, 32);
        assert!(used <= max - 2, "{used} of {max} pages in use");

        // Queued before the writer starts, the three commands make one batch.
        let (commands, rx) = mpsc::unbounded_channel();
        let (claim_reply, claimed) = oneshot::channel();
        commands
            .send(Command::Claim {
                now: open[0].next_attempt_at,
                limit: 1000,
                caps: HostCaps::default(),
                reply: claim_reply,
            })
            .unwrap();
        let attempt = Attempt {
            at: 5,
            status: 503,
            error: None,
            latency_ms: 2,
        };
        let (finish_reply, finished) = oneshot::channel();
        commands
            .send(Command::Finish {
                row: AttemptRow::new(&open[0], &attempt).unwrap(),
                next: Next::Retry { at: 10_000 },
                take_next: false,
                reply: finish_reply,
            })
            .unwrap();
        let (insert_reply, inserted) = oneshot::channel();
        commands
            .send(Command::Insert(
                Box::new(big("one-more".into())),
                insert_reply,
            ))
            .unwrap();
        drop(commands);
        write_loop(conn, rx, &counts, &limits);

        let claimed = claimed.blocking_recv().unwrap().expect("the claim commits");
        assert_eq!(claimed.len(), open.len());
        finished
            .blocking_recv()
            .unwrap()
            .expect("the outcome commits");
        let refused = inserted.blocking_recv().unwrap().unwrap_err();
        assert!(
            refused.to_string().contains("KNOCKER_MAX_STORE_BYTES"),
            "{refused}"
        );
        let conn = Connection::open(&path).unwrap();
        let states: Vec<(String, i64, i64)> = conn
            .prepare("SELECT id, state, length(attempts) FROM jobs ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(states.len(), open.len(), "nothing of the refused job");
        assert_eq!(states[0].1, 0, "retried: pending again");
        assert!(states[0].2 > 0, "with its attempt recorded");
        assert!(states[1..].iter().all(|(_, state, _)| *state == 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_connection_follows_the_batch() {
        let conn = Connection::open_in_memory().unwrap();
        let mode = |c: &Connection| -> i64 {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
        };
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let mut sync = Sync::Full;
        sync.choose(&conn, &[claim()]).unwrap();
        assert_eq!(mode(&conn), 1, "NORMAL");
        let job = crate::job::test_job("a", "POST", "http://t/");
        sync.choose(
            &conn,
            &[Command::Insert(Box::new(job), oneshot::channel().0)],
        )
        .unwrap();
        assert_eq!(mode(&conn), 2, "FULL");
    }
}
