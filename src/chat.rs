//! The shared vocabulary of a chat: messages, generation parameters, and the events a
//! reply stream yields. A leaf module: everything else (engine, providers, Telegram, HTTP)
//! speaks these types, and this module depends on nothing of the crate.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the whole conversation.
    System,
    /// The person talking to the bot.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The lowercase name chat templates and OpenAI-style APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// What it says, as plain text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// How to generate a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature; `0.0` means greedy (deterministic) decoding.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest token set whose probability mass reaches this.
    pub top_p: f32,
    /// Seed of the sampler's random generator; `None` picks a fresh one per request.
    pub seed: Option<u32>,
    /// Extra strings that end the reply when generated (not included in the reply).
    pub stop: Vec<String>,
    /// Generate exactly `max_tokens` tokens: end-of-generation and control tokens, and the
    /// chat format's own stop strings, do not end the reply (`stop` still does; a full
    /// context window too), and control tokens appear as their text. A benchmark knob, as
    /// llama-server's `ignore_eos`: random-weight models answer with end-of-sequence at
    /// once. Only the local engine honours it.
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 1000,
            temperature: 0.7,
            top_p: 0.95,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl GenerateParams {
    /// Deterministic decoding (temperature 0, fixed seed) of at most `max_tokens` tokens:
    /// what tests and benchmarks use.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(1),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A request for a reply: the conversation so far (ending with the user's message) and how
/// to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation, oldest first. A system message, if any, comes first.
    pub messages: Vec<ChatMessage>,
    /// Generation parameters.
    pub params: GenerateParams,
    /// The conversation it belongs to, hashed: a fleet routes on it, and it is sent as
    /// `prompt_cache_key` and `x-session-id` so servers keep the conversation's cache.
    pub affinity: Option<AffinityKey>,
}

impl ChatRequest {
    /// A request with the given messages and parameters.
    pub fn new(messages: Vec<ChatMessage>, params: GenerateParams) -> Self {
        Self {
            messages,
            params,
            affinity: None,
        }
    }

    /// The request, marked as belonging to the conversation `affinity`.
    pub fn with_affinity(mut self, affinity: AffinityKey) -> Self {
        self.affinity = Some(affinity);
        self
    }
}

/// A conversation's identity as it leaves the process: a keyed 128-bit hash of the
/// conversation key (a chat id, a client's session id), never the key itself. The same
/// conversation and seed give the same key across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AffinityKey(u128);

impl AffinityKey {
    /// The key of `conversation` under `seed` (a per-deployment secret, so that a chat id
    /// cannot be confirmed by hashing it).
    pub fn of(conversation: &str, seed: u64) -> Self {
        Self(xxhash_rust::xxh3::xxh3_128_with_seed(
            conversation.as_bytes(),
            seed,
        ))
    }

    /// 32 lowercase hex digits: the `prompt_cache_key` and `x-session-id` value.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }

    /// 64 bits of it, for routing.
    pub fn route_hash(&self) -> u64 {
        // Truncation keeps the low half, as uniform as the whole.
        self.0 as u64
    }
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn, or produced a stop string.
    Stop,
    /// `max_tokens` was reached (or the context window was full).
    Length,
    /// The caller went away or asked to stop.
    Cancelled,
    /// The provider's safety or copyright filter stopped the reply (Gemini `SAFETY`,
    /// `RECITATION`, `PROHIBITED_CONTENT`, …; OpenAI `content_filter`).
    ContentFilter,
}

impl FinishReason {
    /// The OpenAI-style name (`stop`, `length`, `cancelled`, `content_filter`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Token counts of one reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt, in all.
    pub prompt_tokens: u32,
    /// Prompt tokens found in the KV cache and not processed again.
    pub cached_tokens: u32,
    /// Prompt tokens processed (decoded) for this reply: `prompt_tokens - cached_tokens`.
    pub processed_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Where the time of one reply went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// From submission until a slot took the request.
    pub queued: Duration,
    /// From taking the request until the first generated token (prompt processing).
    pub prompt: Duration,
    /// From the first generated token until the end.
    pub generation: Duration,
}

impl Timings {
    /// Generated tokens per second over the generation phase (`0.0` if too short to tell).
    pub fn tokens_per_second(&self, completion_tokens: u32) -> f64 {
        let secs = self.generation.as_secs_f64();
        if completion_tokens < 2 || secs <= 0.0 {
            return 0.0;
        }
        // The first token is produced by the prompt step, not the generation phase.
        f64::from(completion_tokens - 1) / secs
    }
}

/// The closing record of a reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// A token of the final prompt, as `--verbose-prompt` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptToken {
    /// The token id.
    pub id: i32,
    /// Its text (control tokens shown by name).
    pub piece: String,
}

/// One event of a reply stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The provider started on the request: it left the local engine's queue for a slot
    /// (only providers that queue send it; see `Provider::reports_start`).
    Started,
    /// The prompt exactly as the model sees it; sent after `Started`, only when asked for.
    Prompt(Vec<PromptToken>),
    /// More text of the reply.
    Delta(String),
    /// The reply is complete; nothing follows.
    Done(Completion),
}
