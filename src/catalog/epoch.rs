//! Epochs: which map version each running request or transaction began under. A router
//! acknowledges a new map version to the catalog only once nothing begun under an older one is
//! still running, so when every router has acknowledged a fence, no statement routed by the
//! unfenced map can still write to the source shard (docs/rebalancing.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A token held by every request (and every transaction) for as long as it runs.
#[derive(Debug, Default)]
pub struct Epoch {
    /// The map version current when the token was handed out.
    pub version: u64,
    revoked: AtomicBool,
    revoke: Notify,
}

impl Epoch {
    /// A token for map `version`.
    pub fn new(version: u64) -> Arc<Epoch> {
        Arc::new(Epoch {
            version,
            ..Default::default()
        })
    }

    /// True once the router gave up waiting for this epoch's transactions to end: a session
    /// holding it must roll its transaction back (the client gets 40001) and let go.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Resolves when the epoch is revoked (an idle transaction wakes up to give its token back).
    pub async fn wait_revoked(&self) {
        let n = self.revoke.notified();
        if !self.revoked() {
            n.await;
        }
    }

    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.revoke.notify_waiters();
    }
}

/// Epochs replaced by newer map versions whose holders may still be running.
#[derive(Default)]
pub struct Draining {
    old: Vec<Arc<Epoch>>,
    /// When the oldest undrained epoch was replaced.
    since: Option<Instant>,
    revoked: bool,
}

impl Draining {
    /// Remembers an epoch that was just replaced.
    pub fn push(&mut self, e: Arc<Epoch>) {
        self.old.push(e);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Waits, at most `slice` this call, for every holder of an old epoch to finish; stragglers
    /// still there `drain` after their epoch was replaced are revoked and given `grace` to roll
    /// back. True when nothing old is left.
    pub async fn settle(&mut self, drain: Duration, grace: Duration, slice: Duration) -> bool {
        let call = Instant::now();
        loop {
            // Only this list holds a token nobody uses any more.
            self.old.retain(|e| Arc::strong_count(e) > 1);
            let Some(since) = self.since.filter(|_| !self.old.is_empty()) else {
                self.since = None;
                self.revoked = false;
                return true;
            };
            let waited = since.elapsed();
            if !self.revoked && waited >= drain {
                tracing::warn!(
                    transactions = self
                        .old
                        .iter()
                        .map(|e| Arc::strong_count(e) - 1)
                        .sum::<usize>(),
                    "revoking transactions begun under an older shard map"
                );
                self.old.iter().for_each(|e| e.revoke());
                self.revoked = true;
            }
            if waited >= drain + grace || call.elapsed() >= slice {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
