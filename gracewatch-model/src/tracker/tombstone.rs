//! Bounded memory of recent endings (closed connections, exited processes):
//! the evidence that lets "events newer than the snapshot win" when a
//! snapshot is merged after events that already retired what it shows.
//!
//! Only endings newer than the next snapshot matter, so the set is pruned at
//! every merge and capped so a host that closes connections for hours
//! without a rescan cannot grow it without bound. Forgetting an old entry
//! only weakens a repair; it never makes a count wrong by itself.

use std::{
    collections::{VecDeque, hash_map::Entry},
    hash::Hash,
    time::Duration,
};

use super::Map;

/// Entries kept at most; older ones are forgotten first.
const CAP: usize = 1 << 16;

#[derive(Debug)]
pub(super) struct Tombstones<K> {
    latest: Map<K, Duration>,
    /// Insertion order, for eviction. May hold superseded `(key, time)`
    /// pairs; those are skipped when evicted.
    order: VecDeque<(K, Duration)>,
}

impl<K> Default for Tombstones<K> {
    fn default() -> Self {
        Self {
            latest: Map::default(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Tombstones<K> {
    /// Records that `key` ended at `at` (keeps the latest time per key).
    pub(super) fn insert(&mut self, key: K, at: Duration) {
        // One lookup per key (the entry), not a get then an insert or
        // remove: every close lands here, and the eviction below runs once
        // the set is full, i.e. on every close of a busy host.
        match self.latest.entry(key) {
            Entry::Occupied(mut e) if at > *e.get() => {
                e.insert(at);
            }
            Entry::Occupied(_) => return,
            Entry::Vacant(e) => {
                e.insert(at);
            }
        }
        self.order.push_back((key, at));
        while self.order.len() > CAP {
            let Some((old, old_at)) = self.order.pop_front() else {
                break;
            };
            if let Entry::Occupied(e) = self.latest.entry(old) {
                if *e.get() == old_at {
                    e.remove();
                }
            }
        }
    }

    /// When `key` last ended, if still remembered.
    pub(super) fn get(&self, key: &K) -> Option<Duration> {
        self.latest.get(key).copied()
    }

    /// Whether `key` ended at or after `t`.
    pub(super) fn ended_since(&self, key: &K, t: Duration) -> bool {
        self.get(key).is_some_and(|at| at >= t)
    }

    /// Forgets endings older than `t`.
    pub(super) fn retain_since(&mut self, t: Duration) {
        self.latest.retain(|_, at| *at >= t);
        self.order.retain(|(_, at)| *at >= t);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.latest.len()
    }
}
