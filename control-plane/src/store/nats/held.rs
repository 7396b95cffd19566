//! Claimed messages held until their job's outcome: answered once, kept alive meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::Message;
use parking_lot::Mutex;

use super::record::Record;
use super::{unavailable, NatsStore};
use crate::clock::Millis;
use crate::store::StoreError;

/// A claimed message, held until its job's outcome is recorded.
pub(super) struct Held {
    pub(super) message: Message,
    /// The job's target (host:port), to leave it out of the target's backlog.
    pub(super) host: String,
    /// Lane heads only: when the held job is due again (its holder retries it).
    pub(super) due: Option<Millis>,
    /// Set once the message is answered (acknowledged or sent back), under this lock,
    /// so that no progress report follows the answer: the server would take a progress
    /// report after a NAK with a delay as "still working" and redeliver only after the
    /// whole ack wait.
    pub(super) answered: Arc<tokio::sync::Mutex<bool>>,
    /// The record as this claim wrote it, and its revision: its outcome is recorded
    /// without reading it again, unless it changed meanwhile (deleted while in flight).
    pub(super) claim: Option<(Record, u64)>,
}

impl Held {
    pub(super) fn new(message: Message, host: String, due: Option<Millis>) -> Self {
        Self {
            message,
            host,
            due,
            answered: Arc::default(),
            claim: None,
        }
    }

    /// Answers the server for this message: `None` acknowledges it; `Some(kind)` sends
    /// that answer.
    pub(super) async fn answer(self, kind: Option<AckKind>) -> Result<(), StoreError> {
        let mut answered = self.answered.lock().await;
        *answered = true;
        match kind {
            None => self.message.ack().await,
            Some(kind) => self.message.ack_with(kind).await,
        }
        .map_err(unavailable)
    }

    /// Tells the server the message is still being worked on, unless it was answered.
    async fn keep(message: &Message, answered: &tokio::sync::Mutex<bool>) {
        let answered = answered.lock().await;
        if !*answered {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

impl NatsStore {
    /// Answers the message of a held job that is gone (deleted while in flight): nothing
    /// is left to attempt or record.
    pub(super) async fn drop_held(&self, id: &str) {
        let held = self.held.lock().remove(id);
        if let Some(h) = held {
            let _ = h.answer(Some(AckKind::Ack)).await;
        }
    }
}

/// Tells the server that held messages are still being worked on, so they are not
/// redelivered to another control plane while a long attempt or a lane head's retries
/// go on. Ends with the store.
pub(super) async fn keep_alive(
    held: std::sync::Weak<Mutex<HashMap<String, Held>>>,
    ack_wait: Duration,
) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(held) = held.upgrade() else { return };
        let messages: Vec<_> = held
            .lock()
            .values()
            .map(|h| (h.message.clone(), Arc::clone(&h.answered)))
            .collect();
        drop(held);
        for (message, answered) in messages {
            Held::keep(&message, &answered).await;
        }
    }
}

/// The answer that sends a message back to be delivered again after `wait`. A zero
/// delay is sent as a plain NAK: nats-server 2.9 left a NAK with `delay: 0` undelivered
/// until the ack wait ran out (found by the shared-circuit test, where a parked job's
/// retry is due at once).
pub(super) fn nak(wait: Duration) -> AckKind {
    if wait.is_zero() {
        AckKind::Nak(None)
    } else {
        AckKind::Nak(Some(wait))
    }
}
