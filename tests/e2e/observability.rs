//! What operators see: the control plane's `/metrics` and the filter's counters on
//! Envoy's `/stats/prometheus`, after real submissions through both doors, real
//! deliveries and failures, and a real monitor.

use std::time::Duration;

use knocker_e2e::{ControlPlane, Envoy, EnvoyOptions, Reply, Target};

use crate::stack::{Door, Stack};
use crate::{client, sample, scrape_until, write_config, TOKEN, WAIT};

/// Envoy's `/stats/prometheus`.
async fn envoy_prometheus(envoy: &Envoy) -> String {
    let url = format!("http://127.0.0.1:{}/stats/prometheus", envoy.admin_port);
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_both_doors_attempts_jobs_and_a_monitor_and_need_the_token() {
    let ok = Target::ok().await;
    let broken = Target::start(|_, _| Reply::status(500)).await;
    let config = write_config(&format!(
        "[monitors.web]\nurl = \"http://{}/health\"\ninterval_s = 0.2\n",
        ok.host()
    ));
    let stack = Stack::start(
        Door::Envoy,
        &[("KNOCKER_ADMIN_TOKEN", TOKEN), ("KNOCKER_CONFIG", &config)],
    )
    .await;
    let Stack {
        cp,
        envoy,
        upstream: _upstream,
    } = stack;
    let envoy = envoy.expect("Envoy");
    let knock = |url: String, host: String, retries: &'static str| {
        client()
            .post(url)
            .header("Knocker-Host", host)
            .header("Knocker-Retries", retries)
            .body("{}")
            .send()
    };
    // Two through Envoy (the gRPC door) to the good target, one straight to the HTTP
    // door for the broken one, and one the HTTP door refuses.
    for _ in 0..2 {
        let r = knock(envoy.url("/in"), ok.host(), "0").await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = knock(cp.url("/in"), broken.host(), "0").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = knock(cp.url("/in"), ok.host(), "many").await.unwrap();
    assert_eq!(r.status(), 400);

    // The scrape needs the admin token, like the API.
    let refused = client().get(cp.url("/metrics")).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    let text = scrape_until(&cp, "knocker_jobs{state=\"failed\"}", 1.0).await;
    let text = if sample(&text, "knocker_jobs{state=\"delivered\"}") == Some(2.0) {
        text
    } else {
        scrape_until(&cp, "knocker_jobs{state=\"delivered\"}", 2.0).await
    };
    let ok_host = ok.host();
    let broken_host = broken.host();
    for (series, value) in [
        (
            "knocker_submissions_total{door=\"grpc\",mode=\"knock\",result=\"accepted\"}".to_owned(),
            2.0,
        ),
        (
            "knocker_submissions_total{door=\"http\",mode=\"knock\",result=\"accepted\"}".into(),
            1.0,
        ),
        (
            "knocker_submissions_total{door=\"http\",mode=\"knock\",result=\"rejected\"}".into(),
            1.0,
        ),
        (
            format!("knocker_attempts_total{{target=\"{ok_host}\",kind=\"target\",outcome=\"delivered\",status_class=\"2xx\"}}"),
            2.0,
        ),
        (
            format!("knocker_attempts_total{{target=\"{broken_host}\",kind=\"target\",outcome=\"failed\",status_class=\"5xx\"}}"),
            1.0,
        ),
        (
            "knocker_jobs_finished_total{kind=\"target\",result=\"delivered\"}".into(),
            2.0,
        ),
        (
            "knocker_jobs_finished_total{kind=\"target\",result=\"failed\"}".into(),
            1.0,
        ),
        // Each submission is timed, by door and answer.
        (
            "knocker_submission_duration_seconds_count{door=\"grpc\",result=\"accepted\"}".into(),
            2.0,
        ),
        (
            "knocker_submission_duration_seconds_count{door=\"http\",result=\"accepted\"}".into(),
            1.0,
        ),
        (
            "knocker_submission_duration_seconds_count{door=\"http\",result=\"rejected\"}".into(),
            1.0,
        ),
        ("knocker_job_duration_seconds_count{kind=\"target\",result=\"delivered\"}".into(), 2.0),
        ("knocker_attempt_duration_seconds_count{kind=\"target\"}".into(), 3.0),
        ("knocker_jobs{state=\"pending\"}".into(), 0.0),
        ("knocker_oldest_pending_age_seconds".into(), 0.0),
    ] {
        assert_eq!(sample(&text, &series), Some(value), "{series} in:\n{text}");
    }
    // An accepted submission waited for its commit: it took some time, and less than
    // the whole test.
    let waited = sample(
        &text,
        "knocker_submission_duration_seconds_sum{door=\"grpc\",result=\"accepted\"}",
    )
    .unwrap_or(0.0);
    assert!(waited > 0.0 && waited < 10.0, "{text}");
    // Each commit is one or more changes: three submissions and their attempts.
    let commits = sample(&text, "knocker_store_commit_duration_seconds_count").unwrap_or(0.0);
    assert!(commits >= 1.0, "{text}");
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );

    // The monitor: up once checked, its checks counted, its uptime a ratio.
    let text = scrape_until(&cp, "knocker_monitor_up{monitor=\"web\"}", 1.0).await;
    assert!(
        sample(
            &text,
            "knocker_monitor_checks_total{monitor=\"web\",result=\"ok\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "knocker_monitor_uptime_ratio{monitor=\"web\",window=\"24h\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("knocker_target_in_flight{{target=\"{ok_host}\"}}")
        ),
        Some(0.0),
        "{text}"
    );

    // The filter's own counters, on Envoy's Prometheus page.
    let stats = envoy_prometheus(&envoy).await;
    assert_eq!(sample(&stats, "knocker_submitted{}"), Some(2.0), "{stats}");
    assert_eq!(sample(&stats, "knocker_receipts{}"), Some(2.0), "{stats}");
    assert_eq!(sample(&stats, "knocker_rejected{}"), Some(0.0), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_counts_per_rule_with_the_rule_as_a_tag() {
    // The route's upstream answers 503: the fallback rule `api` takes each request over.
    let upstream = Target::start(|_, _| Reply::status(503)).await;
    let target = Target::ok().await;
    let hook = Target::ok().await;
    // A group, and a monitor of a closed port that notifies: every family has samples.
    let config = write_config(&format!(
        r#"
[groups.caches]
members = ["http://{target}"]

[notifiers.hook]
webhook = "http://{hook}/alerts"

[monitors.gone]
url = "http://127.0.0.1:{closed}/health"
interval_s = 0.2
timeout_s = 1
failure_threshold = 1
notify = ["hook"]
"#,
        target = target.host(),
        hook = hook.host(),
        closed = knocker_e2e::free_port(),
    ));
    let cp = ControlPlane::start(&[("KNOCKER_CONFIG", &config)]);
    let envoy = Envoy::start(
        "fallback.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            replace: vec![(
                "http://127.0.0.1:8080".into(),
                format!("http://{}", target.host()),
            )],
            ..EnvoyOptions::default()
        },
    );
    for _ in 0..3 {
        let r = client()
            .post(envoy.url("/api/orders"))
            .body("{\"n\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    target.wait_for(3, WAIT).await;
    hook.wait_for(1, WAIT).await;
    let stats = envoy_prometheus(&envoy).await;
    for (series, value) in [
        ("knocker_rule_submitted{knocker_rule=\"api\"}", 3.0),
        ("knocker_rule_fallback_taken{knocker_rule=\"api\"}", 3.0),
        ("knocker_rule_fallback_off{knocker_rule=\"api\"}", 0.0),
        ("knocker_submitted{}", 3.0),
        ("knocker_fallback_taken{}", 3.0),
    ] {
        assert_eq!(sample(&stats, series), Some(value), "{series} in:\n{stats}");
    }
    let text = scrape_until(
        &cp,
        "knocker_notifications_total{notifier=\"hook\",result=\"delivered\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&text, "knocker_monitor_up{monitor=\"gone\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "knocker_broadcast_group_members{group=\"caches\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "knocker_submissions_total{door=\"grpc\",mode=\"fallback\",result=\"accepted\"}"
        ),
        Some(3.0),
        "{text}"
    );

    // Every series the shipped Grafana dashboard queries is one these two expose.
    let dashboard = std::fs::read_to_string(
        knocker_e2e::repo_root().join("examples/observability/grafana-dashboard.json"),
    )
    .expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
    let exposed = format!("{text}\n{stats}");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in series_names(expr) {
                queried += 1;
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exposed.contains(&format!("# TYPE {family} ")),
                    "panel {:?} queries {name}, which nothing exposes",
                    panel["title"]
                );
            }
        }
    }
    assert!(queried >= 20, "{queried}");
}

/// The `knocker_…` metric names in a PromQL expression.
fn series_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("knocker_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        // A label (`knocker_rule="…"`, `by (knocker_rule)`) is not a series.
        let next = tail[end..].trim_start();
        if !(next.starts_with('=') || next.starts_with(')') || next.starts_with(',')) {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Every span the collector received (OTLP/HTTP JSON), flattened.
fn spans(collector: &Target) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for request in collector.received() {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    out
}

fn attribute<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_runs_from_the_client_through_the_queue_to_each_attempt_and_out_over_otlp() {
    let collector = Target::ok().await;
    let endpoint = format!("http://{}", collector.host());
    let stack = Stack::start(
        Door::Envoy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let Stack {
        cp,
        envoy,
        upstream: _upstream,
    } = stack;
    let envoy = envoy.expect("Envoy");
    // The target fails the first attempt: two attempts, two spans.
    let target = Target::start(|_, n| Reply::status(if n == 0 { 503 } else { 200 })).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let r = client()
        .post(envoy.url("/orders"))
        .header("Knocker-Host", target.host())
        .header("Knocker-Backoff-Factor", "0.05")
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .header("tracestate", "vendor=1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let received = target.wait_for(2, WAIT).await;
    let sent: Vec<String> = received
        .iter()
        .map(|r| r.header("traceparent").expect("a traceparent"))
        .collect();
    for t in &sent {
        assert!(t.starts_with(&format!("00-{trace}-")), "{t}");
        assert!(
            !t.contains(client_span),
            "each attempt is a span of its own: {t}"
        );
    }
    assert_ne!(sent[0], sent[1]);
    assert_eq!(
        received[0].header("tracestate").as_deref(),
        Some("vendor=1")
    );

    // The collector: the submission, a child of the client's span; each attempt, a
    // child of the submission, with the id the target was sent.
    let deadline = tokio::time::Instant::now() + WAIT;
    let spans = loop {
        let spans = spans(&collector);
        if spans.len() >= 3 {
            break spans;
        }
        assert!(tokio::time::Instant::now() < deadline, "spans: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let submit = spans
        .iter()
        .find(|s| s["name"] == "knocker.submit")
        .expect("a submission span");
    assert_eq!(submit["traceId"], trace);
    assert_eq!(submit["parentSpanId"], client_span);
    assert_eq!(
        attribute(submit, "knocker.door").map(|v| &v["stringValue"]),
        Some(&serde_json::json!("grpc"))
    );
    let attempts: Vec<&serde_json::Value> = spans
        .iter()
        .filter(|s| s["name"] == "knocker.attempt")
        .collect();
    assert_eq!(attempts.len(), 2, "{spans:?}");
    for (attempt, sent) in attempts.iter().zip(&sent) {
        assert_eq!(attempt["traceId"], trace);
        assert_eq!(attempt["parentSpanId"], submit["spanId"]);
        let span_id = attempt["spanId"].as_str().unwrap_or_default();
        assert!(sent.contains(span_id), "{sent} was sent for span {span_id}");
    }
    let statuses: Vec<String> = attempts
        .iter()
        .filter_map(|a| attribute(a, "http.response.status_code"))
        .map(|v| v["intValue"].to_string())
        .collect();
    assert_eq!(statuses, ["\"503\"", "\"200\""], "{attempts:?}");

    // Without a traceparent, a new trace starts at the control plane.
    let r = client()
        .post(cp.url("/plain"))
        .header("Knocker-Host", target.host())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let received = target.wait_for(3, WAIT).await;
    let fresh = received[2].header("traceparent").expect("a traceparent");
    assert!(
        fresh.starts_with("00-") && !fresh.contains(trace),
        "{fresh}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_at_info_shows_each_attempt_once_and_no_check_or_empty_field() {
    let ok = Target::ok().await;
    let config = write_config(&format!(
        "[monitors.web]\nurl = \"http://{}/health\"\ninterval_s = 0.1\n",
        ok.host()
    ));
    let cp = ControlPlane::start(&[("LOG_LEVEL", "info"), ("KNOCKER_CONFIG", &config)]);
    let knock = |host: String, id: &'static str| {
        client()
            .post(cp.url("/in"))
            .header("Knocker-Host", host)
            .header("Knocker-Id", id)
            .header("Knocker-Retries", "1")
            .header("Knocker-Backoff-Factor", "0.05")
            .body("{}")
            .send()
    };
    assert_eq!(knock(ok.host(), "fine").await.unwrap().status(), 200);
    // Nothing listens on port 1: refused twice, then failed for good.
    assert_eq!(
        knock("127.0.0.1:1".into(), "refused")
            .await
            .unwrap()
            .status(),
        200
    );
    let failed = knocker_e2e::eventually(WAIT, || async {
        cp.log().contains("attempt failed; no attempts left")
    })
    .await;
    assert!(failed, "{}", cp.log());
    // A second's worth of monitor checks (ten of them).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ok.count() >= 5, "the monitor checked");

    let log = cp.log();
    let lines: Vec<&str> = log.lines().collect();
    let delivered: Vec<&&str> = lines.iter().filter(|l| l.contains("job_id=fine")).collect();
    assert_eq!(delivered.len(), 1, "one line for the delivered job:\n{log}");
    assert!(
        delivered[0].contains(" INFO ") && delivered[0].contains("delivered"),
        "{log}"
    );
    assert!(
        !delivered[0].contains("error"),
        "no empty error field: {log}"
    );
    let refused: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("job_id=refused"))
        .collect();
    assert_eq!(refused.len(), 2, "one line per attempt:\n{log}");
    assert!(
        refused[0].contains(" INFO ") && refused[0].contains("will retry"),
        "{log}"
    );
    assert!(
        refused[1].contains(" WARN ") && refused[1].contains("no attempts left"),
        "{log}"
    );
    assert!(refused.iter().all(|l| l.contains("error=")), "{log}");
    assert!(!log.contains("error=\"\""), "{log}");
    assert!(!log.contains(" DEBUG "), "{log}");
    // The monitor: one line when it starts, none per check.
    let monitor_lines = lines.iter().filter(|l| l.contains("monitor=web")).count();
    assert_eq!(monitor_lines, 1, "{log}");
}
