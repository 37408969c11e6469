//! What the pooler must know about a statement without parsing it: session settings it
//! changes and session state it creates that cannot follow a client across server connections.

/// The pooling-relevant meaning of a simple query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryKind {
    /// Nothing the pooler must track.
    Plain,
    /// `SET [SESSION] name = value`: value is the SQL text after `=`/`TO`.
    Set { name: String, value: String },
    /// `SET LOCAL …`: lasts only for the transaction, nothing to carry.
    SetLocal,
    /// `RESET name` or `SET name TO DEFAULT`.
    Reset { name: String },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`.
    DiscardAll,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate { name: String },
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// Creates session state that must keep this server connection with this client.
    Pin { reason: &'static str },
}

/// Splits SQL text into statements at top-level semicolons, honouring quotes, dollar quotes
/// and comments. Empty statements are dropped.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if i + 1 < b.len() && b[i + 1] == q {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 1;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    i += 1;
                }
            }
            b'$' => {
                // A dollar-quote tag: $$ or $tag$ where tag is an identifier.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'));
                if let Some(off) = tag_end {
                    let end = i + 1 + off;
                    if b[end] == b'$' && !b[i + 1..end].first().is_some_and(|c| c.is_ascii_digit())
                    {
                        let tag = &b[i..=end];
                        let body = end + 1;
                        match find(&b[body..], tag) {
                            Some(p) => i = body + p + tag.len() - 1,
                            None => i = b.len(),
                        }
                    }
                }
            }
            b';' => {
                let s = sql[start..i].trim();
                if !s.is_empty() {
                    out.push(s);
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    let s = sql[start.min(sql.len())..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Lower-cased words of a statement, comments skipped, up to `max` words.
fn words(stmt: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = stmt;
    while out.len() < max {
        rest = skip_space_and_comments(rest);
        if rest.is_empty() {
            break;
        }
        let end = word_end(rest, |c| {
            c.is_whitespace() || c == '=' || c == ';' || c == '(' || c == ','
        });
        out.push(rest[..end].to_ascii_lowercase());
        rest = &rest[end..];
    }
    out
}

/// Byte length of the word at the start of `s`: up to the first `stop` character, and at
/// least one whole character (never a slice inside a multi-byte character).
fn word_end(s: &str, stop: impl Fn(char) -> bool) -> usize {
    match s.find(stop) {
        Some(0) | None if s.is_empty() => 0,
        Some(0) => s.chars().next().map_or(0, char::len_utf8),
        Some(i) => i,
        None => s.len(),
    }
}

fn skip_space_and_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix("--") {
            s = r.find('\n').map(|i| &r[i..]).unwrap_or("");
        } else if let Some(r) = s.strip_prefix("/*") {
            s = r.find("*/").map(|i| &r[i + 2..]).unwrap_or("");
        } else {
            return s;
        }
    }
}

/// True when `hay` contains `needle` (lower case ASCII) ignoring ASCII case.
fn contains_ci(hay: &str, needle: &str) -> bool {
    let n = needle.as_bytes();
    hay.as_bytes()
        .windows(n.len())
        .any(|w| w.eq_ignore_ascii_case(n))
}

/// Session state a statement creates that must pin its server connection, if any.
pub fn pin_reason(stmt: &str) -> Option<&'static str> {
    let w = words(stmt, 4);
    let first = w.first().map(String::as_str).unwrap_or("");
    match first {
        "prepare" if w.get(1).map(String::as_str) != Some("transaction") => {
            return Some("SQL PREPARE creates a session-level statement")
        }
        "listen" => {
            return Some("LISTEN needs the same server connection to receive notifications")
        }
        "load" => return Some("LOAD changes the server session"),
        "declare" if contains_ci(stmt, "with hold") => {
            return Some("a WITH HOLD cursor outlives its transaction")
        }
        "create" => {
            let temp = w
                .iter()
                .skip(1)
                .take(2)
                .any(|x| x == "temp" || x == "temporary");
            if temp && !contains_ci(stmt, "on commit drop") {
                return Some("a temporary table lives for the whole session");
            }
        }
        "set"
            if matches!(w.get(1).map(String::as_str), Some("role") | Some("session"))
                && (w.get(1).map(String::as_str) == Some("role")
                    || w.get(2).map(String::as_str) == Some("authorization")) =>
        {
            return Some("SET ROLE / SESSION AUTHORIZATION changes the session's identity")
        }
        _ => {}
    }
    if contains_ci(stmt, "advisory_lock") && !contains_ci(stmt, "advisory_xact_lock") {
        return Some("a session-level advisory lock is held by the server connection");
    }
    None
}

/// Classifies one statement.
pub fn classify_one(stmt: &str) -> QueryKind {
    if let Some(reason) = pin_reason(stmt) {
        return QueryKind::Pin { reason };
    }
    let w = words(stmt, 4);
    match w.first().map(String::as_str) {
        Some("set") => classify_set(stmt, &w),
        Some("reset") => match w.get(1).map(String::as_str) {
            Some("all") => QueryKind::ResetAll,
            Some(name) => QueryKind::Reset {
                name: unquote(name),
            },
            None => QueryKind::Plain,
        },
        Some("discard") if w.get(1).map(String::as_str) == Some("all") => QueryKind::DiscardAll,
        Some("discard") => QueryKind::Pin {
            reason: "DISCARD of part of the session state",
        },
        Some("deallocate") => {
            let name = if w.get(1).map(String::as_str) == Some("prepare") {
                w.get(2)
            } else {
                w.get(1)
            };
            match name.map(String::as_str) {
                Some("all") => QueryKind::DeallocateAll,
                Some(n) => QueryKind::Deallocate { name: unquote(n) },
                None => QueryKind::Plain,
            }
        }
        _ => QueryKind::Plain,
    }
}

fn classify_set(stmt: &str, w: &[String]) -> QueryKind {
    let mut i = 1;
    match w.get(1).map(String::as_str) {
        Some("local") => return QueryKind::SetLocal,
        Some("session") => i = 2,
        Some("transaction") | Some("constraints") => return QueryKind::Plain,
        _ => {}
    }
    let Some(name) = w.get(i) else {
        return QueryKind::Plain;
    };
    // SET TIME ZONE x / SET SCHEMA x / SET NAMES x are spellings of ordinary settings.
    let (name, value_words) = match name.as_str() {
        "time" if w.get(i + 1).map(String::as_str) == Some("zone") => ("timezone".to_string(), 1),
        "schema" => ("search_path".to_string(), 0),
        "names" => ("client_encoding".to_string(), 0),
        n => (unquote(n), 0),
    };
    let value = value_text(stmt, i + 1 + value_words);
    let lower = value.to_ascii_lowercase();
    if lower == "default" || lower == "local" && name == "timezone" {
        return QueryKind::Reset { name };
    }
    if value.is_empty() {
        return QueryKind::Plain;
    }
    QueryKind::Set { name, value }
}

/// The text after the `skip`-th word and an optional `=`/`TO`.
fn value_text(stmt: &str, skip: usize) -> String {
    let mut rest = stmt;
    for _ in 0..skip {
        rest = skip_space_and_comments(rest);
        let end = word_end(rest, |c| {
            c.is_whitespace() || c == '=' || c == '(' || c == ','
        });
        rest = &rest[end..];
    }
    let mut rest = skip_space_and_comments(rest);
    if let Some(r) = rest.strip_prefix('=') {
        rest = r;
    } else if rest.get(..2).is_some_and(|w| w.eq_ignore_ascii_case("to"))
        && rest[2..].starts_with(char::is_whitespace)
    {
        rest = &rest[2..];
    }
    rest.trim().trim_end_matches(';').trim().to_string()
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').to_string()
}

/// First words that may start a statement the pooler must track.
const TRACKED_FIRST_WORDS: &[&str] = &[
    "set",
    "reset",
    "discard",
    "deallocate",
    "prepare",
    "listen",
    "load",
    "declare",
    "create",
];

/// Cheap test, without allocating, that a query can only be `QueryKind::Plain`: most queries
/// start with another keyword, take no advisory lock and hold one statement.
fn surely_plain(sql: &str) -> bool {
    let s = skip_space_and_comments(sql);
    let end = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let first = &s[..end];
    if TRACKED_FIRST_WORDS
        .iter()
        .any(|w| w.eq_ignore_ascii_case(first))
    {
        return false;
    }
    let body = s.trim_end().trim_end_matches(';');
    !body.contains(';') && !contains_ci(body, "advisory")
}

/// Classifies a simple query; several statements with any session effect pin the connection,
/// since their combined effect on settings depends on which of them succeed.
pub fn classify(sql: &str) -> QueryKind {
    if surely_plain(sql) {
        return QueryKind::Plain;
    }
    let stmts = split_statements(sql);
    match stmts.as_slice() {
        [] => QueryKind::Plain,
        [one] => classify_one(one),
        many => {
            for s in many {
                match classify_one(s) {
                    QueryKind::Plain | QueryKind::SetLocal => {}
                    QueryKind::Pin { reason } => return QueryKind::Pin { reason },
                    _ => {
                        return QueryKind::Pin {
                            reason: "a multi-statement query changes session settings; send SET/RESET on its own",
                        }
                    }
                }
            }
            QueryKind::Plain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_respecting_quotes() {
        assert_eq!(
            split_statements("select ';'; select 2;"),
            vec!["select ';'", "select 2"]
        );
        assert_eq!(
            split_statements("do $x$ a; b $x$; select 1"),
            vec!["do $x$ a; b $x$", "select 1"]
        );
        assert_eq!(
            split_statements("select 1 -- ;\n; /* ; */ select 2"),
            vec!["select 1 -- ;", "/* ; */ select 2"]
        );
        assert_eq!(
            split_statements("select $1; select 2"),
            vec!["select $1", "select 2"]
        );
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            classify("SET search_path TO a, b"),
            QueryKind::Set {
                name: "search_path".into(),
                value: "a, b".into()
            }
        );
        assert_eq!(
            classify("set statement_timeout='5s';"),
            QueryKind::Set {
                name: "statement_timeout".into(),
                value: "'5s'".into()
            }
        );
        assert_eq!(
            classify("SET TIME ZONE 'UTC'"),
            QueryKind::Set {
                name: "timezone".into(),
                value: "'UTC'".into()
            }
        );
        assert_eq!(
            classify("set session work_mem = 100"),
            QueryKind::Set {
                name: "work_mem".into(),
                value: "100".into()
            }
        );
        assert_eq!(classify("SET LOCAL work_mem = 100"), QueryKind::SetLocal);
        assert_eq!(
            classify("set work_mem to default"),
            QueryKind::Reset {
                name: "work_mem".into()
            }
        );
        assert_eq!(
            classify("RESET work_mem"),
            QueryKind::Reset {
                name: "work_mem".into()
            }
        );
        assert_eq!(classify("reset all"), QueryKind::ResetAll);
        assert_eq!(
            classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            QueryKind::Plain
        );
    }

    #[test]
    fn pins() {
        for q in [
            "select pg_advisory_lock(1)",
            "LISTEN chan",
            "create temp table t(a int)",
            "CREATE TEMPORARY TABLE t(a int)",
            "declare c cursor with hold for select 1",
            "prepare p as select 1",
            "set role other",
            "BEGIN; SET x.y = 1; COMMIT",
        ] {
            assert!(matches!(classify(q), QueryKind::Pin { .. }), "{q}");
        }
        for q in [
            "select pg_advisory_xact_lock(1)",
            "create temp table t(a int) on commit drop",
            "PREPARE TRANSACTION 'x'",
            "select 1; select 2",
        ] {
            assert!(!matches!(classify(q), QueryKind::Pin { .. }), "{q}");
        }
    }

    #[test]
    fn fast_path_agrees() {
        for q in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "  /* c */ update t set a = 1",
        ] {
            assert!(surely_plain(q), "{q}");
            assert_eq!(classify(q), QueryKind::Plain);
        }
        for q in [
            "set x = 1",
            "SELECT pg_advisory_lock(1)",
            "select 1; set a = 2",
        ] {
            assert!(!surely_plain(q), "{q}");
        }
        assert_eq!(classify("insert into t values (';')"), QueryKind::Plain);
    }

    #[test]
    fn multibyte_text_never_splits_a_character() {
        // Found by the fuzzer: a SET whose value starts with a 4-byte character.
        let q = "set\x0c\x0c\x0c,\u{10c689}(\x0c";
        let _ = classify(q);
        assert_eq!(
            classify("SET x = \u{e9}t\u{e9}"),
            QueryKind::Set {
                name: "x".into(),
                value: "\u{e9}t\u{e9}".into()
            }
        );
        assert_eq!(
            classify("set \u{65e5}\u{672c} to 1"),
            QueryKind::Set {
                name: "\u{65e5}\u{672c}".into(),
                value: "1".into()
            }
        );
        let _ = classify("SET a t\u{10c689}");
    }

    #[test]
    fn deallocate_and_discard() {
        assert_eq!(
            classify("DEALLOCATE s1"),
            QueryKind::Deallocate { name: "s1".into() }
        );
        assert_eq!(classify("deallocate prepare all"), QueryKind::DeallocateAll);
        assert_eq!(classify("DISCARD ALL"), QueryKind::DiscardAll);
    }
}
