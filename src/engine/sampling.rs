//! The sampler chain of a request, as a list of steps, and log-probabilities from a logits
//! row. Pure: `llama.rs` turns the steps into llama.cpp samplers.
//!
//! The order is llama-server's (`common_sampler_init` in llama.cpp's `common/sampling.cpp`
//! with the default `common_params_sampling::samplers` of `common/common.h`): logit bias →
//! penalties → top-k → top-p → min-p → temperature → a seeded draw (llama.cpp's DRY, typical,
//! XTC and top-n-sigma steps sit in between and are off by default; they are not offered).
//! A grammar, when the request has one, filters the candidates first, so every later step
//! works on tokens the grammar allows. At temperature 0 the draw is greedy.

use crate::chat::GenerateParams;

/// Tokens the repetition penalties look back over (llama-server's `penalty_last_n`).
pub const PENALTY_LAST_N: i32 = 64;

/// Most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// One step of a sampler chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Only tokens a GBNF grammar (root rule `root`) allows.
    Grammar(String),
    /// Add a bias to these tokens' logits.
    LogitBias(Vec<(i32, f32)>),
    /// Repetition penalties over the last [`PENALTY_LAST_N`] tokens.
    Penalties {
        /// Divides logits of repeated tokens (1 = off).
        repeat: f32,
        /// Times the count is subtracted (0 = off).
        frequency: f32,
        /// Subtracted once per seen token (0 = off).
        presence: f32,
    },
    /// Keep the k most likely.
    TopK(i32),
    /// Keep the smallest set reaching this mass.
    TopP(f32),
    /// Drop tokens below this fraction of the most likely one's probability.
    MinP(f32),
    /// Scale the logits.
    Temperature(f32),
    /// Draw from the distribution with this seed.
    Dist(u32),
    /// Take the most likely token.
    Greedy,
}

/// The chain for `params`, drawing with `seed`, constrained by `grammar` if given.
/// `n_vocab` bounds the logit-bias token ids (others are ignored, as llama-server does).
pub fn chain(params: &GenerateParams, seed: u32, grammar: Option<&str>, n_vocab: i32) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(grammar) = grammar {
        steps.push(Step::Grammar(grammar.to_string()));
    }
    let bias: Vec<(i32, f32)> = params
        .logit_bias
        .iter()
        .copied()
        .filter(|&(token, bias)| (0..n_vocab).contains(&token) && bias.is_finite())
        .collect();
    if !bias.is_empty() {
        steps.push(Step::LogitBias(bias));
    }
    if params.repeat_penalty != 1.0
        || params.frequency_penalty != 0.0
        || params.presence_penalty != 0.0
    {
        steps.push(Step::Penalties {
            repeat: params.repeat_penalty,
            frequency: params.frequency_penalty,
            presence: params.presence_penalty,
        });
    }
    if params.temperature <= 0.0 {
        steps.push(Step::Greedy);
        return steps;
    }
    if params.top_k > 0 {
        steps.push(Step::TopK(i32::try_from(params.top_k).unwrap_or(i32::MAX)));
    }
    if params.top_p < 1.0 {
        steps.push(Step::TopP(params.top_p));
    }
    if params.min_p > 0.0 {
        steps.push(Step::MinP(params.min_p));
    }
    steps.push(Step::Temperature(params.temperature));
    steps.push(Step::Dist(seed));
    steps
}

/// The log-probability of `chosen` and the `top` most likely tokens (most likely first,
/// ties by lower id) under the softmax of `logits`. `None` if `chosen` is not a row index
/// or the row holds no finite logit.
pub fn logprobs(logits: &[f32], chosen: i32, top: usize) -> Option<(f32, Vec<(i32, f32)>)> {
    let chosen_logit = *logits.get(usize::try_from(chosen).ok()?)?;
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_z).min(0.0) as f32;
    let mut best: Vec<(i32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            if best.len() == top && best.last().is_some_and(|&(_, worst)| l <= worst) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i32::try_from(id).unwrap_or(i32::MAX), l));
            best.truncate(top);
        }
    }
    let top = best.into_iter().map(|(id, l)| (id, logprob(l))).collect();
    let chosen = if chosen_logit.is_finite() {
        logprob(chosen_logit)
    } else {
        f32::NEG_INFINITY
    };
    Some((chosen, top))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_default_chain_is_llama_servers() {
        let params = GenerateParams {
            temperature: 0.7,
            top_p: 0.95,
            repeat_penalty: 1.1,
            logit_bias: vec![(5, -100.0), (1_000_000, 3.0)],
            ..GenerateParams::default()
        };
        assert_eq!(
            chain(&params, 9, Some("root ::= \"a\""), 100),
            vec![
                Step::Grammar("root ::= \"a\"".into()),
                Step::LogitBias(vec![(5, -100.0)]),
                Step::Penalties {
                    repeat: 1.1,
                    frequency: 0.0,
                    presence: 0.0
                },
                Step::TopK(40),
                Step::TopP(0.95),
                Step::MinP(0.05),
                Step::Temperature(0.7),
                Step::Dist(9),
            ]
        );
    }

    #[test]
    fn temperature_zero_is_greedy_after_bias_and_penalties() {
        let params = GenerateParams {
            presence_penalty: 0.5,
            logit_bias: vec![(1, -100.0)],
            ..GenerateParams::greedy(10)
        };
        let steps = chain(&params, 1, None, 10);
        assert!(matches!(steps[0], Step::LogitBias(_)));
        assert!(matches!(steps[1], Step::Penalties { .. }));
        assert_eq!(steps[2..], [Step::Greedy]);
    }

    #[test]
    fn logprobs_of_a_known_row() {
        let (chosen, top) = logprobs(&[0.0, 0.0, f32::NEG_INFINITY, 1.0f32.ln()], 3, 2).unwrap();
        assert!((chosen - (1.0f32 / 3.0).ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1]);
        assert!(logprobs(&[1.0], 5, 1).is_none());
        assert!(logprobs(&[f32::NEG_INFINITY], 0, 1).is_none());
    }

    proptest! {
        /// Log-probabilities are ≤ 0, their probabilities sum to at most 1, the top list is
        /// sorted, as long as asked (or the row's finite logits), and agrees with the
        /// chosen token's own value.
        #[test]
        fn logprobs_are_a_distribution(
            logits in proptest::collection::vec(-50.0f32..50.0, 1..200),
            chosen in 0usize..200,
            top in 0usize..25,
        ) {
            let chosen = (chosen % logits.len()) as i32;
            let (own, best) = logprobs(&logits, chosen, top).unwrap();
            prop_assert!(own <= 0.0);
            prop_assert_eq!(best.len(), top.min(logits.len()));
            let mass: f32 = best.iter().map(|t| t.1.exp()).sum();
            prop_assert!(mass <= 1.0 + 1e-4);
            prop_assert!(best.windows(2).all(|w| w[0].1 >= w[1].1));
            if let Some(&(id, lp)) = best.iter().find(|t| t.0 == chosen) {
                prop_assert!((lp - own).abs() < 1e-5, "{id}");
            }
        }
    }
}
