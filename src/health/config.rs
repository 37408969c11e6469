//! The `[replicas]` section of the config file: read routing, lag bounds and health checks.

use serde::Deserialize;
use std::time::Duration;

/// `[replicas]`: where reads go and how servers are watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Read-only statements outside transactions, and READ ONLY transactions, go to replicas
    /// (sharded databases; a database's own `replica_reads` wins).
    #[serde(default = "d_true")]
    pub reads: bool,
    /// After a client's write commits, its reads go only to replicas that have replayed it.
    #[serde(default = "d_true")]
    pub read_your_writes: bool,
    /// Replicas further behind their primary than this take no reads.
    #[serde(default = "d_max_lag", with = "humantime_serde")]
    pub max_lag: Duration,
    /// How often every server's role, health and WAL position are checked.
    #[serde(default = "d_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// A check that takes longer than this marks the server down.
    #[serde(default = "d_check_timeout", with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Login for the checks; default: the first user with a usable server password.
    #[serde(default)]
    pub check_user: Option<String>,
    /// Database for the checks; default: the first database's server-side name.
    #[serde(default)]
    pub check_database: Option<String>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            reads: true,
            read_your_writes: true,
            max_lag: d_max_lag(),
            check_interval: d_check_interval(),
            check_timeout: d_check_timeout(),
            check_user: None,
            check_database: None,
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_max_lag() -> Duration {
    Duration::from_secs(5)
}
fn d_check_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_check_timeout() -> Duration {
    Duration::from_secs(2)
}
