//! Literal stripping for simple-protocol statements: `… WHERE aid = 48213` and `… = 7` share one
//! cached plan as `… WHERE aid = $1`, with the literals as its parameters. Without it every
//! distinct literal is a plan-cache miss (a full parse, ≈20 µs).

/// A statement with its literals replaced by `$1…$n`, and the literals' text values.
#[derive(Debug, PartialEq, Eq)]
pub struct Stripped {
    pub text: String,
    pub literals: Vec<Vec<u8>>,
}

/// Replaces numeric and plain string literals with parameters. None when the text has nothing
/// to replace, or anything this scanner does not handle exactly (escape strings, dollar quotes,
/// existing parameters, comments that could carry hints): the caller then plans the text as is.
pub fn strip(sql: &str) -> Option<Stripped> {
    let b = sql.as_bytes();
    let mut text = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'$' | b'-' if i + 1 < b.len() && (c == b'$' || b[i + 1] == b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b'"' => {
                // Quoted identifier: copied through.
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'\'' => {
                // E'…', U&'…', B'…', X'…' and N'…' have their own rules: not stripped.
                if i > 0
                    && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'&' || b[i - 1] == b'_')
                {
                    return None;
                }
                let mut value = Vec::new();
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => {
                            value.push(b'\'');
                            j += 2;
                        }
                        Some(b'\'') => break,
                        Some(&ch) => {
                            value.push(ch);
                            j += 1;
                        }
                    }
                }
                text.push_str(&sql[last..i]);
                literals.push(value);
                text.push('$');
                text.push_str(&literals.len().to_string());
                i = j + 1;
                last = i;
            }
            b'0'..=b'9'
                if i == 0
                    || !(b[i - 1].is_ascii_alphanumeric()
                        || b[i - 1] == b'_'
                        || b[i - 1] == b'.'
                        || b[i - 1] == b'$') =>
            {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                // 1e5, 0x1F, 1_000 and the like: left to the full parse.
                if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_') {
                    return None;
                }
                text.push_str(&sql[last..i]);
                literals.push(b[i..j].to_vec());
                text.push('$');
                text.push_str(&literals.len().to_string());
                i = j;
                last = i;
            }
            _ => i += 1,
        }
    }
    if literals.is_empty() {
        return None;
    }
    text.push_str(&sql[last.min(sql.len())..]);
    Some(Stripped { text, literals })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_parameters() {
        let s = strip("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").unwrap();
        assert_eq!(
            s.text,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(s.literals, vec![b"48213".to_vec()]);
        let s = strip("UPDATE t1 SET v = v + -12 WHERE name = 'o''brien' AND x2 = 3.5").unwrap();
        assert_eq!(
            s.text,
            "UPDATE t1 SET v = v + -$1 WHERE name = $2 AND x2 = $3"
        );
        assert_eq!(
            s.literals,
            vec![b"12".to_vec(), b"o'brien".to_vec(), b"3.5".to_vec()]
        );
        let s = strip(r#"SELECT "col 1" FROM "T9" WHERE k = '{1,2}'"#).unwrap();
        assert_eq!(s.text, r#"SELECT "col 1" FROM "T9" WHERE k = $1"#);
    }

    #[test]
    fn what_it_cannot_strip_exactly_is_left_alone() {
        for sql in [
            "SELECT E'a\\nb'",
            "SELECT $$x$$",
            "SELECT 1e5",
            "SELECT 0x1F",
            "SELECT 1 -- c",
            "/* pgshard: shard=1 */ SELECT 1",
            "SELECT 'unterminated",
            "SELECT x FROM t",
            "SELECT * FROM t WHERE a = $1",
        ] {
            assert_eq!(strip(sql), None, "{sql}");
        }
    }
}
