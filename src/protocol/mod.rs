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
            let pid = c.i32().ok_or(StartupError::Layout("short cancel request"))?;
            let secret = c.i32().ok_or(StartupError::Layout("short cancel request"))?;
            return Ok(StartupRequest::Cancel { pid, secret });
        }
        _ => {}
    }
    if version >> 16 != 3 {
        return Err(StartupError::Version { major: version >> 16, minor: version & 0xffff });
    }
    let mut params = Vec::new();
    loop {
        let key = c.str().ok_or(StartupError::Layout("unterminated or non-UTF-8 parameter name"))?;
        if key.is_empty() {
            break;
        }
        let value = c.str().ok_or(StartupError::Layout("unterminated or non-UTF-8 parameter value"))?;
        params.push((key.to_string(), value.to_string()));
    }
    if !c.rest().is_empty() {
        return Err(StartupError::Layout("bytes after the parameter list"));
    }
    Ok(StartupRequest::Startup { params })
}

/// Transaction status from a ReadyForQuery body.
pub fn ready_status(frame: &Frame) -> u8 {
    frame.body().first().copied().unwrap_or(b'I')
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
                assert_eq!(params, vec![("user".into(), "app".into()), ("database".into(), "db".into())])
            }
            other => panic!("{other:?}"),
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
