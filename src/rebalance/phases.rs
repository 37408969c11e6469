//! The mover's steps: copy and catch up, fence, marker, switch, verify, clean up; and the
//! abort that undoes a move before its switch.

use super::mapedit::{set_phase, switch};
use super::mover::{reverse_name, Mover};
use super::Progress;
use super::{apply, connect, copy, standby, stream, MoveError};
use crate::shardmap::config::{MovePhase, ShardingConfig};
use crate::shardmap::Strategy;
use std::time::{Duration, Instant};
use stream::Event;

use tokio_postgres::Client;

/// A catch-up batch is applied once this much SQL has gathered, even while more changes wait:
/// the stream is not read while a batch applies, and the walsender ends a connection that
/// stays silent for `wal_sender_timeout`.
const FLUSH_BYTES: usize = 1 << 20;

impl Mover<'_> {
    /// Fills the target (a copy, or for an undo the reverse slot's changes), catches up, fences
    /// and switches.
    pub(super) async fn before_switch(&mut self, progress: &dyn Progress) -> Result<(), MoveError> {
        let (src, tgt) = match self.config.undo {
            false => self.copy(progress).await?,
            true => self.reopen(progress).await?,
        };
        self.switch_over(&src, &tgt, progress).await
    }

    /// Steps 1-3: validate, publish the move, copy the unit under the new slot's snapshot; the
    /// stream is left at the slot's consistent point.
    async fn copy(&mut self, progress: &dyn Progress) -> Result<(Client, Client), MoveError> {
        let src = connect(&self.shards[self.source].dsn).await?;
        let tgt = connect(&self.shards[self.target].dsn).await?;
        self.retain_existing(&src, progress).await?;
        let in_flight: Vec<u64> = self.moving.motions.iter().map(|m| m.id).collect();
        for (shard, c) in [(self.source, &src), (self.target, &tgt)] {
            for name in sweep(c, &in_flight).await? {
                progress.line(&format!(
                    "move {}: dropped {name} on shard {shard}, left by a move no longer in flight",
                    self.id
                ));
            }
        }
        for (table, _, _) in &self.tables {
            copy::validate(&src, &tgt, table, &self.key_columns[table]).await?;
        }
        copy::wait_for_prepared(&src, Duration::from_secs(15)).await?;
        // Routers must hide the target's copy from key-less statements before rows arrive. (A
        // resumed move is in the map already.)
        if !self.published {
            let cfg = self.config.clone();
            let v = self
                .publish(&format!("move {}: copying", self.id), |s| {
                    s.moves.push(cfg.clone())
                })
                .await?;
            self.published = true;
            self.acks(v).await?;
        }
        self.state("copying", "").await;
        apply::progress_table(&tgt).await?;
        for (table, pred, _) in &self.tables {
            copy::delete_unit(&tgt, table, pred, 10_000).await?;
        }
        src.batch_execute(&self.publication_sql(&self.name())?)
            .await?;
        let mut repl = stream::ReplicationConn::open(&self.shards[self.source].connect).await?;
        let slot = repl.create_slot(&self.name(), true).await?;
        let t = Instant::now();
        let links = copy::CopyLinks {
            source_dsn: &self.shards[self.source].dsn,
            target_dsn: &self.shards[self.target].dsn,
            snapshot: &slot.snapshot,
            streams: self.req.copy,
        };
        for (table, pred, _) in &self.tables {
            let (rows, bytes, streams) =
                copy::copy_unit(&src, &links, table, pred, progress).await?;
            progress.line(&format!(
                "move {}: copied {rows} rows ({bytes} bytes) of {table} in {streams} stream{}",
                self.id,
                if streams == 1 { "" } else { "s" }
            ));
            self.report.rows_copied += rows;
            self.report.bytes_copied += bytes;
        }
        self.report.copy_ms = t.elapsed().as_millis() as u64;
        if let Some(d) = self.req.pause_after_copy {
            self.state("copying", "copied; pausing (test hook)").await;
            tokio::time::sleep(d).await;
        }
        self.stream = Some(
            repl.start(&slot.name, slot.consistent_point, &self.name())
                .await?,
        );
        self.applier = Some(self.applier_from(slot.consistent_point));
        Ok((src, tgt))
    }

    /// Applies the source's changes from `lsn` on, re-checking each row with the router's
    /// placement of the unit.
    pub(super) fn applier_from(&self, lsn: stream::Lsn) -> apply::Applier {
        let moving = self.moving.clone();
        let id = self.id;
        let owns: apply::Owns = Box::new(move |_table, key, within| {
            let m = moving.motions.iter().find(|m| m.id == id)?;
            let k = moving.parse_key(m.dist, key.as_bytes()).ok()?;
            let w = within.map(|w| crate::pghash::parse_loose(w.as_bytes(), false));
            Some(m.owns_row(&k, w.as_ref(), moving.buckets))
        });
        apply::Applier::new(self.id, self.key_columns.clone(), owns, lsn)
    }

    /// `CREATE PUBLICATION name` for the unit's rows of every table of the move.
    pub(super) fn publication_sql(&self, name: &str) -> Result<String, MoveError> {
        let filters: Result<Vec<String>, MoveError> = self
            .tables
            .iter()
            .map(|(t, p, _)| Ok(format!("{} WHERE ({p})", apply::table_ident(t)?)))
            .collect();
        Ok(format!(
            "CREATE PUBLICATION {name} FOR TABLE {}",
            filters?.join(", ")
        ))
    }

    /// Steps 4-5: catch up, ready the reverse slot, fence, apply up to the marker, switch.
    async fn switch_over(
        &mut self,
        src: &Client,
        tgt: &Client,
        progress: &dyn Progress,
    ) -> Result<(), MoveError> {
        // Catch up until a probe marker comes back quickly: the target is close behind.
        let t = Instant::now();
        for round in 0.. {
            let r = Instant::now();
            self.marker(src, tgt, &format!("probe {round}")).await?;
            let changes = self.applier.as_ref().map_or(0, |a| a.changes);
            progress.advance("catching up (changes applied)", changes, None);
            if r.elapsed() < Duration::from_millis(200) || round >= 50 {
                break;
            }
        }
        progress.step_done();
        self.report.catchup_ms = t.elapsed().as_millis() as u64;
        if !self.config.undo {
            self.reverse_slot(tgt).await?;
        }
        if self.req.stop_after == Some(MovePhase::Copying) {
            return Err(MoveError::Stopped(MovePhase::Copying));
        }
        progress.line(&format!(
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
            emit_marker(src, &self.name(), "fence").await?;
        } else {
            self.marker(src, tgt, "fence").await?;
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
        let note = match self.config.undo {
            false => format!("move {id}: switched"),
            true => format!("move {id}: switched back"),
        };
        self.publish(&note, |s| switch(s, &unit, target, &owner))
            .await?;
        self.report.pause_ms = fence_start.elapsed().as_secs_f64() * 1000.0;
        self.published = false;
        self.state("switched", "").await;
        progress.line(&format!(
            "move {}: switched after a {:.1} ms pause; verifying",
            self.id, self.report.pause_ms
        ));
        self.report.changes_applied = self.applier.as_ref().map_or(0, |a| a.changes);
        self.report.apply_ms = self
            .applier
            .as_ref()
            .map_or(0.0, |a| a.busy.as_secs_f64() * 1000.0);
        self.at_switch = Some(verify);
        Ok(())
    }

    /// Emits a transactional marker on the source and applies the stream up to it.
    pub(super) async fn marker(
        &mut self,
        src: &Client,
        tgt: &Client,
        label: &str,
    ) -> Result<(), MoveError> {
        emit_marker(src, &self.name(), label).await?;
        let prefix = self.name();
        let (Some(stream), Some(applier)) = (self.stream.as_mut(), self.applier.as_mut()) else {
            return Err(MoveError::Stream("no stream".into()));
        };
        let mut seen = false;
        loop {
            if applier.pending() && (!stream.buffered() || applier.batch_bytes() > FLUSH_BYTES) {
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
    pub(super) async fn verify(&mut self, src: &Client) -> Result<(), MoveError> {
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
    pub(super) async fn after_switch(
        &mut self,
        src: &Client,
        progress: &dyn Progress,
    ) -> Result<(), MoveError> {
        self.drop_replication(src).await;
        // From here on the move cannot be undone.
        self.drop_reverse().await?;
        let v = self.cat.latest_map().await?.map_or(0, |m| m.version);
        self.acks(v).await?;
        for (table, pred, _) in &self.tables {
            self.report.rows_deleted_on_source +=
                copy::delete_unit(src, table, pred, 10_000).await?;
        }
        let floors = self.floors().await?;
        let id = self.id;
        self.publish(&format!("move {id}: done"), |s| {
            s.moves.retain(|m| m.id != id);
            raise_floors(s, &floors);
        })
        .await?;
        self.state("done", "").await;
        // Once routers have stopped filtering the unit out: this scans the whole table.
        for (table, _, _) in &self.tables {
            copy::vacuum(src, table, progress).await;
        }
        self.report_standbys(&floors, progress).await;
        progress.line(&format!(
            "move {}: done; {} rows removed from shard {}",
            self.id, self.report.rows_deleted_on_source, self.source
        ));
        Ok(())
    }

    /// The replica floors of the source and target: their primaries' WAL positions once the
    /// move's writes there are done. Routers read the unit's tables on replicas again once the
    /// move leaves the map, and only on replicas that have replayed this far.
    pub(super) async fn floors(&self) -> Result<Vec<(usize, String)>, MoveError> {
        let mut out = Vec::new();
        for shard in [self.source, self.target] {
            let c = connect(&self.shards[shard].dsn).await?;
            out.push((shard, standby::floor(&c).await?));
        }
        Ok(out)
    }

    /// Tells which replicas have not replayed up to their floor after a short wait: routers read
    /// those shards on their primaries meanwhile (correct, only not offloaded).
    pub(super) async fn report_standbys(
        &self,
        floors: &[(usize, String)],
        progress: &dyn Progress,
    ) {
        for (shard, lsn) in floors {
            for (i, r) in self.shards[*shard].replicas.iter().enumerate() {
                let id = self.id;
                match standby::wait_replayed(r, lsn, Duration::from_secs(5)).await {
                    Ok(true) => {}
                    Ok(false) => progress.line(&format!("move {id}: replica {i} of shard {shard} has not replayed the move yet (WAL {lsn}); routers read shard {shard} on its primary until it has")),
                    Err(e) => progress.line(&format!("move {id}: replica {i} of shard {shard} not reached ({e}); routers read on it only once it has replayed WAL {lsn}")),
                }
            }
        }
    }

    /// Ends the stream from the source and drops the move's slot and publication there.
    pub(super) async fn drop_replication(&mut self, src: &Client) {
        self.stream = None;
        drop_slot_and_publication(src, &self.name()).await;
    }

    /// Makes the target's reverse publication and slot, which keep every change made to the
    /// unit there from now on: after the switch, `abort` carries them back to the source.
    /// Made before the fence (making a slot waits for the server's running transactions).
    async fn reverse_slot(&mut self, tgt: &Client) -> Result<(), MoveError> {
        let name = reverse_name(self.id);
        drop_slot_and_publication(tgt, &name).await;
        tgt.batch_execute(&self.publication_sql(&name)?).await?;
        let mut repl = stream::ReplicationConn::open(&self.shards[self.target].connect).await?;
        repl.create_slot(&name, false).await?;
        Ok(())
    }

    /// Drops the target's reverse slot and publication (the move completes, or never switched).
    pub(super) async fn drop_reverse(&self) -> Result<(), MoveError> {
        if !self.config.undo {
            let tgt = connect(&self.shards[self.target].dsn).await?;
            drop_slot_and_publication(&tgt, &reverse_name(self.id)).await;
        }
        Ok(())
    }

    /// Releases the statements a fence of this move holds (the move goes back to copying).
    pub(super) async fn unfence(&mut self) -> Result<(), MoveError> {
        let id = self.id;
        if self.config.phase == MovePhase::Fenced {
            let v = self
                .publish(&format!("move {id}: copying again"), |s| {
                    set_phase(s, id, MovePhase::Copying)
                })
                .await?;
            self.config.phase = MovePhase::Copying;
            self.acks(v).await?;
        }
        Ok(())
    }

    /// Readies a move that stopped before its switch for a new copy: statements a fence holds
    /// go on, the old slots and publications are dropped (`before_switch` deletes the partial
    /// copy before copying).
    pub(super) async fn restart(&mut self) -> Result<(), MoveError> {
        self.unfence().await?;
        let src = connect(&self.shards[self.source].dsn).await?;
        self.drop_replication(&src).await;
        self.drop_reverse().await
    }

    /// Undoes a move that has not switched: routers forget it, replication is dropped, and the
    /// target's partial copy is deleted.
    /// The copy is deleted while the move is still in the map (routers leave the target's copy
    /// out of key-less reads until it leaves); if that fails the move stays in the map, fenced
    /// statements released, for `shardctl abort` to finish.
    pub(super) async fn abort(&mut self) -> Result<(), MoveError> {
        let id = self.id;
        if self.published {
            // Statements held by a fence go on at once.
            self.publish(&format!("move {id}: aborting"), |s| {
                set_phase(s, id, MovePhase::Copying)
            })
            .await?;
        }
        match connect(&self.shards[self.source].dsn).await {
            Ok(src) => self.drop_replication(&src).await,
            // A failed source: the next move from it drops what is left there (`sweep`).
            Err(e) => eprintln!(
                "move {id}: shard {} unreachable ({e}); its slot and publication {} are dropped by the next move involving it",
                self.source,
                self.name()
            ),
        }
        self.drop_reverse().await?;
        let tgt = connect(&self.shards[self.target].dsn).await?;
        for (table, pred, _) in &self.tables {
            copy::delete_unit(&tgt, table, pred, 10_000).await?;
            copy::vacuum(&tgt, table, &|m: &str| eprintln!("{m}")).await;
        }
        if self.published {
            // Only the target changed (its copy deleted); the source may be the reason for the abort.
            let floors = vec![(self.target, standby::floor(&tgt).await?)];
            self.publish(&format!("move {id}: aborted"), |s| {
                s.moves.retain(|m| m.id != id);
                raise_floors(s, &floors);
            })
            .await?;
            self.report_standbys(&floors, &|m: &str| eprintln!("{m}"))
                .await;
        }
        self.state("aborted", "").await;
        Ok(())
    }
}

/// Drops a slot and publication of a move, where they exist.
pub(super) async fn drop_slot_and_publication(c: &Client, name: &str) {
    // The walsender lets go of the slot a moment after its connection closes.
    for _ in 0..50 {
        let sql = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
        if c.execute(sql, &[&name]).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = c
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}"))
        .await;
}

/// Drops slots and publications of moves not in `in_flight`: a move aborted while its source
/// was unreachable leaves them there (a slot that nobody reads keeps WAL forever; a replica
/// promoted in its place inherits the publication). Returns what it dropped.
async fn sweep(c: &Client, in_flight: &[u64]) -> Result<Vec<String>, MoveError> {
    let sql = "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name ~ '^pgshard_(move|back)_[0-9]+$' \
               UNION SELECT pubname::text FROM pg_publication WHERE pubname ~ '^pgshard_(move|back)_[0-9]+$'";
    let mut dropped = Vec::new();
    for row in c.query(sql, &[]).await? {
        let name: String = row.get(0);
        let id = name.rsplit('_').next().and_then(|d| d.parse::<u64>().ok());
        if id.is_some_and(|id| !in_flight.contains(&id)) && !dropped.contains(&name) {
            drop_slot_and_publication(c, &name).await;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Raises each shard's replica floor (see `standby`).
fn raise_floors(s: &mut ShardingConfig, floors: &[(usize, String)]) {
    for (shard, lsn) in floors {
        s.raise_replica_floor(*shard, lsn);
    }
}

/// Writes a transactional marker into the source's WAL. Its commit flushes the WAL even where
/// `synchronous_commit = off` (the walsender only sends flushed WAL; otherwise the marker would
/// wait for the WAL writer, up to `wal_writer_delay`, inside the write pause).
pub(super) async fn emit_marker(src: &Client, prefix: &str, label: &str) -> Result<(), MoveError> {
    src.batch_execute(&format!(
        "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_logical_emit_message(true, '{prefix}', '{}'); COMMIT",
        label.replace('\'', "''")
    ))
    .await?;
    Ok(())
}
