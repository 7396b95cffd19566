//! Rows of the `jobs` table as the writer reads and changes them: what an attempt's
//! outcome writes, a job read back by its id, an ordered lane handed on to its next job
//! (woken, or taken in flight at once), and the quarantine of rows that cannot be read
//! (a quarantined job hands its lane on too).

use std::sync::LazyLock;

use rusqlite::{params, Connection, OptionalExtension};

use super::counts::Deltas;
use crate::clock::Millis;
use crate::job::{Attempt, Job, State, PARKED};
use crate::store::sqlite::record::{corrupt, encode_spec, job_from_row, COLUMNS};
use crate::store::StoreError;

/// What an attempt's outcome writes to its job's row. Not the job: its request, body and
/// policy stay as they were written, so finishing an attempt copies none of them.
pub(in crate::store::sqlite) struct AttemptRow {
    pub(super) id: String,
    /// The job's attempts, this one last, encoded as the row keeps them.
    pub(super) attempts: Vec<u8>,
    /// When this attempt was made (the finish time of a job it ends).
    pub(super) at: Millis,
    /// The job's due time as it stands (kept when the attempt ends the job).
    pub(super) next_attempt_at: Millis,
    pub(super) lane: Option<String>,
}

impl AttemptRow {
    pub(in crate::store::sqlite) fn new(job: &Job, attempt: &Attempt) -> Result<Self, StoreError> {
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

pub(in crate::store::sqlite) fn load(tx: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_from_row)
        .optional()
}

/// Takes a job whose stored form cannot be read out of the queue: its bytes move to the
/// `quarantine` table with the reason, and the row becomes a failed job whose one
/// attempt record says why — visible in the API, never claimed again.
pub(super) fn quarantine(
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
pub(super) fn wake_lane(tx: &Connection, lane: &str, now: Millis) -> rusqlite::Result<()> {
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
pub(in crate::store::sqlite) static WAKE_LANE: LazyLock<String> =
    LazyLock::new(|| format!("UPDATE jobs SET next_attempt_at = ?2 {LANES_NEXT}"));

/// Hands an ordered lane on to its next job and claims it (in flight) for the attempt
/// that just ended the lane's active job: the [`wake_lane`] seeks, but the job goes
/// straight to in flight instead of becoming due, and is answered to that attempt's
/// task, which attempts it next. A lane handed on this way costs one commit and no
/// claim, where [`wake_lane`] leaves the job to the next claim, a commit of its own.
pub(super) fn take_lane(
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
pub(in crate::store::sqlite) static TAKE_LANE: LazyLock<String> = LazyLock::new(|| {
    format!("UPDATE jobs SET state = 1, next_attempt_at = ?2 {LANES_NEXT} RETURNING {COLUMNS}")
});
