//! Online moves with `shardctl move` while writers keep inserting, updating and deleting rows
//! through two routers that share a catalog: nothing acknowledged may be lost or duplicated,
//! and a move that skips the fence marker must be caught by verification.

use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, sqlstate, Context, Harness, PgContext, Router,
    TestResult, APP_PW,
};
use crate::trial;
use libtest_mimic::Trial;
use pgshard::catalog::Catalog;
use pgshard::shardmap::{Located, ShardMap};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
                     [[sharding.tables]]\nname = \"mv_orders\"\ndistribution = \"mvt\"\ncolumn = \"tenant\"\n";

fn router(h: &Harness, id: &str) -> Result<Router, String> {
    router_with(h, id, None)
}

/// A router of the trial; `third` adds a shard (primary port) after the topology's two.
fn router_with(h: &Harness, id: &str, third: Option<u16>) -> Result<Router, String> {
    let more = trial_config(h);
    let general = format!("router_id = \"{id}\"");
    h.spawn_with(|port, metrics| {
        let mut c = h.config(port, metrics, &general, &more);
        if let Some(p) = third {
            c.push_str(&format!("[[shards]]\nprimary = \"127.0.0.1:{p}\"\n\n"));
        }
        c
    })
}

/// The trial's catalog, sharded database and distributions, as router config.
fn trial_config(h: &Harness) -> String {
    format!(
        "[catalog]\ndsn = \"{}\"\nlease = \"2s\"\npoll_interval = \"200ms\"\ndrain_timeout = \"2s\"\nfence_wait = \"5s\"\n{}\n{TABLE}",
        dsn(h),
        crate::sharding::SHARDING
    )
}

/// What one writer knows was acknowledged: live ids with their value.
#[derive(Default)]
struct Acked {
    rows: HashMap<i64, i32>,
    live: Vec<i64>,
    ops: u64,
    retried: u64,
}

/// Inserts, updates and deletes its own rows until `stop`; every statement's result is checked
/// (an UPDATE or DELETE of a live row must find it on the shard the router picks).
async fn writer(
    port: u16,
    table: &'static str,
    w: i64,
    stop: Arc<AtomicBool>,
    during: Arc<AtomicU64>,
    moving: Arc<AtomicBool>,
) -> Result<Acked, String> {
    let c = connect_port(port, "app", APP_PW, "shop", "").await?;
    let mut a = Acked::default();
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let pick = |a: &Acked| a.live[(n as usize * 7919) % a.live.len()];
        let r = match n % 10 {
            7 | 8 if !a.live.is_empty() => {
                let id = pick(&a);
                c.execute(
                    &format!("UPDATE {table} SET v = v + 1 WHERE id = $1"),
                    &[&id],
                )
                .await
                .map(|k| (k, Some((id, a.rows[&id] + 1))))
            }
            9 if !a.live.is_empty() => {
                let id = pick(&a);
                c.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
                    .await
                    .map(|k| (k, Some((id, -1))))
            }
            _ => {
                let id = w * 10_000_000 + n;
                c.simple_query(&format!(
                    "INSERT INTO {table} (id, v, note) VALUES ({id}, 0, 'w{w}')"
                ))
                .await
                .map(|_| (1, Some((id, 0))))
            }
        };
        match r {
            Ok((k, Some((id, v)))) => {
                ensure!(k == 1, "writer {w}: statement on id {id} touched {k} rows");
                if v < 0 {
                    a.rows.remove(&id);
                    a.live.retain(|&x| x != id);
                } else if a.rows.insert(id, v).is_none() {
                    a.live.push(id);
                }
                a.ops += 1;
                if moving.load(Ordering::Relaxed) {
                    during.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok((_, None)) => {}
            // A fence that outlasted the wait: not acknowledged, the writer just goes on.
            Err(e) if sqlstate(&e) == "40001" => a.retried += 1,
            Err(e) => return Err(format!("writer {w}: {e:?}")),
        }
    }
    Ok(a)
}

/// Key-less reads of the seed rows (ids 1-4000, which no writer touches) until `stop`, through
/// the simple and the extended protocol, with a scatter merge too: while the unit's rows are on
/// two shards every answer must still count each row once. Returns the reads made during the move.
async fn reader(
    port: u16,
    table: &'static str,
    diag_ports: [u16; 4],
    stop: Arc<AtomicBool>,
    moving: Arc<AtomicBool>,
) -> Result<u64, String> {
    let c = connect_port(port, "app", APP_PW, "shop", "").await?;
    let count = c
        .prepare(&format!(
            "SELECT count(*), sum(v) FROM {table} WHERE id <= $1"
        ))
        .await
        .pgx("prepare")?;
    let mut during = 0;
    let mut n = 0u64;
    let rows = |m: Vec<tokio_postgres::SimpleQueryMessage>| {
        let vals = m.iter().filter_map(|x| match x {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        });
        vals.collect::<Vec<_>>().join(" ")
    };
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let got = match n % 3 {
            0 => c
                .query_one(&count, &[&4000i64])
                .await
                .map(|r| format!("{} {}", r.get::<_, i64>(0), r.get::<_, i64>(1))),
            1 => c
                .simple_query(&format!(
                    "SELECT count(*), sum(v) FROM {table} WHERE id <= 4000"
                ))
                .await
                .map(rows),
            _ => c
                .simple_query(&format!(
                    "SELECT id FROM {table} WHERE id <= 4000 ORDER BY id DESC LIMIT 2"
                ))
                .await
                .map(rows),
        };
        let want = if n % 3 == 2 { "4000 3999" } else { "4000 0" };
        match got {
            Ok(g) if g != want => {
                // What each server holds right then, to tell a stale replica from a missed filter.
                let mut held = Vec::new();
                for p in diag_ports.iter() {
                    let d = connect_port(*p, "app", APP_PW, "shop", "").await?;
                    held.push(
                        one(
                            &d,
                            &format!("SELECT count(*) FROM {table} WHERE id <= 4000"),
                        )
                        .await?,
                    );
                }
                return Err(format!("key-less read during a move: got {g}, want {want}; servers (p0 r0 p1 r1) hold {held:?}"));
            }
            Ok(_) => {}
            Err(e) if sqlstate(&e) == "40001" => {}
            Err(e) => return Err(format!("key-less read during a move: {e:?}")),
        }
        if moving.load(Ordering::Relaxed) {
            during += 1;
        }
    }
    Ok(during)
}

fn shardctl_move(
    dsn: String,
    config: &std::path::Path,
    buckets: &str,
    to: usize,
    extra: &[String],
) -> std::process::Output {
    let mut args = vec![
        "--catalog".to_string(),
        dsn,
        "move".into(),
        "--distribution".into(),
        "mv".into(),
        "--buckets".into(),
        buckets.into(),
    ];
    if let Some(t) = buckets.strip_prefix("tenant:") {
        args[3..].clone_from_slice(&[
            "--distribution".into(),
            "mvt".into(),
            "--tenant".into(),
            t.into(),
        ]);
    }
    if let Some(r) = buckets.strip_prefix("range:") {
        args[3..].clone_from_slice(&[
            "--distribution".into(),
            "mvr".into(),
            "--range".into(),
            r.into(),
        ]);
    }
    args.extend([
        "--to".into(),
        to.to_string(),
        "--config".into(),
        config.display().to_string(),
        "--database".into(),
        "shop".into(),
    ]);
    args.extend(extra.iter().cloned());
    std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(&args)
        .output()
        .expect("run shardctl")
}

/// A `shardctl abort|resume <id>` run.
fn shardctl_then(
    dsn: String,
    config: &std::path::Path,
    verb: &str,
    id: u64,
) -> std::process::Output {
    let args = [
        "--catalog".to_string(),
        dsn,
        verb.into(),
        id.to_string(),
        "--config".into(),
        config.display().to_string(),
        "--database".into(),
        "shop".into(),
    ];
    std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(&args)
        .output()
        .expect("run shardctl")
}

/// What a move under writers produced.
struct Run {
    out: std::process::Output,
    /// The `abort`/`resume` that followed, if asked.
    then: Option<std::process::Output>,
    acked: Vec<Result<Acked, String>>,
    /// Writes acknowledged while shardctl ran.
    during: u64,
    /// Key-less reads answered while shardctl ran (all of them right).
    reads: u64,
}

/// The table and distribution a unit as `shardctl_move` takes it belongs to.
fn table_of(unit: &str) -> (&'static str, &'static str) {
    if unit.starts_with("range:") {
        ("mv_ranges", "mvr")
    } else {
        ("mv_items", "mv")
    }
}

/// Runs `shardctl move` (then, if asked, `shardctl abort|resume` of the move it left in flight)
/// while 8 writers (4 per router) work.
async fn move_with_writers(
    h: &Harness,
    ports: [u16; 2],
    config: &std::path::Path,
    buckets: &str,
    to: usize,
    extra: &[&str],
    then: Option<&str>,
    base: i64,
) -> Result<Run, String> {
    let (table, dist_name) = table_of(buckets);
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let moving = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8 {
        tasks.push(tokio::spawn(writer(
            ports[w as usize % 2],
            table,
            base + w,
            stop.clone(),
            during.clone(),
            moving.clone(),
        )));
    }
    let diag = [
        h.primary(0).port,
        h.cluster.replicas(0)[0].port,
        h.primary(1).port,
        h.cluster.replicas(1)[0].port,
    ];
    let readers: Vec<_> = ports
        .iter()
        .map(|&p| tokio::spawn(reader(p, table, diag, stop.clone(), moving.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    moving.store(true, Ordering::Relaxed);
    let (d, cfg, buckets, extra) = (
        dsn(h),
        config.to_path_buf(),
        buckets.to_string(),
        extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    let out = tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, &buckets, to, &extra))
        .await
        .ctx("shardctl task")?;
    let then = match then {
        Some(verb) => {
            let (cat, _) = Catalog::connect(&dsn(h)).await.map_err(|e| e.to_string())?;
            let map = cat
                .latest_map()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no map")?;
            let id = map
                .sharding
                .moves
                .iter()
                .find(|m| m.distribution == dist_name)
                .ok_or("no move left in flight")?
                .id;
            let (d, cfg, verb) = (dsn(h), config.to_path_buf(), verb.to_string());
            Some(
                tokio::task::spawn_blocking(move || shardctl_then(d, &cfg, &verb, id))
                    .await
                    .ctx("shardctl task")?,
            )
        }
        None => None,
    };
    moving.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.ctx("writer task")?);
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.ctx("reader task")?.map_err(|e| {
            format!(
                "{e}\nshardctl said: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    }
    Ok(Run {
        out,
        then,
        acked,
        during: during.load(Ordering::Relaxed),
        reads,
    })
}

/// Adds what the writers acknowledged to the ground truth (all must have succeeded).
fn record(
    truth: &mut HashMap<i64, i32>,
    acked: Vec<Result<Acked, String>>,
) -> Result<(u64, u64), String> {
    let (mut ops, mut retried) = (0, 0);
    for a in acked {
        let a = a?;
        truth.extend(a.rows.iter().map(|(k, v)| (*k, *v)));
        ops += a.ops;
        retried += a.retried;
    }
    Ok((ops, retried))
}

/// No replication slot or publication of a move is left on any shard.
async fn no_leftovers(h: &Harness) -> TestResult {
    for s in 0..2 {
        let d = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
        let n = one(&d, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgshard_move_%') + (SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgshard_move_%')").await?;
        ensure!(n == "0", "shard {s} keeps {n} slots/publications of moves");
    }
    Ok(())
}

/// Waits until the shards' replicas hold the 4000 seed rows of `table` (readers outside a move
/// read replicas; a reader that is not the writer may otherwise see them lag).
async fn seeds_on_replicas(h: &Harness, table: &str) -> TestResult {
    let t = Instant::now();
    loop {
        let mut n = 0;
        for s in 0..2 {
            let r = connect_port(h.cluster.replicas(s)[0].port, "app", APP_PW, "shop", "").await?;
            n += one(
                &r,
                &format!("SELECT count(*) FROM {table} WHERE id <= 4000"),
            )
            .await
            .unwrap_or_default()
            .parse::<i64>()
            .unwrap_or(0);
        }
        if n == 4000 {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "replicas hold {n} of {table}'s 4000 seed rows after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The catalog's current map, built.
async fn current_map(h: &Harness) -> Result<(ShardMap, usize, usize), String> {
    current_map_of(h, "mv").await
}

/// The catalog's current map, the index of distribution `dist` and the moves in flight.
async fn current_map_of(h: &Harness, dist: &str) -> Result<(ShardMap, usize, usize), String> {
    let (cat, _) = Catalog::connect(&dsn(h)).await.map_err(|e| e.to_string())?;
    let row = cat
        .latest_map()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no map")?;
    let map = ShardMap::build(&row.sharding, row.shards, row.version).map_err(|e| e.to_string())?;
    let dist = map
        .distributions
        .iter()
        .position(|d| d.name == dist)
        .ok_or("no such distribution")?;
    Ok((map, dist, row.sharding.moves.len()))
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
        h.cluster.psql(h.primary(s), "shop", "DROP TABLE IF EXISTS mv_items, mv_orders, mv_ranges; DROP SCHEMA IF EXISTS pgshard CASCADE").ctx("reset shard")?;
    }
    let a = router(h, "ma")?;
    let b = router(h, "mb")?;
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

        // Buckets 0-1023 live on shard 0 (4096 buckets over 2 shards); move them to shard 1.
        let run = move_with_writers(
            h,
            [a.port, b.port],
            &a.config_path,
            "0-1023",
            1,
            &[],
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
        eprintln!("rebalance: {}", stdout.lines().last().unwrap_or(""));
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

        // shardctl dying after each phase: before the switch `abort` leaves no trace, after it
        // `resume` completes the move; writers go on throughout and nothing they were told is lost.
        // Buckets 2048-2303 live on shard 1.
        for (phase, verb, base) in [
            ("copying", "abort", 20),
            ("fenced", "abort", 30),
            ("switched", "resume", 40),
        ] {
            let run = move_with_writers(
                h,
                [a.port, b.port],
                &a.config_path,
                "2048-2303",
                0,
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
            let (map, dist, moves) = current_map(h).await?;
            ensure!(moves == 0, "after {verb} no move is left in the map");
            let on = map
                .locate(dist, &pgshard::pghash::KeyValue::Int(1), None)
                .map_err(|e| e.to_string())?;
            check_placement(h, &map, dist, &truth).await?;
            no_leftovers(h).await?;
            eprintln!("rebalance: stopped after {phase}, {verb}: {ops} writer ops ({retried} retried), map now puts key 1 on {on:?}");
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
        let b2 = router(h, "mb")?;
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
        let out = tokio::task::spawn_blocking({
            let (dsn, config) = (dsn(h), a.config_path.clone());
            move || shardctl_move(dsn, &config, "tenant:acme", to, &[])
        })
        .await
        .ctx("shardctl")?;
        ensure!(
            out.status.success(),
            "tenant move: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let on = |s: usize| async move {
            let d = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
            one(&d, "SELECT count(*) FROM mv_orders WHERE tenant = 'acme'").await
        };
        ensure!(
            on(to).await? == "200" && on(from).await? == "0",
            "tenant acme's 200 rows are on shard {to} only"
        );
        ensure!(
            one(&c, "SELECT sum(amount) FROM mv_orders").await?
                == (0..600).sum::<i32>().to_string(),
            "key-less sum after the tenant move"
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
            run.during > 50 && run.reads > 10,
            "the range moved under writes ({}) and reads ({})",
            run.during,
            run.reads
        );
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
        eprintln!(
            "rebalance: range [0, 10^15) moved to shard 1 under writers: {} rows checked",
            range_truth.len()
        );

        // Negative control: skipping the marker wait must be caught by verification.
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

        // Leave no move behind for other trials.
        let (cat, _) = Catalog::connect(&dsn(h)).await.map_err(|e| e.to_string())?;
        let row = cat
            .latest_map()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no map")?;
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
                "DROP TABLE IF EXISTS mv_items, mv_orders, mv_ranges, mv_ref",
            )
            .ctx("drop")?;
    }
    Ok(())
}

/// `shardctl add-shard` puts a third server into the map while a client keeps updating a
/// reference table; `rebalance --apply` then moves buckets onto it under the placement check.
fn add_shard_and_fill(h: &Harness) -> TestResult {
    let mut spec = pgshard::topology::ClusterSpec::new(1, 0, h.dir.join("pg-added"));
    spec.users = vec![
        ("app".into(), APP_PW.into()),
        ("admin".into(), "admin-secret".into()),
    ];
    spec.databases = vec!["shop".into()];
    let third =
        pgshard::topology::LocalCluster::start(spec).map_err(|e| format!("third server: {e}"))?;
    let p3 = third.primary(0).port;
    let cat_dsn = dsn(h);
    let ctl = move |config: &std::path::Path, args: &[&str]| {
        let mut all = vec!["--catalog".to_string(), cat_dsn.clone()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend([
            "--config".into(),
            config.display().to_string(),
            "--database".into(),
            "shop".into(),
        ]);
        std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(&all)
            .output()
            .expect("run shardctl")
    };
    // Routers whose config lists two shards hold it up (old ones' leases run out first).
    let two = router_with(h, "ma", None)?;
    let three_cfg = h.dir.join("three-shards.toml");
    std::fs::write(
        &three_cfg,
        h.config(1, 1, "", &trial_config(h))
            + &format!("[[shards]]\nprimary = \"127.0.0.1:{p3}\"\n"),
    )
    .ctx("config")?;
    let out = ctl(&two.config_path, &["add-shard"]);
    ensure!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("all 2 shards"),
        "add-shard without a new shard in the config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&three_cfg, &["add-shard"]);
    ensure!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("ma (2 shards)"),
        "add-shard while a router lacks the shard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(two);
    let a = router_with(h, "ma", Some(p3))?;
    let b = router_with(h, "mb", Some(p3))?;
    block_on(async {
        // mv_items afresh: the negative control above left the unit it broke on two shards.
        let c = connect_port(a.port, "app", APP_PW, "shop", "").await?;
        c.batch_execute("DROP TABLE mv_items; CREATE TABLE mv_items (id int8 PRIMARY KEY, v int NOT NULL, note text)").await.pgx("fresh mv_items")?;
        let values: Vec<String> = (1..=6000)
            .map(|i| format!("({i}, {}, 'seed')", i % 7))
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO mv_items (id, v, note) VALUES {}",
            values.join(", ")
        ))
        .await
        .pgx("seed")?;
        let truth: HashMap<i64, i32> = (1..=6000).map(|i| (i, (i % 7) as i32)).collect();
        // A client updates the reference table through the whole add-shard.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn({
            let (stop, port) = (stop.clone(), a.port);
            async move {
                let c = connect_port(port, "app", APP_PW, "shop", "").await?;
                let mut acked = vec![0i64; 51];
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = 1 + (n % 50) as i32;
                    match c
                        .execute("UPDATE mv_ref SET v = v + 1 WHERE id = $1", &[&id])
                        .await
                    {
                        Ok(_) => acked[id as usize] += 1,
                        Err(e) if sqlstate(&e) == "40001" => {}
                        Err(e) => return Err(format!("reference update: {e:?}")),
                    }
                }
                Ok::<_, String>(acked)
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let config = a.config_path.clone();
        let c2 = ctl.clone();
        let out = tokio::task::spawn_blocking(move || c2(&config, &["add-shard"]))
            .await
            .ctx("add-shard")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let acked = writer.await.ctx("writer")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "add-shard: {stderr}");
        eprintln!(
            "rebalance: add-shard: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
        );
        // Every shard holds the reference table exactly as acknowledged.
        let want: String = (1..=50)
            .map(|i| format!("{i}:{}", acked[i]))
            .collect::<Vec<_>>()
            .join(",");
        for port in [h.primary(0).port, h.primary(1).port, p3] {
            let d = connect_port(port, "app", APP_PW, "shop", "").await?;
            let got = one(
                &d,
                "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM mv_ref",
            )
            .await?;
            ensure!(
                got == want,
                "reference table on the server at port {port}: {got}, acknowledged {want}"
            );
        }
        ensure!(
            acked.iter().sum::<i64>() > 20,
            "the reference table was written during add-shard ({} updates)",
            acked.iter().sum::<i64>()
        );
        // The new shard takes a third of the rows.
        let config = a.config_path.clone();
        let c2 = ctl.clone();
        let run = tokio::task::spawn_blocking(move || {
            c2(
                &config,
                &[
                    "rebalance",
                    "--distribution",
                    "mv",
                    "--apply",
                    "--tolerance",
                    "0.05",
                ],
            )
        })
        .await
        .ctx("rebalance")?;
        ensure!(
            run.status.success(),
            "rebalance onto the new shard: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (map, dist, moves) = current_map(h).await?;
        ensure!(
            map.shards == 3 && moves == 0 && map.readable == [0, 1, 2],
            "map after add-shard + rebalance: {} shards, {moves} moves",
            map.shards
        );
        let ports = [h.primary(0).port, h.primary(1).port, p3];
        check_placement_on(&ports, "mv_items", &map, dist, &truth).await?;
        let d = connect_port(p3, "app", APP_PW, "shop", "").await?;
        let on_new: usize = one(&d, "SELECT count(*) FROM mv_items")
            .await?
            .parse()
            .map_err(|e| format!("{e}"))?;
        ensure!(
            on_new * 4 > truth.len(),
            "shard 2 holds {on_new} of {} rows after rebalancing",
            truth.len()
        );
        let c = connect_port(b.port, "app", APP_PW, "shop", "").await?;
        c.batch_execute("BEGIN").await.pgx("begin")?;
        let total = one(&c, "SELECT count(*) FROM mv_items").await?;
        c.batch_execute("COMMIT").await.pgx("commit")?;
        ensure!(
            total == truth.len().to_string(),
            "key-less count over three shards {total} = ground truth {}",
            truth.len()
        );
        eprintln!("rebalance: added shard 2 under reference writes; rebalance moved {on_new} rows onto it");
        Ok(())
    })?;
    drop((a, b, third));
    Ok(())
}

/// Every row of `truth` is on the shard the map puts it, exactly once, with its last value;
/// no other row exists.
async fn check_placement(
    h: &Harness,
    map: &ShardMap,
    dist: usize,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    check_placement_of(h, "mv_items", map, dist, truth).await
}

/// The shards' primary ports (the topology's two).
fn primaries(h: &Harness) -> Vec<u16> {
    vec![h.primary(0).port, h.primary(1).port]
}

/// `check_placement` for any table of the trial.
async fn check_placement_of(
    h: &Harness,
    table: &str,
    map: &ShardMap,
    dist: usize,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    check_placement_on(&primaries(h), table, map, dist, truth).await
}

/// `check_placement` over the shards whose primaries listen on `ports`.
async fn check_placement_on(
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
