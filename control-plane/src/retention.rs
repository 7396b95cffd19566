//! Retention: delivered and failed jobs older than `KNOCKER_RETENTION` are removed, every
//! 10 seconds (or more often for short retentions). On NATS each round also sweeps the
//! markers of the jobs the history's size cap removed: between rounds they pile up at the
//! rate jobs finish, so rounds are short and frequent.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Time;
use crate::store::Store;

/// Removes finished jobs past `keep` until `shutdown`.
pub async fn run(store: Arc<dyn Store>, time: Time, keep: Duration, shutdown: CancellationToken) {
    let every = (keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let before = time.now_ms().saturating_sub(keep.as_millis() as u64);
        match store.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                jobs = n,
                "finished jobs removed (past their retention, or the oldest, to make room)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot remove finished jobs"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
