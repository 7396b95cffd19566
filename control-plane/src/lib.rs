//! `knocker`: the control plane of Knocker for Envoy.
//!
//! Requests arrive through the Envoy filter (gRPC) or directly (HTTP), become jobs that
//! are committed to the store before any receipt is given, and are delivered in the
//! background with retries, backoff and failure callbacks (the Knocker protocol).
//!
//! Layout — data flows one way, top to bottom:
//! - [`config`] — settings from flags and environment, validated once.
//! - [`ingress`] — the shared submit path; [`ingress::grpc`] and [`ingress::http`].
//! - [`job`] — the job model, the protocol's header rules ([`job::spec`]) and receipts.
//! - [`store`] — the [`store::Store`] trait and its engines.
//! - [`broadcast`] — groups (static or DNS) and the fan-out of one request to them.
//! - [`delivery`] — due jobs → HTTP attempts → delivered, retried or failed (+ callback).
//! - [`monitor`] — endpoint checks, thresholds, history, uptime; [`notify`] — their
//!   webhook and email notifications, sent through the job queue.
//! - [`api`] — the admin API under `/knocker/` (jobs: lookup, list, replay, delete).
//! - [`outbound`] — the one door every outgoing request leaves by, and the policy that
//!   client-chosen destinations pass on every hop.
//! - [`redact`] — the secrets the API never shows.
//! - [`telemetry`] — logs and Sentry.
//! - [`cli`] — `knocker status` and `knocker jobs …`, clients of a running instance.
//! - [`clock`] — injected time and jitter.
//! - [`echo`] — `knocker echo`, a demo target.
//!
//! [`serve`] takes already-bound listeners and a shutdown token, so tests bind
//! `127.0.0.1:0` and run the real server in-process.

pub mod api;
pub mod broadcast;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod echo;
pub mod ingress;
pub mod job;
pub mod monitor;
pub mod notify;
pub mod outbound;
pub mod redact;
pub mod store;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::broadcast::agents::{AgentBus, AgentSettings};
use crate::broadcast::groups::Groups;
use crate::clock::Time;
use crate::config::file::FileConfig;
use crate::config::Settings;
use crate::delivery::attempt::Dispatch;
use crate::delivery::{Delivery, HostLimits};
use crate::ingress::Ingress;
use crate::monitor::shared::SharedStore;
use crate::monitor::store::{LocalStore, MonitorStore};
use crate::monitor::Monitors;
use crate::notify::email::Mailer;
use crate::outbound::{Outbound, OutboundPolicy};
use crate::store::memory::MemoryStore;
use crate::store::nats::{NatsOptions, NatsStore};
use crate::store::sqlite::{Limits, SqliteStore};
use crate::store::Store;
use crate::telemetry::sentry::FailureReporter;

/// The sockets `serve` answers on.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let http = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("KNOCKER_HTTP_ADDR {}: cannot listen", settings.http_addr))?;
        let grpc = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("KNOCKER_GRPC_ADDR {}: cannot listen", settings.grpc_addr))?;
        Ok(Self { http, grpc })
    }
}

/// Runs the control plane until `shutdown` is cancelled.
pub async fn serve(
    settings: Settings,
    listeners: Listeners,
    time: Time,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate().map_err(anyhow::Error::msg)?;
    let settings = Arc::new(settings);
    let file = match &settings.config_file {
        Some(path) => FileConfig::load(path).map_err(anyhow::Error::msg)?,
        None => FileConfig::default(),
    };
    let nats_url = settings
        .store
        .starts_with("nats://")
        .then(|| settings.store.clone());
    if nats_url.is_none() {
        if let Some((name, _)) = file.groups.iter().find(|(_, g)| g.agents) {
            anyhow::bail!("groups.{name}.agents: agent groups need KNOCKER_STORE=nats://host:port");
        }
    }
    let agents = match &nats_url {
        Some(url) => Some(Arc::new(AgentBus::open(url, settings.retention).await?)),
        None => None,
    };
    let groups = Arc::new(Groups::new(file.groups, settings.dns_server)?);
    let notifiers = Arc::new(file.notifiers);
    let store = open_store(&settings).await?;
    let wake = Arc::new(Notify::new());
    // Every request the control plane sends leaves through this, monitors' included.
    let outbound = Arc::new(
        Outbound::new(
            settings.outbound_policy(OutboundPolicy::local_addresses()),
            crate::outbound::Lookup::new(settings.dns_server).map_err(anyhow::Error::msg)?,
            settings.max_redirects,
        )
        .context("cannot build the HTTP client")?,
    );
    let monitor_store = match &nats_url {
        Some(url) => MonitorStore::Shared(Box::new(
            SharedStore::open(url, settings.monitor_history as usize).await?,
        )),
        None => MonitorStore::Local(LocalStore::open(
            (settings.store != "memory").then_some(settings.data_dir.as_path()),
            settings.monitor_history as usize,
        )?),
    };
    let monitors = Monitors::start(
        monitor_store,
        crate::monitor::Queue {
            jobs: Arc::clone(&store),
            wake: Arc::clone(&wake),
            notifiers: Arc::clone(&notifiers),
            time: time.clone(),
        },
        file.monitors,
        crate::monitor::CheckSettings {
            outbound: Arc::clone(&outbound),
            api: crate::monitor::ApiLimits {
                max_monitors: settings.max_monitors as usize,
                min_interval_s: settings
                    .monitor_min_interval
                    .max(crate::monitor::MIN_INTERVAL_S),
            },
        },
        shutdown.clone(),
    )
    .await?;

    let claims = Arc::new(crate::store::ClaimHealth::default());
    let delivery = Arc::new(Delivery {
        store: Arc::clone(&store),
        time: time.clone(),
        transport: Arc::new(Dispatch {
            http: Arc::clone(&outbound),
            mail: Mailer::new(notifiers),
        }),
        wake: Arc::clone(&wake),
        slots: Arc::new(Semaphore::new(settings.concurrency as usize)),
        backoff_cap_s: settings.backoff_factor_max,
        reporter: settings
            .sentry_failed_requests
            .then(|| Arc::new(FailureReporter)),
        hosts: HostLimits::new(settings.host_concurrency as usize),
        health: Arc::clone(&claims),
    });
    let ingress = Arc::new(Ingress {
        claims,
        settings: Arc::clone(&settings),
        store: Arc::clone(&store),
        time: time.clone(),
        wake,
        groups,
        agents: agents.clone(),
    });

    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    tracing::info!(%http_addr, %grpc_addr, version = job::VERSION, "knocker control plane listening");

    if let (Some(bus), Some(group), Some(endpoint)) =
        (agents, &settings.agent_group, &settings.agent_endpoint)
    {
        let agent = AgentSettings {
            group: group.clone(),
            endpoint: endpoint.clone(),
            name: settings
                .agent_name
                .clone()
                .unwrap_or_else(|| default_agent_name(endpoint)),
            expiry: settings.agent_expiry,
            ack_wait: settings.nats_ack_wait,
        };
        tokio::spawn(crate::broadcast::agents::run(
            bus,
            agent,
            Arc::clone(&outbound),
            shutdown.clone(),
        ));
    }
    let delivery_task = if settings.delivery {
        tokio::spawn(delivery.run(shutdown.clone()))
    } else {
        tracing::warn!("KNOCKER_DELIVERY=off: jobs are accepted and stored, not delivered");
        tokio::spawn(async {})
    };
    tokio::spawn(retention(
        Arc::clone(&store),
        time.clone(),
        settings.retention,
        shutdown.clone(),
    ));
    // Both doors: a connection cap, an idle deadline, TCP_NODELAY (small replies must
    // not wait for Nagle: with delayed ACKs on the other side that costs ~40 ms a
    // request on the filter's HTTP/2 connection); see `ingress::conn`.
    let http = ingress::http::serve(
        listeners.http,
        ingress::http::router(Arc::clone(&ingress), monitors),
        &settings,
        shutdown.clone(),
    );
    // Pings more often than the idle deadline: a live filter connection answers them.
    let ping = settings.idle_timeout / 3;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(ingress::grpc::service(ingress, shutdown.clone()))
        .serve_with_incoming_shutdown(
            ingress::conn::accept(
                listeners.grpc,
                settings.max_connections as usize,
                settings.idle_timeout,
            ),
            shutdown.clone().cancelled_owned(),
        );

    let result = tokio::try_join!(
        async {
            http.await;
            Ok::<(), anyhow::Error>(())
        },
        async { grpc.await.context("gRPC ingress") },
    );
    shutdown.cancel();
    delivery_task.await.context("delivery loop")?;
    result.map(|_| ())
}

async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match settings.store.as_str() {
        url if url.starts_with("nats://") => {
            let store = NatsStore::open(NatsOptions {
                url: url.to_owned(),
                max_pending: settings.max_pending,
                retention: settings.retention,
                ack_wait: settings.nats_ack_wait,
            })
            .await?;
            tracing::info!(url, "job store: NATS JetStream");
            Arc::new(store)
        }
        "memory" => {
            tracing::warn!("KNOCKER_STORE=memory: jobs are lost when the process stops");
            Arc::new(MemoryStore::default())
        }
        _ => {
            let limits = Limits {
                max_pending: settings.max_pending,
                max_bytes: settings.max_store_bytes,
            };
            let store = SqliteStore::open(&settings.data_dir, limits)
                .with_context(|| format!("KNOCKER_DATA_DIR {}", settings.data_dir.display()))?;
            tracing::info!(path = %store.path().display(), "job store open");
            Arc::new(store)
        }
    })
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

/// Removes delivered and failed jobs older than `KNOCKER_RETENTION`.
async fn retention(
    store: Arc<dyn Store>,
    time: Time,
    keep: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        let before = time.now_ms().saturating_sub(keep.as_millis() as u64);
        match store.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "finished jobs past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove finished jobs"),
        }
        // Once a minute, or more often for short retentions.
        let every = (keep / 4).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
