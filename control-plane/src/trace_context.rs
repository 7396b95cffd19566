//! W3C trace context (`traceparent`, `tracestate`) through the queue.
//!
//! At submission ([`accept`]) the request's `traceparent` is replaced by one naming the
//! control plane's own submission span, a child of the client's (a new trace when the
//! client sent none, or one that is not valid); it is stored with the job's headers, so
//! it survives restarts and travels between control planes. Each attempt
//! ([`attempt`]) is a child span of the submission: the target receives a
//! `traceparent` naming the attempt. `tracestate` is kept as the client sent it.
//!
//! Spans are recorded through a [`SpanSink`] installed once by `telemetry::traces`
//! (OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set); without one, ids still propagate
//! and nothing is exported.

use std::sync::OnceLock;
use std::time::SystemTime;

/// One `traceparent`: version 00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
}

impl TraceParent {
    /// A valid `traceparent` value, or `None` (W3C: version `00`, or a later version
    /// read as far as 00 goes; ids not all zero; lower-case hex).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        // Lower-case hex only, as the specification says.
        let nibble = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let hex = |s: &str, out: &mut [u8]| -> Option<()> {
            if s.len() != out.len() * 2 {
                return None;
            }
            for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
                *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
            }
            Some(())
        };
        let mut parsed = Self {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex(version, &mut [0; 1])?;
        hex(trace, &mut parsed.trace_id)?;
        hex(span, &mut parsed.span_id)?;
        let mut f = [0u8; 1];
        hex(flags, &mut f)?;
        parsed.flags = f[0];
        let zero = parsed.trace_id == [0; 16] || parsed.span_id == [0; 8];
        (!zero).then_some(parsed)
    }

    /// A new trace, sampled.
    pub fn root() -> Self {
        Self {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: 1,
        }
    }

    /// A new span of the same trace.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(),
            ..*self
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The header value.
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// A submission's trace: its own span, and the client's span it continues (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub span: TraceParent,
    pub parent: Option<TraceParent>,
}

/// Gives a submission its span: the stored `traceparent` becomes the submission
/// span's (every job made from these headers carries it).
pub fn accept(headers: &mut Vec<(String, Vec<u8>)>) -> Accepted {
    let parent = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .and_then(TraceParent::parse);
    let span = parent.map_or_else(TraceParent::root, |p| p.child());
    // In the client's place when it sent one (the first of them; others go).
    let mut seen = false;
    headers.retain_mut(|(n, v)| {
        if !n.eq_ignore_ascii_case("traceparent") {
            return true;
        }
        if seen {
            return false;
        }
        seen = true;
        *n = "traceparent".to_owned();
        *v = span.header().into_bytes();
        true
    });
    if !seen {
        headers.push(("traceparent".to_owned(), span.header().into_bytes()));
    }
    Accepted { span, parent }
}

/// An attempt of a job with these headers: its span (sent to the target as its
/// `traceparent`) and the submission's, its parent. `None` for a job without one
/// (stored before trace context was kept, or a notification).
pub fn attempt(headers: &[(String, Vec<u8>)]) -> Option<Accepted> {
    let parent = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .and_then(TraceParent::parse)?;
    Some(Accepted {
        span: parent.child(),
        parent: Some(parent),
    })
}

/// The `tracestate` the client sent, if any.
pub fn tracestate(headers: &[(String, Vec<u8>)]) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("tracestate"))
        .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
}

/// A span's kind, as OpenTelemetry names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The control plane taking a request (a submission).
    Server,
    /// The control plane calling out (an attempt).
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: &'static str,
    pub kind: Kind,
    pub trace: Accepted,
    pub tracestate: Option<String>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Set when the span failed: its description.
    pub error: Option<String>,
}

/// Where finished spans go.
pub trait SpanSink: Send + Sync + 'static {
    fn record(&self, span: Span);
}

static SINK: OnceLock<Box<dyn SpanSink>> = OnceLock::new();

/// Installs the process's sink (once; later calls are ignored).
pub fn install(sink: Box<dyn SpanSink>) {
    let _ = SINK.set(sink);
}

/// True when spans go somewhere (callers skip building them otherwise).
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Records a finished span, if a sink is installed and the trace is sampled.
pub fn record(span: Span) {
    if let Some(sink) = SINK.get() {
        if span.trace.span.sampled() {
            sink.record(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_round_trips_and_bad_ones_are_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(text).unwrap();
        assert_eq!(t.header(), text);
        assert!(t.sampled());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4g36-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version is read as far as 00 goes.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-zz")
                .is_some()
        );
    }

    #[test]
    fn a_submission_continues_the_clients_trace_and_each_attempt_is_its_child() {
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = vec![
            ("x-a".to_owned(), b"1".to_vec()),
            ("TraceParent".to_owned(), client.as_bytes().to_vec()),
            ("tracestate".to_owned(), b"k=v".to_vec()),
            ("traceparent".to_owned(), client.as_bytes().to_vec()),
        ];
        let accepted = accept(&mut headers);
        assert_eq!(headers[1].0, "traceparent", "kept in its place");
        let parent = TraceParent::parse(client).unwrap();
        assert_eq!(accepted.parent, Some(parent));
        assert_eq!(accepted.span.trace_id, parent.trace_id);
        assert_ne!(accepted.span.span_id, parent.span_id);
        let stored: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
            .collect();
        assert_eq!(stored.len(), 1, "the client's is replaced");
        assert_eq!(stored[0].1, accepted.span.header().into_bytes());
        assert_eq!(tracestate(&headers).as_deref(), Some("k=v"));

        let first = attempt(&headers).unwrap();
        let second = attempt(&headers).unwrap();
        assert_eq!(first.parent, Some(accepted.span));
        assert_eq!(first.span.trace_id, parent.trace_id);
        assert_ne!(first.span.span_id, second.span.span_id);

        // No (or a broken) traceparent: a new trace.
        let mut headers = vec![("traceparent".to_owned(), b"junk".to_vec())];
        let accepted = accept(&mut headers);
        assert_eq!(accepted.parent, None);
        assert!(accepted.span.sampled());
        assert_eq!(attempt(&headers).unwrap().parent, Some(accepted.span));
    }
}
