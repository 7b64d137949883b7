//! Telegram's webhook route, in webhook mode: `POST <the webhook URL's path>` with one
//! update as JSON and the `X-Telegram-Bot-Api-Secret-Token` header Telegram was given
//! with `setWebhook`.
//!
//! Telegram re-sends an update until it gets a 2xx (then gives up after "a reasonable
//! number of attempts"), so each status says what Telegram should do:
//! - 200: the update is saved as pending (it will be answered, after a restart if need
//!   be) or was received before.
//! - 401: no or the wrong secret. Nothing reaches the bot (a forged update is never
//!   parsed).
//! - 400: not an update (not JSON, no `update_id`), a body over [`BODY_LIMIT`], or not a
//!   POST. Telegram's own updates are always well-formed, so only a broken proxy or a
//!   forger gets this; retrying cannot help it.
//! - 503 with `Retry-After`: the bot cannot take it now (its pending list is full, it is
//!   not running, or `setWebhook` has not succeeded yet, so no secret is known).
//!   Telegram retries: the update is delayed, never dropped.
//!
//! The route is served from the router's fallback, so no path an operator chooses can
//! clash with a route. The HTTP server's own limits (header and body timeouts, the
//! connection cap) apply as to any client; a request waiting for the bot's verdict is
//! "being worked on" and is never shed.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::state::AppState;
use crate::webhook::{WebhookInbox, WebhookOutcome};

/// The header that carries the webhook's `secret_token`.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The largest update accepted, whatever `--http-body-limit` says: a Telegram update is
/// a few KiB (a message holds at most 4096 characters, plus entities and a reply).
pub const BODY_LIMIT: usize = 1 << 20;

/// Everything the router does not serve itself: the webhook, or 404.
pub(super) async fn fallback(State(state): State<AppState>, request: Request) -> Response {
    match state.webhook() {
        Some(inbox) if request.uri().path() == inbox.path() => {
            let outcome = receive(inbox, request).await;
            state.metrics().webhook().count(outcome);
            if matches!(
                outcome,
                WebhookOutcome::Unauthorized | WebhookOutcome::BadRequest
            ) {
                // Not a warning: anyone who finds the path can send these (the metric
                // counts them).
                tracing::debug!(outcome = outcome.as_str(), "webhook request refused");
            }
            status(outcome)
        }
        _ => ApiError::NotFound.into_response(),
    }
}

/// Checks one webhook request and hands its update to the bot.
async fn receive(inbox: &WebhookInbox, request: Request) -> WebhookOutcome {
    if request.method() != Method::POST {
        return WebhookOutcome::BadRequest;
    }
    let Some(secret) = inbox.secret() else {
        return WebhookOutcome::Busy;
    };
    let given = request
        .headers()
        .get(SECRET_HEADER)
        .map_or(&[][..], HeaderValue::as_bytes);
    if !super::constant_time_eq(given, secret.expose().as_bytes()) {
        return WebhookOutcome::Unauthorized;
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), BODY_LIMIT).await else {
        return WebhookOutcome::BadRequest;
    };
    // The bot reads the update as it reads polled ones (`telegram::updates`), which needs
    // no more than an `update_id`.
    match serde_json::from_slice::<Value>(&body) {
        Ok(update) if is_update(&update) => inbox.deliver(update).await,
        _ => WebhookOutcome::BadRequest,
    }
}

/// Whether `value` can be an update: an object with an `update_id` Telegram could send.
fn is_update(value: &Value) -> bool {
    value
        .get("update_id")
        .and_then(Value::as_u64)
        .is_some_and(|id| u32::try_from(id).is_ok())
}

/// The one mapping from a webhook outcome to what Telegram is told.
fn status(outcome: WebhookOutcome) -> Response {
    let code = match outcome {
        WebhookOutcome::Accepted | WebhookOutcome::Duplicate => StatusCode::OK,
        WebhookOutcome::Unauthorized => StatusCode::UNAUTHORIZED,
        WebhookOutcome::BadRequest => StatusCode::BAD_REQUEST,
        WebhookOutcome::Busy => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (code, Body::empty()).into_response();
    if outcome == WebhookOutcome::Busy {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::Request as HttpRequest;
    use tower::ServiceExt as _;

    use super::*;
    use crate::config::{Secret, WebhookConfig};
    use crate::metrics::Metrics;

    fn state() -> (AppState, WebhookInbox) {
        let settings = crate::http::HttpSettings {
            api_key: Some(Secret::new("api-key")),
            body_limit: 16,
            max_concurrent: 1,
            model_id: "m".into(),
            generate: crate::chat::GenerateParams::greedy(8),
            connections: crate::http::ConnectionLimits::default(),
        };
        let state = AppState::new(settings, Arc::new(Metrics::new()));
        let inbox = WebhookInbox::new(WebhookConfig {
            url: url::Url::parse("https://bot.example.org/tg/hook").unwrap(),
            max_connections: 40,
        });
        state.set_webhook(inbox.clone());
        (state, inbox)
    }

    async fn post(state: &AppState, path: &str, secret: Option<&str>, body: &str) -> StatusCode {
        let mut request = HttpRequest::post(path);
        if let Some(secret) = secret {
            request = request.header(SECRET_HEADER, secret);
        }
        let request = request.body(Body::from(body.to_string())).unwrap();
        crate::http::router(state.clone())
            .oneshot(request)
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn only_the_secret_gets_an_update_in() {
        let (state, inbox) = state();
        let update = r#"{"update_id": 5, "message": {"message_id": 1, "date": 0,
            "chat": {"id": 1, "type": "private", "first_name": "A"}, "text": "hi"}}"#;
        // Before setWebhook succeeded no secret is known: retry later.
        assert_eq!(
            post(&state, "/tg/hook", Some("s"), update).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        inbox.set_secret(Secret::new("right-secret"));
        let mut rx = inbox.take_receiver().unwrap();
        for wrong in [None, Some(""), Some("wrong-secret"), Some("right-secre")] {
            assert_eq!(
                post(&state, "/tg/hook", wrong, update).await,
                StatusCode::UNAUTHORIZED,
                "{wrong:?}"
            );
        }
        assert!(rx.try_recv().is_err(), "nothing reached the bot");
        for bad in [
            "",
            "not json",
            "{}",
            "[1]",
            r#"{"update_id": "x"}"#,
            r#"{"update_id": -1}"#,
            r#"{"update_id": 4294967296}"#,
        ] {
            assert_eq!(
                post(&state, "/tg/hook", Some("right-secret"), bad).await,
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        // Larger than --http-body-limit (16 bytes here): the webhook has its own limit.
        let bot = tokio::spawn(async move {
            let pushed = rx.recv().await.unwrap();
            assert_eq!(pushed.update["update_id"], 5);
            pushed.verdict.send(WebhookOutcome::Accepted).unwrap();
        });
        assert_eq!(
            post(&state, "/tg/hook", Some("right-secret"), update).await,
            StatusCode::OK
        );
        bot.await.unwrap();
        let big = format!(r#"{{"update_id": 6, "pad": "{}"}}"#, "x".repeat(BODY_LIMIT));
        assert_eq!(
            post(&state, "/tg/hook", Some("right-secret"), &big).await,
            StatusCode::BAD_REQUEST
        );
        // Other paths are what they were.
        assert_eq!(
            post(&state, "/tg/hook/", Some("right-secret"), update).await,
            StatusCode::NOT_FOUND
        );
        let webhook = state.metrics().webhook();
        assert_eq!(webhook.get(WebhookOutcome::Unauthorized), 4);
        assert_eq!(webhook.get(WebhookOutcome::BadRequest), 8);
        assert_eq!(webhook.get(WebhookOutcome::Accepted), 1);
        assert_eq!(webhook.get(WebhookOutcome::Busy), 1);
    }

    #[tokio::test]
    async fn without_webhook_mode_the_path_is_not_found() {
        let settings = crate::http::HttpSettings {
            api_key: None,
            body_limit: 1024,
            max_concurrent: 1,
            model_id: "m".into(),
            generate: crate::chat::GenerateParams::greedy(8),
            connections: crate::http::ConnectionLimits::default(),
        };
        let state = AppState::new(settings, Arc::new(Metrics::new()));
        assert_eq!(
            post(&state, "/tg/hook", Some("s"), "{}").await,
            StatusCode::NOT_FOUND
        );
    }
}
