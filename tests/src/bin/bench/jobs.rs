//! Durable jobs: acceptance rate, latency at a fixed rate, drain rate, a large backlog, a
//! rate-limited target's backlog beside other traffic.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use knocker_e2e::{ControlPlane, Envoy, EnvoyOptions, NatsServer};
use serde_json::Value;

use crate::cost::{cost_once, dash, med, Cost, SetUp};
use crate::load::{fixed_rate, median, submit_n, wrk_post, RateResult, WrkResult, POST_BODY};
use crate::{env_or, Echo};

pub(crate) fn status(cp: &ControlPlane) -> Value {
    reqwest::blocking::get(cp.url("/knocker/status"))
        .and_then(|r| r.json())
        .unwrap_or(Value::Null)
}

pub(crate) fn delivered(cp: &ControlPlane) -> u64 {
    status(cp)["queue"]["delivered"].as_u64().unwrap_or(0)
}

/// Waits (up to 2 minutes) until the control plane has delivered its backlog, so that
/// the next measurement does not share the machine with those deliveries.
pub(crate) fn settle(cp: &ControlPlane) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let queue = &status(cp)["queue"];
        if queue["pending"].as_u64() == Some(0) && queue["in_flight"].as_u64() == Some(0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn knocker_headers(sink: &Echo) -> Vec<(&'static str, String)> {
    vec![
        ("Knocker-Host", format!("127.0.0.1:{}", sink.port)),
        ("Knocker-Scheme", "http".into()),
    ]
}

/// `envoy/knocker.yaml` in front of `cp`, its upstream the sink.
pub(crate) fn envoy_for(cp: &ControlPlane, sink: &Echo) -> Envoy {
    Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: sink.port,
            ..Default::default()
        },
    )
}

/// A row of the acceptance table: rates, latency, and what each process spent per
/// accepted job (`–`: not in the set-up).
fn row(report: &mut String, what: &str, c: &Cost, goal: &str) {
    let _ = writeln!(
        report,
        "| {what} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {goal} |",
        c.rps,
        c.p50_ms,
        c.p99_ms,
        dash(c.cp_us),
        dash(c.envoy_us),
        dash(c.sink_us),
        dash(c.disk_per_job),
    );
}

pub fn acceptance(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let seconds = env_or("BENCH_SECONDS", 10);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let env_off = [("LOG_LEVEL", "warning"), ("KNOCKER_DELIVERY", "off")];
    let env_on = [("LOG_LEVEL", "warning")];
    let off = ControlPlane::start(&env_off);
    let on = ControlPlane::start(&env_on);
    let (envoy_off, envoy_on) = (envoy_for(&off, &sink), envoy_for(&on, &sink));

    // Two references, measured in the same rounds: the same Envoy proxying the same POSTs
    // without Knocker headers to the sink (a route without the filter) — what one Envoy
    // worker does here before Knocker does anything — and the sink itself answering them
    // (the same HTTP stack as the ingress, nothing stored). Delivery off counts per
    // accepted job over the load; delivery on per delivered job over the load and the
    // drain after it (the backlog is delivered before the next set-up starts).
    let sinks = [&sink];
    let accepting = SetUp {
        cp: Some(&off),
        per_answer: true,
        ..SetUp::default()
    };
    let delivering = SetUp {
        cp: Some(&on),
        sinks: &sinks,
        ..SetUp::default()
    };
    let proxying = SetUp {
        envoy: Some(&envoy_off),
        sinks: &sinks,
        ..SetUp::default()
    };
    let answering = SetUp {
        sinks: &sinks,
        ..SetUp::default()
    };
    let mut runs: [Vec<Cost>; 6] = Default::default();
    for _ in 0..rounds {
        let through = |envoy, procs| SetUp {
            envoy: Some(envoy),
            ..procs
        };
        let once = |url: &str, headers: &[(&str, String)], procs| {
            cost_once(url, seconds, headers, None, procs)
        };
        runs[0].push(once(&off.url("/bench"), &headers, accepting));
        let door = through(&envoy_off, accepting);
        runs[1].push(once(&envoy_off.url("/bench"), &headers, door));
        runs[2].push(once(&on.url("/bench"), &headers, delivering));
        let door = through(&envoy_on, delivering);
        runs[3].push(once(&envoy_on.url("/bench"), &headers, door));
        runs[4].push(once(&envoy_off.url("/bench"), &[], proxying));
        runs[5].push(once(&sink.url("/bench"), &[], answering));
    }
    let delivered_on = delivered(&on);

    // Latency at half the goal rate, open loop.
    let half_http: RateResult =
        runtime.block_on(fixed_rate(&off.url("/bench"), 10_000, seconds, &headers));
    let half_envoy: RateResult = runtime.block_on(fixed_rate(
        &envoy_off.url("/bench"),
        5_000,
        seconds,
        &headers,
    ));
    let half_proxy: RateResult =
        runtime.block_on(fixed_rate(&envoy_off.url("/bench"), 5_000, seconds, &[]));

    let _ = writeln!(report, "## Accepted jobs per second (durable)\n");
    let body_len = POST_BODY.len();
    let _ = writeln!(
        report,
        "Embedded SQLite store (WAL, fsync per commit, group commit). `wrk -t1 -c50 -d{seconds}s` POSTs (a {body_len}-byte body) with \
         `Knocker-Host` (a `knocker echo` sink), a fresh id each; every answer a committed receipt. \
         \"delivery off\" is `KNOCKER_DELIVERY=off` (acceptance alone); \"delivery on\" delivers to the sink at the \
         same time; its backlog is delivered before the next set-up starts. Median of {rounds} rounds, the six \
         set-ups taking turns. wrk shares the 2 cores; Envoy runs one worker (`--concurrency 1`), which leaves \
         the other core to the control plane and wrk. The last two rows are references, not jobs: the same Envoy \
         proxying the same POSTs without Knocker headers to the sink (a route without the filter), and the \
         sink answering them itself (`knocker echo`: the ingress's HTTP stack, nothing stored) — the \
         ceilings of the two doors on this machine in this run. CPU (user + system, from \
         `/proc/<pid>/stat`) of each process and the growth of the store's files: with delivery \
         off per accepted job over the load; with delivery on per delivered job over the load and \
         its drain; the references per answered request.\n"
    );
    let _ = writeln!(
        report,
        "| set-up | accepted/s | p50 ms | p99 ms | control plane µs/job | Envoy µs/job | sink µs/job | disk bytes/job | goal |"
    );
    let _ = writeln!(
        report,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let (h, e) = (med(&runs[0]), med(&runs[1]));
    let verdict = |v: f64, goal: f64| if v >= goal { "met" } else { "NOT met" };
    row(
        report,
        "HTTP ingress, delivery off",
        &h,
        &format!("≥ 20,000/s: {}", verdict(h.rps, 20_000.0)),
    );
    row(
        report,
        "through Envoy, delivery off",
        &e,
        &format!("≥ 10,000/s: {}", verdict(e.rps, 10_000.0)),
    );
    row(report, "HTTP ingress, delivery on", &med(&runs[2]), "");
    row(report, "through Envoy, delivery on", &med(&runs[3]), "");
    let proxy = med(&runs[4]);
    row(
        report,
        "reference: Envoy proxying the same POSTs to the sink",
        &proxy,
        "",
    );
    let echo = med(&runs[5]);
    row(
        report,
        "reference: the sink answering the same POSTs",
        &echo,
        "",
    );
    let _ = writeln!(
        report,
        "\nIn this run (medians, delivery off), Knocker accepts durably {:.0}% of the requests per second \
         that the same Envoy worker proxies to a plain upstream, and its HTTP ingress {:.0}% of what the \
         same HTTP stack answers without storing anything.",
        100.0 * e.rps / proxy.rps,
        100.0 * h.rps / echo.rps
    );
    let _ = writeln!(
        report,
        "\nWith delivery on, {delivered_on} jobs were delivered to the sink during those runs.\n"
    );
    let _ = writeln!(report, "Open-loop latency at half the goal rate (a request every 1/rate s, each timed from when it was due; host steal and TCP retransmits are the machine's over the run, all processes):\n");
    let _ = writeln!(
        report,
        "| door | rate | sent | receipts | p50 ms | p99 ms | max ms | host steal ms | TCP retransmits | goal |"
    );
    let _ = writeln!(
        report,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (door, rate, r, goal) in [
        ("HTTP ingress", 10_000, &half_http, true),
        ("through Envoy", 5_000, &half_envoy, true),
        (
            "reference: Envoy proxying the same POSTs",
            5_000,
            &half_proxy,
            false,
        ),
    ] {
        let verdict = if !goal {
            ""
        } else if r.p99_ms < 10.0 && r.ok == r.sent {
            "p99 < 10 ms: met"
        } else {
            "p99 < 10 ms: NOT met"
        };
        let _ = writeln!(
            report,
            "| {door} | {rate}/s (achieved {:.0}) | {} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {verdict} |",
            r.achieved_rps,
            r.sent,
            r.ok,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.host.steal_ms,
            r.host.retransmits,
        );
    }
    let _ = writeln!(
        report,
        "\nKnocker 1.4.1 is measured side by side in the cost section below (its jobs accepted \
         and delivered, CPU per job), when `KNOCKER_ANCHOR` names its checkout.\n"
    );
}

pub fn drain(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let backlog = env_or("BENCH_DRAIN_JOBS", 100_000) as usize;
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let mut cp = ControlPlane::start(&[("LOG_LEVEL", "warning"), ("KNOCKER_DELIVERY", "off")]);
    let took = runtime.block_on(submit_n(&cp.url("/drain"), backlog, 64, &headers));
    cp.set_env("KNOCKER_DELIVERY", "on");
    cp.restart();
    let started = Instant::now();
    let mut first = None;
    while delivered(&cp) < backlog as u64 {
        if first.is_none() && delivered(&cp) > 0 {
            first = Some(started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain did not finish: {}",
            status(&cp)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = started.elapsed();
    let rate = backlog as f64 / total.as_secs_f64();
    let _ = writeln!(report, "## Delivery drain rate\n");
    let _ = writeln!(
        report,
        "{backlog} jobs submitted with delivery off (in {:.1} s, 64 concurrent clients), then the control plane \
         restarted with delivery on, delivering to a local `knocker echo` sink (one host; default \
         `KNOCKER_CONCURRENCY=256`, `KNOCKER_HOST_CONCURRENCY=64`).\n",
        took.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "All {backlog} delivered {:.1} s after the restart: **{rate:.0} deliveries/s** (goal ≥ 10,000/s: {}); \
         first delivery {:.0} ms after the restart.\n",
        total.as_secs_f64(),
        if rate >= 10_000.0 { "met" } else { "NOT met" },
        first.unwrap_or_default().as_secs_f64() * 1000.0
    );
}

pub fn backlog(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let jobs = env_or("BENCH_BACKLOG_JOBS", 1_000_000) as usize;
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let mut cp = ControlPlane::start(&[("LOG_LEVEL", "warning"), ("KNOCKER_DELIVERY", "off")]);
    let took = runtime.block_on(submit_n(&cp.url("/backlog"), jobs, 64, &headers));
    let pending = status(&cp)["queue"]["pending"].as_u64().unwrap_or(0);
    assert_eq!(pending, jobs as u64, "{}", status(&cp));
    let rss_accepting = cp.pid().map_or(0.0, rss_mb);
    let db_mb =
        std::fs::metadata(cp.dir.join("data/knocker.db")).map_or(0.0, |m| m.len() as f64 / 1e6);
    let wal_mb =
        std::fs::metadata(cp.dir.join("data/knocker.db-wal")).map_or(0.0, |m| m.len() as f64 / 1e6);
    cp.set_env("KNOCKER_DELIVERY", "on");
    cp.restart();
    let started = Instant::now();
    let pid = cp.pid().expect("running");
    let mut first = None;
    let mut peak_rss: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(10) {
        peak_rss = peak_rss.max(rss_mb(pid));
        if first.is_none() && delivered(&cp) > 0 {
            first = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = delivered(&cp);
    let first = first.expect("no delivery within 10 s of the restart");
    let _ = writeln!(report, "## A backlog of {jobs} pending jobs\n");
    let _ = writeln!(
        report,
        "{jobs} jobs submitted with delivery off ({:.0} s, {:.0}/s; database {db_mb:.0} MB, write-ahead log {wal_mb:.0} MB; resident memory \
         while accepting {rss_accepting:.0} MB). Restarted with delivery on: first delivery **{:.0} ms** after the \
         process started (goal ≤ 2 s: {}), peak resident memory over the next 10 s of draining **{peak_rss:.0} MB** \
         (goal < 300 MB: {}); {done} delivered in those 10 s.\n",
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64(),
        first.as_secs_f64() * 1000.0,
        if first <= Duration::from_secs(2) { "met" } else { "NOT met" },
        if peak_rss < 300.0 { "met" } else { "NOT met" }
    );
}

/// The embedded store and the NATS engine side by side: accepted jobs/s (wrk, delivery
/// off, HTTP ingress) in alternating rounds, then the time to deliver the same backlog.
pub fn engines(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let seconds = env_or("BENCH_ENGINE_SECONDS", 5);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let backlog = env_or("BENCH_ENGINE_JOBS", 20_000) as usize;
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let binaries = nats_servers();
    let start_servers = || binaries.each_ref().map(|b| NatsServer::start_binary(b));
    let versions = binaries.each_ref().map(|b| nats_version(b.as_os_str()));
    let env = |store: &str| {
        vec![
            ("LOG_LEVEL".to_owned(), "warning".to_owned()),
            ("KNOCKER_DELIVERY".to_owned(), "off".to_owned()),
            ("KNOCKER_STORE".to_owned(), store.to_owned()),
        ]
    };
    let start = |env: &[(String, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ControlPlane::start(&env)
    };
    let names = [
        "embedded (SQLite)".to_owned(),
        format!("NATS JetStream, nats-server {}", versions[0]),
        format!("NATS JetStream, nats-server {}", versions[1]),
    ];
    // Engine 0 is the embedded store, engine i > 0 NATS on servers[i - 1].
    fn server_of(i: usize, servers: &[NatsServer; 2]) -> Option<&NatsServer> {
        i.checked_sub(1).map(|n| &servers[n])
    }
    let store_of = |i: usize, servers: &[NatsServer; 2]| {
        server_of(i, servers).map_or_else(|| "sqlite".to_owned(), |s| s.url.clone())
    };
    let mut accept: [Vec<WrkResult>; 3] = Default::default();
    // CPU per accepted job of each round: control plane, NATS server.
    let mut accept_cpu: [Vec<(f64, f64)>; 3] = Default::default();
    {
        let servers = start_servers();
        let cps: Vec<ControlPlane> = (0..3)
            .map(|i| start(&env(&store_of(i, &servers))))
            .collect();
        for _ in 0..rounds {
            for (i, cp) in cps.iter().enumerate() {
                let pid = cp.pid().expect("running");
                let server = server_of(i, &servers).map(NatsServer::pid);
                let before = (cpu_s(pid), server.map_or(0.0, cpu_s));
                let run = wrk_post(&cp.url("/bench"), seconds, 50, &headers);
                let jobs = run.requests.max(1) as f64;
                accept_cpu[i].push((
                    (cpu_s(pid) - before.0) * 1e6 / jobs,
                    (server.map_or(0.0, cpu_s) - before.1) * 1e6 / jobs,
                ));
                accept[i].push(run);
            }
        }
    }
    // Drains: fresh servers for NATS so the accepted jobs above are not in the way. Each
    // engine drains `rounds` backlogs into the same sink, taking turns; each backlog is
    // submitted with delivery off and delivered after a restart with it on.
    let drain_servers = start_servers();
    let mut cps: Vec<ControlPlane> = (0..3)
        .map(|i| start(&env(&store_of(i, &drain_servers))))
        .collect();
    let mut drains: [Vec<Drain>; 3] = Default::default();
    for round in 0..rounds {
        for (i, cp) in cps.iter_mut().enumerate() {
            if round > 0 {
                cp.set_env("KNOCKER_DELIVERY", "off");
                cp.restart();
            }
            let done = delivered(cp);
            runtime.block_on(submit_n(&cp.url("/drain"), backlog, 64, &headers));
            cp.set_env("KNOCKER_DELIVERY", "on");
            cp.restart();
            let pid = cp.pid().expect("running");
            let server = server_of(i, &drain_servers).map(NatsServer::pid);
            let before = (cpu_s(pid), server.map_or(0.0, cpu_s), cpu_s(sink.pid()));
            let started = Instant::now();
            while delivered(cp) < done + backlog as u64 {
                assert!(
                    started.elapsed() < Duration::from_secs(600),
                    "drain did not finish: {}",
                    status(cp)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let rate = backlog as f64 / started.elapsed().as_secs_f64();
            let per_job = |now: f64, then: f64| (now - then) * 1e6 / backlog as f64;
            drains[i].push(Drain {
                rate,
                control_plane_us: per_job(cpu_s(pid), before.0),
                server_us: per_job(server.map_or(0.0, cpu_s), before.1),
                sink_us: per_job(cpu_s(sink.pid()), before.2),
            });
        }
    }
    // The store's files after every drain, per job drained.
    let disk: Vec<f64> = cps
        .iter()
        .enumerate()
        .map(|(i, cp)| {
            let store = server_of(i, &drain_servers)
                .map_or_else(|| cp.dir.join("data"), |s| s.store_dir.clone());
            crate::cost::disk_bytes(&store) as f64 / (backlog as u64 * rounds) as f64
        })
        .collect();
    drop(cps);
    let drains: Vec<Drain> = drains
        .iter()
        .map(|runs| Drain {
            rate: median(runs.iter().map(|d| d.rate).collect()),
            control_plane_us: median(runs.iter().map(|d| d.control_plane_us).collect()),
            server_us: median(runs.iter().map(|d| d.server_us).collect()),
            sink_us: median(runs.iter().map(|d| d.sink_us).collect()),
        })
        .collect();
    let med = |runs: &Vec<WrkResult>| {
        (
            median(runs.iter().map(|r| r.rps).collect()),
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
        )
    };
    let _ = writeln!(
        report,
        "## Embedded store and NATS JetStream, side by side\n"
    );
    let _ = writeln!(
        report,
        "One control plane per engine, NATS on two servers: Debian's nats-server {} and nats-server {}, the one \
         `deploy/kubernetes/nats` runs (JetStream on loopback, file storage). Accepted: \
         `wrk -t1 -c50 -d{seconds}s` on the HTTP ingress with delivery off, median of {rounds} rounds taking turns. \
         Delivered: {backlog} jobs submitted with delivery off, then the control plane restarted with delivery on \
         into a `knocker echo` sink; the time until all are delivered, median of {rounds} drains taking turns. CPU \
         (user + system, from `/proc/<pid>/stat`) per job of each process over the accepting rounds and over the \
         drains (medians); disk is the store's files after the drains (the database and its WAL; the NATS \
         server's store directory), per job drained.\n",
        versions[0],
        versions[1]
    );
    let _ = writeln!(
        report,
        "| engine | accepted/s | accept p50 ms | accept p99 ms | accepting µs/job: control plane | NATS server | \
         delivered/s | delivering µs/job: control plane | NATS server | sink | disk bytes/job |"
    );
    let _ = writeln!(
        report,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (i, name) in names.iter().enumerate() {
        let (rps, p50, p99) = med(&accept[i]);
        let cp_us = median(accept_cpu[i].iter().map(|c| c.0).collect());
        let server_us = median(accept_cpu[i].iter().map(|c| c.1).collect());
        let d = &drains[i];
        let server = |us: f64| {
            if i > 0 {
                format!("{us:.0}")
            } else {
                "–".to_owned()
            }
        };
        let _ = writeln!(
            report,
            "| {name} | {rps:.0} | {p50:.2} | {p99:.2} | {cp_us:.0} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} |",
            server(server_us),
            d.rate,
            d.control_plane_us,
            server(d.server_us),
            d.sink_us,
            disk[i]
        );
    }
    let sqlite = med(&accept[0]).0.max(1.0);
    let ratios: Vec<String> = (1..3)
        .map(|i| {
            let accepts = med(&accept[i]).0 / sqlite;
            let delivers = drains[i].rate / drains[0].rate.max(1.0);
            let met = if accepts >= 0.5 && delivers >= 0.5 {
                "met"
            } else {
                "NOT met"
            };
            format!(
                "on nats-server {} NATS accepts {accepts:.2}× and delivers {delivers:.2}× what the \
                 embedded store does (goal ≥ 0.5× for both: {met})",
                versions[i - 1],
            )
        })
        .collect();
    let _ = writeln!(
        report,
        "\nRatios in this run: {}. A new job is two requests to the server, each waited for; its claim one, \
         and its outcome two waited for (the finished record, the open one's removal) and the \
         acknowledgement; the embedded store shares one commit among every change of a batch. Delivering a \
         job costs the NATS server {:.0} µs on {} and {:.0} on {}, the control plane {:.0} and {:.0} µs on \
         NATS; the control plane {:.0} µs on the embedded store.\n",
        ratios.join("; "),
        drains[1].server_us,
        versions[0],
        drains[2].server_us,
        versions[1],
        drains[1].control_plane_us,
        drains[2].control_plane_us,
        drains[0].control_plane_us
    );
}

/// One engine's drain of the same backlog.
struct Drain {
    rate: f64,
    control_plane_us: f64,
    server_us: f64,
    sink_us: f64,
}

/// The two NATS servers the bench runs the engine on: Debian's (on PATH) and the newer
/// one the manifests in deploy/ run.
pub(crate) fn nats_servers() -> [std::path::PathBuf; 2] {
    [
        "nats-server".into(),
        knocker_e2e::repo_root().join(NatsServer::NEWEST),
    ]
}

/// What `nats-server --version` says of itself, without its name.
pub(crate) fn nats_version(binary: &std::ffi::OsStr) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches("nats-server: ")
                .to_owned()
        })
        .unwrap_or_else(|_| "?".into())
}

/// CPU time (user + system) of a process so far, in seconds.
pub(crate) fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// One drain of `jobs` jobs through a control plane started with `env`: delivered/s and
/// CPU µs per job of the control plane.
fn drain_once(
    runtime: &tokio::runtime::Runtime,
    sink: &Echo,
    jobs: usize,
    env: &[(&str, &str)],
) -> (f64, f64) {
    let headers = knocker_headers(sink);
    let mut all = vec![("LOG_LEVEL", "warning"), ("KNOCKER_DELIVERY", "off")];
    all.extend_from_slice(env);
    let mut cp = ControlPlane::start(&all);
    runtime.block_on(submit_n(&cp.url("/signed"), jobs, 64, &headers));
    cp.set_env("KNOCKER_DELIVERY", "on");
    cp.restart();
    let pid = cp.pid().expect("running");
    let cpu_before = cpu_s(pid);
    let started = Instant::now();
    while delivered(&cp) < jobs as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain did not finish: {}",
            status(&cp)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = cpu_s(pid) - cpu_before;
    (jobs as f64 / took, cpu * 1e6 / jobs as f64)
}

/// Signed deliveries and target health bookkeeping against neither, in alternating
/// rounds of the same drain.
pub fn signing(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let jobs = env_or("BENCH_SIGNING_JOBS", 20_000) as usize;
    let rounds = env_or("BENCH_ROUNDS", 3) as usize;
    let sink = Echo::start();
    let dir = knocker_e2e::temp_dir("bench-signing");
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, "[targets]\nfailure_threshold = 0\n").expect("config");
    let signed = dir.join("signed.toml");
    std::fs::write(
        &signed,
        format!(
            "[signing]\nhosts.\"127.0.0.1:{}\" = [\"env:BENCH_SECRET\", \"env:BENCH_SECRET_NEXT\"]\n\
             [targets]\nfailure_threshold = 5\n",
            sink.port
        ),
    )
    .expect("config");
    let plain = plain.display().to_string();
    let signed = signed.display().to_string();
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..rounds {
        off.push(drain_once(
            runtime,
            &sink,
            jobs,
            &[("KNOCKER_CONFIG", plain.as_str())],
        ));
        on.push(drain_once(
            runtime,
            &sink,
            jobs,
            &[
                ("KNOCKER_CONFIG", signed.as_str()),
                ("BENCH_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                (
                    "BENCH_SECRET_NEXT",
                    "whsec_c2Vjb25kIHNlY3JldCBvZiAzMiBieXRlcyEhIQ==",
                ),
            ],
        ));
    }
    let rate = |v: &[(f64, f64)]| median(v.iter().map(|r| r.0).collect());
    let cpu = |v: &[(f64, f64)]| median(v.iter().map(|r| r.1).collect());
    let (off_rate, on_rate) = (rate(&off), rate(&on));
    let (off_cpu, on_cpu) = (cpu(&off), cpu(&on));
    let ratio = on_rate / off_rate;
    let _ = writeln!(report, "## Signed delivery and target health\n");
    let _ = writeln!(
        report,
        "{jobs} jobs submitted with delivery off, then drained into a `knocker echo` sink, in \
         {rounds} alternating rounds of each: unsigned with circuits off (`failure_threshold = 0`) \
         against signed with two secrets (two `v1` HMAC-SHA256 entries per attempt) and circuits \
         on. CPU is the control plane's own (user + system) over the drain, per delivered job.\n"
    );
    let _ = writeln!(
        report,
        "| round | unsigned/s | signed/s | unsigned µs CPU/job | signed µs CPU/job |"
    );
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: |");
    for (i, (a, b)) in off.iter().zip(&on).enumerate() {
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} |",
            i + 1,
            a.0,
            b.0,
            a.1,
            b.1
        );
    }
    let _ = writeln!(
        report,
        "| median | {off_rate:.0} | {on_rate:.0} | {off_cpu:.1} | {on_cpu:.1} |\n"
    );
    let _ = writeln!(
        report,
        "Signed and watched: **{:.0}%** of the unsigned throughput (goal ≥ 90%: {}), CPU per job \
         ×{:.2}.\n",
        ratio * 100.0,
        if ratio >= 0.9 { "met" } else { "NOT met" },
        on_cpu / off_cpu
    );
}

/// What a target that takes no more costs: a target rate-limited to 50 jobs/s holding a
/// large backlog, alone and beside another target's job stream; the reference is the same
/// with a backlog only long enough to last the run, measured in the same run.
pub fn capped(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let jobs = env_or("BENCH_CAPPED_JOBS", 50_000) as usize;
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let slow = Echo::start();
    let fast = Echo::start();
    let config = knocker_e2e::temp_dir("bench-capped").join("knocker.toml");
    std::fs::write(
        &config,
        format!(
            "[targets.hosts.\"127.0.0.1:{}\"]\nrate_per_s = 50\nburst = 1\n",
            slow.port
        ),
    )
    .expect("write the config");
    let config = config.display().to_string();

    struct Run {
        idle_cpu: f64,
        idle_delivered: u64,
        stream: WrkResult,
        stream_us: f64,
        left: u64,
    }
    let run = |backlog: usize| -> Run {
        let mut cp = ControlPlane::start(&[
            ("LOG_LEVEL", "warning"),
            ("KNOCKER_DELIVERY", "off"),
            ("KNOCKER_CONFIG", &config),
        ]);
        if backlog > 0 {
            runtime.block_on(submit_n(
                &cp.url("/capped"),
                backlog,
                64,
                &knocker_headers(&slow),
            ));
        }
        cp.set_env("KNOCKER_DELIVERY", "on");
        cp.restart();
        let pid = cp.pid().expect("running");
        // The first claims after the start, then a window with nothing but the backlog.
        std::thread::sleep(Duration::from_secs(2));
        let (cpu, done) = (cpu_s(pid), delivered(&cp));
        std::thread::sleep(Duration::from_secs(seconds));
        let idle_cpu = (cpu_s(pid) - cpu) / seconds as f64;
        let idle_delivered = delivered(&cp) - done;
        let cpu = cpu_s(pid);
        let stream = wrk_post(
            &cp.url("/stream"),
            seconds,
            connections,
            &knocker_headers(&fast),
        );
        // Until the stream's own jobs are delivered (the backlog keeps its 50/s).
        let fast_host = format!("127.0.0.1:{}", fast.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        while delivered_to(&cp, &fast_host) < stream.requests && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stream_us = (cpu_s(pid) - cpu) * 1e6 / stream.requests.max(1) as f64;
        let left = status(&cp)["queue"]["pending"].as_u64().unwrap_or(0);
        Run {
            idle_cpu,
            idle_delivered,
            stream,
            stream_us,
            left,
        }
    };
    // Enough for 50 jobs/s through both windows and the stream's drain.
    let short = 50 * (2 + 2 * seconds as usize + 20);
    let without = run(short);
    let with = run(jobs);

    let _ = writeln!(
        report,
        "## A rate-limited target's backlog beside other traffic\n"
    );
    let _ = writeln!(
        report,
        "A target limited to 50 jobs/s (`rate_per_s = 50` in the config file) holds a backlog \
         (submitted with delivery off, then the control plane restarted with delivery on). Measured: \
         {seconds} s with nothing else to do but deliver it at its rate, then a {seconds}-second wrk stream \
         (`-c{connections}`) to another target until its jobs are delivered. The reference has a backlog just \
         long enough to last the run ({short} jobs), so both deliver the same 50 jobs/s and only the \
         backlog's length differs.\n"
    );
    let _ = writeln!(
        report,
        "| backlog | control plane, delivering only the backlog | delivered in that window | other stream, jobs/s | p99 | control plane per stream job | backlog left |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (n, r) in [(short, &without), (jobs, &with)] {
        let _ = writeln!(
            report,
            "| {n} | {:.1}% of a core | {} | {:.0} | {:.2} ms | {:.0} µs | {} |",
            r.idle_cpu * 100.0,
            r.idle_delivered,
            r.stream.rps,
            r.stream.p99_ms,
            r.stream_us,
            r.left
        );
    }
    let ratio = with.stream.rps / without.stream.rps.max(1.0);
    let _ = writeln!(
        report,
        "\nWith {jobs} jobs waiting, the other stream ran at **{:.0}%** of its rate beside the short \
         backlog, and delivering the backlog alone took **{:.1}%** of a core against {:.1}% ({:.1} ms of \
         CPU per delivered job against {:.1}).\n",
        ratio * 100.0,
        with.idle_cpu * 100.0,
        without.idle_cpu * 100.0,
        with.idle_cpu * 1000.0 / (with.idle_delivered.max(1) as f64 / seconds as f64),
        without.idle_cpu * 1000.0 / (without.idle_delivered.max(1) as f64 / seconds as f64),
    );
}

/// Attempts delivered to `host`, from the control plane's `/metrics`.
fn delivered_to(cp: &ControlPlane, host: &str) -> u64 {
    let series = format!(
        "knocker_attempts_total{{target=\"{host}\",kind=\"target\",outcome=\"delivered\",status_class=\"2xx\"}} "
    );
    reqwest::blocking::get(cp.url("/metrics"))
        .and_then(|r| r.text())
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix(series.as_str())?
                    .split(' ')
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0, |n| n as u64)
}
