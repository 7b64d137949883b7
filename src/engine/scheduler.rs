//! Which slot takes a request, and what goes into each step's batch. Pure functions over
//! [`Slot`]s.
//!
//! Each step's batch holds one token for every generating slot, then prompt tokens of
//! slots still reading their prompt, oldest request first: at most `prefill_chunk` of them
//! while any slot is generating, a whole batch when none is. The cap is what keeps a newcomer's long prompt from freezing the chats
//! that are streaming: llama-server decodes a whole prompt in one step and froze a
//! streaming chat for 8.4 s here.

use super::slot::{Slot, SlotState};

/// The idle slot for `prompt`: the one whose cache shares the longest prefix with it, the
/// least recently used among equals (so a chat's cache survives as long as possible).
pub fn choose_slot(slots: &[Slot], prompt: &[i32]) -> Option<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| slot.is_idle())
        .max_by_key(|(_, slot)| {
            (
                slot.reusable_prefix(prompt),
                std::cmp::Reverse(slot.last_used),
            )
        })
        .map(|(i, _)| i)
}

/// One slot's share of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// Index of the slot.
    pub slot: usize,
    /// The tokens to decode.
    pub tokens: Vec<i32>,
    /// Position of the first of them in the slot's sequence.
    pub first_pos: usize,
    /// Whether logits are wanted for the last token (a reply token is sampled from them).
    pub wants_logits: bool,
}

/// Plans one step: every generating slot's pending token, then prompt chunks.
/// `capacity` is the batch size; `prefill_chunk` caps prompt tokens per step.
pub fn plan_batch(slots: &[Slot], capacity: usize, prefill_chunk: usize) -> Vec<BatchEntry> {
    let mut entries = Vec::new();
    let mut used = 0;
    for (i, slot) in slots.iter().enumerate() {
        if let SlotState::Decode { pending } = slot.state {
            entries.push(BatchEntry {
                slot: i,
                tokens: vec![pending],
                first_pos: slot.cached.len(),
                wants_logits: true,
            });
            used += 1;
        }
    }
    // The chunk cap protects replies being streamed; with none, a prompt may fill the batch.
    let cap = if used == 0 { capacity } else { prefill_chunk };
    let mut prompt_budget = cap.min(capacity.saturating_sub(used));
    let mut prefilling: Vec<usize> = (0..slots.len())
        .filter(|&i| matches!(slots[i].state, SlotState::Prefill { .. }))
        .collect();
    prefilling.sort_by_key(|&i| slots[i].last_used);
    for i in prefilling {
        if prompt_budget == 0 {
            break;
        }
        let remaining = slots[i].remaining_prompt();
        let n = remaining.len().min(prompt_budget);
        if n == 0 {
            continue;
        }
        prompt_budget -= n;
        entries.push(BatchEntry {
            slot: i,
            tokens: remaining[..n].to_vec(),
            first_pos: slots[i].cached.len(),
            wants_logits: n == remaining.len(),
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_with(seq: i32, cached: Vec<i32>, last_used: u64) -> Slot {
        let mut slot = Slot::new(seq);
        slot.cached = cached;
        slot.last_used = last_used;
        slot
    }

    #[test]
    fn chooses_the_longest_common_prefix() {
        let slots = vec![
            slot_with(0, vec![1, 2], 5),
            slot_with(1, vec![1, 2, 3, 4], 9),
            slot_with(2, vec![], 1),
        ];
        assert_eq!(choose_slot(&slots, &[1, 2, 3, 4, 5]), Some(1));
    }

    #[test]
    fn without_a_match_chooses_the_least_recently_used() {
        let slots = vec![
            slot_with(0, vec![7], 5),
            slot_with(1, vec![8], 2),
            slot_with(2, vec![9], 3),
        ];
        assert_eq!(choose_slot(&slots, &[1, 2]), Some(1));
    }

    #[test]
    fn busy_slots_are_not_chosen() {
        let mut slots = vec![slot_with(0, vec![1, 2, 3], 1), slot_with(1, vec![], 1)];
        slots[0].start(vec![1, 2, 3, 4], 2);
        assert_eq!(choose_slot(&slots, &[1, 2, 3, 4]), Some(1));
        slots[1].start(vec![5], 3);
        assert_eq!(choose_slot(&slots, &[5]), None);
    }

    #[test]
    fn generating_slots_always_get_their_token_and_prefill_is_capped() {
        let mut slots: Vec<Slot> = (0..3).map(Slot::new).collect();
        slots[0].start(vec![1, 2], 1);
        slots[0].prefilled(2);
        slots[0].sampled(42);
        slots[1].start((0..2000).collect(), 2);
        slots[2].start((0..10).collect(), 3);
        let plan = plan_batch(&slots, 512, 64);
        assert_eq!(plan[0].slot, 0);
        assert_eq!(plan[0].tokens, vec![42]);
        assert_eq!(plan[0].first_pos, 2);
        assert!(plan[0].wants_logits);
        // The older prompt takes the whole chunk; the newer one waits for the next step.
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1].slot, 1);
        assert_eq!(plan[1].tokens.len(), 64);
        assert!(!plan[1].wants_logits);
    }

    #[test]
    fn without_streaming_replies_a_prompt_fills_the_batch() {
        let mut slots = vec![Slot::new(0)];
        slots[0].start((0..2000).collect(), 1);
        let plan = plan_batch(&slots, 512, 64);
        assert_eq!(plan[0].tokens.len(), 512);
    }

    #[test]
    fn a_prompt_finishing_in_this_step_asks_for_logits() {
        let mut slots = vec![Slot::new(0), Slot::new(1), Slot::new(2)];
        slots[2].start(vec![9], 0);
        slots[2].prefilled(1);
        slots[2].sampled(9);
        slots[0].start(vec![1, 2, 3], 1);
        slots[1].start(vec![4, 5, 6, 7], 2);
        let plan = plan_batch(&slots, 512, 5);
        let plan = &plan[1..]; // after the generating slot's token
        assert_eq!(plan.len(), 2);
        assert!(plan[0].wants_logits && plan[0].tokens.len() == 3);
        assert!(!plan[1].wants_logits && plan[1].tokens == vec![4, 5]);
    }

    #[test]
    fn the_batch_never_exceeds_its_capacity() {
        let mut slots: Vec<Slot> = (0..4).map(Slot::new).collect();
        for (i, slot) in slots.iter_mut().enumerate().take(3) {
            slot.start(vec![1], i as u64);
            slot.prefilled(1);
            slot.sampled(1);
        }
        slots[3].start((0..100).collect(), 9);
        let plan = plan_batch(&slots, 8, 64);
        let total: usize = plan.iter().map(|e| e.tokens.len()).sum();
        assert_eq!(total, 8);
    }
}
