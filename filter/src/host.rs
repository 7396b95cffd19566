//! What the filter logic needs from Envoy, as a trait: the wasm glue implements it with
//! proxy-wasm host calls, the unit tests with a fake.

use std::time::Duration;

use crate::metrics::Counter;

/// Header name and value as bytes, in the order Envoy holds them.
pub type HeaderPair = (String, Vec<u8>);

pub trait Host {
    /// True when any request header name starts with `knocker-` (the cheap check).
    fn has_knocker_header(&self) -> bool;
    /// All request headers, pseudo-headers included. `None` when Envoy refuses.
    fn request_headers(&self) -> Option<Vec<HeaderPair>>;
    /// The buffered request body (`size` bytes from the start); while the body streams
    /// on, the chunk Envoy is passing.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// The response's `:status`.
    fn response_status(&self) -> Option<u32>;
    /// Envoy's `response.code_details`: `via_upstream` when the upstream answered,
    /// `upstream_reset_…`, `upstream_response_timeout`, … when Envoy did.
    fn response_code_details(&self) -> Option<String>;
    /// Sets a response header (while the response headers are being processed).
    fn set_response_header(&self, name: &str, value: &str);
    /// Lets a paused response go on to the client.
    fn resume_response(&self);
    /// The downstream peer, `ip:port`.
    fn downstream_address(&self) -> Option<String>;
    /// Starts the unary gRPC call; returns its token. The error is a printable reason.
    fn dispatch_submit(
        &self,
        cluster: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, String>;
    /// The body of a finished gRPC call's response.
    fn grpc_response(&self, size: usize) -> Option<Vec<u8>>;
    /// The status message of a failed gRPC call, when Envoy has one.
    fn grpc_status_message(&self) -> Option<String>;
    /// Answers the client locally; the request goes no further.
    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Logs at warning level.
    fn warn(&self, message: &str);
    /// Adds one to `counter`, and to the rule's own when a rule took the request.
    fn count(&self, counter: Counter, rule: Option<&str>);
}
