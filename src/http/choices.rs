//! The choices of a completion (OpenAI's `n`) as the response builders of `chat.rs` see
//! them: a reply stream with several choices marks each one's events
//! ([`StreamEvent::Choice`]) and ends each with [`StreamEvent::ChoiceEnd`]; a stream
//! without markers is choice 0 alone. [`Collected`] gathers a whole completion's choices;
//! [`Tracker`] follows which choice a streamed event belongs to and holds each choice's
//! log-probabilities until the text they describe. Pure.

use crate::chat::{Completion, FinishReason, StreamEvent, TokenLogprob, ToolCall};

/// Choice indices at or above this are ignored (their events stay with the choice
/// before): the most a request may ask for is 128, and a provider that answers with
/// another index must not make the builders allocate for it.
const MAX_CHOICES: u32 = 128;

/// One choice of a whole completion.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Choice {
    /// Its text.
    pub text: String,
    /// Its tokens' log-probabilities (when asked for).
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended (from its `ChoiceEnd`, or the closing `Done` for a single choice).
    pub finish: Option<FinishReason>,
    /// Its calls of the request's tools.
    pub calls: Vec<ToolCall>,
}

/// The choices of a whole completion, gathered from its events.
#[derive(Debug, Default)]
pub struct Collected {
    /// The choices, by index.
    pub choices: Vec<Choice>,
    /// The closing record (total usage), once seen.
    pub completion: Option<Completion>,
    current: usize,
}

impl Collected {
    /// Takes one event; true once the closing `Done` came (nothing follows it).
    pub fn push(&mut self, event: StreamEvent) -> bool {
        if self.choices.is_empty() {
            self.choices.push(Choice::default());
        }
        match event {
            StreamEvent::Choice(i) if i >= MAX_CHOICES => {}
            StreamEvent::Choice(i) => {
                self.current = i as usize;
                if self.choices.len() <= self.current {
                    self.choices.resize_with(self.current + 1, Choice::default);
                }
            }
            StreamEvent::Delta(text) => self.choices[self.current].text.push_str(&text),
            StreamEvent::ToolCall(call) => self.choices[self.current].calls.push(call),
            StreamEvent::Logprobs(tokens) => self.choices[self.current].logprobs.extend(tokens),
            StreamEvent::ChoiceEnd(reason) => self.choices[self.current].finish = Some(reason),
            StreamEvent::Done(completion) => {
                let first = &mut self.choices[0];
                first.finish.get_or_insert(completion.finish_reason);
                self.completion = Some(completion);
                return true;
            }
            StreamEvent::Started | StreamEvent::Prompt(_) => {}
        }
        false
    }
}

/// Which choice the streamed events belong to, and each choice's log-probabilities
/// waiting for their text.
#[derive(Debug, Default)]
pub struct Tracker {
    current: u32,
    pending: Vec<Vec<TokenLogprob>>,
    /// Tool calls streamed so far, by choice.
    calls: Vec<usize>,
}

impl Tracker {
    /// The choice of the events now.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// The events that follow belong to choice `index`.
    pub fn switch(&mut self, index: u32) {
        if index < MAX_CHOICES {
            self.current = index;
        }
    }

    /// Holds log-probabilities of the current choice until its next text.
    pub fn hold(&mut self, tokens: Vec<TokenLogprob>) {
        let i = self.current as usize;
        if self.pending.len() <= i {
            self.pending.resize_with(i + 1, Vec::new);
        }
        self.pending[i].extend(tokens);
    }

    /// The index of the current choice's next tool call (counting it).
    pub fn next_call(&mut self) -> usize {
        let i = self.current as usize;
        if self.calls.len() <= i {
            self.calls.resize(i + 1, 0);
        }
        self.calls[i] += 1;
        self.calls[i] - 1
    }

    /// Whether the current choice called tools.
    pub fn called(&self) -> bool {
        self.calls
            .get(self.current as usize)
            .is_some_and(|&n| n > 0)
    }

    /// The current choice's held log-probabilities.
    pub fn take(&mut self) -> Vec<TokenLogprob> {
        self.pending
            .get_mut(self.current as usize)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Timings, Usage};

    fn logprob(token: &str) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            logprob: -1.0,
            bytes: token.as_bytes().to_vec(),
            top_logprobs: Vec::new(),
        }
    }

    fn done(reason: FinishReason) -> StreamEvent {
        StreamEvent::Done(Completion {
            finish_reason: reason,
            usage: Usage::default(),
            timings: Timings::default(),
        })
    }

    #[test]
    fn a_stream_without_markers_is_choice_zero() {
        let mut c = Collected::default();
        assert!(!c.push(StreamEvent::Delta("Hi".into())));
        assert!(c.push(done(FinishReason::Length)));
        assert_eq!(c.choices.len(), 1);
        assert_eq!(c.choices[0].text, "Hi");
        assert_eq!(c.choices[0].finish, Some(FinishReason::Length));
    }

    #[test]
    fn marked_choices_are_gathered_apart_with_their_own_ends() {
        let mut c = Collected::default();
        for event in [
            StreamEvent::Logprobs(vec![logprob("a")]),
            StreamEvent::Delta("a".into()),
            StreamEvent::Choice(1),
            StreamEvent::Delta("b".into()),
            StreamEvent::ChoiceEnd(FinishReason::Length),
            StreamEvent::Choice(0),
            StreamEvent::ChoiceEnd(FinishReason::Stop),
        ] {
            assert!(!c.push(event));
        }
        assert!(!c.push(StreamEvent::Choice(u32::MAX)));
        assert!(c.push(done(FinishReason::Stop)));
        assert_eq!(c.choices.len(), 2);
        assert_eq!(c.choices[0].text, "a");
        assert_eq!(c.choices[0].logprobs.len(), 1);
        assert_eq!(c.choices[1].text, "b");
        assert_eq!(c.choices[1].finish, Some(FinishReason::Length));
        assert_eq!(c.choices[0].finish, Some(FinishReason::Stop));
    }

    #[test]
    fn held_logprobs_stay_with_their_choice() {
        let mut t = Tracker::default();
        t.hold(vec![logprob("x")]);
        t.switch(2);
        t.hold(vec![logprob("y")]);
        assert_eq!(t.take()[0].token, "y");
        assert!(t.take().is_empty());
        t.switch(0);
        assert_eq!(t.current(), 0);
        assert_eq!(t.take()[0].token, "x");
    }
}
