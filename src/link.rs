//! Whether the bot reaches the Telegram Bot API: set by the Telegram front end, shown by
//! `/ready` (neither imports the other). A leaf.
//!
//! Telegram being unreachable never stops the process: the front end keeps trying with
//! backoff while the HTTP API and the local engine serve, so `/ready` keeps its meaning
//! (the engine can answer) and says here whether Telegram is connected too.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where the bot stands with the Bot API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not reached yet since start (`getMe` is being retried).
    Connecting,
    /// The last call reached it.
    Connected,
    /// Reached before, failing now (network, DNS, timeout, 5xx); being retried.
    Reconnecting,
    /// The Telegram side stopped for good (the token was rejected).
    Stopped,
}

impl LinkState {
    /// The name `/ready` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Reconnecting => "reconnecting",
            LinkState::Stopped => "stopped",
        }
    }
}

/// The bot's link to the Bot API; cheap to clone, all clones share it.
#[derive(Debug, Clone)]
pub struct TelegramLink {
    inner: Arc<Mutex<(LinkState, Instant)>>,
}

impl Default for TelegramLink {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new((LinkState::Connecting, Instant::now()))),
        }
    }
}

impl TelegramLink {
    /// The state now, and how long it has lasted.
    pub fn get(&self) -> (LinkState, Duration) {
        let (state, since) = *self.lock();
        (state, since.elapsed())
    }

    /// Whether the last call reached the Bot API.
    pub fn is_connected(&self) -> bool {
        self.get().0 == LinkState::Connected
    }

    /// Moves to `state`; returns the state left and how long it lasted, when it changed.
    pub fn set(&self, state: LinkState) -> Option<(LinkState, Duration)> {
        let mut inner = self.lock();
        let (old, since) = *inner;
        if old == state {
            return None;
        }
        *inner = (state, Instant::now());
        Some((old, since.elapsed()))
    }

    /// A call reached the Bot API; returns how long it was unreachable when that ends a
    /// loss of the link (not at the first connection).
    pub fn reached(&self) -> Option<Duration> {
        match self.set(LinkState::Connected) {
            Some((LinkState::Reconnecting, down)) => Some(down),
            _ => None,
        }
    }

    /// A call failed with a transient error after the link was up.
    pub fn lost(&self) {
        let mut inner = self.lock();
        if inner.0 == LinkState::Connected {
            *inner = (LinkState::Reconnecting, Instant::now());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (LinkState, Instant)> {
        // A pair of plain values: never left half-written.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_is_reported_once_when_it_ends() {
        let link = TelegramLink::default();
        assert_eq!(link.get().0, LinkState::Connecting);
        assert_eq!(link.reached(), None, "the first connection is not a return");
        assert!(link.is_connected());
        link.lost();
        link.lost();
        assert_eq!(link.get().0, LinkState::Reconnecting);
        assert!(link.reached().is_some());
        assert_eq!(link.reached(), None, "reported once");
        link.set(LinkState::Stopped);
        link.lost();
        assert_eq!(link.get().0, LinkState::Stopped);
    }
}
