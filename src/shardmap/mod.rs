//! The shard map: which shard holds a key of each sharded table. Built once per config (or, with
//! rebalancing, per catalog version) and read from an immutable snapshot on the hot path.

pub mod config;
pub mod motion;

use crate::pghash::{self, KeyError, KeyValue};
use config::{Bound, ShardingConfig, StrategyName, UnknownTables};
use std::collections::HashMap;

/// Index of a shard in `[[shards]]`.
pub type ShardId = usize;

/// Why a shard map could not be built or a key not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("sharding: {0}")]
    Invalid(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("sharding key {value} of distribution '{dist}' falls in no configured range")]
    NoRange { dist: String, value: String },
    #[error("sharding key of distribution '{dist}' is NULL: NULL keys have no shard")]
    NullKey { dist: String },
}

/// A key value owned by the map (tenant directory entries, range bounds).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnedKey {
    Int(i64),
    Text(Vec<u8>),
    Uuid([u8; 16]),
}

impl OwnedKey {
    fn of(k: &KeyValue) -> OwnedKey {
        match *k {
            KeyValue::Int(v) => OwnedKey::Int(v),
            KeyValue::Text(t) => OwnedKey::Text(t.to_vec()),
            KeyValue::Uuid(u) => OwnedKey::Uuid(u),
        }
    }
}

/// How a distribution places keys.
#[derive(Debug, Clone)]
pub enum Strategy {
    /// key → bucket → `bucket_shard[bucket]`.
    Hash { bucket_shard: Vec<ShardId> },
    /// Listed tenants on their own shard; the others hashed like `Hash`.
    Tenant {
        directory: HashMap<OwnedKey, ShardId>,
        bucket_shard: Vec<ShardId>,
    },
    /// Sorted, non-overlapping `[lo, hi)` ranges.
    Range {
        ranges: Vec<(Option<OwnedKey>, Option<OwnedKey>, ShardId)>,
    },
    /// region → group of shards; unlisted regions use the default region's group.
    Geo {
        regions: HashMap<Vec<u8>, Vec<ShardId>>,
        default: Option<Vec<ShardId>>,
        /// The default region's name (its rows and unlisted regions' rows share its shards).
        default_region: Option<Vec<u8>>,
    },
}

/// A named placement rule shared by co-located tables.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub name: String,
    /// Key type as the config names it (passed to pghash's parsers).
    pub key_type: String,
    pub strategy: Strategy,
}

/// Where a table's rows live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRule {
    /// Rows placed by `column` under distribution `dist` (geo: `hash_column` picks within a group).
    Sharded {
        dist: usize,
        column: String,
        hash_column: Option<String>,
    },
    /// The same rows on every shard.
    Reference,
}

/// Where a key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    One(ShardId),
    /// A geo group whose member cannot be told without the hash column's value.
    Group(Vec<ShardId>),
}

/// An immutable, versioned snapshot of the sharding configuration.
#[derive(Debug, Clone)]
pub struct ShardMap {
    pub version: u64,
    pub shards: usize,
    pub buckets: u32,
    pub unknown_tables: UnknownTables,
    pub default_shard: ShardId,
    pub keyless_writes: bool,
    pub distributions: Vec<Distribution>,
    tables: HashMap<String, TableRule>,
    /// Units in motion (empty unless a move runs): checked only when non-empty.
    pub motions: Vec<motion::Motion>,
    /// Shards that may serve reads of reference tables and table-less statements (all but
    /// those still joining).
    pub readable: Vec<ShardId>,
    /// Per shard, the WAL position (64-bit LSN) its replicas must have replayed to serve reads.
    pub replica_floor: Vec<u64>,
}

impl ShardMap {
    /// Builds and validates the map for `shards` shards.
    pub fn build(cfg: &ShardingConfig, shards: usize, version: u64) -> Result<ShardMap, MapError> {
        let bad = |m: String| Err(MapError::Invalid(m));
        if !cfg.buckets.is_power_of_two() || cfg.buckets > 1 << 20 {
            return bad(format!(
                "buckets = {} must be a power of two up to 1048576",
                cfg.buckets
            ));
        }
        if cfg.default_shard >= shards {
            return bad(format!(
                "default_shard = {} but there are {shards} shards",
                cfg.default_shard
            ));
        }
        let shard_ok = |what: &str, s: usize| {
            if s < shards {
                Ok(s)
            } else {
                Err(MapError::Invalid(format!(
                    "{what}: shard {s} does not exist ({shards} shards)"
                )))
            }
        };
        let mut distributions = Vec::new();
        let mut by_name = HashMap::new();
        for d in &cfg.distributions {
            let ctx = format!("distribution '{}'", d.name);
            pghash::parse_key(&d.key_type, b"0").or_else(|e| match e {
                KeyError::UnsupportedType(_) => Err(MapError::Invalid(format!("{ctx}: {e}"))),
                _ => Ok(KeyValue::Int(0)),
            })?;
            let uses = |field: &str, used: bool, allowed: bool| {
                if used && !allowed {
                    Err(MapError::Invalid(format!(
                        "{ctx}: '{field}' does not apply to strategy {:?}",
                        d.strategy
                    )))
                } else {
                    Ok(())
                }
            };
            let hashed = matches!(d.strategy, StrategyName::Hash | StrategyName::Tenant);
            uses("bucket_map", !d.bucket_map.is_empty(), hashed)?;
            uses(
                "tenants",
                !d.tenants.is_empty(),
                d.strategy == StrategyName::Tenant,
            )?;
            uses(
                "ranges",
                !d.ranges.is_empty(),
                d.strategy == StrategyName::Range,
            )?;
            uses(
                "regions",
                !d.regions.is_empty(),
                d.strategy == StrategyName::Geo,
            )?;
            uses(
                "default_region",
                d.default_region.is_some(),
                d.strategy == StrategyName::Geo,
            )?;
            let parse =
                |v: &str| pghash::parse_key(&d.key_type, v.as_bytes()).map(|k| OwnedKey::of(&k));
            let strategy = match d.strategy {
                StrategyName::Hash => Strategy::Hash {
                    bucket_shard: bucket_shards(d, cfg.buckets, shards, &ctx)?,
                },
                StrategyName::Tenant => {
                    let mut directory = HashMap::new();
                    for (t, s) in &d.tenants {
                        let k = parse(t)
                            .map_err(|e| MapError::Invalid(format!("{ctx}: tenant {t}: {e}")))?;
                        directory.insert(k, shard_ok(&ctx, *s)?);
                    }
                    Strategy::Tenant {
                        directory,
                        bucket_shard: bucket_shards(d, cfg.buckets, shards, &ctx)?,
                    }
                }
                StrategyName::Range => {
                    let bound = |b: &Option<Bound>| -> Result<Option<OwnedKey>, MapError> {
                        b.as_ref()
                            .map(|b| bound_key(&d.key_type, b))
                            .transpose()
                            .map_err(|e| MapError::Invalid(format!("{ctx}: range bound: {e}")))
                    };
                    let mut ranges = Vec::new();
                    for r in &d.ranges {
                        let (lo, hi) = (bound(&r.lo)?, bound(&r.hi)?);
                        if let (Some(l), Some(h)) = (&lo, &hi) {
                            if l >= h {
                                return bad(format!("{ctx}: empty range, lo must be below hi"));
                            }
                        }
                        ranges.push((lo, hi, shard_ok(&ctx, r.shard)?));
                    }
                    if ranges.is_empty() {
                        return bad(format!(
                            "{ctx}: strategy range needs at least one entry in 'ranges'"
                        ));
                    }
                    // None sorts first, which is right for an unbounded low end.
                    ranges.sort_by(|a, b| a.0.cmp(&b.0));
                    for w in ranges.windows(2) {
                        let overlap = match (&w[0].1, &w[1].0) {
                            (None, _) | (_, None) => true,
                            (Some(hi), Some(lo)) => hi > lo,
                        };
                        if overlap {
                            return bad(format!("{ctx}: ranges overlap"));
                        }
                    }
                    Strategy::Range { ranges }
                }
                StrategyName::Geo => {
                    let mut regions = HashMap::new();
                    for (r, group) in &d.regions {
                        if group.is_empty() {
                            return bad(format!("{ctx}: region '{r}' has no shards"));
                        }
                        for s in group {
                            shard_ok(&ctx, *s)?;
                        }
                        // A group whose members are all one shard (left so by moving shares)
                        // is that shard: hashing within it cannot pick anything else.
                        let one = group.iter().all(|s| *s == group[0]);
                        let group = if one { vec![group[0]] } else { group.clone() };
                        regions.insert(r.as_bytes().to_vec(), group);
                    }
                    if regions.is_empty() {
                        return bad(format!("{ctx}: strategy geo needs 'regions'"));
                    }
                    let default = match &d.default_region {
                        Some(r) => match regions.get(r.as_bytes()) {
                            Some(g) => Some(g.clone()),
                            None => {
                                return bad(format!(
                                    "{ctx}: default_region '{r}' is not in 'regions'"
                                ))
                            }
                        },
                        None => None,
                    };
                    Strategy::Geo {
                        regions,
                        default,
                        default_region: d.default_region.as_ref().map(|r| r.as_bytes().to_vec()),
                    }
                }
            };
            if by_name
                .insert(d.name.clone(), distributions.len())
                .is_some()
            {
                return bad(format!("distribution '{}' is declared twice", d.name));
            }
            distributions.push(Distribution {
                name: d.name.clone(),
                key_type: d.key_type.clone(),
                strategy,
            });
        }
        let mut tables = HashMap::new();
        for t in &cfg.tables {
            let ctx = format!("table '{}'", t.name);
            let rule = match (t.reference, &t.distribution, &t.column) {
                (true, None, None) if t.hash_column.is_none() => TableRule::Reference,
                (true, _, _) => {
                    return bad(format!(
                        "{ctx}: a reference table has no distribution or columns"
                    ))
                }
                (false, Some(d), Some(c)) => {
                    let Some(&dist) = by_name.get(d) else {
                        return bad(format!("{ctx}: distribution '{d}' is not declared"));
                    };
                    let geo = matches!(distributions[dist].strategy, Strategy::Geo { .. });
                    if t.hash_column.is_some() && !geo {
                        return bad(format!(
                            "{ctx}: hash_column applies to geo distributions only"
                        ));
                    }
                    TableRule::Sharded {
                        dist,
                        column: c.clone(),
                        hash_column: t.hash_column.clone(),
                    }
                }
                _ => {
                    return bad(format!(
                        "{ctx}: needs 'distribution' and 'column', or 'reference = true'"
                    ))
                }
            };
            if tables.insert(t.name.clone(), rule).is_some() {
                return bad(format!("table '{}' is declared twice", t.name));
            }
        }
        let motions = motion::build(&cfg.moves, &by_name, &distributions, cfg.buckets, shards)?;
        if let Some(j) = cfg.joining.iter().find(|&&j| j >= shards) {
            return bad(format!("joining shard {j} does not exist"));
        }
        let readable: Vec<ShardId> = (0..shards).filter(|s| !cfg.joining.contains(s)).collect();
        if readable.is_empty() {
            return bad("every shard is joining".to_string());
        }
        let mut replica_floor = vec![0u64; shards];
        for f in &cfg.replica_floor {
            let Some(lsn) = crate::health::parse_lsn(&f.lsn) else {
                return bad(format!(
                    "replica_floor of shard {}: bad LSN '{}'",
                    f.shard, f.lsn
                ));
            };
            // A map may name fewer shards than the config; a floor beyond them binds nothing.
            if let Some(slot) = replica_floor.get_mut(f.shard) {
                *slot = lsn;
            }
        }
        Ok(ShardMap {
            motions,
            readable,
            replica_floor,
            version,
            shards,
            buckets: cfg.buckets,
            unknown_tables: cfg.unknown_tables,
            default_shard: cfg.default_shard,
            keyless_writes: cfg.keyless_writes,
            distributions,
            tables,
        })
    }

    /// The rule for a table named as in SQL: `schema.table` first, then the bare table name.
    pub fn table(&self, name: &str) -> Option<&TableRule> {
        self.tables
            .get(name)
            .or_else(|| self.tables.get(name.rsplit('.').next()?))
    }

    /// Parses a key from text (a literal or a text-format parameter) for distribution `dist`.
    pub fn parse_key<'a>(&self, dist: usize, text: &'a [u8]) -> Result<KeyValue<'a>, MapError> {
        Ok(pghash::parse_key(&self.distributions[dist].key_type, text)?)
    }

    /// Parses a binary-format Bind parameter for distribution `dist`.
    pub fn parse_key_binary<'a>(
        &self,
        dist: usize,
        raw: &'a [u8],
    ) -> Result<KeyValue<'a>, MapError> {
        Ok(pghash::parse_key_binary(
            &self.distributions[dist].key_type,
            raw,
        )?)
    }

    /// Where `key` lives under distribution `dist`; geo rows use `within` (the hash column's
    /// value) to choose inside a region's group.
    pub fn locate(
        &self,
        dist: usize,
        key: &KeyValue,
        within: Option<&KeyValue>,
    ) -> Result<Located, MapError> {
        let d = &self.distributions[dist];
        let by_bucket = |bs: &[ShardId], k: &KeyValue| {
            bs[pghash::bucket(k, self.buckets).unwrap_or(0) as usize]
        };
        Ok(match &d.strategy {
            Strategy::Hash { bucket_shard } => Located::One(by_bucket(bucket_shard, key)),
            Strategy::Tenant {
                directory,
                bucket_shard,
            } => match directory.get(&OwnedKey::of(key)) {
                Some(&s) => Located::One(s),
                None => Located::One(by_bucket(bucket_shard, key)),
            },
            Strategy::Range { ranges } => {
                let k = OwnedKey::of(key);
                let hit = ranges.iter().find(|(lo, hi, _)| {
                    lo.as_ref().is_none_or(|lo| &k >= lo) && hi.as_ref().is_none_or(|hi| &k < hi)
                });
                match hit {
                    Some(&(_, _, s)) => Located::One(s),
                    None => {
                        return Err(MapError::NoRange {
                            dist: d.name.clone(),
                            value: display_key(key),
                        })
                    }
                }
            }
            Strategy::Geo {
                regions, default, ..
            } => {
                let region = match key {
                    KeyValue::Text(t) => *t,
                    _ => b"" as &[u8],
                };
                let group = match regions.get(region).or(default.as_ref()) {
                    Some(g) => g,
                    None => {
                        return Err(MapError::NoRange {
                            dist: d.name.clone(),
                            value: display_key(key),
                        });
                    }
                };
                match (group.len(), within) {
                    (1, _) => Located::One(group[0]),
                    (_, Some(w)) => {
                        let b = pghash::bucket(w, self.buckets).unwrap_or(0);
                        Located::One(group[group_member(group.len(), b, self.buckets)])
                    }
                    (_, None) => Located::Group(group.clone()),
                }
            }
        })
    }

    /// Tables placed by distribution `dist`, with their key columns, sorted by name.
    pub fn tables_of(&self, dist: usize) -> Vec<(String, String)> {
        let mut out: Vec<_> = self
            .tables
            .iter()
            .filter_map(|(name, rule)| match rule {
                TableRule::Sharded {
                    dist: d, column, ..
                } if *d == dist => Some((name.clone(), column.clone())),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// The SQL condition naming the rows of `table` that the unit of `mv` holds (see
    /// `Motion::predicate_sql`); None for a table the move does not place.
    pub fn unit_predicate(&self, mv: &motion::Motion, table: &str) -> Option<String> {
        match self.table(table)? {
            TableRule::Sharded {
                dist,
                column,
                hash_column,
            } if *dist == mv.dist => mv.predicate_sql(
                column,
                hash_column.as_deref(),
                &self.distributions[*dist].key_type,
                self.buckets,
            ),
            _ => None,
        }
    }

    /// The move in flight for a table, with the table's key column.
    pub fn motion_of(&self, table: &str) -> Option<(&motion::Motion, &str)> {
        if self.motions.is_empty() {
            return None;
        }
        match self.table(table)? {
            TableRule::Sharded { dist, column, .. } => self
                .motions
                .iter()
                .find(|m| m.dist == *dist)
                .map(|m| (m, column.as_str())),
            TableRule::Reference => None,
        }
    }

    /// A shard that serves reads of reference tables, picked by `seed` (spreads clients).
    pub fn any_readable(&self, seed: usize) -> ShardId {
        self.readable[seed % self.readable.len()]
    }

    /// The bucket of a hash or tenant key (for rebalancing and SHOW ROUTE).
    pub fn bucket(&self, key: &KeyValue) -> u32 {
        pghash::bucket(key, self.buckets).unwrap_or(0)
    }
}

/// A range bound as a key of the distribution's type.
pub fn bound_key(key_type: &str, b: &Bound) -> Result<OwnedKey, MapError> {
    let text = match b {
        Bound::Int(i) => i.to_string(),
        Bound::Text(t) => t.clone(),
    };
    Ok(OwnedKey::of(&pghash::parse_key(key_type, text.as_bytes())?))
}

/// A range `[lo, hi)` of keys (None = unbounded).
pub type KeySpan = (Option<OwnedKey>, Option<OwnedKey>);

/// The entry of a range distribution that holds all of `span`.
pub fn range_entry(
    ranges: &[(Option<OwnedKey>, Option<OwnedKey>, ShardId)],
    span: &KeySpan,
) -> Option<usize> {
    ranges.iter().position(|(elo, ehi, _)| {
        let low = match (elo, &span.0) {
            (None, _) => true,
            (Some(e), Some(l)) => l >= e,
            (Some(_), None) => false,
        };
        let high = match (ehi, &span.1) {
            (None, _) => true,
            (Some(e), Some(h)) => h <= e,
            (Some(_), None) => false,
        };
        low && high
    })
}

/// The member of a geo group of `n` shards that hash bucket `bucket` (of `buckets`) goes to:
/// equal contiguous slices of the buckets, in the group's order.
pub fn group_member(n: usize, bucket: u32, buckets: u32) -> usize {
    bucket as usize * n / buckets as usize
}

/// A key as shown in an error message.
pub fn display_key(k: &KeyValue) -> String {
    match k {
        KeyValue::Int(v) => v.to_string(),
        KeyValue::Text(t) => format!("'{}'", String::from_utf8_lossy(&t[..t.len().min(64)])),
        KeyValue::Uuid(u) => u.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// bucket → shard for a hash or tenant distribution: the explicit map, or an equal split.
fn bucket_shards(
    d: &config::DistributionConfig,
    buckets: u32,
    shards: usize,
    ctx: &str,
) -> Result<Vec<ShardId>, MapError> {
    let n = buckets as usize;
    if d.bucket_map.is_empty() {
        return Ok((0..n).map(|b| b * shards / n).collect());
    }
    let mut map = vec![usize::MAX; n];
    for r in &d.bucket_map {
        if r.from > r.to || r.to as usize >= n || r.shard >= shards {
            return Err(MapError::Invalid(format!(
                "{ctx}: bucket_map entry {}..={} → shard {} is out of bounds ({n} buckets, {shards} shards)",
                r.from, r.to, r.shard
            )));
        }
        for slot in &mut map[r.from as usize..=r.to as usize] {
            if *slot != usize::MAX {
                return Err(MapError::Invalid(format!(
                    "{ctx}: bucket_map entries overlap"
                )));
            }
            *slot = r.shard;
        }
    }
    if let Some(b) = map.iter().position(|&s| s == usize::MAX) {
        return Err(MapError::Invalid(format!(
            "{ctx}: bucket_map leaves bucket {b} without a shard"
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests;
