//! pgshard: a PostgreSQL sharding router and transaction-mode connection pooler.

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod health;
pub mod metrics;
pub mod params;
pub mod pghash;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod rebalance;
pub mod router;
pub mod scatter;
pub mod server;
pub mod shardmap;
pub mod sqlclass;
pub mod tls;
pub mod topology;
pub mod twophase;

/// Runs every decoder that sees untrusted bytes over `data`; the fuzz target and a unit test
/// call it, and it must never panic.
pub fn fuzz_decoders(data: &[u8]) {
    use protocol::{parse_parse, parse_startup, statement_ref, FrameBuf};
    let _ = parse_startup(&bytes::Bytes::copy_from_slice(data));
    let mut fb = FrameBuf::default();
    fb.buf.extend_from_slice(data);
    while let Ok(Some(f)) = fb.next_frame(1 << 16) {
        let body = f.body();
        let _ = protocol::messages::parse_error_fields(body);
        let _ = statement_ref(f.tag, body);
        if let Some((_, text, _)) = parse_parse(body) {
            if let Ok(t) = std::str::from_utf8(text) {
                let _ = sqlclass::classify(t);
            }
        }
        if let Some(Ok(t)) = protocol::Cursor::new(body).cstr().map(std::str::from_utf8) {
            let _ = sqlclass::classify(t);
            let _ = params::parse_options(t);
        }
    }
}
