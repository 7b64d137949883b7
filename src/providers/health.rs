//! What the chain remembers about each provider between requests: when a 429's
//! `Retry-After` ends, and a circuit breaker (after N consecutive failures the provider is
//! skipped for a cool-down, then one probe request is let through). Pure: the caller passes
//! the time, so the tests need no clock.

use std::time::Duration;

use tokio::time::Instant;

use super::ProviderError;
use crate::metrics::SkipReason;

/// When a provider answered 429 without saying for how long.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured: a provider asking for a day is retried sooner.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// When the circuit breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long an open breaker skips the provider before one probe.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Whether the chain may call the provider now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call it.
    Go,
    /// Call it as the one probe of a half-open breaker.
    Probe,
    /// Do not call it.
    Skip(SkipReason),
}

/// A provider's circuit breaker as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped until the cool-down ends.
    Open,
    /// The cool-down is over: the next call (or the one in flight) is the probe.
    HalfOpen,
}

/// A provider's health at one moment, for the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthStatus {
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// How long the open breaker still skips the provider (zero unless open).
    pub open_for: Duration,
    /// How long a 429's `Retry-After` still keeps the provider skipped (zero when none).
    pub retry_after: Duration,
    /// Failures in a row that count toward the breaker.
    pub consecutive_failures: u32,
}

/// One provider's health.
#[derive(Debug, Default, Clone)]
pub struct Health {
    /// Failures in a row (that say something about the provider's health).
    consecutive_failures: u32,
    /// Until when a 429 asked us to stay away.
    retry_after_until: Option<Instant>,
    /// Until when the breaker is open; after that, one probe.
    open_until: Option<Instant>,
    /// A probe is in flight: everyone else still skips.
    probing: bool,
}

impl Health {
    /// May the chain call the provider at `now`?
    pub fn admit(&mut self, now: Instant) -> Admission {
        if let Some(until) = self.retry_after_until {
            if now < until {
                return Admission::Skip(SkipReason::RateLimited);
            }
            self.retry_after_until = None;
        }
        match self.open_until {
            None => Admission::Go,
            Some(until) if now < until || self.probing => Admission::Skip(SkipReason::CircuitOpen),
            Some(_) => {
                self.probing = true;
                Admission::Probe
            }
        }
    }

    /// The attempt delivered a whole reply: the breaker closes.
    pub fn succeeded(&mut self) {
        self.consecutive_failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// The attempt failed at `now` with `error`.
    pub fn failed(&mut self, now: Instant, error: &ProviderError, policy: BreakerPolicy) {
        if let ProviderError::RateLimited { retry_after } = error {
            let wait = retry_after
                .unwrap_or(DEFAULT_RETRY_AFTER)
                .min(MAX_RETRY_AFTER);
            self.retry_after_until = Some(now + wait);
        }
        if !error.trips_breaker() {
            // A probe that met a busy provider proves nothing: the next request probes.
            self.probing = false;
            return;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.probing || self.consecutive_failures >= policy.failures {
            self.open_until = Some(now + policy.cooldown);
            self.probing = false;
        }
    }

    /// The caller went away before the attempt ended: nothing learned, but a probe slot
    /// must not stay taken.
    pub fn abandoned(&mut self) {
        self.probing = false;
    }

    /// The health at `now`, without changing it (unlike [`admit`](Self::admit)).
    pub fn status(&self, now: Instant) -> HealthStatus {
        let remaining = |until: Option<Instant>| {
            until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
        };
        let breaker = match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        };
        HealthStatus {
            breaker,
            open_for: remaining(self.open_until),
            retry_after: remaining(self.retry_after_until),
            consecutive_failures: self.consecutive_failures,
        }
    }

    /// Whether the breaker is open (or half-open) now.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BreakerPolicy = BreakerPolicy {
        failures: 3,
        cooldown: Duration::from_secs(30),
    };

    fn fail(health: &mut Health, now: Instant) {
        health.failed(
            now,
            &ProviderError::Status {
                status: 500,
                detail: String::new(),
            },
            POLICY,
        );
    }

    #[test]
    fn breaker_opens_after_n_failures_then_lets_one_probe_through() {
        let t0 = Instant::now();
        let mut health = Health::default();
        for _ in 0..2 {
            assert_eq!(health.admit(t0), Admission::Go);
            fail(&mut health, t0);
        }
        assert_eq!(
            health.admit(t0),
            Admission::Go,
            "two failures: still closed"
        );
        fail(&mut health, t0);
        assert_eq!(health.admit(t0), Admission::Skip(SkipReason::CircuitOpen));
        let later = t0 + Duration::from_secs(29);
        assert_eq!(
            health.admit(later),
            Admission::Skip(SkipReason::CircuitOpen)
        );
        let after = t0 + Duration::from_secs(30);
        assert_eq!(health.admit(after), Admission::Probe);
        assert_eq!(
            health.admit(after),
            Admission::Skip(SkipReason::CircuitOpen),
            "only one probe at a time"
        );
        health.succeeded();
        assert_eq!(health.admit(after), Admission::Go);
        assert!(!health.is_open());
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cooldown() {
        let t0 = Instant::now();
        let mut health = Health::default();
        for _ in 0..3 {
            fail(&mut health, t0);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(health.admit(t1), Admission::Probe);
        fail(&mut health, t1);
        assert_eq!(
            health.admit(t1 + Duration::from_secs(29)),
            Admission::Skip(SkipReason::CircuitOpen)
        );
        assert_eq!(health.admit(t1 + Duration::from_secs(30)), Admission::Probe);
    }

    #[test]
    fn an_abandoned_probe_frees_the_probe_slot() {
        let t0 = Instant::now();
        let mut health = Health::default();
        for _ in 0..3 {
            fail(&mut health, t0);
        }
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(health.admit(t1), Admission::Probe);
        health.abandoned();
        assert_eq!(health.admit(t1), Admission::Probe);
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut health = Health::default();
        fail(&mut health, t0);
        fail(&mut health, t0);
        health.succeeded();
        fail(&mut health, t0);
        fail(&mut health, t0);
        assert_eq!(health.admit(t0), Admission::Go);
    }

    #[test]
    fn retry_after_is_remembered_and_bounded() {
        let t0 = Instant::now();
        let mut health = Health::default();
        health.failed(
            t0,
            &ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
            },
            POLICY,
        );
        assert_eq!(health.admit(t0), Admission::Skip(SkipReason::RateLimited));
        assert_eq!(
            health.admit(t0 + Duration::from_millis(1999)),
            Admission::Skip(SkipReason::RateLimited)
        );
        assert_eq!(health.admit(t0 + Duration::from_secs(2)), Admission::Go);

        health.failed(
            t0,
            &ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(86_400)),
            },
            POLICY,
        );
        assert_eq!(health.admit(t0 + MAX_RETRY_AFTER), Admission::Go);
        health.failed(
            t0,
            &ProviderError::RateLimited { retry_after: None },
            POLICY,
        );
        assert_eq!(health.admit(t0 + DEFAULT_RETRY_AFTER), Admission::Go);
    }

    #[test]
    fn status_shows_the_breaker_and_the_time_left_without_changing_them() {
        let t0 = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.status(t0).breaker, BreakerState::Closed);
        health.failed(
            t0,
            &ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(20)),
            },
            POLICY,
        );
        for _ in 0..3 {
            fail(&mut health, t0);
        }
        let status = health.status(t0 + Duration::from_secs(5));
        assert_eq!(status.breaker, BreakerState::Open);
        assert_eq!(status.open_for, Duration::from_secs(25));
        assert_eq!(status.retry_after, Duration::from_secs(15));
        assert_eq!(status.consecutive_failures, 3);
        let after = t0 + Duration::from_secs(40);
        let status = health.status(after);
        assert_eq!(status.breaker, BreakerState::HalfOpen);
        assert_eq!(
            (status.open_for, status.retry_after),
            (Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(
            health.admit(after),
            Admission::Probe,
            "status took no probe"
        );
        health.succeeded();
        assert_eq!(health.status(after).breaker, BreakerState::Closed);
    }

    #[test]
    fn overload_and_rate_limits_do_not_trip_the_breaker() {
        let t0 = Instant::now();
        let mut health = Health::default();
        for _ in 0..10 {
            health.failed(t0, &ProviderError::Overloaded, POLICY);
        }
        assert_eq!(health.admit(t0), Admission::Go);
        assert!(!health.is_open());
    }
}
