//! Statements on tables whose distribution has a unit in motion. Until key-less reads can
//! exclude the unit's second copy (docs/rebalancing.md), only statements routed by their key
//! to one shard run; anything that could see or change both copies is refused, never guessed.

use super::Refusal;
use crate::router::{Kind, Plan, Route};
use crate::shardmap::ShardMap;

/// Refuses a statement that touches a table in motion unless its key puts it on one shard.
/// Called only when the map has motions.
pub(super) fn guard(map: &ShardMap, plan: &Plan, text: &str, shards: &[usize], lease_valid: bool) -> Result<(), Refusal> {
    for table in &plan.tables {
        let Some((mv, _)) = map.motion_of(table) else { continue };
        let what = format!(
            "table {table} is in motion (move {}: {} from shard {} to shard {})",
            mv.id,
            mv.describe(),
            mv.source,
            mv.target
        );
        if !lease_valid {
            return Err(Refusal::new(
                "57P03",
                format!("{what} and this router has lost its catalog lease, so it cannot tell which shard serves it; retry when the catalog is reachable"),
            ));
        }
        // Several keyed shards are safe only for a split INSERT (each shard gets its own rows):
        // an UPDATE by key list would also change the unit's copy on the other shard.
        let keyed = matches!(plan.route, Route::Keys { .. }) && plan.hint.is_none() && (shards.len() == 1 || plan.insert.is_some());
        let truncate = text.trim_start().get(..8).is_some_and(|w| w.eq_ignore_ascii_case("truncate"));
        match plan.kind {
            Kind::Ddl { .. } | Kind::Utility => {
                return Err(Refusal::new("55006", format!("{what}: DDL on it waits until the move completes or is aborted")));
            }
            _ if truncate => {
                return Err(Refusal::new("55006", format!("{what}: TRUNCATE waits until the move completes or is aborted")));
            }
            Kind::Read | Kind::Write if keyed => {}
            _ => {
                return Err(Refusal::new(
                    "55006",
                    format!("{what}: statements without its sharding key would see the unit on both shards; add the key, or retry after the move"),
                ));
            }
        }
    }
    Ok(())
}

/// The routing hint a session gave with `SET [LOCAL] pgshard.shard = N` / `pgshard.key = 'k'`;
/// a transaction's SET LOCAL wins over the session's.
pub(super) fn session_hint(local: impl Fn(&str) -> Option<String>, session: &crate::params::SessionParams) -> Result<Option<crate::router::Hint>, Refusal> {
    use crate::router::Hint;
    let names = ["pgshard.shard", "pgshard.key"];
    let locals = names.iter().filter_map(|&n| Some((n, local(n)?)));
    let sessions = names.iter().filter_map(|&n| Some((n, session.get(n)?.to_string())));
    for (name, raw) in locals.chain(sessions) {
        let v = raw.trim();
        let v = if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') { v[1..v.len() - 1].replace("''", "'") } else { v.to_string() };
        if v.is_empty() || v.eq_ignore_ascii_case("default") {
            continue;
        }
        return Ok(Some(if name == "pgshard.shard" {
            Hint::Shard(v.parse().map_err(|_| Refusal::new("22023", format!("pgshard.shard must be a shard number, not {raw}")))?)
        } else {
            Hint::Key(v)
        }));
    }
    Ok(None)
}
