//! `pgshard demo`: a local topology (shard primaries with streaming replicas, started here)
//! and the router in front of it, for a first look without writing any config.

use crate::config::Config;
use crate::topology::{ClusterSpec, LocalCluster, Role};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Options of `pgshard demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of shard primaries.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Extra shard primaries listed in the config but not in the map yet, for trying
    /// `shardctl add-shard` and `rebalance` (the catalog lives on shard 0's primary).
    #[arg(long, default_value_t = 1)]
    pub spare_shards: usize,
    /// Streaming replicas per primary.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Where the router listens.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// First port for the PostgreSQL servers (the next ones follow).
    #[arg(long, default_value_t = 15432)]
    pub first_port: u16,
    /// Directory for data, logs and the generated config.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The demo's shard map: pgbench's tables hashed by their ids, and a tenant-keyed example.
const DEMO_SHARDING: &str = r#"[sharding]
unknown_tables = "refuse"

[[sharding.distributions]]
name = "by_id"
strategy = "hash"
key_type = "bigint"

[[sharding.distributions]]
name = "by_tenant"
strategy = "tenant"
key_type = "text"

[[sharding.tables]]
name = "pgbench_accounts"
distribution = "by_id"
column = "aid"

[[sharding.tables]]
name = "pgbench_tellers"
distribution = "by_id"
column = "tid"

[[sharding.tables]]
name = "pgbench_branches"
distribution = "by_id"
column = "bid"

[[sharding.tables]]
name = "pgbench_history"
distribution = "by_id"
column = "aid"

[[sharding.tables]]
name = "orders"
distribution = "by_tenant"
column = "tenant_id"

[[sharding.tables]]
name = "order_items"
distribution = "by_tenant"
column = "tenant_id"
"#;

/// The catalog database the demo keeps on shard 0's primary.
const CATALOG_DB: &str = "pgshard_catalog";

/// The catalog connection string of a demo cluster.
fn catalog_dsn(cluster: &LocalCluster) -> String {
    let p = cluster.primary(0);
    format!(
        "host={} port={} user=app password=app dbname={CATALOG_DB}",
        p.host, p.port
    )
}

/// The router config for a local cluster whose map uses its first `map_shards` shards.
pub fn config_for(
    cluster: &LocalCluster,
    listen: &str,
    metrics: &str,
    map_shards: usize,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[general]\nlisten = \"{listen}\"\npool_mode = \"transaction\"\ndefault_pool_size = 20\nadmin_users = [\"admin\"]\nmetrics_listen = \"{metrics}\"\n"
    );
    let _ = writeln!(s, "[[users]]\nname = \"app\"\npassword = \"app\"\n\n[[users]]\nname = \"admin\"\npassword = \"admin\"\n");
    let _ = writeln!(s, "[[databases]]\nname = \"app\"\nsharded = true\n");
    let _ = writeln!(s, "[catalog]\ndsn = \"{}\"\n", catalog_dsn(cluster));
    let _ = writeln!(
        s,
        "{}",
        DEMO_SHARDING.replacen(
            "[sharding]\n",
            &format!("[sharding]\nshards = {map_shards}\n"),
            1
        )
    );
    let shards = cluster
        .servers
        .iter()
        .filter(|s| matches!(s.role, Role::Primary))
        .count();
    for shard in 0..shards {
        let p = cluster.primary(shard);
        let replicas: Vec<String> = cluster
            .replicas(shard)
            .iter()
            .map(|r| format!("\"{}:{}\"", r.host, r.port))
            .collect();
        let _ = writeln!(
            s,
            "[[shards]]\nprimary = \"{}:{}\"\nreplicas = [{}]\n",
            p.host,
            p.port,
            replicas.join(", ")
        );
    }
    s
}

/// Starts the topology and the router; stops both on Ctrl-C or SIGTERM.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("pgshard-demo"));
    let mut spec = ClusterSpec::new(args.shards + args.spare_shards, args.replicas, dir.clone());
    spec.first_port = Some(args.first_port);
    spec.users = vec![
        ("app".into(), "app".into()),
        ("admin".into(), "admin".into()),
    ];
    spec.databases = vec!["app".into(), CATALOG_DB.into()];
    println!(
        "starting {} shard(s) with {} replica(s) each under {} ...",
        args.shards,
        args.replicas,
        dir.display()
    );
    let mut cluster = LocalCluster::start(spec)?;
    let metrics = "127.0.0.1:9930";
    let text = config_for(&cluster, &args.listen, metrics, args.shards);
    let config_path = dir.join("pgshard.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::parse(&text)?;
    println!("\nshards:");
    for s in &cluster.servers {
        println!(
            "  shard {} {:?}: {}:{}  (log: {})",
            s.shard,
            s.role,
            s.host,
            s.port,
            s.log_file.display()
        );
    }
    let (host, port) = args
        .listen
        .rsplit_once(':')
        .unwrap_or(("127.0.0.1", "6432"));
    println!("\nconfig: {}", config_path.display());
    println!("connect:  psql \"postgres://app:app@{host}:{port}/app\"");
    println!("admin:    psql \"postgres://admin:admin@{host}:{port}/pgshard\" -c 'SHOW POOLS'");
    println!("metrics:  curl http://{metrics}/metrics");
    let ctl = format!("shardctl --catalog \"{}\"", catalog_dsn(&cluster));
    println!("catalog:  {ctl} status --config {}", config_path.display());
    if args.spare_shards > 0 {
        println!(
            "spare:    shard {} is listed but not in the map: {ctl} add-shard --config {}",
            args.shards,
            config_path.display()
        );
    }
    println!("press Ctrl-C to stop pgshard and the PostgreSQL servers\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let app = crate::server::start(config, Some(config_path)).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut shutdown = app.shutdown.subscribe();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = shutdown.changed() => {}
        }
        anyhow::Ok(())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    println!("stopping PostgreSQL servers ...");
    cluster.stop();
    result
}
