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

/// The type of `column` of `table` on this server (`format_type`); None if either is missing.
pub async fn column_type(
    c: &Client,
    table: &str,
    column: &str,
) -> Result<Option<String>, MoveError> {
    Ok(c.query_opt(
        "SELECT format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
        &[&table, &column],
    )
    .await?
    .map(|r| r.get(0)))
}

/// How a geo hash column of type `ty` is hashed in SQL the way the routers hash its values:
/// "int8" for every integer width, "uuid"; None for other types (the routers hash those by
/// the value's shape, which SQL cannot mirror).
pub fn hash_class(ty: &str) -> Option<&'static str> {
    match ty {
        "smallint" | "integer" | "bigint" => Some("int8"),
        "uuid" => Some("uuid"),
        _ => None,
    }
}

/// Refuses a table whose primary key lacks the sharding key (a row-filtered publication would
/// then break UPDATE and DELETE on the source), or whose columns differ on the target.
pub async fn validate(
    source: &Client,
    target: &Client,
    table: &str,
    placed: &super::apply::Placement,
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
    // The publication's row filter names these columns, and PostgreSQL publishes UPDATEs and
    // DELETEs only when the filter's columns are in the replica identity.
    for (what, column) in std::iter::once(("sharding key", &placed.key))
        .chain(placed.within.iter().map(|w| ("hash column", w)))
    {
        if !pk.iter().any(|c| c == column) {
            return Err(MoveError::Refused(format!(
                "table {table}: its primary key ({}) does not contain the {what} {column}; add it to the primary key before moving",
                if pk.is_empty() { "none".to_string() } else { pk.join(", ") }
            )));
        }
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

/// How a move splits a table's copy into parallel streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStreams {
    /// Streams at most, each with its own source and target connection.
    pub max: usize,
    /// Heap pages a stream gets at least: on a small table extra connections cost more than
    /// they save.
    pub min_pages: u64,
}

impl Default for CopyStreams {
    /// Two streams keep a second core of each server busy without taking a busy shard's every
    /// core; 1024 pages is 8 MB.
    fn default() -> Self {
        CopyStreams {
            max: 2,
            min_pages: 1024,
        }
    }
}

/// Where a unit's rows are copied from and to, and how many streams may run at once.
pub struct CopyLinks<'a> {
    pub source_dsn: &'a str,
    pub target_dsn: &'a str,
    /// Source snapshot (exported by the move's slot) every stream reads under.
    pub snapshot: &'a str,
    pub streams: CopyStreams,
}

/// Copies the rows `pred` selects from `table` under the links' snapshot into the target, in up
/// to `links.streams.max` parallel streams over disjoint heap page ranges; returns (rows, bytes,
/// streams).
/// A stream failing fails the copy; rows other streams committed on the target are the unit's
/// and go with it at abort or are deleted before a resumed copy.
pub async fn copy_unit(
    source: &Client,
    links: &CopyLinks<'_>,
    table: &str,
    pred: &str,
    progress: &dyn Progress,
) -> Result<(u64, u64, usize), MoveError> {
    let t = super::apply::table_ident(table)?;
    let select = format!("SELECT * FROM {t} WHERE {pred}");
    let estimate = estimated_rows(source, table, &select).await;
    let pages: i64 = source
        .query_one(
            "SELECT pg_relation_size($1::text::regclass) / current_setting('block_size')::int8",
            &[&table],
        )
        .await?
        .get(0);
    let parts = page_ranges(pages.max(0) as u64, links.streams);
    let step = format!("copying {table}");
    progress.advance(&step, 0, estimate);
    // Every stream's rows so far; the bar shows their sum. The streams are polled by this one
    // task, so plain cells suffice.
    let done: Vec<std::cell::Cell<u64>> = parts.iter().map(|_| Default::default()).collect();
    let jobs = parts.iter().enumerate().map(|(i, range)| {
        let sql = match range {
            None => select.clone(),
            Some((first, end)) => format!("{select} AND {}", ctid_range(*first, *end)),
        };
        let (done, step, t) = (&done, &step, &t);
        async move {
            copy_stream(links, t, &sql, &mut |rows| {
                done[i].set(rows);
                progress.advance(step, done.iter().map(|c| c.get()).sum(), estimate)
            })
            .await
        }
    });
    let r = futures_util::future::try_join_all(jobs).await;
    progress.step_done();
    let (rows, bytes) = r?
        .into_iter()
        .fold((0, 0), |(r, b), (rows, bytes)| (r + rows, b + bytes));
    Ok((rows, bytes, parts.len()))
}

/// The heap page ranges [first, end) of `streams` parallel copies of a table of `pages` pages;
/// the last range is open (None) because rows the snapshot sees may sit on pages added since
/// the size was read. None alone: one stream over the whole table.
fn page_ranges(pages: u64, streams: CopyStreams) -> Vec<Option<(u64, Option<u64>)>> {
    let n = (pages / streams.min_pages.max(1)).clamp(1, streams.max.max(1) as u64);
    if n == 1 {
        return vec![None];
    }
    let per = pages.div_ceil(n);
    (0..n)
        .map(|i| Some((i * per, (i + 1 < n).then_some((i + 1) * per))))
        .collect()
}

/// A condition PostgreSQL (14+) answers with a TID range scan: only these heap pages are read.
fn ctid_range(first: u64, end: Option<u64>) -> String {
    match end {
        Some(end) => format!("ctid >= '({first},0)'::tid AND ctid < '({end},0)'::tid"),
        None => format!("ctid >= '({first},0)'::tid"),
    }
}

/// One copy stream: its own source transaction under the move's snapshot, its own COPY into
/// the target.
async fn copy_stream(
    links: &CopyLinks<'_>,
    table: &str,
    select: &str,
    tick: &mut dyn FnMut(u64),
) -> Result<(u64, u64), MoveError> {
    let mut source = super::connect(links.source_dsn).await?;
    let target = super::connect(links.target_dsn).await?;
    let tx = source
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        links.snapshot.replace('\'', "''")
    ))
    .await?;
    let out = tx.copy_out(&format!("COPY ({select}) TO STDOUT")).await?;
    let sink = target.copy_in(&format!("COPY {table} FROM STDIN")).await?;
    let r = pipe(out, sink, tick).await?;
    tx.commit().await?;
    Ok(r)
}

/// The planner's row estimate for a query (for a progress bar's length), when the table has
/// statistics: without them the planner's guess is off by orders of magnitude.
async fn estimated_rows(c: &Client, table: &str, select: &str) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(max: usize, min_pages: u64) -> CopyStreams {
        CopyStreams { max, min_pages }
    }

    #[test]
    fn page_ranges_cover_the_table_once() {
        assert_eq!(page_ranges(0, streams(2, 1024)), vec![None]);
        assert_eq!(page_ranges(2047, streams(2, 1024)), vec![None]);
        assert_eq!(page_ranges(10_000, streams(1, 1024)), vec![None]);
        assert_eq!(page_ranges(10_000, streams(0, 0)), vec![None]);
        assert_eq!(
            page_ranges(4096, streams(2, 1024)),
            vec![Some((0, Some(2048))), Some((2048, None))]
        );
        assert_eq!(
            page_ranges(100, streams(3, 1)),
            vec![Some((0, Some(34))), Some((34, Some(68))), Some((68, None))]
        );
        // An empty table asked for many streams still gets one.
        assert_eq!(page_ranges(0, streams(8, 1)), vec![None]);
    }

    #[test]
    fn ctid_ranges_are_half_open() {
        assert_eq!(
            ctid_range(0, Some(34)),
            "ctid >= '(0,0)'::tid AND ctid < '(34,0)'::tid"
        );
        assert_eq!(ctid_range(68, None), "ctid >= '(68,0)'::tid");
    }
}
