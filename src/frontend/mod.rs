//! The client side: accepting connections, the startup handshake, cancel requests, and
//! handing logged-in clients to a pooled session or the admin console.

pub mod login;
pub mod session;
pub mod sharded;

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
    type Write: ClientWrite;
    /// Splits the connection so both directions can be driven at once.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

/// A read half an idle session can wait on without holding a read buffer.
pub trait ReadReady: AsyncRead + Unpin + Send {
    /// Waits for input and appends it to `buf`, allocating only for bytes that arrived.
    fn read_idle<'a>(
        &'a mut self,
        buf: &'a mut FrameBuf,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a;
}

impl ReadReady for tokio::net::tcp::OwnedReadHalf {
    fn read_idle<'a>(
        &'a mut self,
        buf: &'a mut FrameBuf,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a {
        async move {
            loop {
                // Readiness can be stale (the login read exactly what it needed and never saw
                // WouldBlock): a non-blocking read into a small stack buffer clears it without
                // reserving a read buffer for a client that is not sending anything.
                self.readable().await?;
                let mut tmp = [0u8; 512];
                match self.try_read(&mut tmp) {
                    Ok(n) => {
                        buf.buf.extend_from_slice(&tmp[..n]);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl<T: AsyncRead + Send> ReadReady for tokio::io::ReadHalf<T> {
    // TLS may hold decrypted bytes that socket readiness would not show: read normally.
    fn read_idle<'a>(
        &'a mut self,
        buf: &'a mut FrameBuf,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a {
        buf.fill(self)
    }
}

/// A write half; `BUFFERED` ones (TLS) may hold accepted bytes until flushed.
pub trait ClientWrite: AsyncWrite + Unpin + Send {
    /// True when written bytes can sit in the writer until `flush`.
    const BUFFERED: bool;
}

impl ClientWrite for tokio::net::tcp::OwnedWriteHalf {
    const BUFFERED: bool = false;
}

impl<T: AsyncWrite + Send> ClientWrite for tokio::io::WriteHalf<T> {
    const BUFFERED: bool = true;
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

async fn handle_client(
    app: Arc<App>,
    stream: TcpStream,
    addr: SocketAddr,
    tls: Option<crate::tls::Acceptor>,
) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    // Everything but the pooled session is boxed: each client's task reserves room for its
    // largest state, and the handshake, TLS, cancel and refusal states would otherwise make
    // every idle client pay for them.
    let hs = Box::pin(tokio::time::timeout(
        LOGIN_TIMEOUT,
        handshake(&mut stream, tls.as_ref()),
    ))
    .await;
    match hs.unwrap_or(Handshake::Gone) {
        Handshake::Startup(params) => login(app, stream, addr, params).await,
        Handshake::Tls(acc) => Box::pin(tls_login(app, stream, addr, acc)).await,
        Handshake::Cancel(pid, secret) => Box::pin(forward_cancel(&app, pid, secret)).await,
        Handshake::Refused(code, m) => Box::pin(refuse(stream, code, &m)).await,
        Handshake::Gone => {}
    }
}

/// Reads the untyped first messages: SSL/GSSENC negotiation, then a startup or cancel packet.
async fn handshake(stream: &mut TcpStream, tls: Option<&crate::tls::Acceptor>) -> Handshake {
    loop {
        let body = match read_startup(stream, MAX_STARTUP_PACKET).await {
            Ok(Some(b)) => b,
            Ok(None) => return Handshake::Gone,
            Err(e) => return Handshake::Refused("08P01", e.to_string()),
        };
        match parse_startup(&body) {
            Ok(StartupRequest::Ssl) => {
                let answer: &[u8] = if tls.is_some() { b"S" } else { b"N" };
                if stream.write_all(answer).await.is_err() {
                    return Handshake::Gone;
                }
                if let Some(acc) = tls {
                    return Handshake::Tls(acc.clone());
                }
            }
            Ok(StartupRequest::GssEnc) => {
                if stream.write_all(b"N").await.is_err() {
                    return Handshake::Gone;
                }
            }
            Ok(StartupRequest::Cancel { pid, secret }) => return Handshake::Cancel(pid, secret),
            Ok(StartupRequest::Startup { params }) => return Handshake::Startup(params),
            Err(e) => return Handshake::Refused("08P01", e.to_string()),
        }
    }
}

/// TLS handshake, then the real startup packet and the login over TLS.
async fn tls_login(app: Arc<App>, stream: TcpStream, addr: SocketAddr, acc: crate::tls::Acceptor) {
    let Ok(Ok(mut tls_stream)) = tokio::time::timeout(LOGIN_TIMEOUT, acc.accept(stream)).await
    else {
        return;
    };
    let r = tokio::time::timeout(
        LOGIN_TIMEOUT,
        read_startup(&mut tls_stream, MAX_STARTUP_PACKET),
    )
    .await;
    match r
        .ok()
        .and_then(|r| r.ok())
        .flatten()
        .map(|b| parse_startup(&b))
    {
        Some(Ok(StartupRequest::Startup { params })) => login(app, tls_stream, addr, params).await,
        Some(Ok(_)) => {
            refuse(
                tls_stream,
                "08P01",
                "expected a startup packet after TLS negotiation",
            )
            .await
        }
        Some(Err(e)) => refuse(tls_stream, "08P01", &e.to_string()).await,
        None => {}
    }
}

/// What a connection's first messages asked for.
enum Handshake {
    Tls(crate::tls::Acceptor),
    Cancel(i32, i32),
    Startup(Vec<(String, String)>),
    Refused(&'static str, String),
    Gone,
}

/// Sends a client's cancel to the server connection running its query, if any.
async fn forward_cancel(app: &App, pid: i32, secret: i32) {
    let Some(client) = app.clients.find(pid, secret) else {
        return;
    };
    let target = *client.cancel.lock();
    let Some(t) = target else { return };
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(t.addr).await?;
        s.write_all(&messages::cancel_request(t.pid, t.secret))
            .await?;
        s.shutdown().await
    })
    .await;
    if !matches!(r, Ok(Ok(()))) {
        tracing::warn!(client = pid, server = %t.addr, "could not forward cancel request");
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn refuse<S: ClientIo>(mut s: S, code: &str, message: &str) {
    let mut out = BytesMut::new();
    fatal_and_close(&mut out, code, message);
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// A client that passed authentication.
struct LoggedIn<S> {
    s: S,
    rbuf: FrameBuf,
    info: Arc<ClientInfo>,
    admin: bool,
}

/// Authenticates a client and runs its session.
async fn login<S: ClientIo>(app: Arc<App>, s: S, addr: SocketAddr, params: Vec<(String, String)>) {
    let Some(c) = Box::pin(authenticate_client(&app, s, addr, &params)).await else {
        return;
    };
    let metrics = crate::metrics::Metrics::global();
    metrics.client_connections.inc();
    let pid = c.info.pid;
    if c.admin {
        Box::pin(crate::admin::run(
            app.clone(),
            c.s,
            c.rbuf,
            pid,
            c.info.secret,
        ))
        .await;
    } else {
        run_pooled(app.clone(), c.s, c.rbuf, c.info, &params).await;
    }
    metrics.client_connections.dec();
    app.clients.unregister(pid);
}

/// Checks the startup packet and runs the authentication exchange; refuses the client (and
/// returns None) on any failure.
async fn authenticate_client<S: ClientIo>(
    app: &Arc<App>,
    mut s: S,
    addr: SocketAddr,
    params: &[(String, String)],
) -> Option<LoggedIn<S>> {
    let Some(user) = param(params, "user")
        .filter(|u| !u.is_empty())
        .map(str::to_string)
    else {
        refuse(
            s,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
    };
    let database = param(params, "database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    if param(params, "replication").is_some_and(|r| r != "false" && r != "off" && r != "0") {
        refuse(s, "08P01", "replication connections are not supported through pgshard; connect to the server directly").await;
        return None;
    }
    let cfg = app.config.load_full();
    let is_admin = database == crate::admin::ADMIN_DB;
    let known = app.user_auth(&user);
    let auth = known
        .clone()
        .unwrap_or_else(|| Arc::new(app.unknown_user_auth(&user)));
    if is_admin && known.is_some() && !cfg.general.admin_users.contains(&user) {
        refuse(
            s,
            "28000",
            &format!("user \"{user}\" is not an admin_user and may not use the admin console"),
        )
        .await;
        return None;
    }
    // A tenant database's clients use the entry its prefix names, scoped to the tenant.
    let (database, tenant) = match cfg.resolve_database(&database) {
        _ if is_admin => (database, None),
        Some((d, Some(tenant))) if !tenant_key_valid(app, &cfg, d, tenant) => {
            refuse(
                s,
                "3D000",
                &format!("database \"{database}\" does not exist: '{tenant}' is not a key of its tenant distribution"),
            )
            .await;
            return None;
        }
        Some((d, tenant)) => (d.name.clone(), tenant.map(str::to_string)),
        None => {
            refuse(
                s,
                "3D000",
                &format!("database \"{database}\" does not exist"),
            )
            .await;
            return None;
        }
    };
    let mut rbuf = FrameBuf::default();
    let auth_result = tokio::time::timeout(
        LOGIN_TIMEOUT,
        login::authenticate(&mut s, &mut rbuf, cfg.general.auth_type, &user, &auth),
    )
    .await;
    match auth_result {
        Ok(Ok(())) if known.is_some() => {}
        Ok(Ok(())) => {
            refuse(
                s,
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
            )
            .await;
            return None;
        }
        Ok(Err(login::LoginError::Closed)) | Err(_) => return None,
        Ok(Err(e)) => {
            tracing::info!(%user, %addr, error = %e, "client authentication failed");
            refuse(s, e.sqlstate(), &e.to_string()).await;
            return None;
        }
    }
    let (pid, secret) = app.clients.next_key();
    let info = Arc::new(ClientInfo {
        pid,
        secret,
        addr,
        user,
        database,
        tenant,
        application_name: param(params, "application_name").unwrap_or("").to_string(),
        connected: Instant::now(),
        state: AtomicU8::new(client_state::IDLE),
        cancel: parking_lot::Mutex::new(None),
    });
    if !app
        .clients
        .register(info.clone(), cfg.general.max_client_conn)
    {
        refuse(
            s,
            "53300",
            "sorry, too many clients already (max_client_conn)",
        )
        .await;
        return None;
    }
    Some(LoggedIn {
        s,
        rbuf,
        info,
        admin: is_admin,
    })
}

/// Whether `tenant` parses as a key of the tenant database `d`'s distribution.
fn tenant_key_valid(
    app: &App,
    cfg: &crate::config::Config,
    d: &crate::config::Database,
    tenant: &str,
) -> bool {
    let map = app.shardmap.load();
    cfg.tenant_distribution(d)
        .and_then(|name| map.distributions.iter().position(|x| x.name == name))
        .is_some_and(|dist| map.parse_key(dist, tenant.as_bytes()).is_ok())
}

async fn run_pooled<S: ClientIo>(
    app: Arc<App>,
    s: S,
    rbuf: FrameBuf,
    info: Arc<ClientInfo>,
    params: &[(String, String)],
) {
    let Some((s, pool)) = Box::pin(greet(&app, s, &info, params)).await else {
        return;
    };
    let startup = SessionParams::from_startup(params);
    let (r, w) = s.into_halves();
    if sharded::is_sharded(&app, &info.database) {
        let shards = app.config.load().shards.len();
        let pools: Option<Vec<_>> = (0..shards)
            .map(|i| app.shard_pools(&info.database, &info.user, i))
            .collect();
        let Some(pools) = pools else { return };
        // The running sharded session's state (several KB: routing, scatter, two-phase commit)
        // is boxed too: inline, it would size every client's task, pooled ones included.
        Box::pin(
            Box::new(sharded::ShardedSession::new(
                app, info, pools, r, w, rbuf, startup,
            ))
            .run(),
        )
        .await;
        return;
    }
    // Boxed before running, so the task's future holds a pointer rather than the state.
    Box::new(session::Session::new(app, info, pool, r, w, rbuf, startup))
        .run()
        .await;
}

/// Finds the client's pool and sends the server's parameters, its backend key and
/// ReadyForQuery; refuses the client if the pool cannot reach its server.
async fn greet<S: ClientIo>(
    app: &App,
    mut s: S,
    info: &ClientInfo,
    params: &[(String, String)],
) -> Option<(S, Arc<crate::pool::Pool>)> {
    let Some(pool) = app.pool(&info.database, &info.user, 0) else {
        refuse(
            s,
            "3D000",
            &format!("database \"{}\" does not exist", info.database),
        )
        .await;
        return None;
    };
    let server_params = match pool.server_params().await {
        Ok(p) => p,
        Err(e) => {
            refuse(s, e.sqlstate(), &e.to_string()).await;
            return None;
        }
    };
    let mut out = BytesMut::new();
    for (k, v) in server_params.iter() {
        // The client's own startup settings win over the server's defaults.
        let v = params
            .iter()
            .find(|(ck, _)| ck.eq_ignore_ascii_case(k))
            .map(|(_, cv)| cv)
            .unwrap_or(v);
        messages::parameter_status(&mut out, k.as_bytes(), v.as_bytes());
    }
    messages::backend_key_data(&mut out, info.pid, info.secret);
    messages::ready_for_query(&mut out, b'I');
    s.write_all(&out).await.ok()?;
    Some((s, pool))
}
