//! `knocker-filter`: the Envoy proxy-wasm filter of Knocker.
//!
//! It looks at each request's headers. A request with no `Knocker-*` header continues
//! untouched — that path is one host call and a scan without allocation. A Knocker
//! request is buffered (body included), sent to the control plane on the worker's
//! long-lived gRPC stream (`knocker.v1.Ingress/SubmitStream`; a unary
//! `knocker.v1.Ingress/Submit` while that stream is opening), and answered with the
//! control plane's reply. If the control plane cannot be reached in time the client gets
//! `503` with a JSON error and `Retry-After`, never a receipt.
//!
//! With rules configured, requests without `Knocker-Host` that a rule selects are taken
//! over too: `capture` and `broadcast` like a Knocker request (with the rule's policy or
//! group), `fallback` only when the upstream's answer is a retryable failure.
//!
//! Layout:
//! - [`config`] — the plugin configuration (JSON), validated in `on_configure`.
//! - [`classify`] — is this a Knocker request? (the hot path).
//! - [`rules`] — capture and fallback rules: which requests, which delivery policy.
//! - [`message`] — builds the `SubmitRequest` from the request.
//! - [`metrics`] — the filter's counters (Envoy stats, tagged by rule).
//! - [`reply`] — turns the control plane's answer, or its absence, into a response.
//! - [`host`] — the small trait the logic needs from Envoy.
//! - [`link`] — the worker's stream to the control plane: submissions waiting for replies.
//! - [`stream`] — the per-request state machine, written against [`host::Host`] and
//!   unit-tested natively with a fake host.
//! - `wasm` — the thin proxy-wasm glue.
//!
//! Nothing here may panic: clippy denies `unwrap`, `expect`, `panic` and indexing.

pub mod classify;
pub mod config;
pub mod host;
pub mod link;
pub mod message;
pub mod metrics;
pub mod reply;
pub mod rules;
pub mod stream;

// Compiled on every target so clippy and the native build check the glue too; only
// the wasm32 build is loaded by Envoy.
mod wasm;
