//! `shardctl add-shard`: puts the next shard of the routers' config into the catalog's map.
//! The new shard gets the schema and every reference table's rows, and no sharded rows: a
//! plan (`shardctl rebalance --apply`) then moves buckets onto it. Steps:
//! 1. every live router's config lists the shard (it reports its shard count with its lease);
//! 2. the schema is copied from a serving shard (pg_dump --schema-only | psql) if it lacks it;
//! 3. a map with one more shard, its bucket maps written out (so no bucket changes shard by
//!    the count changing) and the shard marked *joining*: routers write reference tables to
//!    it too but read them elsewhere; acknowledged by every router;
//! 4. the reference tables are copied under locks that hold writers back (their writes now
//!    reach the new shard too, so nothing written after the copy can miss it);
//! 5. the map without the joining mark: the shard serves reads like any other.

use super::Progress;
use super::{connect, publish_edit, wait_acks, MoveError, ShardLink};
use crate::catalog::Catalog;
use crate::shardmap::config::{BucketRange, ShardingConfig};
use crate::shardmap::{ShardMap, Strategy};
use std::time::Duration;

/// What `add_shard` did.
#[derive(Debug, Default)]
pub struct AddReport {
    pub shard: usize,
    pub schema_copied: bool,
    pub reference_tables: usize,
    pub reference_rows: u64,
    pub version: u64,
}

/// Adds the first shard of `shards` (the config's list) that the catalog's map does not use
/// yet; resumes an add-shard that stopped while the shard was joining.
pub async fn add_shard(
    cat: &Catalog,
    shards: &[ShardLink],
    ack_timeout: Duration,
    progress: &dyn Progress,
) -> Result<AddReport, MoveError> {
    let base = cat
        .latest_map()
        .await?
        .ok_or_else(|| MoveError::Refused("the catalog holds no map yet".into()))?;
    let resuming = !base.sharding.joining.is_empty();
    let n = if resuming {
        base.sharding.joining[0]
    } else {
        base.shards
    };
    if shards.len() <= n {
        return Err(MoveError::Refused(format!(
            "the map already uses all {} shards of the config; add the new shard's [[shards]] entry to this config and to every router's",
            base.shards
        )));
    }
    if !base.sharding.moves.is_empty() {
        return Err(MoveError::Refused(
            "a move is in flight; finish or abort it first".into(),
        ));
    }
    let short: Vec<String> = cat
        .routers()
        .await?
        .into_iter()
        .filter(|r| r.lease_left > 0.0 && r.shards.is_none_or(|s| s <= n))
        .map(|r| {
            format!(
                "{} ({} shards)",
                r.router_id,
                r.shards
                    .map_or("an unknown number of".into(), |s| s.to_string())
            )
        })
        .collect();
    if !short.is_empty() {
        return Err(MoveError::Refused(format!(
            "routers {} do not list shard {n} in their config; add it there and RELOAD or restart them first",
            short.join(", ")
        )));
    }
    let map = ShardMap::build(&base.sharding, base.shards, base.version)
        .map_err(|e| MoveError::Refused(e.to_string()))?;
    let from = map.readable[0];
    let mut report = AddReport {
        shard: n,
        ..Default::default()
    };
    let mut src = connect(&shards[from].dsn).await?;
    let mut new = connect(&shards[n].dsn).await?;

    if !resuming {
        // Tables the map declares and the source has (declared tables may not exist yet).
        let mut tables = Vec::new();
        for t in &base.sharding.tables {
            if super::copy::exists(&src, &t.name).await? {
                tables.push(t.name.as_str());
            }
        }
        let mut missing = Vec::new();
        for t in &tables {
            if !super::copy::exists(&new, t).await? {
                missing.push(*t);
            }
        }
        if !missing.is_empty() && missing.len() < tables.len() {
            return Err(MoveError::Refused(format!(
                "shard {n} has some of the map's tables but lacks {}; give it all or none",
                missing.join(", ")
            )));
        }
        if !missing.is_empty() {
            progress.line(&format!(
                "add-shard: copying the schema from shard {from} to shard {n}"
            ));
            copy_schema(&shards[from].dsn, &shards[n].dsn).await?;
            report.schema_copied = true;
        }
        let v = publish_edit(cat, &format!("add shard {n}: joining"), |s, count| {
            write_out_buckets(s, &map);
            s.joining = vec![n];
            *count = n + 1;
        })
        .await?;
        progress.line(&format!(
            "add-shard: map version {v} has shard {n} joining; waiting for the routers"
        ));
        wait_acks(cat, v, ack_timeout).await?;
    }

    let mut refs: Vec<String> = Vec::new();
    for t in base.sharding.tables.iter().filter(|t| t.reference) {
        if super::copy::exists(&src, &t.name).await? {
            refs.push(t.name.clone());
        }
    }
    report.reference_tables = refs.len();
    if !refs.is_empty() {
        report.reference_rows = copy_reference(&mut src, &mut new, &refs).await?;
        progress.line(&format!(
            "add-shard: copied {} rows of {} reference tables",
            report.reference_rows,
            refs.len()
        ));
    }
    // Its replicas serve reads only once they hold the schema and reference rows too.
    let floor = super::standby::floor(&new).await?;
    report.version = publish_edit(cat, &format!("add shard {n}: ready"), |s, _| {
        s.joining.clear();
        s.raise_replica_floor(n, &floor);
    })
    .await?;
    wait_acks(cat, report.version, ack_timeout).await?;
    progress.line(&format!(
        "add-shard: shard {n} serves from map version {}; `shardctl plan` moves buckets onto it",
        report.version
    ));
    Ok(report)
}

/// Writes each hash and tenant distribution's placement out as an explicit bucket map: the
/// default split depends on the shard count, which is about to change.
fn write_out_buckets(s: &mut ShardingConfig, map: &ShardMap) {
    for (d, built) in s.distributions.iter_mut().zip(&map.distributions) {
        if let Strategy::Hash { bucket_shard } | Strategy::Tenant { bucket_shard, .. } =
            &built.strategy
        {
            d.bucket_map = bucket_ranges(bucket_shard);
        }
    }
}

/// A bucket → shard placement as the fewest contiguous ranges.
pub(crate) fn bucket_ranges(owner: &[usize]) -> Vec<BucketRange> {
    let mut ranges: Vec<BucketRange> = Vec::new();
    for (b, &sh) in owner.iter().enumerate() {
        match ranges.last_mut() {
            Some(r) if r.shard == sh && r.to + 1 == b as u32 => r.to = b as u32,
            _ => ranges.push(BucketRange {
                from: b as u32,
                to: b as u32,
                shard: sh,
            }),
        }
    }
    ranges
}

/// pg_dump --schema-only of one shard, restored into another (tables, indexes, types,
/// functions; no data, owners, grants, publications or pgshard's own schema).
async fn copy_schema(from: &str, to: &str) -> Result<(), MoveError> {
    let bin = |p: &str| {
        let local = crate::topology::LocalCluster::bin_dir().join(p);
        if local.exists() {
            local
        } else {
            p.into()
        }
    };
    let (dump, restore) = (bin("pg_dump"), bin("psql"));
    let (from, to) = (from.to_string(), to.to_string());
    tokio::task::spawn_blocking(move || -> Result<(), MoveError> {
        let out = std::process::Command::new(&dump)
            .args([
                "--schema-only",
                "--no-owner",
                "--no-privileges",
                "--no-publications",
                "--no-subscriptions",
                "--exclude-schema=pgshard",
            ])
            .arg(format!("--dbname={from}"))
            .output()?;
        if !out.status.success() {
            return Err(MoveError::Refused(format!(
                "pg_dump: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut psql = std::process::Command::new(&restore)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(format!("--dbname={to}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write;
        psql.stdin.take().expect("piped").write_all(&out.stdout)?;
        let done = psql.wait_with_output()?;
        if !done.status.success() {
            return Err(MoveError::Refused(format!(
                "restoring the schema: {}",
                String::from_utf8_lossy(&done.stderr).trim()
            )));
        }
        Ok(())
    })
    .await
    .map_err(|e| MoveError::Refused(e.to_string()))?
}

/// Copies the reference tables while writers wait: an EXCLUSIVE lock on the source (reads go
/// on), ACCESS EXCLUSIVE on the new shard, emptied and refilled in one transaction. Writers'
/// two-phase transactions run on both at once and may hold one lock while waiting for the
/// other, so the second lock is taken NOWAIT and, if busy, both are let go and tried again.
async fn copy_reference(
    src: &mut tokio_postgres::Client,
    new: &mut tokio_postgres::Client,
    refs: &[String],
) -> Result<u64, MoveError> {
    use tokio_postgres::error::SqlState;
    let names: Vec<String> = refs
        .iter()
        .map(|t| super::apply::table_ident(t))
        .collect::<Result<_, _>>()?;
    let list = names.join(", ");
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let ts = src.transaction().await?;
        let tn = new.transaction().await?;
        let locked = async {
            ts.batch_execute(&format!(
                "SET LOCAL lock_timeout = '2s'; LOCK TABLE {list} IN EXCLUSIVE MODE"
            ))
            .await?;
            tn.batch_execute(&format!(
                "LOCK TABLE {list} IN ACCESS EXCLUSIVE MODE NOWAIT; TRUNCATE {list}"
            ))
            .await
        }
        .await;
        match locked {
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) && attempt < 500 => {
                drop((ts, tn));
                tokio::time::sleep(Duration::from_millis(5 + u64::from(attempt % 7) * 3)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        let mut rows = 0;
        for t in &names {
            let out = ts.copy_out(&format!("COPY {t} TO STDOUT")).await?;
            let sink = tn.copy_in(&format!("COPY {t} FROM STDIN")).await?;
            rows += super::copy::pipe(out, sink, &mut |_| {}).await?.0;
        }
        tn.commit().await?;
        ts.commit().await?;
        return Ok(rows);
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_ranges;

    #[test]
    fn placement_as_fewest_ranges() {
        let r = bucket_ranges(&[0, 0, 1, 1, 1, 0, 2]);
        let got: Vec<(u32, u32, usize)> = r.iter().map(|b| (b.from, b.to, b.shard)).collect();
        assert_eq!(got, [(0, 1, 0), (2, 4, 1), (5, 5, 0), (6, 6, 2)]);
    }
}
