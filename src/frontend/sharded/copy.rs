//! COPY … FROM STDIN into a sharded table: the client's rows are split by sharding key and
//! streamed to the shards that own them, inside one (two-phase) transaction.

use super::{extended::Batch, Failure, Refusal, ShardedSession};
use crate::frontend::{ClientWrite, ReadReady, SessionEnd};
use crate::protocol::messages;
use crate::router::{CopyFormat, CopySpec, Plan, Route};
use crate::scatter::{CopyFormat as SplitFormat, CopySplitter};
use crate::shardmap::{Located, TableRule};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Rows buffered per shard before they are written to it.
const SEND_AT: usize = 64 * 1024;

/// Where each row of the COPY goes.
enum Placement {
    /// Every row to these shards (reference tables: all; unsharded tables: one).
    Same(Vec<usize>),
    /// By the key in column `col` under distribution `dist`.
    ByKey { dist: usize, col: usize },
}

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// A `COPY … TO STDOUT WITH HEADER` across shards: only the first shard (read first: the
    /// copy-out merge reads the shards in order) sends the header line; the others get the
    /// statement without it (prepared with `stmt`'s parameter types, extended protocol).
    pub(super) fn one_copy_header(
        &mut self,
        spec: &CopySpec,
        shards: &[usize],
        stmt: Option<&crate::prepared::StatementDef>,
    ) -> Result<(), Refusal> {
        let sql = spec.headerless_sql.as_deref().ok_or_else(|| {
            Refusal::new(
                "0A000",
                "COPY … TO STDOUT with HEADER across shards needs the statement without HEADER, which pgshard could not form; drop HEADER",
            )
        })?;
        let sql: Arc<str> = sql.into();
        for &s in &shards[1..] {
            if !self.shadow.iter().any(|o| o.shard == s) {
                self.shadow
                    .push(super::motion::Shadowed::new(s, sql.clone(), stmt));
            }
        }
        Ok(())
    }

    /// COPY FROM STDIN: split rows by key, one COPY per shard, one `COPY n` for the client.
    pub(super) async fn copy_in(
        &mut self,
        text: &str,
        plan: &Arc<Plan>,
        spec: CopySpec,
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        let placement = self.copy_placement(plan, &spec).await?;
        let shards: Vec<usize> = match &placement {
            Placement::Same(s) => s.clone(),
            Placement::ByKey { .. } => (0..self.map.shards).collect(),
        };
        if matches!(placement, Placement::ByKey { .. })
            && spec.header
            && spec.headerless_sql.is_none()
        {
            return Err(Refusal::new("0A000", "this COPY … HEADER cannot be passed on without its HEADER option: drop the header line and the option").into());
        }
        let implicit = !self.tx.active();
        if implicit {
            self.tx.begin_implicit();
        }
        let r = self
            .copy_rows(text, &spec, &placement, &shards, batch)
            .await;
        if implicit {
            if r.is_ok() && !self.tx.failed_any() {
                self.commit(false).await?;
            } else {
                self.rollback_all().await?;
                self.tx = super::TxState::default();
            }
        }
        r
    }

    async fn copy_placement(&mut self, plan: &Plan, spec: &CopySpec) -> Result<Placement, Failure> {
        match &plan.route {
            Route::Refuse { sqlstate, message } => {
                Err(Refusal::new(sqlstate, message.clone()).into())
            }
            Route::Reference { .. } => Ok(Placement::Same((0..self.map.shards).collect())),
            Route::DefaultShard => Ok(Placement::Same(vec![self.map.default_shard])),
            _ => {
                let Some(TableRule::Sharded { dist, column, .. }) =
                    self.map.table(&spec.table).cloned()
                else {
                    return Err(Refusal::new(
                        "0A000",
                        format!("COPY into {}: not a declared table", spec.table),
                    )
                    .into());
                };
                let col = match spec.key_column {
                    Some(c) => c,
                    None if spec.columns.is_empty() => {
                        self.key_position(&spec.table, &column).await?
                    }
                    None => {
                        return Err(Refusal::new(
                            "0A000",
                            format!(
                                "COPY into {} must include its sharding key column {column}",
                                spec.table
                            ),
                        )
                        .into());
                    }
                };
                Ok(Placement::ByKey { dist, col })
            }
        }
    }

    /// Position of `column` among the table's columns (COPY without a column list).
    async fn key_position(&mut self, table: &str, column: &str) -> Result<usize, Failure> {
        let sql = format!(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = {}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            crate::params::quote_literal(table)
        );
        let max = self.max_msg;
        self.conn(0).await?;
        let co = self.conns[0].as_mut().expect("held");
        let rows = co
            .conn
            .query_rows(&sql, max)
            .await
            .map_err(|e| Refusal::new(e.sqlstate(), e.to_string()))?;
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        names.iter().position(|n| n == column).ok_or_else(|| {
            Refusal::new(
                "42703",
                format!("column {column} of {table} not found on shard 0"),
            )
            .into()
        })
    }

    async fn copy_rows(
        &mut self,
        text: &str,
        spec: &CopySpec,
        placement: &Placement,
        shards: &[usize],
        batch: Option<&Batch>,
    ) -> Result<(), Failure> {
        // Rows split by key: pgshard consumes the header line, and the shards get the COPY
        // without HEADER (prepared under its own name with the extended protocol).
        let headerless = match placement {
            Placement::ByKey { .. } if spec.header => spec.headerless_sql.as_deref(),
            _ => None,
        };
        let over = match (headerless, batch) {
            (Some(sql), Some(seg)) => seg.stmt.as_ref().map(|st| {
                Arc::new(crate::prepared::StatementDef::new(
                    bytes::Bytes::from(sql.to_string()),
                    st.def.param_types.clone(),
                ))
            }),
            _ => None,
        };
        // Start the COPY on every shard and wait for each to accept data.
        let mut swallow = Vec::with_capacity(shards.len());
        for &s in shards {
            self.conn(s).await?;
            self.tx.wrote_on(s);
            let mut q = BytesMut::new();
            let mut flags = std::collections::VecDeque::new();
            match batch {
                // The server ignores this Sync in COPY mode; it only matters if the COPY fails to start.
                Some(seg) => {
                    self.render(s, seg, over.as_ref(), &mut q, &mut flags);
                    messages::empty_message(&mut q, b'S');
                }
                None => messages::query(&mut q, headerless.unwrap_or(text)),
            }
            let co = self.conns[s].as_mut().expect("held");
            co.conn
                .stream
                .write_all(&q)
                .await
                .map_err(|e| Refusal::new("08006", e.to_string()))?;
            swallow.push(flags);
        }
        let mut lead_response = None;
        for (i, &s) in shards.iter().enumerate() {
            let max = self.max_msg;
            let co = self.conns[s].as_mut().expect("held");
            let mut f = co
                .conn
                .read_frame(max)
                .await
                .map_err(|e| Refusal::new("08006", e.to_string()))?;
            // Extended protocol: ParseComplete/BindComplete come first; the lead's go to the client.
            while matches!(f.tag, b'1' | b'2' | b'3' | b'n' | b't' | b'N') {
                // Parses and Closes pgshard added (the connection lacked a statement) are not
                // the client's to see.
                let ours = matches!(f.tag, b'1' | b'3') && swallow[i].pop_front().unwrap_or(false);
                if i == 0 && !ours {
                    self.out.extend_from_slice(&f.raw);
                }
                let co = self.conns[s].as_mut().expect("held");
                f = co
                    .conn
                    .read_frame(max)
                    .await
                    .map_err(|e| Refusal::new("08006", e.to_string()))?;
            }
            let co = self.conns[s].as_mut().expect("held");
            match f.tag {
                b'G' => {
                    lead_response.get_or_insert(f.raw);
                }
                b'E' => {
                    self.out.extend_from_slice(&f.raw);
                    co.conn.drain_until_ready(max).await.ok();
                    // The others are waiting for data: fail their COPY too.
                    for &o in shards {
                        if o != s {
                            self.copy_fail(o, "COPY failed on another shard", batch.is_some())
                                .await;
                        }
                    }
                    self.tx.fail_any();
                    return Ok(());
                }
                other => {
                    return Err(Refusal::new(
                        "08P01",
                        format!("unexpected message '{}' starting COPY", other as char),
                    )
                    .into())
                }
            }
        }
        self.out
            .extend_from_slice(&lead_response.expect("at least one shard"));
        self.flush().await.map_err(Failure::End)?;

        let mut bufs: Vec<BytesMut> = (0..self.pools.len()).map(|_| BytesMut::new()).collect();
        let binary = spec.format == CopyFormat::Binary;
        // Split binary data: each shard gets a file header of pgshard's, then its tuples.
        if binary && matches!(placement, Placement::ByKey { .. }) {
            for &s in shards {
                bufs[s].extend_from_slice(&crate::scatter::copy::BINARY_HEADER);
            }
        }
        let mut splitter = match placement {
            Placement::ByKey { col, .. } => Some(CopySplitter::new(
                match spec.format {
                    CopyFormat::Csv => SplitFormat::Csv,
                    CopyFormat::Binary => SplitFormat::Binary,
                    _ => SplitFormat::Text,
                },
                spec.delimiter,
                spec.quote,
                spec.escape,
                headerless.is_some(),
                spec.null.as_bytes().to_vec(),
                *col,
            )),
            Placement::Same(_) => None,
        };
        let map = self.map.clone();
        let only = match (placement, &self.tenant) {
            (Placement::ByKey { dist, .. }, Some(t)) if map.distributions[*dist].name == t.dist => {
                Some(t.key.clone())
            }
            _ => None,
        };
        let only = only.as_deref();
        let mut failure: Option<Refusal> = None;
        loop {
            let (tag, len) = match self.cbuf.peek(self.max_msg) {
                Ok(Some(x)) => x,
                Ok(None) => match self.cr.read_idle(&mut self.cbuf).await {
                    Ok(0) | Err(_) => return Err(Failure::End(SessionEnd::ClientGone)),
                    Ok(_) => continue,
                },
                Err(e) => return Err(Failure::End(self.protocol_end(&e.to_string()))),
            };
            let msg = self.cbuf.buf.split_to(len).freeze();
            match tag {
                b'd' if failure.is_none() => {
                    let data = &msg[5..];
                    match (&mut splitter, placement) {
                        (Some(sp), Placement::ByKey { dist, .. }) => {
                            let r = sp.feed(
                                data,
                                |key| place(&map, *dist, key, only, binary),
                                |shard, row| bufs[shard].extend_from_slice(row),
                            );
                            if let Err(e) = r {
                                failure = Some(copy_refusal(e));
                            }
                        }
                        _ => {
                            for &s in shards {
                                bufs[s].extend_from_slice(data);
                            }
                        }
                    }
                    for &s in shards {
                        if bufs[s].len() >= SEND_AT {
                            self.send_copy_data(s, &mut bufs[s]).await?;
                        }
                    }
                }
                b'd' | b'H' | b'S' => {}
                b'c' => {
                    if failure.is_none() {
                        if let (Some(sp), Placement::ByKey { dist, .. }) =
                            (&mut splitter, placement)
                        {
                            let r = sp.finish(
                                |key| place(&map, *dist, key, only, binary),
                                |shard, row| bufs[shard].extend_from_slice(row),
                            );
                            if let Err(e) = r {
                                failure = Some(copy_refusal(e));
                            }
                        }
                    }
                    break;
                }
                b'f' => {
                    let why = crate::protocol::Cursor::new(&msg[5..])
                        .str()
                        .unwrap_or("")
                        .to_string();
                    failure = Some(Refusal::new(
                        "57014",
                        format!("COPY from stdin failed: {why}"),
                    ));
                    break;
                }
                other => {
                    failure = Some(Refusal::new(
                        "08P01",
                        format!("unexpected message type '{}' during COPY", other as char),
                    ));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            for &s in shards {
                self.copy_fail(s, &f.message, batch.is_some()).await;
            }
            // As on success: the client's Sync after CopyDone is the one answered.
            self.skip_ready = batch.is_some();
            return Err(f.into());
        }
        let mut total = 0u64;
        let mut error = None;
        for &s in shards {
            if splitter.is_some() && binary {
                bufs[s].extend_from_slice(&crate::scatter::copy::BINARY_TRAILER);
            }
            self.send_copy_data(s, &mut bufs[s]).await?;
            let max = self.max_msg;
            let co = self.conns[s].as_mut().expect("held");
            let mut done = BytesMut::new();
            messages::empty_message(&mut done, b'c');
            if batch.is_some() {
                // The Sync sent with the Execute was ignored in COPY mode: this one ends it.
                messages::empty_message(&mut done, b'S');
            }
            co.conn
                .stream
                .write_all(&done)
                .await
                .map_err(|e| Refusal::new("08006", e.to_string()))?;
            loop {
                let f = co
                    .conn
                    .read_frame(max)
                    .await
                    .map_err(|e| Refusal::new("08006", e.to_string()))?;
                match f.tag {
                    b'C' => {
                        let tag = crate::protocol::Cursor::new(f.body()).str().unwrap_or("");
                        total += tag
                            .rsplit(' ')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0);
                    }
                    b'E' => {
                        error.get_or_insert(f.raw);
                    }
                    b'Z' => {
                        co.conn.tx_status = crate::protocol::ready_status(&f.raw);
                        break;
                    }
                    _ => {}
                }
            }
        }
        match error {
            Some(raw) => {
                self.out.extend_from_slice(&raw);
                self.tx.fail_any();
            }
            None => messages::command_complete(&mut self.out, &format!("COPY {total}")),
        }
        // The client's Sync after its Execute was "ignored": it sends another after CopyDone,
        // and only that one is answered.
        self.skip_ready = batch.is_some();
        Ok(())
    }

    async fn send_copy_data(&mut self, shard: usize, buf: &mut BytesMut) -> Result<(), Failure> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut msg = BytesMut::with_capacity(buf.len() + 5);
        msg.put_u8(b'd');
        msg.put_u32(buf.len() as u32 + 4);
        msg.extend_from_slice(buf);
        buf.clear();
        let co = self.conns[shard].as_mut().expect("held");
        co.conn
            .stream
            .write_all(&msg)
            .await
            .map_err(|e| Refusal::new("08006", e.to_string()).into())
    }

    /// Ends a shard's COPY with CopyFail and consumes its error. `extended`: the COPY came with
    /// the extended protocol, whose Sync the server ignored in COPY mode; after the error it
    /// waits for another.
    async fn copy_fail(&mut self, shard: usize, why: &str, extended: bool) {
        let max = self.max_msg;
        let Some(co) = self.conns[shard].as_mut() else {
            return;
        };
        let mut msg = BytesMut::new();
        msg.put_u8(b'f');
        msg.put_u32((why.len() + 5) as u32);
        msg.extend_from_slice(why.as_bytes());
        msg.put_u8(0);
        if extended {
            messages::empty_message(&mut msg, b'S');
        }
        if co.conn.stream.write_all(&msg).await.is_err()
            || co.conn.drain_until_ready(max).await.is_ok()
        {
            // drain_until_ready succeeding means no error arrived, which CopyFail always causes.
            self.drop_conn(shard, false);
        }
    }

    fn protocol_end(&mut self, why: &str) -> SessionEnd {
        crate::frontend::fatal_and_close(&mut self.out, "08P01", why);
        SessionEnd::Protocol
    }
}

/// The shard of a COPY row's key (`binary`: in binary format); `only` (a tenant session's
/// tenant, same distribution) refuses rows of any other key.
fn place(
    map: &crate::shardmap::ShardMap,
    dist: usize,
    key: Option<&[u8]>,
    only: Option<&str>,
    binary: bool,
) -> Result<usize, Refusal> {
    let bad = |m: String| Refusal::new("22P04", m);
    let Some(k) = key else {
        return Err(bad(format!(
            "a row's sharding key (distribution '{}') is NULL",
            map.distributions[dist].name
        )));
    };
    let v = if binary {
        map.parse_key_binary(dist, k)
    } else {
        map.parse_key(dist, k)
    }
    .map_err(|e| bad(e.to_string()))?;
    if let Some(t) = only {
        if map.parse_key(dist, t.as_bytes()).ok() != Some(v) {
            return Err(Refusal::new(
                "42501",
                format!(
                    "this session is tenant '{t}' only, and a COPY row belongs to tenant {}",
                    crate::shardmap::display_key(&v)
                ),
            ));
        }
    }
    match map.locate(dist, &v, None).map_err(|e| bad(e.to_string()))? {
        Located::One(s) => Ok(s),
        Located::Group(_) => Err(bad("COPY into a geo table whose region spans several shards needs its hash column; insert those rows with INSERT".into())),
    }
}

fn copy_refusal(e: crate::scatter::copy::CopySplitError<Refusal>) -> Refusal {
    match e {
        crate::scatter::copy::CopySplitError::Place(r) => r,
        other => Refusal::new("22P04", other.to_string()),
    }
}
