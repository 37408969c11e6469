//! Folding the shards' partial aggregate rows into one row per group.
//!
//! Groups are keyed by the exact bytes of the GROUP BY values, so values PostgreSQL considers
//! equal but prints differently on different shards (numeric 1.0 vs 1.00, float -0 vs 0) stay
//! separate groups. Float sums combine per-shard partial sums, so the last bits can differ from
//! a single-node run (as with PostgreSQL's own parallel aggregation).

use std::cmp::Ordering;
use std::collections::HashMap;

use super::merge::MergeError;
use super::spec::{AggKind, AggregateSpec};
use super::values::{oid, ColType, Kind};
use super::wire::{Field, Row};

/// A row as owned values, NULL as None.
pub type Values = Vec<Option<Vec<u8>>>;

/// Merged groups in order of first appearance.
#[derive(Debug, Default)]
pub struct Groups {
    spec: AggregateSpec,
    /// Columns summed as bigint counts: count aggregates and avg's hidden counts.
    count_cols: Vec<usize>,
    index: HashMap<Values, usize>,
    rows: Vec<Values>,
}

fn unsupported(what: String) -> MergeError {
    MergeError::Unsupported(what)
}

impl Groups {
    /// Empty groups for `spec`.
    pub fn new(spec: AggregateSpec) -> Groups {
        let mut count_cols: Vec<usize> = spec
            .aggregates
            .iter()
            .filter_map(|a| match a.kind {
                AggKind::Count => Some(a.column),
                AggKind::Avg { count_column } => Some(count_column),
                _ => None,
            })
            .collect();
        count_cols.sort_unstable();
        count_cols.dedup();
        Groups {
            spec,
            count_cols,
            ..Groups::default()
        }
    }

    /// Refuses aggregates over types whose partials cannot be combined exactly, and rewrites
    /// the avg columns' descriptors to the type avg returns (numeric, or float8 for floats).
    pub fn check_and_describe(&self, fields: &mut [Field]) -> Result<(), MergeError> {
        let ty = |c: usize| -> Result<ColType, MergeError> {
            let f = fields
                .get(c)
                .ok_or_else(|| MergeError::Mismatch(format!("aggregate column {c} is missing")))?;
            Ok(ColType::new(f.type_oid, f.format))
        };
        for &c in &self.count_cols {
            if ty(c)?.kind != Kind::Int {
                return Err(unsupported(format!("count column {c} is not an integer")));
            }
        }
        let mut avg_cols = Vec::new();
        for a in &self.spec.aggregates {
            let t = ty(a.column)?;
            let ok = match a.kind {
                AggKind::Count => true,
                AggKind::Sum => matches!(
                    t.kind,
                    Kind::Int | Kind::Float4 | Kind::Float8 | Kind::Numeric
                ),
                AggKind::Min | AggKind::Max => t.comparable(),
                AggKind::BoolAnd | AggKind::BoolOr => t.kind == Kind::Bool,
                // float4 partial sums have lost the float8 precision avg(real) accumulates in.
                AggKind::Avg { .. } => {
                    matches!(t.kind, Kind::Float8 | Kind::Int | Kind::Numeric)
                }
            };
            if !ok {
                return Err(unsupported(format!(
                    "{:?} over type oid {} (format {}) cannot be merged",
                    a.kind, t.oid, t.binary as i16
                )));
            }
            if let AggKind::Avg { .. } = a.kind {
                avg_cols.push((a.column, t.kind));
            }
        }
        for (c, kind) in avg_cols {
            let f = &mut fields[c];
            let (type_oid, typlen) = if kind == Kind::Float8 {
                (oid::FLOAT8, 8)
            } else {
                (oid::NUMERIC, -1)
            };
            f.type_oid = type_oid;
            f.typlen = typlen;
            f.typmod = -1;
            f.table_oid = 0;
            f.attnum = 0;
        }
        Ok(())
    }

    /// Adds one shard's partial row; `types` are the columns as the shards send them.
    pub fn fold(&mut self, row: &Row, types: &[ColType]) -> Result<(), MergeError> {
        let key: Values = self
            .spec
            .group_by
            .iter()
            .map(|&c| row.col(c).map(<[u8]>::to_vec))
            .collect();
        let Some(&i) = self.index.get(&key) else {
            self.index.insert(key, self.rows.len());
            self.rows.push(
                (0..row.len())
                    .map(|c| row.col(c).map(<[u8]>::to_vec))
                    .collect(),
            );
            return Ok(());
        };
        let acc = &mut self.rows[i];
        for &c in &self.count_cols {
            combine(acc, row, c, |a, b| add_int(types[c], a, b))?;
        }
        for a in &self.spec.aggregates {
            let t = types[a.column];
            let c = a.column;
            match a.kind {
                AggKind::Count => {}
                AggKind::Sum | AggKind::Avg { .. } => combine(acc, row, c, |x, y| add(t, x, y))?,
                AggKind::Min | AggKind::Max => {
                    let want = if a.kind == AggKind::Min {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    };
                    combine(acc, row, c, |x, y| {
                        Ok(if t.compare(y, x)? == want {
                            y.to_vec()
                        } else {
                            x.to_vec()
                        })
                    })?
                }
                AggKind::BoolAnd | AggKind::BoolOr => combine(acc, row, c, |x, y| {
                    let (x, y) = (bool_of(t, x)?, bool_of(t, y)?);
                    Ok(t.encode_bool(if a.kind == AggKind::BoolAnd {
                        x && y
                    } else {
                        x || y
                    }))
                })?,
            }
        }
        Ok(())
    }

    /// The merged rows with avg computed; `types` are the columns as the shards sent them.
    pub fn finish(self, types: &[ColType]) -> Result<Vec<Values>, MergeError> {
        let mut rows = self.rows;
        for a in &self.spec.aggregates {
            let AggKind::Avg { count_column } = a.kind else {
                continue;
            };
            let t = types[a.column];
            for row in &mut rows {
                let count = match &row[count_column] {
                    Some(v) => types[count_column]
                        .int(v)
                        .ok_or_else(|| bad_value(types[count_column]))?,
                    None => 0,
                };
                let Some(sum) = row[a.column].take() else {
                    continue;
                };
                if count <= 0 {
                    continue;
                }
                row[a.column] = Some(if t.kind == Kind::Float8 {
                    let s = t.float(&sum).ok_or_else(|| bad_value(t))?;
                    t.encode_float(s / count as f64)
                } else {
                    let s = t.numeric(&sum).ok_or_else(|| bad_value(t))?;
                    let avg = s.div_count(count as u64).ok_or_else(|| bad_value(t))?;
                    t.encode_numeric(&avg)
                });
            }
        }
        Ok(rows)
    }
}

fn bad_value(t: ColType) -> MergeError {
    MergeError::Mismatch(format!(
        "a shard sent an unreadable value of type oid {}",
        t.oid
    ))
}

/// Combines a non-NULL incoming value into the accumulator; NULL on either side is skipped.
fn combine(
    acc: &mut Values,
    row: &Row,
    c: usize,
    f: impl FnOnce(&[u8], &[u8]) -> Result<Vec<u8>, MergeError>,
) -> Result<(), MergeError> {
    let Some(incoming) = row.col(c) else {
        return Ok(());
    };
    let merged = match acc.get(c).and_then(|v| v.as_deref()) {
        Some(current) => f(current, incoming)?,
        None => incoming.to_vec(),
    };
    if c < acc.len() {
        acc[c] = Some(merged);
    }
    Ok(())
}

fn bool_of(t: ColType, v: &[u8]) -> Result<bool, MergeError> {
    t.bool(v).ok_or_else(|| bad_value(t))
}

fn add_int(t: ColType, a: &[u8], b: &[u8]) -> Result<Vec<u8>, MergeError> {
    let (x, y) = (
        t.int(a).ok_or_else(|| bad_value(t))?,
        t.int(b).ok_or_else(|| bad_value(t))?,
    );
    let range = || MergeError::Mismatch(format!("sum out of range for type oid {}", t.oid));
    t.encode_int(x.checked_add(y).ok_or_else(range)?)
        .ok_or_else(range)
}

/// Sum in the type PostgreSQL returned for the column, formatted the same way.
fn add(t: ColType, a: &[u8], b: &[u8]) -> Result<Vec<u8>, MergeError> {
    match t.kind {
        Kind::Int => add_int(t, a, b),
        Kind::Numeric => {
            let (x, y) = (
                t.numeric(a).ok_or_else(|| bad_value(t))?,
                t.numeric(b).ok_or_else(|| bad_value(t))?,
            );
            Ok(t.encode_numeric(&x.add(&y)))
        }
        Kind::Float4 => {
            // real + real is computed in single precision by PostgreSQL's float4pl.
            let (x, y) = (
                t.float(a).ok_or_else(|| bad_value(t))? as f32,
                t.float(b).ok_or_else(|| bad_value(t))? as f32,
            );
            Ok(t.encode_float((x + y) as f64))
        }
        Kind::Float8 => {
            let (x, y) = (
                t.float(a).ok_or_else(|| bad_value(t))?,
                t.float(b).ok_or_else(|| bad_value(t))?,
            );
            Ok(t.encode_float(x + y))
        }
        _ => Err(unsupported(format!("sum over type oid {}", t.oid))),
    }
}
