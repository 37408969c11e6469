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
use std::time::Duration;

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

/// How long one step of the resolution (a checkout, the listing, one COMMIT PREPARED) may take;
/// a step that overruns leaves the shard to the next pass, with a warning that names it.
const STEP: Duration = Duration::from_secs(5);

/// Finishes prepared transactions this router left in doubt: committed where the log holds the
/// decision, rolled back where it was never taken. Runs at start and after failed commits.
///
/// One listing per (server database, shard), as the first configured user that can log in;
/// each transaction is finished as its owner when that user is configured (PostgreSQL lets only
/// the owner or a superuser finish it), else as the listing user.
pub async fn resolve(app: &crate::app::App) -> usize {
    let cfg = app.config.load_full();
    let committed = app.twophase.committed();
    let sql = format!(
        "SELECT gid, owner FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE '{}' AND database = current_database()",
        app.twophase.gid_pattern()
    );
    let mut looked = HashSet::new();
    let mut resolved = 0;
    for db in cfg.databases.iter().filter(|d| d.sharded) {
        let server_db = db.server_database.as_deref().unwrap_or(&db.name);
        for shard in 0..cfg.shards.len() {
            if !looked.insert((server_db, shard)) {
                continue;
            }
            let Some((lister, found)) = list(app, &cfg, &db.name, shard, &sql).await else {
                app.twophase.mark_unfinished();
                continue;
            };
            for (gid, owner) in found {
                let Some(commit) = app.twophase.resolution(&gid, &committed) else {
                    continue;
                };
                let user = if cfg.user(&owner).is_some() {
                    owner.as_str()
                } else {
                    lister
                };
                if finish(app, &db.name, user, shard, &gid, commit).await {
                    resolved += 1;
                } else {
                    app.twophase.mark_unfinished();
                }
            }
        }
    }
    resolved
}

/// This router's prepared transactions on `shard` (gid, owner), and the user that listed them.
async fn list<'c>(
    app: &crate::app::App,
    cfg: &'c crate::config::Config,
    database: &str,
    shard: usize,
    sql: &str,
) -> Option<(&'c str, Vec<(String, String)>)> {
    let max = cfg.general.max_message_size;
    for user in &cfg.users {
        let pool = app.pool(database, &user.name, shard)?;
        let co = match tokio::time::timeout(STEP, pool.checkout()).await {
            Ok(Ok(co)) => co,
            // This user may not log in there; another may.
            Ok(Err(crate::pool::PoolError::Connect(crate::backend::BackendError::Refused {
                ..
            }))) => continue,
            Ok(Err(e)) => {
                tracing::warn!(shard, database, error = %e, "cannot look for in-doubt prepared transactions");
                return None;
            }
            Err(_) => {
                tracing::warn!(shard, database, user = %user.name, "timed out connecting to look for in-doubt prepared transactions");
                return None;
            }
        };
        let mut co = co;
        let rows = tokio::time::timeout(STEP, co.conn.query_rows(sql, max)).await;
        let rows = match rows {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!(shard, database, error = %e, "cannot list prepared transactions");
                pool.checkin(co, false);
                return None;
            }
            Err(_) => {
                tracing::warn!(shard, database, "listing prepared transactions timed out");
                pool.discard(co);
                return None;
            }
        };
        pool.checkin(co, true);
        let found = rows
            .into_iter()
            .filter_map(|r| {
                let mut it = r.into_iter();
                Some((it.next().flatten()?, it.next().flatten()?))
            })
            .collect();
        return Some((user.name.as_str(), found));
    }
    None
}

/// COMMIT or ROLLBACK PREPARED `gid` on `shard` as `user`; whether it was done.
async fn finish(
    app: &crate::app::App,
    database: &str,
    user: &str,
    shard: usize,
    gid: &str,
    commit: bool,
) -> bool {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let Some(pool) = app.pool(database, user, shard) else {
        return false;
    };
    let max = app.config.load().general.max_message_size;
    let mut co = match tokio::time::timeout(STEP, pool.checkout()).await {
        Ok(Ok(co)) => co,
        Ok(Err(e)) => {
            tracing::warn!(%gid, shard, error = %e, "cannot resolve prepared transaction");
            return false;
        }
        Err(_) => {
            tracing::warn!(%gid, shard, "timed out connecting to resolve prepared transaction");
            return false;
        }
    };
    let sql = format!("{verb} PREPARED '{gid}'");
    match tokio::time::timeout(STEP, co.conn.exec_quiet(&sql, max)).await {
        Ok(Ok(())) => {
            pool.checkin(co, true);
            tracing::info!(%gid, shard, action = verb, "resolved in-doubt prepared transaction");
            true
        }
        Ok(Err(e)) => {
            pool.checkin(co, false);
            tracing::warn!(%gid, shard, error = %e, "cannot resolve prepared transaction");
            false
        }
        Err(_) => {
            pool.discard(co);
            tracing::warn!(%gid, shard, "resolving prepared transaction timed out");
            false
        }
    }
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
