//! Statement → shards: analysis of SQL text into a cached plan, and routing of a plan with its
//! parameters through the shard map.

mod analyze;
mod cache;
mod decide;
mod fallback;
pub mod fingerprint;
mod insert;
mod keys;
mod merge;
mod route;
pub mod shadow;
mod walk;

pub use analyze::analyze;
pub use cache::{PlanCache, TextMemo};
pub use insert::InsertSplit;
pub use route::{keys_all_equal, route};

/// Whether a table is a system catalog (the same on every shard).
pub fn is_system_table(name: &str) -> bool {
    walk::is_catalog(name)
}

/// How a table's rows are placed, as a statement names it (unqualified: `public.`).
pub fn table_rule<'m>(
    map: &'m crate::shardmap::ShardMap,
    name: &str,
) -> Option<&'m crate::shardmap::TableRule> {
    walk::lookup(map, name)
}

use crate::scatter::spec::MergeSpec;

/// What one statement text means for routing; cached per distinct text.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Statements in the text (a simple Query may carry several).
    pub statements: usize,
    /// Class of the statement (of the first one that writes, for several).
    pub kind: Kind,
    /// Where it goes before parameters are known.
    pub route: Route,
    /// How to combine the shards' results when a SELECT runs on several shards.
    pub merge: MergeSpec,
    /// Text sent to each shard instead of the original when scattering; None = the original.
    pub scatter_sql: Option<std::sync::Arc<str>>,
    /// Multi-row INSERT ... VALUES whose rows may belong to different shards.
    pub insert: Option<InsertSplit>,
    /// A routing hint from a `/* pgshard: ... */` comment; beats the analysis.
    pub hint: Option<Hint>,
    /// Tables the statement touches, as named in the text (for SHOW ROUTE and errors).
    pub tables: Vec<String>,
    /// Why the statement cannot run on several shards; returned by `route` only when the
    /// target turns out not to be a single shard.
    pub scatter_refusal: Option<RouteError>,
}

/// The class of a statement, which decides transaction and session handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// SELECT without locking or data-modifying CTEs, EXPLAIN of such a SELECT.
    Read,
    /// INSERT/UPDATE/DELETE/MERGE/TRUNCATE/SELECT FOR UPDATE/data-modifying CTE/LOCK.
    Write,
    /// CREATE/ALTER/DROP/COMMENT/GRANT...; `transactional` is false for statements that
    /// cannot run inside a transaction block.
    Ddl { transactional: bool },
    /// VACUUM, ANALYZE, CHECKPOINT: run on all shards outside a transaction.
    Utility,
    /// BEGIN / START TRANSACTION, READ ONLY or not.
    Begin { read_only: bool },
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT.
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO.
    Savepoint,
    /// SET, RESET, DISCARD, SHOW, LISTEN, PREPARE/EXECUTE/DEALLOCATE, cursors: session state
    /// the caller handles itself.
    Session,
    /// COPY FROM STDIN / TO STDOUT, with what its data looks like.
    Copy(CopySpec),
}

/// COPY data format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// Tab-separated text (the default).
    Text,
    /// FORMAT csv.
    Csv,
    /// FORMAT binary.
    Binary,
}

/// What the COPY data stream looks like, so the caller can split it by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Table as named in the statement; empty for COPY (query).
    pub table: String,
    /// Column list; empty = all columns in table order.
    pub columns: Vec<String>,
    /// true = FROM STDIN, false = TO STDOUT.
    pub from_stdin: bool,
    /// Data format.
    pub format: CopyFormat,
    /// Field separator: tab for text, comma for CSV unless set.
    pub delimiter: u8,
    /// CSV HEADER: the first line names the columns.
    pub header: bool,
    /// With `header`: the statement as shards get it, without HEADER.
    pub headerless_sql: Option<String>,
    /// NULL marker: `\N` for text, empty for CSV unless set.
    pub null: String,
    /// CSV quote character.
    pub quote: u8,
    /// CSV escape character (the quote unless set).
    pub escape: u8,
    /// Index of the sharding key within `columns`; None when `columns` is empty or lacks it.
    pub key_column: Option<usize>,
    /// COPY (SELECT ...) TO.
    pub query: bool,
}

/// Where a statement goes, before its parameters are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The union of the keys' shards under distribution `dist`; `within` is the geo hash
    /// column's value.
    Keys {
        dist: usize,
        keys: Vec<KeyExpr>,
        within: Option<KeyExpr>,
    },
    /// Every shard: keyless statements on sharded tables, DDL, utilities.
    AllShards,
    /// Only reference tables: writes go to every shard, reads to any one.
    Reference { write: bool },
    /// Only undeclared tables under `unknown_tables = "default_shard"`.
    DefaultShard,
    /// No table at all: any one shard.
    Any,
    /// Not routable: the error to send the client.
    Refuse {
        sqlstate: &'static str,
        message: String,
    },
}

/// A sharding key as the statement gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    /// Text form of a literal, quotes removed.
    Literal(String),
    /// `$n`, 1-based.
    Param(usize),
    /// `key = ANY($n)`: an array parameter.
    ParamArray(usize),
    /// A NULL literal: no shard holds it, so routing fails.
    Null,
}

/// A routing hint from a comment: `/* pgshard: shard=1 */` or `/* pgshard: key=42 */`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Run on this shard.
    Shard(usize),
    /// Run where this key of the statement's distribution lives.
    Key(String),
}

/// A short list of shard numbers, kept inline: routing one statement must not allocate.
pub type ShardList = smallvec::SmallVec<[usize; 4]>;

/// The shards a routed statement runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A single shard.
    One(usize),
    /// Sorted, without duplicates.
    Some(Vec<usize>),
    /// Every shard.
    All,
}

/// Why a statement cannot be routed, as an SQLSTATE and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    /// SQLSTATE for the ErrorResponse.
    pub sqlstate: &'static str,
    /// Message for the client, naming what to change.
    pub message: String,
}

impl RouteError {
    /// A feature_not_supported (0A000) error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        RouteError {
            sqlstate: "0A000",
            message: message.into(),
        }
    }
}

/// Bind parameters of an extended-protocol execution.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    /// Parameter values; None is SQL NULL.
    pub values: &'a [Option<&'a [u8]>],
    /// Bind's parameter format codes: 0 or 1 entries apply to all, else one per parameter.
    pub formats: &'a [i16],
}

impl Params<'_> {
    /// No parameters (simple Query protocol).
    pub const NONE: Params<'static> = Params {
        values: &[],
        formats: &[],
    };
}

impl Route {
    fn refuse(message: impl Into<String>) -> Route {
        Route::Refuse {
            sqlstate: "0A000",
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_merge;
