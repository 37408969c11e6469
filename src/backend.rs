//! Server connections: connecting, authenticating to PostgreSQL, and their per-connection state.

use crate::params::SessionParams;
use crate::prepared::ServerStatements;
use crate::protocol::{messages, Cursor, Frame, FrameBuf, FrameError};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Why a server connection failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server {addr} refused the login: {message} (SQLSTATE {code})")]
    Refused {
        addr: String,
        code: String,
        message: String,
    },
    #[error("server {addr} asks for a password but none is configured for this user")]
    NoPassword { addr: String },
    #[error("server {addr} asks for unsupported authentication method {method}")]
    UnsupportedAuth { addr: String, method: i32 },
    #[error("protocol error from server {addr}: {what}")]
    Protocol { addr: String, what: String },
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

impl BackendError {
    /// The SQLSTATE a client should see for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Refused { code, .. } => code,
            BackendError::NoPassword { .. } | BackendError::UnsupportedAuth { .. } => "28000",
            _ => "08006",
        }
    }
}

/// Where and as whom to open server connections.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
}

impl ConnectParams {
    /// `host:port` for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One authenticated connection to a PostgreSQL server.
pub struct ServerConn {
    pub id: u64,
    pub stream: TcpStream,
    pub rbuf: FrameBuf,
    /// The server's backend key, for forwarding a client's cancel.
    pub pid: i32,
    pub secret: i32,
    pub peer: std::net::SocketAddr,
    /// ParameterStatus values reported at login.
    pub server_params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// Prepared statements known to exist on this connection.
    pub statements: ServerStatements,
    /// Session settings applied to this connection (SET by pgshard on behalf of clients).
    pub params: SessionParams,
    /// Last ReadyForQuery status seen.
    pub tx_status: u8,
}

impl ServerConn {
    /// Opens and authenticates a connection.
    pub async fn connect(
        p: &ConnectParams,
        prepared_cache: usize,
    ) -> Result<ServerConn, BackendError> {
        Self::connect_with(p, prepared_cache, &[]).await
    }

    /// Opens a connection with extra startup parameters (e.g. `replication=database`).
    pub async fn connect_with(
        p: &ConnectParams,
        prepared_cache: usize,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn, BackendError> {
        let addr = p.addr();
        let stream = tokio::time::timeout(
            p.connect_timeout,
            TcpStream::connect((p.host.as_str(), p.port)),
        )
        .await
        .map_err(|_| BackendError::ConnectTimeout(addr.clone()))?
        .map_err(|source| BackendError::Connect {
            addr: addr.clone(),
            source,
        })?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let mut conn = ServerConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            rbuf: FrameBuf::default(),
            pid: 0,
            secret: 0,
            peer,
            server_params: Vec::new(),
            created: Instant::now(),
            last_used: Instant::now(),
            statements: ServerStatements::new(prepared_cache),
            params: SessionParams::default(),
            tx_status: b'I',
        };
        tokio::time::timeout(p.connect_timeout, conn.login(p, extra))
            .await
            .map_err(|_| BackendError::ConnectTimeout(addr))??;
        Ok(conn)
    }

    async fn login(
        &mut self,
        p: &ConnectParams,
        extra: &[(&str, &str)],
    ) -> Result<(), BackendError> {
        let addr = p.addr();
        let mut out = BytesMut::new();
        let mut params = vec![("user", p.user.as_str()), ("database", p.database.as_str())];
        params.extend_from_slice(extra);
        messages::startup(&mut out, &params);
        self.stream.write_all(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame(p.max_message_size).await?;
            let mut c = Cursor::new(f.body());
            match f.tag {
                b'R' => {
                    let code = c.i32().unwrap_or(-1);
                    let password = || {
                        p.password
                            .as_deref()
                            .ok_or(BackendError::NoPassword { addr: addr.clone() })
                    };
                    out.clear();
                    match code {
                        0 => continue,
                        3 => {
                            let mut pw = password()?.as_bytes().to_vec();
                            pw.push(0);
                            messages::password(&mut out, &pw);
                        }
                        5 => {
                            let salt = c.take(4).ok_or_else(|| proto(&addr, "short md5 salt"))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                p.user.as_bytes(),
                                password()?.as_bytes(),
                                [salt[0], salt[1], salt[2], salt[3]],
                            );
                            let mut pw = hash.into_bytes();
                            pw.push(0);
                            messages::password(&mut out, &pw);
                        }
                        10 => {
                            let mut offered = false;
                            while let Some(m) = c.str() {
                                offered |= m == "SCRAM-SHA-256";
                                if m.is_empty() {
                                    break;
                                }
                            }
                            if !offered {
                                return Err(BackendError::UnsupportedAuth { addr, method: code });
                            }
                            let s = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            messages::sasl_initial(&mut out, "SCRAM-SHA-256", s.message());
                            scram = Some(s);
                        }
                        11 | 12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| proto(&addr, "SASL message out of order"))?;
                            let r = if code == 11 {
                                s.update(c.rest())
                            } else {
                                s.finish(c.rest())
                            };
                            r.map_err(|e| proto(&addr, &format!("SCRAM: {e}")))?;
                            if code == 12 {
                                continue;
                            }
                            messages::password(&mut out, s.message());
                        }
                        other => {
                            return Err(BackendError::UnsupportedAuth {
                                addr,
                                method: other,
                            })
                        }
                    }
                    self.stream.write_all(&out).await?;
                }
                b'S' => {
                    if let (Some(k), Some(v)) = (c.str(), c.str()) {
                        self.server_params.push((k.to_string(), v.to_string()));
                    }
                }
                b'K' => {
                    self.pid = c.i32().unwrap_or(0);
                    self.secret = c.i32().unwrap_or(0);
                }
                b'Z' => return Ok(()),
                b'E' => {
                    let e = messages::parse_error_fields(f.body());
                    return Err(BackendError::Refused {
                        addr,
                        code: e.code.into(),
                        message: e.message.into(),
                    });
                }
                b'N' => {}
                other => {
                    return Err(proto(
                        &addr,
                        &format!("unexpected message '{}' during login", other as char),
                    ))
                }
            }
        }
    }

    /// True when an idle server has sent nothing: readable means a FATAL (shutdown, terminate)
    /// or a closed socket, so the connection is gone even though no query has failed yet.
    pub fn quiet(&self) -> bool {
        let mut probe = [0u8; 64];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Reads one whole message (control-plane use: login, resets, health checks).
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = self.rbuf.next_frame(max)? {
                return Ok(f);
            }
            if self.rbuf.fill(&mut self.stream).await? == 0 {
                return Err(BackendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Waits until one whole message is buffered in `rbuf` and returns its type and length;
    /// the caller reads it in place and consumes it (no copy, no allocation per message).
    pub async fn buffer_frame(&mut self, max: usize) -> Result<(u8, usize), BackendError> {
        loop {
            if let Some(m) = self.rbuf.peek(max)? {
                return Ok(m);
            }
            if self.rbuf.fill(&mut self.stream).await? == 0 {
                return Err(BackendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs simple-query SQL whose results are not wanted, up to ReadyForQuery; fails on error.
    pub async fn exec_quiet(&mut self, sql: &str, max: usize) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        self.drain_until_ready(max).await
    }

    /// Runs a simple query and returns its rows as text (control plane: catalogs, recovery).
    pub async fn query_rows(
        &mut self,
        sql: &str,
        max: usize,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f = self.read_frame(max).await?;
            match f.tag {
                b'D' => {
                    let mut c = Cursor::new(f.body());
                    let n = c.i16().unwrap_or(0).max(0);
                    let mut row = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let len = c.i32().unwrap_or(-1);
                        row.push(if len < 0 {
                            None
                        } else {
                            c.take(len as usize)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        });
                    }
                    rows.push(row);
                }
                b'E' if err.is_none() => {
                    let e = messages::parse_error_fields(f.body());
                    err = Some(BackendError::Refused {
                        addr: self.peer.to_string(),
                        code: e.code.into(),
                        message: e.message.into(),
                    });
                }
                b'Z' => {
                    self.tx_status = crate::protocol::ready_status(&f.raw);
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Consumes messages up to ReadyForQuery; an ErrorResponse on the way becomes an error.
    pub async fn drain_until_ready(&mut self, max: usize) -> Result<(), BackendError> {
        let mut err = None;
        loop {
            let f = self.read_frame(max).await?;
            match f.tag {
                b'E' if err.is_none() => {
                    let e = messages::parse_error_fields(f.body());
                    err = Some(BackendError::Refused {
                        addr: self.peer.to_string(),
                        code: e.code.into(),
                        message: e.message.into(),
                    });
                }
                b'Z' => {
                    self.tx_status = crate::protocol::ready_status(&f.raw);
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }
}

fn proto(addr: &str, what: &str) -> BackendError {
    BackendError::Protocol {
        addr: addr.to_string(),
        what: what.to_string(),
    }
}
