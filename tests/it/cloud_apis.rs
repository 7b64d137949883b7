//! The cloud clients against today's APIs (issue 7, found item 9): reasoning models' token
//! field, Mistral's chunk arrays with thinking, Gemini's thinking settings and safety stops,
//! retired models, and the start-up check of every provider. The fakes speak each shape
//! and misbehave as the real services do (404 `model_not_found`, 400 for `max_tokens` on a
//! reasoning model, `finishReason: SAFETY`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use mistral_bot::chat::{ChatMessage, ChatRequest, FinishReason, GenerateParams, StreamEvent};
use mistral_bot::config::{CloudConfig, ProviderKind, Secret};
use mistral_bot::i18n::{self, Lang};
use mistral_bot::metrics::Metrics;
use mistral_bot::providers::probe::{self, ProbeOutcome, Verdict};
use mistral_bot::providers::{Chain, GeminiProvider, OpenAiFlavor, OpenAiProvider, Provider};
use serde_json::json;

use crate::util::app::{Fakes, providers_config};
use crate::util::fake_provider::{
    Behavior, FAKE_KEY, FAKE_MODEL, FakeProvider, REASONING_MODEL, Shape,
};

fn cloud(fake: &FakeProvider, model: &str) -> CloudConfig {
    CloudConfig {
        base_url: fake.base_url.clone(),
        api_key: Some(Secret::new(FAKE_KEY)),
        key_required: true,
        model: model.into(),
        timeout: Duration::from_secs(5),
    }
}

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest::new(
        vec![ChatMessage::user("Capital of France?")],
        GenerateParams {
            max_tokens,
            temperature: 0.7,
            ..GenerateParams::default()
        },
    )
}

/// A chain of `providers` (each with a 5 s timeout), then the canned apology.
fn chain_of(providers: Vec<Box<dyn Provider>>) -> Chain {
    let mut builder = Chain::builder(Arc::new(Metrics::new()));
    for provider in providers {
        builder = builder.provider(BoxedProvider(provider), Duration::from_secs(5));
    }
    builder.build()
}

struct BoxedProvider(Box<dyn Provider>);

impl Provider for BoxedProvider {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn stream(
        &self,
        request: ChatRequest,
    ) -> futures::future::BoxFuture<
        '_,
        Result<mistral_bot::providers::EventStream, mistral_bot::providers::ProviderError>,
    > {
        self.0.stream(request)
    }
}

/// The chain's reply: who answered, its text, why it ended.
async fn reply(
    chain: &Chain,
    request: ChatRequest,
    lang: Lang,
) -> (&'static str, String, FinishReason) {
    let reply = chain
        .reply(request, lang)
        .await
        .expect("the request is not refused");
    let events: Vec<StreamEvent> = reply.events.collect().await;
    let mut text = String::new();
    let mut finish = None;
    for event in events {
        match event {
            StreamEvent::Delta(piece) => text.push_str(&piece),
            StreamEvent::Done(done) => finish = Some(done.finish_reason),
            StreamEvent::Started
            | StreamEvent::Prompt(_)
            | StreamEvent::Logprobs(_)
            | StreamEvent::Choice(_)
            | StreamEvent::ChoiceEnd(_)
            | StreamEvent::ToolCall(_) => {}
        }
    }
    (
        reply.provider,
        text,
        finish.expect("the reply ends with Done"),
    )
}

fn openai(flavor: OpenAiFlavor, fake: &FakeProvider, model: &str) -> Box<dyn Provider> {
    Box::new(OpenAiProvider::new(
        flavor,
        reqwest::Client::new(),
        &cloud(fake, model),
    ))
}

#[tokio::test]
async fn a_reasoning_model_gets_max_completion_tokens_and_default_sampling() {
    let fake = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Par", "is."])).await;
    // The fake answers 400 `unsupported_parameter` to `max_tokens` or temperature 0.7 here.
    let chain = chain_of(vec![openai(OpenAiFlavor::Generic, &fake, REASONING_MODEL)]);
    let (provider, text, _) = reply(&chain, request(100), Lang::En).await;
    assert_eq!((provider, text.as_str()), ("openai", "Paris."));
    let sent = &fake.requests()[0].body;
    assert_eq!(sent["max_completion_tokens"], json!(100 + 1024), "{sent}");
    assert!(
        sent.get("max_tokens").is_none() && sent.get("temperature").is_none(),
        "{sent}"
    );
    assert_eq!(sent["reasoning_effort"], "low");
}

#[tokio::test]
async fn each_api_gets_the_token_field_it_reads() {
    let fake = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Hi."])).await;
    for (flavor, field, temperature) in [
        (OpenAiFlavor::Groq, "max_completion_tokens", true),
        (OpenAiFlavor::Mistral, "max_tokens", true),
        // A self-hosted server (vLLM, llama-server, Ollama): `max_tokens`, which all read.
        (OpenAiFlavor::Generic, "max_tokens", true),
    ] {
        let chain = chain_of(vec![openai(flavor, &fake, FAKE_MODEL)]);
        let (_, text, _) = reply(&chain, request(64), Lang::En).await;
        assert_eq!(text, "Hi.");
        let sent = fake.requests().last().unwrap().body.clone();
        assert_eq!(sent[field], json!(64), "{flavor:?}: {sent}");
        assert_eq!(sent.get("temperature").is_some(), temperature, "{sent}");
        let other = if field == "max_tokens" {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        assert!(sent.get(other).is_none(), "{flavor:?} sent both: {sent}");
    }
}

#[tokio::test]
async fn mistral_thinking_chunks_are_skipped_in_the_stream() {
    let fake = FakeProvider::start(
        Shape::OpenAi,
        Behavior::Thinking {
            thoughts: vec!["The user asks about France. ".into(), "Paris it is.".into()],
            answer: vec!["The capital ".into(), "is Paris.".into()],
        },
    )
    .await;
    let chain = chain_of(vec![openai(OpenAiFlavor::Mistral, &fake, FAKE_MODEL)]);
    let (provider, text, finish) = reply(&chain, request(64), Lang::En).await;
    assert_eq!(provider, "mistral");
    assert_eq!(text, "The capital is Paris.");
    assert_eq!(finish, FinishReason::Stop);
}

#[tokio::test]
async fn gemini_gets_a_small_thinking_setting_and_its_thoughts_are_skipped() {
    let fake = FakeProvider::start(
        Shape::Gemini,
        Behavior::Thinking {
            thoughts: vec!["Thinking about France.".into()],
            answer: vec!["Par".into(), "is.".into()],
        },
    )
    .await;
    for (model, thinking, max_output) in [
        (
            "gemini-3.5-flash-lite",
            json!({"thinkingLevel": "minimal"}),
            100 + 1024,
        ),
        (
            "gemini-3.1-pro-preview",
            json!({"thinkingLevel": "low"}),
            100 + 1024,
        ),
        ("gemini-2.5-flash", json!({"thinkingBudget": 0}), 100),
        ("gemini-2.5-pro", json!({"thinkingBudget": 128}), 100 + 128),
    ] {
        fake.set_models(&[model]);
        let gemini = GeminiProvider::new(reqwest::Client::new(), &cloud(&fake, model));
        let chain = chain_of(vec![Box::new(gemini)]);
        let (provider, text, _) = reply(&chain, request(100), Lang::En).await;
        assert_eq!((provider, text.as_str()), ("gemini", "Paris."), "{model}");
        let sent = fake.requests().last().unwrap().body.clone();
        let config = &sent["generationConfig"];
        assert_eq!(config["thinkingConfig"], thinking, "{model}: {sent}");
        assert_eq!(config["maxOutputTokens"], json!(max_output), "{model}");
        // Gemini 3 deprecated the sampling parameters; 2.5 still takes them.
        assert_eq!(
            config.get("temperature").is_some(),
            model.starts_with("gemini-2"),
            "{model}"
        );
    }
}

#[tokio::test]
async fn a_safety_stop_ends_the_reply_with_a_notice_in_the_users_language() {
    let fake = FakeProvider::start(
        Shape::Gemini,
        Behavior::Filtered(vec!["Here is how".into()]),
    )
    .await;
    let gemini = || {
        Box::new(GeminiProvider::new(
            reqwest::Client::new(),
            &cloud(&fake, FAKE_MODEL),
        ))
    };
    for lang in [Lang::En, Lang::Ru] {
        let chain = chain_of(vec![gemini()]);
        let (provider, text, finish) = reply(&chain, request(64), lang).await;
        assert_eq!(provider, "gemini");
        assert_eq!(
            text,
            format!("Here is how{}", i18n::content_filtered_notice(lang))
        );
        assert_eq!(finish, FinishReason::ContentFilter);
    }
    // Stopped before any text: the notice alone is the answer (no hand-over, no apology).
    fake.set(Behavior::Filtered(Vec::new()));
    let backup = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Sure!"])).await;
    let chain = chain_of(vec![
        gemini(),
        openai(OpenAiFlavor::Groq, &backup, FAKE_MODEL),
    ]);
    let (provider, text, finish) = reply(&chain, request(64), Lang::En).await;
    assert_eq!((provider, finish), ("gemini", FinishReason::ContentFilter));
    assert_eq!(text, i18n::content_filtered_notice(Lang::En).trim_start());
    assert_eq!(backup.hits(), 0);
    // OpenAI's `content_filter` is the same stop.
    let filtered =
        FakeProvider::start(Shape::OpenAi, Behavior::Filtered(vec!["Well".into()])).await;
    let chain = chain_of(vec![openai(OpenAiFlavor::Generic, &filtered, FAKE_MODEL)]);
    let (_, text, finish) = reply(&chain, request(64), Lang::Ru).await;
    assert_eq!(
        text,
        format!("Well{}", i18n::content_filtered_notice(Lang::Ru))
    );
    assert_eq!(finish, FinishReason::ContentFilter);
}

#[tokio::test]
async fn a_retired_model_names_its_flag_and_hands_over() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["never"])).await;
    groq.set_models(&["openai/gpt-oss-120b"]);
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["never"])).await;
    gemini.set_models(&["gemini-3.5-flash-lite"]);
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Bon", "jour."])).await;
    let retired_groq = OpenAiProvider::new(
        OpenAiFlavor::Groq,
        reqwest::Client::new(),
        &cloud(&groq, "llama-3.3-70b-versatile"),
    );
    let error = match retired_groq.stream(request(8)).await {
        Err(e) => e,
        Ok(_) => panic!("a retired model cannot answer"),
    };
    assert_eq!(error.kind(), "model_not_found");
    assert!(
        error.to_string().contains("--groq-model (GROQ_MODEL)"),
        "{error}"
    );
    let retired_gemini =
        GeminiProvider::new(reqwest::Client::new(), &cloud(&gemini, "gemini-2.5-flash"));
    let error = match retired_gemini.stream(request(8)).await {
        Err(e) => e,
        Ok(_) => panic!("a retired model cannot answer"),
    };
    assert!(
        error.to_string().contains("--gemini-model (GEMINI_MODEL)"),
        "{error}"
    );

    let chain = chain_of(vec![
        Box::new(retired_groq),
        Box::new(retired_gemini),
        openai(OpenAiFlavor::Mistral, &mistral, FAKE_MODEL),
    ]);
    let (provider, text, _) = reply(&chain, request(8), Lang::En).await;
    assert_eq!((provider, text.as_str()), ("mistral", "Bonjour."));
    let snapshot = chain.metrics().snapshot();
    for provider in ["groq", "gemini"] {
        assert_eq!(
            snapshot[provider].errors_by_kind.get("model_not_found"),
            Some(&1),
            "{provider}: {:?}",
            snapshot[provider].errors_by_kind
        );
    }
}

#[tokio::test]
async fn the_startup_check_reports_key_and_model_of_each_provider() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    groq.set_models(&["openai/gpt-oss-120b", "llama-3.1-8b-instant"]);
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["x"])).await;
    gemini.set_models(&["gemini-3.5-flash-lite", "gemini-3.8-flash"]);
    let openai = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        mistral: Some(mistral.clone()),
        gemini: Some(gemini.clone()),
        openai: None,
    };
    let mut config = providers_config(
        &[
            ProviderKind::Local,
            ProviderKind::Groq,
            ProviderKind::Mistral,
            ProviderKind::Gemini,
            ProviderKind::OpenAi,
        ],
        &fakes,
    );
    config.groq.model = "openai/gpt-oss-120b".into();
    config.mistral.api_key = Some(Secret::new("wrong-key"));
    config.gemini.model = "gemini-2.5-flash".into();
    config.openai.base_url = openai.base_url.clone();
    config.openai.model = "anything".into();
    config.openai.key_required = false;
    let reports = probe::probe_chain(&reqwest::Client::new(), &config).await;
    for report in &reports {
        println!(
            "{:?} {}: {}",
            report.verdict(),
            report.kind.name(),
            report.summary()
        );
    }
    let kinds: Vec<_> = reports.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            ProviderKind::Groq,
            ProviderKind::Mistral,
            ProviderKind::Gemini,
            ProviderKind::OpenAi
        ]
    );
    assert_eq!(reports[0].outcome, ProbeOutcome::Ready);
    assert!(matches!(
        reports[1].outcome,
        ProbeOutcome::KeyRejected { status: 401, .. }
    ));
    assert!(
        reports[1]
            .summary()
            .contains("--mistral-api-key (MISTRAL_API_KEY)")
    );
    assert!(!reports[1].summary().contains("wrong-key"));
    assert_eq!(
        reports[2].outcome,
        ProbeOutcome::ModelMissing {
            suggestions: vec!["gemini-3.5-flash-lite".into(), "gemini-3.8-flash".into()]
        }
    );
    assert!(
        reports[2]
            .summary()
            .contains("--gemini-model (GEMINI_MODEL)")
    );
    assert_eq!(
        reports[3].verdict(),
        Verdict::Fail,
        "{}",
        reports[3].summary()
    );
    // One request each, nothing else (the check costs no tokens).
    assert_eq!(
        groq.hits() + mistral.hits() + gemini.hits(),
        0,
        "no chat request was sent"
    );
}
