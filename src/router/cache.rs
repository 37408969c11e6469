//! Plans cached per statement text: parsing costs tens of microseconds, a lookup well under one.

use super::{analyze, Plan};
use crate::shardmap::ShardMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Lock stripes; a hit locks one of them briefly, so sessions rarely contend.
const STRIPES: usize = 16;

struct Entry {
    text: Box<str>,
    version: u64,
    plan: Arc<Plan>,
}

/// A bounded, striped cache of plans keyed by the xxh3 hash of the statement text.
pub struct PlanCache {
    stripes: Vec<Mutex<HashMap<u64, Entry>>>,
    per_stripe: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl PlanCache {
    /// A cache holding about `capacity` plans.
    pub fn new(capacity: usize) -> Self {
        PlanCache {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            per_stripe: capacity.div_ceil(STRIPES).max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The plan for `sql` under `map`, analysed on a miss or when the map's version changed.
    pub fn plan(&self, sql: &str, map: &ShardMap) -> Arc<Plan> {
        self.plan_hashed(xxhash_rust::xxh3::xxh3_64(sql.as_bytes()), sql, map)
    }

    /// `plan` with the hash given (tests force collisions through it).
    pub(super) fn plan_hashed(&self, hash: u64, sql: &str, map: &ShardMap) -> Arc<Plan> {
        let stripe = &self.stripes[(hash as usize) % STRIPES];
        if let Some(e) = stripe.lock().get(&hash) {
            if e.version == map.version && &*e.text == sql {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return e.plan.clone();
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Analysed outside the lock: a concurrent miss on the same text only costs a parse.
        let plan = Arc::new(analyze(sql, map));
        let mut guard = stripe.lock();
        if guard.len() >= self.per_stripe && !guard.contains_key(&hash) {
            guard.clear();
        }
        guard.insert(
            hash,
            Entry {
                text: sql.into(),
                version: map.version,
                plan: plan.clone(),
            },
        );
        plan
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Plans currently held.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no plan is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
