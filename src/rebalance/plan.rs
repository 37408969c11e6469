//! Planning moves: measure rows per bucket on every shard, then pick bucket ranges that even
//! out the shards (or empty one that is being drained). The planner itself is pure, so it is
//! tested without servers; `shardctl plan` shows a plan, `shardctl rebalance --apply` runs it.

use super::{copy, MoveError, ShardLink};
use crate::shardmap::{ShardMap, Strategy};

/// One planned move: bucket ranges of a distribution from one shard to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    pub buckets: Vec<[u32; 2]>,
    pub from: usize,
    pub to: usize,
    /// Rows the move carries, as measured.
    pub rows: i64,
}

/// Rows per bucket of distribution `dist`, summed over its tables on every shard.
pub async fn bucket_rows(
    shards: &[ShardLink],
    map: &ShardMap,
    dist: usize,
) -> Result<Vec<i64>, MoveError> {
    let d = &map.distributions[dist];
    let mut rows = vec![0i64; map.buckets as usize];
    for link in shards {
        let c = super::connect(&link.dsn).await?;
        for (table, column) in map.tables_of(dist) {
            if !copy::exists(&c, &table).await? {
                continue;
            }
            let b = crate::pghash::bucket_sql(&column, &d.key_type, map.buckets)
                .ok_or_else(|| MoveError::Refused(format!("cannot hash column {column}")))?;
            let sql = format!(
                "SELECT ({b})::int8, count(*) FROM {} GROUP BY 1",
                super::apply::table_ident(&table)?
            );
            for r in c.query(&sql, &[]).await? {
                let (bucket, n): (i64, i64) = (r.get(0), r.get(1));
                if let Some(slot) = rows.get_mut(bucket as usize) {
                    *slot += n;
                }
            }
        }
    }
    Ok(rows)
}

/// The bucket → shard placement of a hash or tenant distribution.
pub fn placement(map: &ShardMap, dist: usize) -> Option<&[usize]> {
    match &map.distributions[dist].strategy {
        Strategy::Hash { bucket_shard } | Strategy::Tenant { bucket_shard, .. } => {
            Some(bucket_shard)
        }
        _ => None,
    }
}

/// Moves that even out rows across `shards` (within `tolerance` of the mean), or, with
/// `drain`, that empty that shard onto the others. At most `max_moves`.
pub fn plan(
    owner: &[usize],
    rows: &[i64],
    shards: usize,
    drain: Option<usize>,
    tolerance: f64,
    max_moves: usize,
) -> Vec<PlannedMove> {
    let mut owner = owner.to_vec();
    let load = |owner: &[usize]| {
        let mut l = vec![0i64; shards];
        for (b, &s) in owner.iter().enumerate() {
            l[s] += rows[b];
        }
        l
    };
    let mut out = Vec::new();
    while out.len() < max_moves {
        let l = load(&owner);
        let open: Vec<usize> = (0..shards).filter(|&s| Some(s) != drain).collect();
        let Some(&to) = open.iter().min_by_key(|&&s| l[s]) else {
            break;
        };
        let (from, budget) = match drain {
            // Spread a drained shard in slices, each to the lightest shard of the moment.
            Some(d) if owner.contains(&d) => (d, (l[d] / open.len().max(1) as i64).max(1)),
            Some(_) => break,
            None => {
                let Some(&from) = open.iter().max_by_key(|&&s| l[s]) else {
                    break;
                };
                let mean = l.iter().sum::<i64>() as f64 / shards as f64;
                let gap = l[from] - l[to];
                if from == to || (l[from] as f64) <= mean * (1.0 + tolerance) || gap <= 1 {
                    break;
                }
                (from, gap / 2)
            }
        };
        // Take `from`'s buckets in order up to the budget.
        let mut ranges: Vec<[u32; 2]> = Vec::new();
        let mut moved = 0i64;
        for b in 0..owner.len() {
            if owner[b] != from {
                continue;
            }
            if moved > 0 && moved + rows[b] > budget {
                break;
            }
            match ranges.last_mut() {
                Some(r) if r[1] + 1 == b as u32 => r[1] = b as u32,
                _ => ranges.push([b as u32, b as u32]),
            }
            moved += rows[b];
        }
        if ranges.is_empty() {
            break;
        }
        for r in &ranges {
            for b in r[0]..=r[1] {
                owner[b as usize] = to;
            }
        }
        out.push(PlannedMove {
            buckets: ranges,
            from,
            to,
            rows: moved,
        });
    }
    out
}

/// `0-255,1024` for messages and the command line.
pub fn ranges_text(r: &[[u32; 2]]) -> String {
    r.iter()
        .map(|[a, b]| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(owner: &[usize], rows: &[i64], shards: usize) -> Vec<i64> {
        let mut l = vec![0; shards];
        owner.iter().zip(rows).for_each(|(&s, &r)| l[s] += r);
        l
    }

    fn apply(owner: &mut [usize], moves: &[PlannedMove]) {
        for m in moves {
            for r in &m.buckets {
                for b in r[0]..=r[1] {
                    assert_eq!(
                        owner[b as usize], m.from,
                        "a move takes only buckets of its source"
                    );
                    owner[b as usize] = m.to;
                }
            }
        }
    }

    #[test]
    fn skewed_shards_even_out() {
        // 64 buckets on 2 shards; shard 0's buckets hold 10x the rows; a third, empty shard.
        let mut owner: Vec<usize> = (0..64).map(|b| b / 32).collect();
        let rows: Vec<i64> = (0..64).map(|b| if b < 32 { 100 } else { 10 }).collect();
        let moves = plan(&owner, &rows, 3, None, 0.1, 20);
        assert!(!moves.is_empty());
        apply(&mut owner, &moves);
        let l = loads(&owner, &rows, 3);
        let mean = l.iter().sum::<i64>() as f64 / 3.0;
        assert!(
            l.iter().all(|&x| (x as f64) <= mean * 1.1 + 100.0),
            "balanced: {l:?}"
        );
    }

    #[test]
    fn balanced_shards_need_no_move() {
        let owner: Vec<usize> = (0..64).map(|b| b / 32).collect();
        assert!(plan(&owner, &[5; 64], 2, None, 0.05, 20).is_empty());
    }

    #[test]
    fn draining_empties_the_shard() {
        let mut owner: Vec<usize> = (0..60).map(|b| b % 3).collect();
        let rows = vec![7i64; 60];
        let moves = plan(&owner, &rows, 3, Some(1), 0.05, 100);
        apply(&mut owner, &moves);
        assert!(!owner.contains(&1), "shard 1 drained: {owner:?}");
        assert!(moves.iter().all(|m| m.to != 1));
        let l = loads(&owner, &rows, 3);
        assert_eq!(l[0], l[2], "spread evenly: {l:?}");
    }
}
