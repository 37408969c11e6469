//! The catalog: one shard map (and, later, move state) in a PostgreSQL database that every
//! router and shardctl share. Control plane only: tokio-postgres, never on the data path.
//!
//! Maps are rows of `pgshard.maps`, never updated: publishing is inserting version n+1, which
//! succeeds for exactly one writer (primary key) and notifies the routers. See docs/catalog.md.

pub mod epoch;
pub mod follow;
pub mod migrate;
pub mod slots;

use crate::shardmap::config::ShardingConfig;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The `[catalog]` section of the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// libpq-style connection string of the catalog database, e.g.
    /// `host=127.0.0.1 port=5432 user=pgshard password=… dbname=pgshard_catalog`.
    pub dsn: String,
    /// A router that cannot renew its lease for this long stops serving sharded tables (a move
    /// may have started that it does not know of).
    #[serde(default = "d_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often the router renews its lease and looks for a newer map (besides notifications).
    #[serde(default = "d_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// After a new map arrives, how long transactions begun under the old one may run before
    /// they are rolled back (40001); the new version is acknowledged only once they are gone.
    #[serde(default = "d_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a statement for a fenced unit waits for the move to switch before it gets 40001.
    #[serde(default = "d_fence_wait", with = "humantime_serde")]
    pub fence_wait: Duration,
    /// How often the router lists the replication slots moves made on each shard's primary
    /// (`SHOW SLOTS`, `pgshard_move_slot_retained_bytes`).
    #[serde(default = "d_slot_check", with = "humantime_serde")]
    pub slot_check_interval: Duration,
    /// A move slot retaining more WAL than this (MB) is logged as a warning: a held move or
    /// one shardctl left behind keeps WAL until it is resumed or aborted.
    #[serde(default = "d_slot_warning")]
    pub slot_wal_warning_mb: u64,
}

fn d_lease() -> Duration {
    Duration::from_secs(10)
}
fn d_poll() -> Duration {
    Duration::from_secs(1)
}
fn d_drain() -> Duration {
    Duration::from_secs(5)
}
fn d_fence_wait() -> Duration {
    Duration::from_secs(5)
}
fn d_slot_check() -> Duration {
    Duration::from_secs(10)
}
fn d_slot_warning() -> u64 {
    1024
}

/// What went wrong talking to the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("catalog map version {version} is invalid: {reason}")]
    BadMap { version: u64, reason: String },
    #[error(
        "catalog: map version {expected} is no longer the latest (now {found}); reload and retry"
    )]
    Conflict { expected: u64, found: u64 },
    #[error("catalog: router_id '{0}' is held by another live router; give each router its own general.router_id")]
    RouterIdTaken(String),
    #[error("catalog: {0}")]
    Other(String),
}

/// A published map.
#[derive(Debug, Clone)]
pub struct MapRow {
    pub version: u64,
    pub sharding: ShardingConfig,
    pub shards: usize,
    pub note: String,
}

/// A router registered with the catalog.
#[derive(Debug, Clone)]
pub struct RouterRow {
    pub router_id: String,
    pub addr: String,
    pub acked_version: u64,
    /// Seconds until the lease runs out (negative: expired).
    pub lease_left: f64,
    /// Shards the router's config lists (None: a router older than catalog version 2).
    pub shards: Option<usize>,
}

/// A connection to the catalog.
pub struct Catalog {
    client: Client,
}

impl Catalog {
    /// Connects; notifications (`LISTEN`) arrive on the returned channel, which closes when the
    /// connection does.
    pub async fn connect(
        dsn: &str,
    ) -> Result<(Catalog, mpsc::UnboundedReceiver<String>), CatalogError> {
        let (client, mut conn) = tokio_postgres::connect(dsn, NoTls).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(Ok(m)) = messages.next().await {
                if let AsyncMessage::Notification(n) = m {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Ok((Catalog { client }, rx))
    }

    /// The underlying client (shardctl, tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Applies the migrations this build knows that the catalog lacks.
    pub async fn migrate(&mut self) -> Result<Vec<i32>, CatalogError> {
        migrate::apply(&mut self.client).await
    }

    /// The current (highest) map, if any was published.
    pub async fn latest_map(&self) -> Result<Option<MapRow>, CatalogError> {
        let row = self
            .client
            .query_opt("SELECT version, sharding, shards, note FROM pgshard.maps ORDER BY version DESC LIMIT 1", &[])
            .await?;
        let Some(row) = row else { return Ok(None) };
        let version = row.get::<_, i64>(0) as u64;
        let text: String = row.get(1);
        let sharding = toml::from_str(&text).map_err(|e| CatalogError::BadMap {
            version,
            reason: e.to_string(),
        })?;
        Ok(Some(MapRow {
            version,
            sharding,
            shards: row.get::<_, i32>(2) as usize,
            note: row.get(3),
        }))
    }

    /// Publishes `sharding` as the version after `after` (0: the first map). Fails with
    /// `Conflict` if another writer published first; the map is validated before it is stored.
    pub async fn publish_map(
        &self,
        after: u64,
        sharding: &ShardingConfig,
        shards: usize,
        note: &str,
    ) -> Result<u64, CatalogError> {
        let version = after + 1;
        crate::shardmap::ShardMap::build(sharding, shards, version).map_err(|e| {
            CatalogError::BadMap {
                version,
                reason: e.to_string(),
            }
        })?;
        let text = toml::to_string(sharding)
            .map_err(|e| CatalogError::Other(format!("cannot write the map as TOML: {e}")))?;
        let n = self
            .client
            .execute(
                "INSERT INTO pgshard.maps (version, sharding, shards, note)
                 SELECT $1, $2, $3, $4
                 WHERE coalesce((SELECT max(version) FROM pgshard.maps), 0) = $5
                 ON CONFLICT (version) DO NOTHING",
                &[
                    &(version as i64),
                    &text,
                    &(shards as i32),
                    &note,
                    &(after as i64),
                ],
            )
            .await?;
        if n == 1 {
            return Ok(version);
        }
        let found = self.latest_map().await?.map_or(0, |m| m.version);
        Err(CatalogError::Conflict {
            expected: after,
            found,
        })
    }

    /// Starts following maps: notifications of new versions arrive on the connect channel.
    pub async fn listen(&self) -> Result<(), CatalogError> {
        self.client.batch_execute("LISTEN pgshard_map").await?;
        Ok(())
    }

    /// Registers or renews this router's lease and records the map version it serves. Refuses
    /// when another process holds the same router_id with a live lease.
    /// Returns the newest map version at the time of the renewal.
    pub async fn heartbeat(
        &self,
        router_id: &str,
        instance: &str,
        addr: &str,
        lease: Duration,
        acked: u64,
        shards: usize,
    ) -> Result<u64, CatalogError> {
        let row = self
            .client
            .query_opt(
                "INSERT INTO pgshard.routers (router_id, addr, instance, lease_until, acked_version, shards)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, $6)
                 ON CONFLICT (router_id) DO UPDATE
                   SET addr = EXCLUDED.addr, instance = EXCLUDED.instance, lease_until = EXCLUDED.lease_until,
                       acked_version = EXCLUDED.acked_version, shards = EXCLUDED.shards,
                       started_at = CASE WHEN pgshard.routers.instance = EXCLUDED.instance
                                         THEN pgshard.routers.started_at ELSE now() END
                   WHERE pgshard.routers.instance = EXCLUDED.instance OR pgshard.routers.lease_until < now()
                 RETURNING (SELECT coalesce(max(version), 0) FROM pgshard.maps)",
                &[&router_id, &addr, &instance, &lease.as_secs_f64(), &(acked as i64), &(shards as i32)],
            )
            .await?;
        match row {
            Some(r) => Ok(r.get::<_, i64>(0) as u64),
            None => Err(CatalogError::RouterIdTaken(router_id.to_string())),
        }
    }

    /// Every registered router.
    pub async fn routers(&self) -> Result<Vec<RouterRow>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT router_id, addr, acked_version, extract(epoch FROM lease_until - now())::float8, shards
                 FROM pgshard.routers ORDER BY router_id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RouterRow {
                router_id: r.get(0),
                addr: r.get(1),
                acked_version: r.get::<_, i64>(2) as u64,
                lease_left: r.get(3),
                shards: r.get::<_, Option<i32>>(4).map(|n| n as usize),
            })
            .collect())
    }
}
