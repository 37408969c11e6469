//! The mover behind `shardctl move`: carries one unit (a tenant, or a set of hash buckets) of a
//! distribution from its shard to another while routers keep serving it. Steps, each published
//! to every router through the catalog (docs/rebalancing.md):
//! validate → map with the move (copying) → publication + slot + snapshot copy → catch-up →
//! fence (routers drain and hold the unit) → marker → switch → verify → cleanup.
//! Control plane only: tokio-postgres and a replication connection, never the data path.

pub mod add;
pub mod apply;
pub mod copy;
pub mod plan;
pub mod standby;
pub mod stream;

use crate::backend::{BackendError, ConnectParams};
use crate::catalog::{Catalog, CatalogError};
use crate::shardmap::config::{KeyRange, MoveConfig, MovePhase, RangeConfig, ShardingConfig};
use crate::shardmap::{Located, ShardMap, Strategy};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::{ChangeStream, Event};
use tokio_postgres::{Client, NoTls};

/// Why a move stopped.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Refused(String),
    #[error("replication stream: {0}")]
    Stream(String),
    #[error("verification failed: {0}")]
    Mismatch(String),
    #[error("{}", db_detail(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request asked to stop after a phase (tests simulate a crash of shardctl this way).
    #[error("stopped after the {0:?} phase as asked; the move stays in flight")]
    Stopped(MovePhase),
}

/// A database error with the server's message and SQLSTATE (tokio-postgres shows "db error").
fn db_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({})", e, d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// How the mover reaches one shard's primary.
#[derive(Debug, Clone)]
pub struct ShardLink {
    /// libpq-style connection string for ordinary connections.
    pub dsn: String,
    /// The same server for the replication connection.
    pub connect: ConnectParams,
    /// Connection strings of the shard's replicas (routers read there).
    pub replicas: Vec<String>,
}

/// What to move.
#[derive(Debug, Clone)]
pub enum UnitSpec {
    Tenant(String),
    /// Inclusive bucket ranges.
    Buckets(Vec<[u32; 2]>),
    /// Keys `[lo, hi)` of a range distribution.
    Range(KeyRange),
}

/// A move as asked on the command line.
#[derive(Debug, Clone)]
pub struct MoveRequest {
    pub distribution: String,
    pub unit: UnitSpec,
    pub target: usize,
    /// How long every live router may take to acknowledge a map version.
    pub ack_timeout: Duration,
    /// Negative control for tests: switch without waiting for the marker (loses writes, which
    /// verification must catch).
    pub skip_marker_wait: bool,
    /// Tests: stop (as if shardctl crashed) once this phase is published.
    pub stop_after: Option<MovePhase>,
}

/// What a finished move measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MoveReport {
    pub id: u64,
    pub source: usize,
    pub target: usize,
    pub rows_copied: u64,
    pub bytes_copied: u64,
    pub copy_ms: u64,
    pub changes_applied: u64,
    pub catchup_ms: u64,
    /// Fence published → switch published: the longest any statement for the unit waited.
    pub pause_ms: f64,
    /// Parts of the pause: routers acknowledging the fence, then applying up to the marker.
    pub fence_ack_ms: f64,
    pub marker_ms: f64,
    pub groups_verified: usize,
    pub rows_verified: i64,
    pub rows_deleted_on_source: u64,
}

/// Runs a move to the end (or aborts it, leaving no trace, if anything fails before the switch).
pub async fn run(
    cat: &Catalog,
    shards: &[ShardLink],
    req: &MoveRequest,
    progress: &dyn Fn(&str),
) -> Result<MoveReport, MoveError> {
    let mut m = Mover::plan(cat, shards, req.clone()).await?;
    progress(&format!(
        "move {}: {} of {} from shard {} to shard {}",
        m.id, m.describe, req.distribution, m.source, m.target
    ));
    let r = m.before_switch(progress).await;
    if let Err(e @ MoveError::Stopped(_)) = r {
        return Err(e);
    }
    if let Err(e) = r {
        progress(&format!("move {}: {e}; aborting", m.id));
        m.abort().await;
        return Err(e);
    }
    // Switched: from here on the target serves the unit, so failures never undo the copy.
    let src = connect(&shards[m.source].dsn).await?;
    if let Err(e) = m.verify(&src).await {
        m.drop_replication(&src).await;
        return Err(e);
    }
    if m.req.stop_after == Some(MovePhase::Switched) {
        return Err(MoveError::Stopped(MovePhase::Switched));
    }
    m.after_switch(&src, progress).await?;
    Ok(m.report)
}

/// Undoes a move that stopped before its switch (shardctl died, or was killed): routers forget
/// it, its slot and publication are dropped, the target's partial copy deleted.
pub async fn abort(
    cat: &Catalog,
    shards: &[ShardLink],
    id: u64,
    ack_timeout: Duration,
    progress: &dyn Fn(&str),
) -> Result<(), MoveError> {
    let mut m = Mover::existing(cat, shards, id, ack_timeout).await?;
    if m.config.phase == MovePhase::Switched {
        return Err(MoveError::Refused(format!(
            "move {id} has switched: shard {} serves the unit now; `shardctl resume {id}` completes it (undoing a switched move needs reverse replication, not built yet)",
            m.target
        )));
    }
    m.abort().await;
    progress(&format!(
        "move {id}: aborted; the unit stays on shard {}",
        m.source
    ));
    Ok(())
}

/// Completes a move that stopped after its switch: replication dropped, the unit deleted from
/// the source, the move removed from the map.
pub async fn resume(
    cat: &Catalog,
    shards: &[ShardLink],
    id: u64,
    ack_timeout: Duration,
    progress: &dyn Fn(&str),
) -> Result<MoveReport, MoveError> {
    let mut m = Mover::existing(cat, shards, id, ack_timeout).await?;
    if m.config.phase != MovePhase::Switched {
        return Err(MoveError::Refused(format!(
            "move {id} stopped before its switch ({:?}); `shardctl abort {id}` and move again (resuming a copy is not built yet)",
            m.config.phase
        )));
    }
    let src = connect(&shards[m.source].dsn).await?;
    m.retain_existing(&src, progress).await?;
    m.after_switch(&src, progress).await?;
    Ok(m.report)
}

struct Mover<'a> {
    cat: &'a Catalog,
    shards: &'a [ShardLink],
    req: MoveRequest,
    id: u64,
    source: usize,
    target: usize,
    describe: String,
    config: MoveConfig,
    /// Tables of the distribution with their unit predicate and per-bucket grouping.
    tables: Vec<(String, String, String)>,
    key_columns: HashMap<String, String>,
    moving: Arc<ShardMap>,
    published: bool,
    slot: Option<String>,
    stream: Option<ChangeStream>,
    applier: Option<apply::Applier>,
    /// A target connection holding a snapshot taken just before the switch.
    at_switch: Option<Client>,
    report: MoveReport,
}

impl<'a> Mover<'a> {
    /// Checks the request against the current map and records the move in the catalog.
    async fn plan(
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
                    Located::Group(_) => {
                        return Err(MoveError::Refused("geo units cannot move yet".into()))
                    }
                }
            }
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
                UnitSpec::Tenant(t) => Some(t.clone()),
                _ => None,
            },
            buckets: match &req.unit {
                UnitSpec::Buckets(r) => r.clone(),
                _ => vec![],
            },
            range: match &req.unit {
                UnitSpec::Range(r) => Some(r.clone()),
                _ => None,
            },
            source,
            target: req.target,
            phase: MovePhase::Copying,
        };
        let mut with = base.sharding.clone();
        with.moves.push(config.clone());
        Mover::assemble(cat, shards, req, config, &with, base.shards, base.version)
    }

    /// A move already in the catalog's map (for abort and resume).
    async fn existing(
        cat: &'a Catalog,
        shards: &'a [ShardLink],
        id: u64,
        ack_timeout: Duration,
    ) -> Result<Mover<'a>, MoveError> {
        let base = cat
            .latest_map()
            .await?
            .ok_or_else(|| MoveError::Refused("the catalog holds no map yet".into()))?;
        let Some(config) = base.sharding.moves.iter().find(|m| m.id == id).cloned() else {
            let state: Option<String> = cat
                .client()
                .query_opt(
                    "SELECT state FROM pgshard.moves WHERE id = $1",
                    &[&(id as i64)],
                )
                .await
                .map_err(CatalogError::from)?
                .map(|r| r.get(0));
            return Err(MoveError::Refused(match state {
                Some(s) => format!("move {id} is not in flight (state {s})"),
                None => format!("there is no move {id}"),
            }));
        };
        let req = MoveRequest {
            distribution: config.distribution.clone(),
            unit: match (&config.tenant, &config.range) {
                (Some(t), _) => UnitSpec::Tenant(t.clone()),
                (None, Some(r)) => UnitSpec::Range(r.clone()),
                (None, None) => UnitSpec::Buckets(config.buckets.clone()),
            },
            target: config.target,
            ack_timeout,
            skip_marker_wait: false,
            stop_after: None,
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
        m.slot = Some(m.name());
        Ok(m)
    }

    /// The mover's working state for `config` within the map `sharding` (which holds the move).
    fn assemble(
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
        for (name, column) in moving.tables_of(motion.dist) {
            let pred = motion
                .predicate_sql(&column, &d.key_type, moving.buckets)
                .ok_or_else(|| MoveError::Refused(format!("column {column} cannot be quoted")))?;
            // Verification compares per bucket, or a tenant or key range as one group.
            let g = match config.buckets.is_empty() {
                true => "0".to_string(),
                false => crate::pghash::bucket_sql(&column, &d.key_type, moving.buckets)
                    .unwrap_or_else(|| "0".into()),
            };
            key_columns.insert(name.clone(), column);
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
            slot: None,
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
    async fn retain_existing(
        &mut self,
        src: &Client,
        progress: &dyn Fn(&str),
    ) -> Result<(), MoveError> {
        let mut present = Vec::new();
        for t in std::mem::take(&mut self.tables) {
            if copy::exists(src, &t.0).await? {
                present.push(t);
            } else {
                progress(&format!(
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

    fn name(&self) -> String {
        format!("pgshard_move_{}", self.id)
    }

    async fn state(&self, state: &str, detail: &str) {
        let _ = self
            .cat
            .client()
            .execute("UPDATE pgshard.moves SET state = $2, detail = $3, updated_at = now() WHERE id = $1", &[&(self.id as i64), &state, &detail])
            .await;
    }

    /// Publishes the latest map changed by `edit`, retrying if another writer got in first.
    async fn publish(
        &self,
        note: &str,
        edit: impl Fn(&mut ShardingConfig),
    ) -> Result<u64, MoveError> {
        publish_edit(self.cat, note, |s, _| edit(s)).await
    }

    /// Waits until every router holding a live lease serves version `v` or later.
    async fn acks(&self, v: u64) -> Result<(), MoveError> {
        wait_acks(self.cat, v, self.req.ack_timeout).await
    }

    async fn before_switch(&mut self, progress: &dyn Fn(&str)) -> Result<(), MoveError> {
        let mut src = connect(&self.shards[self.source].dsn).await?;
        let tgt = connect(&self.shards[self.target].dsn).await?;
        self.retain_existing(&src, progress).await?;
        for (table, _, _) in &self.tables {
            copy::validate(&src, &tgt, table, &self.key_columns[table]).await?;
        }
        // Routers must hide the target's copy from key-less statements before rows arrive.
        let cfg = self.config.clone();
        let v = self
            .publish(&format!("move {}: copying", self.id), |s| {
                s.moves.push(cfg.clone())
            })
            .await?;
        self.published = true;
        self.acks(v).await?;
        self.state("copying", "").await;
        tgt.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgshard; CREATE TABLE IF NOT EXISTS pgshard.move_progress \
             (move_id bigint PRIMARY KEY, applied_lsn pg_lsn NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        for (table, pred, _) in &self.tables {
            copy::delete_unit(&tgt, table, pred, 10_000).await?;
        }
        let filters: Result<Vec<String>, MoveError> = self
            .tables
            .iter()
            .map(|(t, p, _)| Ok(format!("{} WHERE ({p})", apply::table_ident(t)?)))
            .collect();
        src.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            self.name(),
            filters?.join(", ")
        ))
        .await?;
        let mut repl = stream::ReplicationConn::open(&self.shards[self.source].connect).await?;
        let slot = repl.create_slot(&self.name()).await?;
        self.slot = Some(slot.name.clone());
        let t = Instant::now();
        for (table, pred, _) in &self.tables {
            let (rows, bytes) =
                copy::copy_unit(&mut src, &tgt, &slot.snapshot, table, pred).await?;
            progress(&format!(
                "move {}: copied {rows} rows ({bytes} bytes) of {table}",
                self.id
            ));
            self.report.rows_copied += rows;
            self.report.bytes_copied += bytes;
        }
        self.report.copy_ms = t.elapsed().as_millis() as u64;
        self.stream = Some(
            repl.start(&slot.name, slot.consistent_point, &self.name())
                .await?,
        );
        let moving = self.moving.clone();
        let id = self.id;
        let owns: apply::Owns = Box::new(move |_table, key| {
            let m = moving.motions.iter().find(|m| m.id == id)?;
            let k = moving.parse_key(m.dist, key.as_bytes()).ok()?;
            Some(m.owns(&k, moving.buckets))
        });
        self.applier = Some(apply::Applier::new(
            self.id,
            self.key_columns.clone(),
            owns,
            slot.consistent_point,
        ));

        // Catch up until a probe marker comes back quickly: the target is close behind.
        let t = Instant::now();
        for round in 0.. {
            let r = Instant::now();
            self.marker(&src, &tgt, &format!("probe {round}")).await?;
            if r.elapsed() < Duration::from_millis(200) || round >= 50 {
                break;
            }
        }
        self.report.catchup_ms = t.elapsed().as_millis() as u64;
        if self.req.stop_after == Some(MovePhase::Copying) {
            return Err(MoveError::Stopped(MovePhase::Copying));
        }
        progress(&format!(
            "move {}: caught up ({} changes applied); fencing",
            self.id,
            self.applier.as_ref().map_or(0, |a| a.changes)
        ));

        let verify = connect(&self.shards[self.target].dsn).await?;
        // Fence: routers hold new statements for the unit and drain what began before.
        let fence_start = Instant::now();
        let v = self
            .publish(&format!("move {}: fenced", self.id), |s| {
                set_phase(s, self.id, MovePhase::Fenced)
            })
            .await?;
        self.state("fenced", "").await;
        self.acks(v).await?;
        self.report.fence_ack_ms = fence_start.elapsed().as_secs_f64() * 1000.0;
        if self.req.stop_after == Some(MovePhase::Fenced) {
            return Err(MoveError::Stopped(MovePhase::Fenced));
        }
        let t = Instant::now();
        if self.req.skip_marker_wait {
            emit_marker(&src, &self.name(), "fence").await?;
        } else {
            self.marker(&src, &tgt, "fence").await?;
        }
        self.report.marker_ms = t.elapsed().as_secs_f64() * 1000.0;
        // The target as of the switch, for verification after it.
        verify
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
            .await?;
        let (target, unit) = (self.target, self.config.clone());
        let dist = self
            .moving
            .distributions
            .iter()
            .position(|d| d.name == self.req.distribution)
            .unwrap_or(0);
        let owner = match &self.moving.distributions[dist].strategy {
            Strategy::Hash { bucket_shard } | Strategy::Tenant { bucket_shard, .. } => {
                bucket_shard.clone()
            }
            _ => vec![],
        };
        let id = self.id;
        self.publish(&format!("move {id}: switched"), |s| {
            switch(s, &unit, target, &owner)
        })
        .await?;
        self.report.pause_ms = fence_start.elapsed().as_secs_f64() * 1000.0;
        self.published = false;
        self.state("switched", "").await;
        progress(&format!(
            "move {}: switched after a {:.1} ms pause; verifying",
            self.id, self.report.pause_ms
        ));
        self.report.changes_applied = self.applier.as_ref().map_or(0, |a| a.changes);
        self.at_switch = Some(verify);
        Ok(())
    }

    /// Emits a transactional marker on the source and applies the stream up to it.
    async fn marker(&mut self, src: &Client, tgt: &Client, label: &str) -> Result<(), MoveError> {
        emit_marker(src, &self.name(), label).await?;
        let prefix = self.name();
        let (Some(stream), Some(applier)) = (self.stream.as_mut(), self.applier.as_mut()) else {
            return Err(MoveError::Stream("no stream".into()));
        };
        let mut seen = false;
        loop {
            if applier.pending() && !stream.buffered() {
                applier.flush(tgt).await?;
                stream.feedback(applier.applied).await?;
            }
            let ev = stream.next(applier.applied).await?;
            if let Event::Message { prefix: p, content } = &ev {
                seen |= *p == prefix && content == label.as_bytes();
            }
            let rel = match &ev {
                Event::Insert { rel, .. }
                | Event::Update { rel, .. }
                | Event::Delete { rel, .. } => stream.relation(*rel),
                _ => None,
            };
            applier.on_event(rel, &ev)?;
            if seen && matches!(ev, Event::Commit { .. }) {
                applier.flush(tgt).await?;
                stream.feedback(applier.applied).await?;
                return Ok(());
            }
        }
    }

    /// Compares the unit on the source (frozen since the fence) with the target as of the switch.
    async fn verify(&mut self, src: &Client) -> Result<(), MoveError> {
        let verify = self
            .at_switch
            .take()
            .ok_or_else(|| MoveError::Refused("no snapshot of the switch".into()))?;
        let verify = &verify;
        for (table, pred, group) in &self.tables {
            let a = copy::fingerprint(src, table, pred, group).await?;
            let b = copy::fingerprint(verify, table, pred, group).await?;
            if a != b {
                let bad: Vec<i64> = a
                    .iter()
                    .filter(|x| !b.contains(x))
                    .chain(b.iter().filter(|x| !a.contains(x)))
                    .map(|x| x.0)
                    .collect();
                let detail = format!("table {table}: groups {bad:?} differ between source and target (source {} rows, target {} rows)",
                    a.iter().map(|x| x.1).sum::<i64>(), b.iter().map(|x| x.1).sum::<i64>());
                self.state("switched-unverified", &detail).await;
                return Err(MoveError::Mismatch(detail));
            }
            self.report.groups_verified += a.len();
            self.report.rows_verified += a.iter().map(|x| x.1).sum::<i64>();
        }
        Ok(())
    }

    /// After the switch: drop replication, delete the unit from the source, end the move.
    async fn after_switch(
        &mut self,
        src: &Client,
        progress: &dyn Fn(&str),
    ) -> Result<(), MoveError> {
        self.drop_replication(src).await;
        let v = self.cat.latest_map().await?.map_or(0, |m| m.version);
        self.acks(v).await?;
        for (table, pred, _) in &self.tables {
            self.report.rows_deleted_on_source +=
                copy::delete_unit(src, table, pred, 10_000).await?;
        }
        self.wait_standbys(progress).await?;
        let id = self.id;
        self.publish(&format!("move {id}: done"), |s| {
            s.moves.retain(|m| m.id != id)
        })
        .await?;
        self.state("done", "").await;
        progress(&format!(
            "move {}: done; {} rows removed from shard {}",
            self.id, self.report.rows_deleted_on_source, self.source
        ));
        Ok(())
    }

    /// Routers read the unit's tables on replicas again once the move leaves the map: the
    /// replicas of both shards must have replayed the copy and the deletions first.
    async fn wait_standbys(&self, progress: &dyn Fn(&str)) -> Result<(), MoveError> {
        for shard in [self.source, self.target] {
            let c = connect(&self.shards[shard].dsn).await?;
            for (i, r) in self.shards[shard].replicas.iter().enumerate() {
                match standby::wait_replayed(&c, r, Duration::from_secs(30)).await {
                    Ok(true) => {}
                    Ok(false) => progress(&format!("move {}: warning: replica {i} of shard {shard} still lags after 30 s; routers skip replicas beyond max_replica_lag", self.id)),
                    Err(e) => progress(&format!("move {}: warning: replica {i} of shard {shard}: {e}; routers skip replicas they cannot reach", self.id)),
                }
            }
        }
        Ok(())
    }

    async fn drop_replication(&mut self, src: &Client) {
        self.stream = None;
        if let Some(slot) = self.slot.take() {
            // The walsender lets go of the slot a moment after its connection closes.
            for _ in 0..50 {
                let sql = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
                if src.execute(sql, &[&slot]).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let _ = src
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name()))
            .await;
    }

    /// Undoes a move that has not switched: routers forget it, replication is dropped, and the
    /// target's partial copy is deleted.
    /// The copy is deleted while the move is still in the map: until the move leaves it, routers
    /// leave the target's copy out of key-less reads.
    async fn abort(&mut self) {
        let id = self.id;
        if self.published {
            // Statements held by a fence go on at once.
            let _ = self
                .publish(&format!("move {id}: aborting"), |s| {
                    set_phase(s, id, MovePhase::Copying)
                })
                .await;
        }
        if let Ok(src) = connect(&self.shards[self.source].dsn).await {
            self.drop_replication(&src).await;
        }
        if let Ok(tgt) = connect(&self.shards[self.target].dsn).await {
            for (table, pred, _) in &self.tables {
                let _ = copy::delete_unit(&tgt, table, pred, 10_000).await;
            }
        }
        if self.published {
            let _ = self.wait_standbys(&|m| eprintln!("{m}")).await;
            let _ = self
                .publish(&format!("move {id}: aborted"), |s| {
                    s.moves.retain(|m| m.id != id)
                })
                .await;
        }
        self.state("aborted", "").await;
    }
}

/// Publishes the catalog's latest map changed by `edit` (which also gets the shard count to
/// change), retrying when another publisher got there first.
pub(crate) async fn publish_edit(
    cat: &Catalog,
    note: &str,
    edit: impl Fn(&mut ShardingConfig, &mut usize),
) -> Result<u64, MoveError> {
    for _ in 0..5 {
        let latest = cat
            .latest_map()
            .await?
            .ok_or_else(|| MoveError::Refused("the catalog lost its map".into()))?;
        let mut next = latest.sharding.clone();
        let mut shards = latest.shards;
        edit(&mut next, &mut shards);
        match cat.publish_map(latest.version, &next, shards, note).await {
            Ok(v) => return Ok(v),
            Err(CatalogError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(MoveError::Refused("the catalog map keeps changing".into()))
}

/// Waits until every router holding a live lease serves version `v` or later.
pub(crate) async fn wait_acks(cat: &Catalog, v: u64, timeout: Duration) -> Result<(), MoveError> {
    let deadline = Instant::now() + timeout;
    loop {
        let routers = cat.routers().await?;
        let behind: Vec<String> = routers
            .iter()
            .filter(|r| r.lease_left > 0.0 && r.acked_version < v)
            .map(|r| r.router_id.clone())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(MoveError::Refused(format!(
                "routers {} did not acknowledge map version {v} within {timeout:?} (long transactions, or unreachable routers)",
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn set_phase(s: &mut ShardingConfig, id: u64, phase: MovePhase) {
    for m in s.moves.iter_mut().filter(|m| m.id == id) {
        m.phase = phase;
    }
}

/// The map with the unit placed on `target` and the move marked switched; `owner` is the
/// distribution's bucket → shard placement before the move.
fn switch(s: &mut ShardingConfig, unit: &MoveConfig, target: usize, owner: &[usize]) {
    set_phase(s, unit.id, MovePhase::Switched);
    let Some(d) = s
        .distributions
        .iter_mut()
        .find(|d| d.name == unit.distribution)
    else {
        return;
    };
    if let Some(t) = &unit.tenant {
        d.tenants.insert(t.clone(), target);
        return;
    }
    if let Some(r) = &unit.range {
        d.ranges = split_range(&d.ranges, &d.key_type, r, target);
        return;
    }
    let mut owner = owner.to_vec();
    for &[lo, hi] in &unit.buckets {
        for b in lo..=hi {
            owner[b as usize] = target;
        }
    }
    d.bucket_map = add::bucket_ranges(&owner);
}

/// A range distribution's entries with `[r.lo, r.hi)` cut out of the entry holding it and
/// given to `target` (the pieces left and right of it stay where they were).
fn split_range(
    entries: &[RangeConfig],
    key_type: &str,
    r: &KeyRange,
    target: usize,
) -> Vec<RangeConfig> {
    let key = |b: &Option<crate::shardmap::config::Bound>| {
        b.as_ref()
            .and_then(|b| crate::shardmap::bound_key(key_type, b).ok())
    };
    let span = (key(&r.lo), key(&r.hi));
    let mut out = Vec::new();
    for e in entries {
        let inside =
            crate::shardmap::range_entry(&[(key(&e.lo), key(&e.hi), e.shard)], &span).is_some();
        if !inside {
            out.push(e.clone());
            continue;
        }
        if r.lo.is_some() && key(&e.lo) != span.0 {
            out.push(RangeConfig {
                lo: e.lo.clone(),
                hi: r.lo.clone(),
                shard: e.shard,
            });
        }
        out.push(RangeConfig {
            lo: r.lo.clone(),
            hi: r.hi.clone(),
            shard: target,
        });
        if r.hi.is_some() && key(&e.hi) != span.1 {
            out.push(RangeConfig {
                lo: r.hi.clone(),
                hi: e.hi.clone(),
                shard: e.shard,
            });
        }
    }
    out
}

/// Writes a transactional marker into the source's WAL. Its commit flushes the WAL even where
/// `synchronous_commit = off` (the walsender only sends flushed WAL; otherwise the marker would
/// wait for the WAL writer, up to `wal_writer_delay`, inside the write pause).
async fn emit_marker(src: &Client, prefix: &str, label: &str) -> Result<(), MoveError> {
    src.batch_execute(&format!(
        "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, '{prefix}', '{}'); COMMIT",
        label.replace('\'', "''")
    ))
    .await?;
    Ok(())
}

async fn connect(dsn: &str) -> Result<Client, MoveError> {
    let (c, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::split_range;
    use crate::shardmap::config::{Bound, KeyRange, RangeConfig};

    fn entry(lo: Option<i64>, hi: Option<i64>, shard: usize) -> RangeConfig {
        RangeConfig {
            lo: lo.map(Bound::Int),
            hi: hi.map(Bound::Int),
            shard,
        }
    }

    #[test]
    fn a_moved_range_splits_its_entry() {
        let map = [entry(None, Some(100), 0), entry(Some(100), None, 1)];
        let unit = KeyRange {
            lo: Some(Bound::Int(10)),
            hi: Some(Bound::Int(20)),
        };
        let got = split_range(&map, "int8", &unit, 1);
        let want = [
            entry(None, Some(10), 0),
            entry(Some(10), Some(20), 1),
            entry(Some(20), Some(100), 0),
            entry(Some(100), None, 1),
        ];
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        // A unit that starts where its entry starts leaves no empty piece behind.
        let unit = KeyRange {
            lo: Some(Bound::Int(100)),
            hi: None,
        };
        let got = split_range(&map, "int8", &unit, 0);
        assert_eq!(
            format!("{got:?}"),
            format!(
                "{:?}",
                [entry(None, Some(100), 0), entry(Some(100), None, 0)]
            )
        );
    }
}
