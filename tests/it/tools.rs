//! Function calling on `/v1/chat/completions` (issue 18, class 2), from OpenAI's API
//! reference and llama.cpp's `test_tool_call.py`: a tool round trip (tools → `tool_calls`
//! → `role: tool` → answer) on the local engine, with `tool_choice` forcing the call (the
//! grammar sampler makes the tiny test model's call parse), streamed as `delta.tool_calls`;
//! `tool_choice: "none"` answers text; bad tools and tool messages are 400s; and the same
//! round trip through fake OpenAI-compatible (Groq, Mistral) and Gemini APIs speaking their
//! own wire format. Every response is parsed by the `openai` SDK's typed models.

use mistral_bot::chat::{FunctionTool, ToolChoice, Tools};
use mistral_bot::config::ProviderKind::{Gemini, Groq, Local, Mistral};
use mistral_bot::engine::tools::{ToolDialect, forced_gbnf, parse_calls};
use serde_json::{Value, json};

use crate::http::local_app;
use crate::openai_compat::{post, sdk_validates, stream};
use crate::util::app::{
    Fakes, TestApp, chain_app, http_settings, providers_config, shared_engine, start_app,
};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};

const CITIES: [&str; 3] = ["Paris", "London", "Rome"];

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"]}}})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"]}}})
}

fn question() -> Value {
    json!({"role": "user", "content": "What is the weather in Paris?"})
}

/// A request offering the weather tool with `choice`.
fn asking(choice: Value) -> Value {
    json!({"model": "any", "temperature": 0, "max_tokens": 64,
        "messages": [question()], "tools": [weather_tool()], "tool_choice": choice,
        "parallel_tool_calls": false})
}

/// The calls of a completion, checked against OpenAI's shape: id `call_…`, type function,
/// arguments a JSON object as text.
fn calls_of(body: &Value) -> Vec<(String, String, Value)> {
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls in {body}"));
    calls
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function", "{call}");
            let id = call["id"].as_str().unwrap().to_string();
            let arguments = call["function"]["arguments"]
                .as_str()
                .unwrap_or_else(|| panic!("arguments must be a string: {call}"));
            let arguments: Value = serde_json::from_str(arguments).unwrap();
            assert!(arguments.is_object(), "{arguments}");
            (
                id,
                call["function"]["name"].as_str().unwrap().to_string(),
                arguments,
            )
        })
        .collect()
}

/// The calls of a stream, joined from `delta.tool_calls` pieces: the first piece of each
/// index carries id, type and name.
fn streamed_calls(chunks: &[Value]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for chunk in chunks {
        let Some(pieces) = chunk["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for piece in pieces {
            let index = piece["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert_eq!(piece["type"], "function", "{piece}");
                calls.push((
                    piece["id"].as_str().unwrap().to_string(),
                    piece["function"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                ));
            }
            let call = &mut calls[index];
            call.2
                .push_str(piece["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    calls
}

fn finish_reason(body: &Value) -> &str {
    body["choices"][0]["finish_reason"].as_str().unwrap()
}

/// The conversation after `calls` were made and answered with `results`.
fn answered(calls: &Value, results: &[&str]) -> Vec<Value> {
    let mut messages = vec![
        question(),
        json!({"role": "assistant", "content": null, "tool_calls": calls}),
    ];
    for (call, result) in calls.as_array().unwrap().iter().zip(results) {
        messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": result}));
    }
    messages
}

#[tokio::test]
async fn a_forced_call_round_trips_through_the_local_engine() {
    let app = local_app().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (status, body) = post(&app, "/v1/chat/completions", &asking(named.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], "local");
    assert_eq!(finish_reason(&body), "tool_calls", "{body}");
    assert!(
        body["choices"][0]["message"]["content"].is_null(),
        "only calls: {body}"
    );
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1, "parallel_tool_calls false: {body}");
    let (id, name, arguments) = &calls[0];
    assert!(id.starts_with("call_"), "{id}");
    assert_eq!(name, "get_weather");
    assert!(
        CITIES.contains(&arguments["city"].as_str().unwrap()),
        "{arguments}"
    );

    // Streamed: the same call (greedy) as `delta.tool_calls`.
    let chunks = stream(&app, &asking(named)).await;
    let streamed = streamed_calls(&chunks);
    assert_eq!(streamed.len(), 1, "{chunks:?}");
    assert_eq!(streamed[0].1, "get_weather");
    let streamed_arguments: Value = serde_json::from_str(&streamed[0].2).unwrap();
    assert_eq!(&streamed_arguments, arguments);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The result goes back as a tool message; the model answers (text with "none").
    let tool_calls = body["choices"][0]["message"]["tool_calls"].clone();
    let mut follow_up = asking(json!("none"));
    follow_up["messages"] = json!(answered(&tool_calls, &["{\"temperature\": 22}"]));
    let (status, answer) = post(&app, "/v1/chat/completions", &follow_up).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    assert!(answer["choices"][0]["message"].get("tool_calls").is_none());
    assert!(
        ["stop", "length"].contains(&finish_reason(&answer)),
        "{answer}"
    );
    // "auto" after the result: whatever the model says, it is a valid completion.
    follow_up["tool_choice"] = json!("auto");
    let (status, auto) = post(&app, "/v1/chat/completions", &follow_up).await;
    assert_eq!(status, 200, "{auto}");

    sdk_validates(&[&body, &answer, &auto], &chunks.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn required_calls_one_of_the_tools_and_none_answers_text() {
    let app = local_app().await;
    let mut request = asking(json!("required"));
    request["tools"] = json!([weather_tool(), time_tool()]);
    // (With parallel calls allowed, the tiny model repeats calls until max_tokens: the
    // cut-off answer is then text, as any output that does not parse.)
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1, "{body}");
    for (_, name, _) in &calls {
        assert!(
            ["get_weather", "get_time"].contains(&name.as_str()),
            "{name}"
        );
    }

    // "none": text, even when the user's message spells a call, control token and all.
    let mut none = asking(json!("none"));
    none["messages"] = json!([{"role": "user", "content":
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"}]);
    let (status, text) = post(&app, "/v1/chat/completions", &none).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text["choices"][0]["message"].get("tool_calls").is_none(),
        "{text}"
    );
    assert_ne!(finish_reason(&text), "tool_calls");
    sdk_validates(&[&body, &text], &[]);
}

#[tokio::test]
async fn bad_tools_and_tool_messages_are_400s_naming_the_field() {
    let app = local_app().await;
    let call = json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"tools": {"type": "function"}}), "tools"),
        (json!({"tools": []}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]}),
            "tools",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "x".repeat(65)}}]}),
            "tools",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools",
        ),
        (json!({"tools": [weather_tool(), weather_tool()]}), "tools"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [weather_tool()], "tool_choice": "always"}),
            "tool_choice",
        ),
        (
            json!({"tools": [weather_tool()],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice",
        ),
        // A tool message answering no call.
        (
            json!({"messages": [question(), {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}),
            "messages",
        ),
        // A call left unanswered.
        (
            json!({"messages": [question(), {"role": "assistant", "content": null, "tool_calls": call},
                {"role": "user", "content": "and?"}]}),
            "messages",
        ),
        // A tool message without its call id.
        (
            json!({"messages": [question(), {"role": "assistant", "content": null, "tool_calls": call},
                {"role": "tool", "content": "x"}]}),
            "messages",
        ),
        // Arguments as an object, not JSON text.
        (
            json!({"messages": [question(), {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "c", "content": "x"}]}),
            "messages",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"messages": [question()], "max_tokens": 4});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let (status, error) = post(&app, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{body} → {error}");
        assert_eq!(error["error"]["param"], param, "{body} → {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
}

/// A tool round trip through a fake cloud API: the call, streamed too, and the answer to
/// its result. Returns what the fake was sent (the first request, the follow-up).
async fn cloud_round_trip(app: &TestApp, provider: &str, fake: &FakeProvider) -> (Value, Value) {
    let mut request = asking(json!("required"));
    request["tools"] = json!([weather_tool(), time_tool()]);
    let (status, body) = post(app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], provider);
    assert_eq!(finish_reason(&body), "tool_calls", "{body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 1, "parallel_tool_calls false: {body}");
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[0].2, json!({"city": "Paris"}));
    let first = fake.requests().last().unwrap().body.clone();

    let chunks = stream(app, &request).await;
    let streamed = streamed_calls(&chunks);
    assert_eq!(streamed.len(), 1, "{chunks:?}");
    assert_eq!(streamed[0].1, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&streamed[0].2).unwrap(),
        json!({"city": "Paris"})
    );

    let tool_calls = body["choices"][0]["message"]["tool_calls"].clone();
    let mut follow_up = request.clone();
    follow_up["messages"] = json!(answered(&tool_calls, &["{\"temperature\": 22}"]));
    follow_up["tool_choice"] = json!("auto");
    let (status, answer) = post(app, "/v1/chat/completions", &follow_up).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "It is sunny.");
    assert_eq!(finish_reason(&answer), "stop");
    let second = fake.requests().last().unwrap().body.clone();
    sdk_validates(&[&body, &answer], &chunks.iter().collect::<Vec<_>>());
    (first, second)
}

fn calling_fake() -> Behavior {
    Behavior::CallTools {
        calls: vec![
            ("get_weather".into(), json!({"city": "Paris"})),
            ("get_time".into(), json!({"zone": "CET"})),
        ],
        answer: vec!["It is".into(), " sunny.".into()],
    }
}

#[tokio::test]
async fn openai_compatible_apis_get_tools_as_they_are() {
    let groq = FakeProvider::start(Shape::OpenAi, calling_fake()).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq], &fakes).await;
    // The fake makes two calls; OpenAI would honour `parallel_tool_calls: false` itself,
    // and the answer passes on what the API said: here both calls.
    let mut request = asking(json!("auto"));
    request["parallel_tool_calls"] = json!(true);
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let calls = calls_of(&body);
    assert_eq!(calls.len(), 2, "{body}");
    assert_eq!(calls[1].0, "call_fake1", "the API's own ids");
    let sent = groq.requests().last().unwrap().body.clone();
    assert_eq!(sent["tools"], json!([weather_tool()]));
    assert_eq!(sent["tool_choice"], "auto");
    assert!(
        sent.get("parallel_tool_calls").is_none(),
        "the default: {sent}"
    );

    // One call (the fake's first) for the round trip.
    groq.set(Behavior::CallTools {
        calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
        answer: vec!["It is".into(), " sunny.".into()],
    });
    let (first, second) = cloud_round_trip(&app, "groq", &groq).await;
    assert_eq!(first["tool_choice"], "required");
    assert_eq!(first["parallel_tool_calls"], false);
    let messages = second["messages"].as_array().unwrap();
    let assistant = &messages[1];
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["tool_calls"][0]["id"], "call_fake0");
    assert_eq!(
        assistant["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Paris\"}"
    );
    assert_eq!(
        messages[2],
        json!({"role": "tool", "tool_call_id": "call_fake0", "content": "{\"temperature\": 22}"})
    );
}

#[tokio::test]
async fn mistral_gets_any_and_nine_character_call_ids() {
    let mistral = FakeProvider::start(
        Shape::OpenAi,
        Behavior::CallTools {
            calls: vec![("get_weather".into(), json!({"city": "Paris"}))],
            answer: vec!["It is sunny.".into()],
        },
    )
    .await;
    let fakes = Fakes {
        mistral: Some(mistral.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Mistral], &fakes).await;
    let (first, second) = cloud_round_trip(&app, "mistral", &mistral).await;
    assert_eq!(first["tool_choice"], "any", "Mistral's name for required");
    let messages = second["messages"].as_array().unwrap();
    let id = messages[1]["tool_calls"][0]["id"].as_str().unwrap();
    assert!(
        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
    assert_eq!(
        messages[2]["tool_call_id"], id,
        "the result names the same id"
    );
}

#[tokio::test]
async fn gemini_gets_function_declarations_and_parts() {
    let gemini = FakeProvider::start(
        Shape::Gemini,
        Behavior::CallTools {
            // Gemini has no parallel switch: the second call is dropped for
            // `parallel_tool_calls: false`.
            calls: vec![
                ("get_weather".into(), json!({"city": "Paris"})),
                ("get_time".into(), json!({"zone": "CET"})),
            ],
            answer: vec!["It is".into(), " sunny.".into()],
        },
    )
    .await;
    let fakes = Fakes {
        gemini: Some(gemini.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Gemini], &fakes).await;
    let (first, second) = cloud_round_trip(&app, "gemini", &gemini).await;
    let declarations = &first["tools"][0]["functionDeclarations"];
    assert_eq!(declarations[0]["name"], "get_weather");
    assert_eq!(
        declarations[0]["parameters"]["properties"]["city"]["enum"],
        json!(CITIES)
    );
    assert_eq!(
        first["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
    let contents = second["contents"].as_array().unwrap();
    assert_eq!(contents[1]["role"], "model");
    assert_eq!(
        contents[1]["parts"][0],
        json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}})
    );
    assert_eq!(contents[2]["role"], "user");
    assert_eq!(
        contents[2]["parts"][0],
        json!({"functionResponse": {"name": "get_weather", "response": {"temperature": 22}}})
    );
}

#[tokio::test]
async fn a_chain_falls_back_with_the_tools_intact() {
    // The first provider fails: the next one gets the same tools.
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::ServerError).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq, Local], &fakes).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (status, body) = post(&app, "/v1/chat/completions", &asking(named)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], "local");
    assert_eq!(calls_of(&body)[0].1, "get_weather");
    assert!(groq.requests().last().unwrap().body["tools"].is_array());
}

#[tokio::test]
async fn mistrals_forced_grammar_parses_and_gives_calls_after_the_token() {
    // The test model has no [TOOL_CALLS] token (it is ChatML): the grammar of Mistral's
    // dialect, given as a `grammar`, still makes llama.cpp write the token's text and then
    // a call that reads back as one.
    let tools = Tools {
        functions: vec![FunctionTool {
            name: "get_weather".into(),
            description: None,
            parameters: weather_tool()["function"]["parameters"].clone(),
            strict: false,
        }],
        choice: ToolChoice::Required,
        parallel: false,
    };
    let grammar = forced_gbnf(&tools, ToolDialect::Mistral).unwrap().unwrap();
    let app = local_app().await;
    let body = json!({"messages": [question()], "temperature": 0, "max_tokens": 64,
        "grammar": grammar});
    let (status, body) = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("[TOOL_CALLS]"), "{text}");
    let calls = parse_calls(text, &tools.functions).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "get_weather");
}

#[tokio::test]
async fn each_of_n_choices_makes_its_own_call() {
    let app = local_app().await;
    let mut request = asking(json!({"type": "function", "function": {"name": "get_weather"}}));
    request["n"] = json!(2);
    request["temperature"] = json!(0.8);
    request["seed"] = json!(3);
    let (status, body) = post(&app, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{body}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{choice}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
    }
    let chunks = stream(&app, &request).await;
    for index in 0..2 {
        let own: Vec<Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .cloned()
            .collect();
        let calls = streamed_calls(&own);
        assert_eq!(calls.len(), 1, "choice {index}: {own:?}");
        assert!(
            own.iter()
                .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
        );
    }
    sdk_validates(&[&body], &chunks.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn gemini_3_gets_a_signature_on_the_calls_it_made() {
    // Gemini 3+ refuses a call in the history without its thought signature (an OpenAI
    // client keeps none): the round trip still works.
    const MODEL: &str = "gemini-3.5-flash-lite";
    let gemini = FakeProvider::start(Shape::Gemini, calling_fake()).await;
    gemini.set_models(&[MODEL]);
    let fakes = Fakes {
        gemini: Some(gemini.clone()),
        ..Fakes::default()
    };
    let mut config = providers_config(&[Gemini], &fakes);
    config.gemini.model = MODEL.into();
    let app = start_app(&config, shared_engine().await, http_settings()).await;
    let (_, second) = cloud_round_trip(&app, "gemini", &gemini).await;
    assert_eq!(
        second["contents"][1]["parts"][0]["thoughtSignature"],
        "skip_thought_signature_validator"
    );
}
