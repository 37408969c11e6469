//! Reading sharding keys out of expressions: names as PostgreSQL folds them, literals and
//! parameters through casts, and the predicate shapes that pin a key.

use super::KeyExpr;
use sqlparser::ast::{BinaryOperator, Expr, Ident, InTarget, ObjectName, UnaryOperator, Value};

/// An identifier as PostgreSQL sees it: unquoted names fold to lower case.
pub(super) fn ident(id: &Ident) -> String {
    match id.quote_style {
        Some(_) => id.value.clone(),
        None => id.value.to_lowercase(),
    }
}

/// A possibly qualified name, parts joined with '.'.
pub(super) fn object_name(n: &ObjectName) -> String {
    let parts: Vec<String> =
        n.0.iter()
            .map(|p| match p.as_ident() {
                Some(id) => ident(id),
                None => p.to_string(),
            })
            .collect();
    parts.join(".")
}

/// The expression under parentheses and casts, which do not change which row a key names.
pub(super) fn strip(mut e: &Expr) -> &Expr {
    loop {
        match e {
            Expr::Nested(inner) => e = inner,
            Expr::Cast { expr, .. } => e = expr,
            _ => return e,
        }
    }
}

/// A column reference: (qualifier, column), both folded.
pub(super) type ColumnRef = (Option<String>, String);

/// The column an expression names, through parentheses and casts.
pub(super) fn column_ref(e: &Expr) -> Option<ColumnRef> {
    match strip(e) {
        Expr::Identifier(id) => Some((None, ident(id))),
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let n = parts.len();
            Some((Some(ident(&parts[n - 2])), ident(&parts[n - 1])))
        }
        _ => None,
    }
}

/// `$n` → n.
pub(super) fn placeholder(s: &str) -> Option<usize> {
    s.strip_prefix('$')?.parse().ok().filter(|&n| n > 0)
}

/// A constant or parameter usable as a key.
pub(super) fn key_value(e: &Expr) -> Option<KeyExpr> {
    match strip(e) {
        Expr::Value(v) => value_key(&v.value),
        Expr::TypedString(t) => value_key(&t.value.value),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match strip(expr) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(KeyExpr::Literal(format!("-{n}"))),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

fn value_key(v: &Value) -> Option<KeyExpr> {
    Some(match v {
        Value::Number(n, _) => KeyExpr::Literal(n.to_string()),
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s) => KeyExpr::Literal(s.clone()),
        Value::DollarQuotedString(d) => KeyExpr::Literal(d.value.clone()),
        Value::Null => KeyExpr::Null,
        Value::Placeholder(p) => KeyExpr::Param(placeholder(p)?),
        _ => return None,
    })
}

/// The top-level AND conjuncts of a condition.
pub(super) fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Expr::Nested(inner) => conjuncts(inner, out),
        _ => out.push(e),
    }
}

/// A predicate that restricts a column to a set of keys: `col = v`, `v = col`,
/// `col IN (v, ...)`, `col = ANY($n | '{..}' | ARRAY[..])`, and ORs of those on one column.
pub(super) struct Pin {
    pub qual: Option<String>,
    pub column: String,
    pub keys: Vec<KeyExpr>,
}

/// The pin a predicate expresses, if it has that shape.
pub(super) fn pin_of(e: &Expr) -> Option<Pin> {
    let one = |col: &Expr, val: &Expr| {
        let (qual, column) = column_ref(col)?;
        Some(Pin {
            qual,
            column,
            keys: vec![key_value(val)?],
        })
    };
    match strip(e) {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => one(left, right).or_else(|| one(right, left)),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Or,
            right,
        } => {
            let (mut a, b) = (pin_of(left)?, pin_of(right)?);
            if a.column != b.column || a.qual != b.qual {
                return None;
            }
            a.keys.extend(b.keys);
            Some(a)
        }
        Expr::In {
            expr,
            target: InTarget::List(list),
            negated: false,
            ..
        } => {
            let (qual, column) = column_ref(expr)?;
            let keys = list.iter().map(key_value).collect::<Option<Vec<_>>>()?;
            Some(Pin { qual, column, keys })
        }
        Expr::AnyOp {
            left,
            compare_op: BinaryOperator::Eq,
            right,
            ..
        } => {
            let (qual, column) = column_ref(left)?;
            Some(Pin {
                qual,
                column,
                keys: array_keys(right)?,
            })
        }
        _ => None,
    }
}

/// The keys of an array operand of `= ANY(...)`.
fn array_keys(e: &Expr) -> Option<Vec<KeyExpr>> {
    match strip(e) {
        Expr::Array(a) => a.elem.iter().map(key_value).collect(),
        other => match key_value(other)? {
            KeyExpr::Param(n) => Some(vec![KeyExpr::ParamArray(n)]),
            KeyExpr::Literal(text) => {
                let elems = super::route::parse_text_array(text.as_bytes()).ok()?;
                Some(
                    elems
                        .into_iter()
                        .map(|e| match e {
                            Some(b) => KeyExpr::Literal(String::from_utf8_lossy(&b).into_owned()),
                            None => KeyExpr::Null,
                        })
                        .collect(),
                )
            }
            _ => None,
        },
    }
}

/// `a = b` between two column references.
pub(super) fn column_equality(e: &Expr) -> Option<(ColumnRef, ColumnRef)> {
    match strip(e) {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => Some((column_ref(left)?, column_ref(right)?)),
        _ => None,
    }
}
