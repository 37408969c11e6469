//! A client session on a sharded database: each statement is routed to the shards that hold
//! its rows, and a transaction holds one server connection per shard it touched.
//!
//! Unlike the pooled session (one server, bytes streamed both ways), this one handles a request
//! at a time: a simple Query, or an extended-protocol batch up to its Sync, is routed, sent to
//! its shards, and answered (forwarded from one shard, or merged from several) before the next
//! request is read. Pipelined requests wait in the client's buffer, which keeps the state
//! machine small: *idle* (no transaction, no connection) → *in transaction* (connections per
//! touched shard, BEGIN sent lazily to each) → COMMIT (one shard: plain; several writers:
//! two-phase commit with a durable decision) → idle.

mod copy;
mod exec;
mod ext_scatter;
mod extended;
mod motion;
mod tenant;
mod tx;

use super::{fatal_and_close, ClientWrite, ReadReady, SessionEnd};
use crate::app::{App, ClientInfo};
use crate::params::SessionParams;
use crate::pool::{Checkout, Pool};
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Cursor, FrameBuf};
use crate::router::{Kind, Plan, ShardList};
use crate::shardmap::ShardMap;
use bytes::BytesMut;
use smallvec::SmallVec;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

pub use tx::{TxState, GID_PREFIX};

/// Write buffered client output once it grows past this, so large results stream.
const FLUSH_AT: usize = 64 * 1024;
/// The largest scratch buffer a session keeps between requests (so a request does not
/// allocate one); a bigger one, left by an unusually long statement, is let go.
const KEEP_BUF: usize = 8 * 1024;

/// A failure to report to the client as an ErrorResponse.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Refusal {
    pub fn new(code: &str, message: impl Into<String>) -> Refusal {
        Refusal {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl From<crate::router::RouteError> for Refusal {
    fn from(e: crate::router::RouteError) -> Refusal {
        Refusal::new(e.sqlstate, e.message)
    }
}

/// Why a request could not be completed.
pub(crate) enum Failure {
    /// Reported to the client; the session goes on.
    Refused(Refusal),
    /// The session must end (client gone, server lost mid-request, …).
    End(SessionEnd),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Failure {
        Failure::Refused(r)
    }
}

/// One client's session on a sharded database.
pub struct ShardedSession<R, W> {
    app: Arc<App>,
    info: Arc<ClientInfo>,
    /// Pools of each shard's servers: `pools[shard][node]`, node 0 the configured primary.
    pools: Vec<Vec<Arc<Pool>>>,
    /// Where reads may go, refreshed with the shard map.
    reads: ReadPolicy,
    /// The statement being run may go to a replica.
    replica_ok: bool,
    /// The statement being run writes.
    stmt_writes: bool,
    map: Arc<ShardMap>,
    max_msg: usize,
    cr: R,
    cw: W,
    cbuf: FrameBuf,
    out: BytesMut,
    /// What is being sent to one shard, kept between requests so sending does not allocate.
    send_buf: BytesMut,
    /// A simple query's text with its literals stripped, kept between queries.
    strip_buf: String,
    /// Server connection per shard, held while a transaction (or a COPY) needs it.
    conns: Vec<Option<Checkout>>,
    /// Server of the shard each held connection is to.
    conn_node: Vec<usize>,
    /// A write reached the shard through the held connection: its release sets a read fence.
    fence_pending: Vec<bool>,
    /// Per shard: this client's reads need replicas holding what it committed up to then
    /// (µs on the health clock; 0 = no write yet).
    read_fence: Vec<u64>,
    tx: TxState,
    params: SessionParams,
    startup_params: SessionParams,
    ext: extended::ExtendedState,
    /// The next ReadyForQuery is not owed (a Sync the server ignored during an extended COPY).
    skip_ready: bool,
    /// The map epoch this request or transaction runs under (see catalog::epoch).
    epoch: Option<Arc<crate::catalog::epoch::Epoch>>,
    /// The transaction was rolled back because its epoch was revoked; the client has yet to hear.
    revoked: bool,
    /// Per-shard texts of the statement about to run (reads around a unit in motion); taken by
    /// the next exchange.
    shadow: Vec<motion::Shadowed>,
    /// The tenant a tenant database's session is confined to.
    tenant: Option<tenant::TenantScope>,
}

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// A session for a logged-in client of a sharded database.
    pub fn new(
        app: Arc<App>,
        info: Arc<ClientInfo>,
        pools: Vec<Vec<Arc<Pool>>>,
        cr: R,
        cw: W,
        cbuf: FrameBuf,
        startup_params: SessionParams,
    ) -> Self {
        let max_msg = app.config.load().general.max_message_size;
        let map = app.shardmap.load_full();
        let n = pools.len();
        let conns = (0..n).map(|_| None).collect();
        let reads = ReadPolicy::of(&app, &info.database);
        let tenant = info.tenant.as_ref().and_then(|key| {
            let cfg = app.config.load();
            let db = cfg.database(&info.database)?;
            let dist = cfg.tenant_distribution(db)?.to_string();
            let prefix = db.tenant_prefix.as_deref().unwrap_or("");
            Some(tenant::TenantScope::new(
                key.clone(),
                dist,
                format!("{prefix}{key}"),
            ))
        });
        ShardedSession {
            app,
            info,
            pools,
            reads,
            replica_ok: false,
            stmt_writes: false,
            conn_node: vec![0; n],
            fence_pending: vec![false; n],
            read_fence: vec![0; n],
            map,
            max_msg,
            cr,
            cw,
            cbuf,
            out: BytesMut::new(),
            send_buf: BytesMut::new(),
            strip_buf: String::new(),
            conns,
            tx: TxState::default(),
            params: startup_params.clone(),
            startup_params,
            ext: extended::ExtendedState::default(),
            skip_ready: false,
            epoch: None,
            revoked: false,
            shadow: Vec::new(),
            tenant,
        }
    }

    /// Runs until the client leaves; open transactions are rolled back on every shard.
    pub async fn run(mut self: Box<Self>) {
        let end = self.event_loop().await;
        if !matches!(end, SessionEnd::ClientTerminated | SessionEnd::ClientGone) {
            tracing::debug!(client = self.info.pid, reason = ?end, "sharded session ended");
        }
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.cw.write_all(&out))
                    .await;
        }
        let _ = self.cw.shutdown().await;
        self.abandon().await;
    }

    async fn event_loop(&mut self) -> SessionEnd {
        let mut shutdown = self.app.shutdown.subscribe();
        loop {
            loop {
                let (tag, len) = match self.cbuf.peek(self.max_msg) {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    Err(e) => {
                        fatal_and_close(&mut self.out, "08P01", &e.to_string());
                        return SessionEnd::Protocol;
                    }
                };
                let msg = self.cbuf.buf.split_to(len).freeze();
                if let Err(end) = self.on_message(tag, &msg).await {
                    return end;
                }
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            if !self.tx.active() && *shutdown.borrow() {
                fatal_and_close(&mut self.out, "57P01", "pgshard is shutting down");
                return SessionEnd::Shutdown;
            }
            if self.cbuf.is_empty() {
                self.cbuf.buf = BytesMut::new();
            }
            // An idle transaction holding an old epoch wakes up if a fence revokes it.
            let epoch = if self.tx.active() {
                self.epoch.clone()
            } else {
                None
            };
            tokio::select! {
                r = self.cr.read_idle(&mut self.cbuf) => match r {
                    Ok(0) | Err(_) => return SessionEnd::ClientGone,
                    Ok(_) => {}
                },
                _ = shutdown.changed(), if !self.tx.active() => {}
                _ = async { epoch.as_ref().unwrap().wait_revoked().await }, if epoch.is_some() => self.surrender().await,
            }
        }
    }

    /// Writes what is queued for the client.
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.cw
            .write_all(&out)
            .await
            .map_err(|_| SessionEnd::ClientGone)?;
        self.cw.flush().await.map_err(|_| SessionEnd::ClientGone)?;
        // Kept for the next response unless a huge message grew it past the flush size.
        if out.capacity() <= 2 * FLUSH_AT {
            self.out = out;
            self.out.clear();
        }
        Ok(())
    }

    /// Flushes when enough output is queued, so big results do not pile up in memory.
    async fn maybe_flush(&mut self) -> Result<(), SessionEnd> {
        if self.out.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, tag: u8, msg: &[u8]) -> Result<(), SessionEnd> {
        match tag {
            b'X' => Err(SessionEnd::ClientTerminated),
            b'Q' => {
                let text = Cursor::new(&msg[5..]).str().unwrap_or("");
                if let Some(refusal) = self.revocation(Some(text)).await {
                    return self.settle(Err(refusal.into()), true);
                }
                let r = self.on_query(text).await;
                self.settle(r, true)
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                self.ext.push(tag, msg);
                Ok(())
            }
            b'S' => {
                if let Some(refusal) = self.revocation(None).await {
                    self.ext.clear();
                    return self.settle(Err(refusal.into()), true);
                }
                let r = self.on_sync().await;
                self.settle(r, true)
            }
            // COPY data outside a COPY: the server would ignore it too.
            b'd' | b'c' | b'f' => Ok(()),
            b'F' => {
                let r = Err(Failure::Refused(Refusal::new(
                    "0A000",
                    "the function call protocol message is not supported on a sharded database; use SELECT",
                )));
                self.settle(r, true)
            }
            other => {
                fatal_and_close(
                    &mut self.out,
                    "08P01",
                    &format!("invalid frontend message type {other}"),
                );
                Err(SessionEnd::Protocol)
            }
        }
    }

    /// Finishes a request: a refusal becomes an ErrorResponse (failing an open transaction),
    /// and the request ends with ReadyForQuery.
    fn settle(&mut self, r: Result<(), Failure>, ready: bool) -> Result<(), SessionEnd> {
        match r {
            Ok(()) => {}
            Err(Failure::End(end)) => return Err(end),
            Err(Failure::Refused(f)) => {
                self.pools[0][0].metrics.errors.inc();
                messages::error_response(&mut self.out, Severity::Error, &f.code, &f.message, None);
                self.tx.fail();
            }
        }
        if ready && !std::mem::take(&mut self.skip_ready) {
            messages::ready_for_query(&mut self.out, self.tx.status());
        }
        if ready && !self.tx.active() {
            self.epoch = None;
        }
        Ok(())
    }

    /// A simple Query: one statement, or several that run as one implicit transaction.
    async fn on_query(&mut self, text: &str) -> Result<(), Failure> {
        self.refresh_map();
        let mut shape = std::mem::take(&mut self.strip_buf);
        let stripped = crate::router::fingerprint::strip(text, &mut shape);
        // One cached plan for every literal value; used only where the literals are mere
        // key values (a key route, nothing rewritten from the text).
        let plan = stripped
            .as_ref()
            .map(|_| self.app.plans.plan(&shape, &self.map));
        if shape.capacity() <= KEEP_BUF {
            self.strip_buf = shape;
        }
        if let (Some(literals), Some(plan)) = (stripped, plan) {
            let usable = plan.statements == 1
                && matches!(plan.route, crate::router::Route::Keys { .. })
                && matches!(plan.kind, Kind::Read | Kind::Write)
                && plan.insert.is_none()
                && plan.scatter_sql.is_none()
                && plan.hint.is_none();
            if usable {
                let values: SmallVec<[Option<&[u8]>; 4]> =
                    literals.iter().map(|l| Some(&l[..])).collect();
                let params = crate::router::Params {
                    values: &values,
                    formats: &[],
                };
                return self.run_statement(text, &plan, &params, None).await;
            }
        }
        let plan = self.app.plans.plan(text, &self.map);
        if plan.statements == 0 {
            messages::empty_message(&mut self.out, b'I');
            return Ok(());
        }
        if plan.statements > 1 {
            return self.on_multi_statement(text).await;
        }
        self.run_statement(text, &plan, &crate::router::Params::NONE, None)
            .await
    }

    /// Runs each statement of a multi-statement Query in order, inside one transaction, as
    /// PostgreSQL does; it stops at the first error.
    async fn on_multi_statement(&mut self, text: &str) -> Result<(), Failure> {
        let parts = crate::sqlclass::split_statements(text);
        let implicit = !self.tx.active();
        if implicit {
            self.tx.begin_implicit();
        }
        for part in parts {
            let plan = self.app.plans.plan(part, &self.map);
            if let Err(e) = self
                .run_statement(part, &plan, &crate::router::Params::NONE, None)
                .await
            {
                // A BEGIN in the Query made the transaction the client's: it stays, failed.
                if implicit && !self.tx.explicit() {
                    self.rollback_all().await?;
                    self.tx = TxState::default();
                }
                return Err(e);
            }
        }
        if implicit && self.tx.active() && !self.tx.explicit() {
            self.commit(false).await?;
        }
        Ok(())
    }

    /// Picks up a new shard map between transactions (rebalancing swaps it), and the epoch the
    /// request runs under (taken first: a new epoch is published after its map).
    fn refresh_map(&mut self) {
        if !self.tx.active() {
            self.epoch = Some(self.app.epoch.load_full());
            let current = self.app.shardmap.load();
            if current.version != self.map.version {
                self.map = current.clone();
                self.reads = ReadPolicy::of(&self.app, &self.info.database);
            }
        }
    }

    /// Routes and runs one statement (simple protocol, or an extended batch's statement when
    /// `batch` is given).
    async fn run_statement(
        &mut self,
        text: &str,
        plan: &Arc<Plan>,
        params: &crate::router::Params<'_>,
        batch: Option<&extended::Batch>,
    ) -> Result<(), Failure> {
        // Overrides are per statement: one refused after they were set must not leak into the
        // next.
        self.shadow.clear();
        if self.tx.failed() && !matches!(plan.kind, Kind::Rollback | Kind::Commit) {
            return Err(Refusal::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )
            .into());
        }
        self.stmt_writes = !matches!(
            plan.kind,
            Kind::Read | Kind::Begin { .. } | Kind::Commit | Kind::Rollback | Kind::Session
        );
        self.replica_ok = self.reads.replicas
            && if self.tx.active() { self.tx.read_only() } else { matches!(plan.kind, Kind::Read) && plan.hint.is_none() }
            // A replica may not yet have the rows a move switched to its primary, or still have
            // those the move's cleanup deleted: tables in motion are read on primaries.
            && (self.map.motions.is_empty() || !plan.tables.iter().any(|t| self.map.motion_of(t).is_some()));
        let sharded = matches!(
            plan.route,
            crate::router::Route::Keys { .. } | crate::router::Route::AllShards
        );
        if sharded
            && !self.app.catalog.lease_valid()
            && !matches!(
                plan.kind,
                Kind::Begin { .. } | Kind::Commit | Kind::Rollback | Kind::Session
            )
        {
            return Err(Refusal::new(
                "57P03",
                "this router could not renew its catalog lease in time, so a shard move may have begun that it does not know of; sharded tables are served again once the catalog is reachable",
            )
            .into());
        }
        match &plan.kind {
            Kind::Begin { read_only } => return self.begin(text, *read_only, batch).await,
            Kind::Commit => return self.commit(true).await,
            Kind::Rollback => return self.rollback(true).await,
            Kind::Session => return self.session_statement(text, plan, batch).await,
            Kind::Copy(spec) if spec.from_stdin => {
                if let Some(t) = self.tenant.as_mut() {
                    t.scope(&self.map, &self.app.plans, plan, params, text)?;
                }
                // Rows are placed by the map the COPY starts with: while a unit of the table
                // is fenced it must wait for the switch, like any write reaching its source.
                if !self.map.motions.is_empty() {
                    let all = (0..self.map.shards).collect();
                    self.through_motion(plan, params, text, all).await?;
                }
                return Box::pin(self.copy_in(text, plan, spec.clone(), batch)).await;
            }
            _ => {}
        }
        let hinted;
        let plan = match (&plan.hint, !self.params.is_empty() || self.tx.active()) {
            (None, true) => match motion::session_hint(|n| self.tx.local_setting(n), &self.params)?
            {
                Some(h) => {
                    hinted = Arc::new(Plan {
                        hint: Some(h),
                        scatter_sql: None,
                        insert: None,
                        ..(**plan).clone()
                    });
                    &hinted
                }
                None => plan,
            },
            _ => plan,
        };
        let scoped;
        let mut tenant_sql = None;
        let plan = match self.tenant.as_mut() {
            Some(t) => match t.scope(&self.map, &self.app.plans, plan, params, text)? {
                tenant::Scoped::AsPlanned => plan,
                tenant::Scoped::Filtered { plan, sql } => {
                    scoped = plan;
                    tenant_sql = Some(sql);
                    &scoped
                }
            },
            None => plan,
        };
        let target = crate::router::route(plan, &self.map, params).map_err(Refusal::from)?;
        let mut shards = self.target_shards(&target, plan);
        // The client's prepared statement (extended protocol): per-shard overrides take its
        // parameter types.
        let stmt = batch.and_then(|b| b.stmt.as_ref()).map(|s| &*s.def);
        if !self.map.motions.is_empty() {
            shards = self.through_motion(plan, params, text, shards).await?;
            self.shadow = motion::shadows(
                &self.map,
                &self.app.shadow_texts,
                plan,
                text,
                &mut shards,
                stmt,
            )?;
        }
        if let Some(sql) = tenant_sql {
            // Keyed to the tenant: one shard, which motion shadows never rewrite.
            self.shadow = shards
                .iter()
                .map(|&s| motion::Shadowed::new(s, sql.clone(), stmt))
                .collect();
        }
        if let Kind::Copy(spec) = &plan.kind {
            if !spec.from_stdin && spec.header && shards.len() > 1 {
                self.one_copy_header(spec, &shards, stmt)?;
            }
        }
        if let (Some(split), None) = (&plan.insert, batch) {
            if shards.len() > 1 {
                let parts = split
                    .split(&self.map, params.values)
                    .map_err(Refusal::from)?;
                return self.split_insert(parts).await;
            }
        }
        let writes = !matches!(plan.kind, Kind::Read);
        match &plan.kind {
            Kind::Utility
            | Kind::Ddl {
                transactional: false,
            } => {
                if self.tx.active() {
                    return Err(Refusal::new(
                        "25001",
                        "this statement cannot run inside a transaction block on a sharded database",
                    )
                    .into());
                }
                self.run_everywhere_autocommit(text, &shards, batch).await
            }
            _ if shards.len() == 1 => self.run_single(shards[0], text, writes, batch).await,
            _ => {
                // Writes on several shards are atomic: an implicit transaction committed in two phases.
                let implicit = writes && !self.tx.active();
                if implicit {
                    self.tx.begin_implicit();
                }
                let r = self
                    .run_scatter(&shards, text, plan, params, writes, batch)
                    .await;
                if implicit {
                    match r {
                        Ok(()) => self.commit(false).await?,
                        Err(e) => {
                            self.rollback_all().await?;
                            self.tx = TxState::default();
                            return Err(e);
                        }
                    }
                }
                r
            }
        }
    }

    /// Shards a target names; reads of reference tables (and table-less statements) go to a
    /// shard the transaction already holds, else to one chosen by the client's pid.
    fn target_shards(&self, target: &crate::router::Target, plan: &Plan) -> ShardList {
        use crate::router::{Route, Target};
        match target {
            Target::All => (0..self.map.shards).collect(),
            Target::Some(v) => v.iter().copied().collect(),
            Target::One(s) => {
                let floating = matches!(plan.route, Route::Any | Route::Reference { write: false })
                    && plan.hint.is_none();
                if floating {
                    if let Some(held) = self.tx.first_touched() {
                        return smallvec::smallvec![held];
                    }
                    return smallvec::smallvec![self
                        .map
                        .any_readable(self.info.pid.unsigned_abs() as usize)];
                }
                smallvec::smallvec![*s]
            }
        }
    }

    /// The client left: roll back whatever is open and return clean connections.
    async fn abandon(&mut self) {
        if self.tx.active() || self.conns.iter().any(Option::is_some) {
            let _ = self.rollback_all().await;
        }
    }
}

/// Where a sharded database's reads may go, from `[replicas]` and the database's override.
#[derive(Debug, Clone, Copy)]
struct ReadPolicy {
    replicas: bool,
    read_your_writes: bool,
    max_lag_us: u64,
}

impl ReadPolicy {
    fn of(app: &App, database: &str) -> ReadPolicy {
        let cfg = app.config.load();
        let r = &cfg.replicas;
        let replicas = cfg
            .database(database)
            .and_then(|d| d.replica_reads)
            .unwrap_or(r.reads);
        ReadPolicy {
            replicas,
            read_your_writes: r.read_your_writes,
            max_lag_us: r.max_lag.as_micros() as u64,
        }
    }
}

/// Whether a database is spread over the shards.
pub fn is_sharded(app: &App, database: &str) -> bool {
    app.config
        .load()
        .database(database)
        .is_some_and(|d| d.sharded)
}
