//! Server connection pools, one per (database, user, server).
//!
//! A semaphore with `pool_size` permits bounds the connections in use; idle connections sit on
//! a stack (most recently used first, so surplus ones age out). The fast path of a checkout is
//! one uncontended permit and one short lock; only a client that has to wait touches the
//! waiter bookkeeping that `SHOW POOLS` reports.

use crate::backend::{BackendError, ConnectParams, ServerConn};
use crate::config::PoolMode;
use crate::metrics::PoolMetrics;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// ParameterStatus (name, value) pairs a server reported at login.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// Why no server connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection became free within query_wait_timeout ({0:?})")]
    Timeout(Duration),
    #[error("{0}")]
    Connect(#[from] BackendError),
    #[error("pgshard is shutting down")]
    Closed,
}

impl PoolError {
    /// The SQLSTATE the client sees.
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout(_) => "53300",
            PoolError::Connect(e) => e.sqlstate(),
            PoolError::Closed => "57P01",
        }
    }
}

/// Timing and sizing knobs of a pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub min_size: usize,
    pub wait_timeout: Duration,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    pub check_delay: Duration,
    pub connect_retries: u32,
    pub prepared_cache: usize,
}

/// A pool of connections to one server for one (database, user).
pub struct Pool {
    pub database: String,
    pub user: String,
    pub shard: usize,
    /// Server of the shard (0 = configured primary).
    pub node: usize,
    pub connect: ConnectParams,
    settings: Mutex<PoolSettings>,
    sem: Arc<Semaphore>,
    /// Permits the semaphore holds beyond the current size, to shrink it on reload.
    size_now: AtomicUsize,
    // Boxed on purpose: lending a connection then moves a pointer, not its whole state.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    waiters: Mutex<BTreeMap<u64, Instant>>,
    next_waiter: AtomicU64,
    /// Connections open (idle + in use + being created).
    pub open: AtomicUsize,
    /// ParameterStatus values of this server, learnt from the first connection.
    server_params: Mutex<Option<ServerParams>>,
    pub metrics: PoolMetrics,
}

/// A server connection lent to a client, with the permit that counts it as in use.
pub struct Checkout {
    /// Boxed for its whole life so lending it moves a pointer, not the connection's state.
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    pub since: Instant,
}

impl Pool {
    /// A new, empty pool.
    pub fn new(
        database: String,
        user: String,
        shard: usize,
        node: usize,
        connect: ConnectParams,
        settings: PoolSettings,
    ) -> Pool {
        let metrics = crate::metrics::Metrics::global().pool(&database, &user, &connect.addr());
        Pool {
            sem: Arc::new(Semaphore::new(settings.size)),
            size_now: AtomicUsize::new(settings.size),
            settings: Mutex::new(settings),
            database,
            user,
            shard,
            node,
            connect,
            idle: Mutex::new(Vec::new()),
            waiters: Mutex::new(BTreeMap::new()),
            next_waiter: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            server_params: Mutex::new(None),
            metrics,
        }
    }

    /// Current knobs.
    pub fn settings(&self) -> PoolSettings {
        self.settings.lock().clone()
    }

    /// Pool mode of this pool.
    pub fn mode(&self) -> PoolMode {
        self.settings.lock().mode
    }

    /// Applies reloaded knobs; the size changes as permits are returned.
    pub fn update(&self, s: PoolSettings) {
        let new = s.size;
        *self.settings.lock() = s;
        let old = self.size_now.swap(new, Ordering::SeqCst);
        if new > old {
            self.sem.add_permits(new - old);
        } else if new < old {
            let sem = self.sem.clone();
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned((old - new) as u32).await {
                    p.forget();
                }
            });
        }
    }

    /// Borrows a server connection, waiting up to query_wait_timeout for one to be free.
    pub async fn checkout(&self) -> Result<Checkout, PoolError> {
        let start = Instant::now();
        let settings = self.settings();
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(PoolError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
                self.waiters.lock().insert(id, start);
                self.metrics.clients_waiting.inc();
                // Boxed: only waiting clients need the timer and queue entry.
                let r = Box::pin(tokio::time::timeout(
                    settings.wait_timeout,
                    self.sem.clone().acquire_owned(),
                ))
                .await;
                self.metrics.clients_waiting.dec();
                self.waiters.lock().remove(&id);
                match r {
                    Err(_) => return Err(PoolError::Timeout(settings.wait_timeout)),
                    Ok(Err(_)) => return Err(PoolError::Closed),
                    Ok(Ok(p)) => p,
                }
            }
        };
        let conn = loop {
            let candidate = self.idle.lock().pop();
            match candidate {
                Some(mut c) => {
                    self.metrics.servers_idle.dec();
                    // One non-blocking read: a server that was shut down or terminated this
                    // backend has already said so, and a client's statement must not find out.
                    if c.created.elapsed() >= settings.lifetime || !c.quiet() {
                        self.closed();
                        continue;
                    }
                    // A connection idle for long may have been cut by a firewall or a server
                    // restart: test it before a client's query finds out.
                    if c.last_used.elapsed() >= settings.check_delay
                        && Box::pin(c.exec_quiet(";", self.connect.max_message_size))
                            .await
                            .is_err()
                    {
                        self.closed();
                        continue;
                    }
                    break c;
                }
                // Boxed: a connect carries the whole login state, which every session's future
                // would otherwise reserve room for.
                None => break Box::new(Box::pin(self.connect_new(&settings)).await?),
            }
        };
        self.metrics.servers_active.inc();
        self.metrics
            .wait_time
            .observe(start.elapsed().as_secs_f64());
        Ok(Checkout {
            conn,
            _permit: permit,
            since: Instant::now(),
        })
    }

    async fn connect_new(&self, settings: &PoolSettings) -> Result<ServerConn, PoolError> {
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        loop {
            match ServerConn::connect(&self.connect, settings.prepared_cache).await {
                Ok(c) => {
                    self.remember_params(&c);
                    return Ok(c);
                }
                Err(e)
                    if attempt < settings.connect_retries
                        && !matches!(e, BackendError::Refused { .. }) =>
                {
                    attempt += 1;
                    tracing::warn!(server = %self.connect.addr(), error = %e, attempt, "server connect failed, retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Err(e) => {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(server = %self.connect.addr(), error = %e, "server connect failed");
                    return Err(e.into());
                }
            }
        }
    }

    fn remember_params(&self, c: &ServerConn) {
        let mut p = self.server_params.lock();
        if p.is_none() {
            *p = Some(Arc::new(c.server_params.clone()));
        }
    }

    /// ParameterStatus values to greet clients with; connects once if none is known yet.
    pub async fn server_params(&self) -> Result<ServerParams, PoolError> {
        if let Some(p) = self.server_params.lock().clone() {
            return Ok(p);
        }
        let c = self.checkout().await?;
        self.checkin(c, true);
        Ok(self.server_params.lock().clone().unwrap_or_default())
    }

    /// Returns a connection; `clean` means it is idle outside a transaction with nothing unread.
    pub fn checkin(&self, mut c: Checkout, clean: bool) {
        self.metrics.servers_active.dec();
        self.metrics.transactions.inc();
        self.metrics
            .transaction_time
            .observe(c.since.elapsed().as_secs_f64());
        let lifetime = self.settings.lock().lifetime;
        if !clean
            || c.conn.tx_status != b'I'
            || !c.conn.rbuf.is_empty()
            || c.conn.created.elapsed() >= lifetime
        {
            self.closed();
            return;
        }
        c.conn.rbuf.shrink_if_idle();
        c.conn.last_used = Instant::now();
        self.idle.lock().push(c.conn);
        self.metrics.servers_idle.inc();
    }

    /// Drops a lent connection that is not reusable.
    pub fn discard(&self, c: Checkout) {
        self.checkin(c, false);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes idle connections past server_idle_timeout or server_lifetime (keeping
    /// min_pool_size) and opens connections up to min_pool_size.
    pub async fn maintain(&self) {
        let s = self.settings();
        {
            let mut idle = self.idle.lock();
            let before = idle.len();
            let mut keep = s.min_size;
            // The stack's bottom holds the least recently used connections.
            idle.reverse();
            idle.retain(|c| {
                // An idle server has nothing to say: readable means it sent a FATAL (e.g. it was
                // terminated) or closed. Dropping it now keeps clients from finding out first.
                if !c.quiet() {
                    return false;
                }
                let young = c.created.elapsed() < s.lifetime;
                let fresh = c.last_used.elapsed() < s.idle_timeout;
                if young && (fresh || keep > 0) {
                    keep = keep.saturating_sub(1);
                    true
                } else {
                    false
                }
            });
            idle.reverse();
            let gone = before - idle.len();
            self.open.fetch_sub(gone, Ordering::Relaxed);
            self.metrics.servers_idle.sub(gone as i64);
        }
        while self.open.load(Ordering::Relaxed) < s.min_size {
            match self.connect_new(&s).await {
                Ok(mut c) => {
                    c.last_used = Instant::now();
                    self.idle.lock().push(Box::new(c));
                    self.metrics.servers_idle.inc();
                }
                Err(_) => break,
            }
        }
    }

    /// Closes every idle connection (RECONNECT, shutdown).
    pub fn close_idle(&self) {
        let mut idle = self.idle.lock();
        let n = idle.len();
        idle.clear();
        self.open.fetch_sub(n, Ordering::Relaxed);
        self.metrics.servers_idle.sub(n as i64);
    }

    /// Idle connections for SHOW SERVERS: (id, server pid, age, idle time).
    pub fn idle_servers(&self) -> Vec<(u64, i32, Duration, Duration)> {
        self.idle
            .lock()
            .iter()
            .map(|c| (c.id, c.pid, c.created.elapsed(), c.last_used.elapsed()))
            .collect()
    }

    /// Figures for SHOW POOLS.
    pub fn snapshot(&self) -> PoolSnapshot {
        let idle = self.idle.lock().len();
        let open = self.open.load(Ordering::Relaxed);
        let maxwait = self
            .waiters
            .lock()
            .values()
            .next()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        PoolSnapshot {
            cl_active: self.metrics.clients_active.get(),
            cl_waiting: self.metrics.clients_waiting.get(),
            sv_active: self.metrics.servers_active.get(),
            sv_idle: idle,
            sv_login: open.saturating_sub(idle + self.metrics.servers_active.get().max(0) as usize),
            maxwait,
            mode: self.mode(),
        }
    }
}

/// A point-in-time view of a pool.
pub struct PoolSnapshot {
    pub cl_active: i64,
    pub cl_waiting: i64,
    pub sv_active: i64,
    pub sv_idle: usize,
    pub sv_login: usize,
    pub maxwait: Duration,
    pub mode: PoolMode,
}
