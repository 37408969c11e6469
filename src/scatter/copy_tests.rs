use super::*;

/// Splits `data` fed as two chunks cut at `cut`, hashing keys by their first byte.
fn split(s: &mut CopySplitter, data: &[u8], cut: usize) -> (Vec<Option<Vec<u8>>>, Vec<Vec<u8>>) {
    let mut keys = Vec::new();
    let mut shards = vec![Vec::new(); 2];
    for chunk in [&data[..cut], &data[cut..]] {
        s.feed::<String>(
            chunk,
            |k| {
                keys.push(k.map(<[u8]>::to_vec));
                Ok(k.and_then(|k| k.first()).map_or(0, |b| (*b % 2) as usize))
            },
            |shard, row| shards[shard].extend_from_slice(row),
        )
        .unwrap();
    }
    s.finish::<String>(
        |k| {
            keys.push(k.map(<[u8]>::to_vec));
            Ok(k.and_then(|k| k.first()).map_or(0, |b| (*b % 2) as usize))
        },
        |shard, row| shards[shard].extend_from_slice(row),
    )
    .unwrap();
    (keys, shards)
}

fn text(key: usize) -> CopySplitter {
    CopySplitter::new(
        CopyFormat::Text,
        b'\t',
        b'"',
        b'"',
        false,
        b"\\N".to_vec(),
        key,
    )
}

fn csv(key: usize, header: bool) -> CopySplitter {
    CopySplitter::new(CopyFormat::Csv, b',', b'"', b'"', header, Vec::new(), key)
}

fn k(s: &[u8]) -> Option<Vec<u8>> {
    Some(s.to_vec())
}

#[test]
fn text_rows_at_every_cut() {
    // Multi-byte UTF-8, escapes, escaped tab in the key, \r\n, NULL key, final row sans newline.
    let data = "1\tcafé\n2\\t\tx\\ny\r\n\\N\tz\n\\101\\x42c\t\\\\\n\\\\N\tlast".as_bytes();
    for cut in 0..=data.len() {
        let mut s = text(0);
        let (keys, shards) = split(&mut s, data, cut);
        assert_eq!(
            keys,
            vec![k(b"1"), k(b"2\t"), None, k(b"ABc"), k(b"\\N")],
            "cut {cut}"
        );
        assert_eq!(s.rows(), 5);
        let all: Vec<u8> = shards.concat();
        assert_eq!(
            all.len(),
            data.len() + 1,
            "every byte forwarded once, plus the final newline"
        );
        assert_eq!(&shards[1][..], "1\tcafé\n\\101\\x42c\t\\\\\n".as_bytes());
    }
}

#[test]
fn text_key_in_later_column_and_end_marker() {
    let data = b"a\t7\nb\t\\N\nc\t8\n\\.\nignored\tjunk\n";
    for cut in 0..=data.len() {
        let mut s = text(1);
        let (keys, shards) = split(&mut s, data, cut);
        assert_eq!(keys, vec![k(b"7"), None, k(b"8")], "cut {cut}");
        assert!(s.ended());
        assert_eq!(shards.concat().len(), b"a\t7\nb\t\\N\nc\t8\n".len());
    }
}

#[test]
fn escaped_newline_is_not_a_row_end() {
    let mut s = text(0);
    let (keys, _) = split(&mut s, b"x\\\ny\tq\n", 3);
    assert_eq!(keys, vec![k(b"x\ny")]);
}

#[test]
fn csv_quotes_header_and_nulls_at_every_cut() {
    let data = b"id,name\n\"a,1\",\"multi\nline \"\"quoted\"\"\"\n,empty is null\n\"\",quoted empty\n\"x\"\"y\",z\r\nplain,\xc3\xa9";
    for cut in 0..=data.len() {
        let mut s = csv(0, true);
        let (keys, shards) = split(&mut s, data, cut);
        assert_eq!(
            keys,
            vec![k(b"a,1"), None, k(b""), k(b"x\"y"), k(b"plain")],
            "cut {cut}"
        );
        assert_eq!(s.rows(), 5);
        // The header went nowhere.
        assert_eq!(shards.concat().len(), data.len() - b"id,name\n".len() + 1);
    }
}

#[test]
fn csv_key_in_second_column_with_backslash_escape() {
    let mut s = CopySplitter::new(
        CopyFormat::Csv,
        b';',
        b'\'',
        b'\\',
        false,
        b"NULL".to_vec(),
        1,
    );
    let data = b"1;'it\\'s';x\n2;NULL\n3;'NULL'\n4;'a\\b'\n";
    for cut in 0..=data.len() {
        let mut s2 = CopySplitter::new(
            CopyFormat::Csv,
            b';',
            b'\'',
            b'\\',
            false,
            b"NULL".to_vec(),
            1,
        );
        let (keys, _) = split(&mut s2, data, cut);
        assert_eq!(
            keys,
            vec![k(b"it's"), None, k(b"NULL"), k(b"a\\b")],
            "cut {cut}"
        );
    }
    let err = s.feed::<String>(b"5\n", |_| Ok(0), |_, _| {}).unwrap_err();
    assert!(
        matches!(err, CopySplitError::Malformed { row: 1, .. }),
        "{err}"
    );
}

#[test]
fn long_rows_and_placement_errors() {
    let mut s = text(0).with_max_row(8);
    let err = s
        .feed::<String>(b"12345", |_| Ok(0), |_, _| {})
        .and_then(|_| s.feed::<String>(b"6789", |_| Ok(0), |_, _| {}));
    assert!(matches!(
        err,
        Err(CopySplitError::RowTooLong { row: 1, limit: 8 })
    ));
    let mut s = text(0);
    let err = s
        .feed(b"k\n", |_| Err("no shard for k"), |_, _| {})
        .unwrap_err();
    assert_eq!(err.to_string(), "no shard for k");
    let mut s = csv(0, false);
    s.feed::<String>(b"\"open\n", |_| Ok(0), |_, _| {}).unwrap();
    assert!(s.finish::<String>(|_| Ok(0), |_, _| {}).is_err());
}

/// A binary COPY tuple of the given fields (None = NULL).
fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
    let mut t = (fields.len() as i16).to_be_bytes().to_vec();
    for f in fields {
        match f {
            None => t.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                t.extend_from_slice(&(v.len() as i32).to_be_bytes());
                t.extend_from_slice(v);
            }
        }
    }
    t
}

fn binary(key: usize) -> CopySplitter {
    CopySplitter::new(
        CopyFormat::Binary,
        b'\t',
        b'"',
        b'"',
        false,
        Vec::new(),
        key,
    )
}

#[test]
fn binary_tuples_at_every_cut() {
    // A client header with a 3-byte extension, tuples with the key in field 1 (a NULL key and
    // a key whose bytes look like a trailer among them), then the trailer and stray bytes.
    let rows = [
        tuple(&[Some(b"aa"), Some(b"3"), None]),
        tuple(&[None, Some(b"\xff\xff"), Some(b"x")]),
        tuple(&[Some(b""), None, Some(b"long value")]),
        tuple(&[Some(b"z"), Some(b"4"), Some(b"")]),
    ];
    let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
    data.extend_from_slice(&0i32.to_be_bytes());
    data.extend_from_slice(&3i32.to_be_bytes());
    data.extend_from_slice(b"ext");
    for r in &rows {
        data.extend_from_slice(r);
    }
    data.extend_from_slice(&BINARY_TRAILER);
    data.extend_from_slice(b"ignored");
    for cut in 0..=data.len() {
        let mut s = binary(1);
        let (keys, shards) = split(&mut s, &data, cut);
        assert_eq!(
            keys,
            vec![k(b"3"), k(b"\xff\xff"), None, k(b"4")],
            "cut {cut}"
        );
        // Odd first key bytes go to shard 1: "3" and 0xff; the rest to shard 0, in order.
        assert_eq!(
            shards[1],
            [rows[0].clone(), rows[1].clone()].concat(),
            "cut {cut}"
        );
        assert_eq!(
            shards[0],
            [rows[2].clone(), rows[3].clone()].concat(),
            "cut {cut}"
        );
        assert!(s.ended() && s.rows() == 4);
    }
}

#[test]
fn binary_errors_name_the_problem() {
    let fails = |data: &[u8], key: usize| {
        let mut s = binary(key);
        let place = |_: Option<&[u8]>| Ok::<usize, String>(0);
        match s.feed(data, place, |_, _| {}) {
            Err(e) => e.to_string(),
            Ok(()) => s.finish(place, |_, _| {}).unwrap_err().to_string(),
        }
    };
    let mut header = b"PGCOPY\n\xff\r\n\0".to_vec();
    header.extend_from_slice(&[0; 8]);
    assert!(fails(b"1\t2\n3\t4\n5\t6\n7\t8\n9\t10\n", 0).contains("signature"));
    let mut oids = header.clone();
    oids[12] = 1; // flags bit 16
    assert!(fails(&oids, 0).contains("OIDS"));
    let short = [header.clone(), tuple(&[Some(b"1")])].concat();
    assert!(fails(&short, 1).contains("no field 2"));
    let cut = [header.clone(), tuple(&[Some(b"12345")])].concat();
    assert!(fails(&cut[..cut.len() - 2], 0).contains("ends inside a tuple"));
    let negative = [header.clone(), vec![0, 1, 0xff, 0xff, 0xff, 0xf0]].concat();
    assert!(fails(&negative, 0).contains("field length -16"));
    let mut s = binary(0).with_max_row(16);
    let big = [header, tuple(&[Some(&[7u8; 40])])].concat();
    let r = s.feed(&big[..30], |_| Ok::<usize, String>(0), |_, _| {});
    assert!(matches!(r, Err(CopySplitError::RowTooLong { .. })), "{r:?}");
}
