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
    /// `LIMIT $n`: the 1-based parameter whose bound value is the limit (extended protocol).
    pub limit_param: Option<u16>,
    /// `OFFSET $n`: the 1-based parameter whose bound value is the offset.
    pub offset_param: Option<u16>,
    /// Aggregation over the shards' partial results; None for plain rows.
    pub aggregate: Option<AggregateSpec>,
    /// SELECT DISTINCT: duplicates across shards are removed (exact bytes of the row).
    pub distinct: bool,
    /// Trailing columns the router added for the merge, dropped before the client sees rows.
    pub hidden_columns: usize,
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
