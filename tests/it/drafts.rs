//! Draft streaming (issue 16): `sendMessageDraft` in private chats, then the answer with
//! `sendMessage` exactly as edit streaming's final edit; edits in groups; a server that
//! refuses drafts falls back to edits for that chat; `/stop`, the draft's stop button and
//! `kill -9` during a draft.
//! The real binary against the fake Bot API (drafts in private chats only, draft id
//! non-zero, as the real one), with the test model and a fake cloud provider.

use std::time::Duration;

use mistral_bot::telegram::format::markdown_to_html;
use serde_json::Value;

use crate::telegram::{BOTS, LONG, Setup, TOKEN, reference};
use crate::util::bot_process::BotProcess;
use crate::util::fake_provider::{Behavior, FAKE_KEY, FakeProvider, Shape};
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram, forum_group, private_chat, user};

const ESSAY: &str = "Write a very long and detailed essay about the history of Rome.";
const DRAFT: [&str; 2] = ["--telegram-streaming", "draft"];

fn draft_ids(fake: &FakeTelegram, chat: i64) -> Vec<i64> {
    fake.calls_in(chat, "sendMessageDraft")
        .iter()
        .map(|c| c.params["draft_id"].as_i64().unwrap_or(0))
        .collect()
}

/// Bot API calls made for the answers in `chat`, by method (getUpdates excluded).
fn calls_by_method(fake: &FakeTelegram, chat: i64) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for call in fake.calls().into_iter().filter(|c| c.chat() == Some(chat)) {
        match counts.iter_mut().find(|(m, _)| *m == call.method) {
            Some((_, n)) => *n += 1,
            None => counts.push((call.method, 1)),
        }
    }
    counts
}

/// A bot asked for a long essay in private chat `id`, once its first draft shows.
async fn essay_drafting(id: i64) -> (Setup, Value) {
    let s = Setup::start(&["--max-tokens", "700", DRAFT[0], DRAFT[1]]).await;
    let chat = private_chat(id);
    s.fake.send_text(&chat, &user(id, "fa", "en"), ESSAY);
    s.fake
        .wait_for("a draft", LONG, |f| {
            !f.calls_in(id, "sendMessageDraft").is_empty()
        })
        .await;
    (s, chat)
}

/// The stopped answer `partial` in chat `id` holds at least what its last draft showed,
/// and came with no edit.
fn assert_holds_the_last_draft(s: &Setup, id: i64, partial: &str) {
    let report = s.report();
    let last_draft = s.fake.calls_in(id, "sendMessageDraft").pop().unwrap();
    assert!(
        partial.starts_with(last_draft.text().unwrap().trim()),
        "the message holds at least what the draft showed\n{report}"
    );
    assert!(
        s.fake.calls_in(id, "editMessageText").is_empty(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_answers_stream_as_drafts_groups_as_edits_and_refused_drafts_fall_back() {
    const FLAGS: &[&str] = &["--max-tokens", "700", "--telegram-streaming", "draft"];
    let expected = reference(ESSAY, FLAGS);
    let s = Setup::start(FLAGS).await;
    let expected = expected.await;
    s.fake
        .send_text(&private_chat(501), &user(501, "ann", "en"), ESSAY);
    s.answers(1).await;
    let report = s.report();
    let messages = s.fake.messages(501);
    assert_eq!(messages.len(), 1, "one message\n{report}");
    assert_eq!(
        messages[0].text,
        markdown_to_html(&expected),
        "today's final text\n{report}"
    );
    assert!(messages[0].html && messages[0].edits == 0, "{report}");
    assert!(
        s.fake.calls_in(501, "editMessageText").is_empty(),
        "{report}"
    );
    let ids = draft_ids(&s.fake, 501);
    assert!(ids.len() >= 2, "several drafts\n{report}");
    assert!(
        ids.iter().all(|&id| id != 0 && id == ids[0]),
        "one animated draft\n{report}"
    );
    let drafts = s.fake.calls_in(501, "sendMessageDraft");
    for pair in drafts.windows(2) {
        assert!(
            pair[1].text().unwrap().starts_with(pair[0].text().unwrap()),
            "each draft extends the last\n{report}"
        );
    }
    let sent = s.fake.calls_in(501, "sendMessage");
    assert_eq!(sent.len(), 1, "{report}");
    assert!(
        drafts.last().unwrap().at <= sent[0].at,
        "no draft after the message\n{report}"
    );
    assert_eq!(
        s.fake.draft(501),
        None,
        "the message replaced the draft\n{report}"
    );
    println!(
        "calls for one answer with drafts: {:?}",
        calls_by_method(&s.fake, 501)
    );

    // A group: edits only.
    let group = forum_group(-5000);
    s.fake.send_text(
        &group,
        &user(502, "bo", "en"),
        &format!("@{BOT_USERNAME} {ESSAY}"),
    );
    s.answers(2).await;
    let report = s.report();
    assert!(
        s.fake.calls_in(-5000, "sendMessageDraft").is_empty(),
        "{report}"
    );
    assert!(
        !s.fake.calls_in(-5000, "editMessageText").is_empty(),
        "{report}"
    );
    println!(
        "calls for one answer with edits (group): {:?}",
        calls_by_method(&s.fake, -5000)
    );

    // A server that refuses the method: edits at once, the text intact, and remembered.
    s.fake.fail_next(
        "sendMessageDraft",
        1,
        400,
        "Bad Request: method is not available",
        None,
        false,
    );
    s.fake
        .send_text(&private_chat(503), &user(503, "cy", "en"), ESSAY);
    s.answers(3).await;
    let report = s.report();
    let messages = s.fake.messages(503);
    assert_eq!(messages.len(), 1, "{report}");
    assert_eq!(messages[0].text, markdown_to_html(&expected), "{report}");
    assert!(
        !s.fake.calls_in(503, "editMessageText").is_empty(),
        "{report}"
    );
    assert_eq!(draft_ids(&s.fake, 503).len(), 1, "{report}");
    s.fake
        .send_text(&private_chat(503), &user(503, "cy", "en"), "And then?");
    s.answers(4).await;
    assert_eq!(
        draft_ids(&s.fake, 503).len(),
        1,
        "no draft tried again\n{}",
        s.report()
    );
    assert!(s.bot.stderr().contains("streams with edits from now on"));
}

/// The figure of the issue: Bot API calls for one answer of about 1000 tokens, drafts
/// (private chat) against edits (`--telegram-streaming edit`), from the fake's call log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_for_a_thousand_token_answer_drafts_against_edits() {
    const FLAGS: &[&str] = &["--ctx-size", "2048", "--max-tokens", "1000"];
    let mut figures = Vec::new();
    for mode in ["draft", "edit"] {
        let mut flags = FLAGS.to_vec();
        flags.extend(["--telegram-streaming", mode]);
        let s = Setup::start(&flags).await;
        s.fake
            .send_text(&private_chat(504), &user(504, "di", "en"), ESSAY);
        s.answers(1).await;
        let stderr = s.bot.stderr();
        let tokens = stderr
            .lines()
            .find(|l| l.contains("answer delivered"))
            .and_then(|l| l.split("tokens=").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let calls = calls_by_method(&s.fake, 504);
        let total: usize = calls.iter().map(|(_, n)| n).sum();
        println!("{mode}: {total} calls for {tokens} tokens: {calls:?}");
        assert!(s.fake.texts(504).concat().len() > 1000, "{}", s.report());
        figures.push(total);
    }
    assert!(figures.iter().all(|&n| n > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9000_character_answer_is_split_and_delivered_once_with_drafts() {
    // A cloud provider's answer of exactly this text, streamed in pieces.
    let sentence = "Rome grew from a village on the Tiber into an empire that ruled the sea. ";
    let pieces: Vec<String> = (0..125).map(|i| format!("Part {i}: {sentence}")).collect();
    let answer: String = pieces.concat();
    assert!(answer.len() > 9000);
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&pieces)).await;
    let flags = [
        "--chain",
        "groq",
        "--groq-api-key",
        FAKE_KEY,
        "--groq-base-url",
        groq.base_url.as_str(),
        "--telegram-streaming",
        "draft",
    ];
    let s = Setup::start(&flags).await;
    s.fake
        .send_text(&private_chat(505), &user(505, "el", "en"), ESSAY);
    s.answers(1).await;
    let report = s.report();
    let messages = s.fake.messages(505);
    assert_eq!(messages.len(), 3, "{report}");
    for m in &messages {
        assert!(
            m.visible.encode_utf16().count() <= 4096 && m.html && m.edits == 0,
            "{report}"
        );
    }
    let squeeze = |s: &str| -> String { s.split_whitespace().collect() };
    let joined: String = messages.iter().map(|m| m.visible.as_str()).collect();
    assert_eq!(squeeze(&joined), squeeze(&answer), "{report}");
    assert!(
        s.fake.calls_in(505, "editMessageText").is_empty(),
        "{report}"
    );
    assert_eq!(s.fake.calls_in(505, "sendMessage").len(), 3, "{report}");
    assert_eq!(s.fake.draft(505), None, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_draft_delivers_what_was_written_once() {
    let (s, chat) = essay_drafting(506).await;
    s.fake.send_text(&chat, &user(506, "fa", "en"), "/stop");
    s.answers(1).await;
    let report = s.report();
    assert!(s.bot.stderr().contains("stopped=true"), "{report}");
    let messages = s.fake.messages(506);
    assert_eq!(
        messages.len(),
        2,
        "the partial answer and \"Stopped.\"\n{report}"
    );
    assert!(messages.iter().any(|m| m.visible == "Stopped."), "{report}");
    let partial = messages.iter().find(|m| m.visible != "Stopped.").unwrap();
    assert!(partial.html && partial.edits == 0, "{report}");
    assert_holds_the_last_draft(&s, 506, &partial.visible);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_button_of_a_draft_stops_that_answer_only() {
    let (s, chat) = essay_drafting(507).await;
    let first = s.fake.calls_in(507, "sendMessageDraft").remove(0);
    let report = s.report();
    assert_eq!(first.params["can_stop"], true, "{report}");
    assert_eq!(first.params["keep_on_stop"], true, "{report}");
    let asked = &s.fake.calls_of("getUpdates")[0].params["allowed_updates"];
    assert!(
        asked
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t == "stopped_message_generation")),
        "{report}"
    );
    let draft = first.params["draft_id"].as_i64().unwrap();

    // A press on the draft of another answer (an older message's) stops nothing: the
    // drafts go on after the bot has read it.
    s.fake.press_stop(&chat, None, draft + 64);
    s.fake
        .wait_for("the press read", LONG, |f| f.unconfirmed() == 0)
        .await;
    let seen = s.fake.calls_in(507, "sendMessageDraft").len();
    s.fake
        .wait_for("a draft after the press", LONG, |f| {
            f.calls_in(507, "sendMessageDraft").len() > seen
        })
        .await;

    s.fake.press_stop(&chat, None, draft);
    s.answers(1).await;
    let report = s.report();
    assert!(s.bot.stderr().contains("stopped=true"), "{report}");
    let messages = s.fake.messages(507);
    assert_eq!(
        messages.len(),
        1,
        "the answer so far, once, and no \"Stopped.\" reply\n{report}"
    );
    assert_holds_the_last_draft(&s, 507, &messages[0].visible);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_answer_gets_a_polite_reply_in_every_streaming_mode() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["  ", "\n", " "])).await;
    for mode in ["draft", "edit", "off"] {
        let flags = [
            "--chain",
            "groq",
            "--groq-api-key",
            FAKE_KEY,
            "--groq-base-url",
            groq.base_url.as_str(),
            "--telegram-streaming",
            mode,
        ];
        let s = Setup::start(&flags).await;
        s.fake
            .send_text(&private_chat(508), &user(508, "el", "en"), "Say nothing.");
        s.answers(1).await;
        let report = s.report();
        let texts = s.fake.texts(508);
        assert_eq!(texts.len(), 1, "{mode}\n{report}");
        assert!(texts[0].contains("empty answer"), "{mode}\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_draft_is_answered_once_after_the_restart() {
    const FLAGS: &[&str] = &["--max-tokens", "700", "--telegram-streaming", "draft"];
    let expected = reference(ESSAY, FLAGS);
    let permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    let bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    fake.send_text(&private_chat(507), &user(507, "gi", "en"), ESSAY);
    fake.wait_for("a draft", LONG, |f| {
        !f.calls_in(507, "sendMessageDraft").is_empty()
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &bot.pid().to_string()])
        .status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stderr = bot.stderr();
    drop(bot);
    assert!(
        fake.messages(507).is_empty(),
        "nothing was sent before the kill"
    );
    let bot = BotProcess::start(&fake, data_dir.path(), FLAGS, "info").await;
    let expected = expected.await;
    fake.wait_for("the answer after the restart", LONG, |f| {
        !f.messages(507).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stderr.push_str(&bot.stderr());
    let report = format!("{}\n--- stderr ---\n{stderr}", fake.dump());
    let messages = fake.messages(507);
    assert_eq!(messages.len(), 1, "answered once\n{report}");
    assert_eq!(messages[0].text, markdown_to_html(&expected), "{report}");
    let ids: Vec<Value> = fake
        .calls_in(507, "sendMessageDraft")
        .iter()
        .map(|c| c.params["draft_id"].clone())
        .collect();
    assert!(
        ids.len() >= 2,
        "drafts before and after the restart\n{report}"
    );
    drop(bot);
    drop(permit);
}
