//! KV cache types against f16 on one model: the quality check of issue 17 and the size of
//! a parked state per token. Deterministic (greedy), so it can run on a busy machine; its
//! timings are not reported (those need a quiet one: benches/vs-llama-server.sh).
//!
//! For every setting, 20 fixed prompts are answered greedily (`max_tokens`, end of turn
//! ignored so every continuation has the same length) and compared with the answers of
//! f16 keys and values under the same flash-attention setting (flash attention alone
//! changes the arithmetic, so it has its own reference; f16 with it on is also compared
//! with f16 with it off): the tokens agreeing before the first divergence (the common text
//! prefix, counted in tokens). The types offered are those that passed (see
//! `kv_cache::CacheType`); q5_0 and the 4-bit ones were measured with this example before
//! they were left out (benches/RESULTS.md). Then one conversation is parked
//! to disk and its state's bytes per token are read from the park file.
//!
//! ```sh
//! cargo run --release --example kv_quality -- [MODEL.gguf] [THREADS] [MAX_TOKENS]
//! ```

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mistral_bot::chat::{ChatMessage, ChatRequest, GenerateParams};
use mistral_bot::engine::park::file;
use mistral_bot::engine::{ChatTemplateChoice, EngineConfig, EngineHandle, ParkConfig};
use mistral_bot::kv_cache::CacheType::{self, Bf16, F16, Q5_1, Q8_0};
use mistral_bot::kv_cache::{FlashAttn, KvCacheSettings};

const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "How do I boil an egg?",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
    "Give me a tip for learning a new language.",
    "Why is the sky blue?",
    "Write a short story about a lost key.",
    "What does a compiler do?",
    "Translate 'good morning' into Spanish and German.",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of walking every day?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a bakery.",
    "What is the difference between weather and climate?",
    "Write a polite email declining an invitation.",
    "Count from one to ten in words.",
];

fn config(model: &Path, threads: usize, kv: KvCacheSettings, dir: PathBuf) -> EngineConfig {
    EngineConfig {
        model_path: model.to_path_buf(),
        slots: NonZeroUsize::MIN,
        ctx_size: NonZeroU32::new(1024).unwrap_or(NonZeroU32::MIN),
        threads: NonZeroUsize::new(threads).unwrap_or(NonZeroUsize::MIN),
        batch_size: NonZeroU32::new(512).unwrap_or(NonZeroU32::MIN),
        prefill_chunk: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
        step_target: None,
        prompt_step: None,
        kv,
        queue_size: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
        mmap: false,
        repack: true,
        chat_template: ChatTemplateChoice::Auto,
        llama_log: false,
        progress_bar: false,
        park: Some(ParkConfig {
            dir,
            ram_bytes: 0,
            disk_bytes: 1 << 30,
        }),
    }
}

async fn answers(engine: &EngineHandle, max_tokens: u32) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for prompt in PROMPTS {
        let mut params = GenerateParams::greedy(max_tokens);
        params.ignore_eos = true;
        let request = ChatRequest::new(vec![ChatMessage::user(prompt)], params);
        let (text, _) = engine.submit(request)?.collect().await?;
        out.push(text);
    }
    Ok(out)
}

/// Bytes per token of the states in the park files under `dir`.
fn state_bytes_per_token(dir: &Path) -> anyhow::Result<f64> {
    let (mut bytes, mut tokens) = (0usize, 0usize);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "kvpark") {
            let decoded = file::decode(std::fs::read(&path)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            bytes += decoded.state.len();
            tokens += decoded.tokens.len();
        }
    }
    anyhow::ensure!(tokens > 0, "no park file written");
    Ok(bytes as f64 / tokens as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let max_tokens: u32 = args.next().map_or(Ok(64), |t| t.parse())?;
    let settings: Vec<(FlashAttn, CacheType, CacheType)> = vec![
        (FlashAttn::Off, F16, F16),
        (FlashAttn::On, F16, F16),
        (FlashAttn::On, Bf16, Bf16),
        (FlashAttn::Off, Q8_0, F16),
        (FlashAttn::On, Q8_0, Q8_0),
        (FlashAttn::On, Q5_1, Q5_1),
    ];
    println!(
        "model {}, {threads} threads, {} prompts × {max_tokens} tokens, greedy",
        model.display(),
        PROMPTS.len()
    );
    println!(
        "| K | V | flash attn | state bytes/token | compared with | tokens agreeing (median, min, mean) | identical |"
    );
    println!("|---|---|---|---:|---|---|---:|");
    // The f16 answers per flash-attention setting, and an engine to count tokens.
    let mut references: Vec<(bool, Vec<String>)> = Vec::new();
    let mut counter: Option<EngineHandle> = None;
    for (flash_attn, type_k, type_v) in settings {
        let kv = KvCacheSettings::new(flash_attn, type_k, type_v)?;
        // Every setting here is explicit (or a quantized V's `auto`, which is on).
        let fa = kv.flash_attn() == Some(true);
        let dir = tempfile::tempdir()?;
        let engine = EngineHandle::start(config(&model, threads, kv, dir.path().to_path_buf()))
            .await
            .with_context(|| format!("engine with {kv}"))?;
        let texts = answers(&engine, max_tokens).await?;
        anyhow::ensure!(engine.park_all(Duration::from_secs(60)).await, "park_all");
        let per_token = state_bytes_per_token(dir.path())?;
        let counter = counter.get_or_insert_with(|| engine.clone()).clone();
        // f16 with flash attention on is compared with f16 with it off (the first
        // reference); every other setting with f16 under its own setting.
        let is_f16 = (type_k, type_v) == (F16, F16);
        let base = references
            .iter()
            .find(|(f, _)| *f == fa && !is_f16)
            .or(references.first())
            .map_or_else(|| texts.clone(), |(_, base)| base.clone());
        let reference = if !is_f16 && fa { "f16, on" } else { "f16, off" };
        let mut agree: Vec<usize> = base
            .iter()
            .zip(&texts)
            .map(|(a, b)| {
                let common: String = a
                    .chars()
                    .zip(b.chars())
                    .take_while(|(x, y)| x == y)
                    .map(|(x, _)| x)
                    .collect();
                if a == b {
                    max_tokens as usize
                } else {
                    counter.count_tokens(&common)
                }
            })
            .collect();
        let identical = base.iter().zip(&texts).filter(|(a, b)| a == b).count();
        agree.sort_unstable();
        let mean = agree.iter().sum::<usize>() as f64 / agree.len() as f64;
        println!(
            "| {type_k} | {type_v} | {} | {per_token:.0} | {reference} | {}, {}, {mean:.1} | {identical}/{} |",
            if fa { "on" } else { "off" },
            agree[agree.len() / 2],
            agree[0],
            PROMPTS.len()
        );
        if is_f16 {
            references.push((fa, texts));
        }
    }
    Ok(())
}
