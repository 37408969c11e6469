//! Reading and writing the backend messages the merger rewrites: RowDescription and DataRow.

use bytes::{BufMut, Bytes, BytesMut};

use super::merge::MergeError;
use crate::protocol::messages::{begin, finish};
use crate::protocol::Cursor;

/// One field descriptor of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub table_oid: i32,
    pub attnum: i16,
    pub type_oid: i32,
    pub typlen: i16,
    pub typmod: i32,
    pub format: i16,
}

fn malformed(what: &str) -> MergeError {
    MergeError::Mismatch(format!("malformed {what} from a shard"))
}

/// Fields of a RowDescription body.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, MergeError> {
    let mut c = Cursor::new(body);
    let n = c.i16().ok_or_else(|| malformed("RowDescription"))?;
    (0..n.max(0))
        .map(|_| {
            let f = (|| {
                Some(Field {
                    name: c.cstr()?.to_vec(),
                    table_oid: c.i32()?,
                    attnum: c.i16()?,
                    type_oid: c.i32()?,
                    typlen: c.i16()?,
                    typmod: c.i32()?,
                    format: c.i16()?,
                })
            })();
            f.ok_or_else(|| malformed("RowDescription"))
        })
        .collect()
}

/// Appends a RowDescription message.
pub fn put_row_description(out: &mut BytesMut, fields: &[Field]) {
    let at = begin(out, b'T');
    out.put_i16(fields.len() as i16);
    for f in fields {
        out.put_slice(&f.name);
        out.put_u8(0);
        out.put_i32(f.table_oid);
        out.put_i16(f.attnum);
        out.put_i32(f.type_oid);
        out.put_i16(f.typlen);
        out.put_i32(f.typmod);
        out.put_i16(f.format);
    }
    finish(out, at);
}

/// A DataRow kept whole, with the position of each column value inside it.
#[derive(Debug, Clone)]
pub struct Row {
    pub msg: Bytes,
    /// (start, end) of each value in `msg`; None for NULL.
    cols: Vec<Option<(u32, u32)>>,
}

impl Row {
    /// Indexes a complete DataRow message (tag and length included).
    pub fn parse(msg: Bytes) -> Result<Row, MergeError> {
        let body = msg.get(5..).ok_or_else(|| malformed("DataRow"))?;
        let mut c = Cursor::new(body);
        let n = c.i16().ok_or_else(|| malformed("DataRow"))?;
        let mut cols = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            let len = c.i32().ok_or_else(|| malformed("DataRow"))?;
            if len < 0 {
                cols.push(None);
                continue;
            }
            let start = msg.len() - c.rest().len();
            c.take(len as usize).ok_or_else(|| malformed("DataRow"))?;
            cols.push(Some((start as u32, (start + len as usize) as u32)));
        }
        Ok(Row { msg, cols })
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.cols.len()
    }

    /// The value of column `i` (None for NULL or a column past the end).
    pub fn col(&self, i: usize) -> Option<&[u8]> {
        let (s, e) = (*self.cols.get(i)?)?;
        Some(&self.msg[s as usize..e as usize])
    }

    /// The message with only the first `keep` columns, shared when nothing is dropped.
    pub fn visible(&self, keep: usize) -> Bytes {
        if keep >= self.cols.len() {
            return self.msg.clone();
        }
        // Values are contiguous, so the kept ones are one slice of the original body.
        let body_end = self.end_of(keep);
        let mut out = BytesMut::with_capacity(body_end);
        let at = begin(&mut out, b'D');
        out.put_i16(keep as i16);
        out.put_slice(&self.msg[7..body_end]);
        finish(&mut out, at);
        out.freeze()
    }

    /// Offset in `msg` just past the first `keep` columns.
    fn end_of(&self, keep: usize) -> usize {
        let mut pos = 7;
        for c in &self.cols[..keep] {
            pos = match c {
                Some((_, e)) => *e as usize,
                None => pos + 4,
            };
        }
        pos
    }
}

/// Appends a DataRow of the given values.
pub fn put_data_row<'a>(
    out: &mut BytesMut,
    values: impl ExactSizeIterator<Item = Option<&'a [u8]>>,
) {
    let at = begin(out, b'D');
    out.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
            None => out.put_i32(-1),
        }
    }
    finish(out, at);
}

/// Appends a CommandComplete.
pub fn put_command_complete(out: &mut BytesMut, tag: &[u8]) {
    let at = begin(out, b'C');
    out.put_slice(tag);
    out.put_u8(0);
    finish(out, at);
}
