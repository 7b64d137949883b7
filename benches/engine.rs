//! Decode throughput: one stream alone vs four streams at once, side by side in one run.
//! Continuous batching should make the four cost little more than one (decode is memory
//! bound), so the aggregate tokens/s of the second is the figure to watch.
//!
//! `cargo bench --bench engine` (model: `MISTRAL_BOT_BENCH_MODEL`, default the test model).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mistral_bot::engine::EngineHandle;

#[path = "common/mod.rs"]
mod common;

const TOKENS: u32 = 64;

async fn generate(engine: &EngineHandle, streams: usize) -> Duration {
    let (generated, elapsed) = common::generate_concurrently(engine, streams, TOKENS).await;
    assert_eq!(
        generated,
        TOKENS * streams as u32,
        "the prompt must not stop early"
    );
    elapsed
}

fn decode_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let engine = runtime
        .block_on(EngineHandle::start(common::bench_engine_config(64)))
        .expect("engine starts");
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    for streams in [1usize, 4] {
        group.throughput(Throughput::Elements(u64::from(TOKENS) * streams as u64));
        group.bench_function(format!("{streams}_streams"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| runtime.block_on(generate(&engine, streams)))
                    .sum()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode_throughput);
criterion_main!(benches);
