//! The walking skeleton: pass-through traffic, a Knocker request through Envoy and
//! through the HTTP ingress, the control plane down, and the body limit; the worker's
//! stream to the control plane: shared by all requests, deadlines, shutdown and restart.

use std::time::{Duration, Instant};

use knocker_e2e::{ControlPlane, Envoy, EnvoyOptions, Reply, Target};
use serde_json::Value;

use crate::{body, client, grpc_stat, wait_for_stream, WAIT};

fn options(cp: &ControlPlane, upstream: &Target) -> EnvoyOptions {
    EnvoyOptions {
        grpc_port: cp.grpc_port,
        http_port: cp.http_port,
        upstream_port: upstream.port(),
        ..EnvoyOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_reaches_the_upstream_byte_exact() {
    let cp = ControlPlane::start(&[]);
    let upstream = Target::start(|r, _| {
        Reply::status(201)
            .with_header("x-upstream", "yes")
            .with_body(format!("got {}", r.body.len()).as_bytes())
    })
    .await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));

    let get = client()
        .get(envoy.url("/plain/path?a=1&b=%2F"))
        .header("x-custom", "v")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 201);
    assert_eq!(get.headers()["x-upstream"], "yes");
    assert_eq!(get.text().await.unwrap(), "got 0");

    let payload = body(200 * 1024);
    let post = client()
        .post(envoy.url("/upload"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 201);
    assert_eq!(post.text().await.unwrap(), format!("got {}", payload.len()));

    let got = upstream.wait_for(2, WAIT).await;
    assert_eq!(got[0].method, "GET");
    assert_eq!(got[0].target, "/plain/path?a=1&b=%2F");
    assert_eq!(got[0].header("x-custom").as_deref(), Some("v"));
    assert_eq!(got[1].method, "POST");
    assert_eq!(
        got[1].body, payload,
        "the upstream gets the body byte for byte"
    );
    assert!(got.iter().all(|r| r.header("x-knocker").is_none()));
}

/// The client's request, through Envoy or directly, and what the target must see.
async fn knocker_request_is_delivered_exactly(base_url: String, target: &Target) {
    let payload = body(100 * 1024);
    let response = client()
        .post(format!("{base_url}/orders/a%2Fb?x=1&y=two&y=3"))
        .header("Knocker-Host", target.host())
        .header("Knocker-Id", "order-1")
        .header("X-Custom", "custom value")
        .header("X-Repeated", "one")
        .header("Content-Type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["knocker-id"], "order-1");
    let receipt: Value = response.json().await.unwrap();
    let expected_url = format!("http://{}/orders/a%2Fb?x=1&y=two&y=3", target.host());
    assert_eq!(receipt["status"], true);
    assert_eq!(receipt["url"], expected_url);
    assert_eq!(receipt["method"], "POST");
    assert_eq!(receipt["body-length"], payload.len());
    assert_eq!(receipt["config"]["id"], "order-1");
    assert_eq!(receipt["config"]["host"], target.host());
    assert_eq!(receipt["config"]["scheme"], "http");
    assert_eq!(receipt["config"]["timeout"].to_string(), "10.0");
    assert_eq!(receipt["config"]["retries"], 2);
    assert_eq!(receipt["config"]["backoff_factor"].to_string(), "0.5");
    assert_eq!(receipt["config"]["callback"], Value::Null);
    let headers = receipt["headers"].as_array().unwrap();
    assert_eq!(headers[0][0], "x-knocker");
    assert!(headers
        .iter()
        .any(|h| h[0] == "x-custom" && h[1] == "custom value"));
    assert!(!headers
        .iter()
        .any(|h| h[0].as_str().unwrap().starts_with("knocker-")));

    let got = target.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.target, "/orders/a%2Fb?x=1&y=two&y=3",
        "path and raw query unchanged"
    );
    assert_eq!(r.body, payload, "body byte for byte");
    assert_eq!(r.header("content-length"), Some(payload.len().to_string()));
    assert_eq!(r.header("x-custom").as_deref(), Some("custom value"));
    assert_eq!(r.header("x-repeated").as_deref(), Some("one"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        r.header_names()[..2],
        ["x-knocker", "x-knocker-id"],
        "ours first"
    );
    assert_eq!(r.header("x-knocker-id").as_deref(), Some("order-1"));
    assert!(r
        .headers
        .iter()
        .all(|(n, _)| !n.to_ascii_lowercase().starts_with("knocker-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocker_request_through_envoy_gets_a_receipt_and_is_delivered() {
    let cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));
    knocker_request_is_delivered_exactly(envoy.url(""), &target).await;
    assert_eq!(
        upstream.count(),
        0,
        "a Knocker request never reaches the route's upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocker_request_through_the_http_ingress_behaves_the_same() {
    let cp = ControlPlane::start(&[]);
    let target = Target::ok().await;
    knocker_request_is_delivered_exactly(cp.url(""), &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_gives_503_promptly_and_pass_through_still_works() {
    let mut cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));
    cp.kill();

    for _ in 0..3 {
        let started = Instant::now();
        let response = client()
            .post(envoy.url("/x"))
            .header("Knocker-Host", target.host())
            .body("payload")
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], false, "never a receipt");
        assert!(
            body["errors"]["knocker"][0]
                .as_str()
                .unwrap()
                .contains("unavailable"),
            "{body}"
        );
        assert!(
            took < Duration::from_millis(2500),
            "answered within the call timeout: {took:?}"
        );
    }

    let plain = client()
        .get(envoy.url("/still-works"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(upstream.wait_for(1, WAIT).await[0].target, "/still-works");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        target.count(),
        0,
        "nothing was accepted, so nothing is delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let cp = ControlPlane::start(&[("KNOCKER_MAX_BODY_BYTES", "65536")]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            buffer_limit: Some(64 * 1024),
            ..options(&cp, &upstream)
        },
    );

    let over = client()
        .post(envoy.url("/big"))
        .header("Knocker-Host", target.host())
        .body(body(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 413, "Envoy's buffer limit");

    let under = client()
        .post(envoy.url("/small"))
        .header("Knocker-Host", target.host())
        .body(body(60 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(under.status(), 200);

    let direct = client()
        .post(cp.url("/big"))
        .header("Knocker-Host", target.host())
        .body(body(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        direct.status(),
        413,
        "the HTTP ingress's KNOCKER_MAX_BODY_BYTES"
    );
    let error: Value = direct.json().await.unwrap();
    assert_eq!(error["status"], false);
    assert!(
        error["errors"]["body"][0]
            .as_str()
            .unwrap()
            .contains("65536"),
        "{error}"
    );

    let got = target.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.count(), 1);
    assert_eq!(got[0].target, "/small");
}

/// A Knocker request through Envoy: the status and the JSON body.
async fn submit(envoy: &Envoy, target: &Target, path: &str) -> (u16, Value) {
    let response = client()
        .post(envoy.url(path))
        .header("Knocker-Host", target.host())
        .body(path.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A worker's first Knocker request makes a unary call and asks for the stream, which
/// the worker opens on its next tick (100 ms): submits one, then waits for the stream.
async fn open_stream(envoy: &Envoy, target: &Target) {
    assert_eq!(submit(envoy, target, "/first").await.0, 200);
    wait_for_stream(envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocker_requests_share_the_workers_stream_to_the_control_plane() {
    let cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));
    open_stream(&envoy, &target).await;
    let calls_before = grpc_stat(&envoy, "upstream_rq_total");
    let envoy = std::sync::Arc::new(envoy);
    let target = std::sync::Arc::new(target);

    // Small requests and, among them, large bodies (over HTTP/2's default 64 KiB window)
    // on the same stream at the same time.
    let n = 40;
    let large = |i: usize| i.is_multiple_of(8);
    let payload = |i: usize| {
        let mut b = body(if large(i) { 700 * 1024 } else { 100 });
        b[0] = i as u8;
        b
    };
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        let (envoy, host, payload) = (envoy.clone(), target.host(), payload(i));
        sends.spawn(async move {
            let response = client()
                .post(envoy.url(&format!("/s/{i}")))
                .header("Knocker-Host", host)
                .body(payload)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(result) = sends.join_next().await {
        let (status, receipt) = result.unwrap();
        assert_eq!(status, 200, "{receipt}");
        assert_eq!(receipt["status"], true);
        ids.insert(receipt["config"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), n, "one job each");
    let got = target.wait_for(n + 1, WAIT).await;
    let mut paths: Vec<String> = got.iter().map(|r| r.target.clone()).collect();
    paths.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("/s/{i}")).collect();
    expected.push("/first".into());
    expected.sort();
    assert_eq!(paths, expected);
    for r in got.iter().filter(|r| r.target != "/first") {
        let i: usize = r.target["/s/".len()..].parse().unwrap();
        assert!(r.body == payload(i), "body of {} byte for byte", r.target);
    }
    // All on the one HTTP/2 stream, still open: a unary call would add one each.
    assert_eq!(grpc_stat(&envoy, "upstream_rq_total"), calls_before);
    assert_eq!(grpc_stat(&envoy, "upstream_rq_active"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_stops_answering_gets_503_at_the_deadline() {
    let cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));
    open_stream(&envoy, &target).await;
    let calls_before = grpc_stat(&envoy, "upstream_rq_total");

    // Stopped, not gone: the connection and the stream stay open, nothing answers.
    cp.signal("STOP");
    let started = Instant::now();
    let (status, body) = submit(&envoy, &target, "/stalled").await;
    let took = started.elapsed();
    cp.signal("CONT");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], false, "never a receipt");
    let error = body["errors"]["knocker"][0].as_str().unwrap_or_default();
    assert!(error.contains("no reply within 2000 ms"), "{error}");
    // knocker.yaml's timeout_ms is 2000; the deadline is checked every 100 ms.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "503 at the deadline: {took:?}"
    );

    // Resumed, the same stream answers again; the late reply to the stalled request
    // finds nobody waiting and is dropped. (The stalled job itself is committed once the
    // process runs again: as with any timeout, the client cannot know; a resubmission
    // with the same Knocker-Id would get its receipt.)
    let (status, receipt) = submit(&envoy, &target, "/after").await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(
        grpc_stat(&envoy, "upstream_rq_total"),
        calls_before,
        "the stream survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_stops_cleanly_with_streams_open_and_envoy_reconnects() {
    let mut cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let target = Target::ok().await;
    let envoy = Envoy::start("knocker.yaml", &options(&cp, &upstream));
    open_stream(&envoy, &target).await;

    // SIGTERM: the open stream must not hold the shutdown up.
    let started = Instant::now();
    assert!(cp.terminate(), "clean exit:\n{}", cp.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
    let (status, body) = submit(&envoy, &target, "/while-down").await;
    assert_eq!(status, 503, "{body}");

    // Back on the same ports: the filter opens a new stream on its own.
    cp.restart();
    let deadline = Instant::now() + WAIT;
    let mut answered = 0;
    while Instant::now() < deadline && answered < 3 {
        if submit(&envoy, &target, "/again").await.0 == 200 {
            answered += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(answered, 3, "receipts again after the restart");
    wait_for_stream(&envoy).await;
    let got = target.wait_for(4, WAIT).await;
    assert_eq!(got[0].target, "/first");
    assert!(got[1..].iter().all(|r| r.target == "/again"));
}
