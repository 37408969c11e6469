use super::*;
use crate::pghash::KeyValue;
use crate::shardmap::config::ShardingConfig;
use crate::shardmap::{Located, ShardMap};

pub(super) const MAP: &str = r#"
keyless_writes = true

[[distributions]]
name = "acct"
strategy = "hash"
key_type = "bigint"

[[distributions]]
name = "tenant"
strategy = "tenant"
key_type = "text"
tenants = { "acme" = 3 }

[[distributions]]
name = "events"
strategy = "range"
key_type = "int8"
ranges = [{ lo = 0, hi = 1000, shard = 0 }, { lo = 1000, hi = 5000, shard = 1 }]

[[distributions]]
name = "geo"
strategy = "geo"
key_type = "text"
regions = { eu = [0], us = [1, 2] }

[[tables]]
name = "pgbench_accounts"
distribution = "acct"
column = "aid"

[[tables]]
name = "pgbench_history"
distribution = "acct"
column = "aid"

[[tables]]
name = "pgbench_tellers"
distribution = "acct"
column = "tid"

[[tables]]
name = "pgbench_branches"
distribution = "acct"
column = "bid"

[[tables]]
name = "public.orders"
distribution = "tenant"
column = "tenant_id"

[[tables]]
name = "invoices"
distribution = "tenant"
column = "tenant_id"

[[tables]]
name = "events"
distribution = "events"
column = "id"

[[tables]]
name = "users"
distribution = "geo"
column = "region"
hash_column = "id"

[[tables]]
name = "countries"
reference = true
"#;

/// The test map (4 shards) with extra top-level settings.
pub(super) fn map_with(extra: &str, version: u64) -> ShardMap {
    let cfg: ShardingConfig = toml::from_str(&format!("{extra}\n{MAP}")).expect("toml");
    ShardMap::build(&cfg, 4, version).expect("map")
}

/// The test map with its defaults.
pub(super) fn map() -> ShardMap {
    map_with("", 1)
}

fn lit(s: &str) -> KeyExpr {
    KeyExpr::Literal(s.into())
}

fn keys(p: &Plan) -> (usize, Vec<KeyExpr>) {
    match &p.route {
        Route::Keys { dist, keys, .. } => (*dist, keys.clone()),
        other => panic!("expected Keys, got {other:?} for {p:?}"),
    }
}

/// The refusal's SQLSTATE and message.
fn refused(p: &Plan) -> (&'static str, String) {
    match &p.route {
        Route::Refuse { sqlstate, message } => (sqlstate, message.clone()),
        other => panic!("expected Refuse, got {other:?}"),
    }
}

fn shard_of(m: &ShardMap, dist: usize, k: i64) -> usize {
    match m.locate(dist, &KeyValue::Int(k), None).unwrap() {
        Located::One(s) => s,
        g => panic!("{g:?}"),
    }
}

#[test]
fn pgbench_statements_route_by_key() {
    let m = map();
    let p = analyze(
        "UPDATE pgbench_accounts SET abalance = abalance + -123 WHERE aid = 4567;",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Write, (0, vec![lit("4567")]))
    );
    assert_eq!(p.tables, vec!["pgbench_accounts"]);
    let p = analyze("SELECT abalance FROM pgbench_accounts WHERE aid = $1", &m);
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Read, (0, vec![KeyExpr::Param(1)]))
    );
    let p = analyze(
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
        &m,
    );
    assert_eq!(keys(&p), (0, vec![KeyExpr::Param(2)]));
    let p = analyze(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Write, (0, vec![KeyExpr::Param(3)]))
    );
    assert!(p.insert.is_none());
    let p = analyze("insert into pgbench_branches(bid,bbalance) values(1,0)", &m);
    assert_eq!(keys(&p), (0, vec![lit("1")]));
    let p = analyze("select count(*) from pgbench_branches", &m);
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (Kind::Read, Route::AllShards)
    );
    let agg = p.merge.aggregate.as_ref().expect("aggregate");
    assert_eq!(
        agg.aggregates,
        vec![crate::scatter::spec::Aggregate {
            column: 0,
            kind: crate::scatter::spec::AggKind::Count
        }]
    );
    assert!(agg.group_by.is_empty());
}

#[test]
fn pgbench_setup_statements() {
    let m = map();
    let p = analyze(
        "drop table if exists pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (
            Kind::Ddl {
                transactional: true
            },
            Route::AllShards
        )
    );
    assert_eq!(p.tables.len(), 4);
    let p = analyze("create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22))", &m);
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (
            Kind::Ddl {
                transactional: true
            },
            Route::AllShards
        )
    );
    let p = analyze(
        "truncate table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (Kind::Write, Route::AllShards)
    );
    let p = analyze("alter table pgbench_branches add primary key (bid)", &m);
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (
            Kind::Ddl {
                transactional: true
            },
            Route::AllShards
        )
    );
    let p = analyze("vacuum analyze pgbench_branches", &m);
    assert_eq!(
        (p.kind.clone(), p.route.clone()),
        (Kind::Utility, Route::AllShards)
    );
    let p = analyze(
        "create index concurrently i on pgbench_accounts (abalance)",
        &m,
    );
    assert_eq!(
        p.kind,
        Kind::Ddl {
            transactional: false
        }
    );
    let p = analyze("copy pgbench_accounts from stdin with (freeze on)", &m);
    let Kind::Copy(c) = &p.kind else {
        panic!("{p:?}")
    };
    assert_eq!(
        (
            c.table.as_str(),
            c.from_stdin,
            c.format,
            c.delimiter,
            c.null.as_str()
        ),
        ("pgbench_accounts", true, CopyFormat::Text, b'\t', "\\N")
    );
    assert_eq!((c.key_column, c.query), (None, false));
    assert_eq!(p.route, Route::AllShards);
    let p = analyze(
        "select o.n, p.partstrat, pg_catalog.count(i.inhparent) from pg_catalog.pg_class as c join pg_catalog.pg_namespace as n on (n.oid = c.relnamespace) cross join lateral (select pg_catalog.array_to_string(pg_catalog.current_schemas(true), pg_catalog.chr(0))) as o(n) left join pg_catalog.pg_partitioned_table as p on (p.partrelid = c.oid) left join pg_catalog.pg_inherits as i on (c.oid = i.inhparent) where c.relname = 'pgbench_accounts' and o.n is not null group by 1, 2 order by 1 asc limit 1",
        &m,
    );
    assert_eq!((p.kind.clone(), p.route.clone()), (Kind::Read, Route::Any));
}

#[test]
fn copy_options_and_key_column() {
    let m = map();
    let p = analyze("COPY public.orders (id, tenant_id, total) FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER ';')", &m);
    let Kind::Copy(c) = &p.kind else { panic!() };
    assert_eq!(c.columns, vec!["id", "tenant_id", "total"]);
    assert_eq!(
        (
            c.format,
            c.delimiter,
            c.header,
            c.null.as_str(),
            c.quote,
            c.escape
        ),
        (CopyFormat::Csv, b';', true, "", b'"', b'"')
    );
    assert_eq!(c.key_column, Some(1));
    assert_eq!(
        c.headerless_sql.as_deref(),
        Some("COPY public.orders (id, tenant_id, total) FROM STDIN (FORMAT csv, DELIMITER ';')")
    );
    let p = analyze("COPY invoices (tenant_id) FROM STDIN CSV HEADER", &m);
    let Kind::Copy(c) = &p.kind else { panic!() };
    assert!(c.header);
    assert_eq!(
        c.headerless_sql.as_deref(),
        Some("COPY invoices (tenant_id) FROM STDIN CSV")
    );
    let p = analyze(
        "COPY (SELECT * FROM pgbench_accounts WHERE aid = 3) TO STDOUT (FORMAT binary)",
        &m,
    );
    let Kind::Copy(c) = &p.kind else { panic!() };
    assert_eq!(
        (c.query, c.from_stdin, c.format),
        (true, false, CopyFormat::Binary)
    );
    assert_eq!(keys(&p), (0, vec![lit("3")]));
    let p = analyze("COPY pgbench_accounts FROM '/etc/passwd'", &m);
    assert!(refused(&p).1.contains("STDIN"));
}

#[test]
fn where_shapes_pin_keys() {
    let m = map();
    let k = |sql: &str| keys(&analyze(sql, &m)).1;
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE 42 = aid"),
        vec![lit("42")]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts a WHERE a.aid = '42'::bigint AND abalance > 0"),
        vec![lit("42")]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = $1::int8"),
        vec![KeyExpr::Param(1)]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid IN (1, 2, $3)"),
        vec![lit("1"), lit("2"), KeyExpr::Param(3)]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = ANY($2)"),
        vec![KeyExpr::ParamArray(2)]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = ANY('{5,6}')"),
        vec![lit("5"), lit("6")]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = 1 OR aid = 7"),
        vec![lit("1"), lit("7")]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = -5"),
        vec![lit("-5")]
    );
    assert_eq!(
        k("SELECT * FROM pgbench_accounts WHERE aid = NULL"),
        vec![KeyExpr::Null]
    );
    assert_eq!(
        k("SELECT * FROM orders WHERE tenant_id = 'acme'"),
        vec![lit("acme")]
    );
    // OR across different columns pins nothing.
    assert_eq!(
        analyze(
            "SELECT * FROM pgbench_accounts WHERE aid = 1 OR bid = 2",
            &m
        )
        .route,
        Route::AllShards
    );
}

#[test]
fn co_located_joins_and_refused_joins() {
    let m = map();
    let p = analyze(
        "SELECT * FROM pgbench_accounts a JOIN pgbench_history h ON a.aid = h.aid WHERE h.aid = 9",
        &m,
    );
    assert_eq!(keys(&p), (0, vec![lit("9")]));
    assert_eq!(p.tables, vec!["pgbench_accounts", "pgbench_history"]);
    let p = analyze(
        "SELECT * FROM pgbench_accounts a, pgbench_history h WHERE a.aid = h.aid AND a.aid = $1",
        &m,
    );
    assert_eq!(keys(&p), (0, vec![KeyExpr::Param(1)]));
    let p = analyze(
        "SELECT * FROM orders o JOIN invoices i USING (tenant_id) WHERE o.tenant_id = 'x'",
        &m,
    );
    assert_eq!(keys(&p), (1, vec![lit("x")]));
    // Joined on the key with no pin: every shard, merged.
    let p = analyze(
        "SELECT count(*) FROM pgbench_accounts a JOIN pgbench_history h ON a.aid = h.aid",
        &m,
    );
    assert_eq!(p.route, Route::AllShards);
    assert!(p.scatter_refusal.is_none());
    // With a reference table.
    let p = analyze(
        "SELECT * FROM orders o JOIN countries c ON c.code = o.country WHERE o.tenant_id = 'acme'",
        &m,
    );
    assert_eq!(keys(&p), (1, vec![lit("acme")]));
    let (state, msg) = refused(&analyze(
        "SELECT * FROM pgbench_accounts a JOIN pgbench_history h ON a.bid = h.bid",
        &m,
    ));
    assert_eq!(state, "0A000");
    assert!(
        msg.contains("join of pgbench_accounts and pgbench_history is not on their sharding key"),
        "{msg}"
    );
    assert!(msg.contains("a.aid = h.aid"), "{msg}");
    // A pin inside a subquery under an OR restricts nothing outside it.
    let p = analyze(
        "SELECT * FROM pgbench_accounts a WHERE a.bid = 1 OR EXISTS (SELECT 1 FROM pgbench_history h WHERE h.aid = a.aid AND h.aid = 5)",
        &m,
    );
    assert_eq!(p.route, Route::AllShards);
    let p = analyze("SELECT * FROM pgbench_accounts a WHERE a.bid = 1 OR EXISTS (SELECT 1 FROM countries c WHERE a.aid = 5)", &m);
    assert_eq!(p.route, Route::AllShards);
    // An unqualified name in a subquery may be a column of the subquery's own tables.
    let p = analyze("SELECT * FROM pgbench_accounts WHERE abalance > (SELECT max(x) FROM countries WHERE aid = 3)", &m);
    assert_eq!(p.route, Route::AllShards);
    // A pin of the outer query reaches a correlated subquery.
    let p = analyze("SELECT * FROM pgbench_accounts a WHERE a.aid = 5 AND EXISTS (SELECT 1 FROM pgbench_history h WHERE h.aid = a.aid)", &m);
    assert_eq!(keys(&p), (0, vec![lit("5")]));
    let (_, msg) = refused(&analyze(
        "SELECT * FROM orders o JOIN events e ON e.id = o.event_id WHERE o.tenant_id = 'a'",
        &m,
    ));
    assert!(msg.contains("orders") && msg.contains("events"), "{msg}");
}

#[test]
fn reference_unknown_and_catalog_tables() {
    let m = map();
    assert_eq!(
        analyze("SELECT * FROM countries", &m).route,
        Route::Reference { write: false }
    );
    assert_eq!(
        analyze("UPDATE countries SET name = 'x' WHERE code = 'fr'", &m).route,
        Route::Reference { write: true }
    );
    assert_eq!(
        analyze("INSERT INTO countries (code) VALUES ('fr'), ('de')", &m).route,
        Route::Reference { write: true }
    );
    assert!(
        analyze("INSERT INTO countries (code) VALUES ('fr'), ('de')", &m)
            .insert
            .is_none()
    );
    let (_, msg) = refused(&analyze(
        "UPDATE countries c SET n = a.abalance FROM pgbench_accounts a WHERE a.aid = 1",
        &m,
    ));
    assert!(
        msg.contains("reference table countries") && msg.contains("pgbench_accounts"),
        "{msg}"
    );
    let (state, msg) = refused(&analyze("SELECT * FROM mystery WHERE id = 1", &m));
    assert_eq!(state, "0A000");
    assert!(
        msg.contains("mystery") && msg.contains("unknown_tables = \"default_shard\""),
        "{msg}"
    );
    assert_eq!(
        analyze("SELECT * FROM pg_catalog.pg_class", &m).route,
        Route::Any
    );
    assert_eq!(
        analyze("SELECT relname FROM pg_class", &m).route,
        Route::Any
    );
    assert_eq!(
        analyze("SELECT * FROM information_schema.tables", &m).route,
        Route::Any
    );
    assert_eq!(analyze("SELECT 1", &m).route, Route::Any);
    // Set-returning functions in FROM are no tables.
    assert_eq!(
        analyze("SELECT * FROM generate_series(1, 3) AS g(n)", &m).route,
        Route::Any
    );
    assert_eq!(
        analyze(
            "SELECT count(*) FROM pgbench_accounts a, generate_series(1, 2) g WHERE a.aid = 7",
            &m
        )
        .route,
        Route::Keys {
            dist: 0,
            keys: vec![lit("7")],
            within: None
        }
    );
    let (_, msg) = refused(&analyze(
        "SELECT * FROM generate_series(1, (SELECT count(*) FROM mystery)) g",
        &m,
    ));
    assert!(msg.contains("mystery"), "{msg}");
    assert_eq!(analyze("SELECT now()", &m).kind, Kind::Read);
    // Functions a read-only replica would refuse make the SELECT a write (primary only).
    for sql in [
        "SELECT nextval('s')",
        "SELECT pg_advisory_lock(1)",
        "SELECT 1 WHERE pg_try_advisory_xact_lock(2)",
        "SELECT x FROM (SELECT setval('s', 3) AS x) t",
    ] {
        assert_eq!(analyze(sql, &m).kind, Kind::Write, "{sql}");
    }
    assert_eq!(
        analyze("SELECT currval('s'), lower('X')", &m).kind,
        Kind::Read
    );
    let d = map_with("unknown_tables = \"default_shard\"\ndefault_shard = 2", 1);
    let p = analyze("SELECT * FROM mystery WHERE id = 1", &d);
    assert_eq!(p.route, Route::DefaultShard);
    assert_eq!(route(&p, &d, &Params::NONE), Ok(Target::One(2)));
    assert_eq!(
        analyze("CREATE TABLE mystery (id int)", &d).route,
        Route::DefaultShard
    );
    let (_, msg) = refused(&analyze(
        "SELECT * FROM mystery m JOIN pgbench_accounts a ON a.aid = m.id",
        &d,
    ));
    assert!(
        msg.contains("mystery") && msg.contains("pgbench_accounts"),
        "{msg}"
    );
}

#[test]
fn inserts_need_their_key() {
    let m = map();
    let (s, msg) = refused(&analyze(
        "INSERT INTO pgbench_accounts VALUES (1, 2, 3)",
        &m,
    ));
    assert_eq!(s, "0A000");
    assert!(
        msg.contains("name the columns") && msg.contains("aid"),
        "{msg}"
    );
    let (_, msg) = refused(&analyze(
        "INSERT INTO pgbench_accounts (bid, abalance) VALUES (1, 2)",
        &m,
    ));
    assert!(
        msg.contains("INSERT into pgbench_accounts must set its sharding key column aid"),
        "{msg}"
    );
    let p = analyze("INSERT INTO pgbench_accounts (aid, bid) VALUES (5, 1) ON CONFLICT (aid) DO UPDATE SET bid = 2", &m);
    assert_eq!(keys(&p), (0, vec![lit("5")]));
    let p = analyze("INSERT INTO users (id, region) VALUES (17, 'us')", &m);
    assert_eq!(
        p.route,
        Route::Keys {
            dist: 3,
            keys: vec![lit("us")],
            within: Some(lit("17"))
        }
    );
    // INSERT ... SELECT on one shard is fine; across shards it is not.
    let p = analyze("INSERT INTO pgbench_history (aid, delta) SELECT aid, abalance FROM pgbench_accounts WHERE aid = 3", &m);
    assert_eq!(keys(&p), (0, vec![lit("3")]));
    assert!(p.scatter_refusal.is_some());
    assert_eq!(
        route(&p, &m, &Params::NONE),
        Ok(Target::One(shard_of(&m, 0, 3)))
    );
    let (_, msg) = refused(&analyze(
        "INSERT INTO pgbench_history (aid, delta) SELECT aid, abalance FROM pgbench_accounts",
        &m,
    ));
    assert!(msg.contains("INSERT ... SELECT"), "{msg}");
    // Rows from a function could land on any shard: refused, not guessed.
    let (s, msg) = refused(&analyze(
        "INSERT INTO pgbench_accounts (aid, bid) SELECT g, 1 FROM generate_series(1, 10) g",
        &m,
    ));
    assert_eq!(s, "0A000");
    assert!(msg.contains("INSERT ... SELECT"), "{msg}");
}

#[test]
fn updates_and_deletes() {
    let m = map();
    let (s, msg) = refused(&analyze(
        "UPDATE pgbench_accounts SET aid = 5 WHERE aid = 4",
        &m,
    ));
    assert_eq!(s, "0A000");
    assert!(
        msg.contains("UPDATE changes the sharding key aid of pgbench_accounts")
            && msg.contains("delete and re-insert")
    );
    let p = analyze("DELETE FROM pgbench_accounts WHERE aid IN (1, 2)", &m);
    assert_eq!(keys(&p), (0, vec![lit("1"), lit("2")]));
    assert_eq!(
        analyze("DELETE FROM pgbench_accounts WHERE abalance < 0", &m).route,
        Route::AllShards
    );
    let mut strict = map_with("", 1);
    strict.keyless_writes = false;
    let (_, msg) = refused(&analyze(
        "DELETE FROM pgbench_accounts WHERE abalance < 0",
        &strict,
    ));
    assert!(
        msg.contains("keyless_writes = false") && msg.contains("WHERE aid ="),
        "{msg}"
    );
    let p = analyze("UPDATE pgbench_accounts a SET abalance = 0 FROM countries c WHERE a.aid = 3 AND c.code = a.c", &m);
    assert_eq!(keys(&p), (0, vec![lit("3")]));
    let p = analyze(
        "SELECT * FROM pgbench_accounts WHERE aid = 1 FOR UPDATE",
        &m,
    );
    assert_eq!(p.kind, Kind::Write);
    let p = analyze(
        "SELECT * FROM pgbench_accounts WHERE aid = 1 FOR NO KEY UPDATE",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Write, (0, vec![lit("1")]))
    );
    let p = analyze(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM pgbench_accounts WHERE aid IN (SELECT n FROM r) AND aid = 2",
        &m,
    );
    assert_eq!(keys(&p), (0, vec![lit("2")]));
    let (_, msg) = refused(&analyze("INSERT INTO pgbench_history (aid, delta) VALUES (1, (SELECT max(bid) FROM pgbench_branches))", &m));
    assert!(msg.contains("pgbench_branches"), "{msg}");
    let p = analyze(
        "INSERT INTO pgbench_history (aid, delta) VALUES (1, (SELECT max(code) FROM countries))",
        &m,
    );
    assert_eq!(keys(&p), (0, vec![lit("1")]));
    let p = analyze(
        "WITH d AS (DELETE FROM pgbench_history WHERE aid = 4 RETURNING *) SELECT count(*) FROM d",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Write, (0, vec![lit("4")]))
    );
}

#[test]
fn transaction_and_session_statements() {
    let m = map();
    let k = |sql: &str| {
        let p = analyze(sql, &m);
        assert_eq!(p.route, Route::Any, "{sql}");
        p.kind
    };
    assert_eq!(k("BEGIN"), Kind::Begin { read_only: false });
    assert_eq!(
        k("START TRANSACTION READ ONLY"),
        Kind::Begin { read_only: true }
    );
    assert_eq!(
        k("BEGIN READ ONLY DEFERRABLE"),
        Kind::Begin { read_only: true }
    );
    assert_eq!(k("COMMIT"), Kind::Commit);
    assert_eq!(k("END"), Kind::Commit);
    assert_eq!(k("ROLLBACK"), Kind::Rollback);
    assert_eq!(k("ABORT"), Kind::Rollback);
    assert_eq!(k("SAVEPOINT a"), Kind::Savepoint);
    assert_eq!(k("RELEASE SAVEPOINT a"), Kind::Savepoint);
    assert_eq!(k("ROLLBACK TO SAVEPOINT a"), Kind::Savepoint);
    for s in [
        "SET search_path = x",
        "RESET ALL",
        "DISCARD ALL",
        "SHOW work_mem",
        "LISTEN ch",
        "DEALLOCATE ALL",
    ] {
        assert_eq!(k(s), Kind::Session, "{s}");
    }
    for s in [
        "PREPARE TRANSACTION 'x'",
        "COMMIT PREPARED 'x'",
        "ROLLBACK PREPARED 'x'",
    ] {
        let (state, msg) = refused(&analyze(s, &m));
        assert_eq!(
            (state, msg.as_str()),
            ("0A000", "pgshard manages two-phase commit itself"),
            "{s}"
        );
    }
    assert_eq!(analyze("CHECKPOINT", &m).kind, Kind::Utility);
    let p = analyze(
        "DECLARE c CURSOR FOR SELECT * FROM pgbench_accounts WHERE aid = 5",
        &m,
    );
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Read, (0, vec![lit("5")]))
    );
    let p = analyze("DECLARE c CURSOR FOR SELECT * FROM pgbench_accounts", &m);
    let e = route(&p, &m, &Params::NONE).unwrap_err();
    assert!(e.message.contains("cursor"), "{}", e.message);
    let (_, msg) = refused(&analyze("DO $$ BEGIN PERFORM 1; END $$", &m));
    assert!(
        msg.starts_with("pgshard cannot parse this statement to route it")
            && msg.contains("pgshard: shard=N"),
        "{msg}"
    );
    assert_eq!(
        analyze("CREATE PUBLICATION p FOR ALL TABLES", &m).kind,
        Kind::Ddl {
            transactional: true
        }
    );
    assert_eq!(
        analyze("CREATE DATABASE x", &m).kind,
        Kind::Ddl {
            transactional: false
        }
    );
}

#[test]
fn several_statements_in_one_text() {
    let m = map();
    let p = analyze(
        "BEGIN; UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 3; COMMIT;",
        &m,
    );
    assert_eq!(p.statements, 3);
    assert_eq!(
        (p.kind.clone(), keys(&p)),
        (Kind::Write, (0, vec![lit("3")]))
    );
    let p = analyze("SELECT 1; SELECT * FROM pgbench_accounts", &m);
    assert_eq!((p.statements, p.route.clone()), (2, Route::AllShards));
}

#[test]
fn hints_beat_analysis() {
    let m = map();
    let p = analyze("/* pgshard: shard=2 */ SELECT * FROM mystery", &m);
    assert_eq!(p.hint, Some(Hint::Shard(2)));
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::One(2)));
    let p = analyze("SELECT 1 /* pgshard: shard=9 */", &m);
    assert_eq!(route(&p, &m, &Params::NONE).unwrap_err().sqlstate, "22023");
    let p = analyze("SELECT * FROM orders WHERE x = 1 -- pgshard: key=acme", &m);
    assert_eq!(p.hint, Some(Hint::Key("acme".into())));
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::One(3)));
    // No distribution known from the statement and several in the map.
    let p = analyze("SELECT 1 /* pgshard: key=5 */", &m);
    assert_eq!(route(&p, &m, &Params::NONE).unwrap_err().sqlstate, "0A000");
    // A hint-looking string literal is not a hint.
    assert_eq!(analyze("SELECT 'pgshard: shard=1'", &m).hint, None);
}
