use bytes::BytesMut;

use super::merge::{MergeError, Merger};
use super::spec::{AggKind, Aggregate, AggregateSpec, MergeSpec, SortKey};
use super::values::oid;
use crate::protocol::messages;
use crate::protocol::Cursor;

fn rd(cols: &[(&str, i32)]) -> Vec<u8> {
    rd_fmt(cols, 0)
}

fn rd_fmt(cols: &[(&str, i32)], format: i16) -> Vec<u8> {
    let fields: Vec<super::wire::Field> = cols
        .iter()
        .map(|(n, t)| super::wire::Field {
            name: n.as_bytes().to_vec(),
            table_oid: 0,
            attnum: 0,
            type_oid: *t,
            typlen: -1,
            typmod: -1,
            format,
        })
        .collect();
    let mut out = BytesMut::new();
    super::wire::put_row_description(&mut out, &fields);
    out.to_vec()
}

fn dr(values: &[Option<&str>]) -> Vec<u8> {
    let mut out = BytesMut::new();
    messages::data_row(&mut out, values);
    out.to_vec()
}

fn cc(tag: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    messages::command_complete(&mut out, tag);
    out.to_vec()
}

/// A shard's SELECT answer: description, rows, "SELECT n".
fn select(cols: &[(&str, i32)], rows: &[&[Option<&str>]]) -> Vec<Vec<u8>> {
    let mut v = vec![rd(cols)];
    v.extend(rows.iter().map(|r| dr(r)));
    v.push(cc(&format!("SELECT {}", rows.len())));
    v
}

/// Renders client output as lines: "T a,b", "D 1|x|NULL", "C SELECT 2", or the tag char.
fn render(out: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (msg, tail) = rest.split_at(len + 1);
        rest = tail;
        let mut c = Cursor::new(&msg[5..]);
        lines.push(match msg[0] {
            b'T' => {
                let n = c.i16().unwrap();
                let cols: Vec<String> = (0..n)
                    .map(|_| {
                        let name = c.str().unwrap().to_string();
                        c.take(6);
                        let ty = c.i32().unwrap();
                        c.take(8);
                        format!("{name}:{ty}")
                    })
                    .collect();
                format!("T {}", cols.join(","))
            }
            b'D' => {
                let n = c.i16().unwrap();
                let vals: Vec<String> = (0..n)
                    .map(|_| match c.i32().unwrap() {
                        -1 => "NULL".to_string(),
                        l => String::from_utf8_lossy(c.take(l as usize).unwrap()).into_owned(),
                    })
                    .collect();
                format!("D {}", vals.join("|"))
            }
            b'C' => format!("C {}", c.str().unwrap()),
            t => (t as char).to_string(),
        });
    }
    lines
}

/// Drives the merger the way the session does: always feeding the shard it asks for.
fn run(spec: MergeSpec, shards: Vec<Vec<Vec<u8>>>) -> Result<Vec<String>, MergeError> {
    Ok(render(&run_raw(spec, &shards)?))
}

/// The merged output's bytes, for binary-format values `render` cannot show.
fn run_raw(spec: MergeSpec, shards: &[Vec<Vec<u8>>]) -> Result<BytesMut, MergeError> {
    let mut m = Merger::new(spec, shards.len());
    let mut next = vec![0; shards.len()];
    let mut out = BytesMut::new();
    while let Some(i) = m.next_needed() {
        assert!(m.accepts(i));
        m.push(i, &shards[i][next[i]], &mut out)?;
        next[i] += 1;
    }
    m.finish(&mut out)?;
    Ok(out)
}

fn ints(vals: &[i64]) -> Vec<Vec<u8>> {
    let mut v = vec![rd(&[("x", oid::INT4)])];
    v.extend(vals.iter().map(|x| dr(&[Some(x.to_string().as_str())])));
    v.push(cc(&format!("SELECT {}", vals.len())));
    v
}

fn asc(column: usize) -> SortKey {
    SortKey {
        column,
        descending: false,
        nulls_first: false,
    }
}

#[test]
fn plain_merge_with_offset_limit_distinct() {
    let spec = MergeSpec {
        limit: Some(3),
        offset: 1,
        distinct: true,
        ..Default::default()
    };
    let out = run(spec, vec![ints(&[1, 2, 2]), ints(&[2, 3, 4, 5])]).unwrap();
    assert_eq!(out, ["T x:23", "D 2", "D 3", "D 4", "C SELECT 3"]);
    let out = run(
        MergeSpec::default(),
        vec![ints(&[1]), ints(&[]), ints(&[7, 8])],
    )
    .unwrap();
    assert_eq!(out, ["T x:23", "D 1", "D 7", "D 8", "C SELECT 3"]);
}

#[test]
fn kway_merge_ints_and_limit_stops_early() {
    let spec = MergeSpec {
        order_by: vec![asc(0)],
        limit: Some(4),
        ..Default::default()
    };
    let shards = vec![ints(&[1, 5, 9, 10]), ints(&[2, 3, 11]), ints(&[4, 100])];
    let mut m = Merger::new(spec, 3);
    let mut next = [0; 3];
    let mut out = BytesMut::new();
    while !m.limit_reached() {
        let i = m.next_needed().unwrap();
        m.push(i, &shards[i][next[i]], &mut out).unwrap();
        next[i] += 1;
    }
    assert_eq!(render(&out), ["T x:23", "D 1", "D 2", "D 3", "D 4"]);
    // Not every row was read; the rest is drained from whatever shard, output unchanged.
    assert!(next.iter().zip(&shards).any(|(n, s)| *n < s.len() - 1));
    for i in 0..3 {
        while next[i] < shards[i].len() {
            assert!(m.accepts(i));
            m.push(i, &shards[i][next[i]], &mut out).unwrap();
            next[i] += 1;
        }
    }
    assert_eq!(m.next_needed(), None);
    m.finish(&mut out).unwrap();
    assert_eq!(render(&out).last().unwrap(), "C SELECT 4");
}

#[test]
fn kway_merge_text_desc_nulls_and_ties() {
    let cols = [("name", oid::TEXT), ("n", oid::INT8)];
    let a = select(
        &cols,
        &[
            &[None, Some("1")],
            &[Some("b"), Some("2")],
            &[Some("a"), Some("3")],
        ],
    );
    let b = select(
        &cols,
        &[
            &[None, Some("4")],
            &[Some("ba"), Some("5")],
            &[Some("b"), Some("6")],
            &[Some("B"), Some("7")],
        ],
    );
    // DESC defaults to NULLS FIRST; ties keep shard order.
    let spec = MergeSpec {
        order_by: vec![SortKey {
            column: 0,
            descending: true,
            nulls_first: true,
        }],
        ..Default::default()
    };
    let out = run(spec, vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(
        out,
        [
            "T name:25,n:20",
            "D NULL|1",
            "D NULL|4",
            "D ba|5",
            "D b|2",
            "D b|6",
            "D a|3",
            "D B|7",
            "C SELECT 7"
        ]
    );
    // Second key breaks ties; numeric order, not text order, for the int column.
    let cols = [("g", oid::INT4), ("v", oid::NUMERIC)];
    let a = select(
        &cols,
        &[
            &[Some("1"), Some("-10.5")],
            &[Some("1"), Some("9.5")],
            &[Some("2"), None],
        ],
    );
    let b = select(&cols, &[&[Some("1"), Some("-2")], &[Some("10"), Some("1")]]);
    let spec = MergeSpec {
        order_by: vec![asc(0), asc(1)],
        ..Default::default()
    };
    let out = run(spec, vec![a, b]).unwrap();
    assert_eq!(
        out[1..],
        [
            "D 1|-10.5",
            "D 1|-2",
            "D 1|9.5",
            "D 2|NULL",
            "D 10|1",
            "C SELECT 5"
        ]
    );
}

#[test]
fn ordered_binary_ints_and_float_nan() {
    let mut shards = Vec::new();
    for vals in [[-5i64, 7], [3, 9]] {
        let mut s = vec![rd_fmt(&[("x", oid::INT8)], 1)];
        for v in vals {
            let mut out = BytesMut::new();
            super::wire::put_data_row(&mut out, [Some(&v.to_be_bytes()[..])].into_iter());
            s.push(out.to_vec());
        }
        s.push(cc("SELECT 2"));
        shards.push(s);
    }
    let spec = MergeSpec {
        order_by: vec![asc(0)],
        ..Default::default()
    };
    let out = run_raw(spec.clone(), &shards).unwrap();
    let mut pos = 0;
    let mut got = Vec::new();
    while pos < out.len() {
        let len =
            u32::from_be_bytes([out[pos + 1], out[pos + 2], out[pos + 3], out[pos + 4]]) as usize;
        if out[pos] == b'D' {
            got.push(i64::from_be_bytes(
                out[pos + 11..pos + 19].try_into().unwrap(),
            ));
        }
        pos += len + 1;
    }
    assert_eq!(got, [-5, 3, 7, 9]);
    let cols = [("f", oid::FLOAT8)];
    let a = select(
        &cols,
        &[&[Some("-Infinity")], &[Some("1.5")], &[Some("NaN")]],
    );
    let b = select(&cols, &[&[Some("-0")], &[Some("Infinity")]]);
    let out = run(spec, vec![a, b]).unwrap();
    assert_eq!(
        out[1..],
        [
            "D -Infinity",
            "D -0",
            "D 1.5",
            "D Infinity",
            "D NaN",
            "C SELECT 5"
        ]
    );
}

#[test]
fn hidden_columns_are_dropped() {
    let cols = [("a", oid::INT4), ("h", oid::INT4)];
    let spec = MergeSpec {
        order_by: vec![asc(1)],
        hidden_columns: 1,
        ..Default::default()
    };
    let a = select(&cols, &[&[Some("10"), Some("2")], &[None, None]]);
    let b = select(&cols, &[&[Some("20"), Some("1")]]);
    let out = run(spec.clone(), vec![a, b]).unwrap();
    assert_eq!(out, ["T a:23", "D 20", "D 10", "D NULL", "C SELECT 3"]);
    let described = Merger::client_row_description(&spec, &rd(&cols)).unwrap();
    assert_eq!(render(&described), ["T a:23"]);
    let plain = MergeSpec {
        hidden_columns: 2,
        ..Default::default()
    };
    let out = run(plain, vec![select(&cols, &[&[Some("1"), Some("2")]])]).unwrap();
    assert_eq!(out, ["T ", "D ", "C SELECT 1"]);
}

#[test]
fn aggregates_without_group_by() {
    let cols = [
        ("count", oid::INT8),
        ("sum", oid::INT8),
        ("min", oid::TEXT),
        ("max", oid::DATE),
        ("every", oid::BOOL),
        ("any", oid::BOOL),
        ("avg", oid::INT8),
        ("avg_count", oid::INT8),
        ("fsum", oid::FLOAT8),
    ];
    let kinds = [
        AggKind::Count,
        AggKind::Sum,
        AggKind::Min,
        AggKind::Max,
        AggKind::BoolAnd,
        AggKind::BoolOr,
        AggKind::Avg { count_column: 7 },
        AggKind::Sum,
    ];
    let cols_of = [0, 1, 2, 3, 4, 5, 6, 8];
    let aggregates = kinds
        .iter()
        .zip(cols_of)
        .map(|(k, c)| Aggregate {
            column: c,
            kind: *k,
        })
        .collect();
    let spec = MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates,
        }),
        hidden_columns: 0,
        ..Default::default()
    };
    let a = select(
        &cols,
        &[&[
            Some("2"),
            Some("3"),
            Some("b"),
            Some("2020-01-01"),
            Some("t"),
            Some("f"),
            Some("3"),
            Some("2"),
            Some("0.1"),
        ]],
    );
    let b = select(
        &cols,
        &[&[
            Some("0"),
            None,
            None,
            None,
            None,
            None,
            None,
            Some("0"),
            None,
        ]],
    );
    let c = select(
        &cols,
        &[&[
            Some("1"),
            Some("4"),
            Some("a"),
            Some("2021-06-01"),
            Some("f"),
            Some("t"),
            Some("4"),
            Some("1"),
            Some("0.2"),
        ]],
    );
    let out = run(spec, vec![a, b, c]).unwrap();
    assert_eq!(
        out[0],
        "T count:20,sum:20,min:25,max:1082,every:16,any:16,avg:1700,avg_count:20,fsum:701"
    );
    // avg(1,2,4) in PostgreSQL 15 prints 2.3333333333333333.
    assert_eq!(
        out[1..],
        [
            "D 3|7|a|2021-06-01|f|t|2.3333333333333333|3|0.30000000000000004",
            "C SELECT 1"
        ]
    );
}

#[test]
fn empty_input_aggregates() {
    let cols = [
        ("count", oid::INT8),
        ("sum", oid::NUMERIC),
        ("avg", oid::NUMERIC),
        ("c", oid::INT8),
    ];
    let aggregates = vec![
        Aggregate {
            column: 0,
            kind: AggKind::Count,
        },
        Aggregate {
            column: 1,
            kind: AggKind::Sum,
        },
        Aggregate {
            column: 2,
            kind: AggKind::Avg { count_column: 3 },
        },
    ];
    let spec = MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates,
        }),
        hidden_columns: 1,
        ..Default::default()
    };
    let row: &[Option<&str>] = &[Some("0"), None, None, Some("0")];
    let out = run(spec, vec![select(&cols, &[row]), select(&cols, &[row])]).unwrap();
    assert_eq!(
        out,
        [
            "T count:20,sum:1700,avg:1700",
            "D 0|NULL|NULL",
            "C SELECT 1"
        ]
    );
}

#[test]
fn grouped_aggregates_with_null_group_order_and_limit() {
    let cols = [
        ("g", oid::TEXT),
        ("n", oid::INT8),
        ("s", oid::NUMERIC),
        ("c", oid::INT8),
    ];
    let aggregates = vec![
        Aggregate {
            column: 1,
            kind: AggKind::Count,
        },
        Aggregate {
            column: 2,
            kind: AggKind::Avg { count_column: 3 },
        },
    ];
    let agg = AggregateSpec {
        group_by: vec![0],
        aggregates,
    };
    let a = select(
        &cols,
        &[
            &[Some("x"), Some("2"), Some("0.1"), Some("2")],
            &[None, Some("1"), Some("5"), Some("1")],
        ],
    );
    let b = select(
        &cols,
        &[
            &[Some("y"), Some("1"), Some("1"), Some("1")],
            &[Some("x"), Some("1"), Some("0.2"), Some("1")],
            &[None, Some("1"), Some("7"), Some("1")],
        ],
    );
    let spec = MergeSpec {
        aggregate: Some(agg.clone()),
        hidden_columns: 1,
        ..Default::default()
    };
    let out = run(spec, vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(
        out,
        [
            "T g:25,n:20,s:1700",
            "D x|3|0.10000000000000000000",
            "D NULL|2|6.0000000000000000",
            "D y|1|1.00000000000000000000",
            "C SELECT 3"
        ]
    );
    // ORDER BY avg DESC LIMIT 2 OFFSET 1, applied after aggregation.
    let key = SortKey {
        column: 2,
        descending: true,
        nulls_first: true,
    };
    let spec = MergeSpec {
        aggregate: Some(agg.clone()),
        hidden_columns: 1,
        order_by: vec![key],
        limit: Some(2),
        offset: 1,
        ..Default::default()
    };
    let out = run(spec, vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(
        out[1..],
        [
            "D y|1|1.00000000000000000000",
            "D x|3|0.10000000000000000000",
            "C SELECT 2"
        ]
    );
    // ORDER BY g (NULLS LAST by default for ASC).
    let spec = MergeSpec {
        aggregate: Some(agg),
        hidden_columns: 1,
        order_by: vec![asc(0)],
        ..Default::default()
    };
    let out = run(spec, vec![a, b]).unwrap();
    assert_eq!(
        out[1..4],
        [
            "D x|3|0.10000000000000000000",
            "D y|1|1.00000000000000000000",
            "D NULL|2|6.0000000000000000"
        ]
    );
}

#[test]
fn numeric_sums_are_exact() {
    let cols = [("s", oid::NUMERIC)];
    let aggregates = vec![Aggregate {
        column: 0,
        kind: AggKind::Sum,
    }];
    let spec = MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates,
        }),
        ..Default::default()
    };
    let out = run(
        spec.clone(),
        vec![
            select(&cols, &[&[Some("0.1")]]),
            select(&cols, &[&[Some("0.2")]]),
        ],
    )
    .unwrap();
    assert_eq!(out[1], "D 0.3");
    let big = "99999999999999999999999999999999999999.99";
    let out = run(
        spec.clone(),
        vec![
            select(&cols, &[&[Some(big)]]),
            select(&cols, &[&[Some(big)]]),
            select(&cols, &[&[Some("-0.98")]]),
        ],
    )
    .unwrap();
    assert_eq!(out[1], "D 199999999999999999999999999999999999999.00");
    // sum(int8) is numeric in PostgreSQL: beyond i64 is fine.
    let m = i64::MAX.to_string();
    let out = run(
        spec,
        vec![select(&cols, &[&[Some(&m)]]), select(&cols, &[&[Some(&m)]])],
    )
    .unwrap();
    assert_eq!(out[1], "D 18446744073709551614");
}

#[test]
fn unsupported_and_mismatched_shapes() {
    let agg = |kind| MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates: vec![Aggregate { column: 0, kind }],
        }),
        ..Default::default()
    };
    let interval = select(&[("i", 1186)], &[&[Some("1 day")]]);
    assert!(matches!(
        run(agg(AggKind::Sum), vec![interval.clone()]),
        Err(MergeError::Unsupported(_))
    ));
    let ordered = MergeSpec {
        order_by: vec![asc(0)],
        ..Default::default()
    };
    assert!(matches!(
        run(ordered, vec![interval]),
        Err(MergeError::Unsupported(_))
    ));
    let r4 = select(
        &[("r", oid::FLOAT4), ("c", oid::INT8)],
        &[&[Some("1.5"), Some("1")]],
    );
    assert!(matches!(
        run(agg(AggKind::Avg { count_column: 1 }), vec![r4]),
        Err(MergeError::Unsupported(_))
    ));
    let two = select(&[("a", oid::INT4), ("b", oid::INT4)], &[]);
    let err = run(MergeSpec::default(), vec![ints(&[1]), two]).unwrap_err();
    assert!(matches!(err, MergeError::Mismatch(_)), "{err}");
    let text = select(&[("x", oid::TEXT)], &[]);
    assert!(matches!(
        run(MergeSpec::default(), vec![ints(&[1]), text]),
        Err(MergeError::Mismatch(_))
    ));
}

#[test]
fn errors_pass_through_and_notices_forward() {
    let mut e = BytesMut::new();
    messages::error_response(
        &mut e,
        messages::Severity::Error,
        "22012",
        "division by zero",
        None,
    );
    let mut n = BytesMut::new();
    messages::notice_response(&mut n, "00000", "hello");
    let mut shard1 = ints(&[2]);
    shard1.insert(1, n.to_vec());
    let out = run(MergeSpec::default(), vec![ints(&[1]), shard1.clone()]).unwrap();
    assert_eq!(out, ["T x:23", "D 1", "N", "D 2", "C SELECT 2"]);
    match run(MergeSpec::default(), vec![ints(&[1]), vec![e.to_vec()]]) {
        Err(MergeError::Server(b)) => assert_eq!(&b[..], &e[..]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn command_tags_are_summed() {
    let tags = |t: &[&str]| {
        run(
            MergeSpec::default(),
            t.iter().map(|t| vec![cc(t)]).collect(),
        )
        .unwrap()
    };
    assert_eq!(tags(&["UPDATE 3", "UPDATE 0", "UPDATE 4"]), ["C UPDATE 7"]);
    assert_eq!(tags(&["INSERT 0 2", "INSERT 0 5"]), ["C INSERT 0 7"]);
    assert_eq!(tags(&["DELETE 1", "DELETE 1"]), ["C DELETE 2"]);
    assert_eq!(tags(&["COPY 10", "COPY 5"]), ["C COPY 15"]);
    assert_eq!(tags(&["MERGE 1", "MERGE 2"]), ["C MERGE 3"]);
    // CREATE TABLE AS: a SELECT tag without rows keeps the shards' counts.
    assert_eq!(tags(&["SELECT 4", "SELECT 5"]), ["C SELECT 9"]);
    assert_eq!(tags(&["CREATE TABLE", "CREATE TABLE"]), ["C CREATE TABLE"]);
    assert!(run(
        MergeSpec::default(),
        vec![vec![cc("UPDATE 1")], vec![cc("DELETE 1")]]
    )
    .is_err());
    let empty = vec![vec![b"I\0\0\0\x04".to_vec()], vec![b"I\0\0\0\x04".to_vec()]];
    assert_eq!(run(MergeSpec::default(), empty).unwrap(), ["I"]);
    let suspended = |v| {
        let mut s = ints(&[v]);
        *s.last_mut().unwrap() = b"s\0\0\0\x04".to_vec();
        s
    };
    assert_eq!(
        run(MergeSpec::default(), vec![ints(&[1]), suspended(2)]).unwrap(),
        ["T x:23", "D 1", "D 2", "s"]
    );
    assert_eq!(
        run(MergeSpec::default(), vec![]).unwrap(),
        Vec::<String>::new()
    );
    // INSERT ... RETURNING: rows forwarded, count summed from the tags.
    let ret = |v: i64| {
        let mut s = ints(&[v]);
        *s.last_mut().unwrap() = cc("INSERT 0 1");
        s
    };
    assert_eq!(
        run(MergeSpec::default(), vec![ret(1), ret(2)]).unwrap(),
        ["T x:23", "D 1", "D 2", "C INSERT 0 2"]
    );
}

#[test]
fn extended_protocol_messages_once_and_describe() {
    let parse_bind = |mut s: Vec<Vec<u8>>| {
        s.insert(0, b"2\0\0\0\x04".to_vec());
        s.insert(0, b"1\0\0\0\x04".to_vec());
        s
    };
    let out = run(
        MergeSpec::default(),
        vec![parse_bind(ints(&[1])), parse_bind(ints(&[2]))],
    )
    .unwrap();
    assert_eq!(out, ["1", "2", "T x:23", "D 1", "D 2", "C SELECT 2"]);
    // Execute without RowDescription: the driver supplies the statement's description.
    let spec = MergeSpec {
        order_by: vec![SortKey {
            column: 0,
            descending: true,
            nulls_first: true,
        }],
        ..Default::default()
    };
    let mut m = Merger::new(spec, 2);
    m.describe(&rd(&[("x", oid::INT4)]), &[]).unwrap();
    let shards: Vec<Vec<Vec<u8>>> = [ints(&[9, 1]), ints(&[10, 5])]
        .into_iter()
        .map(|s| s[1..].to_vec())
        .collect();
    let mut next = [0; 2];
    let mut out = BytesMut::new();
    while let Some(i) = m.next_needed() {
        m.push(i, &shards[i][next[i]], &mut out).unwrap();
        next[i] += 1;
    }
    m.finish(&mut out).unwrap();
    assert_eq!(render(&out), ["D 10", "D 9", "D 5", "D 1", "C SELECT 4"]);
}

#[test]
fn copy_out_is_concatenated() {
    let shard = |rows: &[&str]| {
        let mut s = vec![b"H\0\0\0\x07\0\0\0".to_vec()];
        for r in rows {
            let mut m = vec![b'd'];
            m.extend_from_slice(&((r.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(r.as_bytes());
            s.push(m);
        }
        s.push(b"c\0\0\0\x04".to_vec());
        s.push(cc(&format!("COPY {}", rows.len())));
        s
    };
    let out = run(
        MergeSpec::default(),
        vec![shard(&["1\n", "2\n"]), shard(&["3\n"])],
    )
    .unwrap();
    assert_eq!(out, ["H", "d", "d", "d", "c", "C COPY 3"]);
}

#[test]
fn plain_fast_path_offset_limit_and_any_shard_order() {
    let spec = MergeSpec {
        limit: Some(2),
        offset: 1,
        ..Default::default()
    };
    let out = run(spec, vec![ints(&[1, 2]), ints(&[3, 4])]).unwrap();
    assert_eq!(out, ["T x:23", "D 2", "D 3", "C SELECT 2"]);
    // Aggregates accept whatever shard has data first.
    let cols = [("n", oid::INT8)];
    let spec = MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates: vec![Aggregate {
                column: 0,
                kind: AggKind::Count,
            }],
        }),
        ..Default::default()
    };
    let shards = [
        select(&cols, &[&[Some("5")]]),
        select(&cols, &[&[Some("6")]]),
    ];
    let mut m = Merger::new(spec, 2);
    let mut out = BytesMut::new();
    for (i, msg) in [(1, 0), (0, 0), (1, 1), (1, 2), (0, 1), (0, 2)] {
        assert!(m.accepts(i));
        m.push(i, &shards[i][msg], &mut out).unwrap();
    }
    assert!(!m.accepts(0) && m.next_needed().is_none());
    m.finish(&mut out).unwrap();
    assert_eq!(render(&out), ["T n:20", "D 11", "C SELECT 1"]);
}

#[test]
fn short_rows_are_a_mismatch() {
    let mut s = ints(&[1]);
    s.insert(2, dr(&[Some("1"), Some("2")]));
    let spec = MergeSpec {
        order_by: vec![asc(0)],
        ..Default::default()
    };
    assert!(matches!(run(spec, vec![s]), Err(MergeError::Mismatch(_))));
}

/// Random sorted shards with NULLs and duplicates against a reference sort of all rows.
#[test]
fn kway_merge_matches_reference_sort() {
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..300 {
        let descending = rnd(2) == 1;
        let nulls_first = rnd(2) == 1;
        let key = SortKey {
            column: 0,
            descending,
            nulls_first,
        };
        let nshards = 1 + rnd(4) as usize;
        let mut all: Vec<(Option<i64>, usize)> = Vec::new();
        let mut shards = Vec::new();
        for s in 0..nshards {
            let mut vals: Vec<Option<i64>> = (0..rnd(6))
                .map(|_| (rnd(5) != 0).then(|| rnd(7) as i64 - 3))
                .collect();
            let ord = |a: &Option<i64>, b: &Option<i64>| match (a, b) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, _) => {
                    if nulls_first {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                }
                (_, None) => {
                    if nulls_first {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Less
                    }
                }
                (Some(x), Some(y)) => {
                    if descending {
                        y.cmp(x)
                    } else {
                        x.cmp(y)
                    }
                }
            };
            vals.sort_by(ord);
            let mut msgs = vec![rd(&[("x", oid::INT8), ("shard", oid::INT4)])];
            for v in &vals {
                let sv = s.to_string();
                msgs.push(dr(&[v.map(|v| v.to_string()).as_deref(), Some(&sv)]));
                all.push((*v, s));
            }
            msgs.push(cc(&format!("SELECT {}", vals.len())));
            shards.push(msgs);
            all.sort_by(|a, b| ord(&a.0, &b.0).then(a.1.cmp(&b.1)));
        }
        let limit = (rnd(3) != 0).then(|| rnd(8));
        let offset = rnd(3);
        let spec = MergeSpec {
            order_by: vec![key],
            limit,
            offset,
            ..Default::default()
        };
        let out = run(spec, shards).unwrap();
        let want: Vec<String> = all
            .iter()
            .skip(offset as usize)
            .take(limit.unwrap_or(u64::MAX) as usize)
            .map(|(v, s)| format!("D {}|{s}", v.map_or("NULL".into(), |v| v.to_string())))
            .collect();
        assert_eq!(out[1..out.len() - 1], want[..]);
        assert_eq!(out.last().unwrap(), &format!("C SELECT {}", want.len()));
    }
}

#[test]
fn binary_numeric_sums_and_avg_of_binary_ints() {
    use super::decimal::Numeric;
    let cols = [("sum", oid::NUMERIC), ("avg", oid::INT8), ("c", oid::INT8)];
    let shard = |s: &str, a: i64, c: i64| {
        let mut v = vec![rd_fmt(&cols, 1)];
        let s = Numeric::parse(s.as_bytes()).unwrap().to_binary();
        let (a, c) = (a.to_be_bytes(), c.to_be_bytes());
        let mut row = BytesMut::new();
        super::wire::put_data_row(
            &mut row,
            [Some(&s[..]), Some(&a[..]), Some(&c[..])].into_iter(),
        );
        v.push(row.to_vec());
        v.push(cc("SELECT 1"));
        v
    };
    let spec = MergeSpec {
        aggregate: Some(AggregateSpec {
            group_by: vec![],
            aggregates: vec![
                Aggregate {
                    column: 0,
                    kind: AggKind::Sum,
                },
                Aggregate {
                    column: 1,
                    kind: AggKind::Avg { count_column: 2 },
                },
            ],
        }),
        hidden_columns: 1,
        ..Default::default()
    };
    let out = run_raw(spec, &[shard("1.5", 10, 3), shard("2.25", 5, 1)]).unwrap();
    let mut rest = &out[..];
    let mut values = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (msg, tail) = rest.split_at(len + 1);
        rest = tail;
        if msg[0] == b'D' {
            let mut c = Cursor::new(&msg[5..]);
            for _ in 0..c.i16().unwrap() {
                let l = c.i32().unwrap() as usize;
                let v = Numeric::from_binary(c.take(l).unwrap()).unwrap();
                values.push(String::from_utf8(v.format()).unwrap());
            }
        }
    }
    // avg(int) of 10+5 over 4 rows, with PostgreSQL's scale: 3.7500000000000000.
    assert_eq!(values, ["3.75", "3.7500000000000000"]);
    assert_eq!(render(&out)[0], "T sum:1700,avg:1700");
}
