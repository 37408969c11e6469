//! Which server of each shard takes writes, which replicas may take reads, and how far behind
//! they are. The monitor (`monitor.rs`) writes these atomics; sessions read them lock-free.
//!
//! Roles are observed, not configured: a server that reports `pg_is_in_recovery() = false` is
//! a primary. The configured primary is the writer until a check shows it down or in recovery
//! while another server of the shard reports itself primary — then that one takes the writes.
//! See docs/replicas.md.

pub mod config;
pub mod monitor;

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

/// What the last check of a server found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeState {
    /// Not checked yet: takes writes if it is the configured primary, no reads.
    Unknown = 0,
    /// Answers and is a primary.
    Primary = 1,
    /// Answers and is a standby.
    Standby = 2,
    /// The last check failed (refused, timed out, or a checkout to it failed).
    Down = 3,
}

impl NodeState {
    fn from_u8(v: u8) -> NodeState {
        match v {
            1 => NodeState::Primary,
            2 => NodeState::Standby,
            3 => NodeState::Down,
            _ => NodeState::Unknown,
        }
    }

    /// Name for SHOW REPLICAS.
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Unknown => "unknown",
            NodeState::Primary => "primary",
            NodeState::Standby => "standby",
            NodeState::Down => "down",
        }
    }
}

/// One server of a shard.
pub struct Node {
    /// `host:port` as configured.
    pub addr: String,
    state: AtomicU8,
    /// WAL position: replayed (standby) or written (primary), as a 64-bit LSN.
    lsn: AtomicU64,
    /// Replay lag in µs (standbys); u64::MAX when unknown.
    lag_us: AtomicU64,
    /// The replica holds everything its primary had at this time (µs since `Health::epoch`).
    fence_us: AtomicU64,
    /// Connections lent from this server's pools that are in use now (least-busy choice).
    pub busy: AtomicUsize,
}

impl Node {
    fn new(addr: &str) -> Node {
        Node {
            addr: addr.to_string(),
            state: AtomicU8::new(NodeState::Unknown as u8),
            lsn: AtomicU64::new(0),
            lag_us: AtomicU64::new(u64::MAX),
            fence_us: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    /// What the last check found.
    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Last seen WAL position.
    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }

    /// Replay lag in µs, None when unknown.
    pub fn lag_us(&self) -> Option<u64> {
        Some(self.lag_us.load(Ordering::Relaxed)).filter(|&l| l != u64::MAX)
    }
}

/// The servers of one shard and which of them takes writes.
pub struct ShardNodes {
    /// Index 0 is the configured primary, then the configured replicas in order.
    pub nodes: Vec<Node>,
    writer: AtomicUsize,
    next: AtomicUsize,
}

/// Roles, health and lag of every server.
pub struct Health {
    pub shards: Vec<ShardNodes>,
    epoch: Instant,
}

/// The conditions a replica must meet to take a read.
#[derive(Debug, Clone, Copy)]
pub struct ReadNeeds {
    /// Largest acceptable lag in µs.
    pub max_lag_us: u64,
    /// The replica must hold everything committed up to this time (µs since the epoch; 0 = any).
    pub fence_us: u64,
    /// The replica must have replayed up to this WAL position (the map's replica floor; 0 = any).
    pub min_lsn: u64,
}

impl Health {
    /// State for the configured shards: every server unknown, the configured primaries write.
    pub fn new(shards: &[crate::config::Shard]) -> Health {
        Health {
            shards: shards
                .iter()
                .map(|s| ShardNodes {
                    nodes: std::iter::once(&s.primary)
                        .chain(&s.replicas)
                        .map(|a| Node::new(a))
                        .collect(),
                    writer: AtomicUsize::new(0),
                    next: AtomicUsize::new(0),
                })
                .collect(),
            epoch: Instant::now(),
        }
    }

    /// True when built for exactly these server addresses.
    pub fn same_servers(&self, shards: &[crate::config::Shard]) -> bool {
        self.shards.len() == shards.len()
            && self.shards.iter().zip(shards).all(|(h, s)| {
                h.nodes.len() == 1 + s.replicas.len()
                    && std::iter::once(&s.primary)
                        .chain(&s.replicas)
                        .zip(&h.nodes)
                        .all(|(a, n)| *a == n.addr)
            })
    }

    /// Microseconds since this state was created: the clock of read fences.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The server of `shard` that takes writes.
    pub fn writer(&self, shard: usize) -> usize {
        self.shards
            .get(shard)
            .map_or(0, |s| s.writer.load(Ordering::Acquire))
    }

    /// A replica of `shard` fit for a read: up, a standby, lag and fence within `needs`; the least
    /// busy, ties taken in turn. None sends the read to the writer.
    pub fn reader(&self, shard: usize, needs: ReadNeeds) -> Option<usize> {
        let s = self.shards.get(shard)?;
        if s.nodes.len() < 2 {
            return None;
        }
        let writer = s.writer.load(Ordering::Acquire);
        let start = s.next.fetch_add(1, Ordering::Relaxed);
        let n = s.nodes.len();
        let mut best: Option<(usize, usize)> = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let node = &s.nodes[idx];
            if idx == writer || node.state() != NodeState::Standby {
                continue;
            }
            if node.lag_us.load(Ordering::Relaxed) > needs.max_lag_us
                || node.fence_us.load(Ordering::Acquire) < needs.fence_us
                || node.lsn() < needs.min_lsn
            {
                continue;
            }
            let busy = node.busy.load(Ordering::Relaxed);
            if best.is_none_or(|(_, b)| busy < b) {
                best = Some((idx, busy));
            }
        }
        best.map(|(idx, _)| idx)
    }

    /// A checkout to this server failed: no more reads until a check finds it up again.
    pub fn mark_down(&self, shard: usize, node: usize) {
        if let Some(n) = self.shards.get(shard).and_then(|s| s.nodes.get(node)) {
            n.state.store(NodeState::Down as u8, Ordering::Release);
        }
    }

    fn set(
        &self,
        shard: usize,
        node: usize,
        state: NodeState,
        lsn: u64,
        lag_us: u64,
        fence_us: u64,
    ) {
        let n = &self.shards[shard].nodes[node];
        n.lsn.store(lsn, Ordering::Relaxed);
        n.lag_us.store(lag_us, Ordering::Relaxed);
        n.fence_us.store(fence_us, Ordering::Release);
        n.state.store(state as u8, Ordering::Release);
    }

    /// Moves the writes of `shard` to the server that reports itself primary when the current
    /// writer is down or in recovery; returns the new writer if it changed.
    fn follow_primary(&self, shard: usize) -> Option<usize> {
        let s = &self.shards[shard];
        let w = s.writer.load(Ordering::Acquire);
        if matches!(s.nodes[w].state(), NodeState::Primary | NodeState::Unknown) {
            return None;
        }
        let new =
            (0..s.nodes.len()).find(|&i| i != w && s.nodes[i].state() == NodeState::Primary)?;
        s.writer.store(new, Ordering::Release);
        Some(new)
    }
}

/// Parses a `pg_lsn` text (`16/B374D848`) into its 64-bit position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Shard;

    fn health() -> Health {
        Health::new(&[Shard {
            primary: "p:1".into(),
            replicas: vec!["r1:1".into(), "r2:1".into()],
        }])
    }

    #[test]
    fn lsn_text_parses() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("11"), None);
    }

    #[test]
    fn readers_must_be_fresh_standbys_least_busy_first() {
        let h = health();
        let any = ReadNeeds {
            max_lag_us: 1_000_000,
            fence_us: 0,
            min_lsn: 0,
        };
        assert_eq!(h.reader(0, any), None, "unchecked replicas take no reads");
        h.set(0, 0, NodeState::Primary, 100, 0, 0);
        h.set(0, 1, NodeState::Standby, 100, 0, 50);
        h.set(0, 2, NodeState::Standby, 90, 2_000_000, 10);
        assert_eq!(h.reader(0, any), Some(1), "the lagging replica is skipped");
        h.set(0, 2, NodeState::Standby, 100, 0, 50);
        h.shards[0].nodes[1].busy.store(3, Ordering::Relaxed);
        assert_eq!(h.reader(0, any), Some(2), "least busy");
        h.shards[0].nodes[2].busy.store(3, Ordering::Relaxed);
        let picks: std::collections::HashSet<_> = (0..4).filter_map(|_| h.reader(0, any)).collect();
        assert_eq!(picks.len(), 2, "ties are taken in turn");
        assert_eq!(
            h.reader(
                0,
                ReadNeeds {
                    fence_us: 60,
                    ..any
                }
            ),
            None,
            "no replica holds the client's last write"
        );
        h.set(0, 1, NodeState::Standby, 95, 0, 50);
        assert_eq!(
            h.reader(
                0,
                ReadNeeds {
                    min_lsn: 100,
                    ..any
                }
            ),
            Some(2),
            "a replica short of the map's floor is skipped"
        );
        h.set(0, 2, NodeState::Standby, 99, 0, 50);
        assert_eq!(
            h.reader(
                0,
                ReadNeeds {
                    min_lsn: 100,
                    ..any
                }
            ),
            None
        );
        h.mark_down(0, 1);
        h.mark_down(0, 2);
        assert_eq!(h.reader(0, any), None);
    }

    #[test]
    fn writes_follow_a_promoted_replica() {
        let h = health();
        h.set(0, 0, NodeState::Primary, 1, 0, 0);
        h.set(0, 1, NodeState::Standby, 1, 0, 0);
        assert_eq!(h.follow_primary(0), None);
        h.set(0, 0, NodeState::Down, 1, 0, 0);
        assert_eq!(
            h.follow_primary(0),
            None,
            "no other primary yet: keep trying the old one"
        );
        h.set(0, 1, NodeState::Primary, 2, 0, 0);
        assert_eq!(h.follow_primary(0), Some(1));
        assert_eq!(h.writer(0), 1);
        // The old primary comes back as a standby of the new one: it now takes reads.
        h.set(0, 0, NodeState::Standby, 2, 0, 5);
        assert_eq!(h.follow_primary(0), None);
        assert_eq!(
            h.reader(
                0,
                ReadNeeds {
                    max_lag_us: 10,
                    fence_us: 0,
                    min_lsn: 0,
                }
            ),
            Some(0)
        );
    }
}
