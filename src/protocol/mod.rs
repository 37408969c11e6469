//! PostgreSQL protocol v3: framing, the messages pgshard writes, and the few it reads.

pub mod framing;
pub mod messages;

pub use framing::{Cursor, Frame, FrameBuf, FrameError};

use bytes::Bytes;

/// The first message a client sends.
#[derive(Debug)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    Version { major: i32, minor: i32 },
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
}

/// Decodes the body (after the length) of a connection's first message.
pub fn parse_startup(body: &Bytes) -> Result<StartupRequest, StartupError> {
    let mut c = Cursor::new(body);
    let version = c.i32().ok_or(StartupError::Layout("too short"))?;
    match version {
        messages::SSL_REQUEST => return Ok(StartupRequest::Ssl),
        messages::GSSENC_REQUEST => return Ok(StartupRequest::GssEnc),
        messages::CANCEL_REQUEST => {
            let pid = c
                .i32()
                .ok_or(StartupError::Layout("short cancel request"))?;
            let secret = c
                .i32()
                .ok_or(StartupError::Layout("short cancel request"))?;
            return Ok(StartupRequest::Cancel { pid, secret });
        }
        _ => {}
    }
    if version >> 16 != 3 {
        return Err(StartupError::Version {
            major: version >> 16,
            minor: version & 0xffff,
        });
    }
    let mut params = Vec::new();
    loop {
        let key = c.str().ok_or(StartupError::Layout(
            "unterminated or non-UTF-8 parameter name",
        ))?;
        if key.is_empty() {
            break;
        }
        let value = c.str().ok_or(StartupError::Layout(
            "unterminated or non-UTF-8 parameter value",
        ))?;
        params.push((key.to_string(), value.to_string()));
    }
    if !c.rest().is_empty() {
        return Err(StartupError::Layout("bytes after the parameter list"));
    }
    Ok(StartupRequest::Startup { params })
}

/// The parts of a Parse body: statement name, query text, and the raw parameter-type section.
pub fn parse_parse(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut c = Cursor::new(body);
    let name = c.cstr()?;
    let text = c.cstr()?;
    Some((name, text, c.rest()))
}

/// The statement a Bind or Describe/Close body names: (bytes before the name, name, bytes
/// after it). For Describe/Close only statements ('S') are returned, portals give None.
pub fn statement_ref(tag: u8, body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut c = Cursor::new(body);
    let head_len = match tag {
        b'B' => c.cstr()?.len() + 1,
        b'D' | b'C' => {
            if c.u8()? != b'S' {
                return None;
            }
            1
        }
        _ => return None,
    };
    let name = c.cstr()?;
    Some((&body[..head_len], name, c.rest()))
}

/// Transaction status from a whole ReadyForQuery message (type and length included).
pub fn ready_status(raw: &[u8]) -> u8 {
    raw.get(5).copied().unwrap_or(b'I')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parses_params() {
        let mut b = Vec::new();
        b.extend_from_slice(&messages::PROTOCOL_V3.to_be_bytes());
        b.extend_from_slice(b"user\0app\0database\0db\0\0");
        match parse_startup(&Bytes::from(b)).unwrap() {
            StartupRequest::Startup { params } => {
                assert_eq!(
                    params,
                    vec![
                        ("user".into(), "app".into()),
                        ("database".into(), "db".into())
                    ]
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statement_refs() {
        assert_eq!(
            statement_ref(b'B', b"p\0s1\0rest"),
            Some((&b"p\0"[..], &b"s1"[..], &b"rest"[..]))
        );
        assert_eq!(
            statement_ref(b'D', b"Ss1\0"),
            Some((&b"S"[..], &b"s1"[..], &b""[..]))
        );
        assert_eq!(statement_ref(b'C', b"Pportal\0"), None);
        assert_eq!(statement_ref(b'B', b"p"), None);
        assert_eq!(
            parse_parse(b"n\0select 1\0\0\0"),
            Some((&b"n"[..], &b"select 1"[..], &b"\0\0"[..]))
        );
        assert_eq!(parse_parse(b"n\0select"), None);
    }

    /// Arbitrary bytes through every decoder: no panic, no read past the end.
    #[test]
    fn decoders_survive_random_bytes() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    // Bias towards NULs and protocol bytes so the parsers get past their first field.
                    match next() % 4 {
                        0 => 0,
                        1 => b"SPBDCQ"[(next() % 6) as usize],
                        _ => next() as u8,
                    }
                })
                .collect();
            crate::fuzz_decoders(&data);
        }
    }

    #[test]
    fn startup_rejects_garbage() {
        assert!(parse_startup(&Bytes::from_static(b"\x00\x02\x00\x00user\0x")).is_err());
        assert!(parse_startup(&Bytes::from_static(b"\x00\x03\x00\x00user\0")).is_err());
        assert!(parse_startup(&Bytes::from_static(b"\x00\x03\x00\x00user\0a\0\0junk")).is_err());
        assert!(parse_startup(&Bytes::from_static(b"\x00")).is_err());
    }
}
