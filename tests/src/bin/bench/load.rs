//! Load generators: wrk (closed loop: how fast can it go) and an open-loop fixed-rate
//! generator (latency at a given rate, free of coordinated omission: each request's
//! latency counts from when it was due, not from when a connection was free).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    /// Requests answered (all 2xx, unless the run was lenient).
    pub requests: u64,
    /// Socket errors and non-2xx answers (0 unless the run was lenient).
    pub errors: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let t = text.trim();
    let (number, factor) = if let Some(n) = t.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// `wrk -t1 -c<connections> -d<seconds>s --latency` GETs, with extra headers; every
/// answer must be 2xx.
pub fn wrk(url: &str, seconds: u64, connections: u64, headers: &[(&str, String)]) -> WrkResult {
    run_wrk(url, seconds, connections, headers, None, false)
}

/// The body of every benchmark POST (wrk's and the open-loop generator's).
pub const POST_BODY: &str = "bench";

/// As [`wrk`], but POSTs with the body [`POST_BODY`] (a wrk script sets method and body).
pub fn wrk_post(
    url: &str,
    seconds: u64,
    connections: u64,
    headers: &[(&str, String)],
) -> WrkResult {
    wrk_posts(url, seconds, connections, headers, Posts::default())
}

/// What the POSTs of [`wrk_posts`] carry, and how errors count.
#[derive(Debug, Clone, Copy, Default)]
pub struct Posts {
    /// A body of this many bytes instead of [`POST_BODY`].
    pub bytes: Option<usize>,
    /// Count errors (timeouts, non-2xx) instead of failing on them: for a reference
    /// that does not keep up (Knocker 1.4.1).
    pub lenient: bool,
}

/// As [`wrk_post`], with the body and error handling of `posts`.
pub fn wrk_posts(
    url: &str,
    seconds: u64,
    connections: u64,
    headers: &[(&str, String)],
    posts: Posts,
) -> WrkResult {
    let body = match posts.bytes {
        Some(bytes) => format!("string.rep(\"x\", {bytes})"),
        None => format!("\"{POST_BODY}\""),
    };
    wrk_post_with(url, seconds, connections, headers, &body, posts.lenient)
}

/// POSTs whose body is the Lua expression `body`.
fn wrk_post_with(
    url: &str,
    seconds: u64,
    connections: u64,
    headers: &[(&str, String)],
    body: &str,
    lenient: bool,
) -> WrkResult {
    static SCRIPTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SCRIPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let script =
        std::env::temp_dir().join(format!("knocker-bench-post-{}-{n}.lua", std::process::id()));
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = {body}\n"),
    )
    .expect("write the wrk script");
    let result = run_wrk(url, seconds, connections, headers, Some(&script), lenient);
    let _ = std::fs::remove_file(&script);
    result
}

fn run_wrk(
    url: &str,
    seconds: u64,
    connections: u64,
    headers: &[(&str, String)],
    script: Option<&std::path::Path>,
    lenient: bool,
) -> WrkResult {
    let mut command = Command::new("wrk");
    command.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    for (name, value) in headers {
        command.args(["-H", &format!("{name}: {value}")]);
    }
    let out = command
        .arg(url)
        .output()
        .expect("run wrk (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut result = WrkResult {
        requests: 0,
        errors: 0,
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
    };
    for line in text.lines() {
        let t = line.trim();
        if let Some((n, _)) = t.split_once(" requests in ") {
            result.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            result.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            result.p50_ms = parse_duration_ms(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            result.p99_ms = parse_duration_ms(v).unwrap_or(0.0);
        }
    }
    assert!(
        result.rps > 0.0,
        "wrk produced no result:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if lenient {
        let numbers = |l: &str| -> u64 {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        };
        result.errors = text
            .lines()
            .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .map(|l| numbers(l.split_once(':').map_or("", |(_, n)| n)))
            .sum();
    } else {
        assert!(errors.is_none(), "wrk saw errors: {errors:?}\n{text}");
    }
    result
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Clone, Copy)]
pub struct RateResult {
    pub sent: usize,
    pub ok: usize,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// What the host did meanwhile (to every process on it).
    pub host: HostCounters,
}

/// What the host did to every process over a run: CPU time the hypervisor gave to others
/// (`steal` in /proc/stat, both cores) and TCP segments sent again (`RetransSegs` in
/// /proc/net/snmp; on loopback, a sign of drops). A stall in a run's latency with steal
/// beside it is the machine's, not the program's.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCounters {
    pub steal_ms: u64,
    pub retransmits: u64,
}

impl HostCounters {
    pub fn now() -> Self {
        // /proc/stat counts in USER_HZ, 100 a second on Linux.
        let steal_ms = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                line.split_whitespace().nth(8)?.parse::<u64>().ok()
            })
            .map_or(0, |ticks| ticks * 10);
        let retransmits = std::fs::read_to_string("/proc/net/snmp")
            .ok()
            .and_then(|s| {
                let mut tcp = s.lines().filter(|l| l.starts_with("Tcp:"));
                let (names, values) = (tcp.next()?, tcp.next()?);
                let at = names.split_whitespace().position(|n| n == "RetransSegs")?;
                values.split_whitespace().nth(at)?.parse().ok()
            })
            .unwrap_or(0);
        Self {
            steal_ms,
            retransmits,
        }
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            steal_ms: self.steal_ms.saturating_sub(earlier.steal_ms),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends `rate` POSTs per second for `seconds` to `url` with `headers`. A pool of
/// keep-alive connections takes the due slots in turn; each request's latency counts
/// from its due time, so a stall shows in the figures instead of slowing the sender.
pub async fn fixed_rate(
    url: &str,
    rate: u64,
    seconds: u64,
    headers: &[(&str, String)],
) -> RateResult {
    const CONNECTIONS: usize = 64;
    let uri: hyper::Uri = url.parse().expect("url");
    let addr = format!(
        "{}:{}",
        uri.host().expect("host"),
        uri.port_u16().unwrap_or(80)
    );
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let total = (rate * seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let headers: Arc<Vec<(String, String)>> = Arc::new(
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect(),
    );
    let host = HostCounters::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (addr, path, next, headers) = (
            addr.clone(),
            path.clone(),
            Arc::clone(&next),
            Arc::clone(&headers),
        );
        workers.spawn(async move {
            let mut results = Vec::new();
            let mut sender = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return results;
                }
                let due = start + period * i as u32;
                tokio::time::sleep_until(due).await;
                if sender.is_none() {
                    sender = connect(&addr).await;
                }
                let ok = match sender.as_mut() {
                    Some(s) => send(s, &path, &headers).await,
                    None => false,
                };
                if !ok {
                    sender = None; // reconnect for the next one
                }
                results.push((
                    (tokio::time::Instant::now() - due).as_secs_f64() * 1000.0,
                    ok,
                ));
            }
        });
    }
    let mut got = Vec::with_capacity(total);
    while let Some(done) = workers.join_next().await {
        got.extend(done.expect("load worker"));
    }
    let elapsed = (tokio::time::Instant::now() - start).as_secs_f64();
    let ok = got.iter().filter(|(_, ok)| *ok).count();
    let mut sorted: Vec<f64> = got.iter().map(|(l, _)| *l).collect();
    sorted.sort_by(f64::total_cmp);
    RateResult {
        sent: total,
        ok,
        achieved_rps: total as f64 / elapsed,
        p50_ms: percentile(&sorted, 0.50),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        host: HostCounters::now().since(host),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn connect(addr: &str) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

async fn send(sender: &mut Sender, path: &str, headers: &[(String, String)]) -> bool {
    use http_body_util::BodyExt as _;
    let mut request = hyper::Request::post(path).header("host", "bench");
    for (n, v) in headers {
        request = request.header(n, v);
    }
    let Ok(request) = request.body(http_body_util::Full::new(bytes::Bytes::from_static(
        POST_BODY.as_bytes(),
    ))) else {
        return false;
    };
    if sender.ready().await.is_err() {
        return false;
    }
    match tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await {
        Ok(Ok(response)) => {
            response.status().is_success() && response.into_body().collect().await.is_ok()
        }
        _ => false,
    }
}

/// Submits exactly `n` jobs with `concurrency` requests in flight; panics on any refusal.
pub async fn submit_n(
    url: &str,
    n: usize,
    concurrency: usize,
    headers: &[(&str, String)],
) -> Duration {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let mut header_map = reqwest::header::HeaderMap::new();
    for (name, v) in headers {
        header_map.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, headers, next) = (
            client.clone(),
            url.to_owned(),
            header_map.clone(),
            Arc::clone(&next),
        );
        tasks.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let response = client
                    .post(&url)
                    .headers(headers.clone())
                    .body("backlog")
                    .send()
                    .await
                    .expect("submit");
                assert!(
                    response.status().is_success(),
                    "submission refused: {}",
                    response.status()
                );
                response.bytes().await.expect("receipt");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("submitter");
    }
    started.elapsed()
}
