//! Map edits of a move: its phase, and the placement its switch gives the unit.

use crate::shardmap::config::{
    KeyRange, MoveConfig, MovePhase, RangeConfig, ShardingConfig, StrategyName,
};

pub(super) fn set_phase(s: &mut ShardingConfig, id: u64, phase: MovePhase) {
    for m in s.moves.iter_mut().filter(|m| m.id == id) {
        m.phase = phase;
    }
}

/// The map with the unit placed on `target` and the move marked switched; `owner` is the
/// distribution's bucket → shard placement before the move.
pub(super) fn switch(s: &mut ShardingConfig, unit: &MoveConfig, target: usize, owner: &[usize]) {
    set_phase(s, unit.id, MovePhase::Switched);
    let Some(d) = s
        .distributions
        .iter_mut()
        .find(|d| d.name == unit.distribution)
    else {
        return;
    };
    if let Some(t) = &unit.tenant {
        if d.strategy == StrategyName::Geo {
            let buckets = s.buckets;
            match d.regions.get_mut(t) {
                // A share: the members its hash buckets go to become `target`; the config keeps the group's length, so an undo can hand
                // them back even when every member is now one shard.
                Some(group) if !unit.buckets.is_empty() => {
                    let n = group.len();
                    for &[lo, hi] in &unit.buckets {
                        for b in lo..=hi {
                            group[crate::shardmap::group_member(n, b, buckets)] = target;
                        }
                    }
                }
                _ => {
                    d.regions.insert(t.clone(), vec![target]);
                }
            }
        } else {
            d.tenants.insert(t.clone(), target);
        }
        return;
    }
    if let Some(r) = &unit.range {
        d.ranges = split_range(&d.ranges, &d.key_type, r, target);
        return;
    }
    let mut owner = owner.to_vec();
    for &[lo, hi] in &unit.buckets {
        for b in lo..=hi {
            owner[b as usize] = target;
        }
    }
    d.bucket_map = super::add::bucket_ranges(&owner);
}

/// A range distribution's entries with `[r.lo, r.hi)` cut out of the entry holding it and
/// given to `target` (the pieces left and right of it stay where they were).
pub(super) fn split_range(
    entries: &[RangeConfig],
    key_type: &str,
    r: &KeyRange,
    target: usize,
) -> Vec<RangeConfig> {
    let key = |b: &Option<crate::shardmap::config::Bound>| {
        b.as_ref()
            .and_then(|b| crate::shardmap::bound_key(key_type, b).ok())
    };
    let span = (key(&r.lo), key(&r.hi));
    let mut out = Vec::new();
    for e in entries {
        let inside =
            crate::shardmap::range_entry(&[(key(&e.lo), key(&e.hi), e.shard)], &span).is_some();
        if !inside {
            out.push(e.clone());
            continue;
        }
        if r.lo.is_some() && key(&e.lo) != span.0 {
            out.push(RangeConfig {
                lo: e.lo.clone(),
                hi: r.lo.clone(),
                shard: e.shard,
            });
        }
        out.push(RangeConfig {
            lo: r.lo.clone(),
            hi: r.hi.clone(),
            shard: target,
        });
        if r.hi.is_some() && key(&e.hi) != span.1 {
            out.push(RangeConfig {
                lo: r.hi.clone(),
                hi: e.hi.clone(),
                shard: e.shard,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split_range;
    use crate::shardmap::config::{Bound, KeyRange, RangeConfig};

    fn entry(lo: Option<i64>, hi: Option<i64>, shard: usize) -> RangeConfig {
        RangeConfig {
            lo: lo.map(Bound::Int),
            hi: hi.map(Bound::Int),
            shard,
        }
    }

    #[test]
    fn a_moved_range_splits_its_entry() {
        let map = [entry(None, Some(100), 0), entry(Some(100), None, 1)];
        let unit = KeyRange {
            lo: Some(Bound::Int(10)),
            hi: Some(Bound::Int(20)),
        };
        let got = split_range(&map, "int8", &unit, 1);
        let want = [
            entry(None, Some(10), 0),
            entry(Some(10), Some(20), 1),
            entry(Some(20), Some(100), 0),
            entry(Some(100), None, 1),
        ];
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        // A unit that starts where its entry starts leaves no empty piece behind.
        let unit = KeyRange {
            lo: Some(Bound::Int(100)),
            hi: None,
        };
        let got = split_range(&map, "int8", &unit, 0);
        assert_eq!(
            format!("{got:?}"),
            format!(
                "{:?}",
                [entry(None, Some(100), 0), entry(Some(100), None, 0)]
            )
        );
    }

    #[test]
    fn a_share_switch_hands_its_members_over_and_an_undo_hands_them_back() {
        use crate::shardmap::config::{MoveConfig, MovePhase, ShardingConfig};
        let mut s: ShardingConfig = toml::from_str(
            "[[distributions]]\nname = \"g\"\nstrategy = \"geo\"\nkey_type = \"text\"\n\
             regions = { eu = [0, 1, 0, 1] }\n",
        )
        .unwrap();
        let unit = |source, target| MoveConfig {
            id: 1,
            distribution: "g".into(),
            tenant: Some("eu".into()),
            // Members 1 and 3 of 4 (buckets 1024..=2047 and 3072..=4095).
            buckets: vec![[1024, 2047], [3072, 4095]],
            range: None,
            source,
            target,
            phase: MovePhase::Fenced,
            undo: false,
            undo_unverified: false,
            hash_type: Some("int8".into()),
        };
        super::switch(&mut s, &unit(1, 0), 0, &[]);
        assert_eq!(s.distributions[0].regions["eu"], vec![0, 0, 0, 0]);
        super::switch(&mut s, &unit(0, 1), 1, &[]);
        assert_eq!(s.distributions[0].regions["eu"], vec![0, 1, 0, 1]);
    }
}
