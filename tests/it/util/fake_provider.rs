//! Fake cloud providers on loopback ports, speaking the real APIs: OpenAI-compatible chat
//! completions (Groq, Mistral, generic) with SSE `data: {…}` chunks and `data: [DONE]`, and
//! Gemini `streamGenerateContent?alt=sse`. Each serves a [`Behavior`] the test can change,
//! checks the API key like the real service, and records what it was sent.
//!
//! Like the real services they also list their models (`GET /v1/models`, Gemini
//! `GET /v1beta/models[/{model}]`), answer an unknown model with 404 (`model_not_found`,
//! Gemini `NOT_FOUND`), and reject `max_tokens` for a reasoning model ([`REASONING_MODEL`])
//! with OpenAI's 400 `unsupported_parameter`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::fake_telegram::SplitMix;

/// The key every fake accepts.
pub const FAKE_KEY: &str = "test-key-123";

/// The model every fake offers (what the tests configure).
pub const FAKE_MODEL: &str = "fake-model";

/// A reasoning model the fakes offer: like OpenAI's o-series it takes
/// `max_completion_tokens` and answers 400 to `max_tokens`.
pub const REASONING_MODEL: &str = "o9-fake";

/// Which API a fake speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// OpenAI-compatible chat completions under `/v1`.
    OpenAi,
    /// Gemini under `/v1beta`.
    Gemini,
}

/// What a fake does with the next requests.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Streams these pieces of text, then ends properly.
    Answer(Vec<String>),
    /// 429 with `Retry-After: secs` (Gemini: `retryDelay` in the body).
    RateLimited { retry_after_secs: u64 },
    /// 500 with the API's error body.
    ServerError,
    /// Accepts the connection and never answers.
    Hang,
    /// 200 with an SSE event whose data is not JSON.
    Garbage,
    /// Streams these pieces, then the connection breaks (no end marker).
    CutAfter(Vec<String>),
    /// Thinks first, then answers: Mistral's reasoning models stream `content` as arrays of
    /// chunks (`thinking`, then `text`); Gemini sends parts marked `thought: true`. The
    /// pieces are the answer; the thoughts are never part of it.
    Thinking {
        /// The thoughts.
        thoughts: Vec<String>,
        /// The answer.
        answer: Vec<String>,
    },
    /// Streams these pieces, then the provider's filter stops the reply (Gemini
    /// `finishReason: SAFETY` with no content; OpenAI `finish_reason: content_filter`).
    Filtered(Vec<String>),
    /// This status with this JSON body (an API's error for a bad request, say).
    Reject {
        /// The status code.
        status: u16,
        /// The body.
        body: Value,
    },
    /// The safety filter blocks the prompt: Gemini answers 200 with
    /// `promptFeedback.blockReason`; OpenAI-compatible APIs 400 `content_filter`.
    Blocked,
    /// This status with an error message quoting the key header as received (some
    /// services do).
    EchoKey(u16),
    /// Answers `Echo: <the last user message>`, a word a piece.
    Echo,
    /// Each request draws one of the faults at random from a seed, else echoes.
    Chaos(ProviderChaos),
    /// Calls tools (name, arguments), in the API's own form (OpenAI: streamed
    /// `delta.tool_calls`, arguments in pieces, `finish_reason: tool_calls`; Gemini:
    /// `functionCall` parts); to a request whose last message is a tool's result, answers
    /// these pieces of text instead.
    CallTools {
        /// The calls.
        calls: Vec<(String, Value)>,
        /// The answer after the results.
        answer: Vec<String>,
    },
}

/// Odds (per thousand) of each fault of [`Behavior::Chaos`]; the rest is [`Behavior::Echo`].
#[derive(Debug, Clone)]
pub struct ProviderChaos {
    /// The seed of the fault sequence.
    pub seed: u64,
    /// 429 with `Retry-After: 1`.
    pub rate_limited: u64,
    /// 500.
    pub server_error: u64,
    /// Never answers.
    pub hang: u64,
    /// Not JSON.
    pub garbage: u64,
    /// Half the echo, then the connection breaks.
    pub cut: u64,
}

/// The echo answer to `question`, in pieces.
pub fn echo_pieces(question: &str) -> Vec<String> {
    let mut pieces = vec!["Echo:".to_string()];
    pieces.extend(question.split_whitespace().map(|w| format!(" {w}")));
    pieces
}

impl Behavior {
    /// An answer in pieces.
    pub fn answer(pieces: &[&str]) -> Self {
        Behavior::Answer(pieces.iter().map(|s| s.to_string()).collect())
    }
}

/// One request a fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The path after the API prefix, e.g. `chat/completions`.
    pub path: String,
    /// `Authorization` or `x-goog-api-key`, as sent.
    pub key_header: Option<String>,
    /// The JSON body.
    pub body: Value,
}

struct FakeState {
    shape: Shape,
    key: String,
    behavior: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    /// The chaos generator, seeded when a [`Behavior::Chaos`] is set.
    rng: Mutex<SplitMix>,
    /// Faults served by [`Behavior::Chaos`], by kind.
    faults: Mutex<std::collections::BTreeMap<&'static str, usize>>,
    /// The models it offers.
    models: Mutex<Vec<String>>,
    /// A per-minute token limit, as Groq and OpenAI keep: (tokens left, the
    /// `x-ratelimit-reset-tokens` value). Every answer costs 14 tokens (its `usage`) and
    /// carries the `x-ratelimit-*` headers; with fewer left than that, 429.
    token_limit: Mutex<Option<(u64, String)>>,
}

/// A running fake provider.
#[derive(Clone)]
pub struct FakeProvider {
    /// The base URL to give the app (`http://127.0.0.1:port/v1` or `…/v1beta`).
    pub base_url: url::Url,
    state: Arc<FakeState>,
}

impl FakeProvider {
    /// Starts a fake of `shape` doing `behavior`, accepting [`FAKE_KEY`].
    pub async fn start(shape: Shape, behavior: Behavior) -> Self {
        Self::start_with_key(shape, behavior, FAKE_KEY).await
    }

    /// Starts a fake of `shape` doing `behavior`, accepting only `key`.
    pub async fn start_with_key(shape: Shape, behavior: Behavior, key: &str) -> Self {
        let state = Arc::new(FakeState {
            shape,
            rng: Mutex::new(SplitMix(match &behavior {
                Behavior::Chaos(chaos) => chaos.seed,
                _ => 0,
            })),
            key: key.to_string(),
            behavior: Mutex::new(behavior),
            requests: Mutex::default(),
            faults: Mutex::default(),
            models: Mutex::new(vec![FAKE_MODEL.into(), REASONING_MODEL.into()]),
            token_limit: Mutex::new(None),
        });
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/{*rest}", post(handle))
            .route("/v1beta/models", get(list_models))
            .route("/v1beta/models/{*rest}", post(handle).get(get_model))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let prefix = match shape {
            Shape::OpenAi => "v1",
            Shape::Gemini => "v1beta",
        };
        Self {
            base_url: format!("http://{addr}/{prefix}").parse().unwrap(),
            state,
        }
    }

    /// Changes what the next requests get.
    pub fn set(&self, behavior: Behavior) {
        if let Behavior::Chaos(chaos) = &behavior {
            *self.state.rng.lock().unwrap() = SplitMix(chaos.seed);
        }
        *self.state.behavior.lock().unwrap() = behavior;
    }

    /// Faults served by [`Behavior::Chaos`] so far, by kind.
    pub fn faults(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.state.faults.lock().unwrap().clone()
    }

    /// What it received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many requests it received.
    pub fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Puts it under a token limit with `tokens` left, resetting in `reset` (a Go-style
    /// duration, as Groq writes it: `7.66s`, `2m59.56s`).
    pub fn set_token_limit(&self, tokens: u64, reset: &str) {
        *self.state.token_limit.lock().unwrap() = Some((tokens, reset.to_string()));
    }

    /// Changes the models it offers (a model not offered gets 404, as when retired).
    pub fn set_models(&self, models: &[&str]) {
        *self.state.models.lock().unwrap() = models.iter().map(|m| m.to_string()).collect();
    }
}

/// The key header the fake's API uses, as sent.
fn key_of(shape: Shape, headers: &HeaderMap) -> Option<String> {
    match shape {
        Shape::OpenAi => headers.get(header::AUTHORIZATION),
        Shape::Gemini => headers.get("x-goog-api-key"),
    }
    .and_then(|v| v.to_str().ok())
    .map(str::to_string)
}

/// The real services' answer to a wrong key (OpenAI-style 401, Gemini's 400); `None` for
/// the right key.
fn refusal(shape: Shape, key: Option<&str>, expected: &str) -> Option<Response> {
    match shape {
        Shape::OpenAi if key == Some(&format!("Bearer {expected}")) => None,
        Shape::Gemini if key == Some(expected) => None,
        Shape::OpenAi => Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"message": "Invalid API Key",
                "type": "invalid_request_error", "code": "invalid_api_key"}})),
            )
                .into_response(),
        ),
        Shape::Gemini => Some(
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}})),
            )
                .into_response(),
        ),
    }
}

/// The real services' 404 for a model they do not (or no longer) serve.
fn model_not_found(shape: Shape, model: &str) -> Response {
    let body = match shape {
        Shape::OpenAi => json!({"error": {
            "message": format!("The model `{model}` does not exist or you do not have access to it."),
            "type": "invalid_request_error", "code": "model_not_found"}}),
        Shape::Gemini => json!({"error": {"code": 404,
            "message": format!("models/{model} is not found for API version v1beta, or is not supported for generateContent."),
            "status": "NOT_FOUND"}}),
    };
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// `GET /v1/models` (OpenAI's list) or `GET /v1beta/models` (Gemini's). A hanging fake
/// hangs here too.
async fn list_models(State(state): State<Arc<FakeState>>, headers: HeaderMap) -> Response {
    if matches!(*state.behavior.lock().unwrap(), Behavior::Hang) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(refused) = refusal(
        state.shape,
        key_of(state.shape, &headers).as_deref(),
        &state.key,
    ) {
        return refused;
    }
    let models = state.models.lock().unwrap().clone();
    let body = match state.shape {
        Shape::OpenAi => json!({"object": "list", "data": models.iter().map(|m| json!({
            "id": m, "object": "model", "created": 1, "owned_by": "fake"})).collect::<Vec<_>>()}),
        Shape::Gemini => json!({"models": models.iter().map(|m| json!({
            "name": format!("models/{m}"), "displayName": m,
            "supportedGenerationMethods": ["generateContent", "countTokens"]}))
            .collect::<Vec<_>>()}),
    };
    axum::Json(body).into_response()
}

/// Gemini's `GET /v1beta/models/{model}`.
async fn get_model(
    State(state): State<Arc<FakeState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(
        state.shape,
        key_of(state.shape, &headers).as_deref(),
        &state.key,
    ) {
        return refused;
    }
    if !state.models.lock().unwrap().contains(&model) {
        return model_not_found(state.shape, &model);
    }
    axum::Json(
        json!({"name": format!("models/{model}"), "displayName": model,
        "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
        "supportedGenerationMethods": ["generateContent", "countTokens"], "thinking": true}),
    )
    .into_response()
}

async fn handle(
    State(state): State<Arc<FakeState>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key_header = key_of(state.shape, &headers);
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Recorded {
        path: rest.clone(),
        key_header: key_header.clone(),
        body: json.clone(),
    });
    let model = match state.shape {
        Shape::OpenAi => {
            if rest != "chat/completions" {
                return StatusCode::NOT_FOUND.into_response();
            }
            json["model"].as_str().unwrap_or("").to_string()
        }
        Shape::Gemini => {
            let Some(model) = rest.strip_suffix(":streamGenerateContent") else {
                return StatusCode::NOT_FOUND.into_response();
            };
            if query.as_deref() != Some("alt=sse") {
                return StatusCode::NOT_FOUND.into_response();
            }
            model.to_string()
        }
    };
    if let Some(refused) = refusal(state.shape, key_header.as_deref(), &state.key) {
        return refused;
    }
    if !state.models.lock().unwrap().contains(&model) {
        return model_not_found(state.shape, &model);
    }
    if state.shape == Shape::Gemini
        && model.starts_with("gemini-3")
        && let Some(position) = unsigned_call(&json)
    {
        // Gemini 3+: a call in the history must carry the signature it came with.
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                "message": format!("Function call is missing a thought_signature in functionCall parts. \
                    This is required for tools to work correctly. Additional data, position {position}.")}})),
        )
            .into_response();
    }
    if state.shape == Shape::OpenAi && model == REASONING_MODEL {
        // OpenAI's answer to `max_tokens` (or a non-default temperature) on o1/o3/gpt-5.
        let unsupported = |param: &str, message: String| {
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": message,
                    "type": "invalid_request_error", "param": param,
                    "code": "unsupported_parameter"}})),
            )
                .into_response()
        };
        if json.get("max_tokens").is_some() {
            return unsupported(
                "max_tokens",
                "Unsupported parameter: 'max_tokens' is not supported with this model. \
                 Use 'max_completion_tokens' instead."
                    .into(),
            );
        }
        if let Some(t) = json
            .get("temperature")
            .and_then(Value::as_f64)
            .filter(|t| *t != 1.0)
        {
            return unsupported(
                "temperature",
                format!(
                    "Unsupported value: 'temperature' does not support {t} with this model. Only the default (1) value is supported."
                ),
            );
        }
    }
    let behavior = state.behavior.lock().unwrap().clone();
    let question = last_user_text(
        state.shape,
        &serde_json::from_slice(&body).unwrap_or(Value::Null),
    );
    let behavior = match behavior {
        Behavior::Echo => Behavior::Answer(echo_pieces(&question)),
        Behavior::CallTools { answer, .. } if answers_a_tool(state.shape, &json) => {
            Behavior::Answer(answer)
        }
        Behavior::Chaos(chaos) => {
            let roll = state.rng.lock().unwrap().below(1000);
            let mut bound = 0;
            let mut pick = None;
            for (odds, kind) in [
                (chaos.rate_limited, "rate_limited"),
                (chaos.server_error, "server_error"),
                (chaos.hang, "hang"),
                (chaos.garbage, "garbage"),
                (chaos.cut, "cut"),
            ] {
                bound += odds;
                if pick.is_none() && roll < bound {
                    pick = Some(kind);
                }
            }
            if let Some(kind) = pick {
                *state.faults.lock().unwrap().entry(kind).or_default() += 1;
            }
            let echo = echo_pieces(&question);
            match pick {
                Some("rate_limited") => Behavior::RateLimited {
                    retry_after_secs: 1,
                },
                Some("server_error") => Behavior::ServerError,
                Some("hang") => Behavior::Hang,
                Some("garbage") => Behavior::Garbage,
                Some(_) => Behavior::CutAfter(echo[..echo.len().div_ceil(2)].to_vec()),
                None => Behavior::Answer(echo),
            }
        }
        other => other,
    };
    if let Behavior::EchoKey(status) = behavior {
        let message = format!(
            "internal error while checking key {}",
            key_header.unwrap_or_default()
        );
        return (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(json!({"error": {"message": message, "type": "server_error"}})),
        )
            .into_response();
    }
    let limit = state.token_limit.lock().unwrap().clone();
    match limit {
        Some((left, reset))
            if state.shape == Shape::OpenAi && matches!(behavior, Behavior::Answer(_)) =>
        {
            /// What one answer's `usage` adds up to.
            const COST: u64 = 14;
            if left < COST {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [
                        (header::RETRY_AFTER, "7".to_string()),
                        (
                            header::HeaderName::from_static("x-ratelimit-remaining-tokens"),
                            left.to_string(),
                        ),
                    ],
                    axum::Json(
                        json!({"error": {"message": "Rate limit reached for tokens per minute",
                        "type": "tokens", "code": "rate_limit_exceeded"}}),
                    ),
                )
                    .into_response();
            }
            let left = left - COST;
            *state.token_limit.lock().unwrap() = Some((left, reset.clone()));
            let mut response = respond(state.shape, behavior, Asked::of(state.shape, &json)).await;
            let headers = response.headers_mut();
            headers.insert("x-ratelimit-remaining-tokens", left.into());
            headers.insert("x-ratelimit-limit-tokens", 6000.into());
            if let Ok(value) = reset.parse() {
                headers.insert("x-ratelimit-reset-tokens", value);
            }
            response
        }
        _ => respond(state.shape, behavior, Asked::of(state.shape, &json)).await,
    }
}

/// The position of the first model turn whose first `functionCall` part has no
/// `thoughtSignature` (what Gemini 3 refuses).
fn unsigned_call(body: &Value) -> Option<usize> {
    body["contents"].as_array()?.iter().position(|content| {
        content["role"] == "model"
            && content["parts"]
                .as_array()
                .and_then(|parts| parts.iter().find(|p| p.get("functionCall").is_some()))
                .is_some_and(|call| call.get("thoughtSignature").is_none())
    })
}

/// Whether the request's last message is a tool's result.
fn answers_a_tool(shape: Shape, body: &Value) -> bool {
    match shape {
        Shape::OpenAi => body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["role"] == "tool"),
        Shape::Gemini => body["contents"]
            .as_array()
            .and_then(|c| c.last())
            .is_some_and(|c| c["parts"][0].get("functionResponse").is_some()),
    }
}

/// The text of the last user message of a request body.
fn last_user_text(shape: Shape, body: &Value) -> String {
    let text = match shape {
        Shape::OpenAi => body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str()),
        Shape::Gemini => body["contents"]
            .as_array()
            .and_then(|c| c.iter().rev().find(|c| c["role"] == "user"))
            .and_then(|c| c["parts"][0]["text"].as_str()),
    };
    text.unwrap_or_default().to_string()
}

fn sse(events: Vec<String>) -> String {
    events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect()
}

fn openai_chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
        "model": "fake", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

fn gemini_chunk(text: &str, finish: Option<&str>) -> String {
    let mut chunk = json!({"candidates": [{"content": {"parts": [{"text": text}],
        "role": "model"}, "index": 0}], "modelVersion": "fake"});
    if let Some(reason) = finish {
        chunk["candidates"][0]["finishReason"] = json!(reason);
        chunk["usageMetadata"] =
            json!({"promptTokenCount": 11, "candidatesTokenCount": 3, "totalTokenCount": 14});
    }
    chunk.to_string()
}

/// The pieces as SSE events, without the end (for a cut stream).
fn pieces(shape: Shape, pieces: &[String]) -> Vec<String> {
    match shape {
        Shape::OpenAi => std::iter::once(openai_chunk(
            json!({"role": "assistant", "content": ""}),
            None,
        ))
        .chain(
            pieces
                .iter()
                .map(|p| openai_chunk(json!({"content": p}), None)),
        )
        .collect(),
        Shape::Gemini => pieces.iter().map(|p| gemini_chunk(p, None)).collect(),
    }
}

fn event_stream(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(body)
        .unwrap()
}

/// What a request asked for that shapes an answer, as the real APIs read it: several
/// choices (OpenAI `n`, Gemini `generationConfig.candidateCount`) and log-probabilities
/// (`logprobs` + `top_logprobs`; Gemini `responseLogprobs` + `logprobs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Asked {
    /// Choices beyond one.
    more_choices: usize,
    /// Alternatives per token, when log-probabilities are asked for.
    logprobs: Option<usize>,
}

impl Asked {
    fn of(shape: Shape, body: &Value) -> Self {
        let (n, on, top) = match shape {
            Shape::OpenAi => (&body["n"], &body["logprobs"], &body["top_logprobs"]),
            Shape::Gemini => {
                let config = &body["generationConfig"];
                (
                    &config["candidateCount"],
                    &config["responseLogprobs"],
                    &config["logprobs"],
                )
            }
        };
        Asked {
            more_choices: n.as_u64().unwrap_or(1).saturating_sub(1) as usize,
            logprobs: (on == true).then(|| top.as_u64().unwrap_or(0) as usize),
        }
    }
}

/// The pieces of every choice of an answer: choice 0 says `texts`, choice `i` the same
/// with ` #i` at the end.
fn choice_texts(texts: &[String], asked: Asked) -> Vec<Vec<String>> {
    (0..=asked.more_choices)
        .map(|i| {
            let mut pieces = texts.to_vec();
            if i > 0
                && let Some(last) = pieces.last_mut()
            {
                last.push_str(&format!(" #{i}"));
            }
            pieces
        })
        .collect()
}

/// A piece as one token with `top` alternatives (itself first), in each API's shape.
fn logprobs_of(shape: Shape, piece: &str, k: usize, top: usize) -> Value {
    let logprob = -0.25 * (k as f64 + 1.0);
    let alternatives: Vec<(String, f64)> = std::iter::once((piece.to_string(), logprob))
        .chain((1..top).map(|j| (format!("alt{j}"), logprob - j as f64)))
        .take(top)
        .collect();
    match shape {
        Shape::OpenAi => json!({"content": [{"token": piece, "logprob": logprob,
            "bytes": piece.as_bytes(),
            "top_logprobs": alternatives.iter().map(|(t, l)| json!({"token": t,
                "logprob": l, "bytes": t.as_bytes()})).collect::<Vec<_>>()}],
            "refusal": null}),
        Shape::Gemini => json!({
            "topCandidates": [{"candidates": alternatives.iter().map(|(t, l)| json!({
                "token": t, "tokenId": 7, "logProbability": l})).collect::<Vec<_>>()}],
            "chosenCandidates": [{"token": piece, "tokenId": 7, "logProbability": logprob}]}),
    }
}

/// An answer with several choices and/or log-probabilities: OpenAI streams one choice
/// per chunk (each with its `index`, its own `finish_reason`), Gemini every candidate in
/// each chunk (`candidates[].index`, `logprobsResult`).
fn rich_answer(shape: Shape, texts: &[String], asked: Asked) -> Vec<String> {
    let choices = choice_texts(texts, asked);
    let mut events = Vec::new();
    let with_logprobs = |mut entry: Value, piece: &str, k: usize, key: &str| {
        if let Some(top) = asked.logprobs {
            entry[key] = logprobs_of(shape, piece, k, top);
        }
        entry
    };
    let last = texts.len() - 1;
    match shape {
        Shape::OpenAi => {
            for k in 0..texts.len() {
                for (i, pieces) in choices.iter().enumerate() {
                    let choice = with_logprobs(
                        json!({"index": i, "delta": {"content": pieces[k]},
                            "finish_reason": (k == last).then_some("stop")}),
                        &pieces[k],
                        k,
                        "logprobs",
                    );
                    events.push(
                        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                            "created": 1, "model": "fake", "choices": [choice]})
                        .to_string(),
                    );
                }
            }
            events.push(
                json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                    "choices": [], "usage": {"prompt_tokens": 11,
                    "completion_tokens": 3 * choices.len(), "total_tokens": 11 + 3 * choices.len()}})
                .to_string(),
            );
            events.push("[DONE]".into());
        }
        Shape::Gemini => {
            for k in 0..texts.len() {
                let candidates: Vec<Value> = choices
                    .iter()
                    .enumerate()
                    .map(|(i, pieces)| {
                        let mut candidate = with_logprobs(
                            json!({"content": {"parts": [{"text": pieces[k]}], "role": "model"},
                                "index": i}),
                            &pieces[k],
                            k,
                            "logprobsResult",
                        );
                        if k == last {
                            candidate["finishReason"] = json!("STOP");
                        }
                        candidate
                    })
                    .collect();
                let mut chunk = json!({"candidates": candidates, "modelVersion": "fake"});
                if k == last {
                    chunk["usageMetadata"] = json!({"promptTokenCount": 11,
                        "candidatesTokenCount": 3 * choices.len()});
                }
                events.push(chunk.to_string());
            }
        }
    }
    events
}

async fn respond(shape: Shape, behavior: Behavior, asked: Asked) -> Response {
    match behavior {
        Behavior::Answer(texts) if asked != Asked::default() && !texts.is_empty() => {
            event_stream(Body::from(sse(rich_answer(shape, &texts, asked))))
        }
        Behavior::Answer(texts) => {
            let mut events = match shape {
                Shape::OpenAi => pieces(shape, &texts),
                Shape::Gemini => pieces(shape, &texts[..texts.len() - 1]),
            };
            match shape {
                Shape::OpenAi => {
                    events.push(openai_chunk(json!({}), Some("stop")));
                    events.push(
                        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                            "choices": [], "usage": {"prompt_tokens": 11,
                            "completion_tokens": 3, "total_tokens": 14}})
                        .to_string(),
                    );
                    events.push("[DONE]".into());
                }
                Shape::Gemini => events.push(gemini_chunk(&texts[texts.len() - 1], Some("STOP"))),
            }
            event_stream(Body::from(sse(events)))
        }
        Behavior::RateLimited { retry_after_secs } => match shape {
            Shape::OpenAi => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                axum::Json(json!({"error": {"message": "Rate limit reached",
                    "type": "tokens", "code": "rate_limit_exceeded"}})),
            )
                .into_response(),
            Shape::Gemini => (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(
                    json!({"error": {"code": 429, "message": "Resource exhausted",
                    "status": "RESOURCE_EXHAUSTED", "details": [{
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": format!("{retry_after_secs}s")}]}}),
                ),
            )
                .into_response(),
        },
        Behavior::ServerError => {
            let body = match shape {
                Shape::OpenAi => json!({"error": {"message": "Internal server error",
                    "type": "internal_server_error"}}),
                Shape::Gemini => json!({"error": {"code": 500,
                    "message": "An internal error has occurred.", "status": "INTERNAL"}}),
            };
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
        Behavior::Reject { status, body } => {
            (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
        }
        Behavior::Blocked => match shape {
            Shape::Gemini => event_stream(Body::from(sse(vec![
                json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
                    "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
                    "modelVersion": "fake"})
                .to_string(),
            ]))),
            Shape::OpenAi => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "The response was filtered due to the prompt triggering content management policy.",
                    "type": null, "param": "prompt", "code": "content_filter"}})),
            )
                .into_response(),
        },
        // Answered in `handle`, which knows the key.
        Behavior::EchoKey(status) => StatusCode::from_u16(status).unwrap().into_response(),
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Behavior::Garbage => event_stream(Body::from(
            "data: {\"choices\":[{\"delta\":{\"content\": oops\n\n",
        )),
        Behavior::Echo | Behavior::Chaos(_) => unreachable!("resolved per request"),
        Behavior::CallTools { calls, .. } => {
            let events: Vec<String> = match shape {
                Shape::OpenAi => {
                    let mut events = vec![openai_chunk(
                        json!({"role": "assistant", "content": null}),
                        None,
                    )];
                    for (i, (name, arguments)) in calls.iter().enumerate() {
                        events.push(openai_chunk(
                            json!({"tool_calls": [{"index": i, "id": format!("call_fake{i}"),
                                "type": "function", "function": {"name": name, "arguments": ""}}]}),
                            None,
                        ));
                        // The arguments in two pieces, split inside a string.
                        let text = arguments.to_string();
                        let cut = text.len() / 2;
                        let cut = (cut..text.len())
                            .find(|&c| text.is_char_boundary(c))
                            .unwrap_or(text.len());
                        for piece in [&text[..cut], &text[cut..]] {
                            events.push(openai_chunk(
                                json!({"tool_calls": [{"index": i,
                                    "function": {"arguments": piece}}]}),
                                None,
                            ));
                        }
                    }
                    events.push(openai_chunk(json!({}), Some("tool_calls")));
                    events.push("[DONE]".into());
                    events
                }
                Shape::Gemini => {
                    let parts: Vec<Value> = calls
                        .iter()
                        .map(|(name, args)| json!({"functionCall": {"name": name, "args": args}}))
                        .collect();
                    vec![json!({"candidates": [{"content": {"parts": parts, "role": "model"},
                        "finishReason": "STOP", "index": 0}],
                        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 3,
                        "totalTokenCount": 14}, "modelVersion": "fake"})
                    .to_string()]
                }
            };
            event_stream(Body::from(sse(events)))
        }
        Behavior::Thinking { thoughts, answer } => {
            let events: Vec<String> = match shape {
                // Mistral's chunk arrays, as magistral streams them.
                Shape::OpenAi => {
                    std::iter::once(openai_chunk(
                        json!({"role": "assistant", "content": ""}),
                        None,
                    ))
                    .chain(thoughts.iter().map(|t| {
                        openai_chunk(
                            json!({"content": [{"type": "thinking",
                            "thinking": [{"type": "text", "text": t}]}]}),
                            None,
                        )
                    }))
                    .chain(answer.iter().map(|a| {
                        openai_chunk(json!({"content": [{"type": "text", "text": a}]}), None)
                    }))
                    .chain([openai_chunk(json!({}), Some("stop")), "[DONE]".to_string()])
                    .collect()
                }
                Shape::Gemini => {
                    let thought = |t: &String| {
                        json!({"candidates": [{"content": {"parts": [{"text": t, "thought": true}],
                            "role": "model"}, "index": 0}]})
                        .to_string()
                    };
                    let mut events: Vec<String> = thoughts.iter().map(thought).collect();
                    events.extend(pieces(shape, &answer[..answer.len() - 1]));
                    events.push(gemini_chunk(&answer[answer.len() - 1], Some("STOP")));
                    events
                }
            };
            event_stream(Body::from(sse(events)))
        }
        Behavior::Filtered(texts) => {
            let mut events = pieces(shape, &texts);
            match shape {
                Shape::OpenAi => {
                    events.push(openai_chunk(json!({}), Some("content_filter")));
                    events.push("[DONE]".into());
                }
                Shape::Gemini => events.push(
                    json!({"candidates": [{"finishReason": "SAFETY", "index": 0,
                        "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                        "probability": "HIGH", "blocked": true}]}]})
                    .to_string(),
                ),
            }
            event_stream(Body::from(sse(events)))
        }
        Behavior::CutAfter(texts) => {
            let head = sse(pieces(shape, &texts));
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(head)),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "cut",
                )),
            ];
            // Let the client read the text before the connection breaks.
            let body = futures::stream::iter(chunks).then(|chunk| async move {
                if chunk.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                chunk
            });
            event_stream(Body::from_stream(body))
        }
    }
}
