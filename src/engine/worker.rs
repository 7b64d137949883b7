//! The engine thread: loads the model, makes the one context, then loops
//! admit → plan batch → decode → sample → send, until every handle is gone.
//!
//! llama.cpp objects never leave this thread (`LlamaContext` borrows the model and is not
//! `Sync`); async code reaches it only through the submit channel and per-request event
//! channels.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use super::choices::choice_seed;
use super::detok::Detokenizer;
use super::llama::{Context, ContextOptions, DecodeError, LoadOptions, Model, Sampler};
use super::pacing::{PaceWindow, Pacing};
use super::park::{self, Control, Parking, Preload, Prepared};
use super::prepare::Preparer;
use super::prompt::{ChatFormat, MistralFormat};
use super::sampling;
use super::scheduler::{self, BatchEntry};
use super::slot::{Slot, SlotState};
use super::step_budget::{StepBudget, StepTimings};
use super::tools::TOOL_CALLS_TOKEN;
use super::{
    ChatTemplateChoice, Command, EngineConfig, EngineError, Job, ModelInfo, SharedStats, StartError,
};
use crate::chat::{
    Completion, FinishReason, StreamEvent, Timings, TokenLogprob, TopLogprob, Usage,
};

/// The engine thread's inboxes.
pub(super) struct Channels {
    /// Requests (and test commands).
    pub submit_rx: mpsc::Receiver<Command>,
    /// Parking messages (states read from disk, park-all at shutdown).
    pub control_rx: mpsc::UnboundedReceiver<Control>,
    /// For the disk thread's replies.
    pub control_tx: mpsc::UnboundedSender<Control>,
}

/// Runs the engine thread to completion.
pub(super) fn run(
    config: EngineConfig,
    channels: Channels,
    stats: Arc<SharedStats>,
    ready_tx: oneshot::Sender<Result<(ModelInfo, Arc<Preparer>), StartError>>,
) {
    let loaded = Instant::now();
    let progress = load_progress(config.progress_bar);
    let model = match Model::load(LoadOptions {
        path: &config.model_path,
        mmap: config.mmap,
        repack: config.repack,
        llama_log: config.llama_log,
        progress,
    }) {
        Ok(model) => Arc::new(model),
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    let (format, format_name) = match choose_format(&model, &config.chat_template) {
        Ok(choice) => choice,
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    let info = model.info(&config.model_path, &format_name);
    // `--flash-attn auto` is decided by the model's head size, before the context and the
    // park key are made from it.
    let mut config = config;
    config.kv = config.kv.for_head_size(model.head_size());
    if config.ctx_size.get() > info.n_ctx_train && info.n_ctx_train > 0 {
        tracing::warn!(
            ctx_size = config.ctx_size.get(),
            n_ctx_train = info.n_ctx_train,
            "--ctx-size is beyond the context the model was trained with; expect worse answers past {} tokens",
            info.n_ctx_train
        );
    }
    let preparer = Arc::new(Preparer::new(
        Arc::clone(&model),
        format,
        config.ctx_size.get(),
    ));
    let slots = config.slots.get();
    let threads = i32::try_from(config.threads.get()).unwrap_or(i32::MAX);
    let n_ctx = config.ctx_size.get().saturating_mul(slots as u32);
    // llama.cpp reserves an output row per sequence in every decode and aborts the process
    // (GGML_ASSERT in output_reserve) when the batch is smaller than the sequence count: the
    // context's batch holds at least one token per slot, whatever a step is planned to use.
    let n_batch = config.batch_size.get().max(slots as u32);
    let ctx = match model.new_context(&ContextOptions {
        n_ctx,
        n_batch,
        n_seq_max: slots as u32,
        threads,
        kv: config.kv,
    }) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    let parking = match &config.park {
        None => None,
        Some(park_config) => {
            let started = Instant::now();
            let key = park::model_identity(&config.model_path).map(|model| park::file::ParkKey {
                model,
                context: park::context_key(config.ctx_size.get(), slots, &config.kv),
            });
            let parking = key.and_then(|key| {
                Parking::start(
                    park_config,
                    key,
                    Arc::clone(&stats),
                    channels.control_tx.clone(),
                )
            });
            match parking {
                Ok(parking) => {
                    // What is on disk is cached too, for the estimates of returning chats.
                    parking.for_each_on_disk(|tokens| stats.known().insert(tokens));
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "KV parking ready"
                    );
                    Some(parking)
                }
                Err(source) => {
                    let _ = ready_tx.send(Err(StartError::ParkDir {
                        path: park_config.dir.clone(),
                        source,
                    }));
                    return;
                }
            }
        }
    };
    drop(channels.control_tx);
    tracing::info!(
        model = %info.name,
        chat_format = %format_name,
        slots,
        ctx_size = config.ctx_size.get(),
        threads,
        kv_cache = %config.kv,
        repack = config.repack,
        seconds = format!("{:.1}", loaded.elapsed().as_secs_f64()),
        "model loaded"
    );
    if ready_tx.send(Ok((info, preparer))).is_err() {
        return;
    }
    let mut worker = Worker {
        model: &model,
        ctx,
        slots: (0..slots as i32).map(Slot::new).collect(),
        jobs: (0..slots).map(|_| None).collect(),
        seq_ids: (0..slots as i32).collect(),
        config: &config,
        stats: &stats,
        tick: 0,
        parking,
        waiting_for_disk: Vec::new(),
        ready: VecDeque::new(),
        held: None,
        followers: (0..slots).map(|_| Vec::new()).collect(),
        timings: StepTimings::default(),
        pace: PaceWindow::default(),
        reply_secs: None,
    };
    worker.run(channels.submit_rx, channels.control_rx);
}

/// The progress callback: a bar on a terminal, otherwise a log line at each quarter.
fn load_progress(bar: bool) -> Box<dyn FnMut(f32) + Send> {
    if bar {
        let pb = indicatif::ProgressBar::new(100);
        pb.set_style(
            indicatif::ProgressStyle::with_template("loading model [{bar:40}] {percent:>3}%")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Box::new(move |p| {
            pb.set_position((p * 100.0) as u64);
            if p >= 1.0 {
                pb.finish_and_clear();
            }
        })
    } else {
        let mut next_quarter = 0;
        Box::new(move |p| {
            let quarter = (p * 4.0) as u32;
            if quarter >= next_quarter {
                tracing::info!(percent = quarter * 25, "loading model");
                next_quarter = quarter + 1;
            }
        })
    }
}

/// A shareable chat format.
type SharedFormat = Box<dyn ChatFormat + Send + Sync>;

fn choose_format(
    model: &Arc<Model>,
    choice: &ChatTemplateChoice,
) -> Result<(SharedFormat, String), StartError> {
    match choice {
        ChatTemplateChoice::Mistral => Ok((Box::new(MistralFormat), "mistral".into())),
        ChatTemplateChoice::Named(name) => Ok((Box::new(model.native_format(name)?), name.clone())),
        ChatTemplateChoice::Auto => match model.builtin_template() {
            None => Ok((Box::new(MistralFormat), "mistral".into())),
            Some(template) => match model.native_format(&template) {
                Ok(format) => Ok((Box::new(format), "gguf".into())),
                Err(e) => {
                    tracing::warn!(error = %e, "the model's own chat template is not usable; using the Mistral format");
                    Ok((Box::new(MistralFormat), "mistral".into()))
                }
            },
        },
    }
}

/// A request that holds a slot.
struct ActiveJob {
    events_tx: mpsc::UnboundedSender<Result<StreamEvent, EngineError>>,
    sampler: Sampler,
    detok: Detokenizer,
    max_tokens: u32,
    /// End-of-generation and control tokens do not end the reply (benchmarks).
    ignore_eos: bool,
    /// The request's tools may be called: a Mistral model's `[TOOL_CALLS]` control token
    /// opens its calls instead of ending the reply, and shows as its text.
    tool_calls: bool,
    /// Report each token's log-probability with this many alternatives.
    logprobs: Option<u8>,
    usage: Usage,
    queued: Duration,
    admitted: Instant,
    first_token: Option<Instant>,
    /// With several choices: how many of the request's slots are still working, shared
    /// by them (the request counts as finished when the last one ends).
    group: Option<Rc<Cell<usize>>>,
}

struct Worker<'m> {
    model: &'m Model,
    ctx: Context<'m>,
    /// Slot `i` owns sequence `seq_ids[i]` and runs `jobs[i]`.
    slots: Vec<Slot>,
    jobs: Vec<Option<ActiveJob>>,
    seq_ids: Vec<i32>,
    config: &'m EngineConfig,
    stats: &'m SharedStats,
    /// Counts admissions, for least-recently-used slot choice and FIFO prefill.
    tick: u64,
    /// KV parking, when enabled.
    parking: Option<Parking>,
    /// Requests waiting for a park file to be read, with its fingerprint.
    waiting_for_disk: Vec<(u64, Job)>,
    /// Requests whose park file was read (or failed), admitted before new ones.
    ready: VecDeque<(Job, Preload)>,
    /// A request with several choices waiting for as many free slots; nothing else is
    /// admitted before it (it would never find them free otherwise).
    held: Option<(Job, Preload)>,
    /// For each slot reading a prompt with several choices: the slots awaiting its KV
    /// cells, choice 1 first.
    followers: Vec<Vec<usize>>,
    /// Recent step costs: they size the prompt share of a step and feed the estimates.
    timings: StepTimings,
    /// The steps since streaming replies and a prompt began to share the engine.
    pace: PaceWindow,
    /// Seconds a reply keeps its slot after its first token, moving average.
    reply_secs: Option<f64>,
}

/// What woke the idle engine thread.
enum Wake {
    Command(Command),
    Control(Control),
    /// Every handle is gone.
    Closed,
}

impl Worker<'_> {
    fn run(
        &mut self,
        mut submit_rx: mpsc::Receiver<Command>,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
    ) {
        loop {
            while let Ok(control) = control_rx.try_recv() {
                self.on_control(control);
            }
            // Take waiting requests while slots are free: one held for its choices' slots
            // first, those whose park file was read next, then the queue.
            while self.has_free_slot() {
                if let Some((job, preload)) = self.held.take() {
                    let free = self.jobs.iter().filter(|j| j.is_none()).count();
                    if (job.params.n.max(1) as usize) > free {
                        self.held = Some((job, preload));
                        break;
                    }
                    self.admit(job, preload);
                    continue;
                }
                if let Some((job, preload)) = self.ready.pop_front() {
                    self.admit(job, preload);
                    continue;
                }
                match submit_rx.try_recv() {
                    Ok(command) => self.obey(command),
                    Err(_) => break,
                }
            }
            self.drop_cancelled();
            if self.active_count() == 0 && self.ready.is_empty() {
                // Nothing to do: sleep until a request or a park file comes, or every
                // handle is gone (and no request waits for the disk).
                match wait_for_work(&mut submit_rx, &mut control_rx) {
                    Wake::Command(command) => self.obey(command),
                    Wake::Control(control) => self.on_control(control),
                    Wake::Closed if self.waiting_for_disk.is_empty() => return,
                    Wake::Closed => match control_rx.blocking_recv() {
                        Some(control) => self.on_control(control),
                        None => return,
                    },
                }
                continue;
            }
            self.step();
        }
    }

    fn obey(&mut self, command: Command) {
        match command {
            Command::Run(job) => self.admit(*job, Preload::None),
            Command::Panic => {
                panic!("engine thread crash requested (EngineHandle::crash_for_tests)")
            }
        }
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Loaded {
                fingerprint,
                parked,
            } => {
                let mut preload = Some(parked.map_or(Preload::Failed, Preload::Loaded));
                let waiting = std::mem::take(&mut self.waiting_for_disk);
                for (waited, job) in waiting {
                    if waited != fingerprint {
                        self.waiting_for_disk.push((waited, job));
                        continue;
                    }
                    // The first request waiting for this file gets it; any other one looks again.
                    let preload = preload.take().unwrap_or(Preload::None);
                    self.ready.push_back((job, preload));
                }
            }
            Control::ParkAll(done_tx) => match self.parking.as_mut() {
                Some(parking) => parking.park_all(&self.ctx, &self.slots, done_tx),
                None => {
                    let _ = done_tx.send(());
                }
            },
            Control::RamBudget(bytes) => {
                if let Some(parking) = self.parking.as_mut() {
                    parking.set_ram_budget(bytes);
                }
            }
        }
    }

    fn has_free_slot(&self) -> bool {
        self.jobs.iter().any(Option::is_none)
    }

    fn active_count(&self) -> usize {
        self.jobs.iter().filter(|j| j.is_some()).count()
    }

    fn publish_busy(&self) {
        self.stats
            .slots_busy
            .store(self.active_count(), Ordering::Relaxed);
    }

    fn admit(&mut self, mut job: Job, preload: Preload) {
        // Off the queue (for the estimates), whatever happens to it next.
        self.stats.unqueue(std::mem::take(&mut job.queued_tokens));
        if job.events_tx.is_closed() {
            return; // cancelled while it waited
        }
        let n = job.params.n.max(1) as usize;
        if n > self.jobs.iter().filter(|j| j.is_none()).count() {
            self.held = Some((job, preload));
            return;
        }
        let queued = job.submitted.elapsed();
        let Some(index) = scheduler::choose_slot(&self.slots, &job.prompt) else {
            // Unreachable: admit is called only with a free slot. Refuse rather than panic.
            let _ = job
                .events_tx
                .send(Err(EngineError::Overloaded { waiting: 0 }));
            return;
        };
        let index = match self.parking.as_mut() {
            None => index,
            Some(parking) => {
                match parking.prepare(&mut self.ctx, &mut self.slots, index, &job.prompt, preload) {
                    Prepared::Slot(index) => index,
                    Prepared::Wait(fingerprint) => {
                        self.waiting_for_disk.push((fingerprint, job));
                        return;
                    }
                }
            }
        };
        let seed = job.params.seed.unwrap_or_else(|| fresh_seed(self.tick));
        let steps = sampling::chain(
            &job.params,
            seed,
            job.grammar.as_deref(),
            self.model.n_vocab(),
        );
        let sampler = match Sampler::new(self.model, &steps) {
            Ok(sampler) => sampler,
            Err(error) => {
                // Checked when prepared: unreachable unless llama.cpp changed its mind.
                let _ = job.events_tx.send(Err(error.into()));
                return;
            }
        };
        // The request leaves the queue for a slot: the chain reads `Started` as "the engine
        // is on it" (a wait before it was queueing, not a fault).
        let _ = job.events_tx.send(Ok(StreamEvent::Started));
        if let Some(tokens) = job.shown.take() {
            let _ = job.events_tx.send(Ok(StreamEvent::Prompt(tokens)));
        }
        self.tick += 1;
        let prompt_len = job.prompt.len();
        let group = (n > 1).then(|| Rc::new(Cell::new(n)));
        let followers = self.reserve_choices(index, &job, seed, queued, group.as_ref());
        let slot = &mut self.slots[index];
        let reused = slot.start(job.prompt, self.tick);
        self.ctx.forget(slot.seq_id, reused);
        let params = &job.params;
        let usage = Usage {
            prompt_tokens: prompt_len as u32,
            cached_tokens: reused as u32,
            processed_tokens: (prompt_len - reused) as u32,
            completion_tokens: 0,
        };
        for &f in &followers {
            if let Some(follower) = self.jobs[f].as_mut() {
                follower.usage = usage;
            }
        }
        self.followers[index] = followers;
        self.jobs[index] = Some(ActiveJob {
            events_tx: job.events_tx,
            sampler,
            detok: Detokenizer::new(job.stops),
            max_tokens: job.max_tokens,
            ignore_eos: params.ignore_eos,
            tool_calls: params.tools.as_ref().is_some_and(|t| t.callable()),
            logprobs: params.logprobs,
            usage,
            queued,
            admitted: Instant::now(),
            first_token: None,
            group,
        });
        self.stats.requests_started.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prompt_tokens_cached
            .fetch_add(reused as u64, Ordering::Relaxed);
        if self.parking.is_some() && reused < prompt_len / 2 {
            self.stats.kv_park_misses.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_busy();
        self.publish_reading();
    }

    /// Reserves a free slot for each choice of `job` after the first (which reads the
    /// prompt in slot `leader`), the least recently used first, parking the conversation
    /// each one held. Each gets its own sampler, drawing with its own seed, and its own
    /// channel. Returns the reserved slots, choice 1 first. The caller checked that
    /// enough slots are free.
    fn reserve_choices(
        &mut self,
        leader: usize,
        job: &Job,
        seed: u32,
        queued: Duration,
        group: Option<&Rc<Cell<usize>>>,
    ) -> Vec<usize> {
        let mut reserved = Vec::with_capacity(job.choice_txs.len());
        for (c, events_tx) in job.choice_txs.iter().enumerate() {
            let choice = c as u32 + 1;
            let Some(f) = (0..self.slots.len())
                .filter(|&f| f != leader && self.jobs[f].is_none() && self.slots[f].is_idle())
                .min_by_key(|&f| self.slots[f].last_used)
            else {
                // Unreachable (checked before): the choice ends at once, empty.
                let _ = events_tx.send(Err(EngineError::Overloaded { waiting: 0 }));
                continue;
            };
            let steps = sampling::chain(
                &job.params,
                choice_seed(seed, choice),
                job.grammar.as_deref(),
                self.model.n_vocab(),
            );
            let sampler = match Sampler::new(self.model, &steps) {
                Ok(sampler) => sampler,
                Err(error) => {
                    let _ = events_tx.send(Err(error.into()));
                    continue;
                }
            };
            if let Some(parking) = self.parking.as_mut() {
                parking.park_leaving(&self.ctx, &self.slots[f], &job.prompt);
            }
            self.slots[f].reserve(leader, self.tick);
            self.jobs[f] = Some(ActiveJob {
                events_tx: events_tx.clone(),
                sampler,
                detok: Detokenizer::new(job.stops.clone()),
                max_tokens: job.max_tokens,
                ignore_eos: job.params.ignore_eos,
                tool_calls: job.params.tools.as_ref().is_some_and(|t| t.callable()),
                logprobs: job.params.logprobs,
                usage: Usage::default(),
                queued,
                admitted: Instant::now(),
                first_token: None,
                group: group.cloned(),
            });
            reserved.push(f);
        }
        reserved
    }

    /// The slots awaiting the prompt of slot `leader` take its KV cells (one copy each)
    /// and sample their first token from its logits row `row`, as the leader does.
    fn fork_choices(&mut self, leader: usize, row: i32) {
        let followers = std::mem::take(&mut self.followers[leader]);
        let leader_seq = self.slots[leader].seq_id;
        for f in followers {
            if self.jobs[f].is_none() || self.slots[f].state != (SlotState::Awaiting { leader }) {
                continue;
            }
            self.ctx.copy_seq(leader_seq, self.slots[f].seq_id);
            let prompt = self.slots[leader].cached.clone();
            self.slots[f].fork(&prompt);
            self.take_token(f, row);
        }
    }

    /// Ends the choices still awaiting the prompt of slot `leader` (it ended before its
    /// prompt was read): with `error`, or as `reason`. Their own caches are untouched.
    fn release_choices(
        &mut self,
        leader: usize,
        error: Option<&EngineError>,
        reason: FinishReason,
    ) {
        for f in std::mem::take(&mut self.followers[leader]) {
            if self.slots[f].state != (SlotState::Awaiting { leader }) {
                continue;
            }
            match error {
                Some(error) => {
                    self.slots[f].finish();
                    if let Some(job) = self.jobs[f].take() {
                        if last_of_request(job.group.as_ref()) {
                            self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = job.events_tx.send(Err(error.clone()));
                    }
                }
                None => self.finish(f, reason),
            }
        }
        self.publish_busy();
    }

    /// Publishes the prompt tokens the slots have still to read.
    fn publish_reading(&self) {
        let reading: usize = self.slots.iter().map(|s| s.remaining_prompt().len()).sum();
        self.stats
            .reading_tokens
            .store(reading as u64, Ordering::Relaxed);
    }

    /// Publishes the measured rates for the estimates.
    fn publish_rates(&self) {
        let store = |atomic: &std::sync::atomic::AtomicU64, value: Option<f64>| {
            atomic.store(value.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        };
        let ms = |v: Option<f64>| v.map(|ms| ms / 1e3);
        store(
            &self.stats.prompt_token_secs,
            ms(self.timings.prompt_ms_per_token()),
        );
        store(&self.stats.step_secs, ms(self.timings.decode_ms()));
        store(&self.stats.reply_secs, self.reply_secs);
    }

    /// Frees the slots whose caller went away. Their KV cache stays: it is still valid.
    fn drop_cancelled(&mut self) {
        for i in 0..self.jobs.len() {
            if self.jobs[i]
                .as_ref()
                .is_some_and(|job| job.events_tx.is_closed())
            {
                self.finish(i, FinishReason::Cancelled);
            }
        }
    }

    fn step(&mut self) {
        let rotation = self.stats.decode_steps.load(Ordering::Relaxed) as usize;
        let capacity = self.config.batch_size.get() as usize;
        let initial = self.config.prefill_chunk.get() as usize;
        let generating = self
            .slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Decode { .. }))
            .count();
        let shared = generating > 0 && self.slots.iter().any(Slot::is_reading);
        if !shared {
            self.pace = PaceWindow::default();
        }
        let chunk = match self.config.step_target {
            None => initial,
            Some(target) => {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let pacing = Pacing {
                    target_ms: ms(target),
                    prompt_step_ms: self.config.prompt_step.map(ms),
                };
                let decode_ms = self.timings.decode_ms();
                if shared && !pacing.takes_prompt(&self.pace, decode_ms) {
                    0
                } else {
                    StepBudget {
                        target_ms: pacing.prompt_step_ms(decode_ms),
                        initial,
                    }
                    .prompt_chunk(&self.timings, capacity.saturating_sub(generating))
                }
            }
        };
        let entries = scheduler::plan_batch(&self.slots, capacity, chunk, rotation);
        if entries.is_empty() {
            return;
        }
        let (mut decode_tokens, mut prompt_tokens) = (0, 0);
        for entry in &entries {
            match self.slots[entry.slot].state {
                SlotState::Prefill { .. } => prompt_tokens += entry.tokens.len(),
                _ => decode_tokens += entry.tokens.len(),
            }
        }
        let started = Instant::now();
        scheduler::run_batch(self, entries);
        let ended = Instant::now();
        let elapsed = ended - started;
        tracing::trace!(
            decode_tokens,
            prompt_tokens,
            ms = format!("{:.1}", elapsed.as_secs_f64() * 1e3),
            "step"
        );
        self.timings.record(decode_tokens, prompt_tokens, elapsed);
        if shared {
            self.pace.record_step(started, ended);
        }
        self.publish_rates();
        self.publish_reading();
    }

    fn after_decode(&mut self, entry: &BatchEntry, row: Option<i32>) {
        let i = entry.slot;
        let slot = &mut self.slots[i];
        let mut prompt_read = false;
        match slot.state {
            SlotState::Decode { .. } => slot.decoded(),
            SlotState::Prefill { .. } => {
                prompt_read = slot.prefilled(entry.tokens.len());
                self.stats
                    .prompt_tokens_processed
                    .fetch_add(entry.tokens.len() as u64, Ordering::Relaxed);
            }
            SlotState::Idle | SlotState::Awaiting { .. } => return,
        }
        let Some(row) = row else { return };
        if prompt_read && !self.followers[i].is_empty() {
            self.fork_choices(i, row);
        }
        self.take_token(i, row);
    }

    /// Samples slot `i`'s next token from logits row `row` and sends what it makes.
    fn take_token(&mut self, i: usize, row: i32) {
        let Some(job) = self.jobs[i].as_mut() else {
            return;
        };
        let token = self.ctx.sample(&mut job.sampler, row);
        job.first_token.get_or_insert_with(Instant::now);
        job.usage.completion_tokens += 1;
        self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);

        // A control token mid-reply ([INST], <|im_start|>, …) is a turn boundary too.
        let opens_calls = job.tool_calls
            && self.model.is_control(token)
            && self.model.piece(token, true) == TOOL_CALLS_TOKEN.as_bytes();
        if !job.ignore_eos
            && !opens_calls
            && (self.model.is_end_of_turn(token) || self.model.is_control(token))
        {
            self.finish(i, FinishReason::Stop);
            return;
        }
        if let Some(top) = job.logprobs {
            let logprob = token_logprob(self.model, self.ctx.logits(row), token, top);
            if job
                .events_tx
                .send(Ok(StreamEvent::Logprobs(vec![logprob])))
                .is_err()
            {
                self.finish(i, FinishReason::Cancelled);
                return;
            }
        }
        // Forced lengths show control tokens as their text: a reply of only control tokens
        // (a random-weight model's) would otherwise be textless, an empty reply to the chain.
        let out = job
            .detok
            .push(&self.model.piece(token, job.ignore_eos || opens_calls));
        if !out.text.is_empty()
            && job
                .events_tx
                .send(Ok(StreamEvent::Delta(out.text)))
                .is_err()
        {
            self.finish(i, FinishReason::Cancelled);
            return;
        }
        if out.stopped {
            self.finish(i, FinishReason::Stop);
            return;
        }
        let window_full = self.slots[i].cached.len() + 1 >= self.config.ctx_size.get() as usize;
        if job.usage.completion_tokens >= job.max_tokens || window_full {
            self.finish(i, FinishReason::Length);
            return;
        }
        self.slots[i].sampled(token);
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        if !self.followers[i].is_empty() {
            self.release_choices(i, None, reason);
        }
        self.slots[i].finish();
        let Some(mut job) = self.jobs[i].take() else {
            return;
        };
        self.stats.known().insert(&self.slots[i].cached);
        let now = Instant::now();
        let first = job.first_token.unwrap_or(now);
        if job.first_token.is_some() {
            let secs = (now - first).as_secs_f64();
            self.reply_secs = Some(self.reply_secs.map_or(secs, |old| old + 0.3 * (secs - old)));
        }
        let timings = Timings {
            queued: job.queued,
            prompt: first - job.admitted,
            generation: now - first,
        };
        if job.usage.completion_tokens > 1 {
            self.stats.timed_tokens.fetch_add(
                u64::from(job.usage.completion_tokens - 1),
                Ordering::Relaxed,
            );
            self.stats
                .timed_micros
                .fetch_add(timings.generation.as_micros() as u64, Ordering::Relaxed);
        }
        if last_of_request(job.group.as_ref()) {
            self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
        }
        // Figures first, then the caller: stats read after `Done` already show the free slot.
        self.publish_busy();
        let rest = job.detok.finish();
        if reason != FinishReason::Cancelled {
            if !rest.is_empty() {
                let _ = job.events_tx.send(Ok(StreamEvent::Delta(rest)));
            }
            let _ = job.events_tx.send(Ok(StreamEvent::Done(Completion {
                finish_reason: reason,
                usage: job.usage,
                timings,
            })));
        }
    }

    fn fail(&mut self, i: usize, error: EngineError) {
        if !self.followers[i].is_empty() {
            self.release_choices(i, Some(&error), FinishReason::Stop);
        }
        let seq = self.slots[i].seq_id;
        self.ctx.forget(seq, 0);
        self.slots[i].clear();
        let job = self.jobs[i].take();
        if job
            .as_ref()
            .is_some_and(|job| last_of_request(job.group.as_ref()))
        {
            self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_busy();
        if let Some(job) = job {
            let _ = job.events_tx.send(Err(error));
        }
    }
}

impl scheduler::BatchDecoder for Worker<'_> {
    type Rows = Vec<Option<i32>>;

    fn decode(&mut self, batch: &[BatchEntry]) -> Result<Self::Rows, DecodeError> {
        self.ctx.decode(batch, &self.seq_ids)
    }

    fn decoded(&mut self, batch: &[BatchEntry], rows: Self::Rows) {
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .max_sequences_per_step
            .fetch_max(batch.len(), Ordering::Relaxed);
        let prompt_tokens = batch
            .iter()
            .filter(|e| matches!(self.slots[e.slot].state, SlotState::Prefill { .. }))
            .map(|e| e.tokens.len())
            .sum();
        self.stats
            .max_prompt_tokens_per_step
            .fetch_max(prompt_tokens, Ordering::Relaxed);
        for (entry, row) in batch.iter().zip(rows) {
            self.after_decode(entry, row);
        }
    }

    fn failed(&mut self, slot: usize, error: &Arc<DecodeError>) {
        tracing::error!(error = %error, slot, "decode failed; failing the request in this slot");
        self.fail(slot, EngineError::Decode(Arc::clone(error)));
    }
}

/// Blocks until a request or a control message arrives.
fn wait_for_work(
    submit_rx: &mut mpsc::Receiver<Command>,
    control_rx: &mut mpsc::UnboundedReceiver<Control>,
) -> Wake {
    futures::executor::block_on(async {
        tokio::select! {
            command = submit_rx.recv() => command.map_or(Wake::Closed, Wake::Command),
            Some(control) = control_rx.recv() => Wake::Control(control),
            else => Wake::Closed,
        }
    })
}

/// `token`'s log-probability and the `top` most likely tokens, from its logits row.
fn token_logprob(model: &Model, logits: &[f32], token: i32, top: u8) -> TokenLogprob {
    let (logprob, best) =
        sampling::logprobs(logits, token, usize::from(top)).unwrap_or((0.0, Vec::new()));
    let text = |id: i32| {
        let bytes = model.piece(id, false);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = text(token);
    TokenLogprob {
        token,
        logprob,
        bytes,
        top_logprobs: best
            .into_iter()
            .map(|(id, logprob)| {
                let (token, bytes) = text(id);
                TopLogprob {
                    token,
                    logprob,
                    bytes,
                }
            })
            .collect(),
    }
}

/// Counts one slot of a request as done; true when it was the request's last (always
/// for a request with one choice).
fn last_of_request(group: Option<&Rc<Cell<usize>>>) -> bool {
    group.is_none_or(|open| {
        open.set(open.get().saturating_sub(1));
        open.get() == 0
    })
}

/// A seed for a request that did not ask for one.
fn fresh_seed(tick: u64) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ (tick as u32).wrapping_mul(0x9E37_79B9)
}
