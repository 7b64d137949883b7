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
//!
//! # Data path
//! front-end → [`ChatRequest`](chat::ChatRequest) → [`EngineHandle::submit`](engine::EngineHandle::submit)
//! → bounded queue → engine thread (one batch per step over all slots) → per-request
//! stream of [`StreamEvent`](chat::StreamEvent)s → front-end.

pub mod chat;
pub mod config;
pub mod console;
pub mod engine;
pub mod i18n;
pub mod providers;

use std::io::IsTerminal;

use anyhow::Context as _;

use config::{Config, Mode};
use console::ConsoleConfig;
use engine::EngineHandle;

/// Runs what `config` asks for until it is done or the process is told to stop.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
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
        Mode::Serve => anyhow::bail!(
            "nothing to serve yet: use --console to chat in the terminal or --prompt \"…\" for one answer"
        ),
    }
}
