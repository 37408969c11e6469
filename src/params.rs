//! Session settings tracked per client and per server connection.
//!
//! In transaction mode a client's settings must follow it onto whichever server connection
//! serves it. Each client and each server connection keeps the settings it has; on checkout the
//! difference is applied with SET/RESET in one round trip (none when they already match).

/// Settings a server reports with ParameterStatus that a client may change and pgshard
/// therefore carries between server connections.
const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

/// Startup packet keys that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// A set of setting name (lower case) → SQL value expression, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionParams {
    items: Vec<(String, String)>,
}

impl SessionParams {
    /// Settings a client asked for in its startup packet, including `options=-c k=v`.
    pub fn from_startup(params: &[(String, String)]) -> SessionParams {
        let mut s = SessionParams::default();
        for (k, v) in params {
            let k = k.to_ascii_lowercase();
            if k == "options" {
                for (ok, ov) in parse_options(v) {
                    s.set(&ok, &quote_literal(&ov));
                }
            } else if !NOT_SETTINGS.contains(&k.as_str()) {
                s.set(&k, &quote_literal(v));
            }
        }
        s
    }

    /// Sets `name` to the SQL expression `value`.
    pub fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.items.binary_search_by(|(k, _)| k.as_str().cmp(&name)) {
            Ok(i) => self.items[i].1 = value.to_string(),
            Err(i) => self.items.insert(i, (name, value.to_string())),
        }
    }

    /// Forgets `name` (back to the server default).
    pub fn reset(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.items.retain(|(k, _)| *k != name);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// The value expression of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Number of settings.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Iterates over (name, value expression).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.items.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Records a ParameterStatus from the server if it is one pgshard carries across connections.
    pub fn observe_reported(&mut self, name: &str, value: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        if REPORTED.contains(&lower.as_str()) {
            self.set(&lower, &quote_literal(value));
            return true;
        }
        false
    }

    /// SQL that turns a server connection with settings `self` into one with `target`,
    /// or None when they already match.
    pub fn diff_sql(&self, target: &SessionParams) -> Option<String> {
        if self == target {
            return None;
        }
        let mut sql = String::new();
        for (k, v) in &target.items {
            if self.get(k) != Some(v.as_str()) {
                sql.push_str(&format!("SET {} = {};", quote_ident(k), v));
            }
        }
        for (k, _) in &self.items {
            if target.get(k).is_none() {
                sql.push_str(&format!("RESET {};", quote_ident(k)));
            }
        }
        Some(sql)
    }
}

/// Splits `-c a=b --c=d` style startup options into (name, value).
pub fn parse_options(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for ch in s.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch.is_whitespace() {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(ch);
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next()
        } else {
            w.strip_prefix("--")
                .or_else(|| w.strip_prefix("-c"))
                .map(str::to_string)
        };
        if let Some((k, v)) = kv.as_deref().and_then(|kv| kv.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

/// A SQL string literal.
pub fn quote_literal(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    if s.contains('\\') {
        q.push('E');
    }
    q.push('\'');
    for ch in s.chars() {
        match ch {
            '\'' => q.push_str("''"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

/// A SQL identifier, quoted when needed (dotted custom settings keep their dots unquoted).
pub fn quote_ident(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_params_and_options() {
        let p = SessionParams::from_startup(&[
            ("user".into(), "u".into()),
            ("application_name".into(), "psql".into()),
            (
                "options".into(),
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=64kB".into(),
            ),
        ]);
        assert_eq!(p.get("application_name"), Some("'psql'"));
        assert_eq!(p.get("search_path"), Some("'a,b'"));
        assert_eq!(p.get("statement_timeout"), Some("'5s'"));
        assert_eq!(p.get("work_mem"), Some("'64kB'"));
        assert_eq!(p.get("user"), None);
    }

    #[test]
    fn diff_sets_and_resets() {
        let mut server = SessionParams::default();
        server.set("timezone", "'UTC'");
        server.set("work_mem", "'1MB'");
        let mut client = SessionParams::default();
        client.set("TimeZone", "'UTC'");
        client.set("search_path", "'x'");
        assert_eq!(
            server.diff_sql(&client).unwrap(),
            "SET search_path = 'x';RESET work_mem;"
        );
        assert_eq!(client.diff_sql(&client.clone()), None);
    }

    #[test]
    fn reported_only_for_carried_settings() {
        let mut p = SessionParams::default();
        assert!(p.observe_reported("TimeZone", "Europe/Paris"));
        assert!(!p.observe_reported("server_version", "15"));
        assert_eq!(p.get("timezone"), Some("'Europe/Paris'"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("DateStyle"), "\"DateStyle\"");
        assert_eq!(quote_ident("pgshard.key"), "pgshard.key");
    }
}
