//! What the move trials check on the servers: placement against the ground truth, leftovers,
//! replicas, the catalog's map.

use super::dsn;
use crate::ensure;
use crate::harness::{connect_port, first_value as one, Harness, PgContext, TestResult, APP_PW};
use pgshard::catalog::Catalog;
use pgshard::shardmap::{Located, ShardMap};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// No replication slot or publication of a move (forward or reverse) is left on any shard.
pub(super) async fn no_leftovers(h: &Harness) -> TestResult {
    for s in 0..2 {
        let n = move_objects(h.primary(s).port).await?;
        ensure!(n == 0, "shard {s} keeps {n} slots/publications of moves");
    }
    Ok(())
}

/// Slots and publications of moves (forward or reverse) on the server at `port`.
pub(super) async fn move_objects(port: u16) -> Result<i64, String> {
    let d = connect_port(port, "app", APP_PW, "shop", "").await?;
    one(&d, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name ~ '^pgshard_(move|back)_') + (SELECT count(*) FROM pg_publication WHERE pubname ~ '^pgshard_(move|back)_')")
        .await?
        .parse()
        .map_err(|e| format!("{e}"))
}

/// Waits until the shards' replicas hold the 4000 seed rows of `table` (readers outside a move
/// read replicas; a reader that is not the writer may otherwise see them lag).
pub(super) async fn seeds_on_replicas(h: &Harness, table: &str) -> TestResult {
    seeds_on_replicas_n(h, table, 4000).await
}

/// `seeds_on_replicas` for a table with `want` seed rows (ids up to 4000).
pub(super) async fn seeds_on_replicas_n(h: &Harness, table: &str, want: i64) -> TestResult {
    let t = Instant::now();
    loop {
        let mut n = 0;
        let mut seen = Vec::new();
        for s in 0..2 {
            let r = connect_port(h.cluster.replicas(s)[0].port, "app", APP_PW, "shop", "").await?;
            let held = one(
                &r,
                &format!("SELECT count(*) || ' ' || pg_last_wal_replay_lsn() FROM {table} WHERE id <= 4000"),
            )
            .await
            .unwrap_or_else(|e| e);
            n += held
                .split(' ')
                .next()
                .and_then(|c| c.parse::<i64>().ok())
                .unwrap_or(0);
            seen.push(held);
        }
        if n == want {
            return Ok(());
        }
        // Generous: a standby may hold replay back for max_standby_streaming_delay (30 s).
        if t.elapsed() > Duration::from_secs(40) {
            let mut primaries = Vec::new();
            for s in 0..2 {
                let p = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
                primaries.push(one(&p, "SELECT pg_current_wal_lsn()::text").await?);
            }
            return Err(format!("replicas hold {n} of {table}'s {want} seed rows after 40 s (replicas: count, replay LSN {seen:?}; primaries at {primaries:?})"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The catalog's current map, built.
pub(super) async fn current_map(h: &Harness) -> Result<(ShardMap, usize, usize), String> {
    current_map_of(h, "mv").await
}

/// A connection to the trial's catalog and the map it holds now.
pub(super) async fn latest_map(h: &Harness) -> Result<(Catalog, pgshard::catalog::MapRow), String> {
    let (cat, _) = Catalog::connect(&dsn(h)).await.map_err(|e| e.to_string())?;
    let row = cat
        .latest_map()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no map")?;
    Ok((cat, row))
}

/// The catalog's current map, the index of distribution `dist` and the moves in flight.
pub(super) async fn current_map_of(
    h: &Harness,
    dist: &str,
) -> Result<(ShardMap, usize, usize), String> {
    let (_, row) = latest_map(h).await?;
    let map = ShardMap::build(&row.sharding, row.shards, row.version).map_err(|e| e.to_string())?;
    let dist = map
        .distributions
        .iter()
        .position(|d| d.name == dist)
        .ok_or("no such distribution")?;
    Ok((map, dist, row.sharding.moves.len()))
}

/// Every row of `truth` is on the shard the map puts it, exactly once, with its last value;
/// no other row exists.
pub(super) async fn check_placement(
    h: &Harness,
    map: &ShardMap,
    dist: usize,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    check_placement_of(h, "mv_items", map, dist, truth).await
}

/// The shards' primary ports (the topology's two).
pub(super) fn primaries(h: &Harness) -> Vec<u16> {
    vec![h.primary(0).port, h.primary(1).port]
}

/// `check_placement` for any table of the trial.
pub(super) async fn check_placement_of(
    h: &Harness,
    table: &str,
    map: &ShardMap,
    dist: usize,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    check_placement_on(&primaries(h), table, map, dist, truth).await
}

/// `check_placement` over the shards whose primaries listen on `ports`.
pub(super) async fn check_placement_on(
    ports: &[u16],
    table: &str,
    map: &ShardMap,
    dist: usize,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    let mut seen: HashMap<i64, (usize, i32)> = HashMap::new();
    for (s, port) in ports.iter().enumerate() {
        let c = connect_port(*port, "app", APP_PW, "shop", "").await?;
        for r in c
            .query(&format!("SELECT id, v FROM {table}"), &[])
            .await
            .pgx("scan shard")?
        {
            let (id, v): (i64, i32) = (r.get(0), r.get(1));
            if let Some(prev) = seen.insert(id, (s, v)) {
                return Err(format!("id {id} is on shard {} and shard {s}", prev.0));
            }
        }
    }
    let t = Instant::now();
    for (id, v) in truth {
        let Some(&(s, got)) = seen.get(id) else {
            return Err(format!("acknowledged id {id} is missing"));
        };
        ensure!(got == *v, "id {id}: value {got}, acknowledged {v}");
        let key = pgshard::pghash::KeyValue::Int(*id);
        ensure!(
            map.locate(dist, &key, None).map_err(|e| e.to_string())? == Located::One(s),
            "id {id} is on shard {s}, the map says otherwise"
        );
    }
    ensure!(
        seen.len() == truth.len(),
        "{} rows on the shards, {} acknowledged",
        seen.len(),
        truth.len()
    );
    eprintln!(
        "rebalance: {} rows checked in {:?}",
        truth.len(),
        t.elapsed()
    );
    Ok(())
}

/// After a move, a replica of the source that has not replayed it (replay paused) still holds
/// the moved rows: routers must not read on it until it has, and read on it again after.
pub(super) async fn stale_replica_skipped(
    h: &Harness,
    c: &tokio_postgres::Client,
    stale: &pgshard::topology::Server,
    router_port: u16,
) -> TestResult {
    let (map, dist, _) = current_map(h).await?;
    ensure!(
        map.replica_floor[0] > 0 && map.replica_floor[1] > 0,
        "the map sets a replica floor on both shards of the move: {:?}",
        map.replica_floor
    );
    let direct = connect_port(stale.port, "app", APP_PW, "shop", "").await?;
    let held = one(&direct, "SELECT count(*) FROM mv_items WHERE id <= 4000").await?;
    let primary = connect_port(h.primary(0).port, "app", APP_PW, "shop", "").await?;
    let kept = one(&primary, "SELECT count(*) FROM mv_items WHERE id <= 4000").await?;
    ensure!(
        held != kept,
        "the paused replica still holds the moved rows ({held} vs {kept} on its primary)"
    );
    // A seed row that stayed on shard 0: reading it tells which server of shard 0 served.
    let on_0 = (1..=4000i64)
        .find(|&k| {
            map.locate(dist, &pgshard::pghash::KeyValue::Int(k), None)
                .is_ok_and(|l| l == Located::One(0))
        })
        .ok_or("no seed row on shard 0")?;
    let where_read = format!("SELECT inet_server_port()::text FROM mv_items WHERE id = {on_0}");
    let below = shown_below_floor(router_port, stale.port).await?;
    ensure!(
        below == "true",
        "SHOW SHARDS marks the paused replica below the floor: {below}"
    );
    for _ in 0..20 {
        let count = one(c, "SELECT count(*) FROM mv_items WHERE id <= 4000").await?;
        ensure!(
            count == "4000",
            "key-less count outside a transaction: {count}"
        );
        let port = one(c, &where_read).await?;
        ensure!(
            port != stale.port.to_string(),
            "a read of shard 0 ran on its replica that has not replayed the move"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.cluster
        .psql(stale, "shop", "SELECT pg_wal_replay_resume()")
        .map_err(|e| format!("resume replay: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let port = one(c, &where_read).await?;
        if port == stale.port.to_string() {
            return Ok(());
        }
        seen.insert(port);
        if Instant::now() >= deadline {
            let a = connect_port(router_port, "admin", "admin-secret", "pgshard", "").await?;
            let shown = a.simple_query("SHOW SHARDS").await.pgx("show shards")?;
            let rows: Vec<String> = shown
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or(""))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => None,
                })
                .collect();
            return Err(format!(
                "the replica on {} serves reads again once it has replayed the move (floor {:?}; reads ran on {seen:?}); router: {rows:#?}",
                stale.port, map.replica_floor
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// For a wrong key-less read: every server the router at `port` knows, its view of it (SHOW
/// SHARDS) and what the server holds of `table`'s seed rows; and the catalog's latest maps.
pub(super) async fn what_servers_hold(port: u16, table: &str, catalog: &str) -> (String, String) {
    let mut held = Vec::new();
    if let Ok(admin) = connect_port(port, "admin", "admin-secret", "pgshard", "").await {
        for m in admin.simple_query("SHOW SHARDS").await.unwrap_or_default() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let row: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("")).collect();
                let sql = format!("SELECT count(*) || ' rows at ' || CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END FROM {table} WHERE id <= 4000");
                let count = match connect_port(
                    row[3].parse().unwrap_or(0),
                    "app",
                    APP_PW,
                    "shop",
                    "",
                )
                .await
                {
                    Ok(d) => one(&d, &sql).await.unwrap_or_else(|e| e),
                    Err(e) => e,
                };
                held.push(format!("{} | {count}", row.join(" ")));
            }
        }
    }
    let history = match tokio_postgres::connect(catalog, tokio_postgres::NoTls).await {
        Ok((cat, conn)) => {
            tokio::spawn(conn);
            let sql = "SELECT version || ' ' || note || ' at ' || to_char(created_at, 'HH24:MI:SS.MS') FROM pgshard.maps ORDER BY version DESC LIMIT 6";
            match cat.query(sql, &[]).await {
                Ok(rows) => format!(
                    "{:?}",
                    rows.iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>()
                ),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    };
    (format!("{held:#?}"), history)
}

/// SHOW PLAN_CACHE's (hits, misses) of the `move_rewrites` memo at the router on `port`.
pub(super) async fn move_rewrite_stats(port: u16) -> Result<(u64, u64), String> {
    let a = connect_port(port, "admin", "admin-secret", "pgshard", "").await?;
    let shown = a
        .simple_query("SHOW PLAN_CACHE")
        .await
        .pgx("show plan_cache")?;
    shown
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("cache") == Some("move_rewrites") =>
            {
                Some((r.get("hits")?.parse().ok()?, r.get("misses")?.parse().ok()?))
            }
            _ => None,
        })
        .ok_or_else(|| "SHOW PLAN_CACHE has no move_rewrites row".to_string())
}

/// SHOW SHARDS' `below_floor` for the server on `port`, as `router_port`'s console gives it.
async fn shown_below_floor(router_port: u16, port: u16) -> Result<String, String> {
    let a = connect_port(router_port, "admin", "admin-secret", "pgshard", "").await?;
    let shown = a.simple_query("SHOW SHARDS").await.pgx("show shards")?;
    shown
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("port") == Some(port.to_string().as_str()) =>
            {
                r.get("below_floor").map(str::to_string)
            }
            _ => None,
        })
        .ok_or_else(|| format!("SHOW SHARDS has no row for port {port}"))
}

/// The last acknowledged key-less UPDATE of a move's run left its note on all 40 `NOTED` rows,
/// wherever the unit's rows ended up (read through a router, in a transaction: on primaries).
pub(super) async fn keyless_writes_kept(port: u16, table: &str, note: Option<&str>) -> TestResult {
    let note = note.ok_or("no key-less UPDATE was acknowledged during the move")?;
    let c = connect_port(port, "app", APP_PW, "shop", "").await?;
    c.batch_execute("BEGIN").await.pgx("begin")?;
    let n = one(
        &c,
        &format!(
            "SELECT count(*) FROM {table} WHERE {} AND note = '{note}'",
            super::workload::NOTED
        ),
    )
    .await?;
    c.batch_execute("COMMIT").await.pgx("commit")?;
    ensure!(
        n == "40",
        "{n} of the 40 rows the last key-less UPDATE ({note}) wrote have its note"
    );
    Ok(())
}
