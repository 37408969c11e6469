//! `shardctl add-shard` and filling the new shard.

use super::checks::*;
use super::{dsn, router_with, trial_config};
use crate::ensure;
use crate::harness::{
    block_on, connect_port, first_value as one, sqlstate, Context, Harness, PgContext, TestResult,
    APP_PW,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `shardctl add-shard` puts a third server into the map while a client keeps updating a
/// reference table; `rebalance --apply` then moves buckets onto it under the placement check.
pub(super) fn add_shard_and_fill(h: &Harness) -> TestResult {
    let mut spec = pgshard::topology::ClusterSpec::new(1, 1, h.dir.join("pg-added"));
    spec.users = vec![
        ("app".into(), APP_PW.into()),
        ("admin".into(), "admin-secret".into()),
    ];
    spec.databases = vec!["shop".into()];
    let third =
        pgshard::topology::LocalCluster::start(spec).map_err(|e| format!("third server: {e}"))?;
    let (p3, r3) = (third.primary(0).port, third.replicas(0)[0].port);
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
    let two = router_with(h, "ma", None, None)?;
    let three_cfg = h.dir.join("three-shards.toml");
    std::fs::write(
        &three_cfg,
        h.config(1, 1, "", &trial_config(h))
            + &format!(
                "[[shards]]\nprimary = \"127.0.0.1:{p3}\"\nreplicas = [\"127.0.0.1:{r3}\"]\n"
            ),
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
    let a = router_with(h, "ma", Some((p3, r3)), None)?;
    let b = router_with(h, "mb", Some((p3, r3)), None)?;
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
        super::failover::source_fails(h, &third, &a.config_path, ports, &truth).await
    })?;
    drop((a, b, third));
    Ok(())
}
