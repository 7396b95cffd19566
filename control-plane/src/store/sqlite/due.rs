//! The due order: which pending jobs a claim takes, and when the next one is due, passing
//! by hosts that take no more.
//!
//! Pending jobs are kept in two partial indexes (`state = 0`): `jobs_due` in due order
//! (`next_attempt_at, seq`), and `jobs_host` in the same order host by host. A claim walks
//! the due order. A host that takes no more (its concurrency, its rate, its open circuit)
//! may own most of that order: a backlog behind its cap. Passing its jobs by one at a time
//! made a claim cost the length of that backlog, and a claim runs each time slots free:
//! a 50,000-job backlog of a target rate-limited to 50 jobs/s kept a core busy, and one
//! host's backlog drained at a third of the speed it does now. So the walk past full
//! hosts is bounded ([`WALK`] index entries); beyond it, the other hosts with pending
//! jobs are found by a skip-scan of `jobs_host` (a seek per host), and their earliest due
//! jobs, read a few at a time, are merged. A claim then costs what it takes, at most
//! [`WALK`] entries, and a few seeks per host with pending jobs, however long a full
//! host's backlog.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use rusqlite::{params, Connection};

use super::record::{job_from_row, COLUMNS};
use crate::clock::Millis;
use crate::job::{Job, PARKED};
use crate::store::HostCaps;

/// Index entries of the due order read past full hosts before a claim (or the next due
/// time) goes host by host instead.
pub(super) const WALK: usize = 64;

/// The statements, each kept prepared by the connection.
mod sql {
    use super::COLUMNS;

    /// Due rows, in due order.
    pub fn claim() -> String {
        format!(
            "SELECT {COLUMNS}, host, seq FROM jobs WHERE state = 0 AND next_attempt_at <= ?1 \
             ORDER BY next_attempt_at, seq LIMIT ?2"
        )
    }

    /// A row by its key.
    pub fn load() -> String {
        format!("SELECT {COLUMNS} FROM jobs WHERE seq = ?1")
    }

    /// Keys and hosts of due jobs after a key, in due order, from `jobs_due` alone.
    pub const WALK_KEYS: &str = "SELECT next_attempt_at, seq, host FROM jobs \
        WHERE state = 0 AND next_attempt_at <= ?1 AND (next_attempt_at, seq) > (?2, ?3) \
        ORDER BY next_attempt_at, seq LIMIT ?4";

    /// Keys of one host's due jobs after a key, in due order (`jobs_host`).
    pub const HOST_KEYS: &str = "SELECT next_attempt_at, seq FROM jobs \
        WHERE state = 0 AND host = ?1 AND next_attempt_at <= ?2 \
        AND (next_attempt_at, seq) > (?3, ?4) ORDER BY next_attempt_at, seq LIMIT ?5";

    /// Every host with a pending job: a skip-scan of `jobs_host`, one seek per host.
    pub const HOSTS: &str = "WITH RECURSIVE hosts(host) AS ( \
        SELECT min(host) FROM jobs WHERE state = 0 \
        UNION ALL \
        SELECT (SELECT min(host) FROM jobs WHERE state = 0 AND host > hosts.host) \
        FROM hosts WHERE hosts.host IS NOT NULL) \
        SELECT host FROM hosts WHERE host IS NOT NULL";

    /// Due times and hosts of pending jobs not parked, in due order.
    pub const WALK_DUE: &str = "SELECT next_attempt_at, host FROM jobs \
        WHERE state = 0 AND next_attempt_at < ?1 ORDER BY next_attempt_at, seq LIMIT ?2";

    /// One host's earliest due time, parked jobs aside.
    pub const HOST_DUE: &str = "SELECT min(next_attempt_at) FROM jobs \
        WHERE state = 0 AND host = ?1 AND next_attempt_at < ?2";
}

/// A due row: its id, its key (`seq`), its lane, and the job as read.
pub(super) type ClaimedRow = (String, i64, Option<String>, rusqlite::Result<Job>);

/// Due rows, earliest first, no more of a host than `caps` allows (each counted in
/// `taken`). `walk` is [`WALK`] but for tests.
pub(super) fn claim_rows(
    tx: &Connection,
    now: Millis,
    limit: usize,
    caps: &HostCaps,
    taken: &mut HashMap<String, usize>,
    walk: usize,
) -> rusqlite::Result<Vec<ClaimedRow>> {
    // Hosts that take nothing, and those the claim's jobs already filled.
    let mut full: HashSet<String> = caps
        .hosts()
        .filter(|(host, _)| is_full(caps, taken, host))
        .map(|(host, _)| host.to_owned())
        .collect();
    let mut rows: Vec<ClaimedRow> = Vec::new();
    let mut after = (i64::MIN, i64::MIN);
    if full.is_empty() {
        // The usual claim: the rows as the due order gives them, until a host fills.
        let mut statement = tx.prepare_cached(&sql::claim())?;
        let mut cursor = statement.query(params![now as i64, limit as i64])?;
        while let Some(row) = cursor.next()? {
            let host: String = row.get(8)?;
            let seq: i64 = row.get(9)?;
            after = (row.get(2)?, seq);
            if !caps.take(taken, &host) {
                full.insert(host); // cannot happen: the walk stops at the first that fills
                break;
            }
            rows.push((row.get(0)?, seq, row.get(7)?, job_from_row(row)));
            if is_full(caps, taken, &host) {
                full.insert(host);
                break;
            }
        }
        if full.is_empty() {
            return Ok(rows);
        }
    }
    let wanted = limit - rows.len();
    if wanted == 0 {
        return Ok(rows);
    }
    let keys = keys_around(tx, now, wanted, after, caps, taken, &mut full, walk)?;
    let mut load = tx.prepare_cached(&sql::load())?;
    for seq in keys {
        let (id, lane, job) = load.query_row([seq], |row| {
            Ok((row.get(0)?, row.get(7)?, job_from_row(row)))
        })?;
        rows.push((id, seq, lane, job));
    }
    Ok(rows)
}

/// Keys (`seq`) of up to `wanted` due jobs after `after` in the due order, earliest
/// first, of hosts not in `full` and within their caps; hosts that fill join `full`.
#[allow(clippy::too_many_arguments)]
fn keys_around(
    tx: &Connection,
    now: Millis,
    wanted: usize,
    mut after: (i64, i64),
    caps: &HostCaps,
    taken: &mut HashMap<String, usize>,
    full: &mut HashSet<String>,
    walk: usize,
) -> rusqlite::Result<Vec<i64>> {
    let mut keys = Vec::new();
    let mut walked = 0;
    {
        // Keys and hosts only: the walk reads the index, not the rows.
        let mut statement = tx.prepare_cached(sql::WALK_KEYS)?;
        let mut cursor = statement.query(params![now as i64, after.0, after.1, walk as i64])?;
        while let Some(row) = cursor.next()? {
            walked += 1;
            after = (row.get(0)?, row.get(1)?);
            let host = row.get_ref(2)?.as_str()?;
            if full.contains(host) || !caps.take(taken, host) {
                continue;
            }
            keys.push(after.1);
            if is_full(caps, taken, host) {
                full.insert(host.to_owned());
            }
            if keys.len() == wanted {
                return Ok(keys);
            }
        }
    }
    if walked < walk {
        return Ok(keys); // the due order ended within the walk
    }
    // Full hosts' jobs filled the walk: host by host from here.
    let more = host_by_host(tx, now, wanted - keys.len(), after, caps, taken, full, walk)?;
    keys.extend(more);
    Ok(keys)
}

/// Keys of up to `wanted` due jobs after `after`, earliest first, of hosts not in `full`
/// and within their caps: each host's earliest due jobs (`jobs_host`), read a few at a
/// time, merged.
#[allow(clippy::too_many_arguments)]
fn host_by_host(
    tx: &Connection,
    now: Millis,
    wanted: usize,
    after: (i64, i64),
    caps: &HostCaps,
    taken: &mut HashMap<String, usize>,
    full: &HashSet<String>,
    walk: usize,
) -> rusqlite::Result<Vec<i64>> {
    let chunk = (walk / 4).max(1);
    let mut statement = tx.prepare_cached(sql::HOST_KEYS)?;
    let mut read = |host: &str, after: (i64, i64), n: usize| -> rusqlite::Result<VecDeque<_>> {
        statement
            .query_map(params![host, now as i64, after.0, after.1, n as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect()
    };
    let mut hosts: Vec<PerHost> = Vec::new();
    // Each host's earliest key not yet taken: (due, seq, index in `hosts`).
    let mut heads = BinaryHeap::new();
    for host in pending_hosts(tx)? {
        if full.contains(&host) {
            continue;
        }
        let room = caps
            .room(taken, &host)
            .map_or(wanted, |room| room.min(wanted));
        if room == 0 {
            continue;
        }
        let n = room.min(chunk);
        let ahead = read(&host, after, n)?;
        if let Some(&(at, seq)) = ahead.front() {
            heads.push(Reverse((at, seq, hosts.len())));
            hosts.push(PerHost {
                more: ahead.len() == n && n < room,
                host,
                room,
                ahead,
            });
        }
    }
    let mut keys = Vec::new();
    while keys.len() < wanted {
        let Some(Reverse((_, seq, i))) = heads.pop() else {
            break;
        };
        let h = &mut hosts[i];
        let Some(last) = h.ahead.pop_front() else {
            continue; // cannot happen: a host is in the heap by a key it read
        };
        caps.take(taken, &h.host);
        keys.push(seq);
        h.room -= 1;
        if h.ahead.is_empty() && h.more && h.room > 0 {
            let n = h.room.min(chunk);
            h.ahead = read(&h.host, last, n)?;
            h.more = h.ahead.len() == n && n < h.room;
        }
        if let (true, Some(&(at, seq))) = (h.room > 0, h.ahead.front()) {
            heads.push(Reverse((at, seq, i)));
        }
    }
    Ok(keys)
}

/// A host in the merge: its keys read ahead, and how many more it may give.
struct PerHost {
    host: String,
    room: usize,
    ahead: VecDeque<(i64, i64)>,
    /// Whether the host may have due jobs past those read.
    more: bool,
}

/// Whether `host` has taken all its cap allows.
fn is_full(caps: &HostCaps, taken: &HashMap<String, usize>, host: &str) -> bool {
    caps.room(taken, host) == Some(0)
}

/// Every host with a pending job (due or not, parked included), one seek each in
/// `jobs_host`.
fn pending_hosts(c: &Connection) -> rusqlite::Result<Vec<String>> {
    c.prepare_cached(sql::HOSTS)?
        .query_map([], |r| r.get(0))?
        .collect()
}

/// When the earliest pending job of a host not in `skipped` is due (parked jobs are not
/// due until their lane moves). `walk` is [`WALK`] but for tests.
pub(super) fn next_due(
    c: &Connection,
    skipped: &HashSet<String>,
    walk: usize,
) -> rusqlite::Result<Option<Millis>> {
    let mut statement = c.prepare_cached(sql::WALK_DUE)?;
    let mut cursor = statement.query(params![PARKED as i64, walk as i64])?;
    let mut walked = 0;
    while let Some(row) = cursor.next()? {
        walked += 1;
        if !skipped.contains(row.get_ref(1)?.as_str()?) {
            return Ok(Some(row.get::<_, i64>(0)? as Millis));
        }
    }
    if walked < walk {
        return Ok(None);
    }
    let mut earliest = c.prepare_cached(sql::HOST_DUE)?;
    let mut first: Option<i64> = None;
    for host in pending_hosts(c)? {
        if skipped.contains(&host) {
            continue;
        }
        let at: Option<i64> = earliest.query_row(params![host, PARKED as i64], |r| r.get(0))?;
        first = match (first, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(first.map(|at| at as Millis))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::sqlite::record::encode_spec;
    use crate::store::sqlite::schema::{INDEXES, TABLES};

    fn database() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(TABLES).unwrap();
        conn.execute_batch(INDEXES).unwrap();
        conn
    }

    /// A pending job `id` of `host`, due at `due`.
    fn add(conn: &Connection, id: &str, host: &str, due: i64) {
        let job = crate::job::test_job(id, "POST", &format!("http://{host}/p"));
        conn.execute(
            "INSERT INTO jobs (id, state, next_attempt_at, created_at, host, spec, attempts) \
             VALUES (?1, 0, ?2, 0, ?3, ?4, x'')",
            params![id, due, host, encode_spec(&job).unwrap()],
        )
        .unwrap();
    }

    /// `n` pending jobs of `host`, due from 1 to `n`.
    fn backlog(conn: &Connection, host: &str, n: i64) {
        let job = crate::job::test_job("", "POST", &format!("http://{host}/p"));
        conn.execute(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2) \
             INSERT INTO jobs (id, state, next_attempt_at, created_at, host, spec, attempts) \
             SELECT ?1 || '-' || i, 0, i, 0, ?1, ?3, x'' FROM k",
            params![host, n, encode_spec(&job).unwrap()],
        )
        .unwrap();
    }

    fn claim_ids(
        conn: &Connection,
        now: Millis,
        limit: usize,
        caps: &HostCaps,
        taken: &mut HashMap<String, usize>,
        walk: usize,
    ) -> Vec<String> {
        claim_rows(conn, now, limit, caps, taken, walk)
            .unwrap()
            .into_iter()
            .map(|(id, _, _, job)| {
                assert_eq!(job.unwrap().id, id);
                id
            })
            .collect()
    }

    /// Virtual-machine steps of every statement here on `conn`, so far: the work of a
    /// claim, counted the same on any machine.
    fn steps(conn: &Connection) -> i64 {
        [
            sql::claim(),
            sql::load(),
            sql::WALK_KEYS.to_owned(),
            sql::HOST_KEYS.to_owned(),
            sql::HOSTS.to_owned(),
            sql::WALK_DUE.to_owned(),
            sql::HOST_DUE.to_owned(),
        ]
        .iter()
        .map(|sql| {
            i64::from(
                conn.prepare_cached(sql)
                    .unwrap()
                    .get_status(rusqlite::StatementStatus::VmStep),
            )
        })
        .sum()
    }

    /// A host that takes nothing, or fills in the claim, holds a backlog ahead of another
    /// host's jobs: the claim and the next due time find the other host's jobs, and what
    /// they cost does not grow with the backlog passed by.
    #[test]
    fn a_full_hosts_backlog_is_passed_by_at_a_cost_that_does_not_grow_with_it() {
        let mut cost = Vec::new();
        for n in [5_000, 50_000] {
            let conn = database();
            backlog(&conn, "full", n);
            for (i, id) in ["other-a", "other-b", "other-c"].iter().enumerate() {
                add(&conn, id, "other", n + 1 + i as i64);
            }
            let now = (n + 10) as Millis;
            let mut caps = HostCaps::default();
            caps.cap("full", 0);
            let ids = claim_ids(&conn, now, 10, &caps, &mut HashMap::new(), WALK);
            assert_eq!(ids, ["other-a", "other-b", "other-c"], "a backlog of {n}");
            let skipped = HashSet::from(["full".to_owned()]);
            assert_eq!(
                next_due(&conn, &skipped, WALK).unwrap(),
                Some(n as Millis + 1)
            );
            // A cap of two: the claim fills the host, then passes the rest of it by.
            let mut caps = HostCaps::default();
            caps.cap("full", 2);
            let ids = claim_ids(&conn, now, 10, &caps, &mut HashMap::new(), WALK);
            assert_eq!(
                ids,
                ["full-1", "full-2", "other-a", "other-b", "other-c"],
                "a backlog of {n}"
            );
            cost.push(steps(&conn));
        }
        let (small, big) = (cost[0], cost[1]);
        // Passing the backlog by one job at a time cost ten times as much for ten times
        // the backlog; now only the depth of the index grows.
        assert!(
            big < small + small / 2,
            "{small} steps past 5,000 jobs, {big} past 50,000"
        );
    }

    /// What a greedy pass over the due order takes: each due job, earliest first, whose
    /// host has room.
    fn expected(
        jobs: &[(usize, i64)],
        now: i64,
        limit: usize,
        caps: &[Option<usize>],
        taken: &[usize],
    ) -> Vec<String> {
        let mut due: Vec<(i64, usize, usize)> = jobs
            .iter()
            .enumerate()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(seq, (host, at))| (*at, seq, *host))
            .collect();
        due.sort_unstable();
        let mut taken = taken.to_vec();
        let mut ids = Vec::new();
        for (_, seq, host) in due {
            if ids.len() == limit {
                break;
            }
            if let Some(cap) = caps[host] {
                if taken[host] >= cap {
                    continue;
                }
                taken[host] += 1;
            }
            ids.push(format!("j{seq}"));
        }
        ids
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever the walk's length, a claim takes what a pass over the due order,
        /// host caps and all, would take, in that order; and the next due time is the
        /// earliest of the hosts not skipped.
        #[test]
        fn a_claim_takes_what_the_due_order_gives_within_the_caps(
            jobs in prop::collection::vec((0usize..4, prop_oneof![0i64..20, Just(PARKED as i64)]), 0..40),
            caps in prop::collection::vec(prop::option::of(0usize..4), 4),
            taken in prop::collection::vec(0usize..3, 4),
            limit in 1usize..12,
            walk in prop_oneof![Just(1usize), Just(2), Just(3), Just(WALK)],
        ) {
            let conn = database();
            for (seq, (host, at)) in jobs.iter().enumerate() {
                add(&conn, &format!("j{seq}"), &format!("h{host}"), *at);
            }
            let now = 10;
            let mut host_caps = HostCaps::default();
            let mut already = HashMap::new();
            for (host, cap) in caps.iter().enumerate() {
                if let Some(cap) = cap {
                    host_caps.cap(&format!("h{host}"), *cap);
                    already.insert(format!("h{host}"), taken[host]);
                }
            }
            let taken: Vec<usize> = (0..4).map(|h| if caps[h].is_some() { taken[h] } else { 0 }).collect();
            prop_assert_eq!(
                claim_ids(&conn, now as Millis, limit, &host_caps, &mut already, walk),
                expected(&jobs, now, limit, &caps, &taken)
            );

            let skipped: HashSet<String> = (0..4)
                .filter(|h| caps[*h] == Some(0))
                .map(|h| format!("h{h}"))
                .collect();
            let first = jobs
                .iter()
                .filter(|(host, at)| *at < PARKED as i64 && !skipped.contains(&format!("h{host}")))
                .map(|(_, at)| *at as Millis)
                .min();
            prop_assert_eq!(next_due(&conn, &skipped, walk).unwrap(), first);
        }
    }
}
