//! The behaviour every engine must have, run against each of them: memory, SQLite and
//! NATS (a real nats-server on a loopback port).
//!
//! NATS schedules in real time (the server redelivers a retried message when it is
//! due), so its times here are the real clock's plus the same small offsets, its claims
//! are retried until the expected jobs arrive (bounded), and where the engines differ by
//! design the difference is stated: it claims in arrival order rather than earliest
//! first, `next_due` only says "soon", and its finished buckets expire entries
//! themselves (`purge_finished` has nothing to do). Engine-specific behaviour — a
//! SQLite reopen, the NATS lanes' cluster-wide consumers — has its own tests.

use std::time::Duration;

use super::memory::MemoryStore;
use super::nats::tests::NatsServer;
use super::sqlite::{Limits, SqliteStore};
use super::{HostCaps, Inserted, Next, Stats, Store, StoreError};
use crate::clock::{Clock as _, SystemClock};
use crate::job::{test_job, Attempt, Job, Kind, Policy, State};

fn job(id: &str, host: &str, due: u64) -> Job {
    let mut job = test_job(id, "POST", &format!("http://{host}/p?q=1"));
    job.request.headers = vec![("x-a".into(), vec![0xff, b'1'])];
    job.request.body = vec![0, 1, 2, 255];
    job.policy = Policy {
        timeout: 1.5,
        retries: 2,
        backoff_factor: 0.5,
        callback: Some("http://cb/".into()),
        deadline: None,
        max_backoff_s: None,
        callback_trust: crate::job::Trust::Operator,
        retry: crate::job::retry::RetryRules::default(),
        source: None,
        rate: None,
    };
    job.config = serde_json::json!({"id": id, "knocker-x": "y"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    job.next_attempt_at = due;
    job.created_at = due;
    job
}

fn attempt(at: u64, status: u16) -> Attempt {
    Attempt {
        at,
        status,
        error: None,
        latency_ms: 3,
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("knocker-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn limits() -> Limits {
    Limits {
        max_pending: 1_000_000,
        max_bytes: 0,
    }
}

/// One engine under test.
struct Engine {
    name: &'static str,
    store: Box<dyn Store>,
    /// Its times: 0 for the engines that take `now` as given, the real clock for NATS.
    t0: u64,
    /// NATS: real-time scheduling, arrival order, self-expiring finished entries.
    nats: Option<NatsServer>,
}

impl Engine {
    fn at(&self, offset: u64) -> u64 {
        self.t0 + offset
    }

    /// Claims until `expected` jobs came (NATS redelivers in real time; the others
    /// answer at once), at most 5 s; then the ids, in the order they came.
    async fn claim(&self, now: u64, limit: usize, skip: &[String], expected: usize) -> Vec<Job> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut claimed = Vec::new();
        loop {
            let more = self
                .store
                .claim_due(now, limit - claimed.len(), &HostCaps::skipping(skip))
                .await
                .unwrap();
            claimed.extend(more);
            if self.nats.is_none()
                || claimed.len() >= expected
                || std::time::Instant::now() > deadline
            {
                return claimed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ids as claimed: in order for the engines that promise earliest first, sorted for
    /// NATS (arrival order).
    fn ids(&self, jobs: &[Job]) -> Vec<String> {
        let mut ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        if self.nats.is_some() {
            ids.sort();
        }
        ids
    }
}

async fn engines(name: &str) -> Vec<Engine> {
    let nats = NatsServer::start(name);
    let nats_store = nats.store(Duration::from_secs(30)).await;
    vec![
        Engine {
            name: "memory",
            store: Box::new(MemoryStore::default()),
            t0: 0,
            nats: None,
        },
        Engine {
            name: "sqlite",
            store: Box::new(SqliteStore::open(&temp_dir(name), limits()).unwrap()),
            t0: 0,
            nats: None,
        },
        Engine {
            name: "nats",
            store: Box::new(nats_store),
            t0: SystemClock.now_ms(),
            nats: Some(nats),
        },
    ]
}

#[tokio::test]
async fn insert_is_idempotent_by_id() {
    for e in engines("insert").await {
        let (engine, store) = (e.name, &e.store);
        let first = store.insert(job("a", "h", e.at(10))).await.unwrap();
        assert!(matches!(first, Inserted::Created), "{engine}");
        let mut again = job("a", "other", e.at(99));
        again.request.body = b"different".to_vec();
        match store.insert(again).await.unwrap() {
            Inserted::Existing(existing) => {
                assert_eq!(existing.request.body, vec![0, 1, 2, 255], "{engine}");
                assert_eq!(
                    existing.request.headers,
                    vec![("x-a".to_owned(), vec![0xff, b'1'])],
                    "{engine}"
                );
                assert_eq!(existing.config["knocker-x"], "y", "{engine}");
            }
            other => panic!("{engine}: {other:?}"),
        }
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                pending: 1,
                ..Stats::default()
            },
            "{engine}"
        );
        assert_eq!(
            store.get("a").await.unwrap().unwrap(),
            job("a", "h", e.at(10)),
            "{engine}: round trip"
        );
    }
}

#[tokio::test]
async fn claims_due_jobs_skipping_saturated_hosts_each_once() {
    for e in engines("claim").await {
        let (engine, store) = (e.name, &e.store);
        for (id, host, due) in [
            ("late", "h1", 50),
            ("b", "h2", 20),
            ("a", "h1", 10),
            ("c", "slow", 15),
            ("d", "h1", 20),
        ] {
            store.insert(job(id, host, e.at(due))).await.unwrap();
        }
        if e.nats.is_none() {
            assert_eq!(
                store.next_due(&HostCaps::default()).await.unwrap(),
                Some(10),
                "{engine}"
            );
            let h1_full = HostCaps::skipping(&["h1".to_owned()]);
            assert_eq!(
                store.next_due(&h1_full).await.unwrap(),
                Some(15),
                "{engine}: a host without room is left out"
            );
        }
        let slow = ["slow".to_owned()];
        let claimed = e.claim(e.at(30), 10, &slow, 3).await;
        assert_eq!(
            e.ids(&claimed),
            ["a", "b", "d"],
            "{engine}: due (earliest first where promised), without the saturated host"
        );
        assert!(claimed.iter().all(|j| j.state == State::InFlight));
        assert!(
            store
                .claim_due(e.at(30), 10, &HostCaps::skipping(&slow))
                .await
                .unwrap()
                .is_empty(),
            "{engine}: claimed once"
        );
        let limited = e.claim(e.at(100), 1, &[], 1).await;
        assert_eq!(limited.len(), 1, "{engine}");
        if e.nats.is_none() {
            assert_eq!(limited[0].id, "c", "{engine}: the earliest");
        }
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                pending: 1,
                in_flight: 4,
                ..Stats::default()
            },
            "{engine}"
        );
    }
}

#[tokio::test]
async fn caps_bound_each_hosts_share_of_a_claim_and_a_released_job_keeps_its_turn() {
    for e in engines("caps").await {
        let (engine, store) = (e.name, &e.store);
        for (id, host, due) in [
            ("h1-a", "h1", 10),
            ("h1-b", "h1", 11),
            ("h1-c", "h1", 12),
            ("h2-a", "h2", 13),
            ("h3-a", "h3", 14),
        ] {
            store.insert(job(id, host, e.at(due))).await.unwrap();
        }
        let mut caps = HostCaps::default();
        caps.cap("h1", 2);
        caps.cap("h3", 0);
        let mut claimed = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while claimed.len() < 3 && std::time::Instant::now() < deadline {
            claimed.extend(store.claim_due(e.at(30), 10, &caps).await.unwrap());
            if e.nats.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut ids = e.ids(&claimed);
        ids.sort();
        assert_eq!(
            ids,
            ["h1-a", "h1-b", "h2-a"],
            "{engine}: two of h1, none of h3"
        );
        // Given back untouched: pending, due when it was, no attempt spent.
        let first = claimed.iter().find(|j| j.id == "h1-a").unwrap();
        store.release(first).await.unwrap();
        let back = store.get("h1-a").await.unwrap().unwrap();
        assert_eq!(back.state, State::Pending, "{engine}");
        assert!(back.attempts.is_empty(), "{engine}");
        assert_eq!(back.next_attempt_at, e.at(10), "{engine}");
        let again = e.claim(e.at(30), 10, &[], 3).await;
        let mut ids = e.ids(&again);
        ids.sort();
        assert_eq!(ids, ["h1-a", "h1-c", "h3-a"], "{engine}: claimed again");
        if e.nats.is_none() {
            assert_eq!(e.ids(&again)[0], "h1-a", "{engine}: in its old turn");
        }
    }
}

#[tokio::test]
async fn a_targets_backlog_counts_its_pending_jobs_not_those_in_flight() {
    for e in engines("backlog").await {
        let (engine, store) = (e.name, &e.store);
        for (id, host) in [("a1", "a:1"), ("a2", "a:1"), ("a3", "a:1"), ("b1", "b:2")] {
            store.insert(job(id, host, e.at(10))).await.unwrap();
        }
        let backlogs = || async {
            let mut out = Vec::new();
            for host in ["a:1", "b:2", "c:3"] {
                out.push(store.backlog(host).await.unwrap());
            }
            out
        };
        assert_eq!(backlogs().await, [Some(3), Some(1), Some(0)], "{engine}");
        let claimed = e.claim(e.at(30), 10, &["b:2".to_owned()], 3).await;
        assert_eq!(e.ids(&claimed), ["a1", "a2", "a3"], "{engine}");
        assert_eq!(
            backlogs().await,
            [Some(0), Some(1), Some(0)],
            "{engine}: in flight is not backlog"
        );
        let by_id = |id: &str| claimed.iter().find(|j| j.id == id).unwrap();
        store
            .finish_attempt(
                by_id("a1"),
                attempt(e.at(31), 503),
                Next::Retry {
                    at: e.at(1_000_000),
                },
            )
            .await
            .unwrap();
        store
            .finish_attempt(by_id("a2"), attempt(e.at(31), 200), Next::Delivered)
            .await
            .unwrap();
        store.release(by_id("a3")).await.unwrap();
        assert_eq!(
            backlogs().await,
            [Some(2), Some(1), Some(0)],
            "{engine}: a retry and a released job wait again; a delivered one is gone"
        );
    }
}

#[tokio::test]
async fn finishing_records_attempts_and_commits_the_callback_with_the_failure() {
    for e in engines("finish").await {
        let (engine, store) = (e.name, &e.store);
        store.insert(job("r", "h", e.at(0))).await.unwrap();
        store.insert(job("f", "h", e.at(0))).await.unwrap();
        let claimed = e.claim(e.at(0), 10, &[], 2).await;
        let r = claimed.iter().find(|j| j.id == "r").unwrap();
        let f = claimed.iter().find(|j| j.id == "f").unwrap();
        store
            .finish_attempt(r, attempt(e.at(1), 500), Next::Retry { at: e.at(100) })
            .await
            .unwrap();
        let mut callback = job("f:callback", "cb", e.at(7));
        callback.kind = Kind::Callback;
        store
            .finish_attempt(
                f,
                attempt(e.at(2), 503),
                Next::Failed {
                    callback: Some(Box::new(callback)),
                },
            )
            .await
            .unwrap();

        let r = store.get("r").await.unwrap().unwrap();
        assert_eq!(
            (r.state, r.next_attempt_at, r.attempts.clone()),
            (State::Pending, e.at(100), vec![attempt(e.at(1), 500)]),
            "{engine}"
        );
        let f = store.get("f").await.unwrap().unwrap();
        assert_eq!(
            (f.state, f.finished_at),
            (State::Failed, Some(e.at(2))),
            "{engine}"
        );
        let cb = store.get("f:callback").await.unwrap().unwrap();
        assert_eq!(
            (cb.kind, cb.state),
            (Kind::Callback, State::Pending),
            "{engine}"
        );

        let again = e.claim(e.at(100), 10, &[], 2).await;
        assert_eq!(again.len(), 2, "{engine}: the retry and the callback");
        let r = again.iter().find(|j| j.id == "r").unwrap();
        assert_eq!(
            r.attempts.len(),
            1,
            "{engine}: a claimed job carries its history"
        );
        store
            .finish_attempt(r, attempt(e.at(101), 200), Next::Delivered)
            .await
            .unwrap();
        let r = store.get("r").await.unwrap().unwrap();
        assert_eq!(r.state, State::Delivered);
        assert_eq!(
            r.attempts,
            vec![attempt(e.at(1), 500), attempt(e.at(101), 200)],
            "{engine}"
        );
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                pending: 0,
                in_flight: 1,
                delivered: 1,
                failed: 1
            },
            "{engine}"
        );
    }
}

#[tokio::test]
async fn list_replay_delete_and_purge() {
    for e in engines("admin").await {
        let (engine, store) = (e.name, &e.store);
        for i in 0..5 {
            let mut j = job(&format!("j{i}"), "h", e.at(0));
            j.created_at = e.at(i); // arrival order, on every engine
            store.insert(j).await.unwrap();
        }
        for j in e.claim(e.at(0), 10, &[], 5).await {
            let next = if j.id == "j2" {
                Next::Delivered
            } else {
                Next::Failed { callback: None }
            };
            store
                .finish_attempt(&j, attempt(e.at(10), 500), next)
                .await
                .unwrap();
        }
        let page1 = store.list(State::Failed, None, 2).await.unwrap();
        let page2 = store
            .list(State::Failed, Some(&page1[1].id), 2)
            .await
            .unwrap();
        let ids: Vec<&str> = page1.iter().chain(&page2).map(|j| j.id.as_str()).collect();
        assert_eq!(
            ids,
            ["j0", "j1", "j3", "j4"],
            "{engine}: oldest first, paginated"
        );

        let replayed = store.replay("j0", e.at(50)).await.unwrap().unwrap();
        assert_eq!(
            (replayed.state, replayed.next_attempt_at),
            (State::Pending, e.at(50)),
            "{engine}"
        );
        assert_eq!(replayed.attempts.len(), 1, "{engine}: history kept");
        assert!(store.replay("nope", e.at(50)).await.unwrap().is_none());
        let claimed = e.claim(e.at(50), 10, &[], 1).await;
        assert_eq!(claimed.len(), 1, "{engine}");
        let untouched = store.replay("j0", e.at(60)).await.unwrap().unwrap();
        assert_eq!(
            untouched.state,
            State::InFlight,
            "{engine}: an unfinished job is left alone"
        );

        assert!(store.delete("j1", e.at(0)).await.unwrap(), "{engine}");
        assert!(!store.delete("j1", e.at(0)).await.unwrap(), "{engine}");
        assert!(store.get("j1").await.unwrap().is_none(), "{engine}");

        if e.nats.is_none() {
            assert_eq!(
                store.purge_finished(e.at(11)).await.unwrap(),
                3,
                "{engine}: j2, j3, j4 finished at 10"
            );
            assert_eq!(store.purge_finished(e.at(11)).await.unwrap(), 0);
        }
        // NATS: the finished buckets expire entries at KNOCKER_RETENTION themselves.
        let finished = if e.nats.is_some() { (1, 2) } else { (0, 0) };
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                in_flight: 1,
                delivered: finished.0,
                failed: finished.1,
                ..Stats::default()
            },
            "{engine}: moved and deleted jobs are not counted"
        );
    }
}

#[tokio::test]
async fn sqlite_keeps_everything_across_a_reopen_and_recovers_in_flight_jobs() {
    let dir = temp_dir("reopen");
    {
        let store = SqliteStore::open(&dir, limits()).unwrap();
        for i in 0..3 {
            store.insert(job(&format!("k{i}"), "h", 0)).await.unwrap();
        }
        let claimed = store.claim_due(0, 2, &HostCaps::default()).await.unwrap();
        store
            .finish_attempt(&claimed[0], attempt(1, 200), Next::Delivered)
            .await
            .unwrap();
        // claimed[1] stays in flight: the process "dies" here.
    }
    let store = SqliteStore::open(&dir, limits()).unwrap();
    assert_eq!(
        store.stats().await.unwrap(),
        Stats {
            pending: 2,
            delivered: 1,
            ..Stats::default()
        }
    );
    let claimed = store.claim_due(0, 10, &HostCaps::default()).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(
        ids,
        ["k1", "k2"],
        "the in-flight job is pending again, with the same id"
    );
}

#[tokio::test]
async fn sqlite_refuses_over_the_pending_limit_and_when_it_cannot_write() {
    let store = SqliteStore::open(
        &temp_dir("full"),
        Limits {
            max_pending: 2,
            max_bytes: 0,
        },
    )
    .unwrap();
    store.insert(job("1", "h", 0)).await.unwrap();
    store.insert(job("2", "h", 0)).await.unwrap();
    assert!(matches!(
        store.insert(job("3", "h", 0)).await,
        Err(StoreError::Full(2))
    ));
    assert!(
        matches!(
            store.insert(job("1", "h", 0)).await,
            Ok(Inserted::Existing(_))
        ),
        "a resubmission still answers"
    );

    // A cap smaller than the empty tables is refused at open, naming the setting.
    let tiny = SqliteStore::open(
        &temp_dir("tiny"),
        Limits {
            max_pending: u64::MAX,
            max_bytes: 16 * 1024,
        },
    );
    let Err(StoreError::Unavailable(why)) = tiny else {
        panic!("a 16 KiB cap is refused at open");
    };
    assert!(why.contains("KNOCKER_MAX_STORE_BYTES"), "{why}");

    let store = SqliteStore::open(
        &temp_dir("small"),
        Limits {
            max_pending: u64::MAX,
            max_bytes: 256 * 1024,
        },
    )
    .unwrap();
    let mut refused = None;
    for i in 0..1000 {
        let mut j = job(&format!("big{i}"), "h", 0);
        j.request.body = vec![7; 4096];
        if let Err(e) = store.insert(j).await {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("a full database refuses");
    assert!(i > 0 && matches!(e, StoreError::Unavailable(_)), "{i}: {e}");
    assert!(
        store.get(&format!("big{i}")).await.unwrap().is_none(),
        "nothing half-written"
    );
    assert_eq!(store.stats().await.unwrap().pending, i as u64);
}

/// A store whose size cap fills up with open jobs (submitted, claimed, not yet answered)
/// still records their outcomes, failure callbacks included: submissions stop while a
/// reserve under the cap is left for those. The outcomes make history, and history makes
/// room for new work.
#[tokio::test]
async fn sqlite_full_of_open_jobs_still_records_their_outcomes_and_then_takes_new_work() {
    let store = SqliteStore::open(
        &temp_dir("open-full"),
        Limits {
            max_pending: u64::MAX,
            max_bytes: 256 * 1024,
        },
    )
    .unwrap();
    let big = |id: &str| {
        let mut j = job(id, "h", 0);
        j.request.body = vec![7; 4096];
        j
    };
    let mut open = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        if let Err(e) = store.insert(big(&format!("open{i}"))).await {
            refused = Some(e);
            break;
        }
        open.extend(store.claim_due(0, 10, &HostCaps::default()).await.unwrap());
    }
    let Some(StoreError::Unavailable(why)) = refused else {
        panic!("the capped store never refused: {refused:?}");
    };
    assert!(why.contains("KNOCKER_MAX_STORE_BYTES"), "{why}");
    assert!(open.len() > 4, "{} open jobs", open.len());
    assert_eq!(store.stats().await.unwrap().in_flight, open.len() as u64);
    assert!(
        matches!(store.insert(big("open0")).await, Ok(Inserted::Existing(_))),
        "a resubmission of a stored job still gets its receipt"
    );

    // Every outcome is recorded; every fourth job fails and commits its callback job.
    for (k, j) in open.iter().enumerate() {
        let next = if k % 4 == 3 {
            Next::Failed {
                callback: Some(Box::new(job(&format!("cb{k}"), "cb", 0))),
            }
        } else {
            Next::Delivered
        };
        store
            .finish_attempt(j, attempt(1, 200), next)
            .await
            .unwrap_or_else(|e| panic!("the outcome of {} was refused: {e}", j.id));
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert_eq!(
        stats.pending,
        open.len() as u64 / 4,
        "the callbacks: {stats:?}"
    );

    // Now the store is history: the oldest of it goes to make room for new work.
    for i in 0..open.len() {
        store
            .insert(big(&format!("new{i}")))
            .await
            .unwrap_or_else(|e| panic!("new job {i} refused: {e}"));
        for j in store.claim_due(0, 10, &HostCaps::default()).await.unwrap() {
            store
                .finish_attempt(&j, attempt(2, 200), Next::Delivered)
                .await
                .unwrap();
        }
    }
    assert!(
        store.get("open0").await.unwrap().is_none(),
        "the oldest went"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_its_write_ahead_log_bounded_under_sustained_writes() {
    let dir = temp_dir("wal");
    let store = std::sync::Arc::new(SqliteStore::open(&dir, limits()).unwrap());
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..32 {
        let store = std::sync::Arc::clone(&store);
        writers.spawn(async move {
            for i in 0..500 {
                store
                    .insert(job(&format!("w{w}-{i}"), "h", 0))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    assert_eq!(store.stats().await.unwrap().pending, 16_000);
    let wal = std::fs::metadata(dir.join("knocker.db-wal")).map_or(0, |m| m.len());
    // Unchecked, 16,000 jobs leave ~100 MB of log; checkpointed, a few MB at most.
    assert!(wal < 32 * 1024 * 1024, "the WAL grew to {wal} bytes");
}

fn laned(id: &str, lane: &str, due: u64) -> Job {
    let mut job = job(id, "h", due);
    job.lane = Some(lane.into());
    job.policy.deadline = Some(1_000_000);
    job.policy.max_backoff_s = Some(2.5);
    job
}

async fn claim_ids(store: &dyn Store, now: u64) -> Vec<String> {
    let claimed = store
        .claim_due(now, 100, &HostCaps::default())
        .await
        .unwrap();
    claimed.into_iter().map(|j| j.id).collect()
}

/// The engines whose ordered lanes are the store's own: memory and SQLite. NATS lanes are
/// server-side consumers (the next job released by the lane's consumer, never handed
/// over by an outcome), with their own real-time test (nats/tests.rs).
async fn lane_engines(name: &str) -> Vec<Engine> {
    engines(name)
        .await
        .into_iter()
        .filter(|e| e.nats.is_none())
        .collect()
}

#[tokio::test]
async fn ordered_lanes_deliver_one_job_at_a_time_in_arrival_order() {
    for e in lane_engines("lanes").await {
        let (engine, store) = (e.name, &e.store);
        for id in ["a1", "a2", "a3"] {
            store.insert(laned(id, "A", 10)).await.unwrap();
        }
        store.insert(laned("b1", "B", 10)).await.unwrap();
        store.insert(job("free", "h", 10)).await.unwrap();
        let a2 = store.get("a2").await.unwrap().unwrap();
        assert!(a2.is_parked(), "{engine}: waits behind a1");
        assert_eq!(a2.policy.deadline, Some(1_000_000), "{engine}");
        assert_eq!(a2.policy.max_backoff_s, Some(2.5), "{engine}");
        assert_eq!(a2.lane.as_deref(), Some("A"), "{engine}");
        assert_eq!(
            store.next_due(&HostCaps::default()).await.unwrap(),
            Some(10),
            "{engine}"
        );

        let first = claim_ids(store.as_ref(), 10).await;
        assert_eq!(first, ["a1", "b1", "free"], "{engine}: one head per lane");
        assert!(
            claim_ids(store.as_ref(), 10_000).await.is_empty(),
            "{engine}"
        );

        // A failing head keeps the lane blocked while it retries.
        let a1 = store.get("a1").await.unwrap().unwrap();
        store
            .finish_attempt(&a1, attempt(20, 503), Next::Retry { at: 30 })
            .await
            .unwrap();
        assert_eq!(claim_ids(store.as_ref(), 30).await, ["a1"], "{engine}");
        let a1 = store.get("a1").await.unwrap().unwrap();
        store
            .finish_attempt(&a1, attempt(40, 200), Next::Delivered)
            .await
            .unwrap();
        // Its success hands the lane to a2, due at once.
        let a2 = store.get("a2").await.unwrap().unwrap();
        assert_eq!(a2.next_attempt_at, 40, "{engine}");
        assert_eq!(claim_ids(store.as_ref(), 40).await, ["a2"], "{engine}");
        // Failing for good (expiry) hands it on too.
        let a2 = store.get("a2").await.unwrap().unwrap();
        store
            .finish_attempt(&a2, attempt(50, 0), Next::Failed { callback: None })
            .await
            .unwrap();
        assert_eq!(claim_ids(store.as_ref(), 50).await, ["a3"], "{engine}");

        // A replayed job queues up behind the lane's open job.
        store.replay("a2", 60).await.unwrap();
        assert!(
            store.get("a2").await.unwrap().unwrap().is_parked(),
            "{engine}"
        );
        // Deleting the active job hands the lane on.
        assert!(store.delete("a3", 70).await.unwrap(), "{engine}");
        assert_eq!(claim_ids(store.as_ref(), 70).await, ["a2"], "{engine}");
    }
}

#[tokio::test]
async fn an_outcome_that_hands_a_lane_on_can_take_its_next_job_at_once() {
    for e in lane_engines("lane-take").await {
        let (engine, store) = (e.name, &e.store);
        for id in ["a1", "a2", "a3"] {
            store.insert(laned(id, "A", 10)).await.unwrap();
        }
        store.insert(job("free", "h", 10)).await.unwrap();
        assert_eq!(
            claim_ids(store.as_ref(), 10).await,
            ["a1", "free"],
            "{engine}"
        );

        // A retry keeps the lane: nothing is taken.
        let a1 = store.get("a1").await.unwrap().unwrap();
        let taken = store
            .finish_and_take_next(&a1, attempt(20, 503), Next::Retry { at: 30 })
            .await
            .unwrap();
        assert!(taken.is_none(), "{engine}");
        assert_eq!(claim_ids(store.as_ref(), 30).await, ["a1"], "{engine}");

        // Its success hands the lane to a2, claimed in the same commit.
        let a1 = store.get("a1").await.unwrap().unwrap();
        let a2 = store
            .finish_and_take_next(&a1, attempt(40, 200), Next::Delivered)
            .await
            .unwrap()
            .expect("the lane's next job");
        assert_eq!(a2.id, "a2", "{engine}");
        assert_eq!(a2.state, State::InFlight, "{engine}");
        assert_eq!(a2.next_attempt_at, 40, "{engine}: due when a1 finished");
        assert_eq!(a2.policy.deadline, Some(1_000_000), "{engine}: as stored");
        assert_eq!(a2.request.body, [0, 1, 2, 255], "{engine}: as stored");
        assert_eq!(
            store.get("a1").await.unwrap().unwrap().state,
            State::Delivered,
            "{engine}"
        );
        assert_eq!(
            store.get("a2").await.unwrap().unwrap().state,
            State::InFlight,
            "{engine}"
        );
        let stats = store.stats().await.unwrap();
        assert_eq!(
            (stats.pending, stats.in_flight, stats.delivered),
            (1, 2, 1),
            "{engine}: a3 waits; a2 and free in flight"
        );
        assert!(
            claim_ids(store.as_ref(), 10_000).await.is_empty(),
            "{engine}: a2 is taken, a3 waits behind it"
        );

        // Failing for good hands it on as well; the last one hands nothing.
        let a3 = store
            .finish_and_take_next(&a2, attempt(50, 0), Next::Failed { callback: None })
            .await
            .unwrap()
            .expect("a3");
        assert_eq!(a3.id, "a3", "{engine}");
        let none = store
            .finish_and_take_next(&a3, attempt(60, 200), Next::Delivered)
            .await
            .unwrap();
        assert!(none.is_none(), "{engine}: the lane is empty");
        // A job outside any lane takes nothing.
        let free = store.get("free").await.unwrap().unwrap();
        let none = store
            .finish_and_take_next(&free, attempt(60, 200), Next::Delivered)
            .await
            .unwrap();
        assert!(none.is_none(), "{engine}");
        assert_eq!(
            store.stats().await.unwrap(),
            Stats {
                pending: 0,
                in_flight: 0,
                delivered: 3,
                failed: 1
            },
            "{engine}"
        );
    }
}

#[tokio::test]
async fn sqlite_a_lane_job_taken_at_a_stop_is_the_lanes_head_after_a_reopen() {
    let dir = temp_dir("lane-take-reopen");
    {
        let store = SqliteStore::open(&dir, limits()).unwrap();
        for id in ["x1", "x2", "x3"] {
            store.insert(laned(id, "L", 0)).await.unwrap();
        }
        assert_eq!(claim_ids(&store, 0).await, ["x1"]);
        let x1 = store.get("x1").await.unwrap().unwrap();
        let x2 = store
            .finish_and_take_next(&x1, attempt(5, 200), Next::Delivered)
            .await
            .unwrap();
        assert_eq!(x2.map(|j| j.id).as_deref(), Some("x2"));
    }
    let store = SqliteStore::open(&dir, limits()).unwrap();
    // x2 was in flight: pending again and due, the lane's head; x3 still waits.
    assert_eq!(claim_ids(&store, 5).await, ["x2"]);
    assert!(store.get("x3").await.unwrap().unwrap().is_parked());
}

#[tokio::test]
async fn sqlite_lanes_survive_a_reopen() {
    let dir = temp_dir("lanes-reopen");
    {
        let store = SqliteStore::open(&dir, limits()).unwrap();
        store.insert(laned("x1", "L", 0)).await.unwrap();
        store.insert(laned("x2", "L", 0)).await.unwrap();
        assert_eq!(claim_ids(&store, 0).await, ["x1"]);
    }
    let store = SqliteStore::open(&dir, limits()).unwrap();
    // x1 was in flight: pending again, still the head; x2 still parked.
    assert_eq!(claim_ids(&store, 0).await, ["x1"]);
    assert!(store.get("x2").await.unwrap().unwrap().is_parked());
}

#[tokio::test]
async fn insert_all_commits_together_and_find_prefix_returns_arrival_order() {
    for e in engines("insert-all").await {
        let (engine, store) = (e.name, &e.store);
        store.insert(job("b.1", "h", 0)).await.unwrap();
        let jobs: Vec<Job> = (0..12).map(|i| job(&format!("b.{i}"), "h", 0)).collect();
        let inserted = store.insert_all(jobs).await.unwrap();
        assert_eq!(inserted.len(), 12, "{engine}");
        assert!(matches!(inserted[1], Inserted::Existing(_)), "{engine}");
        assert!(matches!(inserted[11], Inserted::Created), "{engine}");
        store.insert(job("bx", "h", 0)).await.unwrap();
        store.insert(job("c.1", "h", 0)).await.unwrap();
        let found: Vec<String> = store
            .find_prefix("b.", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        let mut expected = vec!["b.1".to_owned(), "b.0".to_owned()];
        expected.extend((2..12).map(|i| format!("b.{i}")));
        assert_eq!(found, expected, "{engine}: arrival order, prefix only");
        assert_eq!(
            store.find_prefix("b.", 3).await.unwrap().len(),
            3,
            "{engine}"
        );
        assert!(
            store.find_prefix("zz", 10).await.unwrap().is_empty(),
            "{engine}"
        );
        assert_eq!(store.stats().await.unwrap().pending, 14, "{engine}");
    }
}

#[tokio::test]
async fn sqlite_insert_all_is_refused_whole_over_the_pending_limit() {
    let store = SqliteStore::open(
        &temp_dir("insert-all-full"),
        Limits {
            max_pending: 5,
            max_bytes: 0,
        },
    )
    .unwrap();
    store.insert(job("a", "h", 0)).await.unwrap();
    let jobs: Vec<Job> = (0..5).map(|i| job(&format!("m.{i}"), "h", 0)).collect();
    assert!(matches!(
        store.insert_all(jobs).await,
        Err(StoreError::Full(_))
    ));
    assert!(
        store.find_prefix("m.", 10).await.unwrap().is_empty(),
        "none of them"
    );
}
