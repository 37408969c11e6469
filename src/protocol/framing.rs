//! Splitting a byte stream into protocol messages, bounded by a maximum size.
//!
//! Messages are never decoded here: a frame is the raw bytes (type, length, body) so that the
//! data path can forward it untouched, and it is split off the read buffer without copying.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes to make room for before each read when the buffer is (nearly) full.
const READ_CHUNK: usize = 8 * 1024;

/// Pass-through messages larger than this are streamed instead of buffered whole.
pub const STREAM_THRESHOLD: usize = 64 * 1024;

/// Why the byte stream could not be split into messages.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {len} bytes exceeds max_message_size ({max} bytes)")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message length {len}")]
    BadLength { len: i64 },
}

/// One complete protocol message: its type byte and its raw bytes, header included.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body, after the type byte and the length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// A read buffer that yields complete messages.
#[derive(Debug, Default)]
pub struct FrameBuf {
    pub buf: BytesMut,
}

impl FrameBuf {
    /// Splits one complete message off the front, or returns None if more bytes are needed.
    pub fn next_frame(&mut self, max: usize) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(FrameError::BadLength { len: len as i64 });
        }
        if len + 1 > max {
            return Err(FrameError::TooLarge { len: len + 1, max });
        }
        if self.buf.len() < len + 1 {
            // Reserve once for the whole message so a large one is not regrown repeatedly.
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        let tag = self.buf[0];
        let raw = self.buf.split_to(len + 1).freeze();
        Ok(Some(Frame { tag, raw }))
    }

    /// Type and total length of the first message if it is complete, without splitting it off;
    /// the caller reads `buf[..len]` in place and then advances past it.
    pub fn peek(&mut self, max: usize) -> Result<Option<(u8, usize)>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(FrameError::BadLength { len: len as i64 });
        }
        if len + 1 > max {
            return Err(FrameError::TooLarge { len: len + 1, max });
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        Ok(Some((self.buf[0], len + 1)))
    }

    /// If the first message is a large one of a type in `tags` (never inspected), starts
    /// streaming it: moves its buffered part to `out` and returns how many bytes of it are
    /// still to come. Memory stays bounded by the read chunk, whatever the message's size.
    pub fn start_stream(&mut self, tags: &[u8], out: &mut BytesMut) -> Option<usize> {
        if self.buf.len() < 5 || !tags.contains(&self.buf[0]) {
            return None;
        }
        let total =
            u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize + 1;
        if total <= STREAM_THRESHOLD {
            return None;
        }
        Some(self.continue_stream(total, out))
    }

    /// Moves up to `left` buffered bytes of a streamed message to `out`; returns how many remain.
    pub fn continue_stream(&mut self, left: usize, out: &mut BytesMut) -> usize {
        let n = left.min(self.buf.len());
        out.extend_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        left - n
    }

    /// Drops the first `n` bytes (a message handled in place).
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// Reads more bytes; returns 0 at end of stream.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_CHUNK);
        }
        r.read_buf(&mut self.buf).await
    }

    /// Reads what the socket holds already, without waiting; 0 when it holds nothing (or at end
    /// of stream, which the next `fill` reports).
    pub fn try_fill(&mut self, r: &tokio::net::TcpStream) -> usize {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_CHUNK);
        }
        r.try_read_buf(&mut self.buf).unwrap_or(0)
    }

    /// True when no partial message is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Gives back memory held by an empty buffer, so idle connections stay small.
    pub fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > READ_CHUNK {
            self.buf = BytesMut::new();
        }
    }
}

/// Reads the untyped first message of a connection (startup, SSL, cancel): length then body.
pub async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Bytes>, StartupReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(StartupReadError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=max).contains(&len) {
        return Err(StartupReadError::BadLength(len));
    }
    let mut body = BytesMut::zeroed(len - 4);
    r.read_exact(&mut body)
        .await
        .map_err(StartupReadError::Io)?;
    Ok(Some(body.freeze()))
}

/// Why the first message of a connection could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StartupReadError {
    #[error("invalid startup packet length {0}")]
    BadLength(usize),
    #[error("{0}")]
    Io(std::io::Error),
}

/// A cursor over a message body that never reads past the end.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Starts at the beginning of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// A NUL-terminated string (without the NUL).
    pub fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.data.iter().position(|&b| b == 0)?;
        let s = &self.data[..end];
        self.data = &self.data[end + 1..];
        Some(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.cstr()?).ok()
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Option<i16> {
        let v = self.take(2)?;
        Some(i16::from_be_bytes([v[0], v[1]]))
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Option<i32> {
        let v = self.take(4)?;
        Some(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Some(a)
    }

    /// Everything not yet read.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// A single byte.
    pub fn u8(&mut self) -> Option<u8> {
        let v = *self.data.first()?;
        self.data.advance(1);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_complete_messages_and_waits_for_partial() {
        let mut fb = FrameBuf::default();
        let mut bytes = msg(b'Q', b"select 1\0");
        bytes.extend(msg(b'S', b""));
        let partial = msg(b'X', b"");
        fb.buf.extend_from_slice(&bytes);
        fb.buf.extend_from_slice(&partial[..3]);
        let a = fb.next_frame(1 << 20).unwrap().unwrap();
        assert_eq!(a.tag, b'Q');
        assert_eq!(a.body(), b"select 1\0");
        let b = fb.next_frame(1 << 20).unwrap().unwrap();
        assert_eq!(b.tag, b'S');
        assert!(b.body().is_empty());
        assert!(fb.next_frame(1 << 20).unwrap().is_none());
        fb.buf.extend_from_slice(&partial[3..]);
        assert_eq!(fb.next_frame(1 << 20).unwrap().unwrap().tag, b'X');
    }

    #[test]
    fn rejects_huge_and_short_lengths() {
        let mut fb = FrameBuf::default();
        fb.buf.extend_from_slice(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(
            fb.next_frame(1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        let mut fb = FrameBuf::default();
        fb.buf.extend_from_slice(&[b'Q', 0, 0, 0, 3]);
        assert!(matches!(
            fb.next_frame(1 << 20),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn large_passthrough_messages_stream() {
        let body = vec![7u8; STREAM_THRESHOLD + 10];
        let whole = msg(b'D', &body);
        let mut fb = FrameBuf::default();
        let mut out = BytesMut::new();
        fb.buf.extend_from_slice(&whole[..1000]);
        assert_eq!(fb.start_stream(b"Q", &mut out), None);
        let left = fb.start_stream(b"Dd", &mut out).unwrap();
        assert_eq!((out.len(), left), (1000, whole.len() - 1000));
        fb.buf.extend_from_slice(&whole[1000..]);
        fb.buf.extend_from_slice(&msg(b'Z', b"I"));
        assert_eq!(fb.continue_stream(left, &mut out), 0);
        assert_eq!(&out[..], &whole[..]);
        assert_eq!(fb.next_frame(1 << 20).unwrap().unwrap().tag, b'Z');
        let mut small = FrameBuf::default();
        small.buf.extend_from_slice(&msg(b'D', b"abc"));
        assert_eq!(small.start_stream(b"D", &mut out), None);
    }

    #[test]
    fn cursor_never_reads_past_end() {
        let mut c = Cursor::new(b"ab\0\x00\x01");
        assert_eq!(c.str(), Some("ab"));
        assert_eq!(c.i16(), Some(1));
        assert_eq!(c.i16(), None);
        assert_eq!(c.cstr(), None);
        assert_eq!(Cursor::new(b"abc").cstr(), None);
    }
}
