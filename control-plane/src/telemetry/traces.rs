//! OTLP traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) set, the
//! submission and attempt spans of [`crate::trace_context`] are exported over OTLP/HTTP
//! (protobuf; `OTEL_EXPORTER_OTLP_PROTOCOL=http/json` for JSON) by OpenTelemetry's batch
//! processor, with the standard `OTEL_*` settings (headers, timeout, service name,
//! batch delay). Without it nothing is exported and nothing is started.

use std::cell::Cell;
use std::str::FromStr as _;

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{IdGenerator, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::trace_context::{self, Kind, Span, SpanSink, TraceParent, Value};

/// Keep it for the life of the process; [`Guard::shutdown`] flushes what is queued.
pub struct Guard(SdkTracerProvider);

impl Guard {
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Starts the exporter when an OTLP endpoint is set.
pub fn init() -> anyhow::Result<Option<Guard>> {
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    match protocol.trim() {
        "" | "http/protobuf" => builder = builder.with_protocol(Protocol::HttpBinary),
        "http/json" => builder = builder.with_protocol(Protocol::HttpJson),
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported: use http/protobuf or http/json"
        ),
    }
    let exporter = builder
        .build()
        .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let resource = if set("OTEL_SERVICE_NAME") {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name("knocker").build()
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(Preset)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("knocker");
    trace_context::install(Box::new(Otlp { tracer }));
    Ok(Some(Guard(provider)))
}

thread_local! {
    /// The ids the next span built on this thread gets: ours, already sent to the
    /// target, not the SDK's.
    static NEXT: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Hands the SDK the ids set in [`NEXT`] (random ones otherwise).
#[derive(Debug)]
struct Preset;

impl IdGenerator for Preset {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(Cell::get)
            .map_or_else(|| TraceId::from_bytes(rand::random()), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT.with(Cell::get)
            .map_or_else(|| SpanId::from_bytes(rand::random()), |(_, s)| s)
    }
}

struct Otlp {
    tracer: SdkTracer,
}

fn context(t: &TraceParent, state: Option<&str>) -> SpanContext {
    let state = state
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.span_id),
        TraceFlags::new(t.flags),
        true,
        state,
    )
}

impl SpanSink for Otlp {
    fn record(&self, span: Span) {
        let own = span.trace.span;
        let parent = span
            .trace
            .parent
            .map(|p| context(&p, span.tracestate.as_deref()));
        let cx = match &parent {
            Some(p) => Context::new().with_remote_span_context(p.clone()),
            None => Context::new(),
        };
        let attributes: Vec<KeyValue> = span
            .attributes
            .into_iter()
            .map(|(k, v)| match v {
                Value::Str(s) => KeyValue::new(k, s),
                Value::Int(i) => KeyValue::new(k, i),
            })
            .collect();
        let mut builder = self
            .tracer
            .span_builder(span.name)
            .with_kind(match span.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            })
            .with_start_time(span.start)
            .with_attributes(attributes);
        if let (Kind::Client, Some(p)) = (span.kind, &parent) {
            // An attempt may come hours after its submission: the link says so too.
            builder = builder.with_links(vec![Link::with_context(p.clone())]);
        }
        NEXT.with(|n| {
            n.set(Some((
                TraceId::from_bytes(own.trace_id),
                SpanId::from_bytes(own.span_id),
            )))
        });
        let mut built = builder.start_with_context(&self.tracer, &cx);
        NEXT.with(|n| n.set(None));
        if let Some(error) = span.error {
            built.set_status(Status::error(error));
        }
        built.end_with_timestamp(span.end);
    }
}
