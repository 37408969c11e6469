//! Multi-row INSERT ... VALUES whose rows belong to different shards: one INSERT per shard.

use super::route::locate_expr;
use super::{KeyExpr, Params, RouteError};
use crate::shardmap::ShardMap;
use sqlparser::ast::{SetExpr, Statement};
use std::collections::BTreeMap;

/// The rows of a multi-row INSERT with each row's key, ready to split by shard.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertSplit {
    dist: usize,
    /// (key, geo hash column value) per VALUES row.
    rows: Vec<(KeyExpr, Option<KeyExpr>)>,
    statement: Statement,
    /// Rows with `$n` cannot be split: each per-shard text would need renumbered parameters.
    has_params: bool,
    original: String,
}

impl InsertSplit {
    /// A split of `statement`'s VALUES rows, each with its key.
    pub(super) fn new(
        dist: usize,
        rows: Vec<(KeyExpr, Option<KeyExpr>)>,
        statement: Statement,
        has_params: bool,
        original: &str,
    ) -> Self {
        InsertSplit {
            dist,
            rows,
            statement,
            has_params,
            original: original.to_string(),
        }
    }

    /// Rows in the statement.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// (shard, INSERT text with only that shard's rows, row count) per shard touched; one
    /// entry with the original text when every row lands on one shard.
    pub fn split(
        &self,
        map: &ShardMap,
        params: &[Option<&[u8]>],
    ) -> Result<Vec<(usize, String, u64)>, RouteError> {
        let p = Params {
            values: params,
            formats: &[],
        };
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, (key, within)) in self.rows.iter().enumerate() {
            let mut shards = super::ShardList::new();
            locate_expr(map, self.dist, key, within.as_ref(), &p, &mut shards)?;
            shards.dedup();
            let [shard] = shards[..] else {
                return Err(RouteError::unsupported(format!(
                    "row {} of the INSERT maps to a group of shards {shards:?}: set the table's hash column to a literal",
                    i + 1
                )));
            };
            by_shard.entry(shard).or_default().push(i);
        }
        if by_shard.len() == 1 {
            let (&shard, rows) = by_shard.iter().next().expect("one shard");
            return Ok(vec![(shard, self.original.clone(), rows.len() as u64)]);
        }
        if self.has_params {
            return Err(RouteError::unsupported(
                "a multi-row INSERT with parameters whose rows belong to different shards: send one row per statement",
            ));
        }
        let Statement::Insert(ins) = &self.statement else {
            unreachable!("built from an INSERT")
        };
        let Some(SetExpr::Values(values)) = ins.source.as_ref().map(|q| q.body.as_ref()) else {
            unreachable!("built from INSERT ... VALUES")
        };
        let mut out = Vec::with_capacity(by_shard.len());
        for (shard, rows) in by_shard {
            let mut part = ins.clone();
            let src = part.source.as_mut().expect("source");
            let mut v = values.clone();
            v.rows = rows.iter().map(|&i| values.rows[i].clone()).collect();
            *src.body = SetExpr::Values(v);
            out.push((
                shard,
                Statement::Insert(part).to_string(),
                rows.len() as u64,
            ));
        }
        Ok(out)
    }
}
