//! OpenAI compatibility of `/v1/chat/completions` (issue 18), one test per class, written
//! from the OpenAI API reference and llama.cpp's server tests
//! (`tools/server/tests/unit/test_chat_completion.py`, `test_logprobs`-style checks of
//! `test_completion.py`, `test_json_schema` cases): the details clients check, context
//! overflow, the sampler fields, logprobs, constrained output, and the cloud pass-through.
//! Real engine (SmolLM2), fake cloud providers. Every response is also parsed by the
//! `openai` Python SDK's typed models (`model_validate`, strict), the way clients read it.

use std::io::Write;
use std::process::{Command, Stdio};

use mistral_bot::chat::{ChatMessage, ChatRequest, Constraint, GenerateParams, StreamEvent};
use mistral_bot::config::ProviderKind::{Gemini, Groq, Local};
use proptest::strategy::{Just, Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

use crate::http::{local_app, sse_data};
use crate::util::app::{
    Fakes, TestApp, chain_app, content, http_settings, providers_config, shared_engine, start_app,
};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};

const QUESTION: &str = "What is the capital of France? Answer in one word.";

/// Posts `body` to `path` and returns the status and the JSON body.
pub(crate) async fn post(app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}{path}", app.base))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Streams `body` and returns the chunks (without `[DONE]`, which must end the stream).
pub(crate) async fn stream(app: &TestApp, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let data = sse_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Parses `completions` (`chat.completion`) and `chunks` (`chat.completion.chunk`) with
/// the `openai` SDK's pydantic models, strictly, and fails with what it said.
pub(crate) fn sdk_validates(completions: &[&Value], chunks: &[&Value]) {
    const SCRIPT: &str = r#"
import json, sys
from openai.types.chat import ChatCompletion, ChatCompletionChunk
data = json.load(sys.stdin)
for c in data["completions"]:
    ChatCompletion.model_validate(c, strict=True)
for c in data["chunks"]:
    ChatCompletionChunk.model_validate(c, strict=True)
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (the openai SDK check: `pip install openai`, as .ci/run does)");
    let input = json!({"completions": completions, "chunks": chunks}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the openai SDK rejects the response (`pip install openai` if it is missing):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn ask(extra: Value) -> Value {
    let mut body = json!({"model": "any", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": QUESTION}]});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn routes_without_the_v1_prefix_answer_with_a_system_fingerprint() {
    let app = local_app().await;
    let (status, with_prefix) = post(&app, "/v1/chat/completions", &ask(json!({}))).await;
    assert_eq!(status, 200, "{with_prefix}");
    let (status, without) = post(&app, "/chat/completions", &ask(json!({}))).await;
    assert_eq!(status, 200, "{without}");
    assert_eq!(
        content(&without),
        content(&with_prefix),
        "the same endpoint"
    );
    let fingerprint = with_prefix["system_fingerprint"].as_str().unwrap();
    assert!(fingerprint.starts_with("fp_"), "{fingerprint}");
    assert_eq!(without["system_fingerprint"], fingerprint, "stable");
    let (status, models) = app.get_json("/models").await;
    assert_eq!(status, 200);
    assert_eq!(models, app.get_json("/v1/models").await.1);
    let chunks = stream(&app, &ask(json!({}))).await;
    assert!(
        chunks
            .iter()
            .all(|c| c["system_fingerprint"] == fingerprint)
    );
    sdk_validates(
        &[&with_prefix, &without],
        &chunks.iter().collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn include_usage_adds_a_last_chunk_without_choices_only_when_asked() {
    let app = local_app().await;
    let asked = stream(
        &app,
        &ask(json!({"stream_options": {"include_usage": true}})),
    )
    .await;
    let (last, rest) = asked.split_last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    let usage = &last["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        rest.iter().all(|c| c["usage"].is_null()),
        "null until the last"
    );
    assert!(
        rest.iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1)
    );
    assert!(rest.last().unwrap()["choices"][0]["finish_reason"].is_string());

    let plain = stream(&app, &ask(json!({}))).await;
    assert!(
        plain
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1),
        "no choice-less chunk unless asked"
    );
    let (status, error) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(status, 400, "stream_options without stream: {error}");
    assert_eq!(error["error"]["param"], "stream_options");
    let all: Vec<&Value> = asked.iter().chain(&plain).collect();
    sdk_validates(&[], &all);
}

/// 200 short messages: far over the 1024-token test window, no single one long.
fn over_the_window(truncation: Option<&str>) -> Value {
    let mut messages: Vec<Value> = (0..100)
        .flat_map(|i| {
            [
                json!({"role": "user", "content": format!("Tell me fact number {i}.")}),
                json!({"role": "assistant", "content": format!("Fact {i} is about cats.")}),
            ]
        })
        .collect();
    messages.push(json!({"role": "user", "content": QUESTION}));
    let mut body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
    if let Some(truncation) = truncation {
        body["truncation"] = json!(truncation);
    }
    body
}

#[tokio::test]
async fn a_request_over_the_window_is_a_400_unless_truncation_is_asked_for() {
    let app = local_app().await;
    for truncation in [None, Some("disabled")] {
        let (status, body) = post(&app, "/v1/chat/completions", &over_the_window(truncation)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "messages");
    }
    let (status, body) = post(&app, "/v1/chat/completions", &over_the_window(Some("auto"))).await;
    assert_eq!(status, 200, "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt < 1024, "trimmed to the window: {prompt}");
    sdk_validates(&[&body], &[]);
}

#[tokio::test]
async fn top_k_one_is_deterministic_across_seeds() {
    let app = local_app().await;
    let mut texts = Vec::new();
    for seed in [1, 2, 3] {
        let (status, body) = post(
            &app,
            "/v1/chat/completions",
            &ask(json!({"temperature": 1.5, "top_k": 1, "seed": seed, "max_tokens": 16})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        texts.push(content(&body).to_string());
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    // The control: without top_k, a high temperature gives different texts for some seed.
    let mut free = Vec::new();
    for seed in [1, 2, 3, 4] {
        let (_, body) = post(
            &app,
            "/v1/chat/completions",
            &ask(
                json!({"temperature": 1.5, "top_k": 0, "min_p": 0, "top_p": 1, "seed": seed,
                "max_tokens": 16}),
            ),
        )
        .await;
        free.push(content(&body).to_string());
    }
    assert!(free.iter().any(|t| *t != free[0]), "{free:?}");
}

/// The ids of every token of the test model whose text contains `word`, from the prompt
/// of a request that says it.
async fn token_ids_of(word: &str) -> Vec<i32> {
    let engine = shared_engine().await;
    let request = ChatRequest::new(
        vec![ChatMessage::user(format!(
            "{word} {word}, {word}. {}",
            word.to_lowercase()
        ))],
        GenerateParams::greedy(1),
    );
    let mut reply = engine.submit_showing_prompt(request).unwrap();
    while let Some(event) = reply.next_event().await {
        if let Ok(StreamEvent::Prompt(tokens)) = event {
            return tokens
                .into_iter()
                .filter(|t| t.piece.to_lowercase().contains(&word.to_lowercase()))
                .map(|t| t.id)
                .collect();
        }
    }
    panic!("no prompt event");
}

#[tokio::test]
async fn logit_bias_minus_100_bans_a_token_and_penalties_are_checked() {
    let app = local_app().await;
    let (_, free) = post(&app, "/v1/chat/completions", &ask(json!({}))).await;
    assert!(content(&free).contains("Paris"), "{free}");
    let banned = token_ids_of("Paris").await;
    assert!(!banned.is_empty());
    let bias: serde_json::Map<String, Value> = banned
        .iter()
        .map(|id| (id.to_string(), json!(-100)))
        .collect();
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"logit_bias": bias})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!content(&body).contains("Paris"), "{body}");

    for (field, value) in [
        ("frequency_penalty", json!(2.5)),
        ("presence_penalty", json!(-2.1)),
        ("min_p", json!(1.2)),
        ("repeat_penalty", json!(0)),
        ("logit_bias", json!({"5": 150})),
        ("top_logprobs", json!(3)),
    ] {
        let (status, body) = post(&app, "/v1/chat/completions", &ask(json!({field: value}))).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(body["error"]["param"], field, "{body}");
    }
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"frequency_penalty": 1.0, "presence_penalty": 1.0, "repeat_penalty": 1.3})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Checks one `logprobs.content` entry against OpenAI's shape.
fn check_logprob(entry: &Value, top: usize) {
    let token = entry["token"].as_str().unwrap();
    let bytes: Vec<u8> = entry["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(String::from_utf8_lossy(&bytes), token);
    assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    let alternatives = entry["top_logprobs"].as_array().unwrap();
    assert_eq!(alternatives.len(), top, "{entry}");
    for pair in alternatives.windows(2) {
        assert!(pair[0]["logprob"].as_f64() >= pair[1]["logprob"].as_f64());
    }
    if top > 0 {
        // Greedy: the chosen token is the most likely one.
        assert_eq!(alternatives[0]["token"], entry["token"], "{entry}");
        assert_eq!(alternatives[0]["logprob"], entry["logprob"]);
    }
}

#[tokio::test]
async fn logprobs_have_openais_shape_whole_and_streamed() {
    let app = local_app().await;
    let request = ask(json!({"logprobs": true, "top_logprobs": 3}));
    let (status, whole) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    let entries = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!entries.is_empty());
    for entry in entries {
        check_logprob(entry, 3);
    }
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, content(&whole), "the tokens spell the reply");

    let chunks = stream(&app, &request).await;
    let streamed: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), entries.len());
    for (a, b) in streamed.iter().zip(entries) {
        assert_eq!(a["token"], b["token"]);
    }

    let (_, without) = post(&app, "/v1/chat/completions", &ask(json!({}))).await;
    assert!(without["choices"][0]["logprobs"].is_null(), "{without}");
    let (_, no_top) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"logprobs": true})),
    )
    .await;
    for entry in no_top["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
    {
        check_logprob(entry, 0);
    }
    let (status, _) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"logprobs": true, "top_logprobs": 21})),
    )
    .await;
    assert_eq!(status, 400);
    sdk_validates(
        &[&whole, &without, &no_top],
        &chunks.iter().collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn json_mode_output_parses_and_schema_output_validates() {
    // Room for a whole object: JSON cut at max_tokens (finish_reason "length") does not
    // parse, with OpenAI too.
    let mut settings = http_settings();
    settings.generate.max_tokens = 400;
    let app = start_app(
        &providers_config(&[Local], &Fakes::default()),
        shared_engine().await,
        settings,
    )
    .await;
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"response_format": {"type": "json_object"}, "max_tokens": 400,
            "messages": [{"role": "user", "content": "Reply with exactly this JSON: {\"ok\": true}"}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let parsed: Value =
        serde_json::from_str(content(&body)).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert!(parsed.is_object(), "{parsed}");

    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "tags": {"type": "array", "items": {"enum": ["old", "big", "river"]}, "maxItems": 3}},
        "required": ["city", "population", "tags"], "additionalProperties": false});
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(
            json!({"max_tokens": 200, "response_format": {"type": "json_schema",
            "json_schema": {"name": "city", "strict": true, "schema": schema}}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let parsed: Value = serde_json::from_str(content(&body)).unwrap();
    assert!(validates(&parsed, &schema), "{parsed} against {schema}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // llama-server's extensions: a GBNF grammar, a top-level json_schema.
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"grammar": "root ::= (\"yes\" | \"no\") \".\""})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(["yes.", "no."].contains(&content(&body)), "{body}");
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(
            json!({"json_schema": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let parsed: Value = serde_json::from_str(content(&body)).unwrap();
    assert!(parsed.as_array().unwrap().iter().all(Value::is_boolean));
    sdk_validates(&[&body], &[]);
}

#[tokio::test]
async fn unsupported_schemas_and_bad_grammars_are_400s_naming_the_problem() {
    let app = local_app().await;
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "array", "uniqueItems": true, "items": {"not": {"type": "null"}}}}}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/uniqueItems") && message.contains("/items/not"),
        "{message}"
    );
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"grammar": "root ::= (\"unclosed\""})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("grammar"),
        "{body}"
    );
    let (status, body) = post(
        &app,
        "/v1/chat/completions",
        &ask(json!({"response_format": {"type": "yaml"}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "response_format");
}

/// Whether `value` is valid against `schema`, for the keywords [`schema_strategy`] makes.
fn validates(value: &Value, schema: &Value) -> bool {
    if let Some(options) = schema["enum"].as_array() {
        return options.contains(value);
    }
    if let Some(options) = schema["anyOf"].as_array() {
        return options.iter().any(|s| validates(value, s));
    }
    match schema["type"].as_str() {
        Some("string") => value.as_str().is_some_and(|s| {
            schema["maxLength"]
                .as_u64()
                .is_none_or(|max| s.chars().count() as u64 <= max)
        }),
        Some("integer") => value.as_i64().is_some_and(|n| {
            schema["minimum"].as_i64().is_none_or(|min| n >= min)
                && schema["maximum"].as_i64().is_none_or(|max| n <= max)
        }),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("null") => value.is_null(),
        Some("array") => value.as_array().is_some_and(|items| {
            schema["maxItems"]
                .as_u64()
                .is_none_or(|max| items.len() as u64 <= max)
                && schema["minItems"]
                    .as_u64()
                    .is_none_or(|min| items.len() as u64 >= min)
                && items.iter().all(|item| validates(item, &schema["items"]))
        }),
        Some("object") => value.as_object().is_some_and(|object| {
            let properties = schema["properties"].as_object().unwrap();
            let required = schema["required"].as_array().unwrap();
            required
                .iter()
                .all(|name| object.contains_key(name.as_str().unwrap()))
                && object.iter().all(|(name, v)| {
                    properties
                        .get(name)
                        .is_some_and(|property| validates(v, property))
                })
        }),
        _ => false,
    }
}

/// Schemas within the supported subset, bounded so that a reply fits a few hundred tokens.
fn schema_strategy() -> impl Strategy<Value = Value> {
    let leaf = proptest::prop_oneof![
        (1u64..8).prop_map(|max| json!({"type": "string", "maxLength": max})),
        (-50i64..50, 0i64..100).prop_map(
            |(min, span)| json!({"type": "integer", "minimum": min, "maximum": min + span})
        ),
        Just(json!({"type": "number"})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        proptest::collection::vec("[a-z]{1,5}", 1..4).prop_map(|options| json!({"enum": options})),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        proptest::prop_oneof![
            (inner.clone(), 0u64..2, 2u64..4).prop_map(|(items, min, max)| json!({
                "type": "array", "items": items, "minItems": min, "maxItems": max})),
            proptest::collection::btree_map("[a-z]{1,6}", inner.clone(), 1..4).prop_map(
                |properties| {
                    let names: Vec<&String> = properties.keys().collect();
                    json!({"type": "object", "properties": properties, "required": names,
                        "additionalProperties": false})
                }
            ),
            proptest::collection::vec(inner, 2..3).prop_map(|options| json!({"anyOf": options})),
        ]
    })
}

/// The class: any schema of the supported subset, sampled at temperature 1 with a seed,
/// gives output that parses and validates.
#[tokio::test]
async fn generated_schemas_give_output_that_parses_and_validates() {
    let engine = shared_engine().await;
    let mut runner = TestRunner::deterministic();
    for case in 0..12u32 {
        let schema = schema_strategy().new_tree(&mut runner).unwrap().current();
        let params = GenerateParams {
            max_tokens: 400,
            temperature: 1.0,
            seed: Some(case),
            constraint: Some(Constraint::JsonSchema {
                name: "generated".into(),
                schema: schema.clone(),
                strict: true,
            }),
            ..GenerateParams::default()
        };
        let request = ChatRequest::new(vec![ChatMessage::user("Answer with JSON.")], params);
        let (text, done) = engine.submit(request).unwrap().collect().await.unwrap();
        assert_eq!(
            done.finish_reason,
            mistral_bot::chat::FinishReason::Stop,
            "case {case}: the grammar ends the reply ({text:?}, schema {schema})"
        );
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("case {case}: {e}: {text:?} for {schema}"));
        assert!(
            validates(&value, &schema),
            "case {case}: {value} against {schema}"
        );
    }
}

#[tokio::test]
async fn cloud_providers_get_the_fields_in_their_own_form_or_refuse() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["{\"a\": 1}"])).await;
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["{\"a\": 1}"])).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        gemini: Some(gemini.clone()),
        ..Fakes::default()
    };
    let schema = json!({"type": "object", "properties": {"a": {"type": ["integer", "null"]}}});
    let request = ask(
        json!({"presence_penalty": 0.5, "top_k": 7, "logit_bias": {"11": -100},
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": true}}}),
    );

    let app = chain_app(&[Groq], &fakes).await;
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let sent = groq.requests().last().unwrap().body.clone();
    assert_eq!(sent["presence_penalty"], 0.5);
    assert_eq!(sent["logit_bias"], json!({"11": -100.0}));
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(sent["response_format"]["json_schema"]["schema"], schema);
    assert!(sent.get("top_k").is_none(), "not an OpenAI field: {sent}");

    // Gemini: its own names; logit_bias is a refusal (it has none), so drop it.
    let mut request = request.clone();
    request.as_object_mut().unwrap().remove("logit_bias");
    let app = chain_app(&[Gemini], &fakes).await;
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let config = gemini.requests().last().unwrap().body["generationConfig"].clone();
    assert_eq!(config["topK"], 7);
    assert_eq!(config["presencePenalty"], 0.5);
    assert_eq!(config["responseMimeType"], "application/json");
    assert_eq!(
        config["responseSchema"],
        json!({"type": "object", "properties": {"a": {"type": "integer", "nullable": true}}})
    );

    // What a provider cannot honour is its refusal: a grammar is local only, so a chain
    // of cloud providers answers 400 and the breakers stay shut.
    let app = chain_app(&[Groq, Gemini], &fakes).await;
    let hits = (groq.hits(), gemini.hits());
    let grammar = ask(json!({"grammar": "root ::= \"a\""}));
    let (status, body) = post(&app, "/v1/chat/completions", &grammar).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert_eq!((groq.hits(), gemini.hits()), hits, "refused before sending");
    assert_eq!(app.counters().await["groq.skipped"], 0);
    // With the local engine in the chain, the same request is answered there.
    let app = chain_app(&[Groq, Local], &fakes).await;
    let (status, body) = post(&app, "/v1/chat/completions", &grammar).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], "local");
}

/// Checks cloud `choices` with log-probabilities (two choices, two alternatives each):
/// the fakes' answers, `#1` ending the second choice.
fn check_cloud_choices(body: &Value, provider: &str) {
    assert_eq!(body["provider"], provider, "{body}");
    let texts = texts_of(body);
    assert_eq!(texts.len(), 2, "{body}");
    assert_eq!(format!("{} #1", texts[0]), texts[1], "{body}");
    for choice in body["choices"].as_array().unwrap() {
        let tokens = choice["logprobs"]["content"].as_array().unwrap();
        let joined: String = tokens
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(
            joined,
            choice["message"]["content"].as_str().unwrap(),
            "{body}"
        );
        for token in tokens {
            check_logprob(token, 2);
        }
    }
}

#[tokio::test]
async fn cloud_providers_pass_n_and_logprobs_and_answer_in_openais_shape() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Par", "is."])).await;
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["Par", "is."])).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        gemini: Some(gemini.clone()),
        ..Fakes::default()
    };
    let request = ask(json!({"n": 2, "logprobs": true, "top_logprobs": 2}));
    for (kind, fake, name) in [(Groq, &groq, "groq"), (Gemini, &gemini, "gemini")] {
        let app = chain_app(&[kind], &fakes).await;
        let (status, whole) = post(&app, "/v1/chat/completions", &request).await;
        assert_eq!(status, 200, "{whole}");
        check_cloud_choices(&whole, name);
        let sent = fake.requests().last().unwrap().body.clone();
        match kind {
            Groq => {
                assert_eq!(
                    (&sent["n"], &sent["logprobs"], &sent["top_logprobs"]),
                    (&json!(2), &json!(true), &json!(2)),
                    "{sent}"
                );
            }
            _ => {
                let config = &sent["generationConfig"];
                assert_eq!(
                    (
                        &config["candidateCount"],
                        &config["responseLogprobs"],
                        &config["logprobs"]
                    ),
                    (&json!(2), &json!(true), &json!(2)),
                    "{sent}"
                );
            }
        }
        // Streamed: each chunk one choice with its index, each choice its own finish.
        let chunks = stream(&app, &request).await;
        let streamed = streamed_choices(&chunks);
        for (i, (text, reasons)) in streamed.iter().enumerate() {
            assert_eq!(
                text,
                whole["choices"][i]["message"]["content"].as_str().unwrap()
            );
            assert_eq!(reasons, &["stop"], "{chunks:?}");
        }
        let all: Vec<&Value> = chunks.iter().collect();
        sdk_validates(&[&whole], &all);
    }

    // An API that takes no `n` (Groq: 400) refuses; the next provider answers, and with
    // none left the client gets the 400, the breaker untouched.
    groq.set(Behavior::Reject {
        status: 400,
        body: json!({"error": {"message": "'n' : number must be at most 1",
            "type": "invalid_request_error"}}),
    });
    let app = chain_app(&[Groq, Gemini], &fakes).await;
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    check_cloud_choices(&body, "gemini");
    let app = chain_app(&[Groq], &fakes).await;
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let counters = app.counters().await;
    assert_eq!(counters["groq.skipped"], 0, "{counters:?}");
}

/// Several choices (`n`) from the local engine: a request with a fixed seed, sampled
/// freely so the choices differ.
fn choices(n: u32, extra: Value) -> Value {
    let mut body = ask(
        json!({"n": n, "seed": 7, "temperature": 1.5, "top_k": 0, "min_p": 0,
        "top_p": 1, "max_tokens": 12}),
    );
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// Each choice's text and finish reasons (in order seen) from streamed chunks, checking
/// that every chunk carries one choice.
fn streamed_choices(chunks: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for chunk in chunks {
        let list = chunk["choices"].as_array().unwrap();
        if list.is_empty() {
            continue; // the usage chunk
        }
        assert_eq!(list.len(), 1, "{chunk}");
        let index = list[0]["index"].as_u64().unwrap() as usize;
        if out.len() <= index {
            out.resize(index + 1, (String::new(), Vec::new()));
        }
        if let Some(text) = list[0]["delta"]["content"].as_str() {
            out[index].0.push_str(text);
        }
        if let Some(reason) = list[0]["finish_reason"].as_str() {
            out[index].1.push(reason.to_string());
        }
    }
    out
}

fn texts_of(body: &Value) -> Vec<String> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{body}");
            assert!(c["finish_reason"].is_string(), "{body}");
            c["message"]["content"].as_str().unwrap().to_string()
        })
        .collect()
}

/// An engine of its own (4 slots, nothing cached) behind the local chain, replies of up
/// to `max_tokens`: its counters see only this test's requests.
async fn own_engine_app(max_tokens: u32) -> (TestApp, mistral_bot::engine::EngineHandle) {
    let engine = crate::util::start_engine(crate::util::engine_config()).await;
    let mut settings = http_settings();
    settings.generate.max_tokens = max_tokens;
    let app = start_app(
        &providers_config(&[Local], &Fakes::default()),
        engine.clone(),
        settings,
    )
    .await;
    (app, engine)
}

#[tokio::test]
async fn n_choices_share_one_reading_of_the_prompt_and_count_as_one_request() {
    let (app, engine) = own_engine_app(48).await;
    let (status, body) = post(&app, "/v1/chat/completions", &choices(3, json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let texts = texts_of(&body);
    assert_eq!(texts.len(), 3, "{body}");
    assert!(
        texts.iter().any(|t| *t != texts[0]),
        "each choice samples with its own seed: {texts:?}"
    );
    sdk_validates(&[&body], &[]);

    // The prompt was decoded once, for all three; the tokens of all three are counted.
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!((3..=36).contains(&completion), "{usage}");
    let stats = engine.stats();
    assert_eq!(stats.prompt_tokens_processed, prompt, "{stats:?}");
    assert_eq!(stats.tokens_generated, completion, "{stats:?}");
    assert_eq!(
        (
            stats.requests_started,
            stats.requests_finished,
            stats.slots_busy
        ),
        (1, 1, 0),
        "{stats:?}"
    );
    let (_, metrics) = {
        let response = app
            .client
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    let samples = crate::util::prometheus::parse(&metrics).unwrap();
    let get = |name: &str, labels: &[(&str, &str)]| {
        crate::util::prometheus::value(&samples, name, labels)
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(
        get("mistral_bot_engine_prompt_tokens_processed_total", &[]),
        prompt as f64
    );
    assert_eq!(
        get(
            "mistral_bot_provider_requests_total",
            &[("provider", "local")]
        ),
        1.0
    );
    assert_eq!(app.counters().await["local.success"], 1);

    // The same request again: the same choices (the prompt now comes from the cache).
    let (_, again) = post(&app, "/v1/chat/completions", &choices(3, json!({}))).await;
    assert_eq!(texts_of(&again), texts, "{again}");
    // Choice 0 of n = 3 is what n = 1 gives with that seed.
    let (_, one) = post(&app, "/v1/chat/completions", &choices(1, json!({}))).await;
    assert_eq!(texts_of(&one), texts[..1], "{one}");
}

#[tokio::test]
async fn n_choices_stream_with_their_index_and_their_own_finish_reason() {
    let app = local_app().await;
    let extra = json!({"logprobs": true, "top_logprobs": 2, "stop": ["\n\n"]});
    let (status, whole) = post(&app, "/v1/chat/completions", &choices(2, extra.clone())).await;
    assert_eq!(status, 200, "{whole}");
    let mut body = choices(2, extra);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&app, &body).await;
    let streamed = streamed_choices(&chunks);
    assert_eq!(streamed.len(), 2, "{chunks:?}");
    for (i, (text, reasons)) in streamed.iter().enumerate() {
        let choice = &whole["choices"][i];
        assert_eq!(text, choice["message"]["content"].as_str().unwrap(), "{i}");
        assert_eq!(reasons.len(), 1, "one finish per choice: {chunks:?}");
        assert_eq!(reasons[0], choice["finish_reason"].as_str().unwrap());
        assert!(
            !choice["logprobs"]["content"].as_array().unwrap().is_empty(),
            "{choice}"
        );
    }
    // Streamed log-probabilities ride with their own choice: as many as in the whole one.
    for (i, choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
        let streamed: usize = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(
            streamed,
            choice["logprobs"]["content"].as_array().unwrap().len(),
            "{i}"
        );
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    // The same tokens as the whole answer (its prompt now partly cached).
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][field], whole["usage"][field], "{last}");
    }
    let all: Vec<&Value> = chunks.iter().collect();
    sdk_validates(&[&whole], &all);
}

#[tokio::test]
async fn n_is_checked_and_limited_to_the_engines_slots() {
    let app = local_app().await;
    for n in [0, 129] {
        let (status, body) = post(&app, "/v1/chat/completions", &choices(n, json!({}))).await;
        assert_eq!(status, 400, "{n}: {body}");
        assert_eq!(body["error"]["param"], "n", "{body}");
    }
    // The test engine has 4 slots: 5 choices are refused, naming the limit.
    let (status, body) = post(&app, "/v1/chat/completions", &choices(5, json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 4"), "{message}");
    let (status, body) = post(&app, "/v1/chat/completions", &choices(4, json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(texts_of(&body).len(), 4);
}

#[tokio::test]
async fn a_client_leaving_frees_every_slot_of_its_choices() {
    // Replies of up to 900 tokens each (the window allows ~1000): long enough to leave
    // while all three generate.
    let (app, engine) = own_engine_app(900).await;
    let body = choices(
        3,
        json!({"stream": true, "ignore_eos": true, "max_tokens": 900}),
    );
    let mut response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Wait until all three choices generate, then leave.
    crate::util::wait_until(
        "three slots busy",
        std::time::Duration::from_secs(60),
        || engine.stats().slots_busy == 3,
    )
    .await;
    let _ = response.chunk().await.unwrap();
    drop(response);
    crate::util::wait_until(
        "every slot freed",
        std::time::Duration::from_secs(60),
        || {
            let stats = engine.stats();
            stats.slots_busy == 0 && stats.requests_finished == 1
        },
    )
    .await;
    let generated = engine.stats().tokens_generated;
    assert!(
        generated < 3 * 900,
        "the choices ran on: {generated} tokens"
    );
    // The engine still answers.
    let (status, body) = post(&app, "/v1/chat/completions", &choices(2, json!({}))).await;
    assert_eq!(status, 200, "{body}");
}
