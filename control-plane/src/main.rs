//! The `knocker` command: `knocker serve` (the default) runs the control plane; the other
//! sub-commands talk to a running instance over its HTTP API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use knocker::cli::{Jobs, Remote};
use knocker::clock::Time;
use knocker::config::Settings;
use knocker::Listeners;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "knocker",
    version,
    about = "Knocker for Envoy: durable HTTP delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// For the commands that talk to a running instance; before or after the command.
    #[command(flatten)]
    remote: Remote,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (the default when no sub-command is given).
    Serve(Box<Settings>),
    /// Show a running instance's status.
    Status {
        /// The instance's STATUS_URL.
        #[arg(long, env = "STATUS_URL", default_value = "/knocker/status")]
        status_url: String,
    },
    /// Inspect, replay and delete a running instance's jobs.
    Jobs {
        #[command(subcommand)]
        command: Jobs,
    },
    /// Inspect a running instance's broadcasts and groups.
    Broadcasts {
        #[command(subcommand)]
        command: knocker::cli::Broadcasts,
    },
    /// Show a running instance's monitors.
    Monitors {
        #[command(subcommand)]
        command: knocker::cli::Monitors,
    },
    /// Show a running instance's targets (health, backlog, rate); pause or resume one.
    Targets {
        #[command(subcommand)]
        command: knocker::cli::Targets,
    },
    /// Check a saved request's signature (Standard Webhooks) against a secret.
    Verify(knocker::cli::Verify),
    /// Run a demo target that answers 200 to everything and logs each request.
    Echo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Do not log each request.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    // `knocker`, `knocker --flag …`: serve. Options may come before a sub-command
    // (`knocker --url X jobs list`), so look for one anywhere.
    const COMMANDS: [&str; 9] = [
        "serve",
        "status",
        "jobs",
        "monitors",
        "broadcasts",
        "targets",
        "verify",
        "echo",
        "help",
    ];
    let has_command = args.iter().skip(1).any(|a| COMMANDS.contains(&a.as_str()));
    let only_help =
        args.len() == 2 && matches!(args[1].as_str(), "-h" | "--help" | "-V" | "--version");
    let wants_default = !(has_command || only_help);
    if wants_default {
        args.insert(1, "serve".into());
    }
    let cli = Cli::parse_from(args);
    let runtime = match &cli.command {
        Command::Serve(settings) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.worker_threads())
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("knocker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let remote = cli.remote;
    let result = match cli.command {
        Command::Serve(settings) => runtime.block_on(serve(*settings)),
        Command::Status { status_url } => {
            runtime.block_on(knocker::cli::status(&remote, &status_url))
        }
        Command::Jobs { command } => runtime.block_on(knocker::cli::jobs(&remote, command)),
        Command::Monitors { command } => runtime.block_on(knocker::cli::monitors(&remote, command)),
        Command::Broadcasts { command } => {
            runtime.block_on(knocker::cli::broadcasts(&remote, command))
        }
        Command::Targets { command } => runtime.block_on(knocker::cli::targets(&remote, command)),
        Command::Verify(args) => knocker::cli::verify(&args),
        Command::Echo { addr, quiet } => runtime.block_on(knocker::echo::run(addr, quiet)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knocker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let config = settings.load()?;
    let _sentry = knocker::telemetry::sentry::init(&config.sentry)?;
    knocker::telemetry::init_logging(&config.log)?;
    let traces = knocker::telemetry::traces::init()?;
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    let served = knocker::serve(config, listeners, Time::system(), shutdown).await;
    if let Some(traces) = traces {
        // Flushing blocks on the exporter's thread: off the runtime's.
        let _ = tokio::task::spawn_blocking(|| traces.shutdown()).await;
    }
    served
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
