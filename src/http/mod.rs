//! The HTTP API (axum): an OpenAI-compatible `POST /v1/chat/completions` served through
//! the provider chain, `GET /v1/models`, and the operational routes `/health`, `/ready`,
//! `/metrics`, `/dialogue_metrics`, `/dashboard` (a live page for the operator).
//!
//! # Layout
//! - [`router`] builds the routes over an [`AppState`]; [`serve`] runs them on a listener
//!   until a shutdown future resolves.
//! - `api`: the request and its validation; `chat`: the completion handler (JSON or SSE);
//!   `ops`: health, readiness, metrics; `dashboard`: the live page and its data;
//!   `error`: [`ApiError`], the one mapping to statuses; `conn`: the accept loop, with
//!   timeouts for slow clients and a cap on open connections ([`ConnectionLimits`]).
//!
//! `/v1/*` (and the same routes without the prefix, `/chat/completions` and `/models`)
//! needs `Authorization: Bearer <key>` when an API key is configured; the
//! operational routes never do (probes and scrapers). May use `providers`, `engine`,
//! `metrics`, `config`, `chat`, `i18n`, `link` (Telegram's state for `/ready`), `host`
//! (the open-file limit behind the connection cap).

mod api;
mod chat;
mod choices;
mod conn;
mod dashboard;
mod error;
mod ops;
mod params;
mod session;
mod state;
mod tools;
mod webhook;

use std::future::Future;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use chat::PROVIDER_HEADER;
pub use conn::ConnectionLimits;
pub use error::ApiError;
pub use state::{AppState, HttpSettings};

/// The routes over `state`.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(ops::models))
        // The same routes without the prefix: `OpenAI(base_url="http://host:port")`
        // and clients configured that way call these (llama-server serves both).
        .route("/chat/completions", post(chat::completions))
        .route("/models", get(ops::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/dialogue_metrics", get(ops::dialogue_metrics))
        .merge(dashboard::routes())
        // The webhook's path is the operator's choice: served from the fallback, it can
        // never clash with a route (config refuses the routes' own paths).
        .fallback(webhook::fallback)
        .layer(DefaultBodyLimit::max(state.settings().body_limit))
        .with_state(state)
}

/// Serves `state`'s routes on `listener` until `shutdown` resolves, then finishes the
/// requests in flight. Slow and idle clients are timed out and shed before they can lock
/// others out (see `conn`).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let _sampler = dashboard::spawn_sampler(state.clone());
    let limits = state.settings().connections;
    conn::serve(listener, router(state), limits, shutdown).await
}

/// Rejects `/v1/*` requests without the configured bearer key.
async fn require_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.settings().api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.expose().as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    proptest::proptest! {
        /// The API key's and the webhook secret's comparison says what `==` says.
        #[test]
        fn key_comparison_is_equality(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            proptest::prop_assert_eq!(constant_time_eq(&a, &b), a == b);
            proptest::prop_assert!(constant_time_eq(&a, &a.clone()));
        }
    }
}
