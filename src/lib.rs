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
//! - [`conversation`]: per-chat history.
//! - [`doctor`]: `mistral-bot doctor`, the set-up check; [`gguf`]: the model file's header.
//! - [`telegram`]: the Telegram bot (long polling, streamed answers, commands).
//!
//! # Data path
//! front-end (Telegram, HTTP) → [`ChatRequest`](chat::ChatRequest) →
//! [`Chain::reply`](providers::Chain::reply) → the first provider that answers: the local
//! engine ([`EngineHandle::submit`](engine::EngineHandle::submit) → bounded queue → engine
//! thread, one batch per step over all slots), else Groq, Mistral, Gemini, an
//! OpenAI-compatible fleet, else the canned apology → stream of
//! [`StreamEvent`](chat::StreamEvent)s → front-end. The console talks to the engine directly.
//!
//! # Serve mode
//! [`run`] binds the HTTP API first (`/ready` is 503 while the model loads), loads the
//! engine, builds the chain with [`providers::build_chain`], starts the Telegram bot when a
//! token is configured (sharing the chain), and serves until Ctrl-C or SIGTERM. Tests run the same server in process with [`serve_http`] on a pre-bound listener.

pub mod chat;
pub mod config;
pub mod console;
pub mod conversation;
pub mod doctor;
pub mod engine;
pub mod gguf;
pub mod http;
pub mod i18n;
pub mod metrics;
pub mod providers;
pub mod redact;
pub mod telegram;

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use config::{Config, Mode};
use console::ConsoleConfig;
use engine::EngineHandle;
use http::{AppState, HttpSettings};
use metrics::Metrics;

pub use http::serve as serve_http;

/// What to say when serve mode has no Telegram token.
const NO_TOKEN: &str = "no Telegram bot token, so no Telegram bot: set TELEGRAM_BOT_TOKEN (in the environment or a \
    .env file) or pass --telegram-token <TOKEN> (get one from @BotFather); the HTTP API is served \
    either way; --console chats in the terminal, --prompt \"…\" gives one answer";

/// Runs what `config` asks for until it is done or the process is told to stop.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    config.engine.progress_bar = std::io::stderr().is_terminal();
    let prompt = match &config.mode {
        // The HTTP API starts before the engine, so serve mode owns the start-up order.
        Mode::Serve => return serve(config).await,
        Mode::Prompt(prompt) => Some(prompt.clone()),
        Mode::Console => None,
    };
    let engine = EngineHandle::start(config.engine.clone())
        .await
        .context("starting the local engine")?;
    let console = ConsoleConfig {
        generate: config.generate.clone(),
        system_prompt: config.system_prompt.clone(),
        verbose_prompt: config.verbose_prompt,
    };
    match prompt {
        Some(prompt) => console::answer_once(&engine, &console, &prompt).await,
        None => console::chat(&engine, &console).await,
    }
}

/// The HTTP settings `config` describes.
pub fn http_settings(config: &Config) -> HttpSettings {
    HttpSettings {
        api_key: config.http.api_key.clone(),
        body_limit: config.http.body_limit.get(),
        max_concurrent: config.http.max_concurrent.get(),
        model_id: config
            .engine
            .model_path
            .file_stem()
            .map_or_else(|| "local".to_string(), |s| s.to_string_lossy().into_owned()),
        generate: config.generate.clone(),
        system_prompt: config.system_prompt.clone(),
    }
}

/// Serve mode: the HTTP API starts at once (`/ready` is 503 while the model loads), then
/// the engine loads, then chats are answered through the provider chain until Ctrl-C or
/// SIGTERM, after which the requests in flight finish.
async fn serve(config: Config) -> anyhow::Result<()> {
    if config.telegram.is_none() {
        tracing::warn!("{NO_TOKEN}");
    }
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(http_settings(&config), Arc::clone(&metrics));
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

    let engine = tokio::select! {
        engine = EngineHandle::start(config.engine.clone()) => {
            engine.context("starting the local engine")?
        }
        () = stopped(stop_rx.clone()) => return Ok(()),
    };
    let chain = Arc::new(providers::build_chain(
        &config.providers,
        engine.clone(),
        metrics,
    )?);
    state.set_ready(Arc::clone(&chain), engine.clone());
    tracing::info!(model = %config.engine.model_path.display(), "ready");

    let Some(telegram) = config.telegram.clone() else {
        return server
            .await
            .context("the HTTP server task failed")?
            .context("the HTTP server failed");
    };
    let deps = telegram::BotDeps {
        chain,
        engine,
        generate: config.generate.clone(),
        system_prompt: config.system_prompt.clone(),
        verbose_prompt: config.verbose_prompt,
    };
    // The bot stops with the same signal as the HTTP API; a fatal bot error (a rejected
    // token) stops the process, since the bot is what the operator asked for.
    let bot = telegram::run(telegram, deps, stopped(stop_rx));
    let bot_result = bot.await.context("the Telegram bot stopped");
    if bot_result.is_err() {
        server.abort();
        return bot_result;
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
