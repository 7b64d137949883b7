//! Which slot takes a request, and what goes into each step's batch. Pure functions over
//! [`Slot`]s.
//!
//! Each step's batch holds one token for every generating slot, then prompt tokens of
//! slots still reading their prompt, oldest request first: at most `prefill_chunk` of them
//! while any slot is generating, a whole batch when none is. The cap is what keeps a newcomer's long prompt from freezing the chats
//! that are streaming: llama-server decodes a whole prompt in one step and froze a
//! streaming chat for 8.4 s here.

use std::sync::Arc;

use super::llama::DecodeError;
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

/// Plans one step: generating slots' pending tokens, then prompt chunks, never more than
/// `capacity` (the batch size) tokens in all; `prefill_chunk` caps prompt tokens per step
/// while replies are generated (0: this step holds replies only).
///
/// With more generating slots than the batch holds (`--slots` over `--batch-size`), the
/// ones that fit go first, starting at slot `rotation % slots.len()`: a caller that
/// advances `rotation` each step serves them in turn. A waiting prompt still gets one
/// place, so a newcomer is never starved by a full house of replies.
///
/// Entries come in slot order (slot `i` is sequence `i`) whatever the rotation: with a KV
/// cache per sequence, llama.cpp puts only consecutive, increasing sequence ids in one
/// micro-batch, so a batch listing slots 1, 2, 3, 0 costs two passes over the weights
/// instead of one (measured: 4 streams on SmolLM2 at 0.71x llama-server's rate).
pub fn plan_batch(
    slots: &[Slot],
    capacity: usize,
    prefill_chunk: usize,
    rotation: usize,
) -> Vec<BatchEntry> {
    let mut entries = Vec::new();
    let any_prefill = slots.iter().any(Slot::is_reading);
    let decode_cap = if any_prefill && capacity > 1 {
        capacity - 1
    } else {
        capacity
    };
    let mut used = 0;
    let n = slots.len();
    for i in (0..n).map(|k| (k + rotation % n.max(1)) % n) {
        if used == decode_cap {
            break;
        }
        if let SlotState::Decode { pending } = slots[i].state {
            entries.push(BatchEntry {
                slot: i,
                tokens: vec![pending],
                first_pos: slots[i].cached.len(),
                wants_logits: true,
            });
            used += 1;
        }
    }
    // The chunk cap protects replies being streamed; with none, a prompt may fill the batch.
    // A cap of 0 beside replies is a step of replies only (pacing).
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
    entries.sort_unstable_by_key(|e| e.slot);
    entries
}

/// Decodes batches for [`run_batch`]: the engine's context, or a test double.
pub trait BatchDecoder {
    /// What a successful decode gives (the logits rows).
    type Rows;
    /// Decodes `batch` in one call.
    fn decode(&mut self, batch: &[BatchEntry]) -> Result<Self::Rows, DecodeError>;
    /// `batch` was decoded: advance its slots (sample from `rows`) before the next decode
    /// overwrites the logits.
    fn decoded(&mut self, batch: &[BatchEntry], rows: Self::Rows);
    /// The request in `slot` failed; its slot and KV entries are to be cleared.
    fn failed(&mut self, slot: usize, error: &Arc<DecodeError>);
}

/// Decodes a planned batch. A full KV cache (`NoKvCacheSlot`) is retried as two halves,
/// recursively, so only a slot whose own tokens cannot be placed fails; any other error
/// fails the requests whose tokens were in the failing (part of the) batch, and the
/// other slots carry on at the next step.
pub fn run_batch<D: BatchDecoder>(decoder: &mut D, batch: Vec<BatchEntry>) {
    // A stack, first part on top: parts are decoded in their original order.
    let mut work = vec![batch];
    while let Some(batch) = work.pop() {
        if batch.is_empty() {
            continue;
        }
        let error = match decoder.decode(&batch) {
            Ok(rows) => {
                decoder.decoded(&batch, rows);
                continue;
            }
            Err(error) => error,
        };
        if error == DecodeError::NoKvCacheSlot
            && let Some((first, second)) = halve(&batch)
        {
            work.push(second);
            work.push(first);
            continue;
        }
        let error = Arc::new(error);
        let mut failed: Vec<usize> = batch.iter().map(|e| e.slot).collect();
        failed.dedup();
        for &slot in &failed {
            decoder.failed(slot, &error);
        }
        // A failed slot's later parts must not be decoded on top of its cleared cache.
        for part in &mut work {
            part.retain(|e| !failed.contains(&e.slot));
        }
    }
}

/// Splits a batch in two smaller ones that decode to the same result in order: by
/// entries when it has several, else the one entry's tokens (only the second half wants
/// the logits). `None` for a single token.
fn halve(batch: &[BatchEntry]) -> Option<(Vec<BatchEntry>, Vec<BatchEntry>)> {
    if batch.len() > 1 {
        let (a, b) = batch.split_at(batch.len() / 2);
        return Some((a.to_vec(), b.to_vec()));
    }
    let entry = batch.first()?;
    if entry.tokens.len() < 2 {
        return None;
    }
    let half = entry.tokens.len() / 2;
    let first = BatchEntry {
        slot: entry.slot,
        tokens: entry.tokens[..half].to_vec(),
        first_pos: entry.first_pos,
        wants_logits: false,
    };
    let second = BatchEntry {
        slot: entry.slot,
        tokens: entry.tokens[half..].to_vec(),
        first_pos: entry.first_pos + half,
        wants_logits: entry.wants_logits,
    };
    Some((vec![first], vec![second]))
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
        let plan = plan_batch(&slots, 512, 64, 0);
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
    fn a_chunk_of_0_is_a_step_of_replies_only_and_never_stalls_a_lone_prompt() {
        let mut slots: Vec<Slot> = (0..2).map(Slot::new).collect();
        slots[0].start(vec![1, 2], 1);
        slots[0].prefilled(2);
        slots[0].sampled(42);
        slots[1].start((0..2000).collect(), 2);
        let plan = plan_batch(&slots, 512, 0, 0);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].tokens, vec![42]);
        // With no reply to stream, the chunk does not apply.
        slots[0].finish();
        let plan = plan_batch(&slots, 512, 0, 0);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].tokens.len(), 512);
    }

    #[test]
    fn without_streaming_replies_a_prompt_fills_the_batch() {
        let mut slots = vec![Slot::new(0)];
        slots[0].start((0..2000).collect(), 1);
        let plan = plan_batch(&slots, 512, 64, 0);
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
        let plan = plan_batch(&slots, 512, 5, 0);
        assert_eq!(plan.len(), 3);
        assert!(plan[2].wants_logits && plan[2].tokens == vec![9]);
        assert!(plan[0].wants_logits && plan[0].tokens.len() == 3);
        assert!(!plan[1].wants_logits && plan[1].tokens == vec![4, 5]);
    }

    /// Every mix of idle, generating and prompt-reading slots, at every rotation and batch
    /// size: the plan lists slots in increasing order, each once.
    #[test]
    fn entries_are_in_slot_order_whatever_the_rotation() {
        const SLOTS: usize = 4;
        for states in 0..3usize.pow(SLOTS as u32) {
            let mut slots: Vec<Slot> = (0..SLOTS as i32).map(Slot::new).collect();
            let mut code = states;
            for (i, slot) in slots.iter_mut().enumerate() {
                match code % 3 {
                    1 => {
                        slot.start(vec![1], i as u64);
                        slot.prefilled(1);
                        slot.sampled(1);
                    }
                    2 => {
                        slot.start((0..40).collect(), (SLOTS - i) as u64);
                    }
                    _ => {}
                }
                code /= 3;
            }
            for rotation in 0..2 * SLOTS {
                for capacity in [2, 3, 512] {
                    let plan = plan_batch(&slots, capacity, 16, rotation);
                    let order: Vec<usize> = plan.iter().map(|e| e.slot).collect();
                    assert!(
                        order.windows(2).all(|w| w[0] < w[1]),
                        "states {states}, rotation {rotation}, capacity {capacity}: {order:?}"
                    );
                }
            }
        }
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
        let plan = plan_batch(&slots, 8, 64, 0);
        let total: usize = plan.iter().map(|e| e.tokens.len()).sum();
        assert_eq!(total, 8);
    }

    /// A decoder whose KV cache has room for `room[slot]` more tokens per slot, and
    /// which fails with `error` any batch holding a slot listed in `broken`.
    struct FakeDecoder {
        room: Vec<usize>,
        broken: Vec<usize>,
        error_code: i32,
        decoded: Vec<BatchEntry>,
        failed: Vec<usize>,
        calls: usize,
    }

    impl FakeDecoder {
        fn new(room: Vec<usize>) -> Self {
            Self {
                room,
                broken: Vec::new(),
                error_code: 0,
                decoded: Vec::new(),
                failed: Vec::new(),
                calls: 0,
            }
        }
    }

    impl BatchDecoder for FakeDecoder {
        type Rows = ();

        fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), DecodeError> {
            self.calls += 1;
            if batch.iter().any(|e| self.broken.contains(&e.slot)) {
                return Err(DecodeError::Unknown(self.error_code));
            }
            // Like llama.cpp: all or nothing.
            let mut room = self.room.clone();
            for entry in batch {
                if room[entry.slot] < entry.tokens.len() {
                    return Err(DecodeError::NoKvCacheSlot);
                }
                room[entry.slot] -= entry.tokens.len();
            }
            self.room = room;
            Ok(())
        }

        fn decoded(&mut self, batch: &[BatchEntry], (): ()) {
            self.decoded.extend_from_slice(batch);
        }

        fn failed(&mut self, slot: usize, _error: &Arc<DecodeError>) {
            self.failed.push(slot);
        }
    }

    fn entry(slot: usize, n: usize, first_pos: usize) -> BatchEntry {
        BatchEntry {
            slot,
            tokens: (0..n as i32).collect(),
            first_pos,
            wants_logits: true,
        }
    }

    #[test]
    fn a_full_kv_cache_fails_only_the_slot_that_does_not_fit() {
        // Regression (issue 7, item 7): one failed decode failed every request in it.
        let mut decoder = FakeDecoder::new(vec![100, 100, 3, 100]);
        let batch = vec![
            entry(0, 1, 10),
            entry(1, 1, 20),
            entry(2, 8, 0),
            entry(3, 1, 5),
        ];
        run_batch(&mut decoder, batch);
        assert_eq!(decoder.failed, vec![2]);
        for slot in [0, 1, 3] {
            assert!(
                decoder.decoded.iter().any(|e| e.slot == slot),
                "slot {slot} was decoded: {:?}",
                decoder.decoded
            );
        }
    }

    #[test]
    fn a_prompt_chunk_is_split_until_its_tokens_fit_and_keeps_its_order() {
        let mut decoder = FakeDecoder::new(vec![6]);
        run_batch(&mut decoder, vec![entry(0, 8, 4)]);
        // 8 tokens do not fit, 4 do, then 4 more do not: 2 and then 1 of them do.
        assert_eq!(decoder.failed, vec![0]);
        let positions: Vec<usize> = decoder.decoded.iter().map(|e| e.first_pos).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert!(decoder.decoded.iter().all(|e| !e.wants_logits));
    }

    #[test]
    fn a_split_prompt_asks_for_logits_only_at_its_end() {
        let mut decoder = FakeDecoder::new(vec![100]);
        decoder.room = vec![100];
        let (a, b) = halve(&[entry(0, 9, 3)]).unwrap();
        assert_eq!(
            (a[0].first_pos, a[0].tokens.len(), a[0].wants_logits),
            (3, 4, false)
        );
        assert_eq!(
            (b[0].first_pos, b[0].tokens.len(), b[0].wants_logits),
            (7, 5, true)
        );
        run_batch(&mut decoder, vec![entry(0, 9, 3)]);
        assert_eq!(decoder.calls, 1, "no split without an error");
    }

    #[test]
    fn other_errors_fail_the_slots_of_the_failing_batch_only() {
        let mut decoder = FakeDecoder::new(vec![100, 100, 100]);
        decoder.broken = vec![1];
        decoder.error_code = -3;
        run_batch(&mut decoder, vec![entry(0, 1, 0), entry(1, 1, 0)]);
        assert_eq!(decoder.failed, vec![0, 1]);
        // The next step, without them, goes on.
        run_batch(&mut decoder, vec![entry(2, 4, 0)]);
        assert_eq!(decoder.decoded.len(), 1);
    }

    #[test]
    fn more_generating_slots_than_the_batch_holds_take_turns() {
        // Regression (issue 7, item 7): with --slots over --batch-size every batch failed.
        let mut slots: Vec<Slot> = (0..5).map(Slot::new).collect();
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.start(vec![1], i as u64);
            slot.prefilled(1);
            slot.sampled(7);
        }
        let mut served = [0; 5];
        for step in 0..10 {
            let plan = plan_batch(&slots, 2, 2, step);
            assert_eq!(plan.len(), 2);
            for e in plan {
                served[e.slot] += 1;
            }
        }
        assert_eq!(served, [4; 5], "each slot gets its turn");
    }

    #[test]
    fn a_waiting_prompt_gets_a_place_beside_a_full_house_of_replies() {
        let mut slots: Vec<Slot> = (0..3).map(Slot::new).collect();
        for slot in slots.iter_mut().take(2) {
            slot.start(vec![1], 1);
            slot.prefilled(1);
            slot.sampled(7);
        }
        slots[2].start(vec![1, 2, 3], 2);
        let plan = plan_batch(&slots, 2, 64, 0);
        let total: usize = plan.iter().map(|e| e.tokens.len()).sum();
        assert_eq!(total, 2);
        assert!(plan.iter().any(|e| e.slot == 2), "{plan:?}");
    }
}
