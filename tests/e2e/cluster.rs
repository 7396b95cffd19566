//! Many control planes on one NATS JetStream (`KNOCKER_STORE=nats://…`): they share the
//! work, and a control plane killed mid-load loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use knocker_e2e::{ControlPlane, NatsServer, Reply, Target};

use crate::{client, get_json, WAIT};

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
    // Both did work before the kill.
    assert!(
        one.log().contains("delivered"),
        "the first control plane delivered too"
    );
    assert!(two.log().contains("delivered"));

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
