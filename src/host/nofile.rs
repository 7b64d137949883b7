//! The open-file limit (`RLIMIT_NOFILE`): raised at start from the soft limit to the hard
//! one, and the share of it the HTTP server may spend on client connections.
//!
//! Every client connection, outgoing Telegram or provider connection, SQLite file and
//! KV park file takes a file descriptor. systemd starts a service with 1024 (soft) unless
//! its unit says otherwise, while the hard limit it allows is far higher (524288 since
//! systemd 240): any process may raise its own soft limit up to the hard one, so the bot
//! does, and logs both. What the HTTP server may hold is the limit minus a reserve for
//! everything else ([`http_connection_cap`]), so a flood of clients can never take the
//! descriptors the bot needs to reach Telegram, its providers or its files.
//!
//! A leaf: uses nothing of the crate.

/// The open-file limit, as found at start and as left by [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start (`None`: unlimited or unknown).
    pub soft_before: Option<u64>,
    /// The soft limit in force now (`None`: unlimited or unknown).
    pub soft: Option<u64>,
    /// The hard limit (`None`: unlimited or unknown).
    pub hard: Option<u64>,
}

/// The soft limit assumed where the platform cannot tell (systemd's default).
pub const ASSUMED_SOFT_LIMIT: u64 = 1024;
/// The fewest descriptors kept out of the HTTP server's reach.
pub const MIN_RESERVE: u64 = 128;
/// The most descriptors kept out of the HTTP server's reach.
pub const MAX_RESERVE: u64 = 1024;
/// The most client connections held at once, whatever the limit: each holds buffers
/// (up to the HTTP server's 64 KiB read buffer), so memory bounds them too.
pub const MAX_HTTP_CONNECTIONS: usize = 4096;

/// Below this soft limit (after raising) the bot warns: a few hundred clients, chats and
/// files at once would exhaust it.
pub const LOW_LIMIT: u64 = 4096;

/// A limit as the log shows it.
pub fn show(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_string(), |limit| limit.to_string())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and says what it found and left.
/// Never fails: a limit that cannot be raised stays as it was (and is reported so).
pub fn raise() -> NofileLimit {
    imp::raise()
}

#[cfg(unix)]
mod imp {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    use super::NofileLimit;

    pub(super) fn raise() -> NofileLimit {
        let before = getrlimit(Resource::Nofile);
        if before.current == before.maximum {
            return NofileLimit {
                soft_before: before.current,
                soft: before.current,
                hard: before.maximum,
            };
        }
        let wanted = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        // An unlimited hard limit (macOS) cannot be the soft one: leave it as it is.
        let _ = setrlimit(Resource::Nofile, wanted);
        let after = getrlimit(Resource::Nofile);
        NofileLimit {
            soft_before: before.current,
            soft: after.current,
            hard: after.maximum,
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use super::NofileLimit;

    pub(super) fn raise() -> NofileLimit {
        NofileLimit {
            soft_before: None,
            soft: None,
            hard: None,
        }
    }
}

impl NofileLimit {
    /// The descriptors kept for everything but client connections under this limit.
    pub fn reserve(&self) -> u64 {
        reserve(self.soft.unwrap_or(u64::MAX))
    }

    /// The most client connections the HTTP server holds at once under this limit.
    pub fn http_connection_cap(&self) -> usize {
        http_connection_cap(self.soft)
    }
}

/// The descriptors kept out of the HTTP server's reach under a soft limit of `soft`: a
/// quarter of it, at least [`MIN_RESERVE`] and at most [`MAX_RESERVE`] (outgoing
/// connections to Telegram and the providers — one per chat being answered at most —,
/// the SQLite files, park files, the model file while it loads, and the runtime's own).
pub fn reserve(soft: u64) -> u64 {
    (soft / 4).clamp(MIN_RESERVE, MAX_RESERVE)
}

/// The most client connections the HTTP server holds at once under a soft limit of
/// `soft` (`None`: unlimited): the limit minus [`reserve`], never below half the limit
/// (a tiny limit still serves someone), at least 1, at most [`MAX_HTTP_CONNECTIONS`].
pub fn http_connection_cap(soft: Option<u64>) -> usize {
    let Some(soft) = soft else {
        return MAX_HTTP_CONNECTIONS;
    };
    let cap = soft.saturating_sub(reserve(soft)).max(soft / 2).max(1);
    usize::try_from(cap).map_or(MAX_HTTP_CONNECTIONS, |cap| cap.min(MAX_HTTP_CONNECTIONS))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn systemd_default_leaves_a_quarter() {
        assert_eq!(http_connection_cap(Some(1024)), 768);
        assert_eq!(http_connection_cap(Some(524_288)), MAX_HTTP_CONNECTIONS);
        assert_eq!(http_connection_cap(None), MAX_HTTP_CONNECTIONS);
        assert_eq!(http_connection_cap(Some(0)), 1);
        assert_eq!(http_connection_cap(Some(100)), 50);
    }

    #[test]
    fn raising_is_idempotent() {
        let first = raise();
        let second = raise();
        assert_eq!(second.soft, first.soft);
        assert_eq!(second.soft_before, first.soft);
        assert_eq!(second.hard, first.hard);
    }

    proptest! {
        #[test]
        fn the_cap_leaves_room_and_grows_with_the_limit(soft in 0u64..10_000_000) {
            let cap = http_connection_cap(Some(soft)) as u64;
            prop_assert!(cap >= 1);
            prop_assert!(cap <= MAX_HTTP_CONNECTIONS as u64);
            // Beyond tiny limits, the reserve is always left free.
            if soft >= 2 * MIN_RESERVE {
                prop_assert!(cap + reserve(soft) <= soft);
            }
            prop_assert!(http_connection_cap(Some(soft + 1)) as u64 >= cap);
        }
    }
}
