//! One HTTP stream through the filter, as a state machine over [`Host`].

use std::time::Duration;

use knocker_proto::v1::Mode;
use prost::Message;

use crate::config::PluginConfig;
use crate::host::Host;
use crate::message::submit_request;
use crate::reply::{self, Response};

/// What Envoy should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

#[derive(Debug, Default)]
enum State {
    /// Not ours (or not yet looked at): Envoy carries on.
    #[default]
    PassThrough,
    /// A Knocker request whose body is still arriving.
    Buffering {
        headers: Vec<crate::host::HeaderPair>,
    },
    /// The gRPC call is out; the client waits.
    Waiting { token: u32 },
    /// A local response was sent.
    Answered,
}

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
        if !host.has_knocker_header() {
            return Action::Continue;
        }
        let Some(headers) = host.request_headers() else {
            host.warn("knocker: request headers unavailable; passing the request through");
            return Action::Continue;
        };
        if end_of_stream {
            self.submit(host, config, headers, Vec::new());
        } else {
            self.state = State::Buffering { headers };
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
        match self.state {
            State::PassThrough => Action::Continue,
            State::Buffering { .. } if !end_of_stream => Action::Pause, // Envoy keeps buffering
            State::Buffering { .. } => {
                let State::Buffering { headers } = std::mem::take(&mut self.state) else {
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
                self.submit(host, config, headers, body);
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
        if matches!(self.state, State::Buffering { .. }) {
            return self.on_request_body(host, config, body_size, true);
        }
        if matches!(self.state, State::PassThrough) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    pub fn on_grpc_response<H: Host>(
        &mut self,
        host: &H,
        config: &PluginConfig,
        token: u32,
        grpc_status: u32,
        response_size: usize,
    ) {
        if !matches!(self.state, State::Waiting { token: t } if t == token) {
            return;
        }
        let body = if grpc_status == 0 {
            host.grpc_response(response_size)
        } else {
            None
        };
        let message = if grpc_status == 0 {
            None
        } else {
            host.grpc_status_message()
        };
        let response = reply::from_grpc(
            grpc_status,
            body.as_deref(),
            message.as_deref(),
            config.retry_after_s,
        );
        if response.status == 503 && grpc_status != 0 {
            host.warn(&format!(
                "knocker: control plane call failed (gRPC status {grpc_status}); answered 503"
            ));
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
        headers: Vec<crate::host::HeaderPair>,
        body: Vec<u8>,
    ) {
        let mut request = submit_request(headers, Mode::Knocker, "");
        request.body = body;
        request.downstream_address = host.downstream_address().unwrap_or_default();
        let message = request.encode_to_vec();
        let timeout = Duration::from_millis(config.timeout_ms);
        match host.dispatch_submit(&config.cluster, &message, timeout) {
            Ok(token) => self.state = State::Waiting { token },
            Err(reason) => {
                host.warn(&format!("knocker: cannot call the control plane: {reason}"));
                self.answer(host, &Response::unavailable(&reason, config.retry_after_s));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::has_knocker_header;
    use crate::host::HeaderPair;
    use knocker_proto::v1::{Header, SubmitReply, SubmitRequest};
    use std::cell::RefCell;

    type Sent = (u32, Vec<(String, String)>, Vec<u8>);

    #[derive(Default)]
    struct FakeHost {
        headers: Vec<HeaderPair>,
        body: Vec<u8>,
        dispatch_error: Option<String>,
        grpc_reply: Vec<u8>,
        dispatched: RefCell<Vec<(String, Vec<u8>, Duration)>>,
        sent: RefCell<Vec<Sent>>,
        warnings: RefCell<Vec<String>>,
    }

    impl Host for FakeHost {
        fn has_knocker_header(&self) -> bool {
            has_knocker_header(&self.headers)
        }
        fn request_headers(&self) -> Option<Vec<HeaderPair>> {
            Some(self.headers.clone())
        }
        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            self.body.get(..size).map(<[u8]>::to_vec)
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
}
