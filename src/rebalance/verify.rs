//! `shardctl verify`: every row of a distribution's tables is on the shard the map puts it on.
//! Rows are counted on each shard's primary grouped by what decides placement (the bucket, a
//! tenant of the directory, or the shard's own key ranges), so nothing is fetched row by row.
//! A move checks its own unit (counts and checksums per bucket) at the switch; this checks the
//! whole placement afterwards, e.g. after an abort, a restore, or writes that bypassed pgshard.

use super::{apply::table_ident, copy, MoveError, ShardLink};
use crate::pghash;
use crate::shardmap::config::{Bound, ShardingConfig, StrategyName};
use crate::shardmap::motion::{range_predicate, sql_literal};
use crate::shardmap::ShardMap;

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
                StrategyName::Geo => {
                    return Err(MoveError::Refused(format!(
                        "distribution {} is geo; its placement is not verified yet",
                        d.name
                    )))
                }
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

fn bucket_owner(map: &ShardMap, dist: usize, bucket: i64) -> Option<usize> {
    super::plan::placement(map, dist)?
        .get(usize::try_from(bucket).ok()?)
        .copied()
}
