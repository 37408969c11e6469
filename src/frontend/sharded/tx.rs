//! Transactions over several shards: BEGIN is sent lazily to each shard a transaction touches,
//! COMMIT is a plain commit when at most one shard wrote and a two-phase commit otherwise.

use super::{extended::Batch, Failure, Refusal, ShardedSession};
use crate::frontend::{ClientWrite, ReadReady};
use crate::protocol::messages;
use std::time::Duration;

/// A transaction's progress on each shard.
#[derive(Debug, Default)]
pub struct TxState {
    /// Inside a transaction block (explicit BEGIN, or pgshard's implicit one).
    open: bool,
    explicit: bool,
    /// BEGIN READ ONLY (or ISOLATION … READ ONLY): may run on replicas.
    read_only: bool,
    failed: bool,
    /// The client's BEGIN text, replayed on each shard the transaction reaches.
    begin_sql: String,
    /// Shards that got BEGIN, in the order they were touched.
    touched: Vec<usize>,
    /// Shards where something other than a read ran.
    wrote: Vec<usize>,
    /// SET LOCAL statements, replayed on shards touched later.
    local_sets: Vec<String>,
    /// The pgshard.* settings among them (routing hints), parsed once when recorded.
    local_hints: Vec<(String, String)>,
}

impl TxState {
    /// True inside a transaction block.
    pub fn active(&self) -> bool {
        self.open
    }

    /// True in a READ ONLY transaction.
    pub fn read_only(&self) -> bool {
        self.open && self.read_only
    }

    /// True once a statement of the transaction failed.
    pub fn failed(&self) -> bool {
        self.open && self.failed
    }

    /// Marks an explicit transaction failed after a refusal (outside one, nothing to do).
    pub fn fail(&mut self) {
        if self.open && self.explicit {
            self.failed = true;
        }
    }

    /// Marks any open transaction failed (a server error): an implicit one then rolls back.
    pub fn fail_any(&mut self) {
        if self.open {
            self.failed = true;
        }
    }

    /// True when an open transaction (explicit or implicit) failed.
    pub fn failed_any(&self) -> bool {
        self.open && self.failed
    }

    /// ReadyForQuery status the client should see.
    pub fn status(&self) -> u8 {
        match (self.open && self.explicit, self.failed) {
            (false, _) => b'I',
            (true, false) => b'T',
            (true, true) => b'E',
        }
    }

    /// An explicit transaction rolled back behind the client's back: failed until it ends it.
    pub fn abandoned() -> TxState {
        TxState {
            open: true,
            explicit: true,
            failed: true,
            ..TxState::default()
        }
    }

    /// True for a transaction the client opened with BEGIN.
    pub fn explicit(&self) -> bool {
        self.open && self.explicit
    }

    /// Opens pgshard's own transaction around a multi-shard write.
    pub fn begin_implicit(&mut self) {
        *self = TxState {
            open: true,
            begin_sql: "BEGIN".into(),
            ..TxState::default()
        };
    }

    /// The first shard this transaction reached.
    pub fn first_touched(&self) -> Option<usize> {
        self.touched.first().copied()
    }

    fn touches(&self, shard: usize) -> bool {
        self.touched.contains(&shard)
    }

    /// Shards the transaction reached that did not write.
    fn read_only_shards(&self) -> Vec<usize> {
        self.touched
            .iter()
            .copied()
            .filter(|s| !self.wrote.contains(s))
            .collect()
    }

    /// Records that `shard` ran a write.
    pub fn wrote_on(&mut self, shard: usize) {
        if self.open && !self.wrote.contains(&shard) {
            self.wrote.push(shard);
        }
    }

    /// Remembers a SET LOCAL for shards the transaction reaches later.
    pub fn local_set(&mut self, sql: &str) {
        self.local_sets.push(sql.to_string());
        // `SET LOCAL name = value` read as `SET name = value`: only pgshard's own hints matter here.
        let t = sql.trim_start();
        let rest = t
            .get(3..)
            .map(str::trim_start)
            .and_then(|r| r.get(5..))
            .unwrap_or("");
        if let crate::sqlclass::QueryKind::Set { name, value } =
            crate::sqlclass::classify(&format!("SET {}", rest.trim_start()))
        {
            if name.to_ascii_lowercase().starts_with("pgshard.") {
                self.local_hints.push((name.to_ascii_lowercase(), value));
            }
        }
    }

    /// The latest `SET LOCAL name = value` of this transaction for a pgshard.* `name`.
    pub fn local_setting(&self, name: &str) -> Option<String> {
        self.local_hints
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

/// Prefix of the global transaction ids pgshard gives prepared transactions.
pub const GID_PREFIX: &str = "pgshard";

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// The connection to `shard` for the current statement: borrowed from the pool if not held,
    /// with the client's settings applied and, inside a transaction, BEGIN sent.
    pub(super) async fn conn(
        &mut self,
        shard: usize,
    ) -> Result<&mut crate::pool::Checkout, Failure> {
        if self.conns[shard].is_none() {
            let (node, co) = self.checkout(shard).await?;
            self.conns[shard] = Some(co);
            self.conn_node[shard] = node;
        }
        self.fence_pending[shard] |= self.stmt_writes;
        let max = self.max_msg;
        let co = self.conns[shard].as_mut().expect("just set");
        if let Some(sql) = co.conn.params.diff_sql(&self.params) {
            if let Err(e) = co.conn.exec_quiet(&sql, max).await {
                self.drop_conn(shard, false);
                return Err(Refusal::new(
                    e.sqlstate(),
                    format!("cannot apply session settings: {e}"),
                )
                .into());
            }
            co.conn.params = self.params.clone();
        }
        if self.tx.open && !self.tx.touches(shard) {
            let mut sql = self.tx.begin_sql.clone();
            for s in &self.tx.local_sets {
                sql.push(';');
                sql.push_str(s);
            }
            if let Err(e) = co.conn.exec_quiet(&sql, max).await {
                self.drop_conn(shard, false);
                return Err(Refusal::new(e.sqlstate(), e.to_string()).into());
            }
            self.tx.touched.push(shard);
        }
        Ok(self.conns[shard].as_mut().expect("held"))
    }

    /// A connection to a replica of `shard` when the statement may read there and one is fit
    /// (up, within max_lag, past this client's last commit on the shard); else to the writer.
    async fn checkout(&mut self, shard: usize) -> Result<(usize, crate::pool::Checkout), Failure> {
        let health = self.app.health.load();
        let nodes = self.pools[shard].len();
        let writer = health.writer(shard).min(nodes - 1);
        if self.replica_ok {
            let fence_us = if self.reads.read_your_writes {
                self.read_fence[shard]
            } else {
                0
            };
            let needs = crate::health::ReadNeeds {
                max_lag_us: self.reads.max_lag_us,
                fence_us,
                min_lsn: self.map.replica_floor.get(shard).copied().unwrap_or(0),
            };
            if let Some(node) = health.reader(shard, needs).filter(|&n| n < nodes) {
                tracing::debug!(
                    shard,
                    node,
                    map = self.map.version,
                    replayed = health.shards[shard].nodes[node].lsn(),
                    floor = needs.min_lsn,
                    "read on a replica"
                );
                match self.pools[shard][node].checkout().await {
                    Ok(co) => {
                        busy(&health, shard, node, 1);
                        return Ok((node, co));
                    }
                    Err(crate::pool::PoolError::Connect(e)) => {
                        tracing::warn!(shard, server = %self.pools[shard][node].connect.addr(), error = %e, "replica unreachable: reading from the primary");
                        health.mark_down(shard, node);
                    }
                    Err(e) => return Err(Refusal::new(e.sqlstate(), e.to_string()).into()),
                }
            }
        }
        let co = self.pools[shard][writer]
            .checkout()
            .await
            .map_err(|e| Refusal::new(e.sqlstate(), e.to_string()))?;
        busy(&health, shard, writer, 1);
        Ok((writer, co))
    }

    /// Returns (clean) or discards a held connection. Releasing one that carried a write
    /// starts this client's read fence on the shard: the write has committed (or failed) by now.
    pub(super) fn drop_conn(&mut self, shard: usize, clean: bool) {
        if let Some(co) = self.conns[shard].take() {
            let node = self.conn_node[shard];
            let ok = clean && co.conn.tx_status == b'I' && co.conn.rbuf.is_empty();
            self.pools[shard][node].checkin(co, ok);
            let health = self.app.health.load();
            busy(&health, shard, node, -1);
            if std::mem::take(&mut self.fence_pending[shard]) {
                self.read_fence[shard] = health.now_us();
            }
        }
    }

    /// Returns every connection not needed outside a transaction.
    pub(super) fn release_idle(&mut self) {
        if self.tx.open {
            return;
        }
        for s in 0..self.conns.len() {
            self.drop_conn(s, true);
        }
    }

    /// BEGIN: nothing is sent until a statement reaches a shard.
    pub(super) async fn begin(
        &mut self,
        text: &str,
        read_only: bool,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        if self.tx.open && self.tx.explicit {
            messages::notice_response(
                &mut self.out,
                "25001",
                "there is already a transaction in progress",
            );
        } else if self.tx.open {
            // BEGIN inside a multi-statement Query: the implicit transaction becomes the
            // client's, with what it already did (as PostgreSQL does).
            self.tx.explicit = true;
            self.tx.read_only = read_only;
            self.tx.begin_sql = text.trim().trim_end_matches(';').to_string();
        } else {
            // An extended-protocol BEGIN may carry parameters-free text only; replayed as is.
            self.tx = TxState {
                open: true,
                explicit: true,
                read_only,
                begin_sql: text.trim().trim_end_matches(';').to_string(),
                ..TxState::default()
            };
        }
        self.complete_synthetic(batch, "BEGIN");
        Ok(())
    }

    /// COMMIT: plain on one shard, two-phase when several shards wrote.
    pub(super) async fn commit(&mut self, reply: bool) -> Result<(), Failure> {
        if !self.tx.open {
            if reply {
                messages::notice_response(
                    &mut self.out,
                    "25P01",
                    "there is no transaction in progress",
                );
                messages::command_complete(&mut self.out, "COMMIT");
            }
            return Ok(());
        }
        if self.tx.failed {
            self.rollback_all().await?;
            self.tx = TxState::default();
            if reply {
                messages::command_complete(&mut self.out, "ROLLBACK");
            }
            return Ok(());
        }
        let r = if self.tx.wrote.len() > 1 {
            self.commit_two_phase().await
        } else {
            self.commit_each().await
        };
        self.tx = TxState::default();
        self.release_idle();
        r?;
        if reply {
            messages::command_complete(&mut self.out, "COMMIT");
        }
        Ok(())
    }

    /// Commits every touched shard (at most one wrote, so there is nothing to make atomic).
    async fn commit_each(&mut self) -> Result<(), Failure> {
        // The writer last: if a read-only shard fails to commit, the write is not yet committed.
        let mut order = self.tx.read_only_shards();
        order.extend(self.tx.wrote.iter().copied());
        let mut failure = None;
        for s in order {
            if failure.is_some() {
                self.exec_or_discard(s, "ROLLBACK").await;
                continue;
            }
            if let Err(e) = self.exec_on(s, "COMMIT").await {
                failure = Some(e);
            }
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Two-phase commit: PREPARE TRANSACTION everywhere that wrote, log the decision durably,
    /// then COMMIT PREPARED. Any failure before the decision rolls everything back.
    async fn commit_two_phase(&mut self) -> Result<(), Failure> {
        let txid = self.app.twophase.next_txid();
        let readers = self.tx.read_only_shards();
        for s in readers {
            self.exec_or_discard(s, "COMMIT").await;
        }
        let writers = self.tx.wrote.clone();
        let mut prepared = Vec::new();
        let mut failure = None;
        for &s in &writers {
            let gid = self.app.twophase.gid(txid, s);
            match self
                .exec_on(s, &format!("PREPARE TRANSACTION '{gid}'"))
                .await
            {
                Ok(()) => prepared.push(s),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for &s in &writers {
                if prepared.contains(&s) {
                    let gid = self.app.twophase.gid(txid, s);
                    self.exec_or_discard(s, &format!("ROLLBACK PREPARED '{gid}'"))
                        .await;
                } else {
                    self.exec_or_discard(s, "ROLLBACK").await;
                }
            }
            return Err(Refusal::new(
                &e.code,
                format!("transaction rolled back on every shard: {}", e.message),
            )
            .into());
        }
        if let Err(e) = self.app.twophase.log_commit(txid).await {
            for &s in &writers {
                let gid = self.app.twophase.gid(txid, s);
                self.exec_or_discard(s, &format!("ROLLBACK PREPARED '{gid}'"))
                    .await;
            }
            return Err(Refusal::new(
                "58030",
                format!("cannot record the commit decision, rolled back: {e}"),
            )
            .into());
        }
        // Decided: from here on the transaction is committed; a shard that cannot be reached
        // now is finished by the resolver (at start, or its periodic pass).
        for &s in &writers {
            let gid = self.app.twophase.gid(txid, s);
            if let Err(e) = self.exec_on(s, &format!("COMMIT PREPARED '{gid}'")).await {
                tracing::warn!(shard = s, %gid, error = %e.message, "COMMIT PREPARED failed; left to the resolver");
                self.app.twophase.mark_unfinished();
            }
        }
        self.app.twophase.log_done(txid).await;
        Ok(())
    }

    /// ROLLBACK: on every shard the transaction reached.
    pub(super) async fn rollback(&mut self, reply: bool) -> Result<(), Failure> {
        if !self.tx.open && reply {
            messages::notice_response(
                &mut self.out,
                "25P01",
                "there is no transaction in progress",
            );
        }
        self.rollback_all().await?;
        self.tx = TxState::default();
        if reply {
            messages::command_complete(&mut self.out, "ROLLBACK");
        }
        Ok(())
    }

    /// Rolls back every held connection; ones that cannot be cleaned are discarded.
    pub(super) async fn rollback_all(&mut self) -> Result<(), Failure> {
        for s in 0..self.conns.len() {
            let Some(co) = self.conns[s].as_ref() else {
                continue;
            };
            if co.conn.tx_status != b'I' || !co.conn.rbuf.is_empty() {
                self.exec_or_discard(s, "ROLLBACK").await;
            }
        }
        self.tx.open = false;
        self.release_idle();
        Ok(())
    }

    /// Runs control SQL on a held connection; a failure is returned as a refusal.
    async fn exec_on(&mut self, shard: usize, sql: &str) -> Result<(), Refusal> {
        let max = self.max_msg;
        let Some(co) = self.conns[shard].as_mut() else {
            return Ok(());
        };
        let r = tokio::time::timeout(Duration::from_secs(30), co.conn.exec_quiet(sql, max)).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let broken = !matches!(e, crate::backend::BackendError::Refused { .. });
                if broken {
                    self.drop_conn(shard, false);
                }
                Err(Refusal::new(e.sqlstate(), format!("shard {shard}: {e}")))
            }
            Err(_) => {
                self.drop_conn(shard, false);
                Err(Refusal::new(
                    "08006",
                    format!("shard {shard}: no answer to {sql}"),
                ))
            }
        }
    }

    /// Runs control SQL; if it fails the connection is discarded (closing it rolls back).
    async fn exec_or_discard(&mut self, shard: usize, sql: &str) {
        if self.exec_on(shard, sql).await.is_err() {
            self.drop_conn(shard, false);
        }
    }

    /// Answers a statement pgshard handled itself: CommandComplete, plus the extended
    /// protocol's ParseComplete/BindComplete/NoData when it came in a batch.
    pub(super) fn complete_synthetic(&mut self, batch: Option<&Batch>, tag: &str) {
        if let Some(b) = batch {
            b.synthetic_prefix(&mut self.out);
        }
        messages::command_complete(&mut self.out, tag);
    }
}

/// Counts a connection lent from (+1) or returned to (-1) a server, for least-busy reads.
fn busy(health: &crate::health::Health, shard: usize, node: usize, delta: isize) {
    if let Some(n) = health.shards.get(shard).and_then(|s| s.nodes.get(node)) {
        if delta > 0 {
            n.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            let _ = n.busy.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |b| b.checked_sub(1),
            );
        }
    }
}
