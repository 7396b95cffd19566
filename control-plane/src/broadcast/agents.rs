//! Registry-free broadcast agents on NATS JetStream.
//!
//! A group with `agents = true` has no member list: a broadcast to it is one message on
//! `knocker.broadcast.<group>` in the stream `KNOCKER_BROADCAST` (interest retention:
//! kept until every agent has it, at most `KNOCKER_RETENTION`). An agent is a control
//! plane started with `KNOCKER_AGENT_GROUP` and `KNOCKER_AGENT_ENDPOINT`, usually next to
//! the server it serves: it subscribes with a durable consumer of its own (named by
//! `KNOCKER_AGENT_NAME`) and replays each broadcast to its endpoint, one at a time, in
//! order, retrying until the endpoint takes it. An agent that was offline gets what it
//! missed when it comes back; the consumer of an agent gone for longer than
//! `KNOCKER_AGENT_EXPIRY` is removed by the server. Agents appear by subscribing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::{AckKind, PublishMessage};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock as _, SystemClock};
use crate::delivery::signing::{self, Signing};
use crate::job::{Headers, Request, Trust, VERSION};
use crate::outbound::Outbound;
use crate::redact;
use crate::store::nats::NatsAccess;
use crate::store::StoreError;

const STREAM: &str = "KNOCKER_BROADCAST";
const RECORDS: &str = "KNOCKER_BROADCASTS";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS broadcast: {e}"))
}

fn subject(group: &str) -> String {
    format!("knocker.broadcast.{group}")
}

/// What an agent replays.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Broadcast {
    pub id: String,
    pub group: String,
    pub method: String,
    /// The path with its query.
    pub path: String,
    pub headers: Headers,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Where a broadcast went, for its receipt and its status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sent {
    pub group: String,
    /// Its sequence in the stream.
    pub seq: u64,
    /// The agents subscribed when it was sent.
    pub agents: Vec<String>,
}

/// The agents' side of a NATS server.
pub struct AgentBus {
    js: jetstream::Context,
    records: kv::Store,
}

impl AgentBus {
    pub async fn open(server: &NatsAccess, retention: Duration) -> Result<Self, StoreError> {
        let client = server.connect("knocker-broadcast").await?;
        let js = jetstream::new(client);
        crate::store::nats::stream_made(
            &js,
            StreamConfig {
                name: STREAM.to_owned(),
                subjects: vec!["knocker.broadcast.>".to_owned()],
                retention: RetentionPolicy::Interest,
                storage: StorageType::File,
                max_age: retention,
                duplicate_window: retention.min(Duration::from_secs(120)),
                ..Default::default()
            },
        )
        .await
        .map_err(unavailable)?;
        let records = crate::store::nats::open_bucket(&js, RECORDS, retention).await?;
        Ok(Self { js, records })
    }

    /// The agents subscribed to `group` now: the names of its consumers.
    pub async fn agents(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let stream = self.js.get_stream(STREAM).await.map_err(unavailable)?;
        let wanted = subject(group);
        let mut names = Vec::new();
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(unavailable)?;
            if info.config.filter_subject == wanted {
                if let Some(agent) = info.name.strip_prefix("agent-") {
                    names.push(agent.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// The broadcast `id`, if it was sent.
    pub async fn sent(&self, id: &str) -> Result<Option<Sent>, StoreError> {
        let value = self
            .records
            .get(crate::store::nats::key(id))
            .await
            .map_err(unavailable)?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Publishes a broadcast once (its id is the message id) and records it.
    pub async fn publish(&self, broadcast: &Broadcast) -> Result<Sent, StoreError> {
        if let Some(sent) = self.sent(&broadcast.id).await? {
            return Ok(sent);
        }
        let agents = self.agents(&broadcast.group).await?;
        let payload = serde_json::to_vec(broadcast).map_err(unavailable)?;
        let ack = self
            .js
            .send_publish(
                subject(&broadcast.group),
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(broadcast.id.clone()),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        let sent = Sent {
            group: broadcast.group.clone(),
            seq: ack.sequence,
            agents,
        };
        let value = serde_json::to_vec(&sent).map_err(unavailable)?;
        self.records
            .put(crate::store::nats::key(&broadcast.id), value.into())
            .await
            .map_err(unavailable)?;
        Ok(sent)
    }

    /// Each agent subscribed now and whether it has the broadcast.
    pub async fn status(&self, sent: &Sent) -> Result<Vec<(String, bool)>, StoreError> {
        let stream = self.js.get_stream(STREAM).await.map_err(unavailable)?;
        let mut out = Vec::new();
        for agent in self.agents(&sent.group).await? {
            let consumer: jetstream::consumer::Consumer<PullConfig> = stream
                .get_consumer(&format!("agent-{agent}"))
                .await
                .map_err(unavailable)?;
            let floor = consumer.cached_info().ack_floor.stream_sequence;
            out.push((agent, floor >= sent.seq));
        }
        Ok(out)
    }
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub group: String,
    /// Base URL of the local endpoint; a broadcast's path and query are appended.
    pub endpoint: String,
    pub name: String,
    /// The consumer of an agent gone this long is removed.
    pub expiry: Duration,
    pub ack_wait: Duration,
}

/// Replays the group's broadcasts to the endpoint until `shutdown`.
pub async fn run(
    bus: Arc<AgentBus>,
    settings: AgentSettings,
    outbound: Arc<Outbound>,
    signing: Arc<Signing>,
    shutdown: CancellationToken,
) {
    let consumer_name = format!("agent-{}", settings.name);
    let consumer = loop {
        let created = async {
            let stream = bus.js.get_stream(STREAM).await.map_err(unavailable)?;
            stream
                .get_or_create_consumer(
                    &consumer_name,
                    PullConfig {
                        durable_name: Some(consumer_name.clone()),
                        filter_subject: subject(&settings.group),
                        deliver_policy: DeliverPolicy::New,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: settings.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: 1,
                        inactive_threshold: settings.expiry,
                        ..Default::default()
                    },
                )
                .await
                .map_err(unavailable)
        };
        match created.await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "agent: cannot subscribe; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(group = %settings.group, agent = %settings.name, endpoint = %redact::url(&settings.endpoint), "agent subscribed");
    while !shutdown.is_cancelled() {
        let batch = tokio::select! {
            b = consumer.fetch().max_messages(1).expires(Duration::from_secs(1)).messages() => b,
            () = shutdown.cancelled() => return,
        };
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "agent: cannot pull; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(Ok(message)) = batch.next().await {
            let broadcast: Broadcast = match serde_json::from_slice(&message.payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "agent: unreadable broadcast dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            replay(
                &outbound, &signing, &settings, &broadcast, &message, &shutdown,
            )
            .await;
        }
    }
}

/// Sends one broadcast to the endpoint until it is taken (2xx), reporting progress so
/// that the message stays with this agent; acknowledges it then. In order: the next
/// broadcast is pulled only after this one.
async fn replay(
    outbound: &Outbound,
    signing: &Signing,
    settings: &AgentSettings,
    broadcast: &Broadcast,
    message: &jetstream::Message,
    shutdown: &CancellationToken,
) {
    let url = format!(
        "{}{}",
        settings.endpoint.trim_end_matches('/'),
        broadcast.path
    );
    let mut delay = Duration::from_millis(200);
    // Signed as the group's copies are: its secrets, the endpoint's, or the default.
    let source = format!("group:{}", settings.group);
    let keys = signing.keys(Some(&source), &url, Trust::Operator);
    loop {
        let request = Request {
            method: broadcast.method.clone(),
            url: url.clone(),
            headers: broadcast.headers.clone(),
            body: broadcast.body.clone(),
        };
        let signed = signing::sign(
            keys,
            &broadcast.id,
            SystemClock.now_ms() / 1000,
            &request.body,
        );
        let signed = signed.as_ref().map_or(&[][..], |h| &h[..]);
        match send(outbound, &request, &broadcast.id, signed).await {
            Ok(status) if (200..300).contains(&status) => {
                tracing::info!(broadcast_id = %broadcast.id, status, url = %redact::url(&url), "agent: delivered");
                let _ = message.double_ack().await;
                return;
            }
            outcome => {
                tracing::info!(broadcast_id = %broadcast.id, ?outcome, retry_in_ms = delay.as_millis() as u64, "agent: not taken; will retry");
            }
        }
        let _ = message.ack_with(AckKind::Progress).await;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return, // redelivered after the restart
        }
        delay = (delay * 2).min((settings.ack_wait / 3).max(Duration::from_millis(200)));
    }
}

/// The agent's endpoint is the operator's (`KNOCKER_AGENT_ENDPOINT`): a trusted
/// destination, though a redirect away from it passes the outbound policy. `signed`:
/// the signature headers, which replace any the broadcast carried.
async fn send(
    outbound: &Outbound,
    request: &Request,
    id: &str,
    signed: &[(&'static str, String)],
) -> Result<u16, ReplayError> {
    let method = http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| ReplayError::Unsendable("method"))?;
    let mut headers = http::header::HeaderMap::new();
    headers.insert("x-knocker", http::header::HeaderValue::from_static(VERSION));
    headers.insert(
        "x-knocker-id",
        http::header::HeaderValue::from_str(id).map_err(|_| ReplayError::Unsendable("id"))?,
    );
    for (name, value) in signed {
        if let Ok(v) = http::header::HeaderValue::from_str(value) {
            headers.insert(http::header::HeaderName::from_static(name), v);
        }
    }
    for (name, value) in &request.headers {
        if signed.iter().any(|(n, _)| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            http::header::HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    outbound
        .send(crate::outbound::Request {
            method,
            url: request.url.clone(),
            headers,
            body: request.body.clone().into(),
            timeout: Duration::from_secs(30),
            trust: crate::job::Trust::Operator,
        })
        .await
        .map(|r| r.status().as_u16())
        .map_err(ReplayError::Send)
}

/// Why a broadcast did not reach the agent's endpoint.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    /// The broadcast's method or id cannot be sent in an HTTP request.
    #[error("the broadcast's {0} cannot be sent")]
    Unsendable(&'static str),
    #[error(transparent)]
    Send(crate::outbound::Failure),
}
