//! Local PostgreSQL topologies for `pgshard demo` and the integration tests: shard primaries
//! on loopback ports, each with streaming replicas made by `pg_basebackup -R`.
//!
//! PostgreSQL refuses to run as root, so when we are root every server command runs as the
//! `postgres` OS user and the data directories belong to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Why a topology could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("PostgreSQL server binaries not found (looked in {0}); install them, e.g. apt-get install -y postgresql")]
    NoBinaries(String),
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// A server's role in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub shards: usize,
    pub replicas_per_shard: usize,
    pub base_dir: PathBuf,
    /// None: free loopback ports are picked.
    pub first_port: Option<u16>,
    /// (name, password) login roles created on every primary (superusers, for tests and demos).
    pub users: Vec<(String, String)>,
    /// Databases created on every primary, owned by the first user.
    pub databases: Vec<String>,
    /// pg_hba method for TCP connections: scram-sha-256, md5, password or trust.
    pub host_auth: String,
    /// Extra pg_hba lines, placed before the default ones (e.g. per-user methods).
    pub extra_hba: Vec<String>,
    /// Extra postgresql.conf lines.
    pub extra_conf: Vec<String>,
}

impl ClusterSpec {
    /// Defaults: SCRAM over TCP, no users or databases beyond `postgres`.
    pub fn new(shards: usize, replicas_per_shard: usize, base_dir: PathBuf) -> Self {
        ClusterSpec {
            shards,
            replicas_per_shard,
            base_dir,
            first_port: None,
            users: Vec::new(),
            databases: Vec::new(),
            host_auth: "scram-sha-256".into(),
            extra_hba: Vec::new(),
            extra_conf: Vec::new(),
        }
    }
}

/// One running server.
#[derive(Debug, Clone)]
pub struct Server {
    pub shard: usize,
    pub role: Role,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

/// A set of running servers; stopped on `stop` or drop.
pub struct LocalCluster {
    pub servers: Vec<Server>,
    pub spec: ClusterSpec,
    socket_dir: PathBuf,
    stopped: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL program, as the postgres user when we are root.
fn pg_command(bin: &str) -> Command {
    let path = LocalCluster::bin_dir().join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<Output, TopologyError> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(TopologyError::Command {
            cmd: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        });
    }
    Ok(out)
}

fn chown_postgres(path: &Path) -> Result<(), TopologyError> {
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(path);
                c
            },
            "chown",
        )?;
    }
    Ok(())
}

/// Runs `f` on every item at once (one thread each) and returns the first failure.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), TopologyError> + Sync,
) -> Result<(), TopologyError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.iter().map(|item| scope.spawn(|| f(item))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TopologyError::Timeout("worker thread panicked".into()))
                })
            })
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
    })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, TopologyError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl LocalCluster {
    /// Directory of the PostgreSQL server binaries.
    pub fn bin_dir() -> PathBuf {
        if let Ok(d) = std::env::var("PG_BIN_DIR") {
            return PathBuf::from(d);
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").exists())
                    .collect()
            })
            .unwrap_or_default();
        versions.sort();
        versions
            .pop()
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
    }

    /// initdb, configure and start every server; replicas are streaming when this returns.
    pub fn start(spec: ClusterSpec) -> Result<LocalCluster, TopologyError> {
        let bin = Self::bin_dir();
        if !bin.join("initdb").exists() {
            return Err(TopologyError::NoBinaries(bin.display().to_string()));
        }
        let base = spec.base_dir.clone();
        stop_leftovers(&base);
        if base.exists() {
            std::fs::remove_dir_all(&base)?;
        }
        std::fs::create_dir_all(&base)?;
        // Unix socket paths are limited to ~107 bytes: keep the socket directory short.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket_dir = std::env::temp_dir().join(format!("pgs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&socket_dir)?;
        chown_postgres(&socket_dir)?;
        chown_postgres(&base)?;
        let mut next_port = spec.first_port;
        let mut port = || -> Result<u16, TopologyError> {
            match next_port.as_mut() {
                Some(p) => {
                    *p += 1;
                    Ok(*p - 1)
                }
                None => free_port(),
            }
        };
        let mut servers = Vec::new();
        for shard in 0..spec.shards {
            servers.push(Server {
                shard,
                role: Role::Primary,
                host: "127.0.0.1".into(),
                port: port()?,
                data_dir: base.join(format!("shard{shard}-primary")),
                log_file: base.join(format!("shard{shard}-primary.log")),
            });
            for r in 0..spec.replicas_per_shard {
                servers.push(Server {
                    shard,
                    role: Role::Replica,
                    host: "127.0.0.1".into(),
                    port: port()?,
                    data_dir: base.join(format!("shard{shard}-replica{r}")),
                    log_file: base.join(format!("shard{shard}-replica{r}.log")),
                });
            }
        }
        let mut cluster = LocalCluster {
            servers,
            spec,
            socket_dir,
            stopped: false,
        };
        cluster.start_primaries()?;
        cluster.start_replicas()?;
        Ok(cluster)
    }

    // wal_keep_size: the replicas stream without slots, so a burst of WAL and a checkpoint
    // could otherwise remove segments a replica has not received yet, leaving it stranded.
    fn conf(&self, s: &Server) -> String {
        let mut c = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             max_prepared_transactions = 64\nmax_connections = 200\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nshared_buffers = 32MB\n\
             hot_standby = on\nhot_standby_feedback = on\nwal_sender_timeout = 10s\n\
             wal_keep_size = 64MB\npassword_encryption = {}\n",
            s.port,
            self.socket_dir.display(),
            if self.spec.host_auth == "md5" {
                "md5"
            } else {
                "'scram-sha-256'"
            },
        );
        for l in &self.spec.extra_conf {
            c.push_str(l);
            c.push('\n');
        }
        c
    }

    fn hba(&self) -> String {
        let mut h = String::from("local all all trust\nlocal replication all trust\nhost replication postgres 127.0.0.1/32 trust\n");
        for l in &self.spec.extra_hba {
            h.push_str(l);
            h.push('\n');
        }
        h.push_str(&format!(
            "host all all 127.0.0.1/32 {m}\nhost replication all 127.0.0.1/32 {m}\n",
            m = self.spec.host_auth
        ));
        h
    }

    fn start_primaries(&mut self) -> Result<(), TopologyError> {
        let primaries: Vec<Server> = self
            .servers
            .iter()
            .filter(|s| s.role == Role::Primary)
            .cloned()
            .collect();
        // initdb is the slow part (~1 s each): run them in parallel.
        in_parallel(&primaries, |s| {
            let mut c = pg_command("initdb");
            c.arg("-D").arg(&s.data_dir).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]);
            run(c, "initdb").map(|_| ())
        })?;
        for s in &primaries {
            self.write_config(s)?;
            self.pg_ctl_start(s)?;
        }
        for s in &primaries {
            self.wait_ready(s)?;
            let mut sql = String::new();
            let first_pw = self
                .spec
                .users
                .first()
                .map(|u| u.1.clone())
                .unwrap_or_else(|| "postgres".into());
            sql.push_str(&format!(
                "ALTER ROLE postgres PASSWORD {};\n",
                quote(&first_pw)
            ));
            for (u, pw) in &self.spec.users {
                sql.push_str(&format!(
                    "CREATE ROLE \"{u}\" LOGIN SUPERUSER REPLICATION PASSWORD {};\n",
                    quote(pw)
                ));
            }
            self.psql(s, "postgres", &sql)?;
            let owner = self
                .spec
                .users
                .first()
                .map(|u| u.0.clone())
                .unwrap_or_else(|| "postgres".into());
            for db in &self.spec.databases {
                self.psql(
                    s,
                    "postgres",
                    &format!("CREATE DATABASE \"{db}\" OWNER \"{owner}\""),
                )?;
            }
        }
        Ok(())
    }

    fn write_config(&self, s: &Server) -> Result<(), TopologyError> {
        let conf = s.data_dir.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&self.conf(s));
        std::fs::write(&conf, text)?;
        std::fs::write(s.data_dir.join("pg_hba.conf"), self.hba())?;
        chown_postgres(&s.data_dir)?;
        Ok(())
    }

    fn pg_ctl_start(&self, s: &Server) -> Result<(), TopologyError> {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&s.data_dir)
            .arg("-l")
            .arg(&s.log_file)
            .args(["-w", "-t", "60", "start"]);
        run(c, &format!("pg_ctl start ({})", s.data_dir.display())).map(|_| ())
    }

    fn start_replicas(&mut self) -> Result<(), TopologyError> {
        let replicas: Vec<Server> = self
            .servers
            .iter()
            .filter(|s| s.role == Role::Replica)
            .cloned()
            .collect();
        in_parallel(&replicas, |r| self.basebackup(r))?;
        for r in &replicas {
            // The copied config names the primary's port: the replica's own lines come after it.
            self.write_config(r)?;
            self.pg_ctl_start(r)?;
        }
        for r in &replicas {
            self.wait_streaming(r)?;
        }
        Ok(())
    }

    /// Copies the primary of `r.shard` into `r.data_dir` as a streaming standby.
    fn basebackup(&self, r: &Server) -> Result<(), TopologyError> {
        let primary_port = self.primary(r.shard).port.to_string();
        let mut c = pg_command("pg_basebackup");
        c.arg("-D")
            .arg(&r.data_dir)
            .args(["-h", "127.0.0.1", "-p", &primary_port]);
        c.args([
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ]);
        run(c, "pg_basebackup").map(|_| ())
    }

    /// Starts one more streaming replica of `shard`, for a test that disturbs it (pauses its
    /// replay, …) without disturbing the cluster's own; it stops when the guard drops.
    pub fn extra_replica(&self, shard: usize, name: &str) -> Result<ExtraServer, TopologyError> {
        let r = Server {
            shard,
            role: Role::Replica,
            host: "127.0.0.1".into(),
            port: free_port()?,
            data_dir: self.spec.base_dir.join(format!("shard{shard}-{name}")),
            log_file: self.spec.base_dir.join(format!("shard{shard}-{name}.log")),
        };
        if r.data_dir.exists() {
            std::fs::remove_dir_all(&r.data_dir)?;
        }
        self.basebackup(&r)?;
        let guard = ExtraServer(r);
        self.write_config(&guard.0)?;
        self.pg_ctl_start(&guard.0)?;
        self.wait_streaming(&guard.0)?;
        Ok(guard)
    }

    fn wait_ready(&self, s: &Server) -> Result<(), TopologyError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.psql(s, "postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TopologyError::Timeout(format!(
            "server on port {} did not accept connections",
            s.port
        )))
    }

    /// Waits until a replica is in recovery and its primary reports it streaming.
    pub fn wait_streaming(&self, r: &Server) -> Result<(), TopologyError> {
        let primary = self.primary(r.shard).clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let streaming = self
                .psql(
                    &primary,
                    "postgres",
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .map(|o| o.trim().parse::<usize>().unwrap_or(0))
                .unwrap_or(0);
            let in_recovery = self
                .psql(r, "postgres", "SELECT pg_is_in_recovery()")
                .map(|o| o.trim() == "t")
                .unwrap_or(false);
            if in_recovery && streaming >= self.replicas(r.shard).len() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TopologyError::Timeout(format!(
            "replica on port {} is not streaming",
            r.port
        )))
    }

    /// The primary of `shard`.
    pub fn primary(&self, shard: usize) -> &Server {
        self.servers
            .iter()
            .find(|s| s.shard == shard && s.role == Role::Primary)
            .expect("shard exists")
    }

    /// The replicas of `shard`.
    pub fn replicas(&self, shard: usize) -> Vec<&Server> {
        self.servers
            .iter()
            .filter(|s| s.shard == shard && s.role == Role::Replica)
            .collect()
    }

    /// Runs SQL as the postgres superuser over the unix socket; returns unaligned output.
    pub fn psql(&self, s: &Server, db: &str, sql: &str) -> Result<String, TopologyError> {
        let mut c = pg_command("psql");
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-h",
        ])
        .arg(&self.socket_dir)
        .args(["-p", &s.port.to_string(), "-d", db, "-c", sql]);
        let out = run(c, &format!("psql on port {}", s.port))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Promotes a replica to primary.
    pub fn promote(&self, s: &Server) -> Result<(), TopologyError> {
        let mut c = pg_command("pg_ctl");
        c.arg("-D").arg(&s.data_dir).args(["-w", "promote"]);
        run(c, "pg_ctl promote").map(|_| ())
    }

    /// Stops one server immediately (failure tests).
    pub fn stop_server(&self, s: &Server) -> Result<(), TopologyError> {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&s.data_dir)
            .args(["-m", "immediate", "-w", "stop"]);
        run(c, "pg_ctl stop").map(|_| ())
    }

    /// Starts one stopped server again.
    pub fn start_server(&self, s: &Server) -> Result<(), TopologyError> {
        self.pg_ctl_start(s)?;
        self.wait_ready(s)
    }

    /// Stops every server; safe to call twice.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Replicas first, so primaries do not wait on walsenders.
        for s in self.servers.iter().rev() {
            let mut c = pg_command("pg_ctl");
            c.arg("-D")
                .arg(&s.data_dir)
                .args(["-m", "fast", "-w", "-t", "30", "stop"]);
            let _ = c.output();
        }
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server started apart from its cluster's own; stopped on drop.
pub struct ExtraServer(pub Server);

impl Drop for ExtraServer {
    fn drop(&mut self) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.0.data_dir)
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        let _ = c.output();
    }
}

/// Stops servers left running in `base` by a run that crashed.
fn stop_leftovers(base: &Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if dir.join("postmaster.pid").exists() {
            let mut c = pg_command("pg_ctl");
            c.arg("-D")
                .arg(&dir)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = c.output();
        }
    }
}
