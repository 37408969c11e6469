//! Multi-shard statements of the extended protocol: the rewritten text each shard prepares
//! (LIMIT + OFFSET pushed down as one LIMIT, avg sent as sum and count), LIMIT/OFFSET
//! parameters taken from the Bind, and the row shape the merger needs when the batch itself
//! does not describe it.

use super::extended::{bind_result_formats, Batch};
use super::motion::Shadowed;
use super::{Failure, Refusal, ShardedSession};
use crate::frontend::{ClientWrite, ReadReady};
use crate::prepared::StatementDef;
use crate::protocol::messages;
use crate::router::{Params, Plan};
use crate::scatter::spec::{CountError, CountExpr, MergeSpec};
use crate::scatter::Merger;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// What a shard said when asked to describe a statement.
enum Described {
    Row(Bytes),
    NoData,
    /// The server refused (its error went to the client).
    Failed,
}

/// Rewritten statements a session keeps before it starts over (clients that prepare ever new
/// texts must not grow it without end).
const REWRITTEN_LIMIT: usize = 1024;

/// OID of int8, the type PostgreSQL gives a `LIMIT $n` parameter.
const INT8: u32 = 20;

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// Gets an extended-protocol multi-shard statement ready: every shard runs the rewritten
    /// statement (shards reading around a move keep their own, already rewritten, text), and
    /// the merger learns the row shape of what the shards return. False when a shard refused
    /// to describe the statement: the client has the server's error.
    pub(super) async fn ready_extended_merge(
        &mut self,
        shards: &[usize],
        plan: &Plan,
        seg: &Batch,
        merger: &mut Merger,
    ) -> Result<bool, Failure> {
        let Some(stmt) = seg.stmt.as_ref() else {
            return Ok(true);
        };
        if let Some(rewritten) = &plan.scatter_sql {
            let types = || rewritten_param_types(&stmt.def.param_types, &plan.merge);
            for o in self.shadow.iter_mut() {
                o.def = Some(Arc::new(StatementDef::new(
                    Bytes::copy_from_slice(o.sql.as_bytes()),
                    types(),
                )));
            }
            if self.ext.rewritten.len() >= REWRITTEN_LIMIT {
                self.ext.rewritten.clear();
            }
            let def = self
                .ext
                .rewritten
                .entry(stmt.def.key)
                .or_insert_with(|| {
                    Arc::new(StatementDef::new(
                        Bytes::copy_from_slice(rewritten.as_bytes()),
                        types(),
                    ))
                })
                .clone();
            for &s in shards {
                if !self.shadow.iter().any(|o| o.shard == s) {
                    self.shadow.push(Shadowed {
                        shard: s,
                        sql: rewritten.clone(),
                        def: Some(def.clone()),
                    });
                }
            }
        }
        let lead = shards[0];
        let lead_def = self
            .shadow
            .iter()
            .find(|o| o.shard == lead)
            .and_then(|o| o.def.clone())
            .unwrap_or_else(|| stmt.def.clone());
        let Some(bind) = &seg.bind else {
            return Ok(true);
        };
        let describes = seg.msgs().any(|m| m[0] == b'D');
        let desc = match self.ext.row_descs.get(&lead_def.key) {
            Some(d) => Some(d.clone()),
            None if merger.needs_row_shape() && !describes => {
                match self.describe_on(lead, &lead_def).await? {
                    Described::Row(d) => {
                        self.ext.row_descs.insert(lead_def.key, d.clone());
                        Some(d)
                    }
                    Described::NoData => None,
                    Described::Failed => return Ok(false),
                }
            }
            None => None,
        };
        if let Some(desc) = desc {
            merger
                .describe(&desc, &bind_result_formats(bind))
                .map_err(|e| Refusal::new("0A000", e.to_string()))?;
        }
        Ok(true)
    }

    /// Asks `shard` to describe `def` (prepared there first if it is not), in its own Sync.
    async fn describe_on(
        &mut self,
        shard: usize,
        def: &Arc<StatementDef>,
    ) -> Result<Described, Failure> {
        self.conn(shard).await?;
        let co = self.conns[shard].as_mut().expect("held");
        let mut out = BytesMut::new();
        if !co.conn.statements.touch(def.key) {
            if let Some(old) = co.conn.statements.insert(def.key) {
                messages::close_statement(&mut out, &crate::prepared::global_name(old));
            }
            messages::parse(&mut out, &def.global_name, &def.text, &def.param_types);
        }
        messages::describe_statement(&mut out, &def.global_name);
        messages::empty_message(&mut out, b'S');
        if let Err(e) = co.conn.stream.write_all(&out).await {
            return Err(self.lost(shard, &e.to_string()));
        }
        let (mut row, mut error) = (None, None);
        loop {
            let f = self.read_msg(shard).await?;
            match f.tag {
                b'T' => row = Some(f.raw),
                b'E' => error = Some(f.raw),
                b'Z' => {
                    if let Some(co) = self.conns[shard].as_mut() {
                        co.conn.tx_status = crate::protocol::ready_status(&f.raw);
                    }
                    break;
                }
                _ => {}
            }
        }
        let Some(error) = error else {
            return Ok(row.map_or(Described::NoData, Described::Row));
        };
        if let Some(co) = self.conns[shard].as_mut() {
            // Its Parse may be what failed.
            co.conn.statements.remove(def.key);
        }
        self.out.extend_from_slice(&error);
        self.tx.fail_any();
        if !self.tx.active() {
            self.drop_conn(shard, true);
        }
        Ok(Described::Failed)
    }
}

/// The merge with its LIMIT/OFFSET parameters replaced by the values the Bind gives them.
pub(super) fn bound_merge(spec: &MergeSpec, params: &Params) -> Result<MergeSpec, Refusal> {
    let mut spec = spec.clone();
    if let Some(e) = spec.limit_expr.take() {
        spec.limit = row_count(evaluate(&e, params, "LIMIT")?, "LIMIT", "2201W")?;
    }
    if let Some(e) = spec.offset_expr.take() {
        spec.offset = row_count(evaluate(&e, params, "OFFSET")?, "OFFSET", "2201X")?.unwrap_or(0);
    }
    Ok(spec)
}

/// A LIMIT or OFFSET value: NULL is None (no limit), a negative one an error.
fn row_count(n: Option<i64>, what: &str, negative: &str) -> Result<Option<u64>, Refusal> {
    match n {
        Some(n) if n < 0 => Err(Refusal::new(
            negative,
            format!("{what} must not be negative"),
        )),
        n => Ok(n.map(|n| n as u64)),
    }
}

/// The value of a LIMIT/OFFSET expression over the Bind's parameters.
fn evaluate(e: &CountExpr, params: &Params, what: &str) -> Result<Option<i64>, Refusal> {
    e.eval(&mut |p| bound_int(params, p, what))
        .map_err(|e| match e {
            CountError::Param(r) => r,
            CountError::Overflow => Refusal::new("22003", format!("{what}: bigint out of range")),
            CountError::DivisionByZero => {
                Refusal::new("22012", format!("{what}: division by zero"))
            }
        })
}

/// The integer parameter `p` (1-based) is bound to: text or binary int2/4/8; NULL is None.
fn bound_int(params: &Params, p: u16, what: &str) -> Result<Option<i64>, Refusal> {
    let i = usize::from(p) - 1;
    let value = params.values.get(i).ok_or_else(|| {
        Refusal::new(
            "08P01",
            format!("{what} names parameter ${p}, and the Bind has none"),
        )
    })?;
    let Some(v) = value else {
        return Ok(None);
    };
    let format = match params.formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    };
    let n: Option<i64> = match (format, v.len()) {
        (0, _) => std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        (_, 8) => Some(i64::from_be_bytes(v[..8].try_into().expect("8 bytes"))),
        (_, 4) => Some(i32::from_be_bytes(v[..4].try_into().expect("4 bytes")).into()),
        (_, 2) => Some(i16::from_be_bytes(v[..2].try_into().expect("2 bytes")).into()),
        _ => None,
    };
    n.map(Some)
        .ok_or_else(|| Refusal::new("22P02", format!("{what} parameter ${p} is not an integer")))
}

/// The Parse parameter-type section for a rewritten statement: the client's types, with
/// LIMIT/OFFSET parameters the client left untyped given int8. A rewrite may drop them from
/// the text (aggregates get no LIMIT), and a parameter the text no longer mentions must have
/// a type for the server to prepare it.
fn rewritten_param_types(types: &[u8], spec: &MergeSpec) -> Bytes {
    let mut oids: Vec<u32> = types
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let declared = types
        .get(..2)
        .map_or(0, |n| i16::from_be_bytes([n[0], n[1]]).max(0) as usize);
    oids.truncate(declared);
    // Parameters inside LIMIT/OFFSET arithmetic stay in the rewritten text (the router keeps
    // them there), so the server types them as it would the client's statement.
    let bare = |e: &Option<CountExpr>| match e {
        Some(CountExpr::Param(p)) => Some(*p),
        _ => None,
    };
    for p in [bare(&spec.limit_expr), bare(&spec.offset_expr)]
        .into_iter()
        .flatten()
    {
        let i = usize::from(p) - 1;
        if oids.len() <= i {
            oids.resize(i + 1, 0);
        }
        if oids[i] == 0 {
            oids[i] = INT8;
        }
    }
    let mut out = BytesMut::with_capacity(2 + 4 * oids.len());
    out.put_i16(oids.len() as i16);
    for o in oids {
        out.put_u32(o);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(limit: Option<u16>, offset: Option<u16>) -> MergeSpec {
        MergeSpec {
            limit_expr: limit.map(CountExpr::Param),
            offset_expr: offset.map(CountExpr::Param),
            ..Default::default()
        }
    }

    #[test]
    fn limit_parameters_bind_in_text_and_binary() {
        let two = 2i64.to_be_bytes();
        let values: Vec<Option<&[u8]>> = vec![Some(b"x"), Some(b"5"), Some(&two)];
        let params = Params {
            values: &values,
            formats: &[0, 0, 1],
        };
        let b = bound_merge(&spec(Some(2), Some(3)), &params).unwrap();
        assert_eq!((b.limit, b.offset, b.limit_expr), (Some(5), 2, None));
        let nulls: Vec<Option<&[u8]>> = vec![None];
        let params = Params {
            values: &nulls,
            formats: &[],
        };
        let b = bound_merge(&spec(Some(1), None), &params).unwrap();
        assert_eq!(b.limit, None, "LIMIT NULL is no limit");
        let neg: Vec<Option<&[u8]>> = vec![Some(b"-1")];
        let params = Params {
            values: &neg,
            formats: &[],
        };
        assert_eq!(
            bound_merge(&spec(None, Some(1)), &params).unwrap_err().code,
            "2201X"
        );
        assert_eq!(
            bound_merge(&spec(Some(2), None), &params).unwrap_err().code,
            "08P01"
        );
    }

    #[test]
    fn untyped_limit_parameters_become_int8() {
        // Client declared $1 as text (25) and nothing else.
        let mut declared = BytesMut::new();
        declared.put_i16(1);
        declared.put_u32(25);
        let t = rewritten_param_types(&declared, &spec(Some(3), None));
        assert_eq!(&t[..], &[0, 3, 0, 0, 0, 25, 0, 0, 0, 0, 0, 0, 0, 20]);
        let t = rewritten_param_types(&[0, 0], &spec(None, None));
        assert_eq!(&t[..], &[0, 0]);
    }
}
