//! Webhook mode (`--telegram-webhook-url`): `setWebhook` at start, then the updates the
//! HTTP API's route hands over ([`crate::webhook`]) are read as polled ones are
//! ([`updates::read`]) and take the same durable path: saved as pending in [`super::state`] before Telegram is told 200, answered in
//! order per conversation, answered again after a restart if the answer was cut off.
//!
//! - `setWebhook` carries a `secret_token` drawn at this start, the same
//!   `allowed_updates` as polling ([`updates::ALLOWED_UPDATES`]), `max_connections`, and
//!   `drop_pending_updates: false`. A Bot API that cannot be reached is waited out like
//!   `getMe` ([`connect::persist`]); a refusal stops the Telegram side alone.
//! - Backpressure: past [`MAX_PENDING`] unanswered updates the route answers 503 and
//!   Telegram re-sends later; nothing is dropped.
//! - At shutdown the webhook is left set: Telegram keeps what arrives meanwhile and
//!   delivers it once the bot is back (with the next start's secret). Starting without
//!   the flag deletes it (see `run`).

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::api::TelegramApi;
use super::{BotCore, MAX_PENDING, Tasks, TelegramError, connect, updates};
use crate::webhook::{Pushed, WebhookInbox, WebhookOutcome, new_secret};

/// Sets the webhook `inbox` describes, with a fresh secret, and returns the bot's end of
/// the inbox (`None` if `shutdown` came first).
pub(super) async fn register(
    api: &TelegramApi,
    inbox: &WebhookInbox,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<mpsc::Receiver<Pushed>>, TelegramError> {
    let secret = new_secret().map_err(TelegramError::Secret)?;
    let config = inbox.config();
    let set = connect::persist(
        "setWebhook",
        || api.set_webhook(&config.url, secret.expose(), config.max_connections),
        shutdown,
    )
    .await?;
    if set.is_none() {
        return Ok(None);
    }
    inbox.set_secret(secret);
    // The path is a secret of its own: only the host is logged.
    tracing::info!(
        host = config.url.host_str().unwrap_or_default(),
        max_connections = config.max_connections,
        "Telegram webhook set: updates arrive on the HTTP API"
    );
    Ok(inbox.take_receiver())
}

/// Waits for the next event of webhook mode and handles it: an update handed over, a
/// task ending. `Break` at shutdown.
pub(super) async fn next(
    bot: &Arc<BotCore>,
    pushed_rx: &mut mpsc::Receiver<Pushed>,
    tasks: &mut Tasks,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> ControlFlow<()> {
    tokio::select! {
        pushed = pushed_rx.recv() => match pushed {
            Some(pushed) => take(bot, pushed, tasks),
            // The inbox is gone: nothing more can arrive.
            None => return ControlFlow::Break(()),
        },
        Some(joined) = tasks.set.join_next_with_id() => bot.reap(joined, tasks),
        () = &mut *shutdown => return ControlFlow::Break(()),
    }
    ControlFlow::Continue(())
}

/// Saves a pushed update as pending and starts answering it; the verdict goes back once
/// it is on disk.
fn take(bot: &Arc<BotCore>, pushed: Pushed, tasks: &mut Tasks) {
    let Pushed { update, verdict } = pushed;
    // The route hands over only objects with an `update_id`, which `read` always reads.
    let Some(update) = updates::read(update) else {
        let _ = verdict.send(WebhookOutcome::BadRequest);
        return;
    };
    if bot.state().pending_len() >= MAX_PENDING {
        let _ = verdict.send(WebhookOutcome::Busy);
        return;
    }
    let received = Instant::now();
    let update_id = update.id.0;
    let batch = bot.state().receive_pushed(update);
    let outcome = if batch.fresh.is_empty() {
        tracing::info!(update_id, "an update received before was dropped");
        WebhookOutcome::Duplicate
    } else {
        WebhookOutcome::Accepted
    };
    for (seq, update) in batch.fresh {
        bot.dispatch(seq, update, received, tasks);
    }
    let saved = batch.saved;
    tokio::spawn(async move {
        let outcome = match saved.wait().await {
            Ok(()) => outcome,
            Err(e) => {
                // Telegram re-sends it; the re-send (a duplicate) waits for the write to be
                // tried again, and gets 200 once it succeeds.
                tracing::error!(error = %e, "cannot save the polling state");
                WebhookOutcome::Busy
            }
        };
        let _ = verdict.send(outcome);
    });
}
