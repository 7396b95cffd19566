//! The real programs under test, as child processes.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A port for a test's server, free now and kept for this test process alone.
///
/// A port 0 bind, released and bound again later, races other test processes (nextest
/// runs tests side by side): the kernel may hand the same port to another one's port 0
/// bind or outgoing connection meanwhile. So ports come from below the kernel's ephemeral
/// range, which it never hands out, and each is held for this process by a lock on
/// `$TMPDIR/knocker-e2e-ports/<port>` (released by the kernel when the process ends).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = 12_000u32.min(ephemeral.saturating_sub(1024));
    let dir = std::env::temp_dir().join("knocker-e2e-ports");
    if span < 1000 || std::fs::create_dir_all(&dir).is_err() {
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
    }
    let low = ephemeral - span;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let Ok(lock) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if lock.try_lock().is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
            return port;
        }
    }
    panic!("no free port left in {low}..{}", low + span);
}

pub(crate) fn require(path: PathBuf, how: &str) -> PathBuf {
    assert!(path.exists(), "{} is missing: {how}", path.display());
    path
}

/// The built control plane binary.
pub fn knocker_bin() -> PathBuf {
    let path = std::env::var_os("KNOCKER_BIN")
        .map_or_else(|| repo_root().join("target/release/knocker"), PathBuf::from);
    require(path, "run `make build` (make test does it)")
}

pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map_or_else(|| repo_root().join(".tools/venv/bin/envoy"), PathBuf::from);
    require(path, "run `scripts/setup.sh` (make test does it)")
}

pub fn wasm_path() -> PathBuf {
    require(
        repo_root().join("target/wasm/knocker_filter.wasm"),
        "run `make build` (make test does it)",
    )
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "knocker-e2e-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Blocks until `addr` accepts TCP connections or `timeout` passes.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A running `knocker serve`.
pub struct ControlPlane {
    pub http_port: u16,
    pub grpc_port: u16,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ControlPlane {
    /// Starts one with `SCHEME=http` (targets are plain HTTP on loopback) and `env` on top.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut cp = Self {
            http_port: free_port(),
            grpc_port: free_port(),
            dir: temp_dir("cp"),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        cp.spawn();
        cp
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("control plane log");
        let mut command = Command::new(knocker_bin());
        command
            .arg("serve")
            .env("KNOCKER_HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .env("KNOCKER_GRPC_ADDR", format!("127.0.0.1:{}", self.grpc_port))
            .env("KNOCKER_DATA_DIR", self.dir.join("data"))
            .env("SCHEME", "http")
            // Every target of these tests is on loopback, which client-chosen
            // destinations may not reach by default; the security tests set it back.
            .env("KNOCKER_OUTBOUND_ALLOW", "127.0.0.0/8")
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start knocker");
        self.child = Some(child);
        assert!(
            wait_for_port(self.http_port, Duration::from_secs(20))
                && wait_for_port(self.grpc_port, Duration::from_secs(5)),
            "knocker did not start listening; log:\n{}",
            log_tail(&self.log_path())
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("knocker.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        if let Some(status) = wait_exit(&mut child, Duration::from_secs(15)) {
            return status.success();
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the running process.
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Sets (or replaces) an environment variable for the next restart.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How `child` exited, if it did within `within` (it is left running otherwise).
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `knocker serve` with `env` (on loopback ports and a data directory of its own), which
/// must stop it with an error within `within` and without a panic: its standard error.
pub fn start_refused(env: &[(&str, &str)], within: Duration) -> String {
    let mut command = Command::new(knocker_bin());
    command
        .arg("serve")
        .env("KNOCKER_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("KNOCKER_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("KNOCKER_DATA_DIR", temp_dir("cp").join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start knocker");
    let status = wait_exit(&mut child, within);
    if status.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("knocker's output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        status.is_some_and(|s| !s.success()),
        "started with {env:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// What to change in an Envoy file from `envoy/`.
#[derive(Debug, Clone, Default)]
pub struct EnvoyOptions {
    /// Port of the control plane's gRPC and HTTP ingress.
    pub grpc_port: u16,
    pub http_port: u16,
    /// Port of the `upstream` cluster.
    pub upstream_port: u16,
    /// Replaces `per_connection_buffer_limit_bytes` when set.
    pub buffer_limit: Option<u64>,
    /// Replaces the plugin configuration JSON when set.
    pub plugin_config: Option<String>,
    /// Removes the knocker filter, and the retry to the handover listener (the baseline
    /// of the benchmarks).
    pub without_filter: bool,
    /// Runs the filter on every route, as a naive config would (benchmarks only).
    pub filter_on_every_route: bool,
    /// Text replaced on every line (e.g. a rule's target `127.0.0.1:8080`).
    pub replace: Vec<(String, String)>,
    /// The listener's port; a free one when unset.
    pub port: Option<u16>,
    /// Variables of a file that has them (`envoy/sidecar.yaml`, `envoy/gateway.yaml`),
    /// over the ports above; rendered by `scripts/envoy-config.sh`, as users do.
    pub vars: Vec<(String, String)>,
}

/// A running Envoy.
pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

static BASE_ID: AtomicU32 = AtomicU32::new(0);

/// The file's text with the default ports and paths replaced.
pub fn render_envoy_config(
    file: &str,
    options: &EnvoyOptions,
    port: u16,
    admin_port: u16,
) -> String {
    let path = repo_root().join("envoy").join(file);
    let text = std::fs::read_to_string(&path).expect("read envoy config");
    let text = if text.contains("${") {
        render_variables(&path, options, port, admin_port)
    } else {
        text
    };
    let ports: HashMap<u16, u16> = [
        (10000, port),
        (9901, admin_port),
        (9090, options.grpc_port),
        (8000, options.http_port),
        (8080, options.upstream_port),
    ]
    .into_iter()
    .collect();
    let mut out = String::with_capacity(text.len());
    let mut skipping = false;
    let mut drop_lines = 0;
    let mut retry_indent = None;
    for line in text.lines() {
        if options.filter_on_every_route {
            if drop_lines > 0 {
                drop_lines -= 1;
                continue;
            }
            if line.contains("typed_per_filter_config: &skip_knocker") {
                drop_lines = 3; // the anchor's body: filter name, @type, disabled
                continue;
            }
            if line.contains("typed_per_filter_config: *skip_knocker") {
                continue;
            }
        }
        if options.without_filter {
            // Knocker's fallback in `sidecar.yaml` and `gateway.yaml` is Envoy's retry to
            // the handover listener: without Knocker the writes go to the service alone.
            if let Some(indent) = retry_indent {
                if line.len() - line.trim_start().len() > indent {
                    continue;
                }
                retry_indent = None;
            }
            if line.trim_start().starts_with("retry_policy:") {
                retry_indent = Some(line.len() - line.trim_start().len());
                continue;
            }
            if line
                .trim_start()
                .starts_with("- name: envoy.filters.http.wasm")
            {
                skipping = true;
            } else if line.trim_start().starts_with("- name: ") {
                skipping = false;
            }
            if skipping {
                continue;
            }
        }
        let mut line = line.to_owned();
        if options.without_filter && line.contains("cluster: ") {
            line = line.replace("_with_handover", ""); // `app_with_handover` → `app`
        }
        for (from, to) in &ports {
            let needle = format!("port_value: {from} ");
            if line.contains(&needle) {
                line = line.replace(&needle, &format!("port_value: {to} "));
            }
        }
        if let Some(limit) = options.buffer_limit {
            if let Some(i) = line.find("per_connection_buffer_limit_bytes:") {
                line = format!("{}per_connection_buffer_limit_bytes: {limit}", &line[..i]);
            }
        }
        if let Some(config) = &options.plugin_config {
            if line.trim_start().starts_with("value: '{") {
                let indent = &line[..line.len() - line.trim_start().len()];
                line = format!("{indent}value: '{config}'");
            }
        }
        for (from, to) in &options.replace {
            line = line.replace(from.as_str(), to);
        }
        line = line.replace(
            "target/wasm/knocker_filter.wasm",
            &wasm_path().display().to_string(),
        );
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A file with `${NAME:-default}` variables rendered by `scripts/envoy-config.sh`: the
/// listener, admin, control-plane and app ports from `options`, then `options.vars`.
fn render_variables(path: &Path, options: &EnvoyOptions, port: u16, admin_port: u16) -> String {
    let ports = [
        ("KNOCKER_LISTEN_PORT", port),
        ("KNOCKER_ADMIN_PORT", admin_port),
        ("KNOCKER_CONTROL_PLANE_GRPC_PORT", options.grpc_port),
        ("KNOCKER_CONTROL_PLANE_HTTP_PORT", options.http_port),
        ("KNOCKER_APP_PORT", options.upstream_port),
        ("KNOCKER_HANDOVER_PORT", free_port()),
    ];
    let mut command = Command::new(repo_root().join("scripts/envoy-config.sh"));
    command.arg(path).env_clear().env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
    );
    for (name, value) in ports {
        if value != 0 {
            command.env(name, value.to_string());
        }
    }
    for (name, value) in &options.vars {
        command.env(name, value);
    }
    let out = command.output().expect("run scripts/envoy-config.sh");
    assert!(
        out.status.success(),
        "scripts/envoy-config.sh {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("rendered config is UTF-8")
}

impl Envoy {
    pub fn start(file: &str, options: &EnvoyOptions) -> Self {
        let port = options.port.unwrap_or_else(free_port);
        let admin_port = free_port();
        let dir = temp_dir("envoy");
        let config = dir.join("envoy.yaml");
        std::fs::write(
            &config,
            render_envoy_config(file, options, port, admin_port),
        )
        .expect("write envoy config");
        let log = std::fs::File::create(dir.join("envoy.log")).expect("envoy log");
        // Unique base ids let several Envoys run at once (their shared memory is keyed by it).
        let base_id =
            1000 + (std::process::id() % 10_000) * 16 + BASE_ID.fetch_add(1, Ordering::Relaxed);
        let child = Command::new(envoy_bin())
            .args([
                "-c",
                &config.display().to_string(),
                "--concurrency",
                "1",
                "-l",
                // KNOCKER_TEST_ENVOY_LOG=debug (or trace) when a test needs to see inside.
                &std::env::var("KNOCKER_TEST_ENVOY_LOG").unwrap_or_else(|_| "warning".into()),
            ])
            .args(["--base-id", &base_id.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let envoy = Self {
            port,
            admin_port,
            dir,
            child: Some(child),
        };
        let ready = Self::wait_ready(admin_port, Duration::from_secs(30));
        assert!(
            ready,
            "envoy did not become ready; log:\n{}",
            log_tail(&envoy.dir.join("envoy.log"))
        );
        envoy
    }

    fn wait_ready(admin_port: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let answer = admin_get(admin_port, "/ready", Duration::from_secs(1));
            if answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// One counter or gauge from the admin `/stats` (e.g.
    /// `cluster.knocker_control_plane.upstream_rq_total`); `None` when Envoy has none.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let answer = admin_get(
            self.admin_port,
            &format!("/stats?filter=^{name}$"),
            Duration::from_secs(5),
        )?;
        let prefix = format!("{name}: ");
        answer
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A GET on Envoy's admin port (plain HTTP/1.1 over a socket, no client needed): the
/// whole answer, status line included; `None` when it cannot be had.
fn admin_get(admin_port: u16, path: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin_port)).ok()?;
    let _ = s.set_read_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// `envoy --mode validate` on a rendered config; returns Envoy's output on failure.
pub fn validate_envoy_config(file: &str) -> Result<(), String> {
    validate_envoy_config_with(file, &[])
}

/// [`validate_envoy_config`] with variables set (a gateway's certificate, say).
pub fn validate_envoy_config_with(file: &str, vars: &[(&str, &str)]) -> Result<(), String> {
    let dir = temp_dir("validate");
    let options = EnvoyOptions {
        grpc_port: 9090,
        http_port: 8000,
        upstream_port: 8080,
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let path = dir.join(file);
    std::fs::write(&path, render_envoy_config(file, &options, 10000, 9901))
        .map_err(|e| e.to_string())?;
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c", &path.display().to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
