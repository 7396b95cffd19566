//! gRPC ingress, called by the Envoy filter: `knocker.v1.Ingress/SubmitStream`, one
//! long-lived stream per Envoy worker carrying many submissions, and the unary
//! `knocker.v1.Ingress/Submit` the filter falls back to while its stream (re)opens.
//!
//! A stream is read and its submissions driven by one task, each submission a future of
//! its own, so a slow commit holds up nothing behind it; replies go back as each is
//! ready, tagged with the submission's id. (A task per submission cost the control
//! plane ~2 µs more per job through Envoy: spawning, moving and freeing each task.)
//! At most [`STREAM_IN_FLIGHT`] submissions of one stream are handled at once; beyond
//! that the stream is not read, and HTTP/2 flow control slows the sender down.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, Stream, StreamExt as _};
use knocker_proto::v1::ingress_server::{Ingress as IngressService, IngressServer};
use knocker_proto::v1::{Header, Mode, StreamReply, StreamSubmit, SubmitReply, SubmitRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use super::{body_too_large, Doors};
use crate::job::policy::DeliveryPolicy;
use crate::job::retry::StatusEntry;
use crate::job::rule::{RuleMode, RuleSubmission};
use crate::job::spec::{BroadcastRule, Submission};
use crate::metrics::Door;
use crate::submit::{Reply, Submitter};

pub struct GrpcIngress {
    ingress: Arc<Submitter>,
    max_body_bytes: usize,
    /// Ends the open streams (after their replies) so that a graceful shutdown is not
    /// held up by streams the filters would keep open for ever.
    shutdown: CancellationToken,
}

/// The tonic service, accepting messages up to the body limit plus room for headers,
/// from callers that present `KNOCKER_GRPC_TOKEN` (when it is set).
pub fn service(
    ingress: Arc<Submitter>,
    doors: &Doors,
    shutdown: CancellationToken,
) -> InterceptedService<IngressServer<GrpcIngress>, Authenticate> {
    let limit = doors.max_body_bytes.saturating_add(256 * 1024);
    let auth = Authenticate {
        token: doors.grpc_token.as_str().into(),
    };
    let grpc = GrpcIngress {
        ingress,
        max_body_bytes: doors.max_body_bytes,
        shutdown,
    };
    InterceptedService::new(
        IngressServer::new(grpc).max_decoding_message_size(limit),
        auth,
    )
}

/// The gRPC door's caller check: `authorization: Bearer <KNOCKER_GRPC_TOKEN>`, compared
/// in constant time; anything else is `UNAUTHENTICATED` before a message is read, so
/// nothing is stored.
#[derive(Clone)]
pub struct Authenticate {
    token: Arc<str>,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.token.is_empty() {
            return Ok(request);
        }
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if crate::token::same_secret(given, &self.token) {
            Ok(request)
        } else {
            tracing::warn!("gRPC call refused: no valid KNOCKER_GRPC_TOKEN");
            Err(Status::unauthenticated(
                "authorization: a valid bearer token (the filter's grpc_token) is required",
            ))
        }
    }
}

/// Submissions of one stream handled at once.
pub const STREAM_IN_FLIGHT: usize = 4096;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<StreamReply, Status>> + Send>>;

#[tonic::async_trait]
impl IngressService for GrpcIngress {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        Ok(Response::new(
            handle(&self.ingress, self.max_body_bytes, request.into_inner()).await,
        ))
    }

    type SubmitStreamStream = ReplyStream;

    async fn submit_stream(
        &self,
        request: Request<Streaming<StreamSubmit>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<StreamReply, Status>>(STREAM_IN_FLIGHT);
        let ingress = Arc::clone(&self.ingress);
        let shutdown = self.shutdown.clone();
        let max_body_bytes = self.max_body_bytes;
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    biased;
                    Some(reply) = in_flight.next() => {
                        // The stream may be gone (Envoy restarted): the job is committed
                        // all the same, as after a unary call whose caller timed out.
                        let _ = tx.send(Ok(reply)).await;
                    }
                    // Replies to what was read still go out, then the end.
                    () = shutdown.cancelled(), if reading => reading = false,
                    next = inbound.message(), if reading && in_flight.len() < STREAM_IN_FLIGHT => {
                        match next {
                            Ok(Some(submit)) => {
                                in_flight.push(reply_to(&ingress, max_body_bytes, submit));
                            }
                            Ok(None) => reading = false, // the filter closed its side
                            Err(status) => {
                                tracing::debug!(%status, "submit stream ended");
                                reading = false;
                            }
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The reply to one submission of a stream, tagged with its id. A submission that
/// panics fails alone (503, as when its reply does not come), not its stream.
async fn reply_to(ingress: &Submitter, max_body_bytes: usize, submit: StreamSubmit) -> StreamReply {
    let reply = match submit.request {
        Some(request) => alone(handle(ingress, max_body_bytes, request)).await,
        None => to_proto(Reply::error(
            400,
            "request",
            "A stream submission needs its request.",
        )),
    };
    StreamReply {
        id: submit.id,
        reply: Some(reply),
    }
}

/// `submission`, or a 503 if it panics: the panic stays with it. A combinator, not an
/// `async fn`: that would keep the submission's future twice over (as its argument and
/// as what it awaits), and every submission of a stream is moved into it.
fn alone(submission: impl Future<Output = SubmitReply>) -> impl Future<Output = SubmitReply> {
    AssertUnwindSafe(submission).catch_unwind().map(|done| {
        done.unwrap_or_else(|_| {
            to_proto(Reply::error(
                503,
                "request",
                "The control plane failed while taking this submission; send it again.",
            ))
        })
    })
}

/// One submission from the filter, whichever method carried it.
pub async fn handle(
    ingress: &Submitter,
    max_body_bytes: usize,
    mut r: SubmitRequest,
) -> SubmitReply {
    if r.body.len() > max_body_bytes {
        return to_proto(Reply::error(413, "body", &body_too_large(max_body_bytes)));
    }
    let (rule, broadcast_rule) = match rule_submission(&mut r) {
        Ok(Taken::Knocker) => (None, None),
        Ok(Taken::Rule(rule)) => (Some(rule), None),
        Ok(Taken::Broadcast(b)) => (None, Some(b)),
        Err(reply) => return to_proto(reply),
    };
    let submission = Submission {
        method: r.method,
        path: r.path,
        headers: r
            .headers
            .into_iter()
            .map(|h| (header_name(h.name), h.value))
            .collect(),
        body: r.body,
        remote: Some(r.downstream_address).filter(|a| !a.is_empty()),
        authority: Some(r.authority).filter(|a| !a.is_empty()),
        rule,
        broadcast_rule,
    };
    to_proto(ingress.submit_by(Door::Grpc, submission).await)
}

/// A header name as sent (its bytes kept, not copied), or with U+FFFD for what is not
/// UTF-8 (the submission check then refuses it by name).
fn header_name(name: Vec<u8>) -> String {
    String::from_utf8(name).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Why the filter handed a request over.
enum Taken {
    Knocker,
    Rule(RuleSubmission),
    Broadcast(BroadcastRule),
}

/// The rule part of a filter submission; a 400 naming the field when the mode and the
/// policy do not fit together.
fn rule_submission(r: &mut SubmitRequest) -> Result<Taken, Reply> {
    let mode = match Mode::try_from(r.mode) {
        Ok(Mode::Knocker | Mode::Unspecified) => return Ok(Taken::Knocker),
        Ok(mode) => mode,
        Err(_) => {
            return Err(Reply::error(
                400,
                "mode",
                &format!("Mode {} is not supported by this control plane.", r.mode),
            ))
        }
    };
    let Some(policy) = r.policy.take() else {
        return Err(Reply::error(
            400,
            "policy",
            "A rule submission needs the rule's delivery policy.",
        ));
    };
    let rule = std::mem::take(&mut r.rule);
    let mode = match mode {
        Mode::Broadcast if policy.group.is_empty() => {
            return Err(Reply::error(
                400,
                "policy.group",
                "A broadcast rule needs a group.",
            ))
        }
        Mode::Broadcast => {
            return Ok(Taken::Broadcast(BroadcastRule {
                rule,
                group: policy.group,
            }))
        }
        Mode::Fallback => RuleMode::Fallback,
        _ => RuleMode::Capture,
    };
    Ok(Taken::Rule(RuleSubmission {
        name: rule,
        mode,
        target: policy.target,
        delivery: DeliveryPolicy {
            max_age_s: policy.max_age_s,
            retries: policy.retries,
            backoff_factor: policy.backoff_factor,
            max_backoff_s: policy.max_backoff_s,
            timeout_s: policy.timeout_s,
            schedule_s: Some(policy.schedule_s).filter(|s| !s.is_empty()),
            retry_on: policy.retry_on.map(status_entries),
            stop_on: policy.stop_on.map(status_entries),
            rate_per_s: Some(policy.rate_per_s).filter(|r| *r != 0.0),
            burst: Some(policy.burst).filter(|b| *b != 0),
        },
        callback: Some(policy.callback).filter(|c| !c.is_empty()),
        ordered: policy.ordered,
        upstream_status: r.upstream_status,
    }))
}

fn status_entries(list: knocker_proto::v1::StatusList) -> Vec<StatusEntry> {
    list.statuses.into_iter().map(StatusEntry::Text).collect()
}

fn to_proto(reply: Reply) -> SubmitReply {
    SubmitReply {
        status: u32::from(reply.status),
        headers: reply
            .headers
            .into_iter()
            .map(|(n, v)| Header {
                name: n.into_bytes(),
                value: v.into_bytes(),
            })
            .collect(),
        body: reply.body,
    }
}

#[cfg(test)]
mod tests {
    use super::{alone, header_name, SubmitReply};

    #[tokio::test]
    async fn a_submission_that_panics_fails_alone() {
        fn submission(buggy: bool) -> SubmitReply {
            assert!(!buggy, "a bug in the submission path");
            SubmitReply {
                status: 200,
                ..SubmitReply::default()
            }
        }
        let panicked = alone(async { submission(true) }).await;
        assert_eq!(panicked.status, 503);
        assert!(String::from_utf8_lossy(&panicked.body).contains("send it again"));
        let fine = alone(async { submission(false) }).await;
        assert_eq!(fine.status, 200);
    }

    #[test]
    fn a_header_name_is_kept_as_sent_or_shows_what_is_not_utf8() {
        assert_eq!(header_name(b"knocker-host".to_vec()), "knocker-host");
        assert_eq!(header_name(b"x-\xffa".to_vec()), "x-\u{fffd}a");
    }
}
