//! The size cap: the room new jobs may fill (the rest is kept for the outcomes of jobs
//! already accepted), the oldest finished jobs removed to make room before a submission
//! is refused, and which limit a refusal names.

use rusqlite::Connection;

use super::counts::{Counts, Deltas};
use crate::store::sqlite::record::state_from;
use crate::store::sqlite::Limits;
use crate::store::StoreError;

/// Finished jobs removed at a time when the store is full (oldest first).
pub(super) const ROOM_JOBS: usize = 1000;

/// A command's own refusal (not the batch's): the rest of the batch still commits.
pub(super) enum Refusal {
    /// `KNOCKER_MAX_PENDING`: this many jobs are open.
    Full(u64),
    /// No room for a new job: the store is full up to this limit.
    NoRoom(Limit),
}

impl Refusal {
    pub(super) fn error(self) -> StoreError {
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
pub(super) enum Admit {
    /// All of them, within the room [`Room`] leaves them.
    All,
    /// None: the store is full up to this limit, and the batch's claims, outcomes and
    /// the rest commit without its submissions, which are refused ([`Refusal::NoRoom`]).
    OpenOnly(Limit),
}

/// What a store that takes no more new jobs is full up to. SQLite answers "database or
/// disk is full" for both; the refusal names the one to act on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Limit {
    /// The size cap (`KNOCKER_MAX_STORE_BYTES`), in bytes.
    Cap(u64),
    /// The file system of `KNOCKER_DATA_DIR`.
    Disk,
}

impl Limit {
    /// The disk when there is no cap, or when its file system has less space free than
    /// the database may still grow by under the cap (then the cap is not what stops it);
    /// the cap otherwise, or when the free space cannot be read.
    pub(super) fn binding(conn: &Connection, limits: &Limits) -> Self {
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
pub(super) struct Room {
    /// Pages new jobs may fill (the cap less the reserve).
    pub(super) pages: i64,
}

impl Room {
    /// A sixteenth of the cap, at least two pages (one for a table, one for an index).
    pub(super) fn under(conn: &Connection, limits: &Limits) -> rusqlite::Result<Option<Self>> {
        if limits.max_bytes == 0 {
            return Ok(None);
        }
        let max: i64 = conn.query_row("PRAGMA max_page_count", [], |r| r.get(0))?;
        Ok(Some(Self {
            pages: max - (max / 16).max(2),
        }))
    }

    /// Whether the pages in use in `tx` (its own writes included) pass the room.
    pub(super) fn passed(&self, tx: &Connection) -> rusqlite::Result<bool> {
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
pub(super) fn past_room() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("new jobs would use the room kept for open jobs".into()),
    )
}

/// SQLite's "database or disk is full": the size cap (`max_page_count`) or the disk.
pub(super) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Finished jobs past their retention, the longest finished first, a chunk at a time.
pub(in crate::store::sqlite) const PURGE: &str = "DELETE FROM jobs WHERE seq IN \
     (SELECT seq FROM jobs INDEXED BY jobs_finished \
      WHERE state >= 2 AND finished_at < ?1 ORDER BY finished_at LIMIT ?2) \
     RETURNING state";

/// Removes up to `n` finished jobs, the longest finished first (pending and in-flight
/// jobs are never touched); their pages are reused by what comes next. How many went.
pub(super) fn make_room(conn: &mut Connection, counts: &Counts, n: usize) -> rusqlite::Result<u64> {
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
pub(super) fn delete_finished(
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
