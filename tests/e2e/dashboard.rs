//! The dashboard (`/knocker/ui`) in a real browser: headless Chromium (Debian's, installed
//! by `scripts/setup.sh`) loads each page from a real control plane holding real jobs,
//! broadcasts and a monitor, and the test reads what the page shows (the DOM after its
//! script ran). Each page's screenshot goes to `target/ui-screenshots/`, and to
//! `docs/ui/` (the pictures in docs/operations.md) with `KNOCKER_UPDATE_SCREENSHOTS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use knocker_e2e::{repo_root, temp_dir, ControlPlane, Reply, Target};

use crate::{client, write_config, TOKEN, WAIT};

fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = temp_dir("chromium");
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (scripts/setup.sh installs it)")
}

/// The page's DOM once its script has rendered `view` (tried a few times: the browser
/// gives the page a budget of virtual time, and the API answers in real time).
fn dom(cp: &ControlPlane, fragment: &str, view: &str) -> String {
    let url = cp.url(&format!("/knocker/ui#{fragment}"));
    let mut last = String::new();
    for _ in 0..5 {
        let out = chromium(&["--dump-dom"], &url);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains(&format!("data-ready=\"{view}\"")) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{url} never showed {view}:\n{last}");
}

fn screenshot(cp: &ControlPlane, fragment: &str, name: &str) -> PathBuf {
    let dir = repo_root().join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let file = dir.join(format!("{name}.png"));
    let out = chromium(
        &[
            "--window-size=1280,720",
            &format!("--screenshot={}", file.display()),
        ],
        &cp.url(&format!("/knocker/ui#{fragment}")),
    );
    assert!(file.exists(), "no screenshot: {out:?}");
    if std::env::var_os("KNOCKER_UPDATE_SCREENSHOTS").is_some() {
        let docs = repo_root().join("docs/ui");
        std::fs::create_dir_all(&docs).expect("docs/ui");
        std::fs::copy(&file, docs.join(format!("{name}.png"))).expect("copy");
    }
    file
}

/// The text of the element whose attribute is `marker` (up to `end`), tags removed.
fn text_of(dom: &str, marker: &str, end: &str) -> String {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in:\n{dom}"));
    // From the end of the element's opening tag.
    let rest = &dom[start..];
    let rest = &rest[rest.find('>').map_or(0, |i| i + 1)..];
    let part = &rest[..rest.find(end).unwrap_or(rest.len())];
    let mut text = String::new();
    let mut in_tag = false;
    for c in part.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn png_size(file: &Path) -> (u32, u32) {
    let bytes = std::fs::read(file).expect("png");
    assert_eq!(&bytes[1..4], b"PNG");
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_queue_jobs_broadcasts_and_monitors_in_a_browser() {
    let good = Target::ok().await;
    let broken = Target::start(|_, _| Reply::status(500)).await;
    let config = write_config(&format!(
        r#"
[groups.caches]
members = ["http://{good}", "http://{broken}"]
retries = 20
max_age_s = 600

[monitors.web]
url = "http://{good}/health"
interval_s = 0.2
"#,
        good = good.host(),
        broken = broken.host(),
    ));
    let cp = ControlPlane::start(&[("KNOCKER_ADMIN_TOKEN", TOKEN), ("KNOCKER_CONFIG", &config)]);
    let knock = |host: String, id: &'static str| {
        client()
            .post(cp.url("/orders"))
            .header("Knocker-Host", host)
            .header("Knocker-Id", id)
            .header("Knocker-Retries", "0")
            .body("{}")
            .send()
    };
    for (host, id) in [
        (good.host(), "order-1"),
        (good.host(), "order-2"),
        (broken.host(), "order-bad"),
    ] {
        assert_eq!(knock(host, id).await.unwrap().status(), 200);
    }
    let purge = client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            cp.url("/page"),
        )
        .header("Knocker-Broadcast", "caches")
        .header("Knocker-Id", "purge-1")
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    good.wait_for(3, WAIT).await; // two orders and the good member's copy
    broken.wait_for(2, WAIT).await; // the bad order and the broken member's first copy
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Its files are served without the token (they hold no data), with a strict policy.
    let page = client().get(cp.url("/knocker/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    let script = client()
        .get(cp.url("/knocker/ui/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for text in [&html, &script] {
        assert!(!text.contains("https://"), "nothing from elsewhere");
    }

    // Without the token the page shows nothing but the request for it.
    let dom_no_token = tokio::task::block_in_place(|| dom(&cp, "jobs", "error"));
    assert!(
        dom_no_token.contains("needs its admin token"),
        "{dom_no_token}"
    );
    assert!(!dom_no_token.contains("order-bad"));

    let with = |f: &str| format!("{f}&token={TOKEN}");
    let (overview, jobs, failed_job, broadcasts, monitors) = tokio::task::block_in_place(|| {
        (
            dom(&cp, &with("overview"), "overview"),
            dom(&cp, &with("jobs?state=failed"), "jobs"),
            dom(&cp, &with("job/order-bad"), "job"),
            dom(&cp, &with("broadcasts"), "broadcasts"),
            dom(&cp, &with("monitors"), "monitors"),
        )
    });

    // Overview: what came in, what ended, the queue.
    assert!(
        text_of(&overview, "data-metric=\"accepted\"", "per second").starts_with("accepted 4"),
        "{overview}"
    );
    assert!(
        text_of(&overview, "data-metric=\"delivered\"", "per second").contains("delivered 3"),
        "{overview}"
    );
    assert!(
        text_of(&overview, "data-metric=\"failed\"", "per second").contains("failed 1"),
        "{overview}"
    );
    let waiting: u32 = [("pending", "in_flight"), ("in_flight", "delivered")]
        .iter()
        .map(|(state, next)| {
            let row = text_of(
                &overview,
                &format!("data-state=\"{state}\""),
                &format!("data-state=\"{next}\""),
            );
            row.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(99)
        })
        .sum();
    assert_eq!(waiting, 1, "the broken member's copy: {overview}");

    // Jobs: the failed one, its whole error, replay and delete (a token was given).
    let row = text_of(&jobs, "data-job=\"order-bad\"", "</tr>");
    assert!(row.starts_with("order-bad failed 1 -"), "{row}");
    assert!(
        row.contains(&format!("POST http://{}/orders", broken.host())),
        "{row}"
    );
    assert!(
        row.contains("500") && row.ends_with("replay delete"),
        "{row}"
    );
    assert!(
        !jobs.contains("data-job=\"order-1\""),
        "delivered jobs are not in the failed list"
    );

    // The target filter: the good target's delivered jobs, none of the broken one's.
    let (good_jobs, broken_jobs) = tokio::task::block_in_place(|| {
        (
            dom(
                &cp,
                &with(&format!("jobs?state=delivered&target={}", good.host())),
                "jobs",
            ),
            dom(
                &cp,
                &with(&format!("jobs?state=delivered&target={}", broken.host())),
                "jobs",
            ),
        )
    });
    assert!(
        good_jobs.contains("data-job=\"order-1\"") && good_jobs.contains("data-job=\"order-2\"")
    );
    assert!(!broken_jobs.contains("data-job="), "{broken_jobs}");
    assert!(broken_jobs.contains(&format!("No delivered jobs to {}.", broken.host())));

    // A job's attempt timeline.
    let attempt = text_of(&failed_job, "data-attempt=\"1\"", "</div></div>");
    assert!(
        attempt.starts_with("#1 +") && attempt.contains("500"),
        "{attempt}"
    );

    // Broadcasts: each member's copy of purge-1, by state.
    let good_cell = text_of(
        &broadcasts,
        &format!("data-member=\"http://{}\"", good.host()),
        "</td>",
    );
    let broken_cell = text_of(
        &broadcasts,
        &format!("data-member=\"http://{}\"", broken.host()),
        "</td>",
    );
    assert_eq!(good_cell, "delivered", "{broadcasts}");
    assert!(
        broken_cell == "pending" || broken_cell == "in flight",
        "{broken_cell}: {broadcasts}"
    );
    assert!(broadcasts.contains("data-broadcast=\"purge-1\""));

    // Monitors: a status page with uptime bars and a latency line.
    let card = text_of(&monitors, "data-monitor=\"web\"", "</main>");
    assert!(
        card.starts_with("web up") && card.contains("uptime 24h 100.00%"),
        "{card}"
    );
    assert!(monitors.contains("<polyline"), "the latency sparkline");
    assert!(
        monitors.matches("uptime-bars").count() == 1
            && monitors.contains("<span class=\"\" title="),
        "{monitors}"
    );

    // The pictures in the docs.
    for (fragment, name) in [
        ("overview", "overview"),
        ("jobs?state=failed", "jobs"),
        ("job/order-bad", "job"),
        ("broadcasts", "broadcasts"),
        ("monitors", "monitors"),
    ] {
        let file = tokio::task::block_in_place(|| screenshot(&cp, &with(fragment), name));
        assert_eq!(png_size(&file), (1280, 720));
    }
}
