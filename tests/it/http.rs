//! HTTP API tests: the real router on a loopback port over the real engine (SmolLM2,
//! greedy), fake cloud providers where a test needs one, and one black-box run of the
//! binary in serve mode.

use std::process::Stdio;
use std::time::Duration;

use mistral_bot::config::ProviderKind::{Groq, Local};
use mistral_bot::config::Secret;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::util::app::{
    Fakes, TestApp, chain_app, content, http_settings, make_ready, providers_config, shared_engine,
    start_app, start_unready,
};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};
use crate::util::{prometheus, test_model};

pub(crate) async fn local_app() -> TestApp {
    chain_app(&[Local], &Fakes::default()).await
}

/// The `data:` payloads of an SSE body.
pub(crate) fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

async fn stream_chat(app: &TestApp, body: &Value) -> (Option<String>, Vec<String>) {
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let provider = response
        .headers()
        .get("x-mistral-bot-provider")
        .map(|v| v.to_str().unwrap().to_string());
    (provider, sse_data(&response.text().await.unwrap()))
}

const QUESTION: &str = "What is the capital of France? Answer in one word.";

#[tokio::test]
async fn streaming_and_whole_completions_agree_with_usage_and_done() {
    let app = local_app().await;
    let request = json!({"model": "x", "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": 24});
    let (status, provider, whole) = app.post_chat(&request).await;
    assert_eq!(
        (status, provider.as_deref()),
        (200, Some("local")),
        "{whole}"
    );
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (provider, data) = stream_chat(&app, &streamed).await;
    assert_eq!(provider.as_deref(), Some("local"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // No content yet in the role chunk (llama-server's null; an empty string is text to
    // clients such as llama.cpp's own server tests).
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], Value::Null);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        content(&whole),
        "greedy: the stream says what the whole reply said"
    );
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    assert_eq!(last["provider"], "local");
}

#[tokio::test]
async fn ignore_eos_streams_exactly_max_tokens() {
    let app = local_app().await;
    let mut request = json!({"stream": true, "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": 40, "stream_options": {"include_usage": true}});
    // The finishing chunk, with the usage of the choice-less chunk after it.
    let last_chunk = |data: &[String]| -> Value {
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
        let mut finish: Value = serde_json::from_str(&data[data.len() - 3]).unwrap();
        let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        finish["usage"] = usage["usage"].clone();
        finish
    };
    let (_, data) = stream_chat(&app, &request).await;
    let natural = last_chunk(&data);
    assert_eq!(natural["choices"][0]["finish_reason"], "stop", "{natural}");
    assert!(natural["usage"]["completion_tokens"].as_u64().unwrap() < 40);

    request["ignore_eos"] = json!(true);
    let (provider, data) = stream_chat(&app, &request).await;
    assert_eq!(provider.as_deref(), Some("local"));
    let forced = last_chunk(&data);
    assert_eq!(forced["choices"][0]["finish_reason"], "length", "{forced}");
    assert_eq!(forced["usage"]["completion_tokens"], 40);
}

#[tokio::test]
async fn cloud_replies_stream_too() {
    let groq = FakeProvider::start(
        Shape::OpenAi,
        Behavior::answer(&["Stream", "ing ", "works."]),
    )
    .await;
    let fakes = Fakes {
        groq: Some(groq),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq], &fakes).await;
    let (provider, data) = stream_chat(
        &app,
        &json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(provider.as_deref(), Some("groq"));
    let deltas: Vec<String> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(
        deltas,
        ["Stream", "ing ", "works."],
        "pieces arrive as they came"
    );
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_reply() {
    let mut settings = http_settings();
    settings.generate.max_tokens = 400;
    let app = start_app(
        &providers_config(&[Local], &Fakes::default()),
        shared_engine().await,
        settings,
    )
    .await;
    let mut response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .json(&json!({"stream": true, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]}))
        .send()
        .await
        .unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    let mut cancelled = false;
    for _ in 0..300 {
        let counters = app.counters().await;
        if counters["local.cancelled"] == 1 {
            assert_eq!(
                (counters["local.success"], counters["local.errors"]),
                (0, 0)
            );
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled, "the dropped stream was not counted as cancelled");
}

async fn post_raw(app: &TestApp, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn bad_requests_get_openai_style_errors() {
    let app = local_app().await;
    let cases: [(&str, u16, &str); 6] = [
        ("{\"messages\": [", 400, "invalid_json"),
        ("{\"model\": \"x\"}", 400, "invalid_request"),
        ("{\"messages\": []}", 400, "invalid_request"),
        (
            "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
            400,
            "invalid_request",
        ),
        (
            "{\"messages\": [{\"role\": \"user\"}], \"temperature\": \"hot\"}",
            400,
            "invalid_request",
        ),
        ("[1, 2, 3]", 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let (got, error) = post_raw(&app, body).await;
        assert_eq!(got, status, "{body} → {error}");
        assert_eq!(error["error"]["code"], code, "{body} → {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (_, missing) = post_raw(&app, "{}").await;
    assert_eq!(missing["error"]["param"], "messages");

    let huge = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(100 * 1024)
    );
    let (status, error) = post_raw(&app, huge).await;
    assert_eq!(status, 413, "{error}");
    assert_eq!(error["error"]["code"], "body_too_large");

    let (status, error) = app.get_json("/v1/nothing").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // Still serving after all that.
    assert_eq!(app.get_json("/health").await.0, 200);
    let counters = app.counters().await;
    assert_eq!(
        counters["local.requests"], 0,
        "bad requests never reach the chain"
    );
}

#[tokio::test]
async fn api_key_guards_v1_only() {
    let mut settings = http_settings();
    settings.api_key = Some(Secret::new("s3cret"));
    let app = start_app(
        &providers_config(&[Local], &Fakes::default()),
        shared_engine().await,
        settings,
    )
    .await;
    let (status, body) = app.get_json("/v1/models").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "authentication_error");
    let wrong = app
        .client
        .get(format!("{}/v1/models", app.base))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app
        .client
        .get(format!("{}/v1/models", app.base))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let models: Value = right.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(app.get_json("/health").await.0, 200);
    assert_eq!(app.get_json("/dialogue_metrics").await.0, 200);
}

#[tokio::test]
async fn ready_is_503_until_the_model_is_loaded() {
    let (app, metrics) = start_unready(http_settings()).await;
    assert_eq!(
        app.get_json("/health").await,
        (200, json!({"status": "ok"}))
    );
    let (status, body) = app.get_json("/ready").await;
    assert_eq!((status, body["status"].as_str()), (503, Some("loading")));
    let (status, _, body) = app.ask("hi").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready");
    let (status, body) = app.get_json("/dialogue_metrics").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["engine"], Value::Null);
    assert_eq!(body["data"]["providers"]["local"]["requests"], 0);

    make_ready(
        &app,
        metrics,
        &providers_config(&[Local], &Fakes::default()),
        shared_engine().await,
    )
    .await;
    assert_eq!(app.get_json("/ready").await.0, 200);
    let (_, body) = app.get_json("/dialogue_metrics").await;
    assert_eq!(body["data"]["engine"]["slots"], 4, "{body}");
    assert_eq!(body["data"]["chain"], json!(["local"]));
}

/// Issue 7 item 7: a dead engine thread used to leave `/ready` at 200.
#[tokio::test]
async fn ready_is_503_when_the_engine_thread_died_and_chats_fall_over() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["from groq"])).await;
    let fakes = Fakes {
        groq: Some(groq),
        ..Fakes::default()
    };
    let engine = crate::util::start_engine(crate::util::engine_config()).await;
    let app = start_app(
        &providers_config(&[Local, Groq], &fakes),
        engine.clone(),
        http_settings(),
    )
    .await;
    assert_eq!(app.get_json("/ready").await.0, 200);
    engine.crash_for_tests();
    crate::util::wait_until("the engine thread ends", Duration::from_secs(30), || {
        !engine.is_alive()
    })
    .await;
    let (status, body) = app.get_json("/ready").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("engine stopped"))
    );
    let (status, _, body) = app.ask("hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body), "from groq");
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_matching_the_json() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::ServerError).await;
    let fakes = Fakes {
        groq: Some(groq),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq, Local], &fakes).await;
    let (_, provider, _) = app.ask(QUESTION).await;
    assert_eq!(provider.as_deref(), Some("local"));

    let response = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    let samples = prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let get = |name: &str, labels: &[(&str, &str)]| {
        prometheus::value(&samples, name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(
        get(
            "mistral_bot_provider_requests_total",
            &[("provider", "local")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "mistral_bot_provider_success_total",
            &[("provider", "local")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "mistral_bot_provider_requests_total",
            &[("provider", "groq")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "mistral_bot_provider_errors_total",
            &[("provider", "groq"), ("kind", "http_5xx")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "mistral_bot_provider_requests_total",
            &[("provider", "gemini")]
        ),
        0.0
    );
    assert_eq!(
        get(
            "mistral_bot_provider_latency_seconds_count",
            &[("provider", "local")]
        ),
        1.0
    );
    assert!(
        get(
            "mistral_bot_provider_latency_seconds_sum",
            &[("provider", "local")]
        ) > 0.0
    );
    assert_eq!(get("mistral_bot_engine_slots", &[]), 4.0);
    assert!(get("mistral_bot_engine_tokens_generated_total", &[]) >= 1.0);
    get("mistral_bot_engine_slots_busy", &[]);
    get("mistral_bot_engine_queue_length", &[]);
    get("mistral_bot_engine_tokens_per_second", &[]);

    let counters = app.counters().await;
    for provider in ["local", "groq", "mistral", "gemini", "openai", "canned"] {
        for counter in ["requests", "success", "timeouts"] {
            assert_eq!(
                get(
                    &format!("mistral_bot_provider_{counter}_total"),
                    &[("provider", provider)]
                ) as u64,
                counters[&format!("{provider}.{counter}")],
                "{provider}.{counter}: JSON and Prometheus agree"
            );
        }
    }
}

/// The real binary in serve mode: listens, becomes ready, answers, stops on SIGTERM.
#[tokio::test]
async fn the_binary_serves_and_stops_gracefully_on_sigterm() {
    // Its own data directory: the default (`data` under the working directory) would be
    // inside the checkout.
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .args(["--model"])
        .arg(test_model())
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--chain",
            "local,groq",
            "--slots",
            "1",
            "--ctx-size",
            "1024",
            "--max-tokens",
            "16",
            "--threads",
            "1",
            "--temperature",
            "0",
        ])
        .env_remove("GROQ_API_KEY")
        .env_remove("TELEGRAM_BOT_TOKEN")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if let Some(at) = line.find("listening on http://") {
                let url = &line[at + "listening on ".len()..];
                return url.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("the binary exited without listening:\n{}", log.join("\n"));
    })
    .await
    .expect("the binary printed its address");
    // Keep draining stderr so the child never blocks on a full pipe.
    let drain = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    let client = reqwest::Client::new();
    let ready = async {
        loop {
            if let Ok(r) = client.get(format!("{base}/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .expect("ready within 60 s");
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": QUESTION}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-mistral-bot-provider"], "local");
    let body: Value = response.json().await.unwrap();
    assert!(content(&body).contains("Paris"), "{body}");

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .unwrap();
    let rest = drain.await.unwrap();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}\n{}",
        log.join("\n"),
        rest.join("\n")
    );
    let all = format!("{}\n{}", log.join("\n"), rest.join("\n"));
    // Without a Telegram token it says how to set one, and serves the HTTP API anyway.
    assert!(all.contains("set TELEGRAM_BOT_TOKEN"), "{all}");
    assert!(all.contains("provider skipped: no API key"), "{all}");
}

#[tokio::test]
async fn completions_over_the_concurrency_limit_get_503() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::Hang).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        ..Fakes::default()
    };
    let mut settings = http_settings();
    settings.max_concurrent = 1;
    let app = std::sync::Arc::new(
        start_app(
            &providers_config(&[Groq], &fakes),
            shared_engine().await,
            settings,
        )
        .await,
    );
    let first = tokio::spawn({
        let app = std::sync::Arc::clone(&app);
        async move { app.ask("hi").await }
    });
    crate::util::wait_until(
        "the first request reached the provider",
        Duration::from_secs(10),
        || groq.hits() == 1,
    )
    .await;
    let (status, _, body) = app.ask("hi").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "busy");
    let (status, provider, _) = first.await.unwrap();
    assert_eq!(
        (status, provider.as_deref()),
        (200, Some("canned")),
        "timed out, then canned"
    );
    groq.set(Behavior::answer(&["free again"]));
    let (status, provider, _) = app.ask("hi").await;
    assert_eq!(
        (status, provider.as_deref()),
        (200, Some("groq")),
        "the place was given back"
    );
}
