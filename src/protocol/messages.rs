//! Encoders for the few messages pgshard writes itself, appended to an output buffer.

use bytes::{BufMut, BytesMut};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196608;
/// Magic "version" of an SSLRequest.
pub const SSL_REQUEST: i32 = 80877103;
/// Magic "version" of a GSSENCRequest.
pub const GSSENC_REQUEST: i32 = 80877104;
/// Magic "version" of a CancelRequest.
pub const CANCEL_REQUEST: i32 = 80877102;

/// Starts a typed message; returns the offset of its length field for `finish`.
pub(crate) fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

/// Writes the length of a message started with `begin`.
pub(crate) fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// Error severity as sent in the 'S' and 'V' fields.
#[derive(Debug, Clone, Copy)]
pub enum Severity {
    Error,
    Fatal,
}

/// An ErrorResponse with SQLSTATE `code`, message and optional hint.
pub fn error_response(
    out: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let at = begin(out, b'E');
    let sev: &[u8] = match severity {
        Severity::Error => b"ERROR",
        Severity::Fatal => b"FATAL",
    };
    out.put_u8(b'S');
    put_cstr(out, sev);
    out.put_u8(b'V');
    put_cstr(out, sev);
    out.put_u8(b'C');
    put_cstr(out, code.as_bytes());
    out.put_u8(b'M');
    put_cstr(out, message.as_bytes());
    if let Some(h) = hint {
        out.put_u8(b'H');
        put_cstr(out, h.as_bytes());
    }
    out.put_u8(0);
    finish(out, at);
}

/// A NoticeResponse with a message.
pub fn notice_response(out: &mut BytesMut, code: &str, message: &str) {
    let at = begin(out, b'N');
    out.put_u8(b'S');
    put_cstr(out, b"NOTICE");
    out.put_u8(b'V');
    put_cstr(out, b"NOTICE");
    out.put_u8(b'C');
    put_cstr(out, code.as_bytes());
    out.put_u8(b'M');
    put_cstr(out, message.as_bytes());
    out.put_u8(0);
    finish(out, at);
}

/// ReadyForQuery with transaction status `I`, `T` or `E`.
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_slice(&[b'Z', 0, 0, 0, 5, status]);
}

/// An Authentication message with its sub-code and payload.
pub fn authentication(out: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(out, b'R');
    out.put_i32(code);
    out.put_slice(payload);
    finish(out, at);
}

/// AuthenticationSASL offering SCRAM-SHA-256.
pub fn auth_sasl(out: &mut BytesMut) {
    authentication(out, 10, b"SCRAM-SHA-256\0\0");
}

/// ParameterStatus name=value.
pub fn parameter_status(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    let at = begin(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    finish(out, at);
}

/// BackendKeyData with the key a client uses to cancel.
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    out.put_u8(b'K');
    out.put_i32(12);
    out.put_i32(pid);
    out.put_i32(secret);
}

/// CommandComplete with a tag such as `SET` or `SHOW`.
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    let at = begin(out, b'C');
    put_cstr(out, tag.as_bytes());
    finish(out, at);
}

/// RowDescription of text columns.
pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    let at = begin(out, b'T');
    out.put_i16(columns.len() as i16);
    for c in columns {
        put_cstr(out, c.as_bytes());
        out.put_i32(0); // table oid
        out.put_i16(0); // column number
        out.put_i32(25); // text
        out.put_i16(-1);
        out.put_i32(-1);
        out.put_i16(0); // text format
    }
    finish(out, at);
}

/// DataRow of text values (None = NULL).
pub fn data_row<S: AsRef<str>>(out: &mut BytesMut, values: &[Option<S>]) {
    let at = begin(out, b'D');
    out.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                out.put_i32(v.as_ref().len() as i32);
                out.put_slice(v.as_ref().as_bytes());
            }
            None => out.put_i32(-1),
        }
    }
    finish(out, at);
}

/// ParseComplete ('1'), BindComplete ('2') or CloseComplete ('3').
pub fn empty_message(out: &mut BytesMut, tag: u8) {
    out.put_slice(&[tag, 0, 0, 0, 4]);
}

/// A simple Query.
pub fn query(out: &mut BytesMut, sql: &str) {
    let at = begin(out, b'Q');
    put_cstr(out, sql.as_bytes());
    finish(out, at);
}

/// Terminate.
pub fn terminate(out: &mut BytesMut) {
    out.put_slice(&[b'X', 0, 0, 0, 4]);
}

/// A Parse of `text` as statement `name` with the raw parameter-type section copied as is.
pub fn parse(out: &mut BytesMut, name: &[u8], text: &[u8], param_types: &[u8]) {
    let at = begin(out, b'P');
    put_cstr(out, name);
    put_cstr(out, text);
    out.put_slice(param_types);
    finish(out, at);
}

/// A Close of prepared statement `name`.
pub fn close_statement(out: &mut BytesMut, name: &[u8]) {
    let at = begin(out, b'C');
    out.put_u8(b'S');
    put_cstr(out, name);
    finish(out, at);
}

/// A Describe of prepared statement `name`.
pub fn describe_statement(out: &mut BytesMut, name: &[u8]) {
    let at = begin(out, b'D');
    out.put_u8(b'S');
    put_cstr(out, name);
    finish(out, at);
}

/// Re-encodes a Bind or Describe whose statement name changes: `head` is what precedes the
/// name (portal name for Bind, the 'S' kind byte for Describe), `tail` what follows it.
pub fn with_statement_name(out: &mut BytesMut, tag: u8, head: &[u8], name: &[u8], tail: &[u8]) {
    let at = begin(out, tag);
    out.put_slice(head);
    put_cstr(out, name);
    out.put_slice(tail);
    finish(out, at);
}

/// A StartupMessage for a server connection.
pub fn startup(out: &mut BytesMut, params: &[(&str, &str)]) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A PasswordMessage / SASLResponse ('p') with raw payload.
pub fn password(out: &mut BytesMut, payload: &[u8]) {
    let at = begin(out, b'p');
    out.put_slice(payload);
    finish(out, at);
}

/// A SASLInitialResponse for `mechanism`.
pub fn sasl_initial(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let at = begin(out, b'p');
    put_cstr(out, mechanism.as_bytes());
    out.put_i32(data.len() as i32);
    out.put_slice(data);
    finish(out, at);
}

/// A CancelRequest for a server's backend key.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&16i32.to_be_bytes());
    b[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    b[8..12].copy_from_slice(&pid.to_be_bytes());
    b[12..16].copy_from_slice(&secret.to_be_bytes());
    b
}

/// The fields of an ErrorResponse or NoticeResponse body that pgshard cares about.
pub struct ErrorFields<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

/// Extracts SQLSTATE and message from an ErrorResponse body.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut code = "";
    let mut message = "";
    let mut c = super::framing::Cursor::new(body);
    while let Some(t) = c.u8() {
        if t == 0 {
            break;
        }
        let Some(v) = c.str() else { break };
        match t {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    ErrorFields { code, message }
}

/// A server's FATAL ErrorResponse (its connection ends) as an ERROR for a client whose own
/// connection to pgshard goes on; None when `raw` is no FATAL error.
pub fn demote_fatal(raw: &[u8]) -> Option<BytesMut> {
    if raw.first() != Some(&b'E') || raw.len() < 5 {
        return None;
    }
    let mut fields = Vec::new();
    let mut c = super::framing::Cursor::new(&raw[5..]);
    let mut fatal = false;
    while let Some(t) = c.u8() {
        if t == 0 {
            break;
        }
        let v = c.str()?;
        let v = match t {
            b'S' | b'V' if v == "FATAL" || v == "PANIC" => {
                fatal = true;
                "ERROR"
            }
            _ => v,
        };
        fields.push((t, v));
    }
    if !fatal {
        return None;
    }
    let mut out = BytesMut::with_capacity(raw.len());
    let at = begin(&mut out, b'E');
    for (t, v) in fields {
        out.put_u8(t);
        put_cstr(&mut out, v.as_bytes());
    }
    out.put_u8(0);
    finish(&mut out, at);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_fatal_becomes_client_error() {
        let mut fatal = BytesMut::new();
        error_response(&mut fatal, Severity::Fatal, "57P01", "terminating", None);
        let e = demote_fatal(&fatal).expect("demoted");
        let mut want = BytesMut::new();
        error_response(&mut want, Severity::Error, "57P01", "terminating", None);
        assert_eq!(e, want);
        assert!(demote_fatal(&want).is_none(), "an ERROR stays as it is");
    }

    #[test]
    fn error_response_roundtrip() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, "53300", "too many", Some("wait"));
        assert_eq!(out[0], b'E');
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        let f = parse_error_fields(&out[5..]);
        assert_eq!(f.code, "53300");
        assert_eq!(f.message, "too many");
    }

    #[test]
    fn bind_rename_keeps_tail() {
        let mut out = BytesMut::new();
        with_statement_name(
            &mut out,
            b'B',
            b"p\0",
            b"pgshard_1",
            b"\x00\x00\x00\x00\x00\x00",
        );
        assert_eq!(&out[5..], b"p\0pgshard_1\0\x00\x00\x00\x00\x00\x00");
    }
}
