//! Durable jobs: nothing accepted is lost to a kill -9; a store that cannot commit gives
//! 503 and no receipt; replay, delete, retention; one slow host cannot hold up others.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use knocker_e2e::process::{knocker_bin, wait_exit};
use knocker_e2e::{eventually, ControlPlane, Received, Reply, Target};
use serde_json::Value;

use crate::stack::{Door, Stack, DOORS};
use crate::{client, WAIT};

/// A job to submit: its id, path and extra headers.
type Submission = (String, &'static str, Vec<(String, String)>);

async fn submit(base: &str, path: &str, headers: Vec<(String, String)>) -> u16 {
    let mut request = client().post(format!("{base}{path}")).body("durable");
    for (n, v) in headers {
        request = request.header(n, v);
    }
    request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_thousands_of_jobs_in_every_state_loses_nothing() {
    const FAILING: usize = 1000; // retries pending at the kill
    const SLOW: usize = 400; // in flight (or queued behind the host limit) at the kill
    const WITH_CALLBACK: usize = 400; // failed, callbacks in flight or pending at the kill

    let healthy = Arc::new(AtomicBool::new(false));
    // One host per kind of job, so each has its own concurrency budget.
    let h = Arc::clone(&healthy);
    let failing = Target::start(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            Reply::status(500)
        }
    })
    .await;
    let h = Arc::clone(&healthy);
    let slow = Target::start(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            Reply::Hang
        }
    })
    .await;
    let always_500 = Target::start(|_, _| Reply::status(500)).await; // its jobs' callbacks must arrive
    let h = Arc::clone(&healthy);
    let callbacks = Target::start(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            Reply::Hang
        }
    })
    .await;

    // 100 retries with delays under a second: the failing jobs are still pending at the kill.
    // Circuits stay closed: the failing target must keep taking (and failing) attempts.
    let config = crate::write_config("[targets]\nfailure_threshold = 0\n");
    let mut cp = ControlPlane::start(&[
        ("KNOCKER_HOST_CONCURRENCY", "64"),
        ("LOG_LEVEL", "info"),
        ("RETRIES_MAX", "100"),
        ("KNOCKER_CONFIG", config.as_str()),
    ]);
    let base = cp.url("");
    let mut jobs: Vec<Submission> = Vec::new();
    for i in 0..FAILING {
        jobs.push((
            format!("fail-{i}"),
            "/fail",
            vec![
                ("Knocker-Host".into(), failing.host()),
                ("Knocker-Retries".into(), "100".into()),
                ("Knocker-Backoff-Factor".into(), "0".into()),
            ],
        ));
    }
    for i in 0..SLOW {
        jobs.push((
            format!("slow-{i}"),
            "/slow",
            vec![
                ("Knocker-Host".into(), slow.host()),
                ("Knocker-Timeout".into(), "30".into()),
            ],
        ));
    }
    for i in 0..WITH_CALLBACK {
        jobs.push((
            format!("cb-{i}"),
            "/cb",
            vec![
                ("Knocker-Host".into(), always_500.host()),
                ("Knocker-Retries".into(), "0".into()),
                ("Knocker-Timeout".into(), "30".into()),
                (
                    "Knocker-Callback".into(),
                    format!("http://{}/report", callbacks.host()),
                ),
            ],
        ));
    }
    for chunk in jobs.chunks(100) {
        let statuses = join_all(chunk.iter().map(|(id, path, extra)| {
            let mut headers = vec![("Knocker-Id".to_owned(), id.clone())];
            headers.extend(extra.iter().cloned());
            submit(&base, path, headers)
        }))
        .await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "every job accepted: {statuses:?}"
        );
    }

    // Wait until jobs are in every state: retries pending, attempts hanging, callbacks hanging.
    let busy = eventually(Duration::from_secs(30), || async {
        failing.count() > FAILING && slow.count() >= 32 && callbacks.count() >= 32
    })
    .await;
    assert!(
        busy,
        "load did not build up: failing {} slow {} callbacks {}",
        failing.count(),
        slow.count(),
        callbacks.count()
    );
    let status: Value = client()
        .get(cp.url("/knocker/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        status["queue"]["pending"].as_u64().unwrap() > 0
            && status["queue"]["in_flight"].as_u64().unwrap() > 0,
        "{status}"
    );

    cp.kill();
    let killed_at = Instant::now();
    healthy.store(true, Ordering::SeqCst);
    cp.restart();

    // Every accepted job is delivered (or, for /cb, its callback arrives), after the restart.
    // Everything a target received after the kill was answered 200 (all healthy now).
    let delivered_ids = |target: &Target| -> HashSet<String> {
        target
            .received()
            .into_iter()
            .filter(|r| r.at > killed_at)
            .filter_map(|r| r.header("x-knocker-id"))
            .collect()
    };
    let all_done = eventually(Duration::from_secs(120), || async {
        delivered_ids(&failing).len() == FAILING
            && delivered_ids(&slow).len() == SLOW
            && delivered_ids(&callbacks).len() == WITH_CALLBACK
    })
    .await;
    assert!(
        all_done,
        "after the restart: {} of {FAILING} failing, {} of {SLOW} slow, {} of {WITH_CALLBACK} callbacks",
        delivered_ids(&failing).len(),
        delivered_ids(&slow).len(),
        delivered_ids(&callbacks).len()
    );

    // At-least-once: repeats are allowed, and carry the id of the job they repeat.
    let accepted: HashSet<String> = jobs.iter().map(|(id, _, _)| id.clone()).collect();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    let everything: Vec<Received> = [&failing, &slow, &always_500, &callbacks]
        .iter()
        .flat_map(|t| t.received())
        .collect();
    for r in &everything {
        let id = r
            .header("x-knocker-id")
            .expect("every attempt carries x-knocker-id");
        assert!(accepted.contains(&id), "unknown id {id}");
        *per_id.entry(id).or_default() += 1;
    }
    let repeated_slow = per_id
        .iter()
        .filter(|(id, n)| id.starts_with("slow-") && **n > 1)
        .count();
    assert!(
        repeated_slow > 0,
        "jobs in flight at the kill were attempted again with the same id"
    );
    let reports: Vec<Received> = callbacks
        .received()
        .into_iter()
        .filter(|r| r.at > killed_at)
        .collect();
    assert!(reports.iter().all(|r| r.json()["status_code"] == 500
        && r.header("x-knocker-origin").as_deref() == Some("knocker")));
    assert!(cp
        .log()
        .contains("jobs in flight at the last stop are pending again"));
}

/// Under its size cap the store makes room from its history: the oldest delivered jobs
/// are removed before a submission is refused (the refusal above needs the store full of
/// jobs still to deliver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_removes_the_oldest_finished_jobs_before_refusing_work() {
    let target = Target::ok().await;
    // 256 KiB holds a few dozen of these 8 KiB jobs; 150 go through it.
    let cp = ControlPlane::start(&[("KNOCKER_MAX_STORE_BYTES", "262144")]);
    let body = vec![b'x'; 8 * 1024];
    const N: usize = 150;
    for i in 0..N {
        let response = client()
            .post(cp.url("/x"))
            .header("Knocker-Host", target.host())
            .header("Knocker-Id", format!("room-{i}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "job {i} refused: {}",
            response.text().await.unwrap()
        );
        // Delivered, and its outcome recorded, before the next one: what fills the store
        // is history. (The target answers these 8 KiB requests after ~40 ms at times; a
        // job it has received is still in flight until then.)
        target.wait_for(i + 1, WAIT).await;
        let url = cp.url(&format!("/knocker/jobs/room-{i}"));
        let recorded = eventually(WAIT, || async {
            crate::get_json(url.clone()).await["state"] == "delivered"
        })
        .await;
        assert!(recorded, "job {i} delivered but its outcome not recorded");
    }
    let finished = eventually(WAIT, || async {
        let status = crate::get_json(cp.url("/knocker/status")).await;
        status["queue"]["pending"] == 0 && status["queue"]["in_flight"] == 0
    })
    .await;
    assert!(finished);
    let first = client()
        .get(cp.url("/knocker/jobs/room-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 404, "the oldest delivered job made room");
    let last = client()
        .get(cp.url(&format!("/knocker/jobs/room-{}", N - 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), 200, "the newest is kept");
    assert!(
        cp.log()
            .contains("the store is full: the oldest finished jobs were removed to make room"),
        "{}",
        cp.log()
    );
}

/// Posts job `id`, an 8 KiB body, to `url` with `headers`.
async fn post_8k(url: &str, id: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client().post(url).header("Knocker-Id", id);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(vec![b'x'; 8 * 1024]).send().await.unwrap()
}

/// Posts 8 KiB jobs (`{prefix}-0`, `{prefix}-1`, …) until one is refused, at most 200:
/// how many were accepted, and the refusal.
async fn fill_until_refused(
    url: &str,
    prefix: &str,
    headers: &[(&str, &str)],
) -> (u64, reqwest::Response) {
    for accepted in 0..200 {
        let response = post_8k(url, &format!("{prefix}-{accepted}"), headers).await;
        if response.status() != 200 {
            return (accepted, response);
        }
    }
    panic!("{url}: 200 jobs of 8 KiB accepted, none refused");
}

/// A store whose size cap fills up with jobs still to deliver refuses new ones, naming
/// the cap; it goes on recording the open jobs' outcomes, and takes new work again once
/// they are history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_full_of_open_jobs_records_their_outcomes_then_takes_new_work() {
    // The attempts hang until their 2 s timeout, and fail (no retries): until then every
    // accepted job is open.
    let target = Target::start(|_, _| Reply::Hang).await;
    let cp = ControlPlane::start(&[("KNOCKER_MAX_STORE_BYTES", "262144")]);
    let host = target.host();
    let headers = [
        ("Knocker-Host", host.as_str()),
        ("Knocker-Timeout", "2"),
        ("Knocker-Retries", "0"),
    ];
    let (accepted, refusal) = fill_until_refused(&cp.url("/x"), "open", &headers).await;
    assert_eq!(refusal.status(), 503);
    let error: Value = refusal.json().await.unwrap();
    assert!(
        error["errors"]["store"][0]
            .as_str()
            .is_some_and(|why| why.contains("KNOCKER_MAX_STORE_BYTES")),
        "{error}"
    );
    assert!(accepted > 4, "{accepted} jobs accepted");

    let recorded = eventually(WAIT, || async {
        let status = crate::get_json(cp.url("/knocker/status")).await;
        let queue = &status["queue"];
        queue["failed"] == accepted && queue["in_flight"] == 0 && queue["pending"] == 0
    })
    .await;
    assert!(
        recorded,
        "every outcome recorded: {}\n{}",
        crate::get_json(cp.url("/knocker/status")).await,
        cp.log()
    );

    let after = post_8k(&cp.url("/x"), "after", &headers).await;
    assert_eq!(after.status(), 200, "{}", after.text().await.unwrap());
    let first = client()
        .get(cp.url("/knocker/jobs/open-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 404, "the oldest failed job made room");
}

/// A file system of its own (tmpfs) of a given size, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(bytes: u64) -> Self {
        let dir = knocker_e2e::process::temp_dir("disk");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {bytes}-byte tmpfs on {} failed (the tests run as root)",
            dir.display()
        );
        Self(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A disk that fills up before the store reaches its size cap: the refusal names the
/// disk (SQLite says "database or disk is full" for both), and every job accepted before
/// it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_before_the_size_cap_is_named_in_the_refusal() {
    let disk = SmallDisk::mount(512 * 1024);
    let cp = ControlPlane::start(&[
        ("KNOCKER_DATA_DIR", disk.path()),
        ("KNOCKER_MAX_STORE_BYTES", "67108864"),
        ("KNOCKER_DELIVERY", "off"),
    ]);
    let headers = [("Knocker-Host", "127.0.0.1:9")];
    let (accepted, refusal) = fill_until_refused(&cp.url("/x"), "disk", &headers).await;
    assert_eq!(refusal.status(), 503);
    let error: Value = refusal.json().await.unwrap();
    let why = error["errors"]["store"][0].as_str().unwrap_or_default();
    assert!(
        why.contains("the disk of KNOCKER_DATA_DIR is full") && !why.contains("MAX_STORE_BYTES"),
        "{error}"
    );
    assert!(accepted > 0, "no job fitted on the disk");
    let status = crate::get_json(cp.url("/knocker/status")).await;
    assert_eq!(status["queue"]["pending"], accepted, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_answers_503_and_gives_no_receipt() {
    for door in DOORS {
        // A database capped at 256 KiB fills up after a few dozen 8 KiB jobs.
        let stack = Stack::start(
            door,
            &[
                ("KNOCKER_MAX_STORE_BYTES", "262144"),
                ("KNOCKER_DELIVERY", "off"),
            ],
        )
        .await;
        let headers = [("Knocker-Host", "127.0.0.1:9")];
        let (i, response) = fill_until_refused(&stack.url("/x"), "fill", &headers).await;
        assert_eq!(response.status(), 503, "{door:?}");
        assert_eq!(response.headers()["retry-after"], "1");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["status"], false, "never a receipt");
        assert!(
            error["errors"]["store"][0]
                .as_str()
                .unwrap()
                .contains("cannot commit"),
            "{error}"
        );
        assert!(i > 0);
        let lookup = client()
            .get(stack.cp.url(&format!("/knocker/jobs/fill-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            lookup.status(),
            404,
            "{door:?}: the refused job does not exist"
        );
        let kept = client()
            .get(stack.cp.url(&format!("/knocker/jobs/fill-{}", i - 1)))
            .send()
            .await
            .unwrap();
        assert_eq!(kept.status(), 200, "{door:?}: the accepted ones do");
    }

    // Back-pressure: over KNOCKER_MAX_PENDING, 503 too.
    let cp = ControlPlane::start(&[("KNOCKER_MAX_PENDING", "3"), ("KNOCKER_DELIVERY", "off")]);
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(
            submit(
                &cp.url(""),
                "/x",
                vec![
                    ("Knocker-Host".into(), "127.0.0.1:9".into()),
                    ("Knocker-Id".into(), format!("p{i}")),
                ],
            )
            .await,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 503, 503]);
    assert_eq!(
        submit(
            &cp.url(""),
            "/x",
            vec![
                ("Knocker-Host".into(), "127.0.0.1:9".into()),
                ("Knocker-Id".into(), "p0".into())
            ]
        )
        .await,
        200,
        "a resubmission still gets its receipt"
    );
}

fn cli(cp: &ControlPlane, args: &[&str], token: &str) -> (bool, String) {
    let out = Command::new(knocker_bin())
        .args(args)
        .env("KNOCKER_URL", cp.url(""))
        .env("KNOCKER_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_are_inspected_and_replayed_through_the_api_and_the_cli() {
    let ok = Arc::new(AtomicBool::new(false));
    let o = Arc::clone(&ok);
    let target = Target::start(move |_, _| {
        if o.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            Reply::status(500)
        }
    })
    .await;
    let cp = ControlPlane::start(&[("KNOCKER_ADMIN_TOKEN", "s3cret")]);
    for id in ["r1", "r2", "r3"] {
        let headers = vec![
            ("Knocker-Host".into(), target.host()),
            ("Knocker-Id".into(), id.into()),
            ("Knocker-Retries".into(), "0".into()),
        ];
        assert_eq!(submit(&cp.url(""), "/replay-me", headers).await, 200);
    }
    target.wait_for(3, WAIT).await;
    let failed = || async {
        let list: Value = client()
            .get(cp.url("/knocker/jobs?state=failed"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["jobs"].as_array().map_or(0, Vec::len) == 3
    };
    assert!(eventually(WAIT, failed).await);

    let job: Value = client()
        .get(cp.url("/knocker/jobs/r1"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "failed");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(job["attempts"][0]["status"], 500);
    assert_eq!(job["attempts_left"], 0);
    let page: Value = client()
        .get(cp.url("/knocker/jobs?state=failed&limit=2"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["next"], "r2");
    let bad: Value = client()
        .get(cp.url("/knocker/jobs?state=lost"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        bad["errors"]["state"][0],
        "Must be one of: pending, in_flight, delivered, failed."
    );
    assert_eq!(
        client()
            .get(cp.url("/knocker/jobs/nope"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Every call needs the token, reads included.
    let denied = client()
        .post(cp.url("/knocker/jobs/r1/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    for path in [
        "/knocker/jobs?state=failed",
        "/knocker/jobs/r1",
        "/knocker/groups",
    ] {
        let read = client().get(cp.url(path)).send().await.unwrap();
        assert_eq!(read.status(), 401, "{path} without the token");
    }
    let (success, output) = cli(&cp, &["jobs", "list", "--state", "failed"], "");
    assert!(!success && output.contains("401"), "{output}");
    let (success, output) = cli(&cp, &["jobs", "replay", "r1"], "wrong");
    assert!(!success && output.contains("401"), "{output}");
    assert_eq!(target.count(), 3, "nothing replayed without the token");

    ok.store(true, Ordering::SeqCst);
    let (success, output) = cli(&cp, &["jobs", "list", "--state", "failed"], "s3cret");
    assert!(
        success && output.contains("r1") && output.contains("failed"),
        "{output}"
    );
    let (success, output) = cli(&cp, &["jobs", "replay", "r1"], "s3cret");
    assert!(success, "{output}");
    let replayed = target.wait_for(4, WAIT).await;
    assert_eq!(replayed[3].header("x-knocker-id").as_deref(), Some("r1"));
    let delivered = || async {
        let job: Value = client()
            .get(cp.url("/knocker/jobs/r1"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        job["state"] == "delivered" && job["attempts"].as_array().unwrap().len() == 2
    };
    assert!(
        eventually(WAIT, delivered).await,
        "history kept, now delivered"
    );

    let (success, output) = cli(&cp, &["jobs", "replay", "--all"], "s3cret");
    assert!(success && output.contains("replayed 2"), "{output}");
    target.wait_for(6, WAIT).await;

    let (success, output) = cli(&cp, &["jobs", "delete", "r2"], "s3cret");
    assert!(success, "{output}");
    assert_eq!(
        client()
            .get(cp.url("/knocker/jobs/r2"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // `jobs get`: a table of fields and one row per attempt, each error whole.
    let (success, output) = cli(&cp, &["jobs", "get", "r3"], "s3cret");
    assert!(success, "{output}");
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("id ") && l.ends_with(" r3")),
        "{output}"
    );
    assert!(
        output.lines().any(|l| l.starts_with("next attempt ")),
        "{output}"
    );
    assert!(
        output
            .lines()
            .any(|l| l.starts_with("#") && l.contains("result")),
        "{output}"
    );
    // Options before the command, JSON for scripts.
    let (success, output) = cli(&cp, &["--output", "json", "jobs", "get", "r3"], "s3cret");
    assert!(success, "{output}");
    let job: Value = serde_json::from_str(&output).expect("JSON");
    assert_eq!(job["id"], "r3");
    let (success, output) = cli(&cp, &["jobs", "list", "--state", "delivered"], "s3cret");
    assert!(success, "{output}");
    let header = output.lines().next().unwrap_or_default();
    assert!(
        header.contains("next attempt") && header.contains("last attempt"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_removed_after_the_retention() {
    let cp = ControlPlane::start(&[("KNOCKER_RETENTION", "2s")]);
    let target = Target::ok().await;
    let headers = vec![
        ("Knocker-Host".into(), target.host()),
        ("Knocker-Id".into(), "short-lived".into()),
    ];
    assert_eq!(submit(&cp.url(""), "/x", headers).await, 200);
    target.wait_for(1, WAIT).await;
    assert_eq!(
        client()
            .get(cp.url("/knocker/jobs/short-lived"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let gone = eventually(Duration::from_secs(10), || async {
        client()
            .get(cp.url("/knocker/jobs/short-lived"))
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;
    assert!(gone, "removed a few seconds after it was delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_host_cannot_hold_up_the_others() {
    let stack = Stack::start(
        Door::Envoy,
        &[
            ("KNOCKER_HOST_CONCURRENCY", "2"),
            ("KNOCKER_CONCURRENCY", "8"),
        ],
    )
    .await;
    let slow = Target::start(|_, _| Reply::Hang).await;
    let fast = Target::ok().await;
    for i in 0..20 {
        let headers = vec![
            ("Knocker-Host".into(), slow.host()),
            ("Knocker-Id".into(), format!("slow-{i}")),
            ("Knocker-Timeout".into(), "30".into()),
        ];
        assert_eq!(submit(&stack.url(""), "/s", headers).await, 200);
    }
    slow.wait_for(2, WAIT).await;
    let started = Instant::now();
    assert_eq!(
        submit(
            &stack.url(""),
            "/f",
            vec![("Knocker-Host".into(), fast.host())]
        )
        .await,
        200
    );
    fast.wait_for(1, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the fast host was served at once: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        slow.count(),
        2,
        "at most KNOCKER_HOST_CONCURRENCY attempts to one host"
    );
}

/// One control plane owns a data directory. A second one started on it stops with an
/// error that names the database, instead of recovering the first one's jobs in flight
/// as a crash's leftovers and attempting them a second time; the first one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_plane_on_the_same_data_directory_is_refused() {
    let cp = ControlPlane::start(&[]);
    let target = Target::ok().await;
    let headers = |id: &str| {
        vec![
            ("Knocker-Host".to_owned(), target.host()),
            ("Knocker-Id".to_owned(), id.to_owned()),
        ]
    };
    assert_eq!(submit(&cp.url(""), "/x", headers("before")).await, 200);
    target.wait_for(1, WAIT).await;

    let log = cp.dir.join("second.log");
    let mut second = Command::new(knocker_bin())
        .arg("serve")
        .env("KNOCKER_HTTP_ADDR", "127.0.0.1:0")
        .env("KNOCKER_GRPC_ADDR", "127.0.0.1:0")
        .env("KNOCKER_DATA_DIR", cp.dir.join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut second, Duration::from_secs(30)));
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("a second control plane ran on the same data directory for 30 s: {text}")
    });
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("knocker.db") && text.contains("in use by another process"),
        "{text}"
    );

    assert_eq!(submit(&cp.url(""), "/x", headers("after")).await, 200);
    target.wait_for(2, WAIT).await;
    let before = client()
        .get(cp.url("/knocker/jobs/before"))
        .send()
        .await
        .unwrap();
    assert_eq!(before.status(), 200);
}
