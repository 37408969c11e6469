//! Undoing a switched move (`shardctl abort` after the switch): the unit goes back to the
//! shard it came from. That shard kept the unit's rows as of the switch; the reverse slot the
//! move made on its target before the fence holds every change made to the unit there since.
//! The undo is a move the other way that streams from that slot instead of copying, through
//! the same catch-up, fence, marker, switch and verification (docs/rebalancing.md).

use super::mover::{recorded_state, reverse_name, Mover};
use super::stream::{self, Lsn};
use super::{apply, connect, drive, MoveError, MoveReport, Progress};
use crate::shardmap::config::MovePhase;
use tokio_postgres::Client;

impl Mover<'_> {
    /// An undo's start in place of the copy: stream the reverse slot from where it stands. The
    /// slot predates the switch, so it also replays changes the source already holds (the
    /// move's own catch-up, applied on the target); each is an upsert or delete of a whole row
    /// by primary key, applied in commit order, so the source ends as the target stands.
    pub(super) async fn reopen(
        &mut self,
        progress: &dyn Progress,
    ) -> Result<(Client, Client), MoveError> {
        let src = connect(&self.shards[self.source].dsn).await?;
        let tgt = connect(&self.shards[self.target].dsn).await?;
        self.retain_existing(&src, progress).await?;
        self.state("copying", "").await;
        apply::progress_table(&tgt).await?;
        let name = self.name();
        let from = slot_position(&src, &name).await?.ok_or_else(|| {
            MoveError::Refused(format!(
                "shard {} has lost the reverse slot {name}; the undo cannot go on",
                self.source
            ))
        })?;
        let repl = stream::ReplicationConn::open(&self.shards[self.source].connect).await?;
        self.stream = Some(repl.start(&name, from, &name).await?);
        self.applier = Some(self.applier_from(from));
        progress.line(&format!(
            "move {}: replaying the changes made on shard {} since the switch",
            self.id, self.source
        ));
        Ok((src, tgt))
    }
}

/// Where a slot's consumer has confirmed up to, or None when there is no such slot.
pub(super) async fn slot_position(c: &Client, name: &str) -> Result<Option<Lsn>, MoveError> {
    let row = c
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn, restart_lsn)::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| stream::parse_lsn(&s)))
}

/// Moves a switched unit back to the shard it came from, while routers keep serving it.
pub(super) async fn undo(
    mut m: Mover<'_>,
    progress: &dyn Progress,
) -> Result<MoveReport, MoveError> {
    let id = m.id;
    let tgt = connect(&m.shards[m.target].dsn).await?;
    let status: Option<String> = tgt
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&reverse_name(id)],
        )
        .await?
        .map(|r| r.get(0));
    match status.as_deref() {
        None => return Err(MoveError::Refused(format!(
            "move {id} cannot be undone: shard {} holds no reverse slot {} (its cleanup has begun); `shardctl resume {id}` completes it",
            m.target,
            reverse_name(id)
        ))),
        // The server dropped WAL the slot still needed (max_slot_wal_keep_size): the writes made
        // on the target since the switch can no longer be replayed to the source.
        Some("lost") => return Err(MoveError::Refused(format!(
            "move {id} cannot be undone: shard {} invalidated its reverse slot {} (it retained more WAL than max_slot_wal_keep_size allows), so the writes made there since the switch cannot be brought back; `shardctl resume {id}` completes the move",
            m.target,
            reverse_name(id)
        ))),
        Some(_) => {}
    }
    // The forward slot, if shardctl stopped before dropping it: the source gets its changes
    // from the target now.
    let src = connect(&m.shards[m.source].dsn).await?;
    m.drop_replication(&src).await;
    let state = recorded_state(m.cat, id).await?;
    let mut back = m.config.clone();
    (back.source, back.target) = (m.target, m.source);
    back.phase = MovePhase::Copying;
    back.undo = true;
    back.undo_unverified = state.as_deref() == Some("switched-unverified");
    let v = m
        .publish(&format!("move {id}: undoing"), |s| {
            for x in s.moves.iter_mut().filter(|x| x.id == id) {
                *x = back.clone();
            }
        })
        .await?;
    m.acks(v).await?;
    let controls = super::Controls {
        ack_timeout: m.req.ack_timeout,
        copy: m.req.copy,
        stop_after: m.req.stop_after,
    };
    let back = Mover::existing(m.cat, m.shards, id, &controls).await?;
    progress.line(&format!(
        "move {id}: undoing: {} goes back from shard {} to shard {}",
        back.describe, back.source, back.target
    ));
    drive(back, progress).await
}
