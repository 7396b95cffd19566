//! Accepting a job: its record created, then its work message published on its target's
//! (or lane's) subject, carrying the record for the first claim.

use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Message;

use super::record::{key, Record};
use super::{unavailable, NatsStore};
use crate::job::{Job, State, PARKED};
use crate::store::{Inserted, StoreError};

/// Headers of a new job's work message carrying its record as created, and that
/// record's revision: its first delivery claims the job over that revision without
/// reading the record (a changed record fails the claim, which then reads it). Records
/// larger than [`CARRIED_MAX`] bytes are not carried.
const RECORD_HEADER: &str = "Knocker-Record";
const REVISION_HEADER: &str = "Knocker-Record-Revision";
const CARRIED_MAX: usize = 16 * 1024;

/// FNV-1a: a stable name for a lane's or a target's subject (and a lane's consumer).
pub(super) fn subject_hash(lane: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lane.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn subject_of(job: &Job) -> String {
    match &job.lane {
        Some(lane) => format!("knocker.lane.{}", subject_hash(lane)),
        None => target_subject(job.host()),
    }
}

/// The subject of a target's work messages.
pub(super) fn target_subject(host: &str) -> String {
    format!("knocker.work.{}", subject_hash(host))
}

/// The work stream refused a message for its message limit (`KNOCKER_MAX_PENDING`,
/// discard-new): the server answers with the stream-store-failed error code, whose
/// description is its `ErrMaxMsgs` (the limit has no code of its own). Any other store
/// failure — a full disk — is not back-pressure but the store being unavailable.
fn is_stream_full(e: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|js| {
            js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
                && js.to_string().contains("maximum messages")
        })
}

/// The record a new job's work message carries, and its revision, on the message's first
/// delivery only (a message delivered again has seen its record change, or may have).
pub(super) fn carried(message: &Message, id: &str) -> Option<(Record, u64)> {
    if message.info().ok()?.delivered != 1 {
        return None;
    }
    let headers = message.headers.as_ref()?;
    let revision = headers.get(REVISION_HEADER)?.as_str().parse().ok()?;
    let mut record: Record = serde_json::from_str(headers.get(RECORD_HEADER)?.as_str()).ok()?;
    if record.job.id != id {
        return None;
    }
    record.order.get_or_insert(revision);
    Some((record, revision))
}

impl NatsStore {
    /// A new job (the store's `insert`): its record is created, in one request when its key
    /// was never used (any other key goes through [`Self::resubmitted`]), then its work
    /// message is published; the job is accepted once the server has stored the message.
    pub(super) async fn submit(&self, job: Job) -> Result<Inserted, StoreError> {
        let started = std::time::Instant::now();
        let mut job = job;
        if job.lane.is_some() {
            job.next_attempt_at = PARKED; // its lane's consumer says when it is its turn
        }
        let record = Record::new(job);
        let value: bytes::Bytes = serde_json::to_vec(&record).map_err(unavailable)?.into();
        // A key never used before (no message at all on its subject, not even the marker
        // a finished job leaves) is a new job: one request. Any other goes the long way.
        let created = match self
            .jobs
            .update(key(&record.job.id), value.clone(), 0)
            .await
        {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match self.resubmitted(&record.job.id).await? {
                    Some(existing) => return Ok(Inserted::Existing(Box::new(existing))),
                    None => match self.jobs.create(key(&record.job.id), value.clone()).await {
                        Ok(revision) => revision,
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                            // Created meanwhile by another submission.
                            return match self.find(&record.job.id).await? {
                                Some(r) => Ok(Inserted::Existing(Box::new(r.job))),
                                None => Err(unavailable("job vanished while being created")),
                            };
                        }
                        Err(e) => return Err(unavailable(e)),
                    },
                }
            }
            Err(e) => return Err(unavailable(e)),
        };
        let id = record.job.id.clone();
        let created = Some((&value[..], created));
        match self.publish(&record.job, id.clone(), created).await {
            Ok(()) => {
                crate::metrics::get().committed(1, started.elapsed());
                Ok(Inserted::Created)
            }
            Err(e) => {
                // No receipt is given: leave no record that looks accepted.
                let _ = self.jobs.purge(key(&id)).await;
                Err(e)
            }
        }
    }

    /// Publishes the job's work message (`msg_id` makes a second publish within the
    /// duplicate window a no-op) and waits for the server to have stored it. `created` is
    /// the record as just created and its revision, carried for the first claim.
    pub(super) async fn publish(
        &self,
        job: &Job,
        msg_id: String,
        created: Option<(&[u8], u64)>,
    ) -> Result<(), StoreError> {
        let mut message = PublishMessage::build()
            .payload(job.id.clone().into_bytes().into())
            .message_id(msg_id);
        let carried = created
            .filter(|(value, _)| value.len() <= CARRIED_MAX)
            .and_then(|(value, revision)| {
                let value = std::str::from_utf8(value).ok()?;
                Some((value.parse::<async_nats::HeaderValue>().ok()?, revision))
            });
        if let Some((value, revision)) = carried {
            message = message
                .header(RECORD_HEADER, value)
                .header(REVISION_HEADER, revision.to_string());
        }
        self.js
            .send_publish(subject_of(job), message)
            .await
            .map_err(unavailable)?
            .await
            .map_err(|e| {
                if is_stream_full(&e) {
                    StoreError::Full(self.options.max_pending)
                } else {
                    unavailable(e)
                }
            })?;
        Ok(())
    }

    /// The job already stored under `id`, open or finished, if any. A resubmission of a
    /// job no message has claimed yet publishes its work message again, under the same
    /// message id (stored once within the duplicate window): its first submission may
    /// have died before publishing.
    async fn resubmitted(&self, id: &str) -> Result<Option<Job>, StoreError> {
        if let Some((record, _)) = self.read(&self.jobs, id).await? {
            let unclaimed = record.msg_seq.is_none() && record.claimed_by.is_none();
            if unclaimed && record.job.state == State::Pending {
                self.publish(&record.job, id.to_owned(), None).await?;
            }
            return Ok(Some(record.job));
        }
        for bucket in [&self.delivered, &self.failed] {
            if let Some((record, _)) = self.read(bucket, id).await? {
                return Ok(Some(record.job));
            }
        }
        Ok(None)
    }
}
