//! Claims: the earliest due rows marked in flight, within the targets' caps.

use rusqlite::Connection;

use super::counts::Deltas;
use super::rows::quarantine;
use crate::clock::Millis;
use crate::job::{Job, State};
use crate::store::sqlite::due;
use crate::store::HostCaps;

pub(super) fn in_flight(mut job: Job) -> Job {
    job.state = State::InFlight;
    job
}

/// Marks up to `limit` due jobs in flight (earliest first, within `caps`, counting
/// them in `taken`); rows that cannot be read are quarantined.
pub(super) fn claim(
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
