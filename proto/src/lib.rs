//! Protocol buffers for the link between the Envoy filter and the control plane.
//!
//! Layout:
//! - `knocker/v1/*.proto` — the source of truth.
//! - `src/gen/` — code generated from it, checked in so that no build (the wasm one
//!   included) needs `protoc` or a build script. `tests/generated.rs` regenerates it
//!   with `protox` and fails when the checked-in copy is stale; run it with
//!   `KNOCKER_REGENERATE=1` to rewrite the files.
//!
//! The tonic client and server are behind the `grpc` feature so that the wasm filter
//! pulls in prost messages only.

/// `knocker.v1`: messages, plus the gRPC service with the `grpc` feature.
pub mod v1 {
    include!("gen/knocker.v1.rs");

    #[cfg(feature = "grpc")]
    include!("gen/knocker.v1.grpc.rs");
}

/// The fully qualified gRPC service name, as the filter's `dispatch_grpc_call` needs it.
pub const INGRESS_SERVICE: &str = "knocker.v1.Ingress";
/// The method of [`INGRESS_SERVICE`] the filter calls.
pub const INGRESS_SUBMIT: &str = "Submit";
/// The streaming method of [`INGRESS_SERVICE`]: one long-lived stream per Envoy worker.
pub const INGRESS_SUBMIT_STREAM: &str = "SubmitStream";
