//! Starting the router: listener, metrics endpoint, pool maintenance.

use crate::app::App;
use crate::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Catalog(#[from] crate::catalog::CatalogError),
}

/// Binds the listener and spawns the accept loop and background tasks; returns the state.
pub async fn start(config: Config, path: Option<PathBuf>) -> Result<Arc<App>, StartError> {
    let g = config.general.clone();
    let tls = match (&g.tls_cert_file, &g.tls_key_file) {
        (Some(c), Some(k)) => Some(crate::tls::acceptor(c, k)?),
        _ => None,
    };
    if let Some(addr) = g.metrics_listen {
        crate::metrics::serve(addr)
            .await
            .map_err(|source| StartError::Metrics { addr, source })?;
    }
    let app = App::new(config);
    *app.config_path.lock() = path;
    if let Some(cc) = app.config.load().catalog.clone() {
        crate::catalog::follow::start(app.clone(), cc).await?;
    }
    // Bound only once the map is known, so nobody connects to a router that cannot route yet.
    let listener = tokio::net::TcpListener::bind(g.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: g.listen,
            source,
        })?;
    // In-doubt transactions of an earlier run are settled before clients can read their rows.
    if let Ok(n) =
        tokio::time::timeout(Duration::from_secs(15), crate::twophase::resolve(&app)).await
    {
        if n > 0 {
            tracing::info!(resolved = n, "in-doubt prepared transactions resolved");
        }
    }
    tracing::info!(listen = %g.listen, "pgshard listening");
    tokio::spawn(crate::frontend::serve(app.clone(), listener, tls));
    if app
        .config
        .load()
        .shards
        .iter()
        .any(|s| !s.replicas.is_empty())
    {
        crate::health::monitor::spawn(app.clone());
    }
    let maint = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for p in maint.pools() {
                p.maintain().await;
            }
            if maint.twophase.take_unfinished() {
                crate::twophase::resolve(&maint).await;
            }
        }
    });
    Ok(app)
}
