//! Reaching the Bot API at start: `getMe` until it answers. A network that is not up yet
//! after a boot, a DNS failure, a timeout, a 5xx or flood control is waited out with
//! backoff for as long as it lasts — the HTTP API and the local engine serve meanwhile —;
//! only a refusal (the token rejected) ends it, and stops the Telegram side alone.

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
    let mut backoff = FIRST_BACKOFF;
    let mut failures: u32 = 0;
    loop {
        let result = tokio::select! {
            result = api.get_me() => result,
            () = &mut *shutdown => return Ok(None),
        };
        let error = match result {
            Ok(me) => {
                link.set(LinkState::Connected);
                tracing::info!(
                    bot = %me.user.username.as_deref().unwrap_or_default(),
                    failed_attempts = failures,
                    waited_s = started.elapsed().as_secs(),
                    "Telegram bot connected"
                );
                return Ok(Some(me));
            }
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
