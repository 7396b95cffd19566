//! The NATS engine against a real nats-server (JetStream) on a loopback port (the server
//! the contract tests run it on too): through the `Store` contract, and what it sends and
//! keeps on the server. Its schedule is the server's, in real time, so these tests use
//! short real delays where the contract tests use virtual times.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::claim::pull;
use super::record::Record;
use super::submit::subject_hash;
use super::*;
use crate::job::{test_job, Kind};

/// A nats-server with JetStream in a temporary directory; killed when dropped.
pub struct NatsServer {
    pub url: String,
    child: Child,
}

impl NatsServer {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, None)
    }

    /// With JetStream's file storage limited to `max_file_store` bytes.
    pub fn start_with(name: &str, max_file_store: Option<u64>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let dir = std::env::temp_dir().join(format!("knocker-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut command = Command::new("nats-server");
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir);
        if let Some(max) = max_file_store {
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("server.conf");
            std::fs::write(&conf, format!("jetstream {{ max_file_store: {max} }}\n")).unwrap();
            command.arg("-c").arg(conf);
        }
        let child = command
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

    /// Its address as the settings give it.
    pub fn server(&self) -> NatsAccess {
        NatsAccess::new(&self.url, NatsFiles::default()).unwrap()
    }

    pub async fn store(&self, ack_wait: Duration) -> NatsStore {
        NatsStore::open(NatsOptions {
            server: self.server(),
            max_pending: 1_000_000,
            retention: Duration::from_secs(3600),
            max_history_bytes: crate::store::AUTO_CAP,
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

/// A server set up by an earlier version: one work subject for every target, its
/// consumer, and a job waiting there.
async fn earlier_version_with_a_job(server: &NatsServer, job: &Job) {
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
    let stream = js
        .get_or_create_stream(StreamConfig {
            name: WORK.to_owned(),
            subjects: vec![LEGACY_SUBJECT.to_owned(), LANE_SUBJECTS.to_owned()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let options = NatsOptions {
        server: server.server(),
        max_pending: 1000,
        retention: Duration::from_secs(60),
        max_history_bytes: 0,
        ack_wait: Duration::from_secs(30),
    };
    consumer(&stream, LEGACY_CONSUMER, LEGACY_SUBJECT, &options)
        .await
        .unwrap();
    earlier_version_submits(server, job).await;
}

/// A job submitted by a control plane of an earlier version.
async fn earlier_version_submits(server: &NatsServer, job: &Job) {
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
    let jobs = open_bucket(&js, JOBS, Duration::ZERO).await.unwrap();
    // As an earlier version wrote it.
    let record = serde_json::json!({ "job": job, "msg_seq": null });
    jobs.put(key(&job.id), serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();
    js.publish(LEGACY_SUBJECT, job.id.clone().into_bytes().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Whether `store` finds nothing to claim within 300 ms.
async fn nothing_to_claim(store: &NatsStore) -> bool {
    claim_n(store, 1, Duration::from_millis(300))
        .await
        .is_empty()
}

/// A job of `id` due now.
fn due_job(id: &str) -> Job {
    let mut job = test_job(id, "POST", "http://t:1/p");
    job.next_attempt_at = now_ms();
    job
}

/// Messages this store's connection has sent so far (after a flush: an
/// acknowledgement is sent without waiting).
async fn sent(store: &NatsStore) -> u64 {
    store.js.client().flush().await.unwrap();
    let stats = store.js.client().statistics();
    stats
        .out_messages
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A new job costs two messages to the server (its record, its work message) and its
/// outcome three (the finished record, the open one's removal, the acknowledgement):
/// no reads. A resubmission of its id, open or finished, goes the long way and finds it.
#[tokio::test]
async fn a_new_job_is_two_messages_to_the_server_and_its_outcome_three() {
    let server = NatsServer::start("round-trips");
    let store = server.store(Duration::from_secs(30)).await;
    let job = due_job("j");
    let before = sent(&store).await;
    assert!(matches!(
        store.insert(job.clone()).await.unwrap(),
        Inserted::Created
    ));
    assert_eq!(sent(&store).await - before, 2, "record and work message");
    assert!(matches!(
        store.insert(job.clone()).await.unwrap(),
        Inserted::Existing(_)
    ));
    let claimed = claim_n(&store, 1, Duration::from_secs(5)).await;
    assert_eq!(claimed.len(), 1);
    let before = sent(&store).await;
    store
        .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    assert_eq!(
        sent(&store).await - before,
        3,
        "finished record, removal, ack"
    );
    let found = store.get("j").await.unwrap().unwrap();
    assert_eq!(found.state, State::Delivered);
    assert_eq!(found.attempts.len(), 1);
    assert!(store.read(&store.jobs, "j").await.unwrap().is_none());
    // Finished: a resubmission is answered with it, and nothing is published.
    let again = store.insert(job).await.unwrap();
    assert!(matches!(again, Inserted::Existing(j) if j.state == State::Delivered));
    assert!(nothing_to_claim(&store).await);
    assert_eq!(store.stats().await.unwrap().pending, 0);
}

/// New due jobs, inserted and claimed.
async fn claim_new(store: &NatsStore, ids: &[&str]) -> Vec<Job> {
    for id in ids {
        store.insert(due_job(id)).await.unwrap();
    }
    let claimed = claim_n(store, ids.len(), Duration::from_secs(5)).await;
    assert_eq!(claimed.len(), ids.len());
    claimed
}

/// The work messages still on the work stream (held ones included).
async fn work_messages(store: &NatsStore) -> u64 {
    let mut stream = store.js.get_stream(WORK).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// The work messages left once the acknowledgements sent have been taken (2 s at most).
/// An outcome acknowledges its message without waiting for the server, which removes
/// it from the work stream a moment later: a count read at once can still see it.
async fn work_messages_once_acked(store: &NatsStore, expected: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left = work_messages(store).await;
        if left == expected || tokio::time::Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An outcome can find the open record changed when it comes to remove it. A job
/// deleted while in flight (its key purged) leaves no finished record; one whose key
/// holds a delete marker was finished already (by an earlier try of this outcome
/// whose answer was lost, or by another control plane that claimed it again), and its
/// finished record stays: before, it was removed too, and a delivered job vanished.
#[tokio::test]
async fn an_outcome_over_a_changed_open_record_keeps_the_finished_record_only_if_the_job_was_finished(
) {
    let server = NatsServer::start("changed-open");
    let store = server.store(Duration::from_secs(30)).await;
    let claimed = claim_new(&store, &["deleted", "marked"]).await;
    assert!(store.delete("deleted", now_ms()).await.unwrap());
    store.jobs.delete(key("marked")).await.unwrap();
    for job in &claimed {
        store
            .finish_attempt(job, attempt(200), Next::Delivered)
            .await
            .unwrap();
    }
    assert!(
        store.get("deleted").await.unwrap().is_none(),
        "a job deleted while in flight leaves nothing"
    );
    let marked = store.get("marked").await.unwrap().expect("finished record");
    assert_eq!(marked.state, State::Delivered);
    assert_eq!(marked.attempts.len(), 1);
    assert_eq!(
        work_messages_once_acked(&store, 0).await,
        0,
        "both messages answered"
    );
}

/// The server refuses the finished record: the open record stays as it was (in
/// flight, its attempt not counted), the message stays held, and the outcome tried
/// again is recorded once. A job is never left without a record.
#[tokio::test]
async fn a_finished_record_the_server_refuses_leaves_the_job_open_and_held_for_the_retry() {
    let server = NatsServer::start("refused-finish");
    let store = server.store(Duration::from_secs(30)).await;
    let claimed = claim_new(&store, &["j"]).await;
    let delivered_limit = |size: i32| {
        let js = store.js.clone();
        async move {
            let mut stream = js.get_stream(format!("KV_{DELIVERED}")).await.unwrap();
            let mut config = stream.info().await.unwrap().config.clone();
            config.max_message_size = size;
            js.update_stream(config).await.unwrap();
        }
    };
    delivered_limit(16).await;
    let refused = store
        .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
        .await;
    assert!(refused.is_err(), "the finished record was refused");
    let (open, _) = store
        .read(&store.jobs, "j")
        .await
        .unwrap()
        .expect("the open record stays");
    assert_eq!(open.job.state, State::InFlight);
    assert!(open.job.attempts.is_empty() && open.job.finished_at.is_none());
    assert!(store.get("j").await.unwrap().is_some());
    assert_eq!(work_messages(&store).await, 1, "the message stays held");

    delivered_limit(-1).await;
    store
        .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    let done = store.get("j").await.unwrap().expect("finished record");
    assert_eq!(done.state, State::Delivered);
    assert_eq!(done.attempts.len(), 1);
    assert!(store.read(&store.jobs, "j").await.unwrap().is_none());
    assert_eq!(work_messages_once_acked(&store, 0).await, 0);
}

/// A retry or a release writes the open record back over the revision it was read at:
/// a job deleted between that read and the write stays deleted (written blindly, it
/// came back pending and was attempted again), and a record changed otherwise is read
/// again and written over.
#[tokio::test]
async fn a_record_read_before_its_job_was_deleted_is_not_written_back() {
    let server = NatsServer::start("rewrite-open");
    let store = server.store(Duration::from_secs(30)).await;
    claim_new(&store, &["deleted", "edited"]).await;
    let pending = |record: &mut Record| record.job.state = State::Pending;

    let stale = store.read(&store.jobs, "deleted").await.unwrap();
    assert!(store.delete("deleted", now_ms()).await.unwrap());
    let written = store.rewrite_open("deleted", stale, pending).await.unwrap();
    assert!(written.is_none());
    assert!(
        store.get("deleted").await.unwrap().is_none(),
        "stays deleted"
    );

    let stale = store.read(&store.jobs, "edited").await.unwrap();
    let (mut edited, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
    edited.job.request.url = "http://t:1/edited".into();
    store.write(&store.jobs, &edited).await.unwrap();
    let written = store.rewrite_open("edited", stale, pending).await.unwrap();
    assert_eq!(written.map(|r| r.job.state), Some(State::Pending));
    let (now, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
    assert_eq!(now.job.state, State::Pending);
    assert_eq!(
        now.job.request.url, "http://t:1/edited",
        "written over the edit"
    );
}

/// Two jobs on lane `L`, `h` then `n`: the head, `h`, claimed.
async fn claim_lane_head(store: &NatsStore) -> Job {
    for id in ["h", "n"] {
        let mut job = due_job(id);
        job.lane = Some("L".into());
        store.insert(job).await.unwrap();
    }
    let mut head = claim_n(store, 1, Duration::from_secs(5)).await;
    assert_eq!(
        head.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["h"]
    );
    head.remove(0)
}

/// A lane's head waiting here for its retry, deleted meanwhile through another control
/// plane (its key purged; this one still holds its message): when the retry is due,
/// its message is answered and the lane goes on to its next job. Before, the head
/// stayed held, kept alive, and the lane waited for ever.
#[tokio::test]
async fn a_lane_head_deleted_elsewhere_while_it_waits_for_its_retry_lets_the_lane_go_on() {
    let server = NatsServer::start("lane-deleted");
    let store = server.store(Duration::from_secs(30)).await;
    let head = claim_lane_head(&store).await;
    store
        .finish_attempt(&head, attempt(503), Next::Retry { at: now_ms() + 200 })
        .await
        .unwrap();
    remove(&store.jobs, "h").await.unwrap(); // what a delete elsewhere does
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = claim_n(&store, 1, Duration::from_secs(5)).await;
    assert_eq!(
        next.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["n"]
    );
    assert!(store.get("h").await.unwrap().is_none());
    assert!(!store.held.lock().contains_key("h"), "its message answered");
}

/// A lane's head whose holder died while it waited for its retry is taken over by
/// another control plane and held there until it is due, without writing its record:
/// a blind write of the record as read would bring back a job deleted meanwhile.
/// When the retry is due, the head is claimed and attempted again.
#[tokio::test]
async fn a_lane_head_taken_over_before_its_retry_is_held_without_writing_its_record() {
    let server = NatsServer::start("lane-takeover");
    let one = server.store(Duration::from_secs(1)).await;
    let two = server.store(Duration::from_secs(1)).await;
    let head = claim_lane_head(&one).await;
    let due = now_ms() + 6000;
    one.finish_attempt(&head, attempt(503), Next::Retry { at: due })
        .await
        .unwrap();
    let revision = || async { two.read(&two.jobs, "h").await.unwrap().unwrap().1 };
    let before = revision().await;
    drop(one); // dies holding the head: after the ack wait its message goes to `two`
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !two.held.lock().contains_key("h") && tokio::time::Instant::now() < deadline {
        let claimed = claim_n(&two, 1, Duration::from_millis(100)).await;
        assert!(claimed.is_empty(), "nothing before the head's retry");
    }
    assert!(
        two.held.lock().get("h").is_some_and(|h| h.due == Some(due)),
        "the head is held until its retry"
    );
    assert_eq!(revision().await, before, "its record is not written");
    let retried = claim_n(&two, 1, Duration::from_secs(10)).await;
    assert_eq!(
        retried.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["h"]
    );
    assert_eq!(retried[0].attempts.len(), 1);
}

/// A new job's first delivery carries its record: claiming it is one write, over the
/// revision the record was created at, no read. A record changed since (edited,
/// deleted) fails that write and is read: the claim never runs on a stale copy.
#[tokio::test]
async fn a_first_delivery_claims_its_job_without_reading_it_and_never_from_a_stale_copy() {
    let server = NatsServer::start("carried");
    let store = server.store(Duration::from_secs(30)).await;
    let take_next = || async {
        let mut messages = pull(&store.work, 1).await.unwrap();
        assert_eq!(messages.len(), 1, "one work message");
        let message = messages.remove(0);
        let before = sent(&store).await;
        let taken = store.take(message, now_ms(), None, false).await.unwrap();
        (taken, sent(&store).await - before)
    };

    store.insert(due_job("new")).await.unwrap();
    let (taken, requests) = take_next().await;
    assert_eq!(taken.map(|j| j.state), Some(State::InFlight));
    assert_eq!(requests, 1, "the claim only");
    let (record, _) = store.read(&store.jobs, "new").await.unwrap().unwrap();
    assert_eq!(record.job.state, State::InFlight, "the claim is stored");

    store.insert(due_job("edited")).await.unwrap();
    let (mut record, _) = store.read(&store.jobs, "edited").await.unwrap().unwrap();
    record.job.request.url = "http://t:1/edited".into();
    store.write(&store.jobs, &record).await.unwrap();
    let (taken, requests) = take_next().await;
    let taken = taken.expect("claimed from the stored record");
    assert_eq!(taken.request.url, "http://t:1/edited");
    assert_eq!(requests, 3, "the refused claim, the read, the claim");

    store.insert(due_job("deleted")).await.unwrap();
    assert!(store.delete("deleted", now_ms()).await.unwrap());
    let (taken, _) = take_next().await;
    assert!(taken.is_none(), "a deleted job is not attempted");
    assert!(store.read(&store.jobs, "deleted").await.unwrap().is_none());
    assert_eq!(
        work_messages_once_acked(&store, 2).await,
        2,
        "the deleted job's message is answered; the two claimed are held"
    );
}

/// Retention sweeps the open-jobs bucket of the markers finished jobs left there,
/// once they are past it; open jobs and recent markers stay. (A deleted job leaves
/// none.)
#[tokio::test]
async fn retention_removes_the_markers_of_finished_jobs_from_the_open_bucket() {
    let server = NatsServer::start("markers");
    let store = server.store(Duration::from_secs(30)).await;
    let finish = |job: Job| {
        let store = &store;
        async move {
            store
                .finish_attempt(&job, attempt(200), Next::Delivered)
                .await
                .unwrap()
        }
    };
    // A job waiting (a retry an hour away) older than the markers after it: it is
    // written again, so it does not hold up their purge. Then a marker with only
    // markers before it (they go with one purge of the stream), then one after an
    // open record in flight (it goes by its key).
    let mut waiting = due_job("waiting");
    waiting.next_attempt_at = now_ms() + 3_600_000;
    store.insert(waiting).await.unwrap();
    let (_, was_at) = store.read(&store.jobs, "waiting").await.unwrap().unwrap();
    store.insert(due_job("early")).await.unwrap();
    finish(claim_n(&store, 1, Duration::from_secs(5)).await.remove(0)).await;
    for id in ["open", "done", "gone"] {
        store.insert(due_job(id)).await.unwrap();
    }
    let claimed = claim_n(&store, 3, Duration::from_secs(5)).await;
    finish(claimed.iter().find(|j| j.id == "done").unwrap().clone()).await;
    assert!(store.delete("gone", now_ms()).await.unwrap());
    let count = |id: &'static str| {
        let subject = format!("{}{}", store.jobs.prefix, key(id));
        let stream = store.jobs.stream.clone();
        async move { subject_count(&stream, &subject).await.unwrap() }
    };
    let markers = || async { (count("early").await, count("done").await) };
    assert_eq!(markers().await, (1, 1), "a finished job leaves a marker");
    assert_eq!(count("gone").await, 0, "a deleted one none");

    // Not yet past retention: nothing goes.
    let an_hour_ago = now_ms() - 3_600_000;
    assert_eq!(store.purge_finished(an_hour_ago).await.unwrap(), 0);
    assert_eq!(markers().await, (1, 1));

    // Past it: the markers go, the open job stays.
    let later = now_ms() + 1_000;
    assert_eq!(store.purge_finished(later).await.unwrap(), 2);
    assert_eq!(markers().await, (0, 0));
    assert_eq!(count("open").await, 1);
    let (waiting, now_at) = store.read(&store.jobs, "waiting").await.unwrap().unwrap();
    assert_eq!(waiting.job.state, State::Pending);
    assert!(
        now_at > was_at,
        "moved past the markers: {was_at} → {now_at}"
    );
    let first = store
        .jobs
        .stream
        .get_info()
        .await
        .unwrap()
        .state
        .first_sequence;
    assert!(first > was_at, "purged up to there: {first}");
    let open = store.get("open").await.unwrap().unwrap();
    assert_eq!(open.state, State::InFlight);
    assert_eq!(
        store.purge_finished(later).await.unwrap(),
        0,
        "nothing left"
    );
    // Its outcome is recorded as ever.
    finish(claimed.iter().find(|j| j.id == "open").unwrap().clone()).await;
    assert_eq!(
        store.get("open").await.unwrap().unwrap().state,
        State::Delivered
    );
}

/// A job with two work messages (a resubmission published again after the duplicate
/// window): the one that claims it names itself in the record, the other is dropped
/// when it comes while the job is in flight, so the job is attempted once.
#[tokio::test]
async fn a_second_work_message_of_a_job_is_dropped_not_attempted() {
    let server = NatsServer::start("second-message");
    let one = server.store(Duration::from_secs(30)).await;
    let two = server.store(Duration::from_secs(30)).await;
    let job = due_job("j");
    one.insert(job.clone()).await.unwrap();
    one.publish(&job, "j#again".into(), None).await.unwrap();
    let mut claimed = claim_n(&one, 1, Duration::from_secs(5)).await;
    claimed.extend(claim_n(&two, 1, Duration::from_millis(500)).await);
    claimed.extend(claim_n(&one, 1, Duration::from_millis(300)).await);
    assert_eq!(claimed.len(), 1, "attempted once");
    let holder = if one.held.lock().contains_key("j") {
        &one
    } else {
        &two
    };
    holder
        .finish_attempt(&claimed[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    assert!(nothing_to_claim(&one).await);
    assert!(nothing_to_claim(&two).await);
    assert_eq!(work_messages_once_acked(&one, 0).await, 0, "both answered");
}

/// A claim pulls no more than its capped targets have room for when no other target
/// has work: the rest stays on the server for the next claim, not pulled only to be
/// sent back (and delivered again, and its record read).
#[tokio::test]
async fn a_claim_pulls_no_more_than_its_targets_have_room_for() {
    let server = NatsServer::start("room");
    let store = server.store(Duration::from_secs(30)).await;
    let now = now_ms();
    let jobs: Vec<Job> = (0..60)
        .map(|i| {
            let mut job = test_job(&format!("j{i}"), "POST", "http://t:1/p");
            job.next_attempt_at = now;
            job
        })
        .collect();
    store.insert_all(jobs).await.unwrap();
    let host = test_job("x", "POST", "http://t:1/p").host().to_owned();
    let mut caps = HostCaps::default();
    caps.cap(&host, 4);
    let mut consumer = store.work.clone();
    let claimed = store.claim_due(now_ms(), 60, &caps).await.unwrap();
    assert_eq!(claimed.len(), 4);
    let first = consumer.info().await.unwrap().delivered.consumer_sequence;
    assert_eq!(first, 4, "nothing pulled only to be sent back");
    let claimed = store.claim_due(now_ms(), 60, &caps).await.unwrap();
    assert_eq!(claimed.len(), 4);
    let info = consumer.info().await.unwrap();
    assert_eq!(info.delivered.consumer_sequence, 8);
    assert_eq!(info.num_pending, 60 - 8, "the rest is left on the server");
}

/// Work of a target without a cap, queued behind a capped target's backlog whose
/// cap is used up, is still found and claimed.
#[tokio::test]
async fn a_target_without_a_cap_is_found_behind_a_capped_backlog() {
    let server = NatsServer::start("uncapped");
    let store = server.store(Duration::from_secs(30)).await;
    let now = now_ms();
    let mut jobs: Vec<Job> = (0..40)
        .map(|i| {
            let mut job = test_job(&format!("t{i}"), "POST", "http://t:1/p");
            job.next_attempt_at = now;
            job
        })
        .collect();
    let mut other = test_job("u", "POST", "http://u:1/p");
    other.next_attempt_at = now;
    jobs.push(other);
    store.insert_all(jobs).await.unwrap();
    let host = test_job("x", "POST", "http://t:1/p").host().to_owned();
    let caps = HostCaps::skipping(&[host]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut found = Vec::new();
    while found.is_empty() && std::time::Instant::now() < deadline {
        found = store.claim_due(now_ms(), 60, &caps).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids: Vec<&str> = found.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["u"], "only the uncapped target's job, within 5 s");
}

/// The server sends a held job's message again (here: sent back by hand, as a late
/// progress report or a pull that brought it twice would): the holder keeps its one
/// attempt, answers the newest delivery when it finishes, and no one attempts it
/// twice.
#[tokio::test]
async fn a_held_job_sent_again_is_not_attempted_twice() {
    let server = NatsServer::start("sent-again");
    let one = server.store(Duration::from_secs(30)).await;
    let two = server.store(Duration::from_secs(30)).await;
    let job = due_job("j");
    one.insert(job).await.unwrap();
    let claimed = claim_n(&one, 1, Duration::from_secs(5)).await;
    assert_eq!(claimed.len(), 1);
    let held = one.held.lock().get("j").unwrap().message.clone();
    held.ack_with(AckKind::Nak(None)).await.unwrap();
    // The same control plane gets it again: not a second claim.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let again = one
            .claim_due(now_ms(), 10, &HostCaps::default())
            .await
            .unwrap();
        assert!(again.is_empty(), "claimed twice: {again:?}");
    }
    // Nor does another control plane claim it meanwhile (the holder reports progress
    // on the newest delivery).
    let other = claim_n(&two, 1, Duration::from_millis(500)).await;
    assert!(
        other.is_empty(),
        "claimed by a second control plane: {other:?}"
    );
    one.finish_attempt(&claimed[0], attempt(200), Next::Delivered)
        .await
        .unwrap();
    // Answered: nothing comes back to anyone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(nothing_to_claim(&one).await);
    assert!(nothing_to_claim(&two).await);
    assert_eq!(one.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn a_message_that_cannot_be_taken_is_given_back_not_left_for_the_ack_wait() {
    let server = NatsServer::start("give-back");
    let store = server.store(Duration::from_secs(30)).await;
    let job = due_job("j");
    store.insert(job.clone()).await.unwrap();
    // Its record cannot be read when its message comes: it cannot be taken.
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
    let jobs = open_bucket(&js, JOBS, Duration::ZERO).await.unwrap();
    jobs.put(key("j"), "not a record".into()).await.unwrap();
    let claimed = store
        .claim_due(now_ms(), 10, &HostCaps::default())
        .await
        .unwrap();
    assert!(claimed.is_empty());
    // Readable again: back within a moment, not after the 30 s ack wait.
    let record = Record::new(job);
    jobs.put(key("j"), serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();
    assert_eq!(claim_n(&store, 1, Duration::from_secs(5)).await.len(), 1);
}

#[tokio::test]
async fn work_an_earlier_version_left_or_still_submits_is_delivered() {
    let server = NatsServer::start("legacy");
    let now = now_ms();
    let mut old = test_job("old", "POST", "http://t:1/p");
    old.next_attempt_at = now;
    earlier_version_with_a_job(&server, &old).await;

    let store = server.store(Duration::from_secs(30)).await;
    let mut new = test_job("new", "POST", "http://t:1/p");
    new.next_attempt_at = now;
    store.insert(new).await.unwrap();
    assert_eq!(store.backlog("t:1").await.unwrap(), Some(1), "the new one");

    let claimed = claim_n(&store, 2, Duration::from_secs(5)).await;
    let mut ids: Vec<&str> = claimed.iter().map(|j| j.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["new", "old"]);
    for job in &claimed {
        store
            .finish_attempt(job, attempt(200), Next::Delivered)
            .await
            .unwrap();
    }
    assert_eq!(
        store.get("old").await.unwrap().map(|j| j.state),
        Some(State::Delivered)
    );
    // Once the old subject is found empty, it is not pulled from again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.legacy.lock().is_some() && std::time::Instant::now() < deadline {
        store
            .claim_due(now_ms(), 10, &HostCaps::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.legacy.lock().is_none());

    // During an upgrade, a control plane of the earlier version submits again: its
    // job is found (the subject is looked at every 10 s) and delivered.
    let mut late = test_job("late", "POST", "http://t:1/p");
    late.next_attempt_at = now_ms();
    earlier_version_submits(&server, &late).await;
    let claimed = claim_n(&store, 1, Duration::from_secs(15)).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, "late");
}

#[test]
fn keys_round_trip_and_keep_prefixes() {
    for id in ["abc", "a.b:callback", "ü/x y", ""] {
        assert_eq!(id_of(&key(id)).as_deref(), Some(id));
    }
    // The keys records already have: `j` and each byte in lower-case hex.
    assert_eq!(key("a.Z/ü"), "j612e5a2fc3bc");
    assert!(key("bc.1").starts_with(&key("bc.")));
    assert!(!key("bcx").starts_with(&key("bc.")));
    assert_eq!(subject_hash("a"), subject_hash("a"));
    assert_ne!(subject_hash("a"), subject_hash("b"));
}

/// A bucket whose creation the server refuses while another control plane makes the same
/// one (seen at start-up: "subjects overlap with an existing stream") is looked for again,
/// and found: the control plane starts instead of exiting.
#[tokio::test]
async fn a_bucket_whose_creation_is_refused_while_another_makes_it_is_found() {
    let server = NatsServer::start("bucket-made-meanwhile");
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
    // The bucket's subjects taken, so that the first creation is refused as in the race.
    js.create_stream(StreamConfig {
        name: "MEANWHILE".to_owned(),
        subjects: vec![format!("$KV.{JOBS}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let other = {
        let js = js.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            js.delete_stream("MEANWHILE").await.unwrap();
            // The other control plane's bucket, made.
            open_bucket(&js, JOBS, Duration::ZERO).await.unwrap()
        })
    };
    let jobs = open_bucket(&js, JOBS, Duration::ZERO)
        .await
        .expect("the bucket is found once the other control plane has made it");
    let made = other.await.unwrap();
    jobs.put(key("j"), "v".into()).await.unwrap();
    let seen = made.get(key("j")).await.unwrap();
    assert_eq!(seen.as_deref(), Some(&b"v"[..]), "one bucket");
}

/// Options for a store on `server` with the finished history capped at `cap` bytes.
fn capped(server: &NatsServer, cap: u64) -> NatsOptions {
    NatsOptions {
        server: server.server(),
        max_pending: 1_000_000,
        retention: Duration::from_secs(3600),
        max_history_bytes: cap,
        ack_wait: Duration::from_secs(30),
    }
}

async fn bucket_state(bucket: &kv::Store) -> (u64, u64) {
    let state = bucket.stream.get_info().await.unwrap().state;
    (state.messages, state.bytes)
}

/// At its size cap the finished history makes room, oldest first, and no submission is
/// refused for it: the delivered bucket drops its oldest records at its limit (half the
/// cap); retention then removes the failed bucket's records older than the oldest
/// delivered one kept, and the markers of the jobs gone, whose ids are new again. Open
/// jobs are never removed; a finished job still kept is still found by its id.
#[tokio::test]
async fn at_its_size_cap_the_finished_history_makes_room_oldest_first() {
    let server = NatsServer::start("history-cap");
    // The least a cap can be: each bucket holds one of the largest records (1 MiB).
    let cap: u64 = 2 << 20;
    let store = NatsStore::open(capped(&server, cap)).await.unwrap();
    let body = vec![b'x'; 4096];
    let sized = |id: &str| {
        let mut job = due_job(id);
        job.request.body = body.clone();
        job
    };
    // An open job (a retry an hour away) older than everything finished.
    let mut waiting = sized("waiting");
    waiting.next_attempt_at = now_ms() + 3_600_000;
    store.insert(waiting).await.unwrap();
    store.insert(sized("failed-early")).await.unwrap();
    let early = claim_n(&store, 1, Duration::from_secs(5)).await.remove(0);
    store
        .finish_attempt(&early, attempt(500), Next::Failed { callback: None })
        .await
        .unwrap();

    // Delivered jobs, twice what the delivered bucket may hold.
    let n = 400;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        for i in chunk {
            let inserted = store.insert(sized(&format!("d-{i}"))).await.unwrap();
            assert!(matches!(inserted, Inserted::Created), "d-{i} accepted");
        }
        for job in claim_n(&store, chunk.len(), Duration::from_secs(10)).await {
            store
                .finish_attempt(&job, attempt(200), Next::Delivered)
                .await
                .unwrap();
        }
    }
    let (kept, bytes) = bucket_state(&store.delivered).await;
    assert!(
        bytes <= cap / 2,
        "the delivered bucket within its limit: {bytes}"
    );
    assert!(
        kept > 10 && kept < n,
        "its oldest dropped: {kept} of {n} kept"
    );
    let last = format!("d-{}", n - 1);
    assert_eq!(
        store.get(&last).await.unwrap().unwrap().state,
        State::Delivered
    );
    assert_eq!(store.get("d-0").await.unwrap(), None, "the oldest is gone");
    assert_eq!(
        store.get("failed-early").await.unwrap().unwrap().state,
        State::Failed,
        "the failed bucket, far from its limit, keeps it until retention runs"
    );
    let count = |id: String| {
        let subject = format!("{}{}", store.jobs.prefix, key(&id));
        let stream = store.jobs.stream.clone();
        async move { subject_count(&stream, &subject).await.unwrap() }
    };
    assert_eq!(count("d-0".into()).await, 1, "its marker is still there");

    // Retention, an hour short of its age limit: the history's horizon is what counts.
    let swept = store.purge_finished(now_ms() - 3_600_000).await.unwrap();
    // Markers go only with their records: those stored in the same millisecond as the
    // oldest record kept wait for the next round.
    assert!(
        swept > (n - kept) / 2,
        "the markers of the jobs gone: {swept}"
    );
    for i in 0..n {
        let id = format!("d-{i}");
        if count(id.clone()).await == 0 {
            assert_eq!(
                store.get(&id).await.unwrap(),
                None,
                "{id}: its marker gone, so is it"
            );
        }
    }
    assert_eq!(
        store.get("failed-early").await.unwrap(),
        None,
        "older than the horizon"
    );
    assert_eq!(bucket_state(&store.failed).await.0, 0);
    assert_eq!(count("d-0".into()).await, 0);
    assert_eq!(count("failed-early".into()).await, 0);
    assert_eq!(count(last.clone()).await, 1, "a kept job's marker stays");
    assert_eq!(
        bucket_state(&store.delivered).await.0,
        kept,
        "nothing more of it"
    );
    let waiting = store.get("waiting").await.unwrap().unwrap();
    assert_eq!(waiting.state, State::Pending, "open jobs are never removed");

    // A kept job is found by its id; a removed one's id is new again.
    match store.insert(sized(&last)).await.unwrap() {
        Inserted::Existing(job) => assert_eq!(job.state, State::Delivered),
        Inserted::Created => panic!("{last} is kept: its resubmission is not a new job"),
    }
    assert!(matches!(
        store.insert(sized("d-0")).await.unwrap(),
        Inserted::Created
    ));
}

/// `auto` asks the server for what it can set aside: a server whose JetStream may store
/// 300 MiB cannot hold 1 GiB of history, so the cap is halved until both buckets fit
/// (and the buckets of an earlier version, without a limit, are given theirs). A cap
/// set in bytes that the server cannot set aside stops the start, naming the setting.
#[tokio::test]
async fn the_automatic_history_cap_fits_the_server_and_a_set_one_it_cannot_hold_is_refused() {
    let server = NatsServer::start_with("history-auto", Some(300 << 20));
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap());
    // An earlier version's bucket: no byte limit, discard new.
    open_bucket(&js, DELIVERED, Duration::from_secs(3600))
        .await
        .unwrap();

    let refused = NatsStore::open(capped(&server, 1 << 30))
        .await
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("KNOCKER_MAX_STORE_BYTES"),
        "{refused}"
    );
    // Half of it must hold the largest record the server takes (its max_payload, 1 MiB).
    let small = NatsStore::open(capped(&server, 1 << 20))
        .await
        .err()
        .unwrap();
    assert!(
        small
            .to_string()
            .contains("KNOCKER_MAX_STORE_BYTES (1048576 bytes) is too small")
            && small.to_string().contains("max_payload"),
        "{small}"
    );

    let store = NatsStore::open(capped(&server, crate::store::AUTO_CAP))
        .await
        .unwrap();
    assert_eq!(store.bucket_cap, 128 << 20, "1 GiB, then 512 MiB, then 256");
    for bucket in [DELIVERED, FAILED] {
        let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
        let config = &stream.info().await.unwrap().config;
        assert_eq!(config.max_bytes, 128 << 20, "{bucket}");
        assert_eq!(config.discard, DiscardPolicy::Old, "{bucket}");
    }
    // Opened again (another control plane, a restart): the same cap.
    let again = NatsStore::open(capped(&server, crate::store::AUTO_CAP))
        .await
        .unwrap();
    assert_eq!(again.bucket_cap, 128 << 20);
}

/// A sweep moves at most so many open records past the markers, then ends: a long
/// backlog of waiting jobs in front of them is moved a share at a time, round after
/// round (a sweep for room reaches back minutes, so most waiting jobs are that old).
#[tokio::test]
async fn a_sweep_moves_so_many_waiting_jobs_then_ends() {
    let server = NatsServer::start("sweep-moves");
    let store = server.store(Duration::from_secs(30)).await;
    for id in ["w1", "w2", "w3"] {
        let mut waiting = due_job(id);
        waiting.next_attempt_at = now_ms() + 3_600_000;
        store.insert(waiting).await.unwrap();
    }
    store.insert(due_job("done")).await.unwrap();
    let done = claim_n(&store, 1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(done.id, "done");
    store
        .finish_attempt(&done, attempt(200), Next::Delivered)
        .await
        .unwrap();
    let subject = format!("{}{}", store.jobs.prefix, key("done"));
    let marker = || async { subject_count(&store.jobs.stream, &subject).await.unwrap() };
    let revision = |id: &'static str| {
        let store = &store;
        async move { store.read(&store.jobs, id).await.unwrap().unwrap().1 }
    };
    let w3 = revision("w3").await;

    let later = now_ms() + 1_000;
    assert_eq!(store.sweep_markers(later, 2).await.unwrap(), 0);
    assert_eq!(marker().await, 1, "behind a waiting job not moved yet");
    assert_eq!(
        revision("w3").await,
        w3,
        "the third is left for the next round"
    );

    assert_eq!(store.sweep_markers(later, 2).await.unwrap(), 1);
    assert_eq!(marker().await, 0);
    assert!(revision("w3").await > w3, "moved this round");
    for id in ["w1", "w2", "w3"] {
        let job = store.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, State::Pending, "{id} waits on");
    }
}

/// Swept markers leave nothing of their keys in the server's index of subjects. nats-server
/// 2.9 drops whole file blocks of a stream purged up to a sequence without taking their
/// subjects out of that index: a sweep that way left an entry behind for every job ever
/// finished, and the server's memory grew with them (to 800 MiB in 5 minutes at 4,000
/// jobs/s). Markers enough to fill several blocks (their records were 16 KiB each).
#[tokio::test]
async fn swept_markers_leave_no_subjects_in_the_server_index() {
    let server = NatsServer::start("sweep-index");
    let store = server.store(Duration::from_secs(30)).await;
    let record = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
    let markers = 1500;
    for i in 0..markers {
        let key = key(&format!("m{i}"));
        store.jobs.put(&key, record.clone()).await.unwrap();
        store.jobs.delete(&key).await.unwrap();
    }
    // One marker newer than the sweep's horizon stays (there always is one).
    let before = now_ms() + 1;
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.jobs.put(&key("late"), record.clone()).await.unwrap();
    store.jobs.delete(&key("late")).await.unwrap();
    let swept = store
        .sweep_markers(before, retention::SWEEP_MOVES)
        .await
        .unwrap();
    assert_eq!(swept, markers);
    let state = store.jobs.stream.get_info().await.unwrap().state;
    assert_eq!(state.messages, 1, "the newer marker stays");
    assert_eq!(
        state.subjects_count, 1,
        "no subject of the swept markers left in the server's index"
    );
}
