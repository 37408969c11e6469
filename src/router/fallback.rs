//! What does not need the parser: routing hints in comments, and a keyword classification of
//! statements the parser rejects.

use super::{Hint, Kind, Route};

/// A `pgshard: shard=N` or `pgshard: key=V` hint from any comment in the text.
pub(super) fn hint(sql: &str) -> Option<Hint> {
    let mut rest = sql;
    while let Some(at) = rest.find("pgshard:") {
        let before = &rest[..at];
        let in_comment = before
            .rfind("/*")
            .is_some_and(|o| before.rfind("*/").is_none_or(|c| c < o))
            || before
                .rfind("--")
                .is_some_and(|d| !before[d..].contains('\n'));
        let body = rest[at + "pgshard:".len()..].trim_start();
        rest = &rest[at + 1..];
        if !in_comment {
            continue;
        }
        let end = body
            .find(|c: char| c.is_whitespace() || c == '*')
            .unwrap_or(body.len());
        let (k, v) = body[..end].split_once('=')?;
        let v = v.trim_matches(|c| c == '\'' || c == '"');
        return match k.to_ascii_lowercase().as_str() {
            "shard" => v.parse().ok().map(Hint::Shard),
            "key" if !v.is_empty() => Some(Hint::Key(v.to_string())),
            _ => None,
        };
    }
    None
}

/// The text with comments removed and words upper-cased, split into words.
fn words(sql: &str) -> Vec<String> {
    let mut out = String::with_capacity(sql.len());
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            i = sql[i..].find("*/").map_or(b.len(), |e| i + e + 2);
        } else if b[i..].starts_with(b"--") {
            i = sql[i..].find('\n').map_or(b.len(), |e| i + e);
        } else {
            let c = sql[i..].chars().next().expect("char boundary");
            out.push(if c.is_alphanumeric() || c == '_' {
                c.to_ascii_uppercase()
            } else {
                ' '
            });
            i += c.len_utf8();
        }
    }
    out.split_whitespace().map(str::to_string).collect()
}

/// Kind and route of a statement the parser could not read, from its leading keywords.
pub(super) fn classify(sql: &str, error: &str) -> (Kind, Route) {
    let w = words(sql);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let has = |k: &str| w.contains(&k);
    let first = w.first().copied().unwrap_or("");
    let second = w.get(1).copied().unwrap_or("");
    let two_phase = (first == "PREPARE" && second == "TRANSACTION")
        || (matches!(first, "COMMIT" | "ROLLBACK") && second == "PREPARED");
    if two_phase {
        return (
            Kind::Write,
            Route::refuse("pgshard manages two-phase commit itself"),
        );
    }
    match first {
        "VACUUM" | "ANALYZE" | "ANALYSE" | "CHECKPOINT" => (Kind::Utility, Route::AllShards),
        "BEGIN" | "START" => (Kind::Begin { read_only: sql.to_ascii_uppercase().contains("READ ONLY") }, Route::Any),
        "COMMIT" | "END" => (Kind::Commit, Route::Any),
        "ABORT" => (Kind::Rollback, Route::Any),
        "ROLLBACK" if has("TO") => (Kind::Savepoint, Route::Any),
        "ROLLBACK" => (Kind::Rollback, Route::Any),
        "SAVEPOINT" | "RELEASE" => (Kind::Savepoint, Route::Any),
        "SET" | "RESET" | "SHOW" | "DISCARD" | "LISTEN" | "UNLISTEN" | "NOTIFY" | "PREPARE" | "EXECUTE"
        | "DEALLOCATE" | "LOAD" | "DECLARE" | "FETCH" | "MOVE" | "CLOSE" => (Kind::Session, Route::Any),
        "REINDEX" => {
            (Kind::Ddl { transactional: !(has("CONCURRENTLY") || has("DATABASE") || has("SYSTEM")) }, Route::AllShards)
        }
        // A bare CLUSTER reclusters every table and may not run in a transaction block.
        "CLUSTER" => (Kind::Ddl { transactional: w.len() > 1 }, Route::AllShards),
        "CREATE" | "ALTER" | "DROP" | "COMMENT" | "GRANT" | "REVOKE" | "SECURITY" | "REFRESH" => {
            let transactional = !(has("CONCURRENTLY")
                || (matches!(first, "CREATE" | "DROP") && matches!(second, "DATABASE" | "TABLESPACE"))
                || (first == "ALTER" && second == "SYSTEM")
                || (first == "ALTER" && second == "TYPE" && has("ADD") && has("VALUE")));
            (Kind::Ddl { transactional }, Route::AllShards)
        }
        _ => (
            Kind::Write,
            Route::refuse(format!(
                "pgshard cannot parse this statement to route it: {error}; add a /* pgshard: shard=N */ hint"
            )),
        ),
    }
}

/// A text the parser rejects for syntax it does not know but routing does not depend on,
/// rewritten to syntax it knows (only analysed; the original text is what runs): lock
/// strengths FOR NO KEY UPDATE / FOR KEY SHARE, and COPY's boolean options spelled on/off.
pub(super) fn relaxed(sql: &str) -> Option<String> {
    let upper = sql.to_ascii_uppercase();
    if words(sql).first().map(String::as_str) == Some("COPY") {
        let mut out = String::with_capacity(sql.len());
        let mut changed = false;
        for (i, piece) in sql
            .split_inclusive(|c: char| !c.is_alphanumeric() && c != '_')
            .enumerate()
        {
            let word = piece.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_');
            let tail = &piece[word.len()..];
            let swap = match word.to_ascii_lowercase().as_str() {
                "on" if i > 0 => "true",
                "off" if i > 0 => "false",
                _ => word,
            };
            changed |= swap != word;
            out.push_str(swap);
            out.push_str(tail);
        }
        return changed.then_some(out);
    }
    let mut out = sql.to_string();
    let mut changed = false;
    for (from, to) in [
        ("FOR NO KEY UPDATE", "FOR UPDATE       "),
        ("FOR KEY SHARE", "FOR SHARE    "),
    ] {
        let mut start = 0;
        while let Some(i) = upper[start..].find(from) {
            let at = start + i;
            out.replace_range(at..at + from.len(), to);
            start = at + from.len();
            changed = true;
        }
    }
    changed.then_some(out)
}
