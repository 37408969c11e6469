//! Literal stripping for simple-protocol statements: `… WHERE aid = 48213` and `… = 7` share one
//! cached plan as `… WHERE aid = $1`, with the literals as its parameters. Without it every
//! distinct literal is a plan-cache miss (a full parse, ≈20 µs).

use smallvec::SmallVec;
use std::borrow::Cow;
use std::fmt::Write;

/// The literals' text values in parameter order: borrowed from the statement unless a
/// doubled quote had to be made single.
pub type Literals<'a> = SmallVec<[Cow<'a, [u8]>; 4]>;

/// Replaces numeric and plain string literals with parameters, writing the statement with
/// `$1…$n` in their place to `text` (cleared first: the caller keeps it between statements,
/// so stripping a statement does not allocate). None when the text has nothing to replace, or
/// anything this scanner does not handle exactly (escape strings, dollar quotes, existing
/// parameters, comments that could carry hints): the caller then plans the text as is.
pub fn strip<'a>(sql: &'a str, text: &mut String) -> Option<Literals<'a>> {
    let b = sql.as_bytes();
    text.clear();
    let mut literals = Literals::new();
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
                let mut j = i + 1;
                let mut doubled = false;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => {
                            doubled = true;
                            j += 2;
                        }
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                let body = &b[i + 1..j];
                literals.push(if doubled {
                    Cow::Owned(undouble_quotes(body))
                } else {
                    Cow::Borrowed(body)
                });
                text.push_str(&sql[last..i]);
                let _ = write!(text, "${}", literals.len());
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
                literals.push(Cow::Borrowed(&b[i..j]));
                text.push_str(&sql[last..i]);
                let _ = write!(text, "${}", literals.len());
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
    Some(literals)
}

/// A string literal's body with each doubled quote made single.
fn undouble_quotes(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len());
    let mut k = 0;
    while k < body.len() {
        v.push(body[k]);
        k += if body[k] == b'\'' { 2 } else { 1 };
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stripped text and literals of `sql`, through a buffer holding an earlier text.
    fn stripped(sql: &str) -> Option<(String, Vec<Vec<u8>>)> {
        let mut text = String::from("left over from an earlier statement");
        let literals = strip(sql, &mut text)?;
        Some((text, literals.iter().map(|l| l.to_vec()).collect()))
    }

    #[test]
    fn literals_become_parameters() {
        let (text, literals) =
            stripped("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").unwrap();
        assert_eq!(
            text,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(literals, vec![b"48213".to_vec()]);
        let (text, literals) =
            stripped("UPDATE t1 SET v = v + -12 WHERE name = 'o''brien' AND x2 = 3.5").unwrap();
        assert_eq!(
            text,
            "UPDATE t1 SET v = v + -$1 WHERE name = $2 AND x2 = $3"
        );
        assert_eq!(
            literals,
            vec![b"12".to_vec(), b"o'brien".to_vec(), b"3.5".to_vec()]
        );
        let (text, literals) = stripped(r#"SELECT "col 1" FROM "T9" WHERE k = '{1,2}'"#).unwrap();
        assert_eq!(text, r#"SELECT "col 1" FROM "T9" WHERE k = $1"#);
        assert_eq!(literals, vec![b"{1,2}".to_vec()]);
    }

    #[test]
    fn doubled_quotes_are_made_single() {
        let (text, literals) = stripped("SELECT 'it''''s', '''', '', 'x''', 10").unwrap();
        assert_eq!(text, "SELECT $1, $2, $3, $4, $5");
        assert_eq!(
            literals,
            vec![
                b"it''s".to_vec(),
                b"'".to_vec(),
                b"".to_vec(),
                b"x'".to_vec(),
                b"10".to_vec()
            ]
        );
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
            assert_eq!(stripped(sql), None, "{sql}");
        }
    }
}
