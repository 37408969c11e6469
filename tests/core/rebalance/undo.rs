//! Undoing switched moves: a held tenant move taken back after writes landed on its target,
//! and the negative control's failed verification repaired by moving its unit back.

use super::checks::{current_map, current_map_of, latest_map, no_leftovers, primaries};
use super::dsn;
use super::workload::{shardctl_move, shardctl_then, Acked};
use crate::ensure;
use crate::harness::{
    connect_port, copy_in, copy_out_lines, first_value as one, Context, Harness, PgContext,
    TestResult, APP_PW,
};
use pgshard::pghash::KeyValue;
use pgshard::shardmap::{config::MovePhase, Located};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The id of the move of distribution `dist` in the catalog's map, with its phase.
async fn move_of(h: &Harness, dist: &str) -> Result<(u64, MovePhase), String> {
    let (_, row) = latest_map(h).await?;
    row.sharding
        .moves
        .iter()
        .find(|m| m.distribution == dist)
        .map(|m| (m.id, m.phase))
        .ok_or_else(|| format!("no move of {dist} in the map"))
}

/// Runs `shardctl abort id` (or resume) and insists it succeeds.
async fn then(h: &Harness, config: &Path, verb: &'static str, id: u64) -> TestResult {
    let out = then_with(h, config, verb, id, &[]).await?;
    ensure!(
        out.status.success(),
        "shardctl {verb} {id}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Moves tenant acme to shard `to` with `--hold`.
async fn hold_acme(h: &Harness, config: &Path, to: usize) -> Result<std::process::Output, String> {
    let (dsn, config) = (dsn(h), config.to_path_buf());
    tokio::task::spawn_blocking(move || {
        shardctl_move(dsn, &config, "tenant:acme", to, &["--hold".to_string()])
    })
    .await
    .ctx("shardctl")
}

/// Runs `shardctl <verb> <id> <extra…>` and returns what it did.
async fn then_with(
    h: &Harness,
    config: &Path,
    verb: &'static str,
    id: u64,
    extra: &'static [&'static str],
) -> Result<std::process::Output, String> {
    let (d, cfg) = (dsn(h), config.to_path_buf());
    tokio::task::spawn_blocking(move || shardctl_then(d, &cfg, verb, id, extra))
        .await
        .ctx("shardctl")
}

/// The rows of the router console's `SHOW SLOTS`.
async fn move_slots(admin: &tokio_postgres::Client) -> Result<Vec<Vec<String>>, String> {
    Ok(admin
        .simple_query("SHOW SLOTS")
        .await
        .pgx("SHOW SLOTS")?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// Waits until the router's console routes `sql` to `shard`.
async fn routes_to(admin: &tokio_postgres::Client, sql: &str, shard: usize) -> TestResult {
    let t = Instant::now();
    while one(admin, &format!("SHOW ROUTE {sql}")).await? != shard.to_string() {
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "the router does not route `{sql}` to shard {shard}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Tenant acme (200 rows of mv_orders, on shard `from`) moves to `to` with `--hold`; writes
/// through the router land on `to`; `abort` brings the tenant back to `from` with those writes,
/// and leaves nothing on `to`. The writes are reverted at the end (the trial goes on with the
/// seed data).
pub(super) async fn held_then_undone(
    h: &Harness,
    c: &tokio_postgres::Client,
    admin: &tokio_postgres::Client,
    config: &Path,
    from: usize,
    to: usize,
) -> TestResult {
    let out = hold_acme(h, config, to).await?;
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("held"),
        "held tenant move: {said}"
    );
    let (id, phase) = move_of(h, "mvt").await?;
    ensure!(
        phase == MovePhase::Switched,
        "a held move stays switched ({phase:?})"
    );
    let acme = "SELECT * FROM mv_orders WHERE tenant = 'acme'";
    routes_to(admin, acme, to).await?;
    let on = |s: usize, sql: &'static str| async move {
        let d = connect_port(h.primary(s).port, "app", APP_PW, "shop", "").await?;
        one(&d, sql).await
    };
    let count =
        "SELECT count(*) || ' ' || coalesce(sum(amount), 0) FROM mv_orders WHERE tenant = 'acme'";
    let seed = on(from, count).await?;
    ensure!(
        on(to, count).await? == seed,
        "while held, both shards hold acme's rows ({seed})"
    );
    c.batch_execute(
        "INSERT INTO mv_orders (tenant, id, amount) VALUES ('acme', 1000, 5); \
         UPDATE mv_orders SET amount = amount + 1 WHERE tenant = 'acme' AND id = 0; \
         DELETE FROM mv_orders WHERE tenant = 'acme' AND id = 3",
    )
    .await
    .pgx("writes while held")?;
    // The held move's reverse slot retains the WAL of those writes until resume or abort:
    // the router reports it.
    let reverse = format!("pgshard_back_{id}");
    let t = Instant::now();
    loop {
        let slots = move_slots(admin).await?;
        let row = slots.iter().find(|r| r[1] == reverse);
        if let Some(r) = row {
            let retained: u64 = r[5].parse().unwrap_or(0);
            ensure!(
                r[0] == to.to_string() && r[2] == id.to_string() && r[3] == "reverse",
                "SHOW SLOTS places the reverse slot on shard {to}: {r:?}"
            );
            if retained > 0 {
                break;
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "SHOW SLOTS reports {reverse} retaining WAL: {slots:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = (0..600).sum::<i32>() + 5 + 1 - 3;
    let sum = "SELECT sum(amount) FROM mv_orders";
    ensure!(
        one(c, sum).await? == total.to_string(),
        "key-less sum while held counts acme once"
    );
    // COPY TO across the shards leaves out acme's extra copy too (the source's COPY reads
    // around it), with the CSV header once.
    let lines = copy_out_lines(
        c,
        "COPY mv_orders (tenant, amount) TO STDOUT WITH (FORMAT csv, HEADER true)",
    )
    .await?;
    let acme_rows = lines.iter().filter(|l| l.starts_with("acme,")).count();
    let copied: i32 = lines[1..]
        .iter()
        .filter_map(|l| l.rsplit(',').next()?.parse::<i32>().ok())
        .sum();
    ensure!(
        lines.first().map(String::as_str) == Some("tenant,amount")
            && lines.len() == 601
            && acme_rows == 200
            && copied == total,
        "COPY TO while held: {} lines (header {:?}), {acme_rows} of acme, amounts {copied} (want 600 rows, 200 of acme, {total})",
        lines.len(),
        lines.first()
    );

    then(h, config, "abort", id).await?;
    let (_, _, moves) = current_map_of(h, "mvt").await?;
    ensure!(moves == 0, "the undo left no move in the map");
    routes_to(admin, acme, from).await?;
    let after = on(from, count).await?;
    ensure!(
        after == format!("200 {}", (0..600).step_by(3).sum::<i32>() + 5 + 1 - 3),
        "acme is back on shard {from} with the writes made while held ({after})"
    );
    ensure!(
        on(to, count).await?.starts_with("0 "),
        "the undo removed acme from shard {to}"
    );
    ensure!(
        one(c, sum).await? == total.to_string(),
        "key-less sum after the undo"
    );
    no_leftovers(h).await?;
    let t = Instant::now();
    while move_slots(admin)
        .await?
        .iter()
        .any(|r| r[2] == id.to_string())
    {
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "SHOW SLOTS forgets the undone move's slots"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.batch_execute(
        "DELETE FROM mv_orders WHERE tenant = 'acme' AND id = 1000; \
         UPDATE mv_orders SET amount = amount - 1 WHERE tenant = 'acme' AND id = 0; \
         INSERT INTO mv_orders (tenant, id, amount) VALUES ('acme', 3, 3)",
    )
    .await
    .pgx("revert")?;
    eprintln!("rebalance: held tenant move undone with its writes (move {id})");
    Ok(())
}

/// After the negative control's verification failed (buckets 1024-2047 switched to shard 1
/// without the last writes), `abort` moves them back to shard 0: the map places them there
/// again, every row is on the shard the map says, once, and every row the writers were told
/// they inserted (and did not delete) is there. (Not its value: `v = v + 1` on a row the
/// target had stale applies to the stale value, a loss the undo cannot know of. A writer stops
/// at the first statement that found its row missing.)
pub(super) async fn undo_after_failed_verification(
    h: &Harness,
    config: &Path,
    acked: Vec<Result<Acked, String>>,
) -> TestResult {
    let (id, phase) = move_of(h, "mv").await?;
    ensure!(
        phase == MovePhase::Switched,
        "the unverified move is left switched ({phase:?})"
    );
    // The undo stops once caught up (as if shardctl died); the resumed undo must still know
    // that the switch it undoes had failed verification, or its own verification fails.
    let out = then_with(h, config, "abort", id, &["--unsafe-stop-after", "copying"]).await?;
    ensure!(
        out.status.code() == Some(2),
        "the undo stops: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, row) = latest_map(h).await?;
    ensure!(
        row.sharding
            .moves
            .iter()
            .any(|m| m.id == id && m.undo && m.undo_unverified && m.phase == MovePhase::Copying),
        "the stopped undo is in the map: {:?}",
        row.sharding.moves
    );
    then(h, config, "resume", id).await?;
    let (map, dist, moves) = current_map(h).await?;
    ensure!(moves == 0, "the undo left no move in the map");
    let placed = |b: u32| match &map.distributions[dist].strategy {
        pgshard::shardmap::Strategy::Hash { bucket_shard } => bucket_shard[b as usize],
        _ => usize::MAX,
    };
    ensure!(
        placed(1024) == 0 && placed(2047) == 0,
        "the undo put buckets 1024-2047 back on shard 0"
    );
    no_leftovers(h).await?;
    let mut seen: HashMap<i64, i32> = HashMap::new();
    for (s, port) in primaries(h).iter().enumerate() {
        let d = connect_port(*port, "app", APP_PW, "shop", "").await?;
        for r in d
            .query("SELECT id, v FROM mv_items", &[])
            .await
            .pgx("scan")?
        {
            let (k, v): (i64, i32) = (r.get(0), r.get(1));
            ensure!(seen.insert(k, v).is_none(), "id {k} is on both shards");
            let owner = map
                .locate(dist, &KeyValue::Int(k), None)
                .map_err(|e| e.to_string())?;
            ensure!(
                owner == Located::One(s),
                "id {k} is on shard {s}, the map says {owner:?}"
            );
        }
    }
    let (mut stopped, mut rows) = (0, 0);
    for a in acked {
        let a = a?;
        stopped += a.lost.is_some() as usize;
        for k in a.rows.keys() {
            ensure!(
                seen.contains_key(k),
                "acknowledged id {k} is missing after the undo"
            );
            rows += 1;
        }
    }
    ensure!(rows > 1000, "the writers acknowledged rows ({rows})");
    eprintln!("rebalance: negative control undone: all {rows} rows the writers were told of are there ({stopped} of 8 writers had met a lost row)");
    Ok(())
}

/// Tenant acme moves to `to` with `--hold`; the target's server then invalidates the reverse
/// slot (max_slot_wal_keep_size, lowered for the test, and WAL written past it and past the
/// topology's wal_keep_size). The move can
/// no longer be undone: abort refuses and says why, resume completes it.
pub(super) async fn held_slot_lost_then_resumed(
    h: &Harness,
    admin: &tokio_postgres::Client,
    config: &Path,
    to: usize,
) -> TestResult {
    let out = hold_acme(h, config, to).await?;
    ensure!(
        out.status.success(),
        "held tenant move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (id, _) = move_of(h, "mvt").await?;
    let reverse = format!("pgshard_back_{id}");
    let d = connect_port(h.primary(to).port, "app", APP_PW, "shop", "").await?;
    // ALTER SYSTEM runs outside any transaction block: one statement per call.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE IF NOT EXISTS wal_filler (x int)",
    ] {
        d.batch_execute(sql)
            .await
            .pgx("lower max_slot_wal_keep_size")?;
    }
    let status =
        format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{reverse}'");
    // The shard's replica streams without a slot: each checkpoint waits until it has flushed
    // the WAL written, or the checkpoint could strand it along with the move's slot.
    let behind =
        "SELECT count(*) FROM pg_stat_replication r WHERE r.flush_lsn < pg_current_wal_lsn() \
                  AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s \
                                  WHERE s.active_pid = r.pid AND s.slot_type = 'logical')";
    let mut lost = false;
    for _ in 0..20 {
        d.batch_execute(
            "INSERT INTO wal_filler SELECT generate_series(1, 1000); SELECT pg_switch_wal(); \
             INSERT INTO wal_filler SELECT generate_series(1, 1000); SELECT pg_switch_wal()",
        )
        .await
        .pgx("write WAL")?;
        let t = Instant::now();
        while one(&d, behind).await? != "0" {
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "the replica of shard {to} receives the filler WAL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d.batch_execute("CHECKPOINT").await.pgx("checkpoint")?;
        if one(&d, &status).await? == "lost" {
            lost = true;
            break;
        }
    }
    for sql in [
        "ALTER SYSTEM RESET max_slot_wal_keep_size",
        "SELECT pg_reload_conf()",
        "DROP TABLE wal_filler",
    ] {
        d.batch_execute(sql)
            .await
            .pgx("reset max_slot_wal_keep_size")?;
    }
    ensure!(lost, "the server invalidated {reverse}");
    // The router reports the lost slot (no retained WAL, wal_status lost).
    let t = Instant::now();
    while !move_slots(admin)
        .await?
        .iter()
        .any(|r| r[1] == reverse && r[5].is_empty() && r[6] == "lost")
    {
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "SHOW SLOTS reports {reverse} lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = then_with(h, config, "abort", id, &[]).await?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && said.contains("invalidated its reverse slot"),
        "abort of a move whose reverse slot is lost is refused, saying why: {said}"
    );
    let (_, _, moves) = current_map_of(h, "mvt").await?;
    ensure!(moves == 1, "the refused abort left the move in the map");
    then(h, config, "resume", id).await?;
    let (_, _, moves) = current_map_of(h, "mvt").await?;
    ensure!(moves == 0, "resume completed the move");
    no_leftovers(h).await?;
    eprintln!("rebalance: held move whose reverse slot was invalidated: abort refused, resume completed it (move {id})");
    Ok(())
}

/// COPY FROM STDIN places rows by the map it starts with, so a COPY reaching a fenced unit
/// waits for the fence to end like any other write to its source: tenant acme (on `from`) is
/// fenced by a move stopped there; a COPY of an acme row through the router on `port` is not
/// acknowledged while the fence holds, and after `abort` it lands on `from`, once (or, had the
/// wait outlasted the router's fence wait, it was refused with 40001 and left nothing). The row
/// is deleted again through `client`.
pub(super) async fn copy_waits_out_a_fence(
    h: &Harness,
    client: &tokio_postgres::Client,
    port: u16,
    config: &Path,
    from: usize,
) -> TestResult {
    let (dsn, cfg) = (dsn(h), config.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        shardctl_move(
            dsn,
            &cfg,
            "tenant:acme",
            1 - from,
            &["--unsafe-stop-after".to_string(), "fenced".to_string()],
        )
    })
    .await
    .ctx("shardctl")?;
    ensure!(
        out.status.code() == Some(4),
        "move stopped after fencing: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (id, phase) = move_of(h, "mvt").await?;
    ensure!(phase == MovePhase::Fenced, "acme is fenced ({phase:?})");
    let c = connect_port(port, "app", APP_PW, "shop", "").await?;
    let copy = tokio::spawn(async move {
        let sql = "COPY mv_orders (tenant, id, amount) FROM STDIN";
        copy_in(&c, sql, bytes::Bytes::from_static(b"acme\t2000\t7\n")).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        !copy.is_finished(),
        "a COPY into a fenced unit waits for the fence to end: {:?}",
        copy.await
    );
    then(h, config, "abort", id).await?;
    let copied = copy.await.ctx("copy task")?;
    let d = connect_port(h.primary(from).port, "app", APP_PW, "shop", "").await?;
    let on_from = one(&d, "SELECT count(*) FROM mv_orders WHERE id = 2000").await?;
    match copied {
        Ok(n) => ensure!(
            n == 1 && on_from == "1",
            "the COPY released by the abort copied {n} row(s); shard {from} holds {on_from}"
        ),
        Err(e) => ensure!(
            crate::harness::sqlstate(&e) == "40001" && on_from == "0",
            "a COPY given up on by the fence: {e:?}; shard {from} holds {on_from}"
        ),
    }
    let other = connect_port(h.primary(1 - from).port, "app", APP_PW, "shop", "").await?;
    ensure!(
        one(&other, "SELECT count(*) FROM mv_orders WHERE id = 2000").await? == "0",
        "the aborted move left nothing on shard {}",
        1 - from
    );
    // Through the router, so that `client`'s next reads see it (read-your-writes).
    client
        .batch_execute("DELETE FROM mv_orders WHERE tenant = 'acme' AND id = 2000")
        .await
        .pgx("cleanup")?;
    no_leftovers(h).await
}
