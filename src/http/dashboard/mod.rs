//! `GET /dashboard`: a live page for the operator, served by the binary with every asset
//! embedded (uPlot vendored under `assets/vendor/uplot/`, no CDN), and the JSON it polls,
//! `GET /dashboard/data?since=<seq>`.
//!
//! One task ([`spawn_sampler`]) reads the counters every [`SAMPLE_INTERVAL`] into the
//! bounded [`History`]; the data route answers the samples the page has not seen yet plus
//! the figures of the moment (uptime, memory, model, chain, breakers). Like `/metrics`, it
//! needs no key and shows nothing secret: no key, token, chat text or user id.

mod history;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

pub use history::{History, SAMPLE_INTERVAL};

use super::ApiError;
use super::state::AppState;
use history::{Reading, Sampler};

/// The build's git commit (set by `build.rs`).
pub const BUILD_COMMIT: &str = env!("MISTRAL_BOT_GIT_COMMIT");

/// The page; scripts and styles come from [`ASSETS`] (the CSP allows no inline script).
const PAGE: &str = include_str!("../../../assets/dashboard/index.html");

/// Every file the page loads: name, content type, bytes.
static ASSETS: [(&str, &str, &[u8]); 4] = [
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../assets/dashboard/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../assets/dashboard/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../assets/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../assets/vendor/uplot/uPlot.min.css"),
    ),
];

/// Everything from this origin only; uPlot sets inline styles on its elements.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The dashboard's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/data", get(data))
        .route("/dashboard/assets/{name}", get(asset))
}

/// Stops the sampling task when dropped.
#[derive(Debug)]
pub struct SamplerGuard(JoinHandle<()>);

impl Drop for SamplerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the one task that samples `state` into its history, at once and then every
/// [`SAMPLE_INTERVAL`], until the guard is dropped.
pub fn spawn_sampler(state: AppState) -> SamplerGuard {
    SamplerGuard(tokio::spawn(async move {
        let mut sampler = Sampler::new(Instant::now());
        let mut seen = Default::default();
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        // After a stall (a suspended laptop), one sample, not a burst of catch-up samples.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let reading = Reading {
                unix_ms: unix_ms(),
                engine: state.engine().map(|e| e.stats()),
                providers: state.metrics().snapshot(),
                replies: state.metrics().replies_since(&mut seen),
                health: state.chain().map(|c| c.health()).unwrap_or_default(),
                rss_bytes: resident_bytes().await,
            };
            let sample = sampler.sample(reading, Instant::now());
            state.history(|history| history.push(sample));
        }
    }))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The process's resident memory (`VmRSS` of `/proc/self/status`), where Linux tells.
async fn resident_bytes() -> Option<u64> {
    let status = tokio::fs::read_to_string("/proc/self/status").await.ok()?;
    parse_vm_rss(&status)
}

/// `VmRSS:   12345 kB` → bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

fn with_headers(
    mut response: Response,
    content_type: &'static str,
    cache: &'static str,
) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /dashboard`: the page.
async fn page() -> Response {
    with_headers(PAGE.into_response(), "text/html; charset=utf-8", "no-cache")
}

/// `GET /dashboard/assets/{name}`: a script or style of the page.
async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(asset, _, _)| *asset == name)
        .ok_or(ApiError::NotFound)?;
    Ok(with_headers(
        (*bytes).into_response(),
        content_type,
        "no-cache",
    ))
}

/// The query of `/dashboard/data`.
#[derive(Debug, Deserialize)]
struct DataQuery {
    /// The last sample the page holds.
    since: Option<u64>,
}

/// One provider's health now.
#[derive(Debug, Serialize)]
struct HealthNow {
    provider: &'static str,
    breaker: crate::providers::BreakerState,
    /// Seconds the open breaker still skips the provider.
    open_for_seconds: f64,
    /// Seconds a 429's Retry-After still lasts.
    retry_after_seconds: f64,
    consecutive_failures: u32,
}

/// `GET /dashboard/data?since=<seq>`: the samples after `since`, and the figures now.
async fn data(State(state): State<AppState>, Query(query): Query<DataQuery>) -> Response {
    let series = state.history(|history| history.columns(query.since));
    let chain = state.chain();
    let health: Vec<HealthNow> = chain
        .map(|c| c.health())
        .unwrap_or_default()
        .into_iter()
        .map(|(provider, status)| HealthNow {
            provider,
            breaker: status.breaker,
            open_for_seconds: seconds(status.open_for),
            retry_after_seconds: seconds(status.retry_after),
            consecutive_failures: status.consecutive_failures,
        })
        .collect();
    let mut order: Vec<&str> = chain.map(|c| c.provider_names()).unwrap_or_default();
    order.push("canned");
    let engine = state.engine();
    let rss_bytes = resident_bytes().await;
    let body = json!({
        "series": series,
        "now": {
            "unix_ms": unix_ms(),
            "uptime_seconds": state.uptime_seconds(),
            "rss_bytes": rss_bytes,
            "memory_limit_bytes": state.metrics().memory_limit(),
            "version": env!("CARGO_PKG_VERSION"),
            "commit": BUILD_COMMIT,
            "ready": state.is_ready(),
            "model_id": state.settings().model_id,
            // Not the model's path: the page shows what runs, not where files live.
            "model": engine.map(|e| {
                let info = e.info();
                json!({
                    "name": info.name,
                    "n_params": info.n_params,
                    "size_bytes": info.size_bytes,
                    "n_ctx_train": info.n_ctx_train,
                    "chat_format": info.chat_format,
                })
            }),
            "ctx_size": engine.map(|e| e.ctx_size()),
            "engine": engine.map(|e| e.stats()),
            "chain": order,
            "health": health,
            "providers": state.metrics().snapshot(),
            "fleet": state.metrics().fleet(),
            "budgets": state.metrics().budgets(),
            "stt": state.metrics().stt().snapshot(),
        },
    });
    with_headers(Json(body).into_response(), "application/json", "no-store")
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_from_proc_status() {
        let status = "Name:\tmistral-bot\nVmPeak:\t  999 kB\nVmRSS:\t  51234 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss(status), Some(51234 * 1024));
        assert_eq!(parse_vm_rss("VmRSS: lots\n"), None);
        assert_eq!(parse_vm_rss(""), None);
        #[cfg(target_os = "linux")]
        assert!(parse_vm_rss(&std::fs::read_to_string("/proc/self/status").unwrap()).is_some());
    }

    #[test]
    fn every_asset_the_page_names_is_served_and_nothing_is_fetched_from_elsewhere() {
        for (name, _, bytes) in ASSETS {
            assert!(!bytes.is_empty(), "{name}");
            if !name.starts_with("uPlot") {
                assert!(
                    PAGE.contains(&format!("assets/{name}")),
                    "page misses {name}"
                );
            }
        }
        assert!(PAGE.contains("assets/uPlot.iife.min.js"));
        for page in [PAGE.as_bytes(), ASSETS[0].2, ASSETS[1].2] {
            let text = String::from_utf8_lossy(page);
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "external URL"
            );
            assert!(
                !text.contains("<script>"),
                "inline script (blocked by the CSP)"
            );
        }
    }
}
