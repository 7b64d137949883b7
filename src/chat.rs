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
    /// The result of a tool the model called (OpenAI's `role: "tool"`).
    Tool,
}

impl Role {
    /// The lowercase name chat templates and OpenAI-style APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
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
    /// The tools an assistant message called (empty for every other message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a [`Role::Tool`] message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
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

    /// An assistant message calling tools (with `content` beside the calls, maybe empty).
    pub fn tool_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new(Role::Assistant, content)
        }
    }

    /// The result of the tool call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// A call of a function tool, OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the tool's result names (`call_…`).
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments: a JSON object, as text (as OpenAI sends them).
    pub arguments: String,
}

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionTool {
    /// Its name, `^[a-zA-Z0-9_-]{1,64}$`.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON Schema of its arguments (an object schema).
    pub parameters: serde_json::Value,
    /// OpenAI's `strict` flag, passed on to providers that take it.
    pub strict: bool,
}

/// Whether and which tool the model must call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No call: a text answer.
    None,
    /// The model decides.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tools of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The functions offered, names unique.
    pub functions: Vec<FunctionTool>,
    /// Whether and which tool to call.
    pub choice: ToolChoice,
    /// Whether one answer may call several tools (OpenAI's `parallel_tool_calls`).
    pub parallel: bool,
}

impl Tools {
    /// Whether the answer may hold calls (the choice is not `none` and there are tools).
    pub fn callable(&self) -> bool {
        self.choice != ToolChoice::None && !self.functions.is_empty()
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
    /// Keep only the `top_k` most likely tokens; `0` keeps them all.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` times the most likely one; `0.0` is off.
    pub min_p: f32,
    /// Divides the logits of tokens seen in the last 64 (llama.cpp's
    /// `repeat_penalty`); `1.0` is off.
    pub repeat_penalty: f32,
    /// Subtracts this times a token's count so far from its logit (OpenAI); `0.0` is off.
    pub frequency_penalty: f32,
    /// Subtracts this from the logit of every token seen so far (OpenAI); `0.0` is off.
    pub presence_penalty: f32,
    /// Added to the logits of these token ids (of the local model's vocabulary).
    pub logit_bias: Vec<(i32, f32)>,
    /// Report each generated token's log-probability with this many most likely
    /// alternatives (0..=20); `None` reports nothing.
    pub logprobs: Option<u8>,
    /// What the reply must look like (JSON, a schema, a grammar); `None` is free text.
    pub constraint: Option<Constraint>,
    /// What to do with a conversation longer than the window.
    pub overflow: Overflow,
    /// The tools the model may call; `None` when the request offers none.
    pub tools: Option<Tools>,
    /// Choices to generate for the one prompt (OpenAI `n`, at least 1). With more than
    /// one, the reply stream marks each choice's events ([`StreamEvent::Choice`]) and ends
    /// each with [`StreamEvent::ChoiceEnd`].
    pub n: u32,
}

/// A constraint on the reply's form.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against a schema (OpenAI `response_format: {"type": "json_schema"}`, or
    /// llama-server's top-level `json_schema`).
    JsonSchema {
        /// The schema's name (OpenAI requires one; `"schema"` otherwise).
        name: String,
        /// The JSON Schema.
        schema: serde_json::Value,
        /// OpenAI's `strict` flag, passed on to providers that take it.
        strict: bool,
    },
    /// A llama.cpp GBNF grammar (llama-server's `grammar`); the local engine only.
    Grammar(String),
}

/// What happens to a conversation longer than the context window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the oldest turns in blocks (and cut an overlong message), as the bot does for
    /// its own chats.
    #[default]
    Trim,
    /// Refuse it (`context_length_exceeded`), as OpenAI does: the client decides.
    Refuse,
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
            top_k: DEFAULT_TOP_K,
            min_p: DEFAULT_MIN_P,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
            constraint: None,
            overflow: Overflow::Trim,
            tools: None,
            n: 1,
        }
    }
}

/// llama-server's default top-k (`common_params_sampling::top_k` in llama.cpp's
/// `common/common.h`).
pub const DEFAULT_TOP_K: u32 = 40;
/// llama-server's default min-p (`common_params_sampling::min_p`).
pub const DEFAULT_MIN_P: f32 = 0.05;

impl GenerateParams {
    /// Deterministic decoding (temperature 0, fixed seed) of at most `max_tokens` tokens:
    /// what tests and benchmarks use.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(1),
            ..Self::default()
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

/// A generated token's log-probability, OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token's text (lossy UTF-8 when it is part of a character).
    pub token: String,
    /// Its natural-log probability under the model's distribution.
    pub logprob: f32,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative at a position, OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
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
    /// The log-probabilities of tokens generated since the last such event (only when
    /// [`GenerateParams::logprobs`] asked for them); sent before the text they make up.
    Logprobs(Vec<TokenLogprob>),
    /// A call of one of the request's tools, whole (only when
    /// [`GenerateParams::tools`] offered some); comes instead of text or after it.
    ToolCall(ToolCall),
    /// Only in replies with several choices ([`GenerateParams::n`] > 1): the events that
    /// follow, up to the next `Choice`, belong to the choice with this index (0-based;
    /// before the first marker, choice 0).
    Choice(u32),
    /// Only in replies with several choices: the current choice ended, for this reason.
    /// Every choice gets one; `Done` follows the last.
    ChoiceEnd(FinishReason),
    /// The reply is complete; nothing follows. With several choices its usage counts
    /// the prompt once and the tokens of all choices, and its finish reason is choice 0's.
    Done(Completion),
}
