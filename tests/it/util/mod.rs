//! Shared test helpers: the test model, engine start-up, waiting for conditions.

#![allow(dead_code)]

pub mod app;
pub mod bot_process;
pub mod fake_provider;
pub mod fake_stt;
pub mod fake_telegram;
pub mod prometheus;

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mistral_bot::chat::GenerateParams;
use mistral_bot::engine::{ChatTemplateChoice, EngineConfig, EngineHandle};

/// The SmolLM2 test model. Fails (never skips) with the command that fetches it.
pub fn test_model() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "test model missing: run `bash models/fetch-test-model.sh` (expected {})",
        path.display()
    );
    path
}

/// An engine config for tests: the test model, small windows, few threads.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        model_path: test_model(),
        slots: NonZeroUsize::new(4).unwrap(),
        ctx_size: NonZeroU32::new(1024).unwrap(),
        // One llama.cpp thread: tests run two at a time on 2 cores, and llama.cpp's
        // OpenMP threads spin-wait, which is many times slower when cores are oversubscribed.
        threads: NonZeroUsize::new(1).unwrap(),
        batch_size: NonZeroU32::new(512).unwrap(),
        prefill_chunk: NonZeroU32::new(128).unwrap(),
        // Fixed chunks: tests that want time budgets set one.
        step_target: None,
        prompt_step: None,
        kv: Default::default(),
        queue_size: NonZeroUsize::new(4).unwrap(),
        mmap: false,
        repack: true,
        chat_template: ChatTemplateChoice::Auto,
        llama_log: false,
        progress_bar: false,
        park: None,
    }
}

/// Starts an engine with `config`.
pub async fn start_engine(config: EngineConfig) -> EngineHandle {
    EngineHandle::start(config).await.expect("engine starts")
}

/// Greedy decoding with a token cap.
pub fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams::greedy(max_tokens)
}

/// Polls `check` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
