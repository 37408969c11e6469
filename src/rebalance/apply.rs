//! Applying a unit's changes to the target shard: each source transaction, in commit order,
//! becomes idempotent SQL (upsert or delete by primary key). Transactions that arrive back to
//! back are applied together, in one target transaction that also records the source LSN they
//! end at, so a restart resumes exactly after what is durable.

use super::stream::{Event, Lsn, Relation, Value};
use super::MoveError;
use crate::pghash::quote_ident;
use tokio_postgres::Client;

/// Checks that a change's key belongs to the moving unit: (table, key column text).
pub type Owns = Box<dyn Fn(&str, &str) -> Option<bool> + Send + Sync>;

/// Turns pgoutput events into SQL on the target.
pub struct Applier {
    move_id: u64,
    /// Sharding key column per table name.
    key_columns: std::collections::HashMap<String, String>,
    owns: Owns,
    /// SQL of committed source transactions not yet applied.
    batch: String,
    /// SQL of the source transaction being received.
    current: String,
    /// LSN the batch ends at.
    batch_end: Lsn,
    /// Last source LSN durably applied on the target.
    pub applied: Lsn,
    /// Row changes applied so far.
    pub changes: u64,
    batch_changes: u64,
    current_changes: u64,
}

impl Applier {
    /// An applier for move `move_id` whose tables have the given sharding key columns.
    pub fn new(
        move_id: u64,
        key_columns: std::collections::HashMap<String, String>,
        owns: Owns,
        applied: Lsn,
    ) -> Applier {
        Applier {
            move_id,
            key_columns,
            owns,
            batch: String::new(),
            current: String::new(),
            batch_end: applied,
            applied,
            changes: 0,
            batch_changes: 0,
            current_changes: 0,
        }
    }

    /// Takes one event; row changes must belong to the unit (checked with the router's own
    /// placement), or the move stops: the publication filter and the router disagree.
    pub fn on_event(&mut self, rel: Option<&Relation>, ev: &Event) -> Result<(), MoveError> {
        match ev {
            Event::Begin => {
                self.current.clear();
                self.current_changes = 0;
            }
            Event::Commit { end } => {
                self.batch.push_str(&self.current);
                self.batch_changes += self.current_changes;
                self.current.clear();
                self.current_changes = 0;
                self.batch_end = (*end).max(self.batch_end);
            }
            Event::Truncate => {
                return Err(MoveError::Refused(
                    "a TRUNCATE reached a table in motion on the source shard; abort the move"
                        .into(),
                ));
            }
            Event::Insert { new, .. } => {
                let rel =
                    rel.ok_or_else(|| MoveError::Stream("change before its relation".into()))?;
                self.check(rel, new)?;
                self.upsert(rel, new)?;
            }
            Event::Update { old, new, .. } => {
                let rel =
                    rel.ok_or_else(|| MoveError::Stream("change before its relation".into()))?;
                self.check(rel, new)?;
                if let Some(old) = old {
                    self.delete(rel, old)?;
                }
                self.upsert(rel, new)?;
            }
            Event::Delete { old, .. } => {
                let rel =
                    rel.ok_or_else(|| MoveError::Stream("change before its relation".into()))?;
                self.check(rel, old)?;
                self.delete(rel, old)?;
            }
            Event::Message { .. } | Event::Keepalive => {}
        }
        Ok(())
    }

    /// Size of the SQL gathered for the next flush.
    pub fn batch_bytes(&self) -> usize {
        self.batch.len()
    }

    /// True when committed changes wait to be applied.
    pub fn pending(&self) -> bool {
        self.batch_end > self.applied
    }

    /// Applies the committed batch in one target transaction, with the LSN it reaches.
    pub async fn flush(&mut self, target: &Client) -> Result<(), MoveError> {
        if !self.pending() {
            return Ok(());
        }
        let sql = format!(
            "BEGIN;{}INSERT INTO pgshard.move_progress (move_id, applied_lsn) VALUES ({}, '{}') \
             ON CONFLICT (move_id) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now();COMMIT",
            self.batch,
            self.move_id,
            super::stream::format_lsn(self.batch_end)
        );
        if let Err(e) = target.batch_execute(&sql).await {
            let _ = target.batch_execute("ROLLBACK").await;
            return Err(MoveError::Db(e));
        }
        self.applied = self.batch_end;
        self.changes += self.batch_changes;
        self.batch.clear();
        self.batch_changes = 0;
        Ok(())
    }

    fn check(&self, rel: &Relation, row: &[Value]) -> Result<(), MoveError> {
        let col = self.key_columns.get(&rel.name).ok_or_else(|| {
            MoveError::Refused(format!("table {} is not part of the move", rel.name))
        })?;
        let i = rel
            .columns
            .iter()
            .position(|c| c == col)
            .ok_or_else(|| MoveError::Stream(format!("{}: no column {col}", rel.name)))?;
        let Some(Value::Text(key)) = row.get(i) else {
            return Err(MoveError::Refused(format!(
                "{}: a change without its sharding key {col}",
                rel.name
            )));
        };
        match (self.owns)(&rel.name, key) {
            Some(true) => Ok(()),
            _ => Err(MoveError::Refused(format!(
                "{}: key {key} arrived from the publication but is not in the unit by the router's placement; the move is stopped",
                rel.name
            ))),
        }
    }

    fn upsert(&mut self, rel: &Relation, row: &[Value]) -> Result<(), MoveError> {
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        let mut sets = Vec::new();
        let mut keys = Vec::new();
        let mut toast = false;
        for (i, v) in row.iter().enumerate() {
            let c = ident(&rel.columns[i])?;
            if rel.key[i] {
                keys.push(c.clone());
            }
            let lit = match v {
                Value::Unchanged => {
                    toast = true;
                    continue;
                }
                Value::Null => "NULL".to_string(),
                Value::Text(t) => literal(t),
            };
            if !rel.key[i] {
                sets.push(format!("{c} = EXCLUDED.{c}"));
            }
            cols.push(c);
            vals.push(lit);
        }
        let table = table_ident(&rel.name)?;
        if keys.is_empty() {
            return Err(MoveError::Refused(format!(
                "{}: no primary key in the replication stream",
                rel.name
            )));
        }
        if toast {
            // An update that left a TOASTed column alone: the row is on the target already.
            let set: Vec<String> = cols
                .iter()
                .zip(&vals)
                .map(|(c, v)| format!("{c} = {v}"))
                .collect();
            let cond = key_condition(rel, row)?;
            self.current.push_str(&format!(
                "UPDATE {table} SET {} WHERE {cond};",
                set.join(", ")
            ));
        } else {
            let conflict = if sets.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", sets.join(", "))
            };
            self.current.push_str(&format!(
                "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO {conflict};",
                cols.join(", "),
                vals.join(", "),
                keys.join(", ")
            ));
        }
        self.current_changes += 1;
        Ok(())
    }

    fn delete(&mut self, rel: &Relation, old: &[Value]) -> Result<(), MoveError> {
        let cond = key_condition(rel, old)?;
        self.current.push_str(&format!(
            "DELETE FROM {} WHERE {cond};",
            table_ident(&rel.name)?
        ));
        self.current_changes += 1;
        Ok(())
    }
}

/// `pk1 = 'v1' AND pk2 = 'v2'` from a row or key image.
fn key_condition(rel: &Relation, row: &[Value]) -> Result<String, MoveError> {
    let mut parts = Vec::new();
    for (i, v) in row.iter().enumerate() {
        if !rel.key[i] {
            continue;
        }
        let Value::Text(t) = v else {
            return Err(MoveError::Refused(format!(
                "{}: primary key column {} is NULL in a change",
                rel.name, rel.columns[i]
            )));
        };
        parts.push(format!("{} = {}", ident(&rel.columns[i])?, literal(t)));
    }
    if parts.is_empty() {
        return Err(MoveError::Refused(format!(
            "{}: no primary key in the replication stream",
            rel.name
        )));
    }
    Ok(parts.join(" AND "))
}

fn ident(name: &str) -> Result<String, MoveError> {
    quote_ident(name)
        .ok_or_else(|| MoveError::Refused(format!("column name {name:?} cannot be quoted")))
}

/// `schema.table` or `table`, quoted.
pub fn table_ident(name: &str) -> Result<String, MoveError> {
    let parts: Result<Vec<String>, MoveError> = name.split('.').map(ident).collect();
    Ok(parts?.join("."))
}

/// A text value as an untyped SQL literal (the column's type applies on assignment and
/// comparison); standard_conforming_strings keeps backslashes literal.
fn literal(t: &str) -> String {
    format!("'{}'", t.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> Relation {
        Relation {
            name: "orders".into(),
            columns: vec!["id".into(), "tenant".into(), "note".into()],
            key: vec![true, false, false],
        }
    }

    fn applier() -> Applier {
        let keys = [("orders".to_string(), "tenant".to_string())]
            .into_iter()
            .collect();
        Applier::new(7, keys, Box::new(|_, k| Some(k == "big")), 0)
    }

    #[test]
    fn changes_become_idempotent_sql_in_commit_order() {
        let mut a = applier();
        let r = rel();
        let row =
            |id: &str, note: Value| vec![Value::Text(id.into()), Value::Text("big".into()), note];
        a.on_event(None, &Event::Begin).unwrap();
        a.on_event(
            Some(&r),
            &Event::Insert {
                rel: 1,
                new: row("1", Value::Text("it's".into())),
            },
        )
        .unwrap();
        a.on_event(
            Some(&r),
            &Event::Update {
                rel: 1,
                old: None,
                new: row("1", Value::Unchanged),
            },
        )
        .unwrap();
        a.on_event(
            Some(&r),
            &Event::Delete {
                rel: 1,
                old: vec![
                    Value::Text("1".into()),
                    Value::Text("big".into()),
                    Value::Null,
                ],
            },
        )
        .unwrap();
        assert!(!a.pending(), "nothing is applied before its commit");
        a.on_event(None, &Event::Commit { end: 42 }).unwrap();
        assert!(a.pending());
        assert_eq!(
            a.batch,
            "INSERT INTO orders (id, tenant, note) VALUES ('1', 'big', 'it''s') ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, note = EXCLUDED.note;\
             UPDATE orders SET id = '1', tenant = 'big' WHERE id = '1';\
             DELETE FROM orders WHERE id = '1';"
        );
    }

    #[test]
    fn a_row_outside_the_unit_stops_the_move() {
        let mut a = applier();
        let r = rel();
        let other = vec![
            Value::Text("2".into()),
            Value::Text("small".into()),
            Value::Null,
        ];
        assert!(matches!(
            a.on_event(Some(&r), &Event::Insert { rel: 1, new: other }),
            Err(MoveError::Refused(_))
        ));
        assert!(matches!(
            a.on_event(None, &Event::Truncate),
            Err(MoveError::Refused(_))
        ));
    }
}
