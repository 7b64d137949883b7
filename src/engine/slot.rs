//! One inference slot: a llama.cpp sequence id, the tokens its KV cache holds, and where
//! the current request stands (Idle → Prefill → Decode → Idle). Pure bookkeeping: the
//! worker performs the llama.cpp calls this state asks for.

/// Where a slot's current request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No request; the KV cache still holds `cached` for a later prefix match.
    Idle,
    /// Reading the prompt: `prompt[next..]` is still to be decoded.
    Prefill {
        /// Index of the next prompt token to decode.
        next: usize,
    },
    /// Generating: `pending` was sampled and goes into the next batch.
    Decode {
        /// The last sampled token, not yet in the KV cache.
        pending: i32,
    },
    /// Reserved for another choice of the request in slot `leader` (OpenAI's `n`): it
    /// gets that slot's KV cells once the prompt is read ([`Slot::fork`]). Until then its
    /// own cache is untouched and still valid.
    Awaiting {
        /// The slot reading the prompt.
        leader: usize,
    },
}

/// One inference slot.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The llama.cpp sequence id this slot owns.
    pub seq_id: i32,
    /// The tokens in this sequence's KV cache, position by position.
    pub cached: Vec<i32>,
    /// The current request's prompt.
    pub prompt: Vec<i32>,
    /// Where the current request stands.
    pub state: SlotState,
    /// When the slot was last given a request (a tick of the worker), for LRU choice.
    pub last_used: u64,
}

impl Slot {
    /// An idle slot with an empty cache.
    pub fn new(seq_id: i32) -> Self {
        Self {
            seq_id,
            cached: Vec::new(),
            prompt: Vec::new(),
            state: SlotState::Idle,
            last_used: 0,
        }
    }

    /// Whether the slot has no request.
    pub fn is_idle(&self) -> bool {
        self.state == SlotState::Idle
    }

    /// How many leading tokens of `prompt` this slot's cache already holds, keeping at
    /// least one token to decode (its logits give the first reply token).
    pub fn reusable_prefix(&self, prompt: &[i32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// Takes a request. Returns the number of prompt tokens reused from the cache; the
    /// caller must remove the sequence's KV entries from that position on.
    pub fn start(&mut self, prompt: Vec<i32>, tick: u64) -> usize {
        let reused = self.reusable_prefix(&prompt);
        self.cached.truncate(reused);
        self.prompt = prompt;
        self.state = SlotState::Prefill { next: reused };
        self.last_used = tick;
        reused
    }

    /// Reserves the slot for a choice of the request in slot `leader` (see
    /// [`SlotState::Awaiting`]).
    pub fn reserve(&mut self, leader: usize, tick: u64) {
        self.prompt = Vec::new();
        self.state = SlotState::Awaiting { leader };
        self.last_used = tick;
    }

    /// Takes the leader's cache, `prompt` (its KV cells were just copied into this
    /// slot's sequence, replacing all of its own), and generates from there: the caller
    /// samples the first token from the leader's logits and calls [`sampled`](Self::sampled).
    /// Returns false (and changes nothing) unless the slot was awaiting.
    pub fn fork(&mut self, prompt: &[i32]) -> bool {
        if !matches!(self.state, SlotState::Awaiting { .. }) {
            return false;
        }
        self.cached = prompt.to_vec();
        self.prompt = prompt.to_vec();
        self.state = SlotState::Prefill { next: prompt.len() };
        true
    }

    /// Whether the slot has prompt tokens still to decode.
    pub fn is_reading(&self) -> bool {
        !self.remaining_prompt().is_empty()
    }

    /// Prompt tokens still to decode.
    pub fn remaining_prompt(&self) -> &[i32] {
        match self.state {
            SlotState::Prefill { next } => &self.prompt[next..],
            _ => &[],
        }
    }

    /// Records that `n` more prompt tokens were decoded. Returns whether the prompt is done
    /// (the last of those tokens carries the logits of the first reply token).
    pub fn prefilled(&mut self, n: usize) -> bool {
        let SlotState::Prefill { next } = self.state else {
            return false;
        };
        let end = (next + n).min(self.prompt.len());
        self.cached.extend_from_slice(&self.prompt[next..end]);
        self.state = SlotState::Prefill { next: end };
        end == self.prompt.len()
    }

    /// Records a sampled token that goes into the next batch.
    pub fn sampled(&mut self, token: i32) {
        self.state = SlotState::Decode { pending: token };
    }

    /// Records that the pending token was decoded into the KV cache.
    pub fn decoded(&mut self) {
        if let SlotState::Decode { pending } = self.state {
            self.cached.push(pending);
        }
    }

    /// Ends the request; the cache stays for the next prefix match.
    pub fn finish(&mut self) {
        self.state = SlotState::Idle;
        self.prompt = Vec::new();
    }

    /// Forgets the cache (after its KV entries were removed, e.g. on a decode error).
    pub fn clear(&mut self) {
        self.finish();
        self.cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_moves_through_prefill_and_decode_and_keeps_its_cache() {
        let mut slot = Slot::new(0);
        assert_eq!(slot.start(vec![1, 2, 3, 4, 5], 1), 0);
        assert_eq!(slot.remaining_prompt(), &[1, 2, 3, 4, 5]);
        assert!(!slot.prefilled(3));
        assert_eq!(slot.remaining_prompt(), &[4, 5]);
        assert!(slot.prefilled(2));
        slot.sampled(9);
        assert_eq!(slot.state, SlotState::Decode { pending: 9 });
        slot.decoded();
        slot.sampled(10);
        slot.finish();
        assert!(slot.is_idle());
        // 10 was sampled but never decoded: it is not in the KV cache.
        assert_eq!(slot.cached, vec![1, 2, 3, 4, 5, 9]);
    }

    #[test]
    fn follow_up_reuses_the_common_prefix() {
        let mut slot = Slot::new(0);
        slot.cached = vec![1, 2, 3, 4, 5, 9];
        let reused = slot.start(vec![1, 2, 3, 4, 5, 9, 7, 8], 2);
        assert_eq!(reused, 6);
        assert_eq!(slot.remaining_prompt(), &[7, 8]);
    }

    #[test]
    fn divergence_truncates_the_cache() {
        let mut slot = Slot::new(0);
        slot.cached = vec![1, 2, 3, 4];
        assert_eq!(slot.start(vec![1, 2, 7], 1), 2);
        assert_eq!(slot.cached, vec![1, 2]);
    }

    #[test]
    fn an_identical_prompt_still_decodes_its_last_token() {
        let mut slot = Slot::new(0);
        slot.cached = vec![1, 2, 3];
        assert_eq!(slot.start(vec![1, 2, 3], 1), 2);
        assert_eq!(slot.remaining_prompt(), &[3]);
    }

    #[test]
    fn an_awaiting_choice_keeps_its_cache_until_forked() {
        let mut slot = Slot::new(1);
        slot.cached = vec![7, 7, 7];
        slot.reserve(0, 5);
        assert!(!slot.is_idle());
        assert!(slot.remaining_prompt().is_empty());
        assert_eq!(slot.cached, vec![7, 7, 7]);
        // Released before the prompt was read: the old cache is still what the KV holds.
        slot.finish();
        assert!(slot.is_idle() && slot.cached == vec![7, 7, 7]);

        slot.reserve(0, 6);
        assert!(slot.fork(&[1, 2, 3]));
        assert!(slot.remaining_prompt().is_empty());
        slot.sampled(9);
        slot.decoded();
        slot.finish();
        assert_eq!(slot.cached, vec![1, 2, 3, 9]);
        // Only an awaiting slot forks.
        assert!(!slot.fork(&[5]));
        assert_eq!(slot.cached, vec![1, 2, 3, 9]);
    }

    #[test]
    fn clear_forgets_the_cache() {
        let mut slot = Slot::new(3);
        slot.cached = vec![1];
        slot.start(vec![1, 2], 1);
        slot.clear();
        assert!(slot.is_idle() && slot.cached.is_empty());
    }
}
