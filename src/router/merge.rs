//! The merge of a SELECT run on every shard: which output columns sort, group and aggregate,
//! and the rewritten text the shards run so that their partial results combine exactly.

use super::keys::{self, strip};
use crate::scatter::spec::{
    AggKind, Aggregate, AggregateSpec, ArithOp, CountExpr, MergeSpec, SortKey,
};
use sqlparser::ast::*;

/// Aggregates whose results cannot be combined from per-shard partial results.
const UNMERGEABLE: &[&str] = &[
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "bit_and",
    "bit_or",
    "bit_xor",
    "range_agg",
    "range_intersect_agg",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
];

/// The merge of a keyless SELECT, and the text to send instead (None = the original).
pub(super) fn plan(q: &Query) -> Result<(MergeSpec, Option<String>), String> {
    let mut q = q.clone();
    let mut spec = MergeSpec::default();
    let mut rewritten = false;
    let (limit, offset) = limits(&q)?;
    // FETCH FIRST n ROWS ONLY is LIMIT n spelled the standard way (Hibernate 6 writes it);
    // the shards get it as LIMIT. WITH TIES would need the merge to extend the window by ties.
    let limit = match q.fetch.take() {
        None => limit,
        Some(f) if f.with_ties || f.percent => {
            return Err(
                "FETCH FIRST ... WITH TIES cannot be combined across shards: use LIMIT".into(),
            )
        }
        Some(_) if limit.is_some() => return Err("LIMIT and FETCH FIRST together".into()),
        Some(f) => {
            rewritten = true;
            match &f.quantity {
                Some(e) => count(e)?,
                None => Some(Count::Constant(1)),
            }
        }
    };
    let SetExpr::Select(sel) = q.body.as_mut() else {
        return Err("this query shape cannot be combined across shards".into());
    };
    if matches!(sel.distinct, Some(Distinct::On(_))) {
        return Err("DISTINCT ON cannot be combined across shards".into());
    }
    if sel.having.is_some() {
        return Err("HAVING cannot be combined across shards".into());
    }
    spec.distinct = matches!(sel.distinct, Some(Distinct::Distinct));
    let mut items: Vec<(Option<Expr>, Option<String>)> = Vec::new();
    let mut wildcard_at = None;
    for (i, it) in sel.projection.iter().enumerate() {
        match it {
            SelectItem::UnnamedExpr(e) => items.push((Some(e.clone()), None)),
            SelectItem::ExprWithAlias { expr, alias } => {
                items.push((Some(expr.clone()), Some(keys::ident(alias))))
            }
            _ => {
                wildcard_at.get_or_insert(i);
                items.push((None, None));
            }
        }
    }
    let known = wildcard_at.unwrap_or(items.len());
    let mut funcs = Vec::new();
    for e in items.iter().filter_map(|i| i.0.as_ref()) {
        calls(e, &mut funcs);
    }
    for f in &funcs {
        if f.over.is_some() {
            return Err(format!(
                "window function {} cannot be combined across shards",
                f.name
            ));
        }
    }
    let group: Vec<Expr> = match &sel.group_by {
        GroupByExpr::Expressions(list, _) => list.clone(),
        GroupByExpr::All(_) => return Err("GROUP BY ALL cannot be combined across shards".into()),
    };
    let aggregating = !group.is_empty() || funcs.iter().any(|f| agg_name(f).is_some());
    let mut hidden: Vec<SelectItem> = Vec::new();
    if aggregating {
        if wildcard_at.is_some() {
            return Err("SELECT * with aggregates cannot be combined across shards".into());
        }
        let mut agg = AggregateSpec::default();
        for g in &group {
            let col = find(g, &items, known).ok_or_else(|| {
                format!("GROUP BY {g} cannot be combined across shards unless it appears in the select list")
            })?;
            if !agg.group_by.contains(&col) {
                agg.group_by.push(col);
            }
        }
        for (i, item) in sel.projection.iter_mut().enumerate() {
            if agg.group_by.contains(&i) {
                continue;
            }
            let e = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => unreachable!("no wildcard"),
            };
            let Some(kind) = combinable(e)? else {
                return Err(format!(
                    "select list item {e} is neither a GROUP BY expression nor an aggregate that combines across shards (count, sum, min, max, avg, bool_and, bool_or)"
                ));
            };
            let kind = match kind {
                AggKind::Avg { .. } => {
                    let count_column = items.len() + hidden.len();
                    let Expr::Function(f) = strip_nested_mut(e) else {
                        unreachable!("avg is a call")
                    };
                    let mut count = f.clone();
                    count.name = ObjectName::from(vec![Ident::new("count")]);
                    f.name = ObjectName::from(vec![Ident::new("sum")]);
                    hidden.push(SelectItem::UnnamedExpr(Expr::Function(count)));
                    rewritten = true;
                    AggKind::Avg { count_column }
                }
                k => k,
            };
            agg.aggregates.push(Aggregate { column: i, kind });
        }
        spec.aggregate = Some(agg);
    }
    if let Some(OrderBy { kind, .. }) = &q.order_by {
        let OrderByKind::Expressions(list) = kind else {
            return Err("ORDER BY ALL cannot be combined across shards".into());
        };
        for o in list {
            let descending = matches!(o.options.sort, Some(OrderBySort::Desc));
            if matches!(o.options.sort, Some(OrderBySort::Using(_))) {
                return Err("ORDER BY ... USING cannot be combined across shards".into());
            }
            let nulls_first = o.options.nulls_first.unwrap_or(descending);
            let column = match order_position(&o.expr, &items, known) {
                Some(c) => c,
                None if wildcard_at.is_some() => {
                    return Err(format!(
                        "ORDER BY {} with SELECT * cannot be combined across shards: add {} to the select list",
                        o.expr, o.expr
                    ))
                }
                None => {
                    let column = items.len() + hidden.len();
                    if let Some(agg) = spec.aggregate.as_mut() {
                        match combinable(&o.expr)? {
                            Some(AggKind::Avg { .. }) | None => {
                                return Err(format!(
                                    "ORDER BY {} cannot be combined across shards: add it to the select list",
                                    o.expr
                                ))
                            }
                            Some(kind) => agg.aggregates.push(Aggregate { column, kind }),
                        }
                    }
                    hidden.push(SelectItem::UnnamedExpr(o.expr.clone()));
                    column
                }
            };
            spec.order_by.push(SortKey {
                column,
                descending,
                nulls_first,
            });
        }
    }
    spec.hidden_columns = hidden.len();
    if !hidden.is_empty() {
        let SetExpr::Select(sel) = q.body.as_mut() else {
            unreachable!()
        };
        sel.projection.extend(hidden);
        rewritten = true;
    }
    spec.limit = limit.as_ref().and_then(Count::constant);
    spec.offset = offset.as_ref().and_then(Count::constant).unwrap_or(0);
    spec.limit_expr = limit.as_ref().and_then(Count::computed);
    spec.offset_expr = offset.as_ref().and_then(Count::computed);
    if limit.is_some() || offset.is_some() {
        rewritten = true;
        // Each shard's top limit+offset rows contain the global window; grouped partial
        // results are only complete without a limit, so aggregates get none.
        let computed = [&limit, &offset]
            .iter()
            .any(|c| matches!(c, Some(Count::Computed(..))));
        let shard_limit = match (&limit, spec.aggregate.is_some()) {
            (Some(l), false) => Some(window(l, offset.as_ref())),
            // Parameters in LIMIT/OFFSET arithmetic must stay in the text, so that the server
            // types them as it would the client's statement; the limit itself is always NULL.
            (_, true) if computed => {
                let l = limit.clone().unwrap_or(Count::Constant(0));
                Some(null_limit(&window(&l, offset.as_ref()))?)
            }
            _ => None,
        };
        q.limit_clause = shard_limit.map(|l| LimitClause::LimitOffset {
            limit: Some(l),
            offset: None,
            limit_by: Vec::new(),
        });
    }
    Ok((spec, rewritten.then(|| q.to_string())))
}

/// A LIMIT or OFFSET row count: a constant, a parameter bound at execution, or integer
/// arithmetic on parameters (kept as written for the shards, evaluated from the Bind).
#[derive(Debug, Clone)]
enum Count {
    Constant(u64),
    Param(u16),
    Computed(CountExpr, Box<Expr>),
}

impl Count {
    fn constant(&self) -> Option<u64> {
        match self {
            Count::Constant(n) => Some(*n),
            _ => None,
        }
    }

    /// What the merger evaluates from the Bind: None for a constant.
    fn computed(&self) -> Option<CountExpr> {
        match self {
            Count::Constant(_) => None,
            Count::Param(p) => Some(CountExpr::Param(*p)),
            Count::Computed(c, _) => Some(c.clone()),
        }
    }

    fn expr(&self) -> Expr {
        match self {
            Count::Constant(n) => Expr::value(Value::Number(n.to_string(), false)),
            Count::Param(p) => Expr::value(Value::Placeholder(format!("${p}"))),
            Count::Computed(_, e) => Expr::Nested(e.clone()),
        }
    }
}

/// The LIMIT each shard gets: the client's limit plus its offset, so that the top rows of every
/// shard together hold the global window.
fn window(limit: &Count, offset: Option<&Count>) -> Expr {
    match (limit, offset) {
        (Count::Constant(l), Some(Count::Constant(o))) => {
            Count::Constant(l.saturating_add(*o)).expr()
        }
        (l, None | Some(Count::Constant(0))) => l.expr(),
        (l, Some(o)) => Expr::BinaryOp {
            left: Box::new(l.expr()),
            op: BinaryOperator::Plus,
            right: Box::new(o.expr()),
        },
    }
}

/// A LIMIT that is always NULL (no limit) but still mentions the parameters of `w`.
fn null_limit(w: &Expr) -> Result<Expr, String> {
    let text = format!("CAST(CASE WHEN ({w}) IS NULL THEN NULL END AS int8)");
    sqlparser::parser::Parser::new(&sqlparser::dialect::PostgreSqlDialect {})
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| format!("LIMIT/OFFSET {w}: {e}"))
}

/// A LIMIT, OFFSET or FETCH FIRST row count (None: NULL, which means no limit).
fn count(e: &Expr) -> Result<Option<Count>, String> {
    if let Expr::Value(v) = strip(e) {
        if v.value == Value::Null {
            return Ok(None);
        }
    }
    let c = count_expr(e)?;
    let mut params = Vec::new();
    c.params(&mut params);
    Ok(Some(match c {
        CountExpr::Param(p) => Count::Param(p),
        c if params.is_empty() => match c.eval(&mut |_| Ok::<_, ()>(None)) {
            Ok(Some(n)) if n >= 0 => Count::Constant(n as u64),
            // Negative, or an error: the shards evaluate it too and report it.
            _ => Count::Computed(c, Box::new(e.clone())),
        },
        c => Count::Computed(c, Box::new(e.clone())),
    }))
}

/// Integer arithmetic on constants and parameters, as the merger evaluates it.
fn count_expr(e: &Expr) -> Result<CountExpr, String> {
    let refuse = || {
        format!("LIMIT/OFFSET {e} must be integer arithmetic on constants and parameters to combine across shards")
    };
    Ok(match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => CountExpr::Const(
                n.parse()
                    .map_err(|_| format!("LIMIT/OFFSET {n} is not a row count"))?,
            ),
            Value::Placeholder(p) => CountExpr::Param(
                p.strip_prefix('$')
                    .and_then(|n| n.parse::<u16>().ok())
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("LIMIT/OFFSET {p} is not a parameter pgshard knows"))?,
            ),
            _ => return Err(refuse()),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => CountExpr::Neg(Box::new(count_expr(expr)?)),
        Expr::UnaryOp {
            op: UnaryOperator::Plus,
            expr,
        } => count_expr(expr)?,
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Plus => ArithOp::Add,
                BinaryOperator::Minus => ArithOp::Sub,
                BinaryOperator::Multiply => ArithOp::Mul,
                BinaryOperator::Divide => ArithOp::Div,
                BinaryOperator::Modulo => ArithOp::Mod,
                _ => return Err(refuse()),
            };
            CountExpr::Op(
                Box::new(count_expr(left)?),
                op,
                Box::new(count_expr(right)?),
            )
        }
        _ => return Err(refuse()),
    })
}

/// LIMIT and OFFSET: constants or parameters (None: absent or NULL).
fn limits(q: &Query) -> Result<(Option<Count>, Option<Count>), String> {
    match &q.limit_clause {
        None => Ok((None, None)),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err("LIMIT BY cannot be combined across shards".into());
            }
            let l = match limit {
                Some(l) => count(l)?,
                None => None,
            };
            let o = match offset {
                Some(o) => count(&o.value)?,
                None => None,
            };
            Ok((l, o))
        }
        Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
            Ok((count(limit)?, count(offset)?))
        }
    }
}

fn strip_nested_mut(mut e: &mut Expr) -> &mut Expr {
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    e
}

/// The lower-case unqualified name of an aggregate we know, counting pg_catalog.count too.
fn agg_name(f: &Function) -> Option<String> {
    let name = f.name.0.last()?.as_ident().map(keys::ident)?;
    let known = matches!(
        name.as_str(),
        "count" | "sum" | "min" | "max" | "avg" | "bool_and" | "bool_or" | "every"
    );
    (known || UNMERGEABLE.contains(&name.as_str())).then_some(name)
}

/// How a select item combines if it is exactly one aggregate call; Err for aggregates that
/// cannot combine.
fn combinable(e: &Expr) -> Result<Option<AggKind>, String> {
    let mut fs = Vec::new();
    calls(e, &mut fs);
    for f in &fs {
        if let Some(n) = agg_name(f) {
            if UNMERGEABLE.contains(&n.as_str()) {
                return Err(format!("aggregate {n} cannot be combined across shards"));
            }
            let distinct = matches!(&f.args, FunctionArguments::List(l) if l.duplicate_treatment == Some(DuplicateTreatment::Distinct));
            if distinct {
                return Err(format!(
                    "{n}(DISTINCT ...) cannot be combined across shards"
                ));
            }
            if !f.within_group.is_empty() {
                return Err(format!(
                    "{n}(...) WITHIN GROUP cannot be combined across shards"
                ));
            }
        }
    }
    let cast = has_cast(e);
    let Expr::Function(f) = strip(e) else {
        return Ok(None);
    };
    if cast && agg_name(f).as_deref() == Some("avg") {
        return Err(format!("{e}: avg under a cast cannot be combined across shards; cast outside pgshard or drop the cast"));
    }
    Ok(match agg_name(f).as_deref() {
        Some("count") => Some(AggKind::Count),
        Some("sum") => Some(AggKind::Sum),
        Some("min") => Some(AggKind::Min),
        Some("max") => Some(AggKind::Max),
        Some("avg") => Some(AggKind::Avg { count_column: 0 }),
        Some("bool_and" | "every") => Some(AggKind::BoolAnd),
        Some("bool_or") => Some(AggKind::BoolOr),
        _ => None,
    })
}

/// Whether casts wrap the expression (a cast partial result still combines, except avg's).
fn has_cast(mut e: &Expr) -> bool {
    loop {
        match e {
            Expr::Nested(inner) => e = inner,
            Expr::Cast { .. } => return true,
            _ => return false,
        }
    }
}

/// Function calls in an expression (not inside subqueries).
fn calls<'e>(e: &'e Expr, out: &mut Vec<&'e Function>) {
    match e {
        Expr::Function(f) => {
            out.push(f);
            if let FunctionArguments::List(l) = &f.args {
                for a in &l.args {
                    let (FunctionArg::Named { arg, .. }
                    | FunctionArg::ExprNamed { arg, .. }
                    | FunctionArg::Unnamed(arg)) = a;
                    if let FunctionArgExpr::Expr(x) = arg {
                        calls(x, out);
                    }
                }
            }
        }
        Expr::BinaryOp { left, right, .. } => {
            calls(left, out);
            calls(right, out);
        }
        Expr::UnaryOp { expr, .. } | Expr::Nested(expr) | Expr::Cast { expr, .. } => {
            calls(expr, out)
        }
        Expr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            if let Some(o) = operand {
                calls(o, out);
            }
            for c in conditions {
                calls(&c.condition, out);
                calls(&c.result, out);
            }
            if let Some(x) = else_result {
                calls(x, out);
            }
        }
        _ => {}
    }
}

/// The output column an expression names: a position number, an alias, or an equal item.
fn order_position(
    e: &Expr,
    items: &[(Option<Expr>, Option<String>)],
    known: usize,
) -> Option<usize> {
    if let Expr::Value(v) = e {
        if let Value::Number(n, _) = &v.value {
            return n.parse::<usize>().ok().filter(|&n| n >= 1).map(|n| n - 1);
        }
    }
    find(e, items, known)
}

/// The position of a select item equal to `e` (by alias or by text), before any wildcard.
fn find(e: &Expr, items: &[(Option<Expr>, Option<String>)], known: usize) -> Option<usize> {
    if let Expr::Value(v) = e {
        if let Value::Number(n, _) = &v.value {
            return n
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= 1 && n <= known)
                .map(|n| n - 1);
        }
    }
    if let Expr::Identifier(id) = e {
        let name = keys::ident(id);
        if let Some(i) = items[..known]
            .iter()
            .position(|it| it.1.as_deref() == Some(name.as_str()))
        {
            return Some(i);
        }
    }
    let text = e.to_string();
    items[..known]
        .iter()
        .position(|it| it.0.as_ref().is_some_and(|x| x.to_string() == text))
}
