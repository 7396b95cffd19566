//! A soak under the store's size cap: a sustained job stream, delivery on, into a store
//! capped far below what the stream writes, to show that history makes room (the oldest
//! finished jobs go) and that nothing is refused, the disk and the memory staying flat.

use std::fmt::Write as _;
use std::time::Instant;

use knocker_e2e::ControlPlane;

use crate::cost::disk_bytes;
use crate::jobs::{delivered, knocker_headers, rss_mb, settle, status};
use crate::load::{wrk_posts, Posts};
use crate::{env_or, Echo};

/// One window of the soak.
struct Window {
    at_s: f64,
    rps: f64,
    refused: u64,
    disk_mib: f64,
    wal_mib: f64,
    rss_mib: f64,
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
    let cp = ControlPlane::start(&[
        ("LOG_LEVEL", "warning"),
        ("KNOCKER_MAX_STORE_BYTES", cap.as_str()),
    ]);
    let pid = cp.pid().expect("control plane pid");
    let data = cp.dir.join("data");
    let started = Instant::now();
    let (mut accepted, mut windows) = (0u64, Vec::new());
    for _ in 0..seconds.div_ceil(window) {
        let posts = Posts {
            bytes: None,
            // A refusal (503) is counted, not fatal: it is what this section looks for.
            lenient: true,
        };
        let r = wrk_posts(&cp.url("/soak"), window, 16, &headers, posts);
        // A lenient run counts refusals among its answered requests.
        accepted += r.requests.saturating_sub(r.errors);
        windows.push(Window {
            at_s: started.elapsed().as_secs_f64(),
            rps: r.rps,
            refused: r.errors,
            disk_mib: disk_bytes(&data) as f64 / 1048576.0,
            wal_mib: wal_bytes(&data) as f64 / 1048576.0,
            rss_mib: rss_mb(pid),
        });
    }
    settle(&cp);
    let queue = &status(&cp)["queue"];
    let kept = delivered(&cp);
    let open = queue["pending"].as_u64().unwrap_or(0) + queue["in_flight"].as_u64().unwrap_or(0);
    let failed = queue["failed"].as_u64().unwrap_or(0);
    let removed = accepted.saturating_sub(kept + open + failed);
    let refused: u64 = windows.iter().map(|w| w.refused).sum();
    let max_disk = windows.iter().map(|w| w.disk_mib).fold(0.0, f64::max);

    let _ = writeln!(report, "## Soak under the store's size cap\n");
    let _ = writeln!(
        report,
        "The HTTP door, delivery on into a `knocker echo` sink, `wrk -t1 -c16` POSTs for {seconds} s in \
         {window} s windows, the store capped at `KNOCKER_MAX_STORE_BYTES` = {cap_mib} MiB (a fraction of \
         what the stream writes). Disk is the embedded store's files (database, WAL) at the end of each \
         window; RSS is the control plane's.\n"
    );
    let _ = writeln!(
        report,
        "| after s | jobs/s | refused | store MiB | of which WAL MiB | control plane RSS MiB |"
    );
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: | ---: |");
    for w in &windows {
        let _ = writeln!(
            report,
            "| {:.0} | {:.0} | {} | {:.1} | {:.1} | {:.0} |",
            w.at_s, w.rps, w.refused, w.disk_mib, w.wal_mib, w.rss_mib
        );
    }
    let _ = writeln!(
        report,
        "\n{accepted} jobs accepted, {refused} refused; after the drain {kept} delivered jobs are kept, \
         {failed} failed, {open} open, so **{removed}** of the oldest finished jobs were removed to make \
         room. The store's files peaked at {max_disk:.1} MiB: the cap is the database's, its write-ahead log \
         comes on top.\n"
    );
}
