//! The mover's state and its setup: a move planned from a request, or one already in the
//! catalog's map (abort, resume), assembled with its tables' predicates.

use super::stream::ChangeStream;
use super::Progress;
use super::{
    apply, copy, publish_edit, wait_acks, MoveError, MoveReport, MoveRequest, ShardLink, UnitSpec,
};
use crate::catalog::{Catalog, CatalogError};
use crate::shardmap::config::{MoveConfig, MovePhase, ShardingConfig};
use crate::shardmap::{Located, ShardMap, Strategy};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::Client;

/// One move in progress.
pub(super) struct Mover<'a> {
    pub(super) cat: &'a Catalog,
    pub(super) shards: &'a [ShardLink],
    pub(super) req: MoveRequest,
    pub(super) id: u64,
    pub(super) source: usize,
    pub(super) target: usize,
    pub(super) describe: String,
    pub(super) config: MoveConfig,
    /// Tables of the distribution with their unit predicate and per-bucket grouping.
    pub(super) tables: Vec<(String, String, String)>,
    pub(super) key_columns: HashMap<String, apply::Placement>,
    pub(super) moving: Arc<ShardMap>,
    pub(super) published: bool,
    pub(super) stream: Option<ChangeStream>,
    pub(super) applier: Option<apply::Applier>,
    /// A target connection holding a snapshot taken just before the switch.
    pub(super) at_switch: Option<Client>,
    pub(super) report: MoveReport,
}

impl<'a> Mover<'a> {
    /// Checks the request against the current map and records the move in the catalog.
    pub(super) async fn plan(
        cat: &'a Catalog,
        shards: &'a [ShardLink],
        req: MoveRequest,
    ) -> Result<Mover<'a>, MoveError> {
        let base = cat
            .latest_map()
            .await?
            .ok_or_else(|| MoveError::Refused("the catalog holds no map yet".into()))?;
        let map = ShardMap::build(&base.sharding, base.shards, base.version)
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        let dist = map
            .distributions
            .iter()
            .position(|d| d.name == req.distribution)
            .ok_or_else(|| {
                MoveError::Refused(format!("no distribution named {}", req.distribution))
            })?;
        if let Some(m) = map.motions.iter().find(|m| m.dist == dist) {
            return Err(MoveError::Refused(format!(
                "move {} of {} is still in flight; finish or abort it first",
                m.id, req.distribution
            )));
        }
        let source = match &req.unit {
            UnitSpec::Tenant(t) => {
                let k = map
                    .parse_key(dist, t.as_bytes())
                    .map_err(|e| MoveError::Refused(e.to_string()))?;
                match map
                    .locate(dist, &k, None)
                    .map_err(|e| MoveError::Refused(e.to_string()))?
                {
                    Located::One(s) => s,
                    // The map's own check (motion::build) says why: a region on several shards.
                    Located::Group(g) => g.first().copied().unwrap_or(0),
                }
            }
            UnitSpec::RegionShare { from, .. } => *from,
            UnitSpec::Buckets(r) => {
                match (&map.distributions[dist].strategy, r.first()) {
                    (
                        Strategy::Hash { bucket_shard } | Strategy::Tenant { bucket_shard, .. },
                        Some(&[lo, _]),
                    ) if (lo as usize) < bucket_shard.len() => bucket_shard[lo as usize],
                    _ => return Err(MoveError::Refused(
                        "bucket units need a hash or tenant distribution and valid bucket ranges"
                            .into(),
                    )),
                }
            }
            UnitSpec::Range(r) => {
                let d = &map.distributions[dist];
                let Strategy::Range { ranges } = &d.strategy else {
                    return Err(MoveError::Refused(format!(
                        "{} is not a range distribution",
                        req.distribution
                    )));
                };
                let key = |b: &Option<crate::shardmap::config::Bound>| {
                    b.as_ref()
                        .map(|b| crate::shardmap::bound_key(&d.key_type, b))
                        .transpose()
                };
                let span = (
                    key(&r.lo).map_err(|e| MoveError::Refused(e.to_string()))?,
                    key(&r.hi).map_err(|e| MoveError::Refused(e.to_string()))?,
                );
                let e = crate::shardmap::range_entry(ranges, &span)
                    .ok_or_else(|| MoveError::Refused("the range must lie within one range of the map (`shardctl map` shows them)".into()))?;
                ranges[e].2
            }
        };
        if req.target >= shards.len() || req.target == source {
            return Err(MoveError::Refused(format!(
                "target shard {} must be another existing shard (the unit is on {source})",
                req.target
            )));
        }
        let share = match &req.unit {
            UnitSpec::RegionShare { region, from } => {
                let link = shards
                    .get(*from)
                    .ok_or_else(|| MoveError::Refused(format!("--from {from} names no shard")))?;
                region_share(&map, dist, region, *from, link).await?
            }
            _ => None,
        };
        let row = cat
            .client()
            .query_one(
                "INSERT INTO pgshard.moves (distribution, unit, source, target, state) VALUES ($1, $2, $3, $4, 'planned') RETURNING id",
                &[&req.distribution, &format!("{:?}", req.unit), &(source as i32), &(req.target as i32)],
            )
            .await
            .map_err(CatalogError::from)?;
        let id = row.get::<_, i64>(0) as u64;
        let config = MoveConfig {
            id,
            distribution: req.distribution.clone(),
            tenant: match &req.unit {
                UnitSpec::Tenant(t) | UnitSpec::RegionShare { region: t, .. } => Some(t.clone()),
                _ => None,
            },
            buckets: match (&req.unit, &share) {
                (UnitSpec::Buckets(r), _) => r.clone(),
                (_, Some((r, _))) => r.clone(),
                _ => vec![],
            },
            range: match &req.unit {
                UnitSpec::Range(r) => Some(r.clone()),
                _ => None,
            },
            source,
            target: req.target,
            phase: MovePhase::Copying,
            undo: false,
            undo_unverified: false,
            hash_type: share.map(|(_, t)| t),
        };
        let mut with = base.sharding.clone();
        with.moves.push(config.clone());
        Mover::assemble(cat, shards, req, config, &with, base.shards, base.version)
    }

    /// A move already in the catalog's map (for abort and resume).
    pub(super) async fn existing(
        cat: &'a Catalog,
        shards: &'a [ShardLink],
        id: u64,
        controls: &super::Controls,
    ) -> Result<Mover<'a>, MoveError> {
        let base = cat
            .latest_map()
            .await?
            .ok_or_else(|| MoveError::Refused("the catalog holds no map yet".into()))?;
        let Some(config) = base.sharding.moves.iter().find(|m| m.id == id).cloned() else {
            return Err(MoveError::Refused(match recorded_state(cat, id).await? {
                Some(s) => format!("move {id} is not in flight (state {s})"),
                None => format!("there is no move {id}"),
            }));
        };
        let req = MoveRequest {
            distribution: config.distribution.clone(),
            unit: match (&config.tenant, &config.range) {
                (Some(t), _) if config.hash_type.is_some() => UnitSpec::RegionShare {
                    region: t.clone(),
                    from: config.source,
                },
                (Some(t), _) => UnitSpec::Tenant(t.clone()),
                (None, Some(r)) => UnitSpec::Range(r.clone()),
                (None, None) => UnitSpec::Buckets(config.buckets.clone()),
            },
            target: config.target,
            ack_timeout: controls.ack_timeout,
            skip_marker_wait: false,
            stop_after: controls.stop_after,
            hold: false,
            pause_after_copy: None,
            copy: controls.copy,
        };
        let mut m = Mover::assemble(
            cat,
            shards,
            req,
            config,
            &base.sharding,
            base.shards,
            base.version,
        )?;
        m.published = true;
        Ok(m)
    }

    /// The mover's working state for `config` within the map `sharding` (which holds the move).
    pub(super) fn assemble(
        cat: &'a Catalog,
        shards: &'a [ShardLink],
        req: MoveRequest,
        config: MoveConfig,
        sharding: &ShardingConfig,
        nshards: usize,
        version: u64,
    ) -> Result<Mover<'a>, MoveError> {
        let id = config.id;
        let moving = Arc::new(
            ShardMap::build(sharding, nshards, version)
                .map_err(|e| MoveError::Refused(e.to_string()))?,
        );
        let motion =
            moving.motions.iter().find(|m| m.id == id).ok_or_else(|| {
                MoveError::Refused("the move did not make it into the map".into())
            })?;
        let d = &moving.distributions[motion.dist];
        let mut tables = Vec::new();
        let mut key_columns = HashMap::new();
        let share = match &motion.unit {
            crate::shardmap::motion::Unit::Region { share, .. } => share.as_ref(),
            _ => None,
        };
        for (name, column) in moving.tables_of(motion.dist) {
            let hash_column = match moving.table(&name) {
                Some(crate::shardmap::TableRule::Sharded { hash_column, .. }) => {
                    hash_column.clone()
                }
                _ => None,
            };
            let pred = moving.unit_predicate(motion, &name).ok_or_else(|| {
                MoveError::Refused(match (share, &hash_column) {
                    (Some(_), None) => format!("table {name} has no hash_column, so its rows of the region's share cannot be told apart"),
                    _ => format!("column {column} of {name} cannot be quoted"),
                })
            })?;
            // Verification compares per bucket (a region's share: per bucket of the hash
            // column), or a tenant, region or key range as one group.
            let g = match (share, &hash_column) {
                (Some(sh), Some(h)) => crate::pghash::bucket_sql(h, &sh.hash_type, moving.buckets),
                _ if config.buckets.is_empty() => None,
                _ => crate::pghash::bucket_sql(&column, &d.key_type, moving.buckets),
            }
            .unwrap_or_else(|| "0".into());
            let within = share.and(hash_column);
            key_columns.insert(
                name.clone(),
                apply::Placement {
                    key: column,
                    within,
                },
            );
            tables.push((name, pred, g));
        }
        if tables.is_empty() {
            return Err(MoveError::Refused(format!(
                "no table is placed by distribution {}",
                config.distribution
            )));
        }
        let describe = motion.describe();
        let (source, target) = (config.source, config.target);
        Ok(Mover {
            cat,
            shards,
            req,
            id,
            source,
            target,
            describe,
            config,
            tables,
            key_columns,
            moving,
            published: false,
            stream: None,
            applier: None,
            at_switch: None,
            report: MoveReport {
                id,
                source,
                target,
                ..Default::default()
            },
        })
    }

    /// Keeps the tables the source has (a declared table it lacks holds none of the unit).
    pub(super) async fn retain_existing(
        &mut self,
        src: &Client,
        progress: &dyn Progress,
    ) -> Result<(), MoveError> {
        let mut present = Vec::new();
        for t in std::mem::take(&mut self.tables) {
            if copy::exists(src, &t.0).await? {
                present.push(t);
            } else {
                progress.line(&format!(
                    "move {}: table {} does not exist on shard {}; nothing of it to move",
                    self.id, t.0, self.source
                ));
            }
        }
        if present.is_empty() {
            return Err(MoveError::Refused(format!(
                "no table of distribution {} exists on shard {}",
                self.req.distribution, self.source
            )));
        }
        self.tables = present;
        Ok(())
    }

    /// The slot, publication and marker prefix of the move on its source: an undo streams from
    /// the reverse slot made on the target before the switch.
    pub(super) fn name(&self) -> String {
        match self.config.undo {
            false => forward_name(self.id),
            true => reverse_name(self.id),
        }
    }

    /// Records the move's state in the catalog's `pgshard.moves` (an undo's states say so).
    pub(super) async fn state(&self, state: &str, detail: &str) {
        let state = match (self.config.undo, state) {
            (false, s) => s.to_string(),
            (true, "done") => "undone".to_string(),
            (true, s) => format!("undoing ({s})"),
        };
        let _ = self
            .cat
            .client()
            .execute("UPDATE pgshard.moves SET state = $2, detail = $3, updated_at = now() WHERE id = $1", &[&(self.id as i64), &state, &detail])
            .await;
    }

    /// Publishes the latest map changed by `edit`, retrying if another writer got in first.
    pub(super) async fn publish(
        &self,
        note: &str,
        edit: impl Fn(&mut ShardingConfig),
    ) -> Result<u64, MoveError> {
        publish_edit(self.cat, note, |s, _| edit(s)).await
    }

    /// Waits until every router holding a live lease serves version `v` or later.
    pub(super) async fn acks(&self, v: u64) -> Result<(), MoveError> {
        wait_acks(self.cat, v, self.req.ack_timeout).await
    }
}

/// The state `pgshard.moves` records for move `id`, if there is such a move.
pub(super) async fn recorded_state(cat: &Catalog, id: u64) -> Result<Option<String>, MoveError> {
    Ok(cat
        .client()
        .query_opt(
            "SELECT state FROM pgshard.moves WHERE id = $1",
            &[&(id as i64)],
        )
        .await
        .map_err(CatalogError::from)?
        .map(|r| r.get(0)))
}

/// Slot and publication of move `id` on its source.
pub(super) fn forward_name(id: u64) -> String {
    format!("pgshard_move_{id}")
}

/// Slot and publication on the target that keep the changes made there once move `id`
/// switched, for an undo to carry back.
pub(super) fn reverse_name(id: u64) -> String {
    format!("pgshard_back_{id}")
}

/// The hash buckets of region `region` that shard `from` holds in the region's group, with
/// how the distribution's hash columns hash in SQL; None when `from` holds all of the region
/// (it then moves whole). Integer and uuid hash columns only: a text value that looks like a
/// number is hashed as one by the routers' placement, which no SQL row filter can mirror.
async fn region_share(
    map: &ShardMap,
    dist: usize,
    region: &str,
    from: usize,
    link: &ShardLink,
) -> Result<Option<(Vec<[u32; 2]>, String)>, MoveError> {
    let refuse = |m: String| Err(MoveError::Refused(m));
    let d = &map.distributions[dist];
    let Strategy::Geo { regions, .. } = &d.strategy else {
        return refuse(format!(
            "--from names a member of a region's group: {} is not a geo distribution",
            d.name
        ));
    };
    let Some(group) = regions.get(region.as_bytes()) else {
        return refuse(format!(
            "region '{region}' is not listed in distribution {}'s regions",
            d.name
        ));
    };
    if !group.contains(&from) {
        return refuse(format!(
            "region '{region}' is on shards {group:?}, not on shard {from}"
        ));
    }
    if group.iter().all(|&s| s == from) {
        return Ok(None);
    }
    let n = group.len();
    let mut ranges: Vec<[u32; 2]> = Vec::new();
    let member = |b: u32| group[crate::shardmap::group_member(n, b, map.buckets)];
    for bucket in (0..map.buckets).filter(|&b| member(b) == from) {
        match ranges.last_mut() {
            Some(r) if r[1] + 1 == bucket => r[1] = bucket,
            _ => ranges.push([bucket, bucket]),
        }
    }
    let client = super::connect(&link.dsn).await?;
    let mut hash_type: Option<&str> = None;
    for (table, _) in map.tables_of(dist) {
        let Some(crate::shardmap::TableRule::Sharded {
            hash_column: Some(h),
            ..
        }) = map.table(&table)
        else {
            return refuse(format!("table {table} has no hash_column, so its rows of region '{region}' cannot be told apart by member: give it one, or move the whole region"));
        };
        let Some(ty) = copy::column_type(&client, &table, h).await? else {
            // A table the source lacks holds none of the share (`retain_existing`); one that
            // lacks the column is refused by the validation of the move.
            continue;
        };
        let Some(class) = copy::hash_class(&ty) else {
            return refuse(format!("table {table}'s hash column {h} is {ty}: a share of a region's group moves only with integer or uuid hash columns (text that looks like a number is hashed as a number by the routers, which SQL cannot mirror); move the whole region"));
        };
        if hash_type.is_some_and(|t| t != class) {
            return refuse(format!(
                "the hash columns of distribution {} differ in type ({table}'s is {ty})",
                d.name
            ));
        }
        hash_type = Some(class);
    }
    let Some(t) = hash_type else {
        return refuse(format!(
            "no table of distribution {} exists on shard {from}",
            d.name
        ));
    };
    Ok(Some((ranges, t.to_string())))
}
