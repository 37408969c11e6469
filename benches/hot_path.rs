//! Micro-benchmarks of the per-message work on the data path:
//!   cargo bench --bench hot_path
use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgshard::prepared::{ServerStatements, StatementDef};
use pgshard::protocol::{messages, FrameBuf};

/// A server's answer to one pgbench -S query: RowDescription, DataRow, CommandComplete, RFQ.
fn select_response() -> Vec<u8> {
    let mut out = BytesMut::new();
    messages::row_description(&mut out, &["abalance"]);
    messages::data_row(&mut out, &[Some("0")]);
    messages::command_complete(&mut out, "SELECT 1");
    messages::ready_for_query(&mut out, b'I');
    out.to_vec()
}

fn framing(c: &mut Criterion) {
    let one = select_response();
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(4000));
    g.bench_function("peek_consume_4000_messages", |b| {
        b.iter(|| {
            let mut fb = FrameBuf::default();
            fb.buf.extend_from_slice(&many);
            let mut n = 0;
            while let Ok(Some((tag, len))) = fb.peek(1 << 20) {
                n += tag as usize;
                fb.consume(len);
            }
            black_box(n)
        })
    });
    g.bench_function("next_frame_4000_messages", |b| {
        b.iter(|| {
            let mut fb = FrameBuf::default();
            fb.buf.extend_from_slice(&many);
            let mut n = 0;
            while let Ok(Some(f)) = fb.next_frame(1 << 20) {
                n += f.raw.len();
            }
            black_box(n)
        })
    });
    g.finish();
}

fn per_query(c: &mut Criterion) {
    let q = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
    c.bench_function("classify_pgbench_select", |b| {
        b.iter(|| pgshard::sqlclass::classify(black_box(q)))
    });
    c.bench_function("classify_set", |b| {
        b.iter(|| pgshard::sqlclass::classify(black_box("SET search_path = a, b")))
    });
    c.bench_function("statement_def_hash", |b| {
        b.iter(|| {
            StatementDef::new(
                bytes::Bytes::from_static(q.as_bytes()),
                bytes::Bytes::from_static(b"\0\0"),
            )
        })
    });
    let mut lru = ServerStatements::new(500);
    for k in 0..500u128 {
        lru.insert(k);
    }
    c.bench_function("server_statements_touch", |b| {
        b.iter(|| lru.touch(black_box(250)))
    });
    routing(c);
    c.bench_function("encode_error_response", |b| {
        let mut out = BytesMut::with_capacity(256);
        b.iter(|| {
            out.clear();
            messages::error_response(
                &mut out,
                messages::Severity::Error,
                "53300",
                "no server connection",
                None,
            );
            black_box(out.len())
        })
    });
}

criterion_group!(benches, framing, per_query);
criterion_main!(benches);

/// Statement routing: a plan-cache miss (sqlparser analysis) against a hit, and route().
fn routing(c: &mut Criterion) {
    let cfg: pgshard::shardmap::config::ShardingConfig = toml::from_str(
        "[[distributions]]\nname='ids'\nstrategy='hash'\nkey_type='int8'\n[[tables]]\nname='pgbench_accounts'\ndistribution='ids'\ncolumn='aid'\n",
    )
    .expect("sharding config");
    let map = pgshard::shardmap::ShardMap::build(&cfg, 2, 1).expect("map");
    let q = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let u = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
    c.bench_function("route_analyze_miss_select", |b| {
        b.iter(|| pgshard::router::analyze(black_box(q), &map))
    });
    c.bench_function("route_analyze_miss_update", |b| {
        b.iter(|| pgshard::router::analyze(black_box(u), &map))
    });
    let cache = pgshard::router::PlanCache::new(1000);
    cache.plan(q, &map);
    c.bench_function("route_plan_cache_hit", |b| {
        b.iter(|| cache.plan(black_box(q), &map))
    });
    let plan = cache.plan(q, &map);
    let v: [Option<&[u8]>; 1] = [Some(b"48213")];
    let params = pgshard::router::Params {
        values: &v,
        formats: &[],
    };
    c.bench_function("route_with_bind_param", |b| {
        b.iter(|| pgshard::router::route(black_box(&plan), &map, &params))
    });
}
