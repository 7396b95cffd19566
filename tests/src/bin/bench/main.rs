//! `make bench`: measures and writes `docs/benchmarks.md`.
//!
//! Filter cost: the same Envoy file (`envoy/knocker.yaml`) with and without the knocker
//! filter, in front of the same upstream (`knocker echo`), requests without Knocker
//! headers, driven by wrk. The two Envoys are measured in alternating rounds in one run,
//! so machine noise hits both alike; the table gives each round and the medians.
//!
//! Durable jobs (`jobs.rs`): accepted jobs/s through the HTTP ingress and Envoy with
//! delivery off and on (wrk), with CPU per job of each process and the store's growth per
//! job, open-loop latency at half the goal rate, drain rate from a
//! 100,000-job backlog, and a 1,000,000-job backlog (memory, time to first delivery).
//!
//! A rate-limited target's backlog (`jobs.rs`): what the control plane spends delivering it,
//! and another target's job stream beside it, against a backlog just long enough to last
//! the run.
//!
//! Signing (`jobs.rs`): drains of signed deliveries with circuits on against unsigned ones
//! with circuits off, alternating rounds: deliveries/s and CPU per job.
//!
//! Engines (`jobs.rs`): the embedded store and NATS JetStream (on Debian's nats-server and
//! on the newer one `scripts/setup.sh` installs) side by side, accepted and delivered jobs/s.
//!
//! Cost per job (`cost.rs`): a sustained job stream, delivery on, through each door: CPU
//! per job of every process (control plane, Envoy, sink) over the load and its drain,
//! p50/p99, bytes on disk per job, open-loop latency at half the sustained rate; the same
//! Envoy proxying the same POSTs, the Envoy door on the in-memory store, and Knocker 1.4.1
//! when `KNOCKER_ANCHOR` names its checkout (its `run.sh`; its target listens on port 80),
//! as the references; and how long the machine's disk takes to flush a write.
//!
//! Rule modes (`cost.rs`): fallback on healthy traffic (1 KB and 64 KB bodies; by
//! handover, `envoy/sidecar.yaml`, and in the filter, `envoy/fallback.yaml`, each with and
//! without Knocker), capture through Envoy and broadcast to three members: sustained
//! rates, p50/p99, CPU per request of each process and the store's growth per request.
//!
//! Soak (`soak.rs`): a sustained job stream into a store capped far below what it writes,
//! the embedded store and then NATS on each of its two servers (its finished history
//! capped): jobs/s, refusals, store size and RSS per window (the control plane's, and the
//! NATS server's), and how many finished jobs made room.
//!
//! Knobs (environment): `BENCH_FILTER_ROUNDS` (15), `BENCH_FILTER_SECONDS` (3),
//! `BENCH_ROUNDS` (3, the job benchmarks), `BENCH_SECONDS` (10), `BENCH_CONNECTIONS`
//! (32), `BENCH_DRAIN_JOBS` (100000), `BENCH_BACKLOG_JOBS` (1000000),
//! `BENCH_ENGINE_SECONDS` (5), `BENCH_SOAK_SECONDS` (120), `BENCH_SOAK_WINDOW` (10),
//! `BENCH_SOAK_CAP_MIB` (64), `BENCH_ENGINE_JOBS` (20000), `BENCH_SIGNING_JOBS` (20000),
//! `BENCH_CAPPED_JOBS` (50000), `BENCH_FALLBACK_ROUNDS` (9), `BENCH_FALLBACK_SECONDS` (3),
//! `KNOCKER_ANCHOR` (none), `BENCH_ONLY` (`filter`, `accept`,
//! `drain`, `signing`, `backlog`, `capped`, `engines`, `cost`, `modes` or `soak`: run one
//! section, replacing only that section of `docs/benchmarks.md`).

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use knocker_e2e::process::{knocker_bin, render_envoy_config};
use knocker_e2e::{free_port, repo_root, ControlPlane, Envoy, EnvoyOptions};

mod cost;
mod jobs;
mod load;
mod soak;

use load::{median, wrk};

/// A benchmark knob from the environment.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `knocker echo --quiet` on a free port: the upstream of the filter benchmark and the
/// sink the job benchmarks deliver to. Stopped when dropped.
pub struct Echo {
    child: Child,
    pub port: u16,
}

impl Echo {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// On a given port (Knocker 1.4.1's target must be on port 80).
    pub fn start_on(port: u16) -> Self {
        let child = Command::new(knocker_bin())
            .args(["echo", "--quiet", "--addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start knocker echo");
        std::thread::sleep(Duration::from_millis(300));
        Self { child, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let envoy = Command::new(repo_root().join(".tools/venv/bin/envoy"))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|w| w.contains("1."))
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), Envoy {}",
        envoy.split('/').nth(1).unwrap_or(&envoy)
    )
}

fn filter_cost(report: &mut String) {
    // Many short rounds rather than a few long ones: this machine's noise drifts over
    // seconds, and a median of three 10 s windows was swung by a single noisy one.
    let rounds = env_or("BENCH_FILTER_ROUNDS", 15);
    let seconds = env_or("BENCH_FILTER_SECONDS", 3);
    let connections = env_or("BENCH_CONNECTIONS", 32);

    let upstream = Echo::start();
    let upstream_port = upstream.port;
    let cp = ControlPlane::start(&[("LOG_LEVEL", "warning")]);
    let options = EnvoyOptions {
        grpc_port: cp.grpc_port,
        http_port: cp.http_port,
        upstream_port,
        ..Default::default()
    };
    let with = Envoy::start("knocker.yaml", &options);
    let without = Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            without_filter: true,
            ..options.clone()
        },
    );
    let everywhere = Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            filter_on_every_route: true,
            ..options.clone()
        },
    );
    // Sanity: the baseline really has no filter; the naive config runs it on every route.
    let rendered = render_envoy_config(
        "knocker.yaml",
        &EnvoyOptions {
            without_filter: true,
            ..options.clone()
        },
        1,
        2,
    );
    assert!(!rendered.contains("- name: envoy.filters.http.wasm"));
    let rendered = render_envoy_config(
        "knocker.yaml",
        &EnvoyOptions {
            filter_on_every_route: true,
            ..options
        },
        1,
        2,
    );
    assert!(
        rendered.contains("- name: envoy.filters.http.wasm")
            && !rendered.contains("disabled: true")
    );

    // Warm-up (connections, V8 JIT).
    wrk(&with.url("/bench"), 2, connections, &[]);
    wrk(&without.url("/bench"), 2, connections, &[]);
    wrk(&everywhere.url("/bench"), 2, connections, &[]);

    let mut rows = String::new();
    let (mut with_runs, mut without_runs, mut everywhere_runs) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        // The order rotates every round, so a drift during the run (other tenants,
        // clock speed) does not always favour the same configuration.
        let urls = [
            without.url("/bench"),
            with.url("/bench"),
            everywhere.url("/bench"),
        ];
        let mut results = [None; 3];
        for k in 0..3 {
            let which = (k + round as usize) % 3;
            results[which] = Some(wrk(&urls[which], seconds, connections, &[]));
        }
        let [Some(b), Some(a), Some(e)] = results else {
            unreachable!("every configuration ran")
        };
        eprintln!("round {round}: without {b:?}, with {a:?}, on every route {e:?}");
        let _ = writeln!(
            rows,
            "| {round} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} |",
            b.rps, b.p50_ms, b.p99_ms, a.rps, a.p50_ms, a.p99_ms, e.rps, e.p99_ms
        );
        without_runs.push(b);
        with_runs.push(a);
        everywhere_runs.push(e);
    }
    drop(upstream);

    let rps_without = median(without_runs.iter().map(|r| r.rps).collect());
    let rps_with = median(with_runs.iter().map(|r| r.rps).collect());
    let p99_without = median(without_runs.iter().map(|r| r.p99_ms).collect());
    let p99_with = median(with_runs.iter().map(|r| r.p99_ms).collect());
    let cost = (1.0 - rps_with / rps_without) * 100.0;
    let rps_everywhere = median(everywhere_runs.iter().map(|r| r.rps).collect());
    let cost_everywhere = (1.0 - rps_everywhere / rps_without) * 100.0;
    let p99_delta = p99_with - p99_without;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };

    let _ = writeln!(report, "## Filter cost on pass-through traffic\n");
    let _ = writeln!(
        report,
        "Same `envoy/knocker.yaml` with and without the knocker filter (Envoy `--concurrency 1`), \
         same upstream (`knocker echo`), GET requests without Knocker headers; \
         `wrk -t1 -c{connections} -d{seconds}s --latency`, {rounds} rounds in one run, the order rotating each round.\n"
    );
    let _ = writeln!(
        report,
        "| round | without filter: req/s | p50 ms | p99 ms | knocker.yaml: req/s | p50 ms | p99 ms | filter on every route: req/s | p99 ms |"
    );
    let _ = writeln!(
        report,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    report.push_str(&rows);
    let _ = writeln!(
        report,
        "\nMedians: {rps_without:.0} → {rps_with:.0} req/s (**{cost:.1}%** throughput cost; goal ≤ 5%: {}), \
         p99 {p99_without:.3} → {p99_with:.3} ms (**{p99_delta:+.3} ms**; goal ≤ +0.2 ms: {}).\n",
        verdict(cost <= 5.0),
        verdict(p99_delta <= 0.2)
    );
    let _ = writeln!(
        report,
        "Why `knocker.yaml` routes on `knocker-host` first: the same filter run on every request \
         (a V8 context and its callbacks per stream, even when it only says Continue) costs \
         {cost_everywhere:.1}% here ({rps_without:.0} → {rps_everywhere:.0} req/s). Envoy's router \
         matches the header natively and disables the filter per route for everything else.\n"
    );
}

/// `previous` with each `## ` section of `fresh` put in place of the one with the same
/// heading (or added at the end); `fresh`'s preamble notes the partial run.
fn merge_sections(previous: &str, fresh: &str) -> String {
    fn sections(text: &str) -> (String, Vec<(String, String)>) {
        let mut preamble = String::new();
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.split_inclusive('\n') {
            if line.starts_with("## ") {
                out.push((line.trim().to_owned(), line.to_owned()));
            } else if let Some((_, body)) = out.last_mut() {
                body.push_str(line);
            } else {
                preamble.push_str(line);
            }
        }
        (preamble, out)
    }
    if previous.is_empty() {
        return fresh.to_owned();
    }
    let (preamble, mut old) = sections(previous);
    let (_, new) = sections(fresh);
    for (heading, body) in new {
        let body = format!(
            "{}_This section was measured on its own (`BENCH_ONLY`), after the rest._\n\n{}",
            body.lines()
                .next()
                .map(|l| format!("{l}\n\n"))
                .unwrap_or_default(),
            body.split_once('\n')
                .map_or("", |(_, rest)| rest.trim_start_matches('\n'))
        );
        match old.iter_mut().find(|(h, _)| *h == heading) {
            Some(slot) => slot.1 = body,
            None => old.push((heading, body)),
        }
    }
    let mut out = preamble;
    for (_, body) in old {
        out.push_str(&body);
    }
    out
}

fn main() {
    let mut report = String::new();
    let _ = writeln!(report, "# Benchmarks\n");
    let _ = writeln!(
        report,
        "Written by `make bench` (`tests/src/bin/bench/`); every figure below was measured in the \
         same run, on: {}. The machine is shared and noisy: compare figures side by side within a \
         run, not across runs.\n",
        machine()
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only == name;
    if run("filter") {
        filter_cost(&mut report);
    }
    if run("accept") {
        jobs::acceptance(&mut report, &runtime);
    }
    if run("drain") {
        jobs::drain(&mut report, &runtime);
    }
    if run("signing") {
        jobs::signing(&mut report, &runtime);
    }
    if run("backlog") {
        jobs::backlog(&mut report, &runtime);
    }
    if run("capped") {
        jobs::capped(&mut report, &runtime);
    }
    if run("engines") {
        jobs::engines(&mut report, &runtime);
    }
    if run("cost") {
        cost::cost(&mut report, &runtime);
    }
    if run("modes") {
        cost::modes(&mut report);
    }
    if run("soak") {
        soak::soak(&mut report);
    }
    let path = repo_root().join("docs/benchmarks.md");
    std::fs::create_dir_all(path.parent().expect("docs/")).expect("create docs/");
    if !only.is_empty() {
        // One section: it replaces its own part of the last full report.
        let previous = std::fs::read_to_string(&path).unwrap_or_default();
        report = merge_sections(&previous, &report);
    }
    std::fs::write(&path, &report).expect("write docs/benchmarks.md");
    println!("{report}");
    eprintln!("wrote {}", path.display());
}
