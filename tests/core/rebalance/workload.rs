//! The workload of the move trials: writers and key-less readers through the routers, and
//! shardctl runs.

use super::dsn;
use crate::harness::{connect_port, copy_in, sqlstate, Context, Harness, PgContext, APP_PW};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What one writer knows was acknowledged: live ids with their value.
#[derive(Default)]
pub(super) struct Acked {
    pub(super) rows: HashMap<i64, i32>,
    pub(super) live: Vec<i64>,
    pub(super) ops: u64,
    pub(super) retried: u64,
    /// Why the writer stopped early: a statement on one of its live rows found none (`rows`
    /// holds what was acknowledged until then).
    pub(super) lost: Option<String>,
}

/// Inserts, updates and deletes its own rows until `stop`; every statement's result is checked
/// (an UPDATE or DELETE of a live row must find it on the shard the router picks).
pub(super) async fn writer(
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
            // COPY FROM STDIN places its rows by key like an INSERT, and waits out a fence the
            // same way: a row copied to the source during the switch would be lost.
            6 => {
                let id = w * 10_000_000 + n;
                copy_in(
                    &c,
                    &format!("COPY {table} (id, v, note) FROM STDIN"),
                    format!("{id}\t0\tc{w}\n").into(),
                )
                .await
                .map(|k| (k, Some((id, 0))))
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
                if k != 1 {
                    a.lost = Some(format!("writer {w}: statement on id {id} touched {k} rows"));
                    break;
                }
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

/// The seed rows' key-less writes: every `id % 100 = 0` row of ids 1-4000 gets this note.
pub(super) const NOTED: &str = "id <= 4000 AND id % 100 = 0";

/// What a reader saw.
pub(super) struct Reads {
    /// Reads (and key-less writes) answered while the move ran, all of them right.
    pub(super) during: u64,
    /// The note its last acknowledged key-less UPDATE gave the `NOTED` rows.
    pub(super) last_note: Option<String>,
}

/// Key-less reads of the seed rows (ids 1-4000, which no writer touches) until `stop`, through
/// the simple and the extended protocol, with a scatter merge and a key list over both shards
/// too: while the unit's rows are on two shards every answer must still count each row once.
/// With `keyless_writes`, also UPDATEs without the key of 40 seed rows, each of which must
/// report 40 rows (the unit's extra copy left alone).
pub(super) async fn reader(
    port: u16,
    table: &'static str,
    catalog: String,
    stop: Arc<AtomicBool>,
    moving: Arc<AtomicBool>,
    keyless_writes: bool,
) -> Result<Reads, String> {
    let c = connect_port(port, "app", APP_PW, "shop", "").await?;
    let count = c
        .prepare(&format!(
            "SELECT count(*), sum(v), min(inet_server_port()), max(inet_server_port()) FROM {table} WHERE id <= $1"
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
    let in_list: Vec<String> = (1..=40).map(|i| (i * 97).to_string()).collect();
    let mut last_note = None;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if n % 5 == 4 {
            if keyless_writes {
                let note = format!("r{port}-{n}");
                match c
                    .execute(
                        &format!("UPDATE {table} SET note = $1 WHERE {NOTED}"),
                        &[&note],
                    )
                    .await
                {
                    Ok(40) => last_note = Some(note),
                    Ok(k) => {
                        return Err(format!(
                            "key-less UPDATE during a move touched {k} rows, not 40"
                        ))
                    }
                    // Not acknowledged: some rows may have the note, the next UPDATE overwrites it.
                    Err(e) if sqlstate(&e) == "40001" => {}
                    Err(e) => return Err(format!("key-less UPDATE during a move: {e:?}")),
                }
            }
            continue;
        }
        // Outside a transaction: on primaries while the table is in motion, on replicas once
        // they have replayed past the map's floor for the shard.
        let form = n % 5;
        let got = match form {
            3 => c
                .simple_query(&format!(
                    "SELECT count(*) FROM {table} WHERE id IN ({})",
                    in_list.join(", ")
                ))
                .await
                .map(rows),
            0 => c
                .query_one(&count, &[&4000i64])
                .await
                .map(|r| {
                    format!(
                        "{} {} {:?} {:?}",
                        r.get::<_, i64>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, Option<i32>>(2),
                        r.get::<_, Option<i32>>(3)
                    )
                }),
            1 => c
                .simple_query(&format!(
                    "SELECT count(*), sum(v), min(inet_server_port()), max(inet_server_port()) FROM {table} WHERE id <= 4000"
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
        let want = match form {
            2 => "4000 3999",
            3 => "40",
            _ => "4000 0",
        };
        match got {
            // Past the answer: the lowest and highest port of the servers that gave it.
            Ok(g) if !g.starts_with(&format!("{want} ")) && g != want => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() % 60_000);
                let (held, history) = super::checks::what_servers_hold(port, table, &catalog).await;
                return Err(format!("key-less read during a move (form {}, at second {:.3} of the minute): got {g}, want {want}; servers (router's view | what they hold) {held}; maps {history}", form, now as f64 / 1000.0));
            }
            Ok(_) => {}
            Err(e) if sqlstate(&e) == "40001" => {}
            Err(e) => return Err(format!("key-less read during a move: {e:?}")),
        }
        if moving.load(Ordering::Relaxed) {
            during += 1;
        }
    }
    Ok(Reads { during, last_note })
}

pub(super) fn shardctl_move(
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
    if let Some(r) = buckets.strip_prefix("region:") {
        args[3..].clone_from_slice(&[
            "--distribution".into(),
            "mvg".into(),
            "--region".into(),
            r.into(),
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
pub(super) fn shardctl_then(
    dsn: String,
    config: &std::path::Path,
    verb: &str,
    id: u64,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "--catalog".to_string(),
        dsn,
        verb.into(),
        id.to_string(),
        "--config".into(),
        config.display().to_string(),
        "--database".into(),
        "shop".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(&args)
        .output()
        .expect("run shardctl")
}

/// What a move under writers produced.
pub(super) struct Run {
    pub(super) out: std::process::Output,
    /// The `abort`/`resume` that followed, if asked.
    pub(super) then: Option<std::process::Output>,
    pub(super) acked: Vec<Result<Acked, String>>,
    /// Writes acknowledged while shardctl ran.
    pub(super) during: u64,
    /// Key-less reads answered while shardctl ran (all of them right).
    pub(super) reads: u64,
    /// The note the last acknowledged key-less UPDATE wrote (see `NOTED`).
    pub(super) last_note: Option<String>,
}

/// The table and distribution a unit as `shardctl_move` takes it belongs to.
pub(super) fn table_of(unit: &str) -> (&'static str, &'static str) {
    if unit.starts_with("range:") {
        ("mv_ranges", "mvr")
    } else {
        ("mv_items", "mv")
    }
}

/// Runs `shardctl move` (then, if asked, `shardctl abort|resume` of the move it left in flight)
/// while 8 writers (4 per router) work.
pub(super) async fn move_with_writers(
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
    let readers: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            // One reader writes: two writing concurrently could leave the rows of different
            // shards with different last notes (their commits interleave per shard).
            tokio::spawn(reader(
                p,
                table,
                dsn(h),
                stop.clone(),
                moving.clone(),
                i == 0,
            ))
        })
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
            let (_, map) = super::checks::latest_map(h).await?;
            let id = map
                .sharding
                .moves
                .iter()
                .find(|m| m.distribution == dist_name)
                .ok_or("no move left in flight")?
                .id;
            let (d, cfg, verb) = (dsn(h), config.to_path_buf(), verb.to_string());
            Some(
                tokio::task::spawn_blocking(move || shardctl_then(d, &cfg, &verb, id, &[]))
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
    let (mut reads, mut last_note) = (0, None);
    for r in readers {
        let got = r.await.ctx("reader task")?.map_err(|e| {
            format!(
                "{e}\nshardctl said: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        reads += got.during;
        last_note = last_note.or(got.last_note);
    }
    Ok(Run {
        out,
        then,
        acked,
        during: during.load(Ordering::Relaxed),
        reads,
        last_note,
    })
}

/// Adds what the writers acknowledged to the ground truth (all must have succeeded).
pub(super) fn record(
    truth: &mut HashMap<i64, i32>,
    acked: Vec<Result<Acked, String>>,
) -> Result<(u64, u64), String> {
    let (mut ops, mut retried) = (0, 0);
    for a in acked {
        let a = a?;
        if let Some(lost) = a.lost {
            return Err(lost);
        }
        truth.extend(a.rows.iter().map(|(k, v)| (*k, *v)));
        ops += a.ops;
        retried += a.retried;
    }
    Ok((ops, retried))
}
