//! gRPC ingress: `knocker.v1.Ingress/Submit`, called by the Envoy filter.

use std::sync::Arc;

use knocker_proto::v1::ingress_server::{Ingress as IngressService, IngressServer};
use knocker_proto::v1::{Header, Mode, SubmitReply, SubmitRequest};
use tonic::{Request, Response, Status};

use super::Ingress;
use crate::job::policy::DeliveryPolicy;
use crate::job::rule::{RuleMode, RuleSubmission};
use crate::job::spec::{BroadcastRule, Submission};

pub struct GrpcIngress {
    ingress: Arc<Ingress>,
}

/// The tonic service, accepting messages up to the body limit plus room for headers.
pub fn service(ingress: Arc<Ingress>) -> IngressServer<GrpcIngress> {
    let limit = ingress.settings.max_body_bytes.saturating_add(256 * 1024);
    IngressServer::new(GrpcIngress { ingress }).max_decoding_message_size(limit)
}

#[tonic::async_trait]
impl IngressService for GrpcIngress {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let mut r = request.into_inner();
        if r.body.len() > self.ingress.settings.max_body_bytes {
            let reply = super::Reply::error(
                413,
                "body",
                &body_too_large(self.ingress.settings.max_body_bytes),
            );
            return Ok(Response::new(to_proto(reply)));
        }
        let (rule, broadcast_rule) = match rule_submission(&mut r) {
            Ok(Taken::Knocker) => (None, None),
            Ok(Taken::Rule(rule)) => (Some(rule), None),
            Ok(Taken::Broadcast(b)) => (None, Some(b)),
            Err(reply) => return Ok(Response::new(to_proto(reply))),
        };
        let submission = Submission {
            method: r.method,
            path: r.path,
            headers: r
                .headers
                .into_iter()
                .map(|h| (String::from_utf8_lossy(&h.name).into_owned(), h.value))
                .collect(),
            body: r.body,
            remote: Some(r.downstream_address).filter(|a| !a.is_empty()),
            authority: Some(r.authority).filter(|a| !a.is_empty()),
            rule,
            broadcast_rule,
        };
        let reply = self.ingress.submit(submission).await;
        Ok(Response::new(to_proto(reply)))
    }
}

/// Why the filter handed a request over.
enum Taken {
    Knocker,
    Rule(RuleSubmission),
    Broadcast(BroadcastRule),
}

/// The rule part of a filter submission; a 400 naming the field when the mode and the
/// policy do not fit together.
fn rule_submission(r: &mut SubmitRequest) -> Result<Taken, super::Reply> {
    let mode = match Mode::try_from(r.mode) {
        Ok(Mode::Knocker | Mode::Unspecified) => return Ok(Taken::Knocker),
        Ok(mode) => mode,
        Err(_) => {
            return Err(super::Reply::error(
                400,
                "mode",
                &format!("Mode {} is not supported by this control plane.", r.mode),
            ))
        }
    };
    let Some(policy) = r.policy.take() else {
        return Err(super::Reply::error(
            400,
            "policy",
            "A rule submission needs the rule's delivery policy.",
        ));
    };
    let rule = std::mem::take(&mut r.rule);
    let mode = match mode {
        Mode::Broadcast if policy.group.is_empty() => {
            return Err(super::Reply::error(
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
        },
        callback: Some(policy.callback).filter(|c| !c.is_empty()),
        ordered: policy.ordered,
        upstream_status: r.upstream_status,
    }))
}

pub fn body_too_large(limit: usize) -> String {
    format!("Request body is larger than the limit of {limit} bytes.")
}

fn to_proto(reply: super::Reply) -> SubmitReply {
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
