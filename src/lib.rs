//! mistral-bot: a self-hosted LLM chat bot. llama.cpp runs in this process (a pool of
//! inference slots with continuous batching), and chats are served from the same process.
//!
//! # Layout
//! - [`config`]: command line and environment → validated [`Config`](config::Config).
//! - [`chat`]: the shared vocabulary (messages, parameters, stream events).
//! - [`engine`]: the inference thread, slots, scheduler, prompt building, detokenizer.
//! - [`console`]: `--prompt` and `--console`.
//! - [`providers`]: the fallback chain (local engine, cloud providers, canned apology).
//! - [`i18n`]: the bot's own words in English and Russian.
//! - [`conversation`]: per-chat history.
//! - [`telegram`]: the Telegram bot (long polling, streamed answers, commands).
//!
//! # Data path
//! front-end → [`ChatRequest`](chat::ChatRequest) → [`EngineHandle::submit`](engine::EngineHandle::submit)
//! → bounded queue → engine thread (one batch per step over all slots) → per-request
//! stream of [`StreamEvent`](chat::StreamEvent)s → front-end.

pub mod chat;
pub mod config;
pub mod console;
pub mod conversation;
pub mod engine;
pub mod i18n;
pub mod providers;
pub mod telegram;

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context as _;

use config::{Config, Mode};
use console::ConsoleConfig;
use engine::EngineHandle;
use providers::{Chain, LocalProvider};

/// What to say when there is nothing to serve.
const NO_TOKEN: &str = "no Telegram bot token: set TELEGRAM_BOT_TOKEN (in the environment or a \
    .env file) or pass --telegram-token <TOKEN> (get one from @BotFather); or use --console to \
    chat in the terminal, or --prompt \"…\" for one answer";

/// Runs what `config` asks for until it is done or the process is told to stop.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    if config.mode == Mode::Serve && config.telegram.is_none() {
        // Say so before spending time loading the model.
        anyhow::bail!(NO_TOKEN);
    }
    config.engine.progress_bar = std::io::stderr().is_terminal();
    let engine = EngineHandle::start(config.engine.clone())
        .await
        .context("starting the local engine")?;
    let console = ConsoleConfig {
        generate: config.generate.clone(),
        system_prompt: config.system_prompt.clone(),
        verbose_prompt: config.verbose_prompt,
    };
    match &config.mode {
        Mode::Prompt(prompt) => console::answer_once(&engine, &console, prompt).await,
        Mode::Console => console::chat(&engine, &console).await,
        Mode::Serve => {
            let Some(telegram) = config.telegram.clone() else {
                anyhow::bail!(NO_TOKEN);
            };
            let chain = Chain::new(vec![Box::new(LocalProvider::new(engine.clone()))]);
            let deps = telegram::BotDeps {
                chain: Arc::new(chain),
                engine,
                generate: config.generate.clone(),
                system_prompt: config.system_prompt.clone(),
                verbose_prompt: config.verbose_prompt,
            };
            telegram::run(telegram, deps, shutdown_signal())
                .await
                .context("the Telegram bot stopped")
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}
