//! The chain's added latency when the local engine answers, measured in pairs: each round
//! sends the same greedy request once straight to the engine and once through
//! `Chain::reply` (alternating which goes first), so both see the same machine load.
//! Prints the medians and the median of the per-pair differences.
//!
//! `cargo run --release --example chain_overhead [rounds] [max_tokens]` (model: `MISTRAL_BOT_BENCH_MODEL`,
//! default the test model).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use mistral_bot::chat::{ChatMessage, ChatRequest, GenerateParams};
use mistral_bot::engine::{ChatTemplateChoice, EngineConfig, EngineHandle};
use mistral_bot::i18n::Lang;
use mistral_bot::metrics::Metrics;
use mistral_bot::providers::{Chain, LocalProvider};

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::user("Say hello.")],
        GenerateParams::greedy(max_tokens),
    )
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()
        .context("rounds must be a number")?
        .unwrap_or(40);
    let max_tokens: u32 = std::env::args()
        .nth(2)
        .map(|r| r.parse())
        .transpose()
        .context("max_tokens must be a number")?
        .unwrap_or(8);
    let model = std::env::var_os("MISTRAL_BOT_BENCH_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    let engine = EngineHandle::start(EngineConfig {
        model_path: model.clone(),
        slots: NonZeroUsize::MIN,
        ctx_size: NonZeroU32::new(1024).context("ctx")?,
        threads: NonZeroUsize::new(2).context("threads")?,
        batch_size: NonZeroU32::new(512).context("batch")?,
        prefill_chunk: NonZeroU32::new(128).context("chunk")?,
        step_target: None,
        prompt_step: None,
        kv: Default::default(),
        queue_size: NonZeroUsize::new(4).context("queue")?,
        mmap: false,
        repack: true,
        chat_template: ChatTemplateChoice::Auto,
        llama_log: false,
        progress_bar: false,
        park: None,
    })
    .await
    .with_context(|| format!("loading {}", model.display()))?;
    let chain = Chain::builder(Arc::new(Metrics::new()))
        .provider(LocalProvider::new(engine.clone()), Duration::from_secs(60))
        .build();

    let direct = || async {
        let started = Instant::now();
        let reply = engine
            .submit(request(max_tokens))
            .context("engine refused")?;
        reply.collect().await.context("engine failed")?;
        anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let chained = || async {
        let started = Instant::now();
        let reply = chain.reply(request(max_tokens), Lang::En).await?;
        anyhow::ensure!(reply.provider == "local", "{} answered", reply.provider);
        reply.events.collect::<Vec<_>>().await;
        anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    // Warm the prompt cache and the allocator.
    direct().await?;
    chained().await?;
    let (mut d, mut c, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = direct().await?;
            (a, chained().await?)
        } else {
            let b = chained().await?;
            (direct().await?, b)
        };
        d.push(a);
        c.push(b);
        diff.push(b - a);
    }
    println!(
        "{rounds} pairs, {max_tokens}-token greedy replies: engine direct median {:.2} ms, through chain \
         median {:.2} ms, median per-pair difference {:+.3} ms",
        median(&mut d),
        median(&mut c),
        median(&mut diff)
    );
    Ok(())
}
