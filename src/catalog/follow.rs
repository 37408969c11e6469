//! A router following the catalog: it loads the current map before serving, then swaps in each
//! newer version (woken by NOTIFY, or by the periodic poll if a notification is lost), renews
//! its lease and acknowledges the version it serves.

use super::epoch::{Draining, Epoch};
use super::{Catalog, CatalogConfig, CatalogError, MapRow};
use crate::app::App;
use crate::shardmap::ShardMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the rest of the router may know of its catalog link.
#[derive(Default)]
pub struct CatalogState {
    /// The map comes from the catalog (config reloads leave it alone).
    pub active: AtomicBool,
    /// Until when the last renewed lease holds: µs since `clock_base()` (0 = never renewed).
    lease_until_us: AtomicU64,
    /// Map version the catalog was last told this router serves.
    pub acked: AtomicU64,
    /// How long a statement for a fenced unit may wait, in milliseconds.
    pub fence_wait_ms: AtomicU64,
    /// Move slots on the shards' primaries, as last checked (`slots.rs`).
    pub slots: parking_lot::Mutex<Vec<super::slots::SlotInfo>>,
}

impl CatalogState {
    /// False once a catalog-following router has gone longer than its lease without renewing
    /// it: shardctl no longer waits for it, so a move may have begun that its map does not
    /// show, and no sharded table may be served. Cheap: checked for every such statement.
    pub fn lease_valid(&self) -> bool {
        !self.active.load(Ordering::Acquire)
            || micros_since_base(Instant::now()) < self.lease_until_us.load(Ordering::Acquire)
    }

    fn renewed(&self, at: Instant, lease: Duration) {
        self.lease_until_us
            .store(micros_since_base(at + lease), Ordering::Release);
    }
}

fn micros_since_base(t: Instant) -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    t.saturating_duration_since(*BASE.get_or_init(Instant::now))
        .as_micros() as u64
}

/// Loads the catalog's map (seeding it from the config file when the catalog is empty),
/// registers this router, and keeps following in the background. Fails if the catalog cannot
/// be reached within `lease` or its map does not fit the configured shards.
pub async fn start(app: Arc<App>, cc: CatalogConfig) -> Result<(), CatalogError> {
    let deadline = Instant::now() + cc.lease;
    let (mut cat, rx) = loop {
        match Catalog::connect(&cc.dsn).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "catalog unreachable, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let applied = cat.migrate().await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "catalog schema migrations applied");
    }
    cat.listen().await?;
    let map = match cat.latest_map().await? {
        Some(m) => m,
        None => {
            let cfg = app.config.load_full();
            match cat
                .publish_map(
                    0,
                    &cfg.sharding,
                    cfg.map_shards(),
                    "seeded from the config file",
                )
                .await
            {
                Ok(_) | Err(CatalogError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            cat.latest_map()
                .await?
                .ok_or_else(|| CatalogError::Other("the seeded map vanished".into()))?
        }
    };
    install(&app, &map)?;
    app.catalog.active.store(true, Ordering::Release);
    app.catalog
        .fence_wait_ms
        .store(cc.fence_wait.as_millis() as u64, Ordering::Relaxed);
    let instance = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
    let cfg = app.config.load_full();
    let me = Me {
        router_id: cfg.general.router_id.clone(),
        instance,
        addr: cfg.general.listen.to_string(),
        shards: cfg.shards.len(),
    };
    // A previous run of this router that died keeps its lease until it runs out.
    let deadline = Instant::now() + cc.lease + Duration::from_secs(1);
    let t = loop {
        let t = Instant::now();
        match cat
            .heartbeat(
                &me.router_id,
                &me.instance,
                &me.addr,
                cc.lease,
                map.version,
                me.shards,
            )
            .await
        {
            Ok(_) => break t,
            Err(CatalogError::RouterIdTaken(_)) if Instant::now() < deadline => {
                tracing::warn!(router_id = %me.router_id, "router_id still leased (a previous run?); waiting for the lease to run out");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    };
    app.catalog.renewed(t, cc.lease);
    app.catalog.acked.store(map.version, Ordering::Release);
    tracing::info!(version = map.version, router_id = %me.router_id, "following the catalog's shard map");
    super::slots::spawn(
        app.clone(),
        cc.slot_check_interval,
        cc.slot_wal_warning_mb << 20,
    );
    tokio::spawn(follow(app, cc, cat, rx, me));
    Ok(())
}

struct Me {
    router_id: String,
    instance: String,
    addr: String,
    /// Shards this router's config lists: maps may use these many or fewer.
    shards: usize,
}

async fn follow(
    app: Arc<App>,
    cc: CatalogConfig,
    mut cat: Catalog,
    mut rx: mpsc::UnboundedReceiver<String>,
    me: Me,
) {
    let mut draining = Draining::default();
    let mut again = false;
    loop {
        let lost = match std::mem::take(&mut again) {
            true => false,
            false => tokio::select! {
                n = rx.recv() => n.is_none(),
                _ = tokio::time::sleep(cc.poll_interval) => false,
            },
        };
        // Several notifications may be queued; one refresh covers them all.
        while rx.try_recv().is_ok() {}
        let r = if lost {
            Err(CatalogError::Other("connection lost".into()))
        } else {
            refresh(&app, &cat, &cc, &me, &mut draining).await
        };
        if let Ok(newer) = r {
            again = newer;
        }
        if let Err(e) = r {
            if let CatalogError::RouterIdTaken(_) = e {
                tracing::error!(error = %e, "catalog lease lost to another router");
            } else {
                tracing::warn!(error = %e, lease_valid = app.catalog.lease_valid(), "catalog refresh failed; reconnecting");
            }
            match Catalog::connect(&cc.dsn).await {
                Ok((c, r)) => {
                    if c.listen().await.is_ok() {
                        cat = c;
                        rx = r;
                    }
                }
                Err(_) => tokio::time::sleep(cc.poll_interval).await,
            }
        }
    }
}

/// Installs a newer map if there is one, waits a while for requests begun under older versions
/// to end, then renews the lease with the version now served (or, if some are still running,
/// with the version acknowledged before: the catalog must never be told too much).
/// The renewal counts only if no newer map appeared meanwhile: shardctl may have stopped
/// waiting for this router while its lease was out, so it must not serve a map older than
/// the catalog's until it has installed the newest. Returns true to be called again at once.
async fn refresh(
    app: &App,
    cat: &Catalog,
    cc: &CatalogConfig,
    me: &Me,
    draining: &mut Draining,
) -> Result<bool, CatalogError> {
    let t = Instant::now();
    if let Some(map) = cat.latest_map().await? {
        if map.version > app.shardmap.load().version {
            draining.push(install(app, &map)?);
            tracing::info!(version = map.version, note = %map.note, "new shard map from the catalog");
        }
    }
    let serving = app.shardmap.load().version;
    // A slice at a time, so a long drain does not let the lease run out.
    let drained = draining
        .settle(cc.drain_timeout, cc.poll_interval, cc.lease / 4)
        .await;
    let ack = if drained {
        serving
    } else {
        app.catalog.acked.load(Ordering::Acquire)
    };
    let latest = cat
        .heartbeat(
            &me.router_id,
            &me.instance,
            &me.addr,
            cc.lease,
            ack,
            me.shards,
        )
        .await?;
    app.catalog.acked.store(ack, Ordering::Release);
    if latest > serving {
        return Ok(true);
    }
    app.catalog.renewed(t, cc.lease);
    Ok(false)
}

/// Swaps in a catalog map (unless it does not fit this router's shards) and starts a new
/// epoch; returns the old epoch, whose holders must end before the version is acknowledged.
fn install(app: &App, map: &MapRow) -> Result<Arc<Epoch>, CatalogError> {
    // A config may list shards the map does not use yet (added with `shardctl add-shard`).
    let shards = app.config.load().shards.len();
    if map.shards > shards {
        return Err(CatalogError::BadMap {
            version: map.version,
            reason: format!(
                "it spans {} shards but this router's config lists only {shards}",
                map.shards
            ),
        });
    }
    let built = ShardMap::build(&map.sharding, map.shards, map.version).map_err(|e| {
        CatalogError::BadMap {
            version: map.version,
            reason: e.to_string(),
        }
    })?;
    app.shardmap.store(Arc::new(built));
    // Sessions read the epoch before the map: whoever sees the new epoch sees the new map.
    let old = app.epoch.swap(Epoch::new(map.version));
    app.map_changed.notify_waiters();
    Ok(old)
}
