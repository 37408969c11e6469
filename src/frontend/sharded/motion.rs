//! Statements on tables whose distribution has a unit in motion. The unit's rows exist on two
//! shards until the move completes: statements that reach the shard holding the extra copy
//! without being pinned there by their key (key-less or key-list reads, UPDATEs and DELETEs)
//! are rewritten for that shard to leave the copy out (`router::shadow`); what cannot be
//! rewritten, DDL and TRUNCATE are refused, never guessed.
//! While a unit is fenced, statements reaching its source shard wait for the switch; a
//! transaction a fence gave up on is rolled back and its client told (40001).

use super::{Refusal, ShardedSession, TxState};
use crate::frontend::{ClientWrite, ReadReady};
use crate::prepared::StatementDef;
use crate::router::{Kind, Plan, Route, ShardList, TextMemo};
use crate::shardmap::config::MovePhase;
use crate::shardmap::ShardMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Refuses a statement that touches a table in motion unless its key puts it on one shard.
/// Called only when the map has motions.
pub(super) fn guard(
    map: &ShardMap,
    plan: &Plan,
    text: &str,
    shards: &[usize],
    lease_valid: bool,
) -> Result<(), Refusal> {
    for table in &plan.tables {
        let Some((mv, _)) = map.motion_of(table) else {
            continue;
        };
        // Formatted only for a refusal: this runs for every statement while a move runs.
        let what = || in_motion(table, mv);
        if !lease_valid {
            return Err(Refusal::new(
                "57P03",
                format!("{} and this router has lost its catalog lease, so it cannot tell which shard serves it; retry when the catalog is reachable", what()),
            ));
        }
        // An INSERT must go by its keys (a split INSERT gives each shard its own rows); other
        // writes not pinned to one shard are filtered on the copy's shard by `shadows`.
        let keyed = matches!(plan.route, Route::Keys { .. })
            && plan.hint.is_none()
            && (shards.len() == 1 || plan.insert.is_some());
        let truncate = text
            .trim_start()
            .get(..8)
            .is_some_and(|w| w.eq_ignore_ascii_case("truncate"));
        match plan.kind {
            Kind::Ddl { .. } | Kind::Utility => {
                return Err(Refusal::new(
                    "55006",
                    format!(
                        "{}: DDL on it waits until the move completes or is aborted",
                        what()
                    ),
                ));
            }
            _ if truncate => {
                return Err(Refusal::new(
                    "55006",
                    format!(
                        "{}: TRUNCATE waits until the move completes or is aborted",
                        what()
                    ),
                ));
            }
            Kind::Read => {}
            // COPY TO reads (filtered by `shadows`); COPY FROM places each row by its key, as a
            // split INSERT does.
            Kind::Copy(_) => {}
            Kind::Write if keyed => {}
            // Left out of the unit's extra copy by `shadows`, or refused there.
            Kind::Write if plan.insert.is_none() => {}
            _ => {
                return Err(Refusal::new(
                    "55006",
                    format!("{}: writes without its sharding key would change the unit on both shards; add the key, or retry after the move", what()),
                ));
            }
        }
    }
    Ok(())
}

/// How refusals name a table in motion and its move.
fn in_motion(table: &str, mv: &crate::shardmap::motion::Motion) -> String {
    format!(
        "table {table} is in motion (move {}: {} from shard {} to shard {})",
        mv.id,
        mv.describe(),
        mv.source,
        mv.target
    )
}

/// The statement a shard holding a unit's extra copy gets instead of the client's.
pub(super) struct Shadowed {
    pub shard: usize,
    /// The simple-protocol text.
    pub sql: Arc<str>,
    /// The extended protocol's statement (prepared on that shard under its own name).
    pub def: Option<Arc<StatementDef>>,
}

impl Shadowed {
    /// `sql` for `shard`, prepared with the parameter types of `stmt` (extended protocol).
    pub fn new(shard: usize, sql: Arc<str>, stmt: Option<&StatementDef>) -> Shadowed {
        let def = stmt.map(|d| {
            Arc::new(StatementDef::new(
                bytes::Bytes::copy_from_slice(sql.as_bytes()),
                d.param_types.clone(),
            ))
        });
        Shadowed { shard, sql, def }
    }
}

/// For a read, UPDATE, DELETE or COPY TO that reaches the shard holding a unit's extra copy (the target
/// while it is filled, the source until it is cleaned up), that shard's text with the unit
/// filtered out of every table in motion. `shards` is reordered so that a shard reading the
/// plain tables leads (its RowDescription is the one the client gets). Statements pinned to one
/// shard by their key need none: their keys route to the unit's owner. A key list spanning
/// shards does: the copy on another shard may hold some of its keys. Rewrites are memoised in
/// `memo` per text, shard and map version: a statement repeated during a move is parsed once.
pub(super) fn shadows(
    map: &ShardMap,
    memo: &TextMemo<Result<Arc<str>, Arc<str>>>,
    plan: &Plan,
    text: &str,
    shards: &mut [usize],
    stmt: Option<&StatementDef>,
) -> Result<Vec<Shadowed>, Refusal> {
    let form = match &plan.kind {
        Kind::Read => Form::Read,
        Kind::Write if plan.insert.is_none() => Form::Write,
        Kind::Copy(spec) if !spec.from_stdin => Form::CopyOut,
        _ => return Ok(Vec::new()),
    };
    if matches!(plan.route, Route::Keys { .. }) && plan.hint.is_none() && shards.len() == 1 {
        return Ok(Vec::new());
    }
    let base = match (&plan.kind, plan.scatter_sql.as_deref()) {
        (Kind::Read, Some(sql)) if shards.len() > 1 => sql,
        // A shadowed shard never leads (see the end), so it never sends the header line.
        (Kind::Copy(spec), _) if spec.header && shards.len() > 1 => {
            spec.headerless_sql.as_deref().ok_or_else(|| {
                Refusal::new(
                    "0A000",
                    "COPY … TO STDOUT with HEADER of a table in motion needs the statement without HEADER, which pgshard could not form; drop HEADER",
                )
            })?
        }
        _ => text,
    };
    let hash = xxhash_rust::xxh3::xxh3_64(base.as_bytes());
    let mut out: Vec<Shadowed> = Vec::new();
    for &shard in shards.iter() {
        // The tables whose unit has its extra copy on `shard`.
        let moving = || {
            plan.tables.iter().filter_map(move |t| {
                let (mv, _) = map.motion_of(t)?;
                (mv.shadow_shard() == shard).then_some((t, mv))
            })
        };
        if moving().next().is_none() {
            continue;
        }
        let tag = (shard as u32) << 2 | form as u32;
        let sql = memo.get(hash, base, tag, map.version, || {
            rewrite(map, plan, base, shard, form).map_err(Into::into)
        });
        let sql = sql.map_err(|why| {
            let what = match form {
                Form::Write => "write",
                Form::Read | Form::CopyOut => "read",
            };
            Refusal::new("55006", format!("{}: a key-less {what} must leave out the unit's copy on shard {shard}, and this one cannot be rewritten to ({why}); add the sharding key, or retry after the move", moving().map(|(t, mv)| in_motion(t, mv)).collect::<Vec<_>>().join("; ")))
        })?;
        out.push(Shadowed::new(shard, sql, stmt));
    }
    if let Some(lead) = shards
        .iter()
        .position(|s| !out.iter().any(|o| o.shard == *s))
    {
        shards.swap(0, lead);
    }
    Ok(out)
}

/// How a statement reaches a shard holding a unit's extra copy.
#[derive(Clone, Copy)]
enum Form {
    Read = 0,
    Write = 1,
    CopyOut = 2,
}

/// `base` for `shard` with the units whose extra copy it holds filtered out of every table in
/// motion (the parse `shadows` memoises).
fn rewrite(
    map: &ShardMap,
    plan: &Plan,
    base: &str,
    shard: usize,
    form: Form,
) -> Result<Arc<str>, String> {
    let mut hide = Vec::new();
    for table in &plan.tables {
        let Some((mv, _)) = map.motion_of(table) else {
            continue;
        };
        if mv.shadow_shard() != shard {
            continue;
        }
        let pred = map
            .unit_predicate(mv, table)
            .ok_or_else(|| format!("the unit of table {table} has no SQL form"))?;
        hide.push((table.clone(), pred));
    }
    let sql = match form {
        Form::Read => crate::router::shadow::exclude(base, &hide),
        Form::Write => crate::router::shadow::exclude_from_write(base, &hide),
        Form::CopyOut => crate::router::shadow::exclude_copy_out(base, &hide),
    };
    sql.map(Into::into)
}

/// The routing hint a session gave with `SET [LOCAL] pgshard.shard = N` / `pgshard.key = 'k'`;
/// a transaction's SET LOCAL wins over the session's.
pub(super) fn session_hint(
    local: impl Fn(&str) -> Option<String>,
    session: &crate::params::SessionParams,
) -> Result<Option<crate::router::Hint>, Refusal> {
    use crate::router::Hint;
    let names = ["pgshard.shard", "pgshard.key"];
    let locals = names.iter().filter_map(|&n| Some((n, local(n)?)));
    let sessions = names
        .iter()
        .filter_map(|&n| Some((n, session.get(n)?.to_string())));
    for (name, raw) in locals.chain(sessions) {
        let v = raw.trim();
        let v = if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].replace("''", "'")
        } else {
            v.to_string()
        };
        if v.is_empty() || v.eq_ignore_ascii_case("default") {
            continue;
        }
        return Ok(Some(if name == "pgshard.shard" {
            Hint::Shard(v.parse().map_err(|_| {
                Refusal::new(
                    "22023",
                    format!("pgshard.shard must be a shard number, not {raw}"),
                )
            })?)
        } else {
            Hint::Key(v)
        }));
    }
    Ok(None)
}

/// True when a statement routed to `shards` must wait: a unit of one of its tables is fenced
/// and the statement reaches the unit's source shard (whose copy is being frozen).
fn fenced(map: &ShardMap, plan: &Plan, shards: &[usize]) -> Option<u64> {
    plan.tables.iter().find_map(|t| {
        let (mv, _) = map.motion_of(t)?;
        (mv.phase == MovePhase::Fenced && shards.contains(&mv.source)).then_some(mv.id)
    })
}

impl<R: ReadReady, W: ClientWrite> ShardedSession<R, W> {
    /// Checks a statement on tables in motion (`guard`) and holds it while its unit is fenced,
    /// re-routing with each newer map; returns the shards it goes to.
    pub(super) async fn through_motion(
        &mut self,
        plan: &Plan,
        params: &crate::router::Params<'_>,
        text: &str,
        mut shards: ShardList,
    ) -> Result<ShardList, Refusal> {
        let wait_ms = match self.app.catalog.fence_wait_ms.load(Ordering::Relaxed) {
            0 => 5000,
            ms => ms,
        };
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        loop {
            guard(
                &self.map,
                plan,
                text,
                &shards,
                self.app.catalog.lease_valid(),
            )?;
            let Some(id) = fenced(&self.map, plan, &shards) else {
                return Ok(shards);
            };
            let changed = self.app.map_changed.notified();
            if self.app.shardmap.load().version == self.map.version {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, changed).await.is_err() {
                    return Err(Refusal::new(
                        "40001",
                        format!("move {id} is switching this statement's rows to another shard and did not finish within {wait_ms} ms; retry the transaction"),
                    ));
                }
            }
            self.map = self.app.shardmap.load_full();
            let target = crate::router::route(plan, &self.map, params).map_err(Refusal::from)?;
            shards = self.target_shards(&target, plan);
        }
    }

    /// Rolls back a transaction whose epoch a fence revoked: the servers let go of it now, and
    /// the client's block stays failed until it ends it.
    pub(super) async fn surrender(&mut self) {
        let explicit = self.tx.explicit();
        let _ = self.rollback_all().await;
        self.tx = if explicit {
            TxState::abandoned()
        } else {
            TxState::default()
        };
        self.epoch = None;
        self.revoked = true;
    }

    /// At the start of a request: a revoked transaction is rolled back, and the first request
    /// after that (unless it ends the block) is told so.
    pub(super) async fn revocation(&mut self, text: Option<&str>) -> Option<Refusal> {
        if self.tx.active() && self.epoch.as_ref().is_some_and(|e| e.revoked()) {
            self.surrender().await;
        }
        if !std::mem::take(&mut self.revoked) {
            return None;
        }
        let ends = text.is_some_and(|t| {
            let w = t.trim_start();
            ["rollback", "abort"]
                .iter()
                .any(|k| w.get(..k.len()).is_some_and(|p| p.eq_ignore_ascii_case(k)))
        });
        (!ends).then(|| {
            Refusal::new(
                "40001",
                "this transaction was rolled back: a shard move needed it to finish and it did not within the drain timeout; retry the transaction",
            )
        })
    }
}
