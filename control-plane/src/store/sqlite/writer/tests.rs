//! The writer's own tests: which batches are fsync'd and how the connection follows
//! them, the slack a new row keeps for its first outcome, and a full store's batches.

use super::insert::SLACK;
use super::*;
use crate::job::Attempt;

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
    let mode =
        |c: &Connection| -> i64 { c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap() };
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
