//! Pacing: while replies stream and a prompt is read, which steps carry prompt tokens.
//! Pure: the engine thread keeps a [`PaceWindow`] over those steps and asks
//! [`Pacing::takes_prompt`] before planning each one.
//!
//! `--step-target-ms` is the pace a streaming reply keeps on average: a token about that
//! often. A step carrying prompt tokens may take longer (`--prompt-step-ms`), and steps of
//! replies only then make up the difference. Why: on a slow CPU a prompt token costs about
//! twice as much in a step of a few tokens as in a chunk of hundreds (a 7B on 2 cores:
//! ~100 ms against ~50 ms). Steps short enough to give the streaming chat a token every
//! 500 ms read a newcomer's 2000-token prompt at 2.4-3.7x llama-server's time; steps of a
//! few seconds beside 130-170 ms reply steps keep the same average pace and read it in
//! 1.6x, or 1.0x with `--repack off` (measured figures in benches/RESULTS.md, "Pacing").
//! The reply still gets its tokens at the same rate, in bursts instead of one by one,
//! which streaming by Telegram edits hardly shows.
//!
//! The rule: over the window (the steps since replies and a prompt began to share the
//! engine), a step takes prompt tokens while the replies are on pace (`steps × target ≥
//! time spent`), and replies only otherwise. The window's first step takes prompt tokens;
//! when a reply step alone is as slow as the target, every step does (the pace cannot
//! be kept by waiting, and the prompt must move on), and the step budget then gives the
//! prompt its floor, as without pacing.

use std::time::{Duration, Instant};

/// `--prompt-step-ms 0` (auto): a step with prompt tokens may take this many reply
/// steps' time. Measured on a 7B on 2 cores (benches/RESULTS.md, "Pacing"): a prompt token
/// costs ~100 ms in a step of 4, ~47 ms in one of 70 (3.4 s) and less in one of ~150
/// (6.5-7.5 s), against ~30 ms in a 512-token chunk with `--repack off`; steps of 20
/// reply steps read a 2000-token prompt beside a streaming chat in 1.08-1.15 ×
/// llama-server's time, steps of ~40 in 1.00 ×. 40 reply steps is also a pause of about a
/// fifteenth of what llama-server's single step for that prompt freezes a streaming chat
/// (the test model's target: a tenth). On a small model the step target is longer.
pub const AUTO_PROMPT_STEP_REPLIES: f64 = 40.0;

/// The pacing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// The average time between two tokens of a streaming reply, in milliseconds
    /// (`--step-target-ms`).
    pub target_ms: f64,
    /// What a step carrying prompt tokens may take, in milliseconds (`--prompt-step-ms`);
    /// `None`: the larger of the target and [`AUTO_PROMPT_STEP_REPLIES`] reply steps.
    pub prompt_step_ms: Option<f64>,
}

/// The steps since replies and a prompt began to share the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PaceWindow {
    steps: u64,
    elapsed_ms: f64,
    /// When the window's last step ended.
    last_end: Option<Instant>,
}

impl PaceWindow {
    /// A step of the window ran from `started` to `ended`. The replies' wait for it counts
    /// from the end of the window's previous step, so the engine's work between steps
    /// (admitting, parking) counts against their pace too.
    pub fn record_step(&mut self, started: Instant, ended: Instant) {
        let waited = ended.saturating_duration_since(self.last_end.unwrap_or(started));
        self.last_end = Some(ended);
        self.record(waited);
    }

    /// The replies waited `elapsed` for a step of the window (every step decodes a token
    /// of each reply).
    fn record(&mut self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1e3;
        if ms.is_finite() {
            self.steps += 1;
            self.elapsed_ms += ms;
        }
    }
}

impl Pacing {
    /// What a step carrying prompt tokens beside replies should take, in milliseconds,
    /// given the measured time of a step of replies only.
    pub fn prompt_step_ms(&self, decode_ms: Option<f64>) -> f64 {
        match (self.prompt_step_ms, decode_ms) {
            (Some(ms), _) => ms,
            (None, Some(decode)) if decode < self.target_ms => {
                self.target_ms.max(AUTO_PROMPT_STEP_REPLIES * decode)
            }
            (None, _) => self.target_ms,
        }
    }

    /// Whether the next step of `window` takes prompt tokens beside the replies.
    pub fn takes_prompt(&self, window: &PaceWindow, decode_ms: Option<f64>) -> bool {
        if window.steps == 0 {
            return true;
        }
        match decode_ms {
            // One step of replies only measures it.
            None => false,
            Some(decode) if decode >= self.target_ms => true,
            Some(_) => window.steps as f64 * self.target_ms >= window.elapsed_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::engine::step_budget::{StepBudget, StepTimings};

    fn ms(value: f64) -> Duration {
        Duration::from_secs_f64(value / 1e3)
    }

    /// What a run of `steps` steps did on a machine whose steps cost `decode` ms plus
    /// `prompt(n)` ms for `n` prompt tokens, with a prompt longer than the run.
    #[derive(Debug)]
    struct Run {
        elapsed_ms: f64,
        prompt_tokens: usize,
        /// The longest run of consecutive steps without prompt tokens.
        longest_reply_only: usize,
    }

    fn run(pacing: Pacing, decode: f64, prompt: impl Fn(usize) -> f64, steps: usize) -> Run {
        let mut timings = StepTimings::default();
        timings.record(1, 0, ms(decode));
        let mut window = PaceWindow::default();
        let (mut elapsed_ms, mut prompt_tokens) = (0.0, 0);
        let (mut reply_only, mut longest_reply_only) = (0, 0);
        for _ in 0..steps {
            let chunk = if pacing.takes_prompt(&window, timings.decode_ms()) {
                StepBudget {
                    target_ms: pacing.prompt_step_ms(timings.decode_ms()),
                    initial: 64,
                }
                .prompt_chunk(&timings, 511)
            } else {
                0
            };
            reply_only = if chunk == 0 { reply_only + 1 } else { 0 };
            longest_reply_only = longest_reply_only.max(reply_only);
            let step = decode + prompt(chunk);
            timings.record(1, chunk, ms(step));
            window.record(ms(step));
            elapsed_ms += step;
            prompt_tokens += chunk;
        }
        Run {
            elapsed_ms,
            prompt_tokens,
            longest_reply_only,
        }
    }

    #[test]
    fn a_7b_shape_reads_in_long_steps_and_keeps_the_pace_with_reply_steps() {
        let pacing = Pacing {
            target_ms: 500.0,
            prompt_step_ms: None,
        };
        // ~130 ms a reply step; prompt tokens as measured: ~100 ms each in a step of 4,
        // ~51 in one of 64, 48.5 in one of 512.
        let prompt = |n: usize| if n == 0 { 0.0 } else { 200.0 + 48.0 * n as f64 };
        let paced = run(pacing, 130.0, prompt, 400);
        assert!(paced.elapsed_ms / 400.0 <= 500.0 * 1.02, "{paced:?}");
        // 13 after each 5.2 s step.
        assert!(paced.longest_reply_only <= 13, "{paced:?}");
        let unpaced = run(
            Pacing {
                target_ms: 500.0,
                prompt_step_ms: Some(500.0),
            },
            130.0,
            prompt,
            400,
        );
        let rate = |run: &Run| run.prompt_tokens as f64 / run.elapsed_ms;
        assert!(rate(&paced) > 2.0 * rate(&unpaced), "{paced:?} {unpaced:?}");
    }

    #[test]
    fn a_small_model_keeps_its_step_target_and_takes_prompt_every_step() {
        let pacing = Pacing {
            target_ms: 500.0,
            prompt_step_ms: None,
        };
        assert_eq!(pacing.prompt_step_ms(Some(8.0)), 500.0);
        assert_eq!(pacing.prompt_step_ms(Some(130.0)), 5200.0);
        let run = run(pacing, 8.0, |n| 3.0 * n as f64, 200);
        assert!(run.longest_reply_only <= 1, "{run:?}");
    }

    #[test]
    fn replies_slower_than_the_target_never_hold_the_prompt_back() {
        let pacing = Pacing {
            target_ms: 500.0,
            prompt_step_ms: None,
        };
        assert_eq!(pacing.prompt_step_ms(Some(900.0)), 500.0);
        let run = run(pacing, 900.0, |n| 50.0 * n as f64, 50);
        assert_eq!(run.longest_reply_only, 0, "{run:?}");
        assert_eq!(
            run.prompt_tokens,
            64 + 49,
            "the initial chunk, then the floor, as without pacing"
        );
    }

    #[test]
    fn the_first_step_of_a_window_takes_prompt_and_an_unmeasured_reply_step_is_measured() {
        let pacing = Pacing {
            target_ms: 500.0,
            prompt_step_ms: Some(3000.0),
        };
        let mut window = PaceWindow::default();
        assert!(pacing.takes_prompt(&window, None));
        window.record(ms(3000.0));
        assert!(!pacing.takes_prompt(&window, None));
        assert!(!pacing.takes_prompt(&window, Some(130.0)));
    }

    #[test]
    fn a_step_waits_from_the_end_of_the_one_before_it() {
        let t0 = Instant::now();
        let mut window = PaceWindow::default();
        window.record_step(t0, t0 + ms(100.0));
        // 50 ms of work between the steps count too.
        window.record_step(t0 + ms(150.0), t0 + ms(250.0));
        assert_eq!(window.steps, 2);
        assert!((window.elapsed_ms - 250.0).abs() < 1e-6, "{window:?}");
    }

    proptest! {
        /// Whenever a reply step is faster than the target: the replies keep the target's
        /// pace on average (within one long step over the run), and the prompt moves on
        /// at least every so many steps.
        #[test]
        fn the_replies_keep_the_pace_and_the_prompt_moves_on(
            decode in 1.0f64..400.0, per_token in 0.5f64..100.0, target in 1.0f64..2000.0,
            prompt_step in proptest::option::of(1.0f64..10_000.0), steps in 50usize..400,
        ) {
            prop_assume!(decode < target * 0.95);
            let pacing = Pacing { target_ms: target, prompt_step_ms: prompt_step };
            let run = run(pacing, decode, |n| per_token * n as f64, steps);
            let longest_step = decode
                + per_token * 511f64.min((pacing.prompt_step_ms(Some(decode)) / per_token).ceil() + 64.0);
            prop_assert!(run.elapsed_ms <= steps as f64 * target + longest_step,
                "{run:?} against {target} ms a step");
            prop_assert!(run.prompt_tokens > 0);
            let bound = (longest_step / (target - decode)).ceil() as usize + 1;
            prop_assert!(run.longest_reply_only <= bound, "{run:?}, bound {bound}");
        }
    }
}
