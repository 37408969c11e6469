//! Waiting for a shard's streaming replicas: once a move leaves the map, routers read its
//! tables on replicas again, which must by then hold the copied rows (target) and no longer
//! hold the deleted ones (source).

use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How waiting for a primary's replicas ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Standbys {
    /// Every physical standby replayed past the primary's WAL position at the call.
    CaughtUp,
    /// The user cannot see replay positions (needs pg_read_all_stats or superuser).
    Unseen,
    /// Some standby was still behind at the deadline: `n` of them.
    Behind(i64),
}

/// Waits until every physical standby streaming from this primary has replayed past its
/// current WAL position, or `limit` passes. Logical walsenders (connected to a database) are
/// not standbys.
pub async fn wait_replayed(c: &Client, limit: Duration) -> Result<Standbys, tokio_postgres::Error> {
    let seen: bool = c
        .query_one("SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)", &[])
        .await?
        .get(0);
    if !seen {
        return Ok(Standbys::Unseen);
    }
    let lsn: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let behind = "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_activity a ON a.pid = r.pid \
                  WHERE a.datname IS NULL AND (r.replay_lsn IS NULL OR r.replay_lsn < $1::text::pg_lsn)";
    let deadline = Instant::now() + limit;
    loop {
        let n: i64 = c.query_one(behind, &[&lsn]).await?.get(0);
        if n == 0 {
            return Ok(Standbys::CaughtUp);
        }
        if Instant::now() >= deadline {
            return Ok(Standbys::Behind(n));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
