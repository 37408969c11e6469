//! Key-less statements while a unit is in motion: the unit's rows exist on two shards (the copy
//! being filled, or the source not yet cleaned up), so the statement sent to the shard holding
//! the extra copy reads each such table through a filter that leaves the unit out:
//! `FROM t` becomes `FROM (SELECT * FROM t WHERE (pred) IS NOT TRUE) AS t`; an UPDATE or DELETE
//! of such a table gets `AND (pred) IS NOT TRUE` in its WHERE (replication brings the owner's
//! change to the copy).

use super::keys::object_name;
use sqlparser::ast::{
    BinaryOperator, CopySource, Expr, FromTable, Ident, Query, SetExpr, Statement, TableAlias,
    TableFactor, TableWithJoins, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// The placeholder for a filter: the subquery is built as an AST and its predicate spliced into
/// the printed text, so the predicate never goes through sqlparser's round trip.
const MARK: &str = "pgshard_shadow_filter_";

/// Rewrites a read so that, for each `(table, predicate)` of `hide` (table as the statement
/// names it, predicate true for the rows to leave out), every appearance of the table reads
/// only rows the predicate is not true for. Errors say why the statement cannot be rewritten.
pub fn exclude(sql: &str, hide: &[(String, String)]) -> Result<String, String> {
    let mut stmts = parse_one(sql)?;
    if !matches!(stmts[0], Statement::Query(_)) {
        return Err("only a single SELECT can be read around a unit in motion".into());
    }
    rewrite(&mut stmts[0], hide, false, false).map(|(text, _)| text)
}

/// Rewrites `COPY t [(columns)] TO STDOUT …` or `COPY (query) TO STDOUT …` so that it copies
/// what `exclude` would let the equivalent SELECT read: the source becomes that filtered query,
/// the options stay.
pub fn exclude_copy_out(sql: &str, hide: &[(String, String)]) -> Result<String, String> {
    let mut stmts = parse_one(sql)?;
    let Statement::Copy {
        source, to: true, ..
    } = &mut stmts[0]
    else {
        return Err("not a COPY … TO".into());
    };
    let select = match source {
        CopySource::Table {
            table_name,
            columns,
        } if columns.is_empty() => format!("SELECT * FROM {table_name}"),
        CopySource::Table {
            table_name,
            columns,
        } => {
            let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            format!("SELECT {} FROM {table_name}", cols.join(", "))
        }
        CopySource::Query(q) => q.to_string(),
    };
    let filtered = exclude(&select, hide)?;
    // The filtered text is spliced in after printing, like the predicates: it is not parsed
    // again.
    let place = format!("SELECT {MARK}copy");
    let Statement::Query(q) = Parser::parse_sql(&PostgreSqlDialect {}, &place)
        .map_err(|e| e.to_string())?
        .remove(0)
    else {
        return Err("placeholder".into());
    };
    *source = CopySource::Query(q);
    Ok(stmts[0].to_string().replacen(&place, &filtered, 1))
}

/// Confines what a write reads (subqueries, UPDATE … FROM, DELETE … USING, INSERT … SELECT,
/// RETURNING) to the rows each `(table, predicate)` of `keep` keeps, leaving the written table
/// itself alone: `FROM t` becomes `FROM (SELECT * FROM t WHERE predicate) AS t`, a form the
/// router can route by when the predicate is `key = literal`. None when the write reads none
/// of the tables.
pub fn confine_reads_of_write(
    sql: &str,
    keep: &[(String, String)],
) -> Result<Option<String>, String> {
    let mut stmts = parse_one(sql)?;
    let (text, replaced) = match &stmts[0] {
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
            rewrite(&mut stmts[0], keep, true, true)?
        }
        _ => return Err("not an INSERT, UPDATE or DELETE".into()),
    };
    Ok((replaced > 0).then_some(text))
}

/// Rewrites an UPDATE or DELETE so that it leaves out the rows each `(table, predicate)` of
/// `hide` is true for: in the written table (through its WHERE) and in every table it reads.
/// Only the plain forms: with `UPDATE … FROM` or `DELETE … USING` an unqualified key column in
/// the added condition could name another table's column.
pub fn exclude_from_write(sql: &str, hide: &[(String, String)]) -> Result<String, String> {
    let mut stmts = parse_one(sql)?;
    let (target, selection) = match &mut stmts[0] {
        Statement::Update(u) if u.from.is_none() => (single_table(&u.table), &mut u.selection),
        Statement::Delete(d) if d.using.is_none() && d.tables.is_empty() => {
            let (FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t)) = &d.from;
            match t.as_slice() {
                [one] => (single_table(one), &mut d.selection),
                _ => (None, &mut d.selection),
            }
        }
        Statement::Update(_) | Statement::Delete(_) => {
            return Err("UPDATE … FROM and DELETE … USING cannot be filtered".into())
        }
        _ => return Err("only UPDATE and DELETE can be filtered".into()),
    };
    let target = target.ok_or("the written table is not a plain table name")?;
    let hidden = hide.iter().position(|(t, _)| *t == target);
    if let Some(i) = hidden {
        let mark = Expr::Identifier(Ident::new(format!("{MARK}w{i}")));
        *selection = Some(match selection.take() {
            Some(e) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(e))),
                op: BinaryOperator::And,
                right: Box::new(mark),
            },
            None => mark,
        });
    }
    let (mut text, _) = rewrite(&mut stmts[0], hide, true, false)?;
    if let Some(i) = hidden {
        text = text.replace(
            &format!("{MARK}w{i}"),
            &format!("({}) IS NOT TRUE", hide[i].1),
        );
    }
    Ok(text)
}

/// The table of a FROM item that is one plain table (no join, no subquery).
fn single_table(t: &TableWithJoins) -> Option<String> {
    match (&t.relation, t.joins.is_empty()) {
        (
            TableFactor::Table {
                name, args: None, ..
            },
            true,
        ) => Some(object_name(name)),
        _ => None,
    }
}

fn parse_one(sql: &str) -> Result<Vec<Statement>, String> {
    if sql.to_ascii_lowercase().contains(MARK) {
        return Err(format!("the statement contains the reserved word {MARK}"));
    }
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| e.to_string())?;
    if stmts.len() != 1 {
        return Err("only a single statement can be filtered".into());
    }
    Ok(stmts)
}

/// Filters every listed table the statement reads (predicates name the rows to leave out, or
/// with `keep` the rows to keep); with `write`, the written table (the first table factor of
/// UPDATE/DELETE, the INSERT's target) is left as it is. Returns the text and how many
/// mentions were filtered.
fn rewrite(
    stmt: &mut Statement,
    hide: &[(String, String)],
    write: bool,
    keep: bool,
) -> Result<(String, usize), String> {
    let target = match (&*stmt, write) {
        (Statement::Insert(i), true) => match &i.table {
            sqlparser::ast::TableObject::TableName(n) => Some(object_name(n)),
            _ => None,
        },
        _ => None,
    };
    let mut v = Shadow {
        hide,
        seen: 0,
        replaced: 0,
        skip_first: write && matches!(stmt, Statement::Update(_) | Statement::Delete(_)),
        factors: 0,
        target_hidden: false,
        cte_clash: None,
        error: None,
    };
    let _ = stmt.visit(&mut v);
    if let Some(e) = v.error {
        return Err(e);
    }
    if let Some(name) = v.cte_clash {
        return Err(format!(
            "a WITH query is named like the table {name} in motion"
        ));
    }
    // Every mention of a hidden table (post_visit_relation also sees names outside FROM, like
    // a function's or a locking clause's) must have become a filtered subquery, but the
    // written table.
    let written = usize::from(target.is_some_and(|t| hide.iter().any(|(h, _)| *h == t)))
        + usize::from(v.target_hidden);
    if v.seen != v.replaced + written {
        return Err(
            "the statement names a table in motion somewhere pgshard cannot filter it".into(),
        );
    }
    let mut text = stmt.to_string();
    // From the highest index down: mark 1 is a prefix of mark 10.
    for (i, (_, pred)) in hide.iter().enumerate().rev() {
        let filter = if keep {
            format!("({pred})")
        } else {
            format!("({pred}) IS NOT TRUE")
        };
        text = text.replace(&format!("{MARK}{i}"), &filter);
    }
    Ok((text, v.replaced))
}

struct Shadow<'h> {
    hide: &'h [(String, String)],
    /// Relations naming a hidden table (before any rewrite).
    seen: usize,
    replaced: usize,
    /// The first table factor is a write's target, left unfiltered.
    skip_first: bool,
    /// Table factors seen so far.
    factors: usize,
    /// Whether the skipped target is a hidden table.
    target_hidden: bool,
    cte_clash: Option<String>,
    error: Option<String>,
}

impl Shadow<'_> {
    fn hidden(&self, name: &sqlparser::ast::ObjectName) -> Option<usize> {
        let n = object_name(name);
        self.hide.iter().position(|(t, _)| *t == n)
    }
}

impl VisitorMut for Shadow<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                let name = super::keys::ident(&cte.alias.name);
                if self
                    .hide
                    .iter()
                    .any(|(t, _)| t.rsplit('.').next() == Some(name.as_str()))
                {
                    self.cte_clash = Some(name);
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_relation(&mut self, r: &mut sqlparser::ast::ObjectName) -> ControlFlow<()> {
        if self.hidden(r).is_some() {
            self.seen += 1;
        }
        ControlFlow::Continue(())
    }

    // After the children: the subquery put in place is not visited again.
    fn post_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        self.factors += 1;
        if self.skip_first && self.factors == 1 {
            if let TableFactor::Table { name, .. } = tf {
                self.target_hidden = self.hidden(name).is_some();
            }
            return ControlFlow::Continue(());
        }
        let TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            partitions,
            ..
        } = tf
        else {
            return ControlFlow::Continue(());
        };
        let Some(i) = self.hidden(name) else {
            return ControlFlow::Continue(());
        };
        if !with_hints.is_empty() || !partitions.is_empty() {
            return ControlFlow::Continue(());
        }
        let sql = format!("SELECT * FROM {name} WHERE {MARK}{i}");
        let sub = match Parser::parse_sql(&PostgreSqlDialect {}, &sql) {
            Ok(mut s) if s.len() == 1 => match s.remove(0) {
                Statement::Query(q) if matches!(*q.body, SetExpr::Select(_)) => q,
                _ => unreachable!("a SELECT parses as a query"),
            },
            Ok(_) | Err(_) => {
                self.error = Some(format!("cannot filter table {name}"));
                return ControlFlow::Break(());
            }
        };
        let bare = name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .cloned()
            .unwrap_or_else(|| Ident::new(object_name(name)));
        let alias = alias.take().unwrap_or(TableAlias {
            explicit: true,
            name: bare,
            columns: Vec::new(),
            at: None,
        });
        *tf = TableFactor::Derived {
            lateral: false,
            subquery: sub,
            alias: Some(alias),
            sample: None,
        };
        self.replaced += 1;
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::{confine_reads_of_write, exclude, exclude_copy_out, exclude_from_write};

    #[test]
    fn copy_out_sources_are_filtered_and_options_kept() {
        let out = exclude_copy_out("COPY items TO STDOUT", &hide("items")).unwrap();
        assert_eq!(out, "COPY (SELECT * FROM (SELECT * FROM items WHERE (id % 2 = 0) IS NOT TRUE) AS items) TO STDOUT");
        let out = exclude_copy_out(
            "COPY items (id, v) TO STDOUT WITH (FORMAT csv, HEADER true)",
            &hide("items"),
        )
        .unwrap();
        assert!(out.starts_with("COPY (SELECT id, v FROM (SELECT * FROM items WHERE (id % 2 = 0) IS NOT TRUE) AS items) TO STDOUT"), "{out}");
        assert!(
            out.contains("FORMAT csv") && out.contains("HEADER"),
            "{out}"
        );
        let out = exclude_copy_out(
            "COPY (SELECT v FROM items ORDER BY v) TO STDOUT",
            &hide("items"),
        )
        .unwrap();
        assert!(
            out.contains("IS NOT TRUE) AS items ORDER BY v) TO STDOUT"),
            "{out}"
        );
        assert!(exclude_copy_out("COPY items FROM STDIN", &hide("items")).is_err());
        assert!(exclude_copy_out("SELECT 1", &hide("items")).is_err());
    }

    fn hide(t: &str) -> Vec<(String, String)> {
        vec![(t.to_string(), "id % 2 = 0".to_string())]
    }

    #[test]
    fn every_appearance_is_filtered() {
        let out = exclude("SELECT count(*) FROM items WHERE v > 1", &hide("items")).unwrap();
        assert_eq!(out, "SELECT count(*) FROM (SELECT * FROM items WHERE (id % 2 = 0) IS NOT TRUE) AS items WHERE v > 1");
        let out = exclude("SELECT i.v FROM items i JOIN other o ON o.id = i.id WHERE i.id IN (SELECT id FROM items)", &hide("items")).unwrap();
        assert_eq!(out.matches("IS NOT TRUE").count(), 2, "{out}");
        assert!(out.contains(") i JOIN other"), "alias kept: {out}");
        let out = exclude("SELECT * FROM public.items", &hide("public.items")).unwrap();
        assert!(out.ends_with("AS items"), "{out}");
    }

    #[test]
    fn what_cannot_be_filtered_is_refused() {
        assert!(exclude(
            "WITH items AS (SELECT 1 AS id) SELECT * FROM items",
            &hide("items")
        )
        .is_err());
        assert!(exclude("SELECT * FROM items(1)", &hide("items")).is_err());
        assert!(exclude("UPDATE items SET v = 1", &hide("items")).is_err());
        assert!(exclude(
            "SELECT 'pgshard_shadow_filter_0' FROM items",
            &hide("items")
        )
        .is_err());
        assert!(exclude("DELETE FROM items", &hide("items")).is_err());
        // Other tables are left alone.
        assert_eq!(
            exclude("SELECT * FROM other", &hide("items")).unwrap(),
            "SELECT * FROM other"
        );
    }

    #[test]
    fn a_write_reads_through_the_filter_and_writes_its_own_table() {
        let h = hide("items");
        let w = |sql: &str| confine_reads_of_write(sql, &h).unwrap();
        assert_eq!(w("UPDATE items SET v = 1 WHERE id = 3"), None);
        assert_eq!(w("INSERT INTO items VALUES (1, 2)"), None);
        assert_eq!(w("DELETE FROM items WHERE id = 3"), None);
        let out = w("UPDATE items SET v = (SELECT max(v) FROM items o) WHERE id = 3").unwrap();
        assert!(
            out.starts_with("UPDATE items SET v = (SELECT max(v) FROM (SELECT * FROM items WHERE (id % 2 = 0)) o)"),
            "{out}"
        );
        let out = w("INSERT INTO items SELECT id + 1, v FROM items WHERE id = 3").unwrap();
        assert!(out.starts_with("INSERT INTO items SELECT"), "{out}");
        assert_eq!(out.matches("(id % 2 = 0)").count(), 1, "{out}");
        let out =
            w("DELETE FROM items USING items AS o WHERE items.id = 3 AND o.v = items.v").unwrap();
        assert!(out.starts_with("DELETE FROM items USING (SELECT"), "{out}");
        let out = w("UPDATE other SET v = 1 WHERE id IN (SELECT id FROM items)").unwrap();
        assert_eq!(out.matches("(id % 2 = 0)").count(), 1, "{out}");
        assert!(confine_reads_of_write("SELECT 1", &h).is_err());
    }

    #[test]
    fn writes_leave_the_unit_out_of_what_they_change_and_read() {
        let out = exclude_from_write(
            "UPDATE items SET v = v + 1 WHERE v > 1 OR v < 0",
            &hide("items"),
        )
        .unwrap();
        assert_eq!(
            out,
            "UPDATE items SET v = v + 1 WHERE (v > 1 OR v < 0) AND (id % 2 = 0) IS NOT TRUE"
        );
        let out = exclude_from_write("DELETE FROM items", &hide("items")).unwrap();
        assert_eq!(out, "DELETE FROM items WHERE (id % 2 = 0) IS NOT TRUE");
        let out = exclude_from_write(
            "DELETE FROM other WHERE id IN (SELECT id FROM items)",
            &hide("items"),
        )
        .unwrap();
        assert_eq!(out, "DELETE FROM other WHERE id IN (SELECT id FROM (SELECT * FROM items WHERE (id % 2 = 0) IS NOT TRUE) AS items)");
        let out = exclude_from_write(
            "UPDATE items i SET v = 0 WHERE i.v IN (SELECT v FROM items) RETURNING i.id",
            &hide("items"),
        )
        .unwrap();
        assert_eq!(out.matches("IS NOT TRUE").count(), 2, "{out}");
        assert!(
            out.starts_with("UPDATE items AS i SET") || out.starts_with("UPDATE items i SET"),
            "{out}"
        );
        // Several hidden tables: each mark gets its own predicate.
        let many: Vec<(String, String)> = (0..12)
            .map(|i| (format!("t{i}"), format!("k = {i}")))
            .collect();
        let out = exclude_from_write("UPDATE t11 SET v = 1 WHERE v IN (SELECT v FROM t1)", &many)
            .unwrap();
        assert!(
            out.contains("(k = 11) IS NOT TRUE") && out.contains("(k = 1) IS NOT TRUE"),
            "{out}"
        );
        assert!(exclude_from_write(
            "UPDATE items SET v = 1 FROM other WHERE other.id = items.id",
            &hide("items")
        )
        .is_err());
        assert!(exclude_from_write(
            "DELETE FROM items USING other WHERE other.id = items.id",
            &hide("items")
        )
        .is_err());
        assert!(
            exclude_from_write("INSERT INTO items SELECT * FROM items", &hide("items")).is_err()
        );
        assert!(exclude_from_write("SELECT * FROM items", &hide("items")).is_err());
    }
}
