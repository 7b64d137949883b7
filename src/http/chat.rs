//! `POST /v1/chat/completions`: validate, ask the chain, answer as one JSON completion or
//! as SSE chunks ending with `data: [DONE]`. The provider that answered is named in the
//! `x-mistral-bot-provider` header and the `provider` field.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream;
use serde_json::{Value, json};

use super::api;
use super::choices::{Collected, Tracker};
use super::error::ApiError;
use super::params::ResponseOptions;
use super::state::AppState;
use super::tools;
use crate::chat::{Completion, FinishReason, StreamEvent, TokenLogprob, Usage};
use crate::i18n::Lang;

/// The response header naming the provider that answered.
pub const PROVIDER_HEADER: HeaderName = HeaderName::from_static("x-mistral-bot-provider");

/// What every chunk of one completion repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    provider: &'static str,
    /// OpenAI's `system_fingerprint`: which build served which model.
    fingerprint: String,
    /// Whether the client asked for log-probabilities.
    logprobs: bool,
    /// Choices asked for (`n`).
    n: u32,
    /// How to shape the response.
    options: ResponseOptions,
}

/// The `system_fingerprint` of this build serving `model_id`: it changes exactly when
/// the version or the model does, which is what OpenAI says it tracks.
fn fingerprint(model_id: &str) -> String {
    let hash =
        xxhash_rust::xxh3::xxh3_64(format!("{}\0{model_id}", env!("CARGO_PKG_VERSION")).as_bytes());
    format!("fp_{:012x}", hash & 0xffff_ffff_ffff)
}

/// OpenAI's `logprobs` object of a choice.
fn logprobs_json(meta: &Meta, tokens: &[TokenLogprob]) -> Value {
    if meta.logprobs {
        json!({"content": tokens, "refusal": null})
    } else {
        Value::Null
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// The finish reason of a choice that called tools (`has_calls`) or not: `tool_calls`
/// when the model stopped after calls.
fn finish_reason_with(reason: FinishReason, has_calls: bool) -> &'static str {
    match reason {
        FinishReason::Stop if has_calls => "tool_calls",
        other => finish_reason(other),
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

/// The reply's language: the first `Accept-Language` tag (English otherwise).
fn lang(headers: &HeaderMap) -> Lang {
    let first = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split([',', ';']).next())
        .map(str::trim);
    Lang::from_code(first)
}

/// The handler.
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: state.settings().body_limit,
            }
        } else {
            ApiError::UnreadableBody
        }
    })?;
    let api::ValidRequest {
        request,
        stream,
        options,
    } = api::parse(&body)?.validate(state.settings())?;
    let logprobs = request.params.logprobs.is_some();
    let n = request.params.n.max(1);
    let responder = state.responder().ok_or(ApiError::NotReady)?;
    let permit = state.try_admit().ok_or(ApiError::Busy)?;
    let session = super::session::session_of(&headers, &body);
    let reply = responder
        .reply_in_session(
            request.messages,
            request.params,
            lang(&headers),
            session.as_deref(),
        )
        .await?;
    let meta = Meta {
        id: state.next_completion_id(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: state.settings().model_id.clone(),
        provider: reply.provider,
        fingerprint: fingerprint(&state.settings().model_id),
        logprobs,
        n,
        options,
    };
    // Provider names are plain ASCII; a name that is not a valid header value (a provider
    // from outside this crate) is left out of the header, still in the body.
    let provider = HeaderValue::from_str(reply.provider).ok();
    let mut response = if stream {
        // The permit lives as long as the stream: it is released when the reply ends or
        // the client leaves.
        let events = reply
            .events
            .map(move |event| {
                let _held = &permit;
                event
            })
            .boxed();
        streamed(meta, events).into_response()
    } else {
        let response = whole(meta, reply.events).await.into_response();
        drop(permit);
        response
    };
    if let Some(provider) = provider {
        response.headers_mut().insert(PROVIDER_HEADER, provider);
    }
    Ok(response)
}

/// Collects the reply into one `chat.completion`.
async fn whole(
    meta: Meta,
    mut events: futures::stream::BoxStream<'static, StreamEvent>,
) -> Json<Value> {
    let mut collected = Collected::default();
    while let Some(event) = events.next().await {
        if collected.push(event) {
            break;
        }
    }
    let usage = collected.completion.map_or(Usage::default(), |c| c.usage);
    let choices: Vec<Value> = collected
        .choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            let mut message = json!({"role": "assistant", "content": choice.text, "refusal": null});
            if !choice.calls.is_empty() {
                // OpenAI: `content` is null when the answer is only calls.
                if choice.text.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = tools::calls_json(&choice.calls);
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": logprobs_json(&meta, &choice.logprobs),
                "finish_reason": finish_reason_with(
                    choice.finish.unwrap_or(FinishReason::Stop),
                    !choice.calls.is_empty(),
                ),
            })
        })
        .collect();
    Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "provider": meta.provider,
        "choices": choices,
        "usage": usage_json(&usage),
    }))
}

/// One `chat.completion.chunk` with one choice, `index`.
fn chunk(
    meta: &Meta,
    index: u32,
    delta: Value,
    logprobs: &[TokenLogprob],
    finish: Option<(&Completion, bool)>,
) -> Event {
    let mut chunk = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "provider": meta.provider,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": logprobs_json(meta, logprobs),
            "finish_reason": finish.map(|(c, calls)| finish_reason_with(c.finish_reason, calls)),
        }],
    });
    if meta.options.include_usage {
        // OpenAI: with `include_usage`, every chunk but the last has `"usage": null`.
        chunk["usage"] = Value::Null;
    } else if let Some((completion, _)) = finish.filter(|_| meta.n == 1) {
        // Without it, the usage rides on the finishing chunk, as llama-server sends it
        // (with several choices there is no one finishing chunk: OpenAI's way, none).
        chunk["usage"] = usage_json(&completion.usage);
    }
    Event::default().data(chunk.to_string())
}

/// The closing chunk `stream_options.include_usage` asks for: no choices, the usage.
fn usage_chunk(meta: &Meta, usage: &Usage) -> Event {
    let chunk = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "provider": meta.provider,
        "choices": [],
        "usage": usage_json(usage),
    });
    Event::default().data(chunk.to_string())
}

/// The reply as `chat.completion.chunk` events: the role first (of each choice), then one
/// per delta (carrying the log-probabilities of its tokens, when asked for), then each
/// choice's finish reason, then (with `include_usage`) the usage, then `[DONE]`.
fn streamed(
    meta: Meta,
    events: futures::stream::BoxStream<'static, StreamEvent>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    // The role chunk has no content yet: `null`, as llama-server sends it (OpenAI sends
    // ""; both parse). Clients that treat a present `content` as text, such as llama.cpp's
    // own server tests, expect no empty one.
    let first: Vec<Event> = (0..meta.n)
        .map(|index| {
            chunk(
                &meta,
                index,
                json!({"role": "assistant", "content": null}),
                &[],
                None,
            )
        })
        .collect();
    // Log-probabilities arrive before the text of their tokens: held until that text.
    let mut choices = Tracker::default();
    let body = events
        .map(move |event| match event {
            StreamEvent::Delta(text) if text.is_empty() => Vec::new(),
            StreamEvent::Delta(text) => {
                let logprobs = choices.take();
                let index = choices.current();
                vec![chunk(
                    &meta,
                    index,
                    json!({"content": text}),
                    &logprobs,
                    None,
                )]
            }
            StreamEvent::Logprobs(tokens) => {
                choices.hold(tokens);
                Vec::new()
            }
            StreamEvent::ToolCall(call) => {
                let logprobs = choices.take();
                let index = choices.current();
                let [named, arguments] = tools::call_deltas(choices.next_call(), &call);
                vec![
                    chunk(&meta, index, named, &logprobs, None),
                    chunk(&meta, index, arguments, &[], None),
                ]
            }
            StreamEvent::Choice(index) => {
                choices.switch(index);
                Vec::new()
            }
            StreamEvent::ChoiceEnd(reason) => {
                let logprobs = choices.take();
                let ended = Completion {
                    finish_reason: reason,
                    usage: Usage::default(),
                    timings: Default::default(),
                };
                let index = choices.current();
                let finish = Some((&ended, choices.called()));
                vec![chunk(&meta, index, json!({}), &logprobs, finish)]
            }
            StreamEvent::Done(completion) => {
                let mut out = Vec::with_capacity(2);
                if meta.n == 1 {
                    let logprobs = choices.take();
                    let finish = Some((&completion, choices.called()));
                    out.push(chunk(&meta, 0, json!({}), &logprobs, finish));
                }
                if meta.options.include_usage {
                    out.push(usage_chunk(&meta, &completion.usage));
                }
                out
            }
            StreamEvent::Started | StreamEvent::Prompt(_) => Vec::new(),
        })
        .flat_map(stream::iter);
    let all = stream::iter(first)
        .chain(body)
        .chain(stream::once(futures::future::ready(
            Event::default().data("[DONE]"),
        )))
        .map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_language_comes_from_accept_language() {
        let mut headers = HeaderMap::new();
        assert_eq!(lang(&headers), Lang::En);
        headers.insert(
            header::ACCEPT_LANGUAGE,
            HeaderValue::from_static("ru-RU,ru;q=0.9,en;q=0.8"),
        );
        assert_eq!(lang(&headers), Lang::Ru);
        headers.insert(
            header::ACCEPT_LANGUAGE,
            HeaderValue::from_static("de;q=0.9, ru"),
        );
        assert_eq!(lang(&headers), Lang::En, "the first tag decides");
    }

    #[test]
    fn finish_reasons_are_openai_names() {
        assert_eq!(finish_reason(FinishReason::Length), "length");
        assert_eq!(finish_reason(FinishReason::Cancelled), "stop");
        assert_eq!(finish_reason(FinishReason::ContentFilter), "content_filter");
    }
}
