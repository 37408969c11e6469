//! The sharding router over the shared 2-shard topology: key routing, split INSERT and COPY,
//! scatter merges checked against the same data on one unsharded database, refusals,
//! two-phase commit and its recovery, and pgbench's TPC-B invariant across shards.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, copy_out_lines, first_value as one, sqlstate, Context, Harness,
    PgContext, Router, TestResult, APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    vec![
        trial("sharding::keys_route_to_the_owning_shard", keys_route),
        trial("sharding::multi_row_insert_is_split", insert_split),
        trial("sharding::scatter_merges_match_one_server", scatter_matches),
        trial("sharding::unsafe_statements_are_refused", refusals),
        trial("sharding::two_phase_commit_and_rollback", two_phase),
        trial(
            "sharding::in_doubt_transactions_resolved_at_start",
            in_doubt,
        ),
        trial("sharding::copy_rows_split_by_key", copy_split),
        trial(
            "sharding::pgbench_tpcb_invariant_across_shards",
            pgbench_invariant,
        ),
        trial("sharding::session_hints_route_statements", session_hints),
    ]
}

pub(crate) const SHARDING: &str = r#"
[sharding]
unknown_tables = "refuse"

[[sharding.distributions]]
name = "ids"
strategy = "hash"
key_type = "int8"

[[sharding.distributions]]
name = "tenants"
strategy = "tenant"
key_type = "text"
tenants = { "big" = 1 }

[[sharding.distributions]]
name = "ranges"
strategy = "range"
key_type = "int8"
ranges = [{ hi = 1000, shard = 0 }, { lo = 1000, hi = 2000, shard = 1 }]

[[sharding.tables]]
name = "items"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "facts"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "orders"
distribution = "tenants"
column = "tenant"

[[sharding.tables]]
name = "events"
distribution = "ranges"
column = "n"

[[sharding.tables]]
name = "twopc"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "scat"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "copied"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "countries"
reference = true

[[sharding.tables]]
name = "tplans"
reference = true

[[sharding.tables]]
name = "pgbench_accounts"
distribution = "ids"
column = "aid"

[[sharding.tables]]
name = "pgbench_branches"
distribution = "ids"
column = "bid"

[[sharding.tables]]
name = "pgbench_tellers"
distribution = "ids"
column = "tid"

[[sharding.tables]]
name = "pgbench_history"
distribution = "ids"
column = "aid"

[[sharding.tables]]
name = "lossy"
distribution = "ids"
column = "id"

[[sharding.tables]]
name = "tdocs"
distribution = "tenants"
column = "tenant"

[[sharding.tables]]
name = "tlines"
distribution = "tenants"
column = "tenant"

[[databases]]
name = "shop"
sharded = true
tenant_prefix = "shop_"
tenant_distribution = "tenants"

[[databases]]
name = "bench"
sharded = true
"#;

/// The router serving the sharded databases, started once.
pub(crate) fn router(h: &Harness) -> &Router {
    h.sharded_router.get_or_init(|| {
        let log = h.dir.join("decisions-sharded.log");
        h.spawn_router(
            &format!("decision_log = \"{}\"\nrouter_id = \"t1\"", log.display()),
            SHARDING,
        )
        .expect("start sharded router")
    })
}

/// The shard a bigint key of the `ids` distribution belongs to (2 shards, 4096 buckets).
pub(crate) fn shard_of(id: i64) -> usize {
    let b = pgshard::pghash::bucket(&pgshard::pghash::KeyValue::Int(id), 4096).unwrap() as usize;
    b * 2 / 4096
}

/// SQL on one shard's primary directly.
/// Checks that each shard holds exactly the ids of `ids` the hash places on it, as counted there
/// by `count_sql`; returns how many each should hold.
fn placed_by_key(
    h: &Harness,
    ids: std::ops::RangeInclusive<i64>,
    count_sql: &str,
    what: &str,
) -> Result<[usize; 2], String> {
    let mut want = [0; 2];
    for (shard, expected) in want.iter_mut().enumerate() {
        *expected = ids.clone().filter(|&i| shard_of(i) == shard).count();
        let got: usize = on_shard(h, shard, "shop", count_sql)?
            .parse()
            .map_err(|e| format!("{count_sql} on shard {shard}: {e}"))?;
        ensure!(
            got == *expected,
            "shard {shard}: {got} {what}, expected {expected}"
        );
    }
    Ok(want)
}

pub(crate) fn on_shard(h: &Harness, shard: usize, db: &str, sql: &str) -> Result<String, String> {
    h.cluster
        .psql(h.primary(shard), db, sql)
        .ctx("direct psql")
        .map(|s| s.trim().to_string())
}

/// Waits up to `secs` for the count `sql` reads on `shard`'s primary to be 0.
fn wait_zero(h: &Harness, shard: usize, sql: &str, secs: u64) -> TestResult {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let left = on_shard(h, shard, "shop", sql)?;
        if left == "0" {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "shard {shard}: {left} after {secs} s of {sql}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub(crate) async fn shop(h: &Harness) -> Result<tokio_postgres::Client, String> {
    connect_port(router(h).port, "app", APP_PW, "shop", "").await
}

fn keys_route(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        c.batch_execute(
            "DROP TABLE IF EXISTS items; CREATE TABLE items (id bigint PRIMARY KEY, name text)",
        )
        .await
        .pgx("ddl")?;
        for shard in 0..2 {
            ensure!(
                on_shard(h, shard, "shop", "SELECT count(*) FROM items")? == "0",
                "DDL must reach shard {shard}"
            );
        }
        for id in 1..=40i64 {
            c.simple_query(&format!(
                "INSERT INTO items (id, name) VALUES ({id}, 'n{id}')"
            ))
            .await
            .pgx("insert literal")?;
        }
        // Extended protocol: the key comes from Bind, text and binary.
        for id in 41..=60i64 {
            c.execute(
                "INSERT INTO items (id, name) VALUES ($1, $2)",
                &[&id, &format!("n{id}")],
            )
            .await
            .pgx("insert param")?;
        }
        let want = placed_by_key(h, 1..=60, "SELECT count(*) FROM items", "rows")?;
        ensure!(
            want.iter().all(|&n| n > 10),
            "keys should spread over both shards"
        );
        for id in [3i64, 17, 44, 59] {
            let row = c
                .query_one("SELECT name FROM items WHERE id = $1", &[&id])
                .await
                .pgx("select by key")?;
            ensure!(row.get::<_, String>(0) == format!("n{id}"), "row {id}");
        }
        let n = c
            .execute("UPDATE items SET name = 'changed' WHERE id = 7", &[])
            .await
            .pgx("update by key")?;
        ensure!(n == 1, "UPDATE by key touched {n} rows");
        let sh = shard_of(7);
        ensure!(
            on_shard(h, sh, "shop", "SELECT name FROM items WHERE id = 7")? == "changed",
            "update reached the owner"
        );
        // IN list over both shards, and a keyless count.
        let rows = c
            .query(
                "SELECT id FROM items WHERE id IN (1, 2, 3, 4, 5, 6) ORDER BY id",
                &[],
            )
            .await
            .pgx("IN")?;
        ensure!(rows.len() == 6, "IN list gave {} rows", rows.len());
        ensure!(
            one(&c, "SELECT count(*) FROM items").await? == "60",
            "keyless count over shards"
        );
        // A tenant directory entry and a range.
        c.batch_execute("DROP TABLE IF EXISTS orders; CREATE TABLE orders (tenant text, n int)")
            .await
            .pgx("ddl orders")?;
        c.batch_execute("INSERT INTO orders (tenant, n) VALUES ('big', 1)")
            .await
            .pgx("tenant insert")?;
        ensure!(
            on_shard(
                h,
                1,
                "shop",
                "SELECT count(*) FROM orders WHERE tenant = 'big'"
            )? == "1",
            "big tenant lives on shard 1"
        );
        c.batch_execute("DROP TABLE IF EXISTS events; CREATE TABLE events (n bigint)")
            .await
            .pgx("ddl events")?;
        c.batch_execute("INSERT INTO events (n) VALUES (5); INSERT INTO events (n) VALUES (1500)")
            .await
            .pgx("range insert")?;
        ensure!(
            on_shard(h, 0, "shop", "SELECT string_agg(n::text, ',') FROM events")? == "5",
            "range 0"
        );
        ensure!(
            on_shard(h, 1, "shop", "SELECT string_agg(n::text, ',') FROM events")? == "1500",
            "range 1"
        );
        let e = c
            .batch_execute("INSERT INTO events (n) VALUES (5000)")
            .await
            .err()
            .ok_or("a key outside every range must fail")?;
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        ensure!(msg.contains("range"), "range error says why: {msg}");
        Ok(())
    })
}

fn insert_split(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        c.batch_execute("DROP TABLE IF EXISTS facts; CREATE TABLE facts (id bigint, v int)")
            .await
            .pgx("ddl")?;
        let values: Vec<String> = (1..=100).map(|i| format!("({i}, {})", i * 2)).collect();
        let msgs = c
            .simple_query(&format!(
                "INSERT INTO facts (id, v) VALUES {}",
                values.join(", ")
            ))
            .await
            .pgx("split insert")?;
        let tag = msgs.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        ensure!(
            tag == Some(100),
            "client sees one INSERT of 100 rows, got {tag:?}"
        );
        placed_by_key(
            h,
            1..=100,
            "SELECT count(*) FROM facts",
            "rows (never a copy on every shard)",
        )?;
        Ok(())
    })
}

/// Keyless queries through the router give exactly what one server gives for the same rows.
fn scatter_matches(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        let reference = connect_port(h.router.port, "app", APP_PW, "app", "").await?;
        let ddl = "DROP TABLE IF EXISTS sc; CREATE TABLE sc (id bigint, g int, v numeric, f float8, t text, b bool)";
        reference.batch_execute(ddl).await.pgx("ref ddl")?;
        let rows: Vec<String> = (1..=300)
            .map(|i| {
                let v = if i % 17 == 0 {
                    "NULL".to_string()
                } else {
                    format!("{}.{}", i * 7 % 101, i % 10)
                };
                format!(
                    "({i}, {}, {v}, {}, 't{}', {})",
                    i % 5,
                    (i as f64) / 8.0,
                    i % 23,
                    i % 3 != 0
                )
            })
            .collect();
        let insert = format!(
            "INSERT INTO sc (id, g, v, f, t, b) VALUES {}",
            rows.join(", ")
        );
        reference.batch_execute(&insert).await.pgx("ref insert")?;
        // The same rows in a table sharded by id.
        c.batch_execute(&ddl.replace(" sc", " scat"))
            .await
            .pgx("sharded ddl")?;
        c.batch_execute(&insert.replace("INTO sc", "INTO scat"))
            .await
            .pgx("sharded insert")?;
        let queries = [
            "SELECT count(*) FROM sc",
            "SELECT count(v), sum(v), min(v), max(v), avg(v) FROM sc",
            "SELECT sum(f), min(t), max(t), bool_and(b), bool_or(b) FROM sc",
            "SELECT g, count(*), sum(v), avg(v) FROM sc GROUP BY g ORDER BY g",
            "SELECT id, t FROM sc ORDER BY id DESC LIMIT 7",
            "SELECT id FROM sc ORDER BY id LIMIT 5 OFFSET 10",
            "SELECT id, v FROM sc WHERE g = 2 ORDER BY v NULLS FIRST, id LIMIT 12",
            "SELECT DISTINCT g FROM sc ORDER BY g",
            "SELECT t, id FROM sc ORDER BY t, id LIMIT 20",
            "SELECT id FROM sc ORDER BY id OFFSET 4 ROWS FETCH FIRST 6 ROWS ONLY",
        ];
        for q in queries {
            let want = rows_text(&reference, q).await?;
            let got = rows_text(&c, &q.replace(" sc", " scat")).await?;
            ensure!(got == want, "{q}\n sharded: {got:?}\n one server: {want:?}");
        }
        // The extended protocol, as drivers send it: binary results, LIMIT/OFFSET as
        // parameters, the statement described in its own Sync before it runs.
        let (seven, five, ten, three) = (7i64, 5i64, 10i64, 3i64);
        let (four, two) = (4i32, 2i32);
        let extended: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]); 9] = [
            (
                "SELECT count(v), sum(v), min(v), max(v), avg(v) FROM sc",
                &[],
            ),
            (
                "SELECT g, count(*), sum(v), avg(v) FROM sc GROUP BY g ORDER BY g",
                &[],
            ),
            ("SELECT id, t FROM sc ORDER BY id DESC LIMIT $1", &[&seven]),
            (
                "SELECT id FROM sc ORDER BY id LIMIT $1 OFFSET $2",
                &[&five, &ten],
            ),
            // Hibernate 6's paging.
            (
                "SELECT id, v FROM sc ORDER BY id OFFSET $1 ROWS FETCH FIRST $2 ROWS ONLY",
                &[&three, &seven],
            ),
            (
                "SELECT g, avg(id), sum(id) FROM sc GROUP BY g ORDER BY g LIMIT $1",
                &[&three],
            ),
            (
                "SELECT avg(g), avg(f), sum(g) FROM sc WHERE id > $1",
                &[&ten],
            ),
            // Arithmetic on parameters (typed int4 by the server, as without pgshard).
            (
                "SELECT id, t FROM sc ORDER BY id LIMIT $1 + 1 OFFSET ($2 - 1) * $1",
                &[&four, &two],
            ),
            (
                "SELECT g, sum(v) FROM sc GROUP BY g ORDER BY g LIMIT $1 - 1 OFFSET $2 - 1",
                &[&four, &two],
            ),
        ];
        for (q, params) in extended {
            let want = raw_rows(&reference, q, params).await?;
            ensure!(!want.1.is_empty(), "{q}: the reference returned no rows");
            let got = raw_rows(&c, &q.replace(" sc", " scat"), params).await?;
            ensure!(
                got == want,
                "extended {q}\n sharded: {got:?}\n one server: {want:?}"
            );
            eprintln!(
                "scatter: extended {q}: {} rows, types {:?}",
                want.1.len(),
                want.0
            );
        }
        let e = c
            .query("SELECT id FROM scat ORDER BY id LIMIT $1", &[&-1i64])
            .await
            .err()
            .ok_or("a negative LIMIT must be refused")?;
        ensure!(sqlstate(&e) == "2201W", "negative LIMIT: {e}");
        let e = c
            .query("SELECT id FROM scat ORDER BY id LIMIT $1 - 5", &[&four])
            .await
            .err()
            .ok_or("a LIMIT expression that comes out negative must be refused")?;
        ensure!(sqlstate(&e) == "2201W", "negative LIMIT expression: {e}");
        // Keyless write: counts summed across shards.
        let n = c
            .execute("UPDATE scat SET g = g + 10 WHERE g = 1", &[])
            .await
            .pgx("keyless update")?;
        ensure!(n == 60, "keyless UPDATE counted {n}, expected 60");
        Ok(())
    })
}

async fn rows_text(
    c: &tokio_postgres::Client,
    q: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let msgs = c.simple_query(q).await.map_err(|e| format!("{q}: {e}"))?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect())
}

/// A column value exactly as the server sent it (binary format).
struct Raw(Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Column types and raw binary values of an extended-protocol query.
async fn raw_rows(
    c: &tokio_postgres::Client,
    q: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(Vec<String>, Vec<Vec<Option<Vec<u8>>>>), String> {
    let rows = c.query(q, params).await.map_err(|e| format!("{q}: {e}"))?;
    let types = rows.first().map_or(Vec::new(), |r| {
        r.columns()
            .iter()
            .map(|c| c.type_().name().to_string())
            .collect()
    });
    let values = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect())
        .collect();
    Ok((types, values))
}

fn refusals(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        c.batch_execute("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text)")
            .await
            .pgx("ddl")?;
        let cases = [
            (
                "UPDATE items SET id = 5 WHERE id = 4",
                "0A000",
                "sharding key",
            ),
            ("SELECT * FROM nowhere_declared", "0A000", "not declared"),
            ("INSERT INTO items (name) VALUES ('x')", "0A000", "id"),
        ];
        for (sql, code, needle) in cases {
            let e = c
                .batch_execute(sql)
                .await
                .err()
                .ok_or(format!("{sql} must be refused"))?;
            ensure!(
                sqlstate(&e) == code,
                "{sql}: SQLSTATE {} ({e})",
                sqlstate(&e)
            );
            let msg = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            ensure!(
                msg.contains(needle),
                "{sql}: message should name '{needle}': {msg}"
            );
        }
        // The session is still usable afterwards.
        ensure!(
            one(&c, "SELECT 1").await? == "1",
            "session usable after refusals"
        );
        Ok(())
    })
}

fn two_phase(h: &Harness) -> TestResult {
    block_on(async {
        let c = shop(h).await?;
        c.batch_execute("DROP TABLE IF EXISTS twopc; CREATE TABLE twopc (id bigint, v int)")
            .await
            .pgx("ddl")?;
        let (a, b) = {
            let a = (1..).find(|&i| shard_of(i) == 0).unwrap();
            let b = (1..).find(|&i| shard_of(i) == 1).unwrap();
            (a, b)
        };
        c.batch_execute(&format!("BEGIN; INSERT INTO twopc (id, v) VALUES ({a}, 1); INSERT INTO twopc (id, v) VALUES ({b}, 1); COMMIT"))
            .await
            .ctx("2pc commit")?;
        ensure!(
            one(&c, "SELECT count(*) FROM twopc").await? == "2",
            "both rows committed"
        );
        c.batch_execute(&format!("BEGIN; INSERT INTO twopc (id, v) VALUES ({a}, 2); INSERT INTO twopc (id, v) VALUES ({b}, 2); ROLLBACK"))
            .await
            .ctx("rollback")?;
        ensure!(
            one(&c, "SELECT count(*) FROM twopc").await? == "2",
            "rolled back on both shards"
        );
        // A failure on one shard aborts the whole transaction.
        c.batch_execute("BEGIN").await.pgx("begin")?;
        c.batch_execute(&format!("INSERT INTO twopc (id, v) VALUES ({a}, 3)"))
            .await
            .pgx("ins a")?;
        ensure!(
            c.batch_execute(&format!("INSERT INTO twopc (id, v) VALUES ({b}, 'x')"))
                .await
                .is_err(),
            "bad value fails"
        );
        let e = c
            .batch_execute("SELECT 1")
            .await
            .err()
            .ok_or("aborted transaction must refuse")?;
        ensure!(sqlstate(&e) == "25P02", "in failed tx: {}", sqlstate(&e));
        c.batch_execute("COMMIT").await.pgx("commit of failed tx")?;
        ensure!(
            one(&c, "SELECT count(*) FROM twopc").await? == "2",
            "failed transaction left nothing"
        );
        // Other trials share this router and its 2PC gids, so a prepared transaction of theirs
        // may be in flight right now: only one prepared before this check began and still
        // there seconds later is a leftover.
        for shard in 0..2 {
            let t0 = on_shard(h, shard, "shop", "SELECT clock_timestamp()")?;
            let sql = format!("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'pgshard_t1_%' AND prepared <= '{t0}'");
            wait_zero(h, shard, &sql, 10)?;
        }
        Ok(())
    })
}

/// A router that died between PREPARE and COMMIT PREPARED: its successor commits what the
/// decision log says was committed and rolls back the rest.
fn in_doubt(h: &Harness) -> TestResult {
    block_on(async {
        let s0 = h.primary(0);
        h.cluster
            .psql(s0, "shop", "CREATE TABLE IF NOT EXISTS doubt (n int)")
            .ctx("ddl s0")?;
        h.cluster
            .psql(
                h.primary(1),
                "shop",
                "CREATE TABLE IF NOT EXISTS doubt (n int)",
            )
            .ctx("ddl s1")?;
        // Prepared as the router's user, as its sessions would have.
        let prep = |shard: usize, gid: &str, n: i32| {
            h.cluster.psql(
                h.primary(shard),
                "shop",
                &format!("SET ROLE app; BEGIN; INSERT INTO doubt VALUES ({n}); PREPARE TRANSACTION '{gid}'"),
            )
        };
        prep(0, "pgshard_t9_100_0", 1).ctx("prepare committed s0")?;
        prep(1, "pgshard_t9_100_1", 1).ctx("prepare committed s1")?;
        prep(0, "pgshard_t9_101_0", 2).ctx("prepare undecided")?;
        let log = h.dir.join("decisions-t9.log");
        std::fs::write(&log, "C 100\n").ctx("write log")?;
        let r = h.spawn_router(
            &format!("decision_log = \"{}\"\nrouter_id = \"t9\"", log.display()),
            SHARDING,
        )?;
        // The router settles in-doubt transactions before it serves clients, but its port
        // accepts connections (queued) before that: wait for the servers, not the port.
        let settled = (0..2).try_for_each(|shard| {
            wait_zero(
                h,
                shard,
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'pgshard_t9%'",
                20,
            )
        });
        drop(r);
        if settled.is_err() {
            // Left behind, they would block every later logical slot on these servers.
            for shard in 0..2 {
                let _ = on_shard(h, shard, "shop", "SELECT string_agg(gid, ',') FROM pg_prepared_xacts WHERE gid LIKE 'pgshard_t9%'")
                    .map(|gids| {
                        for gid in gids.split(',').filter(|g| !g.is_empty()) {
                            let _ = on_shard(h, shard, "shop", &format!("ROLLBACK PREPARED '{gid}'"));
                        }
                    });
            }
        }
        settled?;
        ensure!(
            on_shard(h, 0, "shop", "SELECT string_agg(n::text, ',') FROM doubt")? == "1",
            "decided commit applied, undecided rolled back"
        );
        ensure!(
            on_shard(h, 1, "shop", "SELECT string_agg(n::text, ',') FROM doubt")? == "1",
            "shard 1 committed too"
        );
        Ok(())
    })
}

fn copy_split(h: &Harness) -> TestResult {
    block_on(async {
        use futures_util::SinkExt;
        let c = shop(h).await?;
        c.batch_execute("DROP TABLE IF EXISTS copied; CREATE TABLE copied (id bigint, g int, v numeric, f float8, t text, b bool)")
            .await
            .ctx("ddl")?;
        let sink = c
            .copy_in("COPY copied (id, t) FROM STDIN")
            .await
            .pgx("copy in")?;
        let mut data = String::new();
        for i in 1..=2000 {
            data.push_str(&format!("{i}\tline\\t{i}\n"));
        }
        futures_util::pin_mut!(sink);
        // Chunks that cut rows in the middle.
        for chunk in data.as_bytes().chunks(777) {
            sink.send(bytes::Bytes::copy_from_slice(chunk))
                .await
                .pgx("send")?;
        }
        let n = sink.finish().await.pgx("finish")?;
        ensure!(n == 2000, "COPY reported {n}");
        placed_by_key(h, 1..=2000, "SELECT count(*) FROM copied", "rows")?;
        ensure!(
            one(&c, "SELECT t FROM copied WHERE id = 1234").await? == "line\t1234",
            "escapes kept"
        );
        // CSV with a header line: pgshard consumes it, each shard gets rows only.
        let sink = c
            .copy_in("COPY copied (id, t) FROM STDIN WITH (FORMAT csv, HEADER true)")
            .await
            .pgx("copy in with header")?;
        futures_util::pin_mut!(sink);
        let mut data = String::from("id,t\n");
        for i in 3001..=3100 {
            data.push_str(&format!("{i},\"csv, {i}\"\n"));
        }
        sink.send(bytes::Bytes::from(data)).await.pgx("send")?;
        let n = sink.finish().await.pgx("finish")?;
        ensure!(n == 100, "COPY with HEADER reported {n}");
        placed_by_key(
            h,
            3001..=3100,
            "SELECT count(*) FROM copied WHERE id > 3000",
            "header-COPY rows",
        )?;
        ensure!(
            one(&c, "SELECT t FROM copied WHERE id = 3050").await? == "csv, 3050",
            "CSV quoting kept"
        );
        // Binary COPY (tokio-postgres' writer): the key in the second field, a row longer than
        // one CopyData message; each shard gets its rows under a header and trailer of its own.
        {
            use tokio_postgres::binary_copy::BinaryCopyInWriter;
            use tokio_postgres::types::{ToSql, Type};
            let sink = c
                .copy_in("COPY copied (g, id, t) FROM STDIN WITH (FORMAT binary)")
                .await
                .pgx("binary copy in")?;
            let w = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::INT8, Type::TEXT]);
            futures_util::pin_mut!(w);
            let text = |i: i64| {
                if i == 5150 {
                    "x".repeat(100_000)
                } else {
                    format!("bin {i}")
                }
            };
            for i in 5001..=5300i64 {
                let (g, t) = ((i % 7) as i32, text(i));
                let row: [&(dyn ToSql + Sync); 3] = [&g, &i, &t];
                w.as_mut().write(&row).await.pgx("binary row")?;
            }
            let n = w.finish().await.pgx("binary finish")?;
            ensure!(n == 300, "binary COPY reported {n}");
            placed_by_key(
                h,
                5001..=5300,
                "SELECT count(*) FROM copied WHERE id BETWEEN 5001 AND 5300",
                "binary-COPY rows",
            )?;
            let long = one(
                &c,
                "SELECT length(t) || ' ' || g FROM copied WHERE id = 5150",
            )
            .await?;
            ensure!(
                long == "100000 5",
                "the long binary row arrived whole: {long}"
            );
            ensure!(
                one(&c, "SELECT t FROM copied WHERE id = 5299").await? == "bin 5299",
                "binary values kept"
            );
            // A NULL key is refused (nothing is written), and the session goes on.
            let sink = c
                .copy_in("COPY copied (id, t) FROM STDIN WITH (FORMAT binary)")
                .await
                .pgx("binary copy in")?;
            let w = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT]);
            futures_util::pin_mut!(w);
            let (none, t): (Option<i64>, String) = (None, "no key".into());
            let row: [&(dyn ToSql + Sync); 2] = [&none, &t];
            let r = match w.as_mut().write(&row).await {
                Ok(()) => w.finish().await,
                Err(e) => Err(e),
            };
            ensure!(
                matches!(&r, Err(e) if sqlstate(e) == "22P04"),
                "a binary COPY row without its key is refused with 22P04: {r:?}"
            );
            ensure!(
                one(&c, "SELECT count(*) FROM copied WHERE t = 'no key'").await? == "0",
                "the refused binary COPY wrote nothing"
            );
        }
        // COPY … TO STDOUT across the shards (simple protocol, psql): every row once, and a
        // CSV header once, first.
        let total: usize = one(&c, "SELECT count(*) FROM copied")
            .await?
            .parse()
            .map_err(|e| format!("{e}"))?;
        ensure!(total > 100, "rows to copy out ({total})");
        let out = h.client_program(
            "psql",
            router(h).port,
            "app",
            APP_PW,
            &[
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "shop",
                "-c",
                "COPY copied (id) TO STDOUT WITH (FORMAT csv, HEADER true)",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "COPY TO across shards: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        ensure!(
            lines.first() == Some(&"id") && lines.iter().filter(|l| **l == "id").count() == 1,
            "one header line, first: {:?}",
            &lines[..lines.len().min(3)]
        );
        let mut ids: Vec<&str> = lines[1..].to_vec();
        ids.sort();
        ids.dedup();
        ensure!(
            lines.len() - 1 == total && ids.len() == total,
            "COPY TO across shards sent {} rows ({} distinct), the table has {total}",
            lines.len() - 1,
            ids.len()
        );
        // The same through the extended protocol (tokio-postgres' copy_out), header included.
        let mut ext = copy_out_lines(
            &c,
            "COPY copied (id) TO STDOUT WITH (FORMAT csv, HEADER true)",
        )
        .await?;
        ensure!(
            ext.first().map(String::as_str) == Some("id"),
            "extended COPY TO: header first: {:?}",
            &ext[..ext.len().min(3)]
        );
        ext.sort();
        let mut simple: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        simple.sort();
        ensure!(
            ext == simple,
            "extended COPY TO sent {} lines, the simple protocol {}",
            ext.len(),
            simple.len()
        );
        // The connection is usable afterwards.
        ensure!(one(&c, "SELECT 1").await? == "1", "query after COPY TO");
        Ok(())
    })
}

fn pgbench_invariant(h: &Harness) -> TestResult {
    let port = router(h).port;
    let o = h.client_program("pgbench", port, "app", APP_PW, &["-i", "-s", "2", "bench"]);
    ensure!(
        o.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for shard in 0..2 {
        let n: i64 = on_shard(h, shard, "bench", "SELECT count(*) FROM pgbench_accounts")?
            .parse()
            .unwrap();
        ensure!(
            n > 80_000 && n < 120_000,
            "shard {shard} holds {n} of 200000 accounts"
        );
    }
    let o = h.client_program(
        "pgbench",
        port,
        "app",
        APP_PW,
        &["-c", "4", "-j", "2", "-t", "150", "bench"],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success(),
        "pgbench TPC-B: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        out.contains("number of transactions actually processed: 600/600"),
        "all transactions ran: {out}"
    );
    let o = h.client_program(
        "pgbench",
        port,
        "app",
        APP_PW,
        &[
            "-n", "-c", "4", "-j", "2", "-t", "100", "-M", "prepared", "bench",
        ],
    );
    ensure!(
        o.status.success(),
        "pgbench -M prepared: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    block_on(async move {
        let c = connect_port(port, "app", APP_PW, "bench", "").await?;
        // A read-write transaction reads the primaries: replicas may not have replayed pgbench's
        // last commits, made by other sessions.
        c.batch_execute("BEGIN").await.pgx("begin")?;
        let a = one(&c, "SELECT sum(abalance) FROM pgbench_accounts").await?;
        let t = one(&c, "SELECT sum(tbalance) FROM pgbench_tellers").await?;
        let b = one(&c, "SELECT sum(bbalance) FROM pgbench_branches").await?;
        let d = one(&c, "SELECT sum(delta) FROM pgbench_history").await?;
        let n = one(&c, "SELECT count(*) FROM pgbench_history").await?;
        ensure!(n == "1000", "history rows: {n}");
        ensure!(
            a == t && t == b && b == d,
            "TPC-B invariant: accounts {a}, tellers {t}, branches {b}, history {d}"
        );
        ensure!(a != "0", "balances moved");
        Ok(())
    })
}

/// `SET pgshard.shard` and `SET LOCAL pgshard.shard|key` route statements
/// that carry no key; a transaction's SET LOCAL ends with it.
fn session_hints(h: &Harness) -> TestResult {
    block_on(async {
        let port = |s: usize| h.primary(s).port.to_string();
        // In a read-write transaction the statement runs on the shard's primary.
        async fn port_in_tx(c: &tokio_postgres::Client) -> Result<String, String> {
            c.batch_execute("BEGIN").await.pgx("begin")?;
            let p = one(c, "SELECT inet_server_port()").await;
            c.batch_execute("ROLLBACK").await.pgx("rollback")?;
            p
        }
        let c = shop(h).await?;
        for shard in [1, 0, 1] {
            c.batch_execute(&format!("SET pgshard.shard = {shard}"))
                .await
                .pgx("set hint")?;
            ensure!(
                port_in_tx(&c).await? == port(shard),
                "SET pgshard.shard = {shard} was not followed"
            );
        }
        c.batch_execute("BEGIN").await.pgx("begin")?;
        c.batch_execute("SET LOCAL pgshard.shard = 0")
            .await
            .pgx("set local")?;
        ensure!(
            one(&c, "SELECT inet_server_port()").await? == port(0),
            "SET LOCAL pgshard.shard = 0 was not followed"
        );
        c.batch_execute("COMMIT").await.pgx("commit")?;
        ensure!(
            port_in_tx(&c).await? == port(1),
            "SET LOCAL outlived its transaction"
        );
        c.batch_execute("BEGIN").await.pgx("begin")?;
        c.batch_execute("SET LOCAL pgshard.key = 'big'")
            .await
            .pgx("set local key")?;
        let e = c
            .simple_query("SELECT inet_server_port()")
            .await
            .err()
            .ok_or("a key hint without a table must be ambiguous")?;
        ensure!(
            format!("{e:?}").contains("hint key=big is ambiguous"),
            "key hint not taken from SET LOCAL: {e:?}"
        );
        c.batch_execute("ROLLBACK").await.pgx("rollback")?;
        // The startup packet's options carry a session hint too.
        let o = connect_port(
            router(h).port,
            "app",
            APP_PW,
            "shop",
            "options='-c pgshard.shard=0'",
        )
        .await?;
        ensure!(
            port_in_tx(&o).await? == port(0),
            "options=-c pgshard.shard=0 was not followed"
        );
        // BEGIN inside a multi-statement Query opens the client's transaction, as on PostgreSQL:
        // it stays open after the Query (with its SET LOCAL), and an error leaves it failed.
        c.batch_execute("BEGIN; SET LOCAL pgshard.shard = 0")
            .await
            .pgx("begin; set local")?;
        ensure!(
            one(&c, "SELECT inet_server_port()").await? == port(0),
            "BEGIN; SET LOCAL in one Query did not stay in force"
        );
        c.batch_execute("COMMIT").await.pgx("commit")?;
        ensure!(
            c.batch_execute("BEGIN; SELECT 1/0").await.is_err(),
            "division by zero"
        );
        let e = c
            .simple_query("SELECT 1")
            .await
            .err()
            .ok_or("the failed transaction was not kept")?;
        ensure!(
            crate::harness::sqlstate(&e) == "25P02",
            "after an error in BEGIN; …: {e:?}"
        );
        c.batch_execute("ROLLBACK").await.pgx("rollback")?;
        c.batch_execute("SET pgshard.shard = 'abc'")
            .await
            .pgx("set bad")?;
        let e = c
            .simple_query("SELECT 1")
            .await
            .err()
            .ok_or("a bad shard hint was ignored")?;
        ensure!(crate::harness::sqlstate(&e) == "22023", "bad hint: {e:?}");
        c.batch_execute("RESET pgshard.shard").await.pgx("reset")?;
        ensure!(
            one(&c, "SELECT 1").await? == "1",
            "RESET pgshard.shard did not clear the hint"
        );
        Ok(())
    })
}
