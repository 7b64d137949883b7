//! mistral-bot: a self-hosted LLM chat bot. llama.cpp runs in this process (a pool of
//! inference slots with continuous batching), and chats are served from the same process.
//!
//! # Layout
//! - [`config`]: command line and environment → validated [`Config`](config::Config).
//! - [`chat`]: the shared vocabulary (messages, parameters, stream events).
//! - [`engine`]: the inference thread, slots, scheduler, prompt building, detokenizer.
//! - [`console`]: `--prompt` and `--console`.
//! - [`providers`]: the fallback chain (local engine, cloud providers, canned apology).
//! - [`http`]: the OpenAI-compatible HTTP API, metrics, health and readiness.
//! - [`metrics`]: per-provider counters and latencies, engine gauges.
//! - [`i18n`]: the bot's own words in English and Russian.
//! - [`conversation`]: the durable conversation store (SQLite under `--data-dir`).
//! - [`responder`]: the one place a prompt is assembled (system prompt, stored history,
//!   message), the chain asked, and a delivered turn committed.
//! - [`doctor`]: `mistral-bot doctor`, the set-up check; [`gguf`]: the model file's header.
//! - [`kv_cache`]: the KV cache's settings (flash attention, K/V types) and its size per token.
//! - [`telegram`]: the Telegram bot (long polling or a webhook, streamed answers, commands);
//!   [`webhook`]: the hand-off from the HTTP API's webhook route to the bot.
//! - [`host`]: host limits decided at start-up (the memory plan, the data-dir lock).
//! - [`persona`]: the modes a conversation may choose and its stored choice;
//!   [`usage`]: per-user fair-use windows and their rows; [`chat_policy`]: their flags.
//!
//! # Data path
//! front-end (Telegram, HTTP, console) → [`Responder`](responder::Responder) (system prompt,
//! stored history and message → [`ChatRequest`](chat::ChatRequest)) →
//! [`Chain::reply`](providers::Chain::reply) → the first provider that answers: the local
//! engine ([`EngineHandle::submit`](engine::EngineHandle::submit) → bounded queue → engine
//! thread, one batch per step over all slots), else Groq, Mistral, Gemini, an
//! OpenAI-compatible fleet, else the canned apology → stream of
//! [`StreamEvent`](chat::StreamEvent)s → front-end, which tells the responder when the
//! answer was delivered (the turn is then committed to the store). The console's chain holds
//! the local engine only, and its history lives in memory.
//!
//! # Serve mode
//! [`run`] binds the HTTP API first (`/ready` is 503 while the model loads), loads the
//! engine, builds the chain with [`providers::build_chain`], starts the Telegram bot when a
//! token is configured (sharing the chain), and serves until Ctrl-C or SIGTERM; then the
//! requests in flight finish and the engine's KV caches are written to disk for the next
//! start ([`EngineHandle::park_all`](engine::EngineHandle::park_all)).
//! Tests run the same server in process with [`serve_http`] on a pre-bound listener.

pub mod chat;
pub mod chat_policy;
pub mod config;
pub mod console;
pub mod conversation;
pub mod doctor;
pub mod engine;
pub mod gguf;
pub mod host;
pub mod http;
pub mod i18n;
pub mod kv_cache;
pub mod link;
pub mod metrics;
pub mod persona;
pub mod providers;
pub mod redact;
pub mod responder;
pub mod telegram;
pub mod usage;
pub mod webhook;

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use config::{Config, Mode};
use conversation::ConversationStore;
use engine::EngineHandle;
use http::{AppState, HttpSettings};
use metrics::Metrics;
use providers::{Chain, LocalProvider};
use responder::{Responder, ResponderConfig};

pub use http::serve as serve_http;

/// What to say when serve mode has no Telegram token.
const NO_TOKEN: &str = "no Telegram bot token, so no Telegram bot: set TELEGRAM_BOT_TOKEN (in the environment or a \
    .env file) or pass --telegram-token <TOKEN> (get one from @BotFather); the HTTP API is served \
    either way; --console chats in the terminal, --prompt \"…\" gives one answer";

/// Runs what `config` asks for until it is done or the process is told to stop.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    if let Some(engine) = &mut config.engine {
        engine.progress_bar = std::io::stderr().is_terminal();
    }
    let prompt = match &config.mode {
        // The HTTP API starts before the engine, so serve mode owns the start-up order.
        Mode::Serve => return serve(config).await,
        Mode::Prompt(prompt) => Some(prompt.clone()),
        Mode::Console => None,
    };
    // `Config` refuses --prompt and --console without a model.
    let engine_config = config
        .engine
        .clone()
        .context("--prompt and --console need --model")?;
    let engine = EngineHandle::start(engine_config)
        .await
        .context("starting the local engine")?;
    // The terminal talks to the local model only; --verbose-prompt shows its tokens.
    let mut local = LocalProvider::new(engine.clone());
    if config.verbose_prompt {
        local = local.showing_prompt();
    }
    let chain = Chain::builder(Arc::new(Metrics::new()))
        .provider(local, config.providers.local_timeout)
        .build();
    let store = ConversationStore::in_memory(config.history)
        .await
        .context("starting the in-memory conversation store")?;
    let responder = Responder::new(
        Arc::new(chain),
        store,
        ResponderConfig {
            system_prompt: config.system_prompt.clone(),
            generate: config.generate.clone(),
            modes: Arc::clone(&config.modes),
            ..ResponderConfig::default()
        },
    );
    match prompt {
        Some(prompt) => console::answer_once(&responder, &prompt).await,
        None => console::chat(&responder, &engine.info().name).await,
    }
}

/// The HTTP settings `config` describes.
pub fn http_settings(config: &Config) -> HttpSettings {
    HttpSettings {
        api_key: config.http.api_key.clone(),
        body_limit: config.http.body_limit.get(),
        max_concurrent: config.http.max_concurrent.get(),
        model_id: model_id(config),
        generate: config.generate.clone(),
        connections: http::ConnectionLimits::default(),
    }
}

/// The model id the HTTP API names: the local model's file name, or (a front without one)
/// the model of the first cloud provider in the chain.
fn model_id(config: &Config) -> String {
    if let Some(engine) = &config.engine {
        return engine
            .model_path
            .file_stem()
            .map_or_else(|| "local".to_string(), |s| s.to_string_lossy().into_owned());
    }
    let p = &config.providers;
    p.chain
        .iter()
        .find_map(|kind| match kind {
            config::ProviderKind::Local => None,
            config::ProviderKind::Groq => Some(&p.groq.model),
            config::ProviderKind::Mistral => Some(&p.mistral.model),
            config::ProviderKind::Gemini => Some(&p.gemini.model),
            config::ProviderKind::OpenAi => Some(&p.openai.model),
        })
        .cloned()
        .unwrap_or_else(|| "mistral-bot".to_string())
}

/// The seed of the conversations' affinity keys: a secret of the deployment (the bot token,
/// else the API key), so a chat id cannot be confirmed by hashing it, and stable across
/// restarts, so a fleet keeps its caches.
fn affinity_seed(config: &Config) -> u64 {
    let secret = config
        .telegram
        .as_ref()
        .map(|t| t.token.expose())
        .or(config.http.api_key.as_ref().map(config::Secret::expose))
        .unwrap_or("");
    xxhash_rust::xxh3::xxh3_64(secret.as_bytes())
}

/// Serve mode: the HTTP API starts at once (`/ready` is 503 while the model loads), then
/// the engine loads, then chats are answered through the provider chain until Ctrl-C or
/// SIGTERM, after which the requests in flight finish.
async fn serve(mut config: Config) -> anyhow::Result<()> {
    // First, before anything opens a file or a socket.
    let max_connections = nofile_limit();
    // One process per data directory, before anything in it is touched.
    let _data_dir_lock = uses_data_dir(&config)
        .then(|| host::lock::DataDirLock::acquire(&config.data_dir))
        .transpose()?;
    let (host_memory, memory_plan) = host::plan_memory(&mut config);
    if config.telegram.is_none() {
        tracing::warn!("{NO_TOKEN}");
    }
    // Histories are kept for the Telegram bot; the HTTP API is stateless (its clients send
    // the whole conversation), so without a bot nothing is written to --data-dir.
    let store = if config.telegram.is_some() {
        let store = ConversationStore::open(&config.data_dir, config.history)
            .await
            .context("opening the conversation store")?;
        tracing::info!(
            path = %config.data_dir.join(conversation::DB_FILE).display(),
            conversations = store.conversations().await.unwrap_or(0),
            "conversation store open"
        );
        store
    } else {
        ConversationStore::in_memory(config.history)
            .await
            .context("starting the in-memory conversation store")?
    };
    let metrics = Arc::new(Metrics::new());
    if let Some(limit) = memory_plan.limit {
        metrics.set_memory_limit(limit.bytes);
    }
    let mut settings = http_settings(&config);
    settings.connections = http::ConnectionLimits::with_max_connections(max_connections);
    let state = AppState::new(settings, Arc::clone(&metrics));
    let link = link::TelegramLink::default();
    if config.telegram.is_some() {
        state.set_telegram_link(link.clone());
    }
    // Webhook mode: the HTTP API serves the webhook's path and hands updates to the bot.
    let webhook = config
        .telegram
        .as_ref()
        .and_then(|t| t.webhook.clone())
        .map(webhook::WebhookInbox::new);
    if let Some(inbox) = &webhook {
        state.set_webhook(inbox.clone());
    }
    let listener = TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("binding the HTTP API to {}", config.http.addr))?;
    let addr = listener.local_addr().context("reading the HTTP address")?;
    tracing::info!("HTTP API listening on http://{addr}");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let server = tokio::spawn(serve_http(
        listener,
        state.clone(),
        stopped(stop_rx.clone()),
    ));
    // Runs beside the engine's loading and never delays readiness; a broken key or a
    // retired model is in the log within seconds instead of showing up as breaker churn.
    tokio::spawn(providers::startup_check(config.providers.clone()));

    let engine = match config.engine.clone() {
        Some(engine_config) => Some(tokio::select! {
            engine = EngineHandle::start(engine_config) => {
                engine.context("starting the local engine")?
            }
            () = stopped(stop_rx.clone()) => return Ok(()),
        }),
        None => {
            tracing::info!("no local model: answers come from the chain's other providers");
            None
        }
    };
    let stt = config
        .inputs
        .stt
        .clone()
        .map(|stt| providers::stt::SttClient::new(stt, Arc::clone(&metrics)))
        .transpose()?;
    let chain = Arc::new(providers::build_chain(
        &config.providers,
        engine.clone(),
        metrics,
    )?);
    let responder = Arc::new(Responder::new(
        chain,
        store,
        ResponderConfig {
            system_prompt: config.system_prompt.clone(),
            generate: config.generate.clone(),
            verbose_prompt: config.verbose_prompt,
            affinity_seed: affinity_seed(&config),
            modes: Arc::clone(&config.modes),
        },
    ));
    state.set_ready(Arc::clone(&responder), engine.clone());
    if let (Some(engine_config), Some(engine)) = (&config.engine, &engine)
        && engine_config.park.is_some()
    {
        tokio::spawn(host::pressure::watch(
            host_memory,
            memory_plan,
            engine.clone(),
            stopped(stop_rx.clone()),
        ));
    }
    match &config.engine {
        Some(engine) => tracing::info!(model = %engine.model_path.display(), "ready"),
        None => tracing::info!(model = %model_id(&config), "ready"),
    }

    // A front without a local model sizes replied text and files for the default window.
    let window = config
        .engine
        .as_ref()
        .map_or(config::DEFAULT_CTX_SIZE, |engine| engine.ctx_size.get());
    let prompt_room = window.saturating_sub(config.generate.max_tokens) as usize;
    let inputs = telegram::inputs::Inputs::new(config.inputs.clone(), stt, prompt_room);
    let result = serve_front_ends(
        &config,
        telegram::BotDeps {
            responder,
            engine: engine.clone(),
            model_id: model_id(&config),
            link,
            inputs,
            webhook,
        },
        server,
        stop_rx,
    )
    .await;
    // Whatever stopped us, the KV caches in memory go to disk for the next start.
    let started = std::time::Instant::now();
    if let Some(engine) = &engine
        && engine.park_all(PARK_ON_EXIT_TIMEOUT).await
    {
        tracing::info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "KV caches written to disk"
        );
    }
    result
}

/// Whether serve mode writes under `--data-dir`: the Telegram bot's state and histories,
/// park files, or the cloud providers' counts (`budgets.json`).
fn uses_data_dir(config: &Config) -> bool {
    let cloud = |kind: &config::ProviderKind| *kind != config::ProviderKind::Local;
    config.telegram.is_some()
        || config
            .engine
            .as_ref()
            .and_then(|e| e.park.as_ref())
            .is_some_and(|p| p.disk_bytes > 0)
        // The cloud providers' counts (budgets.json).
        || (config.providers.state_dir.is_some() && config.providers.chain.iter().any(cloud))
}

/// Raises the open-file limit to the hard limit, logs it, and returns how many client
/// connections the HTTP server may hold under it.
fn nofile_limit() -> usize {
    let limit = host::nofile::raise();
    let cap = limit.http_connection_cap();
    let show = host::nofile::show;
    tracing::info!(
        soft_at_start = %show(limit.soft_before),
        soft = %show(limit.soft),
        hard = %show(limit.hard),
        http_connections = cap,
        "open-file limit (RLIMIT_NOFILE)"
    );
    if limit
        .soft
        .is_some_and(|soft| soft < host::nofile::LOW_LIMIT)
    {
        tracing::warn!(
            soft = %show(limit.soft),
            "the open-file limit is low: HTTP clients are capped at {cap} connections; raise the \
             hard limit (LimitNOFILE=65536 in the systemd unit, --ulimit nofile=65536 for docker)"
        );
    }
    cap
}

/// How long shutdown waits for the KV caches to be written to disk.
const PARK_ON_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the HTTP API and, when configured, the Telegram bot until they stop.
async fn serve_front_ends(
    config: &Config,
    deps: telegram::BotDeps,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(telegram) = config.telegram.clone() else {
        return server
            .await
            .context("the HTTP server task failed")?
            .context("the HTTP server failed");
    };
    let link = deps.link.clone();
    // The bot stops with the same signal as the HTTP API. It waits out a Bot API that
    // cannot be reached; what stops it for good (a rejected token) stops the Telegram side
    // alone: the HTTP API and the engine keep serving, and `/ready` says so.
    let bot = telegram::run(telegram, deps, stopped(stop_rx));
    if let Err(e) = bot.await {
        link.set(link::LinkState::Stopped);
        let e = anyhow::Error::from(e).context("the Telegram bot stopped");
        tracing::error!("{e:#}; the HTTP API keeps serving");
    }
    server
        .await
        .context("the HTTP server task failed")?
        .context("the HTTP server failed")
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
