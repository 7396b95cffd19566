//! Global settings from the environment, logs, and Sentry, on the real binary.

use std::time::Duration;

use knocker_e2e::process::start_refused;
use knocker_e2e::{eventually, free_port, ControlPlane, Reply, Target};
use serde_json::Value;

use crate::{client, WAIT};

#[test]
fn invalid_settings_stop_startup_with_a_message_naming_them() {
    let table = [
        ("TIMEOUT", "abc"),
        ("TIMEOUT", "100"), // over TIMEOUT_MAX
        ("TIMEOUT_MAX", "-1"),
        ("RETRIES", "-1"),
        ("RETRIES_MAX", "many"),
        ("RETRIES_BACKOFF_FACTOR", "nan"),
        ("RETRIES_BACKOFF_FACTOR_MAX", "inf"),
        ("SCHEME", "ftp"),
        ("MAX_REDIRECTS", "x"),
        ("STATUS_URL", "status"),
        ("HOSTS_ONLY", "[1, 2]"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("SENTRY_DSN", "not a dsn"),
        ("SENTRY_FAILED_REQUESTS", "maybe"),
        ("KNOCKER_HTTP_ADDR", "nowhere"),
        ("KNOCKER_MAX_BODY_BYTES", "0"),
        ("KNOCKER_WORKER_THREADS", "0"),
        ("KNOCKER_WORKER_THREADS", "many"),
        ("KNOCKER_STORE", "nats://nats.example:4222/jobs"),
        ("KNOCKER_STORE", "redis://nats.example"),
        ("KNOCKER_NATS_CA", "/etc/ssl/certs/ca-certificates.crt"), // without NATS
        ("KNOCKER_NATS_CREDS", "/etc/hostname"),                   // without NATS
    ];
    for (name, value) in table {
        let stderr = start_refused(&[(name, value)], Duration::from_secs(10));
        assert!(
            stderr.contains(name),
            "{name}={value}: the message does not name it: {stderr}"
        );
    }
}

#[test]
fn knocker_1_4_1_settings_are_accepted_as_they_are() {
    let mut cp = ControlPlane::start(&[
        ("SCHEME", "http"),
        ("TIMEOUT", "5"),
        ("RETRIES", "1"),
        ("HOSTS_ONLY", r#"["a.example", "b.example"]"#),
        ("SENTRY_FAILED_REQUESTS", "False"),
        ("LOG_LEVEL", "WARNING"),
        ("STATUS_URL", "/health"),
    ]);
    let body: Value = reqwest::blocking::get(cp.url("/health"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(body["status"], true);
    assert!(cp.terminate(), "SIGTERM stops it cleanly");
}

/// The control plane runs its tasks on one fewer thread than the CPUs (at least one),
/// or on `KNOCKER_WORKER_THREADS`; its start-up line says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_threads_are_one_fewer_than_the_cpus_unless_set() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    for (setting, expected) in [(None, cpus.saturating_sub(1).max(1)), (Some("3"), 3)] {
        let env: Vec<(&str, &str)> = setting
            .map(|n| ("KNOCKER_WORKER_THREADS", n))
            .into_iter()
            .collect();
        let cp = ControlPlane::start(&env);
        let target = Target::ok().await;
        let status = client()
            .post(cp.url("/x"))
            .header("Knocker-Host", target.host())
            .body("work")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
        target.wait_for(1, WAIT).await;
        let log = cp.log();
        let line = log
            .lines()
            .find(|l| l.contains("knocker control plane listening"))
            .unwrap_or_else(|| panic!("no start-up line: {log}"));
        assert!(
            line.contains(&format!("worker_threads={expected}")),
            "{setting:?}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_structured_line_per_attempt() {
    let dir = std::env::temp_dir().join(format!("knocker-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("knocker.jsonl");
    let _ = std::fs::remove_file(&log);
    let cp = ControlPlane::start(&[
        ("LOG_FORMAT", "json"),
        ("LOG_FILE", log.to_str().unwrap()),
        ("LOG_LEVEL", "info"),
    ]);
    let target = Target::start(|_, n| {
        if n == 0 {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let response = client()
        .post(cp.url("/logged?page=2&access_token=s3cret-in-the-query"))
        .header("Knocker-Host", target.host())
        .header("Knocker-Id", "log-1")
        .header("Knocker-Backoff-Factor", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    target.wait_for(2, WAIT).await;
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["job_id"] == "log-1")
            .collect()
    };
    assert!(
        eventually(WAIT, || async { lines().len() >= 2 }).await,
        "log: {:?}",
        std::fs::read_to_string(&log)
    );
    let lines = lines();
    assert_eq!(lines[0]["message"], "attempt failed; will retry");
    assert_eq!(lines[0]["attempt"], 1);
    assert_eq!(lines[0]["status"], 500);
    assert_eq!(lines[0]["level"], "INFO");
    assert!(lines[0]["latency_ms"].is_u64() && lines[0]["url"].is_string());
    assert_eq!(lines[1]["message"], "delivered");
    assert_eq!(lines[1]["attempt"], 2);
    assert_eq!(lines[1]["status"], 200);
    // The URL as the API shows it: a secret in its query redacted, the rest kept.
    let url = lines[1]["url"].as_str().unwrap_or_default();
    assert!(url.contains("page=2") && url.contains("redacted"), "{url}");
    let sent = &target.received()[1].target;
    assert_eq!(
        sent, "/logged?page=2&access_token=s3cret-in-the-query",
        "sent as it came"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("s3cret-in-the-query"), "{text}");
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job to a refused port whose callback also goes to a refused port: the job fails
/// (a failed request) and its failure report is lost (an error).
async fn fail_a_job_and_its_callback(cp: &ControlPlane, id: &str) {
    let response = client()
        .post(cp.url("/lost?api_key=not-for-sentry"))
        .header("Knocker-Host", format!("127.0.0.1:{}", free_port()))
        .header("Knocker-Retries", "0")
        .header("Knocker-Id", id)
        .header(
            "Knocker-Callback",
            format!("http://127.0.0.1:{}/cb", free_port()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentry_gets_errors_and_with_failed_requests_the_failed_jobs() {
    let sentry = Target::start(|_, _| Reply::status(200).with_body(b"{}")).await;
    let dsn = format!("http://publickey@{}/42", sentry.host());

    let mut errors_only = ControlPlane::start(&[("SENTRY_DSN", &dsn)]);
    fail_a_job_and_its_callback(&errors_only, "only-errors").await;
    let mut with_failed =
        ControlPlane::start(&[("SENTRY_DSN", &dsn), ("SENTRY_FAILED_REQUESTS", "yes")]);
    fail_a_job_and_its_callback(&with_failed, "with-failed").await;

    // Events go out in the background; a clean stop flushes what is left.
    let events = || {
        sentry
            .received()
            .into_iter()
            .map(|r| {
                assert_eq!(r.method, "POST");
                assert_eq!(r.target, "/api/42/envelope/");
                assert!(r
                    .header("x-sentry-auth")
                    .unwrap_or_default()
                    .contains("sentry_key=publickey"));
                String::from_utf8_lossy(&r.body).into_owned()
            })
            .collect::<Vec<_>>()
    };
    let has = |needle: &'static str, id: &'static str| {
        let events = events();
        async move { events.iter().any(|e| e.contains(needle) && e.contains(id)) }
    };
    assert!(
        eventually(WAIT, || has("failure report is lost", "only-errors")).await,
        "{:#?}",
        events()
    );
    assert!(
        eventually(WAIT, || has("failure report is lost", "with-failed")).await,
        "{:#?}",
        events()
    );
    assert!(
        eventually(WAIT, || has("Knocker job failed", "with-failed")).await,
        "{:#?}",
        events()
    );
    assert!(errors_only.terminate() && with_failed.terminate());
    assert!(
        !events()
            .iter()
            .any(|e| e.contains("Knocker job failed") && e.contains("only-errors")),
        "failed jobs are reported only with SENTRY_FAILED_REQUESTS"
    );
    // A secret in a job's URL stays here: Sentry gets the URL redacted.
    let events = events();
    assert!(
        events.iter().any(|e| e.contains("/lost?api_key=")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("not-for-sentry")),
        "{events:#?}"
    );
}
