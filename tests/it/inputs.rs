//! Issue 14, black-box: replies and quotes as context, voice notes transcribed through an
//! OpenAI-compatible speech-to-text API (`util::fake_stt`), files read as text, photo
//! captions — the real binary with the test model against the fake Bot API (extended with
//! `getFile` and `/file/bot<token>/<path>`). The prompt is checked in the log of
//! `--verbose-prompt`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::corpus::{control_tokens, corpus};
use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::BotProcess;
use crate::util::fake_stt::{FakeStt, SttBehavior, voice_bytes};
use crate::util::fake_telegram::{
    BOT_ID, BOT_USERNAME, FakeTelegram, forum_group, private_chat, user,
};

const CAPITAL_Q: &str = "What is the capital of France? Answer in one word.";
const CAPITAL_A: &str = "The capital of France is Paris.";
const STT_KEY: &str = "stt-secret-key-never-logged";
/// The log line of each request with `--verbose-prompt`.
const REQUEST_LOG: &str = "mistral_bot::responder: request";

/// The fake Bot API, a data directory and the bot.
struct Setup {
    fake: FakeTelegram,
    data_dir: tempfile::TempDir,
    bot: BotProcess,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    _permit: tokio::sync::SemaphorePermit<'static>,
}

impl Setup {
    async fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let permit = BOTS.acquire().await.unwrap();
        let fake = FakeTelegram::start(TOKEN).await;
        let data_dir = tempfile::tempdir().unwrap();
        let mut flags = vec!["--verbose-prompt"];
        if !extra.contains(&"--max-tokens") {
            flags.extend(["--max-tokens", "12"]);
        }
        flags.extend_from_slice(extra);
        let bot = BotProcess::start_with_env(&fake, data_dir.path(), &flags, "info", env).await;
        Self {
            fake,
            data_dir,
            bot,
            extra: flags.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _permit: permit,
        }
    }

    /// Stops the bot and starts it again on the same data directory.
    async fn restart(&mut self) {
        assert!(self.bot.terminate().await, "{}", self.report());
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.bot =
            BotProcess::start_with_env(&self.fake, self.data_dir.path(), &extra, "info", &env)
                .await;
    }

    fn report(&self) -> String {
        format!(
            "{}\n--- bot stderr ---\n{}",
            self.fake.dump(),
            self.bot.stderr()
        )
    }

    /// Waits until the bot has sent `n` messages in `chat`; returns their visible texts.
    async fn messages(&self, chat: i64, n: usize) -> Vec<String> {
        let deadline = Instant::now() + LONG;
        while self.fake.messages(chat).len() < n || self.fake.unconfirmed() > 0 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} messages in chat {chat}\n{}",
                self.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The final edit of a streamed answer lands after its first send.
        self.settle().await;
        self.fake.texts(chat)
    }

    /// Waits until every answer begun was delivered.
    async fn settle(&self) {
        let deadline = Instant::now() + LONG;
        loop {
            let stderr = self.bot.stderr();
            let asked = stderr.matches(REQUEST_LOG).count();
            let done = stderr.matches("answer delivered").count();
            if done >= asked {
                return;
            }
            assert!(Instant::now() < deadline, "{}", self.report());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The messages of every prompt logged so far (`--verbose-prompt`).
    fn prompts(&self) -> Vec<String> {
        self.bot
            .stderr()
            .lines()
            .filter(|l| l.contains(REQUEST_LOG))
            .filter_map(|l| {
                let start = l.find("messages=")? + "messages=".len();
                let json: Value = serde_json::from_str(l[start..].trim()).ok()?;
                Some(
                    json.as_array()?
                        .iter()
                        .filter_map(|m| m["content"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n---\n"),
                )
            })
            .collect()
    }

    /// The last prompt logged.
    fn last_prompt(&self) -> String {
        self.prompts().pop().unwrap_or_default()
    }

    /// The bot's HTTP address, from its log.
    fn http(&self) -> String {
        let stderr = self.bot.stderr();
        let line = stderr
            .lines()
            .find(|l| l.contains("HTTP API listening on"))
            .unwrap_or_default()
            .to_string();
        line.split("listening on http://")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

fn en_user(id: i64) -> Value {
    user(id, &format!("user{id}"), "en")
}

fn bot_user() -> Value {
    json!({"id": BOT_ID, "is_bot": true, "first_name": "Fake LLM", "username": BOT_USERNAME})
}

/// A voice note of `seconds` whose file is `file_id` of `size` bytes.
fn voice(file_id: &str, seconds: u32, size: u64) -> Value {
    json!({"file_id": file_id, "file_unique_id": format!("u{file_id}"), "duration": seconds,
           "mime_type": "audio/ogg", "file_size": size})
}

/// A document.
fn document(file_id: &str, name: &str, size: u64, mime: &str) -> Value {
    json!({"file_id": file_id, "file_unique_id": format!("u{file_id}"), "file_name": name,
           "mime_type": mime, "file_size": size})
}

/// Sends a voice note heard as `text` from `from` in `chat` (with `extra` fields).
fn send_voice(s: &Setup, chat: &Value, from: &Value, text: &str, extra: Value) -> i64 {
    let bytes = voice_bytes(text);
    let size = bytes.len() as u64;
    let id = s.fake.add_file(bytes);
    let message_id = s.fake.allocate_message_id();
    let mut message = json!({"message_id": message_id, "chat": chat, "from": from,
                             "voice": voice(&id, 3, size)});
    for (k, v) in extra.as_object().unwrap() {
        message[k] = v.clone();
    }
    s.fake.inject("message", message);
    message_id
}

/// Sends `bytes` as a document named `name` with `caption` (if any).
fn send_file(s: &Setup, chat: i64, name: &str, bytes: Vec<u8>, caption: Option<&str>) {
    let size = bytes.len() as u64;
    let id = s.fake.add_file(bytes);
    let mut message = json!({"chat": private_chat(chat), "from": en_user(chat),
                             "document": document(&id, name, size, "text/plain")});
    if let Some(caption) = caption {
        message["caption"] = json!(caption);
    }
    s.fake.inject("message", message);
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_quotes_put_the_replied_text_in_the_prompt() {
    let s = Setup::start(&[], &[]).await;
    // A group: "@bot translate this" as a reply to another member's message.
    let group = forum_group(-300);
    let original = s.fake.allocate_message_id();
    s.fake.inject(
        "message",
        json!({"message_id": original, "chat": group, "from": en_user(7), "text": "Der Hund schläft"}),
    );
    s.fake.inject(
        "message",
        json!({"chat": group, "from": en_user(8),
               "text": format!("@{BOT_USERNAME} translate this"),
               "reply_to_message": {"message_id": original, "date": 0, "chat": group,
                                    "from": en_user(7), "text": "Der Hund schläft"}}),
    );
    s.messages(-300, 1).await;
    let prompt = s.last_prompt();
    assert!(
        prompt
            .contains("In reply to this message from User7:\n> Der Hund schläft\n\ntranslate this"),
        "{prompt}\n{}",
        s.report()
    );

    // A private chat: the user quotes part of the bot's answer.
    s.fake.send_text(&private_chat(41), &en_user(41), CAPITAL_Q);
    let answer = s.messages(41, 1).await.remove(0);
    let answer_id = s.fake.messages(41)[0].id;
    let quoted: String = answer
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    s.fake.inject(
        "message",
        json!({"chat": private_chat(41), "from": en_user(41), "text": "Why?",
               "reply_to_message": {"message_id": answer_id, "date": 0, "chat": private_chat(41),
                                    "from": bot_user(), "text": answer},
               "quote": {"text": quoted, "position": 0, "is_manual": true}}),
    );
    s.messages(41, 2).await;
    let prompt = s.last_prompt();
    assert!(
        prompt.contains(&format!(
            "Quoting this part of a message from you (the assistant):\n> {quoted}\n\nWhy?"
        )),
        "{prompt}\n{}",
        s.report()
    );

    // "@bot" alone, or /ask alone, as a reply asks about the replied message.
    s.fake.inject(
        "message",
        json!({"chat": group, "from": en_user(8), "text": "/ask",
               "reply_to_message": {"message_id": original, "date": 0, "chat": group,
                                    "from": en_user(7), "text": "Der Hund schläft"}}),
    );
    s.messages(-300, 2).await;
    assert!(
        s.last_prompt()
            .ends_with("In reply to this message from User7:\n> Der Hund schläft"),
        "{}",
        s.report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voice_note_is_transcribed_shown_and_answered_and_failures_are_polite() {
    let stt = FakeStt::start(Some(STT_KEY)).await;
    let s = Setup::start(
        &[
            "--stt-base-url",
            &stt.base_url,
            "--stt-model",
            "whisper-fake",
            "--stt-timeout",
            "3",
        ],
        &[("STT_API_KEY", STT_KEY)],
    )
    .await;
    let chat = private_chat(51);
    let started = Instant::now();
    send_voice(&s, &chat, &en_user(51), CAPITAL_Q, json!({}));
    let texts = s.messages(51, 2).await;
    eprintln!(
        "voice note to answered: {:?} (transcription itself: see the `transcribed` log line)",
        started.elapsed()
    );
    assert_eq!(texts[0], format!("🎤 «{CAPITAL_Q}»"), "{}", s.report());
    assert_eq!(texts[1], CAPITAL_A, "{}", s.report());
    assert!(s.last_prompt().ends_with(CAPITAL_Q), "{}", s.report());
    let request = stt.requests().remove(0);
    assert_eq!(request.field("model"), Some("whisper-fake"));
    assert_eq!(request.file_name.as_deref(), Some("voice.ogg"));
    assert_eq!(request.file_type.as_deref(), Some("audio/ogg"));
    assert_eq!(
        request.authorization.as_deref(),
        Some(format!("Bearer {STT_KEY}").as_str())
    );

    // A voice note without its optional `mime_type` (teloxide alone cannot read it) is
    // heard and answered too.
    let bytes = voice_bytes(CAPITAL_Q);
    let size = bytes.len() as u64;
    let id = s.fake.add_file(bytes);
    let mut note = voice(&id, 3, size);
    note.as_object_mut().unwrap().remove("mime_type");
    s.fake.inject(
        "message",
        json!({"chat": chat, "from": en_user(51), "voice": note}),
    );
    let texts = s.messages(51, 4).await;
    assert_eq!(texts[2], format!("🎤 «{CAPITAL_Q}»"), "{}", s.report());
    assert_eq!(texts[3], CAPITAL_A, "{}", s.report());

    // The service rate limited, hanging past --stt-timeout, answering garbage, down (503):
    // a polite reply each time, and the next text message is answered normally.
    let mut expected = 4;
    for behavior in [
        SttBehavior::RateLimited,
        SttBehavior::Hang,
        SttBehavior::Garbage,
        SttBehavior::Unavailable,
    ] {
        stt.set(behavior.clone());
        send_voice(&s, &chat, &en_user(51), "lost words", json!({}));
        expected += 1;
        let texts = s.messages(51, expected).await;
        assert!(
            texts[expected - 1].contains("couldn't transcribe"),
            "{behavior:?}: {:?}\n{}",
            texts.last(),
            s.report()
        );
        s.fake.send_text(&chat, &en_user(51), CAPITAL_Q);
        expected += 1;
        let texts = s.messages(51, expected).await;
        assert_eq!(texts[expected - 1], CAPITAL_A, "{}", s.report());
    }
    stt.set(SttBehavior::Hear);

    // Too long for --voice-max-seconds, or bigger than bots may download: refused before
    // any transcription.
    let requests = stt.requests().len();
    let id = s.fake.add_file(voice_bytes("long"));
    s.fake.inject(
        "message",
        json!({"chat": chat, "from": en_user(51), "voice": voice(&id, 4000, 100)}),
    );
    expected += 1;
    let texts = s.messages(51, expected).await;
    assert!(texts[expected - 1].contains("4000 s"), "{}", s.report());
    let big = s.fake.add_file_sized(Vec::new(), 30 * 1024 * 1024);
    s.fake.inject(
        "message",
        json!({"chat": chat, "from": en_user(51), "voice": voice(&big, 60, 30 * 1024 * 1024)}),
    );
    expected += 1;
    let texts = s.messages(51, expected).await;
    assert!(texts[expected - 1].contains("20 MB"), "{}", s.report());
    // Telegram's own size missing: getFile says it is too big.
    s.fake.inject(
        "message",
        json!({"chat": chat, "from": en_user(51),
               "voice": {"file_id": big, "file_unique_id": "ub", "duration": 60,
                         "mime_type": "audio/ogg"}}),
    );
    expected += 1;
    let texts = s.messages(51, expected).await;
    assert!(texts[expected - 1].contains("20 MB"), "{}", s.report());
    assert_eq!(
        stt.requests().len(),
        requests,
        "nothing was sent to the STT API"
    );

    // Groups: a voice note not addressed to the bot is ignored; one replying to the bot,
    // and /ask replying to a voice note, are transcribed.
    let group = forum_group(-500);
    send_voice(&s, &group, &en_user(52), "not for the bot", json!({}));
    let bot_message = s.fake.allocate_message_id();
    send_voice(
        &s,
        &group,
        &en_user(52),
        CAPITAL_Q,
        json!({"reply_to_message": {"message_id": bot_message, "date": 0, "chat": group,
                                    "from": bot_user(), "text": "earlier"}}),
    );
    let texts = s.messages(-500, 2).await;
    assert_eq!(texts[0], format!("🎤 «{CAPITAL_Q}»"), "{}", s.report());
    let voice_id = send_voice(&s, &group, &en_user(53), "Bonjour tout le monde", json!({}));
    let vid = s.fake.add_file(voice_bytes("Bonjour tout le monde"));
    s.fake.inject(
        "message",
        json!({"chat": group, "from": en_user(54), "text": "/ask translate",
               "reply_to_message": {"message_id": voice_id, "date": 0, "chat": group,
                                    "from": en_user(53), "voice": voice(&vid, 2, 25)}}),
    );
    // The replied voice note's transcript is in the prompt, not shown again.
    s.messages(-500, 3).await;
    assert!(
        s.last_prompt().contains(
            "In reply to this message from User53:\n> Bonjour tout le monde\n\ntranslate"
        ),
        "{}",
        s.report()
    );
    let heard: Vec<String> = stt
        .requests()
        .iter()
        .map(|r| r.file_len.to_string())
        .collect();
    assert_eq!(
        heard.len(),
        requests + 2,
        "the unaddressed voice note was not transcribed: {heard:?}"
    );

    // Its own metrics, on both endpoints; the chat providers saw no failure.
    let http = s.http();
    let metrics = get_json(&format!("http://{http}/dialogue_metrics")).await;
    let figures = &metrics["data"]["stt"];
    assert_eq!(figures["requests"], json!(requests + 2), "{metrics}");
    assert_eq!(figures["errors"], json!(4), "{metrics}");
    for kind in ["rate_limited", "timeout", "malformed", "http_5xx"] {
        assert_eq!(
            figures["errors_by_kind"][kind],
            json!(1),
            "{kind}: {metrics}"
        );
    }
    assert_eq!(
        figures["audio_seconds"],
        json!(11),
        "3 + 3 + 3 + 2 s heard: {metrics}"
    );
    assert!(figures["latency_p50_ms"].as_f64().is_some(), "{metrics}");
    for (name, provider) in metrics["data"]["providers"].as_object().unwrap() {
        assert_eq!(provider["errors"], json!(0), "{name}: {metrics}");
    }
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("mistral_bot_stt_requests_total"), "{text}");
    assert!(
        text.contains("mistral_bot_stt_errors_total{kind=\"timeout\"} 1"),
        "{text}"
    );
    // The time a voice note adds before the model is asked: download and transcription
    // (a figure for the report, not an assertion: machines are noisy).
    let added: Vec<String> = s
        .bot
        .stderr()
        .lines()
        .filter(|l| l.contains("transcribed"))
        .filter_map(|l| {
            Some(
                l.split("elapsed_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .collect();
    eprintln!(
        "STT added per voice note against the fake (download + transcription, ms): {added:?}"
    );
    assert!(!s.bot.stderr().contains(STT_KEY), "the STT key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_speech_to_text_voice_gets_one_explanation_per_chat() {
    let s = Setup::start(&[], &[]).await;
    let chat = private_chat(61);
    send_voice(&s, &chat, &en_user(61), "hello", json!({}));
    send_voice(&s, &chat, &en_user(61), "hello again", json!({}));
    s.fake.send_text(&chat, &en_user(61), CAPITAL_Q);
    let texts = s.messages(61, 2).await;
    assert!(texts[0].contains("--stt-base-url"), "{}", s.report());
    assert_eq!(texts[1], CAPITAL_A, "{}", s.report());
    assert_eq!(texts.len(), 2, "told once\n{}", s.report());
    drop(s);

    // The service down altogether (nothing listens).
    let down = FakeStt::down_url().await;
    let s = Setup::start(&["--stt-base-url", &down], &[]).await;
    send_voice(&s, &chat, &en_user(61), "hello", json!({}));
    s.fake.send_text(&chat, &en_user(61), CAPITAL_Q);
    let texts = s.messages(61, 2).await;
    assert!(texts[0].contains("couldn't transcribe"), "{}", s.report());
    assert_eq!(texts[1], CAPITAL_A, "{}", s.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_read_or_politely_refused_and_survive_a_restart() {
    let mut s = Setup::start(
        &["--ctx-size", "2048", "--document-max-bytes", "1048576"],
        &[],
    )
    .await;
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(
            "Привет из UTF-16: капибара"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        )
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "notes.txt",
            b"The secret word is marmalade.\n".to_vec(),
            "The secret word is marmalade.",
        ),
        (
            "table.csv",
            b"city,people\nParis,2100000\n".to_vec(),
            "Paris,2100000",
        ),
        (
            "data.json",
            br#"{"animal": "okapi"}"#.to_vec(),
            r#""animal": "okapi""#,
        ),
        (
            "report.pdf",
            pdf("Quarterly revenue grew 12 percent"),
            "Quarterly revenue grew 12 percent",
        ),
        ("utf16.txt", utf16, "Привет из UTF-16: капибара"),
    ];
    let chat = 71;
    let mut sent = 0;
    for (name, bytes, expect) in &cases {
        send_file(&s, chat, name, bytes.clone(), Some("Summarize this file."));
        sent += 1;
        s.messages(chat, sent).await;
        let prompt = s.last_prompt();
        assert!(
            prompt.contains(&format!("File {name}:")) && prompt.contains(expect),
            "{name}: {prompt}\n{}",
            s.report()
        );
        assert!(prompt.ends_with("Summarize this file."), "{prompt}");
    }

    // A binary file renamed .txt, and a 5 MB file: refused, saying why.
    let prompts_before = s.prompts().len();
    send_file(
        &s,
        chat,
        "photo.txt",
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
        Some("read"),
    );
    sent += 1;
    let texts = s.messages(chat, sent).await;
    assert!(texts[sent - 1].contains("PNG image"), "{}", s.report());
    let big_id = s.fake.add_file_sized(Vec::new(), 5 * 1024 * 1024);
    s.fake.inject(
        "message",
        json!({"chat": private_chat(chat), "from": en_user(chat), "caption": "read",
               "document": document(&big_id, "big.log", 5 * 1024 * 1024, "text/plain")}),
    );
    sent += 1;
    let texts = s.messages(chat, sent).await;
    assert!(texts[sent - 1].contains("too big"), "{}", s.report());
    assert_eq!(
        s.prompts().len(),
        prompts_before,
        "nothing reached the model"
    );

    // A file without a caption is kept, and asked about after a restart.
    let other = 72;
    send_file(
        &s,
        other,
        "plan.md",
        b"# Plan\nBuy a kayak on Tuesday.\n".to_vec(),
        None,
    );
    let texts = s.messages(other, 1).await;
    assert!(
        texts[0].contains("What should I do with it?"),
        "{}",
        s.report()
    );
    s.restart().await;
    s.fake
        .send_text(&private_chat(other), &en_user(other), "When do I buy it?");
    s.messages(other, 2).await;
    let prompt = s.last_prompt();
    assert!(
        prompt.contains("File plan.md:") && prompt.contains("Buy a kayak on Tuesday."),
        "{prompt}\n{}",
        s.report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_caption_is_answered_with_a_note_and_stickers_are_not() {
    let s = Setup::start(&[], &[]).await;
    let chat = 81;
    s.fake.inject(
        "message",
        json!({"chat": private_chat(chat), "from": en_user(chat), "caption": CAPITAL_Q,
               "photo": [{"file_id": "p", "file_unique_id": "u", "width": 90, "height": 90}]}),
    );
    let texts = s.messages(chat, 2).await;
    assert!(texts[0].contains("can't see images"), "{}", s.report());
    assert!(s.last_prompt().ends_with(CAPITAL_Q), "{}", s.report());
    s.fake.inject(
        "message",
        json!({"chat": private_chat(chat), "from": en_user(chat),
               "sticker": {"file_id": "s", "file_unique_id": "us", "type": "regular",
                           "width": 512, "height": 512, "is_animated": false, "is_video": false}}),
    );
    let texts = s.messages(chat, 3).await;
    assert!(texts[2].contains("can't read this kind"), "{}", s.report());
}

/// File names and captions from the bad-input corpus: every one answered (or politely
/// refused), nothing crashes, every update is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_file_names_and_captions_are_answered() {
    let s = Setup::start(&["--max-tokens", "2"], &[]).await;
    let inputs: Vec<(String, String)> = corpus()
        .into_iter()
        .filter(|i| !i.name.contains("unaddressed"))
        .filter_map(|i| Some((i.name, i.text?)))
        .collect();
    // Four at a time, as many as the engine has slots: a full queue would answer with the
    // "busy" apology instead of reading the file.
    let deadline = Instant::now() + LONG;
    for (batch, chunk) in inputs.chunks(4).enumerate() {
        for (i, (_, text)) in chunk.iter().enumerate() {
            let chat = 2000 + (batch * 4 + i) as i64;
            let name: String = text.chars().take(120).collect();
            send_file(
                &s,
                chat,
                &format!("{name}.txt"),
                b"corpus file body".to_vec(),
                Some(text),
            );
        }
        for (i, (name, _)) in chunk.iter().enumerate() {
            let chat = 2000 + (batch * 4 + i) as i64;
            // Answered, or an answer of blanks only that Telegram refuses (the stream's
            // matter, not this one's: the tiny model with 2 tokens may say just "\n\n").
            while s.fake.messages(chat).is_empty()
                && !s
                    .bot
                    .stderr()
                    .contains(&format!("chat={chat} error=could not deliver"))
            {
                assert!(
                    Instant::now() < deadline,
                    "{name}: no reply\n{}",
                    s.report()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(s.fake.unconfirmed(), 0, "{}", s.report());
    assert!(!s.bot.stderr().contains("panicked"), "{}", s.report());
}

/// Replied text with control-token spellings and odd Unicode never becomes a control
/// token in the prompt the engine builds (the corpus, and generated text).
#[tokio::test]
async fn replied_text_never_becomes_a_control_token() {
    use mistral_bot::i18n::Lang;
    use mistral_bot::telegram::reply_context::{Author, Replied, render};
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    let template = control_tokens("x").await;
    let mut texts: Vec<String> = corpus().into_iter().filter_map(|i| i.text).collect();
    let spellings = proptest::collection::vec(
        proptest::prop_oneof![
            proptest::sample::select(vec![
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "<|im_start|>",
                "<|im_end|>",
                "<|endoftext|>",
                "<|eot_id|>",
                "<start_of_turn>",
                "<end_of_turn>",
                "[SYSTEM_PROMPT]",
                "\u{202E}",
                "\u{200D}",
                "\u{0301}",
                "\n> ",
                "İ",
            ])
            .prop_map(str::to_string),
            "\\PC{0,6}",
        ],
        1..12,
    )
    .prop_map(|parts| parts.concat());
    let mut runner = TestRunner::deterministic();
    for _ in 0..48 {
        texts.push(spellings.new_tree(&mut runner).unwrap().current());
    }
    let mut failures = Vec::new();
    for text in &texts {
        for (author, quoted) in [(Author::Bot, false), (Author::Named(text.clone()), true)] {
            let replied = Replied {
                author,
                text: text.clone(),
                quoted,
                attachment: None,
            };
            let question = format!("{}\n\nwhat is this?", render(&replied, text, Lang::En));
            let got = control_tokens(&question).await;
            if got != template {
                failures.push(format!("{text:?}: {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "control tokens besides the template's {template:?}:\n{}",
        failures.join("\n")
    );
}

/// A one-page PDF with `line` in its text layer (Helvetica).
fn pdf(line: &str) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font_id } });
    let content = Content {
        operations: vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 24.into()]),
            Operation::new("Td", vec![100.into(), 600.into()]),
            Operation::new("Tj", vec![Object::string_literal(line)]),
            Operation::new("ET", vec![]),
        ],
    };
    let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id,
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}
