//! A logged-in client's session: the transaction-pooling state machine.
//!
//! States: *idle* (no server connection) → *attached* (a server connection is lent from the pool,
//! the client's settings applied to it) → back to idle at a ReadyForQuery 'I' with nothing
//! outstanding, unless something pinned the connection or the pool is in session mode.
//!
//! While attached, one task moves bytes both ways with bounded buffers, so a peer that stops
//! reading only stalls its own session. Server responses are matched to requests with a queue
//! of expectations, which lets pgshard prepare statements on demand, answer some requests
//! itself (ParseComplete for an already-prepared statement, CloseComplete) and swallow the
//! responses to its own injected messages, all in protocol order.

mod extended;
mod responses;

use super::{fatal_and_close, ClientWrite, ReadReady, SessionEnd};
use crate::app::{client_state, App, CancelTarget, ClientInfo};
use crate::params::SessionParams;
use crate::pool::{Checkout, Pool};
use crate::prepared::ClientStatements;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{Cursor, FrameBuf};
use crate::sqlclass::{classify, QueryKind};
use bytes::{Buf, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes queued bytes to the client, or flushes a buffering writer once they are all out.
async fn write_or_flush<W: AsyncWrite + Unpin>(w: &mut W, out: &mut BytesMut) -> Event {
    if out.is_empty() {
        Event::ClientFlushed(w.flush().await)
    } else {
        Event::ClientWrote(w.write_buf(out).await)
    }
}

/// Stop reading a side once this much is queued for the other.
const HIGH_WATER: usize = 256 * 1024;
/// What an idle client's output buffers are given when it becomes active again: enough for a
/// typical transaction's messages, so they are not regrown message by message.
const ACTIVE_BUF: usize = 2048;

/// A response the server owes, in the order the requests were sent.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// Simple Query or FunctionCall: ends at ReadyForQuery.
    Query,
    /// Sync: ends at ReadyForQuery. Carries the number of COPY ends (CopyDone/CopyFail) the
    /// client had sent before it, like `Forwarded`.
    Sync(u32),
    /// A client's extended message, forwarded; its response goes to the client.
    Forwarded(u32),
    /// A client's Parse of statement `key` under its global name.
    ParseOf(u128),
    /// pgshard's own Parse of statement `key`: ParseComplete is swallowed.
    InjectedParse(u128),
    /// pgshard's own Close: CloseComplete is swallowed.
    InjectedClose,
    /// A response pgshard gives itself once everything before it has been answered.
    Synthetic(u8),
}

/// One client's session.
pub struct Session<R, W> {
    app: Arc<App>,
    info: Arc<ClientInfo>,
    pool: Arc<Pool>,
    session_mode: bool,
    max_msg: usize,
    idle_tx_timeout: Duration,
    cr: R,
    cw: W,
    cbuf: FrameBuf,
    client_out: BytesMut,
    server_out: BytesMut,
    server: Option<Checkout>,
    pending: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// After a failure pgshard reports itself, client messages are dropped until Sync.
    skip_until_sync: bool,
    /// CopyDone/CopyFail messages forwarded so far: tells which Syncs the server ignores.
    copy_ends: u32,
    params: SessionParams,
    startup_params: SessionParams,
    statements: ClientStatements,
    pinned: Option<&'static str>,
    /// A session-affecting statement whose CommandComplete is awaited.
    tracked: Option<QueryKind>,
    /// Settings (client, server) before the first SET of the current transaction.
    tx_snapshot: Option<(SessionParams, SessionParams)>,
    last_tag_rollback: bool,
    /// Settings of the attached server must be re-applied before the next request.
    resync: bool,
    /// Bytes were handed to a buffering (TLS) writer since its last flush.
    client_unflushed: bool,
    /// Bytes still to stream of a large message from the server (DataRow, CopyData).
    server_stream_left: usize,
    /// Bytes still to stream of a large CopyData from the client.
    client_stream_left: usize,
}

/// What woke the event loop.
enum Event {
    ClientRead(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    ClientFlushed(std::io::Result<()>),
    ServerWrote(std::io::Result<usize>),
    IdleInTransaction,
    Shutdown,
}

impl<R: ReadReady, W: ClientWrite> Session<R, W> {
    /// A session for a client that has logged in; `cbuf` holds anything it sent already.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<App>,
        info: Arc<ClientInfo>,
        pool: Arc<Pool>,
        cr: R,
        cw: W,
        cbuf: FrameBuf,
        startup_params: SessionParams,
    ) -> Self {
        let cfg = app.config.load();
        Session {
            session_mode: crate::app::is_session(pool.mode()),
            max_msg: cfg.general.max_message_size,
            idle_tx_timeout: cfg.general.idle_transaction_timeout,
            app,
            info,
            pool,
            cr,
            cw,
            cbuf,
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            server: None,
            pending: VecDeque::new(),
            unsynced: false,
            skip_until_sync: false,
            copy_ends: 0,
            params: startup_params.clone(),
            startup_params,
            statements: ClientStatements::default(),
            pinned: None,
            tracked: None,
            tx_snapshot: None,
            last_tag_rollback: false,
            resync: false,
            client_unflushed: false,
            server_stream_left: 0,
            client_stream_left: 0,
        }
    }

    /// Runs until the client leaves or is disconnected; the server connection is cleaned up
    /// (rolled back, reset or discarded) before anyone else can get it.
    pub async fn run(mut self: Box<Self>) {
        self.pool.metrics.clients_active.inc();
        let end = self.event_loop().await;
        match &end {
            SessionEnd::ClientTerminated | SessionEnd::ClientGone => {}
            other => tracing::debug!(client = self.info.pid, reason = ?other, "session ended"),
        }
        if !self.client_out.is_empty() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.cw.write_all(&self.client_out))
                    .await;
        }
        let _ = self.cw.shutdown().await;
        Box::pin(self.finish_server()).await;
        self.pool.metrics.clients_active.dec();
    }

    async fn event_loop(&mut self) -> SessionEnd {
        let mut shutdown = self.app.shutdown.subscribe();
        loop {
            if let Err(end) = self.process_client_messages().await {
                return end;
            }
            self.maybe_release();
            self.write_eagerly();
            if self.server.is_none() && *shutdown.borrow() {
                fatal_and_close(&mut self.client_out, "57P01", "pgshard is shutting down");
                return SessionEnd::Shutdown;
            }
            if self.server.is_none() && self.cbuf.is_empty() && self.client_out.is_empty() {
                // Idle clients are the many: they keep no buffers.
                self.cbuf.buf = BytesMut::new();
                self.client_out = BytesMut::new();
                self.server_out = BytesMut::new();
            }
            let ev = self.wait(&mut shutdown).await;
            match ev {
                Event::ClientRead(Ok(0)) | Event::ClientRead(Err(_)) => {
                    return SessionEnd::ClientGone
                }
                Event::ClientRead(Ok(n)) => self.pool.metrics.bytes_received.inc_by(n as u64),
                Event::ServerRead(Ok(n)) if n > 0 => {
                    if let Err(end) = self.process_server_messages() {
                        return end;
                    }
                }
                Event::ServerRead(_) | Event::ServerWrote(Err(_)) => {
                    fatal_and_close(&mut self.client_out, "08006", "server connection lost");
                    self.discard_server();
                    return SessionEnd::ServerLost;
                }
                Event::ClientWrote(Ok(n)) => {
                    self.pool.metrics.bytes_sent.inc_by(n as u64);
                    self.client_unflushed = W::BUFFERED;
                }
                Event::ClientWrote(Err(_)) | Event::ClientFlushed(Err(_)) => {
                    return SessionEnd::ClientGone
                }
                Event::ClientFlushed(Ok(())) => self.client_unflushed = false,
                Event::ServerWrote(Ok(_)) => {}
                Event::IdleInTransaction => {
                    fatal_and_close(
                        &mut self.client_out,
                        "25P03",
                        "terminating connection due to idle-in-transaction timeout",
                    );
                    return SessionEnd::IdleTimeout;
                }
                Event::Shutdown => {}
            }
        }
    }

    /// Waits for the next thing to do: bytes to read or write on either side, or a timer.
    async fn wait(&mut self, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> Event {
        let read_client = self.server_out.len() < HIGH_WATER && self.client_out.len() < HIGH_WATER;
        let read_server = self.client_out.len() < HIGH_WATER;
        let idle_in_tx = match &self.server {
            Some(s) => {
                s.conn.tx_status != b'I'
                    && self.pending.is_empty()
                    && !self.idle_tx_timeout.is_zero()
            }
            None => false,
        };
        let idle_tx_timeout = self.idle_tx_timeout;
        let flush = self.client_unflushed && self.client_out.is_empty();
        let (cr, cw, cbuf, client_out, server_out) = (
            &mut self.cr,
            &mut self.cw,
            &mut self.cbuf,
            &mut self.client_out,
            &mut self.server_out,
        );
        match self.server.as_mut() {
            Some(s) => {
                let (mut sr, mut sw) = s.conn.stream.split();
                let sbuf = &mut s.conn.rbuf;
                tokio::select! {
                    biased;
                    r = sbuf.fill(&mut sr), if read_server => Event::ServerRead(r),
                    ev = write_or_flush(cw, client_out), if !client_out.is_empty() || flush => ev,
                    r = sw.write_buf(server_out), if !server_out.is_empty() => Event::ServerWrote(r),
                    r = cbuf.fill(cr), if read_client => Event::ClientRead(r),
                    // An async block, so the timer is only built when the branch is enabled.
                    _ = async { tokio::time::sleep(idle_tx_timeout).await }, if idle_in_tx => Event::IdleInTransaction,
                }
            }
            None => tokio::select! {
                biased;
                ev = write_or_flush(cw, client_out), if !client_out.is_empty() || flush => ev,
                r = cr.read_idle(cbuf) => Event::ClientRead(r),
                _ = shutdown.changed() => Event::Shutdown,
            },
        }
    }

    /// Handles every complete client message buffered, while the server side has room.
    async fn process_client_messages(&mut self) -> Result<(), SessionEnd> {
        if self.server_out.capacity() == 0 && !self.cbuf.is_empty() {
            self.server_out.reserve(ACTIVE_BUF);
            self.client_out.reserve(ACTIVE_BUF);
        }
        while self.server_out.len() < HIGH_WATER {
            // Large COPY data goes to the server as it arrives (a server is attached during COPY).
            if self.client_stream_left > 0 {
                self.client_stream_left = self
                    .cbuf
                    .continue_stream(self.client_stream_left, &mut self.server_out);
                if self.client_stream_left > 0 {
                    return Ok(());
                }
                continue;
            }
            if self.server.is_some() && !self.skip_until_sync {
                if let Some(left) = self.cbuf.start_stream(b"d", &mut self.server_out) {
                    self.client_stream_left = left;
                    continue;
                }
            }
            let (tag, len) = match self.cbuf.peek(self.max_msg) {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(()),
                Err(e) => {
                    fatal_and_close(&mut self.client_out, "08P01", &e.to_string());
                    return Err(SessionEnd::Protocol);
                }
            };
            let buf = std::mem::take(&mut self.cbuf.buf);
            let r = self.on_client_message(tag, &buf[..len]).await;
            self.cbuf.buf = buf;
            self.cbuf.consume(len);
            r?;
        }
        Ok(())
    }

    async fn on_client_message(&mut self, tag: u8, msg: &[u8]) -> Result<(), SessionEnd> {
        match tag {
            b'X' => return Err(SessionEnd::ClientTerminated),
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'F' | b'd' | b'c' | b'f' => {}
            other => {
                let m = format!("invalid frontend message type {}", other);
                fatal_and_close(&mut self.client_out, "08P01", &m);
                return Err(SessionEnd::Protocol);
            }
        }
        if self.skip_until_sync {
            if tag == b'S' {
                self.skip_until_sync = false;
                messages::ready_for_query(&mut self.client_out, b'I');
            }
            return Ok(());
        }
        if self.server.is_none() {
            if matches!(tag, b'H' | b'd' | b'c' | b'f') {
                // Nothing to flush and no COPY in progress without a server connection.
                return Ok(());
            }
            // Boxed (one allocation per transaction): the wait for a pool slot is large state
            // that would otherwise be reserved in every client's task, idle or not.
            if let Err(msg) = Box::pin(self.attach()).await {
                self.fail_request(tag, &msg.0, &msg.1);
                return Ok(());
            }
        }
        if self.resync && self.pending.is_empty() {
            if let Err(SessionEnd::Settings(code, m)) = Box::pin(self.sync_params()).await {
                self.fail_request(tag, &code, &m);
                return Ok(());
            }
        }
        match tag {
            b'Q' => self.on_query(msg),
            b'P' => self.on_parse(msg),
            b'B' | b'D' => self.on_bind_or_describe(tag, msg),
            b'C' => self.on_close(msg),
            b'E' => self.forward(msg, Some(Pending::Forwarded(self.copy_ends))),
            b'S' => {
                self.unsynced = false;
                self.pool.metrics.queries.inc();
                self.forward(msg, Some(Pending::Sync(self.copy_ends)));
            }
            b'F' => self.forward(msg, Some(Pending::Query)),
            b'c' | b'f' => {
                self.copy_ends += 1;
                self.forward(msg, None);
            }
            _ => self.forward(msg, None),
        }
        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H') {
            self.unsynced = true;
        }
        Ok(())
    }

    /// Reports a failure pgshard detected itself, in the place of the request's response.
    fn fail_request(&mut self, tag: u8, code: &str, message: &str) {
        self.pool.metrics.errors.inc();
        messages::error_response(&mut self.client_out, Severity::Error, code, message, None);
        match tag {
            b'Q' | b'F' => messages::ready_for_query(&mut self.client_out, b'I'),
            b'S' => messages::ready_for_query(&mut self.client_out, b'I'),
            _ => self.skip_until_sync = true,
        }
    }

    fn forward(&mut self, msg: &[u8], pending: Option<Pending>) {
        self.server_out.extend_from_slice(msg);
        if let Some(p) = pending {
            self.pending.push_back(p);
        }
    }

    /// Borrows a server connection and applies the client's settings to it.
    async fn attach(&mut self) -> Result<(), (String, String)> {
        let mut paused = self.app.paused.subscribe();
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                break;
            }
        }
        self.follow_writer();
        self.info
            .state
            .store(client_state::WAITING, Ordering::Relaxed);
        let co = self.pool.checkout().await;
        self.info
            .state
            .store(client_state::ACTIVE, Ordering::Relaxed);
        let co = co.map_err(|e| (e.sqlstate().to_string(), e.to_string()))?;
        *self.info.cancel.lock() = Some(CancelTarget {
            addr: co.conn.peer,
            pid: co.conn.pid,
            secret: co.conn.secret,
        });
        self.server = Some(co);
        self.resync = true;
        // Not boxed: attach's own future is (once per transaction), and this one lives in it.
        if let Err(SessionEnd::Settings(code, m)) = self.sync_params().await {
            return Err((code, m));
        }
        Ok(())
    }

    /// After a failover, the next transaction goes to the promoted server's pool.
    fn follow_writer(&mut self) {
        let writer = self.app.health.load().writer(self.pool.shard);
        if writer == self.pool.node {
            return;
        }
        if let Some(p) = self.app.node_pool(
            &self.info.database,
            &self.info.user,
            self.pool.shard,
            writer,
        ) {
            self.pool.metrics.clients_active.dec();
            p.metrics.clients_active.inc();
            self.pool = p;
        }
    }

    /// Makes the attached server's settings equal to the client's.
    async fn sync_params(&mut self) -> Result<(), SessionEnd> {
        self.resync = false;
        let Some(co) = self.server.as_mut() else {
            return Ok(());
        };
        let Some(sql) = co.conn.params.diff_sql(&self.params) else {
            return Ok(());
        };
        match co.conn.exec_quiet(&sql, self.max_msg).await {
            Ok(()) => {
                co.conn.params = self.params.clone();
                Ok(())
            }
            Err(e) => {
                self.discard_server();
                // A setting the server rejects was the client's own: forget it so the session
                // stays usable, as PostgreSQL would have refused it at SET time.
                self.params = self.startup_params.clone();
                Err(SessionEnd::Settings(
                    e.sqlstate().to_string(),
                    format!("cannot apply session settings: {e}"),
                ))
            }
        }
    }

    /// Writes what is queued without waiting: such writes nearly always complete at once, and
    /// each saves a trip through the event loop.
    fn write_eagerly(&mut self) {
        if let Some(co) = self.server.as_mut() {
            if !self.server_out.is_empty() {
                if let Ok(n) = co.conn.stream.try_write(&self.server_out) {
                    self.server_out.advance(n);
                }
            }
        }
        if !self.client_out.is_empty() {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            // Pending or an error is left to the event loop, which waits or reports it.
            if let std::task::Poll::Ready(Ok(n)) =
                std::pin::Pin::new(&mut self.cw).poll_write(&mut cx, &self.client_out)
            {
                self.client_out.advance(n);
                self.pool.metrics.bytes_sent.inc_by(n as u64);
                self.client_unflushed = W::BUFFERED;
            }
        }
    }

    /// Returns the server connection when the client is between transactions.
    fn maybe_release(&mut self) {
        let Some(co) = &self.server else { return };
        if self.session_mode
            || self.server_stream_left > 0
            || self.client_stream_left > 0
            || self.pinned.is_some()
            || !self.pending.is_empty()
            || self.unsynced
            || !self.server_out.is_empty()
            || co.conn.tx_status != b'I'
            || !co.conn.rbuf.is_empty()
        {
            return;
        }
        let co = self.server.take().expect("checked above");
        *self.info.cancel.lock() = None;
        self.info.state.store(client_state::IDLE, Ordering::Relaxed);
        self.pool.checkin(co, true);
    }

    fn discard_server(&mut self) {
        if let Some(co) = self.server.take() {
            *self.info.cancel.lock() = None;
            self.pool.discard(co);
        }
        self.pending.clear();
        self.unsynced = false;
    }

    /// Cleans up after the client left: nothing it did may reach the next client.
    async fn finish_server(&mut self) {
        let Some(mut co) = self.server.take() else {
            return;
        };
        *self.info.cancel.lock() = None;
        if !self.pending.is_empty() || self.unsynced || !co.conn.rbuf.is_empty() {
            // The server is mid-request; closing the connection is the only sure rollback.
            self.pool.discard(co);
            return;
        }
        let mut steps: Vec<&str> = Vec::new();
        if co.conn.tx_status != b'I' {
            steps.push("ROLLBACK");
        }
        if self.pinned.is_some() || self.session_mode {
            steps.push("DISCARD ALL");
        }
        for sql in steps {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                co.conn.exec_quiet(sql, self.max_msg),
            )
            .await;
            if !matches!(r, Ok(Ok(()))) {
                self.pool.discard(co);
                return;
            }
            if sql == "DISCARD ALL" {
                co.conn.statements.clear();
                co.conn.params.clear();
            }
        }
        self.pool.checkin(co, true);
    }

    fn on_query(&mut self, msg: &[u8]) {
        self.pool.metrics.queries.inc();
        let text = Cursor::new(&msg[5..]).str().unwrap_or("");
        match classify(text) {
            QueryKind::Plain | QueryKind::SetLocal => {}
            QueryKind::Pin { reason } => {
                if self.pinned.is_none() && !self.session_mode {
                    tracing::debug!(
                        client = self.info.pid,
                        reason,
                        "server connection pinned to client"
                    );
                }
                self.pinned = Some(reason);
            }
            QueryKind::Deallocate { name } => {
                if let Some(def) = self.statements.get(name.as_bytes()).cloned() {
                    self.statements.remove(name.as_bytes());
                    // The server knows the statement by its global name (or not at all).
                    let co = self.server.as_mut().expect("attached");
                    let sql = if co.conn.statements.touch(def.key) {
                        co.conn.statements.remove(def.key);
                        format!(
                            "DEALLOCATE \"{}\"",
                            String::from_utf8_lossy(&def.global_name)
                        )
                    } else {
                        co.conn.statements.clear();
                        "DEALLOCATE ALL".to_string()
                    };
                    messages::query(&mut self.server_out, &sql);
                    self.pending.push_back(Pending::Query);
                    return;
                }
            }
            QueryKind::DeallocateAll => {
                self.statements.clear();
                if let Some(co) = self.server.as_mut() {
                    co.conn.statements.clear();
                }
            }
            kind => self.tracked = Some(kind),
        }
        self.forward(msg, Some(Pending::Query));
    }
}
