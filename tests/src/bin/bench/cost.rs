//! What a job costs end to end (accepted, stored, delivered, recorded) through each door,
//! per process, against the same Envoy proxying and against Knocker 1.4.1; and what the
//! rule modes cost: fallback on healthy traffic, capture and broadcast.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use knocker_e2e::process::wait_for_port;
use knocker_e2e::{free_port, ControlPlane, Envoy, EnvoyOptions};

use crate::jobs::{cpu_s, delivered, envoy_for, knocker_headers, settle};
use crate::load::{fixed_rate, median, wrk_posts, Posts, POST_BODY};
use crate::{env_or, Echo};

/// One set-up's sustained job stream: what each process spent per job.
#[derive(Default)]
pub(crate) struct Cost {
    pub(crate) rps: f64,
    pub(crate) jobs: u64,
    /// Requests that failed (timeouts, errors): only a lenient reference has any.
    pub(crate) errors: u64,
    /// Deliveries per second over the load and the drain that follows it.
    pub(crate) delivered_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// µs of CPU per job: control plane, Envoy (0 without), sinks, Knocker 1.4.1.
    pub(crate) cp_us: f64,
    pub(crate) envoy_us: f64,
    pub(crate) sink_us: f64,
    pub(crate) anchor_us: f64,
    pub(crate) disk_per_job: f64,
}

/// The processes whose CPU a run counts, and how many deliveries make one job.
#[derive(Default, Clone, Copy)]
pub(crate) struct SetUp<'a> {
    pub(crate) cp: Option<&'a ControlPlane>,
    pub(crate) envoy: Option<&'a Envoy>,
    pub(crate) anchor: Option<&'a Anchor>,
    pub(crate) sinks: &'a [&'a Echo],
    /// Deliveries per job (a broadcast's members); 0 or 1: one.
    pub(crate) copies: u64,
    /// Count per answered request, with the control plane only watched (its CPU, its
    /// store's growth), no drain waited for: acceptance with delivery off, or a
    /// fallback's healthy traffic, which hands the control plane nothing.
    pub(crate) per_answer: bool,
}

/// Bytes of the files under `dir`, its subdirectories included: the embedded store's
/// (database, WAL, shared memory), or a NATS server's store directory.
pub(crate) fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => disk_bytes(&e.path()),
                Ok(m) if m.is_file() => m.len(),
                _ => 0,
            })
            .sum()
    })
}

/// `wrk -c50` POSTs of `body` bytes (`None`: [`POST_BODY`]) for `seconds` at `url`, then
/// the drain; CPU of each process over both. Jobs are what the control plane delivered
/// divided by the set-up's `copies`, or wrk's answered requests without one (or with
/// [`SetUp::per_answer`]).
pub(crate) fn cost_once(
    url: &str,
    seconds: u64,
    headers: &[(&str, String)],
    body: Option<usize>,
    procs: SetUp<'_>,
) -> Cost {
    let (sinks, copies) = (procs.sinks, procs.copies);
    let cpu = |pid: Option<u32>| pid.map_or(0.0, cpu_s);
    let sinks_cpu = || sinks.iter().map(|s| cpu_s(s.pid())).sum::<f64>();
    let cp_pid = procs.cp.and_then(ControlPlane::pid);
    let envoy_pid = procs.envoy.and_then(Envoy::pid);
    let before = (cpu(cp_pid), cpu(envoy_pid), sinks_cpu());
    let anchor_before = procs.anchor.map_or(0.0, Anchor::cpu_s);
    let delivered_before = procs.cp.map_or(0, delivered);
    let disk_before = procs.cp.map_or(0, |cp| disk_bytes(&cp.dir.join("data")));
    // Knocker 1.4.1 lets some requests wait past wrk's 2 s: counted, not fatal.
    let posts = Posts {
        bytes: body,
        lenient: procs.anchor.is_some(),
    };
    let r = wrk_posts(url, seconds, 50, headers, posts);
    let load_ended = Instant::now();
    let (jobs, deliveries) = match procs.cp {
        Some(cp) if procs.per_answer => (r.requests, delivered(cp) - delivered_before),
        Some(cp) => {
            settle(cp);
            let deliveries = delivered(cp) - delivered_before;
            (deliveries / copies.max(1), deliveries)
        }
        None => (r.requests, r.requests),
    };
    if let Some(anchor) = procs.anchor {
        anchor.drained();
    }
    let took = seconds as f64 + load_ended.elapsed().as_secs_f64();
    let after = (cpu(cp_pid), cpu(envoy_pid), sinks_cpu());
    let per_job = |a: f64, b: f64| (b - a) * 1e6 / jobs.max(1) as f64;
    let disk_after = procs.cp.map_or(0, |cp| disk_bytes(&cp.dir.join("data")));
    Cost {
        rps: r.rps,
        jobs,
        errors: r.errors,
        delivered_per_s: deliveries as f64 / took,
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
        cp_us: per_job(before.0, after.0),
        envoy_us: per_job(before.1, after.1),
        sink_us: per_job(before.2, after.2),
        anchor_us: procs
            .anchor
            .map_or(0.0, |a| per_job(anchor_before, a.cpu_s())),
        disk_per_job: (disk_after.saturating_sub(disk_before)) as f64 / jobs.max(1) as f64,
    }
}

/// Knocker 1.4.1 (gunicorn, one worker, its jobs in memory), from the checkout named by
/// `KNOCKER_ANCHOR` (its `run.sh`). It drops the port of `Knocker-Host`, so its target
/// listens on 127.0.0.1:80.
pub(crate) struct Anchor {
    child: Child,
    port: u16,
}

impl Anchor {
    /// `None` when `KNOCKER_ANCHOR` is not set; panics when it is set and does not start.
    fn start() -> Option<Self> {
        let dir = std::env::var_os("KNOCKER_ANCHOR").filter(|d| !d.is_empty())?;
        let port = free_port();
        let child = Command::new("bash")
            .arg(std::path::Path::new(&dir).join("run.sh"))
            .env("PORT", port.to_string())
            .env("WORKERS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Knocker 1.4.1 (KNOCKER_ANCHOR/run.sh)");
        // The first start makes its virtualenv.
        assert!(
            wait_for_port(port, Duration::from_secs(300)),
            "Knocker 1.4.1 did not listen on {port}"
        );
        Some(Self { child, port })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// CPU seconds of gunicorn and its workers.
    fn cpu_s(&self) -> f64 {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        cpu_s(pid)
            + children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .map(cpu_s)
                .sum::<f64>()
    }

    /// Waits (up to five minutes) until its CPU stops moving: its in-memory queue is
    /// delivered.
    fn drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = self.cpu_s();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.cpu_s();
            if now == last {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        // gunicorn stops its workers on SIGTERM.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A figure, or `–` for a process not in the set-up (nothing measured).
pub(crate) fn dash(x: f64) -> String {
    if x > 0.0 {
        format!("{x:.0}")
    } else {
        "–".into()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// How long this machine's disk takes to flush a write, back to back and with gaps.
struct Flush {
    back_to_back_us: f64,
    spaced_us: f64,
}

impl Flush {
    /// p50 of 200 `fdatasync`s of a fresh 48 KiB write each, in a file under `dir` (the
    /// store's file system), without pause and with 1 ms between them.
    fn measure(dir: &std::path::Path) -> Self {
        use std::os::unix::fs::FileExt as _;
        let path = dir.join("flush-probe");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the flush probe's file");
        let block = vec![0x5a_u8; 48 * 1024];
        let slots = 256u64;
        file.set_len(slots * block.len() as u64)
            .expect("size the flush probe's file");
        file.sync_all().expect("flush the flush probe's file");
        let mut slot = 0u64;
        let mut p50 = |pause: Duration| {
            let times = (0..200)
                .map(|_| {
                    file.write_at(&block, slot * block.len() as u64)
                        .expect("write the flush probe");
                    slot = (slot + 1) % slots;
                    let started = Instant::now();
                    file.sync_data().expect("fdatasync the flush probe");
                    let took = started.elapsed().as_secs_f64() * 1e6;
                    std::thread::sleep(pause);
                    took
                })
                .collect();
            median(times)
        };
        let flush = Self {
            back_to_back_us: p50(Duration::ZERO),
            spaced_us: p50(Duration::from_millis(1)),
        };
        let _ = std::fs::remove_file(&path);
        flush
    }
}

/// The median of each figure over rounds (all zero when there were none: Knocker 1.4.1
/// without `KNOCKER_ANCHOR`, whose row then says it was not run).
pub(crate) fn med(v: &[Cost]) -> Cost {
    if v.is_empty() {
        return Cost::default();
    }
    let m = |f: fn(&Cost) -> f64| median(v.iter().map(f).collect());
    Cost {
        rps: m(|c| c.rps),
        jobs: v.iter().map(|c| c.jobs).sum(),
        errors: v.iter().map(|c| c.errors).sum(),
        delivered_per_s: m(|c| c.delivered_per_s),
        p50_ms: m(|c| c.p50_ms),
        p99_ms: m(|c| c.p99_ms),
        cp_us: m(|c| c.cp_us),
        envoy_us: m(|c| c.envoy_us),
        sink_us: m(|c| c.sink_us),
        anchor_us: m(|c| c.anchor_us),
        disk_per_job: m(|c| c.disk_per_job),
    }
}

const COST_HEADER: &str = "| set-up | jobs/s | delivered/s (load + drain) | p50 ms | p99 ms | control plane µs/job | Envoy µs/job | sink µs/job | Knocker 1.4.1 µs/job | disk bytes/job |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

fn cost_row(report: &mut String, name: &str, c: &Cost) {
    let _ = writeln!(
        report,
        "| {name} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
        c.rps,
        c.delivered_per_s,
        c.p50_ms,
        c.p99_ms,
        dash(c.cp_us),
        dash(c.envoy_us),
        dash(c.sink_us),
        dash(c.anchor_us),
        dash(c.disk_per_job),
    );
}

/// The cost of a job end to end: accepted, stored, delivered and recorded, per process.
pub fn cost(report: &mut String, runtime: &tokio::runtime::Runtime) {
    let seconds = env_or("BENCH_SECONDS", 10);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let cp = ControlPlane::start(&[("LOG_LEVEL", "warning")]);
    let envoy = envoy_for(&cp, &sink);
    // The Envoy door again on a store that keeps its jobs in memory: what is left of the
    // gap to proxying without the embedded store (its commits, its waits for the disk).
    let memory_cp = ControlPlane::start(&[("LOG_LEVEL", "warning"), ("KNOCKER_STORE", "memory")]);
    let memory_envoy = envoy_for(&memory_cp, &sink);
    let anchor = Anchor::start();
    // Knocker 1.4.1 sends to port 80 whatever port Knocker-Host names.
    let anchor_sink = anchor.as_ref().map(|_| Echo::start_on(80));
    let anchor_headers = [
        ("Knocker-Host", "127.0.0.1".to_owned()),
        ("Knocker-Scheme", "http".to_owned()),
    ];
    let sinks = [&sink];
    let mut runs: [Vec<Cost>; 5] = Default::default();
    for _ in 0..rounds {
        let with_cp = SetUp {
            cp: Some(&cp),
            sinks: &sinks,
            ..SetUp::default()
        };
        let through_envoy = SetUp {
            envoy: Some(&envoy),
            ..with_cp
        };
        // The reference: the same Envoy proxying the same POSTs to the sink (no Knocker
        // headers: a route without the filter).
        let proxy = SetUp {
            envoy: Some(&envoy),
            sinks: &sinks,
            ..SetUp::default()
        };
        let (door, envoy_door) = (&cp.url("/bench"), &envoy.url("/bench"));
        runs[0].push(cost_once(door, seconds, &headers, None, with_cp));
        runs[1].push(cost_once(
            envoy_door,
            seconds,
            &headers,
            None,
            through_envoy,
        ));
        runs[2].push(cost_once(envoy_door, seconds, &[], None, proxy));
        let in_memory = SetUp {
            cp: Some(&memory_cp),
            envoy: Some(&memory_envoy),
            ..with_cp
        };
        let memory_door = &memory_envoy.url("/bench");
        runs[4].push(cost_once(memory_door, seconds, &headers, None, in_memory));
    }
    drop(memory_envoy);
    drop(memory_cp);
    // Knocker 1.4.1 last: it accepts faster than it delivers, and its backlog (in memory)
    // would share the machine with the other set-ups' rounds.
    if let (Some(anchor), Some(anchor_sink)) = (&anchor, &anchor_sink) {
        let sinks = [anchor_sink];
        let procs = SetUp {
            anchor: Some(anchor),
            sinks: &sinks,
            ..SetUp::default()
        };
        let url = &anchor.url("/bench");
        for _ in 0..rounds {
            runs[3].push(cost_once(url, seconds, &anchor_headers, None, procs));
        }
    }
    let [http, grpc, proxy, anchor_runs, memory] = runs.each_ref().map(|v| med(v));
    let flush = Flush::measure(&cp.dir);
    // Latency at half the sustained rate, open loop, delivery on.
    let open = |url: String, rate: f64| {
        let rate = (rate / 2.0).max(1.0) as u64;
        let r = runtime.block_on(fixed_rate(&url, rate, seconds, &headers));
        settle(&cp);
        (rate, r)
    };
    let open_http = open(cp.url("/bench"), http.rps);
    let open_envoy = open(envoy.url("/bench"), grpc.rps);

    let _ = writeln!(report, "## Cost per job, end to end\n");
    let _ = writeln!(
        report,
        "A sustained job stream with delivery on: `wrk -t1 -c50 -d{seconds}s` POSTs (a {}-byte \
         body) with `Knocker-Host` naming a `knocker echo` sink, through each door, each job \
         accepted (committed, then the receipt), delivered to the sink and its outcome recorded. \
         CPU (user + system, from `/proc/<pid>/stat`) of each process over the load and the \
         drain that follows, per delivered job; disk is the growth of the embedded store's \
         files per job. The reference rows count per answered request. Median of {rounds} \
         rounds, the set-ups taking turns; Envoy runs one worker.\n",
        POST_BODY.len()
    );
    let _ = writeln!(report, "{COST_HEADER}");
    cost_row(report, "HTTP door, delivery on", &http);
    cost_row(report, "Envoy door, delivery on", &grpc);
    cost_row(
        report,
        "reference: the same Envoy proxying the same POSTs to the sink",
        &proxy,
    );
    cost_row(
        report,
        "reference: the Envoy door on the in-memory store (`KNOCKER_STORE=memory`, not durable)",
        &memory,
    );
    if anchor.is_some() {
        cost_row(
            report,
            "reference: Knocker 1.4.1 (gunicorn, 1 worker, jobs in memory, not durable)",
            &anchor_runs,
        );
    } else {
        let _ = writeln!(
            report,
            "| reference: Knocker 1.4.1 — not run (set `KNOCKER_ANCHOR` to its checkout) | | | | | | | | | |"
        );
    }
    let ratio = grpc.rps / proxy.rps;
    let _ = writeln!(
        report,
        "\nControl-plane CPU per job: **{:.0} µs** on the HTTP door (goal ≤ 60: {}), \
         **{:.0} µs** on the gRPC door (goal: within 10 µs of the HTTP door: {}). Through \
         Envoy the job stream runs at **{:.0}%** of what the same Envoy proxies (goal ≥ 50%: {}). \
         {} jobs were delivered in these runs.",
        http.cp_us,
        verdict(http.cp_us <= 60.0),
        grpc.cp_us,
        verdict(grpc.cp_us - http.cp_us <= 10.0),
        ratio * 100.0,
        verdict(ratio >= 0.5),
        http.jobs + grpc.jobs,
    );
    let _ = writeln!(
        report,
        "On the in-memory store the same door runs at **{:.0}%** of the proxying: between the \
         two is the embedded store, its commits and each submission's wait for its commit to \
         reach the disk before the receipt. This machine's disk, measured in the store's \
         directory after the runs: a 48 KiB write and `fdatasync` takes {:.0} µs (p50) back \
         to back, {:.0} µs with 1 ms between them.",
        memory.rps / proxy.rps * 100.0,
        flush.back_to_back_us,
        flush.spaced_us,
    );
    if anchor.is_some() {
        let times = http.delivered_per_s / anchor_runs.delivered_per_s;
        let _ = writeln!(
            report,
            "Over the load and its drain, the HTTP door delivers **{times:.1}×** the jobs/s of \
             Knocker 1.4.1 measured in this run ({:.0} against {:.0}; answered: {:.0} against \
             {:.0} req/s; goal ≥ 10×: {}); per job Knocker 1.4.1 spends {:.0} µs of CPU, the control plane {:.0}. \
             Knocker 1.4.1 left {} of its requests without an answer within wrk's 2 s (or with an \
             error) over the rounds; the control plane none.",
            http.delivered_per_s,
            anchor_runs.delivered_per_s,
            http.rps,
            anchor_runs.rps,
            verdict(times >= 10.0),
            anchor_runs.anchor_us,
            http.cp_us,
            anchor_runs.errors,
        );
    }
    let _ = writeln!(
        report,
        "\nOpen loop at half the sustained rate, delivery on (latency from each request's due \
         time, {seconds} s; host steal and TCP retransmits are the machine's over the run, \
         all processes):\n\n| door | rate/s | answered | p50 ms | p99 ms | max ms | host steal ms | TCP retransmits | goal p99 < 10 ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (name, (rate, r)) in [("HTTP door", open_http), ("Envoy door", open_envoy)] {
        let _ = writeln!(
            report,
            "| {name} | {rate} | {}/{} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
            r.ok,
            r.sent,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.host.steal_ms,
            r.host.retransmits,
            verdict(r.p99_ms < 10.0 && r.ok == r.sent)
        );
    }
    report.push('\n');
}

/// What fallback costs healthy traffic, and the sustained rates of capture and broadcast.
pub fn modes(report: &mut String) {
    let seconds = env_or("BENCH_SECONDS", 10);
    let rounds = env_or("BENCH_ROUNDS", 3);
    // Fallback compares two Envoys against a 10% goal: many short rounds, each pair back
    // to back, so that the machine's drift from minute to minute hits both alike.
    let pair_rounds = env_or("BENCH_FALLBACK_ROUNDS", 9);
    let pair_seconds = env_or("BENCH_FALLBACK_SECONDS", 3);
    let app = Echo::start();
    let apps = [&app];
    let cp = ControlPlane::start(&[("LOG_LEVEL", "warning")]);
    // Each fallback: its Envoy file with and without Knocker, and the path it covers.
    let start_envoy = |file: &str, without_filter| {
        Envoy::start(
            file,
            &EnvoyOptions {
                grpc_port: cp.grpc_port,
                http_port: cp.http_port,
                upstream_port: app.port,
                without_filter,
                vars: vec![(
                    "KNOCKER_APP_TARGET".into(),
                    format!("http://127.0.0.1:{}", app.port),
                )],
                ..Default::default()
            },
        )
    };
    let fallbacks = [
        (
            "by handover (`sidecar.yaml`)",
            "sidecar.yaml",
            "/bench",
            true,
        ),
        (
            "in the filter (`fallback.yaml`)",
            "fallback.yaml",
            "/api/bench",
            false,
        ),
    ];

    // Fallback on a healthy app. By handover Envoy keeps every write's body for a retry
    // it never makes; in the filter every write's body is copied into the filter too.
    let mut shadow = String::new();
    for (label, file, path, goal) in fallbacks {
        let with = start_envoy(file, false);
        let without = start_envoy(file, true);
        for bytes in [1024usize, 64 * 1024] {
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for round in 0..pair_rounds {
                let order = if round % 2 == 0 {
                    [&without, &with]
                } else {
                    [&with, &without]
                };
                for envoy in order {
                    let knocker = std::ptr::eq(envoy, &with);
                    // With Knocker, the control plane is watched too: healthy traffic
                    // hands it nothing, and nothing is stored.
                    let procs = SetUp {
                        cp: knocker.then_some(&cp),
                        envoy: Some(envoy),
                        sinks: &apps,
                        per_answer: true,
                        ..SetUp::default()
                    };
                    let c = cost_once(&envoy.url(path), pair_seconds, &[], Some(bytes), procs);
                    if knocker {
                        on.push(c);
                    } else {
                        off.push(c);
                    }
                }
            }
            // Each round's cost from its own pair; the median of those.
            let costs = on
                .iter()
                .zip(&off)
                .map(|(on, off)| (1.0 - on.rps / off.rps) * 100.0);
            let cost = median(costs.collect());
            let (on, off) = (med(&on), med(&off));
            let verdict = if goal {
                format!("({})", verdict(cost <= 10.0))
            } else {
                "(for comparison)".to_owned()
            };
            let _ = writeln!(
                shadow,
                "| {label} | {} KB | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {:.0} | **{cost:.1}%** {verdict} |",
                bytes / 1024,
                off.rps,
                off.p50_ms,
                off.p99_ms,
                off.envoy_us,
                off.sink_us,
                on.rps,
                on.p50_ms,
                on.p99_ms,
                on.envoy_us,
                on.sink_us,
                on.cp_us,
                on.disk_per_job,
            );
        }
    }

    // Capture: every POST becomes a job (the filter answers 202), delivered to the app.
    let capture_config = format!(
        r#"{{"cluster":"knocker_control_plane","timeout_ms":2000,"retry_after_s":1,"rules":[{{"name":"bench","mode":"capture","match":{{"methods":["POST"]}},"delivery":{{"target":"http://127.0.0.1:{}","timeout_s":10}}}}]}}"#,
        app.port
    );
    let capture = Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: app.port,
            filter_on_every_route: true,
            plugin_config: Some(capture_config),
            ..Default::default()
        },
    );
    let procs = SetUp {
        cp: Some(&cp),
        envoy: Some(&capture),
        sinks: &apps,
        ..SetUp::default()
    };
    let captured: Vec<Cost> = (0..rounds)
        .map(|_| cost_once(&capture.url("/bench"), seconds, &[], None, procs))
        .collect();
    let captured = med(&captured);
    drop(capture);

    // Broadcast: each POST to the HTTP door is sent to the three members of a group.
    let members = [Echo::start(), Echo::start(), Echo::start()];
    let groups = cp.dir.join("groups.toml");
    let list: Vec<String> = members
        .iter()
        .map(|m| format!("\"http://127.0.0.1:{}\"", m.port))
        .collect();
    std::fs::write(
        &groups,
        format!("[groups.bench]\nmembers = [{}]\n", list.join(", ")),
    )
    .expect("write the groups file");
    let groups = groups.display().to_string();
    let bcp = ControlPlane::start(&[("LOG_LEVEL", "warning"), ("KNOCKER_CONFIG", &groups)]);
    let sinks: Vec<&Echo> = members.iter().collect();
    let procs = SetUp {
        cp: Some(&bcp),
        sinks: &sinks,
        copies: 3,
        ..SetUp::default()
    };
    let header = [("Knocker-Broadcast", "bench".to_owned())];
    // A shorter load: each member's copies are delivered one at a time, in order (its
    // lane), so the drain takes several times the load.
    let broadcast_seconds = seconds.min(3);
    let broadcast: Vec<Cost> = (0..rounds)
        .map(|_| {
            let url = &bcp.url("/bench");
            cost_once(url, broadcast_seconds, &header, None, procs)
        })
        .collect();
    let broadcast = med(&broadcast);

    let _ = writeln!(report, "## Fallback, capture and broadcast\n");
    let _ = writeln!(
        report,
        "Fallback on healthy traffic: Envoy in front of a `knocker echo` app, with and \
         without Knocker, `wrk -t1 -c50 -d{pair_seconds}s` POSTs of each body size, in \
         {pair_rounds} rounds of the two back to back (their order alternating); the figures \
         are medians over the rounds, and the throughput cost is the median of each round's \
         cost. By handover (`envoy/sidecar.yaml`, what the \
         sidecar and gateway files do): Envoy keeps each write's body for a retry to the \
         handover listener, and the filter never sees a healthy write; without Knocker is the \
         same file without the filter and the retry. In the filter (`envoy/fallback.yaml`, the \
         `fallback` rule mode, for routes whose retry policy is not yours): the filter holds \
         each body until it has ended and keeps a copy; without Knocker is that file without \
         the filter. CPU (user + system, from `/proc/<pid>/stat`) per answered request of \
         Envoy, the app and, with fallback, the control plane, over the load; disk is the \
         growth of the embedded store's files per request (healthy traffic is not stored).\n\n\
         | fallback | body | without Knocker: req/s | p50 ms | p99 ms | Envoy µs/req | app µs/req | \
         with fallback: req/s | p50 ms | p99 ms | Envoy µs/req | app µs/req | control plane µs/req | \
         disk bytes/req | throughput cost (goal ≤ 10%) |\n| --- | --- | ---: | ---: | ---: | ---: | \
         ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    report.push_str(&shadow);
    let _ = writeln!(
        report,
        "\nCapture (`knocker.yaml` with a capture rule for POST, the filter answering 202 once \
         the job is committed) and broadcast (the HTTP door, `Knocker-Broadcast` naming a group \
         of three `knocker echo` members: three jobs per request, committed together, each \
         member's copies delivered in order; `-d{broadcast_seconds}s`), delivery on; CPU per \
         request over the load and the drain (delivered/s counts each copy), median of {rounds} \
         rounds:\n"
    );
    let _ = writeln!(report, "{COST_HEADER}");
    cost_row(report, "capture through Envoy", &captured);
    cost_row(
        report,
        "broadcast to 3 members (per request; sink = the three members)",
        &broadcast,
    );
    report.push('\n');
}
