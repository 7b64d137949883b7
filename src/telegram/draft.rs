//! Draft streaming: in a private chat the answer is streamed with `sendMessageDraft`
//! (Bot API 9.3+; every bot since 9.5), an animated preview that is not a message — no
//! "edited" mark, no edit flood limits — and then delivered with `sendMessage` exactly as
//! the final edit of edit streaming delivers it: formatted HTML (plain text if Telegram
//! cannot parse it), split past 4096 characters, retried until delivered, refused for good
//! or the deadline.
//!
//! # No duplicate at the hand-over
//! A draft is ephemeral: clients drop it when the bot's next message arrives in the chat
//! (or after 30 s). The partial text is therefore never turned into a message: the only
//! `sendMessage` of a part is its final text, sent once the part is complete (the split
//! point is reached, the answer ends, or `/stop`). No draft call follows the final message
//! of a part (the next part streams under a new draft id), so a late draft can never
//! show beside the message it became.
//!
//! # The stop button
//! Each draft shows Telegram's stop button (`can_stop`, Bot API 10.3). Its press arrives as
//! a `stopped_message_generation` update naming the draft id; the draft ids of an answer
//! encode its question's message id ([`is_draft_of`]), so the press stops that answer as
//! `/stop` does — and only that one — and what was written is delivered. `keep_on_stop`
//! keeps the draft on screen until that message replaces it.
//!
//! # Pacing and flood control
//! Drafts are paced like edits (about one a second, per chat, only when the text changed);
//! a `retry_after` on a draft delays the next draft and the final message of this chat only.
//!
//! # Where drafts are not available
//! Groups and forum topics in groups keep edit streaming ([`super::stream`]). A Bot API
//! server that refuses the method (an older self-hosted one: 404; or a 400) makes this chat
//! fall back to edit streaming at once — the text so far is handed over, nothing is lost —
//! and the chat is remembered, so its next answers go straight to edits.
//! `--telegram-streaming edit` uses edits everywhere; `off` shows "typing…" until the whole
//! answer is ready and then sends it.

use std::collections::HashSet;
use std::sync::Mutex;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::api::{ApiCallError, Target, TelegramApi};
use super::stream::{self, Current, Delivered, DeliveryError, Pacing, TypingGuard};
use crate::chat::StreamEvent;
use crate::chat_policy::Streaming;

/// Chats remembered as lacking drafts, at most (then the memory starts over).
const MAX_REMEMBERED: usize = 10_000;

/// Which chats stream how.
#[derive(Debug, Default)]
pub struct DraftSupport {
    mode: Streaming,
    /// Chats whose Bot API server refused `sendMessageDraft`.
    unavailable: Mutex<HashSet<i64>>,
}

/// How one answer is shown while it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Drafts,
    Edits,
    AtTheEnd,
}

impl DraftSupport {
    /// Streaming as `mode` says.
    pub fn new(mode: Streaming) -> Self {
        Self {
            mode,
            unavailable: Mutex::default(),
        }
    }

    fn unavailable(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shown(&self, chat: i64, private: bool) -> Shown {
        match self.mode {
            Streaming::Off => Shown::AtTheEnd,
            Streaming::Edit => Shown::Edits,
            Streaming::Draft if private && !self.unavailable().contains(&chat) => Shown::Drafts,
            Streaming::Draft => Shown::Edits,
        }
    }

    fn mark_unavailable(&self, chat: i64) {
        let mut unavailable = self.unavailable();
        if unavailable.len() >= MAX_REMEMBERED {
            unavailable.clear();
        }
        unavailable.insert(chat);
    }
}

/// The draft id of part `part` of the answer to message `message` (never zero).
pub fn draft_id(message: i32, part: usize) -> i64 {
    i64::from(message.unsigned_abs()) * 64 + (part % 63) as i64 + 1
}

/// Whether `draft_id` is one of [`draft_id`]'s ids for the answer to message `message`.
pub fn is_draft_of(draft_id: i64, message: i32) -> bool {
    draft_id > 0 && (draft_id - 1) / 64 == i64::from(message.unsigned_abs())
}

/// Delivers `events` to `target` the way `support` says for this chat: drafts, edits, or
/// all at the end. `message` (the question's id) seeds the draft ids.
#[allow(clippy::too_many_arguments)]
pub async fn deliver(
    api: &TelegramApi,
    support: &DraftSupport,
    target: Target,
    private: bool,
    message: i32,
    events: BoxStream<'static, StreamEvent>,
    stop: oneshot::Receiver<()>,
    typing: TypingGuard,
) -> Result<Delivered, DeliveryError> {
    let pacing = Pacing::for_chat(private);
    let shown = support.shown(target.chat.0, private);
    if shown == Shown::Edits {
        return stream::deliver(api, target, pacing, events, stop, typing).await;
    }
    let drafts = (shown == Shown::Drafts).then_some(message);
    match whole(api, target, pacing, drafts, events, stop, typing).await? {
        Outcome::Delivered(delivered) => Ok(delivered),
        Outcome::NoDrafts {
            text,
            events,
            stop,
            typing,
            error,
        } => {
            tracing::warn!(
                chat = target.chat.0,
                error = %error,
                "the Bot API refused sendMessageDraft; this chat streams with edits from now on"
            );
            support.mark_unavailable(target.chat.0);
            let events = futures::stream::once(async move { StreamEvent::Delta(text) })
                .chain(events)
                .boxed();
            stream::deliver(api, target, pacing, events, stop, typing).await
        }
    }
}

/// How [`whole`] ended.
enum Outcome {
    Delivered(Delivered),
    /// The server refused the first draft: what is left, for edit streaming.
    NoDrafts {
        text: String,
        events: BoxStream<'static, StreamEvent>,
        stop: oneshot::Receiver<()>,
        typing: TypingGuard,
        error: ApiCallError,
    },
}

/// Streams drafts (when `drafts` holds the question's message id) or shows only "typing…",
/// and sends each part of the answer once, complete.
async fn whole(
    api: &TelegramApi,
    target: Target,
    pacing: Pacing,
    drafts: Option<i32>,
    mut events: BoxStream<'static, StreamEvent>,
    mut stop: oneshot::Receiver<()>,
    typing: TypingGuard,
) -> Result<Outcome, DeliveryError> {
    let mut typing = Some(typing);
    let mut text = String::new();
    // The part being written: where it starts, and what its draft shows.
    let mut current = Current::fresh(0);
    let mut part = 0;
    let mut drafted = false;
    let mut messages = 0;
    let mut first_send = None;
    let mut completion = None;
    let mut stopped = false;
    let mut refused = None;
    let mut next_draft = Instant::now();
    // Until when flood control asked this chat to wait (the final message waits too).
    let mut flood_until = Instant::now();
    loop {
        let due = drafts.is_some() && {
            let now = stream::visible(&text[current.start..]);
            !now.is_empty() && now != current.shown
        };
        tokio::select! {
            biased;
            _ = &mut stop => {
                stopped = true;
                break;
            }
            event = events.next() => match event {
                Some(StreamEvent::Delta(delta)) => {
                    text.push_str(&delta);
                    // Past the limit: send this part complete and go on with the next.
                    part += stream::finish_full_parts(api, target, pacing, &text, &mut current, flood_until, &mut messages, &mut first_send).await?;
                }
                Some(StreamEvent::Done(done)) => {
                    completion = Some(done);
                    break;
                }
                Some(
                    StreamEvent::Started
                    | StreamEvent::Prompt(_)
                    | StreamEvent::Logprobs(_)
                    | StreamEvent::Choice(_)
                    | StreamEvent::ChoiceEnd(_)
                    | StreamEvent::ToolCall(_),
                ) => {}
                None => break,
            },
            _ = tokio::time::sleep_until(next_draft), if due => {
                let Some(message) = drafts else { continue };
                let shown = stream::visible(&text[current.start..]).to_string();
                match api.draft(target, draft_id(message, part), &shown).await {
                    Ok(()) => {
                        current.shown = shown;
                        drafted = true;
                        first_send.get_or_insert_with(Instant::now);
                        typing = None;
                        next_draft = Instant::now() + pacing.edit_interval;
                    }
                    Err(ApiCallError::RetryAfter(wait)) => {
                        tracing::info!(chat = target.chat.0, wait_s = wait.as_secs(), "flood control; next draft later");
                        next_draft = Instant::now() + wait;
                        flood_until = next_draft;
                    }
                    // The method itself is refused before anything was shown: edits instead.
                    Err(e) if e.is_permanent() && !drafted && messages == 0 => {
                        refused = Some(e);
                        break;
                    }
                    // The next draft (or the final message) carries the text anyway.
                    Err(e) => {
                        tracing::debug!(error = %e, "a draft failed");
                        next_draft = Instant::now() + pacing.edit_interval;
                    }
                }
            }
        }
    }
    if let (Some(error), Some(typing)) = (refused, typing.take()) {
        return Ok(Outcome::NoDrafts {
            text,
            events,
            stop,
            typing,
            error,
        });
    }
    drop(events);
    drop(typing);
    let tail = text[current.start..].to_string();
    if !stream::visible(&tail).is_empty() {
        tokio::time::sleep_until(flood_until).await;
        // The part's only message: its complete, formatted text.
        current.shown.clear();
        stream::finish_persistently(
            api,
            target,
            &mut current,
            &tail,
            &mut messages,
            &mut first_send,
        )
        .await?;
    }
    Ok(Outcome::Delivered(Delivered {
        text,
        completion,
        stopped,
        first_send,
        messages,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_ids_are_never_zero_and_differ_per_part() {
        for message in [0, 1, -5, i32::MAX, i32::MIN] {
            let ids: Vec<i64> = (0..5).map(|part| draft_id(message, part)).collect();
            assert!(ids.iter().all(|&id| id != 0), "{ids:?}");
            let mut unique = ids.clone();
            unique.dedup();
            assert_eq!(unique.len(), ids.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn a_draft_id_names_its_message_and_no_other(
            message in proptest::prelude::any::<i32>(),
            other in proptest::prelude::any::<i32>(),
            part in 0usize..10_000,
        ) {
            let id = draft_id(message, part);
            proptest::prop_assert!(is_draft_of(id, message));
            proptest::prop_assert_eq!(
                is_draft_of(id, other),
                other.unsigned_abs() == message.unsigned_abs()
            );
        }
    }

    #[test]
    fn private_chats_draft_groups_edit_and_refusals_are_remembered() {
        let support = DraftSupport::new(Streaming::Draft);
        assert_eq!(support.shown(42, true), Shown::Drafts);
        assert_eq!(support.shown(-100, false), Shown::Edits);
        support.mark_unavailable(42);
        assert_eq!(support.shown(42, true), Shown::Edits);
        assert_eq!(support.shown(43, true), Shown::Drafts);
        assert_eq!(
            DraftSupport::new(Streaming::Edit).shown(42, true),
            Shown::Edits
        );
        assert_eq!(
            DraftSupport::new(Streaming::Off).shown(-100, false),
            Shown::AtTheEnd
        );
    }
}
