//! Telegram webhook requests, by outcome (`accepted`, `duplicate`, `unauthorized`,
//! `bad_request`, `busy`: see [`WebhookOutcome`]). Every request the webhook route gets
//! moves exactly one of them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Labels;
use crate::webhook::WebhookOutcome;

/// Webhook requests, by `outcome` (exposed with `_total`).
pub const TELEGRAM_WEBHOOK_REQUESTS: &str = "mistral_bot_telegram_webhook_requests";

/// The webhook counters.
#[derive(Debug)]
pub struct WebhookMetrics {
    requests: Family<Labels, Counter>,
}

impl WebhookMetrics {
    /// The counters, registered in `registry`, every outcome at 0.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            TELEGRAM_WEBHOOK_REQUESTS,
            "Telegram webhook requests, by outcome",
            requests.clone(),
        );
        for outcome in WebhookOutcome::ALL {
            drop(requests.get_or_create(&vec![("outcome", outcome.as_str())]));
        }
        Self { requests }
    }

    /// A webhook request ended with `outcome`.
    pub fn count(&self, outcome: WebhookOutcome) {
        self.requests
            .get_or_create(&vec![("outcome", outcome.as_str())])
            .inc();
    }

    /// How many requests ended with `outcome`.
    pub fn get(&self, outcome: WebhookOutcome) -> u64 {
        self.requests
            .get_or_create(&vec![("outcome", outcome.as_str())])
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn each_outcome_is_counted_and_exposed() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for outcome in WebhookOutcome::ALL {
            let line = format!(
                "{TELEGRAM_WEBHOOK_REQUESTS}_total{{outcome=\"{}\"}} 0",
                outcome.as_str()
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        metrics.webhook().count(WebhookOutcome::Accepted);
        metrics.webhook().count(WebhookOutcome::Busy);
        metrics.webhook().count(WebhookOutcome::Busy);
        assert_eq!(metrics.webhook().get(WebhookOutcome::Busy), 2);
        assert!(metrics.encode().contains(&format!(
            "{TELEGRAM_WEBHOOK_REQUESTS}_total{{outcome=\"accepted\"}} 1"
        )));
    }
}
