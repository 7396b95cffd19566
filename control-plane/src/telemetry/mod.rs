//! Logs (`LOG_FILE`, `LOG_LEVEL`, `LOG_FORMAT`) and error reports ([`sentry`]).

pub mod sentry;

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::Settings;

/// Installs the global subscriber. `RUST_LOG`, when set, refines `LOG_LEVEL`.
pub fn init_logging(settings: &Settings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,tower=warn",
            settings.log_level
        ))
    });
    let writer = if settings.log_file == "-" {
        fmt::writer::BoxMakeWriter::new(std::io::stderr)
    } else {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.log_file)
            .map_err(|e| anyhow::anyhow!("LOG_FILE {}: {e}", settings.log_file))?;
        fmt::writer::BoxMakeWriter::new(Mutex::new(file))
    };
    let json = settings.log_format.eq_ignore_ascii_case("json");
    let fmt_layer = if json {
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
