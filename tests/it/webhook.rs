//! Issue 15, part 3: Telegram's webhook mode. The real binary against the fake Bot API,
//! which sets webhooks and pushes updates to them as Telegram does (with the secret
//! header, re-sent until a 2xx, `getUpdates` answering 409 meanwhile). The fake plays a
//! self-hosted Bot API server, so the webhook URL may be http on loopback, and stands in
//! for the reverse proxy: it delivers to the bot's own HTTP address with the URL's path.

use std::time::Duration;

use serde_json::json;

use crate::restart::{echo_flags, en_user};
use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::{BotProcess, Launch};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};
use crate::util::fake_telegram::{FakeTelegram, private_chat};
use crate::util::prometheus;
use crate::util::test_model;

/// The webhook's public URL as the bot is given it (the port is the "proxy's").
const WEBHOOK_URL: &str = "http://127.0.0.1:8443/telegram/hook-5f2c9a";
const PATH: &str = "/telegram/hook-5f2c9a";

/// Starts the bot in webhook mode with `extra` flags; returns once it set the webhook,
/// with its HTTP base URL (where the fake now delivers).
async fn start(
    fake: &FakeTelegram,
    data_dir: &std::path::Path,
    extra: &[&str],
) -> (BotProcess, String) {
    let set_before = set_webhooks(fake);
    let mut flags = extra.to_vec();
    flags.extend_from_slice(&["--telegram-webhook-url", WEBHOOK_URL]);
    let mut bot = BotProcess::spawn(fake, data_dir, &flags, "info", &Launch::default());
    let base = bot.http_url().await;
    fake.forward_webhook_to(&base);
    let deadline = std::time::Instant::now() + LONG;
    while set_webhooks(fake) == set_before {
        if let Some(status) = bot.exited() {
            panic!("the bot exited with {status}:\n{}", bot.stderr());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no setWebhook\n{}",
            report(fake, &bot.stderr())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (bot, base)
}

/// How many `setWebhook` calls succeeded.
fn set_webhooks(fake: &FakeTelegram) -> usize {
    fake.calls_of("setWebhook")
        .iter()
        .filter(|c| c.status == 200)
        .count()
}

fn report(fake: &FakeTelegram, stderr: &str) -> String {
    let pushes: Vec<String> = fake
        .pushes()
        .iter()
        .map(|p| {
            format!(
                "{:.3}s update {} → {:?}",
                p.at.as_secs_f64(),
                p.update_id,
                p.status
            )
        })
        .collect();
    format!(
        "{}\n--- webhook pushes ---\n{}\n--- bot stderr ---\n{stderr}",
        fake.dump(),
        pushes.join("\n")
    )
}

/// `POST {base}{PATH}` with `secret` in the header and `body`; the status.
async fn post(base: &str, secret: Option<&str>, body: &str) -> u16 {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{PATH}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(secret) = secret {
        request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
    }
    request.send().await.unwrap().status().as_u16()
}

/// `/metrics`, parsed.
async fn metrics(base: &str) -> Vec<prometheus::Sample> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus::parse(&text).unwrap()
}

fn webhook_count(samples: &[prometheus::Sample], outcome: &str) -> f64 {
    prometheus::value(
        samples,
        "mistral_bot_telegram_webhook_requests_total",
        &[("outcome", outcome)],
    )
    .unwrap_or(-1.0)
}

/// A fake Bot API, a provider answering `Echo: <question>`, a data directory, and the
/// flags that make the bot answer with that provider.
async fn echo_setup() -> (FakeTelegram, FakeProvider, tempfile::TempDir, Vec<String>) {
    let fake = FakeTelegram::start(TOKEN).await;
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let flags = echo_flags(&provider);
    (fake, provider, tempfile::tempdir().unwrap(), flags)
}

/// Whether update `id` got a 200 from the webhook.
fn delivered(fake: &FakeTelegram, id: i64) -> bool {
    fake.pushes()
        .iter()
        .any(|p| p.update_id == id && p.status == Some(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_message_is_answered_by_the_model_and_forged_requests_reach_nothing() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    // The local model answers (the base flags: test model, --threads 1).
    let (bot, base) = start(&fake, data_dir.path(), &[]).await;
    let set = fake.calls_of("setWebhook").pop().unwrap();
    let secret = fake.webhook_secret().expect("a secret token");
    assert_eq!(set.params["url"], WEBHOOK_URL);
    assert_eq!(secret.len(), 64, "{secret}");
    assert_eq!(
        set.params["allowed_updates"],
        json!([
            "message",
            "edited_message",
            "callback_query",
            "stopped_message_generation"
        ])
    );
    assert_eq!(set.params["max_connections"], 40);
    assert_eq!(set.params["drop_pending_updates"], false);

    // Forged requests: no secret, a wrong one, and garbage with the right one.
    let forged = json!({"update_id": 1, "message": {"message_id": 1, "date": 1_700_000_000,
        "chat": private_chat(301), "from": en_user(301), "text": "forged"}})
    .to_string();
    assert_eq!(post(&base, None, &forged).await, 401);
    assert_eq!(post(&base, Some("not-the-secret"), &forged).await, 401);
    assert_eq!(post(&base, Some(&secret), "{not json").await, 400);
    assert_eq!(post(&base, Some(&secret), r#"{"message": {}}"#).await, 400);

    fake.send_text(&private_chat(300), &en_user(300), "Say hi.");
    let id = fake.last_update_id();
    fake.wait_for("the pushed message answered", LONG, |f| {
        f.messages(300).iter().any(|m| m.html)
    })
    .await;
    let stderr = bot.stderr();
    let report = report(&fake, &stderr);
    assert!(fake.calls_in(301, "sendMessage").is_empty(), "{report}");
    assert!(fake.calls_in(301, "sendChatAction").is_empty(), "{report}");
    let samples = metrics(&base).await;
    assert_eq!(
        prometheus::value(&samples, "mistral_bot_engine_requests_finished_total", &[]),
        Some(1.0),
        "the engine answered the pushed message only\n{report}"
    );
    assert_eq!(webhook_count(&samples, "unauthorized"), 2.0, "{report}");
    assert_eq!(webhook_count(&samples, "bad_request"), 2.0, "{report}");
    assert_eq!(webhook_count(&samples, "accepted"), 1.0, "{report}");
    assert!(delivered(&fake, id), "{report}");
    assert!(
        fake.calls_of("getUpdates").is_empty() && fake.calls_of("deleteWebhook").is_empty(),
        "no polling in webhook mode\n{report}"
    );
    assert!(!stderr.contains(&secret), "the secret is never logged");
    assert!(!stderr.contains("hook-5f2c9a"), "nor the secret path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_delivered_twice_is_answered_once() {
    let _permit = BOTS.acquire().await.unwrap();
    let (fake, _provider, data_dir, flags) = echo_setup().await;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (bot, base) = start(&fake, data_dir.path(), &flags).await;
    fake.send_text(&private_chat(310), &en_user(310), "only once");
    let id = fake.last_update_id();
    fake.wait_for("the answer", LONG, |f| {
        f.messages(310).iter().any(|m| m.html)
    })
    .await;
    fake.wait_for("the delivery taken", LONG, |f| delivered(f, id))
        .await;
    // Telegram did not get our 200 and delivers it again.
    fake.redeliver(id);
    fake.wait_for("the second delivery taken", LONG, |f| {
        f.pushes()
            .iter()
            .filter(|p| p.update_id == id && p.status == Some(200))
            .count()
            == 2
    })
    .await;
    // Let a second answer show up, if there were one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = report(&fake, &bot.stderr());
    assert_eq!(fake.texts(310), ["Echo: only once"], "{report}");
    let samples = metrics(&base).await;
    assert_eq!(webhook_count(&samples, "accepted"), 1.0, "{report}");
    assert_eq!(webhook_count(&samples, "duplicate"), 1.0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_webhook_took_an_update_answers_it_after_the_restart_once() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    // The first run's provider never answers: the update is taken (200), not answered.
    let hanging = FakeProvider::start(Shape::OpenAi, Behavior::Hang).await;
    let flags = echo_flags(&hanging);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (mut bot, _) = start(&fake, data_dir.path(), &flags).await;
    let first_secret = fake.webhook_secret();
    fake.send_text(&private_chat(320), &en_user(320), "survive the crash");
    let id = fake.last_update_id();
    fake.wait_for("the update taken", LONG, |f| delivered(f, id))
        .await;
    bot.kill();
    let mut stderr = bot.stderr();
    drop(bot);
    assert!(fake.texts(320).is_empty(), "{}", report(&fake, &stderr));

    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let flags = echo_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (bot, _) = start(&fake, data_dir.path(), &flags).await;
    fake.wait_for("the answer after the restart", LONG, |f| {
        f.messages(320).iter().any(|m| m.html)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stderr.push_str(&bot.stderr());
    let report = report(&fake, &stderr);
    assert_eq!(fake.texts(320), ["Echo: survive the crash"], "{report}");
    assert_eq!(
        fake.pushes().iter().filter(|p| p.update_id == id).count(),
        1,
        "delivered once: the restart answered it from the saved state\n{report}"
    );
    assert_ne!(
        fake.webhook_secret(),
        first_secret,
        "a new secret each start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_without_the_flag_deletes_the_webhook_and_polls() {
    let _permit = BOTS.acquire().await.unwrap();
    let (fake, _provider, data_dir, flags) = echo_setup().await;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (mut bot, _) = start(&fake, data_dir.path(), &flags).await;
    fake.send_text(&private_chat(330), &en_user(330), "by webhook");
    fake.wait_for("the webhook answer", LONG, |f| {
        f.messages(330).iter().any(|m| m.html)
    })
    .await;
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    let mut stderr = bot.stderr();
    drop(bot);
    assert_eq!(
        fake.webhook_url(),
        WEBHOOK_URL,
        "left set at shutdown: Telegram keeps the updates meanwhile"
    );

    // While nobody listens, a message waits at Telegram; and deleteWebhook keeps failing
    // past the start's retries, so getUpdates meets the webhook (409) at first.
    fake.send_text(&private_chat(330), &en_user(330), "by polling");
    fake.fail_next(
        "deleteWebhook",
        6,
        429,
        "Too Many Requests: retry after 1",
        Some(1),
        false,
    );
    let bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.wait_for("the polled answer", LONG, |f| {
        f.messages(330).iter().filter(|m| m.html).count() == 2
    })
    .await;
    stderr.push_str(&bot.stderr());
    let report = report(&fake, &stderr);
    assert_eq!(
        fake.texts(330),
        ["Echo: by webhook", "Echo: by polling"],
        "{report}"
    );
    assert!(fake.webhook_url().is_empty(), "{report}");
    assert!(
        fake.calls_of("getUpdates").iter().any(|c| c.status == 409),
        "{report}"
    );
    assert!(
        fake.calls_of("deleteWebhook")
            .iter()
            .any(|c| c.status == 200),
        "{report}"
    );
    assert_eq!(
        fake.calls_of("setWebhook")[0].params["allowed_updates"],
        fake.calls_of("getUpdates")[0].params["allowed_updates"],
        "the same updates asked for either way\n{report}"
    );
}

/// Issue 13's property kept in webhook mode: a Bot API that cannot be reached at start
/// is waited out (the HTTP API serves, the webhook answers 503 so Telegram retries), and
/// the webhook is set once it comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bot_api_at_start_is_waited_out_in_webhook_mode() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start_down(TOKEN);
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut flags = echo_flags(&provider);
    flags.extend([
        "--telegram-webhook-url".to_string(),
        WEBHOOK_URL.to_string(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut bot = BotProcess::spawn(&fake, data_dir.path(), &flags, "info", &Launch::default());
    let base = bot.http_url().await;
    let update = json!({"update_id": 1, "message": {"message_id": 1, "date": 1_700_000_000,
        "chat": private_chat(340), "from": en_user(340), "text": "early"}})
    .to_string();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(bot.exited().is_none(), "{}", bot.stderr());
        // No secret yet: not refused, retried later.
        assert_eq!(post(&base, Some("any"), &update).await, 503);
    }
    fake.forward_webhook_to(&base);
    fake.come_up();
    fake.send_text(&private_chat(340), &en_user(340), "after the outage");
    fake.wait_for("the answer once the Bot API is up", LONG, |f| {
        f.messages(340).iter().any(|m| m.html)
    })
    .await;
    let stderr = bot.stderr();
    assert!(
        stderr.contains("the Telegram Bot API cannot be reached"),
        "{}",
        report(&fake, &stderr)
    );
    assert_eq!(fake.texts(340), ["Echo: after the outage"]);
}

/// `mistral-bot doctor` with `--telegram-webhook-url url` against `fake`.
async fn doctor(fake: &FakeTelegram, url: &str) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .arg("doctor")
        .arg("--model")
        .arg(test_model())
        .arg("--data-dir")
        .arg(data.path())
        .args(["--http-addr", "127.0.0.1:0", "--threads", "1"])
        .args([
            "--telegram-api-url",
            &fake.url,
            "--telegram-webhook-url",
            url,
        ])
        .env("TELEGRAM_BOT_TOKEN", &fake.token)
        .env_remove("RUST_LOG")
        .env_remove("GROQ_API_KEY")
        .env_remove("MISTRAL_API_KEY")
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_COMPAT_API_KEY")
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("webhook-url"))
        .unwrap_or_else(|| panic!("no webhook-url line:\n{report}"))
        .to_string();
    (output.status.success(), line)
}

#[tokio::test]
async fn doctor_flags_a_webhook_url_telegram_would_refuse() {
    let fake = FakeTelegram::start(TOKEN).await;
    let (ok, line) = doctor(&fake, "http://bot.example.org/telegram/hook").await;
    assert!(
        !ok && line.starts_with('✗') && line.contains("https"),
        "{line}"
    );
    let (ok, line) = doctor(&fake, "https://bot.example.org:8080/telegram/hook").await;
    assert!(
        !ok && line.starts_with('✗') && line.contains("8080") && line.contains("8443"),
        "{line}"
    );
    let (_, line) = doctor(&fake, "https://bot.example.org/telegram/hook").await;
    assert!(line.starts_with('✓') && line.contains("port 443"), "{line}");
    // The doctor changes nothing at Telegram.
    assert!(fake.calls_of("setWebhook").is_empty());
}

#[test]
fn a_webhook_without_the_http_api_is_a_startup_error_naming_both_flags() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .args([
            "--model",
            "m.gguf",
            "--prompt",
            "hi",
            "--telegram-token",
            "1:t",
        ])
        .args([
            "--telegram-webhook-url",
            "https://bot.example.org/telegram/hook",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--telegram-webhook-url") && stderr.contains("--prompt"),
        "{stderr}"
    );
}
