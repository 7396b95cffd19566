//! The Knocker protocol end to end, through Envoy and through the HTTP ingress: the
//! error table, loop guard, status URL, retries and their timing, failure codes,
//! callbacks, redirects, forwarding rules.

use std::sync::Arc;
use std::time::Duration;

use knocker_e2e::{free_port, Received, Reply, Target};
use serde_json::{json, Value};

use crate::stack::{Door, Stack, DOORS};
use crate::{client, WAIT};

/// Sends a Knocker request; returns status, `knocker-id` header and JSON body.
async fn knock(
    stack: &Stack,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, Value) {
    let mut request = client()
        .request(method.parse().unwrap(), stack.url(path))
        .body(body.to_owned());
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get("knocker-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    (
        status,
        id,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn gap_s(a: &Received, b: &Received) -> f64 {
    (b.at - a.at).as_secs_f64()
}

const RANGE_TIMEOUT: &str = "Must be greater than or equal to 0 and less than or equal to 60.0.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_exact_400_with_every_error() {
    let missing = json!({"knocker-host": ["Missing data for required field."]});
    let table: Vec<(Vec<(&str, &str)>, Value)> = vec![
        (vec![("Knocker-Retries", "1")], missing.clone()),
        (
            vec![("Knocker-Host", "")],
            json!({"knocker-host": ["Not a valid host."]}),
        ),
        (
            vec![("Knocker-Host", "bad host/")],
            json!({"knocker-host": ["Not a valid host."]}),
        ),
        (
            vec![("Knocker-Host", "a.example:99999")],
            json!({"knocker-host": ["Not a valid host."]}),
        ),
        (
            vec![("Knocker-Host", "denied.example")],
            json!({"knocker-host": ["Host 'denied.example' is not in allowed hosts: allowed.example, 127.0.0.1"]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Timeout", "abc"),
            ],
            json!({"knocker-timeout": ["Not a valid number."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Timeout", "nan"),
            ],
            json!({"knocker-timeout": ["Special numeric values (nan or infinity) are not permitted."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Timeout", "inf"),
            ],
            json!({"knocker-timeout": ["Special numeric values (nan or infinity) are not permitted."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Timeout", "60.01"),
            ],
            json!({"knocker-timeout": [RANGE_TIMEOUT]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Retries", "1.5"),
            ],
            json!({"knocker-retries": ["Not a valid integer."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Retries", "2.0"),
            ],
            json!({"knocker-retries": ["Not a valid integer."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Retries", "11"),
            ],
            json!({"knocker-retries": ["Must be greater than or equal to 0 and less than or equal to 10."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Backoff-Factor", "-1"),
            ],
            json!({"knocker-backoff-factor": ["Must be greater than or equal to 0 and less than or equal to 600."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Scheme", "ftp"),
            ],
            json!({"knocker-scheme": ["Must be one of: https, http."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Callback", "ftp://x.example/"),
            ],
            json!({"knocker-callback": ["Not a valid URL."]}),
        ),
        (
            vec![
                ("Knocker-Host", "allowed.example"),
                ("Knocker-Callback", "not a url"),
            ],
            json!({"knocker-callback": ["Not a valid URL."]}),
        ),
        (
            vec![
                ("Knocker-Timeout", "-1"),
                ("Knocker-Retries", "x"),
                ("Knocker-Scheme", "HTTP"),
                ("Knocker-Callback", "/relative"),
            ],
            json!({
                "knocker-host": ["Missing data for required field."],
                "knocker-timeout": [RANGE_TIMEOUT],
                "knocker-retries": ["Not a valid integer."],
                "knocker-scheme": ["Must be one of: https, http."],
                "knocker-callback": ["Not a valid URL."],
            }),
        ),
    ];
    for door in DOORS {
        let stack = Stack::start(door, &[("HOSTS_ONLY", "allowed.example, 127.0.0.1")]).await;
        for (headers, errors) in &table {
            let (status, id, body) = knock(&stack, "POST", "/x", headers, "payload").await;
            assert_eq!(status, 400, "{door:?} {headers:?}: {body}");
            assert_eq!(
                body,
                json!({"errors": errors, "status": false}),
                "{door:?} {headers:?}"
            );
            assert_eq!(id, None);
        }
        let (status, _, body) = knock(&stack, "GET", "/knocker/status", &[], "").await;
        assert_eq!(status, 200);
        assert_eq!(body["tasks"], 0, "{door:?}: nothing was scheduled");
        assert_eq!(
            stack.upstream.count(),
            0,
            "{door:?}: nothing reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_status_url_and_idempotent_ids() {
    for door in DOORS {
        let stack = Stack::start(door, &[]).await;
        let target = Target::ok().await;
        let host = target.host();

        let response = client()
            .post(stack.url("/x"))
            .header("Knocker-Host", &host)
            .header("X-Knocker", "1.4.1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 406, "{door:?}");
        assert_eq!(
            response.text().await.unwrap(),
            "Ignore requests from knocker"
        );

        let (s1, id1, r1) = knock(
            &stack,
            "PUT",
            "/once",
            &[("Knocker-Host", &host), ("Knocker-Id", "same-id")],
            "one",
        )
        .await;
        let (s2, id2, r2) = knock(
            &stack,
            "PUT",
            "/once",
            &[("Knocker-Host", &host), ("Knocker-Id", "same-id")],
            "two",
        )
        .await;
        assert_eq!((s1, s2), (200, 200), "{door:?}");
        assert_eq!(id1.as_deref(), Some("same-id"));
        assert_eq!(id2.as_deref(), Some("same-id"));
        // The same job, described by the request just made (Envoy gives each request its
        // own x-request-id, which shows whose headers a receipt holds).
        assert_eq!(r1["config"], r2["config"], "{door:?}");
        assert_eq!((&r1["url"], &r1["method"]), (&r2["url"], &r2["method"]));

        let (_, _, generated) = knock(&stack, "GET", "/gen", &[("Knocker-Host", &host)], "").await;
        let generated_id = generated["config"]["id"].as_str().unwrap().to_owned();
        assert_eq!(generated_id.len(), 32);
        assert!(generated_id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

        let got = target.wait_for(2, WAIT).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            target.count(),
            2,
            "{door:?}: the X-Knocker request and the duplicate were not scheduled"
        );
        let once: Vec<&Received> = got.iter().filter(|r| r.target == "/once").collect();
        assert_eq!(once.len(), 1);
        assert_eq!(once[0].body, b"one");

        let (status, _, s) = knock(&stack, "POST", "/knocker/status", &[], "").await;
        assert_eq!(status, 200, "{door:?}");
        assert_eq!(s["status"], true);
        assert_eq!(s["processed"], 2);
        assert_eq!(s["tasks"], 0);
        assert!(s["version"].is_string() && s["worker"].is_u64(), "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_success_within_the_backoff_bounds() {
    for door in DOORS {
        let stack = Stack::start(door, &[]).await;
        let target = Target::start(|_, n| {
            if n < 2 {
                Reply::status(500)
            } else {
                Reply::status(200)
            }
        })
        .await;
        let callback = Target::ok().await;
        let (status, _, receipt) = knock(
            &stack,
            "POST",
            "/flaky",
            &[
                ("Knocker-Host", &target.host()),
                ("Knocker-Retries", "3"),
                ("Knocker-Backoff-Factor", "0.2"),
                (
                    "Knocker-Callback",
                    &format!("http://{}/cb", callback.host()),
                ),
            ],
            "data",
        )
        .await;
        assert_eq!(status, 200, "{door:?}: {receipt}");
        let got = target.wait_for(3, WAIT).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(target.count(), 3, "{door:?}: stops at the first success");
        // Delay after failed attempt k: 0.2·2^(k−1) + U[0,1) seconds (+ scheduling slack).
        let (g1, g2) = (gap_s(&got[0], &got[1]), gap_s(&got[1], &got[2]));
        assert!((0.2..1.2 + 0.3).contains(&g1), "{door:?}: first delay {g1}");
        assert!(
            (0.4..1.4 + 0.3).contains(&g2),
            "{door:?}: second delay {g2}"
        );
        let ids: Vec<Option<String>> = got.iter().map(|r| r.header("x-knocker-id")).collect();
        assert!(
            ids.iter()
                .all(|i| i.as_deref() == receipt["config"]["id"].as_str()),
            "{ids:?}"
        );
        assert!(got.iter().all(|r| r.body == b"data"));
        assert_eq!(callback.count(), 0, "{door:?}: no callback after a success");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_failure_sends_the_callback_which_is_retried_too() {
    for door in DOORS {
        let stack = Stack::start(door, &[]).await;
        let target = Target::start(|_, _| Reply::status(503)).await;
        let callback = Target::start(|_, n| {
            if n == 0 {
                Reply::status(500)
            } else {
                Reply::status(204)
            }
        })
        .await;
        let callback_url = format!("http://{}/hook?src=knocker", callback.host());
        let (status, _, receipt) = knock(
            &stack,
            "PUT",
            "/items/7?v=1",
            &[
                ("Knocker-Host", &target.host()),
                ("Knocker-Retries", "1"),
                ("Knocker-Backoff-Factor", "0"),
                ("Knocker-Callback", &callback_url),
                ("Knocker-Id", "job-cb"),
                ("Knocker-Trace", "t-1"),
                ("X-App", "a"),
                ("Content-Type", "text/plain"),
            ],
            "item",
        )
        .await;
        assert_eq!(status, 200, "{door:?}: {receipt}");
        assert_eq!(receipt["config"]["knocker-trace"], "t-1");

        let attempts = target.wait_for(2, WAIT).await;
        let calls = callback.wait_for(2, WAIT).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(target.count(), 2, "{door:?}: retries + 1 attempts");
        assert_eq!(
            callback.count(),
            2,
            "{door:?}: the callback was retried once, then accepted"
        );
        assert!(attempts
            .iter()
            .all(|r| r.method == "PUT" && r.target == "/items/7?v=1"));
        assert!(
            attempts.iter().all(|r| r.header("knocker-trace").is_none()),
            "knocker-* never reach the target"
        );

        let cb = &calls[1];
        assert_eq!(cb.method, "POST");
        assert_eq!(cb.target, "/hook?src=knocker");
        assert_eq!(cb.header_names()[0], "x-knocker-origin");
        assert_eq!(cb.header("x-knocker-origin").as_deref(), Some("knocker"));
        let order: Vec<String> = cb
            .header_names()
            .into_iter()
            .filter(|n| {
                [
                    "x-knocker-origin",
                    "x-knocker",
                    "x-knocker-id",
                    "x-app",
                    "content-type",
                ]
                .contains(&n.as_str())
            })
            .collect();
        assert_eq!(
            order,
            [
                "x-knocker-origin",
                "x-knocker",
                "x-knocker-id",
                "x-app",
                "content-type"
            ],
            "{door:?}"
        );
        assert_eq!(
            cb.header_all("content-type"),
            ["application/json"],
            "always JSON, once"
        );
        assert_eq!(cb.header("x-knocker-id").as_deref(), Some("job-cb"));
        let mut config = receipt["config"].clone();
        config.as_object_mut().unwrap().remove("callback");
        assert_eq!(
            cb.json(),
            json!({"url": format!("http://{}/items/7?v=1", target.host()), "method": "PUT", "config": config, "status_code": 503}),
            "{door:?}"
        );
        assert_eq!(
            calls[0].json(),
            cb.json(),
            "the retried callback is the same report"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_with_knockers_codes() {
    let stack = Stack::start(Door::Envoy, &[("MAX_REDIRECTS", "2")]).await;
    let callback = Target::ok().await;
    let refused = free_port();
    let closes = Target::start(|_, _| Reply::Close).await;
    let hangs = Target::start(|_, _| Reply::Hang).await;
    let garbage = Target::start(|_, _| Reply::Raw(b"SURPRISE\r\n\r\n".to_vec())).await;
    let not_found = Target::start(|_, _| Reply::status(404)).await;
    let loops = Arc::new(
        Target::start(|r, _| {
            Reply::status(302).with_header("location", &format!("/again{}", r.target.len()))
        })
        .await,
    );
    let cases: Vec<(&str, String, &str, u64)> = vec![
        ("refused", format!("127.0.0.1:{refused}"), "10", 502),
        ("closed", closes.host(), "10", 503),
        ("timeout", hangs.host(), "0.3", 504),
        ("protocol", garbage.host(), "10", 418),
        ("status", not_found.host(), "10", 404),
        ("redirect-loop", loops.host(), "10", 418),
    ];
    for (id, host, timeout, _) in &cases {
        let (status, _, body) = knock(
            &stack,
            "POST",
            "/p",
            &[
                ("Knocker-Host", host),
                ("Knocker-Retries", "0"),
                ("Knocker-Timeout", timeout),
                ("Knocker-Id", id),
                (
                    "Knocker-Callback",
                    &format!("http://{}/cb", callback.host()),
                ),
            ],
            "x",
        )
        .await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    // Timeout 0: every attempt times out without sending anything — the callback too,
    // since it is delivered with the job's policy (as in Knocker 1.4.1).
    let (status, _, _) = knock(
        &stack,
        "POST",
        "/p",
        &[
            ("Knocker-Host", &not_found.host()),
            ("Knocker-Retries", "0"),
            ("Knocker-Timeout", "0"),
            ("Knocker-Id", "zero-timeout"),
            (
                "Knocker-Callback",
                &format!("http://{}/cb", callback.host()),
            ),
        ],
        "x",
    )
    .await;
    assert_eq!(status, 200);
    let reports = callback.wait_for(cases.len(), WAIT).await;
    for (id, _, _, code) in &cases {
        let report = reports
            .iter()
            .find(|r| r.header("x-knocker-id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no callback for {id}"));
        assert_eq!(report.json()["status_code"], *code, "{id}");
    }
    assert!(
        knocker_e2e::eventually(WAIT, || async {
            stack
                .cp
                .log()
                .contains("job_id=zero-timeout kind=\"callback\"")
        })
        .await,
        "the zero-timeout job's callback was attempted"
    );
    assert_eq!(
        not_found.count(),
        1,
        "timeout 0 sends nothing: only the `status` case reached it"
    );
    assert!(!reports
        .iter()
        .any(|r| r.header("x-knocker-id").as_deref() == Some("zero-timeout")));
    assert_eq!(
        loops.count(),
        3,
        "the first request and MAX_REDIRECTS=2 redirects"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_with_method_and_body() {
    for door in DOORS {
        let stack = Stack::start(door, &[]).await;
        let fin = Target::ok().await;
        let location = format!("http://{}/final?x=1", fin.host());
        let hop =
            Target::start(move |_, _| Reply::status(307).with_header("location", &location)).await;
        let (status, _, _) = knock(
            &stack,
            "POST",
            "/start",
            &[("Knocker-Host", &hop.host()), ("Knocker-Retries", "0")],
            "moved",
        )
        .await;
        assert_eq!(status, 200);
        let got = fin.wait_for(1, WAIT).await;
        assert_eq!(got[0].method, "POST", "{door:?}");
        assert_eq!(got[0].target, "/final?x=1");
        assert_eq!(got[0].body, b"moved");
        assert_eq!(hop.count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_rules_repeated_headers_chunked_bodies_retry_after_and_no_cookies() {
    for door in DOORS {
        let stack = Stack::start(door, &[]).await;
        let busy_seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::clone(&busy_seen);
        let target = Target::start(move |r, _| {
            if r.target == "/busy" && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Reply::status(503)
                    .with_header("retry-after", "1")
                    .with_header("set-cookie", "s=1")
            } else {
                Reply::status(200).with_header("set-cookie", "session=abc")
            }
        })
        .await;
        let host = target.host();

        // Repeated headers are sent once each, in order.
        let response = client()
            .post(stack.url("/rep"))
            .header("Knocker-Host", &host)
            .header("X-Rep", "a")
            .header("X-Rep", "b")
            .header("X-Rep", "c")
            .body("r")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let rep = target.wait_for(1, WAIT).await.remove(0);
        assert_eq!(rep.header_all("x-rep"), ["a", "b", "c"], "{door:?}");

        // A chunked request body goes out with a Content-Length.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(b"hello ".to_vec()),
            Ok(b"chunked ".to_vec()),
            Ok(b"world".to_vec()),
        ];
        let response = client()
            .post(stack.url("/chunked"))
            .header("Knocker-Host", &host)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let got = target.wait_for(2, WAIT).await;
        let chunked = got.iter().find(|r| r.target == "/chunked").unwrap();
        assert_eq!(chunked.body, b"hello chunked world");
        assert_eq!(
            chunked.header("content-length").as_deref(),
            Some("19"),
            "{door:?}"
        );
        assert!(chunked.header("transfer-encoding").is_none());

        // Retry-After on a 503 is honoured (backoff factor 0 would retry at once).
        let (status, _, _) = knock(
            &stack,
            "POST",
            "/busy",
            &[
                ("Knocker-Host", &host),
                ("Knocker-Retries", "1"),
                ("Knocker-Backoff-Factor", "0"),
            ],
            "b",
        )
        .await;
        assert_eq!(status, 200);
        let got = target.wait_for(4, WAIT).await;
        let busy: Vec<&Received> = got.iter().filter(|r| r.target == "/busy").collect();
        assert_eq!(busy.len(), 2);
        let waited = gap_s(busy[0], busy[1]);
        assert!(
            waited >= 0.95,
            "{door:?}: Retry-After 1 honoured, waited {waited}"
        );

        // Cookies set by a target never travel with another job (or a retry).
        assert!(
            got.iter().all(|r| r.header("cookie").is_none()),
            "{door:?}: no shared cookie jar"
        );
    }
}
