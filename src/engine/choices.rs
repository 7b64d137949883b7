//! Several choices for one prompt (OpenAI's `n`): each choice is a slot of its own that
//! takes the prompt's KV cells from the slot that read it (llama.cpp's `seq_cp`), so the
//! prompt is read once, and samples with a seed stream of its own.
//!
//! This module holds the pure parts: the seeds of the choices ([`choice_seed`]), and the
//! [`Merger`] that turns the choices' own event streams (one channel per slot, as for any
//! request) into the one stream a caller reads, with [`StreamEvent::Choice`] markers, a
//! [`StreamEvent::ChoiceEnd`] per choice and one closing `Done` whose usage counts the
//! prompt once and the completion tokens of every choice (as OpenAI counts them). The
//! engine thread's side (reserving the slots, copying the KV cells, releasing the
//! waiting slots when the reading one fails) is in `worker.rs` and `slot.rs`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::EngineError;
use crate::chat::{Completion, FinishReason, StreamEvent, Timings, Usage};

/// The seed of choice `index` of a request drawing with `seed`. Choice 0 keeps the seed
/// (so `n: 1` and choice 0 of `n: 2` give the same text); the others get well-mixed
/// distinct seeds (SplitMix64 of the pair), so their texts differ while the whole
/// response stays reproducible for a fixed seed.
pub fn choice_seed(seed: u32, index: u32) -> u32 {
    if index == 0 {
        return seed;
    }
    let mut z = (u64::from(seed) << 32 | u64::from(index)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// Merges the events of `n` choices into one reply stream. Pure: events go in with
/// [`accept`](Self::accept), what the caller sees comes out.
#[derive(Debug)]
pub struct Merger {
    /// The choice whose events were passed on last.
    current: u32,
    /// Which choices have ended.
    ended: Vec<bool>,
    /// The prompt's counts (choice 0's) and the sum of completion tokens.
    usage: Usage,
    /// Choice 0's finish reason (the closing `Done`'s).
    first_reason: Option<FinishReason>,
    /// The longest phase of any choice.
    timings: Timings,
}

impl Merger {
    /// A merger of `n` choices.
    pub fn new(n: usize) -> Self {
        Self {
            current: 0,
            ended: vec![false; n.max(1)],
            usage: Usage::default(),
            first_reason: None,
            timings: Timings::default(),
        }
    }

    /// Whether every choice has ended (the closing `Done` was given out).
    pub fn is_done(&self) -> bool {
        self.ended.iter().all(|&e| e)
    }

    /// Whether choice `index` still sends events.
    pub fn is_open(&self, index: usize) -> bool {
        self.ended.get(index).is_some_and(|&e| !e)
    }

    /// The events to pass on for `event` of choice `index`.
    pub fn accept(&mut self, index: u32, event: StreamEvent) -> Vec<StreamEvent> {
        let i = index as usize;
        if !self.is_open(i) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(3);
        let switch_to = |out: &mut Vec<StreamEvent>, current: &mut u32| {
            if *current != index {
                *current = index;
                out.push(StreamEvent::Choice(index));
            }
        };
        match event {
            // The slot that reads the prompt speaks for the request.
            StreamEvent::Started | StreamEvent::Prompt(_) if index == 0 => out.push(event),
            StreamEvent::Started | StreamEvent::Prompt(_) => {}
            StreamEvent::Choice(_) | StreamEvent::ChoiceEnd(_) => {}
            StreamEvent::Delta(ref text) if text.is_empty() => {}
            StreamEvent::Delta(_) | StreamEvent::Logprobs(_) | StreamEvent::ToolCall(_) => {
                switch_to(&mut out, &mut self.current);
                out.push(event);
            }
            StreamEvent::Done(completion) => {
                switch_to(&mut out, &mut self.current);
                out.push(StreamEvent::ChoiceEnd(completion.finish_reason));
                self.ended[i] = true;
                self.add(index, &completion);
                if self.is_done() {
                    out.push(StreamEvent::Done(Completion {
                        finish_reason: self.first_reason.unwrap_or(FinishReason::Stop),
                        usage: self.usage,
                        timings: self.timings,
                    }));
                }
            }
        }
        out
    }

    fn add(&mut self, index: u32, completion: &Completion) {
        if index == 0 {
            self.first_reason = Some(completion.finish_reason);
            let completion_tokens = self.usage.completion_tokens;
            self.usage = completion.usage;
            self.usage.completion_tokens += completion_tokens;
        } else {
            self.usage.completion_tokens += completion.usage.completion_tokens;
        }
        let t = &mut self.timings;
        t.queued = t.queued.max(completion.timings.queued);
        t.prompt = t.prompt.max(completion.timings.prompt);
        t.generation = t.generation.max(completion.timings.generation);
    }
}

/// The receiving side of a request with several choices: one channel per choice, read
/// through a [`Merger`]. Dropping it drops every channel, which cancels every choice.
#[derive(Debug)]
pub(super) struct ChoiceReceivers {
    receivers: Vec<mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>>,
    merger: Merger,
    /// Events given out by the merger, not yet returned.
    ready: VecDeque<StreamEvent>,
    /// Where the next poll starts: the choice last read, so its run of events stays
    /// together while it has more.
    next: usize,
    /// An error or the closing `Done` was returned: nothing follows.
    finished: bool,
}

impl ChoiceReceivers {
    /// Reads `receivers` (choice `i` on receiver `i`).
    pub(super) fn new(
        receivers: Vec<mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>>,
    ) -> Self {
        let merger = Merger::new(receivers.len());
        Self {
            receivers,
            merger,
            ready: VecDeque::new(),
            next: 0,
            finished: false,
        }
    }

    /// The next merged event (as `Stream::poll_next`).
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<StreamEvent, EngineError>>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if matches!(event, StreamEvent::Done(_)) {
                    self.finished = true;
                }
                return Poll::Ready(Some(Ok(event)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            let n = self.receivers.len();
            let mut progressed = false;
            for k in 0..n {
                let i = (self.next + k) % n;
                if !self.merger.is_open(i) {
                    continue;
                }
                let Some(rx) = self.receivers.get_mut(i) else {
                    continue;
                };
                match Pin::new(rx).poll_recv(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Some(Ok(event))) => {
                        self.next = i;
                        self.ready.extend(self.merger.accept(i as u32, event));
                        progressed = true;
                        break;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        self.finished = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                    // A choice's channel closed before its `Done`: the engine is gone.
                    Poll::Ready(None) => {
                        self.finished = true;
                        return Poll::Ready(Some(Err(EngineError::Stopped)));
                    }
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn done(reason: FinishReason, completion_tokens: u32) -> StreamEvent {
        StreamEvent::Done(Completion {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: 10,
                cached_tokens: 2,
                processed_tokens: 8,
                completion_tokens,
            },
            timings: Timings {
                generation: Duration::from_millis(u64::from(completion_tokens)),
                ..Timings::default()
            },
        })
    }

    #[test]
    fn choice_zero_keeps_the_seed_and_the_others_differ() {
        assert_eq!(choice_seed(42, 0), 42);
        let seeds: HashSet<u32> = (0..128).map(|i| choice_seed(42, i)).collect();
        assert_eq!(seeds.len(), 128);
        assert_eq!(choice_seed(7, 3), choice_seed(7, 3));
        assert_ne!(choice_seed(7, 3), choice_seed(8, 3));
    }

    #[test]
    fn markers_come_only_when_the_choice_changes_and_usage_counts_the_prompt_once() {
        let mut m = Merger::new(2);
        let mut out = Vec::new();
        out.extend(m.accept(0, StreamEvent::Started));
        out.extend(m.accept(1, StreamEvent::Started));
        out.extend(m.accept(0, StreamEvent::Delta("a".into())));
        out.extend(m.accept(0, StreamEvent::Delta("b".into())));
        out.extend(m.accept(1, StreamEvent::Delta("c".into())));
        out.extend(m.accept(1, done(FinishReason::Length, 3)));
        assert!(!m.is_done());
        out.extend(m.accept(0, done(FinishReason::Stop, 2)));
        assert!(m.is_done());
        assert_eq!(
            out[..6],
            [
                StreamEvent::Started,
                StreamEvent::Delta("a".into()),
                StreamEvent::Delta("b".into()),
                StreamEvent::Choice(1),
                StreamEvent::Delta("c".into()),
                StreamEvent::ChoiceEnd(FinishReason::Length),
            ]
        );
        assert_eq!(
            out[6..8],
            [
                StreamEvent::Choice(0),
                StreamEvent::ChoiceEnd(FinishReason::Stop)
            ]
        );
        let StreamEvent::Done(total) = &out[8] else {
            panic!("{out:?}")
        };
        assert_eq!(total.finish_reason, FinishReason::Stop);
        assert_eq!(
            total.usage,
            Usage {
                prompt_tokens: 10,
                cached_tokens: 2,
                processed_tokens: 8,
                completion_tokens: 5
            }
        );
        assert_eq!(total.timings.generation, Duration::from_millis(3));
        // Nothing after a choice's end.
        assert!(m.accept(1, StreamEvent::Delta("late".into())).is_empty());
    }

    #[tokio::test]
    async fn receivers_merge_and_an_early_close_is_stopped() {
        use futures::StreamExt;
        struct S(ChoiceReceivers);
        impl futures::Stream for S {
            type Item = Result<StreamEvent, EngineError>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                self.0.poll_next(cx)
            }
        }
        let (a_tx, a_rx) = mpsc::unbounded_channel();
        let (b_tx, b_rx) = mpsc::unbounded_channel();
        a_tx.send(Ok(StreamEvent::Delta("x".into()))).unwrap();
        b_tx.send(Ok(StreamEvent::Delta("y".into()))).unwrap();
        b_tx.send(Ok(done(FinishReason::Stop, 1))).unwrap();
        a_tx.send(Ok(done(FinishReason::Stop, 1))).unwrap();
        let events: Vec<_> = S(ChoiceReceivers::new(vec![a_rx, b_rx])).collect().await;
        let ends = events
            .iter()
            .filter(|e| matches!(e, Ok(StreamEvent::ChoiceEnd(_))))
            .count();
        assert_eq!(ends, 2);
        assert!(matches!(events.last(), Some(Ok(StreamEvent::Done(_)))));

        let (a_tx, a_rx) = mpsc::unbounded_channel();
        let (b_tx, b_rx) = mpsc::unbounded_channel();
        a_tx.send(Ok(done(FinishReason::Stop, 1))).unwrap();
        drop(b_tx);
        let events: Vec<_> = S(ChoiceReceivers::new(vec![a_rx, b_rx])).collect().await;
        assert_eq!(events.last(), Some(&Err(EngineError::Stopped)));
    }

    proptest! {
        /// Whatever the interleaving, each choice's text comes out whole under its own
        /// marker, every choice ends once, and `Done` comes last with the summed tokens.
        #[test]
        fn any_interleaving_keeps_each_choice_apart(
            order in proptest::collection::vec(0u32..3, 0..40),
        ) {
            let n = 3;
            let mut m = Merger::new(n);
            let mut sent = vec![String::new(); n];
            let mut out = Vec::new();
            for (k, &i) in order.iter().enumerate() {
                let piece = format!("{k},");
                sent[i as usize].push_str(&piece);
                out.extend(m.accept(i, StreamEvent::Delta(piece)));
            }
            for i in (0..n as u32).rev() {
                out.extend(m.accept(i, done(FinishReason::Stop, i + 1)));
            }
            let mut got = vec![String::new(); n];
            let mut current = 0usize;
            let mut ends = 0;
            for (k, event) in out.iter().enumerate() {
                match event {
                    StreamEvent::Choice(i) => current = *i as usize,
                    StreamEvent::Delta(t) => got[current].push_str(t),
                    StreamEvent::ChoiceEnd(_) => ends += 1,
                    StreamEvent::Done(c) => {
                        prop_assert_eq!(k, out.len() - 1);
                        prop_assert_eq!(c.usage.completion_tokens, 6);
                        prop_assert_eq!(c.usage.prompt_tokens, 10);
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
            }
            prop_assert_eq!(got, sent);
            prop_assert_eq!(ends, n);
        }
    }
}
