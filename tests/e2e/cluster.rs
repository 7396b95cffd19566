//! Many control planes on one NATS JetStream (`KNOCKER_STORE=nats://…`): they share the
//! work, and a control plane killed mid-load loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use knocker_e2e::{ControlPlane, NatsServer, Reply, Target};

use crate::{client, get_json, scrape_until, WAIT};

fn delivered_ids(target: &Target) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for r in target.received() {
        if let Some(id) = r.header("x-knocker-id") {
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_share_a_load_and_a_kill_loses_nothing() {
    let nats = NatsServer::start();
    let target = Target::start(|_, _| {
        std::thread::sleep(Duration::from_millis(2));
        Reply::status(200)
    })
    .await;
    let env = [
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_NATS_ACK_WAIT", "2s"),
    ];
    let mut one = ControlPlane::start(&env);
    let two = ControlPlane::start(&env);

    const N: usize = 300;
    let mut accepted = BTreeSet::new();
    for i in 0..N {
        // Half way, one control plane is killed; its share of the submissions goes to
        // the other from then on.
        if i == N / 2 {
            one.kill();
        }
        let cp = if i % 2 == 0 && i < N / 2 { &one } else { &two };
        let id = format!("job-{i}");
        let response = client()
            .post(cp.url(&format!("/work/{i}")))
            .header("Knocker-Host", target.host())
            .header("Knocker-Id", &id)
            .body(format!("payload {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{id}");
        accepted.insert(id);
    }

    // Every accepted job arrives, those the dead one held after the ack wait.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = delivered_ids(&target);
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted jobs not delivered, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = delivered_ids(&target);
    assert!(
        seen.keys().all(|id| accepted.contains(id)),
        "nothing unknown"
    );
    let extra: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        extra < N / 4,
        "at-least-once, not many times: {extra} repeats"
    );
    for r in target.received() {
        let id = r.header("x-knocker-id").unwrap();
        let i = id.trim_start_matches("job-");
        assert_eq!(
            r.body,
            format!("payload {i}").as_bytes(),
            "{id}: its own body"
        );
    }
    // Both did work before the kill (the attempt log lines, not any word "delivered").
    let delivered = "knocker::delivery::observe: delivered";
    assert!(
        one.log().contains(delivered),
        "the first control plane delivered too"
    );
    assert!(two.log().contains(delivered));

    // A resubmission returns the stored job and sends nothing again.
    let before = delivered_ids(&target)["job-0"];
    let again = client()
        .post(two.url("/work/0"))
        .header("Knocker-Host", target.host())
        .header("Knocker-Id", "job-0")
        .body("something else")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let job = get_json(two.url("/knocker/jobs/job-0")).await;
    assert_eq!(job["state"], "delivered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(delivered_ids(&target)["job-0"], before, "no second job");
}

async fn group_members(cp: &ControlPlane, group: &str) -> Vec<String> {
    let groups = get_json(cp.url("/knocker/groups")).await;
    groups["groups"][group]["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_members(cp: &ControlPlane, group: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let members = group_members(cp, group).await;
        if members == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members {members:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bodies(target: &Target) -> Vec<String> {
    target
        .received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.header("x-knocker-broadcast").as_deref(), Some("edge"));
            String::from_utf8(r.body).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_replay_every_broadcast_and_one_that_was_offline_catches_up_in_order() {
    let nats = NatsServer::start();
    let config = crate::write_config("[groups.edge]\nagents = true\n");
    let store = [("KNOCKER_STORE", nats.url.as_str())];
    let publisher = ControlPlane::start(&[store[0], ("KNOCKER_CONFIG", &config)]);
    let (a, b) = (Target::ok().await, Target::ok().await);
    // Agents sign what they replay, with the secrets of their own configuration.
    let agent = |name: &str, target: &Target, expiry: &str| {
        ControlPlane::start(&[
            store[0],
            ("KNOCKER_SIGNING_SECRETS", crate::signing::OLD),
            ("KNOCKER_AGENT_GROUP", "edge"),
            (
                "KNOCKER_AGENT_ENDPOINT",
                &format!("http://{}/cache", target.host()),
            ),
            ("KNOCKER_AGENT_NAME", name),
            ("KNOCKER_AGENT_EXPIRY", expiry),
            ("KNOCKER_NATS_ACK_WAIT", "2s"),
        ])
    };
    let _agent_a = agent("a", &a, "1h");
    let mut agent_b = agent("b", &b, "1h");
    wait_for_members(&publisher, "edge", &["agent:a", "agent:b"]).await;

    let send = |i: usize| {
        client()
            .request(
                reqwest::Method::from_bytes(b"PURGE").unwrap(),
                publisher.url(&format!("/page/{i}")),
            )
            .header("Knocker-Broadcast", "edge")
            .body(format!("purge {i}"))
            .send()
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = send(i).await.unwrap();
        assert_eq!(response.status(), 200);
        let receipt: serde_json::Value = response.json().await.unwrap();
        assert_eq!(receipt["members"][1]["member"], "agent:b", "{receipt}");
        ids.push(receipt["broadcast"]["id"].as_str().unwrap().to_owned());
    }
    a.wait_for(3, WAIT).await;
    b.wait_for(3, WAIT).await;
    assert_eq!(a.received()[0].method, "PURGE");
    assert_eq!(a.received()[0].target, "/cache/page/0");
    assert_eq!(a.received()[0].header("x-knocker-id"), Some(ids[0].clone()));
    assert_eq!(a.received()[0].header("webhook-id"), Some(ids[0].clone()));
    assert!(
        a.received()
            .iter()
            .all(|r| crate::signing::verifies(r, crate::signing::OLD)),
        "every replay is signed by the agent's secret"
    );

    // Agent b goes away for a while; a keeps getting everything.
    agent_b.kill();
    for i in 3..6 {
        assert_eq!(send(i).await.unwrap().status(), 200);
    }
    a.wait_for(6, WAIT).await;
    let expected: Vec<String> = (0..6).map(|i| format!("purge {i}")).collect();
    assert_eq!(bodies(&a), expected);
    assert_eq!(b.count(), 3);

    // b comes back under the same name: it gets what it missed, in order. (At least
    // once: the broadcast it had taken but not yet acknowledged when it was killed may
    // come again, right after itself.)
    agent_b.restart();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut got = bodies(&b);
        got.dedup();
        if got.len() >= expected.len() {
            assert_eq!(got, expected);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "b got {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.count(), 6, "each broadcast once to the agent that stayed");
    assert!(
        b.count() <= 7,
        "at most the one unacknowledged broadcast again"
    );

    // An agent gone longer than its expiry is removed: no registry to clean.
    let c = Target::ok().await;
    let mut agent_c = agent("c", &c, "1s");
    wait_for_members(&publisher, "edge", &["agent:a", "agent:b", "agent:c"]).await;
    agent_c.kill();
    wait_for_members(&publisher, "edge", &["agent:a", "agent:b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_run_once_across_the_cluster_and_a_takeover_does_not_alert_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let nats = NatsServer::start();
    let smtp = knocker_e2e::SmtpServer::start();
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&healthy);
    let target = Target::start(move |_, _| {
        Reply::status(if flag.load(Ordering::SeqCst) {
            200
        } else {
            503
        })
    })
    .await;
    let config = crate::write_config(&format!(
        r#"
[notifiers.mail]
email = {{ host = "127.0.0.1", port = {}, tls = "none", from = "k@example.com", to = ["ops@example.com"] }}
max_backoff_s = 1

[monitors.api]
url = "http://{}/health"
interval_s = 0.2
failure_threshold = 2
success_threshold = 2
send_on_resolved = true
notify = ["mail"]
"#,
        smtp.port,
        target.host()
    ));
    let env = [
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_CONFIG", config.as_str()),
    ];
    let mut one = ControlPlane::start(&env);
    let two = ControlPlane::start(&env);

    // One check per interval across both: about 10 in 2 s, not 20.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let checks = |m: &serde_json::Value| target_checks(m);
    let before = target.count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let in_two_seconds = target.count() - before;
    assert!(
        (5..=14).contains(&in_two_seconds),
        "{in_two_seconds} checks in 2 s at a 0.2 s interval"
    );
    let seen_by_two = get_json(two.url("/knocker/monitors/api")).await;
    assert!(
        checks(&seen_by_two) > 0,
        "the state is shared: {seen_by_two}"
    );

    healthy.store(false, Ordering::SeqCst);
    let mail = smtp.wait_for(1, WAIT).await;
    assert_eq!(mail[0].subject, "[Knocker] DOWN: api");
    // Delivery is at least once: a kill between the SMTP send and the record of its
    // outcome sends the alert again, by design. This test is about the monitor's
    // takeover, so it waits for the alert to be recorded as delivered first.
    let recorded = tokio::time::timeout(WAIT, async {
        loop {
            let delivered = get_json(one.url("/knocker/jobs?state=delivered")).await;
            let alerts = delivered["jobs"].as_array().map_or(0, |jobs| {
                jobs.iter()
                    .filter(|j| {
                        j["id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with("monitor.api."))
                    })
                    .count()
            });
            if alerts == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(recorded.is_ok(), "the DOWN alert was recorded as delivered");

    // Kill the control plane that ran the check which went down: the other takes the
    // monitor over (after the lease lapses) with the same state.
    let mut two = two;
    let holder_is_one = one.log().contains("monitor down");
    assert!(
        holder_is_one != two.log().contains("monitor down"),
        "exactly one control plane saw the transition"
    );
    if holder_is_one {
        one.kill();
    } else {
        two.kill();
    }
    let survivor = if holder_is_one { &two } else { &one };
    tokio::time::sleep(Duration::from_secs(1)).await;
    healthy.store(true, Ordering::SeqCst);
    let mail = smtp.wait_for(2, Duration::from_secs(40)).await;
    assert_eq!(mail[1].subject, "[Knocker] RESOLVED: api");
    assert!(
        survivor.log().contains("monitor up again"),
        "the survivor took over"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        smtp.messages().len(),
        2,
        "one alert each way, not one per control plane"
    );
    let m = get_json(survivor.url("/knocker/monitors/api")).await;
    assert_eq!(m["health"], "up");
    assert_eq!(m["transitions"].as_array().map(Vec::len), Some(2), "{m}");
}

fn target_checks(monitor: &serde_json::Value) -> usize {
    monitor["results"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_is_shared_one_control_plane_tells_of_it_and_a_pause_reaches_all() {
    let nats = NatsServer::start();
    let hook = Target::ok().await;
    let port = knocker_e2e::free_port(); // down
    let host = format!("127.0.0.1:{port}");
    let config = crate::write_config(&format!(
        r#"
        [notifiers.ops]
        webhook = "http://{}/events"
        [targets]
        failure_threshold = 2
        cooldown_s = 1
        max_cooldown_s = 1
        notify = ["ops"]
        "#,
        hook.host()
    ));
    let env = [
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_CONFIG", config.as_str()),
        ("KNOCKER_ADMIN_TOKEN", crate::TOKEN),
    ];
    let one = ControlPlane::start(&env);
    let two = ControlPlane::start(&env);
    let mut ids = Vec::new();
    for (i, cp) in [&one, &two, &one, &two].into_iter().enumerate() {
        let response = client()
            .post(cp.url(&format!("/w/{i}")))
            .header("Knocker-Host", &host)
            .header("Knocker-Retries", "10")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["knocker-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Both see the circuit open, whichever opened it.
    for cp in [&one, &two] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
            if t["circuit"] == "open" || t["circuit"] == "probing" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The target comes back: closed everywhere, one event of each kind in all.
    let target = Target::start_on(port, |_, _| Reply::status(200)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while target.count() < 4 {
        if tokio::time::Instant::now() > deadline {
            let mut jobs = Vec::new();
            for id in &ids {
                jobs.push(get_json(one.url(&format!("/knocker/jobs/{id}"))).await);
            }
            panic!("not all delivered: {jobs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook.wait_for(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events: Vec<String> = hook
        .received()
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(events, ["target.paused", "target.resumed"], "each once");
    // A pause by hand on one holds the target on the other as well.
    let paused: serde_json::Value = client()
        .post(one.url(&format!("/knocker/targets/{host}/pause")))
        .bearer_auth(crate::TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paused["circuit"], "paused");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = get_json(two.url(&format!("/knocker/targets/{host}"))).await;
        if t["circuit"] == "paused" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = target.count();
    let response = client()
        .post(two.url("/w/held"))
        .header("Knocker-Host", &host)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(target.count(), before, "held while paused");
    // It waits, counted in the target's backlog by both.
    for cp in [&one, &two] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = get_json(cp.url(&format!("/knocker/targets/{host}"))).await;
            if t["backlog"] == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_keep_one_rate_for_a_target_between_them() {
    let nats = NatsServer::start();
    let target = Target::ok().await;
    let host = target.host();
    let config = crate::write_config(&format!(
        r#"
        [targets.hosts."{host}"]
        rate_per_s = 5
        burst = 1
        "#
    ));
    let env = [
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_CONFIG", config.as_str()),
    ];
    let one = ControlPlane::start(&env);
    let two = ControlPlane::start(&env);
    const N: usize = 12;
    for i in 0..N {
        let cp = if i % 2 == 0 { &one } else { &two };
        let response = client()
            .post(cp.url(&format!("/r/{i}")))
            .header("Knocker-Host", &host)
            .body(format!("{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let got = target.wait_for(N, WAIT).await;
    // Each control plane alone would send 5 a second: together they still send 5.
    let gaps = crate::targets::gaps(&got);
    assert!(
        gaps.iter().all(|g| *g >= 0.15),
        "200 ms apart (50 ms tolerance) whichever control plane sent them: {gaps:?}"
    );
    let span = (got[N - 1].at - got[0].at).as_secs_f64();
    assert!(span >= 2.0, "12 attempts at 5/s take 2.2 s: {span}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.count(), N, "each once");
}

/// On NATS the finished history has a size cap (`KNOCKER_MAX_STORE_BYTES`): two streams
/// of jobs, each several times the cap, are accepted and delivered whole, the delivered
/// bucket keeping the last to finish within its half of the cap (as the server counts a
/// stream's bytes, on its monitoring port), so JetStream holds what the cap allows, not
/// every job delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_history_at_its_size_cap_makes_room_and_no_submission_is_refused() {
    let monitor = knocker_e2e::free_port();
    let nats = NatsServer::start_with(&format!("http: \"127.0.0.1:{monitor}\""));
    let target = Target::start(|_, _| Reply::status(200)).await;
    // The least a cap can be: half of it holds the largest record (max_payload, 1 MiB).
    let cap: u64 = 2 << 20;
    let cap_setting = cap.to_string();
    let cp = ControlPlane::start(&[
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_MAX_STORE_BYTES", cap_setting.as_str()),
    ]);
    const N: usize = 600;
    let body = "x".repeat(8 * 1024);
    // Two halves, the second submitted once the first is delivered and recorded: every
    // job of the first finishes before any of the second.
    for half in [0..N / 2, N / 2..N] {
        let end = half.end;
        for i in half {
            let response = client()
                .post(cp.url(&format!("/history/{i}")))
                .header("Knocker-Host", target.host())
                .header("Knocker-Id", format!("h-{i}"))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "h-{i} accepted");
        }
        // Every job of the half delivered and its outcome recorded.
        let delivered = "knocker_jobs_finished_total{kind=\"target\",result=\"delivered\"}";
        scrape_until(&cp, delivered, end as f64).await;
    }
    assert_eq!(delivered_ids(&target).len(), N, "each job delivered");

    let job = |id: String| {
        let url = cp.url(&format!("/knocker/jobs/{id}"));
        async move {
            let response = client()
                .get(url)
                .bearer_auth(crate::TOKEN)
                .send()
                .await
                .unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    let list = get_json(cp.url("/knocker/jobs?state=delivered&limit=1000")).await;
    let kept: Vec<usize> = list["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("a job list: {list}"))
        .iter()
        .map(|j| {
            let id = j["id"].as_str().unwrap();
            id.strip_prefix("h-").unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        !kept.is_empty() && kept.len() < N / 4,
        "{} of {N} kept",
        kept.len()
    );
    assert!(
        kept.iter().all(|&i| i >= N / 2),
        "only jobs of the second half are kept: {kept:?}"
    );
    let (status, newest) = job(format!("h-{}", kept[kept.len() - 1])).await;
    assert_eq!(status, 200, "{newest}");
    assert!(newest.contains("\"delivered\""), "{newest}");
    for old in [0, N / 4, N / 2 - 1] {
        let (status, _) = job(format!("h-{old}")).await;
        assert_eq!(status, 404, "h-{old} made room");
    }

    // What the server holds, as it counts it.
    let jsz = get_json(format!(
        "http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true"
    ))
    .await;
    let streams = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let delivered = streams
        .iter()
        .find(|s| s["name"] == "KV_KNOCKER_DELIVERED")
        .unwrap_or_else(|| panic!("no delivered bucket in {jsz}"));
    let (messages, bytes) = (
        delivered["state"]["messages"].as_u64().unwrap(),
        delivered["state"]["bytes"].as_u64().unwrap(),
    );
    assert!(bytes <= cap / 2, "the delivered bucket: {bytes} bytes");
    assert_eq!(messages, kept.len() as u64, "what the API lists");
    let storage = jsz["storage"].as_u64().unwrap();
    let written = (N * body.len()) as u64;
    assert!(
        storage < cap + cap / 2,
        "JetStream holds {storage} bytes, {written} bytes of bodies delivered"
    );
}
