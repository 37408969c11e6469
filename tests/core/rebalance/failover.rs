//! The source shard's primary fails during a move and its replica is promoted: the move
//! aborts, leaving the unit where it was and nothing of it on the target; the next move from
//! the shard finds the promoted server, drops the publication it inherited, and succeeds. A
//! prepared transaction left in doubt there refuses the next move.

use super::checks::{current_map, latest_map, move_objects};
use super::dsn;
use super::workload::shardctl_move;
use crate::ensure;
use crate::harness::{connect_port, first_value as one, Context, Harness, TestResult, APP_PW};
use pgshard::pghash::KeyValue;
use pgshard::shardmap::{Located, Strategy};
use pgshard::topology::LocalCluster;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The shard holding bucket `b` of hash distribution `dist`.
fn owner(map: &pgshard::shardmap::ShardMap, dist: usize, b: usize) -> usize {
    match &map.distributions[dist].strategy {
        Strategy::Hash { bucket_shard } => bucket_shard[b],
        _ => usize::MAX,
    }
}

/// Moves some of shard 2's buckets (the third server, `third`) to shard 0, stops shard 2's
/// primary (immediate mode) right after the copy and promotes its replica; `ports` are the
/// three primaries.
pub(super) async fn source_fails(
    h: &Harness,
    third: &LocalCluster,
    config: &Path,
    ports: [u16; 3],
    truth: &HashMap<i64, i32>,
) -> TestResult {
    let (map, dist, _) = current_map(h).await?;
    let Strategy::Hash { bucket_shard } = &map.distributions[dist].strategy else {
        return Err("mv is a hash distribution".into());
    };
    let lo = bucket_shard
        .iter()
        .position(|&s| s == 2)
        .ok_or("shard 2 holds no bucket")?;
    let hi = (lo..bucket_shard.len())
        .take_while(|&b| bucket_shard[b] == 2)
        .last()
        .unwrap_or(lo)
        .min(lo + 127);
    let unit = format!("{lo}-{hi}");
    let run = |extra: Vec<String>| {
        let (d, cfg, unit) = (dsn(h), config.to_path_buf(), unit.clone());
        tokio::task::spawn_blocking(move || shardctl_move(d, &cfg, &unit, 0, &extra))
    };
    let mv = run(vec!["--unsafe-pause-after-copy".into(), "4s".into()]);
    let (cat, _) = latest_map(h).await?;
    let t = Instant::now();
    loop {
        let detail = cat
            .client()
            .query_opt(
                "SELECT detail FROM pgshard.moves ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .unwrap_or_default();
        if detail.starts_with("copied") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the move did not get through its copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replica has all the primary wrote (the publication included) before it fails.
    let p = connect_port(ports[2], "app", APP_PW, "shop", "").await?;
    let lsn = one(&p, "SELECT pg_current_wal_lsn()::text").await?;
    let replica = third.replicas(0)[0];
    let r = connect_port(replica.port, "app", APP_PW, "shop", "").await?;
    let t = Instant::now();
    while one(&r, &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")).await? != "t" {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "shard 2's replica does not replay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    third
        .stop_server(third.primary(0))
        .map_err(|e| format!("stop shard 2: {e}"))?;
    third
        .promote(replica)
        .map_err(|e| format!("promote shard 2's replica: {e}"))?;
    let out = mv.await.ctx("shardctl")?;
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        out.status.code() == Some(2) && said.contains("aborting"),
        "a move whose source failed aborts ({:?}): {said}",
        out.status.code()
    );
    let (map, dist, moves) = current_map(h).await?;
    ensure!(moves == 0, "the aborted move left the map");
    ensure!(owner(&map, dist, lo) == 2, "buckets {unit} stay on shard 2");
    // Nothing of the unit on the target, nothing of the move on the live shards.
    let d = connect_port(ports[0], "app", APP_PW, "shop", "").await?;
    for r in d
        .query("SELECT id FROM mv_items", &[])
        .await
        .map_err(|e| e.to_string())?
    {
        let k: i64 = r.get(0);
        ensure!(
            map.locate(dist, &KeyValue::Int(k), None) == Ok(Located::One(0)),
            "id {k} of the aborted unit is left on shard 0"
        );
    }
    for p in &ports[..2] {
        ensure!(
            move_objects(*p).await? == 0,
            "the abort left a slot or publication on the server at port {p}"
        );
    }

    let left = move_objects(replica.port).await?;
    ensure!(
        left > 0,
        "the promoted replica inherited the move's publication"
    );
    let out = run(vec![]).await.ctx("shardctl")?;
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        out.status.success() && said.contains("left by a move no longer in flight"),
        "the next move from shard 2 succeeds and drops what the abort left: {said}"
    );
    let ports = [ports[0], ports[1], replica.port];
    for p in ports {
        ensure!(
            move_objects(p).await? == 0,
            "a slot or publication of a move is left on the server at port {p}"
        );
    }
    let (map, dist, _) = current_map(h).await?;
    ensure!(
        owner(&map, dist, lo) == 0,
        "buckets {unit} moved to shard 0"
    );
    super::checks::check_placement_on(&ports, "mv_items", &map, dist, truth).await?;

    // A prepared transaction left in doubt on a source would make the move's slot wait for it
    // forever: once it is older than 5 s a move refuses to start, naming it.
    let d = connect_port(replica.port, "app", APP_PW, "shop", "").await?;
    d.batch_execute("BEGIN; SELECT pg_current_xact_id(); PREPARE TRANSACTION 'trial_in_doubt'")
        .await
        .map_err(|e| e.to_string())?;
    let fresh = pgshard::rebalance::copy::wait_for_prepared(&d, Duration::ZERO).await;
    ensure!(
        fresh.is_ok(),
        "a fresh prepared transaction is waited for, not refused: {fresh:?}"
    );
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let stale = pgshard::rebalance::copy::wait_for_prepared(&d, Duration::ZERO).await;
    ensure!(
        matches!(&stale, Err(e) if e.to_string().contains("'trial_in_doubt'")),
        "a stale prepared transaction refuses the move, named: {stale:?}"
    );
    d.batch_execute("ROLLBACK PREPARED 'trial_in_doubt'")
        .await
        .map_err(|e| e.to_string())?;
    let done = pgshard::rebalance::copy::wait_for_prepared(&d, Duration::ZERO).await;
    ensure!(done.is_ok(), "once resolved the move may go on: {done:?}");
    eprintln!("rebalance: source failed after the copy, replica promoted: move aborted; {left} object(s) it left dropped by the next move, which read the promoted server");
    Ok(())
}
