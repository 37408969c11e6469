//! Process-wide state: the config snapshot, the pools, the connected clients.

use crate::auth::{ScramVerifier, Secret};
use crate::backend::ConnectParams;
use crate::config::{split_host_port, Config, PoolMode};
use crate::health::Health;
use crate::pool::{Pool, PoolSettings};
use crate::router::PlanCache;
use crate::shardmap::ShardMap;
use crate::twophase::TwoPhase;
use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// A client's credentials, prepared once per config load.
pub struct UserAuth {
    pub secret: Secret,
    /// Derived once: deriving a verifier from a plaintext password costs 4096 HMAC rounds.
    pub scram: Option<ScramVerifier>,
}

/// Where a client's cancel request must go right now.
#[derive(Debug, Clone, Copy)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// Client states for SHOW CLIENTS.
pub mod client_state {
    pub const IDLE: u8 = 0;
    pub const ACTIVE: u8 = 1;
    pub const WAITING: u8 = 2;
}

/// What the rest of the process may see of a connected client.
pub struct ClientInfo {
    /// Doubles as the backend pid the client was given.
    pub pid: i32,
    pub secret: i32,
    pub addr: SocketAddr,
    pub user: String,
    /// The config entry's name (a tenant database's clients: the entry its prefix names).
    pub database: String,
    /// The tenant a tenant database's name selected.
    pub tenant: Option<String>,
    pub application_name: String,
    pub connected: Instant,
    pub state: AtomicU8,
    pub cancel: Mutex<Option<CancelTarget>>,
}

const CLIENT_SHARDS: usize = 16;

/// Connected clients, striped so connects on different threads rarely share a lock.
pub struct ClientRegistry {
    shards: [Mutex<HashMap<i32, Arc<ClientInfo>>>; CLIENT_SHARDS],
    next_pid: AtomicI32,
    count: AtomicUsize,
}

impl Default for ClientRegistry {
    fn default() -> Self {
        ClientRegistry {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_pid: AtomicI32::new(1),
            count: AtomicUsize::new(0),
        }
    }
}

impl ClientRegistry {
    /// Allocates a backend key for a new client.
    pub fn next_key(&self) -> (i32, i32) {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        (pid, rand::random::<i32>())
    }

    /// Adds a client; returns false if max_client_conn is reached.
    pub fn register(&self, info: Arc<ClientInfo>, max: usize) -> bool {
        if self.count.fetch_add(1, Ordering::AcqRel) >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.shards[info.pid as usize % CLIENT_SHARDS]
            .lock()
            .insert(info.pid, info);
        true
    }

    /// Removes a client.
    pub fn unregister(&self, pid: i32) {
        if self.shards[pid as usize % CLIENT_SHARDS]
            .lock()
            .remove(&pid)
            .is_some()
        {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The client holding backend key (pid, secret).
    pub fn find(&self, pid: i32, secret: i32) -> Option<Arc<ClientInfo>> {
        let c = self.shards[pid.max(0) as usize % CLIENT_SHARDS]
            .lock()
            .get(&pid)
            .cloned()?;
        (c.secret == secret).then_some(c)
    }

    /// All clients (admin console).
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Number of connected clients.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Key of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub shard: usize,
    /// Server of the shard: 0 is the configured primary, then its replicas in order.
    pub node: usize,
}

/// The whole router's shared state.
pub struct App {
    pub config: ArcSwap<Config>,
    users: ArcSwap<HashMap<String, Arc<UserAuth>>>,
    pools: RwLock<HashMap<PoolKey, Arc<Pool>>>,
    pub clients: ClientRegistry,
    /// True while PAUSE holds new transactions.
    pub paused: watch::Sender<bool>,
    /// True once shutdown began: stop accepting, finish transactions, close.
    pub shutdown: watch::Sender<bool>,
    pub started: Instant,
    /// Per-process seed for mock verifiers of unknown users.
    mock_seed: [u8; 16],
    /// File the config was loaded from, for RELOAD and SIGHUP.
    pub config_path: Mutex<Option<std::path::PathBuf>>,
    /// The shard map snapshot statements are routed with; swapped whole on change.
    pub shardmap: ArcSwap<ShardMap>,
    /// Routing plans per distinct statement text.
    pub plans: PlanCache,
    /// Statement texts rewritten to leave out a unit in motion on the shard holding its extra
    /// copy, per (text, shard, read or write) and map version (`Err`: why it cannot be).
    pub shadow_texts: crate::router::TextMemo<Result<Arc<str>, Arc<str>>>,
    /// Two-phase commit ids and decision log.
    pub twophase: TwoPhase,
    /// Roles, health and lag of every server; replaced when the servers change.
    pub health: ArcSwap<Health>,
    /// The link to the catalog, when the map comes from one.
    pub catalog: crate::catalog::follow::CatalogState,
    /// The current epoch: requests hold it while they run (see catalog::epoch).
    pub epoch: ArcSwap<crate::catalog::epoch::Epoch>,
    /// Woken whenever a new shard map is installed (statements waiting on a fenced unit).
    pub map_changed: tokio::sync::Notify,
}

impl App {
    /// Re-reads the config file and applies it; the old config stays if the new one is bad.
    pub fn reload_from_file(&self) -> Result<(), crate::config::ConfigError> {
        let Some(path) = self.config_path.lock().clone() else {
            return Err(crate::config::ConfigError::Invalid(
                "no config file to reload".into(),
            ));
        };
        let cfg = Config::load(&path)?;
        self.reload(cfg);
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// State for a loaded config.
    pub fn new(config: Config) -> Arc<App> {
        let users = build_users(&config);
        // Validated with the config, so building cannot fail here.
        let map =
            ShardMap::build(&config.sharding, config.map_shards(), 1).expect("validated config");
        Arc::new(App {
            shardmap: ArcSwap::from_pointee(map),
            plans: PlanCache::new(10_000),
            shadow_texts: crate::router::TextMemo::new(1_000),
            twophase: TwoPhase::open(
                &config.general.router_id,
                config.general.decision_log.clone().into(),
            ),
            health: ArcSwap::from_pointee(Health::new(&config.shards)),
            catalog: Default::default(),
            epoch: ArcSwap::new(crate::catalog::epoch::Epoch::new(1)),
            map_changed: tokio::sync::Notify::new(),
            config: ArcSwap::from_pointee(config),
            users: ArcSwap::from_pointee(users),
            pools: RwLock::new(HashMap::new()),
            clients: ClientRegistry::default(),
            paused: watch::channel(false).0,
            shutdown: watch::channel(false).0,
            started: Instant::now(),
            config_path: Mutex::new(None),
            mock_seed: rand::random(),
        })
    }

    /// Credentials that fail every exchange, for unknown users: they go through the same steps
    /// as a wrong password so a client cannot tell which user names exist.
    pub fn unknown_user_auth(&self, user: &str) -> UserAuth {
        let verifier = ScramVerifier::mock(user, &self.mock_seed);
        UserAuth {
            secret: Secret::from(verifier.clone()),
            scram: Some(verifier),
        }
    }

    /// Credentials of `user`.
    pub fn user_auth(&self, user: &str) -> Option<Arc<UserAuth>> {
        self.users.load().get(user).cloned()
    }

    /// The pool for (database, user) on the server of `shard` that takes writes now.
    pub fn pool(&self, database: &str, user: &str, shard: usize) -> Option<Arc<Pool>> {
        let node = self.health.load().writer(shard);
        self.node_pool(database, user, shard, node)
    }

    /// The pool for (database, user) on server `node` of `shard`, created on first use.
    pub fn node_pool(
        &self,
        database: &str,
        user: &str,
        shard: usize,
        node: usize,
    ) -> Option<Arc<Pool>> {
        let key = PoolKey {
            database: database.into(),
            user: user.into(),
            shard,
            node,
        };
        if let Some(p) = self.pools.read().get(&key) {
            return Some(p.clone());
        }
        let cfg = self.config.load();
        let db = cfg.database(database)?;
        let u = cfg.user(user)?;
        let (host, port) = split_host_port(server_addr(&cfg, shard, node)?)?;
        let connect = ConnectParams {
            host,
            port,
            user: user.into(),
            database: db
                .server_database
                .clone()
                .unwrap_or_else(|| db.name.clone()),
            password: server_password(u),
            connect_timeout: cfg.general.server_connect_timeout,
            max_message_size: cfg.general.max_message_size,
        };
        let settings = pool_settings(&cfg, database, user);
        let mut pools = self.pools.write();
        let p = pools.entry(key).or_insert_with(|| {
            Arc::new(Pool::new(
                database.into(),
                user.into(),
                shard,
                node,
                connect,
                settings,
            ))
        });
        Some(p.clone())
    }

    /// Every server's pool for (database, user, shard), indexed by server.
    pub fn shard_pools(&self, database: &str, user: &str, shard: usize) -> Option<Vec<Arc<Pool>>> {
        let n = self.config.load().shards.get(shard)?.replicas.len() + 1;
        (0..n)
            .map(|node| self.node_pool(database, user, shard, node))
            .collect()
    }

    /// Drops the idle connections to one server (it stopped taking writes).
    pub fn close_idle_on(&self, shard: usize, node: usize) {
        for p in self
            .pools
            .read()
            .values()
            .filter(|p| p.shard == shard && p.node == node)
        {
            p.close_idle();
        }
    }

    /// All pools (admin console, maintenance).
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.read().values().cloned().collect()
    }

    /// Swaps in a new config: users and pool knobs change at once; clients stay connected.
    /// Pools whose server address changed are dropped so new connections go to the new one.
    pub fn reload(&self, config: Config) {
        self.users.store(Arc::new(build_users(&config)));
        // A catalog-following router takes its map from the catalog only.
        if !self
            .catalog
            .active
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let version = self.shardmap.load().version + 1;
            if let Ok(map) = ShardMap::build(&config.sharding, config.map_shards(), version) {
                self.shardmap.store(Arc::new(map));
            }
        }
        if !self.health.load().same_servers(&config.shards) {
            self.health.store(Arc::new(Health::new(&config.shards)));
        }
        let mut pools = self.pools.write();
        pools.retain(|k, p| {
            let target = server_addr(&config, k.shard, k.node).and_then(split_host_port);
            let same = target == Some((p.connect.host.clone(), p.connect.port))
                && config.database(&k.database).is_some()
                && config.user(&k.user).is_some();
            if same {
                p.update(pool_settings(&config, &k.database, &k.user));
            } else {
                p.close_idle();
            }
            same
        });
        drop(pools);
        self.config.store(Arc::new(config));
    }
}

/// `host:port` of server `node` of `shard`: 0 is the primary, then the replicas.
fn server_addr(cfg: &Config, shard: usize, node: usize) -> Option<&str> {
    let s = cfg.shards.get(shard)?;
    if node == 0 {
        Some(&s.primary)
    } else {
        s.replicas.get(node - 1).map(String::as_str)
    }
}

/// The password pgshard logs into servers with as `u`: its server_password, else its password
/// when that is plaintext (a verifier or hash cannot log in).
pub fn server_password(u: &crate::config::User) -> Option<String> {
    u.server_password
        .clone()
        .or_else(|| match Secret::parse(&u.password) {
            Ok(Secret::Plain(p)) => Some(p),
            _ => None,
        })
}

fn build_users(config: &Config) -> HashMap<String, Arc<UserAuth>> {
    config
        .users
        .iter()
        .map(|u| {
            // Config validation refuses unparseable secrets, so this cannot fail here; an entry
            // that somehow did gets a secret nobody can match rather than a plaintext guess.
            let secret = Secret::parse(&u.password)
                .unwrap_or_else(|_| Secret::from(ScramVerifier::mock(&u.name, b"invalid")));
            let scram = secret.scram_verifier();
            (u.name.clone(), Arc::new(UserAuth { secret, scram }))
        })
        .collect()
}

/// Knobs for one (database, user) pool: per-user and per-database values override general.
pub fn pool_settings(cfg: &Config, database: &str, user: &str) -> PoolSettings {
    let g = &cfg.general;
    let db = cfg.database(database);
    let u = cfg.user(user);
    let mode = u
        .and_then(|u| u.pool_mode)
        .or_else(|| db.and_then(|d| d.pool_mode))
        .unwrap_or(g.pool_mode);
    let size = u
        .and_then(|u| u.pool_size)
        .or_else(|| db.and_then(|d| d.pool_size))
        .unwrap_or(g.default_pool_size);
    PoolSettings {
        mode,
        size,
        min_size: g.min_pool_size.min(size),
        wait_timeout: g.query_wait_timeout,
        lifetime: g.server_lifetime,
        idle_timeout: g.server_idle_timeout,
        check_delay: g.server_check_delay,
        connect_retries: g.server_connect_retries,
        prepared_cache: g.prepared_statements_cache_size,
    }
}

/// True for session pooling.
pub fn is_session(mode: PoolMode) -> bool {
    mode == PoolMode::Session
}
