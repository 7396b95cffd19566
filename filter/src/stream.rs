//! One HTTP stream through the filter, as a state machine over [`Host`].
//!
//! - Knocker requests (`Knocker-Host`) and `capture` rules: the whole request is
//!   buffered, submitted, and answered with the control plane's reply.
//! - `fallback` rules: the request goes upstream as usual once its body has ended
//!   (Envoy holds it until then, up to the rule's buffer limit), with a copy kept; a
//!   retryable failure is replaced by the control plane's `202` receipt, anything else
//!   passes through untouched.
//! - `handover` rules: as capture, but the job is a fallback (Envoy's retry policy sent
//!   a request its upstream failed to this listener); a failure says so in
//!   `knocker-fallback`.

use std::time::Duration;

use knocker_proto::v1::{Mode, SubmitRequest};
use prost::Message;

use crate::config::PluginConfig;
use crate::host::{HeaderPair, Host};
use crate::message::submit_request;
use crate::metrics::Counter;
use crate::reply::{self, Response};
use crate::rules::{RequestView, RuleMode};

/// What Envoy should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// The response header that tells a fallback request's caller why the filter let an
/// upstream failure through.
pub const FALLBACK_HEADER: &str = "knocker-fallback";

#[derive(Debug, Default)]
enum State {
    /// Not ours (or not yet looked at): Envoy carries on.
    #[default]
    PassThrough,
    /// A Knocker or capture request whose body is still arriving.
    Buffering {
        headers: Vec<HeaderPair>,
        rule: Option<usize>,
    },
    /// A fallback request: its body is held (Envoy buffers it) until it has ended, then
    /// the whole request goes upstream while the filter keeps a copy. So the upstream
    /// cannot fail before the copy is whole, whatever the timing of the body. A body
    /// over the rule's buffer limit is let go on as it comes (no copy).
    Shadowing {
        headers: Vec<HeaderPair>,
        rule: usize,
        body: Vec<u8>,
        /// The body went over the rule's buffer limit: the copy was dropped.
        overflow: bool,
        /// The whole request has been seen.
        complete: bool,
    },
    /// The gRPC call is out; the client waits. `fallback`: the upstream's failed
    /// response is paused behind it.
    Waiting {
        token: u32,
        fallback: bool,
        rule: Option<usize>,
    },
    /// A local response was sent: the request goes no further.
    Answered,
    /// A fallback request whose response is the upstream's own: everything goes on
    /// untouched (the rest of a request body included, when the upstream answered early).
    Released,
}

/// How a submission ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The control plane's encoded `SubmitReply` (`None`: Envoy would not hand it over).
    Reply(Option<Vec<u8>>),
    /// No reply: the call or the stream failed, or the deadline passed.
    Failed {
        grpc_status: u32,
        message: Option<String>,
    },
}

/// gRPC's `DEADLINE_EXCEEDED`, for a submission the worker's stream did not answer in time.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;

#[derive(Debug, Default)]
pub struct Stream {
    state: State,
}

impl Stream {
    pub fn on_request_headers<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        end_of_stream: bool,
    ) -> Action {
        // Without rules only Knocker requests matter: the cheap scan lets the rest go
        // without copying their headers.
        if config.rules.is_empty() && !host.has_knocker_header() {
            return Action::Continue;
        }
        // One copy of the headers from Envoy serves the Knocker check, the rules and
        // the job. Each host call crosses between Envoy and the VM: a request that a
        // fallback rule takes made six or more of them here (one per header looked
        // at), now one.
        let Some(headers) = host.request_headers() else {
            host.warn("knocker: request headers unavailable; passing the request through");
            return Action::Continue;
        };
        let knocker = crate::classify::has_knocker_header(&headers);
        let rule = if knocker && header(&headers, "knocker-host").is_some() {
            None
        } else {
            match_rule(&headers, config)
        };
        if rule.is_none() && !knocker {
            return Action::Continue;
        }
        let fallback = rule.filter(|i| {
            config
                .rules
                .get(*i)
                .is_some_and(|r| r.mode == RuleMode::Fallback)
        });
        if let Some(rule) = fallback {
            self.state = State::Shadowing {
                headers,
                rule,
                body: Vec::new(),
                overflow: false,
                complete: end_of_stream,
            };
            // Upstream only once the body is whole (or too big to keep).
            return if end_of_stream {
                Action::Continue
            } else {
                Action::Pause
            };
        }
        if end_of_stream {
            self.submit(host, config, headers, Vec::new(), rule, 0);
        } else {
            self.state = State::Buffering { headers, rule };
        }
        Action::Pause
    }

    pub fn on_request_body<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        match &mut self.state {
            State::PassThrough | State::Released => Action::Continue,
            State::Shadowing {
                rule,
                body,
                overflow,
                complete,
                ..
            } => {
                if *overflow || *complete {
                    return Action::Continue; // let go: it streams on, no copy
                }
                // Envoy holds the body: each call sees all of it so far (`body_size`).
                let limit = config
                    .rules
                    .get(*rule)
                    .map_or(0, crate::rules::Rule::buffer_limit_bytes);
                if body_size > limit {
                    *overflow = true;
                    return Action::Continue; // too big to keep: upstream as it comes
                }
                if !end_of_stream {
                    return Action::Pause; // Envoy keeps buffering
                }
                *complete = true;
                match host.request_body(body_size) {
                    Some(whole) if body_size > 0 => *body = whole,
                    Some(_) => {}
                    None => *overflow = true, // unreadable: no copy, nothing taken over
                }
                Action::Continue // the whole request goes upstream now
            }
            State::Buffering { .. } if !end_of_stream => Action::Pause, // Envoy keeps buffering
            State::Buffering { .. } => {
                let State::Buffering { headers, rule } = std::mem::take(&mut self.state) else {
                    return Action::Pause;
                };
                let body = if body_size == 0 {
                    Vec::new()
                } else {
                    match host.request_body(body_size) {
                        Some(body) => body,
                        None => {
                            self.answer(
                                host,
                                &Response::unavailable(
                                    "request body unreadable",
                                    config.retry_after_s,
                                ),
                            );
                            return Action::Pause;
                        }
                    }
                };
                self.submit(host, config, headers, body, rule, 0);
                Action::Pause
            }
            State::Waiting { .. } | State::Answered => Action::Pause,
        }
    }

    /// Trailers end the stream too; a request with trailers is submitted here.
    pub fn on_request_trailers<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        body_size: usize,
    ) -> Action {
        match &mut self.state {
            State::Buffering { .. } => self.on_request_body(host, config, body_size, true),
            State::PassThrough | State::Released => Action::Continue,
            State::Shadowing {
                rule,
                body,
                overflow,
                complete,
                ..
            } => {
                // The end of a held body: take the copy now (unless it is too big).
                if !*overflow && !*complete {
                    let limit = config
                        .rules
                        .get(*rule)
                        .map_or(0, crate::rules::Rule::buffer_limit_bytes);
                    if body_size > limit {
                        *overflow = true;
                    } else if body_size > 0 {
                        match host.request_body(body_size) {
                            Some(whole) => *body = whole,
                            None => *overflow = true,
                        }
                    }
                }
                *complete = true;
                Action::Continue
            }
            State::Waiting { .. } | State::Answered => Action::Pause,
        }
    }

    /// A fallback request's response: a retryable failure is handed to the control plane
    /// (the response waits); anything else goes on.
    pub fn on_response_headers<H: Host>(&mut self, host: &H, config: &PluginConfig) -> Action {
        let State::Shadowing {
            rule,
            overflow,
            complete,
            ..
        } = &self.state
        else {
            return match self.state {
                State::Waiting { fallback: true, .. } => Action::Pause,
                _ => Action::Continue,
            };
        };
        let Some(rule_config) = config.rules.get(*rule) else {
            return Action::Continue;
        };
        let status = host.response_status().unwrap_or(0);
        // Envoy answers for a failed upstream with a 5xx (or a 408), never a 1xx-3xx: a
        // healthy answer the rule does not retry on is let go without asking Envoy for
        // the response's details.
        if !*overflow && (100..400).contains(&status) && !rule_config.retry_on().contains(&status) {
            self.state = State::Released;
            return Action::Continue;
        }
        let details = host.response_code_details().unwrap_or_default();
        let from_upstream = details == "via_upstream";
        // Envoy answered for an upstream that reset, timed out or was not there
        // (`upstream_reset_before_response_started{…}`, `upstream_per_try_timeout`,
        // `response_timeout` for the route's timeout, `no_healthy_upstream`).
        let upstream_failed = !from_upstream
            && (details.starts_with("upstream_")
                || details == "response_timeout"
                || details == "no_healthy_upstream");
        let retryable =
            upstream_failed || (from_upstream && rule_config.retry_on().contains(&status));
        if *overflow {
            let limit = rule_config.buffer_limit_bytes();
            host.set_response_header(
                FALLBACK_HEADER,
                &format!("off; the request body is over the {limit}-byte buffer limit"),
            );
            host.count(Counter::FallbackOff, Some(&rule_config.name));
            self.state = State::Released;
            return Action::Continue;
        }
        if !retryable {
            self.state = State::Released;
            return Action::Continue;
        }
        if !*complete {
            host.set_response_header(
                FALLBACK_HEADER,
                "off; the upstream failed before the request body ended",
            );
            host.count(Counter::FallbackOff, Some(&rule_config.name));
            self.state = State::Released;
            return Action::Continue;
        }
        let State::Shadowing {
            headers,
            rule,
            body,
            ..
        } = std::mem::take(&mut self.state)
        else {
            return Action::Continue;
        };
        let upstream_status = if from_upstream { status } else { 0 };
        self.submit(host, config, headers, body, Some(rule), upstream_status);
        match self.state {
            State::Waiting { .. } => Action::Pause,
            _ => Action::Continue,
        }
    }

    /// Body of a response paused behind a fallback submission: held until it is decided.
    pub fn on_response_body(&self) -> Action {
        match self.state {
            State::Waiting { fallback: true, .. } => Action::Pause,
            _ => Action::Continue,
        }
    }

    /// The unary call `token` finished (`grpc_status` 0: its reply is `response_size`
    /// bytes in Envoy's gRPC receive buffer).
    pub fn on_grpc_response<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        token: u32,
        grpc_status: u32,
        response_size: usize,
    ) {
        if !self.waits_for(token) {
            return;
        }
        let outcome = if grpc_status == 0 {
            Outcome::Reply(host.grpc_response(response_size))
        } else {
            Outcome::Failed {
                grpc_status,
                message: host.grpc_status_message(),
            }
        };
        self.on_reply(host, config, token, outcome);
    }

    /// True while submission `token` is the one this request waits for.
    fn waits_for(&self, token: u32) -> bool {
        matches!(self.state, State::Waiting { token: t, .. } if t == token)
    }

    /// The answer to submission `token`, from a unary call or the worker's stream.
    pub fn on_reply<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        token: u32,
        outcome: Outcome,
    ) {
        let State::Waiting {
            token: t,
            fallback,
            rule,
        } = self.state
        else {
            return;
        };
        if t != token {
            return;
        }
        let rule = rule.and_then(|i| config.rules.get(i));
        let handover = rule.is_some_and(|r| r.mode == RuleMode::Handover);
        let rule = rule.map(|r| r.name.as_str());
        let (grpc_status, body, message) = match outcome {
            Outcome::Reply(body) => (0, body, None),
            Outcome::Failed {
                grpc_status,
                message,
            } => (grpc_status, None, message),
        };
        let mut response = reply::from_grpc(
            grpc_status,
            body.as_deref(),
            message.as_deref(),
            config.retry_after_s,
        );
        if response.status == 503 && grpc_status != 0 {
            host.warn(&format!(
                "knocker: control plane call failed (gRPC status {grpc_status})"
            ));
        }
        if grpc_status == GRPC_DEADLINE_EXCEEDED {
            host.count(Counter::Deadlines, rule);
        }
        if fallback && !(200..300).contains(&response.status) {
            host.count(Counter::FallbackFailed, rule);
            // No receipt: the caller gets the upstream's own answer, and why.
            let reason = reply::error_text(&response);
            host.set_response_header(FALLBACK_HEADER, &failed(&reason));
            self.state = State::Released;
            host.resume_response();
            return;
        }
        host.count(Counter::for_status(response.status), rule);
        if fallback || (handover && (200..300).contains(&response.status)) {
            host.count(Counter::FallbackTaken, rule);
        } else if handover {
            // The upstream's own failure is gone (Envoy retried past it): the caller gets
            // this answer, and why.
            host.count(Counter::FallbackFailed, rule);
            let reason = reply::error_text(&response);
            response
                .headers
                .push((FALLBACK_HEADER.to_owned(), failed(&reason)));
        }
        self.answer(host, &response);
    }

    /// True while the stream waits for the control plane.
    #[cfg(test)]
    pub(crate) fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }

    fn submit<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        headers: Vec<HeaderPair>,
        body: Vec<u8>,
        rule: Option<usize>,
        upstream_status: u32,
    ) {
        let index = rule;
        let rule = rule.and_then(|i| config.rules.get(i));
        let rule_name = rule.map(|r| r.name.as_str());
        let mut request: SubmitRequest = match rule {
            None => submit_request(headers, Mode::Knocker, ""),
            Some(r) => {
                let mut request = submit_request(headers, r.mode.proto(), &r.name);
                request.policy = Some(r.policy());
                request
            }
        };
        let fallback = rule.is_some_and(|r| r.mode == RuleMode::Fallback);
        request.body = body;
        request.upstream_status = upstream_status;
        request.downstream_address = host.downstream_address().unwrap_or_default();
        let message = request.encode_to_vec();
        let timeout = Duration::from_millis(config.timeout_ms);
        match host.dispatch_submit(&config.cluster, &message, timeout) {
            Ok(token) => {
                host.count(Counter::Submitted, rule_name);
                self.state = State::Waiting {
                    token,
                    fallback,
                    rule: index,
                };
            }
            Err(reason) => {
                host.warn(&format!("knocker: cannot call the control plane: {reason}"));
                if fallback {
                    host.count(Counter::FallbackFailed, rule_name);
                    host.set_response_header(FALLBACK_HEADER, &failed(&reason));
                    self.state = State::Released;
                } else {
                    host.count(Counter::ControlPlaneUnavailable, rule_name);
                    let mut response = Response::unavailable(&reason, config.retry_after_s);
                    if rule.is_some_and(|r| r.mode == RuleMode::Handover) {
                        host.count(Counter::FallbackFailed, rule_name);
                        response
                            .headers
                            .push((FALLBACK_HEADER.to_owned(), failed(&reason)));
                    }
                    self.answer(host, &response);
                }
            }
        }
    }

    fn answer<H: Host>(&mut self, host: &H, response: &Response) {
        let headers: Vec<(&str, &str)> = response
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        host.send_response(response.status, &headers, &response.body);
        self.state = State::Answered;
    }
}

/// The first rule that selects the request (none carrying `x-knocker`: Knocker's own
/// deliveries are never taken over again).
fn match_rule(headers: &[HeaderPair], config: &PluginConfig) -> Option<usize> {
    if config.rules.is_empty() || header(headers, "x-knocker").is_some() {
        return None;
    }
    let text = |name| header(headers, name).map_or_else(Default::default, String::from_utf8_lossy);
    let (authority, path, method) = (text(":authority"), text(":path"), text(":method"));
    let view = RequestView {
        authority: &authority,
        path: &path,
        method: &method,
    };
    config
        .rules
        .iter()
        .position(|r| r.matches(view, |name| header(headers, name).is_some()))
}

/// The first value of the request header `name` (names compare in any case, as Envoy's
/// own lookups do).
fn header<'a>(headers: &'a [HeaderPair], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The `knocker-fallback` value for a request the control plane could not take.
fn failed(reason: &str) -> String {
    format!("failed; {}", header_safe(reason))
}

/// A header value: printable ASCII only, bounded.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::has_knocker_header;
    use knocker_proto::v1::{Header, SubmitReply};
    use std::cell::RefCell;
    use std::collections::VecDeque;

    type Sent = (u32, Vec<(String, String)>, Vec<u8>);

    #[derive(Default)]
    struct FakeHost {
        headers: Vec<HeaderPair>,
        body: Vec<u8>,
        dispatch_error: Option<String>,
        grpc_reply: Vec<u8>,
        /// Body chunks of a streaming request, handed out one per `request_body` call.
        chunks: RefCell<VecDeque<Vec<u8>>>,
        status: u32,
        details: String,
        dispatched: RefCell<Vec<(String, Vec<u8>, Duration)>>,
        sent: RefCell<Vec<Sent>>,
        warnings: RefCell<Vec<String>>,
        response_headers: RefCell<Vec<(String, String)>>,
        resumed: RefCell<bool>,
        counted: RefCell<Vec<String>>,
        /// What was read from Envoy about the request and its response, in order.
        reads: RefCell<Vec<&'static str>>,
    }

    impl FakeHost {
        /// The metric names counted so far, in order.
        fn counted(&self) -> Vec<String> {
            self.counted.borrow().clone()
        }
    }

    impl Host for FakeHost {
        fn has_knocker_header(&self) -> bool {
            self.reads.borrow_mut().push("knocker scan");
            has_knocker_header(&self.headers)
        }
        fn request_headers(&self) -> Option<Vec<HeaderPair>> {
            self.reads.borrow_mut().push("request headers");
            Some(self.headers.clone())
        }
        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            if let Some(chunk) = self.chunks.borrow_mut().pop_front() {
                return Some(chunk);
            }
            self.body.get(..size).map(<[u8]>::to_vec)
        }
        fn response_status(&self) -> Option<u32> {
            self.reads.borrow_mut().push("status");
            Some(self.status)
        }
        fn response_code_details(&self) -> Option<String> {
            self.reads.borrow_mut().push("details");
            Some(self.details.clone())
        }
        fn set_response_header(&self, name: &str, value: &str) {
            self.response_headers
                .borrow_mut()
                .push((name.into(), value.into()));
        }
        fn resume_response(&self) {
            *self.resumed.borrow_mut() = true;
        }
        fn downstream_address(&self) -> Option<String> {
            Some("127.0.0.1:5555".into())
        }
        fn dispatch_submit(&self, cluster: &str, m: &[u8], t: Duration) -> Result<u32, String> {
            if let Some(e) = &self.dispatch_error {
                return Err(e.clone());
            }
            self.dispatched
                .borrow_mut()
                .push((cluster.into(), m.to_vec(), t));
            Ok(7)
        }
        fn grpc_response(&self, size: usize) -> Option<Vec<u8>> {
            self.grpc_reply.get(..size).map(<[u8]>::to_vec)
        }
        fn count(&self, counter: Counter, rule: Option<&str>) {
            let mut counted = self.counted.borrow_mut();
            counted.push(crate::metrics::metric_name(counter, None));
            if rule.is_some() {
                counted.push(crate::metrics::metric_name(counter, rule));
            }
        }
        fn grpc_status_message(&self) -> Option<String> {
            Some("no healthy upstream".into())
        }
        fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
            let headers = headers
                .iter()
                .map(|(n, v)| ((*n).into(), (*v).into()))
                .collect();
            self.sent
                .borrow_mut()
                .push((status, headers, body.to_vec()));
        }
        fn warn(&self, message: &str) {
            self.warnings.borrow_mut().push(message.into());
        }
    }

    fn request(extra: &[(&str, &str)]) -> Vec<HeaderPair> {
        let mut h: Vec<HeaderPair> = [
            (":method", "POST"),
            (":path", "/p?q=1"),
            (":authority", "a"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
        .collect();
        h.extend(
            extra
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())),
        );
        h
    }

    #[test]
    fn pass_through_is_untouched() {
        let host = FakeHost {
            headers: request(&[("accept", "*/*")]),
            ..Default::default()
        };
        let config = PluginConfig::default();
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&host, &config, false),
            Action::Continue
        );
        assert_eq!(
            s.on_request_body(&host, &config, 10, true),
            Action::Continue
        );
        assert_eq!(s.on_request_trailers(&host, &config, 10), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());
        assert!(host.sent.borrow().is_empty());
    }

    #[test]
    fn knocker_request_is_buffered_submitted_and_answered() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t.example"), ("x-a", "1")]),
            body: b"hello world".to_vec(),
            grpc_reply: SubmitReply {
                status: 200,
                headers: vec![Header {
                    name: b"content-type".to_vec(),
                    value: b"application/json".to_vec(),
                }],
                body: b"{\"status\":true}".to_vec(),
            }
            .encode_to_vec(),
            ..Default::default()
        };
        let config = PluginConfig {
            timeout_ms: 1500,
            ..PluginConfig::default()
        };
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(s.on_request_body(&host, &config, 5, false), Action::Pause);
        assert!(
            host.dispatched.borrow().is_empty(),
            "waits for the whole body"
        );
        assert_eq!(s.on_request_body(&host, &config, 11, true), Action::Pause);
        assert!(s.is_waiting());
        let dispatched = host.dispatched.borrow();
        let (cluster, message, timeout) = dispatched.first().cloned().unwrap_or_default();
        assert_eq!(cluster, "knocker_control_plane");
        assert_eq!(timeout, Duration::from_millis(1500));
        let req = SubmitRequest::decode(message.as_slice()).unwrap_or_default();
        assert_eq!(req.body, b"hello world");
        assert_eq!(req.path, "/p?q=1");
        assert_eq!(req.downstream_address, "127.0.0.1:5555");
        assert_eq!(req.headers.len(), 2);
        drop(dispatched);

        let size = host.grpc_reply.len();
        s.on_grpc_response(&host, &config, 99, 0, size); // not our token: ignored
        assert!(host.sent.borrow().is_empty());
        s.on_grpc_response(&host, &config, 7, 0, size);
        let sent = host.sent.borrow();
        assert_eq!(sent.len(), 1);
        let (status, headers, body) = sent.first().cloned().unwrap_or_default();
        assert_eq!(status, 200);
        assert_eq!(
            headers,
            vec![("content-type".into(), "application/json".into())]
        );
        assert_eq!(body, b"{\"status\":true}");
        assert_eq!(host.counted(), ["knocker.submitted", "knocker.receipts"]);
    }

    #[test]
    fn bodiless_request_is_submitted_from_the_headers() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t")]),
            ..Default::default()
        };
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&host, &PluginConfig::default(), true),
            Action::Pause
        );
        assert_eq!(host.dispatched.borrow().len(), 1);
    }

    #[test]
    fn grpc_failure_answers_503_never_a_receipt() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t")]),
            ..Default::default()
        };
        let config = PluginConfig::default();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, true);
        s.on_grpc_response(&host, &config, 7, 14, 0);
        let sent = host.sent.borrow();
        let (status, headers, body) = sent.first().cloned().unwrap_or_default();
        assert_eq!(status, 503);
        assert!(headers.contains(&("retry-after".into(), "1".into())));
        assert!(String::from_utf8_lossy(&body).contains("no healthy upstream"));
        assert_eq!(host.warnings.borrow().len(), 1);
        assert_eq!(
            host.counted(),
            ["knocker.submitted", "knocker.control_plane_unavailable"]
        );
    }

    #[test]
    fn a_deadline_is_counted_as_one_and_as_unavailable() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t")]),
            ..Default::default()
        };
        let config = PluginConfig::default();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, true);
        s.on_reply(
            &host,
            &config,
            7,
            Outcome::Failed {
                grpc_status: GRPC_DEADLINE_EXCEEDED,
                message: Some("no reply within 1000 ms".into()),
            },
        );
        assert_eq!(host.sent.borrow().first().map(|r| r.0), Some(503));
        assert_eq!(
            host.counted(),
            [
                "knocker.submitted",
                "knocker.deadlines",
                "knocker.control_plane_unavailable"
            ]
        );
    }

    #[test]
    fn dispatch_error_answers_503_at_once() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t")]),
            dispatch_error: Some("unknown cluster".into()),
            ..Default::default()
        };
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&host, &PluginConfig::default(), true),
            Action::Pause
        );
        assert_eq!(host.sent.borrow().first().map(|r| r.0), Some(503));
        assert!(!s.is_waiting());
    }

    #[test]
    fn trailers_end_the_body() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t")]),
            body: b"abc".to_vec(),
            ..Default::default()
        };
        let config = PluginConfig::default();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, false);
        s.on_request_body(&host, &config, 3, false);
        assert_eq!(s.on_request_trailers(&host, &config, 3), Action::Pause);
        assert!(s.is_waiting());
    }

    fn rules_config() -> PluginConfig {
        PluginConfig::parse(
            br#"{"rules":[
              {"name":"cap","mode":"capture","match":{"path_prefix":"/orders"},
               "delivery":{"target":"http://t:1","ordered":true}},
              {"name":"fb","mode":"fallback","match":{"path_prefix":"/api"},
               "delivery":{"target":"http://u:2"},"buffer_limit_bytes":8}]}"#,
        )
        .unwrap()
    }

    fn with_path(path: &str, extra: &[(&str, &str)]) -> Vec<HeaderPair> {
        let mut h = request(extra);
        for (n, v) in &mut h {
            if n == ":path" {
                *v = path.as_bytes().to_vec();
            }
        }
        h
    }

    fn dispatched_request(host: &FakeHost) -> SubmitRequest {
        let dispatched = host.dispatched.borrow();
        let message = dispatched.first().map(|d| d.1.clone()).unwrap_or_default();
        SubmitRequest::decode(message.as_slice()).unwrap()
    }

    fn receipt() -> Vec<u8> {
        SubmitReply {
            status: 202,
            headers: vec![],
            body: b"{}".to_vec(),
        }
        .encode_to_vec()
    }

    #[test]
    fn capture_rule_buffers_and_submits_with_its_policy() {
        let host = FakeHost {
            headers: with_path("/orders/7", &[]),
            body: b"data".to_vec(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(s.on_request_body(&host, &config, 4, true), Action::Pause);
        let req = dispatched_request(&host);
        assert_eq!(req.mode, Mode::Capture as i32);
        assert_eq!(req.rule, "cap");
        assert_eq!(req.body, b"data");
        let policy = req.policy.unwrap();
        assert_eq!(policy.target, "http://t:1");
        assert!(policy.ordered);
    }

    #[test]
    fn broadcast_rule_buffers_and_submits_its_group() {
        let host = FakeHost {
            headers: with_path("/page", &[]),
            ..Default::default()
        };
        let config = PluginConfig::parse(
            br#"{"rules":[{"name":"purge","mode":"broadcast","group":"caches"}]}"#,
        )
        .unwrap();
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, true), Action::Pause);
        let req = dispatched_request(&host);
        assert_eq!(req.mode, Mode::Broadcast as i32);
        assert_eq!(req.rule, "purge");
        assert_eq!(req.policy.unwrap().group, "caches");
    }

    #[test]
    fn knocker_host_wins_over_rules_and_x_knocker_skips_them() {
        let config = rules_config();
        let host = FakeHost {
            headers: with_path("/orders", &[("knocker-host", "k")]),
            ..Default::default()
        };
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, true);
        assert_eq!(dispatched_request(&host).mode, Mode::Knocker as i32);

        let host = FakeHost {
            headers: with_path("/orders", &[("x-knocker", "1.0")]),
            ..Default::default()
        };
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, true), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());

        let host = FakeHost {
            headers: with_path("/elsewhere", &[]),
            ..Default::default()
        };
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, true), Action::Continue);
    }

    #[test]
    fn fallback_passes_a_success_through_untouched() {
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            chunks: RefCell::new(VecDeque::from([b"abc".to_vec()])),
            status: 200,
            details: "via_upstream".into(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        // Held until the body has ended, then everything goes upstream.
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(s.on_request_body(&host, &config, 3, true), Action::Continue);
        assert_eq!(s.on_response_headers(&host, &config), Action::Continue);
        assert_eq!(s.on_response_body(), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());
        assert!(host.response_headers.borrow().is_empty());
        // Each read crosses between Envoy and the VM: the headers are copied once (the
        // rules match on the copy), and a healthy status needs no response details.
        assert_eq!(*host.reads.borrow(), ["request headers", "status"]);
    }

    #[test]
    fn a_knocker_request_without_rules_is_scanned_then_copied_once() {
        let host = FakeHost {
            headers: request(&[("knocker-host", "t:1")]),
            ..Default::default()
        };
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&host, &PluginConfig::default(), true),
            Action::Pause
        );
        assert_eq!(*host.reads.borrow(), ["knocker scan", "request headers"]);
        assert_eq!(host.dispatched.borrow().len(), 1);
    }

    #[test]
    fn fallback_hands_a_failed_request_over_with_its_body() {
        for (status, details, upstream_status) in [
            (503, "via_upstream", 503),
            (
                503,
                "upstream_reset_before_response_started{connection_failure}",
                0,
            ),
            (504, "response_timeout", 0),
            (504, "upstream_per_try_timeout", 0),
        ] {
            // Envoy holds the body: each call sees all of it so far.
            let host = FakeHost {
                headers: with_path("/api/x", &[]),
                body: b"abcde".to_vec(),
                status,
                details: details.into(),
                grpc_reply: receipt(),
                ..Default::default()
            };
            let config = rules_config();
            let mut s = Stream::default();
            assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
            assert_eq!(s.on_request_body(&host, &config, 3, false), Action::Pause);
            assert_eq!(s.on_request_body(&host, &config, 5, true), Action::Continue);
            assert_eq!(s.on_response_headers(&host, &config), Action::Pause);
            assert_eq!(s.on_response_body(), Action::Pause);
            let req = dispatched_request(&host);
            assert_eq!(req.mode, Mode::Fallback as i32);
            assert_eq!(req.body, b"abcde");
            assert_eq!(req.upstream_status, upstream_status);
            s.on_grpc_response(&host, &config, 7, 0, host.grpc_reply.len());
            assert_eq!(host.sent.borrow().first().map(|r| r.0), Some(202));
            assert_eq!(
                host.counted(),
                [
                    "knocker.submitted",
                    "knocker.rule.fb.submitted",
                    "knocker.receipts",
                    "knocker.rule.fb.receipts",
                    "knocker.fallback_taken",
                    "knocker.rule.fb.fallback_taken",
                ]
            );
        }
    }

    fn handover_config() -> PluginConfig {
        PluginConfig::parse(
            br#"{"rules":[{"name":"app","mode":"handover","delivery":{"target":"http://u:2"}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn handover_stores_the_request_as_a_fallback_job_at_once() {
        let host = FakeHost {
            headers: with_path("/orders", &[]),
            body: b"abcde".to_vec(),
            grpc_reply: receipt(),
            ..Default::default()
        };
        let config = handover_config();
        let mut s = Stream::default();
        // Buffered whole and submitted, as capture does: the upstream already failed.
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(s.on_request_body(&host, &config, 5, true), Action::Pause);
        let req = dispatched_request(&host);
        assert_eq!(req.mode, Mode::Fallback as i32);
        assert_eq!(req.rule, "app");
        assert_eq!(req.body, b"abcde");
        assert_eq!(req.policy.unwrap().target, "http://u:2");
        s.on_grpc_response(&host, &config, 7, 0, host.grpc_reply.len());
        let sent = host.sent.borrow();
        assert_eq!(sent.first().map(|r| r.0), Some(202));
        assert!(sent[0].1.iter().all(|(n, _)| n != FALLBACK_HEADER));
        assert_eq!(
            host.counted(),
            [
                "knocker.submitted",
                "knocker.rule.app.submitted",
                "knocker.receipts",
                "knocker.rule.app.receipts",
                "knocker.fallback_taken",
                "knocker.rule.app.fallback_taken",
            ]
        );
    }

    #[test]
    fn handover_says_why_when_the_control_plane_fails() {
        // The call fails (gRPC UNAVAILABLE), or cannot even be made.
        for dispatch_error in [None, Some("no cluster".to_owned())] {
            let host = FakeHost {
                headers: with_path("/orders", &[]),
                dispatch_error: dispatch_error.clone(),
                ..Default::default()
            };
            let config = handover_config();
            let mut s = Stream::default();
            s.on_request_headers(&host, &config, true);
            if dispatch_error.is_none() {
                s.on_grpc_response(&host, &config, 7, 14, 0);
            }
            let sent = host.sent.borrow();
            assert_eq!(sent.first().map(|r| r.0), Some(503), "{dispatch_error:?}");
            let why = sent[0].1.iter().find(|(n, _)| n == FALLBACK_HEADER);
            assert!(
                why.is_some_and(|(_, v)| v.starts_with("failed; ")),
                "{:?}",
                sent[0].1
            );
            assert!(host
                .counted()
                .contains(&"knocker.rule.app.fallback_failed".to_owned()));
            assert!(!host
                .counted()
                .contains(&"knocker.rule.app.fallback_taken".to_owned()));
        }
    }

    #[test]
    fn handover_rules_take_no_fallback_only_fields() {
        let err = PluginConfig::parse(
            br#"{"rules":[{"name":"app","mode":"handover","delivery":{"target":"http://u:2"},"buffer_limit_bytes":8}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("buffer_limit_bytes"), "{err}");
    }

    #[test]
    fn fallback_lets_the_error_through_when_the_control_plane_fails() {
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            status: 502,
            details: "via_upstream".into(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, true);
        assert_eq!(s.on_response_headers(&host, &config), Action::Pause);
        s.on_grpc_response(&host, &config, 7, 14, 0);
        assert!(host.sent.borrow().is_empty(), "no local reply");
        assert!(*host.resumed.borrow());
        let headers = host.response_headers.borrow();
        let (name, value) = headers.first().cloned().unwrap_or_default();
        assert_eq!(name, FALLBACK_HEADER);
        assert!(value.starts_with("failed; "), "{value}");
        assert!(host
            .counted()
            .contains(&"knocker.rule.fb.fallback_failed".to_owned()));
    }

    #[test]
    fn fallback_over_the_buffer_limit_says_so() {
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            body: b"123456789".to_vec(),
            status: 503,
            details: "via_upstream".into(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, false);
        // Held while within the 8-byte limit; let go (no copy) once over it.
        assert_eq!(s.on_request_body(&host, &config, 5, false), Action::Pause);
        assert_eq!(
            s.on_request_body(&host, &config, 9, false),
            Action::Continue
        );
        assert_eq!(s.on_request_body(&host, &config, 4, true), Action::Continue);
        assert_eq!(s.on_response_headers(&host, &config), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());
        let headers = host.response_headers.borrow();
        assert!(headers
            .first()
            .is_some_and(|(n, v)| n == FALLBACK_HEADER && v.contains("8-byte buffer limit")));
        assert_eq!(
            host.counted(),
            ["knocker.fallback_off", "knocker.rule.fb.fallback_off"]
        );
    }

    #[test]
    fn fallback_lets_a_body_over_the_limit_stream_and_an_early_answer_through() {
        // Over the rule's 8-byte limit: no copy, the body streams on as it comes.
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            body: b"123456789de".to_vec(),
            status: 200,
            details: "via_upstream".into(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(
            s.on_request_body(&host, &config, 9, false),
            Action::Continue
        );
        assert_eq!(s.on_response_headers(&host, &config), Action::Continue);
        assert_eq!(s.on_request_body(&host, &config, 2, true), Action::Continue);
        assert_eq!(s.on_request_trailers(&host, &config, 2), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());
    }

    #[test]
    fn fallback_takes_its_copy_at_the_trailers_when_they_end_the_body() {
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            body: b"abc".to_vec(),
            status: 503,
            details: "via_upstream".into(),
            grpc_reply: receipt(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        assert_eq!(s.on_request_headers(&host, &config, false), Action::Pause);
        assert_eq!(s.on_request_body(&host, &config, 3, false), Action::Pause);
        assert_eq!(s.on_request_trailers(&host, &config, 3), Action::Continue);
        assert_eq!(s.on_response_headers(&host, &config), Action::Pause);
        assert_eq!(dispatched_request(&host).body, b"abc");
    }

    #[test]
    fn fallback_ignores_statuses_outside_retry_on() {
        let host = FakeHost {
            headers: with_path("/api/x", &[]),
            status: 500,
            details: "via_upstream".into(),
            ..Default::default()
        };
        let config = rules_config();
        let mut s = Stream::default();
        s.on_request_headers(&host, &config, true);
        assert_eq!(s.on_response_headers(&host, &config), Action::Continue);
        assert!(host.dispatched.borrow().is_empty());
    }
}
