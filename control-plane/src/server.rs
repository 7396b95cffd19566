//! The wiring: [`serve`] builds every part from its piece of the [`Config`], bottom up —
//! store, outbound door, delivery, monitors, the submit path, then the two doors — and
//! runs them until shutdown. The only module that sees the whole configuration besides
//! `config` itself.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::broadcast::agents::{self, AgentBus};
use crate::broadcast::groups::Groups;
use crate::clock::Time;
use crate::config::Config;
use crate::delivery::board::NatsBoard;
use crate::delivery::email::Mailer;
use crate::delivery::http::Http;
use crate::delivery::observe::{Log, Observer};
use crate::delivery::targets::Targets;
use crate::delivery::transport::Transports;
use crate::delivery::Delivery;
use crate::ingress;
use crate::job::{Kind, VERSION};
use crate::monitor::shared::SharedStore;
use crate::monitor::store::{LocalStore, MonitorStore};
use crate::monitor::{CheckSettings, Monitors, Queue};
use crate::notify::target::TargetNotifier;
use crate::outbound::{Lookup, Outbound, OutboundPolicy};
use crate::store::ClaimHealth;
use crate::submit::Submitter;
use crate::telemetry::metrics::Recorder;
use crate::telemetry::sentry::FailureReporter;

/// The sockets `serve` answers on.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("KNOCKER_HTTP_ADDR {}: cannot listen", config.http_addr))?;
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("KNOCKER_GRPC_ADDR {}: cannot listen", config.grpc_addr))?;
        Ok(Self { http, grpc })
    }
}

/// Runs the control plane until `shutdown` is cancelled. Tests bind `127.0.0.1:0` and
/// run it in-process.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    time: Time,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let nats = config.store.nats().cloned();
    let agents = match &nats {
        Some(server) => Some(Arc::new(AgentBus::open(server, config.retention).await?)),
        None => None,
    };
    let groups = Arc::new(Groups::new(
        config.broadcast.groups.clone(),
        config.broadcast.dns_server,
    )?);
    let notifiers = Arc::new(config.notifiers.clone());
    let store = config
        .store
        .open()
        .await
        .with_context(|| match &config.store {
            crate::store::Engine::Sqlite { dir, .. } => {
                format!("KNOCKER_DATA_DIR {}", dir.display())
            }
            _ => "KNOCKER_STORE".to_owned(),
        })?;
    let wake = Arc::new(Notify::new());
    // Every request the control plane sends leaves through this, monitors' included.
    let mut policy = config.outbound.policy.clone();
    policy.local = OutboundPolicy::local_addresses();
    let outbound = Arc::new(
        Outbound::new(
            policy,
            Lookup::new(config.outbound.dns_server)?,
            config.outbound.max_redirects,
        )
        .context("cannot build the HTTP client")?,
    );
    let monitor_store = match &nats {
        Some(server) => MonitorStore::Shared(Box::new(
            SharedStore::open(server, config.monitors.history).await?,
        )),
        None => MonitorStore::Local(LocalStore::open(
            config.store.data_dir(),
            config.monitors.history,
        )?),
    };
    let monitors = Monitors::start(
        monitor_store,
        Queue {
            jobs: Arc::clone(&store),
            wake: Arc::clone(&wake),
            notifiers,
            time: time.clone(),
        },
        config.monitors.from_file.clone(),
        CheckSettings {
            outbound: Arc::clone(&outbound),
            api: config.monitors.api,
        },
        shutdown.clone(),
    )
    .await?;

    let claims = Arc::new(ClaimHealth::default());
    // One transport per job kind; a new kind of delivery is one more line here.
    let http = Arc::new(Http {
        outbound: Arc::clone(&outbound),
        signing: Arc::clone(&config.signing),
        time: time.clone(),
    });
    let transports = Transports::default()
        .with(Kind::Target, Arc::clone(&http) as _)
        .with(Kind::Callback, http)
        .with(Kind::Email, Arc::new(Mailer::new(config.mail_servers())));
    let mut observers: Vec<Arc<dyn Observer>> = vec![Arc::new(Log), Arc::new(Recorder)];
    if config.sentry.report_failed_jobs {
        observers.push(Arc::new(FailureReporter));
    }
    if !config.target_notify.is_empty() {
        observers.push(Arc::new(TargetNotifier::new(
            Arc::clone(&store),
            Arc::clone(&wake),
            time.clone(),
            &config.target_notify,
            &config.notifiers,
        )));
    }
    // Target circuits: shared through NATS by every control plane on it.
    let mut targets = Targets::new(config.targets.clone(), config.delivery.host_concurrency)
        .with_start(time.now_ms());
    let board = match &nats {
        Some(server) => {
            let board = NatsBoard::open(server).await?;
            targets = targets.with_board(Arc::clone(&board) as _);
            Some(board)
        }
        None => None,
    };
    let targets = Arc::new(targets);
    if let Some(board) = board {
        board.watch(Arc::clone(&targets), shutdown.clone());
    }
    let delivery = Arc::new(Delivery {
        store: Arc::clone(&store),
        time: time.clone(),
        transport: Arc::new(transports),
        wake: Arc::clone(&wake),
        slots: Arc::new(Semaphore::new(config.delivery.concurrency)),
        backoff_cap_s: config.delivery.backoff_cap_s,
        observers,
        targets: Arc::clone(&targets),
        health: Arc::clone(&claims),
    });
    let submit = Arc::new(Submitter {
        defaults: config.defaults.clone(),
        status_url: config.status_url.clone(),
        claims,
        store: Arc::clone(&store),
        time: time.clone(),
        wake,
        groups,
        agents: agents.clone(),
    });

    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(
        %http_addr,
        %grpc_addr,
        worker_threads,
        version = VERSION,
        "knocker control plane listening"
    );

    if let (Some(bus), Some(agent)) = (agents, config.agent.clone()) {
        tokio::spawn(agents::run(
            bus,
            agent,
            Arc::clone(&outbound),
            Arc::clone(&config.signing),
            shutdown.clone(),
        ));
    }
    let delivery_task = if config.delivery.enabled {
        tokio::spawn(Arc::clone(&delivery).run(shutdown.clone()))
    } else {
        tracing::warn!("KNOCKER_DELIVERY=off: jobs are accepted and stored, not delivered");
        tokio::spawn(async {})
    };
    tokio::spawn(crate::retention::run(
        Arc::clone(&store),
        time.clone(),
        config.retention,
        shutdown.clone(),
    ));
    // Both doors: a connection cap, an idle deadline, TCP_NODELAY (small replies must
    // not wait for Nagle: with delayed ACKs on the other side that costs ~40 ms a
    // request on the filter's HTTP/2 connection); see `ingress::conn`.
    let doors = &config.doors;
    let api = crate::api::router(
        Arc::clone(&submit),
        monitors,
        Arc::clone(&delivery),
        &doors.admin_token,
    );
    let http = ingress::http::serve(
        listeners.http,
        ingress::http::Front::new(Arc::clone(&submit), api, doors),
        doors,
        shutdown.clone(),
    );
    // Pings more often than the idle deadline: a live filter connection answers them.
    let ping = doors.idle_timeout / 3;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(ingress::grpc::service(submit, doors, shutdown.clone()))
        .serve_with_incoming_shutdown(
            ingress::conn::accept(listeners.grpc, doors.max_connections, doors.idle_timeout),
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
