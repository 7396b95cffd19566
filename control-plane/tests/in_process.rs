//! The centre of the control plane, tested in-process: the submit path called directly,
//! the admin API through its router (`tower::ServiceExt::oneshot`, no socket), and the
//! whole server (`knocker::serve`) on port 0 delivering to a target in the same test.
//! The end-to-end suite (`tests/e2e`) remains the proof with real processes and Envoy.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use knocker::broadcast::groups::Groups;
use knocker::clock::Time;
use knocker::config::Settings;
use knocker::job::spec::{Defaults, Submission};
use knocker::job::State;
use knocker::monitor::store::{LocalStore, MonitorStore};
use knocker::monitor::{ApiLimits, CheckSettings, Monitors, Queue};
use knocker::outbound::{Lookup, Outbound, OutboundPolicy};
use knocker::store::memory::MemoryStore;
use knocker::store::Store;
use knocker::submit::Submitter;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

const TOKEN: &str = "admin-secret";

fn submitter(store: Arc<dyn Store>) -> Arc<Submitter> {
    Arc::new(Submitter {
        defaults: Defaults::default(),
        status_url: "/knocker/status".into(),
        store,
        time: Time::system(),
        wake: Arc::default(),
        groups: Arc::new(Groups::new(Default::default(), None).unwrap()),
        agents: None,
        claims: Arc::default(),
    })
}

fn knock(headers: &[(&str, &str)]) -> Submission {
    Submission {
        method: "POST".into(),
        path: "/orders?x=1".into(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: b"order".to_vec(),
        ..Submission::default()
    }
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn submit_commits_before_the_receipt_and_names_every_bad_header() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let submit = submitter(Arc::clone(&store));

    let reply = submit
        .submit(knock(&[
            ("Knocker-Host", "target.example"),
            ("Knocker-Id", "order-1"),
            ("Knocker-Retries", "4"),
            ("X-Order", "7"),
        ]))
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .headers
        .contains(&("knocker-id".into(), "order-1".into())));
    let receipt = json(&reply.body);
    assert_eq!(receipt["url"], "https://target.example/orders?x=1");
    assert_eq!(receipt["config"]["retries"], 4);
    // Committed by the time the receipt exists.
    let job = store.get("order-1").await.unwrap().unwrap();
    assert_eq!(job.state, State::Pending);
    assert_eq!(job.request.body, b"order");
    assert!(job
        .request
        .headers
        .contains(&("x-order".into(), b"7".to_vec())));

    let reply = submit
        .submit(knock(&[
            ("Knocker-Timeout", "nan"),
            ("Knocker-Scheme", "ftp"),
        ]))
        .await;
    assert_eq!(reply.status, 400);
    let errors = json(&reply.body)["errors"].clone();
    for field in ["knocker-host", "knocker-timeout", "knocker-scheme"] {
        assert!(errors.get(field).is_some(), "{field} not named: {errors}");
    }

    let mut status = knock(&[]);
    status.path = "/knocker/status".into();
    let reply = submit.submit(status).await;
    assert_eq!(reply.status, 200);
    assert_eq!(json(&reply.body)["tasks"], 1);

    let reply = submit
        .submit(knock(&[("Knocker-Host", "t.example"), ("X-Knocker", "1")]))
        .await;
    assert_eq!(reply.status, 406, "the loop guard");
}

async fn monitors(store: Arc<dyn Store>) -> Arc<Monitors> {
    let outbound =
        Arc::new(Outbound::new(OutboundPolicy::default(), Lookup::new(None).unwrap(), 0).unwrap());
    Monitors::start(
        MonitorStore::Local(LocalStore::open(None, 10).unwrap()),
        Queue {
            jobs: store,
            wake: Arc::default(),
            notifiers: Arc::default(),
            time: Time::system(),
        },
        Default::default(),
        CheckSettings {
            outbound,
            api: ApiLimits {
                max_monitors: 2,
                min_interval_s: 5.0,
            },
        },
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// The delivery side the API reads targets from (not running: nothing is sent).
fn delivery(store: Arc<dyn Store>) -> Arc<knocker::delivery::Delivery> {
    use knocker::delivery::targets::{TargetSettings, Targets};
    struct Nowhere;
    #[async_trait::async_trait]
    impl knocker::delivery::transport::Transport for Nowhere {
        async fn send(&self, _: &knocker::job::Job) -> knocker::delivery::attempt::Outcome {
            knocker::delivery::attempt::Outcome::failed(503, "not sent".into(), Duration::ZERO)
        }
    }
    Arc::new(knocker::delivery::Delivery {
        store,
        time: Time::system(),
        transport: Arc::new(Nowhere),
        wake: Arc::default(),
        slots: Arc::new(tokio::sync::Semaphore::new(1)),
        backoff_cap_s: 1.0,
        observers: Vec::new(),
        targets: Arc::new(Targets::new(TargetSettings::default(), 4)),
        health: Arc::default(),
    })
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, json(&body))
}

#[tokio::test]
async fn the_api_through_its_router_needs_the_token_and_answers_in_the_knocker_shape() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let submit = submitter(Arc::clone(&store));
    let app = knocker::api::router(
        Arc::clone(&submit),
        monitors(Arc::clone(&store)).await,
        delivery(Arc::clone(&store)),
        TOKEN,
    );
    let reply = submit
        .submit(knock(&[
            ("Knocker-Host", "target.example"),
            ("Knocker-Callback", "https://user:pass@cb.example/failed"),
            ("Knocker-Id", "api-1"),
        ]))
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    // Every call needs the token, reads included.
    for token in [None, Some("wrong")] {
        let (status, body) = call(&app, "GET", "/knocker/jobs/api-1", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert!(body["errors"]["authorization"].is_array(), "{body}");
    }
    let (status, job) = call(&app, "GET", "/knocker/jobs/api-1", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "pending");
    assert!(
        !job.to_string().contains("pass"),
        "credentials in URLs are redacted: {job}"
    );
    assert!(job["config"]["callback"]
        .as_str()
        .unwrap()
        .contains("cb.example"));

    let (status, list) = call(&app, "GET", "/knocker/jobs?state=pending", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (status, body) = call(&app, "GET", "/knocker/jobs?state=lost", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["errors"]["state"].is_array(), "{body}");
    let (status, body) = call(&app, "POST", "/knocker/jobs/api-1/replay", Some(TOKEN)).await;
    // A job still waiting is left as it is.
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["attempts"].clone()),
        (Some("pending"), serde_json::json!([]))
    );
    let (status, body) = call(&app, "GET", "/knocker/nothing-here", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["errors"]["path"].is_array(), "{body}");
    let (status, groups) = call(&app, "GET", "/knocker/groups", Some(TOKEN)).await;
    assert_eq!(
        (status, groups["groups"].clone()),
        (StatusCode::OK, serde_json::json!({}))
    );
    let (status, monitors) = call(&app, "GET", "/knocker/monitors", Some(TOKEN)).await;
    assert_eq!(
        (status, monitors["monitors"].clone()),
        (StatusCode::OK, serde_json::json!([]))
    );

    // Targets: the one the job waits for, paused and resumed by hand.
    let (status, t) = call(&app, "GET", "/knocker/targets/target.example", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["circuit"].as_str(), t["backlog"].as_u64()),
        (Some("closed"), Some(1))
    );
    let (status, t) = call(
        &app,
        "POST",
        "/knocker/targets/target.example/pause",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["circuit"].as_str(), t["changed"].as_bool()),
        (Some("paused"), Some(true))
    );
    let (_, list) = call(&app, "GET", "/knocker/targets", Some(TOKEN)).await;
    assert_eq!(list["targets"][0]["target"], "target.example", "{list}");
    assert_eq!(list["targets"][0]["circuit"], "paused", "{list}");
    let (status, t) = call(
        &app,
        "POST",
        "/knocker/targets/target.example/resume",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["circuit"].as_str(), t["changed"].as_bool()),
        (Some("closed"), Some(true))
    );
    let (status, body) = call(&app, "GET", "/knocker/targets/a%20b", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["errors"]["target"].is_array(), "{body}");
    // Replay by target: the window is read as RFC 3339, named when it is not.
    let (status, body) = call(
        &app,
        "POST",
        "/knocker/jobs/replay?target=target.example&since=yesterday",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["errors"]["since"].is_array(), "{body}");
    let (status, body) = call(
        &app,
        "POST",
        "/knocker/jobs/replay?target=target.example&since=2026-01-01T00:00:00Z",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, body["replayed"].as_u64()),
        (StatusCode::OK, Some(0)),
        "{body}"
    );

    let (status, _) = call(&app, "DELETE", "/knocker/jobs/api-1", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&app, "GET", "/knocker/jobs/api-1", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["errors"]["id"].is_array(), "{body}");
}

/// A target on port 0 that answers 200 and counts what it got.
async fn target() -> (std::net::SocketAddr, Arc<parking_lot::Mutex<Vec<String>>>) {
    let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = Arc::clone(&got);
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().push(request.uri().to_string());
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

#[tokio::test]
async fn serve_on_port_zero_accepts_delivers_and_stops_when_told() {
    let (target, got) = target().await;
    let mut settings = Settings::defaults();
    settings.store = "memory".into();
    settings.admin_token = TOKEN.into();
    settings.outbound_allow = knocker::config::Cidrs(vec!["127.0.0.0/8".parse().unwrap()]);
    settings.scheme = "http".into();
    let config = settings.load().unwrap();
    let listeners = knocker::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let http = listeners.http.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(knocker::serve(
        config,
        listeners,
        Time::system(),
        shutdown.clone(),
    ));

    let client = reqwest::Client::new();
    let reply = client
        .post(format!("http://{http}/hook?n=1"))
        .header("Knocker-Host", target.to_string())
        .header("Knocker-Id", "served-1")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let job: Value = client
            .get(format!("http://{http}/knocker/jobs/served-1"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] == "delivered" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.lock().as_slice(), ["/hook?n=1"]);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve stops within 10 s of the shutdown")
        .unwrap()
        .unwrap();
}

fn rule_request(
    mode: knocker_proto::v1::Mode,
    policy: Option<knocker_proto::v1::RulePolicy>,
) -> knocker_proto::v1::SubmitRequest {
    knocker_proto::v1::SubmitRequest {
        method: "PUT".into(),
        authority: "api.internal".into(),
        path: "/v1/items/9?x=1".into(),
        headers: vec![knocker_proto::v1::Header {
            name: b"x-item".to_vec(),
            value: b"9".to_vec(),
        }],
        body: b"item".to_vec(),
        mode: mode as i32,
        rule: "items".into(),
        policy,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_grpc_mapping_turns_rule_submissions_into_jobs_and_bad_ones_into_named_errors() {
    use knocker_proto::v1::{Mode, RulePolicy};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let submit = submitter(Arc::clone(&store));
    let policy = RulePolicy {
        target: "http://backend.internal:8080".into(),
        retries: Some(5),
        max_age_s: 600,
        backoff_factor: 0.25,
        max_backoff_s: 30.0,
        timeout_s: 3.0,
        callback: "http://cb.internal/failed".into(),
        ordered: true,
        ..Default::default()
    };

    // A capture rule: 202, the job built from the rule's policy, in the target's lane.
    let reply = knocker::ingress::grpc::handle(
        &submit,
        1024,
        rule_request(Mode::Capture, Some(policy.clone())),
    )
    .await;
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let id = reply
        .headers
        .iter()
        .find(|h| h.name == b"knocker-id")
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .expect("the receipt names the job");
    let job = store.get(&id).await.unwrap().unwrap();
    assert_eq!(
        job.request.url,
        "http://backend.internal:8080/v1/items/9?x=1"
    );
    assert_eq!(job.request.method, "PUT");
    assert_eq!((job.policy.retries, job.policy.timeout), (5, 3.0));
    assert_eq!(job.policy.max_backoff_s, Some(30.0));
    assert_eq!(
        job.policy.callback.as_deref(),
        Some("http://cb.internal/failed")
    );
    assert_eq!(job.lane.as_deref(), Some("http://backend.internal:8080"));
    assert_eq!(job.trust, knocker::job::Trust::Operator);

    // What does not fit is refused, naming the field, before anything is stored.
    let field = |reply: &knocker_proto::v1::SubmitReply| {
        let body = json(&reply.body);
        body["errors"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    let reply =
        knocker::ingress::grpc::handle(&submit, 1024, rule_request(Mode::Capture, None)).await;
    assert_eq!(
        (reply.status, field(&reply)),
        (400, vec!["policy".to_owned()])
    );
    let reply = knocker::ingress::grpc::handle(
        &submit,
        1024,
        rule_request(Mode::Broadcast, Some(policy.clone())),
    )
    .await;
    assert_eq!(
        (reply.status, field(&reply)),
        (400, vec!["policy.group".to_owned()])
    );
    let mut unknown = rule_request(Mode::Capture, Some(policy.clone()));
    unknown.mode = 42;
    let reply = knocker::ingress::grpc::handle(&submit, 1024, unknown).await;
    assert_eq!(
        (reply.status, field(&reply)),
        (400, vec!["mode".to_owned()])
    );
    let bad_target = RulePolicy {
        target: "ftp://x".into(),
        ..policy.clone()
    };
    let reply = knocker::ingress::grpc::handle(
        &submit,
        1024,
        rule_request(Mode::Capture, Some(bad_target)),
    )
    .await;
    assert_eq!(
        (reply.status, field(&reply)),
        (400, vec!["rule.target".to_owned()])
    );
    let reply =
        knocker::ingress::grpc::handle(&submit, 3, rule_request(Mode::Capture, Some(policy))).await;
    assert_eq!(
        (reply.status, field(&reply)),
        (413, vec!["body".to_owned()])
    );
    assert_eq!(
        store.stats().await.unwrap().pending,
        1,
        "only the first was stored"
    );
}
