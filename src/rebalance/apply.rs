//! Applying a unit's changes to the target shard: each source transaction, in commit order,
//! becomes idempotent SQL (upsert or delete by primary key). Transactions that arrive back to
//! back are applied together, in one target transaction that also records the source LSN they
//! end at, so a restart resumes exactly after what is durable. Consecutive upserts (or deletes)
//! of one table become one multi-row statement: a statement per row made the target's parse
//! and plan the bottleneck, and catch-up could not outrun 8 writers.

use super::stream::{Event, Lsn, Relation, Value};
use super::MoveError;
use crate::pghash::quote_ident;
use tokio_postgres::Client;

/// Checks that a change's key belongs to the moving unit: (table, key column text).
pub type Owns = Box<dyn Fn(&str, &str, Option<&str>) -> Option<bool> + Send + Sync>;

/// The columns that place a table's rows: its sharding key, and (a geo table whose unit is a
/// region's share) the hash column that picks the member of the region's group.
#[derive(Debug, Clone)]
pub struct Placement {
    pub key: String,
    pub within: Option<String>,
}

/// Rows one multi-row statement carries at most.
const RUN_ROWS: usize = 500;

/// One row change, as SQL pieces that consecutive changes of the same shape share.
#[derive(Debug)]
enum Change {
    /// `head` = `INSERT INTO t (cols) VALUES `, `tail` = ` ON CONFLICT (pk) DO …`, `row` =
    /// `(v1, v2)`, `key` = the primary key tuple (a statement may name a key only once).
    Upsert {
        head: String,
        tail: String,
        row: String,
        key: String,
    },
    /// `head` = `DELETE FROM t WHERE (pk) IN (`, `key` = the primary key tuple.
    Delete { head: String, key: String },
    /// A statement of its own.
    Sql(String),
}

/// The multi-row statement being gathered: upserts or deletes of one shape.
#[derive(Debug, Default)]
struct Run {
    head: String,
    /// Empty for deletes.
    tail: String,
    upsert: bool,
    rows: Vec<String>,
    keys: std::collections::HashSet<String>,
    bytes: usize,
}

impl Run {
    /// Takes `ch` if it extends this run; gives it back otherwise.
    fn take(&mut self, ch: Change) -> Option<Change> {
        let fits = self.rows.len() < RUN_ROWS
            && match &ch {
                Change::Upsert {
                    head, tail, key, ..
                } => {
                    self.upsert
                        && *head == self.head
                        && *tail == self.tail
                        && !self.keys.contains(key)
                }
                Change::Delete { head, .. } => !self.upsert && *head == self.head,
                Change::Sql(_) => false,
            };
        if !fits {
            return Some(ch);
        }
        match ch {
            Change::Upsert { row, key, .. } => {
                self.bytes += row.len() + 2;
                self.rows.push(row);
                self.keys.insert(key);
            }
            Change::Delete { key, .. } => {
                self.bytes += key.len() + 2;
                self.rows.push(key);
            }
            Change::Sql(_) => unreachable!("never fits"),
        }
        None
    }

    /// Starts a run with `ch`, or returns it when it is a statement of its own.
    fn start(ch: Change) -> Result<Run, String> {
        let (head, tail, upsert, row, key) = match ch {
            Change::Upsert {
                head,
                tail,
                row,
                key,
            } => (head, tail, true, row, Some(key)),
            Change::Delete { head, key } => (head, String::new(), false, key, None),
            Change::Sql(sql) => return Err(sql),
        };
        let bytes = head.len() + tail.len() + row.len() + 4;
        Ok(Run {
            head,
            tail,
            upsert,
            rows: vec![row],
            keys: key.into_iter().collect(),
            bytes,
        })
    }

    fn render(&self, out: &mut String) {
        if self.rows.is_empty() {
            return;
        }
        out.push_str(&self.head);
        out.push_str(&self.rows.join(", "));
        if !self.upsert {
            out.push(')');
        }
        out.push_str(&self.tail);
        out.push(';');
    }
}

/// Creates the table on a move's target where the applier records how far it has applied.
pub async fn progress_table(target: &Client) -> Result<(), MoveError> {
    target
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgshard; CREATE TABLE IF NOT EXISTS pgshard.move_progress \
             (move_id bigint PRIMARY KEY, applied_lsn pg_lsn NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    Ok(())
}

/// Turns pgoutput events into SQL on the target.
pub struct Applier {
    move_id: u64,
    /// Placing columns per table name.
    key_columns: std::collections::HashMap<String, Placement>,
    owns: Owns,
    /// SQL of committed source transactions not yet applied (before `run`).
    batch: String,
    /// The last statement of the batch, still taking rows.
    run: Run,
    /// Changes of the source transaction being received.
    current: Vec<Change>,
    /// LSN the batch ends at.
    batch_end: Lsn,
    /// Last source LSN durably applied on the target.
    pub applied: Lsn,
    /// Row changes applied so far.
    pub changes: u64,
    /// Time spent applying batches on the target (not waiting for the source's changes): the
    /// apply rate is `changes` over this, whatever rate the writers produce changes at.
    pub busy: std::time::Duration,
    batch_changes: u64,
    current_changes: u64,
}

impl Applier {
    /// An applier for move `move_id` whose tables have the given sharding key columns.
    pub fn new(
        move_id: u64,
        key_columns: std::collections::HashMap<String, Placement>,
        owns: Owns,
        applied: Lsn,
    ) -> Applier {
        Applier {
            move_id,
            key_columns,
            owns,
            batch: String::new(),
            run: Run::default(),
            current: Vec::new(),
            batch_end: applied,
            applied,
            changes: 0,
            busy: std::time::Duration::ZERO,
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
                for ch in std::mem::take(&mut self.current) {
                    self.gather(ch);
                }
                self.batch_changes += self.current_changes;
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
        self.batch.len() + self.run.bytes
    }

    /// Adds a committed change to the batch, extending the current run where it fits.
    fn gather(&mut self, ch: Change) {
        let Some(ch) = self.run.take(ch) else {
            return;
        };
        self.run.render(&mut self.batch);
        match Run::start(ch) {
            Ok(run) => self.run = run,
            Err(sql) => {
                self.run = Run::default();
                self.batch.push_str(&sql);
            }
        }
    }

    /// The batch's SQL, the open run included; leaves the batch empty.
    fn take_batch(&mut self) -> String {
        std::mem::take(&mut self.run).render(&mut self.batch);
        std::mem::take(&mut self.batch)
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
            self.take_batch(),
            self.move_id,
            super::stream::format_lsn(self.batch_end)
        );
        let t = std::time::Instant::now();
        if let Err(e) = target.batch_execute(&sql).await {
            let _ = target.batch_execute("ROLLBACK").await;
            return Err(MoveError::Db(e));
        }
        self.busy += t.elapsed();
        self.applied = self.batch_end;
        self.changes += self.batch_changes;
        self.batch_changes = 0;
        Ok(())
    }

    fn check(&self, rel: &Relation, row: &[Value]) -> Result<(), MoveError> {
        let placed = self.key_columns.get(&rel.name).ok_or_else(|| {
            MoveError::Refused(format!("table {} is not part of the move", rel.name))
        })?;
        let value = |col: &str| {
            let i = rel
                .columns
                .iter()
                .position(|c| c == col)
                .ok_or_else(|| MoveError::Stream(format!("{}: no column {col}", rel.name)))?;
            match row.get(i) {
                Some(Value::Text(v)) => Ok(v.as_str()),
                _ => Err(MoveError::Refused(format!(
                    "{}: a change without its placing column {col}",
                    rel.name
                ))),
            }
        };
        let key = value(&placed.key)?;
        let within = placed.within.as_deref().map(value).transpose()?;
        match (self.owns)(&rel.name, key, within) {
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
            self.current.push(Change::Sql(format!(
                "UPDATE {table} SET {} WHERE {cond};",
                set.join(", ")
            )));
        } else {
            let conflict = if sets.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", sets.join(", "))
            };
            self.current.push(Change::Upsert {
                head: format!("INSERT INTO {table} ({}) VALUES ", cols.join(", ")),
                tail: format!(" ON CONFLICT ({}) DO {conflict}", keys.join(", ")),
                row: format!("({})", vals.join(", ")),
                key: key_tuple(rel, row)?.1,
            });
        }
        self.current_changes += 1;
        Ok(())
    }

    fn delete(&mut self, rel: &Relation, old: &[Value]) -> Result<(), MoveError> {
        let (cols, key) = key_tuple(rel, old)?;
        self.current.push(Change::Delete {
            head: format!("DELETE FROM {} WHERE {cols} IN (", table_ident(&rel.name)?),
            key,
        });
        self.current_changes += 1;
        Ok(())
    }
}

/// `(pk1, pk2)` and `('v1', 'v2')` from a row or key image.
fn key_tuple(rel: &Relation, row: &[Value]) -> Result<(String, String), MoveError> {
    let (cols, vals): (Vec<String>, Vec<String>) = key_parts(rel, row)?.into_iter().unzip();
    Ok((
        format!("({})", cols.join(", ")),
        format!("({})", vals.join(", ")),
    ))
}

/// `pk1 = 'v1' AND pk2 = 'v2'` from a row or key image.
fn key_condition(rel: &Relation, row: &[Value]) -> Result<String, MoveError> {
    let parts: Vec<String> = key_parts(rel, row)?
        .into_iter()
        .map(|(c, v)| format!("{c} = {v}"))
        .collect();
    Ok(parts.join(" AND "))
}

/// The primary key's quoted columns and literal values in a row or key image.
fn key_parts(rel: &Relation, row: &[Value]) -> Result<Vec<(String, String)>, MoveError> {
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
        parts.push((ident(&rel.columns[i])?, literal(t)));
    }
    if parts.is_empty() {
        return Err(MoveError::Refused(format!(
            "{}: no primary key in the replication stream",
            rel.name
        )));
    }
    Ok(parts)
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
        let keys = [(
            "orders".to_string(),
            Placement {
                key: "tenant".into(),
                within: None,
            },
        )]
        .into_iter()
        .collect();
        Applier::new(7, keys, Box::new(|_, k, _| Some(k == "big")), 0)
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
            a.take_batch(),
            "INSERT INTO orders (id, tenant, note) VALUES ('1', 'big', 'it''s') ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, note = EXCLUDED.note;\
             UPDATE orders SET id = '1', tenant = 'big' WHERE id = '1';\
             DELETE FROM orders WHERE (id) IN (('1'));"
        );
    }

    #[test]
    fn back_to_back_changes_share_a_statement_unless_a_key_repeats() {
        let mut a = applier();
        let r = rel();
        let row = |id: &str| {
            vec![
                Value::Text(id.into()),
                Value::Text("big".into()),
                Value::Text("n".into()),
            ]
        };
        let mut end = 0;
        let mut tx = |a: &mut Applier, ev: Event| {
            end += 1;
            a.on_event(Some(&r), &Event::Begin).unwrap();
            a.on_event(Some(&r), &ev).unwrap();
            a.on_event(None, &Event::Commit { end }).unwrap();
        };
        for id in ["1", "2", "1", "3"] {
            tx(
                &mut a,
                Event::Insert {
                    rel: 1,
                    new: row(id),
                },
            );
        }
        for id in ["2", "3"] {
            tx(
                &mut a,
                Event::Delete {
                    rel: 1,
                    old: row(id),
                },
            );
        }
        let ins = "INSERT INTO orders (id, tenant, note) VALUES ";
        let upd = " ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, note = EXCLUDED.note;";
        assert_eq!(
            a.take_batch(),
            format!(
                "{ins}('1', 'big', 'n'), ('2', 'big', 'n'){upd}\
                 {ins}('1', 'big', 'n'), ('3', 'big', 'n'){upd}\
                 DELETE FROM orders WHERE (id) IN (('2'), ('3'));"
            )
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

    #[test]
    fn a_share_checks_the_hash_column_too() {
        // The unit is region eu's rows whose id is even (as a share's hash buckets would be).
        let keys = [(
            "orders".to_string(),
            Placement {
                key: "tenant".into(),
                within: Some("note".into()),
            },
        )]
        .into_iter()
        .collect();
        let owns: Owns = Box::new(|_, k, w| {
            Some(
                k == "eu"
                    && w.and_then(|w| w.parse::<i64>().ok())
                        .is_some_and(|w| w % 2 == 0),
            )
        });
        let mut a = Applier::new(7, keys, owns, 0);
        let r = rel();
        let row = |region: &str, within: Value| {
            vec![Value::Text("1".into()), Value::Text(region.into()), within]
        };
        let mut insert = |new| a.on_event(Some(&r), &Event::Insert { rel: 1, new });
        insert(row("eu", Value::Text("4".into()))).unwrap();
        for outside in [
            row("eu", Value::Text("5".into())),
            row("us", Value::Text("4".into())),
            row("eu", Value::Null),
        ] {
            assert!(matches!(insert(outside), Err(MoveError::Refused(_))));
        }
    }
}
