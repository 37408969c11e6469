//! Extended-protocol batches on a sharded database. Messages are collected up to Sync, then
//! cut into segments that each end at an Execute; a segment is routed by its statement's plan
//! and the Bind's parameters, and sent to its shards with statements renamed to global names
//! and prepared on demand there.

use super::{Failure, Refusal, ShardedSession};
use crate::frontend::{ClientWrite, ReadReady};
use crate::prepared::StatementDef;
use crate::protocol::{messages, parse_parse, statement_ref, Cursor};
use crate::router::Plan;
use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A client's prepared statement: its definition (global name) and its routing plan.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub def: Arc<StatementDef>,
    pub plan: Arc<Plan>,
}

/// Client statements and the batch being collected.
#[derive(Default)]
pub struct ExtendedState {
    /// The batch's messages back to back (one buffer rather than an allocation per message).
    pending: BytesMut,
    statements: HashMap<Box<[u8]>, Stmt>,
    /// RowDescription of each statement a shard described, by statement key: a multi-shard
    /// Execute needs the column types to merge, and its response does not carry them.
    pub row_descs: HashMap<u128, Bytes>,
    /// The multi-shard rewrite of each statement that has one (LIMIT pushed down, avg split),
    /// by the client statement's key: built once, not at every Execute.
    pub rewritten: HashMap<u128, Arc<StatementDef>>,
}

impl ExtendedState {
    /// Queues a message until the batch's Sync.
    pub fn push(&mut self, _tag: u8, msg: &[u8]) {
        self.pending.extend_from_slice(msg);
    }

    /// Takes the queued messages, back to back.
    pub fn take(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    /// Drops the queued messages.
    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

/// Whole protocol messages laid back to back, as (offset, message) pairs.
fn messages_in(raw: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let head = raw.get(at..at + 5)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize + 1;
        let m = raw.get(at..at + len)?;
        at += len;
        Some((at - len, m))
    })
}

/// One segment of a batch: messages up to and including an Execute (or the tail after the
/// last one), with the statement and parameters that route it.
pub struct Batch {
    /// The segment's messages back to back, as the client framed them.
    raw: Bytes,
    pub stmt: Option<Stmt>,
    /// The Bind of the executed portal, kept for its parameters.
    pub bind: Option<Bytes>,
    pub executes: bool,
}

/// The segments of one batch: most batches have one.
pub type Segments = SmallVec<[Batch; 2]>;

impl Batch {
    /// The segment's messages, in order.
    pub fn msgs(&self) -> impl Iterator<Item = &[u8]> {
        messages_in(&self.raw).map(|(_, m)| m)
    }

    /// Responses pgshard gives itself for a segment it answers without a server
    /// (BEGIN/COMMIT/ROLLBACK/SET sent with the extended protocol).
    pub fn synthetic_prefix(&self, out: &mut BytesMut) {
        for m in self.msgs() {
            match m[0] {
                b'P' => messages::empty_message(out, b'1'),
                b'B' => messages::empty_message(out, b'2'),
                b'D' => {
                    if m.get(5) == Some(&b'S') {
                        // No parameters, no rows: an empty ParameterDescription.
                        out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                    }
                    messages::empty_message(out, b'n');
                }
                b'C' => messages::empty_message(out, b'3'),
                _ => {}
            }
        }
    }
}

/// The result format codes at the end of a Bind body.
pub fn bind_result_formats(bind: &[u8]) -> Vec<i16> {
    let mut c = Cursor::new(&bind[5..]);
    let mut skip = || -> Option<Vec<i16>> {
        c.cstr()?;
        c.cstr()?;
        let nf = c.i16()?.max(0) as usize;
        c.take(nf * 2)?;
        for _ in 0..c.i16()?.max(0) {
            let len = c.i32()?;
            if len > 0 {
                c.take(len as usize)?;
            }
        }
        let nr = c.i16()?.max(0) as usize;
        (0..nr).map(|_| c.i16()).collect()
    };
    skip().unwrap_or_default()
}

/// A Bind's parameter format codes and values (None = NULL), inline for the usual few.
pub type BindParams<'a> = (SmallVec<[i16; 8]>, SmallVec<[Option<&'a [u8]>; 8]>);

/// The parameters of a Bind body: (format codes, values).
pub fn bind_params(bind: &[u8]) -> Option<BindParams<'_>> {
    let mut c = Cursor::new(&bind[5..]);
    c.cstr()?;
    c.cstr()?;
    let nf = c.i16()?.max(0) as usize;
    let mut formats = SmallVec::with_capacity(nf);
    for _ in 0..nf {
        formats.push(c.i16()?);
    }
    let np = c.i16()?.max(0) as usize;
    let mut values = SmallVec::with_capacity(np);
    for _ in 0..np {
        let len = c.i32()?;
        values.push(if len < 0 {
            None
        } else {
            Some(c.take(len as usize)?)
        });
    }
    Some((formats, values))
}

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// Sync: cuts the collected batch into segments and runs them in order; the first error
    /// skips the rest, as PostgreSQL does.
    pub(super) async fn on_sync(&mut self) -> Result<(), Failure> {
        self.refresh_map();
        let msgs = self.ext.take();
        let segments = self.segments(msgs)?;
        let implicit = !self.tx.active() && segments.iter().filter(|s| s.executes).count() > 1;
        if implicit {
            self.tx.begin_implicit();
        }
        let mut result = Ok(());
        for seg in &segments {
            result = self.run_segment(seg).await;
            if result.is_err() {
                break;
            }
        }
        if implicit {
            match &result {
                Ok(()) if self.tx.active() => self.commit(false).await?,
                _ => {
                    self.rollback_all().await?;
                    self.tx = super::TxState::default();
                }
            }
        }
        self.release_idle();
        result
    }

    /// Splits a batch at its Executes and resolves the statement each segment runs.
    fn segments(&mut self, all: Bytes) -> Result<Segments, Failure> {
        let mut out = Segments::new();
        let mut start = 0;
        // Portals bound in this batch (name, statement, Bind); the latest binding of a name wins.
        let mut portals: SmallVec<[(&[u8], Stmt, Bytes); 2]> = SmallVec::new();
        let mut last_stmt: Option<Stmt> = None;
        for (at, m) in messages_in(&all) {
            let tag = m[0];
            match tag {
                b'P' => {
                    let (name, text, types) = parse_parse(&m[5..])
                        .ok_or_else(|| Refusal::new("08P01", "malformed Parse"))?;
                    let text_str = std::str::from_utf8(text)
                        .map_err(|_| Refusal::new("22021", "query text is not valid UTF-8"))?;
                    let plan = self.app.plans.plan(text_str, &self.map);
                    let def = Arc::new(StatementDef::new(
                        Bytes::copy_from_slice(text),
                        Bytes::copy_from_slice(types),
                    ));
                    let stmt = Stmt { def, plan };
                    self.ext.statements.insert(name.into(), stmt.clone());
                    last_stmt = Some(stmt);
                }
                b'B' => {
                    let mut c = Cursor::new(&m[5..]);
                    let portal = c.cstr().unwrap_or_default();
                    let name = c.cstr().unwrap_or_default();
                    let Some(stmt) = self.ext.statements.get(name).cloned() else {
                        return Err(Refusal::new(
                            "26000",
                            format!(
                                "prepared statement \"{}\" does not exist",
                                String::from_utf8_lossy(name)
                            ),
                        )
                        .into());
                    };
                    last_stmt = Some(stmt.clone());
                    let bind = all.slice(at..at + m.len());
                    match portals.iter_mut().find(|(p, _, _)| *p == portal) {
                        Some(slot) => *slot = (portal, stmt, bind),
                        None => portals.push((portal, stmt, bind)),
                    }
                }
                b'D' | b'C' => {
                    if let Some((_, name, _)) = statement_ref(tag, &m[5..]) {
                        if let Some(s) = self.ext.statements.get(name) {
                            last_stmt = Some(s.clone());
                        }
                    }
                }
                _ => {}
            }
            if tag == b'E' {
                let portal = Cursor::new(&m[5..]).cstr().unwrap_or_default();
                let Some((_, stmt, bind)) = portals.iter().find(|(p, _, _)| *p == portal) else {
                    return Err(Refusal::new("34000", "portal was not bound in this batch; pgshard needs Bind and Execute before the same Sync").into());
                };
                let end = at + m.len();
                out.push(Batch {
                    raw: all.slice(start..end),
                    stmt: Some(stmt.clone()),
                    bind: Some(bind.clone()),
                    executes: true,
                });
                start = end;
            }
        }
        if start < all.len() {
            out.push(Batch {
                raw: all.slice(start..),
                stmt: last_stmt,
                bind: None,
                executes: false,
            });
        }
        Ok(out)
    }

    /// Runs one segment: tx control is answered here, the rest is routed to shards.
    async fn run_segment(&mut self, seg: &Batch) -> Result<(), Failure> {
        let Some(stmt) = seg.stmt.clone() else {
            // Flush/Close of unknown statements only: any shard answers.
            let shard = self.tx.first_touched().unwrap_or(0);
            return self.run_single(shard, "", false, Some(seg)).await;
        };
        if !seg.executes {
            // Parse/Describe without Execute: one shard describes it.
            let shard = self
                .tx
                .first_touched()
                .unwrap_or(self.map.any_readable(self.info.pid.unsigned_abs() as usize));
            return self.run_single(shard, "", false, Some(seg)).await;
        }
        // Checked at Parse.
        let text = std::str::from_utf8(&stmt.def.text).unwrap_or_default();
        let bind = seg.bind.as_ref().expect("executing segments have a Bind");
        let (formats, values) =
            bind_params(bind).ok_or_else(|| Refusal::new("08P01", "malformed Bind"))?;
        let params = crate::router::Params {
            values: &values,
            formats: &formats,
        };
        self.run_statement(text, &stmt.plan, &params, Some(seg))
            .await
    }

    /// The bytes of a segment for one server connection: client statement names become global
    /// names, statements the connection lacks are prepared first. `flags` gets one entry per
    /// Parse or Close sent, in order: true when its response ('1' or '3') is pgshard's to swallow.
    /// `over` replaces the segment's statement on this shard (a read around a unit in motion).
    pub(super) fn render(
        &mut self,
        shard: usize,
        seg: &Batch,
        over: Option<&Arc<StatementDef>>,
        out: &mut BytesMut,
        flags: &mut VecDeque<bool>,
    ) {
        let co = self.conns[shard].as_mut().expect("held");
        let stmts = &mut self.ext.statements;
        // Evicts the least recently used statement if the connection's cache is full.
        let prepare = |cache: &mut crate::prepared::ServerStatements,
                       out: &mut BytesMut,
                       flags: &mut VecDeque<bool>,
                       def: &StatementDef,
                       swallow: bool| {
            if let Some(old) = cache.insert(def.key) {
                messages::close_statement(out, &crate::prepared::global_name(old));
                flags.push_back(true);
            }
            messages::parse(out, &def.global_name, &def.text, &def.param_types);
            flags.push_back(swallow);
        };
        let replaced = over.and_then(|o| Some((seg.stmt.as_ref()?.def.key, o)));
        let mut unnamed_parsed = false;
        for m in seg.msgs() {
            let tag = m[0];
            let name = match tag {
                b'P' => parse_parse(&m[5..]).map(|(n, _, _)| n),
                b'B' | b'D' | b'C' => statement_ref(tag, &m[5..]).map(|(_, n, _)| n),
                _ => None,
            };
            if let (Some((_, o)), Some(b""), Some(stmt)) = (replaced, name, seg.stmt.as_ref()) {
                // The unnamed statement is prepared here in its replaced form: from the
                // client's Parse of the segment's statement (a pipeline may parse other unnamed
                // statements in other segments), or before the segment's Bind of one parsed in
                // an earlier batch.
                let own = |text: &[u8], types: &[u8]| {
                    text == &stmt.def.text[..] && types == &stmt.def.param_types[..]
                };
                if tag == b'P'
                    && parse_parse(&m[5..]).is_some_and(|(_, text, types)| own(text, types))
                {
                    messages::parse(out, b"", &o.text, &o.param_types);
                    flags.push_back(false);
                    unnamed_parsed = true;
                    continue;
                }
                if tag == b'B' && !unnamed_parsed {
                    messages::parse(out, b"", &o.text, &o.param_types);
                    flags.push_back(true);
                    unnamed_parsed = true;
                }
            }
            let named = name.filter(|n| !n.is_empty());
            let def = named.and_then(|n| stmts.get(n)).map(|s| match replaced {
                Some((key, o)) if s.def.key == key => o.clone(),
                _ => s.def.clone(),
            });
            let Some(def) = def else {
                out.extend_from_slice(m);
                if matches!(tag, b'P' | b'C') {
                    flags.push_back(false);
                }
                continue;
            };
            match tag {
                b'P' => {
                    if co.conn.statements.touch(def.key) {
                        // Prepared already: closed first, so the client's Parse gets a real answer.
                        messages::close_statement(out, &def.global_name);
                        co.conn.statements.remove(def.key);
                        flags.push_back(true);
                    }
                    prepare(&mut co.conn.statements, out, flags, &def, false);
                }
                b'C' => {
                    // The global statement stays prepared for other clients; closing a name that
                    // does not exist is no error, and gives the client its CloseComplete in order.
                    stmts.remove(named.expect("named"));
                    messages::close_statement(out, b"pgshard_none");
                    flags.push_back(false);
                }
                _ => {
                    if !co.conn.statements.touch(def.key) {
                        prepare(&mut co.conn.statements, out, flags, &def, true);
                    }
                    let (head, _, tail) = statement_ref(tag, &m[5..]).expect("named above");
                    messages::with_statement_name(out, tag, head, &def.global_name, tail);
                }
            }
        }
    }
}
