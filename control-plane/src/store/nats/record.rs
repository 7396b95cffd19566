//! Job records in the key-value buckets: their shape, their keys, and reads and
//! compare-and-set writes of them.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use super::{unavailable, NatsStore};
use crate::job::Job;
use crate::store::StoreError;

/// Compare-and-set writes of a job record tried before giving up on a busy record.
pub(super) const WRITE_TRIES: usize = 5;

/// A job record as stored.
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct Record {
    pub(super) job: Job,
    /// Earlier versions: the stream sequence of the work message that owns the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) msg_seq: Option<u64>,
    /// The job's place in arrival order: the revision its record was created at (kept
    /// from its first claim on; while unclaimed, it is the record's own revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) order: Option<u64>,
    /// The stream sequence of the work message whose delivery claimed the job last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) claimed_by: Option<u64>,
}

impl Record {
    pub(super) fn new(job: Job) -> Self {
        Self {
            job,
            msg_seq: None,
            order: None,
            claimed_by: None,
        }
    }

    /// Where the job sorts among jobs accepted in the same millisecond.
    fn place(&self) -> u64 {
        self.msg_seq.or(self.order).unwrap_or(u64::MAX)
    }
}

/// The key of a job id: `j` + the id in hex (any id, valid as a key, prefixes kept).
pub(crate) fn key(id: &str) -> String {
    // By hand: a `format!` per byte was a string allocated and formatted per character
    // of every id, several times per job (3% of the control plane's CPU in a drain).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = String::with_capacity(1 + id.len() * 2);
    k.push('j');
    for b in id.bytes() {
        k.push(char::from(HEX[usize::from(b >> 4)]));
        k.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    k
}

pub(super) fn id_of(key: &str) -> Option<String> {
    let hex = key.strip_prefix('j')?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Jobs in the order they arrived: by acceptance time, then by their place (jobs accepted
/// together — a broadcast's members — share a time; their ids would sort `b.10` before
/// `b.2`).
pub(super) fn in_arrival_order(mut records: Vec<Record>) -> impl Iterator<Item = Job> {
    records.sort_by(|a, b| {
        let order = |r: &Record| (r.job.created_at, r.place());
        order(a)
            .cmp(&order(b))
            .then_with(|| a.job.id.cmp(&b.job.id))
    });
    records.into_iter().map(|r| r.job)
}

/// Removes every message of the bucket stored before `below` (a sequence); how many went.
///
/// The purge names the bucket's own subjects, although they are all its stream holds:
/// nats-server 2.9, purging up to a sequence without a subject, drops whole file blocks
/// without taking their keys out of its index of subjects, which then kept an entry for
/// every job ever finished and grew the server's memory without end. With the subjects
/// named it removes the messages one by one (about 2.5 µs each on 2.9), keeping the index
/// right; newer servers do either as fast.
pub(super) async fn purge_below(bucket: &kv::Store, below: u64) -> Result<u64, StoreError> {
    bucket
        .stream
        .purge()
        .filter(format!("{}>", bucket.prefix))
        .sequence(below)
        .await
        .map(|purged| purged.purged)
        .map_err(unavailable)
}

/// Removes a key and every message it had, leaving no delete marker behind: the
/// finished buckets are counted by their messages ([`Store::stats`]), so a marker would
/// count as a job.
pub(super) async fn remove(bucket: &kv::Store, id: &str) -> Result<(), StoreError> {
    bucket
        .stream
        .purge()
        .filter(format!("{}{}", bucket.prefix, key(id)))
        .await
        .map(|_| ())
        .map_err(unavailable)
}

impl NatsStore {
    pub(super) async fn read(
        &self,
        bucket: &kv::Store,
        id: &str,
    ) -> Result<Option<(Record, u64)>, StoreError> {
        let Some(entry) = bucket.entry(key(id)).await.map_err(unavailable)? else {
            return Ok(None);
        };
        if entry.value.is_empty() || !matches!(entry.operation, kv::Operation::Put) {
            return Ok(None);
        }
        let mut record: Record = serde_json::from_slice(&entry.value)
            .map_err(|e| unavailable(format!("job record {id} unreadable: {e}")))?;
        record.order.get_or_insert(entry.revision);
        Ok(Some((record, entry.revision)))
    }

    /// The job, wherever it is: open, delivered or failed.
    pub(super) async fn find(&self, id: &str) -> Result<Option<Record>, StoreError> {
        for bucket in [&self.jobs, &self.delivered, &self.failed] {
            if let Some((record, _)) = self.read(bucket, id).await? {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    pub(super) async fn write(
        &self,
        bucket: &kv::Store,
        record: &Record,
    ) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        bucket
            .put(key(&record.job.id), value.into())
            .await
            .map_err(unavailable)
    }

    /// Writes `record` only over the revision it was read at: `None` when another writer
    /// came first (the caller reads again and decides).
    pub(super) async fn write_if(
        &self,
        bucket: &kv::Store,
        record: &Record,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = serde_json::to_vec(record).map_err(unavailable)?;
        match bucket
            .update(key(&record.job.id), value.into(), revision)
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Writes a held job's open record back, changed by `change`, over the revision it
    /// was read at (`read`, or read here), so that a job deleted between the read and the
    /// write is not brought back; a record changed otherwise meanwhile is read again.
    /// The record as written, or `None` when the job is gone.
    pub(super) async fn rewrite_open(
        &self,
        id: &str,
        mut read: Option<(Record, u64)>,
        change: impl Fn(&mut Record),
    ) -> Result<Option<Record>, StoreError> {
        for _ in 0..WRITE_TRIES {
            let found = match read.take() {
                Some(found) => Some(found),
                None => self.read(&self.jobs, id).await?,
            };
            let Some((mut record, revision)) = found else {
                return Ok(None);
            };
            change(&mut record);
            if self
                .write_if(&self.jobs, &record, revision)
                .await?
                .is_some()
            {
                return Ok(Some(record));
            }
        }
        Err(unavailable(format!("job record {id} kept changing")))
    }
}
