//! Logical replication from a source shard: a `replication=database` connection that creates
//! the move's slot (exporting the snapshot the copy runs under) and then streams pgoutput
//! (protocol version 1, with logical messages for markers). Framing is pgshard's own; the
//! pgoutput messages are decoded here, the tuple values left as the text PostgreSQL sent.

use super::MoveError;
use crate::backend::{ConnectParams, ServerConn};
use crate::protocol::Cursor;
use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use tokio::io::AsyncWriteExt;

/// A log position.
pub type Lsn = u64;

/// Parses `16/B374D848`.
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Formats an LSN the way PostgreSQL writes it.
pub fn format_lsn(l: Lsn) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

/// The slot a move streams from, and the snapshot its copy must use.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub consistent_point: Lsn,
    pub snapshot: String,
}

/// A replication connection before streaming starts.
pub struct ReplicationConn {
    conn: ServerConn,
    max: usize,
}

impl ReplicationConn {
    /// Connects to a primary in logical replication mode.
    pub async fn open(p: &ConnectParams) -> Result<ReplicationConn, MoveError> {
        let conn = ServerConn::connect_with(p, 0, &[("replication", "database")]).await?;
        Ok(ReplicationConn {
            conn,
            max: p.max_message_size,
        })
    }

    /// Creates the logical slot; with `export`, its snapshot stays usable until this
    /// connection's next command (otherwise `Slot::snapshot` is empty).
    pub async fn create_slot(&mut self, name: &str, export: bool) -> Result<Slot, MoveError> {
        let snapshot = if export { "export" } else { "nothing" };
        let rows = self
            .conn
            .query_rows(
                &format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT '{snapshot}')"),
                self.max,
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| MoveError::Stream("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = parse_lsn(&get(1))
            .ok_or_else(|| MoveError::Stream(format!("bad consistent point {}", get(1))))?;
        Ok(Slot {
            name: get(0),
            consistent_point,
            snapshot: get(2),
        })
    }

    /// Starts streaming the slot from `from` for `publication`.
    pub async fn start(
        mut self,
        slot: &str,
        from: Lsn,
        publication: &str,
    ) -> Result<ChangeStream, MoveError> {
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {} (proto_version '1', publication_names '{publication}', messages 'true')",
            format_lsn(from)
        );
        let mut out = BytesMut::new();
        crate::protocol::messages::query(&mut out, &sql);
        self.conn.stream.write_all(&out).await?;
        loop {
            let f = self.conn.read_frame(self.max).await?;
            match f.tag {
                b'W' => break,
                b'E' => {
                    let e = crate::protocol::messages::parse_error_fields(f.body());
                    return Err(MoveError::Stream(format!(
                        "START_REPLICATION: {} ({})",
                        e.message, e.code
                    )));
                }
                _ => {}
            }
        }
        Ok(ChangeStream {
            conn: self.conn,
            max: self.max,
            relations: HashMap::new(),
            received: from,
        })
    }
}

/// A table as pgoutput describes it.
#[derive(Debug, Clone)]
pub struct Relation {
    /// `schema.table`, as the router's table names are written (no quotes).
    pub name: String,
    pub columns: Vec<String>,
    /// Replica identity (primary key) columns, by position.
    pub key: Vec<bool>,
}

/// One column of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change left alone (not sent).
    Unchanged,
    Text(String),
}

/// A decoded replication event.
#[derive(Debug)]
pub enum Event {
    Begin,
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    /// `old` is the old key when the key changed (or the whole old row under REPLICA IDENTITY FULL).
    Update {
        rel: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Vec<Value>,
    },
    Truncate,
    Commit {
        end: Lsn,
    },
    Message {
        prefix: String,
        content: Vec<u8>,
    },
    /// The server is waiting for feedback, or just telling where its WAL ends.
    Keepalive,
}

/// A running pgoutput stream.
pub struct ChangeStream {
    conn: ServerConn,
    max: usize,
    relations: HashMap<u32, Relation>,
    /// End of the WAL the server has sent so far.
    pub received: Lsn,
}

impl ChangeStream {
    /// The relation a change names.
    pub fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// True when another message is at hand: buffered, or already in the socket. Reading what
    /// the socket holds lets the applier batch all the server has sent before it flushes;
    /// flushing after every 8 KB read made catch-up slower than a busy source writes WAL, and
    /// a move never got out of it.
    pub fn buffered(&mut self) -> bool {
        loop {
            if matches!(self.conn.rbuf.peek(self.max), Ok(Some(_))) {
                return true;
            }
            if self.conn.rbuf.try_fill(&self.conn.stream) == 0 {
                return false;
            }
        }
    }

    /// The next event, answering keepalives that ask for a reply with `flushed`.
    pub async fn next(&mut self, flushed: Lsn) -> Result<Event, MoveError> {
        loop {
            let f = self.conn.read_frame(self.max).await?;
            match f.tag {
                b'd' => {}
                b'E' => {
                    let e = crate::protocol::messages::parse_error_fields(f.body());
                    return Err(MoveError::Stream(format!("{} ({})", e.message, e.code)));
                }
                b'c' => {
                    return Err(MoveError::Stream(
                        "the server ended the replication stream".into(),
                    ))
                }
                _ => continue,
            }
            let body = f.body();
            let mut c = Cursor::new(body);
            match c.u8() {
                Some(b'k') => {
                    let end = i64_at(&mut c)? as u64;
                    let _time = i64_at(&mut c)?;
                    self.received = self.received.max(end);
                    if c.u8() == Some(1) {
                        self.feedback(flushed).await?;
                    }
                    return Ok(Event::Keepalive);
                }
                Some(b'w') => {
                    let _start = i64_at(&mut c)?;
                    let end = i64_at(&mut c)? as u64;
                    let _time = i64_at(&mut c)?;
                    self.received = self.received.max(end);
                    if let Some(e) = self.decode(c.rest())? {
                        return Ok(e);
                    }
                }
                _ => return Err(MoveError::Stream("unknown replication message".into())),
            }
        }
    }

    /// Tells the server what is durably applied, so it can recycle WAL up to there.
    pub async fn feedback(&mut self, flushed: Lsn) -> Result<(), MoveError> {
        let mut body = BytesMut::with_capacity(40);
        body.put_u8(b'r');
        body.put_u64(self.received);
        body.put_u64(flushed);
        body.put_u64(flushed);
        body.put_i64(pg_now());
        body.put_u8(0);
        let mut out = BytesMut::with_capacity(45);
        out.put_u8(b'd');
        out.put_i32(4 + body.len() as i32);
        out.extend_from_slice(&body);
        self.conn.stream.write_all(&out).await?;
        Ok(())
    }

    /// Decodes one pgoutput message; relation and type messages update state and yield nothing.
    fn decode(&mut self, msg: &[u8]) -> Result<Option<Event>, MoveError> {
        let mut c = Cursor::new(msg);
        let bad = || MoveError::Stream("truncated pgoutput message".into());
        Ok(Some(match c.u8().ok_or_else(bad)? {
            b'B' => Event::Begin,
            b'C' => {
                let _flags = c.u8();
                let _commit = i64_at(&mut c)?;
                Event::Commit {
                    end: i64_at(&mut c)? as u64,
                }
            }
            b'R' => {
                let oid = c.i32().ok_or_else(bad)? as u32;
                let ns = c.str().ok_or_else(bad)?.to_string();
                let name = c.str().ok_or_else(bad)?.to_string();
                let _identity = c.u8();
                let n = c.i16().ok_or_else(bad)?.max(0) as usize;
                let (mut columns, mut key) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for _ in 0..n {
                    key.push(c.u8().ok_or_else(bad)? & 1 == 1);
                    columns.push(c.str().ok_or_else(bad)?.to_string());
                    c.take(8).ok_or_else(bad)?;
                }
                let name = if ns == "public" {
                    name
                } else {
                    format!("{ns}.{name}")
                };
                self.relations.insert(oid, Relation { name, columns, key });
                return Ok(None);
            }
            b'I' => {
                let rel = c.i32().ok_or_else(bad)? as u32;
                c.u8();
                Event::Insert {
                    rel,
                    new: tuple(&mut c)?,
                }
            }
            b'U' => {
                let rel = c.i32().ok_or_else(bad)? as u32;
                let mut old = None;
                let mut kind = c.u8().ok_or_else(bad)?;
                if kind == b'K' || kind == b'O' {
                    old = Some(tuple(&mut c)?);
                    kind = c.u8().ok_or_else(bad)?;
                }
                if kind != b'N' {
                    return Err(bad());
                }
                Event::Update {
                    rel,
                    old,
                    new: tuple(&mut c)?,
                }
            }
            b'D' => {
                let rel = c.i32().ok_or_else(bad)? as u32;
                c.u8();
                Event::Delete {
                    rel,
                    old: tuple(&mut c)?,
                }
            }
            b'T' => Event::Truncate,
            b'M' => {
                let _flags = c.u8();
                let _lsn = i64_at(&mut c)?;
                let prefix = c.str().ok_or_else(bad)?.to_string();
                let len = c.i32().ok_or_else(bad)?.max(0) as usize;
                Event::Message {
                    prefix,
                    content: c.take(len).ok_or_else(bad)?.to_vec(),
                }
            }
            // Type and origin messages carry nothing a move needs.
            _ => return Ok(None),
        }))
    }
}

fn i64_at(c: &mut Cursor) -> Result<i64, MoveError> {
    let b = c
        .take(8)
        .ok_or_else(|| MoveError::Stream("truncated replication message".into()))?;
    Ok(i64::from_be_bytes(b.try_into().expect("8 bytes")))
}

fn tuple(c: &mut Cursor) -> Result<Vec<Value>, MoveError> {
    let bad = || MoveError::Stream("truncated tuple".into());
    let n = c.i16().ok_or_else(bad)?.max(0) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(match c.u8().ok_or_else(bad)? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = c.i32().ok_or_else(bad)?.max(0) as usize;
                Value::Text(String::from_utf8_lossy(c.take(len).ok_or_else(bad)?).into_owned())
            }
            other => {
                return Err(MoveError::Stream(format!(
                    "unexpected tuple column kind {}",
                    other as char
                )))
            }
        });
    }
    Ok(out)
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - 946_684_800_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nope"), None);
    }
}
