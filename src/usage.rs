//! Per-user fair use: how many messages a user sent in the last hour and how many tokens
//! (prompt + completion, every provider) their answers cost in the last day, as sliding
//! windows; when a user over a limit may write again; and the rows that keep it all across
//! restarts in the conversation store (tables `usage_events` and `access_overrides`).
//!
//! The window arithmetic is pure ([`Window`], [`messages_reopen`], [`tokens_reopen`]) and
//! property-tested. The SQL functions run on the store's one thread.
//!
//! A leaf module: `rusqlite` only.

use std::collections::{HashMap, VecDeque};

use rusqlite::{Connection, params};

/// The message window, in seconds.
pub const HOUR: i64 = 3600;
/// The token window, in seconds.
pub const DAY: i64 = 24 * HOUR;
/// How long usage rows are kept (two token windows: `/stats all` reports the last day).
const KEEP: i64 = 2 * DAY;
/// Most events kept in memory per user and window (a bound for users without limits).
const MAX_EVENTS: usize = 100_000;

/// The store's usage tables, created with the conversation store.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage_events (
     id       INTEGER PRIMARY KEY,
     user     INTEGER NOT NULL,
     chat     INTEGER NOT NULL,
     at       INTEGER NOT NULL,
     messages INTEGER NOT NULL,
     tokens   INTEGER NOT NULL,
     provider TEXT
 );
 CREATE INDEX IF NOT EXISTS usage_by_time ON usage_events (at);
 CREATE TABLE IF NOT EXISTS access_overrides (
     who     TEXT PRIMARY KEY,
     allowed INTEGER NOT NULL,
     updated INTEGER NOT NULL
 );";

/// Per-user limits; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// Messages per sliding hour.
    pub messages_per_hour: u32,
    /// Tokens per sliding day.
    pub tokens_per_day: u64,
}

impl UserLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.messages_per_hour > 0 || self.tokens_per_day > 0
    }
}

/// Which limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Messages per hour.
    Messages,
    /// Tokens per day.
    Tokens,
}

/// A limit reached, and when the user may write again (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// Which limit.
    pub kind: LimitKind,
    /// Its value.
    pub limit: u64,
    /// When the window has room again.
    pub until: i64,
}

/// When the messages sent at `times` (oldest first) leave room for one more under `limit`
/// within an hour of each: `None` when there is room at `now`. An event at `t` counts
/// while `now < t + HOUR`.
pub fn messages_reopen(times: &VecDeque<i64>, limit: u32, now: i64) -> Option<i64> {
    if limit == 0 {
        return None;
    }
    let live: Vec<i64> = times.iter().copied().filter(|&t| now < t + HOUR).collect();
    let limit = limit as usize;
    if live.len() < limit {
        return None;
    }
    // When the (n - limit + 1)-th oldest leaves, limit - 1 remain.
    Some(live[live.len() - limit] + HOUR)
}

/// When the tokens spent at `events` (time, tokens; oldest first) fall below `limit`
/// within a day of each: `None` when they are below it at `now`.
pub fn tokens_reopen(events: &VecDeque<(i64, u64)>, limit: u64, now: i64) -> Option<i64> {
    if limit == 0 {
        return None;
    }
    let live: Vec<(i64, u64)> = events
        .iter()
        .copied()
        .filter(|&(t, _)| now < t + DAY)
        .collect();
    let mut sum: u64 = live.iter().map(|&(_, n)| n).fold(0, u64::saturating_add);
    if sum < limit {
        return None;
    }
    let mut reopen = now;
    for (t, n) in live {
        // Events are dropped oldest first until the rest is under the limit.
        sum = sum.saturating_sub(n);
        reopen = t + DAY;
        if sum < limit {
            break;
        }
    }
    Some(reopen)
}

/// One user's recent usage, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// When each message was admitted (the last hour).
    messages: VecDeque<i64>,
    /// Tokens spent, and when (the last day).
    tokens: VecDeque<(i64, u64)>,
}

impl Window {
    /// Forgets what is out of both windows at `now`.
    pub fn expire(&mut self, now: i64) {
        while self.messages.front().is_some_and(|&t| t + HOUR <= now) {
            self.messages.pop_front();
        }
        while self.tokens.front().is_some_and(|&(t, _)| t + DAY <= now) {
            self.tokens.pop_front();
        }
    }

    /// Whether nothing is left in either window.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.tokens.is_empty()
    }

    /// Messages in the last hour.
    pub fn messages(&self, now: i64) -> usize {
        self.messages.iter().filter(|&&t| now < t + HOUR).count()
    }

    /// Tokens in the last day.
    pub fn tokens(&self, now: i64) -> u64 {
        self.tokens
            .iter()
            .filter(|&&(t, _)| now < t + DAY)
            .map(|&(_, n)| n)
            .fold(0, u64::saturating_add)
    }

    /// Whether one more message fits `limits` at `now`.
    pub fn check(&self, limits: UserLimits, now: i64) -> Result<(), Exceeded> {
        if let Some(until) = messages_reopen(&self.messages, limits.messages_per_hour, now) {
            return Err(Exceeded {
                kind: LimitKind::Messages,
                limit: u64::from(limits.messages_per_hour),
                until,
            });
        }
        if let Some(until) = tokens_reopen(&self.tokens, limits.tokens_per_day, now) {
            return Err(Exceeded {
                kind: LimitKind::Tokens,
                limit: limits.tokens_per_day,
                until,
            });
        }
        Ok(())
    }

    /// Checks one more message against `limits` and, if it fits, counts it: one step,
    /// so two messages can never both take the last place.
    pub fn admit(&mut self, limits: UserLimits, now: i64) -> Result<(), Exceeded> {
        self.expire(now);
        self.check(limits, now)?;
        self.record_message(now);
        Ok(())
    }

    /// Counts a message (admins too: their figures show in `/usage` and `/stats all`).
    pub fn record_message(&mut self, at: i64) {
        if self.messages.len() >= MAX_EVENTS {
            self.messages.pop_front();
        }
        self.messages.push_back(at);
    }

    /// Counts tokens spent at `at`.
    pub fn record_tokens(&mut self, at: i64, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if self.tokens.len() >= MAX_EVENTS {
            self.tokens.pop_front();
        }
        self.tokens.push_back((at, tokens));
    }
}

/// Keeps one usage row: `messages` admitted and `tokens` spent by `user` in `chat`.
pub fn insert(
    conn: &Connection,
    user: i64,
    chat: i64,
    at: i64,
    messages: u32,
    tokens: u64,
    provider: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO usage_events (user, chat, at, messages, tokens, provider)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        user,
        chat,
        at,
        messages,
        i64::try_from(tokens).unwrap_or(i64::MAX),
        provider
    ])?;
    conn.prepare_cached("DELETE FROM usage_events WHERE at < ?1")?
        .execute(params![at - KEEP])?;
    Ok(())
}

/// Every user's windows at `now`, from the rows (after a restart).
pub fn load_windows(conn: &Connection, now: i64) -> rusqlite::Result<HashMap<i64, Window>> {
    let mut windows: HashMap<i64, Window> = HashMap::new();
    let mut statement = conn.prepare(
        "SELECT user, at, messages, tokens FROM usage_events WHERE at > ?1 ORDER BY at, id",
    )?;
    let rows = statement.query_map(params![now - DAY], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (user, at, messages, tokens) = row?;
        let window = windows.entry(user).or_default();
        for _ in 0..messages.clamp(0, 1000) {
            window.record_message(at);
        }
        window.record_tokens(at, u64::try_from(tokens).unwrap_or(0));
    }
    for window in windows.values_mut() {
        window.expire(now);
    }
    windows.retain(|_, w| !w.is_empty());
    Ok(windows)
}

/// The owner's view of the last day (`/stats all`): no message text, only counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Users who sent a message.
    pub users: u64,
    /// Messages admitted.
    pub messages: u64,
    /// Tokens by provider, most first.
    pub tokens_by_provider: Vec<(String, u64)>,
    /// The chats that spent the most tokens, most first (at most 5).
    pub top_chats: Vec<(i64, u64)>,
}

/// The last day's [`Summary`].
pub fn summary(conn: &Connection, now: i64) -> rusqlite::Result<Summary> {
    let since = now - DAY;
    let (users, messages): (i64, i64) = conn.query_row(
        "SELECT COUNT(DISTINCT CASE WHEN messages > 0 THEN user END), COALESCE(SUM(messages), 0)
         FROM usage_events WHERE at > ?1",
        params![since],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let pairs = |sql: &str| -> rusqlite::Result<Vec<(rusqlite::types::Value, i64)>> {
        let mut statement = conn.prepare(sql)?;
        let rows = statement.query_map(params![since], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    };
    let tokens_by_provider = pairs(
        "SELECT COALESCE(provider, '?'), SUM(tokens) AS n FROM usage_events
         WHERE at > ?1 AND tokens > 0 GROUP BY 1 ORDER BY n DESC LIMIT 20",
    )?
    .into_iter()
    .map(|(provider, n)| {
        let name = match provider {
            rusqlite::types::Value::Text(text) => text,
            _ => "?".into(),
        };
        (name, u64::try_from(n).unwrap_or(0))
    })
    .collect();
    let top_chats = pairs(
        "SELECT chat, SUM(tokens) AS n FROM usage_events WHERE at > ?1 AND tokens > 0
         GROUP BY chat ORDER BY n DESC LIMIT 5",
    )?
    .into_iter()
    .map(|(chat, n)| {
        let chat = match chat {
            rusqlite::types::Value::Integer(id) => id,
            _ => 0,
        };
        (chat, u64::try_from(n).unwrap_or(0))
    })
    .collect();
    Ok(Summary {
        users: u64::try_from(users).unwrap_or(0),
        messages: u64::try_from(messages).unwrap_or(0),
        tokens_by_provider,
        top_chats,
    })
}

/// The run-time allow-list changes (`/allow`, `/deny`): who (`id:123` or `name:alice`) and
/// whether they are allowed.
pub fn load_access(conn: &Connection) -> rusqlite::Result<Vec<(String, bool)>> {
    let mut statement = conn.prepare("SELECT who, allowed FROM access_overrides ORDER BY who")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? != 0)))?;
    rows.collect()
}

/// Records `/allow` (`allowed`) or `/deny` of `who`.
pub fn set_access(conn: &Connection, who: &str, allowed: bool, now: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO access_overrides (who, allowed, updated) VALUES (?1, ?2, ?3)
         ON CONFLICT (who) DO UPDATE SET allowed = ?2, updated = ?3",
        params![who, i64::from(allowed), now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    #[test]
    fn the_third_message_of_two_per_hour_waits_for_the_first_to_age_out() {
        let limits = UserLimits {
            messages_per_hour: 2,
            tokens_per_day: 0,
        };
        let mut window = Window::default();
        assert!(window.admit(limits, 1000).is_ok());
        assert!(window.admit(limits, 1500).is_ok());
        let refused = window.admit(limits, 2000).unwrap_err();
        assert_eq!(refused.kind, LimitKind::Messages);
        assert_eq!(refused.until, 1000 + HOUR);
        assert_eq!(window.messages(2000), 2, "a refused message is not counted");
        assert!(window.admit(limits, 1000 + HOUR - 1).is_err());
        assert!(window.admit(limits, 1000 + HOUR).is_ok());
    }

    #[test]
    fn tokens_over_the_day_refuse_until_enough_age_out() {
        let limits = UserLimits {
            messages_per_hour: 0,
            tokens_per_day: 100,
        };
        let mut window = Window::default();
        assert!(window.admit(limits, 0).is_ok());
        window.record_tokens(10, 60);
        window.record_tokens(20, 50);
        let refused = window.admit(limits, 30).unwrap_err();
        assert_eq!((refused.kind, refused.until), (LimitKind::Tokens, 10 + DAY));
        assert!(window.admit(limits, 10 + DAY).is_ok());
    }

    #[test]
    fn rows_survive_and_rebuild_the_windows() {
        let conn = db();
        insert(&conn, 7, -100, 1000, 1, 0, None).unwrap();
        insert(&conn, 7, 7, 1001, 0, 40, Some("local")).unwrap();
        insert(&conn, 8, 8, 1002, 1, 0, None).unwrap();
        insert(&conn, 8, 8, 1003, 0, 5, Some("groq")).unwrap();
        let windows = load_windows(&conn, 2000).unwrap();
        assert_eq!(windows[&7].messages(2000), 1);
        assert_eq!(windows[&7].tokens(2000), 40);
        let summary = summary(&conn, 2000).unwrap();
        assert_eq!(summary.users, 2);
        assert_eq!(summary.messages, 2);
        assert_eq!(
            summary.tokens_by_provider,
            [("local".to_string(), 40), ("groq".to_string(), 5)]
        );
        assert_eq!(summary.top_chats, [(7, 40), (8, 5)]);
        // Old rows go as new ones come.
        insert(&conn, 9, 9, 1004 + KEEP, 1, 0, None).unwrap();
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 1);
        set_access(&conn, "name:bob", false, 1).unwrap();
        set_access(&conn, "name:bob", true, 2).unwrap();
        set_access(&conn, "id:5", false, 3).unwrap();
        assert_eq!(
            load_access(&conn).unwrap(),
            [("id:5".to_string(), false), ("name:bob".to_string(), true)]
        );
    }

    fn sorted(mut times: Vec<i64>) -> Vec<i64> {
        times.sort_unstable();
        times
    }

    proptest! {
        /// The message window: there is room exactly when fewer than `limit` messages are
        /// younger than an hour; the reopening time is the first second with room.
        #[test]
        fn messages_reopen_is_the_first_second_with_room(
            times in prop::collection::vec(0i64..20_000, 0..40).prop_map(sorted),
            limit in 0u32..10,
            now in 0i64..25_000,
        ) {
            let times: VecDeque<i64> = times.into_iter().filter(|&t| t <= now).collect();
            let live = |at: i64| times.iter().filter(|&&t| at < t + HOUR).count();
            match messages_reopen(&times, limit, now) {
                None => prop_assert!(limit == 0 || live(now) < limit as usize),
                Some(at) => {
                    prop_assert!(limit > 0 && live(now) >= limit as usize);
                    prop_assert!(at > now);
                    prop_assert!(live(at) < limit as usize);
                    prop_assert!(live(at - 1) >= limit as usize);
                }
            }
        }

        /// The token window: likewise, with sums.
        #[test]
        fn tokens_reopen_is_the_first_second_under_the_limit(
            times in prop::collection::vec(0i64..200_000, 0..30).prop_map(sorted),
            amounts in prop::collection::vec(0u64..500, 30),
            limit in 0u64..3000,
            now in 0i64..250_000,
        ) {
            let events: VecDeque<(i64, u64)> = times
                .into_iter()
                .zip(amounts)
                .filter(|&(t, _)| t <= now)
                .collect();
            let spent = |at: i64| -> u64 { events.iter().filter(|&&(t, _)| at < t + DAY).map(|&(_, n)| n).sum() };
            match tokens_reopen(&events, limit, now) {
                None => prop_assert!(limit == 0 || spent(now) < limit),
                Some(at) => {
                    prop_assert!(limit > 0 && spent(now) >= limit);
                    prop_assert!(at > now);
                    prop_assert!(spent(at) < limit);
                    prop_assert!(spent(at - 1) >= limit);
                }
            }
        }

        /// Admitting never lets more than `limit` messages into any hour, whatever the
        /// arrival times.
        #[test]
        fn no_hour_ever_holds_more_than_the_limit(
            gaps in prop::collection::vec(0i64..900, 1..80),
            limit in 1u32..6,
        ) {
            let limits = UserLimits { messages_per_hour: limit, tokens_per_day: 0 };
            let mut window = Window::default();
            let mut admitted = Vec::new();
            let mut now = 0;
            for gap in gaps {
                now += gap;
                if window.admit(limits, now).is_ok() {
                    admitted.push(now);
                }
            }
            for &start in &admitted {
                let in_hour = admitted.iter().filter(|&&t| t >= start && t < start + HOUR).count();
                prop_assert!(in_hour <= limit as usize);
            }
        }
    }
}
