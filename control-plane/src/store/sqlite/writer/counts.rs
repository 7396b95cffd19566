//! The live counts by state: kept by the writer in the same commits as the jobs (the
//! `counts` table), and loaded when the store opens, after the jobs left in flight are
//! made pending again.

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{params, Connection};

use crate::job::State;
use crate::store::sqlite::record::{state_code, state_from};
use crate::store::Stats;

/// Live counts by state, kept by the writer after each commit.
#[derive(Debug, Default)]
pub(in crate::store::sqlite) struct Counts {
    pub(super) pending: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) failed: AtomicU64,
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

    pub(in crate::store::sqlite) fn stats(&self) -> Stats {
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
pub(super) struct Deltas(pub(super) [i64; 4]);

impl Deltas {
    /// `n` jobs more (or fewer, when negative) in `state`.
    pub(super) fn add(&mut self, state: State, n: i64) {
        self.0[state_code(state) as usize] += n;
    }

    /// One job moved from a state (none: it is new) to another (none: it is gone).
    pub(super) fn moved(&mut self, from: Option<State>, to: Option<State>) {
        if let Some(f) = from {
            self.add(f, -1);
        }
        if let Some(t) = to {
            self.add(t, 1);
        }
    }

    /// Adds the changes to the `counts` table (inside the batch's transaction).
    pub(super) fn store(&self, tx: &Connection) -> rusqlite::Result<()> {
        let mut update = tx.prepare_cached("UPDATE counts SET n = n + ?2 WHERE state = ?1")?;
        for (state, delta) in self.0.iter().enumerate() {
            if *delta != 0 {
                update.execute(params![state as i64, delta])?;
            }
        }
        Ok(())
    }

    pub(super) fn apply(&self, counts: &Counts) {
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

/// Makes jobs left in flight pending again and loads the counts by state (computing them
/// once if the table is empty). Returns how many jobs were recovered.
pub(in crate::store::sqlite) fn recover(
    conn: &Connection,
    counts: &Counts,
) -> rusqlite::Result<usize> {
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
