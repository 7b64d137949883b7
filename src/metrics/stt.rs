//! Speech-to-text figures, apart from the chat providers' (a transcription is not a chat
//! reply, and its failures are not a chat provider's): requests, successes, errors by
//! kind, seconds of audio transcribed, and latency. Every request moves `requests`, and
//! exactly one of `success` and `errors` when it ends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use super::{Labels, latency_histogram, percentile, push_bounded};

/// Transcription requests (exposed with `_total`).
pub const STT_REQUESTS: &str = "mistral_bot_stt_requests";
/// Transcriptions that returned text (exposed with `_total`).
pub const STT_SUCCESS: &str = "mistral_bot_stt_success";
/// Failed transcriptions, by `kind` (exposed with `_total`).
pub const STT_ERRORS: &str = "mistral_bot_stt_errors";
/// Seconds of audio transcribed (exposed as `mistral_bot_stt_audio_seconds_total`).
pub const STT_AUDIO_SECONDS: &str = "mistral_bot_stt_audio";
/// Duration of successful transcriptions (exposed with `_seconds`).
pub const STT_LATENCY_SECONDS: &str = "mistral_bot_stt_latency";

/// The speech-to-text figures in `/dialogue_metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SttSnapshot {
    /// Transcription requests.
    pub requests: u64,
    /// Transcriptions that returned text.
    pub success: u64,
    /// Failed transcriptions.
    pub errors: u64,
    /// Errors by kind (`timeout`, `rate_limited`, `malformed`, `http_5xx`, …).
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Seconds of audio transcribed (as Telegram reported their length).
    pub audio_seconds: u64,
    /// Median duration of successful transcriptions, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile duration, in milliseconds.
    pub latency_p95_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct Tally {
    snapshot: SttSnapshot,
    latencies_ms: VecDeque<f64>,
}

/// The speech-to-text counters.
#[derive(Debug)]
pub struct SttMetrics {
    requests: Counter,
    success: Counter,
    errors: Family<Labels, Counter>,
    audio_seconds: Counter,
    latency: Histogram,
    tally: Mutex<Tally>,
}

impl SttMetrics {
    /// The counters, registered in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Counter::default(),
            success: Counter::default(),
            errors: Family::default(),
            audio_seconds: Counter::default(),
            latency: latency_histogram(),
            tally: Mutex::new(Tally::default()),
        };
        registry.register(
            STT_REQUESTS,
            "Speech-to-text requests",
            metrics.requests.clone(),
        );
        registry.register(
            STT_SUCCESS,
            "Speech-to-text requests that returned text",
            metrics.success.clone(),
        );
        registry.register(
            STT_ERRORS,
            "Failed speech-to-text requests, by kind",
            metrics.errors.clone(),
        );
        registry.register_with_unit(
            STT_AUDIO_SECONDS,
            "Seconds of audio transcribed",
            Unit::Seconds,
            metrics.audio_seconds.clone(),
        );
        registry.register_with_unit(
            STT_LATENCY_SECONDS,
            "Duration of successful speech-to-text requests",
            Unit::Seconds,
            metrics.latency.clone(),
        );
        metrics
    }

    fn tally(&self, update: impl FnOnce(&mut Tally)) {
        update(&mut self.tally.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A transcription is requested.
    pub fn attempt(&self) {
        self.requests.inc();
        self.tally(|t| t.snapshot.requests += 1);
    }

    /// A transcription of `seconds` of audio returned text after `took`.
    pub fn success(&self, seconds: u32, took: Duration) {
        self.success.inc();
        self.audio_seconds.inc_by(u64::from(seconds));
        self.latency.observe(took.as_secs_f64());
        self.tally(|t| {
            t.snapshot.success += 1;
            t.snapshot.audio_seconds += u64::from(seconds);
            push_bounded(&mut t.latencies_ms, took.as_secs_f64() * 1000.0);
        });
    }

    /// A transcription failed with an error of `kind`.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
        self.tally(|t| {
            t.snapshot.errors += 1;
            *t.snapshot.errors_by_kind.entry(kind).or_default() += 1;
        });
    }

    /// The figures now.
    pub fn snapshot(&self) -> SttSnapshot {
        let tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        let mut snapshot = tally.snapshot.clone();
        snapshot.latency_p50_ms = percentile(&tally.latencies_ms, 0.50);
        snapshot.latency_p95_ms = percentile(&tally.latencies_ms, 0.95);
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::super::Metrics;
    use super::*;

    #[test]
    fn stt_figures_are_counted_and_exported() {
        let metrics = Metrics::new();
        let stt = metrics.stt();
        stt.attempt();
        stt.success(7, Duration::from_millis(120));
        stt.attempt();
        stt.error("timeout");
        let snapshot = stt.snapshot();
        assert_eq!(
            (
                snapshot.requests,
                snapshot.success,
                snapshot.errors,
                snapshot.audio_seconds
            ),
            (2, 1, 1, 7)
        );
        assert_eq!(snapshot.errors_by_kind.get("timeout"), Some(&1));
        assert_eq!(snapshot.latency_p50_ms, Some(120.0));
        let text = metrics.encode();
        for line in [
            "mistral_bot_stt_requests_total 2",
            "mistral_bot_stt_success_total 1",
            "mistral_bot_stt_errors_total{kind=\"timeout\"} 1",
            "mistral_bot_stt_audio_seconds_total 7",
            "mistral_bot_stt_latency_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
