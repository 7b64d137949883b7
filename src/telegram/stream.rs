//! Delivering one streamed answer: "typing…" until text is visible, the first message as
//! soon as there is text, then edits paced per chat (only when the text changed), plain
//! text while streaming and formatted HTML in each message's final edit, continuing in
//! new messages past Telegram's 4096-character limit.
//!
//! Each chat's answer runs in that chat's own task, so a `retry_after` here delays only
//! this chat: a first send or an intermediate edit hit by flood control or a transient
//! failure is skipped and tried again later, while tokens keep arriving; the text that
//! ends a message (its final edit, or its first send if none succeeded) is retried with
//! [`DeliveryRetry`] until it is delivered, refused for good, or the deadline passes. The
//! generation is never restarted for a failed send: the answer is kept and delivered.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::api::{ApiCallError, DeliveryRetry, Persistence, Target, TelegramApi};
use super::format::markdown_to_html;
use super::split::{MESSAGE_LIMIT, split_point, telegram_len};
use crate::chat::{Completion, StreamEvent};

/// How often "typing…" is repeated (Telegram shows it for 5 s).
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// Pacing of edits in one chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// The least time between two edits of the chat's messages.
    pub edit_interval: Duration,
    /// The most characters of one message.
    pub message_limit: usize,
}

impl Pacing {
    /// About one edit a second in private chats, one every 3 s in groups (Telegram allows
    /// ~20 messages a minute in a group).
    pub fn for_chat(private: bool) -> Self {
        Self {
            edit_interval: if private {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3)
            },
            message_limit: MESSAGE_LIMIT,
        }
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The answer's full text, as far as it was generated.
    pub text: String,
    /// The closing record, if the answer was complete.
    pub completion: Option<Completion>,
    /// Whether the user stopped it.
    pub stopped: bool,
    /// When the first message was sent (for overhead figures).
    pub first_send: Option<Instant>,
    /// Messages the answer took.
    pub messages: usize,
}

/// Why a delivery failed: Telegram would not take the first message or a final edit.
#[derive(Debug, thiserror::Error)]
#[error("could not deliver the answer: {0}")]
pub struct DeliveryError(#[from] pub ApiCallError);

impl DeliveryError {
    /// Whether delivery can never succeed (blocked by the user, chat gone).
    pub fn is_permanent(&self) -> bool {
        self.0.is_permanent()
    }
}

/// The message being written now.
pub(super) struct Current {
    /// Its id, once sent.
    pub(super) id: Option<teloxide::types::MessageId>,
    /// Byte offset in the answer where this message's text starts.
    pub(super) start: usize,
    /// The text it shows now.
    pub(super) shown: String,
}

impl Current {
    /// A message not sent yet, starting at byte `start` of the answer.
    pub(super) fn fresh(start: usize) -> Self {
        Self {
            id: None,
            start,
            shown: String::new(),
        }
    }
}

/// Sends "typing…" every few seconds until dropped.
#[derive(Debug)]
pub struct TypingGuard(tokio::task::JoinHandle<()>);

impl TypingGuard {
    fn start(api: TelegramApi, target: Target) -> Self {
        Self(tokio::spawn(async move {
            loop {
                if let Err(e) = api.typing(target).await {
                    tracing::debug!(error = %e, "sendChatAction failed");
                }
                tokio::time::sleep(TYPING_EVERY).await;
            }
        }))
    }
}

impl Drop for TypingGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shows "typing…" in `target` until the returned guard is dropped.
pub fn typing(api: &TelegramApi, target: Target) -> TypingGuard {
    TypingGuard::start(api.clone(), target)
}

/// Delivers `events` to `target`. `stop` ends it early (the events are dropped, which
/// cancels the generation). `typing` is dropped once text is visible.
pub async fn deliver(
    api: &TelegramApi,
    target: Target,
    pacing: Pacing,
    mut events: BoxStream<'static, StreamEvent>,
    mut stop: oneshot::Receiver<()>,
    typing: TypingGuard,
) -> Result<Delivered, DeliveryError> {
    let mut typing = Some(typing);
    let mut text = String::new();
    let mut current = Current::fresh(0);
    let mut messages = 0;
    let mut first_send = None;
    let mut completion = None;
    let mut stopped = false;
    let mut next_edit = Instant::now();
    // When the first message may be tried again after a failed send.
    let mut send_after = Instant::now();
    // Until when flood control asked this chat to wait (the final text waits too).
    let mut flood_until = Instant::now();
    loop {
        let due = current.id.is_some() && visible(&text[current.start..]) != current.shown;
        tokio::select! {
            biased;
            _ = &mut stop => {
                stopped = true;
                break;
            }
            event = events.next() => match event {
                Some(StreamEvent::Delta(delta)) => {
                    text.push_str(&delta);
                    // Past the limit: finish this message and continue in a new one.
                    if finish_full_parts(api, target, pacing, &text, &mut current, flood_until, &mut messages, &mut first_send).await? > 0 {
                        typing = None;
                    }
                    if current.id.is_none()
                        && !visible(&text[current.start..]).is_empty()
                        && Instant::now() >= send_after
                    {
                        let shown = visible(&text[current.start..]).to_string();
                        first_send.get_or_insert_with(Instant::now);
                        match api.send(target, &shown, false, Persistence::Once).await {
                            Ok(id) => {
                                current.id = Some(id);
                                messages += 1;
                                typing = None;
                                current.shown = shown;
                                next_edit = Instant::now() + pacing.edit_interval;
                            }
                            Err(e) if e.is_permanent() => return Err(e.into()),
                            // Tried again with a later piece of text, or at the end.
                            Err(ApiCallError::RetryAfter(wait)) => {
                                send_after = Instant::now() + wait;
                                flood_until = send_after;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "first send failed; trying again later");
                                send_after = Instant::now() + pacing.edit_interval;
                            }
                        }
                    }
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
            _ = tokio::time::sleep_until(next_edit), if due => {
                let shown = visible(&text[current.start..]).to_string();
                if let Some(id) = current.id {
                    match api.edit(target.chat, id, &shown, false, Persistence::Once).await {
                        Ok(()) => current.shown = shown,
                        Err(ApiCallError::RetryAfter(wait)) => {
                            tracing::info!(chat = target.chat.0, wait_s = wait.as_secs(), "flood control; next edit later");
                            next_edit = Instant::now() + wait;
                            flood_until = next_edit;
                            continue;
                        }
                        // The next edit carries the text anyway.
                        Err(e) => tracing::debug!(error = %e, "intermediate edit failed"),
                    }
                }
                next_edit = Instant::now() + pacing.edit_interval;
            }
        }
    }
    drop(events);
    drop(typing);
    let tail = text[current.start..].to_string();
    if !visible(&tail).is_empty() || current.id.is_some() {
        tokio::time::sleep_until(flood_until).await;
        finish_persistently(
            api,
            target,
            &mut current,
            &tail,
            &mut messages,
            &mut first_send,
        )
        .await?;
    }
    Ok(Delivered {
        text,
        completion,
        stopped,
        first_send,
        messages,
    })
}

/// While the part of `text` from `current` on is past the message limit: waits out
/// `flood_until`, delivers the part up to its split point complete, and starts the next
/// part at the following text. Returns how many parts it delivered.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish_full_parts(
    api: &TelegramApi,
    target: Target,
    pacing: Pacing,
    text: &str,
    current: &mut Current,
    flood_until: Instant,
    messages: &mut usize,
    first_send: &mut Option<Instant>,
) -> Result<usize, DeliveryError> {
    let mut parts = 0;
    while telegram_len(&text[current.start..]) > pacing.message_limit {
        let start = current.start;
        let cut = start + split_point(&text[start..], pacing.message_limit);
        tokio::time::sleep_until(flood_until).await;
        finish_persistently(
            api,
            target,
            current,
            &text[start..cut],
            messages,
            first_send,
        )
        .await?;
        let rest = &text[cut..];
        *current = Current::fresh(cut + (rest.len() - rest.trim_start().len()));
        parts += 1;
    }
    Ok(parts)
}

/// [`finish`], retried until delivered, refused for good, or the deadline.
pub(super) async fn finish_persistently(
    api: &TelegramApi,
    target: Target,
    current: &mut Current,
    part: &str,
    messages: &mut usize,
    first_send: &mut Option<Instant>,
) -> Result<(), DeliveryError> {
    let mut retry = DeliveryRetry::default();
    loop {
        match finish(api, target, current, part, messages, first_send).await {
            Ok(()) => return Ok(()),
            Err(DeliveryError(e)) => retry.wait("finish a message", e).await?,
        }
    }
}

/// The text of a message as shown: without surrounding whitespace.
pub(super) fn visible(text: &str) -> &str {
    text.trim()
}

/// Puts a message's final text in place, formatted.
async fn finish(
    api: &TelegramApi,
    target: Target,
    current: &mut Current,
    part: &str,
    messages: &mut usize,
    first_send: &mut Option<Instant>,
) -> Result<(), DeliveryError> {
    let plain = visible(part);
    if plain.is_empty() {
        return Ok(());
    }
    let html = markdown_to_html(plain);
    let edited = match current.id {
        Some(id) => match api.edit_html_or_plain(target.chat, id, &html, plain).await {
            // The user deleted the message being written: the text goes in a new one.
            Err(ApiCallError::MessageGone) => false,
            other => {
                other?;
                true
            }
        },
        None => false,
    };
    if !edited {
        first_send.get_or_insert_with(Instant::now);
        current.id = Some(api.send_html_or_plain(target, &html, plain).await?);
        *messages += 1;
    }
    current.shown = plain.to_string();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_paced_slower_than_private_chats() {
        assert_eq!(Pacing::for_chat(true).edit_interval, Duration::from_secs(1));
        assert_eq!(
            Pacing::for_chat(false).edit_interval,
            Duration::from_secs(3)
        );
        assert_eq!(Pacing::for_chat(true).message_limit, 4096);
    }
}
