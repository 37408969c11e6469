//! The mover behind `shardctl move`: carries one unit (a tenant, a set of hash buckets, or a
//! key range) of a distribution from its shard to another while routers keep serving it. Steps, each published
//! to every router through the catalog (docs/rebalancing.md):
//! validate → map with the move (copying) → publication + slot + snapshot copy → catch-up →
//! fence (routers drain and hold the unit) → marker → switch → verify → cleanup; `abort` after
//! the switch runs the move back (`undo`).
//! Control plane only: tokio-postgres and a replication connection, never the data path.
//! Here: the entry points (`run`, `abort`, `resume`) and catalog helpers; `mover` sets a move
//! up, `phases` runs its steps, `mapedit` writes its map changes; `copy`, `stream`, `apply` and
//! `standby` talk to the servers; `plan` and `add` are `shardctl plan` and `add-shard`.

pub mod add;
pub mod apply;
pub mod copy;
mod mapedit;
mod mover;
mod phases;
pub mod plan;
pub mod standby;
pub mod stream;
mod undo;
pub mod verify;

use crate::backend::{BackendError, ConnectParams};
use crate::catalog::{Catalog, CatalogError};
use crate::shardmap::config::{KeyRange, MovePhase, ShardingConfig};
use mover::Mover;
use std::time::{Duration, Instant};
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
    /// A tenant, or a whole region of a geo distribution.
    Tenant(String),
    /// The share of a region that shard `from` holds in the region's group.
    RegionShare { region: String, from: usize },
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
    /// Tests: wait this long after the copy (a test fails the source meanwhile).
    pub pause_after_copy: Option<Duration>,
    /// Stop after the switch is verified, keeping the source's rows and the reverse slot:
    /// `resume` completes the move, `abort` moves the unit back.
    pub hold: bool,
    /// Parallel COPY streams per table (each reads its own pages under the slot's snapshot).
    pub copy: copy::CopyStreams,
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
    /// Time the target spent applying changes (catch-up and up to the fence marker).
    pub apply_ms: f64,
    /// Fence published → switch published: the longest any statement for the unit waited.
    pub pause_ms: f64,
    /// Parts of the pause: routers acknowledging the fence, then applying up to the marker.
    pub fence_ack_ms: f64,
    pub marker_ms: f64,
    pub groups_verified: usize,
    pub rows_verified: i64,
    pub rows_deleted_on_source: u64,
    /// The move was held after its switch (`MoveRequest::hold`).
    pub held: bool,
}

/// Where a move reports how it goes: finished steps as lines, long steps (the copy, the
/// catch-up) as they advance. shardctl draws progress bars; a closure taking lines will do.
pub trait Progress {
    /// One finished step.
    fn line(&self, msg: &str);
    /// A long step advancing: `done` of `total` rows (None: not known in advance).
    fn advance(&self, _step: &str, _done: u64, _total: Option<u64>) {}
    /// The long step that was advancing has ended.
    fn step_done(&self) {}
}

impl<F: Fn(&str)> Progress for F {
    fn line(&self, msg: &str) {
        self(msg)
    }
}

/// How shardctl runs on a move already in the catalog (`resume`, `abort`): the unit and
/// shards come from the catalog, these from the command line.
#[derive(Debug, Clone)]
pub struct Controls {
    /// How long every live router may take to acknowledge a map version.
    pub ack_timeout: Duration,
    pub copy: copy::CopyStreams,
    /// Tests: stop (as if shardctl crashed) once this phase is published.
    pub stop_after: Option<MovePhase>,
}

/// Runs a move to the end (or aborts it, leaving no trace, if anything fails before the switch).
pub async fn run(
    cat: &Catalog,
    shards: &[ShardLink],
    req: &MoveRequest,
    progress: &dyn Progress,
) -> Result<MoveReport, MoveError> {
    let m = Mover::plan(cat, shards, req.clone()).await?;
    progress.line(&format!(
        "move {}: {} of {} from shard {} to shard {}",
        m.id, m.describe, req.distribution, m.source, m.target
    ));
    drive(m, progress).await
}

/// Takes a move through copy, catch-up, fence and switch to its end; failures before the switch
/// abort it.
async fn drive(mut m: Mover<'_>, progress: &dyn Progress) -> Result<MoveReport, MoveError> {
    let shards = m.shards;
    let r = m.before_switch(progress).await;
    if let Err(e @ MoveError::Stopped(_)) = r {
        return Err(e);
    }
    if let Err(e) = r {
        if m.config.undo {
            // Never abort an undo: that would delete the rows it is bringing back.
            progress.line(&format!(
                "move {}: undo stopped: {e}; shard {} serves the unit; `shardctl resume {}` retries the undo",
                m.id, m.source, m.id
            ));
            if let Err(u) = m.unfence().await {
                progress.line(&format!("move {}: could not release the fence ({u})", m.id));
            }
            return Err(e);
        }
        progress.line(&format!("move {}: {e}; aborting", m.id));
        if let Err(a) = m.abort().await {
            progress.line(&format!(
                "move {}: abort incomplete ({a}); `shardctl abort {}` finishes it",
                m.id, m.id
            ));
        }
        return Err(e);
    }
    // Switched: from here on the target serves the unit, so failures never undo the copy.
    let src = connect(&shards[m.source].dsn).await?;
    match m.verify(&src).await {
        Err(MoveError::Mismatch(d)) if m.config.undo_unverified => progress.line(&format!(
            "move {}: {d}; expected: the undone switch had failed verification, and shard {} keeps the writes shard {} missed",
            m.id, m.target, m.source
        )),
        Err(e) => {
            m.drop_replication(&src).await;
            if !m.config.undo {
                let (id, source, target) = (m.id, m.source, m.target);
                progress.line(&format!("move {id}: shard {source} keeps the unit's rows; `shardctl abort {id}` moves the unit back to it (with the writes made on shard {target} since the switch)"));
            }
            return Err(e);
        }
        Ok(()) => {}
    }
    if m.req.stop_after == Some(MovePhase::Switched) {
        return Err(MoveError::Stopped(MovePhase::Switched));
    }
    if m.req.hold && !m.config.undo {
        m.drop_replication(&src).await;
        m.state("switched", "held").await;
        progress.line(&format!(
            "move {id}: switched and verified; held: shard {} keeps the unit's rows and shard {} the changes made since; `shardctl resume {id}` completes the move, `shardctl abort {id}` moves the unit back",
            m.source, m.target, id = m.id
        ));
        m.report.held = true;
        return Ok(m.report);
    }
    m.after_switch(&src, progress).await?;
    Ok(m.report)
}

/// Undoes a move. Before its switch (shardctl died, or was killed): routers forget it, its
/// slots and publications are dropped, the target's partial copy deleted. After it: the unit
/// moves back to its source, with the writes the target took since the switch.
pub async fn abort(
    cat: &Catalog,
    shards: &[ShardLink],
    id: u64,
    controls: &Controls,
    progress: &dyn Progress,
) -> Result<(), MoveError> {
    let mut m = Mover::existing(cat, shards, id, controls).await?;
    match (m.config.undo, m.config.phase) {
        (true, _) => {
            return Err(MoveError::Refused(format!(
                "move {id} is being undone (back to shard {}); `shardctl resume {id}` finishes the undo",
                m.target
            )))
        }
        (false, MovePhase::Switched) => {
            let r = undo::undo(m, progress).await?;
            progress.line(&format!(
                "move {id}: undone after a {:.1} ms pause; the unit is back on shard {}",
                r.pause_ms, r.target
            ));
            return Ok(());
        }
        (false, _) => {}
    }
    m.abort().await?;
    progress.line(&format!(
        "move {id}: aborted; the unit stays on shard {}",
        m.source
    ));
    Ok(())
}

/// Completes a move that stopped: after its switch, replication is dropped, the unit deleted
/// from the source and the move removed from the map; before it, the copy starts over (a slot's
/// exported snapshot dies with the connection that made it, so a copy cannot continue where it
/// stopped): held statements are released, the old slot dropped, the partial copy deleted, and
/// the move runs on under its id.
pub async fn resume(
    cat: &Catalog,
    shards: &[ShardLink],
    id: u64,
    controls: &Controls,
    progress: &dyn Progress,
) -> Result<MoveReport, MoveError> {
    let mut m = Mover::existing(cat, shards, id, controls).await?;
    if m.config.undo && m.config.phase != MovePhase::Switched {
        // The reverse slot still holds what the undo has not applied: stream on from it.
        progress.line(&format!(
            "move {id}: undo stopped before its switch; going on"
        ));
        m.unfence().await?;
        return drive(m, progress).await;
    }
    if m.config.phase != MovePhase::Switched {
        progress.line(&format!(
            "move {id}: stopped before its switch; copying {} to shard {} again",
            m.describe, m.target
        ));
        m.restart().await?;
        return drive(m, progress).await;
    }
    let src = connect(&shards[m.source].dsn).await?;
    m.retain_existing(&src, progress).await?;
    m.after_switch(&src, progress).await?;
    Ok(m.report)
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

pub(crate) async fn connect(dsn: &str) -> Result<Client, MoveError> {
    let (c, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// True when the server at `dsn` answers within 3 s and is not a standby.
pub async fn writable(dsn: &str) -> bool {
    let probe = async {
        let c = connect(dsn).await.ok()?;
        let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
        Some(!row.get::<_, bool>(0))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Some(true))
    )
}
