//! The job database's tables and indexes, how a connection to it is opened, the
//! upgrade of an earlier release's tables, and the integrity check at open.

use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::Connection;

use super::super::StoreError;
use super::Limits;

pub(super) const TABLES: &str = "
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
    lane            TEXT,
    -- Bytes a new row keeps for its first outcome (see the writer's `SLACK`).
    slack           BLOB
);
-- Jobs per state, kept in the same commits as the jobs: opening a store with a million
-- jobs must not count them.
CREATE TABLE IF NOT EXISTS counts (state INTEGER PRIMARY KEY, n INTEGER NOT NULL);
-- Stored jobs that could not be read, as they were, and why.
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY, spec BLOB, attempts BLOB, reason TEXT NOT NULL, at INTEGER NOT NULL
);
";

pub(super) const INDEXES: &str = "
-- Partial indexes: besides the keys, a new pending job touches only jobs_due and jobs_host,
-- one handed straight to delivery only jobs_in_flight.
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_attempt_at, seq, host) WHERE state = 0;
-- The same host by host, for a claim to pass a full host's backlog by (see `due`). An
-- index ends with the row's key (`seq`), so it is in due order within a host as it is.
CREATE INDEX IF NOT EXISTS jobs_host ON jobs (host, next_attempt_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (seq) WHERE state = 3;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE state >= 2;
CREATE INDEX IF NOT EXISTS jobs_in_flight ON jobs (seq) WHERE state = 1;
-- Open jobs of ordered lanes, in arrival order.
CREATE INDEX IF NOT EXISTS jobs_lane ON jobs (lane, seq) WHERE lane IS NOT NULL AND state <= 1;
-- Whether a lane has an active (not parked) open job: one seek when a job hands its lane
-- on, however many jobs wait parked behind it.
CREATE INDEX IF NOT EXISTS jobs_lane_active ON jobs (lane, next_attempt_at)
    WHERE lane IS NOT NULL AND state <= 1;
";

/// The page size of a new job database.
pub(super) const PAGE_SIZE: i64 = 8192;

/// The SQLite VFS the store's connections use: `unix-excl`, for a database that one
/// process owns.
///
/// - The first connection takes an exclusive lock on the file and holds it while the
///   process has the database open: a second control plane started on the same
///   `KNOCKER_DATA_DIR` is refused (its recovery would take the first one's jobs in
///   flight for a crash's leftovers and attempt them again). See [`in_use`].
/// - The connections of this process (writer, reader, checkpointer) still coordinate,
///   in memory: the WAL index lives on the heap (no `-shm` file), and the locks every
///   transaction takes are no system calls. A transaction took about seven `fcntl`
///   calls before; at a trickle that was 14 per job.
#[cfg(unix)]
const VFS: &str = "unix-excl";

pub(super) fn open_connection(path: &Path, limits: &Limits) -> rusqlite::Result<Connection> {
    #[cfg(unix)]
    let conn = Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), VFS)?;
    #[cfg(not(unix))]
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A new database only (an existing one keeps its size): every commit writes each
    // page it touched to the WAL (two writes a page), and a commit touches about as many
    // pages whatever their size. With 8 KiB pages the WAL writes per job went from 2.0 to
    // 1.5, and the file is no bigger (546 bytes per delivered job, against 577).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -32_768)?; // 32 MiB

    // Plans never depend on bound values. Without this, a statement whose plan looked
    // at a bound value (the claim's `LIMIT ?`, whose value changes with every claim)
    // was compiled again at its next step: ~120k instructions, once per claim, a tenth
    // of all the control plane spent per job. Our plans come from literals, not values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;

    // Every statement the writer and the readers run stays prepared (rusqlite keeps 16).
    conn.set_prepared_statement_cache_capacity(64);
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

/// Brings a database of an earlier release up to the current tables.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_lane = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'lane'")?
        .exists([])?;
    if !has_lane {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN lane TEXT")?;
    }
    let has_slack = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'slack'")?
        .exists([])?;
    if !has_slack {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN slack BLOB")?;
    }
    Ok(())
}

/// `PRAGMA quick_check`: a damaged file is refused when it opens (naming it), not found
/// out by a claim loop that fails for ever.
pub(super) fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
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

/// Why the database at `path` cannot be opened: another process has it open (the lock
/// [`VFS`] takes, still held after the busy timeout), or it is damaged.
pub(super) fn unopenable(path: &Path, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            in_use(path)
        }
        _ => damaged(path, &e.to_string()),
    }
}

fn in_use(path: &Path) -> StoreError {
    StoreError::Unavailable(format!(
        "the job database {} is in use by another process (a control plane already running \
         on this KNOCKER_DATA_DIR?); one control plane owns a data directory: stop the \
         other, or give this one its own directory",
        path.display()
    ))
}

fn damaged(path: &Path, why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the job database {} is damaged ({why}); restore it from a backup, or move it \
         away to start empty",
        path.display()
    ))
}
