//! The worker's stream to the control plane (`knocker.v1.Ingress/SubmitStream`).
//!
//! A unary gRPC call per request costs Envoy a new HTTP/2 stream, its headers, a router
//! pass and a timer; on one long-lived stream a submission is one message each way. Each
//! worker's root context opens the stream (the replies come back to it) and keeps the
//! table of submissions waiting for a reply: which HTTP context asked, until when. The
//! root hands each reply to its context, fails what passed its deadline (on its tick) and
//! what was waiting on a stream that closed. The root opens the stream on its tick once a
//! request has wanted one, and again after it closes; until then, requests make the
//! unary `Submit` call.
//!
//! This module is the bookkeeping, free of host calls; `wasm` drives it.

use std::collections::HashMap;

use prost::Message;

/// A submission waiting for its reply.
#[derive(Debug)]
pub struct Waiting<W> {
    /// The submission's id on the stream (the token its request state waits for).
    pub id: u32,
    /// The HTTP context to answer.
    pub context_id: u32,
    /// When the client gets a 503 instead (milliseconds since the epoch).
    pub deadline_ms: u64,
    /// The stream the submission went out on.
    pub stream: u32,
    /// What the reply is handed to (the context's request state).
    pub waiter: W,
}

/// The stream and the submissions waiting on it, of one worker.
#[derive(Debug)]
pub struct Link<W> {
    /// The open stream's token.
    open: Option<u32>,
    /// The control plane has no `SubmitStream`: unary calls only, from now on.
    unsupported: bool,
    /// A request found no stream: the root opens one (a root that never sees a request,
    /// such as the one on Envoy's main thread, keeps none).
    wanted: bool,
    /// The root's tick has been started (by the first request that wanted a stream).
    pub ticking: bool,
    /// Streams opened so far (a later one is a reopening).
    opens: u32,
    next_id: u32,
    waiting: HashMap<u32, Waiting<W>>,
}

impl<W> Default for Link<W> {
    fn default() -> Self {
        Self {
            open: None,
            unsupported: false,
            wanted: false,
            ticking: false,
            opens: 0,
            next_id: 1,
            waiting: HashMap::new(),
        }
    }
}

/// gRPC's `UNIMPLEMENTED`: the control plane predates `SubmitStream`.
pub const GRPC_UNIMPLEMENTED: u32 = 12;

impl<W> Link<W> {
    /// True when the root should open a stream.
    pub fn wants_stream(&self) -> bool {
        self.wanted && self.open.is_none() && !self.unsupported
    }

    pub fn opened(&mut self, token: u32) {
        self.open = Some(token);
        self.opens = self.opens.saturating_add(1);
    }

    /// A stream has been opened before (the next one is a reopening).
    pub fn has_opened(&self) -> bool {
        self.opens > 0
    }

    /// Files a submission on the open stream: its id and the stream's token, or `None`
    /// when no stream is open (the caller uses a unary call instead).
    pub fn register(&mut self, context_id: u32, waiter: W, deadline_ms: u64) -> Option<(u32, u32)> {
        self.wanted = true;
        let stream = self.open?;
        let mut id = self.next_id;
        while id == 0 || self.waiting.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.waiting.insert(
            id,
            Waiting {
                id,
                context_id,
                deadline_ms,
                stream,
                waiter,
            },
        );
        Some((id, stream))
    }

    /// Takes back a submission whose message could not be sent; the stream is dropped
    /// too (a new one opens on the next tick).
    pub fn unsent(&mut self, id: u32) -> Option<Waiting<W>> {
        self.open = None;
        self.waiting.remove(&id)
    }

    /// The submission a reply is for (`None`: unknown, late or already failed).
    pub fn reply(&mut self, id: u32) -> Option<Waiting<W>> {
        self.waiting.remove(&id)
    }

    /// Stream `token` closed with `grpc_status`: the submissions still waiting on it, to
    /// be failed.
    pub fn closed(&mut self, token: u32, grpc_status: u32) -> Vec<Waiting<W>> {
        if self.open == Some(token) {
            self.open = None;
        }
        if grpc_status == GRPC_UNIMPLEMENTED {
            self.unsupported = true;
        }
        self.take(|w| w.stream == token)
    }

    /// Submissions whose deadline has passed at `now_ms`, to be failed.
    pub fn expired(&mut self, now_ms: u64) -> Vec<Waiting<W>> {
        self.take(|w| w.deadline_ms <= now_ms)
    }

    /// The HTTP context is gone: its submission, if any, needs no reply.
    pub fn forget(&mut self, context_id: u32) {
        self.waiting.retain(|_, w| w.context_id != context_id);
    }

    pub fn is_unsupported(&self) -> bool {
        self.unsupported
    }

    fn take(&mut self, mut which: impl FnMut(&Waiting<W>) -> bool) -> Vec<Waiting<W>> {
        let ids: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, w)| which(w))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.waiting.remove(&id))
            .collect()
    }
}

/// `StreamSubmit` with the request left encoded: a nested message and a `bytes` field
/// are the same on the wire, so the already encoded `SubmitRequest` goes in as it is.
#[derive(Clone, PartialEq, Message)]
struct RawStreamSubmit {
    #[prost(uint32, tag = "1")]
    id: u32,
    #[prost(bytes = "vec", tag = "2")]
    request: Vec<u8>,
}

/// `StreamReply` with the reply left encoded, for `reply::from_grpc`.
#[derive(Clone, PartialEq, Message)]
struct RawStreamReply {
    #[prost(uint32, tag = "1")]
    id: u32,
    #[prost(bytes = "vec", tag = "2")]
    reply: Vec<u8>,
}

/// The `StreamSubmit` message around an encoded `SubmitRequest`.
pub fn encode_submit(id: u32, request: &[u8]) -> Vec<u8> {
    RawStreamSubmit {
        id,
        request: request.to_vec(),
    }
    .encode_to_vec()
}

/// A `StreamReply`'s id and its encoded `SubmitReply`.
pub fn decode_reply(message: &[u8]) -> Option<(u32, Vec<u8>)> {
    let raw = RawStreamReply::decode(message).ok()?;
    Some((raw.id, raw.reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use knocker_proto::v1::{Header, StreamReply, StreamSubmit, SubmitReply, SubmitRequest};

    /// A link a request has asked a stream of.
    fn wanted() -> Link<&'static str> {
        Link {
            wanted: true,
            ..Link::default()
        }
    }

    #[test]
    fn the_raw_messages_are_the_protos_on_the_wire() {
        let request = SubmitRequest {
            method: "POST".into(),
            path: "/orders".into(),
            body: b"{}".to_vec(),
            ..Default::default()
        };
        let frame = encode_submit(7, &request.encode_to_vec());
        let decoded = StreamSubmit::decode(frame.as_slice()).ok();
        assert_eq!(
            decoded,
            Some(StreamSubmit {
                id: 7,
                request: Some(request)
            })
        );

        let reply = SubmitReply {
            status: 200,
            headers: vec![Header {
                name: b"knocker-id".to_vec(),
                value: b"abc".to_vec(),
            }],
            body: b"{\"status\":true}".to_vec(),
        };
        let message = StreamReply {
            id: 9,
            reply: Some(reply.clone()),
        }
        .encode_to_vec();
        let (id, encoded) = decode_reply(&message).unwrap_or_default();
        assert_eq!(id, 9);
        assert_eq!(SubmitReply::decode(encoded.as_slice()).ok(), Some(reply));
        assert_eq!(decode_reply(b"\xff\xff"), None);
    }

    #[test]
    fn a_stream_is_wanted_once_a_request_finds_none() {
        let mut link = Link::<&str>::default();
        assert!(!link.wants_stream(), "no request yet, no stream");
        assert_eq!(link.register(1, "a", 100), None);
        assert!(link.wants_stream());
        link.opened(40);
        assert!(!link.wants_stream());
        assert_eq!(link.register(1, "a", 100), Some((1, 40)));
        assert_eq!(link.register(2, "b", 100), Some((2, 40)));
    }

    #[test]
    fn a_reply_finds_its_waiter_once() {
        let mut link = wanted();
        link.opened(40);
        let (a, _) = link.register(11, "a", 100).unwrap_or_default();
        let (b, _) = link.register(12, "b", 100).unwrap_or_default();
        assert_eq!(
            link.reply(b).map(|w| (w.context_id, w.waiter)),
            Some((12, "b"))
        );
        assert!(
            link.reply(b).is_none(),
            "a second reply with the same id is ignored"
        );
        assert_eq!(link.reply(a).map(|w| w.waiter), Some("a"));
    }

    #[test]
    fn deadlines_and_closed_streams_fail_what_waits_on_them() {
        let mut link = wanted();
        link.opened(40);
        link.register(1, "early", 100);
        link.register(2, "late", 500);
        let expired: Vec<_> = link.expired(100).into_iter().map(|w| w.waiter).collect();
        assert_eq!(expired, vec!["early"]);
        assert!(link.expired(499).is_empty());

        let failed: Vec<_> = link.closed(40, 14).into_iter().map(|w| w.waiter).collect();
        assert_eq!(failed, vec!["late"]);
        assert!(link.wants_stream(), "a closed stream is opened again");
        link.opened(41);
        link.register(3, "on the new stream", 500);
        // A close of the old stream reported again fails nothing on the new one.
        assert!(link.closed(40, 14).is_empty());
        assert!(!link.wants_stream(), "the new stream stays open");
        let failed: Vec<_> = link.closed(41, 14).into_iter().map(|w| w.waiter).collect();
        assert_eq!(failed, vec!["on the new stream"]);
    }

    #[test]
    fn a_control_plane_without_the_stream_gets_unary_calls_from_then_on() {
        let mut link = wanted();
        link.opened(40);
        link.register(1, "a", 100);
        assert_eq!(link.closed(40, GRPC_UNIMPLEMENTED).len(), 1);
        assert!(link.is_unsupported());
        assert!(!link.wants_stream());
        assert_eq!(link.register(2, "b", 100), None);
    }

    #[test]
    fn a_gone_context_is_forgotten_and_an_unsent_submission_drops_the_stream() {
        let mut link = wanted();
        link.opened(40);
        let (a, _) = link.register(1, "a", 100).unwrap_or_default();
        link.forget(1);
        assert!(link.reply(a).is_none());
        let (b, _) = link.register(2, "b", 100).unwrap_or_default();
        assert_eq!(link.unsent(b).map(|w| w.waiter), Some("b"));
        assert!(link.wants_stream());
    }

    #[test]
    fn ids_in_use_are_skipped_when_the_counter_wraps() {
        let mut link = wanted();
        link.opened(40);
        link.next_id = u32::MAX;
        assert_eq!(link.register(1, "a", 100).map(|r| r.0), Some(u32::MAX));
        assert_eq!(
            link.register(2, "b", 100).map(|r| r.0),
            Some(1),
            "0 is never an id"
        );
        link.next_id = 1;
        assert_eq!(link.register(3, "c", 100).map(|r| r.0), Some(2));
    }
}
