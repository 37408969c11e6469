//! Regions of a geo distribution moved under writers: region eu leaves shard 0 for shard 1,
//! then the share shard 1 holds of region na (hashed over shards [0, 1] by id) joins shard 0's,
//! while writers insert, update and delete the region's rows through both routers and
//! key-less reads count every row once.

use super::dsn;
use super::workload::shardctl_move;
use crate::ensure;
use crate::harness::{
    connect_port, first_value as one, sqlstate, Context, Harness, PgContext, TestResult, APP_PW,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Seeds 1000 rows in each of eu (shard 0), us (shard 1), ap (shard 0, the default region)
/// and na (over shards 0 and 1); refuses moving the default region, and region na whole; moves
/// eu to shard 1, then na's share on shard 1 to shard 0, under writers, checking every row.
pub(super) async fn move_region(
    h: &Harness,
    ports: [u16; 2],
    config: &std::path::Path,
) -> TestResult {
    let c = connect_port(ports[0], "app", APP_PW, "shop", "").await?;
    c.batch_execute("CREATE TABLE mv_geo (region text NOT NULL, id int8 NOT NULL, v int NOT NULL, PRIMARY KEY (region, id))")
        .await
        .pgx("ddl")?;
    for region in ["eu", "us", "ap", "na"] {
        let rows: Vec<String> = (1..=1000)
            .map(|i| format!("('{region}', {i}, 0)"))
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO mv_geo (region, id, v) VALUES {}",
            rows.join(", ")
        ))
        .await
        .pgx("seed")?;
    }
    // Key-less reads outside transactions go to replicas.
    super::checks::seeds_on_replicas_n(h, "mv_geo", 4000).await?;
    for (region, why) in [("ap", "default region"), ("na", "--from")] {
        let (d, cfg) = (dsn(h), config.to_path_buf());
        let unit = format!("region:{region}");
        let out = tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, &unit, 1, &[]))
            .await
            .ctx("shardctl")?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && err.contains(why),
            "moving region {region} whole is refused ({why}): {:?} {err}",
            out.status.code()
        );
    }
    let s0 = connect_port(h.primary(0).port, "app", APP_PW, "shop", "").await?;
    let s1 = connect_port(h.primary(1).port, "app", APP_PW, "shop", "").await?;

    let (truth, reads) = under_writers(ports, config, h, "eu", 1, &[]).await?;
    // Every acknowledged eu row on shard 1 with its value, none left on shard 0; us and ap stay.
    let left = one(&s0, "SELECT count(*) FROM mv_geo WHERE region = 'eu'").await?;
    ensure!(left == "0", "shard 0 keeps {left} eu rows");
    same_rows(&s1, "eu", &truth).await?;
    let us = one(&s1, "SELECT count(*) FROM mv_geo WHERE region = 'us'").await?;
    let ap = one(&s0, "SELECT count(*) FROM mv_geo WHERE region = 'ap'").await?;
    ensure!(
        us == "1000" && ap == "1000",
        "us {us} and ap {ap} rows stay put"
    );
    let admin = connect_port(ports[1], "admin", "admin-secret", "pgshard", "").await?;
    let route = |sql: &str| format!("SHOW ROUTE {sql}");
    let eu = one(&admin, &route("SELECT * FROM mv_geo WHERE region = 'eu'")).await?;
    ensure!(eu == "1", "the router sends eu to shard {eu}, not 1");
    eprintln!(
        "rebalance: region eu moved to shard 1 under 4 writers: {} eu rows checked, {reads} key-less reads right",
        truth.len()
    );

    // Region na hashes over [0, 1]: the share on shard 1 joins shard 0's, so na is on shard 0.
    let na_on_1: i64 = one(&s1, "SELECT count(*) FROM mv_geo WHERE region = 'na'")
        .await?
        .parse()
        .map_err(|e| format!("{e}"))?;
    ensure!(
        (300..700).contains(&na_on_1),
        "the seed spread region na over both shards ({na_on_1} of 1000 on shard 1)"
    );
    // shardctl verify checks a spread region per bucket of its hash column: the seeds are
    // placed right, and a row written past pgshard onto the other member is found.
    let v = verify_geo(h, config).await?;
    ensure!(
        v.0 == Some(0) && v.1.contains("mvg | mv_geo | 1 |"),
        "verify of the geo distribution: {v:?}"
    );
    let mut stray = None;
    for id in 900_000..900_050i64 {
        let sql = format!("SELECT * FROM mv_geo WHERE region = 'na' AND id = {id}");
        if one(&admin, &route(&sql)).await? == "0" {
            stray = Some(id);
            break;
        }
    }
    let stray = stray.ok_or("no na id of shard 0 among 50")?;
    s1.batch_execute(&format!(
        "INSERT INTO mv_geo (region, id, v) VALUES ('na', {stray}, 0)"
    ))
    .await
    .pgx("stray row")?;
    let v = verify_geo(h, config).await?;
    s1.batch_execute(&format!(
        "DELETE FROM mv_geo WHERE region = 'na' AND id = {stray}"
    ))
    .await
    .pgx("stray row gone")?;
    ensure!(
        v.0 == Some(3)
            && v.1
                .lines()
                .any(|l| l.contains("mvg | mv_geo | 1 |") && l.ends_with("| 1")),
        "verify finds na row {stray} on shard 1 instead of 0: {v:?}"
    );

    let (truth, reads) = under_writers(ports, config, h, "na", 0, &["--from", "1"]).await?;
    let left = one(&s1, "SELECT count(*) FROM mv_geo WHERE region = 'na'").await?;
    ensure!(left == "0", "shard 1 keeps {left} na rows");
    same_rows(&s0, "na", &truth).await?;
    for (sql, want) in [
        ("SELECT * FROM mv_geo WHERE region = 'na' AND id = 1", "0"),
        ("SELECT * FROM mv_geo WHERE region = 'na' AND id = 2", "0"),
        ("SELECT * FROM mv_geo WHERE region = 'na'", "0"),
    ] {
        let got = one(&admin, &route(sql)).await?;
        ensure!(
            got == want,
            "after the share moved, {sql} goes to {got}, not {want}"
        );
    }
    eprintln!(
        "rebalance: region na's share on shard 1 ({na_on_1} seed rows) joined shard 0 under 4 writers: {} na rows checked, {reads} key-less reads right",
        truth.len()
    );
    Ok(())
}

/// `shardctl verify --distribution mvg`: its exit status and output.
async fn verify_geo(
    h: &Harness,
    config: &std::path::Path,
) -> Result<(Option<i32>, String), String> {
    let (d, cfg) = (dsn(h), config.display().to_string());
    let v = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(["--catalog", &d, "verify", "--distribution", "mvg"])
            .args(["--config", &cfg, "--database", "shop"])
            .output()
    })
    .await
    .ctx("verify")?
    .map_err(|e| format!("run shardctl: {e}"))?;
    Ok((
        v.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        ),
    ))
}

/// Shard `c` holds exactly the rows of `region` in `truth` (id → v).
async fn same_rows(
    c: &tokio_postgres::Client,
    region: &str,
    truth: &HashMap<i64, i32>,
) -> TestResult {
    let rows = c
        .query("SELECT id, v FROM mv_geo WHERE region = $1", &[&region])
        .await
        .pgx("region rows")?;
    let got: HashMap<i64, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    ensure!(
        got == *truth,
        "the shard has {} {region} rows, the writers were told of {} ({} differ)",
        got.len(),
        truth.len(),
        truth.iter().filter(|(k, v)| got.get(k) != Some(v)).count()
            + got.keys().filter(|k| !truth.contains_key(k)).count()
    );
    Ok(())
}

/// Runs `shardctl move --region REGION … --to to` while 4 writers insert, update and delete
/// the region's rows through both routers and a reader counts the 4000 seed rows key-less;
/// returns the region's rows as the writers were told (id → v) and the reads made.
async fn under_writers(
    ports: [u16; 2],
    config: &std::path::Path,
    h: &Harness,
    region: &'static str,
    to: usize,
    extra: &[&str],
) -> Result<(HashMap<i64, i32>, u64), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let (port, stop) = (ports[w as usize % 2], stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = connect_port(port, "app", APP_PW, "shop", "").await?;
            let update =
                format!("UPDATE mv_geo SET v = v + 1 WHERE region = '{region}' AND id = $1");
            let delete = format!("DELETE FROM mv_geo WHERE region = '{region}' AND id = $1");
            let insert = format!("INSERT INTO mv_geo (region, id, v) VALUES ('{region}', $1, 0)");
            let mut mine: HashMap<i64, i32> = HashMap::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = 10_000 * (w + 1) + n;
                let r = match n % 4 {
                    3 => {
                        let pick = 10_000 * (w + 1) + n / 2;
                        let want = u64::from(mine.contains_key(&pick));
                        c.execute(&update, &[&pick]).await.map(|k| {
                            if let Some(v) = mine.get_mut(&pick) {
                                *v += 1;
                            }
                            (k, want)
                        })
                    }
                    2 if n % 8 == 2 => {
                        let pick = 10_000 * (w + 1) + n - 1;
                        c.execute(&delete, &[&pick])
                            .await
                            .map(|k| (k, u64::from(mine.remove(&pick).is_some())))
                    }
                    _ => c.execute(&insert, &[&id]).await.map(|k| {
                        mine.insert(id, 0);
                        (k, 1)
                    }),
                };
                match r {
                    Ok((k, want)) if k == want => {}
                    Ok((k, want)) => {
                        return Err(format!("{region} writer {w}: {k} rows, want {want}"))
                    }
                    Err(e) if sqlstate(&e) == "40001" => {}
                    Err(e) => return Err(format!("{region} writer {w}: {e:?}")),
                }
            }
            Ok::<_, String>(mine)
        }));
    }
    let reader = {
        let stop = stop.clone();
        let port = ports[1];
        tokio::spawn(async move {
            let c = connect_port(port, "app", APP_PW, "shop", "").await?;
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c
                    .simple_query("SELECT count(*) FROM mv_geo WHERE id <= 1000")
                    .await
                {
                    Ok(m) => {
                        let got = m.iter().find_map(|x| match x {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).map(String::from)
                            }
                            _ => None,
                        });
                        ensure!(
                            got.as_deref() == Some("4000"),
                            "key-less count while region {region} moves: {got:?}, want 4000"
                        );
                        reads += 1;
                    }
                    Err(e) if sqlstate(&e) == "40001" => {}
                    Err(e) => return Err(format!("{region} reader: {e:?}")),
                }
            }
            Ok::<_, String>(reads)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (d, cfg) = (dsn(h), config.to_path_buf());
    let unit = format!("region:{region}");
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, &unit, to, &extra))
        .await
        .ctx("shardctl")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut truth: HashMap<i64, i32> = (1..=1000).map(|i| (i, 0)).collect();
    for t in tasks {
        truth.extend(t.await.ctx("geo writer")??);
    }
    let reads = reader.await.ctx("geo reader")??;
    ensure!(
        out.status.success(),
        "move of region {region}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        reads > 5,
        "key-less reads ran while region {region} moved ({reads})"
    );
    Ok((truth, reads))
}
