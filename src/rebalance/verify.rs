//! `shardctl verify`: every row of a distribution's tables is on the shard the map puts it on.
//! Rows are counted on each shard's primary grouped by what decides placement (the bucket, a
//! tenant of the directory, the shard's own key ranges, or a region and the hash bucket within
//! its group), so nothing is fetched row by row.
//! A move checks its own unit (counts and checksums per bucket) at the switch; this checks the
//! whole placement afterwards, e.g. after an abort, a restore, or writes that bypassed pgshard.

use super::{apply::table_ident, copy, MoveError, ShardLink};
use crate::pghash;
use crate::shardmap::config::{Bound, ShardingConfig, StrategyName};
use crate::shardmap::motion::{range_predicate, sql_literal};
use crate::shardmap::{ShardMap, Strategy, TableRule};

/// Rows of one table on one shard, and how many of them belong elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableCheck {
    pub table: String,
    pub shard: usize,
    pub rows: i64,
    pub misplaced: i64,
}

/// Checks the placement of distribution `dist` (named in `cfg` as in `map`) on every shard.
pub async fn placement(
    shards: &[ShardLink],
    cfg: &ShardingConfig,
    map: &ShardMap,
    dist: usize,
) -> Result<Vec<TableCheck>, MoveError> {
    let d = &map.distributions[dist];
    if let Some(m) = map.motions.iter().find(|m| m.dist == dist) {
        return Err(MoveError::Refused(format!(
            "move {} of distribution {} is in flight (its unit is on two shards); verify after it ends",
            m.id, d.name
        )));
    }
    let dc = cfg
        .distributions
        .iter()
        .find(|x| x.name == d.name)
        .ok_or_else(|| MoveError::Refused(format!("no distribution {} in the map", d.name)))?;
    let mut out = Vec::new();
    for (shard, link) in shards.iter().enumerate().take(map.shards) {
        let c = super::connect(&link.dsn).await?;
        for (table, column) in map.tables_of(dist) {
            if !copy::exists(&c, &table).await? {
                continue;
            }
            let t = table_ident(&table)?;
            let col = pghash::quote_ident(&column)
                .ok_or_else(|| MoveError::Refused(format!("cannot quote column {column}")))?;
            let (rows, misplaced) = match dc.strategy {
                StrategyName::Hash | StrategyName::Tenant => {
                    let bucket = pghash::bucket_sql(&column, &d.key_type, map.buckets)
                        .ok_or_else(|| MoveError::Refused(format!("cannot hash {column}")))?;
                    // Directory tenants are placed by name, the rest by bucket.
                    let pinned: Result<Vec<String>, MoveError> = dc
                        .tenants
                        .keys()
                        .map(|k| {
                            sql_literal(&d.key_type, k)
                                .map_err(|e| MoveError::Refused(e.to_string()))
                        })
                        .collect();
                    let pinned = pinned?;
                    let named = if pinned.is_empty() {
                        "NULL::text".to_string()
                    } else {
                        format!(
                            "CASE WHEN {col} IN ({}) THEN {col}::text END",
                            pinned.join(", ")
                        )
                    };
                    // A NULL key has no bucket: it belongs nowhere.
                    let sql = format!(
                        "SELECT {named}, ({bucket})::int8, count(*) FROM {t} GROUP BY 1, 2"
                    );
                    let mut rows = 0;
                    let mut misplaced = 0;
                    for r in c.query(&sql, &[]).await? {
                        let (name, bucket, n): (Option<String>, Option<i64>, i64) =
                            (r.get(0), r.get(1), r.get(2));
                        let owner = match (name, bucket) {
                            (Some(k), _) => dc.tenants.get(&k).copied(),
                            (None, Some(b)) => bucket_owner(map, dist, b),
                            (None, None) => None,
                        };
                        rows += n;
                        if owner != Some(shard) {
                            misplaced += n;
                        }
                    }
                    (rows, misplaced)
                }
                StrategyName::Range => {
                    let text = d.key_type.contains("text") || d.key_type.contains("char");
                    let lit = |b: &Bound| {
                        let s = match b {
                            Bound::Int(i) => i.to_string(),
                            Bound::Text(t) => t.clone(),
                        };
                        sql_literal(&d.key_type, &s).map_err(|e| MoveError::Refused(e.to_string()))
                    };
                    let mut owned = Vec::new();
                    for r in dc.ranges.iter().filter(|r| r.shard == shard) {
                        let lo = r.lo.as_ref().map(lit).transpose()?;
                        let hi = r.hi.as_ref().map(lit).transpose()?;
                        owned.push(format!(
                            "({})",
                            range_predicate(&col, text, lo.as_deref(), hi.as_deref())
                        ));
                    }
                    let owned = if owned.is_empty() {
                        "false".to_string()
                    } else {
                        owned.join(" OR ")
                    };
                    let row = c
                        .query_one(
                            &format!("SELECT count(*), count(*) FILTER (WHERE ({owned}) IS NOT TRUE) FROM {t}"),
                            &[],
                        )
                        .await?;
                    (row.get(0), row.get(1))
                }
                StrategyName::Geo => geo_counts(&c, shard, map, dist, &table, &col).await?,
            };
            out.push(TableCheck {
                table: table.clone(),
                shard,
                rows,
                misplaced,
            });
        }
    }
    Ok(out)
}

/// Rows and misplaced rows of a geo table on one shard, counted per region and, inside the
/// regions whose group spans shards, per bucket of the table's hash column. An integer or
/// uuid hash column is hashed in SQL; any other is fetched per distinct value of those
/// regions and hashed here, as the routers hash a value of unknown type (by its shape).
async fn geo_counts(
    c: &tokio_postgres::Client,
    shard: usize,
    map: &ShardMap,
    dist: usize,
    table: &str,
    col: &str,
) -> Result<(i64, i64), MoveError> {
    let Strategy::Geo {
        regions, default, ..
    } = &map.distributions[dist].strategy
    else {
        return Err(MoveError::Refused("not a geo distribution".into()));
    };
    let spread: Vec<String> = regions
        .iter()
        .filter(|(_, g)| g.len() > 1)
        .map(|(r, _)| literal(r))
        .collect();
    let hash_column = match map.table(table) {
        Some(TableRule::Sharded { hash_column, .. }) => hash_column.clone(),
        _ => None,
    };
    // What tells the members of a group apart: a bucket, or the value itself.
    let (within, hashed) = match &hash_column {
        Some(h) if !spread.is_empty() || default.as_ref().is_some_and(|g| g.len() > 1) => {
            let q = pghash::quote_ident(h)
                .ok_or_else(|| MoveError::Refused(format!("cannot quote column {h}")))?;
            let class = copy::column_type(c, table, h)
                .await?
                .and_then(|t| copy::hash_class(&t));
            match class.and_then(|t| pghash::bucket_sql(h, t, map.buckets)) {
                Some(b) => (format!("(({b})::int8)::text"), true),
                None => (format!("{q}::text"), false),
            }
        }
        _ => ("NULL::text".to_string(), true),
    };
    // Rows of unlisted regions use the default group, which may span shards too.
    let mut parts = Vec::new();
    if !spread.is_empty() {
        parts.push(format!("{col} IN ({})", spread.join(", ")));
    }
    if default.as_ref().is_some_and(|g| g.len() > 1) {
        let listed: Vec<String> = regions.keys().map(|r| literal(r)).collect();
        parts.push(format!("{col} NOT IN ({})", listed.join(", ")));
    }
    let needs_within = if parts.is_empty() {
        "false".to_string()
    } else {
        parts.join(" OR ")
    };
    let sql = format!(
        "SELECT {col}::text, CASE WHEN {needs_within} THEN {within} END, count(*) FROM {} GROUP BY 1, 2",
        table_ident(table)?
    );
    let (mut rows, mut misplaced) = (0, 0);
    for r in c.query(&sql, &[]).await? {
        let (region, within, n): (Option<String>, Option<String>, i64) =
            (r.get(0), r.get(1), r.get(2));
        rows += n;
        let group = region
            .as_ref()
            .and_then(|r| regions.get(r.as_bytes()).or(default.as_ref()));
        let owner = match (group.map(Vec::as_slice), within) {
            (Some([one]), _) => Some(*one),
            (Some(g), Some(w)) => {
                let bucket = if hashed {
                    w.parse::<u32>().ok()
                } else {
                    pghash::bucket(&pghash::parse_loose(w.as_bytes(), false), map.buckets)
                };
                bucket.map(|b| g[crate::shardmap::group_member(g.len(), b, map.buckets)])
            }
            // No region, an unlisted region without a default, or no hash column value.
            _ => None,
        };
        if owner != Some(shard) {
            misplaced += n;
        }
    }
    Ok((rows, misplaced))
}

/// A region name as an SQL string literal.
fn literal(region: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(region).replace('\'', "''"))
}

fn bucket_owner(map: &ShardMap, dist: usize, bucket: i64) -> Option<usize> {
    super::plan::placement(map, dist)?
        .get(usize::try_from(bucket).ok()?)
        .copied()
}
