//! Keyed timers: at most one deadline per key. Setting a key replaces its
//! deadline, cancelling is explicit, and the owner sleeps until
//! [`Timers::next`]: nothing is spawned per timer and no stale timer ever
//! fires, so there is nothing to filter with epochs.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

pub struct Timers<K> {
    by_key: HashMap<K, (Instant, u64)>,
    /// Deadline, then order of setting, then the key: due ones come first.
    queue: BTreeSet<(Instant, u64, K)>,
    seq: u64,
}

impl<K: Clone + Eq + Hash + Ord> Default for Timers<K> {
    fn default() -> Self {
        Timers { by_key: HashMap::new(), queue: BTreeSet::new(), seq: 0 }
    }
}

impl<K: Clone + Eq + Hash + Ord> Timers<K> {
    /// Arms `key` for `at`, replacing its earlier deadline.
    pub fn set(&mut self, key: K, at: Instant) {
        self.cancel(&key);
        self.seq += 1;
        self.queue.insert((at, self.seq, key.clone()));
        self.by_key.insert(key, (at, self.seq));
    }

    pub fn cancel(&mut self, key: &K) {
        if let Some((at, seq)) = self.by_key.remove(key) {
            self.queue.remove(&(at, seq, key.clone()));
        }
    }

    /// Cancels every key `pick` chooses.
    pub fn cancel_where(&mut self, pick: impl Fn(&K) -> bool) {
        let keys: Vec<K> = self.by_key.keys().filter(|k| pick(k)).cloned().collect();
        for k in keys {
            self.cancel(&k);
        }
    }

    /// The earliest deadline armed.
    pub fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _, _)| *at)
    }

    /// Takes the next key due by `now`, in deadline order.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (at, _, _) = self.queue.first()?;
        if *at > now {
            return None;
        }
        let (_, _, key) = self.queue.pop_first()?;
        self.by_key.remove(&key);
        Some(key)
    }

    pub fn is_armed(&self, key: &K) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn set_replaces_cancel_removes_and_due_ones_come_in_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t: Timers<&str> = Timers::default();
        t.set("a", t0 + ms(30));
        t.set("b", t0 + ms(10));
        t.set("c", t0 + ms(20));
        t.set("a", t0 + ms(5)); // replaces, does not add
        assert_eq!(t.len(), 3);
        assert_eq!(t.next(), Some(t0 + ms(5)));
        t.cancel(&"c");
        assert!(!t.is_armed(&"c"));
        assert_eq!(t.pop_due(t0), None, "nothing is due yet");
        assert_eq!(t.pop_due(t0 + ms(100)), Some("a"));
        assert_eq!(t.pop_due(t0 + ms(100)), Some("b"));
        assert_eq!(t.pop_due(t0 + ms(100)), None);
        assert!(t.is_empty() && t.next().is_none());
    }

    #[test]
    fn equal_deadlines_fire_in_the_order_they_were_set() {
        let at = Instant::now();
        let mut t: Timers<u32> = Timers::default();
        for k in [3, 1, 2] {
            t.set(k, at);
        }
        t.cancel_where(|k| *k == 1);
        assert_eq!((t.pop_due(at), t.pop_due(at), t.pop_due(at)), (Some(3), Some(2), None));
    }
}
