//! The only file that imports `llama_cpp_2`: a thin adapter that gives the worker the few
//! llama.cpp calls it needs, in the crate's own types (token ids are `i32`).
//!
//! The context runs on the engine thread only. The model is shared (`Arc<Model>`): llama.cpp
//! tokenizes, detokenizes and applies chat templates from a `const` vocabulary, so callers
//! prepare their prompts on their own threads (llama-server tokenizes in its HTTP threads too);
//! llama-cpp-2 declares `LlamaModel: Send + Sync`.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::{LogOptions, send_logs_to_tracing};

/// Why llama.cpp could not decode a batch (its own typed error, re-exported so the rest of
/// the crate never imports llama-cpp-2).
pub use llama_cpp_2::DecodeError;

use super::grammar::ConstraintError;
use super::prompt::{self, ChatFormat, PromptError, Segment, Vocab};
use super::sampling::{self, Step};
use super::scheduler::BatchEntry;
use super::{ModelInfo, StartError};
use crate::chat::ChatMessage;
use crate::kv_cache::{CacheType, KvCacheSettings};

/// llama.cpp's `LLAMA_FLASH_ATTN_TYPE_DISABLED` / `_ENABLED` (`llama_flash_attn_type`, a C
/// int; llama-cpp-2 takes the raw value). Never `_AUTO` (-1): on a CPU it resolves to on,
/// and the choice is this crate's ([`KvCacheSettings`]).
const FLASH_ATTN_DISABLED: i32 = 0;
const FLASH_ATTN_ENABLED: i32 = 1;

/// llama.cpp's name for a cache type (also what `examples/llama_settings.rs` passes on).
impl From<CacheType> for KvCacheType {
    fn from(cache_type: CacheType) -> Self {
        match cache_type {
            CacheType::F32 => KvCacheType::F32,
            CacheType::F16 => KvCacheType::F16,
            CacheType::Bf16 => KvCacheType::BF16,
            CacheType::Q8_0 => KvCacheType::Q8_0,
            CacheType::Q5_1 => KvCacheType::Q5_1,
        }
    }
}

/// llama.cpp's backend is process-wide state: `llama_backend_init` may run only once at a
/// time, so every engine of the process (tests start several, concurrently) shares one.
/// `get_or_init` makes concurrent first callers wait for the one initialization.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend(llama_log: bool) -> Result<&'static LlamaBackend, StartError> {
    BACKEND
        .get_or_init(|| {
            // The first engine decides whether llama.cpp's own log lines reach tracing.
            send_logs_to_tracing(LogOptions::default().with_logs_enabled(llama_log));
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| StartError::Backend(e.clone()))
}

/// A loaded model.
pub struct Model {
    model: LlamaModel,
    backend: &'static LlamaBackend,
}

/// How a model is loaded.
pub struct LoadOptions<'a> {
    /// The GGUF file.
    pub path: &'a Path,
    /// Map the file instead of reading it (costs resident memory once weights are repacked).
    pub mmap: bool,
    /// Let llama.cpp repack weights into its CPU backend's extra buffer types for its own
    /// kernels (llama-server's default; `--no-repack` there).
    pub repack: bool,
    /// Forward llama.cpp's log lines to tracing.
    pub llama_log: bool,
    /// Called with load progress in `0.0..=1.0`.
    pub progress: Box<dyn FnMut(f32) + Send>,
}

impl Model {
    /// Loads the model on the calling thread.
    pub fn load(options: LoadOptions<'_>) -> Result<Self, StartError> {
        let backend = backend(options.llama_log)?;
        let mut progress = options.progress;
        let params = LlamaModelParams::default()
            .with_use_mmap(options.mmap)
            .with_use_extra_bufts(options.repack)
            .with_progress_callback(move |p| {
                progress(p);
                true
            });
        let model = LlamaModel::load_from_file(backend, options.path, &params).map_err(|e| {
            StartError::ModelLoad {
                path: options.path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self { model, backend })
    }

    /// What the model is.
    pub fn info(&self, path: &Path, format: &str) -> ModelInfo {
        let name = self
            .model
            .meta_val_str("general.name")
            .ok()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        ModelInfo {
            name,
            path: path.to_path_buf(),
            n_ctx_train: self.model.n_ctx_train(),
            n_params: self.model.n_params(),
            size_bytes: self.model.size(),
            chat_format: format.to_string(),
        }
    }

    /// Elements of an attention head's key: `<arch>.attention.key_length`, else the
    /// embedding width over the head count (what llama.cpp assumes without the key).
    pub fn head_size(&self) -> u64 {
        let key_length = self
            .model
            .meta_val_str("general.architecture")
            .ok()
            .and_then(|arch| {
                self.model
                    .meta_val_str(&format!("{arch}.attention.key_length"))
                    .ok()
            })
            .and_then(|value| value.trim().parse().ok());
        key_length.unwrap_or_else(|| {
            let width = u64::try_from(self.model.n_embd()).unwrap_or(0);
            width / u64::from(self.model.n_head().max(1))
        })
    }

    /// The GGUF's own chat template, if it has one.
    pub fn builtin_template(&self) -> Option<String> {
        self.model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok())
    }

    /// A chat format applying `template` (a Jinja source or a llama.cpp template name such
    /// as `chatml`) through llama.cpp. Fails if llama.cpp does not know the template.
    pub fn native_format(self: &Arc<Self>, template: &str) -> Result<NativeFormat, StartError> {
        let template = LlamaChatTemplate::new(template)
            .map_err(|_| StartError::ChatTemplate("the template holds a NUL byte".into()))?;
        let format = NativeFormat {
            model: Arc::clone(self),
            template,
        };
        // Render a probe conversation now, so an unusable template fails at startup.
        format
            .render(&[ChatMessage::system("s"), ChatMessage::user("u")])
            .map_err(|e| StartError::ChatTemplate(e.to_string()))?;
        Ok(format)
    }

    /// The text of a token; control tokens are empty unless `special`.
    pub fn piece(&self, token: i32, special: bool) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), special, None)
    }

    /// Tokens in the vocabulary.
    pub fn n_vocab(&self) -> i32 {
        self.model.n_vocab()
    }

    /// Whether `grammar` (GBNF, root rule `root`) parses, by building its sampler once.
    pub fn check_grammar(&self, grammar: &str) -> Result<(), ConstraintError> {
        LlamaSampler::grammar(&self.model, grammar, "root")
            .map(drop)
            .map_err(|_| ConstraintError::InvalidGrammar)
    }

    /// Whether `token` ends a turn (EOS, EOT, `<|im_end|>`, …).
    pub fn is_end_of_turn(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    /// Whether `token` is a control token (`[INST]`, `<|im_start|>`, …).
    pub fn is_control(&self, token: i32) -> bool {
        self.model.vocab().is_control(LlamaToken(token))
    }

    /// Makes the one context of the engine.
    pub fn new_context(&self, options: &ContextOptions) -> Result<Context<'_>, StartError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(options.n_ctx))
            .with_n_batch(options.n_batch)
            .with_n_ubatch(options.n_batch)
            .with_n_seq_max(options.n_seq_max)
            // Each sequence gets n_ctx / n_seq_max cells: one slot can never crowd out another.
            .with_kv_unified(false)
            .with_n_threads(options.threads)
            .with_n_threads_batch(options.threads)
            // `auto` was decided by the worker (`KvCacheSettings::for_head_size`).
            .with_flash_attention_policy(if options.kv.flash_attn() == Some(true) {
                FLASH_ATTN_ENABLED
            } else {
                FLASH_ATTN_DISABLED
            })
            .with_type_k(options.kv.type_k().into())
            .with_type_v(options.kv.type_v().into());
        let ctx = self
            .model
            .new_context(self.backend, params)
            .map_err(|e| StartError::Context(e.to_string()))?;
        let batch_size = usize::try_from(options.n_batch).unwrap_or(usize::MAX);
        Ok(Context {
            ctx,
            batch: LlamaBatch::new(batch_size, 1),
            copies_pending: false,
        })
    }
}

impl Vocab for Model {
    fn tokenize(&self, text: &str, parse_special: bool) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    fn bos(&self) -> Option<i32> {
        let vocab = self.model.vocab();
        vocab.should_add_bos().then(|| vocab.bos().0)
    }
}

/// A chat format applied by llama.cpp (`llama_chat_apply_template`).
pub struct NativeFormat {
    model: Arc<Model>,
    template: LlamaChatTemplate,
}

impl ChatFormat for NativeFormat {
    fn render(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>, PromptError> {
        if messages.is_empty() {
            return Err(PromptError::Empty);
        }
        // Render over placeholders, then split: scaffolding and content get tokenized
        // differently (see prompt.rs).
        let chat = messages
            .iter()
            .enumerate()
            .map(|(i, m)| LlamaChatMessage::new(m.role.as_str().into(), prompt::content_marker(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| PromptError::TemplateMangled)?;
        let rendered = self
            .model
            .model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| match e {
                llama_cpp_2::ApplyChatTemplateError::FfiError(code) => PromptError::Template(code),
                _ => PromptError::TemplateMangled,
            })?;
        let bos_text = self
            .model
            .bos()
            .map(|bos| String::from_utf8_lossy(&self.model.piece(bos, true)).into_owned());
        prompt::segments_from_rendered(&rendered, messages, bos_text.as_deref())
    }

    fn stop_strings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Sizes of the context.
pub struct ContextOptions {
    /// Total KV cells: slots × per-slot context.
    pub n_ctx: u32,
    /// Most tokens in one decode.
    pub n_batch: u32,
    /// Sequences (slots).
    pub n_seq_max: u32,
    /// CPU threads.
    pub threads: i32,
    /// Flash attention and the K/V cache types.
    pub kv: KvCacheSettings,
}

/// The engine's one context plus a reusable batch.
pub struct Context<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// A sequence copy ([`copy_seq`](Self::copy_seq)) is queued: llama.cpp moves the
    /// cells' data at the next decode, so until then a sequence's state is not to be read.
    copies_pending: bool,
}

impl Context<'_> {
    /// Decodes one step's batch. Returns, for every entry that wants logits, the batch
    /// index of its logits row (in entry order; `None` for the others).
    ///
    /// The planner keeps a batch within the context's batch size and positions within the
    /// window; a batch that breaks either is refused as llama.cpp's "invalid batch" (-1)
    /// rather than handed to it.
    pub fn decode(
        &mut self,
        entries: &[BatchEntry],
        seq_ids: &[i32],
    ) -> Result<Vec<Option<i32>>, DecodeError> {
        const INVALID_BATCH: DecodeError = DecodeError::Unknown(-1);
        self.batch.clear();
        let mut rows = Vec::with_capacity(entries.len());
        let mut index: i32 = 0;
        for entry in entries {
            let seq = *seq_ids.get(entry.slot).ok_or(INVALID_BATCH)?;
            let last = entry.tokens.len().saturating_sub(1);
            for (i, &token) in entry.tokens.iter().enumerate() {
                let logits = entry.wants_logits && i == last;
                let pos = i32::try_from(entry.first_pos + i).map_err(|_| INVALID_BATCH)?;
                self.batch
                    .add(LlamaToken(token), pos, &[seq], logits)
                    .map_err(|_| INVALID_BATCH)?;
                index += 1;
            }
            rows.push(entry.wants_logits.then_some(index - 1));
        }
        // llama.cpp applies queued sequence copies first thing in a decode, failed or not.
        self.copies_pending = false;
        self.ctx.decode(&mut self.batch)?;
        Ok(rows)
    }

    /// Makes sequence `dst` a copy of sequence `src` (all its cells; whatever `dst` held
    /// is gone). With a KV stream per sequence (`kv_unified = false`) llama.cpp can only
    /// copy whole sequences, and it copies the data at the start of the next decode
    /// (`llama_memory_seq_cp`; `stream_copy_info` in `llama-kv-cache.cpp`).
    pub fn copy_seq(&mut self, src: i32, dst: i32) {
        // Only fails for positions beyond i32, and none are given.
        let _ = self.ctx.copy_kv_cache_seq(src, dst, None, None);
        self.copies_pending = true;
    }

    /// Removes a sequence's KV entries from position `from` on.
    pub fn forget(&mut self, seq_id: i32, from: usize) {
        let from = u32::try_from(from).unwrap_or(u32::MAX);
        // Only fails for out-of-range positions, which `from` cannot be.
        let _ = self
            .ctx
            .clear_kv_cache_seq(Some(seq_id as u32), Some(from), None);
    }

    /// How many bytes [`seq_state`](Self::seq_state) would copy out for `seq_id` now.
    pub fn seq_state_size(&self, seq_id: i32) -> usize {
        self.ctx
            .state_seq_get_size_ext(seq_id, LlamaStateSeqFlags::empty())
    }

    /// Copies sequence `seq_id`'s KV state out (llama.cpp's serialized cells: a memcpy of
    /// the sequence's keys and values). `None` if llama.cpp failed to write it.
    #[allow(unsafe_code)]
    pub fn seq_state(&self, seq_id: i32) -> Option<Vec<u8>> {
        if self.copies_pending {
            // The cells say the copy is done, their data not yet: a wrong state.
            return None;
        }
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq_id, flags);
        let mut state = vec![0u8; size];
        // SAFETY: `state` holds the `size` bytes llama.cpp just reported for this sequence,
        // and nothing runs on this context between the two calls (it lives on this thread
        // only), so the copy cannot write past the buffer.
        let written = unsafe {
            self.ctx
                .state_seq_get_data_ext(state.as_mut_ptr(), seq_id, flags)
        };
        (written == size && size > 0).then_some(state)
    }

    /// Replaces sequence `seq_id`'s KV cells with a state from [`seq_state`](Self::seq_state).
    /// Returns false if llama.cpp refused it (then the sequence is left empty).
    #[allow(unsafe_code)]
    pub fn set_seq_state(&mut self, seq_id: i32, state: &[u8]) -> bool {
        if self.copies_pending {
            // The queued copy would overwrite the restored data at the next decode.
            self.forget(seq_id, 0);
            return false;
        }
        // SAFETY: llama.cpp reads at most `state.len()` bytes (its reader bounds-checks and
        // reports a short buffer as a failure), checks the stream count, cell count, tensor
        // types and row sizes against this context, and clears the sequence on any
        // mismatch. The bytes come from `seq_state` of an engine with the same model
        // identity and context settings, verified by checksum when read from disk.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(state, seq_id, LlamaStateSeqFlags::empty())
        };
        if !ok {
            self.forget(seq_id, 0);
        }
        ok
    }

    /// The logits row `row` of the last decode (one per vocabulary token).
    pub fn logits(&self, row: i32) -> &[f32] {
        self.ctx.get_logits_ith(row)
    }

    /// Samples a token from the logits row `row` of the last decode.
    pub fn sample(&self, sampler: &mut Sampler, row: i32) -> i32 {
        sampler.0.sample(&self.ctx, row).0
    }
}

/// A token sampler for one request: llama.cpp's samplers in the order of a
/// [`sampling::chain`](super::sampling::chain).
pub struct Sampler(LlamaSampler);

impl Sampler {
    /// The chain of `steps`. Fails only if a grammar step does not parse.
    pub fn new(model: &Model, steps: &[Step]) -> Result<Self, ConstraintError> {
        let n_vocab = model.n_vocab();
        let mut samplers = Vec::with_capacity(steps.len());
        for step in steps {
            samplers.push(match step {
                Step::Grammar(grammar) => LlamaSampler::grammar(&model.model, grammar, "root")
                    .map_err(|_| ConstraintError::InvalidGrammar)?,
                Step::LogitBias(biases) => {
                    let biases: Vec<LlamaLogitBias> = biases
                        .iter()
                        .map(|&(token, bias)| LlamaLogitBias::new(LlamaToken(token), bias))
                        .collect();
                    LlamaSampler::logit_bias(n_vocab, &biases)
                }
                Step::Penalties {
                    repeat,
                    frequency,
                    presence,
                } => LlamaSampler::penalties(
                    n_vocab,
                    sampling::PENALTY_LAST_N,
                    *repeat,
                    *frequency,
                    *presence,
                ),
                Step::TopK(k) => LlamaSampler::top_k(*k),
                Step::TopP(p) => LlamaSampler::top_p(*p, 1),
                Step::MinP(p) => LlamaSampler::min_p(*p, 1),
                Step::Temperature(t) => LlamaSampler::temp(*t),
                Step::Dist(seed) => LlamaSampler::dist(*seed),
                Step::Greedy => LlamaSampler::greedy(),
            });
        }
        Ok(Self(LlamaSampler::chain_simple(samplers)))
    }
}

/// Converts a JSON Schema (as JSON text) to a GBNF grammar with llama.cpp's converter;
/// `None` if it cannot.
pub fn json_schema_to_grammar(schema: &str) -> Option<String> {
    llama_cpp_2::json_schema_to_grammar(schema).ok()
}
