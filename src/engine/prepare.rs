//! Prompt preparation, on the caller's side: a [`ChatRequest`] becomes the token ids, reply
//! budget and stop strings the engine thread runs. Rendering, tokenizing and fitting a long
//! conversation costs milliseconds (a 100 KB message: tens of them); done on the engine
//! thread, that time would freeze every streaming reply. Here it runs on the thread that
//! submits, or on tokio's blocking pool for large requests
//! ([`EngineHandle::submit_async`](super::EngineHandle::submit_async)).
//!
//! The model is shared with the engine thread through an `Arc`: llama.cpp tokenizes and
//! applies chat templates from a read-only vocabulary (see `llama.rs`).

use std::borrow::Cow;
use std::sync::Arc;

use super::EngineError;
use super::grammar;
use super::llama::{self, Model};
use super::prompt::{self, ChatFormat, PromptError, Vocab};
use super::tools::{self, ToolDialect};
use crate::chat::{ChatMessage, ChatRequest, GenerateParams, Overflow, PromptToken, Role};

/// Requests whose messages hold more bytes than this are prepared on tokio's blocking
/// pool by `submit_async`; smaller ones inline, where the hand-off to another thread
/// would cost about as much as the work. Measured with SmolLM2's tokenizer on a loaded
/// 2-core machine (debug test build, llama.cpp at -O3): tokenizing costs 0.5-2 ms per KiB
/// (0.04 ms for a one-line message); preparing a 1 KiB message 0.5 ms, a 16 KiB one
/// 170 ms, a 100 KiB one (tokenized about four times: fit, measure, truncate, rebuild)
/// 0.9 s. So anything past a short message leaves the runtime.
pub(super) const INLINE_PREPARE_MAX_BYTES: usize = 1024;

/// Turns requests into prompts for one model, chat format and window.
pub(super) struct Preparer {
    /// The model, shared with the engine thread.
    pub(super) model: Arc<Model>,
    /// The chat format in use.
    format: Box<dyn ChatFormat + Send + Sync>,
    /// Strings that end a reply in this format (from the format only: `[INST]` means
    /// nothing to a ChatML model).
    format_stops: Vec<String>,
    /// The context window of each slot, in tokens.
    ctx_size: u32,
    /// How this format over this model renders tools.
    tool_dialect: ToolDialect,
}

/// A request ready for the engine thread.
pub(super) struct Prepared {
    /// The fitted prompt's token ids.
    pub(super) prompt: Vec<i32>,
    /// The sampling parameters.
    pub(super) params: GenerateParams,
    /// The reply budget, clamped to the window.
    pub(super) max_tokens: u32,
    /// The format's stop strings, then the request's own.
    pub(super) stops: Vec<String>,
    /// The GBNF grammar of the request's constraint, checked to parse.
    pub(super) grammar: Option<String>,
    /// The prompt as `--verbose-prompt` shows it, when asked for.
    pub(super) shown: Option<Vec<PromptToken>>,
}

impl Preparer {
    /// A preparer for `format` over `model`.
    pub(super) fn new(
        model: Arc<Model>,
        format: Box<dyn ChatFormat + Send + Sync>,
        ctx_size: u32,
    ) -> Self {
        let format_stops = format.stop_strings();
        let tool_dialect = format.tool_dialect(model.as_ref());
        Self {
            model,
            format,
            format_stops,
            ctx_size,
            tool_dialect,
        }
    }

    /// Renders, tokenizes and fits `request` (see [`prompt::fit_prompt`]). CPU work that
    /// grows with the request: call it off the async runtime for large requests.
    pub(super) fn prepare(
        &self,
        request: ChatRequest,
        show_prompt: bool,
    ) -> Result<Prepared, EngineError> {
        let ctx_size = self.ctx_size;
        // Keep at least a quarter of the window for the prompt, whatever max_tokens says.
        let max_tokens = request.params.max_tokens.clamp(1, ctx_size - ctx_size / 4);
        let budget = (ctx_size - max_tokens) as usize;
        let tools = request.params.tools.as_ref();
        // Before the prompt work: a constraint that cannot be followed is refused cheaply.
        // A forced tool call is a constraint too, and takes precedence.
        let forced = match tools {
            Some(tools) => tools::forced_gbnf(tools, self.tool_dialect)?,
            None => None,
        };
        let grammar = match (forced, &request.params.constraint) {
            (Some(gbnf), _) => {
                self.model.check_grammar(&gbnf)?;
                Some(gbnf)
            }
            (None, None) => None,
            (None, Some(constraint)) => {
                let gbnf = grammar::gbnf(constraint, llama::json_schema_to_grammar)?;
                self.model.check_grammar(&gbnf)?;
                Some(gbnf)
            }
        };
        // Tools and tool messages: Mistral's control tokens, or the generic text rendering.
        let mistral_tools;
        let (messages, format): (Cow<'_, [ChatMessage]>, &dyn ChatFormat) = match self.tool_dialect
        {
            ToolDialect::Mistral => {
                mistral_tools = tools::MistralToolsFormat {
                    functions: tools
                        .filter(|t| t.callable())
                        .map(|t| t.functions.as_slice()),
                };
                (Cow::Borrowed(&request.messages), &mistral_tools)
            }
            ToolDialect::Generic
                if tools.is_some()
                    || request
                        .messages
                        .iter()
                        .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty()) =>
            {
                (
                    Cow::Owned(tools::generic_messages(&request.messages, tools)),
                    self.format.as_ref(),
                )
            }
            ToolDialect::Generic => (Cow::Borrowed(&request.messages), self.format.as_ref()),
        };
        let fitted = prompt::fit_prompt(self.model.as_ref(), format, &messages, budget)?;
        if request.params.overflow == Overflow::Refuse
            && (fitted.dropped_messages > 0 || fitted.truncated)
        {
            let whole = prompt::tokenize_segments(self.model.as_ref(), &format.render(&messages)?);
            return Err(PromptError::TooLong {
                tokens: whole.len(),
                max: budget,
            }
            .into());
        }
        if fitted.dropped_messages > 0 || fitted.truncated {
            tracing::debug!(
                dropped = fitted.dropped_messages,
                truncated = fitted.truncated,
                tokens = fitted.tokens.len(),
                budget,
                "prompt trimmed to fit the context window"
            );
        }
        let shown = show_prompt.then(|| {
            fitted
                .tokens
                .iter()
                .map(|&id| PromptToken {
                    id,
                    piece: String::from_utf8_lossy(&self.model.piece(id, true)).into_owned(),
                })
                .collect()
        });
        // With ignore_eos only the request's own stop strings end the reply early.
        let format_stops: &[String] = if request.params.ignore_eos {
            &[]
        } else {
            &self.format_stops
        };
        let stops = format_stops
            .iter()
            .chain(&request.params.stop)
            .cloned()
            .collect();
        Ok(Prepared {
            prompt: fitted.tokens,
            params: request.params,
            max_tokens,
            stops,
            grammar,
            shown,
        })
    }

    /// Token count of `text` as message content (no special-token parsing, no BOS).
    pub(super) fn count_tokens(&self, text: &str) -> usize {
        self.model.tokenize(text, false).len()
    }
}

/// The bytes of a request's messages, to decide where to prepare it.
pub(super) fn request_bytes(request: &ChatRequest) -> usize {
    request.messages.iter().map(|m| m.content.len()).sum()
}
