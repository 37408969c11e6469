//! Routing with parameters, merge specs of scattered SELECTs, INSERT splitting and the cache.

use super::tests::{map, map_with};
use super::*;
use crate::pghash::KeyValue;
use crate::scatter::spec::{AggKind, Aggregate, SortKey};
use crate::shardmap::{Located, ShardMap};

fn shard(m: &ShardMap, dist: usize, k: &KeyValue) -> usize {
    match m.locate(dist, k, None).unwrap() {
        Located::One(s) => s,
        g => panic!("{g:?}"),
    }
}

fn two_keys(m: &ShardMap) -> (i64, i64) {
    let s1 = shard(m, 0, &KeyValue::Int(1));
    (
        1,
        (2..1000)
            .find(|&k| shard(m, 0, &KeyValue::Int(k)) != s1)
            .unwrap(),
    )
}

fn text(values: &[Option<&'static [u8]>]) -> Vec<Option<&'static [u8]>> {
    values.to_vec()
}

#[test]
fn route_literal_text_and_binary_params() {
    let m = map();
    let s42 = shard(&m, 0, &KeyValue::Int(42));
    let p = analyze("SELECT * FROM pgbench_accounts WHERE aid = 42", &m);
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::One(s42)));
    let p = analyze("SELECT * FROM pgbench_accounts WHERE aid = $1", &m);
    let v = text(&[Some(b"42")]);
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[]
            }
        ),
        Ok(Target::One(s42))
    );
    let bin = 42i64.to_be_bytes();
    let v = [Some(&bin[..])];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[1]
            }
        ),
        Ok(Target::One(s42))
    );
    // Per-parameter format codes: $2 is the key, in binary.
    let p2 = analyze(
        "SELECT * FROM pgbench_accounts WHERE abalance = $1 AND aid = $2",
        &m,
    );
    let v = [Some(&b"7"[..]), Some(&bin[..])];
    assert_eq!(
        route(
            &p2,
            &m,
            &Params {
                values: &v,
                formats: &[0, 1]
            }
        ),
        Ok(Target::One(s42))
    );
    // NULL keys are an error, never a guess.
    let v = [None];
    let e = route(
        &p,
        &m,
        &Params {
            values: &v,
            formats: &[],
        },
    )
    .unwrap_err();
    assert_eq!(e.sqlstate, "22004");
    assert!(e.message.contains("NULL"), "{}", e.message);
    let e = route(
        &analyze("SELECT * FROM pgbench_accounts WHERE aid = NULL", &m),
        &m,
        &Params::NONE,
    )
    .unwrap_err();
    assert_eq!(e.sqlstate, "22004");
    let e = route(
        &analyze("SELECT * FROM pgbench_accounts WHERE aid = 'x'", &m),
        &m,
        &Params::NONE,
    )
    .unwrap_err();
    assert_eq!(e.sqlstate, "22P02");
    // Unbound parameter.
    assert_eq!(route(&p, &m, &Params::NONE).unwrap_err().sqlstate, "08P01");
    // Range strategy: a key outside every range.
    let e = route(
        &analyze("SELECT * FROM events WHERE id = 99999", &m),
        &m,
        &Params::NONE,
    )
    .unwrap_err();
    assert_eq!(e.sqlstate, "23514");
    assert_eq!(
        route(
            &analyze("SELECT * FROM events WHERE id = 1500", &m),
            &m,
            &Params::NONE
        ),
        Ok(Target::One(1))
    );
}

#[test]
fn route_in_lists_and_arrays() {
    let m = map();
    let (a, b) = two_keys(&m);
    let (sa, sb) = (
        shard(&m, 0, &KeyValue::Int(a)),
        shard(&m, 0, &KeyValue::Int(b)),
    );
    let mut both = vec![sa, sb];
    both.sort();
    let p = analyze(
        &format!("SELECT * FROM pgbench_accounts WHERE aid IN ({a}, {b}, {a})"),
        &m,
    );
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::Some(both.clone())));
    let p = analyze("SELECT * FROM pgbench_accounts WHERE aid = ANY($1)", &m);
    let arr = format!("{{{a}, {b}}}");
    let v = [Some(arr.as_bytes())];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[]
            }
        ),
        Ok(Target::Some(both.clone()))
    );
    // Binary int8[]: ndim 1, no nulls, elem oid 20, dim (2, lb 1), then len-prefixed values.
    let mut bin = Vec::new();
    for x in [1i32, 0, 20, 2, 1] {
        bin.extend(x.to_be_bytes());
    }
    for k in [a, b] {
        bin.extend(8i32.to_be_bytes());
        bin.extend(k.to_be_bytes());
    }
    let v = [Some(&bin[..])];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[1]
            }
        ),
        Ok(Target::Some(both))
    );
    let v = [Some(&b"{}"[..])];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[]
            }
        ),
        Ok(Target::One(0))
    );
    let v = [Some(&b"{1,NULL}"[..])];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[]
            }
        )
        .unwrap_err()
        .sqlstate,
        "22004"
    );
    let v = [Some(&b"{\"a b\",\"c\\\"d\"}"[..])];
    assert_eq!(
        route::parse_text_array(v[0].unwrap()).unwrap(),
        vec![Some(b"a b".to_vec()), Some(b"c\"d".to_vec())]
    );
}

#[test]
fn route_geo_and_tenant() {
    let m = map();
    let p = analyze("SELECT * FROM users WHERE region = 'eu'", &m);
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::One(0)));
    // A region with a group of shards, no hash column value: the whole group.
    let p = analyze("SELECT * FROM users WHERE region = 'us'", &m);
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::Some(vec![1, 2])));
    let p = analyze("SELECT * FROM users WHERE region = 'us' AND id = 17", &m);
    let one = route(&p, &m, &Params::NONE).unwrap();
    assert_eq!(
        one,
        Target::One(
            match m
                .locate(3, &KeyValue::Text(b"us"), Some(&KeyValue::Int(17)))
                .unwrap()
            {
                Located::One(s) => s,
                g => panic!("{g:?}"),
            }
        )
    );
    let p = analyze("SELECT * FROM orders WHERE tenant_id = $1", &m);
    let v = [Some(&b"acme"[..])];
    assert_eq!(
        route(
            &p,
            &m,
            &Params {
                values: &v,
                formats: &[]
            }
        ),
        Ok(Target::One(3))
    );
}

#[test]
fn scatter_select_merge_specs() {
    let m = map();
    let p = analyze(
        "SELECT aid, abalance FROM pgbench_accounts ORDER BY abalance DESC, 1 LIMIT 10 OFFSET 5",
        &m,
    );
    assert_eq!(p.route, Route::AllShards);
    assert_eq!(
        p.merge.order_by,
        vec![
            SortKey {
                column: 1,
                descending: true,
                nulls_first: true
            },
            SortKey {
                column: 0,
                descending: false,
                nulls_first: false
            }
        ]
    );
    assert_eq!((p.merge.limit, p.merge.offset), (Some(10), 5));
    assert_eq!(
        p.scatter_sql.as_deref(),
        Some("SELECT aid, abalance FROM pgbench_accounts ORDER BY abalance DESC, 1 LIMIT 15")
    );
    // ORDER BY an expression not selected: a hidden trailing column.
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY bid NULLS FIRST",
        &m,
    );
    assert_eq!(
        p.merge.order_by,
        vec![SortKey {
            column: 1,
            descending: false,
            nulls_first: true
        }]
    );
    assert_eq!(p.merge.hidden_columns, 1);
    assert_eq!(
        p.scatter_sql.as_deref(),
        Some("SELECT aid, bid FROM pgbench_accounts ORDER BY bid NULLS FIRST")
    );
    // By alias.
    let p = analyze("SELECT aid AS a FROM pgbench_accounts ORDER BY a", &m);
    assert_eq!(
        (p.merge.order_by[0].column, p.scatter_sql.clone()),
        (0, None)
    );
    // Aggregates with GROUP BY, avg split into sum and a hidden count.
    let p = analyze(
        "SELECT bid, count(*), avg(abalance), max(aid) FROM pgbench_accounts GROUP BY bid",
        &m,
    );
    let agg = p.merge.aggregate.clone().unwrap();
    assert_eq!(agg.group_by, vec![0]);
    assert_eq!(
        agg.aggregates,
        vec![
            Aggregate {
                column: 1,
                kind: AggKind::Count
            },
            Aggregate {
                column: 2,
                kind: AggKind::Avg { count_column: 4 }
            },
            Aggregate {
                column: 3,
                kind: AggKind::Max
            }
        ]
    );
    assert_eq!(p.merge.hidden_columns, 1);
    assert_eq!(
        p.scatter_sql.as_deref(),
        Some("SELECT bid, count(*), sum(abalance), max(aid), count(abalance) FROM pgbench_accounts GROUP BY bid")
    );
    // Grouped results with a LIMIT: the limit applies after the merge only.
    let p = analyze(
        "SELECT bid, sum(abalance) FROM pgbench_accounts GROUP BY 1 ORDER BY 2 DESC LIMIT 3",
        &m,
    );
    assert_eq!((p.merge.limit, p.merge.order_by[0].column), (Some(3), 1));
    assert_eq!(
        p.scatter_sql.as_deref(),
        Some("SELECT bid, sum(abalance) FROM pgbench_accounts GROUP BY 1 ORDER BY 2 DESC")
    );
    let p = analyze("SELECT count(*)::int AS n FROM pgbench_accounts", &m);
    assert_eq!(
        p.merge.aggregate.unwrap().aggregates,
        vec![Aggregate {
            column: 0,
            kind: AggKind::Count
        }]
    );
    let p = analyze("SELECT avg(abalance)::int FROM pgbench_accounts", &m);
    assert!(p
        .scatter_refusal
        .unwrap()
        .message
        .contains("avg under a cast"));
    let p = analyze("SELECT DISTINCT bid FROM pgbench_accounts", &m);
    assert!(p.merge.distinct);
    assert_eq!(
        analyze("SELECT bool_and(x), bool_or(y) FROM events", &m)
            .merge
            .aggregate
            .unwrap()
            .aggregates
            .len(),
        2
    );
}

#[test]
fn scatter_refusals_are_deferred_to_multi_shard_targets() {
    let m = map();
    let refusal = |sql: &str| {
        let p = analyze(sql, &m);
        let e = route(&p, &m, &Params::NONE).expect_err(sql);
        assert_eq!(e.sqlstate, "0A000", "{sql}");
        assert!(e.message.contains("pgshard: shard=N"), "{}", e.message);
        e.message
    };
    assert!(refusal("SELECT string_agg(x, ',') FROM pgbench_accounts").contains("string_agg"));
    assert!(refusal("SELECT count(DISTINCT bid) FROM pgbench_accounts").contains("DISTINCT"));
    assert!(
        refusal("SELECT bid, count(*) FROM pgbench_accounts GROUP BY bid HAVING count(*) > 1")
            .contains("HAVING")
    );
    assert!(refusal("SELECT aid, row_number() OVER () FROM pgbench_accounts").contains("window"));
    assert!(
        refusal("SELECT DISTINCT ON (bid) bid, aid FROM pgbench_accounts").contains("DISTINCT ON")
    );
    assert!(
        refusal("SELECT count(*) FROM (SELECT * FROM pgbench_accounts LIMIT 5) s")
            .contains("subqueries")
    );
    assert!(
        refusal("SELECT aid FROM pgbench_accounts UNION SELECT aid FROM pgbench_history")
            .contains("UNION")
    );
    assert!(
        refusal("SELECT bid, abalance FROM pgbench_accounts GROUP BY bid").contains("abalance")
    );
    assert!(refusal("SELECT count(*) FROM pgbench_accounts GROUP BY bid").contains("GROUP BY bid"));
    assert!(refusal("SELECT * FROM pgbench_accounts ORDER BY aid")
        .contains("add aid to the select list"));
    assert!(refusal("SELECT aid FROM pgbench_accounts LIMIT abs($1)").contains("LIMIT"));
    assert!(refusal("SELECT aid FROM pgbench_accounts LIMIT 2.5").contains("row count"));
    // The same shapes are fine when the keys put them on one shard.
    let p = analyze(
        "SELECT string_agg(x, ',') FROM pgbench_accounts WHERE aid = 3",
        &m,
    );
    assert_eq!(
        route(&p, &m, &Params::NONE),
        Ok(Target::One(shard(&m, 0, &KeyValue::Int(3))))
    );
    let p = analyze(
        "SELECT * FROM pgbench_accounts WHERE aid = 3 ORDER BY abalance",
        &m,
    );
    assert!(route(&p, &m, &Params::NONE).is_ok());
    let p = analyze("SELECT * FROM pgbench_accounts a WHERE a.aid = 3 AND EXISTS (SELECT 1 FROM pgbench_history h WHERE h.aid = a.aid)", &m);
    assert_eq!(
        route(&p, &m, &Params::NONE),
        Ok(Target::One(shard(&m, 0, &KeyValue::Int(3))))
    );
    // ... but not when an IN list spans shards.
    let (a, b) = two_keys(&m);
    let p = analyze(
        &format!("SELECT string_agg(x, ',') FROM pgbench_accounts WHERE aid IN ({a}, {b})"),
        &m,
    );
    assert!(route(&p, &m, &Params::NONE)
        .unwrap_err()
        .message
        .contains("string_agg"));
    // A UNION of reference rows in a CTE does not stop a keyless scatter.
    let p = analyze("WITH c AS (SELECT code FROM countries UNION SELECT 'xx') SELECT count(*) FROM pgbench_accounts a JOIN c ON c.code = a.c", &m);
    assert_eq!(
        (p.route.clone(), route(&p, &m, &Params::NONE)),
        (Route::AllShards, Ok(Target::All))
    );
    // A single-shard cluster runs anything.
    let cfg: crate::shardmap::config::ShardingConfig = toml::from_str(
        super::tests::MAP
            .replace("us = [1, 2]", "us = [0]")
            .replace("\"acme\" = 3", "\"acme\" = 0")
            .replace("shard = 1 }", "shard = 0 }")
            .as_str(),
    )
    .unwrap();
    let one = ShardMap::build(&cfg, 1, 1).unwrap();
    let p = analyze("SELECT string_agg(x, ',') FROM pgbench_accounts", &one);
    assert_eq!(route(&p, &one, &Params::NONE), Ok(Target::One(0)));
}

#[test]
fn insert_split_per_shard() {
    let m = map();
    let (a, b) = two_keys(&m);
    let sql = format!("INSERT INTO pgbench_accounts (aid, bid, abalance) VALUES ({a}, 1, 0), ({b}, 2, 0), ({a}, 3, 0)");
    let p = analyze(&sql, &m);
    assert_eq!(
        keys_of(&p),
        vec![a.to_string(), b.to_string(), a.to_string()]
    );
    let split = p.insert.as_ref().unwrap().split(&m, &[]).unwrap();
    let (sa, sb) = (
        shard(&m, 0, &KeyValue::Int(a)),
        shard(&m, 0, &KeyValue::Int(b)),
    );
    assert_eq!(split.len(), 2);
    assert_eq!(split.iter().map(|s| s.2).sum::<u64>(), 3);
    let for_a = split.iter().find(|s| s.0 == sa).unwrap();
    assert_eq!(
        for_a.1,
        format!(
            "INSERT INTO pgbench_accounts (aid, bid, abalance) VALUES ({a}, 1, 0), ({a}, 3, 0)"
        )
    );
    assert_eq!(for_a.2, 2);
    let for_b = split.iter().find(|s| s.0 == sb).unwrap();
    assert_eq!(
        for_b.1,
        format!("INSERT INTO pgbench_accounts (aid, bid, abalance) VALUES ({b}, 2, 0)")
    );
    // All rows on one shard: the original text.
    let same = format!("INSERT INTO pgbench_accounts (aid, bid) VALUES ({a}, 1), ({a}, 2)");
    let split = analyze(&same, &m).insert.unwrap().split(&m, &[]).unwrap();
    assert_eq!(split, vec![(sa, same.clone(), 2)]);
    // Parameters: fine on one shard, refused across shards.
    let ps = "INSERT INTO pgbench_accounts (aid, bid) VALUES ($1, 1), ($2, 2)";
    let ins = analyze(ps, &m).insert.unwrap();
    let (ta, tb) = (a.to_string(), b.to_string());
    assert_eq!(
        ins.split(&m, &[Some(ta.as_bytes()), Some(ta.as_bytes())])
            .unwrap(),
        vec![(sa, ps.to_string(), 2)]
    );
    let e = ins
        .split(&m, &[Some(ta.as_bytes()), Some(tb.as_bytes())])
        .unwrap_err();
    assert_eq!(e.sqlstate, "0A000");
    assert!(e.message.contains("send one row per statement"));
    assert_eq!(
        ins.split(&m, &[None, Some(ta.as_bytes())])
            .unwrap_err()
            .sqlstate,
        "22004"
    );
}

#[test]
fn geo_insert_split_uses_each_rows_hash_column() {
    let m = map();
    let within = |id: i64| match m
        .locate(3, &KeyValue::Text(b"us"), Some(&KeyValue::Int(id)))
        .unwrap()
    {
        Located::One(s) => s,
        g => panic!("{g:?}"),
    };
    let (a, b) = (1, (2..1000).find(|&i| within(i) != within(1)).unwrap());
    let sql = format!("INSERT INTO users (id, region) VALUES ({a}, 'us'), ({b}, 'us'), (7, 'eu')");
    let p = analyze(&sql, &m);
    // Without the split the rows' group is the best the route can say.
    assert_eq!(
        route(&p, &m, &Params::NONE),
        Ok(Target::Some(vec![0, 1, 2]))
    );
    let mut split = p.insert.unwrap().split(&m, &[]).unwrap();
    split.sort();
    assert_eq!(split.len(), 3);
    assert_eq!(
        split[0],
        (
            0,
            "INSERT INTO users (id, region) VALUES (7, 'eu')".to_string(),
            1
        )
    );
    let on_a = split.iter().find(|s| s.0 == within(a)).unwrap();
    assert_eq!(
        on_a.1,
        format!("INSERT INTO users (id, region) VALUES ({a}, 'us')")
    );
}

#[test]
fn key_hint_uses_the_statements_distribution() {
    let m = map();
    let p = analyze(
        "/* pgshard: key=42 */ SELECT * FROM pgbench_accounts WHERE aid = $1",
        &m,
    );
    assert_eq!(
        route(&p, &m, &Params::NONE),
        Ok(Target::One(shard(&m, 0, &KeyValue::Int(42))))
    );
    let p = analyze("/* pgshard: key=1500 */ SELECT count(*) FROM events", &m);
    assert_eq!(route(&p, &m, &Params::NONE), Ok(Target::One(1)));
    let p = analyze(
        "/* pgshard: key=notanumber */ SELECT count(*) FROM events",
        &m,
    );
    assert_eq!(route(&p, &m, &Params::NONE).unwrap_err().sqlstate, "22P02");
}

fn keys_of(p: &Plan) -> Vec<String> {
    match &p.route {
        Route::Keys { keys, .. } => keys
            .iter()
            .map(|k| match k {
                KeyExpr::Literal(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .collect(),
        r => panic!("{r:?}"),
    }
}

#[test]
fn cache_hits_guards_collisions_and_invalidates() {
    fn shared<T: Send + Sync>() {}
    shared::<PlanCache>();
    shared::<Plan>();
    let m = map();
    let c = PlanCache::new(100);
    let a = c.plan("SELECT * FROM pgbench_accounts WHERE aid = 1", &m);
    let b = c.plan("SELECT * FROM pgbench_accounts WHERE aid = 1", &m);
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(c.stats(), (1, 1));
    // A different text with the same hash must not get the cached plan.
    let h = xxhash_rust::xxh3::xxh3_64(b"SELECT * FROM pgbench_accounts WHERE aid = 1");
    let other = c.plan_hashed(h, "SELECT * FROM countries", &m);
    assert_eq!(other.route, Route::Reference { write: false });
    assert_eq!(c.stats(), (1, 2));
    // A new map version re-analyses.
    let m2 = map_with("", 2);
    let d = c.plan("SELECT * FROM countries", &m2);
    assert_eq!(c.stats(), (1, 3));
    let e = c.plan("SELECT * FROM countries", &m2);
    assert!(std::sync::Arc::ptr_eq(&d, &e));
    assert_eq!(c.stats(), (2, 3));
    // Bounded: a stripe is cleared when full.
    let small = PlanCache::new(16);
    for i in 0..200 {
        small.plan(&format!("SELECT {i}"), &m);
    }
    assert!(small.len() <= 16 + 15, "{}", small.len());
    assert!(!small.is_empty());
}

#[test]
fn text_memo_tells_tags_and_versions_apart() {
    let memo: TextMemo<u32> = TextMemo::new(100);
    let text = "SELECT count(*) FROM t";
    let h = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
    assert_eq!(memo.get(h, text, 2, 7, || 1), 1);
    assert_eq!(memo.get(h, text, 2, 7, || panic!("a hit")), 1);
    // Another shard (tag) of the same text, and the same one under a newer map, are made anew.
    assert_eq!(memo.get(h, text, 3, 7, || 2), 2);
    assert_eq!(memo.get(h, text, 2, 8, || 3), 3);
    // Another text under the same hash and tag is not served the cached value.
    assert_eq!(memo.get(h, "SELECT 1", 2, 8, || 4), 4);
    assert_eq!(memo.stats(), (1, 4));
}

#[test]
fn no_prefix_of_a_statement_panics() {
    let m = map();
    let texts = [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT a.aid, avg(x)::int, count(DISTINCT y) FROM pgbench_accounts a JOIN pgbench_history h USING (aid) WHERE a.aid = ANY('{1,2}') GROUP BY 1 ORDER BY 2 DESC NULLS LAST LIMIT 3 OFFSET 1",
        "INSERT INTO users (id, region) VALUES (1, 'us'), (2, 'eu') ON CONFLICT DO NOTHING RETURNING *",
        "/* pgshard: key=é */ UPDATE pgbench_accounts SET abalance = (SELECT 1) WHERE aid IN ($1, $2)",
        "COPY (SELECT * FROM events) TO STDOUT WITH (FORMAT csv, HEADER on)",
        "SELECT * FROM pgbench_accounts WHERE aid = 1 FOR NO KEY UPDATE -- pgshard: shard=1",
    ];
    for t in texts {
        for (i, _) in t.char_indices() {
            let p = analyze(&t[..i], &m);
            let _ = route(&p, &m, &Params::NONE);
        }
    }
    // Hostile binary arrays.
    for raw in [
        &[0u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 20, 127, 255, 255, 255][..],
        &[0, 0, 0, 1],
        &[],
    ] {
        assert!(route::parse_binary_array(raw).is_err());
    }
}

#[test]
fn limit_and_offset_parameters_push_down_as_one_limit() {
    use crate::scatter::spec::CountExpr;
    let m = map();
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid LIMIT $1 OFFSET $2",
        &m,
    );
    assert!(p.scatter_refusal.is_none());
    assert_eq!(
        (p.merge.limit_expr, p.merge.offset_expr, p.merge.limit),
        (Some(CountExpr::Param(1)), Some(CountExpr::Param(2)), None)
    );
    assert!(p
        .scatter_sql
        .as_deref()
        .unwrap()
        .ends_with("ORDER BY aid LIMIT $1 + $2"));
    let p = analyze("SELECT aid FROM pgbench_accounts LIMIT 10 OFFSET $1", &m);
    assert!(p.scatter_sql.as_deref().unwrap().ends_with("LIMIT 10 + $1"));
    assert_eq!(
        (p.merge.limit, p.merge.offset_expr),
        (Some(10), Some(CountExpr::Param(1)))
    );
    // Grouped partial results must be complete: no LIMIT reaches the shards.
    let p = analyze(
        "SELECT bid, count(*) FROM pgbench_accounts GROUP BY bid ORDER BY bid LIMIT $1",
        &m,
    );
    assert!(!p.scatter_sql.as_deref().unwrap().contains("LIMIT"));
    assert_eq!(p.merge.limit_expr, Some(CountExpr::Param(1)));
}

#[test]
fn limit_expressions_push_down_and_evaluate_from_the_bind() {
    use crate::scatter::spec::CountExpr;
    let m = map();
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid LIMIT $1 + 1 OFFSET ($2 - 1) * $1",
        &m,
    );
    assert!(p.scatter_refusal.is_none(), "{:?}", p.scatter_refusal);
    let sql = p.scatter_sql.as_deref().unwrap();
    assert!(
        sql.ends_with("ORDER BY aid LIMIT ($1 + 1) + (($2 - 1) * $1)"),
        "{sql}"
    );
    let (l, o) = (p.merge.limit_expr.unwrap(), p.merge.offset_expr.unwrap());
    let bind = |p: u16| Ok::<_, ()>(Some([10i64, 3][usize::from(p) - 1]));
    assert_eq!(l.eval(&mut { bind }), Ok(Some(11)));
    assert_eq!(o.eval(&mut { bind }), Ok(Some(20)));
    assert_eq!(o.eval(&mut |_| Ok::<_, ()>(None)), Ok(None));
    // Grouped: no limit reaches the shards, but the parameters stay in the text.
    let p = analyze(
        "SELECT bid, count(*) FROM pgbench_accounts GROUP BY bid ORDER BY bid LIMIT $1 - 1",
        &m,
    );
    let sql = p.scatter_sql.as_deref().unwrap();
    assert!(
        sql.ends_with("LIMIT CAST(CASE WHEN (($1 - 1)) IS NULL THEN NULL END AS INT8)"),
        "{sql}"
    );
    assert!(p.merge.limit_expr.is_some());
    // Constant arithmetic folds; negative constants are left for the shards to refuse.
    let p = analyze(
        "SELECT aid FROM pgbench_accounts LIMIT 2 * (3 + 4) OFFSET +2",
        &m,
    );
    assert_eq!((p.merge.limit, p.merge.offset), (Some(14), 2));
    assert!(p.merge.limit_expr.is_none());
    let p = analyze("SELECT aid FROM pgbench_accounts LIMIT -1", &m);
    assert!(matches!(p.merge.limit_expr, Some(CountExpr::Neg(_))));
    let e = analyze("SELECT aid FROM pgbench_accounts LIMIT $1 / 0", &m)
        .merge
        .limit_expr
        .unwrap();
    assert!(e.eval(&mut |_| Ok::<_, ()>(Some(1))).is_err());
}

#[test]
fn fetch_first_merges_as_a_limit() {
    use crate::scatter::spec::CountExpr;
    let m = map();
    // Hibernate 6's paging: OFFSET ? ROWS FETCH FIRST ? ROWS ONLY.
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid OFFSET $1 ROWS FETCH FIRST $2 ROWS ONLY",
        &m,
    );
    assert!(p.scatter_refusal.is_none(), "{:?}", p.scatter_refusal);
    assert_eq!(
        (p.merge.limit_expr, p.merge.offset_expr),
        (Some(CountExpr::Param(2)), Some(CountExpr::Param(1)))
    );
    let sql = p.scatter_sql.as_deref().unwrap();
    assert!(sql.ends_with("ORDER BY aid LIMIT $2 + $1"), "{sql}");
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid FETCH FIRST 3 ROWS ONLY",
        &m,
    );
    assert_eq!((p.merge.limit, p.merge.offset), (Some(3), 0));
    assert!(p.scatter_sql.as_deref().unwrap().ends_with("LIMIT 3"));
    // Without a count FETCH FIRST means one row.
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid FETCH NEXT ROW ONLY",
        &m,
    );
    assert_eq!(p.merge.limit, Some(1));
    let p = analyze(
        "SELECT aid FROM pgbench_accounts ORDER BY aid FETCH FIRST 3 ROWS WITH TIES",
        &m,
    );
    let e = route(&p, &m, &Params::NONE).unwrap_err();
    assert!(e.message.contains("WITH TIES"), "{}", e.message);
}
