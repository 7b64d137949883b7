//! The dashboard's memory: one [`Sample`] every [`SAMPLE_INTERVAL`], kept in a ring of
//! [`HISTORY_LEN`] (an hour), so what the page shows costs a fixed amount of memory however
//! long the process runs. Pure: the sampling task passes in a [`Reading`] of the cumulative
//! counters and the time; [`Sampler::sample`] turns two readings into per-interval rates,
//! and [`History::columns`] turns samples into the compact JSON the page polls.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::engine::EngineStats;
use crate::metrics::{IntervalLatency, KNOWN_PROVIDERS, ProviderSnapshot};
use crate::providers::{BreakerState, HealthStatus};

/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: one hour at [`SAMPLE_INTERVAL`].
pub const HISTORY_LEN: usize = 720;

/// Providers in a sample, in [`KNOWN_PROVIDERS`] order.
const PROVIDERS: usize = KNOWN_PROVIDERS.len();

/// The cumulative figures the sampling task reads at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// Wall-clock time, milliseconds since the Unix epoch (the charts' x axis).
    pub unix_ms: u64,
    /// The engine's figures, once it is loaded.
    pub engine: Option<EngineStats>,
    /// Every provider's counters ([`Metrics::snapshot`](crate::metrics::Metrics::snapshot)).
    pub providers: BTreeMap<&'static str, ProviderSnapshot>,
    /// Replies since the previous reading, with their latencies.
    pub replies: BTreeMap<&'static str, IntervalLatency>,
    /// The chain's providers and their health, once the chain exists.
    pub health: Vec<(&'static str, HealthStatus)>,
    /// Resident memory of the process, in bytes, where the OS tells.
    pub rss_bytes: Option<u64>,
}

/// A provider's breaker at sample time, as the timeline colours it (worst first wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum BreakerCode {
    /// Calls go through.
    Closed = 0,
    /// Skipped while a 429's `Retry-After` lasts.
    RetryAfter = 1,
    /// The breaker lets a probe through.
    HalfOpen = 2,
    /// The breaker is open.
    Open = 3,
}

impl From<&HealthStatus> for BreakerCode {
    fn from(status: &HealthStatus) -> Self {
        match status.breaker {
            BreakerState::Open => BreakerCode::Open,
            BreakerState::HalfOpen => BreakerCode::HalfOpen,
            BreakerState::Closed if !status.retry_after.is_zero() => BreakerCode::RetryAfter,
            BreakerState::Closed => BreakerCode::Closed,
        }
    }
}

/// Per-provider latency percentiles of one interval, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Latency {
    first_text_p50: Option<f32>,
    first_text_p95: Option<f32>,
    reply_p50: Option<f32>,
    reply_p95: Option<f32>,
}

/// One point of every chart: the interval that ended at `unix_ms`. Fixed size apart from
/// `errors`, whose keys are the finite set of error kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Numbers samples from 1, so the page can ask for the ones it has not seen.
    pub seq: u64,
    /// When the interval ended, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    gen_tps: f32,
    prompt_tps: f32,
    prompt_processed: u32,
    prompt_cached: u32,
    slots: u16,
    slots_busy: u16,
    queue_len: u16,
    park_hits_ram: u32,
    park_hits_disk: u32,
    park_misses: u32,
    park_ram_bytes: u64,
    park_disk_bytes: u64,
    rss_bytes: Option<u64>,
    requests: [u32; PROVIDERS],
    skipped: [u32; PROVIDERS],
    latency: [Latency; PROVIDERS],
    /// `None` for a provider not in the chain.
    breaker: [Option<BreakerCode>; PROVIDERS],
    /// Failed attempts in the interval by kind (timeouts as `timeout`), non-zero only.
    errors: Vec<(&'static str, u32)>,
}

/// Turns successive [`Reading`]s into [`Sample`]s: remembers the previous counters.
#[derive(Debug)]
pub struct Sampler {
    previous_at: Instant,
    previous: Reading,
    next_seq: u64,
}

fn delta(now: u64, before: u64) -> u32 {
    u32::try_from(now.saturating_sub(before)).unwrap_or(u32::MAX)
}

fn small(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn ms(value: Option<f64>) -> Option<f32> {
    value.map(|v| v as f32)
}

impl Sampler {
    /// A sampler whose first interval starts at `now`, from zero counters (the process's
    /// counters start at zero when it does).
    pub fn new(now: Instant) -> Self {
        Self {
            previous_at: now,
            previous: Reading::default(),
            next_seq: 1,
        }
    }

    /// The sample of the interval from the previous reading to `reading`, taken at `now`.
    pub fn sample(&mut self, reading: Reading, now: Instant) -> Sample {
        let seconds = now
            .saturating_duration_since(self.previous_at)
            .as_secs_f64();
        let rate = |count: u32| {
            if seconds < 1e-3 {
                0.0
            } else {
                (f64::from(count) / seconds) as f32
            }
        };
        let zero = EngineStats::default();
        let engine = reading.engine.as_ref().unwrap_or(&zero);
        let before = self.previous.engine.as_ref().unwrap_or(&zero);
        let generated = delta(engine.tokens_generated, before.tokens_generated);
        let processed = delta(
            engine.prompt_tokens_processed,
            before.prompt_tokens_processed,
        );
        let no_counts = ProviderSnapshot::default();
        let mut requests = [0; PROVIDERS];
        let mut skipped = [0; PROVIDERS];
        let mut latency = [Latency::default(); PROVIDERS];
        let mut breaker = [None; PROVIDERS];
        let mut errors: BTreeMap<&'static str, u32> = BTreeMap::new();
        for (i, name) in KNOWN_PROVIDERS.iter().enumerate() {
            let now_counts = reading.providers.get(name).unwrap_or(&no_counts);
            let old = self.previous.providers.get(name).unwrap_or(&no_counts);
            requests[i] = delta(now_counts.requests, old.requests);
            skipped[i] = delta(now_counts.skipped, old.skipped);
            for (kind, count) in &now_counts.errors_by_kind {
                let old_count = old.errors_by_kind.get(kind).copied().unwrap_or(0);
                *errors.entry(*kind).or_default() += delta(*count, old_count);
            }
            *errors.entry("timeout").or_default() += delta(now_counts.timeouts, old.timeouts);
            if let Some(replies) = reading.replies.get(name) {
                latency[i] = Latency {
                    first_text_p50: ms(replies.first_text_p50_ms),
                    first_text_p95: ms(replies.first_text_p95_ms),
                    reply_p50: ms(replies.reply_p50_ms),
                    reply_p95: ms(replies.reply_p95_ms),
                };
            }
            breaker[i] = reading
                .health
                .iter()
                .find(|(provider, _)| provider == name)
                .map(|(_, status)| BreakerCode::from(status));
        }
        let sample = Sample {
            seq: self.next_seq,
            unix_ms: reading.unix_ms,
            gen_tps: rate(generated),
            prompt_tps: rate(processed),
            prompt_processed: processed,
            prompt_cached: delta(engine.prompt_tokens_cached, before.prompt_tokens_cached),
            slots: small(engine.slots),
            slots_busy: small(engine.slots_busy),
            queue_len: small(engine.queue_len),
            park_hits_ram: delta(engine.kv_park_hits_ram, before.kv_park_hits_ram),
            park_hits_disk: delta(engine.kv_park_hits_disk, before.kv_park_hits_disk),
            park_misses: delta(engine.kv_park_misses, before.kv_park_misses),
            park_ram_bytes: engine.kv_park_ram_bytes,
            park_disk_bytes: engine.kv_park_disk_bytes,
            rss_bytes: reading.rss_bytes,
            requests,
            skipped,
            latency,
            breaker,
            errors: errors.into_iter().filter(|(_, n)| *n > 0).collect(),
        };
        self.next_seq += 1;
        self.previous_at = now;
        // A provider missing from a reading (the chain not built yet) keeps its old counts.
        let mut providers = std::mem::take(&mut self.previous.providers);
        providers.extend(reading.providers);
        self.previous = Reading {
            providers,
            engine: reading.engine.or(self.previous.engine.take()),
            ..Reading::default()
        };
        sample
    }
}

/// The last hour of samples, oldest first; never more than [`HISTORY_LEN`].
#[derive(Debug)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            samples: VecDeque::with_capacity(HISTORY_LEN),
        }
    }
}

/// The samples after the page's last one, column by column (what uPlot draws from).
#[derive(Debug, Serialize)]
pub struct Columns {
    /// Whether these replace what the page holds (its last sample fell out of the ring,
    /// or it had none) rather than extend it.
    pub reset: bool,
    /// The newest sample's number, for the next `since`.
    pub last_seq: u64,
    /// Seconds between samples.
    pub interval_seconds: u64,
    /// Samples kept.
    pub capacity: usize,
    /// Provider order of the per-provider columns.
    pub providers: [&'static str; PROVIDERS],
    /// Breaker codes: index = [`BreakerCode`] value.
    pub breaker_codes: [&'static str; 4],
    /// End of each interval, seconds since the Unix epoch.
    pub t: Vec<f64>,
    /// Tokens generated per second.
    pub gen_tps: Vec<f32>,
    /// Prompt tokens decoded per second.
    pub prompt_tps: Vec<f32>,
    /// Prompt tokens decoded in the interval.
    pub prompt_processed: Vec<u32>,
    /// Prompt tokens reused from a slot's cache in the interval.
    pub prompt_cached: Vec<u32>,
    /// Engine slots.
    pub slots: Vec<u16>,
    /// Slots busy at sample time.
    pub slots_busy: Vec<u16>,
    /// Requests waiting for a slot at sample time.
    pub queue_len: Vec<u16>,
    /// Parked KV states restored from RAM in the interval.
    pub park_hits_ram: Vec<u32>,
    /// Parked KV states restored from disk in the interval.
    pub park_hits_disk: Vec<u32>,
    /// Requests that found nothing parked, in the interval.
    pub park_misses: Vec<u32>,
    /// Bytes of parked KV state in RAM.
    pub park_ram_bytes: Vec<u64>,
    /// Bytes of parked KV state on disk.
    pub park_disk_bytes: Vec<u64>,
    /// Resident memory, bytes.
    pub rss_bytes: Vec<Option<u64>>,
    /// Attempts per provider in the interval (`[provider][sample]`).
    pub requests: Vec<Vec<u32>>,
    /// Skips (Retry-After, open breaker) per provider.
    pub skipped: Vec<Vec<u32>>,
    /// Median time to first text per provider, ms (`null`: no reply in the interval).
    pub first_text_p50: Vec<Vec<Option<f32>>>,
    /// 95th percentile time to first text per provider, ms.
    pub first_text_p95: Vec<Vec<Option<f32>>>,
    /// Median whole-reply time per provider, ms.
    pub reply_p50: Vec<Vec<Option<f32>>>,
    /// 95th percentile whole-reply time per provider, ms.
    pub reply_p95: Vec<Vec<Option<f32>>>,
    /// Breaker code per provider (`null`: not in the chain).
    pub breaker: Vec<Vec<Option<u8>>>,
    /// Failed attempts by kind.
    pub errors: BTreeMap<&'static str, Vec<u32>>,
}

impl History {
    /// Appends `sample`, dropping the oldest when the hour is full.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The samples numbered after `since` (all of them without it).
    pub fn columns(&self, since: Option<u64>) -> Columns {
        let oldest = self.samples.front().map_or(1, |s| s.seq);
        let last_seq = self.samples.back().map_or(0, |s| s.seq);
        // A `since` from the future comes from a page that saw an earlier process.
        let since = since.filter(|since| *since <= last_seq);
        let start = since.map_or(0, |since| self.samples.partition_point(|s| s.seq <= since));
        let picked: Vec<&Sample> = self.samples.range(start..).collect();
        let reset = since.is_none_or(|since| since.saturating_add(1) < oldest);
        let per_provider = |f: &dyn Fn(&Sample, usize) -> u32| -> Vec<Vec<u32>> {
            (0..PROVIDERS)
                .map(|p| picked.iter().map(|s| f(s, p)).collect())
                .collect()
        };
        let latency = |f: &dyn Fn(&Latency) -> Option<f32>| -> Vec<Vec<Option<f32>>> {
            (0..PROVIDERS)
                .map(|p| picked.iter().map(|s| f(&s.latency[p])).collect())
                .collect()
        };
        let mut errors: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
        for (i, sample) in picked.iter().enumerate() {
            for (kind, count) in &sample.errors {
                errors.entry(*kind).or_insert_with(|| vec![0; picked.len()])[i] = *count;
            }
        }
        Columns {
            reset,
            last_seq,
            interval_seconds: SAMPLE_INTERVAL.as_secs(),
            capacity: HISTORY_LEN,
            providers: KNOWN_PROVIDERS,
            breaker_codes: ["closed", "retry_after", "half_open", "open"],
            t: picked.iter().map(|s| s.unix_ms as f64 / 1000.0).collect(),
            gen_tps: picked.iter().map(|s| s.gen_tps).collect(),
            prompt_tps: picked.iter().map(|s| s.prompt_tps).collect(),
            prompt_processed: picked.iter().map(|s| s.prompt_processed).collect(),
            prompt_cached: picked.iter().map(|s| s.prompt_cached).collect(),
            slots: picked.iter().map(|s| s.slots).collect(),
            slots_busy: picked.iter().map(|s| s.slots_busy).collect(),
            queue_len: picked.iter().map(|s| s.queue_len).collect(),
            park_hits_ram: picked.iter().map(|s| s.park_hits_ram).collect(),
            park_hits_disk: picked.iter().map(|s| s.park_hits_disk).collect(),
            park_misses: picked.iter().map(|s| s.park_misses).collect(),
            park_ram_bytes: picked.iter().map(|s| s.park_ram_bytes).collect(),
            park_disk_bytes: picked.iter().map(|s| s.park_disk_bytes).collect(),
            rss_bytes: picked.iter().map(|s| s.rss_bytes).collect(),
            requests: per_provider(&|s, p| s.requests[p]),
            skipped: per_provider(&|s, p| s.skipped[p]),
            first_text_p50: latency(&|l| l.first_text_p50),
            first_text_p95: latency(&|l| l.first_text_p95),
            reply_p50: latency(&|l| l.reply_p50),
            reply_p95: latency(&|l| l.reply_p95),
            breaker: (0..PROVIDERS)
                .map(|p| {
                    picked
                        .iter()
                        .map(|s| s.breaker[p].map(|c| c as u8))
                        .collect()
                })
                .collect(),
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn engine(generated: u64, processed: u64, cached: u64) -> EngineStats {
        EngineStats {
            slots: 4,
            slots_busy: 2,
            queue_len: 1,
            tokens_generated: generated,
            prompt_tokens_processed: processed,
            prompt_tokens_cached: cached,
            kv_park_hits_ram: generated / 10,
            ..EngineStats::default()
        }
    }

    fn counts(requests: u64, timeouts: u64, kinds: &[(&'static str, u64)]) -> ProviderSnapshot {
        ProviderSnapshot {
            requests,
            timeouts,
            errors_by_kind: kinds.iter().copied().collect(),
            ..ProviderSnapshot::default()
        }
    }

    #[test]
    fn a_sample_holds_the_rates_and_counts_of_its_interval() {
        let t0 = Instant::now();
        let mut sampler = Sampler::new(t0);
        let first = sampler.sample(
            Reading {
                unix_ms: 1_000,
                engine: Some(engine(100, 40, 0)),
                providers: [("local", counts(3, 0, &[]))].into(),
                ..Reading::default()
            },
            t0 + Duration::from_secs(5),
        );
        assert_eq!((first.seq, first.gen_tps, first.prompt_tps), (1, 20.0, 8.0));
        assert_eq!(first.requests[0], 3);
        assert_eq!(first.park_hits_ram, 10);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        let groq = HealthStatus {
            breaker: BreakerState::Closed,
            open_for: Duration::ZERO,
            retry_after: Duration::from_secs(9),
            consecutive_failures: 0,
        };
        let second = sampler.sample(
            Reading {
                unix_ms: 6_000,
                engine: Some(engine(150, 40, 30)),
                providers: [
                    ("local", counts(5, 0, &[])),
                    (
                        "groq",
                        counts(4, 1, &[("http_5xx", 2), ("rate_limited", 1)]),
                    ),
                ]
                .into(),
                replies: [(
                    "local",
                    IntervalLatency {
                        replies: 2,
                        reply_p50_ms: Some(900.0),
                        ..IntervalLatency::default()
                    },
                )]
                .into(),
                health: vec![
                    (
                        "local",
                        HealthStatus {
                            retry_after: Duration::ZERO,
                            ..groq
                        },
                    ),
                    ("groq", groq),
                ],
                rss_bytes: Some(7),
            },
            t0 + Duration::from_secs(15),
        );
        assert_eq!(
            (second.seq, second.gen_tps, second.prompt_tps),
            (2, 5.0, 0.0)
        );
        assert_eq!((second.prompt_processed, second.prompt_cached), (0, 30));
        assert_eq!(&second.requests[..2], &[2, 4]);
        assert_eq!(second.latency[0].reply_p50, Some(900.0));
        assert_eq!(
            second.errors,
            vec![("http_5xx", 2), ("rate_limited", 1), ("timeout", 1)]
        );
        assert_eq!(
            &second.breaker[..3],
            &[
                Some(BreakerCode::Closed),
                Some(BreakerCode::RetryAfter),
                None
            ]
        );
    }

    #[test]
    fn counters_that_go_backwards_give_zero_not_a_wrap() {
        let t0 = Instant::now();
        let mut sampler = Sampler::new(t0);
        let reading = |generated| Reading {
            engine: Some(engine(generated, 0, 0)),
            ..Reading::default()
        };
        sampler.sample(reading(500), t0);
        let sample = sampler.sample(reading(100), t0 + SAMPLE_INTERVAL);
        assert_eq!(sample.gen_tps, 0.0);
    }

    fn filled(n: u64) -> History {
        let mut history = History::default();
        let mut sampler = Sampler::new(Instant::now());
        for i in 0..n {
            let mut sample = sampler.sample(Reading::default(), Instant::now());
            sample.errors = vec![("http_5xx", 1), ("timeout", 2)];
            sample.unix_ms = i * 5000;
            history.push(sample);
        }
        history
    }

    #[test]
    fn memory_never_grows_past_one_hour_of_samples() {
        let mut history = filled(HISTORY_LEN as u64);
        let capacity = history.samples.capacity();
        let mut sampler = Sampler::new(Instant::now());
        for _ in 0..10 * HISTORY_LEN {
            history.push(sampler.sample(Reading::default(), Instant::now()));
            assert_eq!(history.samples.len(), HISTORY_LEN);
        }
        assert_eq!(history.samples.capacity(), capacity, "the ring reallocated");
        assert!(capacity < 2 * HISTORY_LEN);
    }

    #[test]
    fn columns_after_since_extend_what_the_page_has() {
        let history = filled(10);
        let all = history.columns(None);
        assert!(all.reset);
        assert_eq!((all.t.len(), all.last_seq), (10, 10));
        let newer = history.columns(Some(7));
        assert!(!newer.reset);
        assert_eq!(newer.t, vec![35.0, 40.0, 45.0]);
        assert_eq!(newer.errors["timeout"], vec![2, 2, 2]);
        assert_eq!(newer.requests.len(), KNOWN_PROVIDERS.len());
        assert!(history.columns(Some(10)).t.is_empty());
        let restarted = history.columns(Some(500));
        assert!(
            restarted.reset,
            "a page from an earlier process starts over"
        );
        assert_eq!(restarted.t.len(), 10);
    }

    proptest! {
        /// Whatever `since` the page sends, it gets exactly the samples after it, every
        /// column as long as the time axis, and `reset` exactly when it missed samples.
        #[test]
        fn columns_line_up_for_any_since(pushed in 0u64..1600, since in proptest::option::of(0u64..2000)) {
            let history = filled(pushed);
            let columns = history.columns(since);
            let oldest = pushed.saturating_sub(HISTORY_LEN as u64) + 1;
            let since = since.filter(|since| *since <= pushed);
            let expected: Vec<f64> = (oldest..=pushed)
                .filter(|seq| since.is_none_or(|since| *seq > since))
                .map(|seq| (seq - 1) as f64 * 5.0)
                .collect();
            prop_assert_eq!(&columns.t, &expected);
            prop_assert_eq!(columns.last_seq, pushed);
            prop_assert_eq!(columns.reset, since.is_none_or(|since| since + 1 < oldest));
            let n = columns.t.len();
            prop_assert!(columns.gen_tps.len() == n && columns.rss_bytes.len() == n);
            for per_provider in [&columns.requests, &columns.skipped] {
                prop_assert!(per_provider.iter().all(|c| c.len() == n));
            }
            prop_assert!(columns.reply_p95.iter().all(|c| c.len() == n));
            prop_assert!(columns.breaker.iter().all(|c| c.len() == n));
            prop_assert!(columns.errors.values().all(|c| c.len() == n));
        }
    }
}
