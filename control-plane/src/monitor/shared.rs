//! Monitors shared by every control plane on one NATS server (`KNOCKER_STORE=nats://…`):
//! definitions, alert state, results, transitions and uptime in key-value buckets, and a
//! lease per monitor so that each check runs in one control plane at a time.
//!
//! - `KNOCKER_MONITORS`: definitions (`{source, config}`), key = the monitor's name.
//! - `KNOCKER_MONITOR_STATE`: one document per monitor (state, last results,
//!   transitions, hourly uptime), written by the control plane that ran the check.
//! - `KNOCKER_MONITOR_LEASES`: the holder of each monitor's checks; an entry expires
//!   [`LEASE`] after it was last written, so a control plane that dies hands its monitors
//!   to another within that time. The state goes with them: no second alert.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use super::alert::{AlertState, Transition};
use super::history::{store_error, MonitorStoreError, StoreResult};
use super::history::{CheckResult, Source, TransitionRecord, Uptime, HOUR_MS, MONTH_HOURS};
use super::MonitorConfig;
use crate::clock::Millis;
use crate::store::nats::{open_bucket, NatsAccess};

/// How long a monitor stays with a control plane that stopped checking it.
pub const LEASE: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize)]
struct Definition {
    source: Source,
    config: MonitorConfig,
}

#[derive(Default, Serialize, Deserialize)]
struct Doc {
    state: AlertState,
    results: VecDeque<CheckResult>,
    transitions: VecDeque<TransitionRecord>,
    /// Hour (ms / 3 600 000) → (good checks, checks).
    uptime: BTreeMap<i64, (u64, u64)>,
}

pub struct SharedStore {
    definitions: kv::Store,
    state: kv::Store,
    leases: kv::Store,
    history: usize,
    /// This control plane, as lease holder.
    owner: String,
}

fn err(e: impl std::fmt::Display) -> MonitorStoreError {
    store_error!("monitor store (NATS): {e}")
}

impl SharedStore {
    pub async fn open(server: &NatsAccess, history: usize) -> StoreResult<Self> {
        let client = server.connect("knocker-monitors").await.map_err(err)?;
        let js = jetstream::new(client);
        Ok(Self {
            definitions: open_bucket(&js, "KNOCKER_MONITORS", Duration::ZERO).await?,
            state: open_bucket(&js, "KNOCKER_MONITOR_STATE", Duration::ZERO).await?,
            leases: open_bucket(&js, "KNOCKER_MONITOR_LEASES", LEASE).await?,
            history: history.max(1),
            owner: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    pub async fn definitions(&self) -> StoreResult<Vec<(String, Source, MonitorConfig)>> {
        use futures_util::StreamExt as _;
        let mut out = Vec::new();
        let mut keys = self.definitions.keys().await.map_err(err)?;
        while let Some(name) = keys.next().await {
            let name = name.map_err(err)?;
            if let Some(value) = self.definitions.get(name.clone()).await.map_err(err)? {
                if let Ok(d) = serde_json::from_slice::<Definition>(&value) {
                    out.push((name, d.source, d.config));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub async fn put(&self, name: &str, source: Source, config: &MonitorConfig) -> StoreResult<()> {
        let value = serde_json::to_vec(&Definition {
            source,
            config: config.clone(),
        })?;
        self.definitions
            .put(name, value.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    pub async fn remove(&self, name: &str) -> StoreResult<bool> {
        let existed = self.definitions.get(name).await.map_err(err)?.is_some();
        for bucket in [&self.definitions, &self.state, &self.leases] {
            bucket.purge(name).await.map_err(err)?;
        }
        Ok(existed)
    }

    async fn doc(&self, name: &str) -> StoreResult<Doc> {
        Ok(match self.state.get(name).await.map_err(err)? {
            Some(value) if !value.is_empty() => serde_json::from_slice(&value).map_err(err)?,
            _ => Doc::default(),
        })
    }

    pub async fn state(&self, name: &str) -> StoreResult<AlertState> {
        Ok(self.doc(name).await?.state)
    }

    pub async fn record(
        &self,
        name: &str,
        result: &CheckResult,
        state: &AlertState,
        transition: Option<Transition>,
    ) -> StoreResult<()> {
        let mut doc = self.doc(name).await?;
        doc.state = state.clone();
        doc.results.push_front(result.clone());
        doc.results.truncate(self.history);
        if let Some(t) = transition {
            doc.transitions.push_front(TransitionRecord {
                number: t.number,
                at: result.at,
                health: t.to,
                reason: result.failed_condition.clone(),
            });
            doc.transitions.truncate(self.history);
        }
        let hour = (result.at / HOUR_MS) as i64;
        let slot = doc.uptime.entry(hour).or_default();
        slot.0 += u64::from(result.ok);
        slot.1 += 1;
        doc.uptime.retain(|h, _| *h > hour - MONTH_HOURS);
        let value = serde_json::to_vec(&doc)?;
        self.state.put(name, value.into()).await.map_err(err)?;
        Ok(())
    }

    pub async fn results(&self, name: &str, limit: usize) -> StoreResult<Vec<CheckResult>> {
        Ok(self
            .doc(name)
            .await?
            .results
            .into_iter()
            .take(limit)
            .collect())
    }

    pub async fn transitions(&self, name: &str) -> StoreResult<Vec<TransitionRecord>> {
        Ok(self.doc(name).await?.transitions.into_iter().collect())
    }

    pub async fn uptime(&self, name: &str, now: Millis) -> StoreResult<Uptime> {
        let doc = self.doc(name).await?;
        let hour = (now / HOUR_MS) as i64;
        let share = |hours: i64| {
            let (ok, total) = doc
                .uptime
                .range(hour - hours + 1..)
                .fold((0, 0), |(o, t), (_, (ok, total))| (o + ok, t + total));
            (total > 0).then(|| ok as f64 / total as f64)
        };
        Ok(Uptime {
            day: share(24),
            week: share(7 * 24),
            month: share(MONTH_HOURS),
        })
    }

    /// Whether this control plane holds (or now takes) the monitor's lease.
    pub async fn lease(&self, name: &str) -> StoreResult<bool> {
        match self.leases.entry(name).await.map_err(err)? {
            Some(entry)
                if matches!(entry.operation, kv::Operation::Put) && !entry.value.is_empty() =>
            {
                if entry.value != self.owner.as_bytes() {
                    return Ok(false);
                }
                // Ours: renew it, unless someone took it meanwhile.
                Ok(self
                    .leases
                    .update(name, self.owner.clone().into_bytes().into(), entry.revision)
                    .await
                    .is_ok())
            }
            // Free (never taken, expired or released).
            _ => Ok(self
                .leases
                .create(name, self.owner.clone().into_bytes().into())
                .await
                .is_ok()),
        }
    }
}
