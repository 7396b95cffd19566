//! What the filter logic needs from Envoy, as a trait: the wasm glue implements it with
//! proxy-wasm host calls, the unit tests with a fake.

use std::time::Duration;

/// Header name and value as bytes, in the order Envoy holds them.
pub type HeaderPair = (String, Vec<u8>);

pub trait Host {
    /// True when any request header name starts with `knocker-` (the cheap check).
    fn has_knocker_header(&self) -> bool;
    /// All request headers, pseudo-headers included. `None` when Envoy refuses.
    fn request_headers(&self) -> Option<Vec<HeaderPair>>;
    /// The buffered request body (`size` bytes from the start).
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
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
}
