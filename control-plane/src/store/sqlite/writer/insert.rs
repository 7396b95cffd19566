//! New jobs' rows: written pending, or in flight into the slots the latest claim left
//! spare and handed over to delivery as they are; each keeps slack for its first outcome.

use rusqlite::{params, Connection};

use crate::clock::Millis;
use crate::job::{Job, State, PARKED};
use crate::store::sqlite::record::{corrupt, encode_spec, state_code};
use crate::store::{HostCaps, Inserted};

/// What the writer keeps between batches for the delivery loop's claims: the slots the
/// latest claim left spare, and the new jobs written in flight into them since, which
/// the next claim takes first. Bounded by that claim's limit (the delivery loop's free
/// slots). A job kept here is in flight in the database: if the process stops before
/// the next claim, it is recovered as pending, like any claimed job.
#[derive(Default)]
pub(super) struct Handover {
    pub(super) spare: Option<Spare>,
    pub(super) ready: Vec<Job>,
}

/// The slots a claim left spare, and what has filled them in the current batch.
#[derive(Clone)]
pub(super) struct Spare {
    pub(super) now: Millis,
    pub(super) left: usize,
    pub(super) caps: HostCaps,
    /// Jobs taken per capped host, the claim's own included.
    pub(super) taken: std::collections::HashMap<String, usize>,
}

impl Spare {
    /// Whether a new job can be handed over as it is written: due on arrival (the
    /// claim's clock may have read a moment before the job's), outside any ordered lane
    /// (its turn is the lane's to give), and its host has room. Counts it if so.
    pub(super) fn takes(&mut self, job: &Job) -> bool {
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

/// Bytes a new row keeps for its first outcome, in its `slack` column, which the outcome
/// clears. The outcome adds a state that is no longer 0 or 1 (a byte), `finished_at`
/// (six) and the first attempt record (eleven or so): without the slack the row grows,
/// and its page, filled by the rows appended after it, splits and rebalances with its
/// neighbours; with it the row is rewritten in its place. That took the WAL writes per
/// job from 2.8 to 2.56 (a write per page header and page).
pub(super) const SLACK: usize = 24;

const INSERT: &str =
    "INSERT INTO jobs (id, state, next_attempt_at, created_at, host, spec, attempts, lane, slack)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, x'', ?7, zeroblob(?8)) ON CONFLICT (id) DO NOTHING";

/// What a submission found: its job is new (and whether it was written in flight for
/// the batch's claim), or the job stored with its id.
pub(super) enum Stored {
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
pub(super) enum Written {
    /// A new pending job (or parked, behind its ordered lane).
    Pending,
    /// A new job, written in flight and handed to the batch's claim.
    HandedOver,
    /// Its id was stored already: nothing was written.
    Exists,
}

impl Written {
    pub(super) fn state(&self) -> State {
        match self {
            Self::HandedOver => State::InFlight,
            Self::Pending | Self::Exists => State::Pending,
        }
    }
}

/// Inserts a new job: pending, parked when it joins an ordered lane with open jobs, or
/// in flight and handed over when a claim left a slot spare for it.
pub(super) fn insert_row(
    tx: &Connection,
    job: &Job,
    spare: Option<&mut Spare>,
) -> rusqlite::Result<Written> {
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
