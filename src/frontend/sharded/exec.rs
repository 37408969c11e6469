//! Sending a statement to its shards and answering the client: forwarded from one shard, or
//! merged from several by the scatter merger.

use super::extended::Batch;
use super::{Failure, Refusal, ShardedSession};
use crate::frontend::{ClientWrite, ReadReady};
use crate::protocol::messages;
use crate::router::Plan;
use crate::scatter::{MergeError, Merger};
use bytes::BytesMut;
use std::collections::VecDeque;
use tokio::io::AsyncWriteExt;

/// Per-shard progress while reading a response.
struct Reader {
    shard: usize,
    /// Swallow flags of the Parse/Close messages sent, in order.
    flags: VecDeque<bool>,
    /// The response ends at ReadyForQuery (a Sync or Query was sent).
    done: bool,
    error: bool,
}

/// The shards one exchange reads, inline for the usual one or two.
type Readers = smallvec::SmallVec<[Reader; 2]>;

/// Where a shard's message goes.
enum Dest {
    Client,
    Merge,
    Drop,
}

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// Runs a statement on one shard and forwards its response.
    pub(super) async fn run_single(
        &mut self,
        shard: usize,
        text: &str,
        writes: bool,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        self.exchange(&[shard], text, None, writes, batch).await
    }

    /// Runs a statement on several shards and merges the responses.
    pub(super) async fn run_scatter(
        &mut self,
        shards: &[usize],
        text: &str,
        plan: &Plan,
        params: &crate::router::Params<'_>,
        writes: bool,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        let sql = plan.scatter_sql.as_deref().unwrap_or(text);
        let spec = super::ext_scatter::bound_merge(&plan.merge, params)?;
        let mut merger = Merger::new(spec, shards.len());
        if let Some(seg) = batch {
            if !self
                .ready_extended_merge(shards, plan, seg, &mut merger)
                .await?
            {
                return Ok(());
            }
        }
        self.exchange(shards, sql, Some(merger), writes, batch)
            .await
    }

    /// Runs a statement that cannot be in a transaction (VACUUM, CREATE INDEX CONCURRENTLY) on
    /// each shard in turn.
    pub(super) async fn run_everywhere_autocommit(
        &mut self,
        text: &str,
        shards: &[usize],
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        let merger = Merger::new(Default::default(), shards.len());
        self.exchange(shards, text, Some(merger), true, batch).await
    }

    /// A multi-row INSERT whose rows belong to several shards: one INSERT per shard, in one
    /// (two-phase) transaction, answered with one `INSERT 0 n`.
    pub(super) async fn split_insert(
        &mut self,
        parts: Vec<(usize, String, u64)>,
    ) -> Result<(), Failure> {
        let implicit = !self.tx.active();
        if implicit {
            self.tx.begin_implicit();
        }
        let mut total = 0;
        let mut result = Ok(());
        for (shard, sql, _) in &parts {
            let mut sink = BytesMut::new();
            std::mem::swap(&mut sink, &mut self.out);
            let r = self.exchange(&[*shard], sql, None, true, None).await;
            std::mem::swap(&mut sink, &mut self.out);
            if let Err(e) = r {
                result = Err(e);
                break;
            }
            match scan_tag_and_error(&sink) {
                (_, Some(err)) => {
                    self.out.extend_from_slice(&err);
                    self.tx.fail_any();
                    result = Ok(());
                    break;
                }
                (Some(n), None) => total += n,
                (None, None) => {}
            }
        }
        let failed = self.tx.failed_any();
        if implicit {
            if result.is_ok() && !failed {
                self.commit(false).await?;
            } else {
                self.rollback_all().await?;
                self.tx = super::TxState::default();
            }
        }
        result?;
        if !failed {
            messages::command_complete(&mut self.out, &format!("INSERT 0 {total}"));
        }
        Ok(())
    }

    /// Sends `sql` (or the batch segment) to `shards` and answers the client from their
    /// responses: forwarded when there is one shard, merged otherwise.
    async fn exchange(
        &mut self,
        shards: &[usize],
        sql: &str,
        merger: Option<Merger>,
        writes: bool,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        // Every connection first: nothing is sent unless every shard can take it.
        for &s in shards {
            self.conn(s).await?;
        }
        let mut readers = Readers::new();
        let r = self
            .exchange_io(shards, sql, merger, writes, batch, &mut readers)
            .await;
        if r.is_err() {
            // A connection whose response was not read to its end cannot serve anyone again.
            for &s in shards {
                if !readers.iter().any(|x: &Reader| x.shard == s && x.done) {
                    self.drop_conn(s, false);
                }
            }
        }
        r
    }

    async fn exchange_io(
        &mut self,
        shards: &[usize],
        sql: &str,
        mut merger: Option<Merger>,
        writes: bool,
        batch: Option<&Batch>,
        readers: &mut Readers,
    ) -> Result<(), Failure> {
        let shadow = std::mem::take(&mut self.shadow);
        for &s in shards {
            let mut payload = std::mem::take(&mut self.send_buf);
            payload.clear();
            let mut flags = VecDeque::new();
            let over = shadow.iter().find(|o| o.shard == s);
            match batch {
                Some(seg) => {
                    self.render(
                        s,
                        seg,
                        over.and_then(|o| o.def.as_ref()),
                        &mut payload,
                        &mut flags,
                    );
                    messages::empty_message(&mut payload, b'S');
                }
                None => messages::query(&mut payload, over.map_or(sql, |o| &*o.sql)),
            }
            let co = self.conns[s].as_mut().expect("held");
            let sent = co.conn.stream.write_all(&payload).await;
            if payload.capacity() <= super::KEEP_BUF {
                self.send_buf = payload;
            }
            if let Err(e) = sent {
                return Err(self.lost(s, &e.to_string()));
            }
            if writes {
                self.tx.wrote_on(s);
            }
            readers.push(Reader {
                shard: s,
                flags,
                done: false,
                error: false,
            });
        }
        let lead = shards[0];
        let mut merge_failed: Option<Refusal> = None;
        // Merged responses: read where the merger needs rows; a failed merge drains the rest.
        if let Some(m) = merger.as_mut() {
            while merge_failed.is_none() {
                let Some(i) = m.next_needed() else { break };
                let idx = i;
                if readers[idx].done || readers[idx].error {
                    merge_failed = Some(Refusal::new("XX000", "a shard ended its response early"));
                    break;
                }
                let f = self.read_msg(readers[idx].shard).await?;
                if f.tag == b'Z' {
                    if let Some(co) = self.conns[readers[idx].shard].as_mut() {
                        co.conn.tx_status = crate::protocol::ready_status(&f.raw);
                    }
                }
                match route_msg(&mut readers[idx], lead, f.tag, true) {
                    Dest::Client => self.out.extend_from_slice(&f.raw),
                    Dest::Drop => {}
                    Dest::Merge => {
                        if let Err(e) = m.push(idx, &f.raw, &mut self.out) {
                            merge_failed = Some(match e {
                                MergeError::Server(raw) => {
                                    self.out.extend_from_slice(&raw);
                                    readers[idx].error = true;
                                    Refusal::new("", "")
                                }
                                other => Refusal::new("0A000", other.to_string()),
                            });
                        }
                    }
                }
                if let Err(end) = self.maybe_flush().await {
                    return Err(Failure::End(end));
                }
            }
            if merge_failed.is_none() {
                if let Err(e) = m.finish(&mut self.out) {
                    merge_failed = Some(Refusal::new("0A000", e.to_string()));
                }
            }
        }
        // Drain every shard to its ReadyForQuery (single shard: forwarding everything), each
        // message read where it was received.
        let single = merger.is_none();
        let described = batch.and_then(|b| b.stmt.as_ref()).map(|s| s.def.key);
        for r in readers.iter_mut() {
            while !r.done {
                let (tag, len) = self.buffered_msg(r.shard).await?;
                let co = self.conns[r.shard].as_mut().expect("held");
                let received = &co.conn.rbuf.buf[..len];
                // The server's connection ends, the client's does not: it hears an ERROR.
                let demoted = (tag == b'E')
                    .then(|| messages::demote_fatal(received))
                    .flatten();
                let raw = demoted.as_deref().unwrap_or(received);
                let dest = route_msg(r, lead, tag, !single);
                if tag == b'Z' {
                    co.conn.tx_status = crate::protocol::ready_status(raw);
                }
                if let (b'T', true, Some(key)) = (tag, single, described) {
                    if self
                        .ext
                        .row_descs
                        .get(&key)
                        .is_none_or(|d| d[..] != raw[..])
                    {
                        self.ext
                            .row_descs
                            .insert(key, bytes::Bytes::copy_from_slice(raw));
                    }
                }
                if single || r.error {
                    if matches!(dest, Dest::Client | Dest::Merge) {
                        self.out.extend_from_slice(raw);
                    }
                } else if tag == b'E' && merge_failed.is_none() {
                    // An error from a shard the merge had already finished with.
                    self.out.extend_from_slice(raw);
                    merge_failed = Some(Refusal::new("", ""));
                }
                co.conn.rbuf.consume(len);
                if let Err(end) = self.maybe_flush().await {
                    return Err(Failure::End(end));
                }
            }
        }
        let errored = readers.iter().any(|r| r.error) || merge_failed.is_some();
        for r in readers.iter() {
            if r.error && batch.is_some() {
                // Statements this batch prepared may not exist after the error: forget them all.
                self.forget_statements(r.shard).await;
            }
        }
        if errored {
            self.tx.fail_any();
        }
        if !self.tx.active() {
            for &s in shards {
                self.drop_conn(s, true);
            }
        }
        match merge_failed {
            Some(r) if !r.code.is_empty() => Err(r.into()),
            _ => Ok(()),
        }
    }

    /// Waits for one whole message from a shard, left in its read buffer: (type, length).
    async fn buffered_msg(&mut self, shard: usize) -> Result<(u8, usize), Failure> {
        let max = self.max_msg;
        let co = self.conns[shard].as_mut().expect("held");
        match co.conn.buffer_frame(max).await {
            Ok(m) => Ok(m),
            Err(e) => Err(self.lost(shard, &e.to_string())),
        }
    }

    /// Reads one message from a shard; losing the server fails the statement and the session's
    /// hold on that connection.
    pub(super) async fn read_msg(
        &mut self,
        shard: usize,
    ) -> Result<crate::protocol::Frame, Failure> {
        let max = self.max_msg;
        let co = self.conns[shard].as_mut().expect("held");
        match co.conn.read_frame(max).await {
            // The server's connection ends, the client's does not: it hears an ERROR.
            Ok(f) if f.tag == b'E' => match messages::demote_fatal(&f.raw) {
                Some(raw) => Ok(crate::protocol::Frame {
                    tag: f.tag,
                    raw: raw.freeze(),
                }),
                None => Ok(f),
            },
            Ok(f) => Ok(f),
            Err(e) => Err(self.lost(shard, &e.to_string())),
        }
    }

    pub(super) fn lost(&mut self, shard: usize, why: &str) -> Failure {
        self.drop_conn(shard, false);
        self.tx.fail_any();
        Failure::Refused(Refusal::new(
            "08006",
            format!("connection to shard {shard} lost: {why}"),
        ))
    }

    /// After an error in a batch that prepared statements, the connection's statement cache
    /// is reset so nothing believed prepared is missing.
    async fn forget_statements(&mut self, shard: usize) {
        let max = self.max_msg;
        let Some(co) = self.conns[shard].as_mut() else {
            return;
        };
        if co.conn.tx_status == b'I' && co.conn.exec_quiet("DEALLOCATE ALL", max).await.is_ok() {
            co.conn.statements.clear();
        } else if co.conn.tx_status == b'I' {
            self.drop_conn(shard, false);
        } else {
            // Inside a transaction DEALLOCATE would fail too: close the connection at its end.
            co.conn.created -= std::time::Duration::from_secs(1 << 30);
            co.conn.statements.clear();
        }
    }

    /// Statements about session state: SET/RESET are tracked and applied on every shard the
    /// client later uses; what would tie state to one server is refused.
    pub(super) async fn session_statement(
        &mut self,
        text: &str,
        plan: &Plan,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        use crate::sqlclass::{classify, QueryKind};
        let kind = classify(text);
        if let QueryKind::Pin { reason } = &kind {
            return Err(Refusal::new(
                "0A000",
                format!("{reason} is not supported on a sharded database: its state would live on one shard only"),
            )
            .into());
        }
        if matches!(
            kind,
            QueryKind::Deallocate { .. } | QueryKind::DeallocateAll
        ) {
            self.complete_synthetic(
                batch,
                if matches!(kind, QueryKind::DeallocateAll) {
                    "DEALLOCATE ALL"
                } else {
                    "DEALLOCATE"
                },
            );
            return Ok(());
        }
        let shard = self
            .tx
            .first_touched()
            .unwrap_or(self.map.any_readable(self.info.pid.unsigned_abs() as usize));
        let before = self.out.len();
        self.run_single(shard, text, false, batch).await?;
        let ok = !contains_error(&self.out[before..]);
        if !ok {
            return Ok(());
        }
        let _ = plan;
        match kind {
            QueryKind::Set { name, value } => self.params.set(&name, &value),
            QueryKind::Reset { name } => {
                match self.startup_params.get(&name.to_ascii_lowercase()) {
                    Some(v) => {
                        let v = v.to_string();
                        self.params.set(&name, &v)
                    }
                    None => self.params.reset(&name),
                }
            }
            QueryKind::ResetAll | QueryKind::DiscardAll => {
                self.params = self.startup_params.clone()
            }
            QueryKind::SetLocal if self.tx.active() => {
                self.tx.local_set(text);
                // Shards already in the transaction get it now.
                for s in self.tx_touched_except(shard) {
                    let max = self.max_msg;
                    if let Some(co) = self.conns[s].as_mut() {
                        let _ = co.conn.exec_quiet(text, max).await;
                    }
                }
            }
            _ => {}
        }
        if let Some(co) = self.conns[shard].as_mut() {
            co.conn.params = self.params.clone();
        }
        Ok(())
    }

    fn tx_touched_except(&self, shard: usize) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&s| s != shard && self.conns[s].is_some())
            .collect()
    }
}

/// Whether a run of backend messages contains an ErrorResponse.
fn contains_error(buf: &[u8]) -> bool {
    scan_tag_and_error(buf).1.is_some()
}

/// The row count of the last CommandComplete in `buf`, and the first ErrorResponse.
fn scan_tag_and_error(buf: &[u8]) -> (Option<u64>, Option<Vec<u8>>) {
    let mut i = 0;
    let mut rows = None;
    while i + 5 <= buf.len() {
        let len = u32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
        let end = (i + 1 + len).min(buf.len());
        match buf[i] {
            b'E' => return (rows, Some(buf[i..end].to_vec())),
            b'C' => {
                let tag = String::from_utf8_lossy(&buf[i + 5..end.saturating_sub(1)]).into_owned();
                rows = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
            }
            _ => {}
        }
        i = end;
    }
    (rows, None)
}

/// Decides where one message of a shard's response goes, updating the reader's state (the
/// caller records a ReadyForQuery's transaction status).
fn route_msg(r: &mut Reader, lead: usize, tag: u8, merging: bool) -> Dest {
    let is_lead = r.shard == lead;
    match tag {
        b'Z' => {
            r.done = true;
            Dest::Drop
        }
        b'1' | b'3' => {
            if r.flags.pop_front().unwrap_or(false) || !is_lead {
                Dest::Drop
            } else {
                Dest::Client
            }
        }
        b'E' => {
            r.error = true;
            if merging {
                Dest::Merge
            } else {
                Dest::Client
            }
        }
        b'T' | b'D' | b'C' | b'I' | b's' | b'H' | b'd' | b'c' if merging => Dest::Merge,
        // Every shard sends the same notices for the same statement: one copy is enough.
        b'N' if merging && !is_lead => Dest::Drop,
        b'N' | b'A' => Dest::Client,
        _ if is_lead => Dest::Client,
        _ => Dest::Drop,
    }
}
