//! TOML configuration: parsed strictly (unknown keys are errors) and validated once at load.

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// How long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is held for one transaction.
    Transaction,
    /// A server connection is held for the whole client session.
    Session,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub general: General,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub databases: Vec<Database>,
    #[serde(default)]
    pub shards: Vec<Shard>,
    #[serde(default)]
    pub sharding: crate::shardmap::config::ShardingConfig,
    #[serde(default)]
    pub replicas: crate::health::config::ReplicaConfig,
    /// Shared shard map for several routers (and rebalancing); without it the map is `[sharding]`.
    #[serde(default)]
    pub catalog: Option<crate::catalog::CatalogConfig>,
}

/// Process-wide settings, named after PgBouncer's where one exists.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct General {
    #[serde(default = "d_listen")]
    pub listen: SocketAddr,
    #[serde(default = "d_pool_mode")]
    pub pool_mode: PoolMode,
    #[serde(default = "d_auth_type")]
    pub auth_type: AuthType,
    #[serde(default = "d_pool_size")]
    pub default_pool_size: usize,
    #[serde(default)]
    pub min_pool_size: usize,
    #[serde(default = "d_max_client_conn")]
    pub max_client_conn: usize,
    /// How long a client may wait for a server connection before it gets an error.
    #[serde(default = "d_query_wait_timeout", with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// Server connections older than this are closed when they return to the pool.
    #[serde(default = "d_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Idle server connections unused for this long are closed (down to min_pool_size).
    #[serde(default = "d_server_idle_timeout", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// A client idle inside a transaction for this long is disconnected (0 = never).
    #[serde(default, with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// Extra attempts after a failed server connect, before the client gets an error.
    #[serde(default = "d_connect_retries")]
    pub server_connect_retries: u32,
    /// Idle server connections unused for this long are checked with a query before reuse.
    #[serde(default = "d_check_delay", with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Upper bound on one protocol message from either side, in bytes.
    #[serde(default = "d_max_message_size")]
    pub max_message_size: usize,
    /// Prepared statements kept per server connection before the least recently used is closed.
    #[serde(default = "d_prepared_cache")]
    pub prepared_statements_cache_size: usize,
    /// How long SIGTERM waits for transactions to finish before closing connections.
    #[serde(default = "d_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Users allowed into the admin console (virtual database `pgshard`).
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Address of the Prometheus endpoint; none disables it.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate and key: when both are set, clients may use TLS.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// Names this router in two-phase commit ids; routers sharing shards need distinct ids.
    #[serde(default = "d_router_id")]
    pub router_id: String,
    /// File where multi-shard commit decisions are recorded (fsynced) before phase two.
    #[serde(default = "d_decision_log")]
    pub decision_log: String,
}

/// A login that clients may use; the same name and password are used towards the servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plaintext, `SCRAM-SHA-256$…` verifier or `md5…` hash, as in pg_authid.
    pub password: String,
    /// Password for server connections when `password` is not plaintext.
    #[serde(default)]
    pub server_password: Option<String>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default)]
    pub pool_size: Option<usize>,
}

/// A database clients may connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    /// Name of the database on the servers (defaults to `name`).
    #[serde(default)]
    pub server_database: Option<String>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// Spread over every shard by `[sharding]`; otherwise everything goes to shard 0.
    #[serde(default)]
    pub sharded: bool,
    /// Overrides `[replicas] reads` for this database.
    #[serde(default)]
    pub replica_reads: Option<bool>,
    /// Database-per-tenant: a client connecting to `<prefix><tenant>` uses this entry and
    /// sees only that tenant's rows of the tenant distribution's tables.
    #[serde(default)]
    pub tenant_prefix: Option<String>,
    /// The distribution whose key is the tenant (defaults to the only tenant-strategy one).
    #[serde(default)]
    pub tenant_distribution: Option<String>,
}

/// One shard: a primary and its replicas, as `host:port`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
}

fn d_listen() -> SocketAddr {
    "127.0.0.1:6432".parse().unwrap()
}
fn d_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn d_auth_type() -> AuthType {
    AuthType::ScramSha256
}
fn d_pool_size() -> usize {
    20
}
fn d_max_client_conn() -> usize {
    10_000
}
fn d_query_wait_timeout() -> Duration {
    Duration::from_secs(120)
}
fn d_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn d_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn d_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_connect_retries() -> u32 {
    2
}
fn d_check_delay() -> Duration {
    Duration::from_secs(30)
}
fn d_max_message_size() -> usize {
    64 * 1024 * 1024
}
fn d_prepared_cache() -> usize {
    500
}
fn d_router_id() -> String {
    "r1".into()
}
fn d_decision_log() -> String {
    "pgshard-decisions.log".into()
}
fn d_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Shards the config's own map uses: `sharding.shards`, or every shard listed.
    pub fn map_shards(&self) -> usize {
        self.sharding.shards.unwrap_or(self.shards.len())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let g = &self.general;
        if g.default_pool_size == 0 {
            return bad("general.default_pool_size must be at least 1".into());
        }
        if g.min_pool_size > g.default_pool_size {
            return bad("general.min_pool_size must not exceed general.default_pool_size".into());
        }
        if g.max_message_size < 1024 {
            return bad("general.max_message_size must be at least 1024 bytes".into());
        }
        if g.tls_cert_file.is_some() != g.tls_key_file.is_some() {
            return bad(
                "general.tls_cert_file and general.tls_key_file must be set together".into(),
            );
        }
        if self.shards.is_empty() {
            return bad("at least one [[shards]] entry is required".into());
        }
        for (i, s) in self.shards.iter().enumerate() {
            for addr in std::iter::once(&s.primary).chain(&s.replicas) {
                if split_host_port(addr).is_none() {
                    return bad(format!("shards[{i}]: '{addr}' is not host:port"));
                }
            }
        }
        let mut seen = HashSet::new();
        for u in &self.users {
            if !seen.insert(&u.name) {
                return bad(format!("users: '{}' is declared twice", u.name));
            }
            if u.pool_size == Some(0) {
                return bad(format!("users.{}.pool_size must be at least 1", u.name));
            }
            if let Err(e) = crate::auth::Secret::parse(&u.password) {
                return bad(format!("users.{}.password: {e}", u.name));
            }
        }
        for a in &g.admin_users {
            if !self.users.iter().any(|u| &u.name == a) {
                return bad(format!(
                    "general.admin_users: '{a}' is not declared in [[users]]"
                ));
            }
        }
        let mut seen = HashSet::new();
        for d in &self.databases {
            if !seen.insert(&d.name) {
                return bad(format!("databases: '{}' is declared twice", d.name));
            }
            if d.name == crate::admin::ADMIN_DB {
                return bad(format!(
                    "databases: '{}' is reserved for the admin console",
                    d.name
                ));
            }
            if d.pool_size == Some(0) {
                return bad(format!("databases.{}.pool_size must be at least 1", d.name));
            }
            self.check_tenant_database(d)?;
        }
        if g.router_id.is_empty() || !g.router_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return bad(format!(
                "general.router_id '{}' must be letters and digits only",
                g.router_id
            ));
        }
        if let Some(u) = &self.replicas.check_user {
            if self.user(u).is_none() {
                return bad(format!(
                    "replicas.check_user: '{u}' is not declared in [[users]]"
                ));
            }
        }
        if self.replicas.check_interval.is_zero() || self.replicas.check_timeout.is_zero() {
            return bad(
                "replicas.check_interval and replicas.check_timeout must be above 0".into(),
            );
        }
        if self
            .sharding
            .shards
            .is_some_and(|n| n == 0 || n > self.shards.len())
        {
            return bad(format!(
                "sharding.shards must be between 1 and the {} shards listed",
                self.shards.len()
            ));
        }
        crate::shardmap::ShardMap::build(&self.sharding, self.map_shards(), 0)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The user entry named `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The database entry named `name`.
    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// The entry a client's database name selects, and the tenant it names: an exact name
    /// first, else the entry whose `tenant_prefix` starts it (the longest, if several).
    pub fn resolve_database<'a>(&self, name: &'a str) -> Option<(&Database, Option<&'a str>)> {
        if let Some(d) = self.database(name) {
            return Some((d, None));
        }
        self.databases
            .iter()
            .filter_map(|d| {
                let tenant = name.strip_prefix(d.tenant_prefix.as_deref()?)?;
                (!tenant.is_empty()).then_some((d, Some(tenant)))
            })
            .max_by_key(|(d, _)| d.tenant_prefix.as_ref().map_or(0, String::len))
    }

    /// The distribution a tenant database's tenants belong to.
    pub fn tenant_distribution<'a>(&'a self, d: &'a Database) -> Option<&'a str> {
        d.tenant_prefix.as_ref()?;
        if let Some(n) = &d.tenant_distribution {
            return Some(n);
        }
        let mut tenants = self
            .sharding
            .distributions
            .iter()
            .filter(|x| x.strategy == crate::shardmap::config::StrategyName::Tenant);
        let one = tenants.next()?;
        tenants.next().is_none().then_some(one.name.as_str())
    }

    fn check_tenant_database(&self, d: &Database) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let Some(prefix) = &d.tenant_prefix else {
            if d.tenant_distribution.is_some() {
                return bad(format!(
                    "databases.{}.tenant_distribution needs tenant_prefix",
                    d.name
                ));
            }
            return Ok(());
        };
        if prefix.is_empty() || !d.sharded {
            return bad(format!(
                "databases.{}.tenant_prefix must be non-empty and the database sharded = true",
                d.name
            ));
        }
        let Some(dist) = self.tenant_distribution(d) else {
            return bad(format!(
                "databases.{}: name the tenant_distribution (there is not exactly one tenant-strategy distribution)",
                d.name
            ));
        };
        match self.sharding.distributions.iter().find(|x| x.name == dist) {
            None => bad(format!(
                "databases.{}.tenant_distribution: no distribution is named '{dist}'",
                d.name
            )),
            Some(x) if x.strategy == crate::shardmap::config::StrategyName::Geo => bad(format!(
                "databases.{}.tenant_distribution: '{dist}' is a geo distribution; a tenant lives on one shard",
                d.name
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Splits `host:port` (IPv6 as `[addr]:port`).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[general]\n[[shards]]\nprimary = \"127.0.0.1:5432\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.general.pool_mode, PoolMode::Transaction);
        assert_eq!(c.general.default_pool_size, 20);
        assert_eq!(c.general.query_wait_timeout, Duration::from_secs(120));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MIN}\n[general2]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("general2"), "{err}");
        let err = Config::parse("[general]\npool_size = 3\n[[shards]]\nprimary=\"a:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool_size"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            Config::parse("[general]\npool_mode = \"statement\"\n[[shards]]\nprimary=\"a:1\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("statement"), "{err}");
        let err = Config::parse(
            "[general]\nquery_wait_timeout = \"soon\"\n[[shards]]\nprimary=\"a:1\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("query_wait_timeout"), "{err}");
        let err = Config::parse("[general]\n[[shards]]\nprimary=\"nohost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nohost"), "{err}");
        let err = Config::parse("[general]\nadmin_users=[\"x\"]\n[[shards]]\nprimary=\"a:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin_users"), "{err}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let c = Config::parse(include_str!("../config/pgshard.toml")).unwrap();
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.general.admin_users, vec!["admin".to_string()]);
    }

    #[test]
    fn tenant_databases_resolve_by_prefix() {
        let sharding = "[[sharding.distributions]]\nname = \"t\"\nstrategy = \"tenant\"\nkey_type = \"text\"\n";
        let base = format!("{MIN}{sharding}[[databases]]\nname = \"app\"\nsharded = true\ntenant_prefix = \"app_\"\n[[databases]]\nname = \"app_admin\"\n");
        let c = Config::parse(&base).unwrap();
        let (d, t) = c.resolve_database("app_acme").unwrap();
        assert_eq!((d.name.as_str(), t), ("app", Some("acme")));
        // An exact name wins over a prefix; the prefix alone names no tenant.
        let (d, t) = c.resolve_database("app_admin").unwrap();
        assert_eq!((d.name.as_str(), t), ("app_admin", None));
        assert!(c.resolve_database("app_").is_none());
        assert!(c.resolve_database("other").is_none());
        assert_eq!(c.tenant_distribution(c.database("app").unwrap()), Some("t"));

        let unsharded = base.replace("sharded = true\n", "");
        let err = Config::parse(&unsharded).unwrap_err().to_string();
        assert!(err.contains("tenant_prefix"), "{err}");
        let geo = format!("{MIN}[[sharding.distributions]]\nname = \"g\"\nstrategy = \"geo\"\nkey_type = \"text\"\nregions = {{ eu = [0] }}\ndefault_region = \"eu\"\n[[databases]]\nname = \"app\"\nsharded = true\ntenant_prefix = \"app_\"\ntenant_distribution = \"g\"\n");
        let err = Config::parse(&geo).unwrap_err().to_string();
        assert!(err.contains("geo"), "{err}");
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("127.0.0.1:5432"),
            Some(("127.0.0.1".into(), 5432))
        );
        assert_eq!(split_host_port("[::1]:5"), Some(("::1".into(), 5)));
        assert_eq!(split_host_port(":5"), None);
        assert_eq!(split_host_port("h:x"), None);
    }
}
