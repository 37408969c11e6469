//! The checks behind `Health`: one task per shard asks each of its servers, every
//! `check_interval`, whether it is in recovery and where its WAL is.
//!
//! Lag is measured against the primary's own history rather than clocks: each round samples the
//! writer's WAL position first (time taken *before* asking), and a standby that has replayed
//! past a sample holds everything the primary had when that sample was taken. That time is the
//! standby's read fence; lag is how long ago it was (0 once the standby reached the newest
//! sample). Read-your-writes compares a client's commit time with the fence.

use super::{Health, NodeState};
use crate::app::App;
use crate::backend::{ConnectParams, ServerConn};
use crate::config::{split_host_port, Config};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Primary samples kept: at one per second, several minutes of history.
const SAMPLES: usize = 512;

/// Runs the checks for as long as the process lives, restarting them when the servers change.
pub fn spawn(app: Arc<App>) {
    tokio::spawn(async move {
        loop {
            let health = app.health.load_full();
            let tasks: Vec<_> = (0..health.shards.len())
                .map(|s| tokio::spawn(watch_shard(app.clone(), health.clone(), s)))
                .collect();
            while Arc::ptr_eq(&app.health.load(), &health) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for t in tasks {
                t.abort();
            }
        }
    });
}

async fn watch_shard(app: Arc<App>, health: Arc<Health>, shard: usize) {
    let n = health.shards[shard].nodes.len();
    let mut conns: Vec<Option<ServerConn>> = (0..n).map(|_| None).collect();
    let mut samples: VecDeque<Sample> = VecDeque::with_capacity(SAMPLES);
    loop {
        let cfg = app.config.load_full();
        let rc = &cfg.replicas;
        let writer = health.writer(shard);
        for node in std::iter::once(writer).chain((0..n).filter(|&i| i != writer)) {
            let Some(params) = check_params(&cfg, &health.shards[shard].nodes[node].addr) else {
                continue;
            };
            let before = health.shards[shard].nodes[node].state();
            let t = health.now_us();
            let r = tokio::time::timeout(rc.check_timeout, check(&mut conns[node], &params)).await;
            let state = match r {
                Ok(Ok((false, lsn, inserted))) => {
                    if node == writer {
                        if samples.len() == SAMPLES {
                            samples.pop_front();
                        }
                        samples.push_back(Sample {
                            t,
                            written: lsn,
                            inserted,
                        });
                    }
                    health.set(shard, node, NodeState::Primary, lsn, 0, t);
                    NodeState::Primary
                }
                Ok(Ok((true, lsn, _))) => {
                    let (lag, fence) = lag_and_fence(&samples, lsn, health.now_us());
                    health.set(shard, node, NodeState::Standby, lsn, lag, fence);
                    NodeState::Standby
                }
                Ok(Err(e)) => {
                    down(&health, shard, node, &mut conns, before, &e.to_string());
                    NodeState::Down
                }
                Err(_) => {
                    down(&health, shard, node, &mut conns, before, "check timed out");
                    NodeState::Down
                }
            };
            if state != before && state != NodeState::Down {
                tracing::info!(shard, server = %params.addr(), state = state.name(), "server state");
            }
        }
        if let Some(new) = health.follow_primary(shard) {
            let old = &health.shards[shard].nodes[writer].addr;
            tracing::warn!(shard, from = %old, to = %health.shards[shard].nodes[new].addr, "primary changed: writes now go to the promoted server");
            samples.clear();
            app.close_idle_on(shard, writer);
        }
        tokio::time::sleep(rc.check_interval).await;
    }
}

fn down(
    health: &Health,
    shard: usize,
    node: usize,
    conns: &mut [Option<ServerConn>],
    before: NodeState,
    why: &str,
) {
    conns[node] = None;
    let n = &health.shards[shard].nodes[node];
    health.set(shard, node, NodeState::Down, n.lsn(), u64::MAX, 0);
    if before != NodeState::Down {
        tracing::warn!(shard, server = %n.addr, error = why, "server check failed: no reads go there until it answers");
    }
}

/// One sample of the writer's WAL: the time taken before asking, and the positions it answered.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: u64,
    /// `pg_current_wal_lsn()`: written out, so a standby can reach it.
    written: u64,
    /// `pg_current_wal_insert_lsn()`: past every commit record made before `t`, including
    /// asynchronous commits not yet written out.
    inserted: u64,
}

/// (in recovery, WAL position, WAL insert position) of one server, reconnecting when needed;
/// a standby's positions are both its replay position.
async fn check(
    conn: &mut Option<ServerConn>,
    params: &ConnectParams,
) -> Result<(bool, u64, u64), crate::backend::BackendError> {
    if conn.is_none() {
        *conn = Some(ServerConn::connect(params, 0).await?);
    }
    let c = conn.as_mut().expect("connected");
    let rows = c
        .query_rows(
            "SELECT pg_is_in_recovery()::text, (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text",
            params.max_message_size,
        )
        .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            *conn = None;
            return Err(e);
        }
    };
    let row = rows.first();
    let in_recovery = row.and_then(|r| r.first()).and_then(|v| v.as_deref()) == Some("true");
    let lsn_at = |i: usize| {
        row.and_then(|r| r.get(i))
            .and_then(|v| v.as_deref())
            .and_then(super::parse_lsn)
            .unwrap_or(0)
    };
    Ok((in_recovery, lsn_at(1), lsn_at(2)))
}

/// (lag µs, fence µs) of a standby that replayed up to `lsn`, from the primary's samples.
/// Lag counts from the newest sample whose written position it reached. The fence is the newest
/// sample whose *insert* position it reached: under `synchronous_commit = off` a committed
/// transaction's commit record may not be written out yet when a sample is taken, so reaching
/// the written position would not prove the standby has it. A tail of WAL that an idle server
/// never writes out only holds the fence back: reads after a write then use the primary.
fn lag_and_fence(samples: &VecDeque<Sample>, lsn: u64, now: u64) -> (u64, u64) {
    let Some(newest) = samples.back() else {
        return (u64::MAX, 0);
    };
    let lag = if lsn >= newest.written {
        0
    } else {
        match samples.iter().rev().find(|s| s.written <= lsn) {
            Some(s) => now.saturating_sub(s.t),
            // Behind everything remembered: at least that far behind.
            None => now.saturating_sub(samples.front().map_or(0, |s| s.t)),
        }
    };
    let fence = samples
        .iter()
        .rev()
        .find(|s| s.inserted <= lsn)
        .map_or(0, |s| s.t);
    (lag, fence)
}

/// Login for checking the server at `addr`.
pub(crate) fn check_params(cfg: &Config, addr: &str) -> Option<ConnectParams> {
    let (host, port) = split_host_port(addr)?;
    let rc = &cfg.replicas;
    let (user, password) = match &rc.check_user {
        Some(name) => {
            let u = cfg.user(name)?;
            (u.name.clone(), crate::app::server_password(u))
        }
        None => cfg
            .users
            .iter()
            .find_map(|u| crate::app::server_password(u).map(|p| (u.name.clone(), Some(p))))?,
    };
    let database = rc
        .check_database
        .clone()
        .or_else(|| {
            cfg.databases
                .first()
                .map(|d| d.server_database.clone().unwrap_or_else(|| d.name.clone()))
        })
        .unwrap_or_else(|| "postgres".into());
    Some(ConnectParams {
        host,
        port,
        user,
        database,
        password,
        connect_timeout: rc.check_timeout,
        max_message_size: cfg.general.max_message_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(v: &[(u64, u64, u64)]) -> VecDeque<Sample> {
        v.iter()
            .map(|&(t, written, inserted)| Sample {
                t,
                written,
                inserted,
            })
            .collect()
    }

    #[test]
    fn fence_is_the_newest_primary_sample_the_standby_reached() {
        let s = samples(&[(100, 10, 10), (200, 20, 20), (300, 30, 30)]);
        assert_eq!(lag_and_fence(&s, 30, 350), (0, 300));
        assert_eq!(lag_and_fence(&s, 35, 350), (0, 300));
        assert_eq!(lag_and_fence(&s, 25, 350), (150, 200));
        assert_eq!(lag_and_fence(&s, 5, 350), (250, 0));
        assert_eq!(lag_and_fence(&VecDeque::new(), 5, 350), (u64::MAX, 0));
    }

    #[test]
    fn fence_needs_what_was_inserted_not_only_written() {
        // An asynchronous commit inserted up to 25 by t=200 but written out only to 20: a standby
        // at 20 is not lagging, yet it does not hold that commit.
        let s = samples(&[(100, 10, 10), (200, 20, 25), (300, 20, 25)]);
        assert_eq!(lag_and_fence(&s, 20, 350), (0, 100));
        assert_eq!(lag_and_fence(&s, 25, 350), (0, 300));
        // An idle server's unwritten tail holds the fence back, not the lag.
        let s = samples(&[(100, 10, 12), (200, 12, 14), (300, 14, 16)]);
        assert_eq!(lag_and_fence(&s, 14, 350), (0, 200));
    }
}
