//! Fairness under a long prompt: while one chat streams, a cold ~2000-token prompt arrives.
//! Prints, for several `--prefill-chunk` values, the largest gap between two text deltas
//! of the streaming chat while the newcomer's prompt is read, next to the gap with no
//! newcomer and the newcomer's time to first token. Also single-stream vs 4-stream decode
//! tokens/s, measured in the same run.
//!
//! `cargo bench --bench fairness` (model: `MISTRAL_BOT_BENCH_MODEL`, default the test
//! model). Under `cargo test` it runs one small case, to keep the code working.

use std::time::{Duration, Instant};

use mistral_bot::chat::{ChatMessage, ChatRequest, StreamEvent};
use mistral_bot::engine::EngineHandle;

#[path = "common/mod.rs"]
mod common;

/// Largest gap between deltas of a stream, and the deltas' timestamps.
async fn stream_gaps(
    engine: &EngineHandle,
    max_tokens: u32,
    newcomer_after: Option<(usize, String)>,
) -> (Duration, Option<Duration>) {
    let request = ChatRequest::new(
        vec![ChatMessage::user(common::ENDLESS)],
        common::greedy(max_tokens),
    );
    let mut stream = engine.submit(request).expect("queue has room");
    let mut last: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let mut deltas = 0;
    let mut newcomer = None;
    let mut newcomer_ttft = None;
    let mut newcomer_started = None;
    while let Some(event) = stream.next_event().await {
        match event.expect("generation succeeds") {
            StreamEvent::Delta(_) => {
                let now = Instant::now();
                deltas += 1;
                if let Some(prev) = last {
                    // Only gaps after the newcomer arrived (or all, without one).
                    if newcomer_after.is_none() || newcomer_started.is_some() {
                        max_gap = max_gap.max(now - prev);
                    }
                }
                last = Some(now);
                if let Some((after, prompt)) = &newcomer_after
                    && deltas == *after
                {
                    let request = ChatRequest::new(
                        vec![ChatMessage::user(prompt.clone())],
                        common::greedy(1),
                    );
                    newcomer = Some(engine.submit(request).expect("queue has room"));
                    newcomer_started = Some(Instant::now());
                }
                if let (Some(reply), None) = (newcomer.as_mut(), newcomer_ttft) {
                    // Poll without waiting: record when its first token came (getting a
                    // slot, `Started`, is not one).
                    while let Ok(Some(event)) =
                        tokio::time::timeout(Duration::ZERO, reply.next_event()).await
                    {
                        if !matches!(event, Ok(StreamEvent::Started)) {
                            newcomer_ttft = newcomer_started.map(|s| s.elapsed());
                            break;
                        }
                    }
                }
            }
            StreamEvent::Done(_) => break,
            StreamEvent::Started
            | StreamEvent::Prompt(_)
            | StreamEvent::Logprobs(_)
            | StreamEvent::Choice(_)
            | StreamEvent::ChoiceEnd(_)
            | StreamEvent::ToolCall(_) => {}
        }
    }
    if let (Some(mut reply), None) = (newcomer, newcomer_ttft) {
        while let Some(Ok(StreamEvent::Started)) = reply.next_event().await {}
        newcomer_ttft = newcomer_started.map(|s| s.elapsed());
    }
    (max_gap, newcomer_ttft)
}

/// A cold prompt of about `words` words, unique per `run` so no slot has it cached.
fn cold_prompt(words: usize, run: usize) -> String {
    let mut text = format!("Session {run}. Summarize the following notes.\n");
    let vocabulary = [
        "river", "mountain", "engine", "violet", "market", "signal", "harbor", "lantern", "orbit",
        "meadow",
    ];
    for i in 0..words {
        text.push_str(vocabulary[(i * 7 + run) % vocabulary.len()]);
        text.push(if i % 12 == 11 { '.' } else { ' ' });
    }
    text
}

async fn decode_rate(engine: &EngineHandle, streams: usize, tokens: u32) -> f64 {
    let (generated, elapsed) = common::generate_concurrently(engine, streams, tokens).await;
    f64::from(generated) / elapsed.as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (chunks, words, stream_tokens): (&[u32], usize, u32) = if full {
        (&[32, 64, 128, 256, 512], 1700, 400)
    } else {
        (&[128], 200, 40)
    };
    println!("model: {}", common::bench_model().display());
    println!(
        "prefill_chunk | max gap alone | max gap with cold prompt | newcomer TTFT | prompt tokens"
    );
    for (run, &chunk) in chunks.iter().enumerate() {
        runtime.block_on(async {
            let engine = EngineHandle::start(common::bench_engine_config(chunk))
                .await
                .expect("engine starts");
            // Warm up: the streaming chat's own prompt is cached after this.
            let _ = stream_gaps(&engine, 8, None).await;
            let (alone, _) = stream_gaps(&engine, stream_tokens, None).await;
            let prompt = cold_prompt(words, run);
            let (with_newcomer, ttft) =
                stream_gaps(&engine, stream_tokens, Some((10, prompt))).await;
            let stats = engine.stats();
            println!(
                "{chunk:>13} | {:>10.0} ms | {:>21.0} ms | {:>10.0} ms | {}",
                alone.as_secs_f64() * 1e3,
                with_newcomer.as_secs_f64() * 1e3,
                ttft.unwrap_or_default().as_secs_f64() * 1e3,
                stats.prompt_tokens_processed,
            );
        });
    }
    runtime.block_on(async {
        let engine = EngineHandle::start(common::bench_engine_config(64))
            .await
            .expect("engine starts");
        let tokens = if full { 128 } else { 16 };
        let _ = decode_rate(&engine, 4, 4).await; // warm the slots' caches
        let one = decode_rate(&engine, 1, tokens).await;
        let four = decode_rate(&engine, 4, tokens).await;
        println!(
            "decode: 1 stream {one:.1} tok/s, 4 streams {four:.1} tok/s aggregate ({:.2}x)",
            four / one
        );
    });
}
