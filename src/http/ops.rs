//! The operational routes: `/health`, `/ready`, `/metrics` (Prometheus text),
//! `/dialogue_metrics` (JSON) and `/v1/models`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::AppState;
use crate::link::LinkState;

/// `GET /health`: the process is up.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 once the model is loaded (at once in a front without one, with
/// `"local_model": false`), 503 before, and 503 again if the engine
/// thread has died (a load balancer then sends traffic elsewhere). With a Telegram bot,
/// `telegram` says whether it reaches the Bot API (`connected`) and how it stands
/// (`state`: connecting, connected, reconnecting, stopped); that never changes the
/// status, since the HTTP API serves either way.
pub async fn ready(State(state): State<AppState>) -> Response {
    let (status, mut body) = if state.is_ready() {
        (
            StatusCode::OK,
            json!({
                "status": "ready",
                "model": state.settings().model_id,
                "local_model": state.engine().is_some(),
            }),
        )
    } else if state.engine_stopped() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "engine stopped"}),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading"}),
        )
    };
    if let Some(link) = state.telegram_link() {
        let (link_state, since) = link.get();
        body["telegram"] = json!({
            "connected": link_state == LinkState::Connected,
            "state": link_state.as_str(),
            "for_s": since.as_secs(),
        });
    }
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics().encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `GET /dialogue_metrics`: per-provider counters and latencies, engine gauges.
pub async fn dialogue_metrics(State(state): State<AppState>) -> Json<serde_json::Value> {
    let engine = state.metrics().engine();
    let chain = state
        .responder()
        .map(|r| r.chain().provider_names())
        .unwrap_or_default();
    Json(json!({"data": {
        "providers": state.metrics().snapshot(),
        "stt": state.metrics().stt().snapshot(),
        "chain": chain,
        "engine": engine,
        "local_tokens_per_second": engine.as_ref().map(|e| e.tokens_per_second),
        "model": state.settings().model_id,
        "model_loaded": state.engine().is_some(),
        "fleet": state.metrics().fleet(),
        "budgets": state.metrics().budgets(),
        "uptime_seconds": state.uptime_seconds(),
    }}))
}

/// `GET /v1/models`: the one model served.
pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.settings().model_id,
            "object": "model",
            "created": 0,
            "owned_by": "mistral-bot",
        }],
    }))
}
