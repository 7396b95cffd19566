//! Filter rules through the real Envoy: capture (`envoy/capture.yaml`) and fallback
//! (`envoy/fallback.yaml`), with upstreams that are stopped and started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knocker_e2e::{free_port, ControlPlane, Envoy, EnvoyOptions, Reply, Target};
use serde_json::Value;

use crate::{body, client, get_json, grpc_stat, wait_for_stream, WAIT};

/// `file` with the control plane's ports, `upstream` as the route's cluster and every
/// rule's target (`127.0.0.1:8080` in the file) moved to `target_port`. Retry delays
/// are capped at 1 s so that a target coming back is noticed quickly, and the fallback
/// route's upstream timeout is 1 s instead of 5.
fn start_envoy(file: &str, cp: &ControlPlane, upstream_port: u16, target_port: u16) -> Envoy {
    Envoy::start(
        file,
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port,
            replace: vec![
                (
                    "http://127.0.0.1:8080".into(),
                    format!("http://127.0.0.1:{target_port}"),
                ),
                (
                    r#""max_backoff_s":30"#.into(),
                    r#""max_backoff_s":1"#.into(),
                ),
                ("timeout: 5s".into(), "timeout: 1s".into()),
            ],
            ..EnvoyOptions::default()
        },
    )
}

/// A receipt answer: 202, JSON `status: true`, and the job id in `knocker-id`.
async fn receipt_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202, "{response:?}");
    let id = response.headers()["knocker-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let receipt: Value = response.json().await.unwrap();
    assert_eq!(receipt["status"], true, "{receipt}");
    assert_eq!(receipt["config"]["id"], id.as_str());
    id
}

async fn job(cp: &ControlPlane, id: &str) -> Value {
    get_json(cp.url(&format!("/knocker/jobs/{id}"))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_holds_requests_while_the_target_is_down_and_delivers_them_in_order() {
    let mut cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    let orders_port = free_port(); // nothing listens there yet: the orders service is down
    let envoy = start_envoy("capture.yaml", &cp, upstream.port(), orders_port);

    const N: usize = 12;
    let mut ids = Vec::new();
    for i in 0..N {
        let response = client()
            .post(envoy.url(&format!("/orders/{i}?q=a%2Fb")))
            .header("x-order", i.to_string())
            .header("content-type", "application/octet-stream")
            .body(body(1000 + i))
            .send()
            .await
            .unwrap();
        let id = receipt_id(response).await;
        ids.push(id);
    }
    let first = job(&cp, &ids[0]).await;
    assert_eq!(first["config"]["rule"], "orders");
    assert_eq!(first["config"]["mode"], "capture");
    assert_eq!(first["lane"], format!("http://127.0.0.1:{orders_port}"));
    let later = job(&cp, &ids[N - 1]).await;
    assert_eq!(later["waiting_in_lane"], true, "{later}");

    // Routes without a rule are not touched.
    let plain = client().get(envoy.url("/status")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("knocker-id").is_none());
    assert_eq!(plain.text().await.unwrap(), "ok");
    // A GET to /orders is no rule's business either (the rule names its methods).
    let get = client().get(envoy.url("/orders/0")).send().await.unwrap();
    assert_eq!(get.status(), 200);

    // Let the head fail a few times, then crash the control plane and bring it back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(job(&cp, &ids[0]).await["attempts"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    cp.restart();

    // One attempt at a time, and a slow answer, so out-of-order delivery would show.
    let orders = Target::start_on(orders_port, |_, _| {
        std::thread::sleep(Duration::from_millis(20));
        Reply::status(200)
    })
    .await;
    let got = orders.wait_for(N, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(orders.count(), N, "each request once");
    for (i, request) in got.iter().enumerate() {
        assert_eq!(request.method, "POST");
        assert_eq!(
            request.target,
            format!("/orders/{i}?q=a%2Fb"),
            "in arrival order"
        );
        assert_eq!(request.body, body(1000 + i), "byte for byte");
        assert_eq!(request.header("x-order"), Some(i.to_string()));
        assert_eq!(
            request.header("content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(request.header("x-knocker-id"), Some(ids[i].clone()));
    }
    for id in &ids {
        assert_eq!(job(&cp, id).await["state"], "delivered");
    }
    assert_eq!(
        upstream.count(),
        2,
        "the route's own cluster only saw the two requests without a rule"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_request_survives_a_control_plane_crash_before_its_first_attempt() {
    // Delivery paused: the job is only on disk when the control plane is killed.
    let mut cp = ControlPlane::start(&[("KNOCKER_DELIVERY", "off")]);
    let upstream = Target::ok().await;
    let orders = Target::ok().await;
    let envoy = start_envoy("capture.yaml", &cp, upstream.port(), orders.port());
    let payload = body(64 * 1024);
    let response = client()
        .put(envoy.url("/orders/big"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    let id = receipt_id(response).await;
    cp.kill();
    cp.set_env("KNOCKER_DELIVERY", "on");
    cp.restart();
    let got = orders.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "PUT");
    assert_eq!(got[0].body, payload);
    assert_eq!(got[0].header("x-knocker-id"), Some(id));
}

/// An upstream that answers 503 while `down` is set, else 200 with a marker.
async fn flaky_upstream(down: Arc<AtomicBool>) -> Target {
    Target::start(move |_, _| {
        if down.load(Ordering::SeqCst) {
            Reply::status(503).with_body(b"upstream down")
        } else {
            Reply::status(200)
                .with_header("x-upstream", "fresh")
                .with_body(b"upstream ok")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_an_upstream_failure_with_a_receipt_and_delivers_after_recovery() {
    let mut cp = ControlPlane::start(&[]);
    let down = Arc::new(AtomicBool::new(false));
    let upstream = flaky_upstream(Arc::clone(&down)).await;
    let envoy = start_envoy("fallback.yaml", &cp, upstream.port(), upstream.port());

    // A healthy upstream: its answer passes through untouched, and nothing is stored.
    let ok = client()
        .post(envoy.url("/api/ok"))
        .body("fine")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-upstream"], "fresh");
    assert!(ok.headers().get("knocker-id").is_none());
    assert!(ok.headers().get("knocker-fallback").is_none());
    assert_eq!(ok.text().await.unwrap(), "upstream ok");

    down.store(true, Ordering::SeqCst);
    // A route without a rule gets the upstream's error as it is.
    let plain = client().get(envoy.url("/other")).send().await.unwrap();
    assert_eq!(plain.status(), 503);
    assert_eq!(plain.text().await.unwrap(), "upstream down");

    let payload = body(20_000);
    let response = client()
        .post(envoy.url("/api/orders?id=7"))
        .header("x-custom", "kept")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    let id = receipt_id(response).await;
    let stored = job(&cp, &id).await;
    assert_eq!(stored["config"]["mode"], "fallback");
    assert_eq!(stored["config"]["upstream_status"], 503);

    // Still failing: the control plane keeps trying (and gets 503s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retried = upstream
        .received()
        .iter()
        .filter(|r| r.header("x-knocker-id").as_deref() == Some(id.as_str()))
        .count();
    assert!(retried >= 1, "retries while the upstream is down");
    down.store(false, Ordering::SeqCst);

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if job(&cp, &id).await["state"] == "delivered" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered: Vec<_> = upstream
        .received()
        .into_iter()
        .filter(|r| r.header("x-knocker-id").as_deref() == Some(id.as_str()))
        .collect();
    let last = delivered.last().unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(last.target, "/api/orders?id=7");
    assert_eq!(last.body, payload, "byte for byte");
    assert_eq!(last.header("x-custom").as_deref(), Some("kept"));
    // The original attempt (through Envoy) carried no Knocker id; all the rest did.
    let originals = upstream
        .received()
        .iter()
        .filter(|r| r.target == "/api/orders?id=7" && r.header("x-knocker-id").is_none())
        .count();
    assert_eq!(originals, 1);

    // The worker's stream is open since that first submission. A control plane that
    // stops answering on it: at the deadline the paused response goes on to the caller
    // (resumed from the root context that owns the stream), with the reason.
    wait_for_stream(&envoy).await;
    down.store(true, Ordering::SeqCst);
    cp.signal("STOP");
    let stalled = client()
        .post(envoy.url("/api/orders?id=9"))
        .body("x")
        .send()
        .await
        .unwrap();
    cp.signal("CONT");
    assert_eq!(stalled.status(), 503);
    assert!(stalled.headers().get("knocker-id").is_none());
    let why = stalled.headers()["knocker-fallback"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("no reply within 2000 ms"), "{why}");
    assert_eq!(stalled.text().await.unwrap(), "upstream down");
    // Answering again, on the same stream: a receipt.
    let calls = grpc_stat(&envoy, "upstream_rq_total");
    let again = client()
        .post(envoy.url("/api/orders?id=10"))
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    assert!(again.headers().get("knocker-id").is_some());
    assert_eq!(
        grpc_stat(&envoy, "upstream_rq_total"),
        calls,
        "on the stream"
    );

    // With the control plane gone there is no receipt to give: the caller gets the
    // upstream's own answer, and the reason.
    cp.kill();
    let failed = client()
        .post(envoy.url("/api/orders?id=8"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    assert!(failed.headers().get("knocker-id").is_none());
    let why = failed.headers()["knocker-fallback"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(why.starts_with("failed; "), "{why}");
    assert_eq!(failed.text().await.unwrap(), "upstream down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_covers_a_stopped_upstream_and_leaves_other_failures_alone() {
    let cp = ControlPlane::start(&[]);
    let upstream_port = free_port(); // the upstream is stopped: connections are refused
    let envoy = start_envoy("fallback.yaml", &cp, upstream_port, upstream_port);

    let response = client()
        .delete(envoy.url("/api/items/9"))
        .send()
        .await
        .unwrap();
    let id = receipt_id(response).await;
    assert_eq!(
        job(&cp, &id).await["config"]["upstream_status"],
        Value::Null,
        "no status: the connection failed"
    );

    // Over the rule's 64 KiB buffer limit: Envoy's own error, and a header saying why.
    let big = client()
        .post(envoy.url("/api/upload"))
        .body(body(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 503);
    let why = big.headers()["knocker-fallback"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("65536-byte buffer limit"), "{why}");
    assert!(big.headers().get("knocker-id").is_none());

    let upstream = Target::start_on(upstream_port, |r, _| match r.target.as_str() {
        "/api/teapot" => Reply::status(500).with_body(b"broken"),
        "/api/slow" => Reply::Hang,
        _ => Reply::status(204),
    })
    .await;
    let got = upstream.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "DELETE");
    assert_eq!(got[0].target, "/api/items/9");
    assert_eq!(got[0].header("x-knocker-id"), Some(id));

    // An upstream that does not answer in time (the route's timeout) is taken over too.
    let slow = client()
        .post(envoy.url("/api/slow"))
        .body("patience")
        .send()
        .await
        .unwrap();
    let slow_id = receipt_id(slow).await;
    assert_eq!(
        job(&cp, &slow_id).await["config"]["upstream_status"],
        Value::Null,
        "no status: the upstream timed out"
    );

    // 500 is not in the rule's retry_on: it passes through.
    let teapot = client().get(envoy.url("/api/teapot")).send().await.unwrap();
    assert_eq!(teapot.status(), 500);
    assert!(teapot.headers().get("knocker-id").is_none());
    assert_eq!(teapot.text().await.unwrap(), "broken");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let uploads = upstream
        .received()
        .iter()
        .filter(|r| r.target == "/api/upload")
        .count();
    assert_eq!(uploads, 0, "the over-limit request was not taken over");
}

/// How a route's upstream fails while the request body is still on its way.
#[derive(Debug, Clone, Copy)]
enum EarlyFailure {
    /// Nothing listens: Envoy's connection is refused.
    Refused,
    /// It takes the headers, then resets the connection.
    Reset,
    /// It answers 503 as soon as it has the headers.
    Early503,
}

/// An upstream that fails as `kind` says, without waiting for the request body; its
/// port (for `Refused`, a port nothing listens on).
async fn failing_upstream(kind: EarlyFailure) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let EarlyFailure::Refused = kind {
        return free_port();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if let EarlyFailure::Early503 = kind {
                    let _ = socket
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndown")
                        .await;
                } else {
                    let _ = socket.set_zero_linger(); // close is a reset
                }
            });
        }
    });
    port
}

/// A POST to Envoy over a raw socket: the headers, then the body in `parts` with a pause
/// before each (chunked when asked). Returns the status and the response's head.
async fn post_in_parts(port: u16, path: &str, parts: &[&[u8]], chunked: bool) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let length: usize = parts.iter().map(|p| p.len()).sum();
    let framing = if chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {length}")
    };
    s.write_all(format!("POST {path} HTTP/1.1\r\nhost: shop\r\n{framing}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    for part in parts {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if chunked {
            s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                .await
                .unwrap();
            s.write_all(part).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
        } else {
            s.write_all(part).await.unwrap();
        }
    }
    if chunked {
        s.write_all(b"0\r\n\r\n").await.unwrap();
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            other => panic!("no answer ({other:?}): {}", String::from_utf8_lossy(&head)),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_takes_a_request_whatever_the_timing_of_its_body() {
    use futures_util::StreamExt as _;
    let cp = ControlPlane::start(&[]);
    let target = Target::ok().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap();
    let mut sent = Vec::new();
    for kind in [
        EarlyFailure::Refused,
        EarlyFailure::Reset,
        EarlyFailure::Early503,
    ] {
        let upstream = failing_upstream(kind).await;
        let envoy = start_envoy("fallback.yaml", &cp, upstream, target.port());
        let tag = format!("{kind:?}");
        // In one write.
        let one = format!("{tag}: one write");
        let r = client()
            .post(envoy.url("/api/one"))
            .body(one.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{tag}, one write: {:?}", r.headers());
        sent.push(one);
        // In three writes with pauses between them, with a length and chunked.
        for chunked in [false, true] {
            let parts = [
                format!("{tag} "),
                format!("chunked={chunked} "),
                "in parts".to_owned(),
            ];
            let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                post_in_parts(envoy.port, "/api/parts", &bytes, chunked),
            )
            .await;
            let Ok((status, head)) = answer else {
                panic!(
                    "{tag}, chunked={chunked}: no answer; Envoy:\n{}",
                    envoy.log()
                );
            };
            assert_eq!(status, 202, "{tag}, chunked={chunked}:\n{head}");
            assert!(!head.contains("knocker-fallback"), "{head}");
            sent.push(parts.concat());
        }
        // Over HTTP/2, the body streamed in pieces.
        let pieces = vec![format!("{tag} "), "over ".to_owned(), "h2".to_owned()];
        sent.push(pieces.concat());
        let stream = futures_util::stream::iter(pieces).then(|p| async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, std::io::Error>(p)
        });
        let r = h2
            .post(envoy.url("/api/h2"))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 202, "{tag}, HTTP/2: {:?}", r.headers());
    }
    // Each taken request is delivered, whole, to the rule's target.
    let got = target.wait_for(sent.len(), WAIT).await;
    let mut delivered: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    delivered.sort();
    sent.sort();
    assert_eq!(delivered, sent);
}
