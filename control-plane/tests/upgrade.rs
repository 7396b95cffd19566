//! A job database written by the release before stored records carried a version opens
//! with this one, reads every job as it was accepted, and delivers them — beside new
//! jobs written in the current layout.
//!
//! `tests/fixtures/jobs-before-record-versions.db` was written by that release's
//! `knocker` (commit b1970dd) with `KNOCKER_DELIVERY=off` and the group
//! `[groups.caches] members = ["http://member-a.example", "http://member-b.example/prefix"]`
//! (`max_age_s = 3600`), after these two requests, then checkpointed out of WAL mode:
//!
//! ```text
//! curl -XPOST 127.0.0.1:18700/hooks/order?x=1 -H 'Knocker-Host: target.example:8080' \
//!   -H 'Knocker-Scheme: http' -H 'Knocker-Callback: http://cb.example/failed' \
//!   -H 'Knocker-Id: upgrade-direct' -H 'Knocker-Retries: 3' -H 'Knocker-Timeout: 5' \
//!   -H 'X-Order: 42' -H 'Authorization: Bearer secret' --data-binary 'hello, upgrade'
//! curl -XPUT 127.0.0.1:18700/purge -H 'Knocker-Broadcast: caches' \
//!   -H 'Knocker-Id: upgrade-broadcast' --data-binary 'purge'
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use knocker::clock::Time;
use knocker::delivery::attempt::Outcome;
use knocker::delivery::targets::{TargetSettings, Targets};
use knocker::delivery::transport::Transport;
use knocker::delivery::Delivery;
use knocker::job::{Job, Kind, Policy, Request, State, Trust};
use knocker::store::sqlite::{Limits, SqliteStore};
use knocker::store::Store;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Answers 200 to every attempt and remembers what it was asked to send.
#[derive(Default)]
struct Target {
    sent: Mutex<Vec<Job>>,
}

#[async_trait::async_trait]
impl Transport for Target {
    async fn send(&self, job: &Job) -> Outcome {
        self.sent.lock().push(job.clone());
        Outcome {
            status: 200,
            error: None,
            retry_after_s: None,
            latency: Duration::from_millis(1),
            local_shortage: false,
        }
    }
}

fn data_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("knocker-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jobs-before-record-versions.db");
    std::fs::copy(fixture, dir.join("knocker.db")).unwrap();
    dir
}

const LIMITS: Limits = Limits {
    max_pending: 1000,
    max_bytes: 0,
};

#[tokio::test]
async fn a_database_of_the_release_before_versioned_records_opens_and_delivers() {
    let dir = data_dir();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir, LIMITS).unwrap());
    assert_eq!(store.stats().await.unwrap().pending, 3);

    // Every field as it was accepted.
    let direct = store.get("upgrade-direct").await.unwrap().unwrap();
    assert_eq!(direct.request.method, "POST");
    assert_eq!(
        direct.request.url,
        "http://target.example:8080/hooks/order?x=1"
    );
    assert_eq!(direct.request.body, b"hello, upgrade");
    assert!(direct
        .request
        .headers
        .contains(&("x-order".into(), b"42".to_vec())));
    assert_eq!(
        direct.policy.callback.as_deref(),
        Some("http://cb.example/failed")
    );
    assert_eq!((direct.policy.retries, direct.policy.timeout), (3, 5.0));
    assert_eq!(
        (direct.trust, direct.policy.callback_trust),
        (Trust::Client, Trust::Client)
    );
    assert_eq!(direct.config["id"], "upgrade-direct");
    let member = store.get("upgrade-broadcast.1").await.unwrap().unwrap();
    assert_eq!(member.request.url, "http://member-b.example/prefix/purge");
    assert_eq!(member.request.method, "PUT");
    assert_eq!(member.trust, Trust::Operator);
    assert_eq!(
        member.lane.as_deref(),
        Some("broadcast:caches:http://member-b.example/prefix")
    );
    assert_eq!(
        member.policy.deadline,
        Some(member.created_at + 3_600_000),
        "the group's maximum age"
    );

    // A job accepted now, stored in the current layout beside the old ones.
    let request = Request {
        method: "POST".into(),
        url: "http://new.example/after-upgrade".into(),
        headers: vec![("x-new".into(), b"1".to_vec())],
        body: b"new".to_vec(),
    };
    let policy = Policy {
        timeout: 1.0,
        retries: 0,
        backoff_factor: 0.0,
        callback: None,
        deadline: None,
        max_backoff_s: None,
        callback_trust: Trust::Client,
        retry: knocker::job::retry::RetryRules::default(),
        source: Some("rule:after".into()),
        rate: None,
    };
    let now = Time::system().now_ms();
    let new = Job::new_pending(
        "after-upgrade".into(),
        Kind::Target,
        request,
        policy,
        Trust::Client,
        now,
    );
    store.insert(new).await.unwrap();

    // The delivery loop, as the control plane runs it, with a target that answers 200.
    let target = Arc::new(Target::default());
    let delivery = Arc::new(Delivery {
        store: Arc::clone(&store),
        time: Time::system(),
        transport: Arc::clone(&target) as Arc<dyn Transport>,
        wake: Arc::new(Notify::new()),
        slots: Arc::new(Semaphore::new(16)),
        backoff_cap_s: 600.0,
        observers: Vec::new(),
        targets: Arc::new(Targets::new(TargetSettings::default(), 16)),
        health: Arc::default(),
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(Arc::clone(&delivery).run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The broadcast members carry the group's maximum age (an hour from when the fixture
    // was written): past it, they fail as expired instead of being attempted.
    let expired = member.policy.deadline.is_some_and(|d| now >= d);
    let finished = |s: knocker::store::Stats| s.delivered + s.failed;
    while finished(store.stats().await.unwrap()) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all delivered: {:?}",
            store.stats().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();

    let mut urls: Vec<String> = target
        .sent
        .lock()
        .iter()
        .map(|j| j.request.url.clone())
        .collect();
    urls.sort();
    let mut expected = vec![
        "http://member-a.example/purge",
        "http://member-b.example/prefix/purge",
        "http://new.example/after-upgrade",
        "http://target.example:8080/hooks/order?x=1",
    ];
    if expired {
        expected.drain(..2);
    }
    assert_eq!(urls, expected);
    let sent = target.sent.lock().clone();
    let old = sent.iter().find(|j| j.id == "upgrade-direct").unwrap();
    assert_eq!(old.request.body, b"hello, upgrade");

    // Reopened: every job is still readable, and delivered.
    drop(delivery);
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store = SqliteStore::open(&dir, LIMITS).unwrap();
    for id in [
        "upgrade-direct",
        "upgrade-broadcast.0",
        "upgrade-broadcast.1",
        "after-upgrade",
    ] {
        let job = store.get(id).await.unwrap().unwrap();
        let want = if expired && id.starts_with("upgrade-broadcast") {
            State::Failed
        } else {
            State::Delivered
        };
        assert_eq!(job.state, want, "{id}");
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
