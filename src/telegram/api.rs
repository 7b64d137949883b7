//! The Bot API calls the bot makes, over teloxide's [`Bot`], with Telegram's failure
//! modes turned into typed outcomes: 429 `retry_after` waited out (by the calling chat's
//! task only: other chats are never stalled), network errors and 5xx retried with
//! backoff, "message is not modified" counted as success, "can't parse entities"
//! reported so the caller can resend as plain text.
//!
//! The token is part of every request URL. teloxide strips it from the network errors it
//! returns, and nothing here logs a URL, a request or the [`Bot`] itself.
//! Known teloxide 0.17 quirk: it sleeps 10 s inside any call that got a 5xx before
//! returning the error, so a 5xx costs at least that before our retry.

use std::time::Duration;

use super::updates::{self, ALLOWED_UPDATES};
use teloxide::ApiError;
use teloxide::Bot;
use teloxide::RequestError;
use teloxide::net::Download;
use teloxide::payloads::{
    AnswerCallbackQuerySetters, EditMessageTextSetters, SendChatActionSetters, SendMessageSetters,
    SetMyCommandsSetters,
};
use teloxide::prelude::{Request, Requester};
use teloxide::requests::{JsonRequest, Payload};
use teloxide::types::{
    BotCommand, CallbackQueryId, ChatAction, ChatId, File, FileId, InlineKeyboardMarkup, MessageId,
    ParseMode, ReplyParameters, ThreadId, True, Update,
};

/// Attempts of one call that keeps failing with transient errors.
const MAX_ATTEMPTS: u32 = 5;
/// The first backoff after a transient error; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest `retry_after` waited out inside one call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Why a Bot API call failed, as the bot branches on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiCallError {
    /// Flood control: wait this long before the chat gets the next call.
    #[error("flood control: retry after {0:?}")]
    RetryAfter(Duration),
    /// The HTML was rejected ("can't parse entities").
    #[error("Telegram could not parse the message's entities")]
    CantParseEntities,
    /// Network error, timeout or 5xx: worth retrying later.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The bot token was rejected.
    #[error("the bot token was rejected (401 Unauthorized); check TELEGRAM_BOT_TOKEN")]
    Unauthorized,
    /// Another process polls with this token (409 Conflict).
    #[error("another bot instance is polling with this token (409 Conflict)")]
    Conflict,
    /// `getUpdates` while a webhook is set (409 Conflict): delete the webhook to poll.
    #[error("a webhook is set, so getUpdates cannot be used (409 Conflict)")]
    WebhookActive,
    /// The message to edit is gone (the user deleted it): send a new one instead.
    #[error("the message to edit is gone")]
    MessageGone,
    /// Anything else Telegram refused (chat not found, bot blocked…): not retried.
    #[error("Telegram refused the call: {0}")]
    Refused(String),
}

impl ApiCallError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiCallError::RetryAfter(_) => "retry_after",
            ApiCallError::CantParseEntities => "cant_parse_entities",
            ApiCallError::Transient(_) => "transient",
            ApiCallError::Unauthorized => "unauthorized",
            ApiCallError::Conflict => "conflict",
            ApiCallError::WebhookActive => "webhook_active",
            ApiCallError::MessageGone => "message_gone",
            ApiCallError::Refused(_) => "refused",
        }
    }
}

impl ApiCallError {
    /// Whether retrying can never help: Telegram refused the call for good (the user
    /// blocked the bot, the chat is gone, the bot was removed) or the token is rejected.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ApiCallError::Refused(_) | ApiCallError::Unauthorized | ApiCallError::MessageGone
        )
    }
}

/// How long a delivery that must succeed keeps retrying (beyond it the update stays
/// pending and is answered after a restart).
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(600);
/// The longest pause between two attempts of a delivery that must succeed.
const MAX_DELIVERY_BACKOFF: Duration = Duration::from_secs(30);

/// The retry schedule of a delivery that must succeed: transient failures and flood
/// control are waited out (Telegram's `retry_after` honoured, else a doubling backoff)
/// until [`DELIVERY_DEADLINE`]; permanent refusals end it at once.
#[derive(Debug)]
pub struct DeliveryRetry {
    deadline: tokio::time::Instant,
    backoff: Duration,
}

impl Default for DeliveryRetry {
    fn default() -> Self {
        Self::new(DELIVERY_DEADLINE)
    }
}

impl DeliveryRetry {
    /// A schedule that gives up after `budget`.
    pub fn new(budget: Duration) -> Self {
        Self {
            deadline: tokio::time::Instant::now() + budget,
            backoff: FIRST_BACKOFF,
        }
    }

    /// After `error`: waits before the next attempt, or returns the error if it is
    /// permanent or the deadline has passed.
    pub async fn wait(
        &mut self,
        what: &'static str,
        error: ApiCallError,
    ) -> Result<(), ApiCallError> {
        if error.is_permanent() {
            return Err(error);
        }
        let wait = match &error {
            ApiCallError::RetryAfter(wait) => *wait,
            _ => {
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_DELIVERY_BACKOFF);
                wait
            }
        };
        if tokio::time::Instant::now() + wait > self.deadline {
            return Err(error);
        }
        tracing::warn!(call = what, error = %error, wait_ms = wait.as_millis() as u64, "delivery failed; trying again");
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// The outcome of a teloxide call, sorted. `Ok(None)` means "not modified" (a success).
fn sort<T>(result: Result<T, RequestError>) -> Result<Option<T>, ApiCallError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) => match e {
            RequestError::Api(ApiError::MessageNotModified) => Ok(None),
            RequestError::RetryAfter(seconds) => Err(ApiCallError::RetryAfter(seconds.duration())),
            RequestError::Api(ApiError::CantParseEntities(_)) => {
                Err(ApiCallError::CantParseEntities)
            }
            RequestError::Api(ApiError::MessageToEditNotFound) => Err(ApiCallError::MessageGone),
            RequestError::Api(ApiError::InvalidToken) => Err(ApiCallError::Unauthorized),
            RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => Err(ApiCallError::Conflict),
            RequestError::Api(ApiError::CantGetUpdates) => Err(ApiCallError::WebhookActive),
            // Telegram's description grew a suffix teloxide does not match: "…while webhook
            // is active; use deleteWebhook to delete the webhook first".
            RequestError::Api(ApiError::Unknown(description))
                if description.contains("can't use getUpdates method while webhook is active") =>
            {
                Err(ApiCallError::WebhookActive)
            }
            RequestError::Api(ApiError::Unknown(description)) if is_server_error(&description) => {
                Err(ApiCallError::Transient(description))
            }
            RequestError::Api(other) => Err(ApiCallError::Refused(other.to_string())),
            // teloxide has already replaced the token in the URL of a network error.
            RequestError::Network(e) => Err(ApiCallError::Transient(e.to_string())),
            // A 5xx from a proxy in front of the Bot API is an HTML page, not JSON.
            RequestError::InvalidJson { .. } => Err(ApiCallError::Transient(
                "a response that is not JSON".into(),
            )),
            RequestError::Io(e) => Err(ApiCallError::Transient(e.to_string())),
            RequestError::MigrateToChatId(_) => Err(ApiCallError::Refused(
                "the group became a supergroup".into(),
            )),
        },
    }
}

/// Whether an error description is a server-side failure (teloxide drops the numeric
/// code: Telegram's 5xx descriptions are the HTTP reason phrases).
fn is_server_error(description: &str) -> bool {
    [
        "Internal Server Error",
        "Bad Gateway",
        "Service Unavailable",
        "Gateway Timeout",
    ]
    .iter()
    .any(|phrase| description.contains(phrase))
}

/// How hard to try a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Retry transient failures with backoff and wait out flood control.
    Deliver,
    /// One attempt: the caller has a later chance (an intermediate edit).
    Once,
}

/// Runs `call` until it succeeds, fails for good, or `persistence` gives up.
async fn retrying<T, F, Fut>(
    what: &'static str,
    persistence: Persistence,
    mut call: F,
) -> Result<Option<T>, ApiCallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RequestError>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        let error = match sort(call().await) {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if persistence == Persistence::Once || attempt >= MAX_ATTEMPTS {
            return Err(error);
        }
        let wait = match &error {
            ApiCallError::RetryAfter(wait) if *wait <= MAX_RETRY_AFTER => *wait,
            ApiCallError::Transient(_) => {
                let wait = backoff;
                backoff *= 2;
                wait
            }
            _ => return Err(error),
        };
        tracing::warn!(call = what, error = %error, attempt, wait_ms = wait.as_millis() as u64, "Telegram call failed; retrying");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The chat.
    pub chat: ChatId,
    /// The forum topic.
    pub thread: Option<ThreadId>,
    /// The message to reply to (groups), if any.
    pub reply_to: Option<MessageId>,
}

/// The Bot API calls of the bot.
#[derive(Clone)]
pub struct TelegramApi {
    bot: Bot,
}

impl TelegramApi {
    /// Wraps a configured [`Bot`].
    pub fn new(bot: Bot) -> Self {
        Self { bot }
    }

    /// Who the bot is (`getMe`), one attempt: the caller waits out failures (see
    /// `connect`).
    pub async fn get_me(&self) -> Result<teloxide::types::Me, ApiCallError> {
        retrying("getMe", Persistence::Once, || self.bot.get_me().send())
            .await?
            .ok_or_else(|| ApiCallError::Refused("getMe returned nothing".into()))
    }

    /// Removes a webhook, which would make `getUpdates` fail with 409 Conflict. Pending
    /// updates are kept.
    pub async fn delete_webhook(&self) -> Result<(), ApiCallError> {
        retrying("deleteWebhook", Persistence::Deliver, || {
            self.bot.delete_webhook().send()
        })
        .await
        .map(|_| ())
    }

    /// Sets the webhook (`setWebhook`, as JSON), one attempt: the caller waits out
    /// failures. Pending updates are kept (`drop_pending_updates: false`).
    pub async fn set_webhook(
        &self,
        url: &url::Url,
        secret: &str,
        max_connections: u8,
    ) -> Result<(), ApiCallError> {
        let payload = SetWebhook {
            url: url.as_str().to_string(),
            secret_token: secret.to_string(),
            max_connections,
            allowed_updates: ALLOWED_UPDATES,
            drop_pending_updates: false,
        };
        retrying("setWebhook", Persistence::Once, || {
            JsonRequest::new(self.bot.clone(), payload.clone()).send()
        })
        .await
        .map(|_| ())
    }

    /// Registers the command menu for `language` (`None`: the default).
    pub async fn set_commands(
        &self,
        commands: Vec<BotCommand>,
        language: Option<&str>,
    ) -> Result<(), ApiCallError> {
        retrying("setMyCommands", Persistence::Deliver, || {
            let mut request = self.bot.set_my_commands(commands.clone());
            if let Some(language) = language {
                request = request.language_code(language);
            }
            request.send()
        })
        .await
        .map(|_| ())
    }

    /// One long poll: updates from `offset` on, waiting up to `timeout` for some (the
    /// types in [`ALLOWED_UPDATES`], read by [`updates::read`]).
    pub async fn get_updates(
        &self,
        offset: Option<i32>,
        timeout: Duration,
    ) -> Result<Vec<Update>, ApiCallError> {
        let payload = GetUpdates {
            offset,
            timeout: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            allowed_updates: ALLOWED_UPDATES,
        };
        let values = sort(JsonRequest::new(self.bot.clone(), payload).send().await)?;
        Ok(values
            .unwrap_or_default()
            .into_iter()
            .filter_map(updates::read)
            .collect())
    }

    /// Sends `text` (HTML when `html`); returns the new message's id.
    pub async fn send(
        &self,
        target: Target,
        text: &str,
        html: bool,
        persistence: Persistence,
    ) -> Result<MessageId, ApiCallError> {
        let sent = retrying("sendMessage", persistence, || {
            let mut request = self.bot.send_message(target.chat, text);
            if let Some(thread) = target.thread {
                request = request.message_thread_id(thread);
            }
            if let Some(reply_to) = target.reply_to {
                request = request
                    .reply_parameters(ReplyParameters::new(reply_to).allow_sending_without_reply());
            }
            if html {
                request = request.parse_mode(ParseMode::Html);
            }
            request.send()
        })
        .await?;
        sent.map(|message| message.id)
            .ok_or_else(|| ApiCallError::Refused("sendMessage returned nothing".into()))
    }

    /// Sends `text` as HTML, or as plain text if Telegram cannot parse the HTML.
    pub async fn send_html_or_plain(
        &self,
        target: Target,
        html: &str,
        plain: &str,
    ) -> Result<MessageId, ApiCallError> {
        match self.send(target, html, true, Persistence::Deliver).await {
            Err(ApiCallError::CantParseEntities) => {
                tracing::warn!("Telegram rejected our HTML; sending plain text");
                self.send(target, plain, false, Persistence::Deliver).await
            }
            other => other,
        }
    }

    /// Replaces a message's text. "Not modified" is a success.
    pub async fn edit(
        &self,
        chat: ChatId,
        message: MessageId,
        text: &str,
        html: bool,
        persistence: Persistence,
    ) -> Result<(), ApiCallError> {
        retrying("editMessageText", persistence, || {
            let mut request = self.bot.edit_message_text(chat, message, text);
            if html {
                request = request.parse_mode(ParseMode::Html);
            }
            request.send()
        })
        .await
        .map(|_| ())
    }

    /// The final edit: HTML, or plain text if Telegram cannot parse the HTML.
    pub async fn edit_html_or_plain(
        &self,
        chat: ChatId,
        message: MessageId,
        html: &str,
        plain: &str,
    ) -> Result<(), ApiCallError> {
        match self
            .edit(chat, message, html, true, Persistence::Deliver)
            .await
        {
            Err(ApiCallError::CantParseEntities) => {
                tracing::warn!("Telegram rejected our HTML; editing in plain text");
                self.edit(chat, message, plain, false, Persistence::Deliver)
                    .await
            }
            other => other,
        }
    }

    /// `getFile`: where a file can be downloaded (transient failures retried).
    pub async fn get_file(&self, id: FileId) -> Result<File, ApiCallError> {
        retrying("getFile", Persistence::Deliver, || {
            self.bot.get_file(id.clone()).send()
        })
        .await?
        .ok_or_else(|| ApiCallError::Refused("getFile returned nothing".into()))
    }

    /// The bytes of the file at `path` (from [`get_file`](Self::get_file)), as they
    /// arrive; the token in the URL is hidden from the errors.
    pub fn download_stream(
        &self,
        path: &str,
    ) -> futures::stream::BoxStream<'static, Result<bytes::Bytes, reqwest::Error>> {
        self.bot.download_file_stream(path)
    }

    /// Streams `text` (plain) as the draft `draft_id` of `target`'s private chat
    /// (`sendMessageDraft`, Bot API 9.3+): one attempt, the next draft comes soon. The draft
    /// shows a stop button (Bot API 10.3; older clients ignore it) that keeps what it shows
    /// until the answer so far is sent.
    pub async fn draft(
        &self,
        target: Target,
        draft_id: i64,
        text: &str,
    ) -> Result<(), ApiCallError> {
        let payload = SendMessageDraft {
            chat_id: target.chat.0,
            draft_id,
            message_thread_id: target.thread.map(|t| t.0.0),
            text: text.to_string(),
            can_stop: true,
            keep_on_stop: true,
        };
        retrying("sendMessageDraft", Persistence::Once, || {
            JsonRequest::new(self.bot.clone(), payload.clone()).send()
        })
        .await
        .map(|_| ())
    }

    /// Sends `text` with an inline keyboard (one attempt; the caller retries).
    pub async fn send_menu(
        &self,
        target: Target,
        text: &str,
        keyboard: InlineKeyboardMarkup,
    ) -> Result<(), ApiCallError> {
        retrying("sendMessage", Persistence::Once, || {
            let mut request = self
                .bot
                .send_message(target.chat, text)
                .reply_markup(keyboard.clone());
            if let Some(thread) = target.thread {
                request = request.message_thread_id(thread);
            }
            if let Some(reply_to) = target.reply_to {
                request = request
                    .reply_parameters(ReplyParameters::new(reply_to).allow_sending_without_reply());
            }
            request.send()
        })
        .await
        .map(|_| ())
    }

    /// Answers a button press (`answerCallbackQuery`), with a short notice if `text` is
    /// not empty.
    pub async fn answer_callback(
        &self,
        id: CallbackQueryId,
        text: &str,
    ) -> Result<(), ApiCallError> {
        retrying("answerCallbackQuery", Persistence::Deliver, || {
            let mut request = self.bot.answer_callback_query(id.clone());
            if !text.is_empty() {
                request = request.text(text);
            }
            request.send()
        })
        .await
        .map(|_| ())
    }

    /// Shows "typing…" for about 5 s (one attempt: the next one comes soon).
    pub async fn typing(&self, target: Target) -> Result<(), ApiCallError> {
        retrying("sendChatAction", Persistence::Once, || {
            let mut request = self.bot.send_chat_action(target.chat, ChatAction::Typing);
            if let Some(thread) = target.thread {
                request = request.message_thread_id(thread);
            }
            request.send()
        })
        .await
        .map(|_| ())
    }
}

/// `sendMessageDraft` (Bot API 9.3), which teloxide 0.17 does not know: `chat_id` (a
/// private chat), `draft_id` (non-zero; drafts with the same id animate), `text` (0–4096
/// characters; empty shows "Thinking…"), optional `message_thread_id`; `can_stop` shows a
/// stop button whose press arrives as a `stopped_message_generation` update, and
/// `keep_on_stop` keeps the draft on screen after the press (Bot API 10.3).
#[derive(Debug, Clone, serde::Serialize)]
struct SendMessageDraft {
    chat_id: i64,
    draft_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_thread_id: Option<i32>,
    text: String,
    can_stop: bool,
    keep_on_stop: bool,
}

impl Payload for SendMessageDraft {
    type Output = True;
    const NAME: &'static str = "sendMessageDraft";
}

/// `getUpdates` with `allowed_updates` as strings: teloxide 0.17's list lacks
/// `stopped_message_generation`. The updates come back as JSON for [`updates::read`].
#[derive(Debug, Clone, serde::Serialize)]
struct GetUpdates {
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i32>,
    timeout: u32,
    allowed_updates: [&'static str; ALLOWED_UPDATES.len()],
}

impl Payload for GetUpdates {
    type Output = Vec<serde_json::Value>;
    const NAME: &'static str = "getUpdates";

    fn timeout_hint(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.timeout.into()))
    }
}

/// `setWebhook` as JSON, with `allowed_updates` as strings (teloxide's payload is sent as
/// multipart and its list lacks `stopped_message_generation`). No certificate: the proxy in
/// front of the bot presents a real one.
#[derive(Debug, Clone, serde::Serialize)]
struct SetWebhook {
    url: String,
    secret_token: String,
    max_connections: u8,
    allowed_updates: [&'static str; ALLOWED_UPDATES.len()],
    drop_pending_updates: bool,
}

impl Payload for SetWebhook {
    type Output = True;
    const NAME: &'static str = "setWebhook";
}

#[cfg(test)]
mod tests {
    use super::*;
    use teloxide::types::Seconds;

    #[test]
    fn telegram_failures_are_sorted() {
        assert_eq!(
            sort::<()>(Err(RequestError::Api(ApiError::MessageNotModified))),
            Ok(None)
        );
        assert_eq!(
            sort::<()>(Err(RequestError::RetryAfter(Seconds::from_seconds(3)))),
            Err(ApiCallError::RetryAfter(Duration::from_secs(3)))
        );
        assert_eq!(
            sort::<()>(Err(RequestError::Api(ApiError::CantParseEntities(
                "x".into()
            )))),
            Err(ApiCallError::CantParseEntities)
        );
        assert!(matches!(
            sort::<()>(Err(RequestError::Api(ApiError::Unknown(
                "Internal Server Error".into()
            )))),
            Err(ApiCallError::Transient(_))
        ));
        assert!(matches!(
            sort::<()>(Err(RequestError::Api(ApiError::ChatNotFound))),
            Err(ApiCallError::Refused(_))
        ));
        // Today's and teloxide's spelling of getUpdates meeting a webhook.
        for description in [
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook \
             to delete the webhook first",
            "Conflict: can't use getUpdates method while webhook is active",
        ] {
            let parsed: ApiError = serde_json::from_value(serde_json::json!(description)).unwrap();
            assert_eq!(
                sort::<()>(Err(RequestError::Api(parsed))),
                Err(ApiCallError::WebhookActive),
                "{description}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_flood_control_waited_out() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let result = retrying("test", Persistence::Deliver, || {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    1 => Err(RequestError::RetryAfter(Seconds::from_seconds(7))),
                    2 => Err(RequestError::Api(ApiError::Unknown("Bad Gateway".into()))),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(result, Ok(Some(3)));
        assert_eq!(started.elapsed(), Duration::from_secs(7) + FIRST_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_retry_honours_retry_after_and_stops_at_permanent_errors() {
        let started = tokio::time::Instant::now();
        let mut retry = DeliveryRetry::new(Duration::from_secs(60));
        retry
            .wait("t", ApiCallError::RetryAfter(Duration::from_secs(9)))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(9));
        retry
            .wait("t", ApiCallError::Transient("502".into()))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(9) + FIRST_BACKOFF);
        assert!(
            retry
                .wait(
                    "t",
                    ApiCallError::Refused("Forbidden: bot was blocked by the user".into())
                )
                .await
                .is_err()
        );
        // Past the deadline, a transient error ends it too.
        assert!(
            retry
                .wait("t", ApiCallError::RetryAfter(Duration::from_secs(120)))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn once_means_once_and_refusals_are_not_retried() {
        let mut calls = 0;
        let result: Result<Option<()>, _> = retrying("test", Persistence::Once, || {
            calls += 1;
            async { Err(RequestError::RetryAfter(Seconds::from_seconds(1))) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let result: Result<Option<()>, _> = retrying("test", Persistence::Deliver, || {
            calls += 1;
            async { Err(RequestError::Api(ApiError::BotBlocked)) }
        })
        .await;
        assert!(matches!(result, Err(ApiCallError::Refused(_))));
        assert_eq!(calls, 1);
    }
}
