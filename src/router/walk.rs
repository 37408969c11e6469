//! Collects the tables a statement touches, which sharded tables are joined on their keys, and
//! which keys pin them; `decide` turns that into a route.

use super::keys::{self, column_equality, conjuncts, object_name, pin_of};
use super::KeyExpr;
use crate::shardmap::{ShardMap, TableRule};
use sqlparser::ast::*;

/// How a referenced table is placed.
#[derive(Debug, Clone)]
pub(super) enum Placement {
    Sharded {
        dist: usize,
        column: String,
        hash_column: Option<String>,
    },
    Reference,
    Undeclared,
    /// pg_catalog / information_schema: the same on every shard.
    Catalog,
}

/// One appearance of a table in the statement.
#[derive(Debug, Clone)]
pub(super) struct Rel {
    pub name: String,
    /// Alias, or the bare table name.
    pub(super) binding: String,
    pub placement: Placement,
    /// Inside a subquery, CTE or derived table rather than the statement's own FROM.
    pub(super) nested: bool,
    /// Scope nesting level the table was added at.
    pub(super) level: usize,
}

/// Statement walker state.
pub(super) struct Walker<'m> {
    pub(super) map: &'m ShardMap,
    pub rels: Vec<Rel>,
    scopes: Vec<Vec<usize>>,
    ctes: Vec<String>,
    pub(super) links: Vec<(usize, usize)>,
    pub(super) pins: Vec<(usize, Vec<KeyExpr>)>,
    pub(super) within: Vec<(usize, KeyExpr)>,
    /// Query nesting level; 1 is the statement itself (DML sets it before walking).
    pub depth: usize,
    pub modifying_cte: bool,
    pub set_operation: bool,
    /// Calls a built-in function that writes or takes locks (nextval, advisory locks, …): the
    /// statement is a write even as a SELECT, so it never goes to a replica.
    pub writing_function: bool,
}

impl<'m> Walker<'m> {
    /// An empty walker over `map`.
    pub fn new(map: &'m ShardMap) -> Self {
        Walker {
            map,
            rels: Vec::new(),
            scopes: vec![Vec::new()],
            ctes: Vec::new(),
            links: Vec::new(),
            pins: Vec::new(),
            within: Vec::new(),
            depth: 0,
            modifying_cte: false,
            set_operation: false,
            writing_function: false,
        }
    }

    /// Table names in order of appearance, without repeats.
    pub fn tables(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rels {
            if !out.contains(&r.name) {
                out.push(r.name.clone());
            }
        }
        out
    }

    /// Registers a table in the current scope and returns its index.
    pub fn add_table(&mut self, name: &ObjectName, alias: Option<&TableAlias>) -> Option<usize> {
        let full = object_name(name);
        if name.0.len() == 1 && self.ctes.contains(&full) {
            return None;
        }
        let placement = match lookup(self.map, &full) {
            Some(TableRule::Sharded {
                dist,
                column,
                hash_column,
            }) => Placement::Sharded {
                dist: *dist,
                column: column.clone(),
                hash_column: hash_column.clone(),
            },
            Some(TableRule::Reference) => Placement::Reference,
            None if is_catalog(&full) => Placement::Catalog,
            None => Placement::Undeclared,
        };
        let binding = match alias {
            Some(a) => keys::ident(&a.name),
            None => full.rsplit('.').next().unwrap_or(&full).to_string(),
        };
        let id = self.rels.len();
        self.rels.push(Rel {
            name: full,
            binding,
            placement,
            nested: self.depth > 1,
            level: self.scopes.len(),
        });
        self.scopes.last_mut().expect("scope").push(id);
        Some(id)
    }

    /// Walks a query one nesting level down.
    pub fn query(&mut self, q: &Query) {
        self.depth += 1;
        let ctes_before = self.ctes.len();
        if let Some(with) = &q.with {
            // Named before walking, so a recursive CTE's reference to itself is not a table.
            self.ctes
                .extend(with.cte_tables.iter().map(|c| keys::ident(&c.alias.name)));
            for cte in &with.cte_tables {
                self.query(&cte.query);
                if matches!(
                    *cte.query.body,
                    SetExpr::Insert(_)
                        | SetExpr::Update(_)
                        | SetExpr::Delete(_)
                        | SetExpr::Merge(_)
                ) {
                    self.modifying_cte = true;
                }
            }
        }
        self.set_expr(&q.body);
        if let Some(OrderBy {
            kind: OrderByKind::Expressions(list),
            ..
        }) = &q.order_by
        {
            for o in list {
                self.expr(&o.expr);
            }
        }
        self.ctes.truncate(ctes_before);
        self.depth -= 1;
    }

    fn set_expr(&mut self, s: &SetExpr) {
        match s {
            SetExpr::Select(sel) => self.select(sel),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { left, right, .. } => {
                let before = self.rels.len();
                self.set_expr(left);
                self.set_expr(right);
                self.set_operation |= self.rels[before..]
                    .iter()
                    .any(|r| matches!(r.placement, Placement::Sharded { .. }));
            }
            SetExpr::Values(v) => v
                .rows
                .iter()
                .flat_map(|r| &r.content)
                .for_each(|e| self.expr(e)),
            SetExpr::Insert(st)
            | SetExpr::Update(st)
            | SetExpr::Delete(st)
            | SetExpr::Merge(st) => {
                self.modifying_cte = true;
                self.dml(st);
            }
            SetExpr::Table(t) => {
                if let Some(name) = &t.table_name {
                    let mut parts = Vec::new();
                    if let Some(s) = &t.schema_name {
                        parts.push(s.clone());
                    }
                    parts.push(name.clone());
                    self.add_table(&ObjectName::from(parts), None);
                }
            }
        }
    }

    /// Tables and conditions of a data-modifying statement nested in a CTE.
    pub fn dml(&mut self, st: &Statement) {
        match st {
            Statement::Insert(i) => {
                if let TableObject::TableName(n) = &i.table {
                    self.add_table(n, None);
                }
                if let Some(src) = &i.source {
                    self.query(src);
                }
            }
            Statement::Update(u) => {
                self.from(std::slice::from_ref(&u.table));
                if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) =
                    &u.from
                {
                    self.from(f);
                }
                u.assignments.iter().for_each(|a| self.expr(&a.value));
                if let Some(w) = &u.selection {
                    self.condition(w, true);
                }
            }
            Statement::Delete(d) => {
                let (FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f)) = &d.from;
                self.from(f);
                if let Some(u) = &d.using {
                    self.from(u);
                }
                if let Some(w) = &d.selection {
                    self.condition(w, true);
                }
            }
            Statement::Merge(m) => {
                self.table_factor(&m.table);
                self.table_factor(&m.source);
                self.condition(&m.on, false);
            }
            _ => {}
        }
    }

    fn select(&mut self, s: &Select) {
        self.scopes.push(Vec::new());
        self.from(&s.from);
        for item in &s.projection {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    self.expr(e)
                }
                _ => {}
            }
        }
        if let Some(w) = &s.selection {
            self.condition(w, true);
        }
        if let GroupByExpr::Expressions(list, _) = &s.group_by {
            list.iter().for_each(|e| self.expr(e));
        }
        if let Some(h) = &s.having {
            self.expr(h);
        }
        self.scopes.pop();
    }

    /// Walks a FROM list into the current scope.
    pub fn from(&mut self, list: &[TableWithJoins]) {
        for twj in list {
            self.table_factor(&twj.relation);
            for j in &twj.joins {
                self.table_factor(&j.relation);
                let (c, inner) = match &j.join_operator {
                    JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, true),
                    JoinOperator::Left(c)
                    | JoinOperator::LeftOuter(c)
                    | JoinOperator::Right(c)
                    | JoinOperator::RightOuter(c)
                    | JoinOperator::FullOuter(c)
                    | JoinOperator::CrossJoin(c)
                    | JoinOperator::Semi(c)
                    | JoinOperator::LeftSemi(c)
                    | JoinOperator::RightSemi(c)
                    | JoinOperator::Anti(c)
                    | JoinOperator::LeftAnti(c)
                    | JoinOperator::RightAnti(c) => (c, false),
                    _ => continue,
                };
                match c {
                    JoinConstraint::On(e) => self.condition(e, inner),
                    JoinConstraint::Using(cols) => self.using(cols),
                    _ => {}
                }
            }
        }
    }

    /// `JOIN b USING (k)`: links b with an earlier table of the scope whose key is k.
    fn using(&mut self, cols: &[ObjectName]) {
        let scope = self.scopes.last().cloned().unwrap_or_default();
        let Some((&right, earlier)) = scope.split_last() else {
            return;
        };
        for c in cols {
            let col = object_name(c);
            if self.key_column(right) != Some(col.as_str()) {
                continue;
            }
            if let Some(&left) = earlier
                .iter()
                .find(|&&l| self.key_column(l) == Some(col.as_str()))
            {
                self.links.push((left, right));
            }
        }
    }

    /// Registers the tables of one FROM item.
    pub fn table_factor(&mut self, tf: &TableFactor) {
        match tf {
            // `FROM generate_series(1, 3)`: a set-returning function, not a table.
            TableFactor::Table {
                args: Some(args), ..
            } => args.args.iter().for_each(|a| self.function_arg(a)),
            TableFactor::Table { name, alias, .. } => {
                self.add_table(name, alias.as_ref());
            }
            TableFactor::Derived { subquery, .. } => self.query(subquery),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.from(std::slice::from_ref(table_with_joins)),
            TableFactor::Function { args, .. } => args.iter().for_each(|a| self.function_arg(a)),
            TableFactor::TableFunction { expr, .. } => self.expr(expr),
            TableFactor::UNNEST { array_exprs, .. } => {
                array_exprs.iter().for_each(|e| self.expr(e))
            }
            _ => {}
        }
    }

    fn function_arg(&mut self, a: &FunctionArg) {
        let (FunctionArg::Named { arg, .. }
        | FunctionArg::ExprNamed { arg, .. }
        | FunctionArg::Unnamed(arg)) = a;
        if let FunctionArgExpr::Expr(e) = arg {
            self.expr(e);
        }
    }

    /// A WHERE/ON condition: key equalities between tables link them; with `pinning`,
    /// conjuncts restricting a key pin its table.
    pub fn condition(&mut self, e: &Expr, pinning: bool) {
        let mut cs = Vec::new();
        conjuncts(e, &mut cs);
        for c in cs {
            if let Some((a, b)) = column_equality(c) {
                if let (Some(x), Some(y)) = (
                    self.resolve(&a.0, &a.1, false),
                    self.resolve(&b.0, &b.1, false),
                ) {
                    self.links.push((x, y));
                    continue;
                }
            }
            if pinning {
                if let Some(p) = pin_of(c) {
                    // Only the current query's own tables: a condition in a subquery may sit
                    // under an OR of the outer query and restrict nothing there.
                    let here = |r: &usize| self.scopes.last().is_some_and(|s| s.contains(r));
                    if let Some(r) = self.resolve(&p.qual, &p.column, false).filter(here) {
                        self.pins.push((r, p.keys));
                    } else if let (Some(r), [k]) = (
                        self.resolve(&p.qual, &p.column, true).filter(here),
                        p.keys.as_slice(),
                    ) {
                        self.within.push((r, k.clone()));
                    }
                    continue;
                }
            }
            self.expr(c);
        }
    }

    /// Records that `rel`'s key is one of `keys`.
    pub fn pin(&mut self, rel: usize, keys: Vec<KeyExpr>) {
        self.pins.push((rel, keys));
    }

    /// Lets every pin reach `rel` (the target of INSERT ... SELECT gets exactly the selected rows).
    pub fn receives_pins(&mut self, rel: usize) {
        self.rels[rel].level = usize::MAX;
    }

    /// Records that two tables are joined on their keys.
    pub fn link(&mut self, a: usize, b: usize) {
        self.links.push((a, b));
    }

    /// A sharded table added at or after `from` whose key column a (qualified) column names.
    pub fn find_source(&self, from: usize, qual: Option<&str>, col: &str) -> Option<usize> {
        (from..self.rels.len()).find(|&r| {
            let named = qual.is_none_or(|q| self.rels[r].binding == q || self.rels[r].name == q);
            named && self.key_column(r) == Some(col)
        })
    }

    /// The sharding key column of a sharded table.
    pub(super) fn key_column(&self, rel: usize) -> Option<&str> {
        match &self.rels[rel].placement {
            Placement::Sharded { column, .. } => Some(column),
            _ => None,
        }
    }

    /// The sharded table whose key (or, with `hash`, geo hash column) a column reference names,
    /// looking from the innermost scope outwards.
    pub fn resolve(&self, qual: &Option<String>, col: &str, hash: bool) -> Option<usize> {
        let matches = |r: usize| match &self.rels[r].placement {
            Placement::Sharded {
                column,
                hash_column,
                ..
            } => {
                if hash {
                    hash_column.as_deref() == Some(col)
                } else {
                    column == col
                }
            }
            _ => false,
        };
        for scope in self.scopes.iter().rev() {
            match qual {
                Some(q) => {
                    if let Some(&r) = scope
                        .iter()
                        .find(|&&r| &self.rels[r].binding == q || &self.rels[r].name == q)
                    {
                        return matches(r).then_some(r);
                    }
                }
                // An unqualified name may be a column of any table of an inner query that we
                // know no columns of, so it only names a key in the innermost query.
                None => return scope.iter().copied().find(|&r| matches(r)),
            }
        }
        None
    }

    /// Finds tables in subqueries anywhere in an expression.
    pub fn expr(&mut self, e: &Expr) {
        match e {
            Expr::Subquery(q) | Expr::Exists { subquery: q, .. } => self.query(q),
            Expr::In { expr, target, .. } => {
                self.expr(expr);
                match target {
                    InTarget::List(l) => l.iter().for_each(|x| self.expr(x)),
                    InTarget::Subquery(q) => self.query(q),
                    InTarget::Unnest(x) => self.expr(x),
                    _ => {}
                }
            }
            Expr::BinaryOp { left, right, .. }
            | Expr::AnyOp { left, right, .. }
            | Expr::AllOp { left, right, .. }
            | Expr::IsDistinctFrom(left, right)
            | Expr::IsNotDistinctFrom(left, right) => {
                self.expr(left);
                self.expr(right);
            }
            Expr::UnaryOp { expr, .. }
            | Expr::Nested(expr)
            | Expr::Cast { expr, .. }
            | Expr::IsNull(expr)
            | Expr::IsNotNull(expr)
            | Expr::IsTrue(expr)
            | Expr::IsFalse(expr)
            | Expr::IsNotTrue(expr)
            | Expr::IsNotFalse(expr) => self.expr(expr),
            Expr::Between {
                expr, low, high, ..
            } => {
                self.expr(expr);
                self.expr(low);
                self.expr(high);
            }
            Expr::Like { expr, pattern, .. } | Expr::ILike { expr, pattern, .. } => {
                self.expr(expr);
                self.expr(pattern);
            }
            Expr::Function(f) => {
                if let Some(name) = f.name.0.last().and_then(|p| p.as_ident()) {
                    self.writing_function |= is_writing_function(&name.value);
                }
                match &f.args {
                    FunctionArguments::List(l) => l.args.iter().for_each(|a| self.function_arg(a)),
                    FunctionArguments::Subquery(q) => self.query(q),
                    FunctionArguments::None => {}
                }
                if let Some(filter) = &f.filter {
                    self.expr(filter);
                }
            }
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                if let Some(o) = operand {
                    self.expr(o);
                }
                for c in conditions {
                    self.expr(&c.condition);
                    self.expr(&c.result);
                }
                if let Some(x) = else_result {
                    self.expr(x);
                }
            }
            Expr::Tuple(list) => list.iter().for_each(|x| self.expr(x)),
            Expr::Array(a) => a.elem.iter().for_each(|x| self.expr(x)),
            _ => {}
        }
    }
}

/// The rule for a table as named in SQL; the default search_path finds bare names in public.
pub(super) fn lookup<'m>(map: &'m ShardMap, name: &str) -> Option<&'m TableRule> {
    map.table(name).or_else(|| match name.contains('.') {
        false => map.table(&format!("public.{name}")),
        true => None,
    })
}

/// System catalogs exist on every shard.
pub(super) fn is_catalog(name: &str) -> bool {
    let (schema, table) = match name.rsplit_once('.') {
        Some((s, t)) => (Some(s), t),
        None => (None, name),
    };
    match schema {
        Some(s) => {
            s == "pg_catalog"
                || s == "information_schema"
                || (s.starts_with("pg_") && table.starts_with("pg_"))
        }
        None => table.starts_with("pg_"),
    }
}

/// Built-in functions that change data or state, or wait on locks: a read-only replica would
/// refuse them (25006), so statements calling them run on the primary.
fn is_writing_function(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "nextval",
        "setval",
        "pg_notify",
        "set_config",
        "txid_current",
        "pg_current_xact_id",
        "lo_create",
        "lo_import",
        "lo_unlink",
        "lo_from_bytea",
        "lo_put",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_reload_conf",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_drop_replication_slot",
        "pg_replication_origin_create",
        "dblink_exec",
    ];
    let n = name.to_ascii_lowercase();
    EXACT.contains(&n.as_str())
        || n.starts_with("pg_advisory")
        || n.starts_with("pg_try_advisory")
        || n.starts_with("pg_create_") && n.ends_with("_slot")
}
