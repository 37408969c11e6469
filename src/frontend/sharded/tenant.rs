//! Database-per-tenant sessions: a client that connected to `<tenant_prefix><tenant>` reaches
//! only that tenant's rows of the tenant distribution's tables. Reads are rewritten to filter
//! every such table to the tenant (so a join or a key-less count cannot see a neighbour on the
//! same shard); writes must name the tenant by key, and no other, and what they read (a
//! subquery, UPDATE … FROM, INSERT … SELECT) is filtered like a read.

use super::Refusal;
use crate::router::{Hint, Kind, Params, Plan, Route};
use crate::shardmap::{ShardMap, TableRule};
use std::collections::HashMap;
use std::sync::Arc;

/// Filtered texts kept per session before the memo starts over.
const MEMO_LIMIT: usize = 256;

/// The tenant a session is confined to.
pub(super) struct TenantScope {
    /// The tenant key as the database name gave it (shared: read for every statement).
    pub key: Arc<str>,
    /// Name of the distribution whose key is the tenant.
    pub dist: String,
    /// Client-facing database name, for messages.
    pub database: String,
    /// Filtered texts by the original's hash (statements repeat; parsing each is the cost);
    /// None for a write that reads no tenant table.
    memo: HashMap<u64, Option<Arc<str>>>,
}

/// What of a statement is confined to the tenant.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Confine {
    /// Every table a read reads.
    Read,
    /// What a write reads besides the table it writes.
    Write,
    /// The source of a `COPY … TO STDOUT`.
    CopyOut,
}

/// What a statement becomes in a tenant session.
pub(super) enum Scoped {
    /// Runs as planned: it touches no tenant table, or writes rows of the tenant by key and
    /// reads no tenant table.
    AsPlanned,
    /// Reads tenant tables: routed by the tenant's key with `sql` (every tenant table it reads
    /// filtered to the tenant) in place of the text.
    Filtered { plan: Arc<Plan>, sql: Arc<str> },
}

impl TenantScope {
    pub fn new(key: String, dist: String, database: String) -> TenantScope {
        TenantScope {
            key: key.into(),
            dist,
            database,
            memo: HashMap::new(),
        }
    }

    fn refuse(&self, code: &str, what: &str) -> Refusal {
        Refusal::new(
            code,
            format!(
                "database \"{}\" is tenant '{}' only: {what}",
                self.database, self.key
            ),
        )
    }

    /// Confines one statement (after routing hints are merged into `plan`) to the tenant.
    pub fn scope(
        &mut self,
        map: &ShardMap,
        plans: &crate::router::PlanCache,
        plan: &Plan,
        params: &Params,
        text: &str,
    ) -> Result<Scoped, Refusal> {
        let Some(dist) = map.distributions.iter().position(|d| d.name == self.dist) else {
            return Err(self.refuse("XX000", "its distribution is no longer in the shard map"));
        };
        // A refcount, so that `want` does not borrow self while the memo is updated.
        let key = self.key.clone();
        let want = map
            .parse_key(dist, key.as_bytes())
            .map_err(|e| self.refuse("22P02", &e.to_string()))?;
        match &plan.hint {
            Some(Hint::Shard(_)) => {
                return Err(self.refuse(
                    "42501",
                    "a tenant session cannot pick a shard (pgshard.shard)",
                ))
            }
            Some(Hint::Key(k)) if map.parse_key(dist, k.as_bytes()).ok() != Some(want) => {
                return Err(self.refuse("42501", &format!("the hint key={k} names another tenant")))
            }
            _ => {}
        }
        let mut tenant_tables = Vec::new();
        for t in &plan.tables {
            match crate::router::table_rule(map, t) {
                Some(TableRule::Sharded { dist: d, column, .. }) if *d == dist => {
                    tenant_tables.push((t.clone(), column.clone()))
                }
                Some(TableRule::Sharded { dist: d, .. }) => {
                    return Err(self.refuse(
                        "0A000",
                        &format!(
                            "table {t} is sharded by distribution '{}', not by the tenant; reach it through a database that is not a tenant's",
                            map.distributions[*d].name
                        ),
                    ))
                }
                _ => {}
            }
        }
        // Nothing to confine; or a table pgshard does not place, which route() refuses or sends
        // to the default shard (where the tenant's rows are not).
        let undeclared = plan.tables.iter().any(|t| {
            crate::router::table_rule(map, t).is_none() && !crate::router::is_system_table(t)
        });
        if tenant_tables.is_empty() || undeclared {
            return Ok(Scoped::AsPlanned);
        }
        let keyed = plan.hint.is_none()
            && crate::router::keys_all_equal(map, &plan.route, dist, params, &want)
                .map_err(Refusal::from)?;
        match &plan.kind {
            Kind::Read => {}
            // Each row's key is checked as the rows are split (copy::place).
            Kind::Copy(spec) if spec.from_stdin => return Ok(Scoped::AsPlanned),
            // COPY … TO reads: its source is filtered like a read's tables.
            Kind::Copy(_) => {}
            Kind::Write => {
                // Its own rows must be the tenant's, and so must what it reads: a subquery
                // confined to the tenant also pins it, where alone it would span the shards.
                let sql = self.filtered(map, dist, &tenant_tables, text, Confine::Write)?;
                if keyed {
                    return Ok(match sql {
                        None => Scoped::AsPlanned,
                        Some(sql) => Scoped::Filtered {
                            plan: Arc::new(plan.clone()),
                            sql,
                        },
                    });
                }
                if let (Some(sql), None) = (&sql, &plan.hint) {
                    let confined = plans.plan(sql, map);
                    if crate::router::keys_all_equal(map, &confined.route, dist, params, &want)
                        .map_err(Refusal::from)?
                    {
                        return Ok(Scoped::Filtered {
                            plan: confined,
                            sql: sql.clone(),
                        });
                    }
                }
                let (t, c) = &tenant_tables[0];
                let named_other = matches!(&plan.route, Route::Keys { dist: d, .. } if *d == dist);
                return Err(if named_other {
                    self.refuse("42501", "the statement writes rows of another tenant")
                } else {
                    self.refuse(
                        "0A000",
                        &format!(
                            "a write to {t} must name the tenant by its key: {c} = '{}' (in WHERE, or in each row INSERTed)",
                            self.key
                        ),
                    )
                });
            }
            _ => return Ok(Scoped::AsPlanned),
        }
        let how = match plan.kind {
            Kind::Copy(_) => Confine::CopyOut,
            _ => Confine::Read,
        };
        let Some(sql) = self.filtered(map, dist, &tenant_tables, text, how)? else {
            return Ok(Scoped::AsPlanned);
        };
        let plan = Arc::new(Plan {
            route: Route::Keys {
                dist,
                keys: vec![crate::router::KeyExpr::Literal(self.key.to_string())],
                within: None,
            },
            hint: None,
            scatter_sql: None,
            insert: None,
            scatter_refusal: None,
            ..plan.clone()
        });
        Ok(Scoped::Filtered { plan, sql })
    }

    /// `text` with every tenant table it reads confined to the tenant (memoised per text): a
    /// read's every mention, or what a write reads besides the table it writes (None when
    /// that is nothing).
    fn filtered(
        &mut self,
        map: &ShardMap,
        dist: usize,
        tenant_tables: &[(String, String)],
        text: &str,
        how: Confine,
    ) -> Result<Option<Arc<str>>, Refusal> {
        let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
        if let Some(s) = self.memo.get(&hash) {
            return Ok(s.clone());
        }
        let literal =
            crate::shardmap::motion::sql_literal(&map.distributions[dist].key_type, &self.key)
                .map_err(|e| self.refuse("22P02", &e.to_string()))?;
        let column = |c: &str| crate::pghash::quote_ident(c).unwrap_or_default();
        let filtered = if how == Confine::Write {
            // The kept rows as `key = literal`: the router routes the confined text by it.
            let keep: Vec<(String, String)> = tenant_tables
                .iter()
                .map(|(t, c)| (t.clone(), format!("{} = {literal}", column(c))))
                .collect();
            crate::router::shadow::confine_reads_of_write(text, &keep)
        } else {
            let hide: Vec<(String, String)> = tenant_tables
                .iter()
                .map(|(t, c)| {
                    (
                        t.clone(),
                        format!("{} IS DISTINCT FROM {literal}", column(c)),
                    )
                })
                .collect();
            match how {
                Confine::CopyOut => crate::router::shadow::exclude_copy_out(text, &hide),
                _ => crate::router::shadow::exclude(text, &hide),
            }
            .map(Some)
        };
        let sql: Option<Arc<str>> = filtered
            .map_err(|why| {
                self.refuse(
                    "0A000",
                    &format!("this statement cannot be confined to the tenant's rows ({why})"),
                )
            })?
            .map(Into::into);
        if self.memo.len() >= MEMO_LIMIT {
            self.memo.clear();
        }
        self.memo.insert(hash, sql.clone());
        Ok(sql)
    }
}
