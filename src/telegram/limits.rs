//! Fair use and access at run time: the per-user limits (`--user-messages-per-hour`,
//! `--user-tokens-per-day`), the admins (`--admin-users`), and the allow-list changes made
//! with `/allow` and `/deny` on top of `--allowed-users`.
//!
//! # Before anything is queued
//! A message for the model is admitted (or refused) while its update is routed, before it
//! enters its chat's queue: a refused message costs a short reply and nothing else — no
//! queue place, no engine slot, no cloud call. Admission is one step under one lock
//! (check the user's windows, count the message), so two messages can never both take the
//! last place; the count is keyed by the user's id, so a user in many groups is one user.
//!
//! # Durable
//! The windows live in memory (the source of truth, like the polling state) and every
//! message admitted and every answer's tokens are written as rows of the conversation
//! store (its one writer thread); at start the windows are rebuilt from the rows of the
//! last day, so a restart forgets nothing. `/allow` and `/deny` are written before they
//! take effect.
//!
//! # Time
//! [`Clock`] is the wall clock read once at start plus tokio's monotonic time since: a
//! clock step does not open or close a window, and tests can pause and advance time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Tasks;
use super::incoming::Origin;
use super::state::Seq;
use crate::config::AllowedUser;
use crate::conversation::{ConversationStore, StoreError};
use crate::i18n::{self, Lang};
use crate::usage::{self, Exceeded, LimitKind, Summary, UserLimits, Window};

/// Seconds since the Unix epoch, steady within a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    unix_at_start: i64,
    start: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        let unix_at_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Self {
            unix_at_start,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock {
    /// Now, in Unix seconds.
    pub fn now(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_secs()).unwrap_or(i64::MAX);
        self.unix_at_start.saturating_add(elapsed)
    }
}

/// Who sent an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The Telegram user id.
    pub id: u64,
    /// The username, if any.
    pub username: Option<String>,
}

impl Sender {
    /// The sender of `update`, if it has one.
    pub fn of(update: &teloxide::types::Update) -> Option<Self> {
        update.from().map(|user| Self {
            id: user.id.0,
            username: user.username.clone(),
        })
    }

    fn matches(&self, entry: &AllowedUser) -> bool {
        match entry {
            AllowedUser::Id(id) => *id == self.id,
            AllowedUser::Username(name) => self
                .username
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(name)),
        }
    }

    fn user_key(&self) -> i64 {
        i64::try_from(self.id).unwrap_or(i64::MAX)
    }
}

/// How an access override is stored: `id:123` or `name:alice`.
fn override_key(entry: &AllowedUser) -> String {
    match entry {
        AllowedUser::Id(id) => format!("id:{id}"),
        AllowedUser::Username(name) => format!("name:{name}"),
    }
}

fn parse_override_key(key: &str) -> Option<AllowedUser> {
    if let Some(id) = key.strip_prefix("id:") {
        return id.parse().ok().map(AllowedUser::Id);
    }
    key.strip_prefix("name:")
        .map(|name| AllowedUser::Username(name.to_string()))
}

#[derive(Debug, Default)]
struct Inner {
    windows: HashMap<i64, Window>,
    /// `/allow` (true) and `/deny` (false), newest decision per entry.
    overrides: Vec<(AllowedUser, bool)>,
    /// Admissions since the windows were last swept.
    since_sweep: usize,
}

/// Sweep empty windows after this many admissions.
const SWEEP_EVERY: usize = 1024;

/// The per-user limits, admins and run-time access list.
#[derive(Debug)]
pub struct FairUse {
    limits: UserLimits,
    admins: Vec<AllowedUser>,
    allowed: Vec<AllowedUser>,
    store: ConversationStore,
    clock: Clock,
    inner: Mutex<Inner>,
}

impl FairUse {
    /// Loads the windows of the last day and the access changes from `store`.
    pub async fn load(
        store: ConversationStore,
        allowed: Vec<AllowedUser>,
        admins: Vec<AllowedUser>,
        limits: UserLimits,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let now = clock.now();
        let windows = store
            .run(move |conn| usage::load_windows(conn, now))
            .await?;
        let overrides = store
            .run(|conn| usage::load_access(conn))
            .await?
            .into_iter()
            .filter_map(|(key, allowed)| parse_override_key(&key).map(|who| (who, allowed)))
            .collect();
        Ok(Self {
            limits,
            admins,
            allowed,
            store,
            clock,
            inner: Mutex::new(Inner {
                windows,
                overrides,
                since_sweep: 0,
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `sender` is an admin.
    pub fn is_admin(&self, sender: &Sender) -> bool {
        self.admins.iter().any(|a| sender.matches(a))
    }

    /// The `/allow` or `/deny` decision about `sender`, if any.
    fn decision(&self, sender: &Sender) -> Option<bool> {
        let inner = self.inner();
        // An id decision outranks a name decision (names can change hands).
        let by = |want_id: bool| {
            inner
                .overrides
                .iter()
                .find(|(who, _)| {
                    matches!(who, AllowedUser::Id(_)) == want_id && sender.matches(who)
                })
                .map(|(_, allowed)| *allowed)
        };
        by(true).or_else(|| by(false))
    }

    /// The allow-list to classify `sender`'s update with: everyone for admins and users
    /// `/allow`ed at run time, else `--allowed-users`.
    pub fn allowed_for(&self, sender: Option<&Sender>) -> &[AllowedUser] {
        match sender {
            Some(s) if self.is_admin(s) || self.decision(s) == Some(true) => &[],
            _ => &self.allowed,
        }
    }

    /// Whether `sender` was `/deny`ed (admins never are).
    pub fn denied(&self, sender: Option<&Sender>) -> bool {
        sender.is_some_and(|s| !self.is_admin(s) && self.decision(s) == Some(false))
    }

    /// Admits one message of `sender` in `chat` for the model, or says when they may write
    /// again. Admins are counted but never refused.
    pub fn admit(&self, sender: &Sender, chat: i64) -> Result<(), Exceeded> {
        let now = self.clock.now();
        let user = sender.user_key();
        let exempt = self.is_admin(sender);
        {
            let mut inner = self.inner();
            inner.since_sweep += 1;
            if inner.since_sweep >= SWEEP_EVERY {
                inner.since_sweep = 0;
                inner.windows.retain(|_, w| {
                    w.expire(now);
                    !w.is_empty()
                });
            }
            let window = inner.windows.entry(user).or_default();
            if exempt {
                window.expire(now);
                window.record_message(now);
            } else {
                window.admit(self.limits, now)?;
            }
        }
        self.write(move |conn| usage::insert(conn, user, chat, now, 1, 0, None));
        Ok(())
    }

    /// Counts the tokens an answer cost `sender` in `chat`.
    pub fn spent(&self, sender: &Sender, chat: i64, provider: &'static str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = self.clock.now();
        let user = sender.user_key();
        self.inner()
            .windows
            .entry(user)
            .or_default()
            .record_tokens(now, tokens);
        self.write(move |conn| usage::insert(conn, user, chat, now, 0, tokens, Some(provider)));
    }

    /// Writes a row in the background (the store's thread keeps the order of arrival).
    fn write(
        &self,
        op: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<()> + Send + 'static,
    ) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.run(op).await {
                tracing::error!(error = %e, "cannot save a usage row");
            }
        });
    }

    /// `sender`'s figures: messages in the last hour, tokens in the last day.
    pub fn usage(&self, sender: &Sender) -> (usize, u64) {
        let now = self.clock.now();
        self.inner()
            .windows
            .get(&sender.user_key())
            .map_or((0, 0), |w| (w.messages(now), w.tokens(now)))
    }

    /// The last day for the owner.
    pub async fn summary(&self) -> Result<Summary, StoreError> {
        let now = self.clock.now();
        self.store.run(move |conn| usage::summary(conn, now)).await
    }

    /// `/allow` (`allowed`) or `/deny` `who`, durably, then in effect.
    pub async fn set_access(&self, who: AllowedUser, allowed: bool) -> Result<(), StoreError> {
        let key = override_key(&who);
        let now = self.clock.now();
        self.store
            .run(move |conn| usage::set_access(conn, &key, allowed, now))
            .await?;
        let mut inner = self.inner();
        inner.overrides.retain(|(w, _)| *w != who);
        inner.overrides.push((who, allowed));
        Ok(())
    }

    /// The limits.
    pub fn limits(&self) -> UserLimits {
        self.limits
    }

    /// Now, by this clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }
}

impl super::BotCore {
    /// `/stats all` (admins): the last day's figures.
    pub(super) fn stats_all(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        tasks: &mut Tasks,
    ) {
        let bot = Arc::clone(self);
        let lang = origin.lang;
        let text = async move {
            match bot.fair.summary().await {
                Ok(summary) => summary_text(lang, &summary),
                Err(_) => i18n::history_unavailable(lang).to_string(),
            }
        };
        self.reply(seq, update_id, origin, text, tasks);
    }

    /// `/allow` (`allowed`) or `/deny` `who` (admins).
    pub(super) fn access(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        who: &str,
        allowed: bool,
        tasks: &mut Tasks,
    ) {
        let lang = origin.lang;
        let entry = match AllowedUser::parse(who) {
            Ok(Some(entry)) => entry,
            _ => {
                let text = std::future::ready(access_usage(lang).to_string());
                return self.reply(seq, update_id, origin, text, tasks);
            }
        };
        let bot = Arc::clone(self);
        let text = async move {
            match bot.fair.set_access(entry.clone(), allowed).await {
                Ok(()) => {
                    tracing::info!(allowed, "access changed at run time");
                    access_done(lang, &entry, allowed)
                }
                Err(_) => i18n::history_unavailable(lang).to_string(),
            }
        };
        self.reply(seq, update_id, origin, text, tasks);
    }

    /// `None` when `sender`'s message may go to the model (and is counted); else the
    /// polite refusal, in the user's language, saying when they may write again.
    pub(super) fn admission(&self, sender: Option<&Sender>, origin: &Origin) -> Option<String> {
        let sender = sender?;
        match self.fair.admit(sender, origin.chat_id) {
            Ok(()) => None,
            Err(exceeded) => {
                tracing::info!(
                    chat = origin.chat_id,
                    user = sender.id,
                    limit = ?exceeded.kind,
                    wait_s = exceeded.until - self.fair.now(),
                    "over a per-user limit; refused before queueing"
                );
                Some(refusal(origin.lang, &exceeded, self.fair.now()))
            }
        }
    }
}

/// "HH:MM UTC" of a Unix time.
fn clock_time(unix: i64) -> String {
    let day = unix.rem_euclid(86_400);
    format!("{:02}:{:02} UTC", day / 3600, day % 3600 / 60)
}

/// A wait, rounded up to whole minutes, in words.
fn wait_words(lang: Lang, seconds: i64) -> String {
    let minutes = (seconds.max(1) + 59) / 60;
    let (hours, minutes) = (minutes / 60, minutes % 60);
    match lang {
        Lang::En => match (hours, minutes) {
            (0, m) => format!("{m} min"),
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        Lang::Ru => match (hours, minutes) {
            (0, m) => format!("{m} мин"),
            (h, 0) => format!("{h} ч"),
            (h, m) => format!("{h} ч {m} мин"),
        },
    }
}

/// The polite refusal of a message over a limit, saying when to write again.
pub fn refusal(lang: Lang, exceeded: &Exceeded, now: i64) -> String {
    let wait = wait_words(lang, exceeded.until - now);
    let at = clock_time(exceeded.until);
    match (lang, exceeded.kind) {
        (Lang::En, LimitKind::Messages) => format!(
            "Sorry, you have reached the limit of {} messages per hour, so that everyone gets a turn. You can write again in {wait} (at {at}).",
            exceeded.limit
        ),
        (Lang::En, LimitKind::Tokens) => format!(
            "Sorry, you have used today's budget of {} tokens, so that everyone gets a turn. You can write again in {wait} (at {at}).",
            exceeded.limit
        ),
        (Lang::Ru, LimitKind::Messages) => format!(
            "Извините, вы достигли лимита в {} сообщений в час — так очередь доходит до всех. Написать снова можно через {wait} (в {at}).",
            exceeded.limit
        ),
        (Lang::Ru, LimitKind::Tokens) => format!(
            "Извините, вы израсходовали суточный лимит в {} токенов — так очередь доходит до всех. Написать снова можно через {wait} (в {at}).",
            exceeded.limit
        ),
    }
}

/// `/usage`: a user's own figures.
pub fn usage_text(
    lang: Lang,
    messages: usize,
    tokens: u64,
    limits: UserLimits,
    admin: bool,
) -> String {
    let of = |n: u64| match (n, lang) {
        (0, Lang::En) => " (no limit)".to_string(),
        (0, Lang::Ru) => " (без лимита)".to_string(),
        (n, Lang::En) => format!(" of {n}"),
        (n, Lang::Ru) => format!(" из {n}"),
    };
    let (messages_limit, tokens_limit) = if admin {
        (0, 0)
    } else {
        (u64::from(limits.messages_per_hour), limits.tokens_per_day)
    };
    match lang {
        Lang::En => format!(
            "Your usage:\nMessages in the last hour: {messages}{}\nTokens in the last 24 hours: {tokens}{}",
            of(messages_limit),
            of(tokens_limit)
        ),
        Lang::Ru => format!(
            "Ваше использование:\nСообщений за последний час: {messages}{}\nТокенов за последние 24 часа: {tokens}{}",
            of(messages_limit),
            of(tokens_limit)
        ),
    }
}

/// `/stats all`: the owner's view of the last day (counts only, never message text).
pub fn summary_text(lang: Lang, summary: &Summary) -> String {
    let providers = if summary.tokens_by_provider.is_empty() {
        "—".to_string()
    } else {
        summary
            .tokens_by_provider
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chats = if summary.top_chats.is_empty() {
        "—".to_string()
    } else {
        summary
            .top_chats
            .iter()
            .map(|(c, n)| format!("{c}: {n}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match lang {
        Lang::En => format!(
            "Last 24 hours:\nActive users: {}\nMessages: {}\nTokens by provider: {providers}\nTop chats by tokens:\n{chats}",
            summary.users, summary.messages
        ),
        Lang::Ru => format!(
            "За последние 24 часа:\nАктивных пользователей: {}\nСообщений: {}\nТокены по поставщикам: {providers}\nЧаты с наибольшим расходом токенов:\n{chats}",
            summary.users, summary.messages
        ),
    }
}

/// Refusal of an admin command to someone who is not an admin.
pub fn admins_only(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Sorry, only the bot's admins can do that.",
        Lang::Ru => "Извините, это могут только администраторы бота.",
    }
}

/// `/allow` or `/deny` without a valid user.
pub fn access_usage(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Write /allow @username or /deny @username (or a numeric user id).",
        Lang::Ru => "Напишите /allow @имя или /deny @имя (или числовой id пользователя).",
    }
}

/// `/allow` or `/deny` done.
pub fn access_done(lang: Lang, who: &AllowedUser, allowed: bool) -> String {
    let who = match who {
        AllowedUser::Id(id) => id.to_string(),
        AllowedUser::Username(name) => format!("@{name}"),
    };
    match (lang, allowed) {
        (Lang::En, true) => format!("{who} may use the bot now."),
        (Lang::En, false) => format!("{who} may no longer use the bot."),
        (Lang::Ru, true) => format!("{who} теперь может пользоваться ботом."),
        (Lang::Ru, false) => format!("{who} больше не может пользоваться ботом."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::HistoryLimits;
    use std::time::Duration;

    fn sender(id: u64, name: &str) -> Sender {
        Sender {
            id,
            username: Some(name.into()),
        }
    }

    async fn fair(limits: UserLimits, store: ConversationStore) -> FairUse {
        FairUse::load(
            store,
            vec![AllowedUser::Id(1)],
            vec![AllowedUser::Username("boss".into())],
            limits,
            Clock::default(),
        )
        .await
        .unwrap()
    }

    /// Lets the background row writes reach the store.
    async fn settle(store: &ConversationStore) {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        store.run(|_| Ok(())).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_window_refuses_until_it_has_room_again() {
        let store = ConversationStore::in_memory(HistoryLimits::default())
            .await
            .unwrap();
        let limits = UserLimits {
            messages_per_hour: 0,
            tokens_per_day: 1000,
        };
        let fair = fair(limits, store.clone()).await;
        let ann = sender(5, "ann");
        fair.admit(&ann, 5).unwrap();
        fair.spent(&ann, 5, "local", 600);
        tokio::time::advance(Duration::from_secs(6 * 3600)).await;
        fair.admit(&ann, -100).unwrap();
        fair.spent(&ann, -100, "groq", 500);
        // Mid-day, over the budget: refused in every chat, until the first answer's tokens
        // are a day old.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let refused = fair.admit(&ann, 5).unwrap_err();
        assert_eq!(refused.kind, LimitKind::Tokens);
        assert_eq!(refused.until - fair.now(), 17 * 3600);
        assert!(fair.admit(&ann, -200).is_err(), "one user in many chats");
        let text = refusal(Lang::Ru, &refused, fair.now());
        assert!(text.contains("17 ч"), "{text}");
        tokio::time::advance(Duration::from_secs(17 * 3600 - 1)).await;
        assert!(fair.admit(&ann, 5).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        fair.admit(&ann, 5).unwrap();
        // Admins are counted, never refused.
        let boss = sender(9, "Boss");
        for _ in 0..3 {
            fair.admit(&boss, 9).unwrap();
            fair.spent(&boss, 9, "local", 5000);
        }
        assert_eq!(fair.usage(&boss), (3, 15_000));
        settle(&store).await;
    }

    #[tokio::test]
    async fn windows_and_access_changes_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let limits = UserLimits {
            messages_per_hour: 2,
            tokens_per_day: 0,
        };
        let bob = sender(7, "bob");
        {
            let store = ConversationStore::open(dir.path(), HistoryLimits::default())
                .await
                .unwrap();
            let fair = fair(limits, store.clone()).await;
            assert_eq!(fair.allowed_for(Some(&bob)), [AllowedUser::Id(1)]);
            fair.set_access(AllowedUser::Username("bob".into()), true)
                .await
                .unwrap();
            assert!(fair.allowed_for(Some(&bob)).is_empty());
            fair.set_access(AllowedUser::Id(8), false).await.unwrap();
            fair.admit(&bob, 7).unwrap();
            fair.admit(&bob, -1).unwrap();
            assert!(fair.admit(&bob, -2).is_err());
            settle(&store).await;
        }
        let store = ConversationStore::open(dir.path(), HistoryLimits::default())
            .await
            .unwrap();
        let fair = fair(limits, store).await;
        assert!(fair.admit(&bob, 7).is_err(), "the window survived");
        assert!(fair.allowed_for(Some(&bob)).is_empty(), "/allow survived");
        assert!(fair.denied(Some(&sender(8, "eve"))), "/deny survived");
        assert!(
            !fair.denied(Some(&sender(8, "boss"))),
            "admins are never denied"
        );
        let summary = fair.summary().await.unwrap();
        assert_eq!((summary.users, summary.messages), (1, 2));
    }

    #[test]
    fn refusals_say_when_in_both_languages() {
        let exceeded = Exceeded {
            kind: LimitKind::Messages,
            limit: 2,
            until: 3600 * 5 + 60 * 7,
        };
        let en = refusal(Lang::En, &exceeded, 3600 * 5);
        assert!(
            en.contains("7 min") && en.contains("05:07 UTC") && en.contains('2'),
            "{en}"
        );
        let ru = refusal(Lang::Ru, &exceeded, 3600 * 5);
        assert!(ru.contains("7 мин") && ru.contains("05:07 UTC"), "{ru}");
        assert_eq!(wait_words(Lang::En, 3600 * 2 + 1), "2 h 1 min");
        assert_eq!(wait_words(Lang::En, 0), "1 min");
    }
}
