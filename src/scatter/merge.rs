//! Combining the responses of N shards to one statement into a single response, on raw
//! message bytes, streaming rows to the client as soon as their position is known.
//!
//! Three modes, chosen by the spec: plain (rows forwarded in arrival order), ordered (ORDER BY
//! without aggregation: a k-way merge over one buffered head row per shard, which relies on
//! every shard returning its rows sorted) and aggregate (partial rows folded per group and
//! emitted by `finish`). All modes then apply DISTINCT, OFFSET, LIMIT and hidden columns.
//! Messages that each shard sends once per response (ParseComplete, BindComplete,
//! RowDescription, CopyOutResponse, ...) reach the client once, from whichever shard is first.

use std::collections::{HashSet, VecDeque};

use bytes::{Bytes, BytesMut};

use super::aggregate::{Groups, Values};
use super::spec::{MergeSpec, SortKey};
use super::tags::Tags;
use super::values::ColType;
use super::wire::{self, Field, Row};

/// Why shard responses could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A shard's ErrorResponse (complete message), to be forwarded as is.
    #[error("shard returned an error")]
    Server(Bytes),
    /// Shards answered with different shapes, or a message could not be read.
    #[error("shards returned inconsistent results: {0}")]
    Mismatch(String),
    /// The merge needs something not implemented (a type it cannot order or aggregate).
    #[error("not supported across shards: {0}")]
    Unsupported(String),
}

/// Merges one statement's responses from `shards` shards; see the module docs.
#[derive(Debug)]
pub struct Merger {
    spec: MergeSpec,
    /// Per shard: got its CommandComplete / EmptyQueryResponse / PortalSuspended.
    finished: Vec<bool>,
    /// Ordered mode: rows received and not yet emitted, per shard (normally at most one).
    queues: Vec<VecDeque<Row>>,
    groups: Option<Groups>,
    /// Column types as the shards send them, once known.
    types: Option<Vec<ColType>>,
    /// Columns of the description sent to the client (also the visible width of rows).
    visible: usize,
    /// The row shape is known (a RowDescription arrived or `describe` was called).
    described: bool,
    description_sent: bool,
    seen: HashSet<Bytes>,
    skipped: u64,
    sent: u64,
    rows_in: u64,
    /// Per shard: how many once-per-response protocol messages it has sent, and how many of
    /// those positions were already forwarded from the fastest shard.
    proto_seen: Vec<usize>,
    proto_sent: usize,
    copy_out: bool,
    tags: Tags,
}

impl Merger {
    /// A merger for `spec` over `shards` shard responses.
    pub fn new(spec: MergeSpec, shards: usize) -> Merger {
        let groups = spec.aggregate.clone().map(Groups::new);
        Merger {
            finished: vec![false; shards],
            queues: (0..shards).map(|_| VecDeque::new()).collect(),
            groups,
            types: None,
            visible: 0,
            described: false,
            description_sent: false,
            seen: HashSet::new(),
            skipped: 0,
            sent: 0,
            rows_in: 0,
            proto_seen: vec![0; shards],
            proto_sent: 0,
            copy_out: false,
            tags: Tags::new(shards),
            spec,
        }
    }

    /// Rows go out untouched: no need to index their columns.
    fn plain_passthrough(&self) -> bool {
        self.groups.is_none()
            && self.spec.order_by.is_empty()
            && !self.spec.distinct
            && self.spec.hidden_columns == 0
    }

    /// Whether the merge reads column values (and so needs the row shape before any row).
    pub fn needs_row_shape(&self) -> bool {
        !self.plain_passthrough()
    }

    fn ordered(&self) -> bool {
        !self.spec.order_by.is_empty() && self.groups.is_none()
    }

    /// Which shard's next message is needed (None: all finished, call `finish`). Ordered
    /// merges need the shard whose head row is missing; otherwise the lowest unfinished one.
    pub fn next_needed(&self) -> Option<usize> {
        if self.ordered() && !self.limit_reached() {
            if let Some(i) =
                (0..self.finished.len()).find(|&i| !self.finished[i] && self.queues[i].is_empty())
            {
                return Some(i);
            }
        }
        self.finished.iter().position(|f| !f)
    }

    /// Whether a message from `shard` can be pushed now without buffering more than its head.
    pub fn accepts(&self, shard: usize) -> bool {
        let Some(&finished) = self.finished.get(shard) else {
            return false;
        };
        !finished && (!self.ordered() || self.limit_reached() || self.queues[shard].is_empty())
    }

    /// True once LIMIT rows were sent: the driver may stop reading rows (but must still drain
    /// every shard up to its ReadyForQuery, pushing or discarding the rest).
    pub fn limit_reached(&self) -> bool {
        self.spec.limit.is_some_and(|l| self.sent >= l)
    }

    /// Rows sent to the client so far.
    pub fn rows_sent(&self) -> u64 {
        self.sent
    }

    /// Supplies the row shape when the shards will not send a RowDescription (extended
    /// protocol: the statement was described earlier). `result_formats` are the Bind's result
    /// format codes (empty = all text, one = for all columns). Nothing is sent to the client.
    pub fn describe(
        &mut self,
        row_description: &[u8],
        result_formats: &[i16],
    ) -> Result<(), MergeError> {
        let body = row_description
            .get(5..)
            .ok_or_else(|| MergeError::Mismatch("short RowDescription".into()))?;
        let mut fields = wire::parse_row_description(body)?;
        for (i, f) in fields.iter_mut().enumerate() {
            f.format = match result_formats {
                [] => 0,
                [one] => *one,
                many => *many.get(i).unwrap_or(&0),
            };
        }
        self.set_types(&mut fields)?;
        self.described = true;
        Ok(())
    }

    /// The RowDescription a client should see for a shard's one (hidden columns dropped, avg
    /// columns retyped), e.g. to answer a Describe of a multi-shard statement.
    pub fn client_row_description(
        spec: &MergeSpec,
        row_description: &[u8],
    ) -> Result<BytesMut, MergeError> {
        let body = row_description
            .get(5..)
            .ok_or_else(|| MergeError::Mismatch("short RowDescription".into()))?;
        let mut out = BytesMut::new();
        Merger::new(spec.clone(), 1).row_description(body, &mut out)?;
        Ok(out)
    }

    /// Feeds one complete backend message from `shard`; output for the client goes to `out`.
    pub fn push(&mut self, shard: usize, msg: &[u8], out: &mut BytesMut) -> Result<(), MergeError> {
        if shard >= self.finished.len() {
            return Err(MergeError::Mismatch(format!("no shard {shard}")));
        }
        if self.finished[shard] {
            return Err(MergeError::Mismatch(format!(
                "shard {shard} sent a message after its end"
            )));
        }
        let tag = *msg
            .first()
            .ok_or_else(|| MergeError::Mismatch("empty message".into()))?;
        let body = msg
            .get(5..)
            .ok_or_else(|| MergeError::Mismatch("short message".into()))?;
        match tag {
            b'D' if self.plain_passthrough() => {
                self.rows_in += 1;
                if self.limit_reached() {
                    return Ok(());
                }
                if self.skipped < self.spec.offset {
                    self.skipped += 1;
                    return Ok(());
                }
                out.extend_from_slice(msg);
                self.sent += 1;
            }
            b'D' => self.data_row(shard, Row::parse(Bytes::copy_from_slice(msg))?, out)?,
            b'T' => self.row_description(body, out)?,
            b'E' => return Err(MergeError::Server(Bytes::copy_from_slice(msg))),
            b'N' | b'A' => out.extend_from_slice(msg),
            b'C' | b'I' | b's' => {
                self.tags.record(shard, tag, body)?;
                self.finished[shard] = true;
                if self.ordered() {
                    self.drain_ordered(out)?;
                }
            }
            b'H' => {
                if body.first() != Some(&0) {
                    return Err(MergeError::Unsupported("binary COPY TO STDOUT".into()));
                }
                self.copy_out = true;
                self.once(shard, msg, out);
            }
            b'd' => {
                if !self.limit_reached() {
                    out.extend_from_slice(msg);
                }
            }
            // The single CopyDone goes out in `finish`, after every shard's data.
            b'c' => {}
            b'1' | b'2' | b'3' | b'n' | b't' | b'G' => self.once(shard, msg, out),
            // Session state reports are the driver's business, not part of this response.
            b'S' => {}
            other => {
                return Err(MergeError::Unsupported(format!(
                    "backend message '{}' in a multi-shard response",
                    other as char
                )))
            }
        }
        Ok(())
    }

    /// After every shard finished: the remaining rows and the one completion message.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<(), MergeError> {
        if let Some(i) = self.finished.iter().position(|f| !f) {
            return Err(MergeError::Mismatch(format!(
                "finish before shard {i} completed"
            )));
        }
        if self.ordered() {
            self.drain_ordered(out)?;
        }
        if let Some(groups) = self.groups.take() {
            let types = match &self.types {
                Some(t) => t.clone(),
                None if self.rows_in == 0 => Vec::new(),
                None => {
                    return Err(MergeError::Unsupported(
                        "aggregate rows without a row description".into(),
                    ))
                }
            };
            let mut rows = groups.finish(&types)?;
            self.sort_values(&mut rows, &types)?;
            for r in rows {
                let mut buf = BytesMut::new();
                wire::put_data_row(&mut buf, r.iter().map(|v| v.as_deref()));
                self.emit(Row::parse(buf.freeze())?, out);
            }
        }
        if self.copy_out {
            out.extend_from_slice(&[b'c', 0, 0, 0, 4]);
        }
        let rows = self.described || self.rows_in > 0;
        self.tags.finish(rows.then_some(self.sent), out)
    }

    /// Forwards the first arrival of each once-per-response message position.
    fn once(&mut self, shard: usize, msg: &[u8], out: &mut BytesMut) {
        self.proto_seen[shard] += 1;
        if self.proto_seen[shard] > self.proto_sent {
            self.proto_sent += 1;
            out.extend_from_slice(msg);
        }
    }

    fn row_description(&mut self, body: &[u8], out: &mut BytesMut) -> Result<(), MergeError> {
        let mut fields = wire::parse_row_description(body)?;
        if let Some(types) = &self.types {
            let same = types.len() == fields.len()
                && types
                    .iter()
                    .zip(&fields)
                    .all(|(t, f)| t.oid == f.type_oid && t.binary == (f.format == 1));
            if !same {
                return Err(MergeError::Mismatch(
                    "shards returned different row descriptions".into(),
                ));
            }
            if self.description_sent {
                return Ok(());
            }
        }
        self.set_types(&mut fields)?;
        self.described = true;
        self.description_sent = true;
        wire::put_row_description(out, &fields[..self.visible]);
        Ok(())
    }

    /// Records the column types, checks the merge can work on them, and adjusts `fields` to
    /// what the client sees (avg types, hidden columns counted out of `visible`).
    fn set_types(&mut self, fields: &mut [Field]) -> Result<(), MergeError> {
        let types: Vec<ColType> = fields
            .iter()
            .map(|f| ColType::new(f.type_oid, f.format))
            .collect();
        for k in &self.spec.order_by {
            let t = types.get(k.column).ok_or_else(|| {
                MergeError::Mismatch(format!("ORDER BY column {} is missing", k.column))
            })?;
            // Aggregated avg columns are ordered by their output type, checked below.
            let is_avg = self.spec.aggregate.as_ref().is_some_and(|a| {
                a.aggregates.iter().any(|g| {
                    g.column == k.column && matches!(g.kind, super::spec::AggKind::Avg { .. })
                })
            });
            if !t.comparable() && !is_avg {
                return Err(MergeError::Unsupported(format!(
                    "ORDER BY on type oid {} (format {})",
                    t.oid, t.binary as i16
                )));
            }
        }
        if let Some(g) = &self.groups {
            g.check_and_describe(fields)?;
        }
        self.visible = fields.len().saturating_sub(self.spec.hidden_columns);
        if self.types.is_none() {
            self.types = Some(types);
        }
        Ok(())
    }

    fn data_row(&mut self, shard: usize, row: Row, out: &mut BytesMut) -> Result<(), MergeError> {
        self.rows_in += 1;
        if !self.described {
            self.visible = row.len().saturating_sub(self.spec.hidden_columns);
        }
        if let Some(types) = &self.types {
            if types.len() != row.len() {
                return Err(MergeError::Mismatch(format!(
                    "a row of {} columns for a description of {}",
                    row.len(),
                    types.len()
                )));
            }
        }
        if let Some(groups) = &mut self.groups {
            let types = self.types.as_deref().ok_or_else(|| {
                MergeError::Unsupported("aggregate rows without a row description".into())
            })?;
            return groups.fold(&row, types);
        }
        if !self.ordered() {
            self.emit(row, out);
            return Ok(());
        }
        if self.types.is_none() {
            return Err(MergeError::Unsupported(
                "ordered rows without a row description".into(),
            ));
        }
        if !self.limit_reached() {
            self.queues[shard].push_back(row);
            self.drain_ordered(out)?;
        }
        Ok(())
    }

    /// Emits rows while every unfinished shard has a head row (k-way merge step).
    fn drain_ordered(&mut self, out: &mut BytesMut) -> Result<(), MergeError> {
        loop {
            if self.limit_reached() {
                self.queues.iter_mut().for_each(VecDeque::clear);
                return Ok(());
            }
            let waiting =
                (0..self.queues.len()).any(|i| self.queues[i].is_empty() && !self.finished[i]);
            if waiting {
                return Ok(());
            }
            let mut best: Option<usize> = None;
            for i in 0..self.queues.len() {
                let Some(row) = self.queues[i].front() else {
                    continue;
                };
                let better = match best {
                    None => true,
                    // Strictly less keeps ties in shard order, so the merge is deterministic.
                    Some(b) => self
                        .cmp_rows(row, self.queues[b].front().expect("head"))?
                        .is_lt(),
                };
                if better {
                    best = Some(i);
                }
            }
            let Some(b) = best else { return Ok(()) };
            let row = self.queues[b].pop_front().expect("head");
            self.emit(row, out);
        }
    }

    fn cmp_rows(&self, a: &Row, b: &Row) -> Result<std::cmp::Ordering, MergeError> {
        let types = self.types.as_deref().unwrap_or_default();
        cmp_by_keys(&self.spec.order_by, types, |c| a.col(c), |c| b.col(c))
    }

    /// Sorts aggregated rows by the ORDER BY, comparing avg columns by their output type.
    fn sort_values(&self, rows: &mut [Values], types: &[ColType]) -> Result<(), MergeError> {
        if self.spec.order_by.is_empty() {
            return Ok(());
        }
        let mut out_types = types.to_vec();
        if let Some(a) = &self.spec.aggregate {
            for g in &a.aggregates {
                if let (super::spec::AggKind::Avg { .. }, Some(t)) =
                    (g.kind, out_types.get_mut(g.column))
                {
                    let oid = if t.kind == super::values::Kind::Float8 {
                        super::values::oid::FLOAT8
                    } else {
                        super::values::oid::NUMERIC
                    };
                    *t = ColType::new(oid, t.binary as i16);
                }
            }
        }
        let mut failed = None;
        rows.sort_by(|a, b| {
            let get_a = |c: usize| a.get(c).and_then(|v| v.as_deref());
            let get_b = |c: usize| b.get(c).and_then(|v| v.as_deref());
            cmp_by_keys(&self.spec.order_by, &out_types, get_a, get_b).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                std::cmp::Ordering::Equal
            })
        });
        failed.map_or(Ok(()), Err)
    }

    /// Sends one merged row, applying hidden columns, DISTINCT, OFFSET and LIMIT.
    fn emit(&mut self, row: Row, out: &mut BytesMut) {
        if self.limit_reached() {
            return;
        }
        let visible = row.visible(self.visible);
        if self.spec.distinct && !self.seen.insert(visible.clone()) {
            return;
        }
        if self.skipped < self.spec.offset {
            self.skipped += 1;
            return;
        }
        out.extend_from_slice(&visible);
        self.sent += 1;
    }
}

/// Compares two rows by ORDER BY keys; NULLs placed by `nulls_first`, which is absolute (not
/// flipped by DESC), as in PostgreSQL.
fn cmp_by_keys<'a, 'b>(
    keys: &[SortKey],
    types: &[ColType],
    a: impl Fn(usize) -> Option<&'a [u8]>,
    b: impl Fn(usize) -> Option<&'b [u8]>,
) -> Result<std::cmp::Ordering, MergeError> {
    use std::cmp::Ordering::*;
    for k in keys {
        let ord = match (a(k.column), b(k.column)) {
            (None, None) => Equal,
            (None, Some(_)) => {
                if k.nulls_first {
                    Less
                } else {
                    Greater
                }
            }
            (Some(_), None) => {
                if k.nulls_first {
                    Greater
                } else {
                    Less
                }
            }
            (Some(x), Some(y)) => {
                let t = types
                    .get(k.column)
                    .ok_or_else(|| MergeError::Mismatch("ORDER BY column missing".into()))?;
                let o = t.compare(x, y)?;
                if k.descending {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        if ord != Equal {
            return Ok(ord);
        }
    }
    Ok(Equal)
}
