//! Prometheus metrics: labelled families, resolved once per pool so the data path only does
//! atomic adds on handles it already holds.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The process's metric families.
pub struct Metrics {
    registry: Registry,
    clients_active: IntGaugeVec,
    clients_waiting: IntGaugeVec,
    servers_active: IntGaugeVec,
    servers_idle: IntGaugeVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    errors: IntCounterVec,
    bytes_received: IntCounterVec,
    bytes_sent: IntCounterVec,
    transaction_time: HistogramVec,
    wait_time: HistogramVec,
    /// Client connections currently open.
    pub client_connections: IntGauge,
    /// Client connections refused (max_client_conn, bad auth, bad startup).
    pub clients_refused: IntCounter,
    move_slot_retained: IntGaugeVec,
}

/// A pool's metric handles.
#[derive(Clone)]
pub struct PoolMetrics {
    pub clients_active: IntGauge,
    pub clients_waiting: IntGauge,
    pub servers_active: IntGauge,
    pub servers_idle: IntGauge,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub errors: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub transaction_time: Histogram,
    pub wait_time: Histogram,
}

const POOL_LABELS: &[&str] = &["database", "user", "server"];

fn gauge(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), POOL_LABELS).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), POOL_LABELS).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str) -> HistogramVec {
    let buckets = vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), POOL_LABELS)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let client_connections =
            IntGauge::new("pgshard_client_connections", "Open client connections").unwrap();
        r.register(Box::new(client_connections.clone())).unwrap();
        let clients_refused = IntCounter::new(
            "pgshard_clients_refused_total",
            "Client connections refused",
        )
        .unwrap();
        r.register(Box::new(clients_refused.clone())).unwrap();
        let move_slot_retained = IntGaugeVec::new(
            Opts::new(
                "pgshard_move_slot_retained_bytes",
                "WAL a move's replication slot holds back on a shard's primary (-1: invalidated)",
            ),
            &["shard", "slot"],
        )
        .expect("valid metric");
        r.register(Box::new(move_slot_retained.clone())).unwrap();
        Metrics {
            move_slot_retained,
            clients_active: gauge(
                &r,
                "pgshard_pool_clients_active",
                "Clients holding a server connection",
            ),
            clients_waiting: gauge(
                &r,
                "pgshard_pool_clients_waiting",
                "Clients waiting for a server connection",
            ),
            servers_active: gauge(
                &r,
                "pgshard_pool_servers_active",
                "Server connections in use",
            ),
            servers_idle: gauge(&r, "pgshard_pool_servers_idle", "Idle server connections"),
            transactions: counter(
                &r,
                "pgshard_transactions_total",
                "Transactions (server checkouts) completed",
            ),
            queries: counter(&r, "pgshard_queries_total", "Queries and Syncs forwarded"),
            errors: counter(&r, "pgshard_errors_total", "ErrorResponses sent to clients"),
            bytes_received: counter(
                &r,
                "pgshard_bytes_received_total",
                "Bytes received from clients",
            ),
            bytes_sent: counter(&r, "pgshard_bytes_sent_total", "Bytes sent to clients"),
            transaction_time: histogram(
                &r,
                "pgshard_transaction_seconds",
                "Time a server connection was held",
            ),
            wait_time: histogram(
                &r,
                "pgshard_wait_seconds",
                "Time clients waited for a server connection",
            ),
            client_connections,
            clients_refused,
            registry: r,
        }
    }

    /// The process-wide metrics.
    pub fn global() -> &'static Metrics {
        static M: OnceLock<Metrics> = OnceLock::new();
        M.get_or_init(Metrics::new)
    }

    /// Handles for one pool.
    pub fn pool(&self, database: &str, user: &str, server: &str) -> PoolMetrics {
        let l = [database, user, server];
        PoolMetrics {
            clients_active: self.clients_active.with_label_values(&l),
            clients_waiting: self.clients_waiting.with_label_values(&l),
            servers_active: self.servers_active.with_label_values(&l),
            servers_idle: self.servers_idle.with_label_values(&l),
            transactions: self.transactions.with_label_values(&l),
            queries: self.queries.with_label_values(&l),
            errors: self.errors.with_label_values(&l),
            bytes_received: self.bytes_received.with_label_values(&l),
            bytes_sent: self.bytes_sent.with_label_values(&l),
            transaction_time: self.transaction_time.with_label_values(&l),
            wait_time: self.wait_time.with_label_values(&l),
        }
    }

    /// Replaces the move slot gauges with those just seen (slots gone lose their series).
    pub fn set_move_slots(&self, slots: &[crate::catalog::slots::SlotInfo]) {
        self.move_slot_retained.reset();
        for s in slots {
            let v = s
                .retained_bytes
                .map_or(-1, |b| b.min(i64::MAX as u64) as i64);
            self.move_slot_retained
                .with_label_values(&[&s.shard.to_string(), &s.slot])
                .set(v);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut req = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                // Requests are tiny; bound both size and time so a slow peer cannot hold memory.
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                })
                .await;
                if read != Ok(true) {
                    return;
                }
                let ok = req.starts_with(b"GET /metrics ") || req.starts_with(b"GET / ");
                let (status, body) = if ok {
                    ("200 OK", Metrics::global().encode())
                } else {
                    ("404 Not Found", "not found\n".into())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}
