//! The local monitor store: what must survive a restart — definitions made through the
//! API, each monitor's alert state, its last results, its transitions and hourly uptime
//! counts — in one SQLite file, `<KNOCKER_DATA_DIR>/monitors.db` (in memory with
//! `KNOCKER_STORE=memory`). Writes are one small transaction per check.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::alert::{AlertState, Health, Transition};
use super::history::{store_error, MonitorStoreError, StoreResult};
use super::history::{CheckResult, Source, TransitionRecord, Uptime, HOUR_MS, MONTH_HOURS};
use super::MonitorConfig;
use crate::clock::Millis;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS monitors (
    name       TEXT PRIMARY KEY,
    source     TEXT NOT NULL,          -- 'file' or 'api'
    definition TEXT NOT NULL           -- MonitorConfig as JSON
);
CREATE TABLE IF NOT EXISTS state (
    name        TEXT PRIMARY KEY,
    health      TEXT NOT NULL,
    failures    INTEGER NOT NULL,
    successes   INTEGER NOT NULL,
    transitions INTEGER NOT NULL,
    since       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL,
    at               INTEGER NOT NULL,
    ok               INTEGER NOT NULL,
    status           INTEGER,
    latency_ms       INTEGER NOT NULL,
    failed_condition TEXT
);
CREATE INDEX IF NOT EXISTS results_by_name ON results (name, id);
CREATE TABLE IF NOT EXISTS transitions (
    id     INTEGER PRIMARY KEY,
    name   TEXT NOT NULL,
    number INTEGER NOT NULL,
    at     INTEGER NOT NULL,
    health TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_by_name ON transitions (name, id);
CREATE TABLE IF NOT EXISTS uptime (
    name  TEXT NOT NULL,
    hour  INTEGER NOT NULL,            -- ms since the epoch / 3 600 000
    ok    INTEGER NOT NULL,
    total INTEGER NOT NULL,
    PRIMARY KEY (name, hour)
);
";

/// The monitors' SQLite file (or an in-memory database), one connection.
pub struct LocalStore {
    conn: Arc<Mutex<Connection>>,
    /// Results kept per monitor.
    history: usize,
}

fn sql(e: rusqlite::Error) -> MonitorStoreError {
    store_error!("monitor store: {e}")
}

fn health_text(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Down => "down",
    }
}

fn health_from(text: &str) -> Health {
    if text == "down" {
        Health::Down
    } else {
        Health::Up
    }
}

impl LocalStore {
    /// `dir`: the data directory; `None` keeps everything in memory.
    pub fn open(dir: Option<&Path>, history: usize) -> StoreResult<Self> {
        let conn = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| store_error!("KNOCKER_DATA_DIR {}: {e}", dir.display()))?;
                let conn = Connection::open(dir.join("monitors.db")).map_err(sql)?;
                conn.pragma_update(None, "journal_mode", "WAL")
                    .map_err(sql)?;
                conn.pragma_update(None, "synchronous", "FULL")
                    .map_err(sql)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))
                    .map_err(sql)?;
                conn
            }
            None => Connection::open_in_memory().map_err(sql)?,
        };
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            history: history.max(1),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut conn.lock()).map_err(sql))
            .await
            .map_err(|e| store_error!("monitor store: {e}"))?
    }

    /// Every stored definition with its source.
    pub async fn definitions(&self) -> StoreResult<Vec<(String, Source, MonitorConfig)>> {
        let rows: Vec<(String, String, String)> = self
            .run(|c| {
                c.prepare("SELECT name, source, definition FROM monitors ORDER BY name")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(name, source, json)| {
                let config = serde_json::from_str(&json)
                    .map_err(|e| store_error!("monitor {name}: stored definition: {e}"))?;
                let source = if source == "file" {
                    Source::File
                } else {
                    Source::Api
                };
                Ok((name, source, config))
            })
            .collect()
    }

    /// Stores a definition (replacing one of the same name).
    pub async fn put(&self, name: &str, source: Source, config: &MonitorConfig) -> StoreResult<()> {
        let name = name.to_owned();
        let source = match source {
            Source::File => "file",
            Source::Api => "api",
        };
        let json = serde_json::to_string(config)?;
        self.run(move |c| {
            c.execute(
                "INSERT INTO monitors (name, source, definition) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET source = ?2, definition = ?3",
                params![name, source, json],
            )
            .map(|_| ())
        })
        .await
    }

    /// Removes a monitor and everything recorded about it. Returns whether it existed.
    pub async fn remove(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.run(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute("DELETE FROM monitors WHERE name = ?1", [&name])?;
            for table in ["state", "results", "transitions", "uptime"] {
                tx.execute(&format!("DELETE FROM {table} WHERE name = ?1"), [&name])?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn state(&self, name: &str) -> StoreResult<AlertState> {
        let name = name.to_owned();
        let row = self
            .run(move |c| {
                c.query_row(
                    "SELECT health, failures, successes, transitions, since FROM state
                     WHERE name = ?1",
                    [&name],
                    |r| {
                        Ok(AlertState {
                            health: health_from(&r.get::<_, String>(0)?),
                            failures: r.get(1)?,
                            successes: r.get(2)?,
                            transitions: r.get::<_, i64>(3)? as u64,
                            since: r.get::<_, i64>(4)? as u64,
                        })
                    },
                )
                .optional()
            })
            .await?;
        Ok(row.unwrap_or_default())
    }

    /// Records one check: its result, the new alert state, the transition it caused and
    /// the hourly uptime count, in one transaction; trims the history.
    pub async fn record(
        &self,
        name: &str,
        result: &CheckResult,
        state: &AlertState,
        transition: Option<Transition>,
    ) -> StoreResult<()> {
        let name = name.to_owned();
        let result = result.clone();
        let state = state.clone();
        let history = self.history as i64;
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO results (name, at, ok, status, latency_ms, failed_condition)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    result.at as i64,
                    result.ok,
                    result.status,
                    result.latency_ms as i64,
                    result.failed_condition
                ],
            )?;
            tx.execute(
                "DELETE FROM results WHERE name = ?1 AND id <= (
                     SELECT id FROM results WHERE name = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![name, history],
            )?;
            tx.execute(
                "INSERT INTO state (name, health, failures, successes, transitions, since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET health = ?2, failures = ?3, successes = ?4,
                                                  transitions = ?5, since = ?6",
                params![
                    name,
                    health_text(state.health),
                    state.failures,
                    state.successes,
                    state.transitions as i64,
                    state.since as i64
                ],
            )?;
            if let Some(t) = transition {
                tx.execute(
                    "INSERT INTO transitions (name, number, at, health, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        name,
                        t.number as i64,
                        result.at as i64,
                        health_text(t.to),
                        result.failed_condition
                    ],
                )?;
                tx.execute(
                    "DELETE FROM transitions WHERE name = ?1 AND id <= (
                         SELECT id FROM transitions WHERE name = ?1 ORDER BY id DESC
                         LIMIT 1 OFFSET ?2)",
                    params![name, history],
                )?;
            }
            let hour = (result.at / HOUR_MS) as i64;
            tx.execute(
                "INSERT INTO uptime (name, hour, ok, total) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (name, hour) DO UPDATE SET ok = ok + ?3, total = total + 1",
                params![name, hour, i64::from(result.ok)],
            )?;
            tx.execute(
                "DELETE FROM uptime WHERE name = ?1 AND hour < ?2",
                params![name, hour - MONTH_HOURS],
            )?;
            tx.commit()
        })
        .await
    }

    /// The last results, newest first.
    pub async fn results(&self, name: &str, limit: usize) -> StoreResult<Vec<CheckResult>> {
        let name = name.to_owned();
        self.run(move |c| {
            c.prepare(
                "SELECT at, ok, status, latency_ms, failed_condition FROM results
                 WHERE name = ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![name, limit as i64], |r| {
                Ok(CheckResult {
                    at: r.get::<_, i64>(0)? as Millis,
                    ok: r.get(1)?,
                    status: r.get(2)?,
                    latency_ms: r.get::<_, i64>(3)? as u64,
                    failed_condition: r.get(4)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// The transitions, newest first.
    pub async fn transitions(&self, name: &str) -> StoreResult<Vec<TransitionRecord>> {
        let name = name.to_owned();
        self.run(move |c| {
            c.prepare(
                "SELECT number, at, health, reason FROM transitions
                 WHERE name = ?1 ORDER BY id DESC",
            )?
            .query_map([name], |r| {
                Ok(TransitionRecord {
                    number: r.get::<_, i64>(0)? as u64,
                    at: r.get::<_, i64>(1)? as Millis,
                    health: health_from(&r.get::<_, String>(2)?),
                    reason: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Uptime over the last 24 h, 7 d and 30 d, counted by the hour up to `now`.
    pub async fn uptime(&self, name: &str, now: Millis) -> StoreResult<Uptime> {
        let name = name.to_owned();
        let hour = (now / HOUR_MS) as i64;
        self.run(move |c| {
            let share = |hours: i64| -> rusqlite::Result<Option<f64>> {
                let (ok, total): (i64, i64) = c.query_row(
                    "SELECT coalesce(sum(ok), 0), coalesce(sum(total), 0) FROM uptime
                     WHERE name = ?1 AND hour > ?2",
                    params![name, hour - hours],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok((total > 0).then(|| ok as f64 / total as f64))
            };
            Ok(Uptime {
                day: share(24)?,
                week: share(7 * 24)?,
                month: share(MONTH_HOURS)?,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(at: Millis, ok: bool) -> CheckResult {
        CheckResult {
            at,
            ok,
            status: Some(if ok { 200 } else { 503 }),
            latency_ms: 5,
            failed_condition: (!ok).then(|| "status 503 not in 200–299".into()),
        }
    }

    #[tokio::test]
    async fn keeps_state_history_transitions_and_uptime_across_a_reopen() {
        let dir =
            std::env::temp_dir().join(format!("knocker-monitor-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config: MonitorConfig = serde_json::from_str(r#"{"url":"http://t/health"}"#).unwrap();
        let now = 1_000 * HOUR_MS;
        {
            let store = LocalStore::open(Some(&dir), 3).unwrap();
            store.put("api", Source::Api, &config).await.unwrap();
            let mut state = AlertState::default();
            for i in 0..5u64 {
                let ok = i < 2;
                let t = state.observe(ok, 2, 1);
                store
                    .record("api", &result(now - 2 * HOUR_MS + i, ok), &state, t)
                    .await
                    .unwrap();
            }
            // A check 40 days ago no longer counts.
            store
                .record("api", &result(now - 40 * 24 * HOUR_MS, true), &state, None)
                .await
                .unwrap();
        }
        let store = LocalStore::open(Some(&dir), 3).unwrap();
        let defs = store.definitions().await.unwrap();
        assert_eq!(defs.len(), 1);
        assert_eq!((defs[0].0.as_str(), defs[0].1), ("api", Source::Api));
        let state = store.state("api").await.unwrap();
        assert_eq!(state.health, Health::Down);
        assert_eq!((state.failures, state.transitions), (3, 1));
        let results = store.results("api", 10).await.unwrap();
        assert_eq!(results.len(), 3, "history trimmed to 3");
        let transitions = store.transitions("api").await.unwrap();
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].health, Health::Down);
        assert_eq!(
            transitions[0].reason.as_deref(),
            Some("status 503 not in 200–299")
        );
        let uptime = store.uptime("api", now).await.unwrap();
        assert_eq!(uptime.day, Some(2.0 / 5.0));
        assert_eq!(uptime.month, Some(2.0 / 5.0));
        assert_eq!(store.uptime("other", now).await.unwrap().day, None);
        assert!(store.remove("api").await.unwrap());
        assert!(store.results("api", 10).await.unwrap().is_empty());
        assert_eq!(store.state("api").await.unwrap(), AlertState::default());
    }
}
