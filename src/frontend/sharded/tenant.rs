//! Database-per-tenant sessions: a client that connected to `<tenant_prefix><tenant>` reaches
//! only that tenant's rows of the tenant distribution's tables. Reads are rewritten to filter
//! every such table to the tenant (so a join or a key-less count cannot see a neighbour on the
//! same shard); writes must name the tenant by key, and no other.

use super::Refusal;
use crate::router::{Hint, Kind, Params, Plan, Route};
use crate::shardmap::{ShardMap, TableRule};
use std::collections::HashMap;
use std::sync::Arc;

/// Filtered texts kept per session before the memo starts over.
const MEMO_LIMIT: usize = 256;

/// The tenant a session is confined to.
pub(super) struct TenantScope {
    /// The tenant key as the database name gave it.
    pub key: String,
    /// Name of the distribution whose key is the tenant.
    pub dist: String,
    /// Client-facing database name, for messages.
    pub database: String,
    /// Filtered read texts by the original's hash (reads repeat; parsing each is the cost).
    memo: HashMap<u64, Arc<str>>,
}

/// What a statement becomes in a tenant session.
pub(super) enum Scoped {
    /// Runs as planned: it touches no tenant table, or writes rows of the tenant by key.
    AsPlanned,
    /// A read of tenant tables, now routed by the tenant's key with `sql` in place of the text.
    Filtered { plan: Arc<Plan>, sql: Arc<str> },
}

impl TenantScope {
    pub fn new(key: String, dist: String, database: String) -> TenantScope {
        TenantScope {
            key,
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
        plan: &Plan,
        params: &Params,
        text: &str,
    ) -> Result<Scoped, Refusal> {
        let Some(dist) = map.distributions.iter().position(|d| d.name == self.dist) else {
            return Err(self.refuse("XX000", "its distribution is no longer in the shard map"));
        };
        let want = map
            .parse_key(dist, self.key.as_bytes())
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
            Kind::Copy(_) => {
                return Err(self.refuse(
                    "0A000",
                    "COPY of a tenant table out of a tenant database is not supported; use SELECT",
                ))
            }
            Kind::Write if keyed => return Ok(Scoped::AsPlanned),
            Kind::Write => {
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
        let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
        let sql = match self.memo.get(&hash) {
            Some(s) => s.clone(),
            None => {
                let literal = crate::shardmap::motion::sql_literal(
                    &map.distributions[dist].key_type,
                    &self.key,
                )
                .map_err(|e| self.refuse("22P02", &e.to_string()))?;
                let hide: Vec<(String, String)> = tenant_tables
                    .iter()
                    .map(|(t, c)| {
                        let col = crate::pghash::quote_ident(c).unwrap_or_default();
                        (t.clone(), format!("{col} IS DISTINCT FROM {literal}"))
                    })
                    .collect();
                let sql: Arc<str> = crate::router::shadow::exclude(text, &hide)
                    .map_err(|why| {
                        self.refuse(
                            "0A000",
                            &format!("this read cannot be filtered to the tenant's rows ({why})"),
                        )
                    })?
                    .into();
                if self.memo.len() >= MEMO_LIMIT {
                    self.memo.clear();
                }
                self.memo.insert(hash, sql.clone());
                sql
            }
        };
        let plan = Arc::new(Plan {
            route: Route::Keys {
                dist,
                keys: vec![crate::router::KeyExpr::Literal(self.key.clone())],
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
}
