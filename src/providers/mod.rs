//! Who answers: the [`Provider`] trait, the providers, and the fallback [`Chain`] that tries
//! them in order so that every message gets an answer.
//!
//! Front-ends (Telegram, HTTP) call [`Chain::reply`], which never fails: when every
//! provider fails, the canned apology answers. A provider that fails before any text is
//! delivered hands over to the next one; a stream that breaks after text was delivered
//! ends with what was delivered plus a short notice (no second answer).
//!
//! # Layout
//! - `chain`: [`Chain`]: order, per-provider timeouts, metrics, the hand-over rules.
//! - `health`: Retry-After memory and the circuit breaker (pure; time is a parameter).
//! - `local`, `canned`: the engine and the apology as providers.
//! - `openai`, `gemini`: the cloud clients (Groq, Mistral and the generic provider are
//!   [`OpenAiProvider`]s); `convert`: chat history → each API's messages; `sse`: the
//!   server-sent-events decoder; `cloud`: what the HTTP clients share (errors, Retry-After).
//! - [`probe`]: is each cloud provider's key accepted and its model there (the start-up
//!   check and `mistral-bot doctor`).
//! - [`budget`]: tokens and requests per provider, budgets per day or month, what the
//!   rate-limit headers say is left.
//! - [`fleet`]: the generic provider over several servers, each conversation routed to the
//!   one holding its cache.
//! - [`stt`]: speech to text (not a chat provider: not in the chain, its own metrics).
//!
//! May use `engine`, `chat`, `i18n`, `config` (settings) and `metrics`.

pub mod budget;
mod canned;
mod chain;
mod choices;
mod cloud;
mod convert;
pub mod fleet;
mod gemini;
mod health;
mod local;
mod openai;
mod passthrough;
pub mod probe;
mod sse;
pub mod stt;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use budget::Budgets;
pub use canned::CannedProvider;
pub use chain::Refused;
pub use chain::{Chain, ChainBuilder, Reply};
pub use fleet::FleetProvider;
pub use gemini::GeminiProvider;
pub use health::{BreakerPolicy, BreakerState, HealthStatus};
pub use local::LocalProvider;
pub use openai::{OpenAiFlavor, OpenAiProvider};

use crate::chat::{ChatRequest, StreamEvent};
use crate::config::{ProviderKind, ProvidersConfig};
use crate::engine::{EngineError, EngineHandle};
use crate::metrics::Metrics;

/// A provider's reply as it arrives: text deltas, then `Done`.
pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

/// Why a provider did not answer. [`ProviderError::fault`] says whose fault it was, and so
/// what the chain does: a provider's own failure counts toward its circuit breaker; being
/// busy does not; a request refused for what it asks ([`RequestFault`]) does not either,
/// and may end the chain ([`RequestFault::ends_chain`]). After text was delivered, any error
/// ends the reply with a notice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider is at capacity (the local queue is full).
    #[error("overloaded")]
    Overloaded,
    /// The request waited in the provider's own queue (the local engine's) past the
    /// provider's timeout without starting: the provider is busy, not broken.
    #[error("waited too long in the queue")]
    QueueWait,
    /// The provider refused the request itself: too long for its window, a parameter it
    /// rejects, content its filter blocks. Not a failure of the provider.
    #[error("refused the request ({}): {detail}", kind.code())]
    Refused {
        /// What is wrong with the request.
        kind: RequestFault,
        /// The provider's own message, shortened (secrets removed).
        detail: String,
    },
    /// HTTP 429: the provider asks us to come back later.
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// What `Retry-After` (or Gemini's `retryDelay`) said, if anything.
        retry_after: Option<Duration>,
    },
    /// Another HTTP error status.
    #[error("HTTP {status}: {detail}")]
    Status {
        /// The status code.
        status: u16,
        /// The provider's own message, shortened.
        detail: String,
    },
    /// No text within the provider's timeout, or a pause longer than it mid-reply.
    #[error("timed out")]
    Timeout,
    /// The provider could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The response is not what the API promises.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The provider ended its reply without any text.
    #[error("empty reply")]
    Empty,
    /// The response stream ended or broke before its end marker.
    #[error("the response stream was cut off: {0}")]
    Cut(String),
    /// The provider needs an API key and has none.
    #[error("no API key configured")]
    MissingKey,
    /// The configured model does not exist (or no longer exists, or this key may not use
    /// it): HTTP 404 `model_not_found`, or 400 `model_decommissioned`. Only the operator can
    /// fix it, so the message names the setting to change.
    #[error(
        "the model `{model}` does not exist or this key may not use it: set {flag} to a current model"
    )]
    ModelNotFound {
        /// The model asked for.
        model: String,
        /// The flag and environment variable that choose it.
        flag: &'static str,
    },
    /// The local engine failed (other than being overloaded).
    #[error("local engine: {0}")]
    Engine(EngineError),
    /// Any other failure (for providers outside this crate, e.g. test doubles).
    #[error("failed: {0}")]
    Failed(String),
}

/// What is wrong with a request that a provider refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestFault {
    /// The conversation (plus the room for the reply) does not fit the model's window.
    ContextLengthExceeded,
    /// A parameter or message the provider does not accept.
    InvalidRequest,
    /// The provider's safety filter blocked the prompt.
    ContentBlocked,
}

impl RequestFault {
    /// The OpenAI-style error code (also the metric label).
    pub fn code(self) -> &'static str {
        match self {
            RequestFault::ContextLengthExceeded => "context_length_exceeded",
            RequestFault::InvalidRequest => "invalid_request",
            RequestFault::ContentBlocked => "content_filter",
        }
    }

    /// Whether the chain stops at this refusal instead of asking the next provider.
    ///
    /// A prompt too long for one window may fit the next provider's larger one, and a
    /// parameter one API rejects (each client builds its own request) may suit another:
    /// those fall over. Content a safety filter blocked is not shopped around to find a
    /// laxer filter: the chain stops there.
    pub fn ends_chain(self) -> bool {
        matches!(self, RequestFault::ContentBlocked)
    }

    /// What a chat user is told, in `lang`.
    pub fn user_text(self, lang: crate::i18n::Lang) -> &'static str {
        match self {
            RequestFault::ContextLengthExceeded => crate::i18n::too_long(lang),
            RequestFault::InvalidRequest => crate::i18n::invalid_request(lang),
            RequestFault::ContentBlocked => crate::i18n::content_blocked(lang),
        }
    }
}

/// Whose fault a [`ProviderError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The provider failed: counts toward its circuit breaker.
    Provider,
    /// The provider is busy or rate limited: try the next, no breaker.
    Busy,
    /// The request itself: no breaker; see [`RequestFault::ends_chain`].
    Request(RequestFault),
}

impl ProviderError {
    /// Whose fault this is.
    pub fn fault(&self) -> Fault {
        use crate::engine::prompt::PromptError;
        match self {
            ProviderError::Overloaded
            | ProviderError::QueueWait
            | ProviderError::RateLimited { .. } => Fault::Busy,
            ProviderError::Refused { kind, .. } => Fault::Request(*kind),
            ProviderError::Engine(EngineError::Prompt(PromptError::TooLong { .. })) => {
                Fault::Request(RequestFault::ContextLengthExceeded)
            }
            // A schema or grammar the local engine cannot follow, or more choices than it
            // has slots: another provider may.
            ProviderError::Engine(
                EngineError::Constraint(_) | EngineError::TooManyChoices { .. },
            ) => Fault::Request(RequestFault::InvalidRequest),
            // The others depend only on the messages (none, or ones the chat template
            // cannot render): the same request fails the same way every time.
            ProviderError::Engine(EngineError::Prompt(_)) => {
                Fault::Request(RequestFault::InvalidRequest)
            }
            _ => Fault::Provider,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Overloaded => "overloaded",
            ProviderError::QueueWait => "queue_wait",
            ProviderError::Refused { kind, .. } => kind.code(),
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Status { status, .. } if *status >= 500 => "http_5xx",
            ProviderError::Status {
                status: 401 | 403, ..
            } => "unauthorized",
            ProviderError::Status { .. } => "http_4xx",
            ProviderError::Timeout => "timeout",
            ProviderError::Connect(_) => "connect",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::Empty => "empty",
            ProviderError::Cut(_) => "cut",
            ProviderError::MissingKey => "missing_key",
            ProviderError::ModelNotFound { .. } => "model_not_found",
            ProviderError::Engine(e) => e.kind(),
            ProviderError::Failed(_) => "error",
        }
    }

    /// Whether this failure says something about the provider's health (and so counts
    /// toward its circuit breaker). Being busy or rate limited does not (those have their
    /// own, shorter, remedies), nor does a request refused for what it asks.
    pub fn trips_breaker(&self) -> bool {
        self.fault() == Fault::Provider
    }
}

/// Something that can answer a chat.
pub trait Provider: Send + Sync {
    /// The provider's name in logs and metrics (`local`, `groq`, …).
    fn name(&self) -> &'static str;

    /// Whether the provider queues requests and sends [`StreamEvent::Started`] when one
    /// starts (the local engine). A timeout before that event is then a wait in its queue,
    /// [`ProviderError::QueueWait`], not a failure of the provider.
    fn reports_start(&self) -> bool {
        false
    }

    /// Starts a reply.
    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>>;

    /// How long `request` would wait for its first text if asked now, when the provider
    /// can tell (the local engine, from its queue and measured rates), as precisely as
    /// comparing it with `limit` needs; `None` otherwise. The chain skips a provider whose
    /// estimate is over its allowed wait (`limit`) when a later one is available.
    fn estimated_wait<'a>(
        &'a self,
        request: &'a ChatRequest,
        limit: Duration,
    ) -> BoxFuture<'a, Option<Duration>> {
        let _ = (request, limit);
        Box::pin(async { None })
    }
}

/// Why the chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The HTTP client (rustls) could not be set up.
    #[error("cannot set up the HTTP client for cloud providers: {0}")]
    Client(String),
}

/// How long a cloud client may take to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client the cloud providers (and their checks) share.
pub fn http_client() -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("mistral-bot/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError::Client(e.to_string()))
}

/// The start-up check: checks every cloud provider of the chain at once (each within
/// [`probe::PROBE_TIMEOUT`]) and logs, per provider, whether its key works and its model
/// exists, naming the flag to change. Meant to run beside the engine's loading.
pub async fn startup_check(config: ProvidersConfig) {
    let client = match http_client() {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "start-up check of the cloud providers skipped");
            return;
        }
    };
    let reports = probe::probe_chain(&client, &config).await;
    probe::log_startup_check(&reports);
}

/// The chain `config` describes, over `engine` (none in a front without a model, whose
/// chain has no `local`), recording into `metrics`. Providers named in the chain but not
/// configured (no API key) are left out with one log line each.
pub fn build_chain(
    config: &ProvidersConfig,
    engine: impl Into<Option<EngineHandle>>,
    metrics: Arc<Metrics>,
) -> Result<Chain, BuildError> {
    let engine = engine.into();
    let client = http_client()?;
    let budgets = Arc::new(budgets_of(config));
    let figures = Arc::downgrade(&budgets);
    metrics.set_budget_source(move || figures.upgrade().map(|b| b.figures()).unwrap_or_default());
    let mut builder = Chain::builder(Arc::clone(&metrics))
        .breaker(BreakerPolicy {
            failures: config.breaker_failures.get(),
            cooldown: config.breaker_cooldown,
        })
        .budgets(Arc::clone(&budgets));
    for kind in &config.chain {
        let cloud = match kind {
            ProviderKind::Local => {
                match &engine {
                    Some(engine) => {
                        builder = builder
                            .provider(LocalProvider::new(engine.clone()), config.local_timeout);
                        if let Some(max_wait) = config.local_max_wait {
                            builder = builder.max_wait(max_wait);
                        }
                    }
                    None => tracing::warn!("`local` is in the chain but no model is loaded"),
                }
                continue;
            }
            ProviderKind::Groq => &config.groq,
            ProviderKind::Mistral => &config.mistral,
            ProviderKind::Gemini => &config.gemini,
            ProviderKind::OpenAi => &config.openai,
        };
        if !cloud.is_configured() {
            tracing::info!(
                provider = kind.name(),
                "provider skipped: no API key (set {})",
                key_env(*kind)
            );
            continue;
        }
        builder = match kind {
            ProviderKind::Gemini => {
                builder.provider(GeminiProvider::new(client.clone(), cloud), cloud.timeout)
            }
            ProviderKind::Groq => builder.provider(
                OpenAiProvider::new(OpenAiFlavor::Groq, client.clone(), cloud)
                    .reporting_limits(Arc::clone(&budgets)),
                cloud.timeout,
            ),
            ProviderKind::Mistral => builder.provider(
                OpenAiProvider::new(OpenAiFlavor::Mistral, client.clone(), cloud)
                    .reporting_limits(Arc::clone(&budgets)),
                cloud.timeout,
            ),
            ProviderKind::OpenAi if config.openai_fleet.len() > 1 => builder.provider(
                FleetProvider::new(client.clone(), cloud, &config.openai_fleet, &metrics),
                cloud.timeout,
            ),
            ProviderKind::OpenAi | ProviderKind::Local => builder.provider(
                OpenAiProvider::new(OpenAiFlavor::Generic, client.clone(), cloud)
                    .reporting_limits(Arc::clone(&budgets)),
                cloud.timeout,
            ),
        };
    }
    let chain = builder.build();
    if chain.provider_names().is_empty() {
        tracing::warn!(
            "no provider in the chain is configured: every message gets the canned apology"
        );
    } else {
        tracing::info!(providers = ?chain.provider_names(), "fallback chain (then the canned apology)");
    }
    Ok(chain)
}

/// The counts and budgets of the cloud providers `config` describes, kept in its state
/// dir when it has one.
fn budgets_of(config: &ProvidersConfig) -> Budgets {
    let b = &config.budgets;
    let limits = [
        (ProviderKind::Groq.name(), b.groq),
        (ProviderKind::Mistral.name(), b.mistral),
        (ProviderKind::Gemini.name(), b.gemini),
        (ProviderKind::OpenAi.name(), b.openai),
    ];
    match &config.state_dir {
        Some(dir) => Budgets::load(&limits, dir),
        None => Budgets::in_memory(&limits),
    }
}

fn key_env(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Local => "nothing",
        ProviderKind::Groq => "GROQ_API_KEY",
        ProviderKind::Mistral => "MISTRAL_API_KEY",
        ProviderKind::Gemini => "GEMINI_API_KEY",
        ProviderKind::OpenAi => "OPENAI_COMPAT_API_KEY or --openai-base-url",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_and_which_trip_the_breaker() {
        let status = |status| ProviderError::Status {
            status,
            detail: String::new(),
        };
        assert_eq!(status(503).kind(), "http_5xx");
        assert_eq!(status(401).kind(), "unauthorized");
        assert_eq!(status(404).kind(), "http_4xx");
        assert_eq!(
            ProviderError::Engine(EngineError::Stopped).kind(),
            "stopped"
        );
        assert!(!ProviderError::Overloaded.trips_breaker());
        assert!(!ProviderError::RateLimited { retry_after: None }.trips_breaker());
        assert!(ProviderError::Timeout.trips_breaker());
        assert!(status(500).trips_breaker());
    }
}
