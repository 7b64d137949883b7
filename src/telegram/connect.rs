//! Reaching the Bot API at start: `getMe` until it answers. A network that is not up yet
//! after a boot, a DNS failure, a timeout, a 5xx or flood control is waited out with
//! backoff for as long as it lasts — the HTTP API and the local engine serve meanwhile —;
//! only a refusal (the token rejected) ends it, and stops the Telegram side alone. Webhook
//! mode's `setWebhook` is waited out the same way ([`persist`]).

use std::time::Duration;

use teloxide::types::Me;
use tokio::time::Instant;

use super::api::{ApiCallError, TelegramApi};
use crate::link::{LinkState, TelegramLink};

/// The first pause after a failed `getMe`; doubled up to [`super::MAX_POLL_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Who the bot is, once the Bot API answers (`None` if `shutdown` came first). Marks
/// `link` connected, and logs one line when it is.
pub(super) async fn identify(
    api: &TelegramApi,
    link: &TelegramLink,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<Me>, ApiCallError> {
    let started = Instant::now();
    let Some((me, failures)) = persist("getMe", || api.get_me(), shutdown).await? else {
        return Ok(None);
    };
    link.set(LinkState::Connected);
    tracing::info!(
        bot = %me.user.username.as_deref().unwrap_or_default(),
        failed_attempts = failures,
        waited_s = started.elapsed().as_secs(),
        "Telegram bot connected"
    );
    Ok(Some(me))
}

/// Runs `call` until it succeeds (returns its value and how many attempts failed), fails
/// for good, or `shutdown` comes (`None`): transient failures and flood control are
/// waited out with backoff, however long they last.
pub(super) async fn persist<T, F, Fut>(
    what: &'static str,
    mut call: F,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<(T, u32)>, ApiCallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiCallError>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut failures: u32 = 0;
    loop {
        let result = tokio::select! {
            result = call() => result,
            () = &mut *shutdown => return Ok(None),
        };
        let error = match result {
            Ok(value) => return Ok(Some((value, failures))),
            Err(error) => error,
        };
        if error.is_permanent() {
            return Err(error);
        }
        let wait = match &error {
            ApiCallError::RetryAfter(wait) => *wait,
            _ => {
                let wait = backoff;
                backoff = (backoff * 2).min(super::MAX_POLL_BACKOFF);
                wait
            }
        };
        failures += 1;
        tracing::warn!(
            call = what,
            error = %error,
            attempt = failures,
            wait_s = wait.as_secs(),
            "the Telegram Bot API cannot be reached; retrying (the HTTP API serves meanwhile)"
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut *shutdown => return Ok(None),
        }
    }
}
