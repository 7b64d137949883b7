//! How long a request would wait for its first token from the local engine, estimated
//! before it is queued, so that the chain can send it to a cloud provider at once when the
//! wait would be long (`--local-max-wait`). Pure.
//!
//! The estimate: the time until a slot is free for it (the requests queued ahead of it,
//! against the free slots, each round of slots taking an average reply), plus the prompt
//! tokens still to be read before its own first token (what the slots are still reading,
//! what the requests ahead will read, and its own tokens not already in a KV cache), at the
//! engine's measured cost per prompt token, plus one step for the first token. Without
//! measured rates (a fresh engine) there is no estimate: the request goes to the engine.
//!
//! What the engine would find cached is known from [`KnownPrefixes`]: hashes of the
//! block-aligned prefixes of every sequence the engine has held (slots, parked states,
//! park files), so a returning chat (its history cached) counts only its new message, and a
//! new or evicted one counts its whole prompt.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use xxhash_rust::xxh3::Xxh3;

/// Tokens per hashed block: a cached prefix is known to within this many tokens.
pub const BLOCK: usize = 16;

/// The most block hashes remembered (2^18: ~1 M tokens of sequences, a few MiB); the
/// oldest are forgotten first.
pub const MAX_BLOCKS: usize = 1 << 18;

/// The prefixes the engine holds or held in a KV cache, as chained hashes of whole blocks
/// of [`BLOCK`] tokens (a block's hash covers every token before it). Bounded: past
/// `capacity` hashes the oldest insertions are forgotten (a forgotten prefix only makes an
/// estimate longer, never a cached chat look cold).
#[derive(Debug)]
pub struct KnownPrefixes {
    /// Hash → the insertion that last added it.
    blocks: HashMap<u64, u64>,
    /// Insertion order, for forgetting the oldest: (hash, insertion).
    order: VecDeque<(u64, u64)>,
    insertions: u64,
    capacity: usize,
}

impl Default for KnownPrefixes {
    fn default() -> Self {
        Self::with_capacity(MAX_BLOCKS)
    }
}

/// The chained hashes of `tokens`' whole blocks.
fn block_hashes(tokens: &[i32]) -> impl Iterator<Item = u64> + '_ {
    let mut previous = 0u64;
    tokens.chunks_exact(BLOCK).map(move |block| {
        let mut hasher = Xxh3::new();
        hasher.update(&previous.to_le_bytes());
        for token in block {
            hasher.update(&token.to_le_bytes());
        }
        previous = hasher.digest();
        previous
    })
}

impl KnownPrefixes {
    /// An empty set remembering at most `capacity` block hashes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            blocks: HashMap::new(),
            order: VecDeque::new(),
            insertions: 0,
            capacity: capacity.max(1),
        }
    }

    /// Remembers every whole-block prefix of `tokens`.
    pub fn insert(&mut self, tokens: &[i32]) {
        self.insertions += 1;
        let insertion = self.insertions;
        for hash in block_hashes(tokens) {
            self.blocks.insert(hash, insertion);
            self.order.push_back((hash, insertion));
        }
        while self.blocks.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((hash, insertion)) = self.order.pop_front() else {
                break;
            };
            // Only the latest insertion of a hash forgets it.
            if self.blocks.get(&hash) == Some(&insertion) {
                self.blocks.remove(&hash);
            }
        }
    }

    /// How many leading tokens of `prompt` are known to be cached (whole blocks).
    pub fn cached_prefix(&self, prompt: &[i32]) -> usize {
        block_hashes(prompt)
            .take_while(|hash| self.blocks.contains_key(hash))
            .count()
            * BLOCK
    }

    /// Block hashes remembered.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The engine's measured rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Seconds per prompt token.
    pub prompt_token: f64,
    /// Seconds of a step (one token for each streaming reply).
    pub step: f64,
    /// Seconds a slot stays busy with a reply after its prompt, on average.
    pub reply: f64,
}

/// What the engine looks like to a request about to be queued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaInputs {
    /// Slots in all.
    pub slots: usize,
    /// Slots busy now.
    pub busy: usize,
    /// Requests queued ahead of this one.
    pub queued_ahead: usize,
    /// Prompt tokens the requests ahead will read (their uncached tokens).
    pub queued_tokens: u64,
    /// Prompt tokens the busy slots have still to read.
    pub reading_tokens: u64,
    /// This request's prompt tokens not cached.
    pub own_tokens: u64,
}

/// The estimated time to this request's first token.
pub fn estimate(inputs: &EtaInputs, rates: &Rates) -> Duration {
    let slots = inputs.slots.max(1);
    let free = slots.saturating_sub(inputs.busy);
    // This request needs the (queued_ahead + 1)-th slot to come free.
    let needed = inputs.queued_ahead + 1;
    let rounds = needed.saturating_sub(free).div_ceil(slots);
    let tokens = inputs
        .reading_tokens
        .saturating_add(inputs.queued_tokens)
        .saturating_add(inputs.own_tokens);
    let seconds = rounds as f64 * rates.reply + tokens as f64 * rates.prompt_token + rates.step;
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Mistral 7B on 2 cores: ~20 prompt tokens/s, ~7 reply tokens/s, replies of ~30 s.
    const SEVEN_B: Rates = Rates {
        prompt_token: 0.05,
        step: 0.15,
        reply: 30.0,
    };

    fn idle(own_tokens: u64) -> EtaInputs {
        EtaInputs {
            slots: 4,
            busy: 0,
            queued_ahead: 0,
            queued_tokens: 0,
            reading_tokens: 0,
            own_tokens,
        }
    }

    #[test]
    fn a_returning_chat_on_an_idle_engine_is_quick_and_a_cold_one_is_not() {
        let quick = estimate(&idle(20), &SEVEN_B);
        assert!(quick < Duration::from_secs(2), "{quick:?}");
        let cold = estimate(&idle(2000), &SEVEN_B);
        assert!((100.0..101.0).contains(&cold.as_secs_f64()), "{cold:?}");
    }

    /// A scripted queue: requests arrive one by one at a busy engine; each one's estimate
    /// counts what is ahead of it.
    #[test]
    fn a_scripted_queue() {
        // Two cold 2000-token chats are being read in two slots; two more slots stream.
        let mut engine = EtaInputs {
            slots: 4,
            busy: 4,
            queued_ahead: 0,
            queued_tokens: 0,
            reading_tokens: 3000,
            own_tokens: 0,
        };
        let mut estimates = Vec::new();
        for own in [30u64, 2000, 30, 30, 30] {
            engine.own_tokens = own;
            estimates.push(estimate(&engine, &SEVEN_B).as_secs_f64());
            engine.queued_ahead += 1;
            engine.queued_tokens += own;
        }
        // First in line: a slot round (30 s) and the 3000 tokens being read (150 s).
        assert!((181.0..183.0).contains(&estimates[0]), "{estimates:?}");
        // Every later request waits for everything ahead of it.
        assert!(estimates.windows(2).all(|w| w[1] > w[0]), "{estimates:?}");
        // The fifth waits for a second round of slots.
        assert!(estimates[4] - estimates[3] > 30.0, "{estimates:?}");
    }

    #[test]
    fn a_free_slot_means_no_slot_wait() {
        let mut inputs = idle(10);
        inputs.busy = 3;
        assert!(estimate(&inputs, &SEVEN_B) < Duration::from_secs(1));
        inputs.queued_ahead = 1;
        assert!(estimate(&inputs, &SEVEN_B) > Duration::from_secs(30));
    }

    #[test]
    fn known_prefixes_count_whole_blocks() {
        let mut known = KnownPrefixes::default();
        let history: Vec<i32> = (0..100).collect();
        known.insert(&history);
        let mut next = history.clone();
        next.extend(200..230);
        assert_eq!(known.cached_prefix(&next), 96);
        assert_eq!(known.cached_prefix(&[7; 40]), 0);
        // A prompt differing in its first token shares nothing (the hashes are chained).
        let mut other = history.clone();
        other[0] = -1;
        assert_eq!(known.cached_prefix(&other), 0);
    }

    #[test]
    fn the_oldest_prefixes_are_forgotten_first() {
        let mut known = KnownPrefixes::with_capacity(10);
        let a: Vec<i32> = (0..160).collect();
        let b: Vec<i32> = (1000..1160).collect();
        known.insert(&a);
        known.insert(&b);
        assert_eq!(known.len(), 10);
        assert_eq!(known.cached_prefix(&a), 0);
        assert_eq!(known.cached_prefix(&b), 160);
        // Inserted again, `a` is the newest: forgetting `b` does not forget it.
        known.insert(&a);
        assert_eq!(known.cached_prefix(&a), 160);
    }

    proptest! {
        /// Bounded whatever is inserted, and what was just inserted is known in full.
        #[test]
        fn bounded_and_the_latest_is_known(
            capacity in 1usize..64,
            sequences in proptest::collection::vec(proptest::collection::vec(0i32..4, 0..200), 1..20),
        ) {
            let mut known = KnownPrefixes::with_capacity(capacity);
            for tokens in &sequences {
                known.insert(tokens);
                prop_assert!(known.len() <= capacity);
                prop_assert!(known.order.len() <= 2 * capacity);
                let blocks = tokens.len() / BLOCK;
                if blocks <= capacity {
                    prop_assert_eq!(known.cached_prefix(tokens), blocks * BLOCK);
                }
            }
        }

        /// More work ahead never shortens the estimate, and it never panics.
        #[test]
        fn monotone_in_the_work_ahead(
            slots in 1usize..8, busy in 0usize..8, ahead in 0usize..20,
            queued in 0u64..100_000, reading in 0u64..100_000, own in 0u64..100_000,
            more in 1u64..1000,
        ) {
            let inputs = EtaInputs {
                slots, busy, queued_ahead: ahead, queued_tokens: queued,
                reading_tokens: reading, own_tokens: own,
            };
            let base = estimate(&inputs, &SEVEN_B);
            let longer = [
                EtaInputs { queued_ahead: ahead + 1, ..inputs },
                EtaInputs { queued_tokens: queued + more, ..inputs },
                EtaInputs { reading_tokens: reading + more, ..inputs },
                EtaInputs { own_tokens: own + more, ..inputs },
                EtaInputs { busy: busy + 1, ..inputs },
            ];
            for other in longer {
                prop_assert!(estimate(&other, &SEVEN_B) >= base);
            }
        }
    }
}
