//! Cloud budgets: tokens (prompt + completion, from each API's own `usage`) and requests
//! counted per provider in calendar windows (a UTC day, a UTC month), against the
//! optional budgets of `--groq-daily-tokens`, `--mistral-monthly-tokens`,
//! `--gemini-daily-requests` and `--openai-daily-tokens`; and what the providers' own
//! rate-limit headers say is left (`x-ratelimit-remaining-tokens`,
//! `x-ratelimit-reset-tokens`). The chain asks [`Budgets::admit`] before calling a
//! provider: one past its budget is skipped (`skipped{reason="budget"}`) until its window
//! resets, and one whose headers say its tokens are spent is skipped until they reset —
//! before the 429, not after.
//!
//! The counts are kept across restarts in `--data-dir/budgets.json` (written after each
//! counted reply, atomically). Time is a parameter of the pure parts ([`Window`],
//! [`Tally`]); [`Budgets`] reads a wall clock that follows tokio's (so tests pause it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::chat::Usage;
use crate::config::{Budget, BudgetUnit, BudgetWindow};
use crate::metrics::{BudgetFigures, SkipReason};

/// The file the counts are kept in, under the data dir.
pub const BUDGET_FILE: &str = "budgets.json";

/// Tokens the headers must still allow for a provider to be called: below this, a
/// request is likely to be refused with 429.
pub const MIN_REMAINING_TOKENS: u64 = 2048;

/// The longest wait a `x-ratelimit-reset-tokens` header is believed for.
const MAX_HEADER_RESET: Duration = Duration::from_secs(24 * 3600);

const DAY: u64 = 24 * 3600;

/// The start (Unix seconds) of the window holding `unix`.
pub fn window_start(window: BudgetWindow, unix: u64) -> u64 {
    let day = unix / DAY;
    match window {
        BudgetWindow::Day => day * DAY,
        BudgetWindow::Month => {
            let (y, m, _) = civil_from_days(day);
            days_from_civil(y, m, 1) * DAY
        }
    }
}

/// The end (Unix seconds, exclusive) of the window holding `unix`: when it resets.
pub fn window_end(window: BudgetWindow, unix: u64) -> u64 {
    let start = window_start(window, unix);
    match window {
        BudgetWindow::Day => start + DAY,
        BudgetWindow::Month => {
            let (y, m, _) = civil_from_days(start / DAY);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY
        }
    }
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// (year ≥ 1970, month 1-12, day) → days since 1970-01-01.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A provider's counts in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Start of the window counted (Unix seconds).
    pub window_start: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Requests sent.
    pub requests: u64,
}

impl Tally {
    /// The tally as of `unix`: a new window starts from zero.
    fn roll(&mut self, window: BudgetWindow, unix: u64) {
        let start = window_start(window, unix);
        if start != self.window_start {
            *self = Tally {
                window_start: start,
                ..Tally::default()
            };
        }
    }

    /// What counts against `budget`.
    pub fn used(&self, unit: BudgetUnit) -> u64 {
        match unit {
            BudgetUnit::Tokens => self.prompt_tokens.saturating_add(self.completion_tokens),
            BudgetUnit::Requests => self.requests,
        }
    }
}

/// The rate-limit header pairs honoured (remaining, reset) and how much must be left for
/// a call: tokens for a reply, or one request (Groq's requests per day).
const HEADER_PAIRS: [(&str, &str, u64); 2] = [
    (
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        MIN_REMAINING_TOKENS,
    ),
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        1,
    ),
];

/// What one rate-limit header pair of a provider's last response said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeaderLimit {
    remaining: u64,
    /// When the provider's window resets (Unix milliseconds).
    reset_at_ms: u64,
}

/// One provider's state.
#[derive(Debug)]
struct Account {
    budget: Option<Budget>,
    tally: Tally,
    /// Per [`HEADER_PAIRS`] entry.
    headers: [Option<HeaderLimit>; 2],
}

/// Every provider's counts and budgets; shared by the chain and the HTTP clients.
#[derive(Debug)]
pub struct Budgets {
    accounts: Mutex<BTreeMap<String, Account>>,
    /// Where the counts are kept; `None`: in memory only.
    file: Option<PathBuf>,
    /// Numbers the snapshots to save, so a slow write never overwrites a newer one.
    version: std::sync::atomic::AtomicU64,
    /// The newest version written (held while writing: one write at a time).
    written: std::sync::Arc<Mutex<u64>>,
    /// Wall-clock time at `base` (Unix milliseconds): the clock follows tokio's.
    base_ms: u64,
    base: tokio::time::Instant,
}

/// The counts as saved.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    providers: BTreeMap<String, Tally>,
}

/// Parses a rate-limit reset as Groq and OpenAI send it: a Go-style duration (`7.66s`,
/// `2m59.56s`, `1h2m3s`, `12ms`), or plain seconds (`30`).
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 40 {
        return None;
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0f64;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Budgets {
    /// Budgets for `limits` (provider name → budget), counting in memory only.
    pub fn in_memory(limits: &[(&str, Option<Budget>)]) -> Self {
        Self::new(limits, None, Saved::default())
    }

    /// Budgets for `limits`, with the counts kept in `dir`/[`BUDGET_FILE`] (read now; an
    /// unreadable file is logged and counting starts again).
    pub fn load(limits: &[(&str, Option<Budget>)], dir: &Path) -> Self {
        let file = dir.join(BUDGET_FILE);
        let saved = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %file.display(), error = %e, "cannot read the budget counts; counting from zero");
                Saved::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "cannot read the budget counts; counting from zero");
                Saved::default()
            }
        };
        Self::new(limits, Some(file), saved)
    }

    fn new(limits: &[(&str, Option<Budget>)], file: Option<PathBuf>, mut saved: Saved) -> Self {
        let accounts = limits
            .iter()
            .map(|(name, budget)| {
                let tally = saved.providers.remove(*name).unwrap_or_default();
                (
                    name.to_string(),
                    Account {
                        budget: *budget,
                        tally,
                        headers: [None; 2],
                    },
                )
            })
            .collect();
        Self {
            accounts: Mutex::new(accounts),
            file,
            version: std::sync::atomic::AtomicU64::new(0),
            written: std::sync::Arc::default(),
            base_ms: unix_ms_now(),
            base: tokio::time::Instant::now(),
        }
    }

    /// Wall-clock now, Unix milliseconds (moves with tokio's clock, paused in tests).
    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base_ms.saturating_add(elapsed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Account>> {
        // Each update leaves the counts consistent.
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why `provider` must not be called now, if it must not.
    pub fn admit(&self, provider: &str) -> Option<SkipReason> {
        let now = self.now_ms();
        let mut accounts = self.lock();
        let account = accounts.get_mut(provider)?;
        if let Some(budget) = account.budget {
            account.tally.roll(budget.window, now / 1000);
            if account.tally.used(budget.unit) >= budget.limit {
                return Some(SkipReason::Budget);
            }
        }
        let mut skip = None;
        for (limit, (_, _, floor)) in account.headers.iter_mut().zip(HEADER_PAIRS) {
            match limit {
                Some(l) if now >= l.reset_at_ms => *limit = None,
                Some(l) if l.remaining < floor => skip = Some(SkipReason::RateLimited),
                _ => {}
            }
        }
        skip
    }

    /// `provider` is being sent a request.
    pub fn request_sent(&self, provider: &str) {
        self.update(provider, |tally| tally.requests += 1);
    }

    /// `provider` answered, reporting `usage`.
    pub fn answered(&self, provider: &str, usage: &Usage) {
        self.update(provider, |tally| {
            tally.prompt_tokens += u64::from(usage.prompt_tokens);
            tally.completion_tokens += u64::from(usage.completion_tokens);
        });
    }

    fn update(&self, provider: &str, change: impl FnOnce(&mut Tally)) {
        let now = self.now_ms() / 1000;
        let saved = {
            let mut accounts = self.lock();
            let Some(account) = accounts.get_mut(provider) else {
                return;
            };
            let window = account.budget.map_or(BudgetWindow::Day, |b| b.window);
            account.tally.roll(window, now);
            change(&mut account.tally);
            let version = self
                .version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            self.file.as_ref().map(|_| {
                let providers = accounts
                    .iter()
                    .map(|(name, account)| (name.clone(), account.tally))
                    .collect();
                (version, Saved { providers })
            })
        };
        if let (Some(file), Some((version, saved))) = (self.file.clone(), saved) {
            // Off the async threads, one at a time, each whole (rename); a snapshot older
            // than the one on disk is not written.
            let written = std::sync::Arc::clone(&self.written);
            let write = move || {
                let mut written = written.lock().unwrap_or_else(|e| e.into_inner());
                if *written >= version {
                    return;
                }
                match write_atomically(&file, &saved) {
                    Ok(()) => *written = version,
                    Err(e) => {
                        tracing::warn!(path = %file.display(), error = %e, "cannot save the budget counts");
                    }
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(write)),
                Err(_) => write(),
            }
        }
    }

    /// A response of `provider` carried these headers: remember what they say is left of
    /// its limits (Groq and OpenAI: `x-ratelimit-remaining-tokens` with
    /// `x-ratelimit-reset-tokens`, `x-ratelimit-remaining-requests` with
    /// `x-ratelimit-reset-requests`).
    pub fn observe_headers(&self, provider: &str, headers: &reqwest::header::HeaderMap) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let now = self.now_ms();
        let seen = HEADER_PAIRS.map(|(remaining, reset, _)| {
            let remaining = header(remaining).and_then(|v| v.trim().parse::<u64>().ok())?;
            let reset = header(reset)
                .and_then(parse_reset)
                .unwrap_or(Duration::from_secs(60))
                .min(MAX_HEADER_RESET);
            Some(HeaderLimit {
                remaining,
                reset_at_ms: now
                    .saturating_add(u64::try_from(reset.as_millis()).unwrap_or(u64::MAX)),
            })
        });
        if let Some(account) = self.lock().get_mut(provider) {
            for (slot, seen) in account.headers.iter_mut().zip(seen) {
                if seen.is_some() {
                    *slot = seen;
                }
            }
        }
    }

    /// Every provider's counts and budget now.
    pub fn figures(&self) -> Vec<BudgetFigures> {
        let now = self.now_ms() / 1000;
        let mut accounts = self.lock();
        accounts
            .iter_mut()
            .map(|(name, account)| {
                let window = account.budget.map_or(BudgetWindow::Day, |b| b.window);
                account.tally.roll(window, now);
                let unit = account.budget.map_or(BudgetUnit::Tokens, |b| b.unit);
                BudgetFigures {
                    provider: name.clone(),
                    prompt_tokens: account.tally.prompt_tokens,
                    completion_tokens: account.tally.completion_tokens,
                    requests: account.tally.requests,
                    unit: unit.as_str(),
                    used: account.tally.used(unit),
                    budget: account.budget.map(|b| b.limit),
                    window: window.as_str(),
                    resets_at_unix: window_end(window, now),
                    header_remaining_tokens: account.headers[0].map(|h| h.remaining),
                }
            })
            .collect()
    }
}

fn write_atomically(file: &Path, saved: &Saved) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn calendar_windows() {
        // 2026-12-04T18:20:00Z
        let t = 1_796_408_400;
        assert_eq!(window_start(BudgetWindow::Day, t), 1_796_342_400);
        assert_eq!(window_end(BudgetWindow::Day, t), 1_796_428_800);
        // 2026-12-01 and 2027-01-01
        assert_eq!(window_start(BudgetWindow::Month, t), 1_796_083_200);
        assert_eq!(window_end(BudgetWindow::Month, t), 1_798_761_600);
        // Leap February: 2028-02-10 → 2028-02-01 .. 2028-03-01 (29 days).
        let feb = 1_833_753_600;
        let span = window_end(BudgetWindow::Month, feb) - window_start(BudgetWindow::Month, feb);
        assert_eq!(span, 29 * DAY);
    }

    #[test]
    fn resets_as_groq_and_openai_write_them() {
        let ms = Duration::from_millis;
        assert_eq!(parse_reset("7.66s"), Some(ms(7660)));
        assert_eq!(parse_reset("2m59.56s"), Some(ms(179_560)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("12ms"), Some(ms(12)));
        assert_eq!(parse_reset("30"), Some(Duration::from_secs(30)));
        for bad in ["", "s", "1x", "-1s", "1.2.3s", "m5"] {
            assert_eq!(parse_reset(bad), None, "{bad}");
        }
    }

    proptest! {
        /// Every moment is in exactly one window, which starts at midnight UTC (on the
        /// 1st for months) and is a day, or 28 to 31 days, long.
        #[test]
        fn windows_hold_their_moment(unix in 0u64..4_102_444_800) {
            for window in [BudgetWindow::Day, BudgetWindow::Month] {
                let start = window_start(window, unix);
                let end = window_end(window, unix);
                prop_assert!(start <= unix && unix < end);
                prop_assert_eq!(start % DAY, 0);
                prop_assert_eq!(window_start(window, end), end, "the next window starts at the end");
                prop_assert_eq!(window_start(window, end - 1), start);
                let days = (end - start) / DAY;
                match window {
                    BudgetWindow::Day => prop_assert_eq!(days, 1),
                    BudgetWindow::Month => {
                        prop_assert!((28..=31).contains(&days));
                        prop_assert_eq!(civil_from_days(start / DAY).2, 1);
                    }
                }
            }
        }

        /// Day numbers and dates convert both ways.
        #[test]
        fn civil_dates_round_trip(days in 0u64..200_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        /// Any header text: a duration or none, never a panic.
        #[test]
        fn any_reset_parses_or_not(text in "\\PC{0,24}") {
            let _ = parse_reset(&text);
        }
    }

    fn tokens(prompt: u32, completion: u32) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            ..Usage::default()
        }
    }

    const DAILY_100: Budget = Budget {
        limit: 100,
        unit: BudgetUnit::Tokens,
        window: BudgetWindow::Day,
    };

    #[tokio::test(start_paused = true)]
    async fn a_provider_past_its_budget_is_skipped_until_the_window_resets() {
        let budgets = Budgets::in_memory(&[("groq", Some(DAILY_100)), ("mistral", None)]);
        assert_eq!(budgets.admit("groq"), None);
        budgets.request_sent("groq");
        budgets.answered("groq", &tokens(60, 30));
        assert_eq!(budgets.admit("groq"), None, "90 of 100");
        budgets.answered("groq", &tokens(5, 5));
        assert_eq!(budgets.admit("groq"), Some(SkipReason::Budget));
        budgets.answered("mistral", &tokens(1000, 1000));
        assert_eq!(budgets.admit("mistral"), None, "no budget, only counts");
        let figures = budgets.figures();
        let groq = figures.iter().find(|f| f.provider == "groq").unwrap();
        assert_eq!((groq.used, groq.budget, groq.requests), (100, Some(100), 1));
        let wait = groq.resets_at_unix * 1000 - budgets.now_ms();
        tokio::time::advance(Duration::from_millis(wait - 1)).await;
        assert_eq!(budgets.admit("groq"), Some(SkipReason::Budget));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(budgets.admit("groq"), None, "a new day");
        assert_eq!(budgets.figures()[0].used, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_headers_skip_before_the_429() {
        let budgets = Budgets::in_memory(&[("groq", None)]);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-ratelimit-remaining-tokens", "100".parse().unwrap());
        headers.insert("x-ratelimit-reset-tokens", "7.5s".parse().unwrap());
        budgets.observe_headers("groq", &headers);
        assert_eq!(budgets.admit("groq"), Some(SkipReason::RateLimited));
        tokio::time::advance(Duration::from_millis(7500)).await;
        assert_eq!(budgets.admit("groq"), None);
        headers.insert("x-ratelimit-remaining-tokens", "50000".parse().unwrap());
        budgets.observe_headers("groq", &headers);
        assert_eq!(budgets.admit("groq"), None, "plenty left");
        // Groq's requests per day: none left until the reset.
        headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset-requests", "2m59.56s".parse().unwrap());
        budgets.observe_headers("groq", &headers);
        assert_eq!(budgets.admit("groq"), Some(SkipReason::RateLimited));
        tokio::time::advance(Duration::from_millis(179_560)).await;
        assert_eq!(budgets.admit("groq"), None);
    }

    #[tokio::test]
    async fn counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let limits = [("mistral", Some(DAILY_100))];
        let budgets = Budgets::load(&limits, dir.path());
        budgets.answered("mistral", &tokens(40, 20));
        drop(budgets);
        // The write runs on a blocking thread: wait for it.
        let file = dir.path().join(BUDGET_FILE);
        for _ in 0..200 {
            if std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"prompt_tokens\": 40")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let again = Budgets::load(&limits, dir.path());
        assert_eq!(again.figures()[0].used, 60);
        std::fs::write(&file, b"{not json").unwrap();
        assert_eq!(Budgets::load(&limits, dir.path()).figures()[0].used, 0);
    }
}
