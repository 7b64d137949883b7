//! Byte-budgeted least-recently-used stores of parked states, and the prefix match that
//! finds the one a prompt extends furthest. Pure: the RAM store holds states, the disk
//! index holds what is in the files; both use [`Lru`].

/// Something kept in an [`Lru`]: its size and the tokens its state holds.
pub trait Weighted {
    /// Bytes it counts against the budget.
    fn bytes(&self) -> u64;
    /// The exact tokens of its KV state, position by position.
    fn tokens(&self) -> &[i32];
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Items ordered by last use, whose sizes never sum past `budget`.
#[derive(Debug)]
pub struct Lru<T> {
    budget: u64,
    used: u64,
    /// Oldest first.
    items: Vec<T>,
}

impl<T: Weighted> Lru<T> {
    /// An empty store holding at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            used: 0,
            items: Vec::new(),
        }
    }

    /// Bytes held now (never more than the budget).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The most bytes it may hold.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Changes the budget; returns what no longer fits, least recently used first.
    pub fn set_budget(&mut self, budget: u64) -> Vec<T> {
        self.budget = budget;
        self.evict_until(|used| used <= budget)
    }

    /// Evicts the least recently used items until `size` more bytes fit (or nothing is
    /// left), and returns them, oldest first: room made before the item exists.
    pub fn make_room(&mut self, size: u64) -> Vec<T> {
        let budget = self.budget;
        self.evict_until(|used| used.saturating_add(size) <= budget)
    }

    fn evict_until(&mut self, fits: impl Fn(u64) -> bool) -> Vec<T> {
        let mut evicted = Vec::new();
        while !fits(self.used) && !self.items.is_empty() {
            let old = self.items.remove(0);
            self.used -= old.bytes();
            evicted.push(old);
        }
        evicted
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `item` as the most recent, evicting the least recently used items until it
    /// fits. Returns what no longer fits, oldest first: the evicted items, or `item`
    /// itself if it is larger than the whole budget.
    pub fn insert(&mut self, item: T) -> Vec<T> {
        let size = item.bytes();
        if size > self.budget {
            return vec![item];
        }
        let evicted = self.make_room(size);
        self.used += size;
        self.items.push(item);
        evicted
    }

    /// The item `prompt` shares the most leading tokens with (the most recent among
    /// equals), as (index, shared tokens). `None` when none shares a token.
    pub fn best_match(&self, prompt: &[i32]) -> Option<(usize, usize)> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, item)| (i, common_prefix(item.tokens(), prompt)))
            .filter(|&(_, common)| common > 0)
            .max_by_key(|&(i, common)| (common, i))
    }

    /// The item at `index` (from [`best_match`](Self::best_match) or
    /// [`position`](Self::position)).
    pub fn get(&self, index: usize) -> Option<&T> {
        self.items.get(index)
    }

    /// The index of the first item matching `pred`.
    pub fn position(&self, pred: impl Fn(&T) -> bool) -> Option<usize> {
        self.items.iter().position(pred)
    }

    /// Removes and returns the item at `index`.
    pub fn take(&mut self, index: usize) -> Option<T> {
        if index >= self.items.len() {
            return None;
        }
        let item = self.items.remove(index);
        self.used -= item.bytes();
        Some(item)
    }

    /// Marks the item at `index` as the most recently used.
    pub fn touch(&mut self, index: usize) {
        if index < self.items.len() {
            let item = self.items.remove(index);
            self.items.push(item);
        }
    }

    /// Removes every item matching `pred`.
    pub fn remove_where(&mut self, pred: impl Fn(&T) -> bool) -> Vec<T> {
        let (removed, kept): (Vec<T>, Vec<T>) = std::mem::take(&mut self.items)
            .into_iter()
            .partition(|item| pred(item));
        self.items = kept;
        self.used = self.items.iter().map(Weighted::bytes).sum();
        removed
    }

    /// Empties the store, oldest first.
    pub fn drain_oldest_first(&mut self) -> Vec<T> {
        self.used = 0;
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        tokens: Vec<i32>,
        bytes: u64,
    }

    impl Weighted for Item {
        fn bytes(&self) -> u64 {
            self.bytes
        }
        fn tokens(&self) -> &[i32] {
            &self.tokens
        }
    }

    fn item(tokens: &[i32], bytes: u64) -> Item {
        Item {
            tokens: tokens.to_vec(),
            bytes,
        }
    }

    #[test]
    fn the_least_recently_used_leave_first() {
        let mut lru = Lru::new(100);
        assert!(lru.insert(item(&[1], 40)).is_empty());
        assert!(lru.insert(item(&[2], 40)).is_empty());
        lru.touch(0); // [1] is now the most recent
        let evicted = lru.insert(item(&[3], 40));
        assert_eq!(evicted, vec![item(&[2], 40)]);
        assert_eq!(lru.used(), 80);
    }

    #[test]
    fn an_item_larger_than_the_budget_is_handed_back() {
        let mut lru = Lru::new(10);
        lru.insert(item(&[1], 5));
        assert_eq!(lru.insert(item(&[2], 11)), vec![item(&[2], 11)]);
        assert_eq!(lru.len(), 1);
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_the_most_recent_among_equals() {
        let mut lru = Lru::new(1000);
        lru.insert(item(&[1, 2, 3], 1));
        lru.insert(item(&[1, 2, 9, 9], 1));
        lru.insert(item(&[1, 2, 3, 4, 5], 1));
        lru.insert(item(&[7], 1));
        assert_eq!(lru.best_match(&[1, 2, 3, 4, 6]), Some((2, 4)));
        assert_eq!(lru.best_match(&[1, 2, 8]), Some((2, 2)));
        assert_eq!(lru.best_match(&[5]), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, Vec<i32>),
        Take(prop::sample::Index),
        Touch(prop::sample::Index),
        RemoveStartingWith(i32),
        Drain,
        SetBudget(u64),
        MakeRoom(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..400, proptest::collection::vec(0i32..4, 0..4))
                .prop_map(|(b, t)| Op::Insert(b, t)),
            1 => any::<prop::sample::Index>().prop_map(Op::Take),
            1 => any::<prop::sample::Index>().prop_map(Op::Touch),
            1 => (0i32..4).prop_map(Op::RemoveStartingWith),
            1 => Just(Op::Drain),
            1 => (0u64..1000).prop_map(Op::SetBudget),
            1 => (0u64..400).prop_map(Op::MakeRoom),
        ]
    }

    proptest! {
        #[test]
        fn the_budget_is_never_exceeded_and_the_accounting_is_exact(
            budget in 0u64..1000,
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut lru = Lru::new(budget);
            let mut budget = budget;
            let mut inserted = 0u64;
            let mut out = 0u64;
            for op in ops {
                match op {
                    Op::Insert(bytes, tokens) => {
                        inserted += bytes;
                        out += lru.insert(Item { tokens, bytes }).iter().map(|i| i.bytes).sum::<u64>();
                    }
                    Op::Take(i) if !lru.is_empty() => {
                        out += lru.take(i.index(lru.len())).map_or(0, |i| i.bytes);
                    }
                    Op::Touch(i) if !lru.is_empty() => lru.touch(i.index(lru.len())),
                    Op::RemoveStartingWith(t) => {
                        out += lru
                            .remove_where(|i| i.tokens.first() == Some(&t))
                            .iter()
                            .map(|i| i.bytes)
                            .sum::<u64>();
                    }
                    Op::Drain => out += lru.drain_oldest_first().iter().map(|i| i.bytes).sum::<u64>(),
                    Op::SetBudget(new) => {
                        budget = new;
                        out += lru.set_budget(new).iter().map(|i| i.bytes).sum::<u64>();
                    }
                    Op::MakeRoom(size) => {
                        out += lru.make_room(size).iter().map(|i| i.bytes).sum::<u64>();
                        prop_assert!(lru.is_empty() || lru.used() + size <= budget);
                    }
                    _ => {}
                }
                let held: u64 = lru.items.iter().map(|i| i.bytes).sum();
                prop_assert!(lru.used() <= budget, "{} > {}", lru.used(), budget);
                prop_assert_eq!(lru.used(), held);
                // Nothing is lost or duplicated: what went in is held or was handed back.
                prop_assert_eq!(inserted, held + out);
            }
        }

        #[test]
        fn best_match_is_the_longest_shared_prefix(
            items in proptest::collection::vec(proptest::collection::vec(0i32..3, 0..6), 0..8),
            prompt in proptest::collection::vec(0i32..3, 0..6),
        ) {
            let mut lru = Lru::new(u64::MAX);
            for tokens in &items {
                lru.insert(Item { tokens: tokens.clone(), bytes: 1 });
            }
            let best = items.iter().map(|t| common_prefix(t, &prompt)).max().unwrap_or(0);
            match lru.best_match(&prompt) {
                None => prop_assert_eq!(best, 0),
                Some((i, common)) => {
                    prop_assert_eq!(common, best);
                    prop_assert_eq!(common_prefix(&lru.get(i).unwrap().tokens, &prompt), best);
                }
            }
        }
    }
}
