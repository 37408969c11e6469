//! Units in motion: what routers must do differently for a tenant or a set of buckets while
//! `shardctl move` carries it from one shard to another (see docs/rebalancing.md).

use super::config::{MoveConfig, MovePhase};
use super::{KeySpan, MapError, OwnedKey, ShardId, Strategy};
use crate::pghash::{self, KeyValue};

/// The rows a move carries, in one distribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// One tenant of a tenant distribution (its key value as SQL text too).
    Tenant { key: OwnedKey, literal: String },
    /// One region of a geo distribution: all of it (a region on one shard), or with `share`
    /// the part of it one shard of its group holds.
    Region {
        key: OwnedKey,
        literal: String,
        share: Option<Share>,
    },
    /// Inclusive bucket ranges of a hash or tenant distribution; in a tenant distribution,
    /// tenants of the directory stay where the directory puts them.
    Buckets {
        ranges: Vec<(u32, u32)>,
        directory: Vec<String>,
    },
    /// Keys `[lo, hi)` of a range distribution (None = unbounded), with their SQL literals.
    Range {
        span: KeySpan,
        lo: Option<String>,
        hi: Option<String>,
        text: bool,
    },
}

/// The rows of a region that one member of its group holds: those whose hash column falls in
/// `ranges` (inclusive buckets), hashed in SQL as `hash_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub ranges: Vec<(u32, u32)>,
    pub hash_type: String,
}

/// A move as routers see it.
#[derive(Debug, Clone)]
pub struct Motion {
    pub id: u64,
    pub dist: usize,
    pub unit: Unit,
    pub source: ShardId,
    pub target: ShardId,
    pub phase: MovePhase,
}

impl Motion {
    /// The shard whose copy of the unit key-less reads must not see: the target while it is
    /// being filled, the source once the target serves the unit.
    pub fn shadow_shard(&self) -> ShardId {
        match self.phase {
            MovePhase::Copying | MovePhase::Fenced => self.target,
            MovePhase::Switched => self.source,
        }
    }

    /// True when `key` belongs to the unit (the Rust twin of `predicate_sql`).
    pub fn owns(&self, key: &KeyValue, buckets: u32) -> bool {
        self.owns_row(key, None, buckets)
    }

    /// `owns` for a row whose geo hash column holds `within` (a region's share needs it).
    pub fn owns_row(&self, key: &KeyValue, within: Option<&KeyValue>, buckets: u32) -> bool {
        match &self.unit {
            Unit::Tenant { key: k, .. } => OwnedKey::of(key) == *k,
            Unit::Region { key: k, share, .. } => {
                OwnedKey::of(key) == *k
                    && share.as_ref().is_none_or(|sh| {
                        within
                            .and_then(|w| pghash::bucket(w, buckets))
                            .is_some_and(|b| sh.ranges.iter().any(|&(lo, hi)| lo <= b && b <= hi))
                    })
            }
            Unit::Buckets { ranges, directory } => {
                let b = pghash::bucket(key, buckets).unwrap_or(u32::MAX);
                ranges.iter().any(|&(lo, hi)| lo <= b && b <= hi)
                    && !directory.iter().any(|d| literal_matches(d, key))
            }
            Unit::Range { span: (lo, hi), .. } => {
                let k = OwnedKey::of(key);
                lo.as_ref().is_none_or(|lo| &k >= lo) && hi.as_ref().is_none_or(|hi| &k < hi)
            }
        }
    }

    /// An immutable SQL condition on `column` true exactly for the unit's rows (publication
    /// row filters, COPY, verification, cleanup and key-less reads all use it). None when a
    /// name cannot be quoted, or the unit is a region's share and `hash_column` is None.
    pub fn predicate_sql(
        &self,
        column: &str,
        hash_column: Option<&str>,
        key_type: &str,
        buckets: u32,
    ) -> Option<String> {
        let col = pghash::quote_ident(column)?;
        Some(match &self.unit {
            Unit::Tenant { literal, .. }
            | Unit::Region {
                literal,
                share: None,
                ..
            } => {
                format!("{col} = {literal}")
            }
            Unit::Region {
                literal,
                share: Some(sh),
                ..
            } => {
                let b = pghash::bucket_sql(hash_column?, &sh.hash_type, buckets)?;
                format!("{col} = {literal} AND {}", in_buckets(&b, &sh.ranges))
            }
            Unit::Buckets { ranges, directory } => {
                let b = pghash::bucket_sql(column, key_type, buckets)?;
                let mut p = in_buckets(&b, ranges);
                if !directory.is_empty() {
                    p = format!("{p} AND {col} NOT IN ({})", directory.join(", "));
                }
                p
            }
            Unit::Range { lo, hi, text, .. } => {
                range_predicate(&col, *text, lo.as_deref(), hi.as_deref())
            }
        })
    }

    /// A short name for messages: `tenant 'big'` or `buckets 0-255`.
    pub fn describe(&self) -> String {
        match &self.unit {
            Unit::Tenant { literal, .. } => format!("tenant {literal}"),
            Unit::Region {
                literal,
                share: None,
                ..
            } => format!("region {literal}"),
            Unit::Region {
                literal,
                share: Some(sh),
                ..
            } => format!(
                "the share of region {literal} on shard {} (hash buckets {})",
                self.source,
                bucket_list(&sh.ranges)
            ),
            Unit::Buckets { ranges, .. } => format!("buckets {}", bucket_list(ranges)),
            Unit::Range { lo, hi, .. } => format!(
                "range [{}, {})",
                lo.as_deref().unwrap_or("-inf"),
                hi.as_deref().unwrap_or("+inf")
            ),
        }
    }
}

/// Inclusive bucket ranges as `0-255,1024`.
fn bucket_list(ranges: &[(u32, u32)]) -> String {
    let r: Vec<String> = ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    r.join(",")
}

/// An SQL condition true when the bucket expression `b` falls in one of `ranges`.
fn in_buckets(b: &str, ranges: &[(u32, u32)]) -> String {
    let within: Vec<String> = ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                format!("({b}) = {lo}")
            } else {
                format!("({b}) BETWEEN {lo} AND {hi}")
            }
        })
        .collect();
    format!("({})", within.join(" OR "))
}

/// An SQL condition on the quoted column `col` true for keys in `[lo, hi)` (SQL literals; None
/// leaves a side unbounded). Text keys compare in the "C" collation: routers compare them
/// bytewise.
pub fn range_predicate(col: &str, text: bool, lo: Option<&str>, hi: Option<&str>) -> String {
    let c = if text {
        format!("{col} COLLATE \"C\"")
    } else {
        col.to_string()
    };
    let parts: Vec<String> = [
        lo.map(|l| format!("{c} >= {l}")),
        hi.map(|h| format!("{c} < {h}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "TRUE".to_string()
    } else {
        parts.join(" AND ")
    }
}

/// A key as an SQL literal of the distribution's key type.
pub fn sql_literal(key_type: &str, text: &str) -> Result<String, MapError> {
    match pghash::parse_key(key_type, text.as_bytes())? {
        KeyValue::Int(i) => Ok(i.to_string()),
        _ => Ok(format!("'{}'", text.replace('\'', "''"))),
    }
}

fn literal_matches(literal: &str, key: &KeyValue) -> bool {
    match key {
        KeyValue::Int(i) => literal == i.to_string(),
        KeyValue::Text(t) => {
            literal.len() >= 2 && literal[1..literal.len() - 1].replace("''", "'").as_bytes() == *t
        }
        KeyValue::Uuid(_) => false,
    }
}

/// Builds and checks the moves of a map: one per distribution, between existing, different
/// shards, and the unit wholly where its phase says it is.
pub(super) fn build(
    moves: &[MoveConfig],
    by_name: &std::collections::HashMap<String, usize>,
    dists: &[super::Distribution],
    buckets: u32,
    shards: usize,
) -> Result<Vec<Motion>, MapError> {
    let mut out: Vec<Motion> = Vec::new();
    for m in moves {
        let ctx = format!("move {}", m.id);
        let bad = |r: String| Err(MapError::Invalid(format!("{ctx}: {r}")));
        let Some(&dist) = by_name.get(&m.distribution) else {
            return bad(format!("distribution '{}' is not declared", m.distribution));
        };
        if out.iter().any(|o| o.dist == dist) {
            return bad(format!(
                "distribution '{}' already has a move in flight",
                m.distribution
            ));
        }
        if m.source == m.target || m.source >= shards || m.target >= shards {
            return bad(format!(
                "source {} and target {} must be different existing shards",
                m.source, m.target
            ));
        }
        let d = &dists[dist];
        let motion = |unit| Motion {
            id: m.id,
            dist,
            unit,
            source: m.source,
            target: m.target,
            phase: m.phase,
        };
        let here = if m.phase == MovePhase::Switched {
            m.target
        } else {
            m.source
        };
        if let Strategy::Range { ranges } = &d.strategy {
            let Some(r) = m
                .range
                .as_ref()
                .filter(|_| m.tenant.is_none() && m.buckets.is_empty())
            else {
                return bad("a range distribution moves a key range: set 'range' only".into());
            };
            let key = |b: &Option<super::config::Bound>| {
                b.as_ref()
                    .map(|b| super::bound_key(&d.key_type, b))
                    .transpose()
            };
            let span = (key(&r.lo)?, key(&r.hi)?);
            if let (Some(l), Some(h)) = &span {
                if l >= h {
                    return bad("the range is empty: lo must be below hi".into());
                }
            }
            let Some(e) = super::range_entry(ranges, &span) else {
                return bad("the range must lie within one range of the map".into());
            };
            if ranges[e].2 != here {
                return bad(format!("the range is on shard {}, not {here}", ranges[e].2));
            }
            let lit = |b: &Option<super::config::Bound>| -> Result<Option<String>, MapError> {
                b.as_ref()
                    .map(|b| match b {
                        super::config::Bound::Int(i) => sql_literal(&d.key_type, &i.to_string()),
                        super::config::Bound::Text(t) => sql_literal(&d.key_type, t),
                    })
                    .transpose()
            };
            let text = matches!(span.0.as_ref().or(span.1.as_ref()), Some(OwnedKey::Text(_)));
            let unit = Unit::Range {
                lo: lit(&r.lo)?,
                hi: lit(&r.hi)?,
                span,
                text,
            };
            out.push(motion(unit));
            continue;
        }
        let (directory, bucket_shard) = match &d.strategy {
            Strategy::Tenant {
                directory,
                bucket_shard,
            } => (Some(directory), bucket_shard),
            Strategy::Hash { bucket_shard } => (None, bucket_shard),
            Strategy::Geo {
                regions,
                default_region,
                ..
            } => {
                let Some(r) = m.tenant.as_ref().filter(|_| m.range.is_none()) else {
                    return bad(
                        "a geo distribution moves a region: set 'tenant' (the region), and for a share of its group 'buckets' and 'hash_type'".into(),
                    );
                };
                if default_region.as_deref() == Some(r.as_bytes()) {
                    return bad(format!("region '{r}' is the default region: unlisted regions' rows share its shards and would be left behind"));
                }
                let Some(group) = regions.get(r.as_bytes()) else {
                    return bad(format!(
                        "region '{r}' is not listed in the distribution's regions"
                    ));
                };
                let share = match (&m.hash_type, m.buckets.is_empty()) {
                    (None, true) => {
                        if let Some(s) = group.iter().find(|&&s| s != here) {
                            return bad(if group.len() > 1 {
                                format!("region '{r}' spans shards {group:?}: move the share one shard holds (shardctl move --region {r} --from SHARD)")
                            } else {
                                format!("region '{r}' is on shard {s}, not {here}")
                            });
                        }
                        None
                    }
                    (Some(t), false) if t == "int8" || t == "uuid" => {
                        let n = group.len();
                        let mut ranges = Vec::new();
                        for &[lo, hi] in &m.buckets {
                            if lo > hi || hi >= buckets {
                                return bad(format!(
                                    "bucket range {lo}-{hi} is out of bounds ({buckets} buckets)"
                                ));
                            }
                            let member = |b: u32| group[super::group_member(n, b, buckets)];
                            if let Some(b) = (lo..=hi).find(|&b| member(b) != here) {
                                return bad(format!(
                                    "hash bucket {b} of region '{r}' is on shard {}, not {here}",
                                    member(b)
                                ));
                            }
                            ranges.push((lo, hi));
                        }
                        Some(Share {
                            ranges,
                            hash_type: t.clone(),
                        })
                    }
                    _ => return bad(
                        "a region's share names its hash buckets and a hash_type of int8 or uuid"
                            .into(),
                    ),
                };
                out.push(motion(Unit::Region {
                    key: OwnedKey::Text(r.as_bytes().to_vec()),
                    literal: sql_literal(&d.key_type, r)?,
                    share,
                }));
                continue;
            }
            _ => return bad("range distributions move key ranges".into()),
        };
        if m.range.is_some() || m.hash_type.is_some() {
            return bad("'range' is for range distributions, 'hash_type' for geo ones".into());
        }
        let unit = match (&m.tenant, m.buckets.is_empty()) {
            (Some(t), true) => {
                let Some(directory) = directory else {
                    return bad("a tenant unit needs a tenant distribution".into());
                };
                let kv = pghash::parse_key(&d.key_type, t.as_bytes())
                    .map_err(|e| MapError::Invalid(format!("{ctx}: {e}")))?;
                let key = OwnedKey::of(&kv);
                let at = directory.get(&key).copied().unwrap_or_else(|| {
                    bucket_shard[pghash::bucket(&kv, buckets).unwrap_or(0) as usize]
                });
                if at != here {
                    return bad(format!("tenant {t} is on shard {at}, not {here}"));
                }
                Unit::Tenant {
                    key,
                    literal: sql_literal(&d.key_type, t)?,
                }
            }
            (None, false) => {
                let mut ranges = Vec::new();
                for &[lo, hi] in &m.buckets {
                    if lo > hi || hi >= buckets {
                        return bad(format!(
                            "bucket range {lo}-{hi} is out of bounds ({buckets} buckets)"
                        ));
                    }
                    if let Some(b) = (lo..=hi).find(|&b| bucket_shard[b as usize] != here) {
                        return bad(format!(
                            "bucket {b} is on shard {}, not {here}",
                            bucket_shard[b as usize]
                        ));
                    }
                    ranges.push((lo, hi));
                }
                let mut dir = Vec::new();
                for (k, _) in directory.into_iter().flatten() {
                    dir.push(match k {
                        OwnedKey::Int(i) => i.to_string(),
                        OwnedKey::Text(t) => format!("'{}'", String::from_utf8_lossy(t).replace('\'', "''")),
                        OwnedKey::Uuid(_) => return bad("bucket moves of uuid tenant distributions with a directory are not supported".into()),
                    });
                }
                dir.sort();
                Unit::Buckets {
                    ranges,
                    directory: dir,
                }
            }
            _ => return bad("set exactly one of 'tenant' and 'buckets'".into()),
        };
        out.push(motion(unit));
    }
    Ok(out)
}
