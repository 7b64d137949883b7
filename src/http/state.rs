//! [`AppState`]: what the HTTP handlers share. The server starts before the model is
//! loaded (so `/health` and `/ready` answer during the load); [`AppState::set_ready`]
//! hands it the chain and the engine once they exist.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::ConnectionLimits;
use super::dashboard::History;
use crate::chat::GenerateParams;
use crate::config::Secret;
use crate::engine::EngineHandle;
use crate::link::TelegramLink;
use crate::metrics::{EngineFigures, Metrics};
use crate::responder::Responder;
use crate::webhook::WebhookInbox;

/// The HTTP API's settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The bearer key `/v1/*` requires, if any.
    pub api_key: Option<Secret>,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Most chat completions in flight; more are refused with 503.
    pub max_concurrent: usize,
    /// The model id `/v1/models` lists and responses name.
    pub model_id: String,
    /// Generation defaults; `max_tokens` is also the most a request may ask for.
    pub generate: GenerateParams,
    /// Open connections at most, and how long a client may keep the server waiting.
    pub connections: ConnectionLimits,
}

/// What answers once the model is loaded.
struct Backend {
    responder: Arc<Responder>,
    /// `None` in a front without a local model.
    engine: Option<EngineHandle>,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: HttpSettings,
    metrics: Arc<Metrics>,
    /// Set once, when the model is loaded.
    backend: OnceLock<Backend>,
    started: Instant,
    /// Numbers completion ids.
    next_id: AtomicU64,
    /// One permit per chat completion in flight.
    in_flight: Arc<Semaphore>,
    /// The dashboard's last hour of samples.
    history: Mutex<History>,
    /// Whether the Telegram bot reaches the Bot API, when there is a bot.
    telegram: OnceLock<TelegramLink>,
    /// Telegram's webhook, in webhook mode.
    webhook: OnceLock<WebhookInbox>,
}

impl AppState {
    /// State of a server whose model is not loaded yet.
    pub fn new(settings: HttpSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                backend: OnceLock::new(),
                started: Instant::now(),
                next_id: AtomicU64::new(1),
                in_flight: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
                history: Mutex::default(),
                telegram: OnceLock::new(),
                webhook: OnceLock::new(),
                settings,
            }),
        }
    }

    /// The model is loaded (or there is none to load): serve chats through `responder`,
    /// show `engine`'s gauges. Only the first call counts.
    pub fn set_ready(&self, responder: Arc<Responder>, engine: impl Into<Option<EngineHandle>>) {
        let engine = engine.into();
        if let Some(engine) = &engine {
            self.show_engine(engine.clone());
        }
        let _ = self.inner.backend.set(Backend { responder, engine });
    }

    fn show_engine(&self, gauges: EngineHandle) {
        self.inner.metrics.set_engine_source(move || {
            let stats = gauges.stats();
            EngineFigures {
                slots: stats.slots,
                slots_busy: stats.slots_busy,
                queue_len: stats.queue_len,
                requests_started: stats.requests_started,
                requests_finished: stats.requests_finished,
                prompt_tokens_processed: stats.prompt_tokens_processed,
                prompt_tokens_cached: stats.prompt_tokens_cached,
                tokens_generated: stats.tokens_generated,
                tokens_per_second: stats.avg_tokens_per_second,
                kv_park_hits_ram: stats.kv_park_hits_ram,
                kv_park_hits_disk: stats.kv_park_hits_disk,
                kv_park_misses: stats.kv_park_misses,
                kv_park_ram_bytes: stats.kv_park_ram_bytes,
                kv_park_disk_bytes: stats.kv_park_disk_bytes,
                kv_park_ram_budget_bytes: stats.kv_park_ram_budget_bytes,
            }
        });
    }

    /// There is a Telegram bot: `/ready` shows whether `link` reaches the Bot API. Only
    /// the first call counts.
    pub fn set_telegram_link(&self, link: TelegramLink) {
        let _ = self.inner.telegram.set(link);
    }

    /// Webhook mode: serve `inbox`'s path and hand its updates over. Only the first call
    /// counts; call it before [`serve`](super::serve).
    pub fn set_webhook(&self, inbox: WebhookInbox) {
        let _ = self.inner.webhook.set(inbox);
    }

    /// Telegram's webhook, in webhook mode.
    pub(super) fn webhook(&self) -> Option<&WebhookInbox> {
        self.inner.webhook.get()
    }

    /// The Telegram bot's link to the Bot API, when there is a bot.
    pub(super) fn telegram_link(&self) -> Option<&TelegramLink> {
        self.inner.telegram.get()
    }

    /// Whether chats are answered: the model is loaded and its engine thread still runs,
    /// or there is no local model and the chain is built.
    pub fn is_ready(&self) -> bool {
        self.inner
            .backend
            .get()
            .is_some_and(|backend| backend.engine.as_ref().is_none_or(EngineHandle::is_alive))
    }

    /// Whether the model was loaded and its engine thread has died since.
    pub fn engine_stopped(&self) -> bool {
        self.inner
            .backend
            .get()
            .and_then(|backend| backend.engine.as_ref())
            .is_some_and(|engine| !engine.is_alive())
    }

    pub(super) fn responder(&self) -> Option<&Arc<Responder>> {
        self.inner.backend.get().map(|b| &b.responder)
    }

    /// The provider chain, once ready.
    pub(super) fn chain(&self) -> Option<&Arc<crate::providers::Chain>> {
        self.responder().map(|r| r.chain())
    }

    pub(super) fn engine(&self) -> Option<&EngineHandle> {
        self.inner.backend.get().and_then(|b| b.engine.as_ref())
    }

    pub(super) fn settings(&self) -> &HttpSettings {
        &self.inner.settings
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// A place for one more chat completion, if there is one; held until its reply ends.
    pub(super) fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inner.in_flight).try_acquire_owned().ok()
    }

    /// Runs `f` on the dashboard's history (never across an `.await`).
    pub(super) fn history<R>(&self, f: impl FnOnce(&mut History) -> R) -> R {
        // A panic mid-push leaves at worst one sample missing.
        f(&mut self.inner.history.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn uptime_seconds(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }

    pub(super) fn next_completion_id(&self) -> String {
        format!(
            "chatcmpl-{}-{}",
            std::process::id(),
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}
