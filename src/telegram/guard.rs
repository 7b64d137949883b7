//! The panic boundary of per-update work: a bug triggered by one message must never take
//! the poll loop, the chat's worker or the process down. Pure (no Telegram calls): the
//! caller logs, apologises and marks the update done.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;

/// Runs `work`; a panic inside it becomes `Err` with the panic's message.
pub async fn guarded<T>(work: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|payload| panic_message(payload.as_ref()))
}

/// Runs `work` (synchronous); a panic inside it becomes `Err` with the panic's message.
pub fn guarded_sync<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(work))
        .map_err(|payload| panic_message(payload.as_ref()))
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(guarded(async { 5 }).await, Ok(5));
        let text = String::from("İİ");
        let caught = guarded(async {
            // A str slice inside a character, as `strip_mention` used to do.
            let cut = 1;
            text[..cut].len()
        })
        .await;
        assert!(
            caught
                .as_ref()
                .is_err_and(|m| m.contains("is not a char boundary")),
            "{caught:?}"
        );
        let caught = guarded_sync(|| -> u8 { panic!("boom {}", 7) });
        assert_eq!(caught, Err("boom 7".to_string()));
    }
}
