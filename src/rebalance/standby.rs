//! Replicas after a move: once a move (or a joining shard) leaves the map, routers read its
//! tables on replicas again, which must by then hold the copied rows and no longer hold the
//! deleted ones. The map carries a *replica floor* per shard — the WAL position of the primary
//! once the move's writes are done — and routers read on a replica only once it has replayed
//! past it (the health monitor observes each replica's replay position). Waiting here would not
//! be enough: a replica can stall replay for as long as `max_standby_streaming_delay` while its
//! queries hold a lock that vacuum's truncation needs, and a replica shardctl does not know of
//! would not be waited for at all.

use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A WAL position on the primary past every commit made before this call: the position of a
/// logical message written in a transaction committed synchronously. Both parts matter: the
/// move's deletions were committed with the server's `synchronous_commit` (often off), so
/// they may sit unflushed — and walsenders send only flushed WAL; and PostgreSQL commits a
/// transaction that wrote no WAL of its own asynchronously even with `synchronous_commit = on`,
/// so a bare `pg_current_xact_id()` flushes nothing. A replica that has replayed up to the
/// message's position has replayed every record before it.
pub async fn floor(primary: &Client) -> Result<String, super::MoveError> {
    primary
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
        .await?;
    let lsn = primary
        .query_one(
            "SELECT pg_logical_emit_message(true, 'pgshard_floor', '')::text",
            &[],
        )
        .await;
    let lsn: String = match lsn {
        Ok(row) => row.get(0),
        Err(e) => {
            let _ = primary.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    };
    primary.batch_execute("COMMIT").await?;
    Ok(lsn)
}

/// Waits until the replica at `replica_dsn` has replayed up to `lsn`; false if it has not
/// within `limit`.
pub async fn wait_replayed(
    replica_dsn: &str,
    lsn: &str,
    limit: Duration,
) -> Result<bool, super::MoveError> {
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
