//! OpenAI-compatible chat completions with SSE streaming: Groq, Mistral La Plateforme and
//! the generic `openai` provider (OpenAI itself, or a vLLM / TGI / llama-server fleet) are
//! one client with different base URLs, keys, models and a few per-API quirks
//! ([`OpenAiFlavor`]).
//!
//! Request: `POST {base}/chat/completions`, `Authorization: Bearer {key}`, `stream: true`.
//! Response: `data: {"choices":[{"delta":{"content":"…"}}]}` events, then `data: [DONE]`.

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use reqwest::header;
use serde::Deserialize;
use serde_json::json;
use url::Url;

use super::choices::{ChoiceReader, Piece};
use super::cloud::{self, MAX_RESPONSE_BODY};
use super::convert::normalize;
use super::{EventStream, Provider, ProviderError, passthrough, sse, tools};
use crate::chat::{ChatRequest, FinishReason, StreamEvent, TokenLogprob, TopLogprob, Usage};
use crate::config::{CloudConfig, ProviderKind, Secret};

/// Which OpenAI-compatible API this is: the name, and what each accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiFlavor {
    /// Groq: OpenAI's fields, usage via `stream_options`.
    Groq,
    /// Mistral La Plateforme: `random_seed` instead of `seed`; rejects unknown fields and
    /// sends usage in the last chunk anyway.
    Mistral,
    /// Any OpenAI-compatible server.
    Generic,
}

impl OpenAiFlavor {
    fn name(self) -> &'static str {
        match self {
            OpenAiFlavor::Groq => "groq",
            OpenAiFlavor::Mistral => "mistral",
            OpenAiFlavor::Generic => "openai",
        }
    }

    /// The provider this flavor is in `--chain`.
    pub fn kind(self) -> ProviderKind {
        match self {
            OpenAiFlavor::Groq => ProviderKind::Groq,
            OpenAiFlavor::Mistral => ProviderKind::Mistral,
            OpenAiFlavor::Generic => ProviderKind::OpenAi,
        }
    }
}

/// The request field that caps a reply's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenField {
    /// `max_tokens`: Mistral's only field, and the one every self-hosted server reads.
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's current field (reasoning models reject
    /// `max_tokens` with 400 `unsupported_parameter`), and Groq's.
    MaxCompletionTokens,
}

impl TokenField {
    fn as_str(self) -> &'static str {
        match self {
            TokenField::MaxTokens => "max_tokens",
            TokenField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// Tokens a reasoning model may spend thinking on top of the reply's own budget: its
/// hidden reasoning counts against `max_completion_tokens`, and without room for it a
/// short budget ends in an empty reply with `finish_reason: length`.
const REASONING_HEADROOM: u32 = 1024;

/// Whether `model` is a reasoning model (its thinking counts against the token cap):
/// OpenAI's o-series and GPT-5 and later, and the open-weight gpt-oss that Groq serves.
fn is_reasoning_model(model: &str) -> bool {
    let model = model.to_ascii_lowercase();
    let model = model.rsplit('/').next().unwrap_or(&model);
    let mut chars = model.chars();
    let o_series = chars.next() == Some('o') && chars.next().is_some_and(|c| c.is_ascii_digit());
    let gpt_n = model.strip_prefix("gpt-").is_some_and(|rest| {
        let major: String = rest.chars().take_while(char::is_ascii_digit).collect();
        major.parse::<u32>().is_ok_and(|n| n >= 5)
    });
    o_series || gpt_n || model.starts_with("gpt-oss")
}

/// Which field caps the reply for `flavor` at `base_url` with `model`.
///
/// - Groq: `max_completion_tokens` (`max_tokens` is deprecated there:
///   <https://console.groq.com/docs/api-reference#chat-create>, groq-python PR 175).
/// - Mistral: `max_tokens`, its only field; it rejects unknown fields
///   (<https://docs.mistral.ai/api/endpoint/chat>).
/// - OpenAI itself: `max_completion_tokens`; `max_tokens` is deprecated and reasoning models
///   answer 400 `unsupported_parameter` to it
///   (<https://platform.openai.com/docs/api-reference/chat/create>,
///   <https://github.com/openhab/openhab-addons/pull/21459>).
/// - Any other OpenAI-compatible server: `max_tokens`, which vLLM, TGI, Ollama and every
///   llama-server read; llama-server ignored `max_completion_tokens` (an unlimited reply)
///   until February 2026 (<https://github.com/ggml-org/llama.cpp/pull/19831>) and Ollama
///   still may. A reasoning model's name still gets `max_completion_tokens` (an OpenAI
///   proxy such as Azure).
fn token_field(flavor: OpenAiFlavor, base_url: &Url, model: &str) -> TokenField {
    match flavor {
        OpenAiFlavor::Groq => TokenField::MaxCompletionTokens,
        OpenAiFlavor::Mistral => TokenField::MaxTokens,
        OpenAiFlavor::Generic
            if base_url.host_str() == Some("api.openai.com") || is_reasoning_model(model) =>
        {
            TokenField::MaxCompletionTokens
        }
        OpenAiFlavor::Generic => TokenField::MaxTokens,
    }
}

/// The header carrying a request's affinity key to a fleet's router.
pub const SESSION_HEADER: &str = "x-session-id";

/// The affinity key `request` carries out, as hex; none to Mistral, whose API takes no
/// such field (and to which nothing routes by it).
fn session_key(flavor: OpenAiFlavor, request: &ChatRequest) -> Option<String> {
    match flavor {
        OpenAiFlavor::Mistral => None,
        OpenAiFlavor::Groq | OpenAiFlavor::Generic => request.affinity.map(|k| k.hex()),
    }
}

/// A client of one OpenAI-compatible chat completions API.
pub struct OpenAiProvider {
    flavor: OpenAiFlavor,
    client: reqwest::Client,
    endpoint: Result<Url, String>,
    api_key: Option<Secret>,
    key_required: bool,
    model: String,
    /// The field that caps the reply's length for this API and model.
    token_field: TokenField,
    /// Whether the model reasons before answering (see [`is_reasoning_model`]).
    reasoning: bool,
    /// Told what each response's rate-limit headers say is left.
    limits: Option<std::sync::Arc<super::Budgets>>,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("flavor", &self.flavor)
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key)
            .field("model", &self.model)
            .finish()
    }
}

/// `{base}/{path}`, whether or not `base` ends with a slash.
pub(super) fn endpoint(base: &Url, path: &str) -> Result<Url, String> {
    let joined = format!("{}/{path}", base.as_str().trim_end_matches('/'));
    Url::parse(&joined).map_err(|e| format!("bad URL {joined}: {e}"))
}

impl OpenAiProvider {
    /// A client of `flavor`'s API as `config` describes it.
    pub fn new(flavor: OpenAiFlavor, client: reqwest::Client, config: &CloudConfig) -> Self {
        Self {
            flavor,
            client,
            endpoint: endpoint(&config.base_url, "chat/completions"),
            api_key: config.api_key.clone(),
            key_required: config.key_required,
            model: config.model.clone(),
            token_field: token_field(flavor, &config.base_url, &config.model),
            reasoning: is_reasoning_model(&config.model),
            limits: None,
        }
    }

    /// The same client, telling `budgets` what each response's rate-limit headers say.
    pub fn reporting_limits(mut self, budgets: std::sync::Arc<super::Budgets>) -> Self {
        self.limits = Some(budgets);
        self
    }

    /// A failed call as the chain should see it: an unknown or retired model is the
    /// operator's to fix (it names the flag), not a passing fault of the provider.
    fn classify(&self, error: ProviderError) -> ProviderError {
        match error {
            ProviderError::Status { status: 404, .. } => self.model_not_found(),
            // Groq: 400 `model_decommissioned` for a model it has shut down.
            ProviderError::Status {
                status: 400,
                detail,
            } if detail.contains("decommissioned") => self.model_not_found(),
            other => other,
        }
    }

    fn model_not_found(&self) -> ProviderError {
        ProviderError::ModelNotFound {
            model: self.model.clone(),
            flag: self.flavor.kind().model_flag(),
        }
    }

    /// The request body for `request`.
    fn body(&self, request: &ChatRequest) -> serde_json::Value {
        let turns = normalize(&request.messages);
        let mistral = self.flavor == OpenAiFlavor::Mistral;
        let messages: Vec<_> = turns
            .system
            .iter()
            .map(|s| json!({"role": "system", "content": s}))
            .chain(
                turns
                    .turns
                    .iter()
                    .map(|turn| tools::openai_message(turn, mistral)),
            )
            .collect();
        let params = &request.params;
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
        });
        let max_tokens = if self.reasoning {
            params.max_tokens.saturating_add(REASONING_HEADROOM)
        } else {
            params.max_tokens
        };
        body[self.token_field.as_str()] = json!(max_tokens);
        match (self.flavor, self.reasoning) {
            // OpenAI's reasoning models accept only the default sampling ("Unsupported
            // value: 'temperature' does not support 0.7 with this model"); a little
            // reasoning keeps a chat reply quick.
            (OpenAiFlavor::Generic, true) => body["reasoning_effort"] = json!("low"),
            // Groq's gpt-oss: low effort, and the reasoning left out of the stream
            // (https://console.groq.com/docs/reasoning).
            (OpenAiFlavor::Groq, true) => {
                body["temperature"] = json!(params.temperature);
                body["top_p"] = json!(params.top_p);
                body["reasoning_effort"] = json!("low");
                body["include_reasoning"] = json!(false);
            }
            _ => {
                body["temperature"] = json!(params.temperature);
                body["top_p"] = json!(params.top_p);
            }
        }
        if let Some(seed) = params.seed {
            let field = match self.flavor {
                OpenAiFlavor::Mistral => "random_seed",
                OpenAiFlavor::Groq | OpenAiFlavor::Generic => "seed",
            };
            body[field] = json!(seed);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        if self.flavor != OpenAiFlavor::Mistral {
            body["stream_options"] = json!({"include_usage": true});
        }
        // OpenAI and Groq route to their prompt caches by it; Mistral rejects unknown fields.
        if let Some(key) = session_key(self.flavor, request) {
            body["prompt_cache_key"] = json!(key);
        }
        // Refusals were checked in `stream`: here only the fields.
        for (key, value) in passthrough::openai_fields(params).unwrap_or_default() {
            body[key] = value;
        }
        if let Some(offered) = &params.tools {
            for (key, value) in tools::openai_fields(offered, mistral) {
                body[key] = value;
            }
        }
        body
    }
}

impl Provider for OpenAiProvider {
    fn name(&self) -> &'static str {
        self.flavor.name()
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            if self.key_required && self.api_key.is_none() {
                return Err(ProviderError::MissingKey);
            }
            passthrough::openai_fields(&request.params)?;
            let endpoint = self.endpoint.clone().map_err(ProviderError::Connect)?;
            let mut http = self
                .client
                .post(endpoint)
                .header(header::ACCEPT, "text/event-stream")
                .json(&self.body(&request));
            if let Some(key) = &self.api_key {
                http = http.bearer_auth(key.expose());
            }
            // What a router in front of a fleet keeps affinity by (vLLM production-stack
            // `--session-key x-session-id`, nginx `hash $http_x_session_id consistent`).
            if let Some(key) = session_key(self.flavor, &request) {
                http = http.header(SESSION_HEADER, key);
            }
            let response = cloud::send(http).await.map_err(|e| self.classify(e))?;
            if let Some(limits) = &self.limits {
                limits.observe_headers(self.name(), response.headers());
            }
            let is_json = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let n = request.params.n;
            if is_json {
                // The server ignored `stream: true` and sent the whole completion.
                let body = cloud::read_bounded(response, MAX_RESPONSE_BODY).await?;
                return whole_completion(&body, n).map(|events| stream::iter(events).boxed());
            }
            Ok(events(sse::data_stream(response.bytes_stream()), n))
        })
    }
}

#[derive(Debug, Default, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    /// Groq also reports usage here.
    x_groq: Option<XGroq>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct XGroq {
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    /// Which choice (0 when left out).
    #[serde(default)]
    index: u32,
    delta: Option<Message>,
    message: Option<Message>,
    finish_reason: Option<String>,
    /// `{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": …}`.
    logprobs: Option<WireLogprobs>,
}

#[derive(Debug, Deserialize)]
struct WireLogprobs {
    #[serde(default)]
    content: Option<Vec<WireToken>>,
}

#[derive(Debug, Deserialize)]
struct WireToken {
    token: String,
    logprob: f32,
    /// UTF-8 bytes of the token (`null` for some tokens); the token's own when left out.
    #[serde(default)]
    bytes: Option<Vec<u8>>,
    #[serde(default)]
    top_logprobs: Vec<WireTop>,
}

#[derive(Debug, Deserialize)]
struct WireTop {
    token: String,
    logprob: f32,
    #[serde(default)]
    bytes: Option<Vec<u8>>,
}

impl From<WireToken> for TokenLogprob {
    fn from(wire: WireToken) -> Self {
        TokenLogprob {
            bytes: wire.bytes.unwrap_or_else(|| wire.token.as_bytes().to_vec()),
            token: wire.token,
            logprob: wire.logprob,
            top_logprobs: wire
                .top_logprobs
                .into_iter()
                .map(|top| TopLogprob {
                    bytes: top.bytes.unwrap_or_else(|| top.token.as_bytes().to_vec()),
                    token: top.token,
                    logprob: top.logprob,
                })
                .collect(),
        }
    }
}

impl Choice {
    /// This choice's piece of the answer: the text of its `delta` (streamed) or
    /// `message` (whole), its tokens' log-probabilities, its finish reason.
    /// The message's raw `tool_calls` come apart (pieces when streamed).
    fn into_piece(self) -> Result<(Piece, Option<serde_json::Value>), ProviderError> {
        let message = self.delta.or(self.message);
        let text = match message.as_ref().and_then(|m| m.content.as_ref()) {
            Some(content) => content_text(content)?,
            None => String::new(),
        };
        let calls = message.and_then(|m| m.tool_calls);
        let piece = Piece {
            index: self.index,
            text,
            logprobs: self
                .logprobs
                .and_then(|l| l.content)
                .unwrap_or_default()
                .into_iter()
                .map(TokenLogprob::from)
                .collect(),
            finish: self.finish_reason.as_deref().map(finish_reason),
            tool_calls: Vec::new(),
        };
        Ok((piece, calls))
    }
}

#[derive(Debug, Deserialize)]
struct Message {
    /// A string, or (Mistral's reasoning models) an array of typed chunks.
    content: Option<serde_json::Value>,
    /// Calls of the request's tools: whole in a message, in pieces in a delta.
    tool_calls: Option<serde_json::Value>,
}

/// The answer text of a message's `content`: a string as it is, or the `text` chunks of a
/// chunk array, in order. Mistral's reasoning models send `[{"type":"thinking",
/// "thinking":[…]}, {"type":"text","text":"…"}]`, streamed and whole
/// (<https://docs.mistral.ai/capabilities/reasoning/>); thinking and any other chunk kind
/// (references, images) are not the answer and are skipped. `null` is no text.
fn content_text(content: &serde_json::Value) -> Result<String, ProviderError> {
    use serde_json::Value;
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(chunks) => {
            let mut text = String::new();
            for chunk in chunks {
                match chunk {
                    // Some servers put plain strings in the array.
                    Value::String(piece) => text.push_str(piece),
                    Value::Object(fields) => {
                        if fields.get("type").and_then(Value::as_str) == Some("text")
                            && let Some(piece) = fields.get("text").and_then(Value::as_str)
                        {
                            text.push_str(piece);
                        }
                    }
                    _ => {
                        return Err(ProviderError::Malformed(
                            "a content chunk is neither an object nor a string".into(),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ProviderError::Malformed(
            "message content is neither a string nor an array of chunks".into(),
        )),
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(wire: WireUsage) -> Self {
        let cached = wire
            .prompt_tokens_details
            .map_or(0, |d| d.cached_tokens)
            .min(wire.prompt_tokens);
        Usage {
            prompt_tokens: wire.prompt_tokens,
            cached_tokens: cached,
            processed_tokens: wire.prompt_tokens - cached,
            completion_tokens: wire.completion_tokens,
        }
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" | "model_length" => FinishReason::Length,
        // OpenAI's (and Azure's) moderation stopped the reply.
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

/// A non-streamed completion of `n` choices as events.
fn whole_completion(
    body: &[u8],
    n: u32,
) -> Result<Vec<Result<StreamEvent, ProviderError>>, ProviderError> {
    let chunk: Chunk = serde_json::from_slice(body)
        .map_err(|e| ProviderError::Malformed(format!("completion is not valid JSON: {e}")))?;
    if chunk.choices.is_empty() {
        return Err(ProviderError::Malformed(
            "completion without choices".into(),
        ));
    }
    let mut reader = ChoiceReader::new(n);
    let mut events = Vec::new();
    for choice in chunk.choices {
        let (mut piece, calls) = choice.into_piece()?;
        if let Some(list) = calls {
            let mut pieces = tools::CallPieces::default();
            pieces.add(&list)?;
            piece.tool_calls = pieces.finish();
        }
        // A whole completion's choice has ended, said so or not.
        piece.finish.get_or_insert(FinishReason::Stop);
        events.extend(reader.piece(piece)?);
    }
    // The text may be empty: the chain reads a `Delta` as the answer having started.
    if !events.iter().any(|e| matches!(e, StreamEvent::Delta(_))) {
        events.insert(0, StreamEvent::Delta(String::new()));
    }
    events.extend(reader.done(chunk.usage.map(Usage::from).unwrap_or_default())?);
    Ok(events.into_iter().map(Ok).collect())
}

/// Reading state of one streamed completion.
struct Reading {
    data: BoxStream<'static, Result<String, ProviderError>>,
    choices: ChoiceReader,
    usage: Usage,
    /// Choices asked for.
    n: u32,
    /// Each choice's tool calls streamed so far, in pieces.
    calls: Vec<tools::CallPieces>,
}

impl Reading {
    /// The stream ended: each choice's calls not yet closed by a finish reason, then
    /// the end.
    fn end(&mut self) -> Vec<Result<StreamEvent, ProviderError>> {
        let mut events = Vec::new();
        for (index, calls) in self.calls.iter_mut().enumerate() {
            let tool_calls = calls.finish();
            if tool_calls.is_empty() {
                continue;
            }
            let piece = Piece {
                index: index as u32,
                tool_calls,
                ..Piece::default()
            };
            match self.choices.piece(piece) {
                Ok(more) => events.extend(more.into_iter().map(Ok)),
                Err(e) => return vec![Err(e)],
            }
        }
        events.extend(results(self.choices.done(self.usage)));
        events
    }

    /// The events of one streamed choice.
    fn choice(&mut self, choice: Choice) -> Result<Vec<StreamEvent>, ProviderError> {
        let (mut piece, calls) = choice.into_piece()?;
        let slot = if self.n <= 1 { 0 } else { piece.index as usize };
        if let Some(pieces) = self.calls.get_mut(slot) {
            if let Some(list) = calls {
                pieces.add(&list)?;
            }
            // The calls are whole when the choice finishes.
            if piece.finish.is_some() {
                piece.tool_calls = pieces.finish();
            }
        }
        self.choices.piece(piece)
    }
}

/// The events of a streamed completion of `n` choices, from its SSE `data` payloads.
fn events(data: BoxStream<'static, Result<String, ProviderError>>, n: u32) -> EventStream {
    let reading = Reading {
        data,
        choices: ChoiceReader::new(n),
        usage: Usage::default(),
        n,
        calls: (0..n.max(1))
            .map(|_| tools::CallPieces::default())
            .collect(),
    };
    stream::unfold(Some(reading), |reading| async move {
        let mut reading = reading?;
        loop {
            let payload = match reading.data.next().await {
                Some(Ok(payload)) => payload,
                Some(Err(e)) => return Some((vec![Err(e)], None)),
                // Some servers close without `[DONE]` after the finish reason; a stream
                // that ends before any finish reason was cut off.
                None if reading.choices.any_finished() => return Some((reading.end(), None)),
                None => {
                    return Some((
                        vec![Err(ProviderError::Cut("ended before [DONE]".into()))],
                        None,
                    ));
                }
            };
            if payload.trim() == "[DONE]" {
                return Some((reading.end(), None));
            }
            let chunk: Chunk = match serde_json::from_str(&payload) {
                Ok(chunk) => chunk,
                Err(e) => {
                    return Some((
                        vec![Err(ProviderError::Malformed(format!(
                            "stream chunk is not valid JSON: {e}"
                        )))],
                        None,
                    ));
                }
            };
            if let Some(error) = chunk.error {
                let message = error
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("error event")
                    .chars()
                    .take(200)
                    .collect::<String>();
                return Some((
                    vec![Err(ProviderError::Cut(format!(
                        "provider error: {message}"
                    )))],
                    None,
                ));
            }
            if let Some(usage) = chunk.usage.or(chunk.x_groq.and_then(|x| x.usage)) {
                reading.usage = usage.into();
            }
            let mut events = Vec::new();
            for choice in chunk.choices {
                match reading.choice(choice) {
                    Ok(more) => events.extend(more.into_iter().map(Ok)),
                    Err(e) => return Some((vec![Err(e)], None)),
                }
            }
            if !events.is_empty() {
                return Some((events, Some(reading)));
            }
        }
    })
    .flat_map(stream::iter)
    .boxed()
}

/// Events, or the one error.
pub(super) fn results(
    events: Result<Vec<StreamEvent>, ProviderError>,
) -> Vec<Result<StreamEvent, ProviderError>> {
    match events {
        Ok(events) => events.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, Completion, GenerateParams};
    use crate::config::CloudConfig;

    fn provider(flavor: OpenAiFlavor) -> OpenAiProvider {
        OpenAiProvider::new(
            flavor,
            reqwest::Client::new(),
            &CloudConfig {
                base_url: Url::parse("http://127.0.0.1:9/openai/v1/").unwrap(),
                api_key: Some(Secret::new("sk-secret")),
                key_required: true,
                model: "m".into(),
                timeout: std::time::Duration::from_secs(1),
            },
        )
    }

    fn request() -> ChatRequest {
        ChatRequest::new(
            vec![
                ChatMessage::system("Be brief."),
                ChatMessage::user("Hi"),
                ChatMessage::assistant("Hello"),
                ChatMessage::user("Capital of France?"),
            ],
            GenerateParams {
                seed: Some(7),
                stop: vec!["\n\n".into()],
                ..GenerateParams::default()
            },
        )
    }

    #[test]
    fn body_has_the_history_and_each_flavors_fields() {
        let groq = provider(OpenAiFlavor::Groq);
        assert_eq!(
            groq.endpoint.as_ref().unwrap().as_str(),
            "http://127.0.0.1:9/openai/v1/chat/completions"
        );
        let body = groq.body(&request());
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            body["messages"][3],
            json!({"role": "user", "content": "Capital of France?"})
        );
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["seed"], json!(7));
        assert_eq!(body["stop"], json!(["\n\n"]));
        assert_eq!(body["stream_options"]["include_usage"], json!(true));
        assert!(
            body.get("prompt_cache_key").is_none(),
            "no conversation, no key"
        );
        let key = crate::chat::AffinityKey::of("telegram:42", 1);
        let keyed = groq.body(&request().with_affinity(key));
        assert_eq!(keyed["prompt_cache_key"], json!(key.hex()));
        assert!(!keyed.to_string().contains("telegram:42"));
        let mistral = provider(OpenAiFlavor::Mistral).body(&request().with_affinity(key));
        assert!(mistral.get("prompt_cache_key").is_none());
        assert_eq!(mistral["random_seed"], json!(7));
        assert!(mistral.get("seed").is_none() && mistral.get("stream_options").is_none());
        assert!(!format!("{groq:?}").contains("sk-secret"));
    }

    async fn run(payloads: &[&str]) -> Vec<Result<StreamEvent, ProviderError>> {
        let data = stream::iter(
            payloads
                .iter()
                .map(|p| Ok(p.to_string()))
                .collect::<Vec<_>>(),
        )
        .boxed();
        events(data, 1).collect().await
    }

    #[tokio::test]
    async fn streamed_tool_call_pieces_become_whole_calls_before_done() {
        let events = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ])
        .await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[0],
            Ok(StreamEvent::ToolCall(crate::chat::ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{\"a\":1}".into()
            }))
        );
        assert!(matches!(events[1], Ok(StreamEvent::Done(_))));
        // A server that ignored `stream` sends the calls whole in the message.
        let whole = whole_completion(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_2","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
            1,
        )
        .unwrap();
        assert!(
            whole
                .iter()
                .any(|e| matches!(e, Ok(StreamEvent::ToolCall(c)) if c.id == "call_2")),
            "{whole:?}"
        );
    }

    #[tokio::test]
    async fn stream_chunks_become_deltas_then_done_with_usage() {
        let events = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Par"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"is."},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
            "[DONE]",
        ])
        .await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0], Ok(StreamEvent::Delta("Par".into())));
        let Ok(StreamEvent::Done(completion)) = &events[2] else {
            panic!("{events:?}")
        };
        assert_eq!(completion.usage.prompt_tokens, 12);
        assert_eq!(completion.usage.completion_tokens, 3);
    }

    #[tokio::test]
    async fn choices_stream_apart_with_their_logprobs() {
        let payloads = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}},{"index":1,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"Lo"},"logprobs":{"content":[{"token":"Lo","logprob":-0.5,"bytes":[76,111],"top_logprobs":[{"token":"Lo","logprob":-0.5,"bytes":null}]}],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Pa"},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            "[DONE]",
        ];
        let data = stream::iter(payloads.map(|p| Ok(p.to_string())).to_vec()).boxed();
        let events: Vec<_> = events(data, 2)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(events[0], StreamEvent::Choice(1));
        let StreamEvent::Logprobs(tokens) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(tokens[0].bytes, b"Lo");
        assert_eq!(
            tokens[0].top_logprobs[0].bytes, b"Lo",
            "null bytes: the token's"
        );
        assert_eq!(
            events[2..],
            [
                StreamEvent::Delta("Lo".into()),
                StreamEvent::Choice(0),
                StreamEvent::Delta("Pa".into()),
                StreamEvent::ChoiceEnd(FinishReason::Stop),
                StreamEvent::Choice(1),
                StreamEvent::ChoiceEnd(FinishReason::Length),
                events[8].clone(),
            ]
        );
        assert!(matches!(&events[8], StreamEvent::Done(c) if c.usage.completion_tokens == 3));
        // An index beyond what was asked for is malformed.
        let data = stream::iter(vec![Ok(
            r#"{"choices":[{"index":2,"delta":{"content":"x"}}]}"#.to_string(),
        )])
        .boxed();
        let bad: Vec<_> = super::events(data, 2).collect().await;
        assert!(matches!(bad[0], Err(ProviderError::Malformed(_))));
    }

    #[tokio::test]
    async fn a_cut_or_garbled_stream_is_an_error() {
        let cut = run(&[r#"{"choices":[{"delta":{"content":"Par"}}]}"#]).await;
        assert!(
            matches!(cut.last(), Some(Err(ProviderError::Cut(_)))),
            "{cut:?}"
        );
        let garbage = run(&["{not json"]).await;
        assert!(matches!(garbage[0], Err(ProviderError::Malformed(_))));
        let error = run(&[r#"{"error":{"message":"overloaded"}}"#]).await;
        assert!(matches!(error[0], Err(ProviderError::Cut(_))));
    }

    #[test]
    fn whole_completions_are_accepted() {
        let events = whole_completion(
            br#"{"choices":[{"message":{"role":"assistant","content":"Hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
            1,
        )
        .unwrap();
        assert_eq!(events[0], Ok(StreamEvent::Delta("Hi".into())));
        assert!(matches!(
            &events[1],
            Ok(StreamEvent::Done(Completion {
                finish_reason: FinishReason::Length,
                ..
            }))
        ));
        assert!(whole_completion(b"<html>", 1).is_err());
    }

    #[test]
    fn reasoning_models_are_told_apart_by_name() {
        for model in [
            "o1",
            "o3-mini",
            "o4-mini-2025-04-16",
            "gpt-5",
            "gpt-5.6-luna",
            "gpt-6-luna",
            "openai/gpt-oss-120b",
            "GPT-5-mini",
        ] {
            assert!(is_reasoning_model(model), "{model}");
        }
        for model in [
            "gpt-4o-mini",
            "gpt-4.1",
            "omni-x",
            "o",
            "mistral-small-latest",
            "llama-3.1-8b-instant",
            "ö1",
            "",
        ] {
            assert!(!is_reasoning_model(model), "{model}");
        }
    }

    #[test]
    fn the_token_field_follows_the_api() {
        let url = |u: &str| Url::parse(u).unwrap();
        let openai = url("https://api.openai.com/v1");
        let fleet = url("http://10.0.0.5:8080/v1");
        assert_eq!(
            token_field(OpenAiFlavor::Generic, &openai, "gpt-4o-mini"),
            TokenField::MaxCompletionTokens
        );
        assert_eq!(
            token_field(OpenAiFlavor::Generic, &fleet, "mistral-7b"),
            TokenField::MaxTokens
        );
        assert_eq!(
            token_field(OpenAiFlavor::Generic, &fleet, "o3-mini"),
            TokenField::MaxCompletionTokens
        );
        assert_eq!(
            token_field(OpenAiFlavor::Groq, &fleet, "x"),
            TokenField::MaxCompletionTokens
        );
        assert_eq!(
            token_field(OpenAiFlavor::Mistral, &openai, "x"),
            TokenField::MaxTokens
        );
    }

    #[tokio::test]
    async fn mistral_chunk_arrays_stream_only_their_text() {
        let events = run(&[
            r#"{"choices":[{"index":0,"delta":{"content":[{"type":"thinking","thinking":[{"type":"text","text":"hmm"}]}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"Par"},{"type":"reference","reference_ids":[1]}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"is."},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ])
        .await;
        assert_eq!(events[0], Ok(StreamEvent::Delta("Par".into())));
        assert_eq!(events[1], Ok(StreamEvent::Delta("is.".into())));
        let whole = whole_completion(
            br#"{"choices":[{"message":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"x"}]},{"type":"text","text":"Hi"}]},"finish_reason":"stop"}]}"#,
            1,
        )
        .unwrap();
        assert_eq!(whole[0], Ok(StreamEvent::Delta("Hi".into())));
        let bad = run(&[r#"{"choices":[{"delta":{"content":42}}]}"#]).await;
        assert!(
            matches!(bad[0], Err(ProviderError::Malformed(_))),
            "{bad:?}"
        );
    }

    fn chunk_strategy() -> impl proptest::strategy::Strategy<Value = (bool, String)> {
        use proptest::prelude::*;
        (any::<bool>(), "\\PC{0,12}")
    }

    proptest::proptest! {
        /// Whatever the mix of text and thinking chunks, the text is the text chunks in
        /// order, and no thought leaks.
        #[test]
        fn chunk_arrays_give_exactly_their_text(chunks in proptest::collection::vec(chunk_strategy(), 0..12)) {
            let value = serde_json::Value::Array(chunks.iter().map(|(is_text, s)| if *is_text {
                json!({"type": "text", "text": s})
            } else {
                json!({"type": "thinking", "thinking": [{"type": "text", "text": format!("THOUGHT{s}")}]})
            }).collect());
            let expected: String = chunks.iter().filter(|(t, _)| *t).map(|(_, s)| s.as_str()).collect();
            proptest::prop_assert_eq!(content_text(&value).unwrap(), expected);
        }

        /// Any JSON value is text or a clean error, never a panic.
        #[test]
        fn any_content_value_is_text_or_an_error(raw in "\\PC{0,64}") {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&raw) {
                let _ = content_text(&value);
            }
        }
    }
}
