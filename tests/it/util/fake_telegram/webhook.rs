//! The fake's webhook side, as Telegram's: `setWebhook` (checked as the real one checks
//! it), `deleteWebhook`, `getWebhookInfo`, and while a webhook is set, the queued updates
//! POSTed to it one at a time, in order, with `X-Telegram-Bot-Api-Secret-Token` when a
//! secret was given, each re-sent until it gets a 2xx. `getUpdates` meanwhile answers
//! 409 "can't use getUpdates method while webhook is active".
//!
//! The fake plays a self-hosted Bot API server (`telegram-bot-api --local`), which also
//! takes an http URL on loopback; any other URL must be https on port 443, 80, 88 or 8443,
//! as Telegram's own servers require. A test puts a "reverse proxy" in front of the bot
//! with [`FakeTelegram::forward_webhook_to`]: deliveries then go to that base, with the
//! URL's path.

use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use serde_json::{Value, json};

use super::{FakeTelegram, Inner, Shared, error, ok};

/// How long the fake waits before re-sending an update that got no 2xx.
const RESEND_AFTER: Duration = Duration::from_millis(200);

/// The webhook as the fake holds it.
#[derive(Debug, Default)]
pub(super) struct WebhookState {
    /// The URL (empty: none, and `getUpdates` works).
    pub(super) url: String,
    /// The `secret_token` given with it.
    secret: Option<String>,
    max_connections: Option<u64>,
    allowed_updates: Option<Value>,
    /// Where deliveries really go (scheme, host and port), if a test set a proxy.
    forward_to: Option<String>,
    last_error: Option<String>,
    /// Updates delivered (answered 2xx), oldest first.
    delivered: Vec<Value>,
    /// Every delivery attempt.
    pushes: Vec<Push>,
}

/// One delivery attempt of an update to the webhook.
#[derive(Debug, Clone)]
pub struct Push {
    /// The update's id.
    pub update_id: i64,
    /// The status answered; `None` when no answer came (connection refused, timeout).
    pub status: Option<u16>,
    /// When it was made, since the fake started.
    pub at: Duration,
}

impl WebhookState {
    /// Whether a webhook is set (`getUpdates` then answers 409).
    pub(super) fn is_set(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Whether `url` is one the fake Bot API server takes for a webhook.
fn acceptable(url: &str) -> Result<(), &'static str> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Err("Bad Request: bad webhook: invalid URL");
    };
    let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => return Ok(()),
        _ => return Err("Bad Request: bad webhook: HTTPS url must be provided for webhook"),
    }
    if loopback || [443, 80, 88, 8443].contains(&parsed.port_or_known_default().unwrap_or(0)) {
        Ok(())
    } else {
        Err("Bad Request: bad webhook: Webhook can be set up only on ports 80, 88, 443 or 8443")
    }
}

/// `setWebhook`: checked as Telegram checks it.
pub(super) fn set_webhook(inner: &mut Inner, params: &Value) -> (u16, Response) {
    let url = params.get("url").and_then(Value::as_str).unwrap_or("");
    if url.is_empty() {
        inner.webhook.url.clear();
        return (200, ok(json!(true)));
    }
    if let Err(description) = acceptable(url) {
        return (400, error(400, description, None));
    }
    let secret = params.get("secret_token").and_then(Value::as_str);
    if let Some(secret) = secret {
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if secret.is_empty() || secret.len() > 256 || !secret.chars().all(allowed) {
            return (
                400,
                error(
                    400,
                    "Bad Request: secret token contains unallowed characters",
                    None,
                ),
            );
        }
    }
    let max_connections = params.get("max_connections").and_then(Value::as_u64);
    if max_connections.is_some_and(|m| !(1..=100).contains(&m)) {
        return (
            400,
            error(400, "Bad Request: bad webhook: max_connections", None),
        );
    }
    let webhook = &mut inner.webhook;
    webhook.url = url.to_string();
    webhook.secret = secret.map(str::to_string);
    webhook.max_connections = max_connections;
    webhook.allowed_updates = params.get("allowed_updates").cloned();
    webhook.last_error = None;
    if params.get("drop_pending_updates").and_then(Value::as_bool) == Some(true) {
        inner.updates.clear();
    }
    (200, ok(json!(true)))
}

/// `deleteWebhook`.
pub(super) fn delete_webhook(inner: &mut Inner, params: &Value) -> (u16, Response) {
    inner.webhook.url.clear();
    inner.webhook.secret = None;
    if params.get("drop_pending_updates").and_then(Value::as_bool) == Some(true) {
        inner.updates.clear();
    }
    (200, ok(json!(true)))
}

/// `getWebhookInfo`.
pub(super) fn webhook_info(inner: &Inner) -> (u16, Response) {
    let webhook = &inner.webhook;
    let mut info = json!({"url": webhook.url, "has_custom_certificate": false,
        "pending_update_count": inner.updates.len()});
    if webhook.is_set() {
        info["max_connections"] = json!(webhook.max_connections.unwrap_or(40));
        if let Some(allowed) = &webhook.allowed_updates {
            info["allowed_updates"] = allowed.clone();
        }
        if let Some(e) = &webhook.last_error {
            info["last_error_date"] = json!(super::now());
            info["last_error_message"] = json!(e);
        }
    }
    (200, ok(info))
}

/// `getUpdates` while a webhook is set, as Telegram answers it.
pub(super) fn conflict() -> Response {
    error(
        409,
        "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to \
         delete the webhook first",
        None,
    )
}

/// Delivers queued updates to the webhook while one is set, in order, each until a 2xx.
pub(super) async fn push_loop(shared: Arc<Shared>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    loop {
        let next = {
            let inner = shared.inner.lock().unwrap();
            let webhook = &inner.webhook;
            match inner.updates.front() {
                Some(update) if webhook.is_set() => {
                    let target = match &webhook.forward_to {
                        Some(base) => {
                            let path = reqwest::Url::parse(&webhook.url)
                                .map(|u| u.path().to_string())
                                .unwrap_or_default();
                            format!("{}{path}", base.trim_end_matches('/'))
                        }
                        None => webhook.url.clone(),
                    };
                    Some((update.clone(), target, webhook.secret.clone()))
                }
                _ => None,
            }
        };
        let Some((update, target, secret)) = next else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let update_id = update["update_id"].as_i64().unwrap_or(0);
        let mut request = client.post(&target).json(&update);
        if let Some(secret) = &secret {
            request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
        }
        let result = request.send().await;
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        let at = shared.started.elapsed();
        let delivered = status.is_some_and(|s| (200..300).contains(&s));
        {
            let mut inner = shared.inner.lock().unwrap();
            inner.webhook.pushes.push(Push {
                update_id,
                status,
                at,
            });
            if delivered {
                // Telegram forgets an update once the webhook took it.
                inner
                    .updates
                    .retain(|u| u["update_id"].as_i64() != Some(update_id));
                inner.webhook.delivered.push(update);
                inner.webhook.last_error = None;
            } else {
                inner.webhook.last_error = Some(match (status, &result) {
                    (Some(status), _) => format!("Wrong response from the webhook: {status}"),
                    (None, Err(e)) if e.is_timeout() => "Read timeout expired".into(),
                    _ => "Connection refused".into(),
                });
            }
        }
        if !delivered {
            tokio::time::sleep(RESEND_AFTER).await;
        }
    }
}

impl FakeTelegram {
    /// Delivers webhook requests to `base` (`http://host:port`) with the webhook URL's
    /// path, as a reverse proxy in front of the bot would.
    pub fn forward_webhook_to(&self, base: &str) {
        self.inner().webhook.forward_to = Some(base.to_string());
    }

    /// Every webhook delivery attempt so far.
    pub fn pushes(&self) -> Vec<Push> {
        self.inner().webhook.pushes.clone()
    }

    /// The webhook's URL now (empty: none).
    pub fn webhook_url(&self) -> String {
        self.inner().webhook.url.clone()
    }

    /// The secret token the webhook was set with.
    pub fn webhook_secret(&self) -> Option<String> {
        self.inner().webhook.secret.clone()
    }

    /// The id of the last update queued.
    pub fn last_update_id(&self) -> i64 {
        self.inner().next_update_id
    }

    /// Delivers update `update_id` (delivered before) once more, next: Telegram does
    /// when the webhook's 200 did not reach it.
    pub fn redeliver(&self, update_id: i64) {
        let mut inner = self.inner();
        let update = inner
            .webhook
            .delivered
            .iter()
            .find(|u| u["update_id"].as_i64() == Some(update_id))
            .cloned()
            .expect("an update delivered before");
        inner.updates.push_front(update);
    }
}
