//! Bulk steps of a move over ordinary connections: checking that a table can move, copying a
//! unit's rows under the slot's exported snapshot, per-bucket verification, and cleanup.

use super::{MoveError, Progress};
use futures_util::{pin_mut, SinkExt, StreamExt};
use std::time::Duration;
use tokio_postgres::Client;

/// True when the table exists on the server.
pub async fn exists(c: &Client, table: &str) -> Result<bool, MoveError> {
    Ok(
        c.query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
            .await?
            .get(0),
    )
}

/// Refuses a table whose primary key lacks the sharding key (a row-filtered publication would
/// then break UPDATE and DELETE on the source), or whose columns differ on the target.
pub async fn validate(
    source: &Client,
    target: &Client,
    table: &str,
    column: &str,
) -> Result<(), MoveError> {
    // The target keeps a reverse slot from before the switch, for an undo.
    for (side, c) in [("source", source), ("target", target)] {
        let wal: String = c.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal != "logical" {
            return Err(MoveError::Refused(format!(
                "the {side} shard runs with wal_level = {wal}; moves need wal_level = logical on both shards"
            )));
        }
    }
    let key_sql = "SELECT coalesce(array_agg(a.attname::text), '{}') FROM pg_index i \
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                   WHERE i.indrelid = $1::text::regclass AND i.indisprimary";
    let pk: Vec<String> = source
        .query_one(key_sql, &[&table])
        .await
        .map_err(|e| missing(table, e))?
        .get(0);
    if !pk.iter().any(|c| c == column) {
        return Err(MoveError::Refused(format!(
            "table {table}: its primary key ({}) does not contain the sharding key {column}; add it to the primary key before moving",
            if pk.is_empty() { "none".to_string() } else { pk.join(", ") }
        )));
    }
    let cols_sql = "SELECT coalesce(string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum), '') \
                    FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped";
    let a: String = source.query_one(cols_sql, &[&table]).await?.get(0);
    let b: String = target
        .query_one(cols_sql, &[&table])
        .await
        .map_err(|e| missing(table, e))?
        .get(0);
    if a != b {
        return Err(MoveError::Refused(format!(
            "table {table} differs between the shards: source ({a}), target ({b})"
        )));
    }
    Ok(())
}

fn missing(table: &str, e: tokio_postgres::Error) -> MoveError {
    MoveError::Refused(format!(
        "table {table}: {}",
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    ))
}

/// Copies the rows `pred` selects from `table` under `snapshot` into the target; returns
/// (rows, bytes).
pub async fn copy_unit(
    source: &mut Client,
    target: &Client,
    snapshot: &str,
    table: &str,
    pred: &str,
    progress: &dyn Progress,
) -> Result<(u64, u64), MoveError> {
    let t = super::apply::table_ident(table)?;
    let tx = source
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await?;
    let select = format!("SELECT * FROM {t} WHERE {pred}");
    let estimate = estimated_rows(&tx, table, &select).await;
    let out = tx.copy_out(&format!("COPY ({select}) TO STDOUT")).await?;
    let sink = target.copy_in(&format!("COPY {t} FROM STDIN")).await?;
    let step = format!("copying {table}");
    progress.advance(&step, 0, estimate);
    let r = pipe(out, sink, &mut |rows| {
        progress.advance(&step, rows, estimate)
    })
    .await;
    progress.step_done();
    let r = r?;
    tx.commit().await?;
    Ok(r)
}

/// The planner's row estimate for a query (for a progress bar's length), when the table has
/// statistics: without them the planner's guess is off by orders of magnitude.
async fn estimated_rows(
    c: &tokio_postgres::Transaction<'_>,
    table: &str,
    select: &str,
) -> Option<u64> {
    let analysed: bool = c
        .query_one(
            "SELECT reltuples >= 0 FROM pg_catalog.pg_class WHERE oid = to_regclass($1::text)",
            &[&table],
        )
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    if !analysed {
        return None;
    }
    // The top plan line: "Seq Scan on t  (cost=0.00..35.50 rows=2550 width=4)".
    let rows = c.query(&format!("EXPLAIN {select}"), &[]).await.ok()?;
    let top: String = rows.first()?.try_get(0).ok()?;
    let n = top.split("rows=").nth(1)?.split(' ').next()?;
    n.parse().ok()
}

/// Streams a `COPY … TO STDOUT` into a `COPY … FROM STDIN`; returns (rows, bytes). `tick`
/// hears the rows sent so far every few hundred kilobytes.
pub async fn pipe(
    out: tokio_postgres::CopyOutStream,
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    tick: &mut dyn FnMut(u64),
) -> Result<(u64, u64), MoveError> {
    pin_mut!(out);
    pin_mut!(sink);
    let (mut bytes, mut rows, mut told) = (0u64, 0u64, 0u64);
    while let Some(chunk) = out.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        // Text COPY escapes newlines inside values: each newline byte ends a row.
        rows += newlines(&chunk);
        if bytes - told >= 256 * 1024 {
            told = bytes;
            tick(rows);
        }
        // feed, not send: send flushes every row (PostgreSQL sends one CopyData per row);
        // the sink flushes by itself as its buffer fills.
        sink.feed(chunk).await?;
    }
    let rows = sink.finish().await?;
    tick(rows);
    Ok((rows, bytes))
}

fn newlines(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

/// Per-bucket (or per-unit) row count and order-independent checksum of the unit's rows.
pub async fn fingerprint(
    c: &Client,
    table: &str,
    pred: &str,
    group: &str,
) -> Result<Vec<(i64, i64, String)>, MoveError> {
    let t = super::apply::table_ident(table)?;
    let sql = format!(
        "SELECT g::int8, count(*), coalesce(sum(('x' || left(md5(r::text), 15))::bit(60)::int8), 0)::text \
         FROM (SELECT {group} AS g, t AS r FROM {t} t WHERE {pred}) s GROUP BY g ORDER BY g"
    );
    let rows = c.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Deletes the unit's rows from `table` in batches (no long lock, no huge transaction).
pub async fn delete_unit(
    c: &Client,
    table: &str,
    pred: &str,
    batch: u32,
) -> Result<u64, MoveError> {
    let t = super::apply::table_ident(table)?;
    let sql = format!(
        "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {pred} LIMIT {batch}))"
    );
    let mut total = 0;
    loop {
        let n = c.execute(&sql, &[]).await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}

/// Vacuums a table a unit has just left. The deleted rows' index entries would otherwise stay
/// until autovacuum comes by, and every row of a unit moved back meanwhile would meet its own
/// dead twin in the primary key's uniqueness check (a heap visit per row: copies at half speed,
/// measured). A failure only costs that, so it is reported, not raised.
pub async fn vacuum(c: &Client, table: &str, progress: &dyn Progress) {
    let r = match super::apply::table_ident(table) {
        Ok(t) => c
            .batch_execute(&format!("VACUUM (ANALYZE) {t}"))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = r {
        progress.line(&format!(
            "VACUUM of {table} failed ({e}); autovacuum will get to it"
        ));
    }
}

/// How long a prepared transaction may sit on the source before the move takes it for one left
/// in doubt (a router's two-phase commit finishes in milliseconds).
const STALE_PREPARED: Duration = Duration::from_secs(5);

/// Waits for prepared transactions older than a few seconds to be finished, and refuses the
/// move if they are not: a logical slot cannot be created while any transaction is open, and a
/// prepared one stays open until someone commits or rolls it back, so the move would hang.
pub async fn wait_for_prepared(src: &Client, wait: Duration) -> Result<(), MoveError> {
    let deadline = std::time::Instant::now() + wait;
    let sql = format!(
        "SELECT gid, database::text, owner::text, prepared::text FROM pg_catalog.pg_prepared_xacts \
         WHERE prepared < now() - interval '{} seconds' ORDER BY prepared",
        STALE_PREPARED.as_secs()
    );
    loop {
        let rows = src.query(&sql, &[]).await?;
        if rows.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let list: Vec<String> = rows
                .iter()
                .take(5)
                .map(|r| {
                    format!(
                        "'{}' (database {}, owner {}, since {})",
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                        r.get::<_, String>(3)
                    )
                })
                .collect();
            return Err(MoveError::Refused(format!(
                "the source has {} prepared transaction(s) left in doubt: {}; a logical slot waits \
                 for them forever. A pgshard router resolves its own at start (restart the router \
                 named in a pgshard_<router>_… gid); otherwise run COMMIT PREPARED or ROLLBACK \
                 PREPARED for each, then run the move again",
                rows.len(),
                list.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
