//! Turning what the walker collected into a route: undeclared tables, reference tables, and
//! the co-location of sharded tables (joined on their keys, pinned by a key).

use super::walk::{Placement, Rel, Walker};
use super::{KeyExpr, Route};
use crate::shardmap::config::UnknownTables;

impl Walker<'_> {
    /// The route the collected tables, links and pins give. `target` is the table a write
    /// modifies (reference targets must not read sharded tables).
    pub fn decide(&self, write: bool, target: Option<usize>) -> (Route, Vec<String>) {
        let mut problems = Vec::new();
        let sharded: Vec<usize> = (0..self.rels.len())
            .filter(|&i| matches!(self.rels[i].placement, Placement::Sharded { .. }))
            .collect();
        if let Some(r) = self.undeclared_route() {
            return (r, problems);
        }
        let has_ref = self
            .rels
            .iter()
            .any(|r| matches!(r.placement, Placement::Reference));
        let Some(&first) = sharded.first() else {
            return (
                if has_ref {
                    Route::Reference { write }
                } else {
                    Route::Any
                },
                problems,
            );
        };
        if let Some(t) = target {
            if matches!(self.rels[t].placement, Placement::Reference) {
                return (
                    Route::refuse(format!(
                        "a write to reference table {} cannot read sharded table {}: reference tables must be written from reference data only",
                        self.rels[t].name, self.rels[first].name
                    )),
                    problems,
                );
            }
        }
        let dist_of = |r: usize| match self.rels[r].placement {
            Placement::Sharded { dist, .. } => dist,
            _ => usize::MAX,
        };
        let dist = dist_of(first);
        if let Some(&other) = sharded.iter().find(|&&r| dist_of(r) != dist) {
            return (self.join_refusal(first, other), problems);
        }
        // Union-find over the sharded tables joined on their keys.
        let mut parent: Vec<usize> = (0..self.rels.len()).collect();
        fn root(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        for &(a, b) in &self.links {
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            parent[ra] = rb;
        }
        // A pin reaches tables joined on the key at the same or a deeper query level: a
        // subquery's pin restricts the rows it reads, not the rows of the query around it.
        let mut reached: Vec<Option<&Vec<KeyExpr>>> = vec![None; self.rels.len()];
        for (r, k) in &self.pins {
            reached[*r] = reached[*r].or(Some(k));
        }
        let mut changed = true;
        while changed {
            changed = false;
            for &(a, b) in &self.links {
                for (x, y) in [(a, b), (b, a)] {
                    if reached[x].is_some()
                        && reached[y].is_none()
                        && self.rels[y].level >= self.rels[x].level
                    {
                        reached[y] = reached[x];
                        changed = true;
                    }
                }
            }
        }
        // (root, first table, keys when every table of the component is pinned)
        let mut comps: Vec<(usize, usize, Option<&Vec<KeyExpr>>)> = Vec::new();
        for &r in &sharded {
            let root = root(&mut parent, r);
            match comps.iter_mut().find(|c| c.0 == root) {
                Some(c) => c.2 = c.2.and(reached[r]),
                None => comps.push((root, r, reached[r])),
            }
        }
        if comps.len() > 1 {
            if let Some(unpinned) = comps.iter().find(|c| c.2.is_none()) {
                let other = comps
                    .iter()
                    .find(|c| c.0 != unpinned.0)
                    .expect("two components");
                if self.set_operation {
                    return (
                        Route::refuse(format!(
                            "UNION/INTERSECT/EXCEPT over sharded tables {} and {} cannot be combined across shards; pin each side to one shard with its sharding key or a /* pgshard: shard=N */ hint",
                            self.rels[other.1.min(unpinned.1)].name,
                            self.rels[other.1.max(unpinned.1)].name
                        )),
                        problems,
                    );
                }
                return (self.join_refusal(other.1, unpinned.1), problems);
            }
            problems.push(format!(
                "{} and {} are not joined on their sharding key, so their keys must all fall on one shard",
                self.rels[comps[0].1].name, self.rels[comps[1].1].name
            ));
        }
        if self
            .rels
            .iter()
            .any(|r| r.nested && matches!(r.placement, Placement::Sharded { .. }))
        {
            problems.push(
                "subqueries and CTEs over sharded tables cannot be combined across shards".into(),
            );
        }
        if self.set_operation {
            problems.push(
                "UNION/INTERSECT/EXCEPT over sharded tables cannot be combined across shards"
                    .into(),
            );
        }
        if comps[0].2.is_none() {
            return (Route::AllShards, problems);
        }
        let keys: Vec<KeyExpr> = comps
            .iter()
            .flat_map(|c| c.2.into_iter().flatten().cloned())
            .collect();
        let within = if keys.len() == 1 {
            self.within
                .iter()
                .find(|(r, _)| sharded.contains(r))
                .map(|(_, k)| k.clone())
        } else {
            None
        };
        (Route::Keys { dist, keys, within }, problems)
    }

    /// The route of a statement naming undeclared tables, None when it names none.
    fn undeclared_route(&self) -> Option<Route> {
        let u = self
            .rels
            .iter()
            .find(|r| matches!(r.placement, Placement::Undeclared))?;
        if self.map.unknown_tables == UnknownTables::Refuse {
            return Some(Route::refuse(format!(
                "table {} is not declared in [sharding]; declare it as sharded or reference, or set unknown_tables = \"default_shard\"",
                u.name
            )));
        }
        if let Some(s) = self
            .rels
            .iter()
            .find(|r| matches!(r.placement, Placement::Sharded { .. }))
        {
            return Some(Route::refuse(format!(
                "{} is an undeclared table on the default shard and {} is sharded: one statement cannot use both; declare {} in [sharding]",
                u.name, s.name, u.name
            )));
        }
        Some(Route::DefaultShard)
    }

    /// The route of a statement on a list of whole tables (TRUNCATE, LOCK): every shard
    /// holding any of them.
    pub fn whole_tables(&self, write: bool) -> Route {
        if let Some(r) = self.undeclared_route() {
            return r;
        }
        if self
            .rels
            .iter()
            .any(|r| matches!(r.placement, Placement::Sharded { .. }))
        {
            Route::AllShards
        } else if self
            .rels
            .iter()
            .any(|r| matches!(r.placement, Placement::Reference))
        {
            Route::Reference { write }
        } else {
            Route::Any
        }
    }

    fn join_refusal(&self, a: usize, b: usize) -> Route {
        let (ra, rb) = (&self.rels[a.min(b)], &self.rels[a.max(b)]);
        let col = |r: &Rel| match &r.placement {
            Placement::Sharded { column, .. } => column.clone(),
            _ => String::new(),
        };
        Route::refuse(format!(
            "join of {} and {} is not on their sharding key: join them with {}.{} = {}.{} (tables of one distribution), or pin each to a key",
            ra.name,
            rb.name,
            ra.binding,
            col(ra),
            rb.binding,
            col(rb)
        ))
    }
}
