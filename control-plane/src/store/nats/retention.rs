//! Retention of the open-jobs bucket: the markers finished jobs leave there are swept
//! once they are as old as the finished records.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::Message;
use futures_util::StreamExt as _;

use super::claim::fetch;
use super::record::{id_of, purge_below};
use super::{unavailable, NatsStore};
use crate::clock::Millis;
use crate::job::State;
use crate::store::StoreError;

/// Entries of the open-jobs bucket read at a time while it is swept of old markers, and
/// purges of markers under way at once.
const SWEEP_BATCH: usize = 5000;
const SWEEP_CONCURRENCY: usize = 64;

/// Open records a sweep moves past the markers at most (each one a write): a sweep for
/// room reaches back minutes, not the retention's days, and a long backlog of waiting
/// jobs in front of the markers is moved a share at a time, round after round, instead
/// of all at once every round.
pub(super) const SWEEP_MOVES: usize = 5000;

/// Up to `n` messages of `stream` from `from` on, their headers only, read by a reader of
/// their own (ephemeral, unacknowledged, deleted after).
pub(super) async fn headers(
    stream: &Stream,
    from: DeliverPolicy,
    n: usize,
) -> Result<Vec<Message>, StoreError> {
    let reader: Consumer<PullConfig> = stream
        .create_consumer(PullConfig {
            deliver_policy: from,
            ack_policy: AckPolicy::None,
            headers_only: true,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let read = fetch(&reader, n).await;
    let _ = stream.delete_consumer(&reader.cached_info().name).await;
    read
}

impl NatsStore {
    /// Removes the markers finished jobs left in the open-jobs bucket before
    /// `before` (their finished records have passed the same age limit by then), so the
    /// bucket holds open jobs and recent markers, not one marker per job ever finished.
    /// The markers are what tells a used id from a new one; past retention an id is new
    /// again, as in the embedded store. The bucket is read in order (headers only) up to
    /// the first entry not older than `before`. Markers before the first record in flight
    /// go with one purge of the stream per batch; those after it with a purge of their key
    /// up to their own sequence, so a record created on the key since is kept. At most
    /// `moves` open records are moved (the sweep ends there). How many went.
    pub(super) async fn sweep_markers(
        &self,
        before: Millis,
        moves: usize,
    ) -> Result<u64, StoreError> {
        let stream = &self.jobs.stream;
        let state = stream.get_info().await.map_err(unavailable)?.state;
        let mut removed = 0;
        let mut from = state.first_sequence;
        let mut open_seen = false;
        let mut moved = 0;
        while state.messages > 0 && from <= state.last_sequence {
            // A purge moves the stream's consumers on, so each batch is read by a reader
            // of its own from where the last one ended: ephemeral, unacknowledged, headers
            // only, and without a subject filter (a filtered one makes the server count
            // its pending entries through the whole stream).
            let start = DeliverPolicy::ByStartSequence {
                start_sequence: from,
            };
            let batch = headers(stream, start, SWEEP_BATCH).await?;
            // An open record this old (a job retrying for longer than the retention) is
            // written again, so that it moves past the markers (unless it is in flight).
            // While every entry read so far is a marker, they all go with one purge of the
            // bucket up to there ([`purge_below`]: a few µs an entry on the server; a
            // purge of one key costs it ~60); markers after an open record go one by one
            // (~120 µs each).
            let mut below = None;
            let mut markers = Vec::new();
            let mut done = batch.is_empty();
            for entry in &batch {
                let info = entry.info().map_err(unavailable)?;
                let seq = info.stream_sequence;
                if info.published.unix_timestamp_nanos() / 1_000_000 >= i128::from(before) {
                    done = true;
                    break;
                }
                let marker = entry
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| matches!(op.as_str(), "PURGE" | "DEL"));
                // Past a record in flight nothing goes in bulk: nothing to move either.
                let open = !marker && (open_seen || self.stays_at(&entry.subject, seq).await?);
                moved += usize::from(!marker && !open);
                match (marker, open_seen) {
                    (true, true) => markers.push((entry.subject.to_string(), seq)),
                    (_, false) if !open => below = Some(seq + 1),
                    _ => open_seen = true,
                }
                removed += u64::from(marker);
                from = seq + 1;
                done |= info.pending == 0;
                if moved >= moves {
                    done = true;
                    break;
                }
            }
            if let Some(below) = below {
                purge_below(&self.jobs, below).await?;
            }
            let mut purges = futures_util::stream::iter(markers)
                .map(|(subject, seq)| async move {
                    stream.purge().filter(subject).sequence(seq + 1).await
                })
                .buffer_unordered(SWEEP_CONCURRENCY);
            while let Some(purged) = purges.next().await {
                purged.map_err(unavailable)?;
            }
            if done {
                break;
            }
        }
        Ok(removed)
    }

    /// Whether the open record on `subject` is still at `seq` after the sweep tried to
    /// move it: a record not in flight is written again over that revision (a claim that
    /// races it sees another writer came first, as with any concurrent write). `false`
    /// when it is gone or has moved since.
    async fn stays_at(&self, subject: &str, seq: u64) -> Result<bool, StoreError> {
        let Some(id) = subject
            .strip_prefix(self.jobs.prefix.as_str())
            .and_then(id_of)
        else {
            return Ok(true); // not a job's key: left where it is
        };
        match self.read(&self.jobs, &id).await? {
            Some((record, revision)) if revision == seq => {
                if record.job.state == State::InFlight {
                    return Ok(true);
                }
                Ok(self
                    .write_if(&self.jobs, &record, revision)
                    .await?
                    .is_none()
                    && self
                        .read(&self.jobs, &id)
                        .await?
                        .is_some_and(|(_, now)| now == seq))
            }
            _ => Ok(false),
        }
    }
}
