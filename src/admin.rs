//! The admin console: a virtual database (`psql -U admin pgshard`) answering SHOW and control
//! commands with PgBouncer's column names where one exists.

use crate::app::{client_state, App};
use crate::config::{split_host_port, PoolMode};
use crate::frontend::ClientIo;
use crate::health::NodeState;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Cursor, FrameBuf};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Name of the virtual database.
pub const ADMIN_DB: &str = "pgshard";

/// A result set of text columns.
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values.into_iter().map(Some).collect());
    }
    fn write(&self, out: &mut BytesMut, tag: &str) {
        messages::row_description(out, &self.columns);
        for r in &self.rows {
            messages::data_row(out, r);
        }
        messages::command_complete(out, tag);
    }
}

/// Serves one admin client until it leaves.
pub async fn run<S: ClientIo>(app: Arc<App>, mut s: S, mut rbuf: FrameBuf, pid: i32, secret: i32) {
    let mut out = BytesMut::new();
    for (k, v) in [
        ("server_version", "15.0 (pgshard)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        messages::parameter_status(&mut out, k.as_bytes(), v.as_bytes());
    }
    messages::backend_key_data(&mut out, pid, secret);
    messages::ready_for_query(&mut out, b'I');
    loop {
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        let frame = match rbuf.next_frame(1 << 20) {
            Ok(Some(f)) => f,
            Ok(None) => match rbuf.fill(&mut s).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(e) => {
                crate::frontend::fatal_and_close(&mut out, "08P01", &e.to_string());
                let _ = s.write_all(&out).await;
                return;
            }
        };
        match frame.tag {
            b'Q' => {
                let sql = Cursor::new(frame.body()).str().unwrap_or("").to_string();
                let stop = execute(&app, &sql, &mut out).await;
                messages::ready_for_query(&mut out, b'I');
                if stop {
                    let _ = s.write_all(&out).await;
                    return;
                }
            }
            b'X' => return,
            b'S' => {
                messages::error_response(
                    &mut out,
                    Severity::Error,
                    "0A000",
                    "the admin console supports only simple queries",
                    None,
                );
                messages::ready_for_query(&mut out, b'I');
            }
            _ => {}
        }
    }
}

/// Runs one admin command; returns true when the connection should close afterwards.
async fn execute(app: &App, sql: &str, out: &mut BytesMut) -> bool {
    let cmd: String = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let err = |out: &mut BytesMut, m: &str| {
        messages::error_response(out, Severity::Error, "42601", m, Some("try SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, SHOW CONFIG, SHOW SHARDS, SHOW SLOTS, SHOW ROUTE <statement>, SHOW PLAN_CACHE, SHOW VERSION, RELOAD, PAUSE, RESUME, RECONNECT, SHUTDOWN"))
    };
    if cmd.starts_with("show route ") {
        // The statement keeps its original case and spacing: only the command words are cut.
        let stmt = sql
            .trim()
            .splitn(3, char::is_whitespace)
            .nth(2)
            .unwrap_or("")
            .trim();
        show_route(app, stmt).write(out, "SHOW");
        return false;
    }
    match cmd.as_str() {
        "" => messages::empty_message(out, b'I'),
        "show pools" => show_pools(app).write(out, "SHOW"),
        "show slots" => show_slots(app).write(out, "SHOW"),
        "show clients" => show_clients(app).write(out, "SHOW"),
        "show servers" => show_servers(app).write(out, "SHOW"),
        "show stats" => show_stats(app).write(out, "SHOW"),
        "show config" => show_config(app).write(out, "SHOW"),
        "show shards" => show_shards(app).await.write(out, "SHOW"),
        "show plan_cache" => {
            let mut t = Table::new(&["cache", "hits", "misses", "entries", "hit_rate"]);
            for (name, (hits, misses), len) in [
                ("plans", app.plans.stats(), app.plans.len()),
                (
                    "move_rewrites",
                    app.shadow_texts.stats(),
                    app.shadow_texts.len(),
                ),
            ] {
                let rate = if hits + misses > 0 {
                    hits as f64 / (hits + misses) as f64
                } else {
                    0.0
                };
                t.row(vec![
                    name.to_string(),
                    hits.to_string(),
                    misses.to_string(),
                    len.to_string(),
                    format!("{rate:.4}"),
                ]);
            }
            t.write(out, "SHOW");
        }
        "show version" => {
            let mut t = Table::new(&["version"]);
            t.row(vec![format!("pgshard {}", env!("CARGO_PKG_VERSION"))]);
            t.write(out, "SHOW");
        }
        "reload" => match app.reload_from_file() {
            Ok(()) => messages::command_complete(out, "RELOAD"),
            Err(e) => messages::error_response(out, Severity::Error, "F0000", &e.to_string(), None),
        },
        "pause" => {
            app.paused.send_replace(true);
            // PAUSE returns once no server connection is in use, as in PgBouncer.
            while app
                .pools()
                .iter()
                .any(|p| p.metrics.servers_active.get() > 0)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            messages::command_complete(out, "PAUSE");
        }
        "resume" => {
            app.paused.send_replace(false);
            messages::command_complete(out, "RESUME");
        }
        "reconnect" => {
            for p in app.pools() {
                p.close_idle();
            }
            messages::command_complete(out, "RECONNECT");
        }
        "shutdown" => {
            app.shutdown.send_replace(true);
            messages::command_complete(out, "SHUTDOWN");
            return true;
        }
        _ => err(out, &format!("unknown admin command: {}", sql.trim())),
    }
    false
}

fn mode_name(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

fn show_pools(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "shard",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "server",
    ]);
    for p in app.pools() {
        let s = p.snapshot();
        t.row(vec![
            p.database.clone(),
            p.user.clone(),
            p.shard.to_string(),
            (s.cl_active - s.cl_waiting).max(0).to_string(),
            s.cl_waiting.to_string(),
            s.sv_active.to_string(),
            s.sv_idle.to_string(),
            "0".into(),
            "0".into(),
            s.sv_login.to_string(),
            s.maxwait.as_secs().to_string(),
            s.maxwait.subsec_micros().to_string(),
            mode_name(s.mode).into(),
            p.connect.addr(),
        ]);
    }
    t
}

fn show_clients(app: &App) -> Table {
    let mut t = Table::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "pid",
        "application_name",
    ]);
    for c in app.clients.all() {
        let state = match c.state.load(std::sync::atomic::Ordering::Relaxed) {
            client_state::ACTIVE => "active",
            client_state::WAITING => "waiting",
            _ => "idle",
        };
        t.row(vec![
            "C".into(),
            c.user.clone(),
            c.database.clone(),
            state.into(),
            c.addr.ip().to_string(),
            c.addr.port().to_string(),
            format!("{}s", c.connected.elapsed().as_secs()),
            c.pid.to_string(),
            c.application_name.clone(),
        ]);
    }
    t
}

fn show_servers(app: &App) -> Table {
    let mut t = Table::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "remote_pid",
        "client_pid",
    ]);
    for p in app.pools() {
        for (_, pid, _, _) in p.idle_servers() {
            t.row(vec![
                "S".into(),
                p.user.clone(),
                p.database.clone(),
                "idle".into(),
                p.connect.host.clone(),
                p.connect.port.to_string(),
                pid.to_string(),
                String::new(),
            ]);
        }
    }
    for c in app.clients.all() {
        if let Some(target) = *c.cancel.lock() {
            t.row(vec![
                "S".into(),
                c.user.clone(),
                c.database.clone(),
                "active".into(),
                target.addr.ip().to_string(),
                target.addr.port().to_string(),
                target.pid.to_string(),
                c.pid.to_string(),
            ]);
        }
    }
    t
}

fn show_stats(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "shard",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_wait_time",
        "total_errors",
    ]);
    for p in app.pools() {
        let m = &p.metrics;
        t.row(vec![
            p.database.clone(),
            p.user.clone(),
            p.shard.to_string(),
            m.transactions.get().to_string(),
            m.queries.get().to_string(),
            m.bytes_received.get().to_string(),
            m.bytes_sent.get().to_string(),
            ((m.transaction_time.get_sample_sum() * 1e6) as u64).to_string(),
            ((m.wait_time.get_sample_sum() * 1e6) as u64).to_string(),
            m.errors.get().to_string(),
        ]);
    }
    t
}

fn show_config(app: &App) -> Table {
    let cfg = app.config.load();
    let g = &cfg.general;
    let mut t = Table::new(&["key", "value"]);
    let d = |x: Duration| humantime::format_duration(x).to_string();
    for (k, v) in [
        ("listen", g.listen.to_string()),
        ("pool_mode", mode_name(g.pool_mode).to_string()),
        ("auth_type", format!("{:?}", g.auth_type)),
        ("default_pool_size", g.default_pool_size.to_string()),
        ("min_pool_size", g.min_pool_size.to_string()),
        ("max_client_conn", g.max_client_conn.to_string()),
        ("query_wait_timeout", d(g.query_wait_timeout)),
        ("server_lifetime", d(g.server_lifetime)),
        ("server_idle_timeout", d(g.server_idle_timeout)),
        ("idle_transaction_timeout", d(g.idle_transaction_timeout)),
        ("server_connect_timeout", d(g.server_connect_timeout)),
        (
            "server_connect_retries",
            g.server_connect_retries.to_string(),
        ),
        ("server_check_delay", d(g.server_check_delay)),
        ("max_message_size", g.max_message_size.to_string()),
        (
            "prepared_statements_cache_size",
            g.prepared_statements_cache_size.to_string(),
        ),
        ("shutdown_timeout", d(g.shutdown_timeout)),
        ("admin_users", g.admin_users.join(",")),
        (
            "metrics_listen",
            g.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
        ),
        ("tls", (g.tls_cert_file.is_some()).to_string()),
    ] {
        t.row(vec![k.to_string(), v]);
    }
    t
}

/// Where a statement would go and why (literal keys only; parameters show as unresolved).
fn show_route(app: &App, stmt: &str) -> Table {
    let map = app.shardmap.load_full();
    let plan = app.plans.plan(stmt, &map);
    let mut t = Table::new(&["shards", "kind", "route", "tables", "map_version", "note"]);
    let (shards, note) = match crate::router::route(&plan, &map, &crate::router::Params::NONE) {
        Ok(crate::router::Target::All) => (
            (0..map.shards)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
            String::new(),
        ),
        Ok(crate::router::Target::Some(v)) => (
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
            String::new(),
        ),
        Ok(crate::router::Target::One(s)) => (s.to_string(), String::new()),
        Err(e) => (
            String::new(),
            format!("refused ({}): {}", e.sqlstate, e.message),
        ),
    };
    t.row(vec![
        shards,
        format!("{:?}", plan.kind),
        format!("{:?}", plan.route),
        plan.tables.join(","),
        map.version.to_string(),
        note,
    ]);
    t
}

/// The replication slots moves made on the shards' primaries (checked every
/// `catalog.slot_check_interval`; empty without a catalog).
fn show_slots(app: &App) -> Table {
    let mut t = Table::new(&[
        "shard",
        "slot",
        "move",
        "direction",
        "active",
        "retained_bytes",
        "wal_status",
    ]);
    for s in app.catalog.slots.lock().iter() {
        let owner = s.owner();
        t.row(vec![
            s.shard.to_string(),
            s.slot.clone(),
            owner.map(|o| o.0.to_string()).unwrap_or_default(),
            owner.map(|o| o.1.to_string()).unwrap_or_default(),
            s.active.to_string(),
            s.retained_bytes.map(|b| b.to_string()).unwrap_or_default(),
            s.wal_status.clone(),
        ]);
    }
    t
}

async fn show_shards(app: &App) -> Table {
    let health = app.health.load_full();
    let map = app.shardmap.load_full();
    let mut t = Table::new(&[
        "shard",
        "role",
        "host",
        "port",
        "health",
        "state",
        "writer",
        "lsn",
        "lag_ms",
        "replica_floor",
        "below_floor",
    ]);
    let fmt_lsn = |lsn: u64| {
        if lsn == 0 {
            String::new()
        } else {
            format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
        }
    };
    for (i, s) in health.shards.iter().enumerate() {
        let writer = health.writer(i);
        let floor = map.replica_floor.get(i).copied().unwrap_or(0);
        for (n, node) in s.nodes.iter().enumerate() {
            let Some((host, port)) = split_host_port(&node.addr) else {
                continue;
            };
            let state = node.state();
            // Without replicas nothing checks the servers: probe them now.
            let up = match state {
                NodeState::Unknown => tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                .is_ok_and(|r| r.is_ok()),
                NodeState::Down => false,
                _ => true,
            };
            let lsn = node.lsn();
            t.row(vec![
                i.to_string(),
                if n == 0 { "primary" } else { "replica" }.into(),
                host,
                port.to_string(),
                if up { "up" } else { "down" }.into(),
                state.name().into(),
                (n == writer).to_string(),
                fmt_lsn(lsn),
                node.lag_us()
                    .map(|l| (l / 1000).to_string())
                    .unwrap_or_default(),
                fmt_lsn(floor),
                // Reads skip a replica that has not replayed a finished move's floor.
                (n != writer && lsn < floor).to_string(),
            ]);
        }
    }
    t
}
