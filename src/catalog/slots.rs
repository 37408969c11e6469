//! Watching the replication slots moves make on shard primaries. A slot keeps every WAL segment
//! its consumer has not confirmed: a held move's reverse slot (nobody consumes it until the move
//! is resumed or undone) or a slot a killed shardctl left behind grows the server's pg_wal until
//! the disk fills. Routers that follow a catalog report them (`SHOW SLOTS`, the
//! `pgshard_move_slot_retained_bytes` gauge) and warn once a slot retains more than
//! `catalog.slot_wal_warning_mb`.

use crate::app::App;
use crate::backend::ServerConn;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// One move slot on a shard's primary, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub shard: usize,
    pub slot: String,
    /// WAL the slot holds back: the primary's position minus the slot's restart LSN (None once
    /// the server invalidated the slot).
    pub retained_bytes: Option<u64>,
    /// `pg_replication_slots.wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: String,
    /// A walsender streams from it now (a move catching up).
    pub active: bool,
}

impl SlotInfo {
    /// The move the slot belongs to and which way it replicates, from its name
    /// (`pgshard_move_<id>` forward, `pgshard_back_<id>` reverse).
    pub fn owner(&self) -> Option<(u64, &'static str)> {
        let (kind, id) = if let Some(id) = self.slot.strip_prefix("pgshard_move_") {
            ("forward", id)
        } else {
            ("reverse", self.slot.strip_prefix("pgshard_back_")?)
        };
        Some((id.parse().ok()?, kind))
    }
}

const SLOTS_SQL: &str = "SELECT slot_name::text, \
     pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8::text, \
     coalesce(wal_status, ''), active::text \
     FROM pg_catalog.pg_replication_slots \
     WHERE slot_name LIKE 'pgshard\\_move\\_%' OR slot_name LIKE 'pgshard\\_back\\_%' \
     ORDER BY slot_name";

/// Checks every shard's primary each `interval` for as long as the process lives.
pub fn spawn(app: Arc<App>, interval: Duration, warn_bytes: u64) {
    tokio::spawn(async move {
        let mut conns: Vec<Option<(String, ServerConn)>> = Vec::new();
        let mut warned: HashSet<(usize, String)> = HashSet::new();
        loop {
            let found = round(&app, &mut conns).await;
            report(&found, warn_bytes, &mut warned);
            crate::metrics::Metrics::global().set_move_slots(&found);
            *app.catalog.slots.lock() = found;
            tokio::time::sleep(interval).await;
        }
    });
}

/// The move slots of every shard's primary that answers.
async fn round(app: &App, conns: &mut Vec<Option<(String, ServerConn)>>) -> Vec<SlotInfo> {
    let cfg = app.config.load_full();
    let health = app.health.load_full();
    conns.resize_with(health.shards.len(), || None);
    let mut found = Vec::new();
    for (shard, conn) in conns.iter_mut().enumerate() {
        let addr = &health.shards[shard].nodes[health.writer(shard)].addr;
        // A promoted replica is the shard's primary now: the old connection is of no use.
        if conn.as_ref().is_some_and(|(a, _)| a != addr) {
            *conn = None;
        }
        let Some(params) = crate::health::monitor::check_params(&cfg, addr) else {
            continue;
        };
        let query = async {
            if conn.is_none() {
                *conn = Some((addr.clone(), ServerConn::connect(&params, 0).await?));
            }
            let (_, c) = conn.as_mut().expect("connected");
            c.query_rows(SLOTS_SQL, params.max_message_size).await
        };
        match tokio::time::timeout(params.connect_timeout * 2, query).await {
            Ok(Ok(rows)) => found.extend(rows.into_iter().map(|r| parse(shard, r))),
            Ok(Err(e)) => {
                tracing::debug!(shard, error = %e, "move slot check failed");
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
    found
}

fn parse(shard: usize, row: Vec<Option<String>>) -> SlotInfo {
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    SlotInfo {
        shard,
        slot: col(0),
        retained_bytes: col(1).parse::<i64>().ok().map(|b| b.max(0) as u64),
        wal_status: col(2),
        active: col(3) == "true",
    }
}

/// Logs a slot once when it crosses `warn_bytes` or is lost (and again if it recovers and
/// crosses anew).
fn report(found: &[SlotInfo], warn_bytes: u64, warned: &mut HashSet<(usize, String)>) {
    warned.retain(|(shard, slot)| {
        found
            .iter()
            .any(|s| s.shard == *shard && &s.slot == slot && over(s, warn_bytes))
    });
    for s in found.iter().filter(|s| over(s, warn_bytes)) {
        if !warned.insert((s.shard, s.slot.clone())) {
            continue;
        }
        let hint = match s.owner() {
            Some((id, _)) => {
                format!("finish the move (shardctl resume {id}) or undo it (shardctl abort {id})")
            }
            None => "drop the slot if no move owns it".into(),
        };
        match s.retained_bytes {
            Some(b) => tracing::warn!(
                shard = s.shard,
                slot = %s.slot,
                retained_mb = b >> 20,
                wal_status = %s.wal_status,
                "a move's replication slot retains WAL on the shard's primary: {hint}; max_slot_wal_keep_size bounds it"
            ),
            None => tracing::error!(
                shard = s.shard,
                slot = %s.slot,
                "a move's replication slot was invalidated (wal_status lost): its changes are gone; {hint}"
            ),
        }
    }
}

fn over(s: &SlotInfo, warn_bytes: u64) -> bool {
    s.retained_bytes.is_none_or(|b| b > warn_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, retained: Option<u64>) -> SlotInfo {
        SlotInfo {
            shard: 1,
            slot: name.into(),
            retained_bytes: retained,
            wal_status: "reserved".into(),
            active: false,
        }
    }

    #[test]
    fn owners_come_from_slot_names() {
        assert_eq!(slot("pgshard_move_12", None).owner(), Some((12, "forward")));
        assert_eq!(slot("pgshard_back_7", None).owner(), Some((7, "reverse")));
        assert_eq!(slot("pgshard_back_x", None).owner(), None);
        assert_eq!(slot("other", None).owner(), None);
    }

    #[test]
    fn a_slot_is_reported_once_per_crossing() {
        let mut warned = HashSet::new();
        let big = [slot("pgshard_back_7", Some(2 << 20))];
        report(&big, 1 << 20, &mut warned);
        assert_eq!(warned.len(), 1);
        report(&big, 1 << 20, &mut warned);
        assert_eq!(warned.len(), 1);
        // Consumed (below the threshold): forgotten, so a new crossing warns again.
        report(&[slot("pgshard_back_7", Some(10))], 1 << 20, &mut warned);
        assert!(warned.is_empty());
        // A lost slot is always over.
        report(&[slot("pgshard_move_3", None)], 1 << 20, &mut warned);
        assert_eq!(warned.len(), 1);
    }

    #[test]
    fn rows_parse_with_missing_values() {
        let s = parse(
            2,
            vec![
                Some("pgshard_move_4".into()),
                None,
                Some("lost".into()),
                Some("false".into()),
            ],
        );
        assert_eq!((s.shard, s.retained_bytes, s.active), (2, None, false));
        assert_eq!(s.wal_status, "lost");
    }
}
