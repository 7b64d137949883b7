//! The OpenAI chat completions request as it arrives, and its validation into a
//! [`ChatRequest`]. Pure: unit-tested without a server.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::params::{ExtraFields, ResponseOptions};
use super::state::HttpSettings;
use super::tools;
use crate::chat::{ChatMessage, ChatRequest, Role};

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;

/// Most choices a request may ask for (OpenAI's limit; the local engine's is its slots).
const MAX_N: u32 = 128;

/// `POST /v1/chat/completions` as sent. Unknown fields are ignored, as OpenAI clients
/// send many (`model`, `user`, …): the bot answers with its chain.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    #[serde(default)]
    pub messages: Option<Vec<WireMessage>>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Most tokens of the reply (legacy name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Most tokens of the reply.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling, above 0 and at most 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// A stop string or a list of them.
    #[serde(default)]
    pub stop: Option<Value>,
    /// Number of choices, 1 to 128 (the local engine: at most its slots).
    #[serde(default)]
    pub n: Option<u32>,
    /// Extension (llama-server's name): generate exactly `max_tokens` tokens, ignoring
    /// end-of-generation. For benchmarks; only the local engine honours it.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Sampling, logprobs, response format, stream options, truncation (`params`).
    #[serde(flatten)]
    pub extra: ExtraFields,
    /// `tools`, `tool_choice`, `parallel_tool_calls` (`tools`).
    #[serde(flatten)]
    pub tool_fields: super::tools::ToolFields,
}

/// A checked request.
#[derive(Debug)]
pub struct ValidRequest {
    /// What to ask the chain.
    pub request: ChatRequest,
    /// Answer as server-sent events.
    pub stream: bool,
    /// How to shape the response.
    pub options: ResponseOptions,
}

/// One message as sent.
#[derive(Debug, Deserialize)]
pub struct WireMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// A string, a list of `{"type":"text","text":…}` parts, or null.
    #[serde(default)]
    pub content: Value,
    /// An assistant's calls of tools.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<Value>,
}

/// The role of a wire message.
fn role(name: &str) -> Result<Role, ApiError> {
    match name {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(ApiError::invalid(
            "messages",
            format!(
                "unsupported message role `{}` (use system, user, assistant or tool)",
                other.chars().take(40).collect::<String>()
            ),
        )),
    }
}

/// What joins the text parts of one message: a newline, as llama-server joins them
/// (`concat_content_parts` in llama.cpp's `common/chat.cpp`), so "What is" and "the best
/// book" stay two words.
const PART_SEPARATOR: &str = "\n";

/// The text of a wire message's content.
fn content(value: Value) -> Result<String, ApiError> {
    match value {
        Value::String(text) => Ok(text),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.into_iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => {
                        if i > 0 {
                            text.push_str(PART_SEPARATOR);
                        }
                        text.push_str(t);
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            "messages",
                            "only text content parts are supported",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            "messages",
            "message content must be a string or a list of text parts",
        )),
    }
}

fn stop_strings(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("stop", "stop must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or a list")),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings"),
        ));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

impl ChatCompletionRequest {
    /// Checks the request.
    pub fn validate(self, settings: &HttpSettings) -> Result<ValidRequest, ApiError> {
        let wire = self
            .messages
            .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
        if wire.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must not be empty",
            ));
        }
        // The configured system prompt is added by the responder, not here.
        let mut messages = Vec::with_capacity(wire.len() + 1);
        for (i, message) in wire.into_iter().enumerate() {
            let mut chat = ChatMessage::new(role(&message.role)?, content(message.content)?);
            match chat.role {
                Role::Assistant => chat.tool_calls = tools::calls(message.tool_calls, i)?,
                Role::Tool => chat.tool_call_id = Some(tools::call_id(message.tool_call_id, i)?),
                Role::System | Role::User => {}
            }
            messages.push(chat);
        }
        tools::check_sequence(&messages)?;
        if !messages.iter().any(|m| m.role == Role::User) {
            return Err(ApiError::invalid(
                "messages",
                "`messages` needs a user message",
            ));
        }
        let mut params = settings.generate.clone();
        if let Some(n) = self.n {
            if !(1..=MAX_N).contains(&n) {
                return Err(ApiError::invalid("n", format!("n must be 1 to {MAX_N}")));
            }
            params.n = n;
        }
        if let Some(max) = self.max_completion_tokens.or(self.max_tokens) {
            if max == 0 {
                return Err(ApiError::invalid(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ));
            }
            // The configured budget is what fits the context window: ask for less, not more.
            params.max_tokens = max.min(settings.generate.max_tokens);
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    "temperature must be 0 to 2",
                ));
            }
            params.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    "top_p must be above 0 and at most 1",
                ));
            }
            params.top_p = p;
        }
        if let Some(seed) = self.seed {
            params.seed = Some(
                u32::try_from(seed)
                    .map_err(|_| ApiError::invalid("seed", "seed must be 0 to 4294967295"))?,
            );
        }
        params.stop = stop_strings(self.stop)?;
        params.ignore_eos = self.ignore_eos.unwrap_or(false);
        let stream = self.stream.unwrap_or(false);
        let options = self.extra.apply(&mut params, stream)?;
        params.tools = self.tool_fields.validate()?;
        Ok(ValidRequest {
            request: ChatRequest::new(messages, params),
            stream,
            options,
        })
    }
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest {
            message: format!("invalid request: {e}"),
            param: None,
        },
        _ => ApiError::InvalidJson(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::GenerateParams;

    fn settings() -> HttpSettings {
        HttpSettings {
            api_key: None,
            body_limit: 1 << 20,
            max_concurrent: 1,
            model_id: "m".into(),
            generate: GenerateParams {
                max_tokens: 100,
                ..GenerateParams::default()
            },
            connections: crate::http::ConnectionLimits::default(),
        }
    }

    fn check(body: &str) -> Result<(ChatRequest, bool), ApiError> {
        let valid = parse(body.as_bytes())?.validate(&settings())?;
        Ok((valid.request, valid.stream))
    }

    #[test]
    fn text_parts_are_joined_with_a_newline() {
        let (request, _) = check(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"What is"},
                {"type":"text","text":"the best book"}]}]}"#,
        )
        .unwrap();
        assert_eq!(request.messages[0].content, "What is\nthe best book");
    }

    #[test]
    fn a_valid_request_becomes_a_chat_request() {
        let (request, stream) = check(
            r#"{"model":"x","stream":true,"max_tokens":500,"temperature":0,"seed":3,"stop":"END",
                "messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],"user":"u1"}"#,
        )
        .unwrap();
        assert!(stream);
        assert_eq!(request.messages, [ChatMessage::user("Hi")]);
        assert_eq!(
            request.params.max_tokens, 100,
            "capped by the configured budget"
        );
        assert_eq!(request.params.temperature, 0.0);
        assert_eq!(request.params.seed, Some(3));
        assert_eq!(request.params.stop, ["END"]);
        assert!(!request.params.ignore_eos, "off unless asked for");
    }

    #[test]
    fn ignore_eos_is_accepted_as_an_extension_field() {
        let (request, _) =
            check(r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":true}"#).unwrap();
        assert!(request.params.ignore_eos);
        let (request, _) =
            check(r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":false}"#).unwrap();
        assert!(!request.params.ignore_eos);
        assert!(
            check(r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":"yes"}"#).is_err(),
            "a non-boolean is refused, not ignored"
        );
    }

    #[test]
    fn bad_requests_are_told_why() {
        assert!(matches!(check("{not json"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(check(""), Err(ApiError::InvalidJson(_))));
        let missing = check(r#"{"model":"x"}"#).unwrap_err();
        assert_eq!(
            missing,
            ApiError::invalid("messages", "`messages` is required")
        );
        assert!(check(r#"{"messages":[]}"#).is_err());
        let role = check(r#"{"messages":[{"role":"function","content":"x"}]}"#).unwrap_err();
        assert!(
            role.to_string()
                .contains("unsupported message role `function`"),
            "{role}"
        );
        assert!(check(r#"{"messages":[{"role":"system","content":"x"}]}"#).is_err());
        assert!(check(r#"{"messages":"hi"}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":5}]}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"seed":-1}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#).is_err());
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"n":129}"#).is_err());
        let two = check(r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#).unwrap();
        assert_eq!(two.0.params.n, 2);
        assert!(check(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#).is_err());
        assert!(
            check(r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#)
                .is_err()
        );
    }
}
