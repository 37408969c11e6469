//! Splitting COPY FROM STDIN data into rows and routing each row by its sharding key.
//!
//! CopyData chunks may split a row (or a multi-byte character) anywhere, so row boundaries are
//! found by a resumable scanner and the unfinished tail is carried to the next chunk. Rows are
//! forwarded byte for byte; only the key field is decoded, to place the row.
//!
//! Limits: binary COPY is refused by the driver; only `\n` and `\r\n` line endings are
//! recognised (PostgreSQL also accepts bare `\r`); bytes are interpreted as an ASCII-safe
//! encoding such as UTF-8 (not SJIS/BIG5, where a trailing byte may look like a backslash).
//! A HEADER line is consumed here and sent to no shard: the driver must send the shards
//! their COPY without HEADER.

use std::borrow::Cow;

/// COPY data formats that can be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
}

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
            skip_header: header,
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
            CopyFormat::Text => self.text_key(line),
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
