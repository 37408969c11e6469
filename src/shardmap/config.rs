//! The `[sharding]` section of the config file: distributions (placement rules that co-located
//! tables share) and tables (sharded by a column of a distribution, or reference tables).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[sharding]`: how the databases marked `sharded = true` spread over the shards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardingConfig {
    /// Hash buckets (a power of two); hash and tenant placement go key → bucket → shard.
    #[serde(default = "d_buckets")]
    pub buckets: u32,
    /// What a statement touching only tables declared in neither `tables` list does.
    #[serde(default)]
    pub unknown_tables: UnknownTables,
    /// Shard that `unknown_tables = "default_shard"` sends them to.
    #[serde(default)]
    pub default_shard: usize,
    /// UPDATE/DELETE on a sharded table without its key: run on every shard, or refuse.
    #[serde(default = "d_true")]
    pub keyless_writes: bool,
    #[serde(default)]
    pub distributions: Vec<DistributionConfig>,
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Units in motion between shards; written by `shardctl move` into the catalog's maps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<MoveConfig>,
    /// How many of the config's shards the map uses (default: all); the rest wait for
    /// `shardctl add-shard`. Not part of a catalog map, which records its own shard count.
    #[serde(default, skip_serializing)]
    pub shards: Option<usize>,
    /// Shards being added (`shardctl add-shard`): they take writes to reference tables but
    /// serve no reads of them until their copy of those tables is complete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joining: Vec<usize>,
    /// Replicas of a shard serve reads only once they have replayed its WAL up to here: a move
    /// or add-shard that leaves the map wrote rows (copy, cleanup) they must not miss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_floor: Vec<ReplicaFloor>,
}

/// The WAL position a shard's replicas must have replayed before they serve reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaFloor {
    pub shard: usize,
    /// A `pg_lsn` text, e.g. `0/3000148`.
    pub lsn: String,
}

impl ShardingConfig {
    /// Raises `shard`'s replica floor to `lsn` (never lowers it).
    pub fn raise_replica_floor(&mut self, shard: usize, lsn: &str) {
        let parsed = crate::health::parse_lsn(lsn).unwrap_or(0);
        match self.replica_floor.iter_mut().find(|f| f.shard == shard) {
            Some(f) if crate::health::parse_lsn(&f.lsn).unwrap_or(0) < parsed => {
                f.lsn = lsn.to_string()
            }
            Some(_) => {}
            None => self.replica_floor.push(ReplicaFloor {
                shard,
                lsn: lsn.to_string(),
            }),
        }
    }
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            buckets: d_buckets(),
            unknown_tables: UnknownTables::default(),
            default_shard: 0,
            keyless_writes: true,
            distributions: Vec::new(),
            tables: Vec::new(),
            shards: None,
            joining: Vec::new(),
            replica_floor: Vec::new(),
            moves: Vec::new(),
        }
    }
}

/// Where statements on undeclared tables go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTables {
    /// Refused with an error naming the table (the default: no silent guess).
    #[default]
    Refuse,
    /// Sent to `default_shard`, as unsharded tables living there.
    DefaultShard,
}

/// A placement rule; tables naming the same distribution are co-located.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DistributionConfig {
    pub name: String,
    pub strategy: StrategyName,
    /// Type of the key: int2/int4/int8 (also smallint/integer/bigint), text/varchar, uuid.
    pub key_type: String,
    /// hash/tenant: explicit bucket ranges → shard, e.g. `[{ from = 0, to = 2047, shard = 0 }]`;
    /// default a contiguous equal split.
    #[serde(default)]
    pub bucket_map: Vec<BucketRange>,
    /// tenant: tenants with a shard of their own, `{ "acme" = 1 }`; others are hashed.
    #[serde(default)]
    pub tenants: BTreeMap<String, usize>,
    /// range: ordered, non-overlapping `[lo, hi)` ranges; a missing bound is unbounded.
    #[serde(default)]
    pub ranges: Vec<RangeConfig>,
    /// geo: region → shards (several shards are a group, hashed within by `hash_column`).
    #[serde(default)]
    pub regions: BTreeMap<String, Vec<usize>>,
    /// geo: region used for rows whose region is not listed.
    #[serde(default)]
    pub default_region: Option<String>,
}

/// Placement strategy of a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    Hash,
    Tenant,
    Range,
    Geo,
}

/// Buckets `from..=to` live on `shard`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BucketRange {
    pub from: u32,
    pub to: u32,
    pub shard: usize,
}

/// `[lo, hi)` → shard.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RangeConfig {
    #[serde(default)]
    pub lo: Option<Bound>,
    #[serde(default)]
    pub hi: Option<Bound>,
    pub shard: usize,
}

/// Keys `[lo, hi)`; a missing bound is unbounded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct KeyRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lo: Option<Bound>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hi: Option<Bound>,
}

/// A range bound as written in TOML: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Bound {
    Int(i64),
    Text(String),
}

/// A table: sharded by `column` under `distribution`, or a reference table copied everywhere.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `table` or `schema.table`, as PostgreSQL folds it (lower case unless quoted).
    pub name: String,
    #[serde(default)]
    pub distribution: Option<String>,
    #[serde(default)]
    pub column: Option<String>,
    /// geo: the column hashed to pick a shard inside a region's group.
    #[serde(default)]
    pub hash_column: Option<String>,
    #[serde(default)]
    pub reference: bool,
}

fn d_buckets() -> u32 {
    4096
}
fn d_true() -> bool {
    true
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    /// The catalog stores maps as TOML text: writing one and reading it back must not change it.
    #[test]
    fn sharding_config_round_trips_through_toml() {
        let text = r#"
buckets = 1024
unknown_tables = "default_shard"
[[distributions]]
name = "ids"
strategy = "hash"
key_type = "int8"
bucket_map = [{ from = 0, to = 99, shard = 1 }, { from = 100, to = 1023, shard = 0 }]
[[distributions]]
name = "r"
strategy = "range"
key_type = "text"
ranges = [{ hi = "m", shard = 0 }, { lo = "m", shard = 1 }]
[[distributions]]
name = "t"
strategy = "tenant"
key_type = "text"
tenants = { acme = 1 }
[[tables]]
name = "a"
distribution = "ids"
column = "id"
[[tables]]
name = "c"
reference = true
"#;
        let c: ShardingConfig = toml::from_str(text).unwrap();
        let again: ShardingConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(format!("{c:?}"), format!("{again:?}"));
    }
}

/// A unit in motion: one tenant, or sets of buckets, of a distribution going from `source` to
/// `target`. Exactly one of `tenant` and `buckets` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MoveConfig {
    /// The move's id in the catalog's `pgshard.moves`.
    pub id: u64,
    pub distribution: String,
    /// One key value: a tenant of a tenant distribution, or a region of a geo distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Inclusive bucket ranges `[from, to]`; for a region's share of its group (geo), the
    /// buckets of the tables' hash column that the share holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<[u32; 2]>,
    /// geo: set when the unit is a region's share on one shard of its group — how the hash
    /// columns are hashed in SQL ("int8" for integer columns, or "uuid").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_type: Option<String>,
    /// Keys `[lo, hi)` of a range distribution, within one of its ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<KeyRange>,
    pub source: usize,
    pub target: usize,
    pub phase: MovePhase,
    /// An undo: the unit goes back from the shard it switched to (`source` here) to the shard
    /// it came from, fed by the reverse slot rather than a copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo: bool,
    /// An undo of a switch that failed verification: the shards are known to differ (the
    /// target kept writes the source missed), so the undo's own verification reports the
    /// difference instead of failing. Kept in the map so a resumed undo knows it too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo_unverified: bool,
}

/// How far a move has gone, as far as routers are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Rows are being copied to the target: key-less reads there must not see them.
    Copying,
    /// New statements for the unit wait while the target catches up to the last write.
    Fenced,
    /// The unit is served by the target; its old rows on the source are hidden until deleted.
    Switched,
}
