//! A shard's server connection lost in the middle of a multi-shard statement: the client gets
//! an error (never a partial merged answer), its transaction fails and rolls back everywhere,
//! and the session goes on with fresh connections.

use crate::ensure;
use crate::harness::{block_on, first_value as one, sqlstate, Harness, PgContext, TestResult};
use crate::sharding::{on_shard, shard_of, shop};
use crate::trial;
use libtest_mimic::Trial;
use std::time::Duration;

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "sharding::server_lost_mid_scatter",
        server_lost_mid_scatter,
    )]
}

/// A slow scatter read: 100 rows × 20 ms, half on each shard.
const SLOW: &str = "SELECT count(*) FROM lossy WHERE pg_sleep(0.02) IS NOT NULL";

/// Terminates, on every server of `shard`, the backends running the slow scatter read.
fn kill_slow(h: &Harness, shard: usize) -> Result<String, String> {
    let sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
               WHERE query LIKE '%pg_sleep(0.02)%' AND pid <> pg_backend_pid()";
    let mut killed = 0;
    let servers = std::iter::once(h.primary(shard)).chain(h.cluster.replicas(shard));
    for s in servers {
        let n = h.cluster.psql(s, "shop", sql).map_err(|e| e.to_string())?;
        killed += n.trim().parse::<u32>().unwrap_or(0);
    }
    Ok(killed.to_string())
}

/// Runs the slow read on `c` and kills shard 1's part of it after 400 ms; returns the error.
async fn slow_read_killed(
    h: &Harness,
    c: &tokio_postgres::Client,
) -> Result<tokio_postgres::Error, String> {
    let read = c.simple_query(SLOW);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Blocking is fine: the read is sent, and its answer waits in the socket.
        kill_slow(h, 1)
    };
    let (r, killed) = tokio::join!(read, killer);
    let killed = killed?;
    ensure!(
        killed == "1",
        "one backend of shard 1 ran the read: killed {killed}"
    );
    match r {
        Ok(rows) => Err(format!(
            "the read survived losing a shard: {} messages",
            rows.len()
        )),
        Err(e) => Ok(e),
    }
}

fn server_lost_mid_scatter(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        c.batch_execute(
            "DROP TABLE IF EXISTS lossy; CREATE TABLE lossy (id bigint PRIMARY KEY, v int)",
        )
        .await
        .pgx("ddl")?;
        let values: Vec<String> = (1..=100).map(|i| format!("({i}, {i})")).collect();
        c.batch_execute(&format!(
            "INSERT INTO lossy (id, v) VALUES {}",
            values.join(",")
        ))
        .await
        .pgx("seed")?;
        ensure!(
            (1..=100).filter(|&i| shard_of(i) == 1).count() > 20,
            "rows on both shards"
        );

        // Outside a transaction (the read may run on replicas: both servers are searched).
        let e = slow_read_killed(h, &c).await?;
        ensure!(
            e.as_db_error().is_some_and(|d| d.severity() == "ERROR"),
            "the server's FATAL reaches the client as an ERROR: {e:?}"
        );
        ensure!(
            ["57P01", "08006"].contains(&sqlstate(&e).as_str()),
            "losing a shard mid-read: {e:?}"
        );
        let n = one(&c, "SELECT count(*) FROM lossy").await?;
        ensure!(n == "100", "the session goes on after the loss: {n}");

        // Inside a transaction that wrote on shard 0: the loss fails it, ROLLBACK undoes the write.
        let id0 = (1000..).find(|&i| shard_of(i) == 0).unwrap();
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO lossy (id, v) VALUES ({id0}, 0)"
        ))
        .await
        .pgx("begin and write")?;
        let e = slow_read_killed(h, &c).await?;
        ensure!(
            ["57P01", "08006"].contains(&sqlstate(&e).as_str()),
            "losing a shard mid-transaction: {e:?}"
        );
        let after = c.simple_query("SELECT 1").await;
        ensure!(
            after.as_ref().err().map(sqlstate).as_deref() == Some("25P02"),
            "the transaction is failed after the loss: {after:?}"
        );
        c.batch_execute("ROLLBACK").await.pgx("rollback")?;
        let kept = on_shard(
            h,
            0,
            "shop",
            &format!("SELECT count(*) FROM lossy WHERE id = {id0}"),
        )?;
        ensure!(
            kept == "0",
            "the failed transaction's write was rolled back: {kept}"
        );
        let n = one(&c, "SELECT count(*) FROM lossy").await?;
        ensure!(
            n == "100",
            "the session goes on after the failed transaction: {n}"
        );
        Ok(())
    })
}
