//! pgshard: a PostgreSQL sharding router and transaction-mode connection pooler.

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod metrics;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod server;
pub mod sqlclass;
pub mod tls;
pub mod topology;
