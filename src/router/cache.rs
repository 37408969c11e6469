//! What is derived from a statement text (its plan, its rewrites), memoised per text and map version.

use super::{analyze, Plan};
use crate::shardmap::ShardMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Lock stripes; a hit locks one of them briefly, so sessions rarely contend.
const STRIPES: usize = 16;

struct Entry<V> {
    text: Box<str>,
    tag: u32,
    version: u64,
    value: V,
}

/// A bounded, striped memo of values derived from a statement text under one shard-map
/// version (a plan; a rewrite for one shard), keyed by the xxh3 hash of the text and a tag
/// that tells apart what is derived from the same text. A stripe that fills is cleared.
pub struct TextMemo<V> {
    stripes: Vec<Mutex<HashMap<u64, Entry<V>>>>,
    per_stripe: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone> TextMemo<V> {
    /// A memo holding about `capacity` values.
    pub fn new(capacity: usize) -> Self {
        TextMemo {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            per_stripe: capacity.div_ceil(STRIPES).max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The value for (`text`, `tag`) under map `version`, made by `make` on a miss or when
    /// the version changed. `hash` is the text's xxh3.
    pub fn get(
        &self,
        hash: u64,
        text: &str,
        tag: u32,
        version: u64,
        make: impl FnOnce() -> V,
    ) -> V {
        let slot = hash ^ u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let stripe = &self.stripes[(slot as usize) % STRIPES];
        if let Some(e) = stripe.lock().get(&slot) {
            if e.version == version && e.tag == tag && &*e.text == text {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return e.value.clone();
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Made outside the lock: a concurrent miss on the same text only costs a parse.
        let value = make();
        let mut guard = stripe.lock();
        if guard.len() >= self.per_stripe && !guard.contains_key(&slot) {
            guard.clear();
        }
        guard.insert(
            slot,
            Entry {
                text: text.into(),
                tag,
                version,
                value: value.clone(),
            },
        );
        value
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Values currently held.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no value is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Routing plans per statement text: parsing costs tens of microseconds, a lookup well under one.
pub struct PlanCache(TextMemo<Arc<Plan>>);

impl PlanCache {
    /// A cache holding about `capacity` plans.
    pub fn new(capacity: usize) -> Self {
        PlanCache(TextMemo::new(capacity))
    }

    /// The plan for `sql` under `map`, analysed on a miss or when the map's version changed.
    pub fn plan(&self, sql: &str, map: &ShardMap) -> Arc<Plan> {
        self.plan_hashed(xxhash_rust::xxh3::xxh3_64(sql.as_bytes()), sql, map)
    }

    /// `plan` with the hash given (tests force collisions through it).
    pub(super) fn plan_hashed(&self, hash: u64, sql: &str, map: &ShardMap) -> Arc<Plan> {
        self.0
            .get(hash, sql, 0, map.version, || Arc::new(analyze(sql, map)))
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        self.0.stats()
    }

    /// Plans currently held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no plan is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
