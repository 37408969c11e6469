//! The pgshard router binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgshard::app::App;
use pgshard::config::Config;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "pgshard",
    version,
    about = "PostgreSQL sharding router and connection pooler"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, default_value = "config/pgshard.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start local PostgreSQL shards (with replicas) and run pgshard in front of them.
    Demo(pgshard::demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Some(Command::Demo(args)) = cli.command {
        return pgshard::demo::run(args);
    }
    let config =
        Config::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(config, Some(cli.config)))
}

/// Runs the router until shutdown.
async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let app = pgshard::server::start(config, path).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = app.reload_from_file() {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration");
                }
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining clients");
                app.shutdown.send_replace(true);
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: fast shutdown");
                return Ok(());
            }
            _ = shutdown.changed() => break,
        }
    }
    drain(&app).await;
    Ok(())
}

/// Waits for clients to finish their transactions and leave, up to shutdown_timeout.
async fn drain(app: &App) {
    let deadline = tokio::time::Instant::now() + app.config.load().general.shutdown_timeout;
    while app.clients.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(remaining = app.clients.count(), "shut down");
}
