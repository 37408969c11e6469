//! The client side: accepting connections, the startup handshake, cancel requests, and
//! handing logged-in clients to a pooled session or the admin console.

pub mod login;
pub mod session;

use crate::app::{client_state, App, ClientInfo};
use crate::params::SessionParams;
use crate::protocol::framing::read_startup;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{parse_startup, FrameBuf, StartupRequest};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// PostgreSQL's own limit on a startup packet.
const MAX_STARTUP_PACKET: usize = 10_000;
/// Time a client gets to finish the handshake and authentication.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    ClientTerminated,
    ClientGone,
    ServerLost,
    Protocol,
    IdleTimeout,
    Shutdown,
    Settings(String, String),
}

/// Appends a FATAL ErrorResponse (the connection is about to close).
pub fn fatal_and_close(out: &mut BytesMut, code: &str, message: &str) {
    crate::metrics::Metrics::global().clients_refused.inc();
    messages::error_response(out, Severity::Fatal, code, message, None);
}

/// A client connection, plain or TLS, that can be split into independently polled halves.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: ReadReady;
    type Write: AsyncWrite + Unpin + Send;
    /// Splits the connection so both directions can be driven at once.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

/// A read half that can wait for input without a buffer, so idle clients hold no read buffer.
pub trait ReadReady: AsyncRead + Unpin + Send {
    /// Resolves when a read would make progress (or might: spurious wake-ups are allowed).
    fn ready(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl ReadReady for tokio::net::tcp::OwnedReadHalf {
    fn ready(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        self.readable()
    }
}

impl<T: AsyncRead + Send> ReadReady for tokio::io::ReadHalf<T> {
    // TLS may have decrypted bytes buffered that socket readiness would not show.
    fn ready(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl ClientIo for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    // Owned TCP halves need no lock, unlike the generic split.
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Accepts clients until shutdown begins.
pub async fn serve(app: Arc<App>, listener: TcpListener, tls: Option<crate::tls::Acceptor>) {
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, addr)) => {
                    let app = app.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move { handle_client(app, stream, addr, tls).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle_client(app: Arc<App>, stream: TcpStream, addr: SocketAddr, tls: Option<crate::tls::Acceptor>) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let mut out = BytesMut::new();
    // The first messages come before TLS and before any trust: read them with a small bound.
    let startup = tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            let body = match read_startup(&mut stream, MAX_STARTUP_PACKET).await {
                Ok(Some(b)) => b,
                Ok(None) => return Err(None),
                Err(e) => return Err(Some(("08P01", e.to_string()))),
            };
            match parse_startup(&body) {
                Ok(StartupRequest::Ssl) => {
                    if let Some(acc) = &tls {
                        if stream.write_all(b"S").await.is_err() {
                            return Err(None);
                        }
                        return Ok(Handshake::Tls(acc.clone()));
                    }
                    if stream.write_all(b"N").await.is_err() {
                        return Err(None);
                    }
                }
                Ok(StartupRequest::GssEnc) => {
                    if stream.write_all(b"N").await.is_err() {
                        return Err(None);
                    }
                }
                Ok(StartupRequest::Cancel { pid, secret }) => return Ok(Handshake::Cancel(pid, secret)),
                Ok(StartupRequest::Startup { params }) => return Ok(Handshake::Startup(params)),
                Err(e) => return Err(Some(("08P01", e.to_string()))),
            }
        }
    })
    .await;
    match startup {
        Err(_) | Ok(Err(None)) => {}
        Ok(Err(Some((code, m)))) => {
            fatal_and_close(&mut out, code, &m);
            let _ = stream.write_all(&out).await;
        }
        Ok(Ok(Handshake::Cancel(pid, secret))) => forward_cancel(&app, pid, secret).await,
        Ok(Ok(Handshake::Startup(params))) => login(app, stream, addr, params).await,
        Ok(Ok(Handshake::Tls(acc))) => {
            let accept = Box::pin(tokio::time::timeout(LOGIN_TIMEOUT, acc.accept(stream)));
            let Ok(Ok(mut tls_stream)) = accept.await else { return };
            // After TLS the client sends its real startup packet.
            let r = tokio::time::timeout(LOGIN_TIMEOUT, read_startup(&mut tls_stream, MAX_STARTUP_PACKET)).await;
            match r.ok().and_then(|r| r.ok()).flatten().map(|b| parse_startup(&b)) {
                Some(Ok(StartupRequest::Startup { params })) => Box::pin(login(app, tls_stream, addr, params)).await,
                Some(Err(e)) => {
                    fatal_and_close(&mut out, "08P01", &e.to_string());
                    let _ = tls_stream.write_all(&out).await;
                }
                _ => {}
            }
        }
    }
}

enum Handshake {
    Tls(crate::tls::Acceptor),
    Cancel(i32, i32),
    Startup(Vec<(String, String)>),
}

/// Sends a client's cancel to the server connection running its query, if any.
async fn forward_cancel(app: &App, pid: i32, secret: i32) {
    let Some(client) = app.clients.find(pid, secret) else { return };
    let target = *client.cancel.lock();
    let Some(t) = target else { return };
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(t.addr).await?;
        s.write_all(&messages::cancel_request(t.pid, t.secret)).await?;
        s.shutdown().await
    })
    .await;
    if !matches!(r, Ok(Ok(()))) {
        tracing::warn!(client = pid, server = %t.addr, "could not forward cancel request");
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn refuse<S: ClientIo>(mut s: S, code: &str, message: &str) {
    let mut out = BytesMut::new();
    fatal_and_close(&mut out, code, message);
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// Authenticates a client and runs its session.
async fn login<S: ClientIo>(app: Arc<App>, mut s: S, addr: SocketAddr, params: Vec<(String, String)>) {
    let Some(user) = param(&params, "user").filter(|u| !u.is_empty()).map(str::to_string) else {
        return refuse(s, "28000", "no PostgreSQL user name specified in startup packet").await;
    };
    let database = param(&params, "database").filter(|d| !d.is_empty()).unwrap_or(&user).to_string();
    if param(&params, "replication").is_some_and(|r| r != "false" && r != "off" && r != "0") {
        return refuse(s, "08P01", "replication connections are not supported through pgshard; connect to the server directly").await;
    }
    let cfg = app.config.load_full();
    let is_admin = database == crate::admin::ADMIN_DB;
    let known = app.user_auth(&user);
    let auth = known.clone().unwrap_or_else(|| Arc::new(app.unknown_user_auth(&user)));
    if is_admin && !cfg.general.admin_users.contains(&user) {
        return refuse(s, "28000", &format!("user \"{user}\" is not an admin_user and may not use the admin console")).await;
    }
    if !is_admin && cfg.database(&database).is_none() {
        return refuse(s, "3D000", &format!("database \"{database}\" does not exist")).await;
    }
    let mut rbuf = FrameBuf::default();
    // Boxed: the exchange is large and done once; the session that follows should not carry it.
    let auth_result = Box::pin(tokio::time::timeout(
        LOGIN_TIMEOUT,
        login::authenticate(&mut s, &mut rbuf, cfg.general.auth_type, &user, &auth),
    ))
    .await;
    match auth_result {
        Ok(Ok(())) if known.is_some() => {}
        Ok(Ok(())) => return refuse(s, "28P01", &format!("password authentication failed for user \"{user}\"")).await,
        Ok(Err(login::LoginError::Closed)) | Err(_) => return,
        Ok(Err(e)) => {
            tracing::info!(%user, %addr, error = %e, "client authentication failed");
            return refuse(s, e.sqlstate(), &e.to_string()).await;
        }
    }
    let (pid, secret) = app.clients.next_key();
    let info = Arc::new(ClientInfo {
        pid,
        secret,
        addr,
        user: user.clone(),
        database: database.clone(),
        application_name: param(&params, "application_name").unwrap_or("").to_string(),
        connected: Instant::now(),
        state: AtomicU8::new(client_state::IDLE),
        cancel: parking_lot::Mutex::new(None),
    });
    if !app.clients.register(info.clone(), cfg.general.max_client_conn) {
        return refuse(s, "53300", "sorry, too many clients already (max_client_conn)").await;
    }
    let metrics = crate::metrics::Metrics::global();
    metrics.client_connections.inc();
    if is_admin {
        crate::admin::run(app.clone(), s, rbuf, pid, secret).await;
    } else {
        run_pooled(app.clone(), s, rbuf, info, &params).await;
    }
    metrics.client_connections.dec();
    app.clients.unregister(pid);
}

async fn run_pooled<S: ClientIo>(app: Arc<App>, mut s: S, rbuf: FrameBuf, info: Arc<ClientInfo>, params: &[(String, String)]) {
    let Some(pool) = app.pool(&info.database, &info.user, 0) else {
        return refuse(s, "3D000", &format!("database \"{}\" does not exist", info.database)).await;
    };
    let server_params = match Box::pin(pool.server_params()).await {
        Ok(p) => p,
        Err(e) => return Box::pin(refuse(s, e.sqlstate(), &e.to_string())).await,
    };
    let mut out = BytesMut::new();
    for (k, v) in server_params.iter() {
        // The client's own startup settings win over the server's defaults.
        let v = params.iter().find(|(ck, _)| ck.eq_ignore_ascii_case(k)).map(|(_, cv)| cv).unwrap_or(v);
        messages::parameter_status(&mut out, k.as_bytes(), v.as_bytes());
    }
    messages::backend_key_data(&mut out, info.pid, info.secret);
    messages::ready_for_query(&mut out, b'I');
    if s.write_all(&out).await.is_err() {
        return;
    }
    drop(out);
    let startup = SessionParams::from_startup(params);
    let (r, w) = s.into_halves();
    session::Session::new(app, info, pool, r, w, rbuf, startup).run().await;
}
