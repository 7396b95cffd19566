//! The sub-commands that talk to a running instance over its HTTP API.

use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the instance is.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the instance's HTTP ingress.
    #[arg(
        long,
        env = "KNOCKER_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub url: String,
    /// Bearer token for every API call (the instance's KNOCKER_ADMIN_TOKEN).
    #[arg(
        long,
        env = "KNOCKER_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true,
        global = true
    )]
    pub token: String,
}

#[derive(Debug, Subcommand)]
pub enum Jobs {
    /// Show one job: state, attempts, next attempt.
    Get { id: String },
    /// List jobs in a state (pending, in_flight, delivered, failed), oldest first.
    List {
        #[arg(long, default_value = "failed")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this job id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Attempt a delivered or failed job again (or, with --all, every failed job; with
    /// --target, every failed job of one target, paced by its rate limit).
    Replay {
        #[arg(required_unless_present_any = ["all", "target"])]
        id: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "target"])]
        all: bool,
        /// Only jobs to this target (`host:port`) …
        #[arg(long, conflicts_with = "id")]
        target: Option<String>,
        /// … that failed at or after this time (RFC 3339) …
        #[arg(long, requires = "target")]
        since: Option<String>,
        /// … and at or before this one.
        #[arg(long, requires = "target")]
        until: Option<String>,
    },
    /// Remove a job.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum Broadcasts {
    /// Show a broadcast: each member, its job and the job's state.
    Get {
        id: String,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the broadcast groups and their members now.
    Groups,
}

#[derive(Debug, Subcommand)]
pub enum Monitors {
    /// Every monitor: health, last result, uptime over 24 h / 7 d / 30 d.
    List {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One monitor: its last results, transitions and definition.
    Get { name: String },
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

async fn call(remote: &Remote, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
    let mut request = client()?.request(
        method,
        format!("{}{path}", remote.url.trim_end_matches('/')),
    );
    if !remote.token.is_empty() {
        request = request.bearer_auth(&remote.token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", remote.url))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let reason = body
            .get("errors")
            .map_or_else(|| body.to_string(), Value::to_string);
        anyhow::bail!("{status}: {reason}");
    }
    Ok(body)
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum Targets {
    /// Every target: circuit, in flight, backlog, rate, last error.
    List {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One target (`host:port` as its jobs' URLs write it).
    Get { target: String },
    /// Send nothing to a target until it is resumed.
    Pause { target: String },
    /// Send to a target again (a paused or open circuit closes).
    Resume { target: String },
}

pub async fn targets(remote: &Remote, command: Targets) -> anyhow::Result<()> {
    use reqwest::Method;
    let one = |t: &str, action: &str| format!("/knocker/targets/{}{action}", encode(t));
    match command {
        Targets::List { json } => {
            let list = call(remote, Method::GET, "/knocker/targets").await?;
            if json {
                return print_json(&list);
            }
            println!(
                "{:<32} {:<8} {:>9} {:>8} {:>8}  last error",
                "target", "circuit", "in flight", "backlog", "rate/s"
            );
            for t in list["targets"].as_array().into_iter().flatten() {
                let last = &t["last_error"];
                let last = if last.is_null() {
                    String::new()
                } else {
                    format!(
                        "{} {} {}",
                        last["at"].as_str().unwrap_or(""),
                        last["status"],
                        last["error"].as_str().unwrap_or("")
                    )
                };
                println!(
                    "{:<32} {:<8} {:>9} {:>8} {:>8}  {}",
                    t["target"].as_str().unwrap_or(""),
                    t["circuit"].as_str().unwrap_or(""),
                    t["in_flight"],
                    t["backlog"]
                        .as_u64()
                        .map_or("-".to_owned(), |b| b.to_string()),
                    t["rate_per_s"]
                        .as_f64()
                        .map_or("-".to_owned(), |r| r.to_string()),
                    last
                );
            }
            Ok(())
        }
        Targets::Get { target } => print_json(&call(remote, Method::GET, &one(&target, "")).await?),
        Targets::Pause { target } => {
            print_json(&call(remote, Method::POST, &one(&target, "/pause")).await?)
        }
        Targets::Resume { target } => {
            print_json(&call(remote, Method::POST, &one(&target, "/resume")).await?)
        }
    }
}

/// `knocker verify`: checks a saved request's Standard Webhooks signature.
#[derive(Debug, Args)]
pub struct Verify {
    /// The receiver's key: `whsec_…` (shared) or `whpk_…` (Ed25519 public); repeat for
    /// several (any that verifies will do).
    #[arg(
        long = "secret",
        env = "KNOCKER_VERIFY_SECRET",
        hide_env_values = true,
        required = true
    )]
    pub secrets: Vec<String>,
    /// How far the signature's timestamp may be from now, in seconds.
    #[arg(long, default_value_t = 300)]
    pub tolerance_s: u64,
    /// Check against this time (Unix seconds) instead of now: an old saved request.
    #[arg(long)]
    pub at: Option<u64>,
    /// The request as received, in HTTP/1.1 form: the request line (optional), the
    /// headers, a blank line, the body as it came; `-` for standard input.
    pub file: std::path::PathBuf,
}

/// Exit status 0 when the request verifies, an error naming why otherwise.
pub fn verify(args: &Verify) -> anyhow::Result<()> {
    use crate::delivery::signing::{self, VerifyKey};
    let raw = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?
    };
    let (headers, body) = split_request(&raw)?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let now = args.at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let mut last = None;
    for (i, secret) in args.secrets.iter().enumerate() {
        let key = VerifyKey::parse(secret, &format!("--secret #{}", i + 1))
            .map_err(|e| anyhow::anyhow!(e.0))?;
        match signing::verify(
            &key,
            header(signing::ID),
            header(signing::TIMESTAMP),
            header(signing::SIGNATURE),
            body,
            now,
            args.tolerance_s,
        ) {
            Ok(entry) => {
                println!(
                    "valid: signature #{} of webhook-signature matches --secret #{} (id {})",
                    entry + 1,
                    i + 1,
                    header(signing::ID).unwrap_or("")
                );
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => anyhow::bail!("not valid: {e}"),
        None => anyhow::bail!("no --secret given"),
    }
}

/// Headers and body of a saved HTTP/1.1 request (CRLF or LF line ends).
/// Header fields by name, in order.
type Fields = Vec<(String, String)>;

fn split_request(raw: &[u8]) -> anyhow::Result<(Fields, &[u8])> {
    let (head, body) = match find(raw, b"\r\n\r\n") {
        Some(i) => (&raw[..i], &raw[i + 4..]),
        None => match find(raw, b"\n\n") {
            Some(i) => (&raw[..i], &raw[i + 2..]),
            None => anyhow::bail!("no blank line between the headers and the body"),
        },
    };
    let head =
        std::str::from_utf8(head).map_err(|_| anyhow::anyhow!("the headers are not text"))?;
    let mut headers = Vec::new();
    for (n, line) in head.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        match line.split_once(':') {
            Some((name, value)) if !name.contains(' ') => {
                headers.push((name.trim().to_owned(), value.trim().to_owned()));
            }
            // The request line (`POST /x HTTP/1.1`).
            _ if n == 0 => {}
            _ => anyhow::bail!("line {} is not a header: {line:?}", n + 1),
        }
    }
    Ok((headers, body))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub async fn jobs(remote: &Remote, command: Jobs) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Jobs::Get { id } => print_json(
            &call(
                remote,
                Method::GET,
                &format!("/knocker/jobs/{}", encode(&id)),
            )
            .await?,
        ),
        Jobs::List {
            state,
            limit,
            after,
            json,
        } => {
            let mut path = format!("/knocker/jobs?state={}&limit={limit}", encode(&state));
            if let Some(after) = after {
                path.push_str(&format!("&after={}", encode(&after)));
            }
            let page = call(remote, Method::GET, &path).await?;
            if json {
                return print_json(&page);
            }
            println!(
                "{:<34} {:<10} {:>8}  {:<24}  url",
                "id", "state", "attempts", "last"
            );
            for job in page["jobs"].as_array().into_iter().flatten() {
                let attempts = job["attempts"].as_array().map_or(0, Vec::len);
                let last =
                    job["attempts"]
                        .as_array()
                        .and_then(|a| a.last())
                        .map_or(String::new(), |a| {
                            format!(
                                "{} {}",
                                a["status"],
                                a["error"].as_str().map_or("", |e| if e.len() > 16 {
                                    &e[..16]
                                } else {
                                    e
                                })
                            )
                        });
                println!(
                    "{:<34} {:<10} {:>8}  {:<24}  {}",
                    job["id"].as_str().unwrap_or(""),
                    job["state"].as_str().unwrap_or(""),
                    attempts,
                    last,
                    job["url"].as_str().unwrap_or("")
                );
            }
            if let Some(next) = page["next"].as_str() {
                println!("more: --after {next}");
            }
            Ok(())
        }
        Jobs::Replay { id: Some(id), .. } => print_json(
            &call(
                remote,
                Method::POST,
                &format!("/knocker/jobs/{}/replay", encode(&id)),
            )
            .await?,
        ),
        Jobs::Replay {
            id: None,
            target: Some(target),
            since,
            until,
            ..
        } => {
            let mut path = format!(
                "/knocker/jobs/replay?state=failed&target={}",
                encode(&target)
            );
            for (name, value) in [("since", since), ("until", until)] {
                if let Some(v) = value {
                    path.push_str(&format!("&{name}={}", encode(&v)));
                }
            }
            let mut total = 0;
            loop {
                let result = call(remote, Method::POST, &path).await?;
                let n = result["replayed"].as_u64().unwrap_or(0);
                total += n;
                if n < crate::api::MAX_PAGE as u64 {
                    break;
                }
            }
            println!("replayed {total} failed jobs of {target}");
            Ok(())
        }
        Jobs::Replay { id: None, .. } => {
            let mut total = 0;
            loop {
                let result =
                    call(remote, Method::POST, "/knocker/jobs/replay?state=failed").await?;
                let n = result["replayed"].as_u64().unwrap_or(0);
                total += n;
                if n < crate::api::MAX_PAGE as u64 {
                    break;
                }
            }
            println!("replayed {total} failed jobs");
            Ok(())
        }
        Jobs::Delete { id } => print_json(
            &call(
                remote,
                Method::DELETE,
                &format!("/knocker/jobs/{}", encode(&id)),
            )
            .await?,
        ),
    }
}

pub async fn broadcasts(remote: &Remote, command: Broadcasts) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Broadcasts::Get { id, json } => {
            let b = call(
                remote,
                Method::GET,
                &format!("/knocker/broadcasts/{}", encode(&id)),
            )
            .await?;
            if json {
                return print_json(&b);
            }
            println!(
                "broadcast {id} to group {}",
                b["group"].as_str().unwrap_or("?")
            );
            println!(
                "{:<40} {:<10} {:>8}  {:<6}  job",
                "member", "state", "attempts", "last"
            );
            for m in b["members"].as_array().into_iter().flatten() {
                let state = match (m["state"].as_str(), m["waiting_in_lane"].as_bool()) {
                    (Some("pending"), Some(true)) => "queued",
                    (Some(s), _) => s,
                    (None, _) => "",
                };
                println!(
                    "{:<40} {:<10} {:>8}  {:<6}  {}",
                    m["member"].as_str().unwrap_or(""),
                    state,
                    m["attempts"].as_u64().unwrap_or(0),
                    m["last_status"]
                        .as_u64()
                        .map_or(String::new(), |s| s.to_string()),
                    m["id"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Broadcasts::Groups => print_json(&call(remote, Method::GET, "/knocker/groups").await?),
    }
}

pub async fn monitors(remote: &Remote, command: Monitors) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Monitors::List { json } => {
            let list = call(remote, Method::GET, "/knocker/monitors").await?;
            if json {
                return print_json(&list);
            }
            let percent = |v: &Value| {
                v.as_f64()
                    .map_or_else(|| "-".to_owned(), |f| format!("{:.2}%", f * 100.0))
            };
            println!(
                "{:<20} {:<6} {:>8} {:>8} {:>8}  {:<40}  url",
                "name", "health", "24h", "7d", "30d", "last"
            );
            for m in list["monitors"].as_array().into_iter().flatten() {
                let last = &m["last"];
                let last = if last.is_null() {
                    "no check yet".to_owned()
                } else if last["ok"] == true {
                    format!("ok {} in {} ms", last["status"], last["latency_ms"])
                } else {
                    last["failed_condition"]
                        .as_str()
                        .unwrap_or("failed")
                        .to_owned()
                };
                let last: String = last.chars().take(40).collect();
                println!(
                    "{:<20} {:<6} {:>8} {:>8} {:>8}  {:<40}  {}",
                    m["name"].as_str().unwrap_or(""),
                    m["health"].as_str().unwrap_or(""),
                    percent(&m["uptime"]["24h"]),
                    percent(&m["uptime"]["7d"]),
                    percent(&m["uptime"]["30d"]),
                    last,
                    m["url"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Monitors::Get { name } => print_json(
            &call(
                remote,
                Method::GET,
                &format!("/knocker/monitors/{}", encode(&name)),
            )
            .await?,
        ),
    }
}

pub async fn status(remote: &Remote, status_url: &str) -> anyhow::Result<()> {
    print_json(&call(remote, reqwest::Method::GET, status_url).await?)
}
