//! Google Gemini: `POST {base}/models/{model}:streamGenerateContent?alt=sse` with the key
//! in `x-goog-api-key`. The history becomes `contents` (roles `user` and `model`) and a
//! `systemInstruction`; each SSE event is a `GenerateContentResponse` whose
//! `candidates[0].content.parts[].text` is the next text. Gemini sends no `[DONE]`: the
//! stream ends after the chunk carrying `finishReason`.

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use reqwest::header;
use serde::Deserialize;
use serde_json::json;
use url::Url;

use super::choices::{ChoiceReader, Piece};
use super::cloud;
use super::convert::normalize;
use super::openai::{endpoint, results};
use super::{EventStream, Provider, ProviderError, RequestFault, passthrough, sse, tools};
use crate::chat::{ChatRequest, FinishReason, Role, TokenLogprob, TopLogprob, Usage};
use crate::config::{CloudConfig, ProviderKind, Secret};

/// A client of the Gemini API.
pub struct GeminiProvider {
    client: reqwest::Client,
    endpoint: Result<Url, String>,
    api_key: Option<Secret>,
    model: String,
}

/// How a model family is told how much to think. Thinking tokens count against
/// `maxOutputTokens`: a model left to its default thinking can spend a 1000-token budget on
/// thoughts and answer nothing (`finishReason: MAX_TOKENS`).
/// <https://ai.google.dev/gemini-api/docs/thinking>
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thinking {
    /// Gemini 2.x: `thinkingBudget`, a token count (0 turns thinking off where allowed).
    Budget(u32),
    /// Gemini 3 and later: `thinkingLevel`; `thinkingBudget` is legacy there and sending
    /// both is a 400.
    Level(&'static str),
    /// Not a Gemini model (e.g. Gemma on the same API): no thinking settings.
    None,
}

/// Room kept for thoughts on top of the reply's budget when the level, not a token count,
/// bounds them.
const THINKING_HEADROOM: u32 = 1024;

/// The thinking setting for `model`.
///
/// - `gemini-2.5-pro` cannot turn thinking off; 128 tokens is its smallest budget.
/// - `gemini-2.5-flash` and `-flash-lite` accept 0, which turns thinking off.
/// - Gemini 3+: `minimal` for Flash models (the lowest they accept), `low` for the others
///   (Pro accepts only `low` and `high`).
fn thinking(model: &str) -> Thinking {
    let model = model.to_ascii_lowercase();
    let model = model.rsplit('/').next().unwrap_or(&model);
    let Some(version) = model.strip_prefix("gemini-") else {
        return Thinking::None;
    };
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    match major.parse::<u32>() {
        Ok(0..=1) | Err(_) => Thinking::None,
        Ok(2) if model.contains("pro") => Thinking::Budget(128),
        Ok(2) if version.starts_with("2.5") => Thinking::Budget(0),
        // 2.0 models do not think.
        Ok(2) => Thinking::None,
        Ok(_) if model.contains("flash") => Thinking::Level("minimal"),
        Ok(_) => Thinking::Level("low"),
    }
}

/// Whether `model` still takes `temperature` and `topP`: Google deprecated the sampling
/// parameters for its Gemini 3.5+ models (changelog, 2026-07-21:
/// <https://ai.google.dev/gemini-api/docs/changelog>) and advises the default for Gemini 3.
fn takes_sampling(thinking: Thinking) -> bool {
    !matches!(thinking, Thinking::Level(_))
}

impl std::fmt::Debug for GeminiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiProvider")
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key)
            .finish()
    }
}

impl GeminiProvider {
    /// A client of the API `config` describes.
    pub fn new(client: reqwest::Client, config: &CloudConfig) -> Self {
        Self {
            client,
            endpoint: endpoint(
                &config.base_url,
                &format!("models/{}:streamGenerateContent?alt=sse", config.model),
            ),
            api_key: config.api_key.clone(),
            model: config.model.clone(),
        }
    }
}

/// The `generateContent` request body for `request` to `model`.
fn body(request: &ChatRequest, model: &str) -> serde_json::Value {
    let turns = normalize(&request.messages);
    let thinking = thinking(model);
    let mut contents: Vec<serde_json::Value> = Vec::with_capacity(turns.turns.len());
    let mut answering_calls = false;
    for turn in &turns.turns {
        if turn.role == Role::Tool {
            // Every result of one model turn's calls goes in one user turn.
            let name = turns
                .turns
                .iter()
                .flat_map(|t| &t.tool_calls)
                .find(|c| Some(&c.id) == turn.tool_call_id.as_ref())
                .map_or("", |c| c.name.as_str());
            let part = tools::gemini_response_part(name, &turn.text);
            match contents.last_mut() {
                Some(last) if answering_calls => {
                    if let Some(parts) = last["parts"].as_array_mut() {
                        parts.push(part);
                    }
                }
                _ => contents.push(json!({"role": "user", "parts": [part]})),
            }
            answering_calls = true;
            continue;
        }
        answering_calls = false;
        let role = match turn.role {
            Role::Assistant => "model",
            Role::User | Role::System | Role::Tool => "user",
        };
        let mut parts = Vec::new();
        if !turn.text.is_empty() {
            parts.push(json!({"text": turn.text}));
        }
        let first_call = parts.len();
        parts.extend(turn.tool_calls.iter().map(tools::gemini_call_part));
        // Gemini 3+ answers 400 "Function call is missing a thought_signature" to a call
        // in the history without the signature it was sent with; an OpenAI client keeps
        // none, so the call carries Google's documented stand-in for a signature from
        // elsewhere (https://ai.google.dev/gemini-api/docs/thought-signatures). Only the
        // first call of a turn has one, as Gemini sends them.
        if matches!(thinking, Thinking::Level(_))
            && let Some(part) = parts.get_mut(first_call)
        {
            part["thoughtSignature"] = json!(tools::GEMINI_STAND_IN_SIGNATURE);
        }
        contents.push(json!({"role": role, "parts": parts}));
    }
    let params = &request.params;
    let mut config = match thinking {
        Thinking::Budget(budget) => json!({
            "maxOutputTokens": params.max_tokens.saturating_add(budget),
            "thinkingConfig": {"thinkingBudget": budget},
        }),
        Thinking::Level(level) => json!({
            "maxOutputTokens": params.max_tokens.saturating_add(THINKING_HEADROOM),
            "thinkingConfig": {"thinkingLevel": level},
        }),
        Thinking::None => json!({"maxOutputTokens": params.max_tokens}),
    };
    if takes_sampling(thinking) {
        config["temperature"] = json!(params.temperature);
        config["topP"] = json!(params.top_p);
    }
    if let Some(seed) = params.seed {
        config["seed"] = json!(seed);
    }
    if !params.stop.is_empty() {
        config["stopSequences"] = json!(params.stop);
    }
    // Refusals were checked in `stream`: here only the fields.
    for (key, value) in passthrough::gemini_fields(params).unwrap_or_default() {
        config[key] = value;
    }
    let mut body = json!({"contents": contents, "generationConfig": config});
    if let Some(offered) = &params.tools
        && let Ok((declarations, tool_config)) = tools::gemini_fields(offered)
    {
        body["tools"] = declarations;
        body["toolConfig"] = tool_config;
    }
    if let Some(system) = turns.system {
        body["systemInstruction"] = json!({"parts": [{"text": system}]});
    }
    body
}

impl Provider for GeminiProvider {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let key = self.api_key.as_ref().ok_or(ProviderError::MissingKey)?;
            passthrough::gemini_fields(&request.params)?;
            if let Some(offered) = &request.params.tools {
                tools::gemini_fields(offered)?;
            }
            let endpoint = self.endpoint.clone().map_err(ProviderError::Connect)?;
            let http = self
                .client
                .post(endpoint)
                .header("x-goog-api-key", key.expose())
                .header(header::ACCEPT, "text/event-stream")
                .json(&body(&request, &self.model));
            let response = cloud::send(http).await.map_err(|e| match e {
                // `models/x is not found for API version v1beta`: a retired or misspelt model.
                ProviderError::Status { status: 404, .. } => ProviderError::ModelNotFound {
                    model: self.model.clone(),
                    flag: ProviderKind::Gemini.model_flag(),
                },
                other => other,
            })?;
            let parallel = request.params.tools.as_ref().is_none_or(|t| t.parallel);
            Ok(events(
                sse::data_stream(response.bytes_stream()),
                request.params.n,
                parallel,
            ))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
    /// Which candidate (`candidateCount` > 1); 0 when left out.
    #[serde(default)]
    index: u32,
    /// With `responseLogprobs`: the chosen token and the top alternatives of each step.
    logprobs_result: Option<LogprobsResult>,
}

/// <https://ai.google.dev/api/generate-content#LogprobsResult>
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogprobsResult {
    /// One per decoding step.
    #[serde(default)]
    top_candidates: Vec<TopCandidates>,
    /// One per decoding step.
    #[serde(default)]
    chosen_candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Default, Deserialize)]
struct TopCandidates {
    /// Most likely first.
    #[serde(default)]
    candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogprobCandidate {
    #[serde(default)]
    token: String,
    #[serde(default)]
    log_probability: f32,
}

impl LogprobsResult {
    /// OpenAI's shape: each chosen token with the alternatives of its step (Gemini's
    /// token strings; their UTF-8 as `bytes`).
    fn into_openai(self) -> Vec<TokenLogprob> {
        let mut tops = self.top_candidates.into_iter();
        self.chosen_candidates
            .into_iter()
            .map(|chosen| TokenLogprob {
                bytes: chosen.token.as_bytes().to_vec(),
                token: chosen.token,
                logprob: chosen.log_probability,
                top_logprobs: tops
                    .next()
                    .map(|top| top.candidates)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|alt| TopLogprob {
                        bytes: alt.token.as_bytes().to_vec(),
                        token: alt.token,
                        logprob: alt.log_probability,
                    })
                    .collect(),
            })
            .collect()
    }
}

impl Candidate {
    /// This candidate's piece of the answer (thoughts left out), its function calls as
    /// tool calls.
    fn into_piece(self) -> Result<Piece, ProviderError> {
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        for part in self.content.iter().flat_map(|c| &c.parts) {
            if let (Some(t), false) = (&part.text, part.thought) {
                text.push_str(t);
            }
            if let Some(call) = &part.function_call {
                tool_calls.push(tools::gemini_call(call)?);
            }
        }
        Ok(Piece {
            index: self.index,
            text,
            logprobs: self
                .logprobs_result
                .map(LogprobsResult::into_openai)
                .unwrap_or_default(),
            finish: self.finish_reason.as_deref().map(finish_reason),
            tool_calls,
        })
    }
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// Thinking models mark their thoughts; those are not the answer.
    #[serde(default)]
    thought: bool,
    /// A call of one of the request's tools: `{"name", "args", "id"?}`.
    function_call: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u32,
    #[serde(default)]
    candidates_token_count: u32,
    #[serde(default)]
    cached_content_token_count: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

/// A candidate's `finishReason` as ours. The filters' reasons end the reply with a notice
/// rather than looking like a normal end
/// (<https://ai.google.dev/api/generate-content#FinishReason>).
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

struct Reading {
    data: BoxStream<'static, Result<String, ProviderError>>,
    choices: ChoiceReader,
    usage: Usage,
    /// Tool calls passed on so far, per candidate.
    calls: Vec<usize>,
}

/// The events of a streamed `generateContent` of `n` candidates, from its SSE `data`
/// payloads; without `parallel` tool calls, only the first call of each candidate is kept.
fn events(
    data: BoxStream<'static, Result<String, ProviderError>>,
    n: u32,
    parallel: bool,
) -> EventStream {
    let reading = Reading {
        data,
        choices: ChoiceReader::new(n),
        usage: Usage::default(),
        calls: vec![0; n.max(1) as usize],
    };
    stream::unfold(Some(reading), move |reading| async move {
        let mut reading = reading?;
        loop {
            let payload = match reading.data.next().await {
                Some(Ok(payload)) => payload,
                Some(Err(e)) => return Some((vec![Err(e)], None)),
                None if reading.choices.any_finished() => {
                    return Some((results(reading.choices.done(reading.usage)), None));
                }
                None => {
                    return Some((
                        vec![Err(ProviderError::Cut(
                            "ended before a finishReason".into(),
                        ))],
                        None,
                    ));
                }
            };
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
                    .unwrap_or("error event");
                let message: String = message.chars().take(200).collect();
                return Some((
                    vec![Err(ProviderError::Cut(format!(
                        "provider error: {message}"
                    )))],
                    None,
                ));
            }
            if let Some(reason) = chunk.prompt_feedback.and_then(|f| f.block_reason) {
                return Some((
                    vec![Err(ProviderError::Refused {
                        kind: RequestFault::ContentBlocked,
                        detail: format!("prompt blocked: {reason}"),
                    })],
                    None,
                ));
            }
            if let Some(usage) = chunk.usage_metadata {
                let cached = usage
                    .cached_content_token_count
                    .min(usage.prompt_token_count);
                reading.usage = Usage {
                    prompt_tokens: usage.prompt_token_count,
                    cached_tokens: cached,
                    processed_tokens: usage.prompt_token_count - cached,
                    completion_tokens: usage.candidates_token_count,
                };
            }
            let mut events = Vec::new();
            for candidate in chunk.candidates {
                let piece = candidate.into_piece().map(|mut piece| {
                    let slot = if n <= 1 { 0 } else { piece.index as usize };
                    if let Some(calls) = reading.calls.get_mut(slot) {
                        if !parallel {
                            piece.tool_calls.truncate(usize::from(*calls == 0));
                        }
                        *calls += piece.tool_calls.len();
                    }
                    piece
                });
                match piece.and_then(|piece| reading.choices.piece(piece)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, GenerateParams, StreamEvent};

    #[test]
    fn history_becomes_contents_and_system_instruction() {
        let request = ChatRequest::new(
            vec![
                ChatMessage::system("Be brief."),
                ChatMessage::user("Hi"),
                ChatMessage::assistant("Hello"),
                ChatMessage::user("Capital of France?"),
            ],
            GenerateParams {
                max_tokens: 64,
                ..GenerateParams::default()
            },
        );
        let body = body(&request, "gemini-2.0-flash");
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}]})
        );
        assert_eq!(
            body["contents"][1],
            json!({"role": "model", "parts": [{"text": "Hello"}]})
        );
        assert_eq!(body["contents"][2]["role"], json!("user"));
        assert_eq!(body["generationConfig"]["maxOutputTokens"], json!(64));
    }

    #[test]
    fn calls_and_results_become_parts_with_a_signature_for_gemini_3() {
        use crate::chat::ToolCall;
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: "{\"a\": 1}".into(),
        };
        let request = ChatRequest::new(
            vec![
                ChatMessage::user("q"),
                ChatMessage::tool_calls("", vec![call("c1"), call("c2")]),
                ChatMessage::tool_result("c1", "1"),
                ChatMessage::tool_result("c2", "{\"b\": 2}"),
            ],
            GenerateParams::default(),
        );
        let body3 = body(&request, "gemini-3.5-flash-lite");
        let contents = body3["contents"].as_array().unwrap();
        assert_eq!(
            contents.len(),
            3,
            "both results in one user turn: {contents:?}"
        );
        assert_eq!(
            contents[1]["parts"][0],
            json!({"functionCall": {"name": "f", "args": {"a": 1}},
                   "thoughtSignature": "skip_thought_signature_validator"})
        );
        assert!(contents[1]["parts"][1].get("thoughtSignature").is_none());
        assert_eq!(
            contents[2]["parts"],
            json!([{"functionResponse": {"name": "f", "response": {"content": 1}}},
                   {"functionResponse": {"name": "f", "response": {"b": 2}}}])
        );
        let body2 = body(&request, "gemini-2.5-flash");
        assert!(
            body2["contents"][1]["parts"][0]
                .get("thoughtSignature")
                .is_none()
        );
    }

    #[tokio::test]
    async fn function_calls_become_tool_calls_and_parallel_false_keeps_the_first() {
        let payload = r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"a":1}},"thoughtSignature":"sig"},{"functionCall":{"name":"g","args":{}}}],"role":"model"},"finishReason":"STOP","index":0}]}"#;
        let data = || stream::iter([Ok(payload.to_string())]).boxed();
        let all: Vec<_> = events(data(), 1, true).collect().await;
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(
            matches!(&all[0], Ok(StreamEvent::ToolCall(c)) if c.name == "f" && c.arguments == "{\"a\":1}")
        );
        assert!(matches!(&all[1], Ok(StreamEvent::ToolCall(c)) if c.name == "g"));
        let first: Vec<_> = events(data(), 1, false).collect().await;
        assert_eq!(first.len(), 2, "{first:?}");
    }

    #[test]
    fn endpoint_and_debug() {
        let provider = GeminiProvider::new(
            reqwest::Client::new(),
            &CloudConfig {
                base_url: Url::parse("https://generativelanguage.googleapis.com/v1beta").unwrap(),
                api_key: Some(Secret::new("AIza-secret")),
                key_required: true,
                model: "gemini-3.5-flash-lite".into(),
                timeout: std::time::Duration::from_secs(1),
            },
        );
        assert_eq!(
            provider.endpoint.as_ref().unwrap().as_str(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-3.5-flash-lite:streamGenerateContent?alt=sse"
        );
        assert!(!format!("{provider:?}").contains("AIza-secret"));
    }

    async fn run(payloads: &[&str]) -> Vec<Result<StreamEvent, ProviderError>> {
        let data = stream::iter(
            payloads
                .iter()
                .map(|p| Ok(p.to_string()))
                .collect::<Vec<_>>(),
        )
        .boxed();
        events(data, 1, true).collect().await
    }

    #[tokio::test]
    async fn candidates_become_choices_with_openais_logprobs() {
        let lp = r#""logprobsResult":{"topCandidates":[{"candidates":[{"token":"Pa","tokenId":5,"logProbability":-0.1},{"token":"Lo","tokenId":6,"logProbability":-2.5}]}],"chosenCandidates":[{"token":"Pa","tokenId":5,"logProbability":-0.1}]}"#;
        let first = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"Pa"}}],"role":"model"}},"index":0,{lp}}},{{"content":{{"parts":[{{"text":"Lo"}}],"role":"model"}},"index":1}}]}}"#
        );
        let data = stream::iter(
            [
                first.as_str(),
                r#"{"candidates":[{"content":{"parts":[{"text":"ris"}]},"finishReason":"STOP","index":0},{"content":{"parts":[{"text":"ndon"}]},"finishReason":"MAX_TOKENS","index":1}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":4}}"#,
            ]
            .map(|p| Ok(p.to_string()))
            .to_vec(),
        )
        .boxed();
        let events: Vec<_> = events(data, 2, true)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let StreamEvent::Logprobs(tokens) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(tokens[0].token, "Pa");
        assert_eq!(tokens[0].bytes, b"Pa");
        assert_eq!(tokens[0].top_logprobs[1].token, "Lo");
        assert_eq!(tokens[0].top_logprobs[1].logprob, -2.5);
        assert_eq!(
            events[1..4],
            [
                StreamEvent::Delta("Pa".into()),
                StreamEvent::Choice(1),
                StreamEvent::Delta("Lo".into()),
            ]
        );
        assert!(events.contains(&StreamEvent::ChoiceEnd(FinishReason::Length)));
        let Some(StreamEvent::Done(done)) = events.last() else {
            panic!("{events:?}")
        };
        assert_eq!(done.usage.completion_tokens, 4);
        // A candidate that never comes is not a silent drop to fewer choices.
        let one = stream::iter(vec![Ok(
            r#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP","index":0}]}"#
                .to_string(),
        )])
        .boxed();
        let bad: Vec<_> = super::events(one, 2, true).collect().await;
        assert!(matches!(bad.last(), Some(Err(ProviderError::Malformed(_)))));
    }

    #[tokio::test]
    async fn chunks_become_deltas_and_done() {
        let events = run(&[
            r#"{"candidates":[{"content":{"parts":[{"text":"Par"}],"role":"model"},"index":0}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"is."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":2,"totalTokenCount":11}}"#,
        ])
        .await;
        assert_eq!(events[0], Ok(StreamEvent::Delta("Par".into())));
        let Ok(StreamEvent::Done(completion)) = &events[2] else {
            panic!("{events:?}")
        };
        assert_eq!(completion.usage.completion_tokens, 2);
        let cut = run(&[r#"{"candidates":[{"content":{"parts":[{"text":"Par"}]}}]}"#]).await;
        assert!(matches!(cut.last(), Some(Err(ProviderError::Cut(_)))));
    }

    #[test]
    fn each_model_family_gets_its_thinking_field() {
        assert_eq!(
            thinking("gemini-3.5-flash-lite"),
            Thinking::Level("minimal")
        );
        assert_eq!(thinking("gemini-3.8-flash"), Thinking::Level("minimal"));
        assert_eq!(thinking("gemini-3.1-pro-preview"), Thinking::Level("low"));
        assert_eq!(thinking("models/gemini-4-argon"), Thinking::Level("low"));
        assert_eq!(thinking("gemini-2.5-flash"), Thinking::Budget(0));
        assert_eq!(thinking("gemini-2.5-flash-lite"), Thinking::Budget(0));
        assert_eq!(thinking("gemini-2.5-pro"), Thinking::Budget(128));
        assert_eq!(thinking("gemini-2.0-flash"), Thinking::None);
        assert_eq!(thinking("gemma-3-27b-it"), Thinking::None);
        assert_eq!(thinking("gemini-x"), Thinking::None);
    }

    #[tokio::test]
    async fn filter_stops_end_as_content_filter_and_thoughts_are_skipped() {
        for reason in [
            "SAFETY",
            "RECITATION",
            "PROHIBITED_CONTENT",
            "BLOCKLIST",
            "SPII",
        ] {
            let payload = format!(r#"{{"candidates":[{{"finishReason":"{reason}","index":0}}]}}"#);
            let events = run(&[
                r#"{"candidates":[{"content":{"parts":[{"text":"thinking…","thought":true},{"text":"Par"}]}}]}"#,
                &payload,
            ])
            .await;
            assert_eq!(events[0], Ok(StreamEvent::Delta("Par".into())), "{reason}");
            let Ok(StreamEvent::Done(done)) = &events[1] else {
                panic!("{events:?}")
            };
            assert_eq!(done.finish_reason, FinishReason::ContentFilter, "{reason}");
        }
        assert_eq!(finish_reason("MAX_TOKENS"), FinishReason::Length);
        assert_eq!(finish_reason("STOP"), FinishReason::Stop);
    }
}
