//! shardctl: operate a pgshard deployment through its admin console.

use anyhow::Context;
use clap::{Parser, Subcommand};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shards with their health, and pools with their load.
    Status,
    /// Re-read the router's config file.
    Reload,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    match cli.command {
        Command::Status => {
            for (title, sql) in [("shards", "SHOW SHARDS"), ("pools", "SHOW POOLS")] {
                let rows = client.simple_query(sql).await?;
                print_rows(title, &rows, cli.json);
            }
        }
        Command::Reload => {
            client.simple_query("RELOAD").await?;
            println!("reloaded");
        }
    }
    Ok(())
}

fn print_rows(title: &str, msgs: &[SimpleQueryMessage], json: bool) {
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let cols: Vec<String> = match rows.first() {
        Some(r) => r.columns().iter().map(|c| c.name().to_string()).collect(),
        None => Vec::new(),
    };
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{:?}:{:?}", c, r.get(i).unwrap_or("")))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        println!("{{\"{title}\":[{}]}}", items.join(","));
        return;
    }
    println!("{title}:");
    println!("  {}", cols.join(" | "));
    for r in rows {
        let vals: Vec<&str> = (0..cols.len()).map(|i| r.get(i).unwrap_or("")).collect();
        println!("  {}", vals.join(" | "));
    }
}
