//! Target circuits shared by every control plane on one NATS server: one entry per
//! target in the `KNOCKER_TARGETS` bucket (`{target, circuit, by}`), written with
//! compare-and-set so that one control plane opens a circuit (and sends its
//! `target.paused`), one closes it, and one probes it. Each control plane watches the
//! bucket and takes the others' transitions over ([`Targets::apply`]).
//!
//! Rate schedules are shared the same way, in `KNOCKER_RATES`: one entry per limited
//! target holding its GCRA schedule (the time of its next attempt), moved by one
//! compare-and-set per attempt, so N control planes together keep the target's rate.
//! The bucket is on the NATS server, so the schedule also outlives a restart.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::targets::{reserve, Board, Circuit, Targets};
use crate::clock::Millis;
use crate::job::Rate;
use crate::store::nats::{open_bucket, NatsAccess};
use crate::store::StoreError;

const BUCKET: &str = "KNOCKER_TARGETS";
const RATES: &str = "KNOCKER_RATES";
/// A schedule untouched this long is behind any clock: dropped by the bucket.
const RATE_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Compare-and-set tries before an attempt falls back to the local schedule.
const RESERVE_TRIES: usize = 8;
/// A probe whose control plane went away is taken over after this long.
const PROBE_LEASE: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    target: String,
    circuit: Circuit,
    /// The control plane that wrote it.
    by: String,
}

pub struct NatsBoard {
    kv: kv::Store,
    rates: kv::Store,
    me: String,
}

/// A NATS key for a target (`host:port` holds characters keys do not take).
fn key(target: &str) -> String {
    target
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect()
}

impl NatsBoard {
    pub async fn open(server: &NatsAccess) -> Result<Arc<Self>, StoreError> {
        let client = server.connect("knocker-targets").await?;
        let js = jetstream::new(client);
        Ok(Arc::new(Self {
            kv: open_bucket(&js, BUCKET, Duration::ZERO).await?,
            rates: open_bucket(&js, RATES, RATE_KEEP).await?,
            me: uuid::Uuid::new_v4().simple().to_string(),
        }))
    }

    /// Takes the others' transitions over until `shutdown`.
    pub fn watch(self: Arc<Self>, targets: Arc<Targets>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                let mut updates = match self.kv.watch_all().await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch shared target circuits; again in 1 s");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            () = shutdown.cancelled() => return,
                        }
                    }
                };
                loop {
                    let entry = tokio::select! {
                        e = updates.next() => e,
                        () = shutdown.cancelled() => return,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    if let Ok(e) = serde_json::from_slice::<Entry>(&entry.value) {
                        if e.by != self.me {
                            targets.apply(&e.target, e.circuit);
                        }
                    }
                }
            }
        });
    }

    async fn current(&self, target: &str) -> Result<Option<(Entry, u64, Millis)>, String> {
        match self
            .kv
            .entry(key(target))
            .await
            .map_err(|e| e.to_string())?
        {
            Some(e) if matches!(e.operation, kv::Operation::Put) => {
                let written = (e.created.unix_timestamp_nanos() / 1_000_000).max(0) as Millis;
                Ok(serde_json::from_slice::<Entry>(&e.value)
                    .ok()
                    .map(|entry| (entry, e.revision, written)))
            }
            _ => Ok(None),
        }
    }

    async fn write(&self, target: &str, circuit: &Circuit, revision: Option<u64>) -> bool {
        let value = match serde_json::to_vec(&Entry {
            target: target.to_owned(),
            circuit: circuit.clone(),
            by: self.me.clone(),
        }) {
            Ok(v) => v,
            Err(_) => return false,
        };
        match revision {
            Some(r) => self.kv.update(key(target), value.into(), r).await.is_ok(),
            None => self.kv.create(key(target), value.into()).await.is_ok(),
        }
    }
}

#[async_trait::async_trait]
impl Board for NatsBoard {
    async fn publish(&self, target: &str, circuit: &Circuit) -> bool {
        for _ in 0..3 {
            let current = match self.current(target).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target_host = %target, error = %e, "cannot share a target's circuit");
                    return true; // the decision stands here; the others learn later
                }
            };
            let revision = current.as_ref().map(|(_, r, _)| *r);
            if let Some((entry, _, _)) = &current {
                let opening = !matches!(circuit, Circuit::Closed);
                let shared_open = !matches!(entry.circuit, Circuit::Closed);
                // Another control plane opened it first, or closed it first: theirs
                // stands, and so does their event.
                if entry.by != self.me
                    && opening == shared_open
                    && !matches!(circuit, Circuit::Paused { .. })
                {
                    return false;
                }
            }
            if self.write(target, circuit, revision).await {
                return true;
            }
        }
        false
    }

    async fn take_probe(&self, target: &str, now: Millis) -> bool {
        let Ok(Some((entry, revision, written))) = self.current(target).await else {
            return true; // nothing shared (or NATS unreachable): the local circuit decides
        };
        let probing = Circuit::Probing {
            since: match &entry.circuit {
                Circuit::Open { since, .. } | Circuit::Probing { since, .. } => *since,
                _ => now,
            },
            reason: match &entry.circuit {
                Circuit::Open { reason, .. } | Circuit::Probing { reason, .. } => reason.clone(),
                _ => String::new(),
            },
        };
        match &entry.circuit {
            Circuit::Open { retry_at, .. } if *retry_at <= now => {
                self.write(target, &probing, Some(revision)).await
            }
            // Our own earlier probe (it failed: the next one is ours too), or one whose
            // control plane went away.
            Circuit::Probing { .. }
                if entry.by == self.me
                    || now.saturating_sub(written) > PROBE_LEASE.as_millis() as Millis =>
            {
                self.write(target, &probing, Some(revision)).await
            }
            Circuit::Closed => true,
            _ => false,
        }
    }

    async fn reserve(
        &self,
        target: &str,
        rate: Rate,
        local: Millis,
        now: Millis,
    ) -> Option<(Millis, Millis)> {
        let key = key(target);
        for _ in 0..RESERVE_TRIES {
            let entry = match self.rates.entry(&key).await {
                Ok(e) => e.filter(|e| matches!(e.operation, kv::Operation::Put)),
                Err(e) => {
                    tracing::warn!(target_host = %target, error = %e, "cannot reach the shared rate schedule; this control plane's own applies");
                    return None;
                }
            };
            let shared = entry.as_ref().and_then(|e| {
                std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|v| v.parse::<Millis>().ok())
            });
            let mut tat = shared.unwrap_or(local);
            let at = reserve(&mut tat, rate, now);
            let value = tat.to_string().into_bytes().into();
            let written = match &entry {
                Some(e) => self.rates.update(&key, value, e.revision).await.is_ok(),
                None => self.rates.create(&key, value).await.is_ok(),
            };
            if written {
                return Some((at, tat));
            }
        }
        tracing::debug!(target_host = %target, "shared rate schedule contended; this attempt keeps the local one");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_only_what_nats_takes() {
        assert_eq!(key("api.example:443"), "api_2eexample_3a443");
        assert_eq!(key("[::1]:9"), "_5b_3a_3a1_5d_3a9");
    }
}
