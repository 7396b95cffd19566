//! `knocker`: the control plane of Knocker for Envoy.
//!
//! Requests arrive through the Envoy filter (gRPC) or directly (HTTP), become jobs that
//! are committed to the store before any receipt is given, and are delivered in the
//! background with retries, backoff and failure callbacks (the Knocker protocol).
//!
//! # Layout
//!
//! Layers, bottom to top. A module imports only from its own layer or below, and no two
//! modules import each other, directly or round a loop (`tests/layers.rs` fails the
//! build's tests otherwise):
//!
//! 1. **Foundations** — [`clock`] (injected time, RFC 3339), [`hosts_only`], [`metrics`]
//!    (the Prometheus registry every layer records into), [`redact`], [`token`],
//!    [`trace_context`] (W3C trace context and where spans go), [`validate`] (the error
//!    a refused configuration value becomes).
//! 2. **The job model** — [`job`]: a job, its policy ([`job::policy::DeliveryPolicy`],
//!    the one configured policy type), the protocol's header rules ([`job::spec`]),
//!    filter rules ([`job::rule`]), receipts.
//! 3. **Storage and the way out** — [`store`] (the [`store::Store`] trait, its engines
//!    behind [`store::Engine`]); [`outbound`] (the one door every outgoing request
//!    leaves by, and the policy client-chosen destinations pass on every hop).
//! 4. **Delivery** — [`delivery`]: due jobs → a transport per job kind (HTTP, email) →
//!    delivered, retried or failed (+ callback); observers hear of every attempt.
//! 5. **Use cases** — [`submit`] (the one submit path, broadcast fan-out included),
//!    [`broadcast`] (groups, member jobs, agents), [`notify`] (webhook and email
//!    notifications), [`monitor`] (checks, thresholds, history, uptime), [`retention`].
//! 6. **Edges** — [`ingress`] (the gRPC and HTTP doors), [`api`] (the admin API, one
//!    router), [`cli`], [`echo`], [`telemetry`] (logs, Sentry, the `/metrics` handler, OTLP traces).
//! 7. **Configuration** — [`config`]: flags, environment and file, validated once and
//!    nested by subsystem; each part goes only to its subsystem.
//! 8. **Wiring** — [`server`]: builds the parts from the configuration and runs them;
//!    `main` parses the command line.

pub mod api;
pub mod broadcast;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod echo;
pub mod hosts_only;
pub mod ingress;
pub mod job;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod outbound;
pub mod redact;
pub mod retention;
pub mod server;
pub mod store;
pub mod submit;
pub mod telemetry;
pub mod token;
pub mod trace_context;
pub mod validate;

pub use server::{serve, Listeners};
