//! The finished history's size cap (`KNOCKER_MAX_STORE_BYTES` on NATS). The buckets of
//! delivered and of failed jobs each hold up to half of it: at its limit a bucket's
//! oldest records are dropped by the server to store new ones (discard old), so history
//! makes room and no submission is refused for it. Open jobs (their bucket and the work
//! stream) are never capped here, never dropped.
//!
//! A bucket at its limit sets the history's horizon: its oldest record still kept.
//! Retention then removes the other bucket's records older than that (the oldest
//! finished jobs go first, whatever their outcome), and the markers of the jobs
//! finished before it, whose records are gone from both buckets by then: an id is new
//! again once its job is gone, as in the embedded store.

use std::time::Duration;

use async_nats::datetime::DateTime;
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, State};
use async_nats::jetstream::ErrorCode;

use super::record::purge_below;
use super::retention::headers;
use super::{bucket_config, stream_made, unavailable, NatsStore, DELIVERED, FAILED};
use crate::clock::Millis;
use crate::store::{StoreError, AUTO_CAP};

/// `auto` on a server whose account has no storage limit to take half of: 1 GiB.
pub(super) const AUTO_HISTORY: u64 = 1 << 30;

/// A bucket this close to its limit (a sixteenth) is taken as dropping its oldest.
const NEAR: u64 = 16;

/// The buckets of finished jobs, and the byte limit of each (0: none).
pub(super) struct Finished {
    pub(super) delivered: kv::Store,
    pub(super) failed: kv::Store,
    pub(super) bucket_cap: u64,
}

/// Why a bucket could not be opened with its limit.
enum Refused {
    /// The server (or the account) cannot set aside that many bytes.
    Room(String),
    Other(StoreError),
}

/// Opens the finished buckets (made, or brought to the cap, when needed) with the cap
/// `setting` (`KNOCKER_MAX_STORE_BYTES`: bytes, 0 for none, or [`AUTO_CAP`]) shared
/// between them. `largest` is the largest record the server takes (its `max_payload`).
/// `auto` is half the account's JetStream storage limit when it has one, else
/// [`AUTO_HISTORY`]; a server that cannot set that aside gets half as much, down to two
/// of the largest records, the least that works. A cap set in bytes that the server
/// cannot set aside, or whose half cannot hold the largest record, stops the start,
/// naming the setting.
pub(super) async fn open_finished(
    js: &jetstream::Context,
    retention: Duration,
    setting: u64,
    largest: u64,
) -> Result<Finished, StoreError> {
    let auto = setting == AUTO_CAP;
    let floor = largest.saturating_mul(2);
    if !auto && setting > 0 && setting / 2 < largest {
        return Err(StoreError::Unavailable(format!(
            "KNOCKER_MAX_STORE_BYTES ({setting} bytes) is too small for the NATS engine: \
             each of the buckets {DELIVERED} and {FAILED} holds half of it, which must hold \
             the largest record the server takes ({largest} bytes, its max_payload)"
        )));
    }
    let mut cap = if auto {
        auto_cap(js).await.max(floor)
    } else {
        setting
    };
    loop {
        let bucket_cap = cap / 2;
        let opened = async {
            let delivered = open_capped(js, DELIVERED, retention, bucket_cap).await?;
            let failed = open_capped(js, FAILED, retention, bucket_cap).await?;
            Ok::<_, Refused>((delivered, failed))
        };
        match opened.await {
            Ok((delivered, failed)) => {
                if cap > 0 {
                    tracing::info!(
                        cap_bytes = cap,
                        auto,
                        "finished history size cap (KNOCKER_MAX_STORE_BYTES): half of it for each of {DELIVERED} and {FAILED}"
                    );
                }
                return Ok(Finished {
                    delivered,
                    failed,
                    bucket_cap,
                });
            }
            Err(Refused::Room(e)) if auto && cap / 2 >= floor => {
                tracing::warn!(cap_bytes = cap, error = %e, "the NATS server cannot set aside the finished history's automatic size cap; trying half of it");
                cap /= 2;
            }
            Err(Refused::Room(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "KNOCKER_MAX_STORE_BYTES ({cap} bytes): the NATS server cannot set aside \
                     {bucket_cap} bytes for each of the buckets {DELIVERED} and {FAILED}: {e}"
                )))
            }
            Err(Refused::Other(e)) => return Err(e),
        }
    }
}

/// Half the account's JetStream file storage limit, if it has one (and no more than two
/// of its largest streams); else [`AUTO_HISTORY`].
async fn auto_cap(js: &jetstream::Context) -> u64 {
    let account = match js.query_account().await {
        Ok(account) => account,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the NATS account's limits");
            return AUTO_HISTORY;
        }
    };
    let limits = std::iter::once(&account.limits).chain(account.tiers.values().map(|t| &t.limits));
    let least = |of: fn(&async_nats::jetstream::account::Limits) -> Option<i64>| {
        limits
            .clone()
            .filter_map(of)
            .filter(|&l| l > 0)
            .map(i64::unsigned_abs)
            .min()
    };
    let storage = least(|l| l.max_storage).map(|s| s / 2);
    let stream = least(|l| l.storage_max_stream_bytes).map(|s| s.saturating_mul(2));
    storage
        .into_iter()
        .chain(stream)
        .min()
        .unwrap_or(AUTO_HISTORY)
}

/// A finished bucket with `max_bytes` (0: none) and discard old: made, or its stream
/// brought to them (a bucket of an earlier version had neither).
async fn open_capped(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    max_bytes: u64,
) -> Result<kv::Store, Refused> {
    let mut config = bucket_config(bucket, max_age);
    config.max_bytes = match max_bytes {
        0 => -1,
        n => i64::try_from(n).unwrap_or(i64::MAX),
    };
    config.discard = DiscardPolicy::Old;
    let refused = |e: CreateStreamError| {
        if for_room(&e) {
            Refused::Room(e.to_string())
        } else {
            Refused::Other(unavailable(format!("bucket {bucket}: {e}")))
        }
    };
    match js.get_stream(&config.name).await {
        Ok(stream) => {
            // `get_stream` has just read the stream's info; no second round trip.
            let existing = stream.cached_info().config.clone();
            if existing.max_bytes != config.max_bytes || existing.discard != config.discard {
                js.update_stream(StreamConfig {
                    max_bytes: config.max_bytes,
                    discard: config.discard,
                    ..existing
                })
                .await
                .map_err(refused)?;
            }
        }
        Err(_) => {
            stream_made(js, config).await.map_err(refused)?;
        }
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| Refused::Other(unavailable(format!("bucket {bucket}: {e}"))))
}

/// The server refused a stream's byte limit for want of room (its own, or the account's).
pub(super) fn for_room(e: &CreateStreamError) -> bool {
    matches!(e.kind(), CreateStreamErrorKind::JetStream(js) if [
        ErrorCode::STORAGE_RESOURCES_EXCEEDED,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
    ]
    .contains(&js.error_code()))
}

fn millis(t: DateTime) -> Millis {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl NatsStore {
    /// The history's horizon when a finished bucket is at its limit (its oldest record
    /// still kept; the later of the two when both are), after the other bucket's older
    /// records are removed. `None` while neither is near its limit.
    pub(super) async fn history_horizon(&self) -> Result<Option<Millis>, StoreError> {
        let cap = self.bucket_cap;
        if cap == 0 {
            return Ok(None);
        }
        let mut states = Vec::with_capacity(2);
        for bucket in [&self.delivered, &self.failed] {
            let state = bucket.stream.get_info().await.map_err(unavailable)?.state;
            states.push((bucket, state));
        }
        let horizon = states
            .iter()
            .filter(|(_, s)| s.messages > 0 && s.bytes >= cap - cap / NEAR)
            .map(|(_, s)| millis(s.first_timestamp))
            .max();
        let Some(horizon) = horizon else {
            return Ok(None);
        };
        let mut removed = 0;
        for (bucket, state) in &states {
            removed += trim(bucket, state, horizon).await?;
        }
        if removed > 0 {
            tracing::info!(
                jobs = removed,
                kept_from_ms = horizon,
                "the finished history is at its size cap (KNOCKER_MAX_STORE_BYTES): the oldest finished jobs were removed to make room"
            );
        }
        Ok(Some(horizon))
    }
}

/// Removes the bucket's records stored before `horizon`: up to the first one at or after
/// it (all the bucket held when `state` was read, if none is).
async fn trim(bucket: &kv::Store, state: &State, horizon: Millis) -> Result<u64, StoreError> {
    if state.messages == 0 || millis(state.first_timestamp) >= horizon {
        return Ok(0);
    }
    let start_time = DateTime::from_unix_timestamp_nanos(i128::from(horizon) * 1_000_000)
        .map_err(unavailable)?;
    let stream = &bucket.stream;
    let from = DeliverPolicy::ByStartTime { start_time };
    let first = headers(stream, from, 1).await?;
    let below = match first.first() {
        Some(record) => record.info().map_err(unavailable)?.stream_sequence,
        None => state.last_sequence + 1,
    };
    purge_below(bucket, below).await
}
