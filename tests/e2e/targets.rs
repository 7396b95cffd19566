//! Failing targets are not drowned: a circuit that parks a dead target's jobs without
//! spending their attempts and closes on a probe, a backlog released at the target's
//! rate and in order, `410 Gone`, `Retry-After` for the whole target, events to
//! notifiers, the targets API, replay of one target's failures, and rule policies
//! (schedules, rates) through Envoy.

use std::time::Duration;

use knocker_e2e::{free_port, ControlPlane, Envoy, EnvoyOptions, Received, Reply, Target};
use serde_json::Value;

use crate::{client, get_json, write_config, TOKEN, WAIT};

async fn knock(cp: &ControlPlane, host: &str, seq: usize) -> String {
    let response = client()
        .post(cp.url(&format!("/job/{seq}")))
        .header("Knocker-Host", host)
        .header("Knocker-Retries", "10")
        .header("x-seq", seq.to_string())
        .body(format!("job {seq}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    response.headers()["knocker-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn post_api(cp: &ControlPlane, path: &str) -> Value {
    client()
        .post(cp.url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn attempts(cp: &ControlPlane, ids: &[String]) -> usize {
    let mut n = 0;
    for id in ids {
        let job = get_json(cp.url(&format!("/knocker/jobs/{id}"))).await;
        n += job["attempts"].as_array().map_or(0, Vec::len);
    }
    n
}

fn events(hook: &Target) -> Vec<String> {
    hook.received()
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_is_parked_probed_and_its_backlog_drains_in_order_at_its_rate() {
    let hook = Target::ok().await;
    let port = free_port(); // the target is down: nothing listens there yet
    let host = format!("127.0.0.1:{port}");
    let config = write_config(&format!(
        r#"
        [notifiers.ops]
        webhook = "http://{hook}/events"
        [targets]
        failure_threshold = 3
        cooldown_s = 1
        max_cooldown_s = 1
        notify = ["ops"]
        [targets.hosts."{host}"]
        rate_per_s = 5
        burst = 1
        "#,
        hook = hook.host(),
    ));
    let cp = ControlPlane::start(&[
        ("KNOCKER_CONFIG", config.as_str()),
        ("KNOCKER_ADMIN_TOKEN", TOKEN),
        ("RETRIES_BACKOFF_FACTOR", "0.1"),
    ]);
    // Three jobs fail once each: the circuit opens.
    let mut canaries = Vec::new();
    for i in 0..3 {
        canaries.push(knock(&cp, &host, 100 + i).await);
    }
    let paused = hook.wait_for(1, WAIT).await;
    assert_eq!(
        paused[0].json()["event"],
        "target.paused",
        "{:?}",
        paused[0].json()
    );
    assert_eq!(paused[0].json()["target"], host.as_str());
    let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
    assert_eq!(t["circuit"], "open", "{t}");
    assert_eq!(t["last_error"]["status"], 502, "refused: {t}");

    // A backlog arrives while it is down: parked, not attempted.
    const N: usize = 10;
    let mut backlog = Vec::new();
    for i in 0..N {
        backlog.push(knock(&cp, &host, i).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
    assert_eq!(t["backlog"], (N + 3) as u64, "{t}");
    let opening = attempts(&cp, &canaries).await;
    let probes = attempts(&cp, &backlog).await;
    // Three that opened it, then one probe a second at most (the earliest job due, a
    // canary): without the circuit the canaries would have spent their ten retries by
    // now and each job of the backlog would have failed at least once.
    assert!(
        opening + probes <= 3 + 5,
        "{opening} + {probes} attempts while parked"
    );
    assert!(probes <= 1, "the backlog waited: {probes} attempts");

    // The target comes back: one probe closes the circuit, the backlog follows at
    // 5 a second, in arrival order.
    let target = Target::start_on(port, |_, _| Reply::status(200)).await;
    let got = target.wait_for(N + 3, WAIT).await;
    let resumed = hook.wait_for(2, WAIT).await;
    assert_eq!(resumed[1].json()["event"], "target.resumed");
    let seqs: Vec<usize> = got
        .iter()
        .filter_map(|r| r.header("x-seq")?.parse().ok())
        .filter(|s: &usize| *s < 100)
        .collect();
    assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "the backlog in order");
    let gaps = gaps(&got);
    assert!(
        gaps.iter().all(|g| *g >= 0.15),
        "at most 5 a second (200 ms apart, 50 ms tolerance): {gaps:?}"
    );
    let span = (got[N + 2].at - got[0].at).as_secs_f64();
    assert!(
        (2.2..6.0).contains(&span),
        "13 attempts at 5/s take about 2.4 s: {span}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        events(&hook),
        ["target.paused", "target.resumed"],
        "each event once"
    );
    let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
    assert_eq!(
        (t["circuit"].as_str(), t["backlog"].as_u64()),
        (Some("closed"), Some(0)),
        "{t}"
    );
    assert_eq!(target.count(), N + 3, "each job once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_ends_the_job_parks_the_target_and_an_operator_resumes_it() {
    let target = Target::start(|_, n| Reply::status(if n == 0 { 410 } else { 200 })).await;
    let host = target.host();
    let cp = ControlPlane::start(&[("KNOCKER_ADMIN_TOKEN", TOKEN)]);
    let first = knock(&cp, &host, 0).await;
    target.wait_for(1, WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let job = get_json(cp.url(&format!("/knocker/jobs/{first}"))).await;
        if job["state"] == "failed" {
            assert_eq!(
                job["attempts"].as_array().unwrap().len(),
                1,
                "no retry of a 410"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
    assert_eq!(
        (t["circuit"].as_str(), t["reason"].as_str()),
        (Some("open"), Some("410 Gone")),
        "{t}"
    );
    let cli = std::process::Command::new(knocker_e2e::knocker_bin())
        .args(["targets", "list", "--url", &cp.url(""), "--token", TOKEN])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{cli:?}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&host) && l.contains("open") && l.contains("410")),
        "{table}"
    );
    // The next job waits (its attempts unspent) until the operator resumes the target.
    let second = knock(&cp, &host, 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(target.count(), 1);
    assert_eq!(attempts(&cp, std::slice::from_ref(&second)).await, 0);
    let paused = post_api(&cp, &format!("/knocker/targets/{host}/pause")).await;
    assert_eq!(paused["circuit"], "paused", "{paused}");
    let resumed = post_api(&cp, &format!("/knocker/targets/{host}/resume")).await;
    assert_eq!(
        (resumed["circuit"].as_str(), resumed["changed"].as_bool()),
        (Some("closed"), Some(true))
    );
    let got = target.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-seq").as_deref(), Some("1"));

    // The failed job of this target, replayed by target and time window.
    let listed = post_api(
        &cp,
        &format!("/knocker/jobs/replay?state=failed&target={host}&since=2000-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(listed["replayed"], 1, "{listed}");
    assert_eq!(listed["ids"][0], first.as_str());
    let got = target.wait_for(3, WAIT).await;
    assert_eq!(got[2].header("x-seq").as_deref(), Some("0"));
    let none = post_api(
        &cp,
        &format!("/knocker/jobs/replay?state=failed&target={host}&until=2000-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(none["replayed"], 0, "{none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_slows_the_whole_target_not_only_the_one_job() {
    let target = Target::start(|_, n| {
        if n == 0 {
            Reply::status(503).with_header("Retry-After", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let host = target.host();
    let cp = ControlPlane::start(&[("RETRIES_BACKOFF_FACTOR", "0.1")]);
    knock(&cp, &host, 0).await;
    let first = target.wait_for(1, WAIT).await[0].at;
    // A second job, due at once: it waits for the target as well.
    knock(&cp, &host, 1).await;
    let got: Vec<Received> = target.wait_for(3, WAIT).await;
    for r in &got[1..] {
        let after = (r.at - first).as_secs_f64();
        assert!(
            after >= 1.9,
            "{:?} went {after} s after the 503",
            r.header("x-seq")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_schedule_and_status_rules_travel_from_envoy_to_the_control_plane() {
    let cp = ControlPlane::start(&[]);
    let upstream = Target::ok().await;
    // 500, 500, then 200: the rule's schedule spaces the retries 0.3 s then 0.9 s.
    let orders = Target::start(|_, n| Reply::status(if n < 2 { 500 } else { 200 })).await;
    let envoy = Envoy::start(
        "capture.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            replace: vec![
                (
                    "http://127.0.0.1:8080".into(),
                    format!("http://{}", orders.host()),
                ),
                (
                    r#""ordered":true"#.into(),
                    r#""ordered":true,"schedule_s":[0.3,0.9],"stop_on":["404"],"rate_per_s":50"#
                        .into(),
                ),
            ],
            ..EnvoyOptions::default()
        },
    );
    let response = client()
        .post(envoy.url("/orders/1"))
        .body("o")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.headers()["knocker-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let got = orders.wait_for(3, WAIT).await;
    let gaps: Vec<f64> = got
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    assert!((0.25..0.6).contains(&gaps[0]), "{gaps:?}");
    assert!((0.85..1.3).contains(&gaps[1]), "{gaps:?}");
    let job = get_json(cp.url(&format!("/knocker/jobs/{id}"))).await;
    assert_eq!(
        job["config"]["schedule"],
        serde_json::json!([0.3, 0.9]),
        "{job}"
    );
    assert_eq!(job["config"]["stop_on"], serde_json::json!(["404"]));
    assert_eq!(job["config"]["rate_per_s"], 50.0);
}

/// The gaps between consecutive requests a target received, in seconds.
pub(crate) fn gaps(got: &[Received]) -> Vec<f64> {
    got.windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_holds_from_the_start_and_across_a_restart() {
    let target = Target::ok().await;
    let host = target.host();
    let config = write_config(&format!(
        r#"
        [targets.hosts."{host}"]
        rate_per_s = 4
        burst = 4
        "#
    ));
    let mut cp = ControlPlane::start(&[("KNOCKER_CONFIG", config.as_str())]);
    const N: usize = 12;
    for i in 0..N {
        knock(&cp, &host, i).await;
    }
    // Killed mid-drain and started again at once: the new process starts its schedule
    // empty, so no burst of 4 follows the restart.
    target.wait_for(5, WAIT).await;
    cp.restart();
    // One job in flight at the kill may come again (at least once): counted once.
    let seqs = |got: &[Received]| {
        let mut seqs: Vec<usize> = got
            .iter()
            .filter_map(|r| r.header("x-seq")?.parse().ok())
            .collect();
        seqs.dedup();
        seqs
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while seqs(&target.received()).len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            seqs(&target.received())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = target.received();
    assert_eq!(
        seqs(&got),
        (0..N).collect::<Vec<_>>(),
        "every job, in order"
    );
    let gaps = gaps(&got);
    assert!(
        gaps.iter().all(|g| *g >= 0.2),
        "at most 4 a second (250 ms apart, 50 ms tolerance), the first second and the restart included: {gaps:?}"
    );
}
