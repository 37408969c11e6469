//! Waiting for a shard's replicas: once a move leaves the map, routers read its tables on
//! replicas again, which must by then hold the copied rows (target) and no longer hold the
//! deleted ones (source). Each replica the routers' config lists is asked directly: a standby
//! that is disconnected from its primary does not show in the primary's pg_stat_replication.

use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Waits until the replica at `replica_dsn` has replayed the primary's WAL up to where it is
/// now; false if it has not within `limit`. A synchronous commit first: with
/// `synchronous_commit = off` earlier commits (the move's deletions) may not be flushed yet,
/// and walsenders send only flushed WAL; the flush position after it covers them all.
pub async fn wait_replayed(
    primary: &Client,
    replica_dsn: &str,
    limit: Duration,
) -> Result<bool, super::MoveError> {
    primary
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT",
        )
        .await?;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
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
