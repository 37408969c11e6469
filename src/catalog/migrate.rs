//! Catalog schema migrations (`migrations/*.sql`), compiled in and applied in order.
//!
//! Each runs in one transaction holding an advisory lock, so routers and shardctl starting
//! together apply it once; `pgshard.migrations` records what was applied.

use super::CatalogError;
use tokio_postgres::Client;

/// (version, SQL) in order of application.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_catalog.sql")),
    (2, include_str!("../../migrations/0002_router_shards.sql")),
];

/// Lock key: any fixed number the catalog database does not use for something else.
const LOCK_KEY: i64 = 0x0070_6773_6861_7264; // "pgshard" in ASCII

/// Applies the missing migrations; returns the versions applied now.
pub async fn apply(client: &mut Client) -> Result<Vec<i32>, CatalogError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS pgshard;
         CREATE TABLE IF NOT EXISTS pgshard.migrations (
             version    int PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM pgshard.migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(newer) = done
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|(m, _)| m == *v))
    {
        return Err(CatalogError::Other(format!(
            "the catalog has schema migration {newer}, which this pgshard does not know: upgrade pgshard"
        )));
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO pgshard.migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}
