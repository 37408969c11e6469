//! Online moves with `shardctl move` while writers keep inserting, updating and deleting rows
//! through two routers that share a catalog: nothing acknowledged may be lost or duplicated,
//! and a move that skips the fence marker must be caught by verification. Key-less readers
//! check that nothing is counted twice while a unit is on two shards; a range moves too; and
//! `shardctl add-shard` brings in a third server (`add_shard`); switched moves are undone
//! (`undo`).

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, Context, Harness, PgContext, Router, TestResult,
    APP_PW,
};
use crate::trial;
use add_shard::add_shard_and_fill;
use checks::*;
use libtest_mimic::Trial;
use pgshard::shardmap::Located;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use undo::{
    copy_waits_out_a_fence, held_slot_lost_then_resumed, held_then_undone,
    undo_after_failed_verification,
};
use workload::*;

mod add_shard;
mod checks;
mod failover;
mod geo;
mod undo;
mod workload;

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "rebalance::move_buckets_under_writers",
        move_under_writers,
    )]
}

fn dsn(h: &Harness) -> String {
    format!(
        "host=127.0.0.1 port={} user=app password={APP_PW} dbname=movecat",
        h.primary(0).port
    )
}

/// A distribution of its own, so moves do not disturb the sharding trials' tables.
const TABLE: &str = "[[sharding.distributions]]\nname = \"mv\"\nstrategy = \"hash\"\nkey_type = \"int8\"\n\n\
                     [[sharding.distributions]]\nname = \"mvt\"\nstrategy = \"tenant\"\nkey_type = \"text\"\n\n\
                     [[sharding.distributions]]\nname = \"mvr\"\nstrategy = \"range\"\nkey_type = \"int8\"\n\
                     ranges = [{ hi = 1000000000000000, shard = 0 }, { lo = 1000000000000000, shard = 1 }]\n\n\
                     [[sharding.tables]]\nname = \"mv_ranges\"\ndistribution = \"mvr\"\ncolumn = \"id\"\n\n\
                     [[sharding.tables]]\nname = \"mv_items\"\ndistribution = \"mv\"\ncolumn = \"id\"\n\n\
                     [[sharding.tables]]\nname = \"mv_ref\"\nreference = true\n\n\
                     [[sharding.tables]]\nname = \"mv_orders\"\ndistribution = \"mvt\"\ncolumn = \"tenant\"\n\n\
                     [[sharding.distributions]]\nname = \"mvg\"\nstrategy = \"geo\"\nkey_type = \"text\"\n\
                     regions = { eu = [0], us = [1], ap = [0], na = [0, 1] }\ndefault_region = \"ap\"\n\n\
                     [[sharding.tables]]\nname = \"mv_geo\"\ndistribution = \"mvg\"\ncolumn = \"region\"\nhash_column = \"id\"\n";

/// A router of the trial whose shard 0 has a second replica, on port `stale`.
fn router(h: &Harness, id: &str, stale: u16) -> Result<Router, String> {
    router_with(h, id, None, Some(stale))
}

/// A router of the trial; `third` adds a shard (primary and replica ports) after the
/// topology's two, `stale` a second replica to shard 0.
fn router_with(
    h: &Harness,
    id: &str,
    third: Option<(u16, u16)>,
    stale: Option<u16>,
) -> Result<Router, String> {
    let more = trial_config(h);
    let general = format!("router_id = \"{id}\"");
    h.spawn_with(|port, metrics| {
        let mut c = h.config(port, metrics, &general, &more);
        if let Some((p, r)) = third {
            c.push_str(&format!(
                "[[shards]]\nprimary = \"127.0.0.1:{p}\"\nreplicas = [\"127.0.0.1:{r}\"]\n\n"
            ));
        }
        if let Some(p) = stale {
            let own = format!("\"127.0.0.1:{}\"]", h.cluster.replicas(0)[0].port);
            c = c.replacen(
                &own,
                &format!(
                    "\"127.0.0.1:{}\", \"127.0.0.1:{p}\"]",
                    h.cluster.replicas(0)[0].port
                ),
                1,
            );
        }
        c
    })
}

/// The trial's catalog, sharded database and distributions, as router config. Replicas may lag
/// by any time: only the map's replica floor may keep reads off one that missed a move.
fn trial_config(h: &Harness) -> String {
    format!(
        "[catalog]\ndsn = \"{}\"\nlease = \"2s\"\npoll_interval = \"200ms\"\nslot_check_interval = \"200ms\"\ndrain_timeout = \"2s\"\nfence_wait = \"5s\"\n\n\
         [replicas]\nmax_lag = \"1h\"\ncheck_interval = \"200ms\"\n{}\n{TABLE}",
        dsn(h),
        crate::sharding::SHARDING
    )
}

fn move_under_writers(h: &Harness) -> TestResult {
    h.cluster
        .psql(
            h.primary(0),
            "movecat",
            "DROP SCHEMA IF EXISTS pgshard CASCADE",
        )
        .ctx("reset catalog")?;
    for s in 0..2 {
        h.cluster.psql(h.primary(s), "shop", "DROP TABLE IF EXISTS mv_items, mv_orders, mv_ranges, mv_geo; DROP SCHEMA IF EXISTS pgshard CASCADE").ctx("reset shard")?;
    }
    // A replica of shard 0 of this trial's own, to pause without disturbing other trials.
    let stale = h.cluster.extra_replica(0, "stale").ctx("extra replica")?;
    let a = router(h, "ma", stale.0.port)?;
    let b = router(h, "mb", stale.0.port)?;
    block_on(async {
        let c = connect_port(a.port, "app", APP_PW, "shop", "").await?;
        c.batch_execute("CREATE TABLE mv_items (id int8 PRIMARY KEY, v int NOT NULL, note text)")
            .await
            .pgx("ddl")?;
        let values: Vec<String> = (1..=4000).map(|i| format!("({i}, 0, 'seed')")).collect();
        c.batch_execute(&format!(
            "INSERT INTO mv_items (id, v, note) VALUES {}",
            values.join(", ")
        ))
        .await
        .pgx("seed")?;
        seeds_on_replicas(h, "mv_items").await?;
        c.batch_execute("CREATE TABLE mv_ref (id int PRIMARY KEY, v int NOT NULL)")
            .await
            .pgx("reference ddl")?;
        let refs: Vec<String> = (1..=50).map(|i| format!("({i}, 0)")).collect();
        c.batch_execute(&format!("INSERT INTO mv_ref VALUES {}", refs.join(", ")))
            .await
            .pgx("reference rows")?;

        // That replica stops replaying: it keeps the rows the move deletes from shard 0.
        h.cluster
            .psql(&stale.0, "shop", "SELECT pg_wal_replay_pause()")
            .ctx("pause replay")?;
        // Buckets 0-1023 live on shard 0 (4096 buckets over 2 shards); move them to shard 1.
        let run = move_with_writers(
            h,
            [a.port, b.port],
            &a.config_path,
            "0-1023",
            1,
            // Three copy streams over page ranges of the small table: verification and the
            // placement check below show each row copied once.
            &["--copy-streams", "3", "--copy-stream-pages", "1"],
            None,
            1,
        )
        .await?;
        let stdout = String::from_utf8_lossy(&run.out.stdout);
        let stderr = String::from_utf8_lossy(&run.out.stderr);
        ensure!(
            run.out.status.code() == Some(0),
            "shardctl move failed ({:?}): {stderr}{stdout}",
            run.out.status.code()
        );
        ensure!(
            stderr.contains("of mv_items in 3 streams"),
            "the copy ran in 3 streams: {stderr}"
        );
        eprintln!("rebalance: {}", stdout.lines().last().unwrap_or(""));
        ensure!(
            !stderr.contains("warning"),
            "the move finished without warnings (replicas caught up): {stderr}"
        );
        eprintln!(
            "rebalance: {} writes acknowledged while the move ran",
            run.during
        );
        ensure!(
            run.during > 50,
            "writers kept writing during the move ({} acknowledged)",
            run.during
        );
        eprintln!(
            "rebalance: {} key-less reads during the move, each counted the 4000 seed rows once",
            run.reads
        );
        ensure!(
            run.reads > 10,
            "key-less reads ran during the move ({})",
            run.reads
        );
        keyless_writes_kept(a.port, "mv_items", run.last_note.as_deref()).await?;
        // The readers repeat a few key-less texts: each is rewritten for the target once per
        // map version, and every repeat is a memo hit (a miss per execution would be a parse).
        let (hits, misses) = move_rewrite_stats(a.port).await?;
        eprintln!("rebalance: move rewrites at router a: {hits} memo hits, {misses} misses");
        ensure!(
            misses > 0 && hits > misses,
            "key-less reads during the move reuse their rewrites: {hits} hits, {misses} misses"
        );

        // Ground truth: the seed rows plus every acknowledged write.
        let mut truth: HashMap<i64, i32> = (1..=4000).map(|i| (i, 0)).collect();
        let (ops, retried) = record(&mut truth, run.acked)?;
        eprintln!("rebalance: {ops} writer ops, {retried} retried (40001)");
        // The catalog's final map puts buckets 0-1023 on shard 1 and has no move left.
        let (map, dist, moves) = current_map(h).await?;
        ensure!(moves == 0, "the move is finished in the map ({moves} left)");
        ensure!(
            map.locate(dist, &pgshard::pghash::KeyValue::Int(1), None)
                .is_ok(),
            "map usable"
        );
        check_placement(h, &map, dist, &truth).await?;
        no_leftovers(h).await?;
        // In a read-write transaction: primaries, not replicas that may lag the writers.
        c.batch_execute("BEGIN").await.pgx("begin")?;
        let total = one(&c, "SELECT count(*) FROM mv_items").await?;
        c.batch_execute("COMMIT").await.pgx("commit")?;
        ensure!(
            total == truth.len().to_string(),
            "key-less count through the router {total} = ground truth {}",
            truth.len()
        );
        stale_replica_skipped(h, &c, &stale.0, a.port).await?;

        // shardctl dying after each phase: before the switch `abort` leaves no trace and
        // `resume` copies again, after it `resume` completes the move and `abort` moves the
        // unit back; writers go on throughout and nothing they were told is lost. Buckets
        // 2048-2303 live on shard 1.
        let mut owner = 1;
        for (phase, verb, to, base) in [
            ("copying", "abort", 0, 20),
            ("fenced", "abort", 0, 30),
            ("copying", "resume", 0, 60),
            ("fenced", "resume", 1, 70),
            ("switched", "resume", 0, 40),
            ("switched", "abort", 1, 80),
        ] {
            let t = Instant::now();
            let run = move_with_writers(
                h,
                [a.port, b.port],
                &a.config_path,
                "2048-2303",
                to,
                &["--unsafe-stop-after", phase],
                Some(verb),
                base,
            )
            .await?;
            ensure!(
                run.out.status.code() == Some(4),
                "move stopped after {phase}: {:?} {}",
                run.out.status.code(),
                String::from_utf8_lossy(&run.out.stderr)
            );
            let then = run.then.as_ref().ok_or("no abort/resume ran")?;
            ensure!(
                then.status.success(),
                "{verb} after {phase}: {}",
                String::from_utf8_lossy(&then.stderr)
            );
            let (ops, retried) = record(&mut truth, run.acked)?;
            keyless_writes_kept(a.port, "mv_items", run.last_note.as_deref()).await?;
            let (map, dist, moves) = current_map(h).await?;
            ensure!(moves == 0, "after {verb} no move is left in the map");
            let on = match &map.distributions[dist].strategy {
                pgshard::shardmap::Strategy::Hash { bucket_shard } => {
                    (bucket_shard[2048], bucket_shard[2303])
                }
                _ => (usize::MAX, usize::MAX),
            };
            ensure!(
                on == (owner, owner) || (verb == "resume" && on == (to, to)),
                "after {verb} (stopped after {phase}) buckets 2048-2303 are on {on:?}"
            );
            ensure!(
                (verb == "resume") == (on == (to, to)),
                "{verb} after {phase} left buckets 2048-2303 on {on:?} (move to {to})"
            );
            owner = on.0;
            check_placement(h, &map, dist, &truth).await?;
            no_leftovers(h).await?;
            eprintln!("rebalance: stopped after {phase}, {verb}: {ops} writer ops ({retried} retried), buckets 2048-2303 now on shard {owner}, {:?}", t.elapsed());
        }
        let (map, dist, _) = current_map(h).await?;
        let bucket_of_shard = |b: u32| match &map.distributions[dist].strategy {
            pgshard::shardmap::Strategy::Hash { bucket_shard } => bucket_shard[b as usize],
            _ => usize::MAX,
        };
        ensure!(
            bucket_of_shard(2048) == 0 && bucket_of_shard(2303) == 0 && bucket_of_shard(2304) == 1,
            "the resumed move placed buckets 2048-2303 on shard 0"
        );

        // A router that dies holds a move up only until its lease runs out; restarted, it
        // serves the catalog's newest map. Buckets 2304-2559 live on shard 1.
        b.signal(libc::SIGKILL);
        let t = Instant::now();
        let run = move_with_writers(
            h,
            [a.port, a.port],
            &a.config_path,
            "2304-2559",
            0,
            &[],
            None,
            50,
        )
        .await?;
        ensure!(
            run.out.status.success(),
            "move with a dead router: {}",
            String::from_utf8_lossy(&run.out.stderr)
        );
        record(&mut truth, run.acked)?;
        let (map, dist, _) = current_map(h).await?;
        check_placement(h, &map, dist, &truth).await?;
        no_leftovers(h).await?;
        eprintln!(
            "rebalance: move with router mb killed took {:?} (its lease: 2 s)",
            t.elapsed()
        );
        let b2 = router(h, "mb", stale.0.port)?;
        let moved = (1i64..)
            .find(|&i| (2304..=2559).contains(&map.bucket(&pgshard::pghash::KeyValue::Int(i))))
            .ok_or("no key")?;
        let admin_b = connect_port(b2.port, "admin", "admin-secret", "pgshard", "").await?;
        let route = one(
            &admin_b,
            &format!("SHOW ROUTE SELECT * FROM mv_items WHERE id = {moved}"),
        )
        .await?;
        ensure!(
            route == "0",
            "restarted router sends moved key {moved} to shard {route}, not 0"
        );

        // plan (a dry run) and rebalance --apply even out the rows the moves above skewed.
        let ctl = |verb: &'static str, extra: &'static [&'static str]| {
            let (d, cfg) = (dsn(h), a.config_path.clone());
            tokio::task::spawn_blocking(move || {
                let mut args = vec![
                    "--catalog".to_string(),
                    d,
                    verb.into(),
                    "--distribution".into(),
                    "mv".into(),
                    "--config".into(),
                    cfg.display().to_string(),
                    "--database".into(),
                    "shop".into(),
                ];
                args.extend(extra.iter().map(|s| s.to_string()));
                std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
                    .args(&args)
                    .output()
                    .expect("run shardctl")
            })
        };
        let shard_rows = || async {
            let mut n = Vec::new();
            for s in 0..2 {
                let d = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
                n.push(
                    one(&d, "SELECT count(*) FROM mv_items")
                        .await?
                        .parse::<f64>()
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok::<_, String>(n)
        };
        let before = shard_rows().await?;
        let dry = ctl("plan", &[]).await.ctx("plan")?;
        let text = String::from_utf8_lossy(&dry.stdout);
        ensure!(
            dry.status.success()
                && text.contains("plan:")
                && text.lines().any(|l| l.trim_start().starts_with("1 |")),
            "plan: {text}"
        );
        ensure!(shard_rows().await? == before, "plan moved nothing");
        let run = ctl("rebalance", &["--apply", "--tolerance", "0.05"])
            .await
            .ctx("rebalance")?;
        ensure!(
            run.status.success(),
            "rebalance --apply: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let after = shard_rows().await?;
        let skew = |n: &[f64]| (n[0] - n[1]).abs() / ((n[0] + n[1]) / 2.0);
        eprintln!("rebalance: rows per shard {before:?} -> {after:?}");
        ensure!(
            skew(&after) < 0.15 && skew(&after) < skew(&before),
            "rebalance evened out rows: {before:?} -> {after:?}"
        );
        let (map, dist, moves) = current_map(h).await?;
        ensure!(moves == 0, "rebalance left no move in flight");
        check_placement(h, &map, dist, &truth).await?;
        no_leftovers(h).await?;

        // shardctl verify agrees, and finds a row written past pgshard onto the wrong shard.
        let v = ctl("verify", &[]).await.ctx("verify")?;
        let text = String::from_utf8_lossy(&v.stdout).to_string();
        ensure!(
            v.status.code() == Some(0) && text.contains("mv | mv_items | 1 |"),
            "verify after the moves ({:?}): {text}{}",
            v.status.code(),
            String::from_utf8_lossy(&v.stderr)
        );
        let stray = 9_000_000_000_000i64;
        let owner = match map.locate(dist, &pgshard::pghash::KeyValue::Int(stray), None) {
            Ok(Located::One(s)) => s,
            other => return Err(format!("stray key placed at {other:?}")),
        };
        let insert = format!("INSERT INTO mv_items (id, v, note) VALUES ({stray}, 0, 'stray')");
        h.cluster
            .psql(h.primary(1 - owner), "shop", &insert)
            .ctx("stray row")?;
        let v = ctl("verify", &[]).await.ctx("verify")?;
        let text = String::from_utf8_lossy(&v.stdout).to_string();
        let line = format!("mv | mv_items | {} |", 1 - owner);
        ensure!(
            v.status.code() == Some(3)
                && text
                    .lines()
                    .any(|l| l.contains(&line) && l.ends_with("| 1")),
            "verify finds the stray row on shard {} ({:?}): {text}",
            1 - owner,
            v.status.code()
        );
        h.cluster
            .psql(
                h.primary(1 - owner),
                "shop",
                &format!("DELETE FROM mv_items WHERE id = {stray}"),
            )
            .ctx("stray row gone")?;

        // A tenant moves the same way (no writers: the bucket moves above cover concurrency).
        c.batch_execute(
            "CREATE TABLE mv_orders (tenant text, id int8, amount int, PRIMARY KEY (tenant, id))",
        )
        .await
        .pgx("ddl")?;
        let rows: Vec<String> = (0..600)
            .map(|i| format!("('{}', {i}, {i})", ["acme", "zeta", "omega"][i % 3]))
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO mv_orders (tenant, id, amount) VALUES {}",
            rows.join(", ")
        ))
        .await
        .pgx("orders")?;
        let admin = connect_port(a.port, "admin", "admin-secret", "pgshard", "").await?;
        let from: usize = one(
            &admin,
            "SHOW ROUTE SELECT * FROM mv_orders WHERE tenant = 'acme'",
        )
        .await?
        .parse()
        .map_err(|e| format!("{e}"))?;
        let to = 1 - from;
        held_then_undone(h, &c, &admin, &a.config_path, from, to).await?;
        held_slot_lost_then_resumed(h, &admin, &a.config_path, to).await?;
        copy_waits_out_a_fence(h, &c, a.port, &a.config_path, to).await?;
        let on = |s: usize| async move {
            let d = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
            one(&d, "SELECT count(*) FROM mv_orders WHERE tenant = 'acme'").await
        };
        ensure!(
            on(to).await? == "200" && on(from).await? == "0",
            "tenant acme's 200 rows are on shard {to} only"
        );
        let sum = one(&c, "SELECT sum(amount) FROM mv_orders").await?;
        ensure!(
            sum == (0..600).sum::<i32>().to_string(),
            "key-less sum after the tenant move: {sum}"
        );
        let t = Instant::now();
        while one(
            &admin,
            "SHOW ROUTE SELECT * FROM mv_orders WHERE tenant = 'acme'",
        )
        .await?
            != to.to_string()
        {
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "router does not route acme to shard {to}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A key range moves the same way, under writers and readers: keys [0, 10^15) leave
        // shard 0's range for shard 1, which splits the map's range in two.
        c.batch_execute("CREATE TABLE mv_ranges (id int8 PRIMARY KEY, v int NOT NULL, note text)")
            .await
            .pgx("ddl")?;
        c.batch_execute(&format!(
            "INSERT INTO mv_ranges (id, v, note) VALUES {}",
            values.join(", ")
        ))
        .await
        .pgx("seed ranges")?;
        seeds_on_replicas(h, "mv_ranges").await?;
        let run = move_with_writers(
            h,
            [a.port, b2.port],
            &a.config_path,
            "range:0..1000000000000000",
            1,
            &[],
            None,
            200,
        )
        .await?;
        ensure!(
            run.out.status.success(),
            "range move: {}",
            String::from_utf8_lossy(&run.out.stderr)
        );
        ensure!(
            run.during > 50,
            "the range moved under writes ({})",
            run.during
        );
        keyless_writes_kept(a.port, "mv_ranges", run.last_note.as_deref()).await?;
        let mut range_truth: HashMap<i64, i32> = (1..=4000).map(|i| (i, 0)).collect();
        record(&mut range_truth, run.acked)?;
        let (map, rdist, moves) = current_map_of(h, "mvr").await?;
        ensure!(moves == 0, "the range move finished");
        check_placement_of(h, "mv_ranges", &map, rdist, &range_truth).await?;
        ensure!(
            map.locate(rdist, &pgshard::pghash::KeyValue::Int(-1), None) == Ok(Located::One(0)),
            "keys below the moved range stay on shard 0"
        );
        no_leftovers(h).await?;
        // shardctl verify agrees: every row inside the ranges its shard owns.
        let v = tokio::task::spawn_blocking({
            let (d, cfg) = (dsn(h), a.config_path.display().to_string());
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
                    .args(["--catalog", &d, "verify", "--distribution", "mvr"])
                    .args(["--config", &cfg, "--database", "shop"])
                    .output()
                    .expect("run shardctl")
            }
        })
        .await
        .ctx("verify")?;
        let text = String::from_utf8_lossy(&v.stdout).to_string();
        ensure!(
            v.status.code() == Some(0) && text.contains("mvr | mv_ranges | 1 |"),
            "verify of the range distribution ({:?}): {text}{}",
            v.status.code(),
            String::from_utf8_lossy(&v.stderr)
        );
        eprintln!(
            "rebalance: range [0, 10^15) moved to shard 1 under writers: {} rows checked",
            range_truth.len()
        );

        geo::move_region(h, [a.port, b2.port], &a.config_path).await?;

        // Negative control: skipping the marker wait must be caught by verification; `abort`
        // then moves the unit back to the shard that kept every write.
        // (Writers may see the loss too: an UPDATE of a row the target never got touches 0 rows.)
        let run = move_with_writers(
            h,
            [a.port, b2.port],
            &a.config_path,
            "1024-2047",
            1,
            &["--unsafe-skip-marker-wait"],
            None,
            100,
        )
        .await?;
        let stderr = String::from_utf8_lossy(&run.out.stderr);
        ensure!(
            run.out.status.code() == Some(3) && stderr.contains("verification failed"),
            "negative control not caught ({:?}): {stderr}",
            run.out.status.code()
        );
        ensure!(
            run.during > 50,
            "negative control ran under writes ({})",
            run.during
        );
        undo_after_failed_verification(h, &a.config_path, run.acked).await?;

        // Leave no move behind for other trials.
        let (cat, row) = latest_map(h).await?;
        let mut clean = row.sharding.clone();
        clean.moves.clear();
        cat.publish_map(row.version, &clean, row.shards, "test cleanup")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })?;
    drop((a, b));
    add_shard_and_fill(h)?;
    for s in 0..2 {
        h.cluster
            .psql(
                h.primary(s),
                "shop",
                "DROP TABLE IF EXISTS mv_items, mv_orders, mv_ranges, mv_ref, mv_geo",
            )
            .ctx("drop")?;
    }
    Ok(())
}
