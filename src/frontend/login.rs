//! Client authentication: pgshard plays the PostgreSQL server for SCRAM-SHA-256, md5 or trust.

use crate::app::UserAuth;
use crate::auth::{verify_md5, ScramServer, Secret};
use crate::config::AuthType;
use crate::protocol::messages;
use crate::protocol::{Cursor, Frame, FrameBuf};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Authentication messages are small; a client that is not yet trusted gets no more room.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// Why a client could not log in.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("expected password response, got message type {0}")]
    Unexpected(char),
    #[error("invalid authentication message: {0}")]
    Malformed(String),
    #[error("connection closed during authentication")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl LoginError {
    /// SQLSTATE for the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            LoginError::Failed(_) => "28P01",
            _ => "08P01",
        }
    }
}

async fn read_password_message<S: AsyncRead + Unpin>(
    s: &mut S,
    rbuf: &mut FrameBuf,
) -> Result<Frame, LoginError> {
    loop {
        match rbuf.next_frame(MAX_AUTH_MESSAGE) {
            Ok(Some(f)) if f.tag == b'p' => return Ok(f),
            Ok(Some(f)) => return Err(LoginError::Unexpected(f.tag as char)),
            Ok(None) => {}
            Err(e) => return Err(LoginError::Malformed(e.to_string())),
        }
        if rbuf.fill(s).await? == 0 {
            return Err(LoginError::Closed);
        }
    }
}

/// Runs the authentication exchange and sends AuthenticationOk on success.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    rbuf: &mut FrameBuf,
    method: AuthType,
    user: &str,
    auth: &UserAuth,
) -> Result<(), LoginError> {
    let mut out = BytesMut::new();
    let failed = || LoginError::Failed(user.to_string());
    // A user configured with an md5 hash cannot do SCRAM; fall back to md5 as PostgreSQL does.
    let method = match (method, &auth.secret) {
        (AuthType::ScramSha256, Secret::Md5(_)) => AuthType::Md5,
        (m, _) => m,
    };
    match method {
        AuthType::Trust => {}
        AuthType::Md5 => {
            let salt: [u8; 4] = rand::random();
            messages::authentication(&mut out, 5, &salt);
            s.write_all(&out).await?;
            let f = read_password_message(s, rbuf).await?;
            let resp = Cursor::new(f.body())
                .cstr()
                .ok_or_else(|| LoginError::Malformed("unterminated password".into()))?;
            verify_md5(&auth.secret, user, salt, resp).map_err(|_| failed())?;
        }
        AuthType::ScramSha256 => {
            let verifier = auth.scram.clone().ok_or_else(failed)?;
            let mut scram = ScramServer::new(verifier);
            messages::auth_sasl(&mut out);
            s.write_all(&out).await?;
            let f = read_password_message(s, rbuf).await?;
            let mut c = Cursor::new(f.body());
            let mech = c
                .str()
                .ok_or_else(|| LoginError::Malformed("missing SASL mechanism".into()))?;
            if mech != "SCRAM-SHA-256" {
                return Err(LoginError::Malformed(format!(
                    "unsupported SASL mechanism \"{mech}\""
                )));
            }
            let len = c
                .i32()
                .ok_or_else(|| LoginError::Malformed("missing SASL data length".into()))?;
            let data = if len < 0 {
                &[][..]
            } else {
                c.take(len as usize)
                    .ok_or_else(|| LoginError::Malformed("short SASL data".into()))?
            };
            let first = scram
                .client_first(data)
                .map_err(|e| LoginError::Malformed(e.to_string()))?;
            out.clear();
            messages::authentication(&mut out, 11, &first);
            s.write_all(&out).await?;
            let f = read_password_message(s, rbuf).await?;
            let fin = scram.client_final(f.body()).map_err(|_| failed())?;
            out.clear();
            messages::authentication(&mut out, 12, &fin);
            s.write_all(&out).await?;
        }
    }
    out.clear();
    messages::authentication(&mut out, 0, &[]);
    s.write_all(&out).await?;
    Ok(())
}
