//! The local inference engine: llama.cpp in process, a pool of slots, continuous batching.
//!
//! # Data path
//! [`EngineHandle::submit`] (or [`submit_async`](EngineHandle::submit_async)) first prepares
//! the request on the caller's side ([`prepare`]: chat template, tokenization, fitting the
//! window), then puts its token ids into a bounded queue (a full queue is an immediate
//! [`EngineError::Overloaded`]). The engine thread ([`worker`]) owns the one llama.cpp
//! context and sees token ids only; it takes queued requests whenever a slot is free, and
//! each step decodes one batch holding every active slot's tokens. Each request gets its
//! own channel of [`StreamEvent`]s; dropping the [`ReplyStream`] cancels the request and
//! frees its slot at the next step.
//!
//! A conversation whose slot goes to another keeps its KV state in [`park`] (RAM, then
//! files under `--data-dir/kv`), and gets it back when it returns, also after a restart
//! ([`EngineHandle::park_all`] writes everything at shutdown).
//!
//! Each step's prompt share is sized by time ([`step_budget`]), steps of replies only keep
//! streaming chats on pace beside long prompt steps ([`pacing`]), and a request can be
//! priced before it is queued ([`EngineHandle::estimated_wait`], [`eta`]).
//!
//! Only `llama.rs` imports llama.cpp; `slot`, `scheduler`, `prompt`, `detok`, `park::lru`,
//! `park::file`, `step_budget`, `pacing` and `eta` are pure.

pub mod choices;
mod detok;
pub mod eta;
pub mod grammar;
mod llama;
pub mod pacing;
pub mod park;
mod prepare;
pub mod prompt;
pub mod sampling;
mod scheduler;
mod slot;
pub mod step_budget;
pub mod tools;
mod worker;

use std::io::Read;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

pub use detok::{DetokOutput, Detokenizer};
pub use llama::DecodeError;
pub use park::ParkConfig;

use crate::chat::{ChatRequest, Completion, GenerateParams, StreamEvent};
use crate::kv_cache::KvCacheSettings;
use prepare::{Prepared, Preparer};

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The GGUF model file.
    pub model_path: PathBuf,
    /// Inference slots: requests generated at the same time.
    pub slots: NonZeroUsize,
    /// Context window of each slot, in tokens.
    pub ctx_size: NonZeroU32,
    /// CPU threads for llama.cpp.
    pub threads: NonZeroUsize,
    /// Most tokens decoded in one step.
    pub batch_size: NonZeroU32,
    /// Prompt tokens decoded in one step while replies stream, before the engine has
    /// timed its steps (and always without `step_target`).
    pub prefill_chunk: NonZeroU32,
    /// How often, on average, a streaming reply gets a token while a prompt is read
    /// ([`pacing`]). `None`: every step holds `prefill_chunk` prompt tokens.
    pub step_target: Option<Duration>,
    /// What a step holding prompt tokens beside streaming replies should take; its prompt
    /// share is sized to it ([`step_budget`]). `None`: automatic ([`pacing::Pacing`]).
    pub prompt_step: Option<Duration>,
    /// Flash attention and the K/V cache types.
    pub kv: KvCacheSettings,
    /// Requests that may wait for a slot; one more is refused with `Overloaded`.
    pub queue_size: NonZeroUsize,
    /// Map the model file instead of reading it.
    pub mmap: bool,
    /// Let llama.cpp repack the weights for its CPU kernels (`--repack`).
    pub repack: bool,
    /// Which chat format to use.
    pub chat_template: ChatTemplateChoice,
    /// Forward llama.cpp's own log lines to tracing.
    pub llama_log: bool,
    /// Draw a progress bar on stderr while loading.
    pub progress_bar: bool,
    /// KV parking (RAM and disk budgets); `None` disables it.
    pub park: Option<ParkConfig>,
}

/// Which chat format the engine uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplateChoice {
    /// The GGUF's own template if llama.cpp can apply it, else Mistral's.
    Auto,
    /// Mistral's `[INST]` format, built in.
    Mistral,
    /// A template llama.cpp knows by name (`chatml`, `llama3`, `gemma`, `mistral-v7`, …).
    Named(String),
}

/// What the loaded model is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// `general.name` from the GGUF, or the file name.
    pub name: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Context length the model was trained with.
    pub n_ctx_train: u32,
    /// Parameters.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// The chat format in use (`mistral`, or `gguf` / a template name).
    pub chat_format: String,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model file does not exist.
    #[error("model file not found: {}", path.display())]
    ModelNotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The model file cannot be read.
    #[error("cannot read model file {}", path.display())]
    ModelUnreadable {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a GGUF model.
    #[error("{} is not a GGUF model file (it does not start with the GGUF magic bytes)", path.display())]
    NotGguf {
        /// The path given.
        path: PathBuf,
    },
    /// llama.cpp could not load the model.
    #[error("llama.cpp could not load the model {} ({reason}); is it a complete, supported GGUF?", path.display())]
    ModelLoad {
        /// The path given.
        path: PathBuf,
        /// llama.cpp's error.
        reason: String,
    },
    /// llama.cpp's backend failed to initialize.
    #[error("llama.cpp backend failed to initialize: {0}")]
    Backend(String),
    /// The context could not be created (usually: not enough memory for the KV cache; or
    /// a quantized cache type whose block does not divide the model's head size).
    #[error(
        "could not create the llama.cpp context ({0}); try fewer --slots or a smaller --ctx-size \
         (or --cache-type-k/-v f16; --llama-log shows llama.cpp's reason)"
    )]
    Context(String),
    /// The chat template cannot be used.
    #[error("chat template unusable: {0}")]
    ChatTemplate(String),
    /// The KV park directory cannot be used.
    #[error("cannot use the KV park directory {}", path.display())]
    ParkDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The engine thread could not be started or died while starting.
    #[error("the engine thread failed to start")]
    Thread,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Every slot is busy and the queue is full.
    #[error("the local engine is overloaded ({waiting} requests waiting)")]
    Overloaded {
        /// Requests already waiting.
        waiting: usize,
    },
    /// The engine has stopped.
    #[error("the local engine has stopped")]
    Stopped,
    /// The prompt could not be built.
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    /// The request's response format or grammar cannot be followed.
    #[error(transparent)]
    Constraint(#[from] grammar::ConstraintError),
    /// llama.cpp failed to decode a batch holding this request's tokens (llama.cpp's own
    /// typed error; shared, as one failure can end several requests).
    #[error("inference failed: {0}")]
    Decode(Arc<DecodeError>),
    /// The request asks for more choices than the engine has slots (each choice is
    /// generated in a slot of its own).
    #[error("n = {n} choices asked for; the local engine generates at most {slots} (its --slots)")]
    TooManyChoices {
        /// Choices asked for.
        n: u32,
        /// The engine's slots.
        slots: usize,
    },
}

impl EngineError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Overloaded { .. } => "overloaded",
            EngineError::Stopped => "stopped",
            EngineError::Prompt(_) => "prompt",
            EngineError::Constraint(_) => "constraint",
            EngineError::Decode(_) => "decode",
            EngineError::TooManyChoices { .. } => "too_many_choices",
        }
    }
}

/// A snapshot of the engine's figures.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    /// Slots in all.
    pub slots: usize,
    /// Slots working on a request now.
    pub slots_busy: usize,
    /// Requests waiting for a slot now.
    pub queue_len: usize,
    /// Requests that got a slot, since start.
    pub requests_started: u64,
    /// Requests that ended (any reason), since start.
    pub requests_finished: u64,
    /// Prompt tokens decoded, since start.
    pub prompt_tokens_processed: u64,
    /// Prompt tokens found in a slot's cache and not decoded again, since start.
    pub prompt_tokens_cached: u64,
    /// Tokens generated, since start.
    pub tokens_generated: u64,
    /// Decode steps, since start.
    pub decode_steps: u64,
    /// The most sequences ever decoded in one step.
    pub max_sequences_per_step: usize,
    /// The most prompt tokens ever decoded in one step (at most `--prefill-chunk`).
    pub max_prompt_tokens_per_step: usize,
    /// Generated tokens per second of generation time, averaged over finished requests.
    pub avg_tokens_per_second: f64,
    /// Requests whose prompt continued a KV state parked in RAM (restored into a slot).
    pub kv_park_hits_ram: u64,
    /// Requests whose prompt continued a KV state read back from a park file.
    pub kv_park_hits_disk: u64,
    /// Requests (with parking on) that found less than half of their prompt in a slot or
    /// a parked state: new chats, and chats whose state was evicted or unusable.
    pub kv_park_misses: u64,
    /// Bytes of parked states in RAM now (at most `kv_park_ram_budget_bytes`).
    pub kv_park_ram_bytes: u64,
    /// The RAM budget of parked states now: `--kv-park-ram` as decided at start-up, less
    /// while memory is short (see [`EngineHandle::set_park_ram_budget`]).
    pub kv_park_ram_budget_bytes: u64,
    /// Bytes of park files on disk now (at most `--kv-park-disk`).
    pub kv_park_disk_bytes: u64,
}

/// Counters shared between the engine thread and handles.
#[derive(Debug, Default)]
pub(crate) struct SharedStats {
    slots_busy: AtomicUsize,
    requests_started: AtomicU64,
    requests_finished: AtomicU64,
    prompt_tokens_processed: AtomicU64,
    prompt_tokens_cached: AtomicU64,
    tokens_generated: AtomicU64,
    decode_steps: AtomicU64,
    max_sequences_per_step: AtomicUsize,
    max_prompt_tokens_per_step: AtomicUsize,
    /// Tokens generated after the first, over finished requests (for tokens/s).
    timed_tokens: AtomicU64,
    /// Microseconds of generation, over finished requests (for tokens/s).
    timed_micros: AtomicU64,
    kv_park_hits_ram: AtomicU64,
    kv_park_hits_disk: AtomicU64,
    kv_park_misses: AtomicU64,
    kv_park_ram_bytes: AtomicU64,
    kv_park_ram_budget_bytes: AtomicU64,
    kv_park_disk_bytes: AtomicU64,
    /// Uncached prompt tokens of the requests in the queue (for [`eta`]).
    queued_tokens: AtomicU64,
    /// Prompt tokens the slots have still to read (for [`eta`]).
    reading_tokens: AtomicU64,
    /// The engine's measured rates, as `f64` bits (0: not measured yet).
    prompt_token_secs: AtomicU64,
    step_secs: AtomicU64,
    reply_secs: AtomicU64,
    /// The prefixes the engine holds or held in a KV cache.
    known: std::sync::Mutex<eta::KnownPrefixes>,
}

impl SharedStats {
    /// The rates an estimate needs, once a prompt token has been timed.
    fn rates(&self) -> Option<eta::Rates> {
        let read = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let prompt_token = read(&self.prompt_token_secs);
        (prompt_token > 0.0).then(|| eta::Rates {
            prompt_token,
            step: read(&self.step_secs),
            reply: read(&self.reply_secs),
        })
    }

    /// The known prefixes, locked (a panic elsewhere leaves them usable: every change is
    /// one call).
    fn known(&self) -> std::sync::MutexGuard<'_, eta::KnownPrefixes> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a request's tokens off `queued_tokens` (saturating: a slip in the accounting
    /// must never make the queue look endless and send every request elsewhere).
    fn unqueue(&self, tokens: u64) {
        let _ = self
            .queued_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                Some(queued.saturating_sub(tokens))
            });
    }

    /// How many of `prompt`'s tokens the engine would have to read (none found cached).
    fn uncached(&self, prompt: &[i32]) -> u64 {
        let cached = self.known().cached_prefix(prompt);
        prompt.len().saturating_sub(cached) as u64
    }
}

/// A request on its way to the engine thread, prepared: token ids only.
struct Job {
    /// The fitted prompt's token ids.
    prompt: Vec<i32>,
    /// Sampling parameters.
    params: GenerateParams,
    /// The reply budget, already clamped to the window.
    max_tokens: u32,
    /// Strings that end the reply: the chat format's, then the request's.
    stops: Vec<String>,
    /// The GBNF grammar the reply must follow, checked to parse.
    grammar: Option<String>,
    /// The prompt's tokens to show the caller when the request gets a slot
    /// (`--verbose-prompt`).
    shown: Option<Vec<crate::chat::PromptToken>>,
    events_tx: mpsc::UnboundedSender<Result<StreamEvent, EngineError>>,
    /// The channels of choices 1.. when the request asks for several (`params.n`).
    choice_txs: Vec<mpsc::UnboundedSender<Result<StreamEvent, EngineError>>>,
    submitted: Instant,
    /// Its prompt tokens counted in `SharedStats::queued_tokens` (zeroed once taken off).
    queued_tokens: u64,
}

/// What the engine thread receives.
enum Command {
    /// Run a request.
    Run(Box<Job>),
    /// Panic, to test what a dead engine thread looks like from outside.
    Panic,
}

/// A cheap-to-clone handle to the running engine. The engine thread stops when the last
/// handle is dropped and the requests in flight are done.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    submit_tx: mpsc::Sender<Command>,
    control_tx: mpsc::UnboundedSender<park::Control>,
    stats: Arc<SharedStats>,
    info: ModelInfo,
    slots: usize,
    ctx_size: u32,
    /// Renders and tokenizes requests on the caller's side.
    preparer: Arc<Preparer>,
    /// The engine thread: finished while a handle exists means it died (it only returns
    /// normally once every handle is gone).
    thread: JoinHandle<()>,
}

impl EngineHandle {
    /// Loads the model on a new engine thread and waits until it is ready, so a bad model
    /// fails here and not at the first request.
    pub async fn start(config: EngineConfig) -> Result<Self, StartError> {
        check_model_file(&config.model_path)?;
        let (submit_tx, submit_rx) = mpsc::channel(config.queue_size.get());
        let (ready_tx, ready_rx) = oneshot::channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let worker_control_tx = control_tx.clone();
        let stats = Arc::new(SharedStats::default());
        let slots = config.slots.get();
        let ctx_size = config.ctx_size.get();
        let worker_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("mistral-bot-engine".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    let channels = worker::Channels {
                        submit_rx,
                        control_rx,
                        control_tx: worker_control_tx,
                    };
                    worker::run(config, channels, worker_stats, ready_tx);
                });
                // Unwinding dropped every request's channel (callers see `Stopped`) and the
                // queue (new requests are refused); the handle sees the thread finished.
                if let Err(panic) = std::panic::catch_unwind(run) {
                    tracing::error!(
                        panic = panic_message(panic.as_ref()),
                        "the engine thread panicked: the local engine is stopped"
                    );
                }
            })
            .map_err(|_| StartError::Thread)?;
        let (info, preparer) = ready_rx.await.map_err(|_| StartError::Thread)??;
        Ok(Self {
            inner: Arc::new(HandleInner {
                submit_tx,
                control_tx,
                stats,
                info,
                slots,
                ctx_size,
                preparer,
                thread,
            }),
        })
    }

    /// Prepares `request` on the calling thread (chat template, tokenization, fitting the
    /// window; cost grows with its size: see [`submit_async`](Self::submit_async) for async
    /// callers) and queues it. Fails at once with `Overloaded` when the queue is full,
    /// `Prompt` when it cannot be made to fit, `Stopped` when the engine is gone.
    pub fn submit(&self, request: ChatRequest) -> Result<ReplyStream, EngineError> {
        self.prepare_and_enqueue(request, false)
    }

    /// Like [`submit`](Self::submit), but [`StreamEvent::Started`] is followed by a
    /// [`StreamEvent::Prompt`] showing the exact prompt tokens.
    pub fn submit_showing_prompt(&self, request: ChatRequest) -> Result<ReplyStream, EngineError> {
        self.prepare_and_enqueue(request, true)
    }

    /// Like [`submit`](Self::submit) (or, with `show_prompt`,
    /// [`submit_showing_prompt`](Self::submit_showing_prompt)), for async callers: a large
    /// request is prepared on tokio's blocking pool, so it never holds up a runtime worker.
    pub async fn submit_async(
        &self,
        request: ChatRequest,
        show_prompt: bool,
    ) -> Result<ReplyStream, EngineError> {
        if prepare::request_bytes(&request) <= prepare::INLINE_PREPARE_MAX_BYTES {
            return self.prepare_and_enqueue(request, show_prompt);
        }
        self.check_accepting()?;
        let preparer = Arc::clone(&self.inner.preparer);
        let prepared = tokio::task::spawn_blocking(move || preparer.prepare(request, show_prompt))
            .await
            .map_err(|_| EngineError::Stopped)??;
        self.enqueue(prepared)
    }

    fn prepare_and_enqueue(
        &self,
        request: ChatRequest,
        show_prompt: bool,
    ) -> Result<ReplyStream, EngineError> {
        self.check_accepting()?;
        let prepared = self.inner.preparer.prepare(request, show_prompt)?;
        self.enqueue(prepared)
    }

    /// Refuses early, before preparation work, what `enqueue` would refuse.
    fn check_accepting(&self) -> Result<(), EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Stopped);
        }
        if self.inner.submit_tx.capacity() == 0 {
            return Err(EngineError::Overloaded {
                waiting: self.queue_len(),
            });
        }
        Ok(())
    }

    fn enqueue(&self, prepared: Prepared) -> Result<ReplyStream, EngineError> {
        let n = prepared.params.n.max(1);
        if n as usize > self.inner.slots {
            return Err(EngineError::TooManyChoices {
                n,
                slots: self.inner.slots,
            });
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (choice_txs, choice_rxs): (Vec<_>, Vec<_>) =
            (1..n).map(|_| mpsc::unbounded_channel()).unzip();
        let events = if choice_rxs.is_empty() {
            Events::One(events_rx)
        } else {
            let mut receivers = vec![events_rx];
            receivers.extend(choice_rxs);
            Events::Choices(Box::new(choices::ChoiceReceivers::new(receivers)))
        };
        let stats = &self.inner.stats;
        let queued_tokens = stats.uncached(&prepared.prompt);
        stats
            .queued_tokens
            .fetch_add(queued_tokens, Ordering::Relaxed);
        let job = Job {
            prompt: prepared.prompt,
            params: prepared.params,
            max_tokens: prepared.max_tokens,
            stops: prepared.stops,
            grammar: prepared.grammar,
            shown: prepared.shown,
            events_tx,
            choice_txs,
            submitted: Instant::now(),
            queued_tokens,
        };
        let refused = match self.inner.submit_tx.try_send(Command::Run(Box::new(job))) {
            Ok(()) => return Ok(ReplyStream { events }),
            Err(mpsc::error::TrySendError::Full(_)) => EngineError::Overloaded {
                waiting: self.queue_len(),
            },
            Err(mpsc::error::TrySendError::Closed(_)) => EngineError::Stopped,
        };
        stats.unqueue(queued_tokens);
        Err(refused)
    }

    /// How long `request` would wait for its first token if it were queued now
    /// ([`eta`]: the queue, the prompts ahead of it, its own tokens not cached, at the
    /// engine's measured rates), as precisely as comparing it with `limit` needs: when the
    /// work ahead alone is over `limit`, or even all of its text uncached would stay under
    /// it, that bound is the answer and the request is not prepared; otherwise it is
    /// prepared (a large one on tokio's blocking pool) to count its uncached tokens.
    /// Nothing is queued. `None` before the engine has timed a prompt token, or when the
    /// request cannot be prepared (submitting it gives the error).
    pub async fn estimated_wait(&self, request: &ChatRequest, limit: Duration) -> Option<Duration> {
        let stats = &self.inner.stats;
        let rates = stats.rates()?;
        let mut inputs = eta::EtaInputs {
            slots: self.inner.slots,
            busy: stats.slots_busy.load(Ordering::Relaxed),
            queued_ahead: self.queue_len(),
            queued_tokens: stats.queued_tokens.load(Ordering::Relaxed),
            reading_tokens: stats.reading_tokens.load(Ordering::Relaxed),
            own_tokens: 0,
        };
        let lower = eta::estimate(&inputs, &rates);
        // A token is at least a byte of text; the chat template adds a few per message.
        inputs.own_tokens = (prepare::request_bytes(request) + 64 * request.messages.len()) as u64;
        let upper = eta::estimate(&inputs, &rates);
        if lower > limit || upper <= limit {
            return Some(if lower > limit { lower } else { upper });
        }
        let request = request.clone();
        let prepared = if prepare::request_bytes(&request) <= prepare::INLINE_PREPARE_MAX_BYTES {
            self.inner.preparer.prepare(request, false).ok()?
        } else {
            let preparer = Arc::clone(&self.inner.preparer);
            tokio::task::spawn_blocking(move || preparer.prepare(request, false))
                .await
                .ok()?
                .ok()?
        };
        inputs.own_tokens = stats.uncached(&prepared.prompt);
        Some(eta::estimate(&inputs, &rates))
    }

    /// Whether the engine thread is running. It stops only when every handle is gone or
    /// when it panicked (logged): then every request fails with [`EngineError::Stopped`].
    pub fn is_alive(&self) -> bool {
        !self.inner.thread.is_finished()
    }

    /// How many tokens `text` takes as message content (for budgets outside the engine).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner.preparer.count_tokens(text)
    }

    /// Makes the engine thread panic, as a bug in it would: for tests of what a dead
    /// engine looks like from outside (`/ready`, fallback). Not for production use.
    #[doc(hidden)]
    pub fn crash_for_tests(&self) {
        let _ = self.inner.submit_tx.try_send(Command::Panic);
    }

    fn queue_len(&self) -> usize {
        let tx = &self.inner.submit_tx;
        tx.max_capacity() - tx.capacity()
    }

    /// The model in use.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The context window of each slot, in tokens.
    pub fn ctx_size(&self) -> u32 {
        self.inner.ctx_size
    }

    /// Writes every slot's KV cache and every state parked in RAM to park files, for the
    /// next start (the shutdown path awaits this). Returns false if that took longer than
    /// `timeout` (what was written by then is kept; the rest is lost). Without parking to
    /// disk it returns at once.
    pub async fn park_all(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .inner
            .control_tx
            .send(park::Control::ParkAll(done_tx))
            .is_err()
        {
            return true; // the engine has stopped: nothing left in memory
        }
        match tokio::time::timeout(timeout, done_rx).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    seconds = timeout.as_secs(),
                    "writing the KV caches to disk took too long; the rest is lost"
                );
                false
            }
        }
    }

    /// Keeps at most `bytes` of parked KV states in RAM from now on (never more than
    /// parking was started with is sensible: that was sized to fit); the least recently
    /// used states beyond it spill to disk. Without parking it does nothing.
    pub fn set_park_ram_budget(&self, bytes: u64) {
        let _ = self.inner.control_tx.send(park::Control::RamBudget(bytes));
    }

    /// The engine's figures now.
    pub fn stats(&self) -> EngineStats {
        let s = &self.inner.stats;
        let timed_tokens = s.timed_tokens.load(Ordering::Relaxed);
        let timed_micros = s.timed_micros.load(Ordering::Relaxed);
        EngineStats {
            slots: self.inner.slots,
            slots_busy: s.slots_busy.load(Ordering::Relaxed),
            queue_len: self.queue_len(),
            requests_started: s.requests_started.load(Ordering::Relaxed),
            requests_finished: s.requests_finished.load(Ordering::Relaxed),
            prompt_tokens_processed: s.prompt_tokens_processed.load(Ordering::Relaxed),
            prompt_tokens_cached: s.prompt_tokens_cached.load(Ordering::Relaxed),
            tokens_generated: s.tokens_generated.load(Ordering::Relaxed),
            decode_steps: s.decode_steps.load(Ordering::Relaxed),
            max_sequences_per_step: s.max_sequences_per_step.load(Ordering::Relaxed),
            max_prompt_tokens_per_step: s.max_prompt_tokens_per_step.load(Ordering::Relaxed),
            avg_tokens_per_second: if timed_micros == 0 {
                0.0
            } else {
                timed_tokens as f64 / (timed_micros as f64 / 1e6)
            },
            kv_park_hits_ram: s.kv_park_hits_ram.load(Ordering::Relaxed),
            kv_park_hits_disk: s.kv_park_hits_disk.load(Ordering::Relaxed),
            kv_park_misses: s.kv_park_misses.load(Ordering::Relaxed),
            kv_park_ram_bytes: s.kv_park_ram_bytes.load(Ordering::Relaxed),
            kv_park_ram_budget_bytes: s.kv_park_ram_budget_bytes.load(Ordering::Relaxed),
            kv_park_disk_bytes: s.kv_park_disk_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The events of one reply: [`StreamEvent::Started`] when it gets a slot, then (when asked
/// for) the prompt, text deltas and `Done`; with several choices, each choice's events
/// marked ([`choices`]). Dropping it cancels the request (every choice of it).
#[derive(Debug)]
pub struct ReplyStream {
    events: Events,
}

/// Where a reply's events come from.
#[derive(Debug)]
enum Events {
    /// One choice: its channel.
    One(mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>),
    /// Several: a channel each, merged.
    Choices(Box<choices::ChoiceReceivers>),
}

impl ReplyStream {
    /// The next event; `None` after `Done` or an error.
    pub async fn next_event(&mut self) -> Option<Result<StreamEvent, EngineError>> {
        futures::StreamExt::next(self).await
    }

    /// Waits for the whole reply: its text (of every choice, one after another) and
    /// closing record.
    pub async fn collect(mut self) -> Result<(String, Completion), EngineError> {
        let mut text = String::new();
        while let Some(event) = self.next_event().await {
            match event? {
                StreamEvent::Delta(delta) => text.push_str(&delta),
                StreamEvent::Done(completion) => return Ok((text, completion)),
                StreamEvent::Started
                | StreamEvent::Prompt(_)
                | StreamEvent::Logprobs(_)
                | StreamEvent::Choice(_)
                | StreamEvent::ChoiceEnd(_)
                | StreamEvent::ToolCall(_) => {}
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Stream for ReplyStream {
    type Item = Result<StreamEvent, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.events {
            Events::One(rx) => rx.poll_recv(cx),
            Events::Choices(merged) => merged.poll_next(cx),
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Checks what can be checked before llama.cpp sees the file, for clear errors.
fn check_model_file(path: &Path) -> Result<(), StartError> {
    let mut file = std::fs::File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StartError::ModelNotFound {
                path: path.to_path_buf(),
            }
        } else {
            StartError::ModelUnreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) => Err(StartError::NotGguf {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StartError::NotGguf {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(StartError::ModelUnreadable {
            path: path.to_path_buf(),
            source,
        }),
    }
}
