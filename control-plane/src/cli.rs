//! The sub-commands that talk to a running instance over its HTTP API. Every read
//! prints a table (`--output json` prints the API's JSON, for scripts); the options of
//! [`Remote`] are global: before or after the sub-command.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

/// Where the instance is, and how to print what it says.
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
    /// How to print what the instance answers.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// The same as `--output json`.
    #[arg(long, global = true, hide = true)]
    pub json: bool,
}

impl Remote {
    fn json(&self) -> bool {
        self.json || self.output == Output::Json
    }
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
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
    Get { id: String },
    /// Show the broadcast groups and their members now.
    Groups,
}

#[derive(Debug, Subcommand)]
pub enum Monitors {
    /// Every monitor: health, last result, uptime over 24 h / 7 d / 30 d.
    List,
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
        .map_err(|e| anyhow::anyhow!("cannot reach {}: {}", remote.url, chain(&e)))?;
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

/// An error with its causes: "error sending request" alone says nothing.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Rows printed as aligned columns; the last column is not padded, so a long error or
/// URL is shown whole.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        print!("{}", self.render());
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `name: value` lines, the names aligned.
fn fields(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, value) in pairs {
        println!("{name:<width$}  {value}");
    }
}

/// A JSON value as a cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |f| format!("{:.2}%", f * 100.0))
}

/// An attempt as `503 error text` or `200`.
fn attempt_text(a: &Value) -> String {
    match a["error"].as_str() {
        Some(e) => format!("{} {e}", cell(&a["status"])),
        None => cell(&a["status"]),
    }
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
    List,
    /// One target (`host:port` as its jobs' URLs write it).
    Get { target: String },
    /// Send nothing to a target until it is resumed.
    Pause { target: String },
    /// Send to a target again (a paused or open circuit closes).
    Resume { target: String },
}

fn last_error(t: &Value) -> String {
    let last = &t["last_error"];
    if last.is_null() {
        return String::new();
    }
    format!(
        "{} {} {}",
        last["at"].as_str().unwrap_or(""),
        cell(&last["status"]),
        last["error"].as_str().unwrap_or("")
    )
    .trim_end()
    .to_owned()
}

fn target_fields(t: &Value) {
    let mut pairs = vec![
        ("target", cell(&t["target"])),
        ("circuit", cell(&t["circuit"])),
    ];
    for (name, key) in [
        ("since", "since"),
        ("reason", "reason"),
        ("probe at", "probe_at"),
    ] {
        if !t[key].is_null() {
            pairs.push((name, cell(&t[key])));
        }
    }
    pairs.extend([
        ("in flight", cell(&t["in_flight"])),
        ("backlog", cell(&t["backlog"])),
        ("failures in a row", cell(&t["consecutive_failures"])),
        ("rate/s", cell(&t["rate_per_s"])),
        ("burst", cell(&t["burst"])),
        ("slowed until", cell(&t["slowed_until"])),
        ("attempts", cell(&t["attempts"])),
        ("last error", last_error(t)),
    ]);
    fields(&pairs);
}

pub async fn targets(remote: &Remote, command: Targets) -> anyhow::Result<()> {
    use reqwest::Method;
    let one = |t: &str, action: &str| format!("/knocker/targets/{}{action}", encode(t));
    let (method, path) = match &command {
        Targets::List => (Method::GET, "/knocker/targets".to_owned()),
        Targets::Get { target } => (Method::GET, one(target, "")),
        Targets::Pause { target } => (Method::POST, one(target, "/pause")),
        Targets::Resume { target } => (Method::POST, one(target, "/resume")),
    };
    let answer = call(remote, method, &path).await?;
    if remote.json() {
        return print_json(&answer);
    }
    if let Targets::List = command {
        let mut table = Table::new(&[
            "target",
            "circuit",
            "in flight",
            "backlog",
            "rate/s",
            "last error",
        ]);
        for t in answer["targets"].as_array().into_iter().flatten() {
            table.row(vec![
                cell(&t["target"]),
                cell(&t["circuit"]),
                cell(&t["in_flight"]),
                cell(&t["backlog"]),
                cell(&t["rate_per_s"]),
                last_error(t),
            ]);
        }
        table.print();
    } else {
        target_fields(&answer);
    }
    Ok(())
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
    let job_path = |id: &str| format!("/knocker/jobs/{}", encode(id));
    match command {
        Jobs::Get { id } => {
            let job = call(remote, Method::GET, &job_path(&id)).await?;
            if remote.json() {
                return print_json(&job);
            }
            job_fields(&job);
            Ok(())
        }
        Jobs::List {
            state,
            limit,
            after,
        } => {
            let mut path = format!("/knocker/jobs?state={}&limit={limit}", encode(&state));
            if let Some(after) = after {
                path.push_str(&format!("&after={}", encode(&after)));
            }
            let page = call(remote, Method::GET, &path).await?;
            if remote.json() {
                return print_json(&page);
            }
            let mut table = Table::new(&[
                "id",
                "state",
                "attempts",
                "next attempt",
                "url",
                "last attempt",
            ]);
            for job in page["jobs"].as_array().into_iter().flatten() {
                let attempts = job["attempts"].as_array();
                let next = if job["waiting_in_lane"] == true {
                    "in lane".to_owned()
                } else {
                    cell(&job["next_attempt_at"])
                };
                table.row(vec![
                    cell(&job["id"]),
                    cell(&job["state"]),
                    attempts.map_or(0, Vec::len).to_string(),
                    next,
                    cell(&job["url"]),
                    attempts
                        .and_then(|a| a.last())
                        .map_or(String::new(), attempt_text),
                ]);
            }
            table.print();
            if let Some(next) = page["next"].as_str() {
                println!("more: --after {next}");
            }
            Ok(())
        }
        Jobs::Replay { id: Some(id), .. } => {
            let job = call(
                remote,
                Method::POST,
                &format!("/knocker/jobs/{}/replay", encode(&id)),
            )
            .await?;
            if remote.json() {
                return print_json(&job);
            }
            println!(
                "replayed {id}: {}, next attempt {}",
                cell(&job["state"]),
                cell(&job["next_attempt_at"])
            );
            Ok(())
        }
        Jobs::Replay {
            id: None,
            target,
            since,
            until,
            ..
        } => {
            let mut path = "/knocker/jobs/replay?state=failed".to_owned();
            if let Some(target) = &target {
                path.push_str(&format!("&target={}", encode(target)));
            }
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
            if remote.json() {
                return print_json(&serde_json::json!({ "replayed": total }));
            }
            match target {
                Some(target) => println!("replayed {total} failed jobs of {target}"),
                None => println!("replayed {total} failed jobs"),
            }
            Ok(())
        }
        Jobs::Delete { id } => {
            let answer = call(remote, Method::DELETE, &job_path(&id)).await?;
            if remote.json() {
                return print_json(&answer);
            }
            println!("deleted {id}");
            Ok(())
        }
    }
}

fn job_fields(job: &Value) {
    let attempts = job["attempts"].as_array();
    let mut pairs = vec![
        ("id", cell(&job["id"])),
        ("kind", cell(&job["kind"])),
        ("state", cell(&job["state"])),
        (
            "request",
            format!("{} {}", cell(&job["method"]), cell(&job["url"])),
        ),
        ("body", format!("{} bytes", cell(&job["body-length"]))),
        ("created", cell(&job["created_at"])),
        ("attempts", attempts.map_or(0, Vec::len).to_string()),
        ("attempts left", cell(&job["attempts_left"])),
        (
            "next attempt",
            if job["waiting_in_lane"] == true {
                format!("waiting in lane {}", cell(&job["lane"]))
            } else {
                cell(&job["next_attempt_at"])
            },
        ),
        ("expires", cell(&job["expires_at"])),
        ("finished", cell(&job["finished_at"])),
    ];
    if let Some(callback) = job["config"]["callback"].as_str() {
        pairs.push(("callback", callback.to_owned()));
    }
    fields(&pairs);
    if let Some(attempts) = attempts.filter(|a| !a.is_empty()) {
        println!();
        let mut table = Table::new(&["#", "at", "latency", "result"]);
        for (i, a) in attempts.iter().enumerate() {
            table.row(vec![
                (i + 1).to_string(),
                cell(&a["at"]),
                format!("{} ms", cell(&a["latency_ms"])),
                attempt_text(a),
            ]);
        }
        table.print();
    }
}

pub async fn broadcasts(remote: &Remote, command: Broadcasts) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Broadcasts::Get { id } => {
            let b = call(
                remote,
                Method::GET,
                &format!("/knocker/broadcasts/{}", encode(&id)),
            )
            .await?;
            if remote.json() {
                return print_json(&b);
            }
            println!(
                "broadcast {id} to group {}",
                b["group"].as_str().unwrap_or("?")
            );
            let mut table = Table::new(&["member", "state", "attempts", "last", "job"]);
            for m in b["members"].as_array().into_iter().flatten() {
                let state = match (m["state"].as_str(), m["waiting_in_lane"].as_bool()) {
                    (Some("pending"), Some(true)) => "queued",
                    (Some(s), _) => s,
                    (None, _) => "",
                };
                table.row(vec![
                    cell(&m["member"]),
                    state.to_owned(),
                    m["attempts"].as_u64().unwrap_or(0).to_string(),
                    m["last_status"]
                        .as_u64()
                        .map_or(String::new(), |s| s.to_string()),
                    cell(&m["id"]),
                ]);
            }
            table.print();
            Ok(())
        }
        Broadcasts::Groups => {
            let answer = call(remote, Method::GET, "/knocker/groups").await?;
            if remote.json() {
                return print_json(&answer);
            }
            let mut table = Table::new(&["group", "from", "members"]);
            for (name, g) in answer["groups"].as_object().into_iter().flatten() {
                let from = if g["agents"] == true {
                    "agents".to_owned()
                } else if let Some(dns) = g["dns"].as_str() {
                    format!("dns {dns}")
                } else {
                    "list".to_owned()
                };
                let members = match g["error"].as_str() {
                    Some(error) => format!("unavailable: {error}"),
                    None => g["members"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(cell)
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                table.row(vec![name.clone(), from, members]);
            }
            table.print();
            Ok(())
        }
    }
}

pub async fn monitors(remote: &Remote, command: Monitors) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        Monitors::List => {
            let list = call(remote, Method::GET, "/knocker/monitors").await?;
            if remote.json() {
                return print_json(&list);
            }
            let mut table = Table::new(&["name", "health", "24h", "7d", "30d", "url", "last"]);
            for m in list["monitors"].as_array().into_iter().flatten() {
                table.row(vec![
                    cell(&m["name"]),
                    cell(&m["health"]),
                    percent(&m["uptime"]["24h"]),
                    percent(&m["uptime"]["7d"]),
                    percent(&m["uptime"]["30d"]),
                    cell(&m["url"]),
                    check_text(&m["last"]),
                ]);
            }
            table.print();
            Ok(())
        }
        Monitors::Get { name } => {
            let m = call(
                remote,
                Method::GET,
                &format!("/knocker/monitors/{}", encode(&name)),
            )
            .await?;
            if remote.json() {
                return print_json(&m);
            }
            fields(&[
                ("name", cell(&m["name"])),
                ("source", cell(&m["source"])),
                (
                    "check",
                    format!("{} {}", cell(&m["method"]), cell(&m["url"])),
                ),
                ("every", format!("{} s", cell(&m["interval_s"]))),
                ("health", cell(&m["health"])),
                ("failures in a row", cell(&m["failures_in_a_row"])),
                ("uptime 24h", percent(&m["uptime"]["24h"])),
                ("uptime 7d", percent(&m["uptime"]["7d"])),
                ("uptime 30d", percent(&m["uptime"]["30d"])),
                ("last", check_text(&m["last"])),
            ]);
            if let Some(transitions) = m["transitions"].as_array().filter(|t| !t.is_empty()) {
                println!();
                let mut table = Table::new(&["#", "at", "health", "reason"]);
                for t in transitions {
                    table.row(vec![
                        cell(&t["number"]),
                        cell(&t["at"]),
                        cell(&t["health"]),
                        cell(&t["reason"]),
                    ]);
                }
                table.print();
            }
            if let Some(results) = m["results"].as_array().filter(|r| !r.is_empty()) {
                println!();
                let mut table = Table::new(&["at", "result"]);
                for r in results.iter().take(20) {
                    table.row(vec![cell(&r["at"]), check_text(r)]);
                }
                table.print();
                if results.len() > 20 {
                    println!("({} more: --output json)", results.len() - 20);
                }
            }
            Ok(())
        }
    }
}

/// A check as `ok 200 in 3 ms`, or why it failed.
fn check_text(last: &Value) -> String {
    if last.is_null() {
        "no check yet".to_owned()
    } else if last["ok"] == true {
        format!(
            "ok {} in {} ms",
            cell(&last["status"]),
            cell(&last["latency_ms"])
        )
    } else {
        format!(
            "failed: {}",
            last["failed_condition"].as_str().unwrap_or("unknown")
        )
    }
}

pub async fn status(remote: &Remote, status_url: &str) -> anyhow::Result<()> {
    let s = call(remote, reqwest::Method::GET, status_url).await?;
    if remote.json() {
        return print_json(&s);
    }
    let q = &s["queue"];
    fields(&[
        (
            "status",
            if s["status"] == true { "ok" } else { "not ok" }.to_owned(),
        ),
        ("version", cell(&s["version"])),
        ("worker", cell(&s["worker"])),
        ("pending", cell(&q["pending"])),
        ("in flight", cell(&q["in_flight"])),
        ("delivered", cell(&q["delivered"])),
        ("failed", cell(&q["failed"])),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns_and_shows_the_last_one_whole() {
        let mut table = Table::new(&["id", "state", "last attempt"]);
        let error = "502 error sending request for url (http://t/): connection refused";
        table.row(vec!["a".into(), "failed".into(), error.into()]);
        table.row(vec!["long-id".into(), "delivered".into(), "200".into()]);
        assert_eq!(
            table.render(),
            format!(
                "id       state      last attempt\n\
                 a        failed     {error}\n\
                 long-id  delivered  200\n"
            )
        );
    }

    #[test]
    fn cells_and_attempts_read_as_text() {
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&serde_json::json!("x")), "x");
        assert_eq!(cell(&serde_json::json!(3)), "3");
        assert_eq!(
            attempt_text(&serde_json::json!({"status": 502, "error": "refused"})),
            "502 refused"
        );
        assert_eq!(
            attempt_text(&serde_json::json!({"status": 200, "error": null})),
            "200"
        );
        assert_eq!(percent(&serde_json::json!(0.5)), "50.00%");
    }
}
