//! Bad-input corpus (issue 7): every file in `tests/corpus/` is one hostile input —
//! Unicode whose case mapping changes length, bidi controls, zero-width characters,
//! combining storms, ZWJ emoji, NUL and C0/C1 controls, markup, the control-token
//! spellings of Mistral/ChatML/Llama-3/Gemma, 4096 emoji, a 4096-character word, commands
//! with odd arguments and `@bot` suffixes, mentions. A `.txt` file holds the text itself;
//! a `.json` file holds a JSON string literal, for what only JSON can carry (lone UTF-16
//! surrogates). A name containing `unaddressed` is not clearly meant for the bot (a
//! command for another bot, a look-alike mention): it may stay silent.
//!
//! Each input goes through the engine (its prompt holds no control token but the
//! template's), `/v1/chat/completions` (a completion or a clean 4xx, never a 5xx), and
//! the real binary over the fake Bot API in private chats, groups and forum topics (a
//! reply, no crash, every update confirmed). Replies are 1 to 4 tokens, one thread.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mistral_bot::chat::{ChatMessage, ChatRequest, StreamEvent};
use mistral_bot::config::ProviderKind::Local;
use serde_json::{Value, json};

use crate::util::app::{Fakes, TestApp, chain_app, shared_engine};
use crate::util::bot_process::BotProcess;
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram, forum_group, private_chat, user};
use crate::util::greedy;

/// One corpus input.
pub(crate) struct Input {
    /// The file name without extension.
    pub(crate) name: String,
    /// The text, when it is valid Unicode (not for lone surrogates).
    pub(crate) text: Option<String>,
    /// The input as a JSON string literal.
    literal: String,
}

pub(crate) fn corpus() -> Vec<Input> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut inputs: Vec<Input> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_stem()?.to_str()?.to_string();
            let bytes = std::fs::read(&path).unwrap();
            match path.extension()?.to_str()? {
                "txt" => {
                    let text = String::from_utf8(bytes).unwrap();
                    let literal = serde_json::to_string(&text).unwrap();
                    Some(Input {
                        name,
                        text: Some(text),
                        literal,
                    })
                }
                "json" => {
                    let literal = String::from_utf8(bytes).unwrap().trim().to_string();
                    let text = serde_json::from_str::<String>(&literal).ok();
                    Some(Input {
                        name,
                        text,
                        literal,
                    })
                }
                _ => None,
            }
        })
        .collect();
    inputs.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(inputs.len() >= 60, "the corpus has {} inputs", inputs.len());
    inputs
}

/// The control-token spellings of the chat formats the corpus imitates (besides the
/// `<|…|>` family of ChatML, Llama 3 and Phi).
const CONTROL_SPELLINGS: [&str; 16] = [
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<file_sep>",
    "<repo_name>",
];

/// Whether a prompt token is a control token: its piece is a whole marker such as
/// `<|im_start|>` or `[INST]`. Text that merely spells one is several ordinary tokens
/// (`<`, `|`, `im`, …), none of which is a whole marker.
fn is_control(piece: &str) -> bool {
    (piece.len() > 4 && piece.starts_with("<|") && piece.ends_with("|>"))
        || CONTROL_SPELLINGS.contains(&piece)
}

/// The control tokens of the prompt the engine builds for one user message.
pub(crate) async fn control_tokens(text: &str) -> Vec<(i32, String)> {
    let engine = shared_engine().await;
    let request = ChatRequest::new(vec![ChatMessage::user(text)], greedy(1));
    let mut stream = engine.submit_showing_prompt(request).unwrap();
    let Some(Ok(StreamEvent::Started)) = stream.next().await else {
        panic!("no start for {text:?}");
    };
    let Some(Ok(StreamEvent::Prompt(tokens))) = stream.next().await else {
        panic!("no prompt for {text:?}");
    };
    // Dropping the stream cancels the reply: only the prompt was wanted.
    tokens
        .into_iter()
        .filter(|t| is_control(&t.piece))
        .map(|t| (t.id, t.piece))
        .collect()
}

#[tokio::test]
async fn corpus_inputs_never_put_a_control_token_in_the_prompt() {
    let started = Instant::now();
    let template = control_tokens("x").await;
    assert!(
        template.len() >= 2,
        "the template's own markers are seen: {template:?}"
    );
    let mut failures = Vec::new();
    for input in corpus() {
        let Some(text) = &input.text else { continue };
        let got = control_tokens(text).await;
        if got != template {
            failures.push(format!("{}: {got:?}", input.name));
        }
    }
    assert!(
        failures.is_empty(),
        "control tokens other than the template's {template:?}:\n{}",
        failures.join("\n")
    );
    eprintln!("corpus through the engine: {:?}", started.elapsed());
}

/// Posts `input` (the `i`-th: streamed or not, 1 to 4 tokens); a problem, if any.
async fn check_over_http(app: &TestApp, i: usize, input: &Input) -> Option<String> {
    let stream = i % 2 == 1;
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":{}}}],"max_tokens":{},"temperature":0,"stream":{stream}}}"#,
        input.literal,
        1 + i % 4
    );
    let response = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let ok = match status {
        200 if stream => text.trim_end().ends_with("data: [DONE]"),
        200 => serde_json::from_str::<Value>(&text)
            .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string()),
        400..=499 => serde_json::from_str::<Value>(&text)
            .is_ok_and(|v| v["error"]["message"].is_string() && v["error"]["code"].is_string()),
        _ => false,
    };
    // Lone surrogates are not valid JSON text.
    let ok = ok && (input.text.is_some() || status == 400);
    (!ok).then(|| format!("{} ({status}): {text}", input.name))
}

#[tokio::test]
async fn corpus_over_http_gets_a_completion_or_a_clean_4xx() {
    let started = Instant::now();
    let app = chain_app(&[Local], &Fakes::default()).await;
    // Four at a time, as many as the engine has slots: the long inputs batch together.
    let inputs = corpus();
    let problems: Vec<String> = futures::stream::iter(inputs.iter().enumerate())
        .map(|(i, input)| check_over_http(&app, i, input))
        .buffer_unordered(4)
        .filter_map(|problem| async move { problem })
        .collect()
        .await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let (status, _) = app.get_json("/health").await;
    assert_eq!(status, 200);
    eprintln!("corpus over HTTP: {:?}", started.elapsed());
}

/// Where an input is sent on Telegram.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Private,
    Group,
    Topic,
}

/// Sends every corpus input to a fresh chat of its own (per `places`) through the real
/// binary, then checks: a reply to every input meant for the bot, every update
/// confirmed, no panic, a clean exit.
async fn through_telegram(places: &[Place]) {
    let started = Instant::now();
    let telegram = FakeTelegram::start("6161616161:AAF-corpus-token").await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut bot = BotProcess::start(
        &telegram,
        data_dir.path(),
        &[
            "--max-tokens",
            "2",
            "--queue-size",
            "512",
            "--local-timeout",
            "900",
            "--chain",
            "local",
        ],
        "info",
    )
    .await;
    let mut expected = Vec::new();
    let mut chats = Vec::new();
    let inputs = corpus();
    for (i, input) in inputs.iter().enumerate() {
        let Some(text) = &input.text else { continue };
        let i = i as i64;
        for &place in places {
            let (chat, addressed) = match place {
                Place::Private => (private_chat(20_000 + i), text.clone()),
                Place::Group => (
                    json!({"id": -1_002_000_000 - i, "type": "supergroup", "title": "Corpus"}),
                    addressed(text),
                ),
                Place::Topic => (forum_group(-1_003_000_000 - i), addressed(text)),
            };
            let chat_id = chat["id"].as_i64().unwrap();
            let lang = if i % 2 == 0 { "en" } else { "ru" };
            let from = user(30_000 + i, "corpus_user", lang);
            let mut message = json!({"chat": chat, "from": from, "text": addressed});
            if place == Place::Topic {
                message["message_thread_id"] = json!(7);
                message["is_topic_message"] = json!(true);
            }
            telegram.inject("message", message);
            chats.push((chat_id, !input.name.contains("unaddressed")));
            if !input.name.contains("unaddressed") {
                expected.push((chat_id, input.name.clone()));
            }
        }
    }
    // Wait for a reply in every chat the input was meant for.
    let deadline = Instant::now() + Duration::from_secs(600);
    let answered = |(chat, meant): &(i64, bool)| !*meant || !telegram.texts(*chat).is_empty();
    while !chats.iter().all(answered) || telegram.unconfirmed() > 0 {
        let log = bot.stderr();
        let missing: Vec<&(i64, bool)> = chats.iter().filter(|c| !answered(c)).collect();
        assert!(
            !log.contains("panicked") && Instant::now() < deadline,
            "no reply in {} chats, e.g. {:?}; {} updates unconfirmed\n{}\n--- bot stderr ---\n{}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            telegram.unconfirmed(),
            telegram.dump(),
            log
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every reply is valid text for Telegram: not empty.
    for (chat, name) in &expected {
        for text in telegram.texts(*chat) {
            assert!(!text.trim().is_empty(), "{name}: an empty message was sent");
        }
    }
    assert!(bot.terminate().await, "clean exit:\n{}", bot.stderr());
    assert!(!bot.stderr().contains("panicked"), "{}", bot.stderr());
    eprintln!(
        "corpus through Telegram ({} chats): {:?}",
        expected.len(),
        started.elapsed()
    );
}

/// `text` as sent in a group: commands and texts with a mention as they are, anything
/// else after a mention of the bot.
fn addressed(text: &str) -> String {
    if text.starts_with('/') || text.contains('@') {
        text.to_string()
    } else {
        format!("@{BOT_USERNAME} {text}")
    }
}

#[tokio::test]
async fn corpus_through_telegram_private_chats() {
    through_telegram(&[Place::Private]).await;
}

/// Issue 7 item 1 (a group message with `İ` or the Kelvin sign before a mention killed
/// the process) is fixed on another branch: until it is merged, this test fails on the
/// `case_*` inputs.
#[tokio::test]
async fn corpus_through_telegram_groups_and_topics() {
    through_telegram(&[Place::Group, Place::Topic]).await;
}
