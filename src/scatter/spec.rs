//! How the results of one statement run on several shards are combined: filled in by the router
//! from the statement, carried out by the merger on raw DataRow bytes.

/// The combination step for a multi-shard SELECT. Columns are 0-based positions in the result
/// the shards return (which may include hidden columns the router added, e.g. avg's count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSpec {
    /// ORDER BY of the statement: the shards return sorted rows, merged k-way while streaming.
    pub order_by: Vec<SortKey>,
    /// LIMIT applied after the merge (each shard was sent LIMIT limit+offset, no OFFSET).
    pub limit: Option<u64>,
    /// OFFSET applied after the merge.
    pub offset: u64,
    /// A LIMIT given by parameters (`LIMIT $1`, `LIMIT $1 + 1`), evaluated once the Bind is
    /// known (extended protocol).
    pub limit_expr: Option<CountExpr>,
    /// An OFFSET given by parameters.
    pub offset_expr: Option<CountExpr>,
    /// Aggregation over the shards' partial results; None for plain rows.
    pub aggregate: Option<AggregateSpec>,
    /// SELECT DISTINCT: duplicates across shards are removed (exact bytes of the row).
    pub distinct: bool,
    /// Trailing columns the router added for the merge, dropped before the client sees rows.
    pub hidden_columns: usize,
}

/// Integer arithmetic over constants and Bind parameters: a LIMIT or OFFSET expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountExpr {
    Const(i64),
    /// The 1-based parameter.
    Param(u16),
    Neg(Box<CountExpr>),
    Op(Box<CountExpr>, ArithOp, Box<CountExpr>),
}

/// The operators a row-count expression may use (PostgreSQL's integer semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    /// Integer division, truncating toward zero.
    Div,
    Mod,
}

/// Why a row-count expression has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountError<E> {
    #[error("{0}")]
    Param(E),
    #[error("bigint out of range")]
    Overflow,
    #[error("division by zero")]
    DivisionByZero,
}

impl CountExpr {
    /// The value with each parameter's from `param` (None: NULL, which makes the whole NULL).
    pub fn eval<E>(
        &self,
        param: &mut impl FnMut(u16) -> Result<Option<i64>, E>,
    ) -> Result<Option<i64>, CountError<E>> {
        Ok(match self {
            CountExpr::Const(n) => Some(*n),
            CountExpr::Param(p) => param(*p).map_err(CountError::Param)?,
            CountExpr::Neg(e) => match e.eval(param)? {
                Some(v) => Some(v.checked_neg().ok_or(CountError::Overflow)?),
                None => None,
            },
            CountExpr::Op(l, op, r) => {
                let (Some(a), Some(b)) = (l.eval(param)?, r.eval(param)?) else {
                    return Ok(None);
                };
                let v = match op {
                    ArithOp::Add => a.checked_add(b),
                    ArithOp::Sub => a.checked_sub(b),
                    ArithOp::Mul => a.checked_mul(b),
                    ArithOp::Div | ArithOp::Mod if b == 0 => {
                        return Err(CountError::DivisionByZero)
                    }
                    ArithOp::Div => a.checked_div(b),
                    ArithOp::Mod => a.checked_rem(b),
                };
                Some(v.ok_or(CountError::Overflow)?)
            }
        })
    }

    /// The parameters it reads.
    pub fn params(&self, out: &mut Vec<u16>) {
        match self {
            CountExpr::Const(_) => {}
            CountExpr::Param(p) => out.push(*p),
            CountExpr::Neg(e) => e.params(out),
            CountExpr::Op(l, _, r) => {
                l.params(out);
                r.params(out);
            }
        }
    }
}

/// One ORDER BY key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub column: usize,
    pub descending: bool,
    /// PostgreSQL's default: NULLS LAST for ASC, NULLS FIRST for DESC.
    pub nulls_first: bool,
}

/// Partial aggregates from each shard, combined into one row per group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AggregateSpec {
    /// Columns that are GROUP BY expressions (rows with equal bytes there are one group).
    pub group_by: Vec<usize>,
    /// Every other visible column is an aggregate listed here.
    pub aggregates: Vec<Aggregate>,
}

/// An aggregate output column and how its partial values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregate {
    pub column: usize,
    pub kind: AggKind,
}

/// Aggregates whose per-shard results combine exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// count(*) / count(x): summed.
    Count,
    /// sum(x): summed (NULL when every shard's is NULL).
    Sum,
    Min,
    Max,
    BoolAnd,
    BoolOr,
    /// avg(x), sent to the shards as sum(x) in this column plus count(x) in `count_column`
    /// (a hidden column); the merged value is sum/count.
    Avg {
        count_column: usize,
    },
}
