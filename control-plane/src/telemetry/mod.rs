//! Logs (`LOG_FILE`, `LOG_LEVEL`, `LOG_FORMAT`), error reports ([`sentry`]) and the
//! `/metrics` scrape ([`metrics`]), OTLP traces ([`traces`]).

pub mod metrics;
pub mod sentry;
pub mod traces;

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

pub use sentry::SentryConfig;

/// Where logs go and how they look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `-` for stderr, else a file appended to (`LOG_FILE`).
    pub file: String,
    /// A `tracing` level: error, warn, info, debug, trace (`LOG_LEVEL`).
    pub level: String,
    /// One JSON object a line rather than text (`LOG_FORMAT=json`).
    pub json: bool,
}

/// Installs the global subscriber. `RUST_LOG`, when set, refines `LOG_LEVEL`.
pub fn init_logging(settings: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,tower=warn,async_nats=warn",
            settings.level
        ))
    });
    let writer = if settings.file == "-" {
        fmt::writer::BoxMakeWriter::new(std::io::stderr)
    } else {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.file)
            .map_err(|e| anyhow::anyhow!("LOG_FILE {}: {e}", settings.file))?;
        fmt::writer::BoxMakeWriter::new(Mutex::new(file))
    };
    let fmt_layer = if settings.json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed()
    } else {
        fmt::layer().with_writer(writer).with_ansi(false).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(sentry::tracing_layers())
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
