//! Secrets suite (issue 7): with every token and key set, traffic through Telegram and
//! HTTP, failing providers (401, 500 echoing the key it was sent), a Telegram error
//! echoing the token, and logging at `RUST_LOG=trace`: no secret in any log line, any
//! HTTP response, or any message the bot sent.

use std::time::Duration;

use serde_json::json;

use crate::util::bot_process::BotProcess;
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram, forum_group, private_chat, user};

const TOKEN: &str = "5151515151:AAH-secrets_SUITE-telegram-token";
const GROQ_KEY: &str = "gsk_secrets-suite-groq-key";
const MISTRAL_KEY: &str = "mistral-secrets-suite-key";
const GEMINI_KEY: &str = "AIzaSecretsSuiteGeminiKey";
const OPENAI_KEY: &str = "sk-secrets-suite-openai-key";
const API_KEY: &str = "secrets-suite-http-api-key";

/// Every secret, and the secret half of the token.
const SECRETS: [&str; 7] = [
    TOKEN,
    "AAH-secrets_SUITE-telegram-token",
    GROQ_KEY,
    MISTRAL_KEY,
    GEMINI_KEY,
    OPENAI_KEY,
    API_KEY,
];

fn leaks(text: &str) -> Vec<&'static str> {
    SECRETS
        .iter()
        .copied()
        .filter(|s| text.contains(s))
        .collect()
}

/// The HTTP address the bot logged.
async fn http_base(bot: &BotProcess) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(line) = bot
            .stderr()
            .lines()
            .find(|l| l.contains("HTTP API listening on"))
        {
            let url = line.rsplit("listening on ").next().unwrap().trim();
            return url.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no HTTP address logged:\n{}",
            bot.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_a_response_or_a_message() {
    // Groq echoes the key in a 500; Mistral does not know its key (401); Gemini echoes
    // the key in a 401; the generic provider answers.
    let groq = FakeProvider::start_with_key(Shape::OpenAi, Behavior::EchoKey(500), GROQ_KEY).await;
    let mistral =
        FakeProvider::start_with_key(Shape::OpenAi, Behavior::answer(&["x"]), "another-key").await;
    let gemini =
        FakeProvider::start_with_key(Shape::Gemini, Behavior::EchoKey(401), GEMINI_KEY).await;
    let openai = FakeProvider::start_with_key(
        Shape::OpenAi,
        Behavior::answer(&["Hello ", "there."]),
        OPENAI_KEY,
    )
    .await;
    let telegram = FakeTelegram::start(TOKEN).await;
    // The Bot API's error text quotes the token (a proxy in front of it might).
    telegram.fail_next(
        "sendMessage",
        1,
        500,
        &format!("Internal Server Error at /bot{TOKEN}/sendMessage"),
        None,
        false,
    );
    let data_dir = tempfile::tempdir().unwrap();
    let urls = [&groq, &mistral, &gemini, &openai].map(|f| f.base_url.to_string());
    let bot = BotProcess::start(
        &telegram,
        data_dir.path(),
        &[
            "--chain",
            "groq,mistral,gemini,openai",
            "--groq-api-key",
            GROQ_KEY,
            "--groq-base-url",
            &urls[0],
            "--mistral-api-key",
            MISTRAL_KEY,
            "--mistral-base-url",
            &urls[1],
            "--gemini-api-key",
            GEMINI_KEY,
            "--gemini-base-url",
            &urls[2],
            "--openai-api-key",
            OPENAI_KEY,
            "--openai-base-url",
            &urls[3],
            "--api-key",
            API_KEY,
            "--breaker-failures",
            "100",
        ],
        "trace",
    )
    .await;
    let base = http_base(&bot).await;

    // Telegram: a private chat and a group mention.
    telegram.send_text(&private_chat(41), &user(41, "ann", "en"), "Hi");
    telegram.send_text(
        &forum_group(-1004100),
        &user(42, "bob", "ru"),
        &format!("@{BOT_USERNAME} привет"),
    );
    telegram
        .wait_for("both answers", Duration::from_secs(120), |f| {
            f.texts(41).iter().any(|t| t.contains("Hello there."))
                && f.texts(-1004100).iter().any(|t| t.contains("Hello there."))
        })
        .await;

    // HTTP: with the key, without it, with a wrong one, and the operations endpoints.
    let client = reqwest::Client::new();
    let mut responses = String::new();
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    for auth in [Some(API_KEY), None, Some("wrong-key")] {
        for stream in [false, true] {
            let mut body = chat.clone();
            body["stream"] = json!(stream);
            let mut request = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&body);
            if let Some(key) = auth {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            responses.push_str(&format!("{:?}\n", response.headers()));
            responses.push_str(&response.text().await.unwrap());
        }
    }
    for path in [
        "/health",
        "/ready",
        "/metrics",
        "/dialogue_metrics",
        "/v1/models",
        "/nope",
    ] {
        let response = client
            .get(format!("{base}{path}"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        responses.push_str(&format!("{:?}\n", response.headers()));
        responses.push_str(&response.text().await.unwrap());
    }
    assert!(responses.contains("Hello there."), "{responses}");
    assert!(groq.hits() + gemini.hits() + mistral.hits() >= 3 * 4);

    let mut bot = bot;
    assert!(bot.terminate().await, "clean exit:\n{}", bot.stderr());
    let log = bot.stderr();
    assert!(log.contains("TRACE"), "trace logging was on");
    assert!(
        log.contains("[redacted]"),
        "the echoed key and token were logged, redacted"
    );
    let sent: String = telegram
        .calls()
        .iter()
        .filter(|c| c.method != "getUpdates")
        .map(|c| c.params.to_string())
        .collect();
    for (what, text) in [
        ("log", &log),
        ("HTTP responses", &responses),
        ("Telegram messages", &sent),
    ] {
        let found = leaks(text);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !leaks(l).is_empty())
            .take(5)
            .collect();
        assert!(
            found.is_empty(),
            "{found:?} in the {what}:\n{}",
            lines.join("\n")
        );
    }
}
