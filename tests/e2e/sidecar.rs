//! `envoy/sidecar.yaml`, rendered by `scripts/envoy-config.sh` as users do, in front of
//! an app on loopback: the app's answers pass untouched while it is up; while it is down
//! (restarting: its port refuses connections) or failing, its writes get `202` (Envoy
//! retries each to the handover listener, where the filter stores it) and reach it when
//! it is back, through the sidecar again; Knocker requests go through the sidecar too.
//! The filter reaches the control plane with the gRPC token the variables give it.

use std::time::Duration;

use futures_util::stream;
use knocker_e2e::{free_port, ControlPlane, Envoy, EnvoyOptions, Reply, Target};
use serde_json::Value;

use crate::{client, get_json, WAIT};

const GRPC_TOKEN: &str = "sidecar-secret";

/// The control plane (with a gRPC token) and the sidecar in front of `app_port`; what the
/// app misses is delivered through the sidecar's own listener.
fn start(app_port: u16) -> (ControlPlane, Envoy) {
    let cp = ControlPlane::start(&[("KNOCKER_GRPC_TOKEN", GRPC_TOKEN)]);
    let listen_port = free_port();
    let envoy = Envoy::start(
        "sidecar.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: app_port,
            port: Some(listen_port),
            vars: vec![
                ("KNOCKER_LISTEN_ADDRESS".into(), "127.0.0.1".into()),
                (
                    "KNOCKER_APP_TARGET".into(),
                    format!("http://127.0.0.1:{listen_port}"),
                ),
                ("KNOCKER_GRPC_TOKEN".into(), GRPC_TOKEN.into()),
            ],
            // Retries every second at most, so the app's return is noticed quickly.
            replace: vec![(
                r#""max_backoff_s":30"#.into(),
                r#""max_backoff_s":1"#.into(),
            )],
            ..EnvoyOptions::default()
        },
    );
    (cp, envoy)
}

/// Every job of the control plane, whatever its state.
async fn jobs(cp: &ControlPlane) -> Vec<Value> {
    let mut all = Vec::new();
    for state in ["pending", "in_flight", "delivered", "failed"] {
        let page = get_json(cp.url(&format!("/knocker/jobs?state={state}&limit=100"))).await;
        all.extend(page["jobs"].as_array().cloned().unwrap_or_default());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_answers_pass_untouched_while_it_is_up() {
    let app = Target::start(|request, _| match request.target.as_str() {
        "/missing" => Reply::status(404).with_body(b"no such thing"),
        "/broken" => Reply::status(500).with_body(b"app error"),
        _ => Reply::status(201)
            .with_header("x-app", "yes")
            .with_body(b"created"),
    })
    .await;
    let (cp, envoy) = start(app.port());

    let created = client()
        .post(envoy.url("/orders?x=1"))
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["x-app"], "yes");
    assert!(created.headers().get("knocker-id").is_none());
    assert_eq!(created.text().await.unwrap(), "created");
    // The app's own errors are its answer: not in retry_on (500) or not a failure (404).
    for (path, status, text) in [
        ("/missing", 404, "no such thing"),
        ("/broken", 500, "app error"),
    ] {
        let response = client()
            .put(envoy.url(path))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.text().await.unwrap(), text, "{path}");
    }
    let read = client().get(envoy.url("/orders/1")).send().await.unwrap();
    assert_eq!(read.status(), 201);

    let got = app.wait_for(4, WAIT).await;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].target, "/orders?x=1");
    assert_eq!(got[0].body, br#"{"n":1}"#);
    assert!(got[0].header("x-knocker").is_none(), "{:?}", got[0]);
    assert!(jobs(&cp).await.is_empty(), "nothing was handed over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_app_misses_while_it_restarts_reach_it_when_it_is_back() {
    let app_port = free_port(); // the app is restarting: nothing listens there
    let (cp, envoy) = start(app_port);

    // One write sent whole, one over HTTP/2 with its body in two parts a moment apart.
    let whole = client()
        .post(envoy.url("/orders"))
        .header("x-order", "1")
        .body("first")
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 202, "{whole:?}");
    let parts = stream::unfold(0, |i| async move {
        match i {
            0 => Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"sec")),
                1,
            )),
            1 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Ok(bytes::Bytes::from_static(b"ond")), 2))
            }
            _ => None,
        }
    });
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let streamed = h2
        .patch(envoy.url("/orders/2"))
        .header("x-order", "2")
        .body(reqwest::Body::wrap_stream(parts))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 202, "{streamed:?}");
    let receipt: Value = streamed.json().await.unwrap();
    assert_eq!(receipt["status"], true, "{receipt}");
    assert_eq!(receipt["config"]["rule"], "app", "{receipt}");

    // A read has no fallback: Envoy's own 503.
    let read = client().get(envoy.url("/orders/1")).send().await.unwrap();
    assert_eq!(read.status(), 503);

    let jobs = jobs(&cp).await;
    assert_eq!(jobs.len(), 2, "{jobs:#?}");

    // The app is back; both writes arrive through the sidecar, marked as Knocker's own.
    let app = Target::start_on(app_port, |_, _| Reply::status(200)).await;
    let got = app.wait_for(2, WAIT).await;
    let mut got: Vec<_> = got.iter().collect();
    got.sort_by_key(|r| r.header("x-order"));
    assert_eq!(
        (got[0].method.as_str(), got[0].target.as_str()),
        ("POST", "/orders")
    );
    assert_eq!(got[0].body, b"first");
    assert_eq!(
        (got[1].method.as_str(), got[1].target.as_str()),
        ("PATCH", "/orders/2")
    );
    assert_eq!(got[1].body, b"second");
    for request in got {
        assert!(request.header("x-knocker").is_some(), "{request:?}");
    }
    let delivered = knocker_e2e::eventually(WAIT, || async {
        get_json(cp.url("/knocker/jobs?state=delivered")).await["jobs"]
            .as_array()
            .is_some_and(|j| j.len() == 2)
    })
    .await;
    assert!(delivered, "both jobs end delivered");
    assert_eq!(
        envoy.stat("wasmcustom.knocker.rule.app.fallback_taken"),
        Some(2)
    );
}

/// Envoy's retry sends each failed write to the handover listener, never to the app a
/// second time, and every write in flight gets its retry when the app fails them all at
/// once (Envoy allows 3 retries at a time per cluster unless told otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_app_fails_together_are_each_handed_over_once() {
    const WRITES: usize = 64;
    // The app fails its callers' writes (503) but takes what Knocker delivers.
    let app = Target::start(|request, _| match request.header("x-knocker") {
        Some(_) => Reply::status(200),
        None => Reply::status(503).with_body(b"overloaded"),
    })
    .await;
    let (cp, envoy) = start(app.port());

    let writes = (0..WRITES).map(|i| {
        let url = envoy.url(&format!("/orders/{i}"));
        async move {
            let response = client().post(url).body(format!("order {i}")).send().await;
            let response = response.unwrap();
            (
                response.status(),
                response.headers().get("knocker-id").cloned(),
            )
        }
    });
    let answers = futures_util::future::join_all(writes).await;
    let mut ids: Vec<_> = answers
        .iter()
        .map(|(status, id)| {
            assert_eq!(*status, 202, "{answers:?}");
            id.clone().expect("a receipt's knocker-id")
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), WRITES, "one job per write");
    assert_eq!(
        envoy.stat("cluster.app_with_handover.upstream_rq_retry"),
        Some(WRITES as u64)
    );
    assert_eq!(
        envoy.stat("cluster.app_with_handover.upstream_rq_retry_overflow"),
        Some(0)
    );

    // Each write reached the app once from its caller, then once more from Knocker.
    let got = app.wait_for(2 * WRITES, WAIT).await;
    let (delivered, original): (Vec<_>, Vec<_>) =
        got.iter().partition(|r| r.header("x-knocker").is_some());
    assert_eq!(original.len(), WRITES, "no write went to the app twice");
    let mut bodies: Vec<_> = delivered.iter().map(|r| r.body.clone()).collect();
    bodies.sort();
    let mut expected: Vec<_> = (0..WRITES)
        .map(|i| format!("order {i}").into_bytes())
        .collect();
    expected.sort();
    assert_eq!(bodies, expected);
    let jobs = jobs(&cp).await;
    assert_eq!(jobs.len(), WRITES);
    assert!(
        jobs.iter().all(|j| j["config"]["mode"] == "fallback"),
        "{:#}",
        jobs[0]
    );
    assert_eq!(
        envoy.stat("wasmcustom.knocker.rule.app.fallback_taken"),
        Some(WRITES as u64)
    );
}

/// Envoy keeps a write's body for the retry up to the listener's buffer limit (1 MiB): a
/// larger write the app fails gets the app's own answer, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_buffer_limit_gets_the_apps_own_failure() {
    let app = Target::start(|request, _| match request.header("x-knocker") {
        Some(_) => Reply::status(200),
        None => Reply::status(503).with_body(b"overloaded"),
    })
    .await;
    let (cp, envoy) = start(app.port());
    let kept = client()
        .put(envoy.url("/files/1"))
        .body(vec![b'a'; 512 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(kept.status(), 202, "{kept:?}");
    let over = client()
        .put(envoy.url("/files/2"))
        .body(vec![b'b'; 3 * 512 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 503, "{over:?}");
    assert_eq!(over.text().await.unwrap(), "overloaded");
    let jobs = jobs(&cp).await;
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(
        envoy.stat("cluster.app_with_handover.retry_or_shadow_abandoned"),
        Some(1)
    );
}

/// With the control plane gone, a write the app fails gets a 503 that says why (the
/// app's own answer went by in Envoy's retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_the_control_plane_cannot_take_says_why() {
    let app = Target::start(|_, _| Reply::status(502)).await;
    let (mut cp, envoy) = start(app.port());
    cp.kill();
    let response = client()
        .put(envoy.url("/orders/9"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{response:?}");
    let why = response.headers()["knocker-fallback"].to_str().unwrap();
    assert!(why.starts_with("failed; "), "{why}");
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        envoy.stat("wasmcustom.knocker.rule.app.fallback_failed"),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocker_requests_go_through_the_sidecar() {
    let app = Target::ok().await;
    let target = Target::ok().await;
    let (_cp, envoy) = start(app.port());
    let response = client()
        .post(envoy.url("/hook"))
        .header("knocker-host", target.host())
        .body("event")
        .send()
        .await
        .unwrap();
    // The Knocker protocol's receipt: 200 with the job id.
    assert_eq!(response.status(), 200, "{response:?}");
    assert!(response.headers().contains_key("knocker-id"));
    let got = target.wait_for(1, WAIT).await;
    assert_eq!(got[0].target, "/hook");
    assert_eq!(got[0].body, b"event");
    assert_eq!(app.count(), 0, "the app never saw it");
}
