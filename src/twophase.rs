//! Two-phase commit bookkeeping: global transaction ids, the durable decision log, and the
//! resolution of prepared transactions a crash left in doubt.
//!
//! A multi-shard commit runs PREPARE TRANSACTION on every shard that wrote, then appends
//! `C <txid>` to the decision log and fsyncs it, then runs COMMIT PREPARED everywhere and
//! appends `D <txid>`. After a crash, a prepared transaction of this router whose txid has a
//! `C` line is committed and any other is rolled back: without the line no client was told
//! COMMIT succeeded.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Why the decision log could not be written.
#[derive(Debug, thiserror::Error)]
#[error("decision log {path}: {source}")]
pub struct LogError {
    path: String,
    source: std::io::Error,
}

/// This router's two-phase commit state.
pub struct TwoPhase {
    router_id: String,
    next: AtomicU64,
    /// txids below this were issued by an earlier run of the router: never in flight now.
    first_txid: u64,
    path: PathBuf,
    file: Arc<parking_lot::Mutex<Option<std::fs::File>>>,
    unfinished: AtomicBool,
}

impl TwoPhase {
    /// Opens (creating) the decision log. txids start at the current time in microseconds, so
    /// they grow across restarts without reading the log.
    pub fn open(router_id: &str, path: PathBuf) -> TwoPhase {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        TwoPhase {
            router_id: router_id.to_string(),
            next: AtomicU64::new(now),
            first_txid: now,
            path,
            file: Arc::new(parking_lot::Mutex::new(None)),
            unfinished: AtomicBool::new(false),
        }
    }

    /// A new transaction id.
    pub fn next_txid(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The prepared-transaction name of `txid` on `shard`.
    pub fn gid(&self, txid: u64, shard: usize) -> String {
        format!(
            "{}_{}_{}_{}",
            crate::frontend::sharded::GID_PREFIX,
            self.router_id,
            txid,
            shard
        )
    }

    /// The LIKE pattern matching this router's gids.
    pub fn gid_pattern(&self) -> String {
        format!(
            "{}\\_{}\\_%",
            crate::frontend::sharded::GID_PREFIX,
            self.router_id.replace('_', "\\_")
        )
    }

    /// Records the commit decision durably (fsync) before any COMMIT PREPARED is sent.
    pub async fn log_commit(&self, txid: u64) -> Result<(), LogError> {
        self.append(format!("C {txid}\n"), true).await
    }

    /// Records that every shard committed (no fsync needed: losing it only means a harmless
    /// second COMMIT PREPARED attempt finding nothing).
    pub async fn log_done(&self, txid: u64) {
        if let Err(e) = self.append(format!("D {txid}\n"), false).await {
            tracing::warn!(error = %e, "cannot append to the decision log");
        }
    }

    /// Notes that some COMMIT PREPARED failed, so the resolver should look again.
    pub fn mark_unfinished(&self) {
        self.unfinished.store(true, Ordering::Relaxed);
    }

    /// Takes the "look again" flag.
    pub fn take_unfinished(&self) -> bool {
        self.unfinished.swap(false, Ordering::Relaxed)
    }

    async fn append(&self, line: String, sync: bool) -> Result<(), LogError> {
        let file = self.file.clone();
        let path = self.path.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = file.lock();
            if f.is_none() {
                *f = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)?,
                );
            }
            let fh = f.as_mut().expect("opened");
            fh.write_all(line.as_bytes())?;
            if sync {
                fh.sync_data()?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        r.map_err(|source| LogError {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Transactions decided as committed and not yet marked done.
    pub fn committed(&self) -> HashSet<u64> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut c = HashSet::new();
        for line in text.lines() {
            let mut it = line.split(' ');
            match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
                (Some("C"), Some(t)) => {
                    c.insert(t);
                }
                (Some("D"), Some(t)) => {
                    c.remove(&t);
                }
                _ => {}
            }
        }
        c
    }

    /// What to do with a prepared transaction named `gid` found on a server: Some(true) commit,
    /// Some(false) roll back, None leave it (another router's, or in flight right now).
    pub fn resolution(&self, gid: &str, committed: &HashSet<u64>) -> Option<bool> {
        let rest = gid
            .strip_prefix(crate::frontend::sharded::GID_PREFIX)?
            .strip_prefix('_')?;
        let rest = rest
            .strip_prefix(self.router_id.as_str())?
            .strip_prefix('_')?;
        let txid: u64 = rest.split('_').next()?.parse().ok()?;
        if committed.contains(&txid) {
            Some(true)
        } else if txid < self.first_txid {
            Some(false)
        } else {
            None
        }
    }
}

/// Finishes prepared transactions this router left in doubt: committed where the log holds the
/// decision, rolled back where it was never taken. Runs at start and after failed commits.
pub async fn resolve(app: &crate::app::App) -> usize {
    let cfg = app.config.load_full();
    let committed = app.twophase.committed();
    let pattern = app.twophase.gid_pattern();
    let max = cfg.general.max_message_size;
    let mut resolved = 0;
    for db in cfg.databases.iter().filter(|d| d.sharded) {
        for user in &cfg.users {
            for shard in 0..cfg.shards.len() {
                let Some(pool) = app.pool(&db.name, &user.name, shard) else {
                    continue;
                };
                let Ok(mut co) = pool.checkout().await else {
                    continue;
                };
                let sql = format!(
                    "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE '{pattern}' AND database = current_database() AND owner = current_user"
                );
                let gids = match co.conn.query_rows(&sql, max).await {
                    Ok(rows) => rows
                        .into_iter()
                        .filter_map(|r| r.into_iter().next().flatten())
                        .collect::<Vec<_>>(),
                    Err(_) => Vec::new(),
                };
                let mut clean = true;
                for gid in gids {
                    let Some(commit) = app.twophase.resolution(&gid, &committed) else {
                        continue;
                    };
                    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
                    match co
                        .conn
                        .exec_quiet(&format!("{verb} PREPARED '{gid}'"), max)
                        .await
                    {
                        Ok(()) => {
                            resolved += 1;
                            tracing::info!(%gid, shard, action = verb, "resolved in-doubt prepared transaction");
                        }
                        Err(e) => {
                            clean = false;
                            tracing::warn!(%gid, shard, error = %e, "cannot resolve prepared transaction");
                        }
                    }
                }
                pool.checkin(co, clean);
            }
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decisions_survive_in_the_log_and_drive_resolution() {
        let dir = std::env::temp_dir().join(format!("pgshard-2pc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let _ = std::fs::remove_file(&path);
        let a = TwoPhase::open("r1", path.clone());
        let (t1, t2, t3) = (a.next_txid(), a.next_txid(), a.next_txid());
        a.log_commit(t1).await.unwrap();
        a.log_commit(t2).await.unwrap();
        a.log_done(t2).await;
        std::thread::sleep(std::time::Duration::from_millis(2));
        // A restarted router reads the log.
        let b = TwoPhase::open("r1", path.clone());
        let c = b.committed();
        assert_eq!(c, HashSet::from([t1]));
        assert_eq!(b.resolution(&a.gid(t1, 0), &c), Some(true));
        assert_eq!(
            b.resolution(&a.gid(t3, 1), &c),
            Some(false),
            "undecided before the restart: roll back"
        );
        assert_eq!(
            b.resolution(&b.gid(b.next_txid(), 0), &c),
            None,
            "in flight now: leave it"
        );
        assert_eq!(b.resolution("pgshard_r2_5_0", &c), None, "another router's");
        assert_eq!(b.resolution("something_else", &c), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
