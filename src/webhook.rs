//! Telegram's webhook mode, where the HTTP API hands updates to the bot: a leaf shared by
//! `http` (the route, which checks the secret and parses the body) and `telegram` (the
//! bot's loop, which saves the update as pending and answers it). Neither imports the
//! other.
//!
//! The route hands each update over a bounded channel with a reply slot, and answers
//! Telegram once the bot says what became of it: [`WebhookOutcome::Accepted`] only once
//! the update is saved (so `kill -9` right after the 200 loses nothing: the update is
//! answered after the restart), [`WebhookOutcome::Busy`] (503, which Telegram retries)
//! when the bot's pending list is full, the channel is full, or the bot is not running.
//! Nothing handed over is ever dropped: what is not accepted is re-sent by Telegram.
//!
//! The `secret_token` is drawn from the OS at every start and given to Telegram with
//! `setWebhook`; it lives in memory only (never on disk, never logged). Until
//! `setWebhook` succeeds no secret is known, and requests are answered 503 (retried),
//! not 401.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Secret, WebhookConfig};

/// Updates handed over and not yet taken by the bot, at most (above Telegram's
/// `max_connections` limit of 100, so Telegram alone never fills it).
pub const INBOX_CAPACITY: usize = 128;
/// How long a request waits for the bot's verdict before answering 503 (Telegram then
/// re-sends the update, which is a duplicate if it was saved meanwhile).
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of `secret_token` drawn from the OS (hex-encoded: 64 characters of Telegram's
/// allowed `A-Z a-z 0-9 _ -`).
const SECRET_BYTES: usize = 32;

/// What became of one webhook request; the metric label of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Saved as pending: it will be answered (200).
    Accepted,
    /// Received before (Telegram re-sent it): not answered again (200).
    Duplicate,
    /// No or the wrong `X-Telegram-Bot-Api-Secret-Token` (401); nothing reaches the bot.
    Unauthorized,
    /// Not an update (not JSON, no `update_id`), too large, or not a POST (4xx).
    BadRequest,
    /// Not taken now: the bot is full, not running, or not set up yet (503, retried).
    Busy,
}

impl WebhookOutcome {
    /// Every outcome, in metric order.
    pub const ALL: [WebhookOutcome; 5] = [
        WebhookOutcome::Accepted,
        WebhookOutcome::Duplicate,
        WebhookOutcome::Unauthorized,
        WebhookOutcome::BadRequest,
        WebhookOutcome::Busy,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Accepted => "accepted",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Unauthorized => "unauthorized",
            WebhookOutcome::BadRequest => "bad_request",
            WebhookOutcome::Busy => "busy",
        }
    }
}

/// One update handed to the bot, with where its verdict goes.
#[derive(Debug)]
pub struct Pushed {
    /// The update as Telegram sent it: a JSON object with a `u32` `update_id` (the bot
    /// reads it as it reads polled ones).
    pub update: Value,
    /// The verdict: `Accepted` only once the update is saved.
    pub verdict: oneshot::Sender<WebhookOutcome>,
}

/// The hand-off between the webhook route and the bot; cheap to clone, clones share it.
#[derive(Debug, Clone)]
pub struct WebhookInbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where Telegram posts, and how many connections it may open.
    config: WebhookConfig,
    pushed_tx: mpsc::Sender<Pushed>,
    /// The bot's end, until it takes it.
    pushed_rx: Mutex<Option<mpsc::Receiver<Pushed>>>,
    /// The `secret_token` Telegram was given, once `setWebhook` succeeded.
    secret: RwLock<Option<Secret>>,
}

impl WebhookInbox {
    /// An inbox for the webhook `config` describes.
    pub fn new(config: WebhookConfig) -> Self {
        let (pushed_tx, pushed_rx) = mpsc::channel(INBOX_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                config,
                pushed_tx,
                pushed_rx: Mutex::new(Some(pushed_rx)),
                secret: RwLock::new(None),
            }),
        }
    }

    /// The webhook's URL and `max_connections`.
    pub fn config(&self) -> &WebhookConfig {
        &self.inner.config
    }

    /// The path the HTTP API serves.
    pub fn path(&self) -> &str {
        self.inner.config.path()
    }

    /// The bot's end of the channel (once: `None` after the first call).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Pushed>> {
        self.inner
            .pushed_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Telegram was given `secret` (`setWebhook` succeeded): requests must carry it.
    pub fn set_secret(&self, secret: Secret) {
        *self
            .inner
            .secret
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(secret);
    }

    /// The secret requests must carry; `None` before `setWebhook` succeeded.
    pub fn secret(&self) -> Option<Secret> {
        self.inner
            .secret
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hands `update` to the bot and waits for its verdict: `Busy` when the channel is
    /// full, the bot is gone, or it does not answer within [`VERDICT_TIMEOUT`].
    pub async fn deliver(&self, update: Value) -> WebhookOutcome {
        let (verdict, verdict_rx) = oneshot::channel();
        if self
            .inner
            .pushed_tx
            .try_send(Pushed { update, verdict })
            .is_err()
        {
            return WebhookOutcome::Busy;
        }
        match tokio::time::timeout(VERDICT_TIMEOUT, verdict_rx).await {
            Ok(Ok(outcome)) => outcome,
            _ => WebhookOutcome::Busy,
        }
    }
}

/// A fresh `secret_token`: 32 bytes from the OS generator, hex-encoded.
pub fn new_secret() -> Result<Secret, getrandom::Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Secret::new(hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        WebhookConfig {
            url: url::Url::parse("https://bot.example.org/tg/x").unwrap(),
            max_connections: 40,
        }
    }

    fn update(id: u32) -> Value {
        serde_json::json!({"update_id": id, "unknown_kind": {}})
    }

    #[test]
    fn secrets_are_what_telegram_allows_and_differ() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a.expose(), b.expose());
        for secret in [&a, &b] {
            let s = secret.expose();
            assert_eq!(s.len(), 64);
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            );
        }
    }

    #[tokio::test]
    async fn the_verdict_is_the_bots_and_busy_when_nobody_takes_it() {
        let inbox = WebhookInbox::new(config());
        assert_eq!(inbox.path(), "/tg/x");
        assert!(inbox.secret().is_none());
        let mut rx = inbox.take_receiver().unwrap();
        assert!(inbox.take_receiver().is_none(), "one receiver");
        let bot = tokio::spawn(async move {
            let pushed = rx.recv().await.unwrap();
            assert_eq!(pushed.update["update_id"], 7);
            pushed.verdict.send(WebhookOutcome::Duplicate).unwrap();
            // The next one is dropped without a verdict.
            drop(rx.recv().await);
            rx
        });
        assert_eq!(inbox.deliver(update(7)).await, WebhookOutcome::Duplicate);
        assert_eq!(inbox.deliver(update(8)).await, WebhookOutcome::Busy);
        drop(bot.await.unwrap());
        assert_eq!(inbox.deliver(update(9)).await, WebhookOutcome::Busy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_inbox_is_busy_at_once() {
        let inbox = WebhookInbox::new(config());
        let _rx = inbox.take_receiver().unwrap();
        let waiting: Vec<_> = (0..INBOX_CAPACITY)
            .map(|i| {
                let inbox = inbox.clone();
                tokio::spawn(async move { inbox.deliver(update(i as u32)).await })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(inbox.inner.pushed_tx.capacity(), 0, "the inbox is full");
        assert_eq!(inbox.deliver(update(999)).await, WebhookOutcome::Busy);
        // Those in the channel time out unanswered: Busy too (Telegram re-sends).
        for w in waiting {
            assert_eq!(w.await.unwrap(), WebhookOutcome::Busy);
        }
    }
}
