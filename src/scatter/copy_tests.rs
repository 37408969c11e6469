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
