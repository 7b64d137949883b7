//! Time-budgeted steps: how many prompt tokens go into a step beside the replies being
//! streamed, chosen so that the step takes about `--step-target-ms`. Pure: the engine
//! thread records each step's make-up and duration in [`StepTimings`] and asks
//! [`StepBudget::prompt_chunk`] before planning the next one.
//!
//! Why time and not tokens: a fixed 64-token chunk is ~0.2 s of compute on the 135M test
//! model but ~3.2 s on a 7B, where a streaming chat then gets one token every 3 s. The
//! budget is what the streaming chats feel (the gap between two of their tokens); the prompt
//! gets what is left of it (Sarathi-Serve sizes its token budget from a latency target the
//! same way). The model is linear: a step costs the decode part (measured on steps with
//! reply tokens only) plus a cost per prompt token (measured on steps with prompt tokens,
//! less the decode part). Both are moving averages of the engine's own recent steps, so
//! the size follows the model, the depth of the chats and the load of the machine; an
//! error in the decode part is absorbed by the per-token cost, so the step time still
//! converges to the target.

use std::time::Duration;

/// Weight of the newest step in the moving averages: a few steps to adapt, and one slow
/// step (a page fault, another process) moves the estimate by a third at most.
const ALPHA: f64 = 0.3;

/// The smallest cost per prompt token believed, in milliseconds (a measurement below it is
/// noise: even the 135M test model takes ~3 ms a token on 2 cores).
const MIN_MS_PER_TOKEN: f64 = 1e-3;

/// Prompt tokens per step never fall below this (when the batch has room), so a prompt
/// always moves on, however small the target. One token: a larger floor overrides the
/// target exactly where it matters, a big model on a slow CPU (a 7B on 2 cores takes
/// ~130 ms for a reply token and ~100 ms for each prompt token in such small steps; with a
/// floor of 4 its 500 ms steps took ~570 ms, and a streaming chat kept 21 % of its rate
/// instead of the 26 % it keeps now).
pub const FLOOR_TOKENS: usize = 1;

/// The engine's recent step costs: moving averages over its own steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Milliseconds of a step holding reply tokens only.
    decode_ms: Option<f64>,
    /// Milliseconds per prompt token, the decode part of its step taken out.
    prompt_ms_per_token: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        None => new,
        Some(old) => old + ALPHA * (new - old),
    }
}

impl StepTimings {
    /// A step with `decode_tokens` reply tokens and `prompt_tokens` prompt tokens took
    /// `elapsed`.
    pub fn record(&mut self, decode_tokens: usize, prompt_tokens: usize, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1e3;
        if !ms.is_finite() {
            return;
        }
        if prompt_tokens == 0 {
            if decode_tokens > 0 {
                self.decode_ms = Some(ewma(self.decode_ms, ms));
            }
            return;
        }
        let decode_part = if decode_tokens > 0 {
            self.decode_ms.unwrap_or(0.0)
        } else {
            0.0
        };
        let per_token = ((ms - decode_part) / prompt_tokens as f64).max(MIN_MS_PER_TOKEN);
        self.prompt_ms_per_token = Some(ewma(self.prompt_ms_per_token, per_token));
    }

    /// Milliseconds of a step of reply tokens only, once measured.
    pub fn decode_ms(&self) -> Option<f64> {
        self.decode_ms
    }

    /// Milliseconds per prompt token, once measured.
    pub fn prompt_ms_per_token(&self) -> Option<f64> {
        self.prompt_ms_per_token
    }
}

/// The rule: prompt tokens per step while replies stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepBudget {
    /// What a step should take, in milliseconds (`--step-target-ms`).
    pub target_ms: f64,
    /// The chunk before the engine has timed a prompt token (`--prefill-chunk`).
    pub initial: usize,
}

impl StepBudget {
    /// Prompt tokens for the next step that also decodes reply tokens, when `room` tokens
    /// of the batch are left after them: about what fits the target by `timings`, never
    /// fewer than [`FLOOR_TOKENS`], never more than `room`.
    pub fn prompt_chunk(&self, timings: &StepTimings, room: usize) -> usize {
        let wanted = match timings.prompt_ms_per_token {
            None => self.initial,
            Some(per_token) => {
                let left = self.target_ms - timings.decode_ms.unwrap_or(0.0);
                // `as` saturates: a negative or NaN count is 0, an infinite one usize::MAX.
                (left / per_token).floor() as usize
            }
        };
        wanted.max(FLOOR_TOKENS).min(room)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(value: f64) -> Duration {
        Duration::from_secs_f64(value / 1e3)
    }

    /// A machine whose steps cost `decode` ms plus `per_token` ms a prompt token.
    fn run(budget: StepBudget, decode: f64, per_token: f64, warm: bool, steps: usize) -> usize {
        let mut timings = StepTimings::default();
        if warm {
            timings.record(2, 0, ms(decode));
        }
        let mut chunk = 0;
        for _ in 0..steps {
            chunk = budget.prompt_chunk(&timings, 512);
            timings.record(2, chunk, ms(decode + per_token * chunk as f64));
        }
        chunk
    }

    #[test]
    fn a_7b_shape_gets_a_few_tokens_and_the_test_model_many() {
        let budget = StepBudget {
            target_ms: 500.0,
            initial: 64,
        };
        // Mistral 7B on 2 cores: ~143 ms a reply step, ~48 ms a prompt token.
        assert_eq!(run(budget, 143.0, 48.0, true, 20), 7);
        // SmolLM2-135M: ~8 ms a step, ~3 ms a prompt token.
        assert_eq!(run(budget, 8.0, 3.0, true, 20), 164);
    }

    #[test]
    fn before_any_timing_the_initial_chunk_is_used() {
        let budget = StepBudget {
            target_ms: 500.0,
            initial: 64,
        };
        assert_eq!(budget.prompt_chunk(&StepTimings::default(), 512), 64);
        assert_eq!(budget.prompt_chunk(&StepTimings::default(), 10), 10);
    }

    #[test]
    fn without_a_measured_decode_part_the_steps_still_approach_the_target() {
        let budget = StepBudget {
            target_ms: 500.0,
            initial: 64,
        };
        // From above: the first steps are too long, the error shrinks step by step.
        let steps: Vec<usize> = (1..=40)
            .map(|n| run(budget, 143.0, 48.0, false, n))
            .collect();
        assert!(steps.windows(2).all(|w| w[1] <= w[0]), "{steps:?}");
        assert_eq!(steps.last(), Some(&7));
    }

    #[test]
    fn a_target_below_the_decode_cost_still_moves_the_prompt() {
        let budget = StepBudget {
            target_ms: 50.0,
            initial: 64,
        };
        assert_eq!(run(budget, 143.0, 48.0, true, 10), FLOOR_TOKENS);
    }

    proptest! {
        /// Whatever the timings: never more than the room, never fewer than the floor
        /// (or the room, when smaller).
        #[test]
        fn never_exceeds_the_batch_nor_falls_below_the_floor(
            target in 0.0f64..1e6, initial in 0usize..4096, room in 0usize..4096,
            steps in proptest::collection::vec((0usize..8, 0usize..600, 0.0f64..1e5), 0..20),
        ) {
            let budget = StepBudget { target_ms: target, initial };
            let mut timings = StepTimings::default();
            for (decode, prompt, elapsed) in steps {
                timings.record(decode, prompt, ms(elapsed));
                let chunk = budget.prompt_chunk(&timings, room);
                prop_assert!(chunk <= room);
                prop_assert!(chunk >= FLOOR_TOKENS.min(room));
            }
        }

        /// On a machine with linear costs, the steps converge to the target when it is
        /// reachable (the decode part measured first, as it is once a reply streams).
        #[test]
        fn step_time_converges_to_the_target(
            decode in 1.0f64..500.0, per_token in 0.5f64..100.0, target in 1.0f64..5000.0,
            initial in 1usize..512,
        ) {
            let lowest = decode + per_token * FLOOR_TOKENS as f64;
            let highest = decode + per_token * 512.0;
            prop_assume!(target > lowest + per_token && target < highest);
            let budget = StepBudget { target_ms: target, initial };
            let chunk = run(budget, decode, per_token, true, 60);
            let step = decode + per_token * chunk as f64;
            // Whole tokens: within one token's cost under the target (and never over it
            // by more than one token either).
            prop_assert!((step - target).abs() <= per_token * 1.01 + target * 0.02,
                "step {step} ms for target {target} ms (chunk {chunk})");
        }
    }
}
