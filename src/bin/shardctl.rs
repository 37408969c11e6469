//! shardctl: operate a pgshard deployment through its admin console.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgshard::catalog::Catalog;
use pgshard::shardmap::{ShardMap, Strategy};
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[derive(Parser)]
#[command(name = "shardctl", version, about = "Operate pgshard through its admin console")]
struct Cli {
    /// Router host.
    #[arg(long, default_value = "127.0.0.1", env = "PGSHARD_HOST")]
    host: String,
    /// Router port.
    #[arg(long, default_value_t = 6432, env = "PGSHARD_PORT")]
    port: u16,
    /// Admin user (one of general.admin_users).
    #[arg(long, default_value = "admin", env = "PGSHARD_USER")]
    user: String,
    /// Admin password.
    #[arg(long, env = "PGSHARD_PASSWORD", default_value = "")]
    password: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Catalog connection string (the `[catalog] dsn` of the routers), for the shared map.
    #[arg(long, env = "PGSHARD_CATALOG")]
    catalog: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shards with their health, pools with their load and, with --catalog, the shared map:
    /// its version, the routers following it, and the units each shard holds.
    Status,
    /// The catalog's current shard map, as the TOML of a `[sharding]` section.
    Map,
    /// Re-read the router's config file.
    Reload,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Status => {
            let client = console(&cli).await?;
            for (title, sql) in [("shards", "SHOW SHARDS"), ("pools", "SHOW POOLS")] {
                let (cols, rows) = table(&client.simple_query(sql).await?);
                print_rows(title, &cols, &rows, cli.json);
            }
            if let Some(dsn) = &cli.catalog {
                catalog_status(dsn, cli.json).await?;
            }
        }
        Command::Reload => {
            console(&cli).await?.simple_query("RELOAD").await?;
            println!("reloaded");
        }
        Command::Map => {
            let dsn = cli.catalog.as_deref().context("shardctl map needs --catalog (or PGSHARD_CATALOG)")?;
            let (cat, _) = Catalog::connect(dsn).await.context("connecting to the catalog")?;
            let map = cat.latest_map().await?.context("the catalog holds no map yet: start a router with [catalog] to seed it")?;
            println!("# map version {} over {} shards: {}", map.version, map.shards, map.note);
            print!("{}", toml::to_string(&map.sharding)?);
        }
    }
    Ok(())
}

/// The admin console of the router named on the command line.
async fn console(cli: &Cli) -> anyhow::Result<tokio_postgres::Client> {
    let conn = format!(
        "host={} port={} user={} password='{}' dbname=pgshard",
        cli.host,
        cli.port,
        cli.user,
        cli.password.replace('\'', "\\'")
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls)
        .await
        .with_context(|| format!("connecting to the pgshard admin console at {}:{}", cli.host, cli.port))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn catalog_status(dsn: &str, json: bool) -> anyhow::Result<()> {
    let (cat, _) = Catalog::connect(dsn).await.context("connecting to the catalog")?;
    let Some(map) = cat.latest_map().await? else {
        println!("catalog: no map published yet");
        return Ok(());
    };
    let routers = cat.routers().await?;
    print_rows(
        "catalog",
        &["map_version".into(), "shards".into(), "note".into()],
        &[vec![map.version.to_string(), map.shards.to_string(), map.note.clone()]],
        json,
    );
    let rows: Vec<Vec<String>> = routers
        .iter()
        .map(|r| {
            let state = if r.lease_left < 0.0 { "expired" } else if r.acked_version == map.version { "current" } else { "behind" };
            vec![r.router_id.clone(), r.addr.clone(), r.acked_version.to_string(), format!("{:.1}", r.lease_left), state.into()]
        })
        .collect();
    let cols = ["router_id", "addr", "acked_version", "lease_left_s", "state"].map(String::from);
    print_rows("routers", &cols, &rows, json);
    let built = ShardMap::build(&map.sharding, map.shards, map.version)?;
    let cols = ["distribution", "strategy", "shard", "units"].map(String::from);
    print_rows("units", &cols, &units(&built), json);
    Ok(())
}

/// What each shard holds of each distribution: buckets, pinned tenants, ranges, regions.
fn units(map: &ShardMap) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for d in &map.distributions {
        for shard in 0..map.shards {
            let (strategy, what) = match &d.strategy {
                Strategy::Hash { bucket_shard } => ("hash", format!("{} buckets", bucket_shard.iter().filter(|&&s| s == shard).count())),
                Strategy::Tenant { directory, bucket_shard } => (
                    "tenant",
                    format!(
                        "{} buckets, {} pinned tenants",
                        bucket_shard.iter().filter(|&&s| s == shard).count(),
                        directory.values().filter(|&&s| s == shard).count()
                    ),
                ),
                Strategy::Range { ranges } => ("range", format!("{} ranges", ranges.iter().filter(|r| r.2 == shard).count())),
                Strategy::Geo { regions, .. } => {
                    ("geo", format!("{} regions", regions.values().filter(|g| g.contains(&shard)).count()))
                }
            };
            out.push(vec![d.name.clone(), strategy.into(), shard.to_string(), what]);
        }
    }
    out
}

/// Column names and text values of a simple query's rows.
fn table(msgs: &[SimpleQueryMessage]) -> (Vec<String>, Vec<Vec<String>>) {
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let cols = rows.first().map(|r| r.columns().iter().map(|c| c.name().to_string()).collect()).unwrap_or_default();
    let vals = rows.iter().map(|r| (0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect()).collect();
    (cols, vals)
}

fn print_rows(title: &str, cols: &[String], rows: &[Vec<String>], json: bool) {
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = cols.iter().zip(r).map(|(c, v)| format!("{c:?}:{v:?}")).collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        println!("{{\"{title}\":[{}]}}", items.join(","));
        return;
    }
    println!("{title}:");
    println!("  {}", cols.join(" | "));
    for r in rows {
        println!("  {}", r.join(" | "));
    }
}
