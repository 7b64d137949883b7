//! Issue 13, part 3: a Telegram Bot API that cannot be reached never stops the process.
//! The real binary with the test model against the fake Bot API, which can refuse every
//! connection (as from a host whose network is not up yet) and come up later.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::{BotProcess, Launch};
use crate::util::fake_telegram::{FakeTelegram, private_chat, user};

/// How long the Bot API stays unreachable (the figure).
const DOWN: Duration = Duration::from_secs(45);
const QUESTION: &str = "What is the capital of France? Answer in one word.";

/// `GET {base}{path}` → (status, JSON body); panics with the bot's log if it fails.
async fn get(client: &reqwest::Client, base: &str, path: &str, bot: &BotProcess) -> (u16, Value) {
    let response = client
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path} did not answer: {e}\n{}", bot.stderr()));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Issue 13: with the Bot API unreachable at start the process used to exit after ~10 s
/// of `getMe` retries, taking the HTTP API and the model with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bot_api_is_waited_out_while_http_serves() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start_down(TOKEN);
    let data_dir = tempfile::tempdir().unwrap();
    let mut bot = BotProcess::spawn(&fake, data_dir.path(), &[], "info", &Launch::default());
    let base = bot.http_url().await;
    let client = reqwest::Client::new();

    let down_until = Instant::now() + DOWN;
    let mut health_checks = 0;
    let mut ready_while_down = None;
    while Instant::now() < down_until {
        if let Some(status) = bot.exited() {
            panic!("the bot exited with {status}:\n{}", bot.stderr());
        }
        let (status, _) = get(&client, &base, "/health", &bot).await;
        assert_eq!(status, 200, "{}", bot.stderr());
        health_checks += 1;
        let (status, ready) = get(&client, &base, "/ready", &bot).await;
        if status == 200 {
            ready_while_down = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The engine loaded and serves; Telegram is not connected.
    let ready = ready_while_down
        .unwrap_or_else(|| panic!("/ready never 200 while Telegram was down\n{}", bot.stderr()));
    assert_eq!(ready["telegram"]["connected"], false, "{ready}");
    assert_eq!(ready["telegram"]["state"], "connecting", "{ready}");
    let stderr = bot.stderr();
    assert!(
        stderr.contains("the Telegram Bot API cannot be reached"),
        "{stderr}"
    );
    assert!(!stderr.contains("Telegram bot connected"), "{stderr}");

    fake.come_up();
    let came_up = Instant::now();
    let chat = private_chat(4101);
    fake.send_text(&chat, &user(4101, "early_riser", "en"), QUESTION);
    fake.wait_for("the first message after the Bot API came back", LONG, |f| {
        f.texts(4101).iter().any(|t| t.contains("Paris"))
    })
    .await;
    let (_, ready) = get(&client, &base, "/ready", &bot).await;
    assert_eq!(ready["telegram"]["connected"], true, "{ready}");
    let stderr = bot.stderr();
    assert_eq!(
        stderr.matches("Telegram bot connected").count(),
        1,
        "one line when it comes back\n{stderr}"
    );
    assert!(bot.exited().is_none(), "{stderr}");
    eprintln!(
        "Bot API down {DOWN:?}: /health answered {health_checks} checks; the first message \
         answered {:.1} s after it came back",
        came_up.elapsed().as_secs_f64()
    );
    assert!(bot.terminate().await, "exits cleanly\n{}", bot.stderr());
}

/// A Bot API host that does not resolve (DNS failure) is retried past the five attempts
/// that used to end the process, while HTTP serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_api_host_that_does_not_resolve_is_retried_while_http_serves() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start_down(TOKEN);
    let data_dir = tempfile::tempdir().unwrap();
    // `.invalid` never resolves (RFC 2606).
    let mut bot = BotProcess::spawn(
        &fake,
        data_dir.path(),
        &["--telegram-api-url", "http://bot-api.invalid:8081"],
        "info",
        &Launch::default(),
    );
    let base = bot.http_url().await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + LONG;
    while bot
        .stderr()
        .matches("the Telegram Bot API cannot be reached")
        .count()
        < 6
    {
        if let Some(status) = bot.exited() {
            panic!("the bot exited with {status}:\n{}", bot.stderr());
        }
        assert!(Instant::now() < deadline, "{}", bot.stderr());
        let (status, _) = get(&client, &base, "/health", &bot).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, ready) = get(&client, &base, "/ready", &bot).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["telegram"]["state"], "connecting", "{ready}");
    assert!(bot.terminate().await, "exits cleanly\n{}", bot.stderr());
}
