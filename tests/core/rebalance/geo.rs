//! A region of a geo distribution moved under writers: region eu leaves shard 0 for shard 1
//! while writers insert, update and delete eu rows through both routers and key-less reads
//! count every row once.

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

/// Seeds 1000 rows in each of eu, us (shard 1) and ap (shard 0, the default region), refuses
/// moving the default region, then moves eu to shard 1 under writers and checks every row.
pub(super) async fn move_region(
    h: &Harness,
    ports: [u16; 2],
    config: &std::path::Path,
) -> TestResult {
    let c = connect_port(ports[0], "app", APP_PW, "shop", "").await?;
    c.batch_execute("CREATE TABLE mv_geo (region text NOT NULL, id int8 NOT NULL, v int NOT NULL, PRIMARY KEY (region, id))")
        .await
        .pgx("ddl")?;
    for region in ["eu", "us", "ap"] {
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
    super::checks::seeds_on_replicas_n(h, "mv_geo", 3000).await?;
    let (d, cfg) = (dsn(h), config.to_path_buf());
    let out = tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, "region:ap", 1, &[]))
        .await
        .ctx("shardctl")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("default region"),
        "moving the default region is refused: {:?} {err}",
        out.status.code()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let (port, stop) = (ports[w as usize % 2], stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = connect_port(port, "app", APP_PW, "shop", "").await?;
            let mut mine: HashMap<i64, i32> = HashMap::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = 10_000 * (w + 1) + n;
                let r = match n % 4 {
                    3 => {
                        let pick = 10_000 * (w + 1) + n / 2;
                        let want = u64::from(mine.contains_key(&pick));
                        c.execute(
                            "UPDATE mv_geo SET v = v + 1 WHERE region = 'eu' AND id = $1",
                            &[&pick],
                        )
                        .await
                        .map(|k| {
                            if let Some(v) = mine.get_mut(&pick) {
                                *v += 1;
                            }
                            (k, want)
                        })
                    }
                    2 if n % 8 == 2 => {
                        let pick = 10_000 * (w + 1) + n - 1;
                        c.execute(
                            "DELETE FROM mv_geo WHERE region = 'eu' AND id = $1",
                            &[&pick],
                        )
                        .await
                        .map(|k| (k, u64::from(mine.remove(&pick).is_some())))
                    }
                    _ => c
                        .execute(
                            "INSERT INTO mv_geo (region, id, v) VALUES ('eu', $1, 0)",
                            &[&id],
                        )
                        .await
                        .map(|k| {
                            mine.insert(id, 0);
                            (k, 1)
                        }),
                };
                match r {
                    Ok((k, want)) if k == want => {}
                    Ok((k, want)) => return Err(format!("geo writer {w}: {k} rows, want {want}")),
                    Err(e) if sqlstate(&e) == "40001" => {}
                    Err(e) => return Err(format!("geo writer {w}: {e:?}")),
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
                            got.as_deref() == Some("3000"),
                            "key-less count during the region move: {got:?}, want 3000"
                        );
                        reads += 1;
                    }
                    Err(e) if sqlstate(&e) == "40001" => {}
                    Err(e) => return Err(format!("geo reader: {e:?}")),
                }
            }
            Ok::<_, String>(reads)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (d, cfg) = (dsn(h), config.to_path_buf());
    let out = tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, "region:eu", 1, &[]))
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
        "region move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        reads > 5,
        "key-less reads ran during the region move ({reads})"
    );

    // Every acknowledged eu row on shard 1 with its value, none left on shard 0; us and ap stay.
    let s0 = connect_port(h.primary(0).port, "app", APP_PW, "shop", "").await?;
    let s1 = connect_port(h.primary(1).port, "app", APP_PW, "shop", "").await?;
    let left = one(&s0, "SELECT count(*) FROM mv_geo WHERE region = 'eu'").await?;
    ensure!(left == "0", "shard 0 keeps {left} eu rows");
    let rows = s1
        .query("SELECT id, v FROM mv_geo WHERE region = 'eu'", &[])
        .await
        .pgx("eu rows")?;
    let got: HashMap<i64, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    ensure!(
        got == truth,
        "shard 1 has {} eu rows, the writers were told of {} ({} differ)",
        got.len(),
        truth.len(),
        truth.iter().filter(|(k, v)| got.get(k) != Some(v)).count()
            + got.keys().filter(|k| !truth.contains_key(k)).count()
    );
    let us = one(&s1, "SELECT count(*) FROM mv_geo WHERE region = 'us'").await?;
    let ap = one(&s0, "SELECT count(*) FROM mv_geo WHERE region = 'ap'").await?;
    ensure!(
        us == "1000" && ap == "1000",
        "us {us} and ap {ap} rows stay put"
    );
    let admin = connect_port(ports[1], "admin", "admin-secret", "pgshard", "").await?;
    let route = one(
        &admin,
        "SHOW ROUTE SELECT * FROM mv_geo WHERE region = 'eu'",
    )
    .await?;
    ensure!(route == "1", "the router sends eu to shard {route}, not 1");
    eprintln!(
        "rebalance: region eu moved to shard 1 under 4 writers: {} eu rows checked, {reads} key-less reads right",
        truth.len()
    );
    Ok(())
}
