//! What the fallback chain adds when the local engine answers: the same greedy request
//! through `EngineHandle::submit` directly and through `Chain::reply` (one local
//! provider, metrics, timeouts, breaker bookkeeping), side by side in one run. A second
//! group isolates the chain's own cost with a provider that answers instantly.
//!
//! `cargo bench --bench chain_overhead` (the model: `MISTRAL_BOT_BENCH_MODEL`, default the
//! test model).

use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream;
use mistral_bot::chat::{
    ChatMessage, ChatRequest, Completion, FinishReason, GenerateParams, StreamEvent, Timings, Usage,
};
use mistral_bot::engine::{ChatTemplateChoice, EngineConfig, EngineHandle};
use mistral_bot::i18n::Lang;
use mistral_bot::metrics::Metrics;
use mistral_bot::providers::{Chain, EventStream, LocalProvider, Provider, ProviderError};

fn model() -> PathBuf {
    std::env::var_os("MISTRAL_BOT_BENCH_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    )
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        model_path: model(),
        slots: NonZeroUsize::new(1).expect("non-zero"),
        ctx_size: NonZeroU32::new(1024).expect("non-zero"),
        threads: NonZeroUsize::new(2).expect("non-zero"),
        batch_size: NonZeroU32::new(512).expect("non-zero"),
        prefill_chunk: NonZeroU32::new(128).expect("non-zero"),
        step_target: None,
        prompt_step: None,
        kv: Default::default(),
        queue_size: NonZeroUsize::new(4).expect("non-zero"),
        mmap: false,
        repack: true,
        chat_template: ChatTemplateChoice::Auto,
        llama_log: false,
        progress_bar: false,
        park: None,
    }
}

fn request() -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::user("Say hello.")],
        GenerateParams::greedy(8),
    )
}

/// Answers at once: "Hello." then `Done`.
struct Instant;

impl Provider for Instant {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        let events = stream::iter([
            Ok(StreamEvent::Delta("Hello.".into())),
            Ok(StreamEvent::Done(Completion {
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
                timings: Timings::default(),
            })),
        ])
        .boxed();
        Box::pin(async move { Ok(events) })
    }
}

fn local_chain(engine: &EngineHandle) -> Chain {
    Chain::builder(Arc::new(Metrics::new()))
        .provider(LocalProvider::new(engine.clone()), Duration::from_secs(60))
        .build()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let engine = rt
        .block_on(EngineHandle::start(engine_config()))
        .expect("the bench model loads (bash models/fetch-test-model.sh)");
    let chain = local_chain(&engine);

    let mut group = c.benchmark_group("local_reply_8_tokens");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("engine_direct", |b| {
        b.iter(|| {
            rt.block_on(async {
                let reply = engine.submit(request()).expect("engine accepts");
                black_box(reply.collect().await.expect("engine answers"))
            })
        })
    });
    group.bench_function("through_chain", |b| {
        b.iter(|| {
            rt.block_on(async {
                let reply = chain.reply(request(), Lang::En).await.expect("not refused");
                assert_eq!(reply.provider, "local");
                black_box(reply.events.collect::<Vec<_>>().await)
            })
        })
    });
    group.finish();

    let instant_chain = Chain::builder(Arc::new(Metrics::new()))
        .provider(Instant, Duration::from_secs(60))
        .build();
    let mut group = c.benchmark_group("instant_provider");
    group.bench_function("provider_direct", |b| {
        b.iter(|| {
            rt.block_on(async {
                let events = Instant.stream(request()).await.expect("answers");
                black_box(events.collect::<Vec<_>>().await)
            })
        })
    });
    group.bench_function("through_chain", |b| {
        b.iter(|| {
            rt.block_on(async {
                let reply = instant_chain
                    .reply(request(), Lang::En)
                    .await
                    .expect("not refused");
                black_box(reply.events.collect::<Vec<_>>().await)
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
