//! Cloud budgets (issue 15): fake providers report `usage` in their streams as the real
//! APIs do; the chain counts it, skips a provider past its budget until the window resets
//! (tokio's clock paused and moved, no request in flight meanwhile), keeps the counts
//! across a restart, and skips a provider whose `x-ratelimit-remaining-tokens` says it is
//! spent before it answers 429.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mistral_bot::chat::{ChatMessage, ChatRequest, StreamEvent};
use mistral_bot::config::{Budget, BudgetUnit, BudgetWindow, ProviderKind};
use mistral_bot::engine::EngineHandle;
use mistral_bot::i18n::Lang;
use mistral_bot::metrics::Metrics;
use mistral_bot::providers::{Chain, build_chain};

use crate::util::app::{Fakes, providers_config};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};
use crate::util::greedy;

/// Asks `chain` once; returns who answered.
async fn ask(chain: &Chain) -> &'static str {
    let request = ChatRequest::new(vec![ChatMessage::user("Capital of France?")], greedy(16));
    let reply = chain.reply(request, Lang::En).await.unwrap();
    let events: Vec<StreamEvent> = reply.events.collect().await;
    assert!(
        matches!(events.last(), Some(StreamEvent::Done(_))),
        "{events:?}"
    );
    reply.provider
}

fn budget_of(metrics: &Metrics, provider: &str) -> mistral_bot::metrics::BudgetFigures {
    metrics
        .budgets()
        .into_iter()
        .find(|b| b.provider == provider)
        .unwrap()
}

#[tokio::test]
async fn a_provider_past_its_budget_is_skipped_until_its_window_resets_and_counts_survive_a_restart()
 {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Par", "is."])).await;
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Bon", "jour."])).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        mistral: Some(mistral.clone()),
        ..Fakes::default()
    };
    let data = tempfile::tempdir().unwrap();
    let mut config = providers_config(&[ProviderKind::Groq, ProviderKind::Mistral], &fakes);
    // Each fake answer reports 11 prompt + 3 completion tokens: 3 answers cross 30.
    config.budgets.groq = Some(Budget {
        limit: 30,
        unit: BudgetUnit::Tokens,
        window: BudgetWindow::Day,
    });
    config.state_dir = Some(data.path().to_path_buf());
    let metrics = Arc::new(Metrics::new());
    let chain = build_chain(&config, None::<EngineHandle>, Arc::clone(&metrics)).unwrap();
    for _ in 0..3 {
        assert_eq!(ask(&chain).await, "groq");
    }
    let groq_figures = budget_of(&metrics, "groq");
    assert_eq!(
        (
            groq_figures.prompt_tokens,
            groq_figures.completion_tokens,
            groq_figures.requests,
            groq_figures.used,
            groq_figures.budget
        ),
        (33, 9, 3, 42, Some(30)),
        "the counts add up from the streams' usage"
    );
    // Past its budget: skipped, without a request.
    assert_eq!(ask(&chain).await, "mistral");
    assert_eq!(groq.hits(), 3);
    assert_eq!(metrics.snapshot()["groq"].skipped, 1);
    let text = metrics.encode();
    assert!(
        text.contains("mistral_bot_provider_skipped_total{provider=\"groq\",reason=\"budget\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mistral_bot_provider_budget_used{provider=\"groq\",unit=\"tokens\"} 42"),
        "{text}"
    );
    assert!(
        text.contains("mistral_bot_provider_budget_limit{provider=\"groq\",unit=\"tokens\"} 30"),
        "{text}"
    );
    assert_eq!(
        budget_of(&metrics, "mistral").used,
        14,
        "counted without a budget"
    );

    // A restart: a new chain over the same data dir knows the counts.
    drop(chain);
    let file = data
        .path()
        .join(mistral_bot::providers::budget::BUDGET_FILE);
    crate::util::wait_until("the counts are on disk", Duration::from_secs(10), || {
        let saved: serde_json::Value = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let p = &saved["providers"];
        p["groq"]["prompt_tokens"] == 33 && p["mistral"]["completion_tokens"] == 3
    })
    .await;
    let metrics = Arc::new(Metrics::new());
    let chain = build_chain(&config, None::<EngineHandle>, Arc::clone(&metrics)).unwrap();
    assert_eq!(budget_of(&metrics, "groq").used, 42);
    assert_eq!(ask(&chain).await, "mistral", "still past the budget");
    assert_eq!(groq.hits(), 3);

    // The day ends (tokio's clock moved, nothing in flight): Groq answers again.
    let reset = budget_of(&metrics, "groq").resets_at_unix;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(reset - now + 1)).await;
    tokio::time::resume();
    assert_eq!(ask(&chain).await, "groq");
    let figures = budget_of(&metrics, "groq");
    assert_eq!((figures.used, figures.requests), (14, 1), "a new window");
}

#[tokio::test]
async fn rate_limit_headers_make_the_chain_skip_before_the_429() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Par", "is."])).await;
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Bon", "jour."])).await;
    // Enough for one answer with the reserve left, then under the reserve.
    let reserve = mistral_bot::providers::budget::MIN_REMAINING_TOKENS;
    groq.set_token_limit(reserve + 14 + 5, "1.5s");
    let fakes = Fakes {
        groq: Some(groq.clone()),
        mistral: Some(mistral.clone()),
        ..Fakes::default()
    };
    let config = providers_config(&[ProviderKind::Groq, ProviderKind::Mistral], &fakes);
    let metrics = Arc::new(Metrics::new());
    let chain = build_chain(&config, None::<EngineHandle>, Arc::clone(&metrics)).unwrap();
    assert_eq!(ask(&chain).await, "groq");
    assert_eq!(
        ask(&chain).await,
        "groq",
        "{} left: still above the reserve",
        reserve + 5
    );
    assert_eq!(
        budget_of(&metrics, "groq").header_remaining_tokens,
        Some(reserve - 9)
    );
    // Its headers said it is nearly spent: skipped, no request, no 429.
    assert_eq!(ask(&chain).await, "mistral");
    assert_eq!(groq.hits(), 2);
    assert_eq!(metrics.snapshot()["groq"].errors, 0, "never a 429");
    assert!(metrics.encode().contains(
        "mistral_bot_provider_skipped_total{provider=\"groq\",reason=\"rate_limited\"} 1"
    ));
    // Its tokens reset after 1.5 s: asked again.
    groq.set_token_limit(6000, "1m0s");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(ask(&chain).await, "groq");
}
