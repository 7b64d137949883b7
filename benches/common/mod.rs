//! Shared by the benches: the model to measure and an engine set up for it.

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

use std::time::{Duration, Instant};

use mistral_bot::chat::{ChatMessage, ChatRequest, GenerateParams};
use mistral_bot::engine::{ChatTemplateChoice, EngineConfig, EngineHandle};

/// The model: `MISTRAL_BOT_BENCH_MODEL`, else the test model.
pub fn bench_model() -> PathBuf {
    std::env::var_os("MISTRAL_BOT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// The production defaults (4 slots × 4096, all CPUs) with the given prefill chunk.
pub fn bench_engine_config(prefill_chunk: u32) -> EngineConfig {
    EngineConfig {
        model_path: bench_model(),
        slots: NonZeroUsize::new(4).expect("non-zero"),
        ctx_size: NonZeroU32::new(4096).expect("non-zero"),
        threads: NonZeroUsize::new(num_cpus::get()).expect("non-zero"),
        batch_size: NonZeroU32::new(512).expect("non-zero"),
        prefill_chunk: NonZeroU32::new(prefill_chunk).expect("non-zero"),
        step_target: None,
        prompt_step: None,
        kv: Default::default(),
        queue_size: NonZeroUsize::new(16).expect("non-zero"),
        mmap: false,
        repack: true,
        chat_template: ChatTemplateChoice::Auto,
        llama_log: false,
        progress_bar: false,
        park: None,
    }
}

/// Greedy decoding of exactly `max_tokens` (with a prompt that does not stop early).
pub fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams::greedy(max_tokens)
}

/// A prompt the small test model answers at length (it counts on and on).
pub const ENDLESS: &str = "Write the numbers from 1 to 300 in words, separated by commas.";

/// Runs `streams` copies of the [`ENDLESS`] prompt at once, `tokens` each; returns the
/// tokens generated in all and the wall time.
pub async fn generate_concurrently(
    engine: &EngineHandle,
    streams: usize,
    tokens: u32,
) -> (u32, Duration) {
    let start = Instant::now();
    let replies = (0..streams).map(|_| {
        let request = ChatRequest::new(vec![ChatMessage::user(ENDLESS)], greedy(tokens));
        engine.submit(request).expect("queue has room").collect()
    });
    let generated = futures::future::join_all(replies)
        .await
        .into_iter()
        .map(|r| r.expect("generation succeeds").1.usage.completion_tokens)
        .sum();
    (generated, start.elapsed())
}
