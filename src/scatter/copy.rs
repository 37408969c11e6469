//! Splitting COPY FROM STDIN data into rows and routing each row by its sharding key.
//!
//! CopyData chunks may split a row (or a multi-byte character) anywhere, so row boundaries are
//! found by a resumable scanner and the unfinished tail is carried to the next chunk. Rows are
//! forwarded byte for byte; only the key field is decoded, to place the row.
//!
//! Limits: only `\n` and `\r\n` line endings are recognised (PostgreSQL also accepts bare
//! `\r`); bytes are interpreted as an ASCII-safe encoding such as UTF-8 (not SJIS/BIG5, where a
//! trailing byte may look like a backslash). A HEADER line is consumed here and sent to no
//! shard: the driver must send the shards their COPY without HEADER.
//!
//! Binary format: tuples are framed by their field counts and lengths. The client's file
//! header and trailer are consumed here; the driver sends every shard `BINARY_HEADER` before
//! its rows and `BINARY_TRAILER` after them.

use std::borrow::Cow;

/// COPY data formats that can be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// The header each shard's binary COPY starts with: the signature, no flags, no extension.
pub const BINARY_HEADER: [u8; 19] = *b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary file trailer: a field count of -1.
pub const BINARY_TRAILER: [u8; 2] = [0xff, 0xff];

/// Why COPY data could not be split.
#[derive(Debug, thiserror::Error)]
pub enum CopySplitError<E> {
    /// The placement callback refused a row.
    #[error("{0}")]
    Place(E),
    /// A row grew past the buffering limit before its end was seen.
    #[error("COPY row {row} is longer than {limit} bytes")]
    RowTooLong { row: u64, limit: usize },
    /// A row whose key could not be read.
    #[error("COPY row {row}: {reason}")]
    Malformed { row: u64, reason: String },
}

/// Default bound on one row's size while it is being assembled.
pub const DEFAULT_MAX_ROW: usize = 64 << 20;

/// Splits a COPY FROM STDIN stream into rows assigned to shards.
#[derive(Debug)]
pub struct CopySplitter {
    format: CopyFormat,
    delimiter: u8,
    quote: u8,
    escape: u8,
    skip_header: bool,
    null: Vec<u8>,
    key_column: usize,
    max_row: usize,
    /// The incomplete row carried over from previous chunks.
    pending: Vec<u8>,
    in_quotes: bool,
    /// The previous byte was an escape (text: backslash; CSV: escape inside quotes).
    escaped: bool,
    /// The `\.` end marker was seen: everything after it is ignored.
    done: bool,
    rows: u64,
}

impl CopySplitter {
    /// A splitter for the given COPY options; `key_column` is the 0-based field holding the
    /// sharding key, `null` the NULL string (`\N` in text, empty in CSV by default).
    pub fn new(
        format: CopyFormat,
        delimiter: u8,
        quote: u8,
        escape: u8,
        header: bool,
        null: Vec<u8>,
        key_column: usize,
    ) -> Self {
        CopySplitter {
            format,
            delimiter,
            quote,
            escape,
            // Binary data starts with a file header, HEADER or not.
            skip_header: header || format == CopyFormat::Binary,
            null,
            key_column,
            max_row: DEFAULT_MAX_ROW,
            pending: Vec::new(),
            in_quotes: false,
            escaped: false,
            done: false,
            rows: 0,
        }
    }

    /// Sets the largest row accepted (bytes, newline included).
    pub fn with_max_row(mut self, max_row: usize) -> Self {
        self.max_row = max_row;
        self
    }

    /// Data rows placed so far (header and end marker not counted).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// True once the `\.` end marker was seen.
    pub fn ended(&self) -> bool {
        self.done
    }

    /// Feeds one chunk: each complete row's key goes to `place`, which picks its shard, and
    /// the row's raw bytes (newline included) go to `sink` for that shard.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut place: impl FnMut(Option<&[u8]>) -> Result<usize, E>,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> Result<(), CopySplitError<E>> {
        if self.format == CopyFormat::Binary {
            return self.feed_binary(chunk, &mut place, &mut sink);
        }
        let mut start = 0;
        for (i, &c) in chunk.iter().enumerate() {
            if self.done {
                return Ok(());
            }
            if !self.row_ends_at(c) {
                continue;
            }
            let len = self.pending.len() + i + 1 - start;
            if len > self.max_row {
                return Err(self.too_long());
            }
            if self.pending.is_empty() {
                self.row(&chunk[start..=i], &mut place, &mut sink)?;
            } else {
                let mut row = std::mem::take(&mut self.pending);
                row.extend_from_slice(&chunk[start..=i]);
                let r = self.row(&row, &mut place, &mut sink);
                row.clear();
                self.pending = row;
                r?;
            }
            start = i + 1;
        }
        if self.done {
            return Ok(());
        }
        if self.pending.len() + chunk.len() - start > self.max_row {
            return Err(self.too_long());
        }
        self.pending.extend_from_slice(&chunk[start..]);
        Ok(())
    }

    /// Ends the stream: a last row without a newline is placed (a newline is added so the
    /// shard streams stay row-aligned).
    pub fn finish<E>(
        &mut self,
        mut place: impl FnMut(Option<&[u8]>) -> Result<usize, E>,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> Result<(), CopySplitError<E>> {
        if self.done || self.pending.is_empty() {
            return Ok(());
        }
        if self.format == CopyFormat::Binary {
            return Err(CopySplitError::Malformed {
                row: self.rows + 1,
                reason: format!(
                    "the binary COPY data ends inside a {} ({} bytes left over)",
                    if self.skip_header {
                        "file header"
                    } else {
                        "tuple"
                    },
                    self.pending.len()
                ),
            });
        }
        if self.in_quotes {
            return Err(CopySplitError::Malformed {
                row: self.rows + 1,
                reason: "unterminated CSV quoted field".into(),
            });
        }
        let mut row = std::mem::take(&mut self.pending);
        row.push(b'\n');
        self.row(&row, &mut place, &mut sink)
    }

    /// Binary format: every complete item (file header, tuple, trailer) of the carried bytes
    /// plus `chunk`; an incomplete one is carried to the next chunk.
    fn feed_binary<E>(
        &mut self,
        chunk: &[u8],
        place: &mut impl FnMut(Option<&[u8]>) -> Result<usize, E>,
        sink: &mut impl FnMut(usize, &[u8]),
    ) -> Result<(), CopySplitError<E>> {
        let mut carried = std::mem::take(&mut self.pending);
        let from_chunk = carried.is_empty();
        if !from_chunk {
            carried.extend_from_slice(chunk);
        }
        let data: &[u8] = if from_chunk { chunk } else { &carried };
        let mut at = 0;
        while !self.done {
            match self.binary_item(&data[at..], place, sink)? {
                Some(n) => at += n,
                None => break,
            }
        }
        if self.done {
            carried.clear();
        } else if from_chunk {
            carried.extend_from_slice(&chunk[at..]);
        } else {
            carried.drain(..at);
        }
        if carried.len() > self.max_row {
            return Err(self.too_long());
        }
        self.pending = carried;
        Ok(())
    }

    /// Consumes the item `data` starts with and returns its length; None if it is incomplete.
    fn binary_item<E>(
        &mut self,
        data: &[u8],
        place: &mut impl FnMut(Option<&[u8]>) -> Result<usize, E>,
        sink: &mut impl FnMut(usize, &[u8]),
    ) -> Result<Option<usize>, CopySplitError<E>> {
        let bad = |row: u64, reason: String| CopySplitError::Malformed { row, reason };
        let be32 = |at: usize| {
            data.get(at..at + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        if self.skip_header {
            let (Some(flags), Some(ext)) = (be32(11), be32(15)) else {
                return Ok(None);
            };
            // Every binary file header starts with the 11-byte signature ours starts with.
            if data[..11] != BINARY_HEADER[..11] {
                return Err(bad(
                    0,
                    "not binary COPY data (the file signature is missing)".into(),
                ));
            }
            if flags & (1 << 16) != 0 {
                return Err(bad(0, "binary COPY data WITH OIDS is not supported".into()));
            }
            let end = 19
                + usize::try_from(ext).map_err(|_| {
                    bad(
                        0,
                        "the binary COPY header's extension length is negative".into(),
                    )
                })?;
            if data.len() < end {
                return Ok(None);
            }
            self.skip_header = false;
            return Ok(Some(end));
        }
        let Some(count) = data.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
            return Ok(None);
        };
        let row = self.rows + 1;
        if count == -1 {
            self.done = true;
            return Ok(Some(2));
        }
        let count = usize::try_from(count).map_err(|_| bad(row, format!("field count {count}")))?;
        let mut at = 2;
        let mut key = None;
        for field in 0..count {
            let Some(len) = be32(at) else {
                return Ok(None);
            };
            at += 4;
            let value = match len {
                -1 => None,
                n if n < 0 => return Err(bad(row, format!("field length {n}"))),
                n => {
                    let end = at + n as usize;
                    if end > data.len() {
                        if end > self.max_row {
                            return Err(self.too_long());
                        }
                        return Ok(None);
                    }
                    let v = &data[at..end];
                    at = end;
                    Some(v)
                }
            };
            if field == self.key_column {
                key = Some(value);
            }
        }
        let Some(key) = key else {
            return Err(bad(
                row,
                format!("no field {} for the sharding key", self.key_column + 1),
            ));
        };
        let shard = place(key).map_err(CopySplitError::Place)?;
        sink(shard, &data[..at]);
        self.rows += 1;
        Ok(Some(at))
    }

    fn too_long<E>(&self) -> CopySplitError<E> {
        CopySplitError::RowTooLong {
            row: self.rows + 1,
            limit: self.max_row,
        }
    }

    /// Advances the scanner over one byte; true if it ends a row.
    fn row_ends_at(&mut self, c: u8) -> bool {
        match self.format {
            // A backslash escapes whatever follows, even a newline, as in PostgreSQL.
            CopyFormat::Text => {
                if self.escaped {
                    self.escaped = false;
                } else if c == b'\\' {
                    self.escaped = true;
                } else if c == b'\n' {
                    return true;
                }
            }
            CopyFormat::Binary => {}
            CopyFormat::Csv => {
                if !self.in_quotes {
                    if c == self.quote {
                        self.in_quotes = true;
                    }
                    return c == b'\n';
                }
                if self.escaped {
                    self.escaped = false;
                    if c == self.quote || c == self.escape {
                        return false;
                    }
                }
                if c == self.escape && self.escape != self.quote {
                    self.escaped = true;
                } else if c == self.quote {
                    // With escape == quote, a doubled quote closes and reopens: same outcome.
                    self.in_quotes = false;
                }
            }
        }
        false
    }

    /// Handles one complete row (newline included).
    fn row<E>(
        &mut self,
        raw: &[u8],
        place: &mut impl FnMut(Option<&[u8]>) -> Result<usize, E>,
        sink: &mut impl FnMut(usize, &[u8]),
    ) -> Result<(), CopySplitError<E>> {
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.skip_header {
            self.skip_header = false;
            return Ok(());
        }
        if line == b"\\." {
            self.done = true;
            return Ok(());
        }
        let key = match self.format {
            CopyFormat::Text | CopyFormat::Binary => self.text_key(line),
            CopyFormat::Csv => self.csv_key(line),
        };
        let key = key.ok_or_else(|| CopySplitError::Malformed {
            row: self.rows + 1,
            reason: format!("no field {} for the sharding key", self.key_column + 1),
        })?;
        let shard = place(key.as_deref()).map_err(CopySplitError::Place)?;
        sink(shard, raw);
        self.rows += 1;
        Ok(())
    }

    /// The decoded key field of a text-format line: None if missing, Some(None) for NULL.
    fn text_key<'a>(&self, line: &'a [u8]) -> Option<Option<Cow<'a, [u8]>>> {
        let (mut field, mut start, mut i) = (0, 0, 0);
        while i <= line.len() {
            let at_end = i == line.len();
            if !at_end && line[i] == b'\\' {
                i = (i + 2).min(line.len());
                continue;
            }
            if at_end || line[i] == self.delimiter {
                if field == self.key_column {
                    let raw = &line[start..i.min(line.len())];
                    // The NULL string is matched before escapes are decoded, as PostgreSQL does.
                    return Some((raw != self.null.as_slice()).then(|| decode_text(raw)));
                }
                field += 1;
                start = i + 1;
            }
            i += 1;
        }
        None
    }

    /// The key field of a CSV line, quotes and escapes removed; an unquoted field equal to
    /// the NULL string is NULL.
    fn csv_key<'a>(&self, line: &'a [u8]) -> Option<Option<Cow<'a, [u8]>>> {
        let mut field = 0;
        let mut i = 0;
        loop {
            let start = i;
            let mut value = Vec::new();
            let mut quoted = false;
            let mut in_quotes = false;
            while i < line.len() {
                let c = line[i];
                if in_quotes {
                    if c == self.escape
                        && i + 1 < line.len()
                        && (line[i + 1] == self.quote || line[i + 1] == self.escape)
                    {
                        value.push(line[i + 1]);
                        i += 2;
                        continue;
                    }
                    if c == self.quote {
                        in_quotes = false;
                    } else {
                        value.push(c);
                    }
                } else if c == self.delimiter {
                    break;
                } else if c == self.quote {
                    in_quotes = true;
                    quoted = true;
                } else {
                    value.push(c);
                }
                i += 1;
            }
            if field == self.key_column {
                let raw = &line[start..i];
                if !quoted && raw == self.null.as_slice() {
                    return Some(None);
                }
                return Some(Some(if quoted {
                    Cow::Owned(value)
                } else {
                    Cow::Borrowed(raw)
                }));
            }
            if i >= line.len() {
                return None;
            }
            field += 1;
            i += 1;
        }
    }
}

/// Decodes text-format backslash escapes.
fn decode_text(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        if c != b'\\' || i == raw.len() {
            out.push(c);
            continue;
        }
        let e = raw[i];
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
#[path = "copy_tests.rs"]
mod tests;
