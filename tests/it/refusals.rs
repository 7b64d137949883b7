//! Requests refused for what they ask (issue 7 items 5 and 6): a prompt too long for the
//! window, a parameter a provider rejects, a prompt a safety filter blocks. They never
//! open a provider's breaker; an HTTP client gets an OpenAI-style 4xx saying what to
//! change (never the canned "all my language models are busy"); the canned apology stays
//! for providers that are really down. Real engine, fake cloud providers.

use mistral_bot::config::ProviderKind::{Gemini, Groq, Local, Mistral};
use serde_json::{Value, json};

use crate::util::app::{Fakes, chain_app, content};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};

/// A conversation whose template scaffolding alone is over the 1024-token test window:
/// 300 system messages (about 5 tokens of markup each). No single message is long, so
/// truncating a long message cannot make it fit.
fn oversized() -> Value {
    let mut messages: Vec<Value> = (0..300)
        .map(|i| json!({"role": "system", "content": format!("rule {i}")}))
        .collect();
    messages.push(json!({"role": "user", "content": "Hi"}));
    json!({"model": "any", "messages": messages, "max_tokens": 4, "temperature": 0})
}

/// Asserts an OpenAI-style error with `status` and `code`; returns its message.
fn error_message(reply: &(u16, Option<String>, Value), status: u16, code: &str) -> String {
    let (got, _, body) = reply;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap().to_string();
    assert!(
        !message.contains("busy"),
        "not the canned apology: {message}"
    );
    message
}

#[tokio::test]
async fn a_prompt_too_long_for_the_local_window_is_a_400_and_the_breaker_stays_shut() {
    let app = chain_app(&[Local], &Fakes::default()).await;
    // More refusals than --breaker-failures (3).
    for _ in 0..5 {
        let reply = app.post_chat(&oversized()).await;
        let message = error_message(&reply, 400, "context_length_exceeded");
        assert_eq!(reply.2["error"]["param"], "messages");
        assert!(
            message.contains("max_tokens"),
            "says what to change: {message}"
        );
    }
    let (status, provider, _) = app.ask("Hi").await;
    assert_eq!(
        (status, provider.as_deref()),
        (200, Some("local")),
        "the local engine still answers"
    );
    let counters = app.counters().await;
    assert_eq!(counters["local.skipped"], 0, "{counters:?}");
    assert_eq!(app.error_kinds("local").await["prompt"], 5);
}

#[tokio::test]
async fn a_local_overflow_falls_over_to_a_larger_cloud_window() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Roomy ", "here."])).await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Local, Groq], &fakes).await;
    for _ in 0..4 {
        let (status, provider, body) = app.post_chat(&oversized()).await;
        assert_eq!((status, provider.as_deref()), (200, Some("groq")), "{body}");
        assert_eq!(content(&body), "Roomy here.");
    }
    assert_eq!(groq.hits(), 4);
    assert_eq!(app.counters().await["local.skipped"], 0);
}

#[tokio::test]
async fn cloud_4xx_for_the_request_are_400s_and_do_not_trip_the_breaker() {
    let groq = FakeProvider::start(
        Shape::OpenAi,
        Behavior::Reject {
            status: 400,
            body: json!({"error": {"message": "Please reduce the length of the messages or completion.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        },
    )
    .await;
    let fakes = Fakes {
        groq: Some(groq.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq], &fakes).await;
    for _ in 0..4 {
        let reply = app.ask("A long story").await;
        let message = error_message(&reply, 400, "context_length_exceeded");
        assert!(message.contains("reduce the length"), "{message}");
    }
    groq.set(Behavior::Reject {
        status: 400,
        body: json!({"error": {"message": "'top_p' must be greater than 0",
            "type": "invalid_request_error", "param": "top_p"}}),
    });
    let reply = app.ask("Hi").await;
    let message = error_message(&reply, 400, "invalid_request");
    assert!(message.contains("top_p"), "{message}");
    groq.set(Behavior::answer(&["Fine."]));
    let (status, provider, _) = app.ask("Hi").await;
    assert_eq!((status, provider.as_deref()), (200, Some("groq")));
    assert_eq!(groq.hits(), 6, "never skipped");
    assert_eq!(app.counters().await["groq.skipped"], 0);
}

#[tokio::test]
async fn a_blocked_prompt_is_a_content_filter_400_and_not_shopped_around() {
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::Blocked).await;
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["Sure."])).await;
    let fakes = Fakes {
        gemini: Some(gemini.clone()),
        mistral: Some(mistral.clone()),
        ..Fakes::default()
    };
    let app = chain_app(&[Gemini, Mistral], &fakes).await;
    for _ in 0..4 {
        let reply = app.ask("Something the filter dislikes").await;
        let message = error_message(&reply, 400, "content_filter");
        assert!(message.contains("SAFETY"), "{message}");
    }
    assert_eq!((gemini.hits(), mistral.hits()), (4, 0));
    assert_eq!(app.error_kinds("gemini").await["content_filter"], 4);
    assert_eq!(app.counters().await["gemini.skipped"], 0);
}

#[tokio::test]
async fn providers_really_down_still_get_the_canned_apology() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::ServerError).await;
    let fakes = Fakes {
        groq: Some(groq),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq], &fakes).await;
    let (status, provider, body) = app.ask("Hi").await;
    assert_eq!(
        (status, provider.as_deref()),
        (200, Some("canned")),
        "{body}"
    );
    assert!(content(&body).contains("busy"), "{body}");
}

/// Telegram users get a polite, specific reply in their language for their own
/// mistakes, and the refused message does not enter the conversation.
#[tokio::test]
async fn telegram_users_get_a_specific_reply_in_their_language() {
    use crate::util::bot_process::BotProcess;
    use crate::util::fake_telegram::{FakeTelegram, private_chat, user};
    use mistral_bot::i18n::{self, Lang};
    use std::time::Duration;

    let gemini = FakeProvider::start(Shape::Gemini, Behavior::Blocked).await;
    let groq = FakeProvider::start(
        Shape::OpenAi,
        Behavior::Reject {
            status: 400,
            body: json!({"error": {"message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error", "code": "context_length_exceeded"}}),
        },
    )
    .await;
    let telegram = FakeTelegram::start("4242424242:AAE-refusals-token").await;
    let data_dir = tempfile::tempdir().unwrap();
    let gemini_url = gemini.base_url.to_string();
    let groq_url = groq.base_url.to_string();
    let key = crate::util::fake_provider::FAKE_KEY;
    let bot = BotProcess::start(
        &telegram,
        data_dir.path(),
        &[
            "--chain",
            "gemini",
            "--gemini-api-key",
            key,
            "--gemini-base-url",
            &gemini_url,
            "--groq-api-key",
            key,
            "--groq-base-url",
            &groq_url,
        ],
        "info",
    )
    .await;
    let chat = private_chat(31);
    telegram.send_text(&chat, &user(31, "ivan", "ru"), "Что-то запретное");
    let wait = Duration::from_secs(120);
    telegram
        .wait_for("the refusal", wait, |f| !f.texts(31).is_empty())
        .await;
    assert_eq!(
        telegram.texts(31),
        [i18n::content_blocked(Lang::Ru)],
        "{}",
        bot.stderr()
    );
    drop(bot);

    // The same bot over Groq's context-length refusal, in English.
    let data_dir = tempfile::tempdir().unwrap();
    let bot = BotProcess::start(
        &telegram,
        data_dir.path(),
        &[
            "--chain",
            "groq",
            "--groq-api-key",
            key,
            "--groq-base-url",
            &groq_url,
        ],
        "info",
    )
    .await;
    let chat = private_chat(32);
    telegram.send_text(&chat, &user(32, "jane", "en"), "A very long text");
    telegram
        .wait_for("the refusal", wait, |f| !f.texts(32).is_empty())
        .await;
    assert_eq!(
        telegram.texts(32),
        [i18n::too_long(Lang::En)],
        "{}",
        bot.stderr()
    );
    assert!(!bot.stderr().contains("panicked"), "{}", bot.stderr());
}
