//! A soak under the store's size cap: a sustained job stream, delivery on, into a store
//! capped far below what the stream writes, to show that history makes room (the oldest
//! finished jobs go) and that nothing is refused, the disk and the memory staying flat:
//! the embedded store, then the NATS engine (its finished history capped) on each of the
//! two NATS servers the engines section runs, the server's memory measured too.

use std::fmt::Write as _;
use std::time::Instant;

use knocker_e2e::{ControlPlane, NatsServer};

use crate::cost::disk_bytes;
use crate::jobs::{delivered, knocker_headers, nats_servers, nats_version, rss_mb, settle, status};
use crate::load::{wrk_posts, Posts};
use crate::{env_or, Echo};

/// One window of the soak.
struct Window {
    at_s: f64,
    rps: f64,
    refused: u64,
    disk_mib: f64,
    /// The embedded store's write-ahead log; on NATS, the finished history as the server
    /// counts it.
    part_mib: f64,
    rss_mib: f64,
    /// The NATS server's, on NATS.
    server_rss_mib: Option<f64>,
}

/// What a soak kept: jobs accepted, and what was left after the drain.
struct Soaked {
    windows: Vec<Window>,
    accepted: u64,
    kept: u64,
    failed: u64,
    open: u64,
}

impl Soaked {
    fn refused(&self) -> u64 {
        self.windows.iter().map(|w| w.refused).sum()
    }

    fn removed(&self) -> u64 {
        self.accepted
            .saturating_sub(self.kept + self.open + self.failed)
    }

    fn max_disk(&self) -> f64 {
        self.windows.iter().map(|w| w.disk_mib).fold(0.0, f64::max)
    }

    /// The counts after the drain, and the peak of `files` with `why` it is what it is.
    fn summary(&self, report: &mut String, files: &str, why: &str) {
        let _ = writeln!(
            report,
            "\n{} jobs accepted, {} refused; after the drain {} delivered jobs are kept, {} failed, \
             {} open, so **{}** of the oldest finished jobs were removed to make room. {files} \
             peaked at {:.1} MiB: {why}.\n",
            self.accepted,
            self.refused(),
            self.kept,
            self.failed,
            self.open,
            self.removed(),
            self.max_disk(),
        );
    }

    /// The peak of the NATS server's RSS over the windows, if it was measured.
    fn max_server_rss(&self) -> Option<f64> {
        self.windows
            .iter()
            .filter_map(|w| w.server_rss_mib)
            .reduce(f64::max)
    }

    fn table(&self, report: &mut String, disk: &str, part: &str) {
        let server = self.max_server_rss().is_some();
        let (server_head, server_rule) = if server {
            (" NATS server RSS MiB |", " ---: |")
        } else {
            ("", "")
        };
        let _ = writeln!(
            report,
            "| after s | jobs/s | refused | {disk} MiB | {part} MiB | control plane RSS MiB |{server_head}"
        );
        let _ = writeln!(
            report,
            "| ---: | ---: | ---: | ---: | ---: | ---: |{server_rule}"
        );
        for w in &self.windows {
            let server = w
                .server_rss_mib
                .map_or_else(String::new, |mib| format!(" {mib:.0} |"));
            let _ = writeln!(
                report,
                "| {:.0} | {:.0} | {} | {:.1} | {:.1} | {:.0} |{server}",
                w.at_s, w.rps, w.refused, w.disk_mib, w.part_mib, w.rss_mib
            );
        }
    }
}

/// `wrk -c16` POSTs at `cp` for `seconds` in `window` s windows, `measure` giving the
/// disk and its part after each (MiB), and the RSS of `server` (the NATS server's pid, on
/// NATS); then the drain.
fn run(
    cp: &ControlPlane,
    headers: &[(&str, String)],
    seconds: u64,
    window: u64,
    server: Option<u32>,
    measure: impl Fn() -> (f64, f64),
) -> Soaked {
    let pid = cp.pid().expect("control plane pid");
    let started = Instant::now();
    let (mut accepted, mut windows) = (0u64, Vec::new());
    for _ in 0..seconds.div_ceil(window) {
        let posts = Posts {
            bytes: None,
            // A refusal (503) is counted, not fatal: it is what this section looks for.
            lenient: true,
        };
        let r = wrk_posts(&cp.url("/soak"), window, 16, headers, posts);
        // A lenient run counts refusals among its answered requests.
        accepted += r.requests.saturating_sub(r.errors);
        let (disk_mib, part_mib) = measure();
        windows.push(Window {
            at_s: started.elapsed().as_secs_f64(),
            rps: r.rps,
            refused: r.errors,
            disk_mib,
            part_mib,
            rss_mib: rss_mb(pid),
            server_rss_mib: server.map(rss_mb),
        });
    }
    settle(cp);
    let queue = &status(cp)["queue"];
    Soaked {
        windows,
        accepted,
        kept: delivered(cp),
        failed: queue["failed"].as_u64().unwrap_or(0),
        open: queue["pending"].as_u64().unwrap_or(0) + queue["in_flight"].as_u64().unwrap_or(0),
    }
}

/// The finished history on a NATS server, as it counts it (its monitoring port's `/jsz`):
/// the bytes of the delivered and failed buckets.
fn nats_history_bytes(monitor: u16) -> u64 {
    let url = format!("http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true");
    let jsz: serde_json::Value = reqwest::blocking::get(url)
        .and_then(|r| r.json())
        .unwrap_or_default();
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["name"] == "KV_KNOCKER_DELIVERED" || s["name"] == "KV_KNOCKER_FAILED")
        .filter_map(|s| s["state"]["bytes"].as_u64())
        .sum()
}

/// Bytes of the write-ahead logs under `dir`.
fn wal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with("-wal"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn soak(report: &mut String) {
    let seconds = env_or("BENCH_SOAK_SECONDS", 120);
    let window = env_or("BENCH_SOAK_WINDOW", 10).max(1);
    let cap_mib = env_or("BENCH_SOAK_CAP_MIB", 64);
    let sink = Echo::start();
    let headers = knocker_headers(&sink);
    let cap = (cap_mib * 1024 * 1024).to_string();
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    let cp = ControlPlane::start(&[
        ("LOG_LEVEL", "warning"),
        ("KNOCKER_MAX_STORE_BYTES", cap.as_str()),
    ]);
    let data = cp.dir.join("data");
    let embedded = run(&cp, &headers, seconds, window, None, || {
        (mib(disk_bytes(&data)), mib(wal_bytes(&data)))
    });
    drop(cp);

    // The NATS engine on each server: its finished history capped the same, the server's
    // files and memory measured.
    let on_nats: Vec<(String, Soaked)> = nats_servers()
        .iter()
        .map(|binary| {
            let monitor = knocker_e2e::free_port();
            let nats =
                NatsServer::start_binary_with(binary, &format!("http: \"127.0.0.1:{monitor}\""));
            let cp = ControlPlane::start(&[
                ("LOG_LEVEL", "warning"),
                ("KNOCKER_STORE", nats.url.as_str()),
                ("KNOCKER_MAX_STORE_BYTES", cap.as_str()),
            ]);
            let soaked = run(&cp, &headers, seconds, window, Some(nats.pid()), || {
                (
                    mib(disk_bytes(&nats.store_dir)),
                    mib(nats_history_bytes(monitor)),
                )
            });
            (nats_version(binary.as_os_str()), soaked)
        })
        .collect();

    let _ = writeln!(report, "## Soak under the store's size cap\n");
    let _ = writeln!(
        report,
        "The HTTP door, delivery on into a `knocker echo` sink, `wrk -t1 -c16` POSTs for {seconds} s in \
         {window} s windows, the store capped at `KNOCKER_MAX_STORE_BYTES` = {cap_mib} MiB (a fraction of \
         what the stream writes). Disk is the embedded store's files (database, WAL) at the end of each \
         window; RSS is the control plane's.\n"
    );
    embedded.table(report, "store", "of which WAL");
    embedded.summary(
        report,
        "The store's files",
        "the cap is the database's, its write-ahead log comes on top",
    );
    let _ = writeln!(
        report,
        "The same on the NATS engine, once on each server: Debian's nats-server {} and nats-server {}, \
         the one `deploy/kubernetes/nats` runs (JetStream on loopback, file storage; \
         `KNOCKER_STORE=nats://…`, the same cap, which NATS applies to the finished history: the \
         delivered and failed buckets each hold up to half of it). Disk is the server's store \
         directory (every stream: open jobs, the markers finished jobs leave until retention \
         sweeps them every 10 s, the work stream, the history); history is the two finished \
         buckets as the server counts them; the NATS server's RSS is measured with the control \
         plane's.\n",
        on_nats[0].0,
        on_nats[1].0,
    );
    for (version, soaked) in &on_nats {
        let _ = writeln!(report, "nats-server {version}:\n");
        soaked.table(report, "server's files", "of which history");
        soaked.summary(
            report,
            "The server's files",
            "they grow between retention's rounds (the open-jobs bucket keeps a marker of each \
             finished job until the next one, and the server frees a file block only once all of \
             it is gone) and fall back at each; the history stays at its cap",
        );
        if let Some(peak) = soaked.max_server_rss() {
            let _ = writeln!(
                report,
                "The NATS server's RSS peaked at {peak:.0} MiB \
                 (`deploy/kubernetes/nats/nats.yaml` gives the server a 1 GiB memory limit).\n"
            );
        }
    }
}
