//! Conversation history across restarts, black-box: the real binary with the test model
//! against the fake Bot API, restarted over the same `--data-dir` by SIGTERM and by
//! `kill -9`. What the model was asked is read from the `--verbose-prompt` log line
//! (`request` with the messages as JSON) of each process.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::telegram::{BOTS, TOKEN};
use crate::util::bot_process::BotProcess;
use crate::util::fake_telegram::{FakeTelegram, private_chat, user};
use crate::util::test_model;

const LONG: Duration = Duration::from_secs(300);
const CHAT: i64 = 7;
const FLAGS: &[&str] = &["--verbose-prompt", "--max-tokens", "60"];

/// Waits for the process's `n`-th delivered answer; returns the messages of every request
/// it logged so far.
async fn requests_after_answers(bot: &BotProcess, fake: &FakeTelegram, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + LONG;
    while bot.stderr().matches("answer delivered").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for answer {n}\n{}\n--- bot stderr ---\n{}",
            fake.dump(),
            bot.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    requests(bot)
}

/// The messages of every `request` line in the process's log.
fn requests(bot: &BotProcess) -> Vec<Value> {
    bot.stderr()
        .lines()
        .filter(|l| l.contains(" request "))
        .map(|l| {
            let start = l.find("messages=").unwrap() + "messages=".len();
            let json = l[start..].rsplit_once(']').unwrap().0;
            serde_json::from_str(&format!("{json}]")).unwrap()
        })
        .collect()
}

fn roles_and_texts(messages: &Value) -> Vec<(String, String)> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn kill_hard(bot: &BotProcess) {
    let status = Command::new("kill")
        .args(["-KILL", &bot.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_sigterm_and_kill_9_and_reset_survives_a_restart() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    let me = user(CHAT, "bob", "en");
    // A damaged store from an earlier life: moved aside, loudly, and the bot still works.
    let db = data_dir.path().join("conversations.sqlite3");
    std::fs::write(&db, b"not a database ".repeat(300)).unwrap();

    // 1. A first turn; then a clean stop.
    let mut bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    fake.send_text(&private_chat(CHAT), &me, "My name is Bob.");
    let asked = requests_after_answers(&bot, &fake, 1).await;
    assert_eq!(
        roles_and_texts(&asked[0]),
        [("user".to_string(), "My name is Bob.".to_string())]
    );
    let log = bot.stderr();
    assert!(
        log.contains("THE CONVERSATION STORE IS CORRUPT"),
        "a loud warning: {log}"
    );
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    drop(bot);
    let first_answer = fake.texts(CHAT)[0].clone();

    // 2. After SIGTERM the chat continues with its history; then a crash right after the
    // second answer was delivered.
    let bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    fake.send_text(&private_chat(CHAT), &me, "What is my name?");
    let asked = requests_after_answers(&bot, &fake, 1).await;
    let turns = roles_and_texts(&asked[0]);
    assert_eq!(turns.len(), 3, "first turn + question: {turns:?}");
    assert_eq!(turns[0], ("user".into(), "My name is Bob.".into()));
    assert_eq!(turns[1].0, "assistant");
    // The fake shows the text as rendered (markup gone): compare letters and digits.
    let plain = |s: &str| {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
    };
    assert!(
        !turns[1].1.is_empty() && plain(&first_answer).contains(&plain(&turns[1].1)),
        "the stored answer is the delivered one: {turns:?} vs {first_answer:?}"
    );
    assert_eq!(turns[2], ("user".into(), "What is my name?".into()));
    // Let the bot mark the update answered (else it is, rightly, answered again).
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_hard(&bot);
    drop(bot);

    // 3. After kill -9: /retry answers the last question again over the stored history,
    // then /reset forgets it; then another crash.
    let bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    fake.send_text(&private_chat(CHAT), &me, "/retry");
    let asked = requests_after_answers(&bot, &fake, 1).await;
    let retried = roles_and_texts(&asked[0]);
    assert_eq!(
        retried, turns,
        "the retry sees the history before the last turn, then its question"
    );
    let before = fake.messages(CHAT).len();
    fake.send_text(&private_chat(CHAT), &me, "/reset");
    fake.wait_for("the reset confirmation", LONG, |f| {
        f.texts(CHAT)[before..]
            .iter()
            .any(|t| t.contains("Conversation forgotten"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_hard(&bot);
    drop(bot);

    // 4. The reset stays done after a restart.
    let mut bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    fake.send_text(&private_chat(CHAT), &me, "What is my name?");
    let asked = requests_after_answers(&bot, &fake, 1).await;
    assert_eq!(
        roles_and_texts(&asked[0]),
        [("user".to_string(), "What is my name?".to_string())],
        "{}",
        bot.stderr()
    );
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    let moved = std::fs::read_dir(data_dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("conversations.sqlite3.corrupt-")
        })
        .count();
    assert_eq!(moved, 1, "the damaged file is kept aside for recovery");
}

#[test]
fn an_unwritable_data_dir_stops_the_bot_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .arg("--model")
        .arg(test_model())
        .args([
            "--telegram-api-url",
            "http://127.0.0.1:9",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(file.join("data"))
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    // The data-dir lock is the first thing to touch the directory (issue 13), so it is the
    // one that names it.
    assert!(
        stderr.contains("not-a-dir/data is not writable"),
        "{stderr}"
    );
    assert!(!stderr.contains("AAE-secret"), "{stderr}");
}
