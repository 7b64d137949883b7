//! The Restart suite: the real binary against the fake Bot API, killed with `kill -9`
//! mid-reply, restarted with a poison update pending, and facing an `update_id` sequence
//! that restarts lower. Nothing is lost, nothing is answered twice (issue 7).

use std::time::Duration;

use serde_json::{Value, json};

use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::BotProcess;
use crate::util::fake_provider::{Behavior, FAKE_KEY, FakeProvider, Shape};
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram, forum_group, private_chat, user};

/// A group message whose mention `strip_mention` used to find at a byte offset of the
/// lowercased text (`İ` grows by a byte when lowercased, the Kelvin sign shrinks by two):
/// the offset fell inside `…` and slicing the original text panicked on the poll loop.
fn poison_text() -> String {
    format!("İİ @{BOT_USERNAME}…\u{212A} what is this?")
}

/// Flags that make a fake OpenAI-compatible provider answer everything (fast and
/// deterministic: `Echo: <question>`).
pub(crate) fn echo_flags(provider: &FakeProvider) -> Vec<String> {
    [
        "--chain",
        "openai",
        "--openai-api-key",
        FAKE_KEY,
        "--openai-base-url",
        provider.base_url.as_str(),
    ]
    .map(str::to_string)
    .to_vec()
}

pub(crate) fn en_user(id: i64) -> Value {
    user(id, &format!("user{id}"), "en")
}

fn kill_9(bot: &BotProcess) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &bot.pid().to_string()])
        .status();
}

fn report(fake: &FakeTelegram, stderr: &str) -> String {
    format!("{}\n--- bot stderr ---\n{stderr}", fake.dump())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_update_pending_at_start_is_answered_not_crash_looped() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    // What the crashing version left behind: the poison update saved as pending.
    let update = json!({"update_id": 1001, "message": {
        "message_id": 7, "date": 1_700_000_000, "chat": forum_group(-500),
        "from": en_user(50), "text": poison_text()}});
    let state = json!({"offset": 1002, "pending": {"1001": update}});
    std::fs::write(
        data_dir.path().join("telegram-state.json"),
        state.to_string(),
    )
    .unwrap();

    let flags = echo_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.wait_for("the poison message answered", LONG, |f| {
        f.messages(-500).iter().any(|m| m.html)
    })
    .await;
    // The process is still up and keeps answering (the fake's ids go on from the
    // saved offset).
    fake.wait_for("every update confirmed", LONG, |f| f.unconfirmed() == 0)
        .await;
    fake.restart_update_ids(1002);
    fake.send_text(&private_chat(51), &en_user(51), "still there?");
    fake.wait_for("the next message answered", LONG, |f| {
        f.messages(51).iter().any(|m| m.html)
    })
    .await;
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    let stderr = bot.stderr();
    let report = report(&fake, &stderr);
    let answer = &fake.messages(-500)[0];
    assert_eq!(
        answer.visible, "Echo: İİ …\u{212A} what is this?",
        "the mention stripped\n{report}"
    );
    assert_eq!(answer.reply_to, Some(7), "{report}");
    assert!(!stderr.contains("panicked"), "{report}");
    let state: Value = serde_json::from_slice(
        &std::fs::read(data_dir.path().join("telegram-state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["pending"],
        json!({}),
        "nothing left pending\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_ids_restarting_lower_are_still_answered_once() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    let flags = echo_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.send_text(&private_chat(70), &en_user(70), "before the quiet week");
    fake.wait_for("the first answer", LONG, |f| {
        f.messages(70).iter().any(|m| m.html)
    })
    .await;

    // A week without updates: Telegram restarts the ids far lower; our offset is now
    // in the future, which the server ignores.
    fake.wait_for("every update confirmed", LONG, |f| f.unconfirmed() == 0)
        .await;
    fake.restart_update_ids(17);
    fake.send_text(&private_chat(70), &en_user(70), "after the quiet week");
    fake.send_text(&private_chat(71), &en_user(71), "another chat");
    fake.wait_for("both answered", LONG, |f| {
        f.messages(70).iter().filter(|m| m.html).count() >= 2
            && f.messages(71).iter().any(|m| m.html)
    })
    .await;
    // The new sequence is followed, across a restart too.
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    let mut stderr = bot.stderr();
    drop(bot);
    fake.send_text(&private_chat(70), &en_user(70), "after the restart");
    let bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.wait_for("the third answer", LONG, |f| {
        f.messages(70).iter().filter(|m| m.html).count() >= 3
    })
    .await;
    // Let any duplicate show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stderr.push_str(&bot.stderr());
    let report = report(&fake, &stderr);
    assert_eq!(
        fake.texts(70),
        [
            "Echo: before the quiet week",
            "Echo: after the quiet week",
            "Echo: after the restart"
        ],
        "{report}"
    );
    assert_eq!(fake.texts(71), ["Echo: another chat"], "{report}");
    assert!(
        stderr.contains("restarted its update_id sequence"),
        "{report}"
    );
    assert_eq!(fake.unconfirmed(), 0, "every update confirmed\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_reply_then_restart_answers_that_message_once_in_full() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    // The local model, streaming a long answer slowly enough to be killed mid-way.
    let bot = BotProcess::start(&fake, data_dir.path(), &[], "info").await;
    fake.send_text(&private_chat(80), &en_user(80), "Say hi.");
    fake.wait_for("a first answer", LONG, |f| {
        f.messages(80).iter().any(|m| m.html)
    })
    .await;
    fake.send_text(
        &private_chat(81),
        &en_user(81),
        "Tell me a long story about a cat.",
    );
    fake.wait_for("the reply under way", LONG, |f| {
        f.messages(81).iter().any(|m| !m.html)
    })
    .await;
    kill_9(&bot);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stderr = bot.stderr();
    drop(bot);
    let partial = fake.messages(81);
    assert!(
        partial.iter().all(|m| !m.html),
        "killed before the end\n{}",
        report(&fake, &stderr)
    );

    let bot = BotProcess::start(&fake, data_dir.path(), &[], "info").await;
    fake.wait_for("the answer after the crash", LONG, |f| {
        f.messages(81).iter().any(|m| m.html)
    })
    .await;
    // Let any duplicate show up before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stderr.push_str(&bot.stderr());
    let report = report(&fake, &stderr);
    let finals: Vec<_> = fake.messages(81).into_iter().filter(|m| m.html).collect();
    assert_eq!(
        finals.len(),
        1,
        "the interrupted message answered once\n{report}"
    );
    assert!(
        finals[0].visible.len() >= partial[0].visible.len(),
        "answered in full\n{report}"
    );
    assert_eq!(
        fake.messages(80).len(),
        1,
        "the finished answer is not repeated\n{report}"
    );
    assert_eq!(stderr.matches("answer delivered").count(), 2, "{report}");
}

/// The pending updates in the state file of `data_dir`.
fn pending(data_dir: &std::path::Path) -> Value {
    let state: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("telegram-state.json")).unwrap())
            .unwrap();
    state["pending"].clone()
}

/// Issue 7, found item 3: an update was marked done whatever happened to its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_refused_for_a_while_is_delivered_and_a_blocked_chat_is_dropped() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    let flags = echo_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;

    // More flood-control refusals than one call's retries: still delivered.
    fake.fail_next(
        "sendMessage",
        8,
        429,
        "Too Many Requests: retry after 1",
        Some(1),
        false,
    );
    fake.send_text(&private_chat(90), &en_user(90), "are you there");
    fake.wait_for("the answer despite flood control", LONG, |f| {
        f.messages(90).iter().any(|m| m.html)
    })
    .await;

    // The user blocked the bot: one attempt, logged, dropped.
    fake.fail_next(
        "sendMessage",
        1,
        403,
        "Forbidden: bot was blocked by the user",
        None,
        false,
    );
    fake.send_text(&private_chat(91), &en_user(91), "bye");
    fake.wait_for("the refusal seen", LONG, |f| {
        f.calls_in(91, "sendMessage")
            .iter()
            .any(|c| c.status == 403)
    })
    .await;
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    let stderr = bot.stderr();
    let report = report(&fake, &stderr);
    assert_eq!(fake.texts(90), ["Echo: are you there"], "{report}");
    let refused = fake.calls_in(90, "sendMessage");
    assert!(
        refused.iter().filter(|c| c.status == 429).count() == 8,
        "{report}"
    );
    assert_eq!(
        fake.calls_in(91, "sendMessage").len(),
        1,
        "a blocked chat is not retried\n{report}"
    );
    assert!(fake.messages(91).is_empty(), "{report}");
    assert!(stderr.contains("can never be delivered"), "{report}");
    assert_eq!(pending(data_dir.path()), json!({}), "{report}");
}
