//! Which server of a fleet answers a conversation: rendezvous (highest-random-weight)
//! hashing of the conversation's affinity key, with bounded load for new conversations
//! (Mirrokni, Thorup & Zadimoghaddam, "Consistent Hashing with Bounded Loads"; HAProxy's
//! `hash-balance-factor`). Pure: no I/O, no clock; the caller passes each server's state.
//!
//! # The rules
//! - Every key ranks the servers by `hash(key, server)`, highest first. A server's place
//!   in a key's ranking depends only on the two of them, so adding or losing one server
//!   changes no other server's relative order: only the keys whose first choice it was move.
//! - A **new** conversation goes to the first server in its ranking that is up and holds
//!   fewer than `ceil(factor × (in flight + 1) / servers up)` requests — its share of the
//!   load plus the bound. Since those capacities add up to more than the load, one always
//!   qualifies.
//! - A **returning** conversation goes where its cache is: its first server that is up
//!   (whatever the load — the point is the cache), or, when it was placed past a busy
//!   first choice, that server, while it is up.
//! - So when a server goes down its conversations move to their next server in ranking
//!   order, and when it comes back they return to it.
//!
//! Placements are remembered for the last [`MAX_REMEMBERED`] conversations; one forgotten
//! is placed again as new (usually on the same server).

use std::collections::{HashMap, VecDeque};

/// How far past its share of the in-flight requests a server may go before new
/// conversations are handed to the next one (HAProxy's `hash-balance-factor 125`).
pub const BALANCE_FACTOR: f64 = 1.25;

/// Conversations whose placement is remembered.
pub const MAX_REMEMBERED: usize = 65_536;

/// One server as the router sees it at the moment of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerLoad {
    /// Whether it is taking requests (not marked down, not already tried for this one).
    pub up: bool,
    /// Requests it is answering now.
    pub in_flight: usize,
}

/// Where a remembered conversation was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// On its first server that is up (recomputed every time, so it follows failures and
    /// recoveries).
    First,
    /// Past a busy first choice, on this server.
    Overflow(usize),
}

/// The router of one fleet.
#[derive(Debug, Clone)]
pub struct Router {
    /// Each server's identity (a hash of its URL): the ranking depends on this, not on the
    /// order of the list, so reordering the flag changes nothing.
    ids: Vec<u64>,
    factor: f64,
    placed: HashMap<u64, Placement>,
    /// Keys of `placed`, oldest first, to forget the oldest beyond [`MAX_REMEMBERED`].
    age: VecDeque<u64>,
    limit: usize,
}

impl Router {
    /// A router over servers with these identities, with [`BALANCE_FACTOR`].
    pub fn new(ids: Vec<u64>) -> Self {
        Self::with_limits(ids, BALANCE_FACTOR, MAX_REMEMBERED)
    }

    /// A router with a given balance factor (at least 1) and memory size.
    pub fn with_limits(ids: Vec<u64>, factor: f64, limit: usize) -> Self {
        Self {
            ids,
            factor: factor.max(1.0),
            placed: HashMap::new(),
            age: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    /// The servers, best first, for `key`.
    pub fn ranking(&self, key: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((weight(key, self.ids[i]), i)));
        order
    }

    /// The server for the conversation `key`, given every server's state now (`loads`,
    /// in the order of the ids); `None` when none is up. Remembers the placement.
    pub fn route(&mut self, key: u64, loads: &[ServerLoad]) -> Option<usize> {
        let up = |i: usize| loads.get(i).is_some_and(|l| l.up);
        let ranking = self.ranking(key);
        let first = ranking.iter().copied().find(|&i| up(i))?;
        match self.placed.get(&key) {
            Some(Placement::First) => return Some(first),
            Some(Placement::Overflow(server)) if up(*server) => return Some(*server),
            // New, or its overflow server is gone: placed again.
            _ => {}
        }
        let servers_up = ranking.iter().filter(|&&i| up(i)).count();
        let load: usize = ranking
            .iter()
            .filter(|&&i| up(i))
            .map(|&i| loads[i].in_flight)
            .sum();
        let cap = capacity(self.factor, load + 1, servers_up);
        let chosen = ranking
            .iter()
            .copied()
            .find(|&i| up(i) && loads[i].in_flight < cap)
            .unwrap_or(first);
        let placement = if chosen == first {
            Placement::First
        } else {
            Placement::Overflow(chosen)
        };
        self.remember(key, placement);
        Some(chosen)
    }

    fn remember(&mut self, key: u64, placement: Placement) {
        if self.placed.insert(key, placement).is_none() {
            self.age.push_back(key);
            while self.age.len() > self.limit {
                if let Some(old) = self.age.pop_front() {
                    self.placed.remove(&old);
                }
            }
        }
    }
}

/// The most requests one of `servers` may hold when `load` are in flight in all:
/// `ceil(factor × load / servers)`, at least 1.
pub fn capacity(factor: f64, load: usize, servers: usize) -> usize {
    if servers == 0 {
        return 0;
    }
    let share = factor * load as f64 / servers as f64;
    // `share` is finite and small (loads are counts of requests): the cast cannot wrap.
    (share.ceil() as usize).max(1)
}

/// The rendezvous weight of `server` for `key`.
fn weight(key: u64, server: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&key.to_le_bytes(), server)
}

/// A server's identity: a hash of its base URL.
pub fn server_id(url: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(url.trim_end_matches('/').as_bytes())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn router(n: usize) -> Router {
        Router::new(
            (0..n)
                .map(|i| server_id(&format!("http://10.0.0.{i}:8080/v1")))
                .collect(),
        )
    }

    fn idle(n: usize) -> Vec<ServerLoad> {
        vec![
            ServerLoad {
                up: true,
                in_flight: 0
            };
            n
        ]
    }

    #[test]
    fn capacity_is_the_share_plus_the_bound() {
        assert_eq!(capacity(1.25, 20, 3), 9);
        assert_eq!(capacity(1.25, 20, 2), 13);
        assert_eq!(capacity(1.25, 1, 4), 1);
        assert_eq!(capacity(1.25, 0, 4), 1);
        assert_eq!(capacity(1.25, 5, 0), 0);
    }

    #[test]
    fn nothing_up_is_no_route() {
        let mut r = router(2);
        assert_eq!(r.route(7, &[ServerLoad::default(); 2]), None);
        assert_eq!(r.route(7, &[]), None);
    }

    #[test]
    fn a_busy_first_choice_hands_a_new_conversation_on_but_keeps_its_own() {
        let mut r = router(2);
        let key = 42;
        let first = r.ranking(key)[0];
        let mut loads = idle(2);
        loads[first].in_flight = 10;
        // New: its first choice holds 10 of 11 (cap ceil(1.25 × 11 / 2) = 7): the other.
        assert_eq!(r.route(key, &loads), Some(1 - first));
        // Returning: stays on the server that has its cache, even once the first is idle.
        assert_eq!(r.route(key, &idle(2)), Some(1 - first));
        // A conversation first placed on its first choice stays there under load.
        let other = (0..).find(|k| r.ranking(*k)[0] == first).unwrap();
        assert_eq!(r.route(other, &idle(2)), Some(first));
        assert_eq!(r.route(other, &loads), Some(first));
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = Router::with_limits(router(3).ids, BALANCE_FACTOR, 10);
        for key in 0..100 {
            r.route(key, &idle(3));
        }
        assert_eq!(r.placed.len(), 10);
        assert_eq!(r.age.len(), 10);
    }

    proptest! {
        /// The same key with the same state goes to the same server, every time.
        #[test]
        fn affinity_is_stable(
            n in 1usize..8,
            keys in proptest::collection::vec(any::<u64>(), 1..50),
            loads in proptest::collection::vec((any::<bool>(), 0usize..20), 8),
        ) {
            let loads: Vec<ServerLoad> = loads[..n].iter().map(|&(up, in_flight)| ServerLoad { up, in_flight }).collect();
            let mut r = router(n);
            let first: Vec<_> = keys.iter().map(|&k| r.route(k, &loads)).collect();
            let again: Vec<_> = keys.iter().map(|&k| r.route(k, &loads)).collect();
            prop_assert_eq!(&first, &again);
            for (key, server) in keys.iter().zip(&first) {
                prop_assert_eq!(server.is_some(), loads.iter().any(|l| l.up), "key {}", key);
                if let Some(s) = server {
                    prop_assert!(loads[*s].up);
                }
            }
        }

        /// A server going down moves only its own conversations, each to another server
        /// that is up; when it comes back they all return.
        #[test]
        fn only_a_dead_servers_keys_move_and_they_come_back(
            n in 2usize..8,
            dead in 0usize..8,
            keys in proptest::collection::hash_set(any::<u64>(), 1..200),
        ) {
            let dead = dead % n;
            let mut r = router(n);
            let before: Vec<(u64, usize)> = keys.iter().map(|&k| (k, r.route(k, &idle(n)).unwrap())).collect();
            let mut down = idle(n);
            down[dead].up = false;
            for &(key, server) in &before {
                let now = r.route(key, &down).unwrap();
                if server == dead {
                    prop_assert_ne!(now, dead);
                    // Its next server in ranking order.
                    prop_assert_eq!(now, r.ranking(key)[1]);
                } else {
                    prop_assert_eq!(now, server, "key {} moved off a live server", key);
                }
            }
            for &(key, server) in &before {
                prop_assert_eq!(r.route(key, &idle(n)).unwrap(), server, "key {} did not return", key);
            }
        }

        /// New conversations arriving while none finishes: no server ever holds more than
        /// its share plus the bound.
        #[test]
        fn the_load_bound_holds(
            n in 1usize..8,
            down in proptest::collection::vec(any::<bool>(), 8),
            keys in proptest::collection::hash_set(any::<u64>(), 1..300),
        ) {
            let mut r = router(n);
            let mut loads: Vec<ServerLoad> = (0..n).map(|i| ServerLoad { up: !down[i] || i == 0, in_flight: 0 }).collect();
            let servers_up = loads.iter().filter(|l| l.up).count();
            for (placed, &key) in keys.iter().enumerate() {
                let server = r.route(key, &loads).unwrap();
                prop_assert!(loads[server].up);
                loads[server].in_flight += 1;
                let cap = capacity(BALANCE_FACTOR, placed + 1, servers_up);
                prop_assert!(loads.iter().all(|l| l.in_flight <= cap), "{:?} over {}", loads, cap);
            }
        }

        /// The ranking is a permutation that does not depend on where a server is listed.
        #[test]
        fn the_ranking_ignores_the_list_order(key in any::<u64>(), n in 1usize..8, rot in 0usize..8) {
            let r = router(n);
            let mut ids = r.ids.clone();
            ids.rotate_left(rot % n);
            let rotated = Router::new(ids.clone());
            let a: Vec<u64> = r.ranking(key).iter().map(|&i| r.ids[i]).collect();
            let b: Vec<u64> = rotated.ranking(key).iter().map(|&i| ids[i]).collect();
            prop_assert_eq!(a, b);
        }
    }
}
