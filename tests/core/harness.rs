//! Shared test topology: real PostgreSQL shards with replicas, and pgshard processes in front.

use pgshard::topology::{ClusterSpec, LocalCluster, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub type TestResult = Result<(), String>;

/// Turns any error into a test failure message.
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}
impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Test context for driver errors, with the server's message and SQLSTATE.
pub trait PgContext<T> {
    fn pgx(self, what: &str) -> Result<T, String>;
}
impl<T> PgContext<T> for Result<T, tokio_postgres::Error> {
    fn pgx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| match e.as_db_error() {
            Some(d) => format!("{what}: {} ({})", d.message(), d.code().code()),
            None => format!("{what}: {e:?}"),
        })
    }
}

/// Fails the test with a message unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !($cond) {
            return Err(format!($($arg)*));
        }
    };
}

/// A running pgshard process, killed on drop.
pub struct Router {
    pub port: u16,
    pub metrics_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub child: Child,
}

impl Router {
    /// Sends a signal (SIGHUP, SIGTERM, …).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits up to `d` for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The router's resident memory in kB.
    pub fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    }

    /// The router's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The topology every trial shares.
pub struct Harness {
    pub cluster: LocalCluster,
    pub router: Router,
    pub dir: PathBuf,
    pub password: String,
    next_router: AtomicUsize,
    /// The router of the sharding trials, started by the first that needs it.
    pub sharded_router: std::sync::OnceLock<Router>,
}

pub const APP_PW: &str = "app-secret";

fn free_port() -> u16 {
    pgshard::topology::free_port().expect("free port")
}

impl Harness {
    /// Starts 2 shards × 1 replica and the main router.
    pub fn start() -> Harness {
        let dir = std::env::temp_dir().join("pgshard-test-core");
        let mut spec = ClusterSpec::new(2, 1, dir.join("pg"));
        spec.users = vec![
            ("app".into(), APP_PW.into()),
            ("admin".into(), "admin-secret".into()),
        ];
        spec.databases = vec![
            "app".into(),
            "shop".into(),
            "bench".into(),
            "catalog".into(),
            "movecat".into(),
        ];
        // Per-user server authentication methods, to test pgshard's side of each.
        spec.extra_hba = vec![
            "host all md5user 127.0.0.1/32 md5".into(),
            "host all pwuser 127.0.0.1/32 password".into(),
            "host all trustuser 127.0.0.1/32 trust".into(),
        ];
        let t = Instant::now();
        let cluster = LocalCluster::start(spec).expect("start PostgreSQL topology");
        eprintln!("topology up in {:?}", t.elapsed());
        let p = cluster.primary(0);
        cluster
            .psql(
                p,
                "postgres",
                "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN SUPERUSER PASSWORD 'md5-pw';\
                 RESET password_encryption; CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'pw-pw';\
                 CREATE ROLE trustuser LOGIN SUPERUSER; CREATE ROLE sess LOGIN SUPERUSER PASSWORD 'sess-pw';\
                 CREATE ROLE verif LOGIN SUPERUSER PASSWORD 'verif-pw';\
                 CREATE ROLE md5ok LOGIN SUPERUSER PASSWORD 'app-secret';\
                 CREATE ROLE maint LOGIN SUPERUSER PASSWORD 'maint-pw';",
            )
            .expect("create roles");
        let router_dir = dir.join("routers");
        std::fs::create_dir_all(&router_dir).expect("router dir");
        let mut h = Harness {
            router: Router {
                port: 0,
                metrics_port: 0,
                config_path: PathBuf::new(),
                log_path: PathBuf::new(),
                child: Command::new("true").spawn().expect("spawn"),
            },
            cluster,
            dir: router_dir,
            password: APP_PW.into(),
            next_router: AtomicUsize::new(0),
            sharded_router: std::sync::OnceLock::new(),
        };
        h.router = h.spawn_router("", "").expect("start router");
        h
    }

    /// The config for a router over this topology; `general` and `more` are appended to the
    /// [general] section and after the users respectively.
    pub fn config(&self, port: u16, metrics_port: u16, general: &str, more: &str) -> String {
        let verifier = pgshard::auth::Secret::parse("verif-pw")
            .unwrap()
            .scram_verifier()
            .unwrap()
            .to_postgres_string();
        let defaults = [
            ("listen", format!("\"127.0.0.1:{port}\"")),
            ("metrics_listen", format!("\"127.0.0.1:{metrics_port}\"")),
            ("default_pool_size", "10".into()),
            ("query_wait_timeout", "\"30s\"".into()),
            ("admin_users", "[\"admin\"]".into()),
            ("shutdown_timeout", "\"10s\"".into()),
        ];
        let mut head = String::from("[general]\n");
        for (k, v) in defaults {
            // A key given by the caller replaces the default (TOML refuses duplicates).
            if !general.lines().any(|l| l.trim_start().starts_with(k)) {
                head.push_str(&format!("{k} = {v}\n"));
            }
        }
        let mut s = format!(
            "{head}{general}\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PW}\"\n\n\
             [[users]]\nname = \"admin\"\npassword = \"admin-secret\"\n\n\
             [[users]]\nname = \"sess\"\npassword = \"sess-pw\"\npool_mode = \"session\"\n\n\
             [[users]]\nname = \"md5user\"\npassword = \"md5-pw\"\n\n\
             [[users]]\nname = \"pwuser\"\npassword = \"pw-pw\"\n\n\
             [[users]]\nname = \"trustuser\"\npassword = \"trust-pw\"\n\n\
             [[users]]\nname = \"verif\"\npassword = \"{verifier}\"\nserver_password = \"verif-pw\"\n\n\
             {more}\n\
             [[databases]]\nname = \"app\"\n\n\
             [[databases]]\nname = \"tiny\"\nserver_database = \"app\"\npool_size = 1\n\n\
             [[databases]]\nname = \"small\"\nserver_database = \"app\"\npool_size = 3\n\n"
        );
        for shard in 0..2 {
            let p = self.cluster.primary(shard);
            let r = &self.cluster.replicas(shard)[0];
            s.push_str(&format!(
                "[[shards]]\nprimary = \"127.0.0.1:{}\"\nreplicas = [\"127.0.0.1:{}\"]\n\n",
                p.port, r.port
            ));
        }
        s
    }

    /// Starts another router with extra settings; it is killed when the handle drops.
    pub fn spawn_router(&self, general: &str, more: &str) -> Result<Router, String> {
        self.spawn_with(|port, metrics_port| self.config(port, metrics_port, general, more))
    }

    /// Starts a router whose whole config `config(port, metrics_port)` writes.
    pub fn spawn_with(&self, config: impl FnOnce(u16, u16) -> String) -> Result<Router, String> {
        let n = self.next_router.fetch_add(1, Ordering::Relaxed);
        let port = free_port();
        let metrics_port = free_port();
        let config_path = self.dir.join(format!("router{n}.toml"));
        let log_path = self.dir.join(format!("router{n}.log"));
        std::fs::write(&config_path, config(port, metrics_port)).ctx("write config")?;
        let log = std::fs::File::create(&log_path).ctx("log file")?;
        let child = Command::new(env!("CARGO_BIN_EXE_pgshard"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().ctx("log")?)
            .stderr(log)
            .spawn()
            .ctx("spawn pgshard")?;
        let mut router = Router {
            port,
            metrics_port,
            config_path,
            log_path,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || router.wait_exit(Duration::from_millis(20)) {
                return Err(format!("router did not start: {}", router.log()));
            }
        }
        Ok(router)
    }

    /// A server of the topology.
    pub fn primary(&self, shard: usize) -> &Server {
        self.cluster.primary(shard)
    }

    /// Runs a PostgreSQL client program (psql, pgbench) against `port`.
    pub fn client_program(
        &self,
        prog: &str,
        port: u16,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> Output {
        Command::new(LocalClusterBin::path(prog))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
            .args(args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run client program")
    }

    /// psql against the main router as app: (success, stdout, stderr).
    pub fn psql(&self, db: &str, sql: &str) -> (bool, String, String) {
        let o = self.client_program(
            "psql",
            self.router.port,
            "app",
            APP_PW,
            &["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql],
        );
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// SQL straight on shard 0's primary (bypassing pgshard), as the superuser.
    pub fn direct(&self, sql: &str) -> Result<String, String> {
        self.cluster
            .psql(self.primary(0), "app", sql)
            .ctx("direct psql")
    }

    /// A tokio-postgres client through the main router.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, String> {
        connect_port(self.router.port, user, password, db, "").await
    }
}

/// Connects with tokio-postgres; the connection task is spawned on the current runtime.
pub async fn connect_port(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, String> {
    let conn = format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db} connect_timeout=10 {extra}");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect: {} {e}", sqlstate(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The first column of the first row of a simple query ("" when it returns no rows).
pub async fn first_value(c: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let rows = c.simple_query(sql).await.pgx(sql)?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default())
}

/// The lines a `COPY … TO STDOUT` sent (extended protocol, as tokio-postgres sends it).
pub async fn copy_out_lines(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    use futures_util::StreamExt;
    let stream = c.copy_out(sql).await.pgx(sql)?;
    futures_util::pin_mut!(stream);
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk.pgx(sql)?);
    }
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Sends `data` with `COPY … FROM STDIN` (extended protocol, as tokio-postgres sends it);
/// the rows the server reported, or its error (its SQLSTATE intact).
pub async fn copy_in(
    c: &tokio_postgres::Client,
    sql: &str,
    data: bytes::Bytes,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = c.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await
}

/// Runs an async trial body on its own runtime.
pub fn block_on<F: std::future::Future<Output = TestResult>>(f: F) -> TestResult {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Where the PostgreSQL client programs are.
pub struct LocalClusterBin;
impl LocalClusterBin {
    pub fn path(prog: &str) -> PathBuf {
        LocalCluster::bin_dir().join(prog)
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// A raw protocol client for bad-input tests (trust auth routers only).
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    pub fn send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok()
    }

    /// A typed message.
    pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    pub fn startup(user: &str, db: &str) -> Vec<u8> {
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in [("user", user), ("database", db)] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        v.extend(body);
        v
    }

    /// Reads messages until one with `tag` arrives (returned with its body) or the peer closes.
    pub fn read_until(&mut self, tag: u8) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let mut seen = Vec::new();
        loop {
            let mut head = [0u8; 5];
            if let Err(e) = self.s.read_exact(&mut head) {
                return Err(format!(
                    "closed before '{}' after {:?}: {e}",
                    tag as char,
                    seen.iter()
                        .map(|m: &(u8, Vec<u8>)| m.0 as char)
                        .collect::<String>()
                ));
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            self.s.read_exact(&mut body).ctx("read body")?;
            let t = head[0];
            seen.push((t, body));
            if t == tag {
                return Ok(seen);
            }
        }
    }

    /// True if the peer closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Extracts the SQLSTATE from an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let t = body[i];
        let end = body[i + 1..]
            .iter()
            .position(|&b| b == 0)
            .map(|p| i + 1 + p)
            .unwrap_or(body.len());
        if t == b'C' {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

/// A Python virtualenv with the test drivers, made once under target/.
pub fn python_venv() -> Result<PathBuf, String> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import psycopg, asyncpg"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if py.exists() && ok(&py) {
        return Ok(py);
    }
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .ctx("python3 -m venv")?;
    if !out.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "psycopg[binary]>=3.1", "asyncpg>=0.29"])
        .output()
        .ctx("pip install")?;
    if !out.status.success() || !ok(&py) {
        return Err(format!(
            "pip install psycopg asyncpg failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(py)
}
