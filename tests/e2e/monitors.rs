//! Monitoring with real processes: a target that flips between healthy and failing, a
//! real SMTP server (aiosmtpd) and a webhook receiver that fails at first; a restart of
//! the control plane in the middle of an outage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knocker_e2e::{knocker_bin, ControlPlane, Reply, SmtpServer, Target};
use serde_json::{json, Value};

use crate::{client, get_json, write_config, WAIT};

async fn monitor(cp: &ControlPlane, name: &str) -> Value {
    get_json(cp.url(&format!("/knocker/monitors/{name}"))).await
}

/// Waits until the monitor has `n` more results than `after` (bounded by `WAIT`).
async fn checks_after(cp: &ControlPlane, name: &str, after: usize, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = monitor(cp, name).await;
        if m["results"].as_array().map_or(0, Vec::len) >= after + n {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no new checks: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn result_count(m: &Value) -> usize {
    m["results"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_and_resolved_reach_email_and_webhook_once_even_across_a_restart() {
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&healthy);
    let target = Target::start(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(200).with_body(br#"{"status":"up"}"#)
        } else {
            Reply::status(503).with_body(br#"{"status":"down"}"#)
        }
    })
    .await;
    // The webhook receiver fails its first two requests.
    let hook_calls = Arc::new(AtomicUsize::new(0));
    let calls = Arc::clone(&hook_calls);
    let hook = Target::start(move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) < 2 {
            Reply::status(500)
        } else {
            Reply::status(204)
        }
    })
    .await;
    let smtp = SmtpServer::start();
    let config = write_config(&format!(
        r#"
[notifiers.mail]
email = {{ host = "127.0.0.1", port = {smtp}, tls = "none", from = "knocker@example.com", to = ["ops@example.com"] }}
max_backoff_s = 1

[notifiers.hook]
webhook = "http://{hook}/alerts"
headers = {{ "X-Token" = "s3cret" }}
backoff_factor = 0.1
max_backoff_s = 0.3

[monitors.api]
url = "http://{target}/health"
interval_s = 0.2
timeout_s = 1
failure_threshold = 2
success_threshold = 2
send_on_resolved = true
notify = ["mail", "hook"]
conditions = [{{ status = [200] }}, {{ json_pointer = "/status", equals = "up" }}]
"#,
        smtp = smtp.port,
        hook = hook.host(),
        target = target.host(),
    ));
    let mut cp = ControlPlane::start(&[("KNOCKER_CONFIG", &config)]);

    let m = checks_after(&cp, "api", 0, 3).await;
    assert_eq!(m["health"], "up");
    assert_eq!(m["source"], "file");
    assert!(smtp.messages().is_empty(), "no alert while healthy");

    // The outage: two failed checks in a row make it down; one alert per channel.
    healthy.store(false, Ordering::SeqCst);
    let mail = smtp.wait_for(1, WAIT).await;
    assert_eq!(mail[0].subject, "[Knocker] DOWN: api");
    assert_eq!(mail[0].to, "ops@example.com");
    assert!(
        mail[0].text.contains("status 503 not in [200]"),
        "{}",
        mail[0].text
    );
    let down_id = mail[0]
        .message_id
        .trim_matches(['<', '>'])
        .split('@')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        down_id.starts_with("monitor.api.") && down_id.ends_with(".1.mail"),
        "{down_id}"
    );
    let hook_id = down_id.replace(".mail", ".hook");
    // The webhook arrives on its third attempt, the same notification each time.
    let got = hook.wait_for(3, WAIT).await;
    for request in &got {
        assert_eq!(request.target, "/alerts");
        assert_eq!(request.header("x-token").as_deref(), Some("s3cret"));
        assert_eq!(request.header("x-knocker-id"), Some(hook_id.clone()));
        let body = request.json();
        assert_eq!(body["event"], "down");
        assert_eq!(body["monitor"], "api");
        assert_eq!(body["reason"], "status 503 not in [200]");
    }
    let m = monitor(&cp, "api").await;
    assert_eq!(m["health"], "down");
    assert_eq!(m["transitions"][0]["health"], "down");
    assert_eq!(m["last"]["failed_condition"], "status 503 not in [200]");

    // A crash during the outage: after the restart the monitor is still down, and no
    // second alert goes out however many failed checks follow.
    let failures = monitor(&cp, "api").await["failures_in_a_row"]
        .as_u64()
        .unwrap();
    cp.kill();
    cp.restart();
    let before = result_count(&monitor(&cp, "api").await);
    // The stored state goes on: down at once, the failure count continued.
    let m = checks_after(&cp, "api", before, 1).await;
    assert_eq!(m["health"], "down");
    assert!(m["failures_in_a_row"].as_u64().unwrap() > failures, "{m}");
    let m = checks_after(&cp, "api", before, 5).await;
    assert_eq!(m["health"], "down");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.messages().len(), 1, "no duplicate email");
    assert_eq!(hook.count(), 3, "no duplicate webhook");

    // Recovery: two good checks, then the resolution, once per channel.
    healthy.store(true, Ordering::SeqCst);
    let mail = smtp.wait_for(2, WAIT).await;
    assert_eq!(mail[1].subject, "[Knocker] RESOLVED: api");
    assert!(mail[1].text.contains("api is UP again"), "{}", mail[1].text);
    let got = hook.wait_for(4, WAIT).await;
    assert_eq!(got[3].json()["event"], "resolved");
    assert_eq!(
        got[3].header("x-knocker-id"),
        Some(hook_id.replace(".1.hook", ".2.hook"))
    );

    let m = monitor(&cp, "api").await;
    assert_eq!(m["health"], "up");
    let transitions: Vec<&str> = m["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["health"].as_str().unwrap())
        .collect();
    assert_eq!(transitions, ["up", "down"], "newest first");
    // On the console: the outage at WARN with its reason, the recovery at INFO.
    let log = cp.log();
    assert!(
        log.lines().any(|l| l.contains(" WARN ")
            && l.contains("monitor down")
            && l.contains("status 503 not in [200]")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains("monitor up again")),
        "{log}"
    );
    let day = m["uptime"]["24h"].as_f64().unwrap();
    assert!(day > 0.0 && day < 1.0, "{day}");

    // The CLI shows it.
    let cli = std::process::Command::new(knocker_bin())
        .args(["monitors", "list", "--url", &cp.url("")])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(table.contains("api") && table.contains("up"), "{table}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.messages().len(), 2);
    assert_eq!(hook.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_are_created_updated_and_deleted_through_the_api() {
    let target = Target::start(|_, _| Reply::status(200).with_body(b"all good")).await;
    let config = write_config(&format!(
        "[monitors.fixed]\nurl = \"http://{}/\"\ninterval_s = 5\n",
        target.host()
    ));
    let cp = ControlPlane::start(&[
        ("KNOCKER_CONFIG", &config),
        ("KNOCKER_ADMIN_TOKEN", "tok"),
        ("KNOCKER_MONITOR_MIN_INTERVAL", "0.2"),
    ]);
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut r = client().request(method, cp.url(path)).bearer_auth("tok");
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    use reqwest::Method;

    let no_token = client()
        .post(cp.url("/knocker/monitors"))
        .json(&json!({"name": "x", "url": "http://t/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);

    let bad = send(
        Method::POST,
        "/knocker/monitors",
        Some(json!({"name": "web", "url": "ftp://nope"})),
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(body["errors"]["monitor"][0]
        .as_str()
        .unwrap()
        .contains("monitor.url"));
    let unknown_field = send(
        Method::POST,
        "/knocker/monitors",
        Some(json!({"name": "web", "url": "http://t/", "intervl": 3})),
    )
    .await
    .unwrap();
    assert_eq!(unknown_field.status(), 400);

    let created = send(
        Method::POST,
        "/knocker/monitors",
        Some(json!({
            "name": "web",
            "url": format!("http://{}/page", target.host()),
            "interval_s": 0.2,
            "conditions": [{"body_contains": "good"}, {"response_time_below_ms": 5000}],
        })),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let again = send(
        Method::POST,
        "/knocker/monitors",
        Some(json!({"name": "web", "url": "http://t/"})),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 409);

    // Before its first check has ended a monitor is pending, with no uptime yet.
    let hung = Target::start(|_, _| Reply::Hang).await;
    let pending = send(
        Method::POST,
        "/knocker/monitors",
        Some(json!({"name": "hung", "url": format!("http://{}/", hung.host()), "timeout_s": 30})),
    )
    .await
    .unwrap();
    assert_eq!(pending.status(), 201);
    let m = monitor(&cp, "hung").await;
    assert_eq!(m["health"], "pending", "{m}");
    assert_eq!(m["last"], Value::Null, "{m}");
    assert_eq!(m["uptime"]["24h"], Value::Null, "{m}");
    let deleted = send(Method::DELETE, "/knocker/monitors/hung", None)
        .await
        .unwrap();
    assert!(deleted.status().is_success());

    let m = checks_after(&cp, "web", 0, 2).await;
    assert_eq!(m["source"], "api");
    assert_eq!(m["last"]["ok"], true);

    // An update keeps the history; the new condition fails and says which.
    let updated = send(
        Method::PUT,
        "/knocker/monitors/web",
        Some(json!({
            "url": format!("http://{}/page", target.host()),
            "interval_s": 0.2,
            "conditions": [{"body_regex": "^bad"}],
        })),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = monitor(&cp, "web").await;
        if m["last"]["ok"] == false {
            assert_eq!(m["last"]["failed_condition"], "body does not match /^bad/");
            assert!(result_count(&m) >= 3, "history kept across the update");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let list = get_json(cp.url("/knocker/monitors")).await;
    let names: Vec<&str> = list["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fixed", "web"]);

    let file_one = send(
        Method::PUT,
        "/knocker/monitors/fixed",
        Some(json!({"url": "http://t/"})),
    )
    .await
    .unwrap();
    assert_eq!(file_one.status(), 409, "file monitors change in the file");
    assert_eq!(
        send(Method::DELETE, "/knocker/monitors/web", None)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send(Method::GET, "/knocker/monitors/web", None)
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        send(Method::DELETE, "/knocker/monitors/web", None)
            .await
            .unwrap()
            .status(),
        404
    );
}
