//! The control plane's configuration, read and validated once at start-up, then handed
//! out by subsystem: each part goes to the one that uses it, and nothing below this
//! module reads it whole.
//!
//! - [`Settings`] — every flag and environment variable. The Knocker 1.4.1 names
//!   (`SCHEME`, `TIMEOUT`, `RETRIES`, `HOSTS_ONLY`, …) are accepted as they are; our own
//!   settings are prefixed `KNOCKER_`. A value that cannot be parsed stops start-up with
//!   a message naming the variable.
//! - [`file`] — the optional TOML file (`KNOCKER_CONFIG`): groups, monitors, notifiers.
//! - [`Config`] — both, checked together and nested by subsystem ([`Settings::load`]).

pub mod file;
pub mod signing;
pub mod targets;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::broadcast::agents::AgentSettings;
use crate::broadcast::groups::GroupConfig;
use crate::delivery::email::EmailConfig;
use crate::job::spec::Defaults;
use crate::monitor::MonitorConfig;
use crate::notify::NotifierConfig;
use crate::outbound::OutboundPolicy;
use crate::store::nats::{is_nats, NatsAccess, NatsFiles, NatsOptions};
use crate::store::sqlite::Limits;
use crate::store::Engine;
use crate::telemetry::{LogConfig, SentryConfig};
use crate::validate::Invalid;
use file::FileConfig;

/// Why the configuration cannot be used; the text names the variable or the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        Self(e.0)
    }
}

/// The configuration, nested by subsystem.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Both doors' limits and the callers they admit.
    pub doors: crate::ingress::Doors,
    /// What a submission gets for the `Knocker-*` settings it leaves out.
    pub defaults: Defaults,
    /// The status URL's exact path.
    pub status_url: String,
    pub store: Engine,
    /// How long finished jobs are kept.
    pub retention: Duration,
    pub delivery: crate::delivery::DeliveryConfig,
    pub outbound: OutboundConfig,
    pub broadcast: BroadcastConfig,
    pub monitors: MonitorsConfig,
    /// Notifiers by name (the file's `[notifiers.*]`).
    pub notifiers: BTreeMap<String, NotifierConfig>,
    /// Run as a broadcast agent (NATS engine).
    pub agent: Option<AgentSettings>,
    pub log: LogConfig,
    pub sentry: SentryConfig,
    /// Signing secrets, read at start-up (never logged).
    pub signing: std::sync::Arc<crate::delivery::signing::Signing>,
    /// Target health and rate limits.
    pub targets: crate::delivery::targets::TargetSettings,
    /// Notifiers told of `target.paused` / `target.resumed`.
    pub target_notify: Vec<String>,
}

/// How requests leave: the policy client-chosen hops pass (this machine's addresses
/// are added at start), redirects, the DNS server.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub policy: OutboundPolicy,
    pub max_redirects: u32,
    pub dns_server: Option<SocketAddr>,
}

/// Broadcast groups and where DNS groups are resolved.
#[derive(Debug, Clone, Default)]
pub struct BroadcastConfig {
    pub groups: BTreeMap<String, GroupConfig>,
    pub dns_server: Option<SocketAddr>,
}

/// Monitors: those of the file, the history kept, what the API may make.
#[derive(Debug, Clone)]
pub struct MonitorsConfig {
    pub from_file: BTreeMap<String, MonitorConfig>,
    pub history: usize,
    pub api: crate::monitor::ApiLimits,
}

impl Config {
    /// The SMTP settings of the email notifiers, by name (what the email transport needs).
    pub fn mail_servers(&self) -> BTreeMap<String, EmailConfig> {
        self.notifiers
            .iter()
            .filter_map(|(name, n)| Some((name.clone(), n.email.clone()?)))
            .collect()
    }
}

/// Settings of `knocker serve`.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// HTTP ingress: the Knocker protocol without Envoy, the status URL and the API.
    #[arg(
        long = "http-addr",
        env = "KNOCKER_HTTP_ADDR",
        value_name = "KNOCKER_HTTP_ADDR",
        default_value = "127.0.0.1:8000"
    )]
    pub http_addr: SocketAddr,

    /// gRPC ingress the Envoy filter calls (cluster `knocker_control_plane`).
    #[arg(
        long = "grpc-addr",
        env = "KNOCKER_GRPC_ADDR",
        value_name = "KNOCKER_GRPC_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub grpc_addr: SocketAddr,

    /// Largest request body accepted by either ingress (bytes); larger gets 413.
    #[arg(long, env = "KNOCKER_MAX_BODY_BYTES", value_name = "KNOCKER_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Deliveries in flight at once, across all targets.
    #[arg(long, env = "KNOCKER_CONCURRENCY", value_name = "KNOCKER_CONCURRENCY", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,

    /// Threads that run the control plane's tasks (the doors, delivery, the API). Default:
    /// one fewer than the CPUs the process may use (its cgroup's quota counts), at least
    /// one; see [`Settings::worker_threads`].
    #[arg(long, env = "KNOCKER_WORKER_THREADS", value_name = "KNOCKER_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// Default target scheme when `Knocker-Scheme` is absent.
    #[arg(long, env = "SCHEME", value_name = "SCHEME", default_value = "https", value_parser = parse_scheme)]
    pub scheme: String,

    /// Redirects followed per attempt.
    #[arg(long, env = "MAX_REDIRECTS", value_name = "MAX_REDIRECTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_redirects: u32,

    /// Exact path of the status URL (any method).
    #[arg(long, env = "STATUS_URL", value_name = "STATUS_URL", default_value = "/knocker/status", value_parser = parse_path)]
    pub status_url: String,

    /// Allowed target hosts: a JSON array or a comma-separated list; empty allows all.
    #[arg(long, env = "HOSTS_ONLY", value_name = "HOSTS_ONLY", default_value = "", value_parser = parse_hosts_only)]
    pub hosts_only: HostsOnly,

    /// Default per-attempt timeout (seconds).
    #[arg(long, env = "TIMEOUT", value_name = "TIMEOUT", default_value_t = 10.0, value_parser = seconds_up_to_an_hour)]
    pub timeout: f64,
    /// Largest `Knocker-Timeout` accepted (seconds, at most 3600).
    #[arg(long, env = "TIMEOUT_MAX", value_name = "TIMEOUT_MAX", default_value_t = 60.0, value_parser = seconds_up_to_an_hour)]
    pub timeout_max: f64,

    /// Default number of retries after the first attempt.
    #[arg(long, env = "RETRIES", value_name = "RETRIES", default_value_t = 2)]
    pub retries: u32,
    /// Largest `Knocker-Retries` accepted.
    #[arg(long, env = "RETRIES_MAX", value_name = "RETRIES_MAX", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub retries_max: u32,

    /// Default backoff factor (seconds).
    #[arg(long, env = "RETRIES_BACKOFF_FACTOR", value_name = "RETRIES_BACKOFF_FACTOR", default_value_t = 0.5, value_parser = seconds_up_to_a_day)]
    pub backoff_factor: f64,
    /// Largest `Knocker-Backoff-Factor` accepted; also caps every delay (seconds, at
    /// most 86400).
    #[arg(long, env = "RETRIES_BACKOFF_FACTOR_MAX", value_name = "RETRIES_BACKOFF_FACTOR_MAX", default_value_t = 600.0, value_parser = seconds_up_to_a_day)]
    pub backoff_factor_max: f64,

    /// Where jobs are kept.
    #[arg(
        long,
        env = "KNOCKER_DATA_DIR",
        value_name = "KNOCKER_DATA_DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,

    /// Job store: `sqlite` (embedded, durable), `nats://host:port` or `tls://host:port`
    /// (NATS JetStream, shared by every control plane on it; `user:password@` or `token@`
    /// before the host to log in, commas between the servers of a cluster) or `memory`
    /// (not durable; tests only).
    #[arg(long, env = "KNOCKER_STORE", value_name = "KNOCKER_STORE", default_value = "sqlite", value_parser = trimmed, hide_env_values = true)]
    pub store: String,

    /// NATS: a user's credentials file (JWT and NKey seed), for a server run with NATS
    /// accounts.
    #[arg(long, env = "KNOCKER_NATS_CREDS", value_name = "KNOCKER_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// NATS: a file holding an NKey seed, for a server that lists its users by NKey.
    #[arg(long, env = "KNOCKER_NATS_NKEY", value_name = "KNOCKER_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,

    /// NATS: the certificate authority (PEM) the server's certificate must chain to,
    /// instead of the system's trust store. Makes TLS required.
    #[arg(long, env = "KNOCKER_NATS_CA", value_name = "KNOCKER_NATS_CA")]
    pub nats_ca: Option<PathBuf>,

    /// NATS: this control plane's certificate (PEM), for a server that verifies its
    /// clients (mutual TLS); with `KNOCKER_NATS_KEY`. Makes TLS required.
    #[arg(long, env = "KNOCKER_NATS_CERT", value_name = "KNOCKER_NATS_CERT")]
    pub nats_cert: Option<PathBuf>,

    /// NATS: the private key (PEM) of `KNOCKER_NATS_CERT`.
    #[arg(long, env = "KNOCKER_NATS_KEY", value_name = "KNOCKER_NATS_KEY")]
    pub nats_key: Option<PathBuf>,

    /// NATS engine: how long a claimed job may go without word from its control plane
    /// before another one gets it (e.g. `30s`).
    #[arg(long, env = "KNOCKER_NATS_ACK_WAIT", value_name = "KNOCKER_NATS_ACK_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub nats_ack_wait: std::time::Duration,

    /// Pending + in-flight jobs above which submissions get 503 (back-pressure).
    #[arg(
        long,
        env = "KNOCKER_MAX_PENDING",
        value_name = "KNOCKER_MAX_PENDING",
        default_value_t = 10_000_000
    )]
    pub max_pending: u64,

    /// Size cap of the job database: bytes, `0` for none, or `auto` (the database plus
    /// half the free space of its file system at start). At the cap the oldest finished
    /// jobs make room; submissions get 503 only when jobs still to deliver fill it. On
    /// NATS, the cap of the finished history (`auto`: half the account's storage limit,
    /// else 1 GiB), its oldest jobs making room.
    #[arg(
        long,
        env = "KNOCKER_MAX_STORE_BYTES",
        value_name = "KNOCKER_MAX_STORE_BYTES",
        default_value = "auto",
        value_parser = parse_store_cap
    )]
    pub max_store_bytes: u64,

    /// How long delivered and failed jobs are kept (e.g. `7d`, `12h`, `30m`).
    #[arg(long, env = "KNOCKER_RETENTION", value_name = "KNOCKER_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: std::time::Duration,

    /// Attempts in flight at once to one target host.
    #[arg(long, env = "KNOCKER_HOST_CONCURRENCY", value_name = "KNOCKER_HOST_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub host_concurrency: u32,

    /// `on`, or `off` to accept and store jobs without delivering them (maintenance,
    /// benchmarks of acceptance alone). Jobs wait until delivery is on again.
    #[arg(long, env = "KNOCKER_DELIVERY", value_name = "KNOCKER_DELIVERY", default_value = "on", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub delivery: bool,

    /// Bearer token every `/knocker/*` API call needs (the status URL excepted); empty:
    /// none, which is refused on a non-loopback address unless
    /// `KNOCKER_INSECURE_NO_TOKEN` says so.
    #[arg(
        long,
        env = "KNOCKER_ADMIN_TOKEN",
        value_name = "KNOCKER_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub admin_token: String,

    /// Shared secret the Envoy filter sends on the gRPC door (`grpc_token` in its plugin
    /// config); a call without it gets UNAUTHENTICATED. Empty: none, which is refused
    /// on a non-loopback address unless `KNOCKER_INSECURE_NO_TOKEN` says so.
    #[arg(
        long,
        env = "KNOCKER_GRPC_TOKEN",
        value_name = "KNOCKER_GRPC_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub grpc_token: String,

    /// Listen on non-loopback addresses without KNOCKER_ADMIN_TOKEN / KNOCKER_GRPC_TOKEN
    /// (the network in front is trusted to keep callers out).
    #[arg(long, env = "KNOCKER_INSECURE_NO_TOKEN", value_name = "KNOCKER_INSECURE_NO_TOKEN", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub insecure_no_token: bool,

    /// Address ranges client-chosen destinations may reach although the defaults deny
    /// them (loopback, link-local…): `127.0.0.0/8, ::1`.
    #[arg(long, env = "KNOCKER_OUTBOUND_ALLOW", value_name = "KNOCKER_OUTBOUND_ALLOW", default_value = "", value_parser = parse_cidr_list)]
    pub outbound_allow: Cidrs,
    /// Address ranges client-chosen destinations may never reach, on top of the
    /// defaults (e.g. your private network: `10.0.0.0/8`).
    #[arg(long, env = "KNOCKER_OUTBOUND_DENY", value_name = "KNOCKER_OUTBOUND_DENY", default_value = "", value_parser = parse_cidr_list)]
    pub outbound_deny: Cidrs,
    /// Ports of this stack that client-chosen destinations never reach on this machine,
    /// besides the control plane's own (Envoy's admin port by default).
    #[arg(long, env = "KNOCKER_PROTECTED_PORTS", value_name = "KNOCKER_PROTECTED_PORTS", default_value = "9901", value_parser = parse_port_list)]
    pub protected_ports: Ports,

    /// Both doors: a connection whose request headers take longer is closed; an idle
    /// keep-alive connection too.
    #[arg(long, env = "KNOCKER_HEADER_TIMEOUT", value_name = "KNOCKER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub header_timeout: std::time::Duration,
    /// A request body that takes longer to arrive gets 408.
    #[arg(long, env = "KNOCKER_BODY_TIMEOUT", value_name = "KNOCKER_BODY_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub body_timeout: std::time::Duration,
    /// A connection that sends nothing this long is closed (the gRPC door pings its
    /// peers more often, so a live filter connection never is).
    #[arg(long, env = "KNOCKER_IDLE_TIMEOUT", value_name = "KNOCKER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub idle_timeout: std::time::Duration,
    /// Connections open at once per door; more are closed as they arrive.
    #[arg(long, env = "KNOCKER_MAX_CONNECTIONS", value_name = "KNOCKER_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Shortest interval (seconds) between checks of a monitor made through the API.
    #[arg(long, env = "KNOCKER_MONITOR_MIN_INTERVAL", value_name = "KNOCKER_MONITOR_MIN_INTERVAL", default_value_t = 5.0, value_parser = seconds_up_to_a_day)]
    pub monitor_min_interval: f64,

    /// Monitors made through the API, at most.
    #[arg(long, env = "KNOCKER_MAX_MONITORS", value_name = "KNOCKER_MAX_MONITORS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_monitors: u32,

    /// Signing secrets for the operator's destinations without their own (`whsec_…`
    /// or `whsk_…`, space-separated; the first signs alongside the others, so a new one
    /// is added before the old one is removed). More in the file's `[signing]`.
    #[arg(
        long,
        env = "KNOCKER_SIGNING_SECRETS",
        value_name = "KNOCKER_SIGNING_SECRETS",
        hide_env_values = true
    )]
    pub signing_secrets: Option<String>,

    /// A TOML file with broadcast groups, monitors and notifiers (see `config::file`);
    /// none by default.
    #[arg(long = "config", env = "KNOCKER_CONFIG", value_name = "KNOCKER_CONFIG")]
    pub config_file: Option<PathBuf>,

    /// Run as a broadcast agent of this group (NATS engine): replay its broadcasts to
    /// `KNOCKER_AGENT_ENDPOINT`.
    #[arg(long, env = "KNOCKER_AGENT_GROUP", value_name = "KNOCKER_AGENT_GROUP")]
    pub agent_group: Option<String>,
    /// The agent's local endpoint: a base URL that broadcast paths are appended to.
    #[arg(
        long,
        env = "KNOCKER_AGENT_ENDPOINT",
        value_name = "KNOCKER_AGENT_ENDPOINT"
    )]
    pub agent_endpoint: Option<String>,
    /// The agent's name, stable across restarts (its subscription keeps its place);
    /// by default the host name and the endpoint.
    #[arg(long, env = "KNOCKER_AGENT_NAME", value_name = "KNOCKER_AGENT_NAME")]
    pub agent_name: Option<String>,
    /// An agent gone this long loses its subscription (and what it missed).
    #[arg(long, env = "KNOCKER_AGENT_EXPIRY", value_name = "KNOCKER_AGENT_EXPIRY", default_value = "24h", value_parser = parse_duration)]
    pub agent_expiry: std::time::Duration,

    /// Results kept per monitor (the history the API shows).
    #[arg(long, env = "KNOCKER_MONITOR_HISTORY", value_name = "KNOCKER_MONITOR_HISTORY", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub monitor_history: u32,

    /// DNS server (`ip:port`) for the members of DNS broadcast groups and the names of
    /// outbound requests; the system's resolver (`/etc/hosts`, `/etc/resolv.conf`) when
    /// unset.
    #[arg(long, env = "KNOCKER_DNS_SERVER", value_name = "KNOCKER_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Log destination: `-` for stderr, else a file appended to.
    #[arg(long, env = "LOG_FILE", value_name = "LOG_FILE", default_value = "-")]
    pub log_file: String,
    /// Log level: error, warning, info, debug, trace (any case).
    #[arg(long, env = "LOG_LEVEL", value_name = "LOG_LEVEL", default_value = "INFO", value_parser = parse_log_level)]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], ignore_case = true)]
    pub log_format: String,

    /// Report errors to Sentry at this DSN.
    #[arg(
        long,
        env = "SENTRY_DSN",
        value_name = "SENTRY_DSN",
        default_value = ""
    )]
    pub sentry_dsn: String,
    /// Also report jobs that finally failed to Sentry.
    #[arg(long, env = "SENTRY_FAILED_REQUESTS", value_name = "SENTRY_FAILED_REQUESTS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub sentry_failed_requests: bool,
}

pub use crate::hosts_only::HostsOnly;

impl Settings {
    /// How many threads run the control plane's tasks: `KNOCKER_WORKER_THREADS`, or one
    /// fewer than the CPUs, at least one.
    ///
    /// The rest is not idle: the embedded store's writer thread commits beside the
    /// workers, and a control plane shares its machine with Envoy and the kernel's
    /// network work. A worker per CPU (tokio's default) also makes the workers wake each
    /// other to steal tasks whenever one gets work. On 2 CPUs, one worker instead of two
    /// took the control plane's CPU per job from 49 to 43 µs through Envoy and from 54
    /// to 48 µs on the HTTP door, delivery on, with the job rates up 13% and 15%
    /// (`wrk -c50`, two alternating rounds each); a drain of 100,000 jobs ran as fast.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.map_or_else(
            || {
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get().saturating_sub(1))
                    .max(1)
            },
            usize::from,
        )
    }

    /// Checks the settings together, reads the file, and nests the result by subsystem.
    pub fn load(self) -> Result<Config, ConfigError> {
        self.validate()?;
        let file = match &self.config_file {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        self.nested(file)
    }

    /// [`Settings::load`] with the file already read.
    pub fn nest(self, file: FileConfig) -> Result<Config, ConfigError> {
        self.validate()?;
        self.nested(file)
    }

    /// The settings (validated) and the file, by subsystem.
    fn nested(self, file: FileConfig) -> Result<Config, ConfigError> {
        let store = match self.store.as_str() {
            store if is_nats(store) => Engine::Nats(NatsOptions {
                server: NatsAccess::new(store, self.nats_files()).map_err(ConfigError)?,
                max_pending: self.max_pending,
                retention: self.retention,
                max_history_bytes: self.max_store_bytes,
                ack_wait: self.nats_ack_wait,
            }),
            "memory" => Engine::Memory,
            _ => Engine::Sqlite {
                dir: self.data_dir.clone(),
                limits: Limits {
                    max_pending: self.max_pending,
                    max_bytes: self.max_store_bytes,
                },
            },
        };
        if !matches!(store, Engine::Nats(_)) {
            if let Some((name, _)) = file.groups.iter().find(|(_, g)| g.agents) {
                return Err(ConfigError(format!(
                    "groups.{name}.agents: agent groups need KNOCKER_STORE=nats://host:port"
                )));
            }
        }
        let agent = match (&self.agent_group, &self.agent_endpoint) {
            (Some(group), Some(endpoint)) => Some(AgentSettings {
                group: group.clone(),
                endpoint: endpoint.clone(),
                name: self
                    .agent_name
                    .clone()
                    .unwrap_or_else(|| default_agent_name(endpoint)),
                expiry: self.agent_expiry,
                ack_wait: self.nats_ack_wait,
            }),
            _ => None,
        };
        let signing = file
            .signing
            .load(self.signing_secrets.as_deref(), |n| std::env::var(n).ok())?;
        let targets = file.targets.settings(&|n| file.notifiers.contains_key(n))?;
        Ok(Config {
            http_addr: self.http_addr,
            grpc_addr: self.grpc_addr,
            doors: crate::ingress::Doors {
                max_body_bytes: self.max_body_bytes,
                header_timeout: self.header_timeout,
                body_timeout: self.body_timeout,
                idle_timeout: self.idle_timeout,
                max_connections: self.max_connections as usize,
                admin_token: self.admin_token.clone(),
                grpc_token: self.grpc_token.clone(),
            },
            defaults: self.protocol_defaults(),
            status_url: self.status_url.clone(),
            store,
            retention: self.retention,
            delivery: crate::delivery::DeliveryConfig {
                enabled: self.delivery,
                concurrency: self.concurrency as usize,
                host_concurrency: self.host_concurrency as usize,
                backoff_cap_s: self.backoff_factor_max,
            },
            outbound: OutboundConfig {
                policy: self.outbound_policy(Vec::new()),
                max_redirects: self.max_redirects,
                dns_server: self.dns_server,
            },
            broadcast: BroadcastConfig {
                groups: file.groups,
                dns_server: self.dns_server,
            },
            monitors: MonitorsConfig {
                from_file: file.monitors,
                history: self.monitor_history as usize,
                api: crate::monitor::ApiLimits {
                    max_monitors: self.max_monitors as usize,
                    min_interval_s: self
                        .monitor_min_interval
                        .max(crate::monitor::MIN_INTERVAL_S),
                },
            },
            notifiers: file.notifiers,
            agent,
            log: LogConfig {
                file: self.log_file,
                level: self.log_level,
                json: self.log_format.eq_ignore_ascii_case("json"),
            },
            sentry: SentryConfig {
                dsn: self.sentry_dsn,
                report_failed_jobs: self.sentry_failed_requests,
            },
            signing: std::sync::Arc::new(signing),
            targets,
            target_notify: file.targets.notify,
        })
    }

    /// The protocol's defaults and maxima (`SCHEME`, `TIMEOUT`, `RETRIES`, …).
    pub fn protocol_defaults(&self) -> Defaults {
        Defaults {
            scheme: self.scheme.clone(),
            hosts_only: self.hosts_only.clone(),
            timeout: self.timeout,
            timeout_max: self.timeout_max,
            retries: self.retries,
            retries_max: self.retries_max,
            backoff_factor: self.backoff_factor,
            backoff_factor_max: self.backoff_factor_max,
        }
    }

    /// The NATS connection's login and TLS files.
    fn nats_files(&self) -> NatsFiles {
        NatsFiles {
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            ca: self.nats_ca.clone(),
            cert: self.nats_cert.clone(),
            key: self.nats_key.clone(),
        }
    }

    /// Cross-field checks that single-value parsers cannot make.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout > self.timeout_max {
            return Err(ConfigError(format!(
                "TIMEOUT ({}) must not exceed TIMEOUT_MAX ({})",
                self.timeout, self.timeout_max
            )));
        }
        if self.retries > self.retries_max {
            return Err(ConfigError(format!(
                "RETRIES ({}) must not exceed RETRIES_MAX ({})",
                self.retries, self.retries_max
            )));
        }
        if self.backoff_factor > self.backoff_factor_max {
            return Err(ConfigError(format!(
                "RETRIES_BACKOFF_FACTOR ({}) must not exceed RETRIES_BACKOFF_FACTOR_MAX ({})",
                self.backoff_factor, self.backoff_factor_max
            )));
        }
        if !self.insecure_no_token {
            for (addr, token, var) in [
                (self.http_addr, &self.admin_token, "KNOCKER_ADMIN_TOKEN"),
                (self.grpc_addr, &self.grpc_token, "KNOCKER_GRPC_TOKEN"),
            ] {
                if !addr.ip().is_loopback() && token.is_empty() {
                    return Err(ConfigError(format!(
                        "{var} is empty but {addr} is not a loopback address: anyone who reaches it \
                         could use it. Set {var}, or KNOCKER_INSECURE_NO_TOKEN=true if the network \
                         in front keeps callers out"
                    )));
                }
            }
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "KNOCKER_MAX_BODY_BYTES must be greater than 0",
            ));
        }
        if self.agent_group.is_some() != self.agent_endpoint.is_some() {
            return Err(ConfigError::new(
                "KNOCKER_AGENT_GROUP and KNOCKER_AGENT_ENDPOINT go together",
            ));
        }
        parse_store(&self.store)?;
        if !is_nats(&self.store) {
            let files = self.nats_files();
            for (var, set) in [
                ("KNOCKER_NATS_CREDS", &files.creds),
                ("KNOCKER_NATS_NKEY", &files.nkey),
                ("KNOCKER_NATS_CA", &files.ca),
                ("KNOCKER_NATS_CERT", &files.cert),
                ("KNOCKER_NATS_KEY", &files.key),
            ] {
                if set.is_some() {
                    return Err(ConfigError(format!(
                        "{var} is for a NATS server, but KNOCKER_STORE is `{}`",
                        self.store
                    )));
                }
            }
        }
        if self.agent_group.is_some() && !is_nats(&self.store) {
            return Err(ConfigError::new(
                "KNOCKER_AGENT_GROUP needs KNOCKER_STORE=nats://host:port",
            ));
        }
        if let Some(endpoint) = &self.agent_endpoint {
            if !crate::job::spec::is_http_base_url(endpoint) {
                return Err(ConfigError(format!(
                    "KNOCKER_AGENT_ENDPOINT `{endpoint}` is not an http:// or https:// base URL"
                )));
            }
        }
        for (var, value) in [
            ("KNOCKER_AGENT_GROUP", &self.agent_group),
            ("KNOCKER_AGENT_NAME", &self.agent_name),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| !crate::monitor::valid_name(v))
            {
                return Err(ConfigError(format!(
                    "{var}: use 1 to 64 letters, digits, `-` and `_`"
                )));
            }
        }
        Ok(())
    }

    /// The outbound policy for client-chosen destinations: the operator's ranges, and
    /// the ports of this stack (the control plane's own among them).
    pub fn outbound_policy(&self, local: Vec<std::net::IpAddr>) -> OutboundPolicy {
        let mut protected_ports = self.protected_ports.0.clone();
        protected_ports.extend([self.http_addr.port(), self.grpc_addr.port()]);
        protected_ports.retain(|p| *p != 0);
        protected_ports.sort_unstable();
        protected_ports.dedup();
        OutboundPolicy {
            hosts_only: self.hosts_only.clone(),
            allow: self.outbound_allow.0.clone(),
            deny: self.outbound_deny.0.clone(),
            protected_ports,
            local,
        }
    }

    /// Settings as `knocker serve` with no flags would have them, for tests and embedding.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        // An empty command line: the defaults, plus whatever the environment sets (tests
        // that need other values set the fields directly rather than the environment).
        <Wrapper as clap::Parser>::parse_from(["knocker"]).settings
    }
}

/// An agent's name when none is given: the host name and the endpoint's port, kept as
/// letters, digits and `-`.
fn default_agent_name(endpoint: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "agent".into());
    let port = endpoint
        .rsplit(':')
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    format!("{}-{port}", host.trim())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect()
}

/// Booleans as people write them: true/false/1/0/yes/no/on/off, any case.
pub fn parse_bool(s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError(format!(
            "`{s}` is not a boolean (true/false/1/0/yes/no/on/off)"
        ))),
    }
}

/// `auto` or a number of bytes (0: no cap).
fn parse_store_cap(s: &str) -> Result<u64, ConfigError> {
    match s.trim() {
        "auto" => Ok(crate::store::AUTO_CAP),
        n => n
            .parse::<u64>()
            .ok()
            .filter(|&n| n != crate::store::AUTO_CAP)
            .ok_or_else(|| {
                ConfigError(format!(
                    "`{s}` is not a size in bytes (or `auto`, or 0 for none)"
                ))
            }),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, ConfigError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| ConfigError(format!("`{s}` is not a duration like 7d, 12h, 30m: {e}")))
}

/// Address ranges (a `Vec` wrapped so clap takes the whole list as one value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<ipnet::IpNet>);
fn parse_cidr_list(s: &str) -> Result<Cidrs, ConfigError> {
    Ok(Cidrs(crate::outbound::parse_cidrs(s)?))
}
/// Ports, taken as one value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);
fn parse_port_list(s: &str) -> Result<Ports, ConfigError> {
    Ok(Ports(crate::outbound::parse_ports(s)?))
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, ConfigError> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > std::time::Duration::from_secs(86_400) {
        return Err(ConfigError(format!(
            "`{s}` must be more than 0 and at most a day"
        )));
    }
    Ok(d)
}

fn seconds_up_to_an_hour(s: &str) -> Result<f64, ConfigError> {
    seconds_up_to(s, 3600.0)
}

fn seconds_up_to_a_day(s: &str) -> Result<f64, ConfigError> {
    seconds_up_to(s, 86_400.0)
}

fn seconds_up_to(s: &str, max: f64) -> Result<f64, ConfigError> {
    let v = non_negative_float(s)?;
    if v > max {
        return Err(ConfigError(format!("`{s}` must be at most {max} seconds")));
    }
    Ok(v)
}

fn non_negative_float(s: &str) -> Result<f64, ConfigError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| ConfigError(format!("`{s}` is not a number")))?;
    if !v.is_finite() || v < 0.0 {
        return Err(ConfigError(format!("`{s}` must be a finite number ≥ 0")));
    }
    Ok(v)
}

/// A value as given, less the white space around it; checked in [`Settings::validate`]
/// (a parser's error would quote the value, credentials included).
fn trimmed(s: &str) -> Result<String, ConfigError> {
    Ok(s.trim().to_owned())
}

/// `sqlite`, `memory`, or a NATS server's address (checked whole; the TLS files are
/// checked with the rest of the settings). The error shows no credentials.
fn parse_store(s: &str) -> Result<String, ConfigError> {
    let t = s.trim();
    if t == "sqlite" || t == "memory" {
        return Ok(t.to_owned());
    }
    if is_nats(t) {
        return NatsAccess::new(t, NatsFiles::default())
            .map(|_| t.to_owned())
            .map_err(ConfigError);
    }
    Err(ConfigError(format!(
        "KNOCKER_STORE: `{}` must be sqlite, memory, nats://host:port or tls://host:port",
        crate::redact::url(s)
    )))
}

fn parse_scheme(s: &str) -> Result<String, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "http" => Ok("http".into()),
        "https" => Ok("https".into()),
        _ => Err(ConfigError(format!("`{s}` must be http or https"))),
    }
}

fn parse_path(s: &str) -> Result<String, ConfigError> {
    if s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err(ConfigError(format!("`{s}` must start with /")))
    }
}

fn parse_log_level(s: &str) -> Result<String, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "critical" | "error" => Ok("error".into()),
        "warning" | "warn" => Ok("warn".into()),
        "info" => Ok("info".into()),
        "debug" => Ok("debug".into()),
        "trace" => Ok("trace".into()),
        _ => Err(ConfigError(format!(
            "`{s}` must be one of error, warning, info, debug, trace"
        ))),
    }
}

/// `HOSTS_ONLY`: a JSON array of strings, or a comma-separated list.
pub fn parse_hosts_only(s: &str) -> Result<HostsOnly, ConfigError> {
    let t = s.trim();
    let hosts: Vec<String> = if t.starts_with('[') {
        serde_json::from_str::<Vec<String>>(t)
            .map_err(|e| ConfigError(format!("`{s}` is not a JSON array of strings: {e}")))?
    } else {
        t.split(',').map(str::to_owned).collect()
    };
    Ok(HostsOnly(
        hosts
            .into_iter()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans() {
        for t in ["true", "TRUE", "1", "yes", "On"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["false", "False", "0", "no", "OFF"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn worker_threads_leave_a_cpu_to_the_rest_unless_set() {
        let mut settings = Settings::defaults();
        assert_eq!(settings.worker_threads, None);
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(settings.worker_threads(), cpus.saturating_sub(1).max(1));
        settings.worker_threads = Some(3);
        assert_eq!(settings.worker_threads(), 3);
    }

    #[test]
    fn store_cap_is_auto_bytes_or_none() {
        assert_eq!(parse_store_cap("auto"), Ok(crate::store::AUTO_CAP));
        assert_eq!(parse_store_cap("0"), Ok(0));
        assert_eq!(parse_store_cap("262144"), Ok(262_144));
        let e = parse_store_cap("10GB").unwrap_err();
        assert!(e.0.contains("`10GB` is not a size in bytes"), "{e:?}");
        let default = Settings::defaults();
        assert_eq!(default.max_store_bytes, crate::store::AUTO_CAP);
    }

    #[test]
    fn hosts_only_json_or_comma() {
        assert_eq!(
            parse_hosts_only(r#"["a.com", "b.com"]"#).unwrap().0,
            ["a.com", "b.com"]
        );
        assert_eq!(
            parse_hosts_only("a.com, b.com:8080").unwrap().0,
            ["a.com", "b.com:8080"]
        );
        assert_eq!(
            parse_hosts_only("single.example").unwrap().0,
            ["single.example"]
        );
        assert!(parse_hosts_only("").unwrap().0.is_empty());
        assert!(parse_hosts_only("[1, 2]").is_err());
        let h = parse_hosts_only("a.com").unwrap();
        assert!(h.allows("a.com:443", "a.com"));
        assert!(!h.allows("b.com", "b.com"));
    }

    #[test]
    fn numbers_and_names() {
        assert!(non_negative_float("nan").is_err());
        assert!(non_negative_float("-1").is_err());
        assert_eq!(non_negative_float(" 2.5 "), Ok(2.5));
        assert_eq!(parse_scheme("HTTP"), Ok("http".into()));
        assert!(parse_scheme("ftp").is_err());
        assert_eq!(parse_log_level("WARNING"), Ok("warn".into()));
        assert_eq!(
            parse_store("nats://127.0.0.1:4222"),
            Ok("nats://127.0.0.1:4222".into())
        );
        assert_eq!(parse_store("sqlite"), Ok("sqlite".into()));
        assert!(parse_store("nats://").is_err());
        assert!(parse_store("postgres://x").is_err());
        assert_eq!(
            parse_store("tls://u:p@a:4222,tls://b"),
            Ok("tls://u:p@a:4222,tls://b".into())
        );
        let e = parse_store("postgres://u:hunter2@x").unwrap_err().0;
        assert!(
            e.contains("tls://host:port") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn cross_field_validation_names_the_settings() {
        let mut s = Settings::defaults();
        assert_eq!(s.validate(), Ok(()));
        s.timeout = 100.0;
        assert!(s.validate().unwrap_err().0.contains("TIMEOUT_MAX"));
    }

    #[test]
    fn huge_numbers_are_refused_where_they_enter() {
        assert!(seconds_up_to_an_hour("1e300")
            .unwrap_err()
            .0
            .contains("at most 3600"));
        assert!(seconds_up_to_a_day("86401").is_err());
        assert_eq!(seconds_up_to_an_hour("60"), Ok(60.0));
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("400000000000d").is_err());
    }

    #[test]
    fn a_public_address_without_a_token_is_refused_unless_said_so() {
        let mut s = Settings::defaults();
        s.http_addr = "0.0.0.0:8000".parse().unwrap();
        let e = s.validate().unwrap_err().0;
        assert!(e.contains("KNOCKER_ADMIN_TOKEN"), "{e}");
        s.admin_token = "t".into();
        s.grpc_addr = "10.0.0.1:9090".parse().unwrap();
        assert!(s.validate().unwrap_err().0.contains("KNOCKER_GRPC_TOKEN"));
        s.insecure_no_token = true;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn the_outbound_policy_protects_the_control_planes_own_ports() {
        let mut s = Settings::defaults();
        s.http_addr = "127.0.0.1:8123".parse().unwrap();
        let p = s.outbound_policy(vec![]);
        assert!(p.protected_ports.contains(&8123));
        assert!(p.protected_ports.contains(&9901));
        assert!(p.protected_ports.contains(&9090));
    }
}
