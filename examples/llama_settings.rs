//! The llama.cpp settings of issue 17 side by side on one model: flash attention off/on and
//! the KV cache types, by phase (prompt chunks of 64 and 512 tokens; decode at several
//! depths, one stream and four) and the park path's times (copy out, write with fsync,
//! read back with checksum, restore). What `llama-bench -fa 0,1 -ctk … -p 64,512 -n 16
//! -d 0,1500,4000` measures, with the engine's own context layout (a KV stream per slot,
//! batch = micro-batch = 512) and the engine's own park file format; llama-bench's source
//! is not in the llama.cpp tree the build vendors.
//!
//! Settings alternate within each repetition (A B C, A B C, …) so that a slow minute of a
//! shared machine hits all of them; the table gives the median of the repetitions. Tokens
//! are pseudo-random ids, as llama-bench's: the cost of a step does not depend on them.
//! Run it alone: llama.cpp's threads spin, and anything else running skews the figures.
//!
//! ```sh
//! cargo run --release --example llama_settings -- MODEL.gguf [THREADS] [REPS] \
//!     [DEPTHS, e.g. 0,1500,4000] [SETTINGS, e.g. off:f16:f16,on:f16:f16,on:q8_0:q8_0]
//! ```

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use mistral_bot::engine::park::{
    self,
    file::{self, ParkKey},
};
use mistral_bot::kv_cache::CacheType;

/// Streams (slots) of the context, as the engine's default `--slots 4`.
const STREAMS: i32 = 4;
/// Batch and micro-batch, as the engine's.
const BATCH: usize = 512;
/// Tokens decoded per measurement of decode speed.
const DECODE_TOKENS: usize = 16;

/// One setting: flash attention and the two cache types.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Setting {
    flash_attn: bool,
    type_k: CacheType,
    type_v: CacheType,
    /// One KV stream for all sequences (llama.cpp's `kv_unified`) instead of one each.
    unified: bool,
}

impl Setting {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = text.split(':').collect();
        let (fa, k, v, unified) = match parts[..] {
            [fa, k, v] => (fa, k, v, false),
            [fa, k, v, "unified"] => (fa, k, v, true),
            _ => anyhow::bail!("a setting is FA:K:V[:unified], e.g. on:q8_0:q8_0, not {text:?}"),
        };
        let flash_attn = match fa {
            "on" => true,
            "off" => false,
            _ => anyhow::bail!("flash attention is on or off, not {fa:?}"),
        };
        Ok(Self {
            flash_attn,
            type_k: cache_type(k)?,
            type_v: cache_type(v)?,
            unified,
        })
    }

    fn label(&self) -> String {
        format!(
            "FA {}, K {}, V {}{}",
            if self.flash_attn { "on" } else { "off" },
            self.type_k.as_str(),
            self.type_v.as_str(),
            if self.unified { ", unified KV" } else { "" }
        )
    }
}

/// A cache type by the name `--cache-type-k/-v` takes.
fn cache_type(name: &str) -> anyhow::Result<CacheType> {
    <CacheType as clap::ValueEnum>::from_str(name, false).map_err(|_| {
        let names: Vec<&str> = CacheType::ALL.iter().map(|t| t.as_str()).collect();
        anyhow::anyhow!("cache type {}, not {name:?}", names.join(", "))
    })
}

/// One repetition's figures for one setting, in seconds (tokens per second are derived).
#[derive(Debug, Default, Clone)]
struct Figures {
    /// Seconds for a 64-token and a 512-token prompt at depth 0.
    prompt_64: f64,
    prompt_512: f64,
    /// Per depth: seconds per 512-token chunk read to reach it (the last chunk's), one
    /// decode step of one stream, one step of four streams.
    depths: Vec<DepthFigures>,
    /// The park path for the deepest sequence: bytes, copy out, write, read, restore.
    park: Option<ParkFigures>,
    /// Seconds of a step holding one reply token of one sequence and `n` prompt tokens of
    /// another, for each `n` of [`MIXED`]: what a time-budgeted step costs.
    mixed: Vec<f64>,
}

/// Prompt tokens beside one reply token in the mixed steps measured.
const MIXED: [usize; 7] = [0, 4, 8, 16, 32, 64, 128];
/// History of the streaming sequence in the mixed steps.
const MIXED_DEPTH: usize = 256;

#[derive(Debug, Default, Clone, Copy)]
struct DepthFigures {
    chunk_512: Option<f64>,
    step_1: f64,
    step_4: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct ParkFigures {
    tokens: usize,
    bytes: usize,
    copy_out: f64,
    write: f64,
    read: f64,
    restore: f64,
}

/// Pseudo-random token ids below `n_vocab`, the same for every setting.
struct Tokens {
    state: u64,
    n_vocab: u64,
}

impl Tokens {
    fn next(&mut self) -> LlamaToken {
        // xorshift64*: enough to avoid repeating patterns, deterministic.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let value = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33;
        // Skip the first ids: control tokens live there in most vocabularies.
        LlamaToken((100 + value % (self.n_vocab - 100)) as i32)
    }
}

struct Bench<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    tokens: Tokens,
}

impl Bench<'_> {
    /// Decodes `n` tokens of sequence `seq` from position `pos`, the last one with logits;
    /// returns the seconds it took.
    fn prompt(&mut self, seq: i32, pos: usize, n: usize) -> anyhow::Result<f64> {
        self.batch.clear();
        for i in 0..n {
            let token = self.tokens.next();
            self.batch
                .add(token, (pos + i) as i32, &[seq], i + 1 == n)?;
        }
        let started = Instant::now();
        self.ctx.decode(&mut self.batch)?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Median seconds of `DECODE_TOKENS` steps of one token for each of `seqs` sequences,
    /// all at position `pos` onwards; removes what it added.
    fn decode(&mut self, seqs: i32, pos: usize) -> anyhow::Result<f64> {
        let mut times = Vec::with_capacity(DECODE_TOKENS);
        for step in 0..DECODE_TOKENS {
            self.batch.clear();
            for seq in 0..seqs {
                let token = self.tokens.next();
                self.batch.add(token, (pos + step) as i32, &[seq], true)?;
            }
            let started = Instant::now();
            self.ctx.decode(&mut self.batch)?;
            times.push(started.elapsed().as_secs_f64());
        }
        for seq in 0..seqs {
            self.ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(pos as u32), None)?;
        }
        Ok(median(&mut times))
    }
}

/// The median; of an even count, the mean of the middle two.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn run_one(
    backend: &LlamaBackend,
    model: &LlamaModel,
    threads: i32,
    depths: &[usize],
    setting: Setting,
    park_dir: &Path,
) -> anyhow::Result<Figures> {
    let deepest = depths.iter().copied().max().unwrap_or(0);
    let per_stream = (deepest + BATCH + DECODE_TOKENS).next_multiple_of(256) as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(per_stream * STREAMS as u32))
        .with_n_batch(BATCH as u32)
        .with_n_ubatch(BATCH as u32)
        .with_n_seq_max(STREAMS as u32)
        .with_kv_unified(setting.unified)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(i32::from(setting.flash_attn))
        .with_type_k(KvCacheType::from(setting.type_k))
        .with_type_v(KvCacheType::from(setting.type_v));
    let ctx = model
        .new_context(backend, params)
        .with_context(|| format!("context with {}", setting.label()))?;
    let mut bench = Bench {
        ctx,
        batch: LlamaBatch::new(BATCH, STREAMS),
        tokens: Tokens {
            state: 0x9E37_79B9_7F4A_7C15,
            n_vocab: u64::try_from(model.n_vocab()).unwrap_or(32_000),
        },
    };
    // Warm-up: the first decode allocates and faults the compute buffers in.
    bench.prompt(0, 0, BATCH)?;
    bench.ctx.clear_kv_cache();

    let mut figures = Figures {
        prompt_64: bench.prompt(0, 0, 64)?,
        ..Figures::default()
    };
    bench.ctx.clear_kv_cache();
    figures.prompt_512 = bench.prompt(0, 0, BATCH)?;
    bench.ctx.clear_kv_cache();

    let mut filled = 0;
    for &depth in depths {
        let mut chunk_512 = None;
        while filled < depth {
            let n = (depth - filled).min(BATCH);
            let secs = bench.prompt(0, filled, n)?;
            if n == BATCH {
                chunk_512 = Some(secs);
            }
            filled += n;
        }
        for seq in 1..STREAMS {
            bench.ctx.copy_kv_cache_seq(0, seq, None, None)?;
        }
        // The copies happen at the start of the next decode: not in a timed step.
        bench.batch.clear();
        for seq in 0..STREAMS {
            let token = bench.tokens.next();
            bench.batch.add(token, depth as i32, &[seq], true)?;
        }
        bench.ctx.decode(&mut bench.batch)?;
        for seq in 0..STREAMS {
            bench
                .ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(depth as u32), None)?;
        }
        let step_1 = bench.decode(1, depth)?;
        let step_4 = bench.decode(STREAMS, depth)?;
        for seq in 1..STREAMS {
            bench.ctx.clear_kv_cache_seq(Some(seq as u32), None, None)?;
        }
        figures.depths.push(DepthFigures {
            chunk_512,
            step_1,
            step_4,
        });
    }
    if filled > 0 {
        figures.park = Some(park(&mut bench, filled, park_dir)?);
    }
    bench.ctx.clear_kv_cache();
    figures.mixed = mixed(&mut bench)?;
    Ok(figures)
}

/// Steps of one reply token (sequence 0, `MIXED_DEPTH` tokens of history) beside `n`
/// prompt tokens of sequence 1, as the engine plans them while a newcomer is read: the
/// median of 5 steps for each `n` of [`MIXED`].
fn mixed(bench: &mut Bench<'_>) -> anyhow::Result<Vec<f64>> {
    bench.prompt(0, 0, MIXED_DEPTH)?;
    let mut out = Vec::with_capacity(MIXED.len());
    for n in MIXED {
        let mut times = Vec::with_capacity(5);
        for step in 0..5 {
            bench.batch.clear();
            let token = bench.tokens.next();
            bench
                .batch
                .add(token, (MIXED_DEPTH + step) as i32, &[0], true)?;
            for i in 0..n {
                let token = bench.tokens.next();
                bench
                    .batch
                    .add(token, (step * n + i) as i32, &[1], i + 1 == n)?;
            }
            let started = Instant::now();
            bench.ctx.decode(&mut bench.batch)?;
            times.push(started.elapsed().as_secs_f64());
        }
        bench
            .ctx
            .clear_kv_cache_seq(Some(0), Some(MIXED_DEPTH as u32), None)?;
        bench.ctx.clear_kv_cache_seq(Some(1), None, None)?;
        out.push(median(&mut times));
    }
    Ok(out)
}

/// The park path for sequence 0 (`tokens` long), as the engine runs it: the state copied
/// out on the engine thread, written to a park file with fsync, read back and verified,
/// restored into another sequence.
#[allow(unsafe_code)]
fn park(bench: &mut Bench<'_>, tokens: usize, dir: &Path) -> anyhow::Result<ParkFigures> {
    use llama_cpp_2::context::session::LlamaStateSeqFlags;
    let flags = LlamaStateSeqFlags::empty();
    let started = Instant::now();
    let size = bench.ctx.state_seq_get_size_ext(0, flags);
    let mut state = vec![0u8; size];
    // SAFETY: `state` holds the `size` bytes llama.cpp just reported for the sequence, and
    // nothing runs on the context in between.
    let written = unsafe {
        bench
            .ctx
            .state_seq_get_data_ext(state.as_mut_ptr(), 0, flags)
    };
    let copy_out = started.elapsed().as_secs_f64();
    anyhow::ensure!(written == size && size > 0, "state copy-out failed");

    let key = ParkKey {
        model: 1,
        context: 1,
    };
    let ids: Vec<i32> = (0..tokens as i32).collect();
    let path = dir.join("bench.kvpark");
    let started = Instant::now();
    let prefix = file::encode_prefix(key, &ids, state.len() as u64);
    park::write_file(&path, &prefix, &state)?;
    let write = started.elapsed().as_secs_f64();
    drop(state);
    let cold = drop_page_cache(&path);

    let started = Instant::now();
    let decoded = file::decode(std::fs::read(&path)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let read = started.elapsed().as_secs_f64();
    if !cold {
        eprintln!("(the page cache could not be dropped: the read is from memory)");
    }

    let started = Instant::now();
    // SAFETY: the bytes are the state copied out of this context above, verified by the
    // file's checksum; llama.cpp bounds-checks them anyway.
    let ok = unsafe { bench.ctx.state_seq_set_data_ext(&decoded.state, 1, flags) };
    let restore = started.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "restore failed");
    std::fs::remove_file(&path)?;
    Ok(ParkFigures {
        tokens,
        bytes: decoded.state.len(),
        copy_out,
        write,
        read,
        restore,
    })
}

/// Drops the file's pages from the page cache (root only), so the read is from the disk.
fn drop_page_cache(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    if file.sync_all().is_err() {
        return false;
    }
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let threads: i32 = args.next().map_or(Ok(2), |t| t.parse())?;
    let reps: usize = args.next().map_or(Ok(3), |t| t.parse())?;
    let mut depths: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "0,1500,4000".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    depths.sort_unstable();
    let settings: Vec<Setting> = args
        .next()
        .unwrap_or_else(|| "off:f16:f16,on:f16:f16".into())
        .split(',')
        .map(Setting::parse)
        .collect::<anyhow::Result<_>>()?;

    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(
        &backend,
        &model_path,
        &LlamaModelParams::default().with_use_mmap(false),
    )
    .with_context(|| format!("loading {}", model_path.display()))?;
    let park_dir = tempfile::tempdir_in(std::env::temp_dir())?;
    println!(
        "model {}, {threads} threads, {reps} repetitions, settings alternating, medians",
        model_path.display()
    );

    let mut all: Vec<Vec<Figures>> = vec![Vec::new(); settings.len()];
    for rep in 0..reps {
        for (i, &setting) in settings.iter().enumerate() {
            let started = Instant::now();
            let figures = run_one(&backend, &model, threads, &depths, setting, park_dir.path())?;
            eprintln!(
                "rep {}/{reps}, {}: {:.0} s: {figures:?}",
                rep + 1,
                setting.label(),
                started.elapsed().as_secs_f64()
            );
            all[i].push(figures);
        }
    }
    report(&settings, &depths, &all);
    Ok(())
}

fn med(runs: &[Figures], f: impl Fn(&Figures) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().filter_map(f).collect();
    (!values.is_empty()).then(|| median(&mut values))
}

fn report(settings: &[Setting], depths: &[usize], all: &[Vec<Figures>]) {
    let fmt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.2}"));
    println!("\nSpeed, tokens per second (median):\n");
    println!(
        "| setting | prompt 64 | prompt 512 | depth | 512-chunk to reach it | decode, 1 stream | decode, 4 streams (aggregate) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (setting, runs) in settings.iter().zip(all) {
        for (d, &depth) in depths.iter().enumerate() {
            let at = |f: &dyn Fn(&DepthFigures) -> Option<f64>| {
                med(runs, |r| r.depths.get(d).and_then(f))
            };
            let (p64, p512) = if d == 0 {
                (
                    fmt(med(runs, |r| Some(64.0 / r.prompt_64))),
                    fmt(med(runs, |r| Some(BATCH as f64 / r.prompt_512))),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "| {} | {p64} | {p512} | {depth} | {} | {} | {} |",
                setting.label(),
                fmt(at(&|x| x.chunk_512.map(|s| BATCH as f64 / s))),
                fmt(at(&|x| Some(1.0 / x.step_1))),
                fmt(at(&|x| Some(STREAMS as f64 / x.step_4))),
            );
        }
    }
    println!(
        "\nA step of 1 reply token (history {MIXED_DEPTH}) beside N prompt tokens of another chat, milliseconds (median):\n"
    );
    let head: Vec<String> = MIXED.iter().map(|n| format!("N = {n}")).collect();
    println!("| setting | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(MIXED.len()));
    for (setting, runs) in settings.iter().zip(all) {
        let cells: Vec<String> = (0..MIXED.len())
            .map(|i| {
                med(runs, |r| r.mixed.get(i).copied())
                    .map_or_else(|| "—".into(), |s| format!("{:.0}", s * 1e3))
            })
            .collect();
        println!("| {} | {} |", setting.label(), cells.join(" | "));
    }
    println!("\nPark path of the deepest sequence (median, milliseconds):\n");
    println!(
        "| setting | tokens | state bytes | bytes/token | copy out | write + fsync | read + checksum | restore |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (setting, runs) in settings.iter().zip(all) {
        let Some(first) = runs.iter().find_map(|r| r.park) else {
            continue;
        };
        let p = |f: fn(&ParkFigures) -> f64| {
            med(runs, |r| r.park.as_ref().map(f))
                .map_or_else(|| "—".into(), |s| format!("{:.0}", s * 1e3))
        };
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            setting.label(),
            first.tokens,
            first.bytes,
            first.bytes as f64 / first.tokens as f64,
            p(|x| x.copy_out),
            p(|x| x.write),
            p(|x| x.read),
            p(|x| x.restore),
        );
    }
}
