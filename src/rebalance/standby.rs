//! Waiting for a shard's replicas: once a move leaves the map, routers read its tables on
//! replicas again, which must by then hold the copied rows (target) and no longer hold the
//! deleted ones (source). Each replica the routers' config lists is asked directly: a standby
//! that is disconnected from its primary does not show in the primary's pg_stat_replication.

use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Waits until the replica at `replica_dsn` has replayed the primary's WAL up to where it is
/// now; false if it has not within `limit`. The insert position, not the write position: with
/// `synchronous_commit = off` a commit can sit in WAL buffers past the write position.
pub async fn wait_replayed(
    primary: &Client,
    replica_dsn: &str,
    limit: Duration,
) -> Result<bool, super::MoveError> {
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let replica = super::connect(replica_dsn).await?;
    let deadline = Instant::now() + limit;
    loop {
        let done: Option<bool> = replica
            .query_one(
                "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await?
            .get(0);
        if done == Some(true) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
