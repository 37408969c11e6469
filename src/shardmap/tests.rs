use super::*;

fn map(toml_text: &str, shards: usize) -> Result<ShardMap, MapError> {
    let cfg: ShardingConfig = toml::from_str(toml_text).expect("toml");
    ShardMap::build(&cfg, shards, 1)
}

const ALL: &str = r#"
[[distributions]]
name = "acct"
strategy = "hash"
key_type = "bigint"

[[distributions]]
name = "tenant"
strategy = "tenant"
key_type = "text"
tenants = { "acme" = 2 }

[[distributions]]
name = "events"
strategy = "range"
key_type = "int8"
ranges = [{ hi = 0, shard = 2 }, { lo = 0, hi = 1000, shard = 0 }, { lo = 1000, hi = 5000, shard = 1 }]

[[distributions]]
name = "geo"
strategy = "geo"
key_type = "text"
regions = { eu = [0], us = [1, 2] }
default_region = "eu"

[[tables]]
name = "accounts"
distribution = "acct"
column = "aid"

[[tables]]
name = "public.orders"
distribution = "tenant"
column = "tenant_id"

[[tables]]
name = "users"
distribution = "geo"
column = "region"
hash_column = "id"

[[tables]]
name = "countries"
reference = true
"#;

#[test]
fn hash_placement_is_an_equal_contiguous_split_of_pg_buckets() {
    let m = map(ALL, 3).unwrap();
    let k = KeyValue::Int(42);
    let b = pghash::bucket(&k, 4096).unwrap() as usize;
    assert_eq!(m.locate(0, &k, None).unwrap(), Located::One(b * 3 / 4096));
    let mut seen = [0usize; 3];
    for i in 0..3000 {
        let Located::One(s) = m.locate(0, &KeyValue::Int(i), None).unwrap() else {
            panic!()
        };
        seen[s] += 1;
    }
    assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
}

#[test]
fn tenant_directory_wins_over_hash() {
    let m = map(ALL, 3).unwrap();
    assert_eq!(
        m.locate(1, &KeyValue::Text(b"acme"), None).unwrap(),
        Located::One(2)
    );
    let other = KeyValue::Text(b"initech");
    let b = pghash::bucket(&other, 4096).unwrap() as usize;
    assert_eq!(
        m.locate(1, &other, None).unwrap(),
        Located::One(b * 3 / 4096)
    );
}

#[test]
fn ranges_are_half_open_and_gaps_are_errors() {
    let m = map(ALL, 3).unwrap();
    assert_eq!(
        m.locate(2, &KeyValue::Int(-5), None).unwrap(),
        Located::One(2)
    );
    assert_eq!(
        m.locate(2, &KeyValue::Int(0), None).unwrap(),
        Located::One(0)
    );
    assert_eq!(
        m.locate(2, &KeyValue::Int(999), None).unwrap(),
        Located::One(0)
    );
    assert_eq!(
        m.locate(2, &KeyValue::Int(1000), None).unwrap(),
        Located::One(1)
    );
    let err = m
        .locate(2, &KeyValue::Int(5000), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("5000") && err.contains("no configured range"),
        "{err}"
    );
}

#[test]
fn geo_groups_hash_within_and_unknown_regions_use_the_default() {
    let m = map(ALL, 3).unwrap();
    assert_eq!(
        m.locate(3, &KeyValue::Text(b"eu"), None).unwrap(),
        Located::One(0)
    );
    assert_eq!(
        m.locate(3, &KeyValue::Text(b"mars"), None).unwrap(),
        Located::One(0)
    );
    assert_eq!(
        m.locate(3, &KeyValue::Text(b"us"), None).unwrap(),
        Located::Group(vec![1, 2])
    );
    let mut seen = [0usize; 3];
    for i in 0..200 {
        let Located::One(s) = m
            .locate(3, &KeyValue::Text(b"us"), Some(&KeyValue::Int(i)))
            .unwrap()
        else {
            panic!()
        };
        seen[s] += 1;
    }
    assert_eq!(seen[0], 0);
    assert!(seen[1] > 50 && seen[2] > 50, "{seen:?}");
}

#[test]
fn tables_resolve_qualified_and_bare_names() {
    let m = map(ALL, 3).unwrap();
    assert!(matches!(
        m.table("accounts"),
        Some(TableRule::Sharded { dist: 0, .. })
    ));
    assert!(matches!(
        m.table("public.accounts"),
        Some(TableRule::Sharded { dist: 0, .. })
    ));
    assert!(matches!(
        m.table("public.orders"),
        Some(TableRule::Sharded { dist: 1, .. })
    ));
    assert_eq!(m.table("countries"), Some(&TableRule::Reference));
    assert_eq!(m.table("nope"), None);
}

#[test]
fn bad_maps_are_refused_with_the_reason() {
    let cases = [
        ("buckets = 1000", "power of two"),
        ("[[distributions]]\nname='a'\nstrategy='hash'\nkey_type='float8'", "float8"),
        ("[[distributions]]\nname='a'\nstrategy='range'\nkey_type='int8'\nranges=[{lo=0,hi=10,shard=0},{lo=5,shard=1}]", "overlap"),
        ("[[distributions]]\nname='a'\nstrategy='range'\nkey_type='int8'\nranges=[{lo=0,shard=7}]", "shard 7"),
        ("[[distributions]]\nname='a'\nstrategy='hash'\nkey_type='int8'\nbucket_map=[{from=0,to=10,shard=0}]", "without a shard"),
        ("[[distributions]]\nname='a'\nstrategy='hash'\nkey_type='int8'\ntenants={x=1}", "tenants"),
        ("[[tables]]\nname='t'\ndistribution='zz'\ncolumn='c'", "zz"),
        ("[[tables]]\nname='t'", "reference = true"),
        ("[[distributions]]\nname='g'\nstrategy='geo'\nkey_type='text'\nregions={eu=[0]}\ndefault_region='us'", "default_region"),
    ];
    for (text, needle) in cases {
        let err = map(text, 2).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

fn with_move(mv: &str) -> Result<ShardMap, MapError> {
    map(&format!("{ALL}\n[[moves]]\n{mv}"), 3)
}

#[test]
fn moves_are_validated_against_placement() {
    // tenant acme lives on shard 2 (directory); a move from 2 to 0 is valid while copying…
    let m = with_move("id = 1\ndistribution = \"tenant\"\ntenant = \"acme\"\nsource = 2\ntarget = 0\nphase = \"copying\"").unwrap();
    assert_eq!(m.motions.len(), 1);
    assert_eq!(m.motions[0].shadow_shard(), 0);
    assert_eq!(
        m.motion_of("public.orders").map(|(mv, col)| (mv.id, col)),
        Some((1, "tenant_id"))
    );
    assert!(m.motion_of("accounts").is_none());
    // …but not once switched, until the directory says shard 0.
    let e = with_move("id = 1\ndistribution = \"tenant\"\ntenant = \"acme\"\nsource = 2\ntarget = 0\nphase = \"switched\"").unwrap_err();
    assert!(
        e.to_string().contains("tenant acme is on shard 2, not 0"),
        "{e}"
    );
    // Buckets must all be on the source; 4096 buckets over 3 shards: 0..=1365 on shard 0.
    assert!(with_move("id = 2\ndistribution = \"acct\"\nbuckets = [[0, 255]]\nsource = 0\ntarget = 1\nphase = \"fenced\"").is_ok());
    let e = with_move("id = 2\ndistribution = \"acct\"\nbuckets = [[1300, 1400]]\nsource = 0\ntarget = 1\nphase = \"copying\"").unwrap_err();
    assert!(e.to_string().contains("bucket 1366 is on shard 1"), "{e}");
    for bad in [
        "id = 3\ndistribution = \"acct\"\ntenant = \"x\"\nsource = 0\ntarget = 1\nphase = \"copying\"",
        "id = 3\ndistribution = \"acct\"\nbuckets = [[0, 1]]\nsource = 0\ntarget = 0\nphase = \"copying\"",
        "id = 3\ndistribution = \"events\"\nbuckets = [[0, 1]]\nsource = 0\ntarget = 1\nphase = \"copying\"",
        "id = 3\ndistribution = \"nope\"\nbuckets = [[0, 1]]\nsource = 0\ntarget = 1\nphase = \"copying\"",
        "id = 3\ndistribution = \"acct\"\nbuckets = [[0, 9999]]\nsource = 0\ntarget = 1\nphase = \"copying\"",
    ] {
        assert!(with_move(bad).is_err(), "accepted: {bad}");
    }
}

#[test]
fn unit_predicates_name_the_same_rows_as_owns() {
    let m = with_move("id = 1\ndistribution = \"tenant\"\nbuckets = [[0, 99], [200, 200]]\nsource = 0\ntarget = 1\nphase = \"copying\"").unwrap();
    let mv = &m.motions[0];
    let sql = mv.predicate_sql("tenant_id", None, "text", 4096).unwrap();
    assert!(
        sql.contains("BETWEEN 0 AND 99")
            && sql.contains("= 200")
            && sql.ends_with("NOT IN ('acme')"),
        "{sql}"
    );
    assert_eq!(mv.describe(), "buckets 0-99,200");
    // The directory tenant never belongs to a bucket unit, whatever its bucket.
    assert!(!mv.owns(&KeyValue::Text(b"acme"), 4096));
    let owned = (0..2000)
        .filter(|i| mv.owns(&KeyValue::Text(format!("t{i}").as_bytes()), 4096))
        .count();
    // 101 of 4096 buckets: about 49 of 2000 keys.
    assert!((25..80).contains(&owned), "{owned}");
    let Located::One(src) = map(ALL, 3)
        .unwrap()
        .locate(1, &KeyValue::Text(b"o'neil"), None)
        .unwrap()
    else {
        panic!()
    };
    let t = with_move(&format!("id = 1\ndistribution = \"tenant\"\ntenant = \"o'neil\"\nsource = {src}\ntarget = {}\nphase = \"copying\"", (src + 1) % 3));
    let t = t.unwrap();
    assert_eq!(
        t.motions[0]
            .predicate_sql("tenant_id", None, "text", 4096)
            .unwrap(),
        "tenant_id = 'o''neil'"
    );
    assert!(
        t.motions[0].owns(&KeyValue::Text(b"o'neil"), 4096)
            && !t.motions[0].owns(&KeyValue::Text(b"oneil"), 4096)
    );
}

#[test]
fn a_share_of_a_region_group_is_its_members_hash_buckets() {
    // Region us hashes over [1, 2]: buckets 2048..=4095 of the hash column are shard 2's.
    let share = |buckets: &str, source: usize, phase: &str| {
        with_move(&format!("id = 4\ndistribution = \"geo\"\ntenant = \"us\"\nbuckets = {buckets}\nhash_type = \"int8\"\nsource = {source}\ntarget = 0\nphase = \"{phase}\""))
    };
    let m = share("[[2048, 4095]]", 2, "copying").unwrap();
    let mv = &m.motions[0];
    for i in 0..500 {
        let w = KeyValue::Int(i);
        let on_2 = m.locate(3, &KeyValue::Text(b"us"), Some(&w)).unwrap() == Located::One(2);
        assert_eq!(mv.owns_row(&KeyValue::Text(b"us"), Some(&w), 4096), on_2);
        assert!(!mv.owns_row(&KeyValue::Text(b"eu"), Some(&w), 4096));
    }
    // Without the hash column's value no row can be placed in the share.
    assert!(!mv.owns(&KeyValue::Text(b"us"), 4096));
    let sql = mv
        .predicate_sql("region", Some("id"), "text", 4096)
        .unwrap();
    assert!(
        sql.starts_with("region = 'us' AND ((((hashint8extended(id, ")
            && sql.ends_with("BETWEEN 2048 AND 4095)"),
        "{sql}"
    );
    assert!(mv.predicate_sql("region", None, "text", 4096).is_none());
    assert!(mv.describe().contains("share of region 'us' on shard 2"));

    let e = share("[[2000, 2100]]", 2, "copying")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hash bucket 2000 of region 'us' is on shard 1"),
        "{e}"
    );
    let e = with_move("id = 4\ndistribution = \"geo\"\ntenant = \"us\"\nsource = 1\ntarget = 0\nphase = \"copying\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("spans shards") && e.contains("--from"), "{e}");
    for bad in [
        // No hash_type, a text one, and a hash_type outside a geo distribution.
        "id = 4\ndistribution = \"geo\"\ntenant = \"us\"\nbuckets = [[2048, 4095]]\nsource = 2\ntarget = 0\nphase = \"copying\"",
        "id = 4\ndistribution = \"geo\"\ntenant = \"us\"\nbuckets = [[2048, 4095]]\nhash_type = \"text\"\nsource = 2\ntarget = 0\nphase = \"copying\"",
        "id = 4\ndistribution = \"acct\"\nbuckets = [[0, 1]]\nhash_type = \"int8\"\nsource = 0\ntarget = 1\nphase = \"copying\"",
    ] {
        assert!(with_move(bad).is_err(), "accepted: {bad}");
    }
}

#[test]
fn a_group_of_one_shard_is_that_shard() {
    let m = map(&ALL.replace("us = [1, 2]", "us = [2, 2]"), 3).unwrap();
    assert_eq!(
        m.locate(3, &KeyValue::Text(b"us"), None).unwrap(),
        Located::One(2)
    );
    // Its region then moves whole, from that shard.
    let moved = ALL.replace("us = [1, 2]", "us = [2, 2]")
        + "\n[[moves]]\nid = 5\ndistribution = \"geo\"\ntenant = \"us\"\nsource = 2\ntarget = 1\nphase = \"copying\"";
    assert!(map(&moved, 3).is_ok());
}
