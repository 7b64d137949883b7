//! A cloud answer's choices (OpenAI `choices[].index`, Gemini `candidates[].index`) as
//! the chain's events: with one choice asked for, text and log-probabilities as they
//! come and one `Done`; with several ([`GenerateParams::n`](crate::chat::GenerateParams)),
//! each choice's events marked ([`StreamEvent::Choice`]) and ended
//! ([`StreamEvent::ChoiceEnd`]). An index outside what was asked for, or an answer that
//! ends with a choice missing, is a malformed answer: never fewer choices than asked for
//! without saying so. Pure.

use super::ProviderError;
use crate::chat::{Completion, FinishReason, StreamEvent, Timings, TokenLogprob, ToolCall, Usage};

/// One piece of one choice, as an API sent it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Piece {
    /// The choice's index (0 when the API leaves it out).
    pub index: u32,
    /// Text.
    pub text: String,
    /// Log-probabilities of the tokens of `text`.
    pub logprobs: Vec<TokenLogprob>,
    /// Why the choice ended, if it did here.
    pub finish: Option<FinishReason>,
    /// Whole tool calls, after the text.
    pub tool_calls: Vec<ToolCall>,
}

/// Reads the pieces of an answer with `n` choices.
#[derive(Debug)]
pub struct ChoiceReader {
    n: u32,
    current: u32,
    /// Each choice's finish reason, once seen.
    finish: Vec<Option<FinishReason>>,
    /// Which choices sent anything.
    seen: Vec<bool>,
}

impl ChoiceReader {
    /// A reader of `n` choices (at least 1).
    pub fn new(n: u32) -> Self {
        let n = n.max(1);
        Self {
            n,
            current: 0,
            finish: vec![None; n as usize],
            seen: vec![false; n as usize],
        }
    }

    /// Whether any choice has ended (a stream closed after that was not cut off).
    pub fn any_finished(&self) -> bool {
        self.finish.iter().any(Option::is_some)
    }

    /// The events of `piece`.
    pub fn piece(&mut self, piece: Piece) -> Result<Vec<StreamEvent>, ProviderError> {
        // One choice asked for: whatever index the server sends is that choice.
        let index = if self.n == 1 { 0 } else { piece.index };
        let i = index as usize;
        if index >= self.n {
            return Err(ProviderError::Malformed(format!(
                "choice index {index} in an answer of {} choices",
                self.n
            )));
        }
        let mut out = Vec::new();
        if self.n > 1 && self.finish[i].is_some() {
            return Ok(out); // nothing of a choice after its end
        }
        self.seen[i] = true;
        if self.n > 1 && index != self.current {
            self.current = index;
            out.push(StreamEvent::Choice(index));
        }
        if !piece.logprobs.is_empty() {
            out.push(StreamEvent::Logprobs(piece.logprobs));
        }
        if !piece.text.is_empty() {
            out.push(StreamEvent::Delta(piece.text));
        }
        out.extend(piece.tool_calls.into_iter().map(StreamEvent::ToolCall));
        if let Some(reason) = piece.finish {
            self.finish[i] = Some(reason);
            if self.n > 1 {
                out.push(StreamEvent::ChoiceEnd(reason));
            }
        }
        Ok(out)
    }

    /// The closing events, with `usage`: for several choices, an end for each one that
    /// sent no finish reason, then `Done`. An error if a choice never came.
    pub fn done(&mut self, usage: Usage) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        if self.n > 1 {
            let answered = self.seen.iter().filter(|&&s| s).count();
            if answered < self.n as usize {
                return Err(ProviderError::Malformed(format!(
                    "answered {answered} of the {} choices asked for",
                    self.n
                )));
            }
            for index in 0..self.n {
                if self.finish[index as usize].is_none() {
                    self.finish[index as usize] = Some(FinishReason::Stop);
                    if index != self.current {
                        self.current = index;
                        out.push(StreamEvent::Choice(index));
                    }
                    out.push(StreamEvent::ChoiceEnd(FinishReason::Stop));
                }
            }
        }
        out.push(StreamEvent::Done(Completion {
            finish_reason: self.finish[0].unwrap_or(FinishReason::Stop),
            usage,
            timings: Timings::default(),
        }));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text(index: u32, text: &str, finish: Option<FinishReason>) -> Piece {
        Piece {
            index,
            text: text.into(),
            finish,
            ..Piece::default()
        }
    }

    #[test]
    fn one_choice_ignores_the_index_and_ends_with_its_reason() {
        let mut r = ChoiceReader::new(1);
        let events = r.piece(text(3, "Hi", Some(FinishReason::Length))).unwrap();
        assert_eq!(events, [StreamEvent::Delta("Hi".into())]);
        assert!(r.any_finished());
        let done = r.done(Usage::default()).unwrap();
        assert!(matches!(
            done[..],
            [StreamEvent::Done(Completion {
                finish_reason: FinishReason::Length,
                ..
            })]
        ));
    }

    #[test]
    fn several_choices_are_marked_and_a_missing_one_is_an_error() {
        let mut r = ChoiceReader::new(2);
        assert_eq!(
            r.piece(text(1, "b", Some(FinishReason::Stop))).unwrap(),
            [
                StreamEvent::Choice(1),
                StreamEvent::Delta("b".into()),
                StreamEvent::ChoiceEnd(FinishReason::Stop)
            ]
        );
        assert!(r.piece(text(2, "x", None)).is_err());
        assert!(r.clone_missing().done(Usage::default()).is_err());
        assert_eq!(
            r.piece(text(0, "a", None)).unwrap(),
            [StreamEvent::Choice(0), StreamEvent::Delta("a".into())]
        );
        // Choice 0 sent no finish reason: it ends with the answer.
        let done = r.done(Usage::default()).unwrap();
        assert_eq!(done[0], StreamEvent::ChoiceEnd(FinishReason::Stop));
        assert!(matches!(done[1], StreamEvent::Done(_)));
    }

    impl ChoiceReader {
        fn clone_missing(&self) -> Self {
            Self {
                n: self.n,
                current: self.current,
                finish: self.finish.clone(),
                seen: self.seen.clone(),
            }
        }
    }

    proptest! {
        /// Any order of pieces: each choice's text comes out whole under its own index,
        /// every choice ends exactly once, `Done` last.
        #[test]
        fn any_order_keeps_choices_apart(order in proptest::collection::vec(0u32..3, 3..30)) {
            let mut r = ChoiceReader::new(3);
            let mut sent = vec![String::new(); 3];
            let mut events = Vec::new();
            for i in 0..3 {
                events.extend(r.piece(text(i, "", None)).unwrap());
            }
            for (k, &i) in order.iter().enumerate() {
                let t = format!("{k},");
                sent[i as usize].push_str(&t);
                events.extend(r.piece(text(i, &t, None)).unwrap());
            }
            events.extend(r.done(Usage::default()).unwrap());
            let mut got = vec![String::new(); 3];
            let mut ends = vec![0; 3];
            let mut current = 0;
            for e in &events {
                match e {
                    StreamEvent::Choice(i) => current = *i as usize,
                    StreamEvent::Delta(t) => got[current].push_str(t),
                    StreamEvent::ChoiceEnd(_) => ends[current] += 1,
                    StreamEvent::Done(_) => {}
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            prop_assert_eq!(got, sent);
            prop_assert_eq!(ends, vec![1, 1, 1]);
            prop_assert!(matches!(events.last(), Some(StreamEvent::Done(_))));
        }
    }
}
