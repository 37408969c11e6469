//! `shardctl verify`: the placement check of every (or one) distribution.

use anyhow::Context;
use pgshard::catalog::Catalog;
use pgshard::rebalance::{verify, MoveError};
use pgshard::shardmap::ShardMap;

/// Runs the check and prints one row per table and shard; the exit status is 3 when a row is
/// on a shard the map does not put it on, 2 when a distribution cannot be checked.
pub async fn run(
    dsn: &str,
    distribution: Option<&str>,
    shards: &super::ShardArgs,
    json: bool,
) -> anyhow::Result<i32> {
    let links = super::shard_links(shards).await?;
    let (cat, _) = Catalog::connect(dsn)
        .await
        .context("connecting to the catalog")?;
    let row = cat
        .latest_map()
        .await?
        .context("the catalog holds no map yet")?;
    let map = ShardMap::build(&row.sharding, row.shards, row.version)?;
    let mut rows = Vec::new();
    let mut code = 0;
    for (dist, d) in map.distributions.iter().enumerate() {
        if distribution.is_some_and(|n| n != d.name) {
            continue;
        }
        match verify::placement(&links, &row.sharding, &map, dist).await {
            Ok(checks) => {
                for c in checks {
                    if c.misplaced > 0 {
                        code = 3;
                    }
                    rows.push(vec![
                        d.name.clone(),
                        c.table,
                        c.shard.to_string(),
                        c.rows.to_string(),
                        c.misplaced.to_string(),
                    ]);
                }
            }
            Err(MoveError::Refused(why)) => {
                eprintln!("distribution {}: {why}", d.name);
                code = code.max(2);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(n) = distribution {
        if !map.distributions.iter().any(|d| d.name == n) {
            anyhow::bail!("no distribution {n} in map version {}", map.version);
        }
    }
    let cols: Vec<String> = ["distribution", "table", "shard", "rows", "misplaced"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    super::print_rows(
        &format!("placement (map version {})", map.version),
        &cols,
        &rows,
        json,
    );
    Ok(code)
}
