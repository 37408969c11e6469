//! Several routers sharing one shard map through the catalog: seeding, following new versions,
//! acknowledging them, leases, and restarting from the catalog rather than the config file.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, Context, Harness, PgContext, Router, TestResult,
    APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;
use pgshard::catalog::{Catalog, CatalogError};
use std::time::{Duration, Instant};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "catalog::routers_share_and_follow_the_map",
            share_and_follow,
        ),
        trial("catalog::unit_predicates_match_postgres", unit_predicates),
    ]
}

fn dsn(h: &Harness) -> String {
    format!(
        "host=127.0.0.1 port={} user=app password={APP_PW} dbname=catalog",
        h.primary(0).port
    )
}

fn catalog_router(h: &Harness, id: &str) -> Result<Router, String> {
    let more = format!(
        "[catalog]\ndsn = \"{}\"\nlease = \"2s\"\npoll_interval = \"200ms\"\n{}\n\
         [[sharding.tables]]\nname = \"cat_orders\"\ndistribution = \"tenants\"\ncolumn = \"tenant\"\n",
        dsn(h),
        crate::sharding::SHARDING
    );
    h.spawn_router(&format!("router_id = \"{id}\""), &more)
}

/// The shard `SHOW ROUTE` gives for tenant 'big' on `router`.
async fn big_goes_to(router: &Router) -> Result<String, String> {
    let admin = connect_port(router.port, "admin", "admin-secret", "pgshard", "").await?;
    one(
        &admin,
        "SHOW ROUTE SELECT * FROM cat_orders WHERE tenant = 'big'",
    )
    .await
}

fn share_and_follow(h: &Harness) -> TestResult {
    h.cluster
        .psql(
            h.primary(0),
            "catalog",
            "DROP SCHEMA IF EXISTS pgshard CASCADE",
        )
        .ctx("reset catalog")?;
    let a = catalog_router(h, "ca")?;
    let b = catalog_router(h, "cb")?;
    block_on(async {
        let (cat, _) = Catalog::connect(&dsn(h)).await.map_err(|e| e.to_string())?;
        let map = cat
            .latest_map()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no map seeded")?;
        ensure!(
            map.version == 1 && map.note.contains("seeded"),
            "first router seeds version 1: {} {}",
            map.version,
            map.note
        );
        ensure!(
            map.sharding
                .distributions
                .iter()
                .any(|d| d.tenants.get("big") == Some(&1)),
            "seeded from the config file"
        );
        for r in [&a, &b] {
            ensure!(
                big_goes_to(r).await? == "1",
                "version 1 puts tenant big on shard 1"
            );
        }
        let routers = cat.routers().await.map_err(|e| e.to_string())?;
        let ids: Vec<_> = routers
            .iter()
            .map(|r| (r.router_id.as_str(), r.acked_version))
            .collect();
        ensure!(
            ids == [("ca", 1), ("cb", 1)],
            "both routers registered at version 1: {ids:?}"
        );

        // Publish version 2: tenant big moves to shard 0 (it has no rows yet, so nothing to copy).
        let mut next = map.sharding.clone();
        for d in &mut next.distributions {
            if let Some(s) = d.tenants.get_mut("big") {
                *s = 0;
            }
        }
        let v = cat
            .publish_map(1, &next, 2, "big to shard 0")
            .await
            .map_err(|e| e.to_string())?;
        ensure!(v == 2, "published as version {v}");
        let t = Instant::now();
        for r in [&a, &b] {
            loop {
                if big_goes_to(r).await? == "0" {
                    break;
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(5),
                    "router on port {} did not follow version 2",
                    r.port
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!(
            "catalog: both routers serve version 2 {:?} after publishing",
            t.elapsed()
        );
        let t = Instant::now();
        loop {
            let acked: Vec<u64> = cat
                .routers()
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|r| r.acked_version)
                .collect();
            if acked == [2, 2] {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "routers did not acknowledge version 2: {acked:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Statements follow: a row of tenant big now lands on shard 0.
        let c = connect_port(b.port, "app", APP_PW, "shop", "").await?;
        c.batch_execute(
            "DROP TABLE IF EXISTS cat_orders; CREATE TABLE cat_orders (tenant text, n int)",
        )
        .await
        .pgx("ddl")?;
        c.batch_execute("INSERT INTO cat_orders (tenant, n) VALUES ('big', 1)")
            .await
            .pgx("insert")?;
        let on0 = h
            .cluster
            .psql(h.primary(0), "shop", "SELECT count(*) FROM cat_orders")
            .ctx("shard 0")?;
        ensure!(on0.trim() == "1", "tenant big's row is on shard 0 ({on0})");

        // Publishing over a stale version, or an invalid map, is refused.
        match cat.publish_map(1, &next, 2, "stale").await {
            Err(CatalogError::Conflict {
                expected: 1,
                found: 2,
            }) => {}
            other => return Err(format!("stale publish: {other:?}")),
        }
        let mut bad = next.clone();
        bad.default_shard = 7;
        ensure!(
            matches!(
                cat.publish_map(2, &bad, 2, "bad").await,
                Err(CatalogError::BadMap { .. })
            ),
            "invalid map refused"
        );

        // shardctl reads the same catalog.
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args([
                "--port",
                &a.port.to_string(),
                "--password",
                "admin-secret",
                "--catalog",
                &dsn(h),
                "status",
            ])
            .output()
            .ctx("shardctl")?;
        let out = String::from_utf8_lossy(&o.stdout);
        ensure!(
            o.status.success(),
            "shardctl status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ensure!(
            out.contains("\n  2 | 2 | big to shard 0")
                && out.matches("| 2 | ").count() >= 3
                && out.contains("| current"),
            "shardctl status: {out}"
        );
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(["--catalog", &dsn(h), "map"])
            .output()
            .ctx("shardctl map")?;
        let out = String::from_utf8_lossy(&o.stdout);
        ensure!(
            o.status.success() && out.contains("big = 0"),
            "shardctl map: {out}"
        );

        // Version 3 puts tenant big in motion (shard 0 → 1): key-routed statements run, key-less
        // reads leave out the target's copy, anything that could change the unit on both shards
        // is refused with 55006.
        let mut moving = next.clone();
        moving.moves.push(pgshard::shardmap::config::MoveConfig {
            id: 1,
            distribution: "tenants".into(),
            tenant: Some("big".into()),
            buckets: vec![],
            range: None,
            source: 0,
            target: 1,
            phase: pgshard::shardmap::config::MovePhase::Copying,
            undo: false,
            undo_unverified: false,
            hash_type: None,
        });
        cat.publish_map(2, &moving, 2, "big in motion")
            .await
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        loop {
            // A key-less write that changes nothing, and that a table in motion refuses (its
            // UPDATE … FROM form cannot be filtered): refused once the move is seen.
            match c
                .simple_query("UPDATE cat_orders SET n = n FROM (SELECT 1) x WHERE n < 0")
                .await
            {
                Err(e) if crate::harness::sqlstate(&e) == "55006" => break,
                _ => ensure!(
                    t.elapsed() < Duration::from_secs(5),
                    "router did not pick up version 3"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for sql in [
            "DELETE FROM cat_orders USING (SELECT 1) x",
            "ALTER TABLE cat_orders ADD COLUMN x int",
            "TRUNCATE cat_orders",
            "UPDATE cat_orders SET n = n FROM (SELECT 1) x /* pgshard: shard=1 */",
        ] {
            let e = c
                .simple_query(sql)
                .await
                .err()
                .ok_or_else(|| format!("{sql}: ran on a table in motion"))?;
            ensure!(crate::harness::sqlstate(&e) == "55006", "{sql}: {e:?}");
        }
        let e = c
            .simple_query("UPDATE cat_orders SET n = n + 1 FROM (SELECT 1) x")
            .await
            .err()
            .ok_or("key-less UPDATE … FROM ran")?;
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        ensure!(
            msg.contains("move 1: tenant 'big' from shard 0 to shard 1")
                && msg.contains("add the sharding key"),
            "message: {msg}"
        );
        // The target's copy (as a move's COPY leaves it) is not counted by key-less reads.
        h.cluster
            .psql(
                h.primary(1),
                "shop",
                "INSERT INTO cat_orders (tenant, n) VALUES ('big', 1)",
            )
            .ctx("copy on shard 1")?;
        ensure!(
            one(&c, "SELECT count(*) FROM cat_orders").await? == "1",
            "key-less count leaves the target's copy out"
        );
        ensure!(
            one(&c, "SELECT count(*) FROM cat_orders /* pgshard: shard=1 */").await? == "0",
            "a hinted read of the target leaves its copy out"
        );
        // Key-less and hinted writes leave it out too: replication brings the owner's changes.
        let n = c
            .execute("UPDATE cat_orders SET n = n WHERE n >= 0", &[])
            .await
            .pgx("key-less update")?;
        ensure!(n == 1, "a key-less UPDATE counts the row once ({n})");
        let n = c
            .execute(
                "DELETE FROM cat_orders WHERE n < 0 /* pgshard: shard=1 */",
                &[],
            )
            .await
            .pgx("hinted delete")?;
        ensure!(
            n == 0,
            "a hinted DELETE of the target leaves its copy out ({n})"
        );
        let n = c
            .execute("UPDATE cat_orders SET n = n /* pgshard: shard=1 */", &[])
            .await
            .pgx("hinted update")?;
        ensure!(
            n == 0,
            "a hinted UPDATE of the target leaves its copy out ({n})"
        );
        // The extended protocol, named (prepared) and unnamed (query_typed) statements alike.
        let named = c
            .query_one("SELECT count(*) FROM cat_orders", &[])
            .await
            .pgx("named")?;
        let unnamed = c
            .query_typed(
                "SELECT n FROM cat_orders WHERE n > $1",
                &[(&0i32, tokio_postgres::types::Type::INT4)],
            )
            .await
            .pgx("unnamed")?;
        ensure!(
            named.get::<_, i64>(0) == 1 && unnamed.len() == 1,
            "extended-protocol key-less counts leave the target's copy out"
        );
        c.batch_execute("INSERT INTO cat_orders (tenant, n) VALUES ('big', 2); INSERT INTO cat_orders (tenant, n) VALUES ('big', 3), ('small', 4)").await.pgx("keyed inserts")?;
        ensure!(
            one(&c, "SELECT sum(n) FROM cat_orders WHERE tenant = 'big'").await? == "6",
            "keyed read of the moving tenant"
        );
        ensure!(
            one(&c, "SELECT sum(n) FROM cat_orders").await? == "10",
            "key-less sum during the move"
        );
        h.cluster
            .psql(
                h.primary(1),
                "shop",
                "DELETE FROM cat_orders WHERE tenant = 'big'",
            )
            .ctx("drop the copy")?;
        // Dropping the move (version 4) lifts the refusals.
        cat.publish_map(3, &next, 2, "move 1 aborted")
            .await
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        while c
            .simple_query("SELECT count(*) FROM cat_orders")
            .await
            .is_err()
        {
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "refusals outlived the move"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            one(&c, "SELECT count(*) FROM cat_orders").await? == "4",
            "rows after the move was dropped"
        );
        Ok(())
    })?;

    // A second live router cannot take a router_id in use.
    let dup = catalog_router(h, "ca");
    ensure!(
        dup.as_ref()
            .err()
            .is_some_and(|e| e.contains("held by another live router")),
        "duplicate router_id must be refused"
    );
    // A router that died restarts from the catalog's map, not its config file's (big = 1).
    drop(a);
    let t = Instant::now();
    let a = catalog_router(h, "ca")?;
    eprintln!(
        "catalog: restarted router up {:?} after the old one died (lease 2 s)",
        t.elapsed()
    );
    block_on(async {
        ensure!(
            big_goes_to(&a).await? == "0",
            "restarted router serves the catalog's version 2"
        );
        // Cut off from the catalog for longer than its lease, a router stops serving sharded
        // tables (a move may have begun that it cannot see); reachable again, it serves.
        let c = connect_port(a.port, "app", APP_PW, "shop", "").await?;
        ensure!(
            one(&c, "SELECT count(*) FROM cat_orders WHERE tenant = 'small'")
                .await
                .is_ok(),
            "served with a live lease"
        );
        // Two commands: in one, the terminations would go out before the ALTER commits and
        // the router could reconnect in between.
        h.cluster
            .psql(
                h.primary(0),
                "postgres",
                "ALTER DATABASE catalog ALLOW_CONNECTIONS false",
            )
            .ctx("close the catalog")?;
        h.cluster
            .psql(
                h.primary(0),
                "postgres",
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'catalog'",
            )
            .ctx("cut the catalog off")?;
        let t = Instant::now();
        let refused = loop {
            match c
                .simple_query("SELECT count(*) FROM cat_orders WHERE tenant = 'small'")
                .await
            {
                Err(e) => break e,
                Ok(_) => ensure!(
                    t.elapsed() < Duration::from_secs(6),
                    "router kept serving sharded tables 6 s after losing its 2 s lease"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let lapse = t.elapsed();
        h.cluster
            .psql(
                h.primary(0),
                "postgres",
                "ALTER DATABASE catalog ALLOW_CONNECTIONS true",
            )
            .ctx("reconnect the catalog")?;
        ensure!(
            crate::harness::sqlstate(&refused) == "57P03",
            "refusal without a lease: {refused:?}"
        );
        ensure!(
            lapse >= Duration::from_millis(1500),
            "refused only once the lease ran out, not after {lapse:?}"
        );
        let t = Instant::now();
        while one(&c, "SELECT count(*) FROM cat_orders WHERE tenant = 'small'")
            .await
            .is_err()
        {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "router did not serve again after the catalog came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("catalog: without its catalog the router refused sharded tables after {lapse:?} (lease 2 s), served again {:?} after reconnecting", t.elapsed());
        Ok(())
    })?;
    drop(b);
    Ok(())
}

/// A moving unit's SQL predicate (publication filters, copies, cleanup) selects on a real server
/// exactly the keys the router's own `owns` assigns to the unit.
fn unit_predicates(h: &Harness) -> TestResult {
    use pgshard::pghash::KeyValue;
    use pgshard::shardmap::{config::ShardingConfig, ShardMap};
    let cfg = |key_type: &str, unit: &str| -> Result<ShardMap, String> {
        let text = format!(
            "[[distributions]]\nname = \"d\"\nstrategy = \"tenant\"\nkey_type = \"{key_type}\"\ntenants = {{ \"7\" = 1 }}\n\
             [[moves]]\nid = 1\ndistribution = \"d\"\n{unit}\nphase = \"copying\"\n"
        );
        let c: ShardingConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        ShardMap::build(&c, 2, 1).map_err(|e| e.to_string())
    };
    let map = cfg(
        "int8",
        "buckets = [[0, 300], [1000, 1000], [1500, 1700]]\nsource = 0\ntarget = 1",
    )?;
    let m = &map.motions[0];
    let pred = m
        .predicate_sql("k", None, "int8", 4096)
        .ok_or("no predicate")?;
    let got = h.cluster.psql(h.primary(0), "shop", &format!("SELECT string_agg(k::text, ',' ORDER BY k) FROM generate_series(-3000, 3000) k WHERE {pred}")).ctx("int predicate")?;
    let want: Vec<String> = (-3000i64..=3000)
        .filter(|&k| m.owns(&KeyValue::Int(k), 4096))
        .map(|k| k.to_string())
        .collect();
    ensure!(
        want.len() > 100,
        "too few keys in the unit to mean anything: {}",
        want.len()
    );
    ensure!(
        got.trim() == want.join(","),
        "int8 bucket unit: SQL and Rust disagree"
    );
    let map = cfg("text", "tenant = \"it's\"\nsource = 1\ntarget = 0")?;
    let m = &map.motions[0];
    let pred = m
        .predicate_sql("k", None, "text", 4096)
        .ok_or("no predicate")?;
    let got = h.cluster.psql(h.primary(0), "shop", &format!("SELECT string_agg(k, ',') FROM unnest(ARRAY['it''s', 'its', 'it', 'x']) k WHERE {pred}")).ctx("text predicate")?;
    ensure!(got.trim() == "it's", "tenant unit predicate: {got}");

    // Range units: the server (its "C" order for text) and the router agree on every key,
    // including bounds, case and non-ASCII text.
    let ranged = |key_type: &str, ranges: &str, unit: &str| -> Result<ShardMap, String> {
        let text = format!(
            "[[distributions]]\nname = \"d\"\nstrategy = \"range\"\nkey_type = \"{key_type}\"\nranges = {ranges}\n\
             [[moves]]\nid = 1\ndistribution = \"d\"\nrange = {unit}\nsource = 0\ntarget = 1\nphase = \"copying\"\n"
        );
        let c: ShardingConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        ShardMap::build(&c, 2, 1).map_err(|e| e.to_string())
    };
    let map = ranged(
        "int8",
        "[{ hi = 0, shard = 0 }, { lo = 0, shard = 1 }]",
        "{ lo = -500, hi = -20 }",
    )?;
    let m = &map.motions[0];
    let pred = m
        .predicate_sql("k", None, "int8", 4096)
        .ok_or("no predicate")?;
    let got = h.cluster.psql(h.primary(0), "shop", &format!("SELECT string_agg(k::text, ',' ORDER BY k) FROM generate_series(-3000, 3000) k WHERE {pred}")).ctx("range predicate")?;
    let want: Vec<String> = (-3000i64..=3000)
        .filter(|&k| m.owns(&KeyValue::Int(k), 4096))
        .map(|k| k.to_string())
        .collect();
    ensure!(
        want.len() == 480 && got.trim() == want.join(","),
        "int8 range unit: SQL and Rust disagree"
    );
    ensure!(
        ranged(
            "int8",
            "[{ hi = 0, shard = 0 }, { lo = 0, shard = 1 }]",
            "{ lo = -5, hi = 5 }"
        )
        .is_err(),
        "a range across two entries is refused"
    );
    let map = ranged(
        "text",
        "[{ hi = \"m\", shard = 0 }, { lo = \"m\", shard = 1 }]",
        "{ lo = \"B\", hi = \"b\" }",
    )?;
    let m = &map.motions[0];
    let pred = m
        .predicate_sql("k", None, "text", 4096)
        .ok_or("no predicate")?;
    let words = [
        "A", "B", "Ba", "Z", "_", "a", "b", "B\u{e9}", "\u{e9}", "b0",
    ];
    let arr: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let got = h.cluster.psql(h.primary(0), "shop", &format!("SELECT string_agg(k, ',' ORDER BY k COLLATE \"C\") FROM unnest(ARRAY[{}]) k WHERE {pred}", arr.join(","))).ctx("text range")?;
    let mut want: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| m.owns(&KeyValue::Text(w.as_bytes()), 4096))
        .collect();
    want.sort();
    ensure!(
        want == ["B", "Ba", "B\u{e9}", "Z", "_", "a"] && got.trim() == want.join(","),
        "text range unit: SQL {got:?}, Rust {want:?}"
    );

    // A share of a geo region's group (eu over [0, 1, 1]: shard 1 holds hash buckets
    // 1366..=4095): the server and the router agree row by row, for int8 and uuid hash
    // columns, and the share is exactly the rows the map places on shard 1.
    for (hash_type, ids) in [("int8", "k::int8"), ("uuid", "md5(k::text)::uuid")] {
        let text = format!(
            "[[distributions]]\nname = \"d\"\nstrategy = \"geo\"\nkey_type = \"text\"\nregions = {{ eu = [0, 1, 1], us = [0] }}\n\
             [[moves]]\nid = 1\ndistribution = \"d\"\ntenant = \"eu\"\nbuckets = [[1366, 4095]]\nhash_type = \"{hash_type}\"\nsource = 1\ntarget = 0\nphase = \"copying\"\n"
        );
        let c: ShardingConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        let map = ShardMap::build(&c, 2, 1).map_err(|e| e.to_string())?;
        let m = &map.motions[0];
        let pred = m
            .predicate_sql("region", Some("id"), "text", 4096)
            .ok_or("no predicate")?;
        let got = h.cluster.psql(h.primary(0), "shop", &format!("SELECT string_agg(region || ' ' || id || ' ' || ({pred}), ',') FROM (SELECT r AS region, {ids} AS id FROM generate_series(1, 1500) k, unnest(ARRAY['eu', 'us']) r) t")).ctx("share predicate")?;
        let (mut inside, mut rows) = (0, 0);
        for row in got.trim().split(',') {
            let mut f = row.split(' ');
            let (Some(region), Some(id), Some(sql)) = (f.next(), f.next(), f.next()) else {
                return Err(format!("share predicate row {row:?}"));
            };
            let w = pgshard::pghash::parse_loose(id.as_bytes(), false);
            let r = KeyValue::Text(region.as_bytes());
            let rust = m.owns_row(&r, Some(&w), 4096);
            let placed = map.locate(0, &r, Some(&w)).map_err(|e| e.to_string())?;
            ensure!(
                (sql == "true") == rust,
                "{hash_type} share: SQL says {sql} for {region} {id}, the router {rust}"
            );
            ensure!(
                rust == (placed == pgshard::shardmap::Located::One(1) && region == "eu"),
                "{hash_type} share: {region} {id} is placed on {placed:?}, in the share: {rust}"
            );
            inside += usize::from(rust);
            rows += 1;
        }
        ensure!(
            rows == 3000 && (800..1200).contains(&inside),
            "{hash_type} share: {inside} of {rows} rows in it (about 1000 expected)"
        );
    }
    Ok(())
}
