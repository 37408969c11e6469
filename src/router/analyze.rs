//! SQL text → Plan: parse, classify each statement, find its tables and keys.

use super::fallback;
use super::insert::InsertSplit;
use super::keys::{self, key_value, object_name};
use super::merge;
use super::walk::{Placement, Walker};
use super::{CopyFormat, CopySpec, Kind, Plan, Route, RouteError};
use crate::scatter::spec::MergeSpec;
use crate::shardmap::config::UnknownTables;
use crate::shardmap::ShardMap;
use sqlparser::ast::*;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Analyses a statement text (maybe several statements) against the shard map.
pub fn analyze(sql: &str, map: &ShardMap) -> Plan {
    let hint = fallback::hint(sql);
    let parsed =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).or_else(|e| match fallback::relaxed(sql) {
            Some(relaxed) => Parser::parse_sql(&PostgreSqlDialect {}, &relaxed).map_err(|_| e),
            None => Err(e),
        });
    let mut plan = match parsed {
        Ok(stmts) if stmts.is_empty() => plan_of(Kind::Session, Route::Any, Vec::new()),
        Ok(stmts) => {
            let mut plans = stmts.iter().map(|s| statement(s, sql, map));
            let first = plans.next().expect("one statement");
            let mut plan = plans.fold(first, combine);
            plan.statements = stmts.len();
            plan
        }
        Err(e) => {
            let (kind, route) = fallback::classify(sql, &e.to_string());
            plan_of(kind, route, Vec::new())
        }
    };
    plan.hint = hint;
    plan
}

fn plan_of(kind: Kind, route: Route, tables: Vec<String>) -> Plan {
    Plan {
        statements: 1,
        kind,
        route,
        merge: MergeSpec::default(),
        scatter_sql: None,
        insert: None,
        hint: None,
        tables,
        scatter_refusal: None,
    }
}

fn refusal(problems: &[String]) -> Option<RouteError> {
    problems.first().map(|p| {
        RouteError::unsupported(format!(
            "{p}; pin the statement to one shard with its sharding key or a /* pgshard: shard=N */ hint"
        ))
    })
}

/// Several statements in one text: the caller refuses them if they span shards, so the
/// combination only needs to say where they go together.
fn combine(mut a: Plan, b: Plan) -> Plan {
    let route = match (a.route, b.route) {
        (r @ Route::Refuse { .. }, _) | (_, r @ Route::Refuse { .. }) => r,
        (Route::Any, r) | (r, Route::Any) => r,
        (Route::Reference { write: false }, r @ (Route::Keys { .. } | Route::DefaultShard))
        | (r @ (Route::Keys { .. } | Route::DefaultShard), Route::Reference { write: false }) => r,
        (
            Route::Keys {
                dist,
                mut keys,
                within,
            },
            Route::Keys {
                dist: d2, keys: k2, ..
            },
        ) if dist == d2 => {
            keys.extend(k2);
            let within = within.filter(|_| keys.len() == 1);
            Route::Keys { dist, keys, within }
        }
        (x, y) if x == y => x,
        (Route::Reference { write: w1 }, Route::Reference { write: w2 }) => {
            Route::Reference { write: w1 || w2 }
        }
        _ => Route::AllShards,
    };
    let writes = |k: &Kind| matches!(k, Kind::Write | Kind::Ddl { .. });
    if !writes(&a.kind) && (writes(&b.kind) || matches!(a.kind, Kind::Begin { .. } | Kind::Session))
    {
        a.kind = b.kind;
    }
    for t in b.tables {
        if !a.tables.contains(&t) {
            a.tables.push(t);
        }
    }
    a.route = route;
    a.scatter_refusal = a.scatter_refusal.or(b.scatter_refusal);
    a.merge = MergeSpec::default();
    a.scatter_sql = None;
    a.insert = None;
    a
}

fn statement(st: &Statement, sql: &str, map: &ShardMap) -> Plan {
    let session = || plan_of(Kind::Session, Route::Any, Vec::new());
    match st {
        Statement::Query(q) => select(q, map),
        Statement::Insert(i) => insert(i, st, sql, map),
        Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => modify(st, map),
        Statement::Truncate(t) => {
            let mut w = Walker::new(map);
            t.table_names.iter().for_each(|n| {
                w.add_table(&n.name, None);
            });
            let route = w.whole_tables(true);
            plan_of(Kind::Write, route, w.tables())
        }
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => copy(source, *to, target, options, legacy_options, map, st),
        Statement::StartTransaction { modes, .. } => plan_of(
            Kind::Begin {
                read_only: modes.contains(&TransactionMode::AccessMode(
                    TransactionAccessMode::ReadOnly,
                )),
            },
            Route::Any,
            Vec::new(),
        ),
        Statement::Commit { .. } => plan_of(Kind::Commit, Route::Any, Vec::new()),
        Statement::Rollback {
            savepoint: Some(_), ..
        }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => plan_of(Kind::Savepoint, Route::Any, Vec::new()),
        Statement::Rollback { .. } => plan_of(Kind::Rollback, Route::Any, Vec::new()),
        Statement::Set(_)
        | Statement::Reset(_)
        | Statement::Discard { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::Prepare { .. }
        | Statement::Execute { .. }
        | Statement::Deallocate { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. } => session(),
        Statement::Declare { stmts, .. } => match stmts.iter().find_map(|d| d.for_query.as_ref()) {
            // A cursor reads its rows from where its query routes; FETCH cannot merge shards.
            Some(q) => {
                let mut p = select(q, map);
                p.merge = MergeSpec::default();
                p.scatter_sql = None;
                p.scatter_refusal = p
                    .scatter_refusal
                    .or_else(|| refusal(&["a cursor cannot read from several shards".to_string()]));
                p
            }
            None => session(),
        },
        Statement::Analyze(_) | Statement::Vacuum(_) => {
            plan_of(Kind::Utility, Route::AllShards, Vec::new())
        }
        Statement::Explain {
            statement: inner,
            analyze,
            ..
        } => {
            let mut p = statement(inner, sql, map);
            if !*analyze && matches!(p.kind, Kind::Write) {
                p.kind = Kind::Read;
            }
            // Plans from several shards are shown one after another, never merged.
            p.merge = MergeSpec::default();
            p.scatter_sql = None;
            p.insert = None;
            p.scatter_refusal = None;
            p
        }
        Statement::Lock(l) => {
            let mut w = Walker::new(map);
            l.tables.iter().for_each(|t| {
                w.add_table(&t.name, None);
            });
            let route = w.whole_tables(true);
            plan_of(Kind::Write, route, w.tables())
        }
        Statement::CreateIndex(ci) => ddl(!ci.concurrently, &[&ci.table_name], map),
        Statement::CreateTable(ct) => ddl(true, &[&ct.name], map),
        Statement::AlterTable(at) => ddl(true, &[&at.name], map),
        Statement::Drop {
            object_type: ObjectType::Table,
            names,
            ..
        } => ddl(true, &names.iter().collect::<Vec<_>>(), map),
        Statement::Drop {
            object_type: ObjectType::Database,
            ..
        }
        | Statement::CreateDatabase { .. } => ddl(false, &[], map),
        Statement::Call(_) => plan_of(
            Kind::Write,
            Route::refuse(
                "pgshard cannot tell which shard a CALL touches; add a /* pgshard: shard=N */ hint",
            ),
            Vec::new(),
        ),
        other => {
            let text = other.to_string();
            let first = text
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match first.as_str() {
                "CREATE" | "ALTER" | "DROP" | "COMMENT" | "GRANT" | "REVOKE" | "REFRESH" | "SECURITY" => ddl(true, &[], map),
                "SHOW" | "USE" => session(),
                _ => plan_of(
                    Kind::Write,
                    Route::refuse(format!(
                        "pgshard does not route {first} statements; add a /* pgshard: shard=N */ hint"
                    )),
                    Vec::new(),
                ),
            }
        }
    }
}

/// DDL runs on every shard, except on undeclared tables kept on the default shard.
fn ddl(transactional: bool, names: &[&ObjectName], map: &ShardMap) -> Plan {
    let mut w = Walker::new(map);
    names.iter().for_each(|n| {
        w.add_table(n, None);
    });
    let on_default = map.unknown_tables == UnknownTables::DefaultShard
        && !w.rels.is_empty()
        && w.rels
            .iter()
            .all(|r| matches!(r.placement, Placement::Undeclared));
    let route = if on_default {
        Route::DefaultShard
    } else {
        Route::AllShards
    };
    plan_of(Kind::Ddl { transactional }, route, w.tables())
}

fn select(q: &Query, map: &ShardMap) -> Plan {
    let mut w = Walker::new(map);
    w.query(q);
    let write = !q.locks.is_empty() || w.modifying_cte || w.writing_function;
    let (mut route, mut problems) = w.decide(write, None);
    let mut plan = plan_of(
        if write { Kind::Write } else { Kind::Read },
        Route::Any,
        w.tables(),
    );
    if matches!(route, Route::Keys { .. } | Route::AllShards) {
        match merge::plan(q) {
            Ok((spec, sql)) => {
                plan.merge = spec;
                plan.scatter_sql = sql.map(Into::into);
            }
            Err(p) => problems.push(p),
        }
        if w.modifying_cte && route == Route::AllShards && !map.keyless_writes {
            route = Route::refuse(
                "a data-modifying CTE without its sharding key would run on every shard, which keyless_writes = false forbids",
            );
        }
    }
    plan.route = route;
    plan.scatter_refusal = refusal(&problems);
    plan
}

/// UPDATE, DELETE and MERGE.
fn modify(st: &Statement, map: &ShardMap) -> Plan {
    let mut w = Walker::new(map);
    w.depth = 1;
    w.dml(st);
    let target = (!w.rels.is_empty()).then_some(0);
    let tables = w.tables();
    let refuse = |r: Route| plan_of(Kind::Write, r, tables.clone());
    if let (Statement::Update(u), Some(t)) = (st, target) {
        if let Placement::Sharded {
            column,
            hash_column,
            ..
        } = &w.rels[t].placement
        {
            for a in &u.assignments {
                let cols: Vec<&ObjectName> = match &a.target {
                    AssignmentTarget::ColumnName(n) => vec![n],
                    AssignmentTarget::Tuple(ns) => ns.iter().collect(),
                };
                for c in cols {
                    let name = object_name(c);
                    let name = name.rsplit('.').next().unwrap_or_default();
                    if name == column || Some(name) == hash_column.as_deref() {
                        return refuse(Route::refuse(format!(
                            "UPDATE changes the sharding key {name} of {}: delete and re-insert the row instead",
                            w.rels[t].name
                        )));
                    }
                }
            }
        }
    }
    let (route, problems) = w.decide(true, target);
    if route == Route::AllShards && !map.keyless_writes {
        let (name, col) = match target.map(|t| &w.rels[t]) {
            Some(r) => match &r.placement {
                Placement::Sharded { column, .. } => (r.name.clone(), column.clone()),
                _ => (r.name.clone(), "its key".into()),
            },
            None => ("the table".into(), "its key".into()),
        };
        return refuse(Route::refuse(format!(
            "this statement on {name} has no condition on its sharding key {col} and would run on every shard, which keyless_writes = false forbids: add WHERE {col} = ..."
        )));
    }
    let mut plan = refuse(route);
    plan.scatter_refusal = refusal(&problems);
    plan
}

fn insert(i: &Insert, st: &Statement, sql: &str, map: &ShardMap) -> Plan {
    let mut w = Walker::new(map);
    w.depth = 1;
    let TableObject::TableName(name) = &i.table else {
        return plan_of(
            Kind::Write,
            Route::refuse("INSERT into a table function cannot be routed"),
            Vec::new(),
        );
    };
    let t = w.add_table(name, None).expect("a table, not a CTE");
    let tname = w.rels[t].name.clone();
    let cols: Vec<String> = i
        .columns
        .iter()
        .map(|c| {
            object_name(c)
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let fail = |w: &Walker, msg: String| plan_of(Kind::Write, Route::refuse(msg), w.tables());
    let Placement::Sharded {
        dist,
        column,
        hash_column,
    } = w.rels[t].placement.clone()
    else {
        if let Some(src) = &i.source {
            w.query(src);
        }
        let (route, problems) = w.decide(true, Some(t));
        let mut plan = plan_of(Kind::Write, route, w.tables());
        plan.scatter_refusal = refusal(&problems);
        return plan;
    };
    if cols.is_empty() {
        return fail(
            &w,
            format!("INSERT into {tname} has no column list: name the columns so pgshard can find the sharding key {column}"),
        );
    }
    let Some(pos) = cols.iter().position(|c| *c == column) else {
        return fail(
            &w,
            format!("INSERT into {tname} must set its sharding key column {column}"),
        );
    };
    let hpos = hash_column
        .as_ref()
        .and_then(|h| cols.iter().position(|c| c == h));
    let Some(src) = &i.source else {
        return fail(
            &w,
            format!("INSERT into {tname} must set its sharding key column {column}"),
        );
    };
    if let (SetExpr::Values(v), None) = (src.body.as_ref(), &src.with) {
        let mut rows = Vec::with_capacity(v.rows.len());
        for (n, row) in v.rows.iter().enumerate() {
            let cell = |p: usize| row.content.get(p).and_then(key_value);
            let Some(k) = cell(pos) else {
                return fail(
                    &w,
                    format!(
                        "the sharding key {column} in row {} of the INSERT into {tname} must be a literal or a parameter",
                        n + 1
                    ),
                );
            };
            rows.push((k, hpos.and_then(cell)));
        }
        // Subqueries in the rows must read reference tables or rows of the same shard.
        w.pin(t, rows.iter().map(|r| r.0.clone()).collect());
        v.rows
            .iter()
            .flat_map(|r| &r.content)
            .for_each(|e| w.expr(e));
        let (checked, problems) = w.decide(true, Some(t));
        let mut plan = plan_of(Kind::Write, checked, w.tables());
        plan.scatter_refusal = refusal(&problems);
        if !matches!(plan.route, Route::Keys { .. }) {
            return plan;
        }
        let within = if rows.len() == 1 {
            rows[0].1.clone()
        } else {
            None
        };
        plan.route = Route::Keys {
            dist,
            keys: rows.iter().map(|r| r.0.clone()).collect(),
            within,
        };
        if rows.len() > 1 {
            plan.insert = Some(InsertSplit::new(
                dist,
                rows,
                st.clone(),
                has_placeholders(sql),
                sql,
            ));
        }
        return plan;
    }
    // INSERT ... SELECT: the selected key column decides the target's shard.
    let before = w.rels.len();
    w.query(src);
    if let SetExpr::Select(sel) = src.body.as_ref() {
        if let Some(SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }) =
            sel.projection.get(pos)
        {
            if let Some(k) = key_value(e) {
                w.pin(t, vec![k]);
            } else if let Some((qual, col)) = keys::column_ref(e) {
                if let Some(r) = w.find_source(before, qual.as_deref(), &col) {
                    w.link(t, r);
                    w.receives_pins(t);
                }
            }
        }
    }
    let (route, mut problems) = w.decide(true, Some(t));
    if route == Route::AllShards {
        return fail(
            &w,
            format!("INSERT ... SELECT into sharded table {tname} must select rows of one shard: add WHERE <key> = ... to the SELECT"),
        );
    }
    problems.insert(
        0,
        format!("INSERT ... SELECT into {tname} must stay on one shard"),
    );
    let mut plan = plan_of(Kind::Write, route, w.tables());
    plan.scatter_refusal = refusal(&problems);
    plan
}

/// Whether the text has `$n` parameters outside literals and comments.
fn has_placeholders(sql: &str) -> bool {
    match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() {
        Ok(tokens) => tokens.iter().any(|t| matches!(t, Token::Placeholder(_))),
        Err(_) => true,
    }
}

/// The COPY statement without its HEADER option: shards get rows only, since pgshard
/// consumes the header line (each shard would otherwise skip a data row as its header).
fn without_header(st: &Statement) -> Option<String> {
    let mut st = st.clone();
    let Statement::Copy {
        options,
        legacy_options,
        ..
    } = &mut st
    else {
        return None;
    };
    options.retain(|o| !matches!(o, CopyOption::Header(_)));
    legacy_options.retain(|o| !matches!(o, CopyLegacyOption::Header));
    for o in legacy_options.iter_mut() {
        if let CopyLegacyOption::Csv(csv) = o {
            csv.retain(|c| !matches!(c, CopyLegacyCsvOption::Header));
        }
    }
    Some(st.to_string())
}

fn copy(
    source: &CopySource,
    to: bool,
    target: &CopyTarget,
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
    map: &ShardMap,
    st: &Statement,
) -> Plan {
    let mut w = Walker::new(map);
    let (table, columns, query) = match source {
        CopySource::Table {
            table_name,
            columns,
        } => {
            w.add_table(table_name, None);
            (
                object_name(table_name),
                columns.iter().map(keys::ident).collect::<Vec<_>>(),
                false,
            )
        }
        CopySource::Query(q) => {
            w.query(q);
            (String::new(), Vec::new(), true)
        }
    };
    let std = matches!(
        (to, target),
        (false, CopyTarget::Stdin) | (true, CopyTarget::Stdout)
    );
    if !std {
        return plan_of(
            Kind::Write,
            Route::refuse("COPY to or from a server file or program is not routed by pgshard: use COPY ... FROM STDIN / TO STDOUT"),
            w.tables(),
        );
    }
    let mut format = CopyFormat::Text;
    let (mut delimiter, mut null, mut header, mut quote, mut escape) =
        (None, None, false, b'"', None);
    for o in options {
        match o {
            CopyOption::Format(f) => {
                format = match f.value.to_ascii_lowercase().as_str() {
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                }
            }
            CopyOption::Delimiter(c) => delimiter = Some(*c as u8),
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = *c as u8,
            CopyOption::Escape(c) => escape = Some(*c as u8),
            _ => {}
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => format = CopyFormat::Binary,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(*c as u8),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            CopyLegacyOption::Header => header = true,
            CopyLegacyOption::Csv(csv) => {
                format = CopyFormat::Csv;
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) => quote = *q as u8,
                        CopyLegacyCsvOption::Escape(e) => escape = Some(*e as u8),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let csv = format == CopyFormat::Csv;
    let key_column = match w.rels.first().map(|r| &r.placement) {
        Some(Placement::Sharded { column, .. }) if !query => {
            columns.iter().position(|c| c == column)
        }
        _ => None,
    };
    let spec = CopySpec {
        table,
        columns,
        from_stdin: !to,
        format,
        delimiter: delimiter.unwrap_or(if csv { b',' } else { b'\t' }),
        header,
        null: null.unwrap_or_else(|| if csv { String::new() } else { "\\N".into() }),
        quote,
        escape: escape.unwrap_or(quote),
        key_column,
        query,
        headerless_sql: header.then(|| without_header(st)).flatten(),
    };
    let (route, mut problems) = w.decide(!to, None);
    let route = match route {
        Route::Keys { .. } if !to => Route::AllShards,
        r => r,
    };
    if let CopySource::Query(q) = source {
        match merge::plan(q) {
            Ok((m, _)) if m != MergeSpec::default() => {
                problems.push("COPY (SELECT ...) with ORDER BY, LIMIT, DISTINCT or aggregates cannot be combined across shards".into())
            }
            Err(p) => problems.push(p),
            _ => {}
        }
    }
    let mut plan = plan_of(Kind::Copy(spec), route, w.tables());
    plan.scatter_refusal = refusal(&problems);
    plan
}
