//! The NATS engine against a real nats-server (JetStream) on a loopback port. Its
//! schedule is the server's, in real time, so these tests use short real delays where
//! the contract tests use virtual times.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::nats::{NatsOptions, NatsStore};
use super::{HostCaps, Inserted, Next, Store};
use crate::clock::{Clock as _, SystemClock};
use crate::job::{test_job, Attempt, Job, Kind, State};

/// A nats-server with JetStream in a temporary directory; killed when dropped.
pub struct NatsServer {
    pub url: String,
    child: Child,
}

impl NatsServer {
    pub fn start(name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let dir = std::env::temp_dir().join(format!("knocker-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (installed by scripts/setup.sh) must be on PATH");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            url: format!("nats://127.0.0.1:{port}"),
            child,
        }
    }

    pub async fn store(&self, ack_wait: Duration) -> NatsStore {
        NatsStore::open(NatsOptions {
            url: self.url.clone(),
            max_pending: 1_000_000,
            retention: Duration::from_secs(3600),
            ack_wait,
        })
        .await
        .unwrap()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> u64 {
    SystemClock.now_ms()
}

fn job(id: &str) -> Job {
    let mut job = test_job(id, "POST", "http://t/p");
    job.request.body = vec![0, 255, 1];
    job.next_attempt_at = now();
    job.created_at = now();
    job
}

pub(crate) fn attempt(status: u16) -> Attempt {
    Attempt {
        at: now(),
        status,
        error: None,
        latency_ms: 1,
    }
}

async fn ids(store: &NatsStore, limit: usize) -> Vec<String> {
    let mut ids: Vec<String> = store
        .claim_due(now(), limit, &HostCaps::default())
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    ids
}

/// Claims until `n` jobs came or `within` passed.
pub(crate) async fn claim_n(store: &NatsStore, n: usize, within: Duration) -> Vec<Job> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(
            store
                .claim_due(now(), n - got.len(), &HostCaps::default())
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

#[tokio::test]
async fn nats_insert_claim_retry_fail_and_callback() {
    let server = NatsServer::start("basic");
    let store = server.store(Duration::from_secs(30)).await;
    assert!(matches!(
        store.insert(job("a")).await.unwrap(),
        Inserted::Created
    ));
    store.insert(job("b")).await.unwrap();
    let mut again = job("a");
    again.request.body = b"other".to_vec();
    match store.insert(again).await.unwrap() {
        Inserted::Existing(j) => assert_eq!(j.request.body, vec![0, 255, 1]),
        other => panic!("{other:?}"),
    }
    let claimed = claim_n(&store, 2, Duration::from_secs(5)).await;
    let mut names: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "each job once");
    assert!(claimed.iter().all(|j| j.state == State::InFlight));
    assert_eq!(store.stats().await.unwrap().in_flight, 2);

    let a = claimed.iter().find(|j| j.id == "a").unwrap();
    let b = claimed.iter().find(|j| j.id == "b").unwrap();
    store
        .finish_attempt(a, attempt(503), Next::Retry { at: now() + 400 })
        .await
        .unwrap();
    let mut callback = job("b:callback");
    callback.kind = Kind::Callback;
    store
        .finish_attempt(
            b,
            attempt(500),
            Next::Failed {
                callback: Some(Box::new(callback)),
            },
        )
        .await
        .unwrap();
    assert_eq!(store.get("b").await.unwrap().unwrap().state, State::Failed);
    let pending = store.get("a").await.unwrap().unwrap();
    assert_eq!((pending.state, pending.attempts.len()), (State::Pending, 1));

    // The callback at once; the retry only when the server redelivers it.
    assert_eq!(ids(&store, 10).await, ["b:callback"]);
    let retried = claim_n(&store, 1, Duration::from_secs(5)).await;
    assert_eq!(retried[0].id, "a");
    assert_eq!(retried[0].attempts.len(), 1, "with its history");
    store
        .finish_attempt(&retried[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!(a.state, State::Delivered);
    assert_eq!(a.attempts.len(), 2);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.delivered, stats.failed, stats.in_flight), (1, 1, 1));

    // Failed jobs are listed and replayed; replay and delete work on any state.
    let failed = store.list(State::Failed, None, 10).await.unwrap();
    assert_eq!(failed.len(), 1);
    let replayed = store.replay("b", now()).await.unwrap().unwrap();
    assert_eq!(replayed.state, State::Pending);
    let again = claim_n(&store, 1, Duration::from_secs(5)).await;
    assert_eq!(again[0].id, "b");
    assert!(store.delete("b", now()).await.unwrap());
    assert!(store.get("b").await.unwrap().is_none());
    assert!(!store.delete("b", now()).await.unwrap());
}

#[tokio::test]
async fn nats_lanes_deliver_one_at_a_time_in_order() {
    let server = NatsServer::start("lanes");
    let store = server.store(Duration::from_secs(30)).await;
    for id in ["l1", "l2", "l3"] {
        let mut j = job(id);
        j.lane = Some("L".into());
        store.insert(j).await.unwrap();
    }
    store.insert(job("free")).await.unwrap();
    assert!(store.get("l2").await.unwrap().unwrap().is_parked());
    let first = claim_n(&store, 2, Duration::from_secs(5)).await;
    let mut names: Vec<&str> = first.iter().map(|j| j.id.as_str()).collect();
    names.sort();
    assert_eq!(names, ["free", "l1"], "only the lane's head");
    let l1 = first.iter().find(|j| j.id == "l1").unwrap().clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ids(&store, 10).await.is_empty(), "l2 waits behind l1");

    // A failing head keeps the lane blocked until it succeeds.
    store
        .finish_attempt(&l1, attempt(503), Next::Retry { at: now() + 300 })
        .await
        .unwrap();
    let retried = claim_n(&store, 1, Duration::from_secs(5)).await;
    assert_eq!(retried[0].id, "l1");
    store
        .finish_attempt(&retried[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    let l1 = store.get("l1").await.unwrap().unwrap();
    assert_eq!(l1.state, State::Delivered, "the head's record is finished");
    assert_eq!(l1.attempts.len(), 2, "both attempts recorded");
    for id in ["l2", "l3"] {
        let next = claim_n(&store, 1, Duration::from_secs(5)).await;
        assert_eq!(next.len(), 1, "{id}");
        assert_eq!(next[0].id, id, "in arrival order");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(ids(&store, 10).await.is_empty(), "one at a time");
        store
            .finish_attempt(&next[0], attempt(200), Next::Delivered)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn nats_two_control_planes_share_the_work_and_take_over_a_dead_ones() {
    let server = NatsServer::start("share");
    let one = server.store(Duration::from_secs(1)).await;
    let two = server.store(Duration::from_secs(1)).await;
    for i in 0..10 {
        one.insert(job(&format!("s{i}"))).await.unwrap();
    }
    let taken_by_one = claim_n(&one, 4, Duration::from_secs(5)).await;
    assert_eq!(taken_by_one.len(), 4);
    let taken_by_two = claim_n(&two, 6, Duration::from_secs(5)).await;
    assert_eq!(taken_by_two.len(), 6, "the rest, none twice");
    for j in &taken_by_two {
        two.finish_attempt(j, attempt(200), Next::Delivered)
            .await
            .unwrap();
    }
    // `one` dies with four jobs in flight: after the ack wait they go to `two`.
    drop(one);
    let recovered = claim_n(&two, 4, Duration::from_secs(10)).await;
    let mut a: Vec<String> = taken_by_one.iter().map(|j| j.id.clone()).collect();
    let mut b: Vec<String> = recovered.iter().map(|j| j.id.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same jobs, with the same ids");
    for j in &recovered {
        two.finish_attempt(j, attempt(200), Next::Delivered)
            .await
            .unwrap();
    }
    assert_eq!(two.stats().await.unwrap().delivered, 10);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ids(&two, 10).await.is_empty(), "nothing delivered twice");
}

#[tokio::test]
async fn nats_insert_all_and_find_prefix() {
    let server = NatsServer::start("prefix");
    let store = server.store(Duration::from_secs(30)).await;
    let jobs: Vec<Job> = (0..3).map(|i| job(&format!("bc.{i}"))).collect();
    let inserted = store.insert_all(jobs).await.unwrap();
    assert!(inserted.iter().all(|i| matches!(i, Inserted::Created)));
    store.insert(job("bcx")).await.unwrap();
    let found: Vec<String> = store
        .find_prefix("bc.", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(found.len(), 3);
    assert!(found.iter().all(|id| id.starts_with("bc.")));
}
