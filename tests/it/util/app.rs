//! The app in process: the real router on a loopback port over the real engine, with a
//! chain built by `providers::build_chain` from a config pointing at fake providers.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use mistral_bot::config::{CloudConfig, ProviderKind, ProvidersConfig, Secret};
use mistral_bot::conversation::{ConversationStore, HistoryLimits};
use mistral_bot::engine::EngineHandle;
use mistral_bot::http::{AppState, HttpSettings};
use mistral_bot::metrics::Metrics;
use mistral_bot::providers::build_chain;
use mistral_bot::responder::{Responder, ResponderConfig};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::fake_provider::{FAKE_KEY, FakeProvider};
use super::{engine_config, greedy, start_engine};

/// One engine for the tests that only need one to exist (their chains skip it, or they
/// only send a few short requests).
pub async fn shared_engine() -> EngineHandle {
    static ENGINE: OnceCell<EngineHandle> = OnceCell::const_new();
    ENGINE
        .get_or_init(|| start_engine(engine_config()))
        .await
        .clone()
}

/// Where each cloud provider of a test points.
#[derive(Default)]
pub struct Fakes {
    /// Groq's fake.
    pub groq: Option<FakeProvider>,
    /// Mistral's fake.
    pub mistral: Option<FakeProvider>,
    /// Gemini's fake.
    pub gemini: Option<FakeProvider>,
    /// The generic provider's fake.
    pub openai: Option<FakeProvider>,
}

/// Cloud timeout in tests: long enough for a loaded CI machine, short enough to wait out.
pub const CLOUD_TIMEOUT: Duration = Duration::from_millis(1500);

fn cloud(fake: &Option<FakeProvider>) -> CloudConfig {
    CloudConfig {
        // An unused fake still needs a URL: port 9 (discard) is never listened on here.
        base_url: fake.as_ref().map_or_else(
            || "http://127.0.0.1:9/v1".parse().unwrap(),
            |f| f.base_url.clone(),
        ),
        api_key: fake.as_ref().map(|_| Secret::new(FAKE_KEY)),
        key_required: true,
        model: "fake-model".into(),
        timeout: CLOUD_TIMEOUT,
    }
}

/// A chain config over `chain`, the cloud providers pointing at `fakes` (with the right
/// key); providers without a fake have no key.
pub fn providers_config(chain: &[ProviderKind], fakes: &Fakes) -> ProvidersConfig {
    ProvidersConfig {
        chain: chain.to_vec(),
        local_timeout: Duration::from_secs(120),
        groq: cloud(&fakes.groq),
        mistral: cloud(&fakes.mistral),
        gemini: cloud(&fakes.gemini),
        openai: cloud(&fakes.openai),
        breaker_failures: NonZeroU32::new(3).unwrap(),
        breaker_cooldown: Duration::from_secs(30),
    }
}

/// HTTP settings for tests: greedy, short replies.
pub fn http_settings() -> HttpSettings {
    HttpSettings {
        api_key: None,
        body_limit: 64 * 1024,
        max_concurrent: 64,
        model_id: "SmolLM2-135M-Instruct.Q4_1".into(),
        generate: greedy(48),
        connections: mistral_bot::http::ConnectionLimits::default(),
    }
}

/// The app running on a loopback port.
pub struct TestApp {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// A client for it.
    pub client: reqwest::Client,
    /// The app's state (to make it ready later, in readiness tests).
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts the app with `settings`; not ready until [`make_ready`].
pub async fn start_unready(settings: HttpSettings) -> (TestApp, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(settings, Arc::clone(&metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mistral_bot::serve_http(
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let app = TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        state,
        stop: Some(stop_tx),
    };
    (app, metrics)
}

/// Builds the chain of `providers` over `engine`, a responder over it (no system prompt,
/// histories in memory) and makes the app ready.
pub async fn make_ready(
    app: &TestApp,
    metrics: Arc<Metrics>,
    providers: &ProvidersConfig,
    engine: EngineHandle,
) {
    let chain = build_chain(providers, engine.clone(), metrics).unwrap();
    let store = ConversationStore::in_memory(HistoryLimits::default())
        .await
        .unwrap();
    let responder = Responder::new(Arc::new(chain), store, ResponderConfig::default());
    app.state.set_ready(Arc::new(responder), engine);
}

/// Starts a ready app.
pub async fn start_app(
    providers: &ProvidersConfig,
    engine: EngineHandle,
    settings: HttpSettings,
) -> TestApp {
    let (app, metrics) = start_unready(settings).await;
    make_ready(&app, metrics, providers, engine).await;
    app
}

/// Starts a ready app whose chain is `chain` (cloud providers at `fakes`) over the shared
/// engine, with the default HTTP settings.
pub async fn chain_app(chain: &[ProviderKind], fakes: &Fakes) -> TestApp {
    start_app(
        &providers_config(chain, fakes),
        shared_engine().await,
        http_settings(),
    )
    .await
}

impl TestApp {
    /// `GET path` as JSON, with its status.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/chat/completions` (non-streaming) asking `question`: status, provider
    /// header, body.
    pub async fn ask(&self, question: &str) -> (u16, Option<String>, Value) {
        self.post_chat(&json!({
            "model": "any",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 32
        }))
        .await
    }

    /// `POST /v1/chat/completions` with `body`.
    pub async fn post_chat(&self, body: &Value) -> (u16, Option<String>, Value) {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let provider = response
            .headers()
            .get("x-mistral-bot-provider")
            .map(|v| v.to_str().unwrap().to_string());
        (
            status,
            provider,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    /// Every provider counter of `/dialogue_metrics`, as `provider.counter` → value.
    pub async fn counters(&self) -> BTreeMap<String, u64> {
        let (status, body) = self.get_json("/dialogue_metrics").await;
        assert_eq!(status, 200, "{body}");
        let mut out = BTreeMap::new();
        for (provider, figures) in body["data"]["providers"].as_object().unwrap() {
            for counter in [
                "requests",
                "success",
                "errors",
                "timeouts",
                "cancelled",
                "skipped",
            ] {
                let value = figures[counter]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{provider}.{counter} missing: {figures}"));
                out.insert(format!("{provider}.{counter}"), value);
            }
        }
        out
    }

    /// The error kinds counted for `provider`.
    pub async fn error_kinds(&self, provider: &str) -> Value {
        let (_, body) = self.get_json("/dialogue_metrics").await;
        body["data"]["providers"][provider]["errors_by_kind"].clone()
    }
}

/// Asserts that from `before` to `after` exactly the counters in `moved` moved, by the
/// amounts given, and every other counter stayed put.
pub fn assert_moved(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    moved: &[(&str, u64)],
) {
    let mut expected = before.clone();
    for (name, by) in moved {
        let value = expected
            .get_mut(*name)
            .unwrap_or_else(|| panic!("no counter {name}"));
        *value += by;
    }
    let diff: Vec<String> = expected
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: expected {v}, got {:?}", after.get(k)))
        .collect();
    assert!(
        diff.is_empty(),
        "counters moved unexpectedly:\n{}",
        diff.join("\n")
    );
}

/// The text of a non-streamed completion.
pub fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {body}"))
}
