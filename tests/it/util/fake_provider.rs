//! Fake cloud providers on loopback ports, speaking the real APIs: OpenAI-compatible chat
//! completions (Groq, Mistral, generic) with SSE `data: {…}` chunks and `data: [DONE]`, and
//! Gemini `streamGenerateContent?alt=sse`. Each serves a [`Behavior`] the test can change,
//! checks the API key like the real service, and records what it was sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::fake_telegram::SplitMix;

/// The key every fake accepts.
pub const FAKE_KEY: &str = "test-key-123";

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
        });
        let app = Router::new()
            .route("/v1/{*rest}", post(handle))
            .route("/v1beta/models/{*rest}", post(handle))
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
}

async fn handle(
    State(state): State<Arc<FakeState>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key_header = match state.shape {
        Shape::OpenAi => headers.get(header::AUTHORIZATION),
        Shape::Gemini => headers.get("x-goog-api-key"),
    }
    .and_then(|v| v.to_str().ok())
    .map(str::to_string);
    state.requests.lock().unwrap().push(Recorded {
        path: rest.clone(),
        key_header: key_header.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    match state.shape {
        Shape::OpenAi => {
            if rest != "chat/completions" {
                return StatusCode::NOT_FOUND.into_response();
            }
            if key_header.as_deref() != Some(&format!("Bearer {}", state.key)) {
                return (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": {"message": "Invalid API Key",
                        "type": "invalid_request_error", "code": "invalid_api_key"}})),
                )
                    .into_response();
            }
        }
        Shape::Gemini => {
            if !rest.ends_with(":streamGenerateContent") || query.as_deref() != Some("alt=sse") {
                return StatusCode::NOT_FOUND.into_response();
            }
            if key_header.as_deref() != Some(state.key.as_str()) {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": {"code": 400,
                        "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT"}})),
                )
                    .into_response();
            }
        }
    }
    let behavior = state.behavior.lock().unwrap().clone();
    let question = last_user_text(
        state.shape,
        &serde_json::from_slice(&body).unwrap_or(Value::Null),
    );
    let behavior = match behavior {
        Behavior::Echo => Behavior::Answer(echo_pieces(&question)),
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
    respond(state.shape, behavior).await
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

async fn respond(shape: Shape, behavior: Behavior) -> Response {
    match behavior {
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
