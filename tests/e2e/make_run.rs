//! `make run` (scripts/run.sh) as a person uses it: on its fixed ports, so each test runs
//! it in a private network namespace. Ctrl-C (SIGINT to the terminal's process group)
//! stops every component; a component that fails to start ends it, non-zero, with the
//! component's error.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use knocker_e2e::process::wait_exit;
use knocker_e2e::{repo_root, temp_dir};

/// `scripts/run.sh` with `env`, in its own network namespace and process group (as a
/// terminal's foreground job), its output in `log`. SIGINT is reset to its default: a
/// shell that starts with it ignored (a background job) cannot trap it.
fn run_sh(env: &[(&str, &str)], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    let mut command = Command::new("env");
    command
        .args(["--default-signal=INT", "unshare", "-n", "bash", "-c"])
        .arg("ip link set lo up && exec scripts/run.sh")
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("unshare (util-linux) and bash")
}

fn wait_for_line(log: &Path, line: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(line) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("make run ended ({status}) before {line:?}:\n{text}");
        }
        assert!(Instant::now() < deadline, "no {line:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The processes still running in a process group (exited ones waiting for their new
/// parent to reap them are not running).
fn left_in_group(pgid: u32) -> String {
    let out = Command::new("ps")
        .args(["-e", "-o", "pgid=,stat=,pid=,args="])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (group, rest) = l.trim_start().split_once(' ')?;
            let running = group == pgid.to_string() && !rest.trim_start().starts_with('Z');
            running.then(|| format!("{}\n", rest.trim_start()))
        })
        .collect()
}

fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .status();
}

/// Whatever is left of the group is killed when the test ends, passed or not.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(self.0, "-KILL");
    }
}

#[test]
fn one_ctrl_c_stops_make_run_and_everything_it_started() {
    let dir = temp_dir("make-run");
    let log = dir.join("out.log");
    let data = dir.join("data");
    let mut child = run_sh(&[("KNOCKER_DATA_DIR", data.to_str().unwrap())], &log);
    let pgid = child.id();
    let _group = Group(pgid);
    wait_for_line(&log, "Ctrl-C stops everything.", &mut child);
    assert!(
        left_in_group(pgid).contains("envoy"),
        "{}",
        left_in_group(pgid)
    );
    kill_group(pgid, "-INT");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let left = left_in_group(pgid);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "one Ctrl-C ends it:\n{text}"
    );
    assert_eq!(left, "", "nothing it started is left");
}

#[test]
fn make_run_stops_with_the_error_of_a_component_that_cannot_start() {
    let dir = temp_dir("make-run-bad");
    let log = dir.join("out.log");
    let config = dir.join("bad-envoy.yaml");
    std::fs::write(
        &config,
        "static_resources:\n  listeners:\n  - name: x\n    address: {socket_address: {address: 127.0.0.1, port_value: nope}}\n",
    )
    .unwrap();
    let data = dir.join("data");
    let mut child = run_sh(
        &[
            ("KNOCKER_DATA_DIR", data.to_str().unwrap()),
            ("ENVOY_CONFIG", config.to_str().unwrap()),
        ],
        &log,
    );
    let pgid = child.id();
    let _group = Group(pgid);
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let left = left_in_group(pgid);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "it ends:\n{text}");
    assert!(
        text.contains("port_value") && text.contains("'nope'"),
        "Envoy's error:\n{text}"
    );
    assert!(
        text.contains("envoy stopped (exit code 1)"),
        "which component:\n{text}"
    );
    assert_eq!(left, "", "nothing it started is left");
}

/// `make install` puts a working `knocker` where PATH finds it (here under a staging
/// root; the build it installs is the one the suite already made: `-o control-plane`).
#[test]
fn make_install_puts_a_working_knocker_on_the_path() {
    let root = temp_dir("install");
    let out = Command::new("make")
        .args(["-o", "control-plane", "install", "PREFIX=/usr"])
        .arg(format!("DESTDIR={}", root.display()))
        .current_dir(repo_root())
        .output()
        .expect("make");
    assert!(out.status.success(), "{out:?}");
    let bin = root.join("usr/bin");
    let version = Command::new("knocker")
        .arg("--version")
        .env("PATH", &bin)
        .output()
        .expect("knocker on PATH");
    assert!(version.status.success(), "{version:?}");
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("knocker "),
        "{version:?}"
    );
    let uninstall = Command::new("make")
        .args(["uninstall", "PREFIX=/usr"])
        .arg(format!("DESTDIR={}", root.display()))
        .current_dir(repo_root())
        .output()
        .expect("make");
    assert!(uninstall.status.success() && !bin.join("knocker").exists());
}
