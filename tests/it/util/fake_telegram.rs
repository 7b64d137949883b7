//! A fake Telegram Bot API server on a loopback port, speaking the real protocol:
//! `POST /bot<token>/<method>` with JSON parameters, answers `{"ok":true,"result":…}` or
//! `{"ok":false,"error_code":…,"description":…,"parameters":{"retry_after":N}}`.
//!
//! It keeps updates until a `getUpdates` offset confirms them (as Telegram does), holds
//! long polls open up to their `timeout`, keeps the bot's messages (so edits can be
//! checked, "message is not modified" included), validates `parse_mode=HTML` text like
//! Telegram ("can't parse entities"), records every call, and lets a test inject updates
//! and failures. `sendMessageDraft` works as the real one: private chats only, a non-zero
//! draft id, 0–4096 characters; the chat's draft is dropped when a message of the bot
//! arrives in it, as clients do. Button presses arrive as `callback_query` updates
//! ([`FakeTelegram::press_button`]); `answerCallbackQuery` is recorded.
//!
//! It misbehaves the way the real service does when asked: the `update_id` sequence can
//! restart lower (Telegram picks a new random start after a week without updates), an
//! offset in the future is ignored (the oldest pending updates come back instead), and
//! [`Chaos`] injects faults at random from a seed: 429 with `retry_after`, 5xx, and
//! timeouts (the request is held past the client's timeout and never executed).
//!
//! Webhooks work as Telegram's (`setWebhook`, pushes with the secret header, re-sent
//! until a 2xx, `getUpdates` answering 409 meanwhile): see `webhook`.
//!
//! Files: a test stores one with [`FakeTelegram::add_file`]; `getFile` answers its
//! `file_path` (or "file is too big" past the 20 MB bots may download, as Telegram does)
//! and `GET /file/bot<token>/<file_path>` serves its bytes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

mod webhook;

/// The bot's identity in `getMe`.
pub const BOT_ID: i64 = 777_000;
/// The bot's username.
pub const BOT_USERNAME: &str = "fake_llm_bot";

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The method (`sendMessage`, …).
    pub method: String,
    /// Its JSON parameters.
    pub params: Value,
    /// When it arrived, since the fake started.
    pub at: Duration,
    /// The HTTP status answered.
    pub status: u16,
}

impl Call {
    /// The `chat_id` parameter, if any.
    pub fn chat(&self) -> Option<i64> {
        self.params.get("chat_id").and_then(Value::as_i64)
    }

    /// The `text` parameter, if any.
    pub fn text(&self) -> Option<&str> {
        self.params.get("text").and_then(Value::as_str)
    }

    /// Whether `parse_mode` is HTML.
    pub fn html(&self) -> bool {
        self.params.get("parse_mode").and_then(Value::as_str) == Some("HTML")
    }
}

/// A message the bot sent, as it stands now.
#[derive(Debug, Clone)]
pub struct BotMessage {
    /// Its id.
    pub id: i64,
    /// The text as sent (HTML source when `html`).
    pub text: String,
    /// Whether the text is HTML.
    pub html: bool,
    /// The text as the user sees it (tags removed, entities decoded).
    pub visible: String,
    /// The forum topic.
    pub thread: Option<i64>,
    /// The message it replies to.
    pub reply_to: Option<i64>,
    /// How many times it was edited successfully.
    pub edits: usize,
}

/// A failure to answer instead of the real result.
#[derive(Debug, Clone)]
struct Failure {
    method: String,
    remaining: usize,
    status: u16,
    description: String,
    retry_after: Option<u32>,
    only_html: bool,
}

/// Random faults: each call of a listed method fails with these odds (per thousand).
#[derive(Debug, Clone)]
pub struct Chaos {
    /// The seed of the fault sequence.
    pub seed: u64,
    /// Methods that may fail.
    pub methods: Vec<String>,
    /// Odds of a 429 with `retry_after` of 1–2 s.
    pub flood_per_mille: u64,
    /// Odds of a 502 Bad Gateway.
    pub server_error_per_mille: u64,
    /// Odds of a timeout: the request is held for `hold` and answered 504, never executed.
    pub timeout_per_mille: u64,
    /// How long a timed-out request is held (longer than the client waits).
    pub hold: Duration,
}

/// Faults injected so far, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injected {
    /// 429s.
    pub flood: usize,
    /// 5xx.
    pub server_error: usize,
    /// Held requests.
    pub timeout: usize,
}

/// SplitMix64: a small seeded generator (no dependency, same sequence everywhere).
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[derive(Debug, Default)]
struct Inner {
    updates: VecDeque<Value>,
    next_update_id: i64,
    chaos: Option<(Chaos, SplitMix)>,
    injected: Injected,
    next_message_id: i64,
    calls: Vec<Call>,
    failures: Vec<Failure>,
    /// (chat, message id) → message.
    messages: BTreeMap<(i64, i64), BotMessage>,
    /// Chats seen in injected updates, by id.
    chats: BTreeMap<i64, Value>,
    /// The webhook, if one is set (see `webhook`).
    webhook: webhook::WebhookState,
    /// Stored files by id.
    files: BTreeMap<String, StoredFile>,
    /// chat → the draft the user sees now (draft id, visible text).
    drafts: BTreeMap<i64, (i64, String)>,
    /// The update types the bot last asked for (`None`: never asked, Telegram's default).
    allowed_updates: Option<Vec<String>>,
}

/// A file the fake serves.
#[derive(Debug, Clone)]
struct StoredFile {
    path: String,
    bytes: Vec<u8>,
    /// The size `getFile` reports (the bytes' length unless a test says otherwise).
    size: u64,
}

/// The largest file the Bot API lets a bot download.
pub const DOWNLOAD_LIMIT: u64 = 20 * 1024 * 1024;

struct Shared {
    token: String,
    started: Instant,
    inner: Mutex<Inner>,
}

/// A running fake server.
pub struct FakeTelegram {
    /// Its base URL, for `--telegram-api-url`.
    pub url: String,
    /// The token it accepts.
    pub token: String,
    shared: Arc<Shared>,
    /// While the fake is down: its port, bound but not listening (connections are
    /// refused, as from a host whose network is not up), and its routes.
    down: Mutex<Option<(tokio::net::TcpSocket, Router)>>,
}

impl FakeTelegram {
    /// Starts a fake accepting `token` on `127.0.0.1:0`.
    pub async fn start(token: &str) -> Self {
        let fake = Self::start_down(token);
        fake.come_up();
        fake
    }

    /// A fake accepting `token` whose port refuses every connection until
    /// [`come_up`](Self::come_up): the Bot API unreachable.
    pub fn start_down(token: &str) -> Self {
        let shared = Arc::new(Shared {
            token: token.to_string(),
            started: Instant::now(),
            inner: Mutex::new(Inner {
                next_update_id: 1000,
                next_message_id: 1,
                ..Inner::default()
            }),
        });
        let app = Router::new()
            .route("/{bot}/{method}", post(handle))
            .route("/file/{bot}/{*path}", get(download))
            .with_state(Arc::clone(&shared));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", socket.local_addr().unwrap());
        Self {
            url,
            token: token.to_string(),
            shared,
            down: Mutex::new(Some((socket, app))),
        }
    }

    /// Starts answering on the fake's port (it was down).
    pub fn come_up(&self) {
        let (socket, app) = self.down.lock().unwrap().take().expect("the fake is down");
        let listener = socket.listen(1024).unwrap();
        tokio::spawn(webhook::push_loop(Arc::clone(&self.shared)));
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
    }

    /// Stores a file; returns its `file_id`.
    pub fn add_file(&self, bytes: Vec<u8>) -> String {
        let size = bytes.len() as u64;
        self.add_file_sized(bytes, size)
    }

    /// Stores a file whose `getFile` reports `size` bytes (a file too big to download
    /// needs no bytes); returns its `file_id`.
    pub fn add_file_sized(&self, bytes: Vec<u8>, size: u64) -> String {
        let mut inner = self.inner();
        let n = inner.files.len() + 1;
        let id = format!("file-id-{n}");
        let path = format!("documents/file_{n}.bin");
        inner
            .files
            .insert(id.clone(), StoredFile { path, bytes, size });
        id
    }

    /// Sets a webhook, as another deployment of the same bot would.
    pub fn set_webhook(&self, url: &str) {
        self.inner().webhook.url = url.to_string();
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    /// Queues an update holding `message` (under `kind`: `message`, `edited_message`) and
    /// returns its id. The message gets a message id and date if it lacks them.
    pub fn inject(&self, kind: &str, mut message: Value) -> i64 {
        let mut inner = self.inner();
        inner.next_update_id += 1;
        let id = inner.next_update_id;
        if message.get("message_id").is_none() {
            inner.next_message_id += 1;
            message["message_id"] = json!(inner.next_message_id);
        }
        if message.get("date").is_none() {
            message["date"] = json!(now());
        }
        if let Some(chat) = message.get("chat")
            && let Some(chat_id) = chat.get("id").and_then(Value::as_i64)
        {
            inner.chats.insert(chat_id, chat.clone());
        }
        inner
            .updates
            .push_back(json!({"update_id": id, kind: message}));
        id
    }

    /// Queues a press by `user` on a button with `data` under the bot's message
    /// `message_id` in `chat`; returns the update's id.
    pub fn press_button(&self, chat: &Value, user: &Value, message_id: i64, data: &str) -> i64 {
        let mut inner = self.inner();
        inner.next_update_id += 1;
        let id = inner.next_update_id;
        let query = json!({
            "id": format!("cq{id}"),
            "from": user,
            "message": {"message_id": message_id, "date": now(), "chat": chat, "from": bot_user(), "text": "menu"},
            "chat_instance": format!("ci{}", chat["id"]),
            "data": data,
        });
        inner
            .updates
            .push_back(json!({"update_id": id, "callback_query": query}));
        id
    }

    /// Queues the user's press on the stop button of draft `draft_id` in `chat` (Bot API
    /// 10.3 `stopped_message_generation`); returns the update's id.
    pub fn press_stop(&self, chat: &Value, thread: Option<i64>, draft_id: i64) -> i64 {
        let mut inner = self.inner();
        inner.next_update_id += 1;
        let id = inner.next_update_id;
        let mut stopped = json!({"chat": chat, "draft_id": draft_id});
        if let Some(thread) = thread {
            stopped["message_thread_id"] = json!(thread);
        }
        inner
            .updates
            .push_back(json!({"update_id": id, "stopped_message_generation": stopped}));
        id
    }

    /// The draft the user sees now in `chat` (draft id, text), if any.
    pub fn draft(&self, chat: i64) -> Option<(i64, String)> {
        self.inner().drafts.get(&chat).cloned()
    }

    /// Every call of `method`, whatever the chat.
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Queues a text message from `user` in `chat`; returns the message's id.
    pub fn send_text(&self, chat: &Value, user: &Value, text: &str) -> i64 {
        let mut message = json!({"chat": chat, "from": user, "text": text});
        let message_id = self.allocate_message_id();
        message["message_id"] = json!(message_id);
        self.inject("message", message);
        message_id
    }

    /// A fresh message id (for messages the test builds itself).
    pub fn allocate_message_id(&self) -> i64 {
        let mut inner = self.inner();
        inner.next_message_id += 1;
        inner.next_message_id
    }

    /// The next `times` calls of `method` fail with `status` and `description`
    /// (and `retry_after` seconds, for 429). `only_html`: only calls with HTML text.
    pub fn fail_next(
        &self,
        method: &str,
        times: usize,
        status: u16,
        description: &str,
        retry_after: Option<u32>,
        only_html: bool,
    ) {
        self.inner().failures.push(Failure {
            method: method.to_string(),
            remaining: times,
            status,
            description: description.to_string(),
            retry_after,
            only_html,
        });
    }

    /// Restarts the `update_id` sequence: the next update gets `next` (Telegram does this
    /// after a week without updates, at a random number that may be lower).
    pub fn restart_update_ids(&self, next: i64) {
        let mut inner = self.inner();
        assert!(
            inner.updates.is_empty(),
            "Telegram restarts its ids only after a week without updates: confirm them first"
        );
        inner.next_update_id = next - 1;
    }

    /// Starts injecting random faults.
    pub fn set_chaos(&self, chaos: Chaos) {
        let rng = SplitMix(chaos.seed);
        self.inner().chaos = Some((chaos, rng));
    }

    /// Stops injecting random faults.
    pub fn clear_chaos(&self) {
        self.inner().chaos = None;
    }

    /// The faults injected so far.
    pub fn injected(&self) -> Injected {
        self.inner().injected.clone()
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner().calls.clone()
    }

    /// The calls of `method` for `chat`.
    pub fn calls_in(&self, chat: i64, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && c.chat() == Some(chat))
            .collect()
    }

    /// The bot's messages in `chat`, oldest first, as they stand now.
    pub fn messages(&self, chat: i64) -> Vec<BotMessage> {
        self.inner()
            .messages
            .range((chat, i64::MIN)..=(chat, i64::MAX))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The visible texts of the bot's messages in `chat`.
    pub fn texts(&self, chat: i64) -> Vec<String> {
        self.messages(chat).into_iter().map(|m| m.visible).collect()
    }

    /// Updates not yet confirmed by a `getUpdates` offset.
    pub fn unconfirmed(&self) -> usize {
        self.inner().updates.len()
    }

    /// Everything recorded, for failure messages (long polls without updates omitted).
    pub fn dump(&self) -> String {
        let inner = self.inner();
        let mut out = String::from("--- calls recorded by the fake Telegram ---\n");
        for call in &inner.calls {
            if call.method == "getUpdates"
                && call.status == 200
                && call.params.get("__empty").is_some()
            {
                continue;
            }
            let mut params = call.params.clone();
            if let Some(o) = params.as_object_mut() {
                o.remove("__empty");
            }
            let mut shown = params.to_string();
            if shown.len() > 300 {
                let mut cut = 300;
                while !shown.is_char_boundary(cut) {
                    cut -= 1;
                }
                shown.truncate(cut);
                shown.push('…');
            }
            let _ = writeln!(
                out,
                "{:>8.3}s {:<16} {} {}",
                call.at.as_secs_f64(),
                call.method,
                call.status,
                shown
            );
        }
        let _ = writeln!(out, "--- bot messages ---");
        for ((chat, id), m) in &inner.messages {
            let _ = writeln!(
                out,
                "chat {chat} msg {id} edits {} html {}: {:?}",
                m.edits, m.html, m.text
            );
        }
        out
    }

    /// Waits until `check` holds, polling; panics with the recording on timeout.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\n{}",
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A private chat with user `id`.
pub fn private_chat(id: i64) -> Value {
    json!({"id": id, "type": "private", "first_name": format!("User{id}")})
}

/// A forum supergroup.
pub fn forum_group(id: i64) -> Value {
    json!({"id": id, "type": "supergroup", "title": "Test group", "is_forum": true})
}

/// A user.
pub fn user(id: i64, username: &str, language: &str) -> Value {
    json!({"id": id, "is_bot": false, "first_name": format!("User{id}"), "username": username, "language_code": language})
}

fn ok(result: Value) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"ok": true, "result": result})),
    )
        .into_response()
}

fn error(status: u16, description: &str, retry_after: Option<u32>) -> Response {
    let mut body = json!({"ok": false, "error_code": status, "description": description});
    if let Some(seconds) = retry_after {
        body["parameters"] = json!({"retry_after": seconds});
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn bot_user() -> Value {
    json!({"id": BOT_ID, "is_bot": true, "first_name": "Fake LLM", "username": BOT_USERNAME})
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path((bot, method)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    // Bot API method names are case-insensitive (teloxide sends `SendMessage`).
    let method = canonical(&method);
    let params: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| json!({"__unparsed": String::from_utf8_lossy(&body)}))
    };
    let at = shared.started.elapsed();
    if bot.strip_prefix("bot") != Some(shared.token.as_str()) {
        record(&shared, &method, params, at, 401);
        return error(401, "Unauthorized", None);
    }
    if let Some(fault) = chaos_fault(&shared, &method) {
        return inject_fault(&shared, fault, &method, params, at).await;
    }
    if method == "getUpdates" {
        if shared.inner.lock().unwrap().webhook.is_set() {
            record(&shared, &method, params, at, 409);
            return webhook::conflict();
        }
        return get_updates(&shared, params, at).await;
    }
    let mut inner = shared.inner.lock().unwrap();
    let html = params.get("parse_mode").and_then(Value::as_str) == Some("HTML");
    if let Some(failure) = inner
        .failures
        .iter_mut()
        .find(|f| f.method == method && f.remaining > 0 && (!f.only_html || html))
    {
        failure.remaining -= 1;
        let (status, description, retry_after) = (
            failure.status,
            failure.description.clone(),
            failure.retry_after,
        );
        inner.calls.push(Call {
            method,
            params,
            at,
            status,
        });
        return error(status, &description, retry_after);
    }
    let (status, response) = answer(&mut inner, &method, &params);
    inner.calls.push(Call {
        method,
        params,
        at,
        status,
    });
    response
}

/// A fault chosen by [`Chaos`].
#[derive(Debug, Clone, Copy)]
enum Fault {
    Flood(u32),
    ServerError,
    Timeout(Duration),
}

/// Draws whether this call of `method` fails, and how.
fn chaos_fault(shared: &Shared, method: &str) -> Option<Fault> {
    let mut inner = shared.inner.lock().unwrap();
    let (chaos, rng) = inner.chaos.as_mut()?;
    if !chaos.methods.iter().any(|m| m == method) {
        return None;
    }
    let roll = rng.below(1000);
    let flood = chaos.flood_per_mille;
    let server = flood + chaos.server_error_per_mille;
    let timeout = server + chaos.timeout_per_mille;
    let fault = if roll < flood {
        Fault::Flood(1 + u32::try_from(rng.below(2)).unwrap_or(0))
    } else if roll < server {
        Fault::ServerError
    } else if roll < timeout {
        Fault::Timeout(chaos.hold)
    } else {
        return None;
    };
    match fault {
        Fault::Flood(_) => inner.injected.flood += 1,
        Fault::ServerError => inner.injected.server_error += 1,
        Fault::Timeout(_) => inner.injected.timeout += 1,
    }
    Some(fault)
}

async fn inject_fault(
    shared: &Shared,
    fault: Fault,
    method: &str,
    mut params: Value,
    at: Duration,
) -> Response {
    params["__fault"] = json!(format!("{fault:?}"));
    let (status, response) = match fault {
        Fault::Flood(seconds) => (
            429,
            error(
                429,
                &format!("Too Many Requests: retry after {seconds}"),
                Some(seconds),
            ),
        ),
        Fault::ServerError => (502, error(502, "Bad Gateway", None)),
        Fault::Timeout(hold) => {
            tokio::time::sleep(hold).await;
            (504, error(504, "Gateway Timeout", None))
        }
    };
    record(shared, method, params, at, status);
    response
}

/// The documented spelling of a method name.
fn canonical(method: &str) -> String {
    const KNOWN: [&str; 12] = [
        "getFile",
        "getUpdates",
        "getMe",
        "getWebhookInfo",
        "sendMessage",
        "editMessageText",
        "sendChatAction",
        "setMyCommands",
        "deleteWebhook",
        "setWebhook",
        "sendMessageDraft",
        "answerCallbackQuery",
    ];
    KNOWN
        .iter()
        .find(|known| known.eq_ignore_ascii_case(method))
        .map_or_else(|| method.to_string(), |known| known.to_string())
}

fn record(shared: &Shared, method: &str, params: Value, at: Duration, status: u16) {
    shared.inner.lock().unwrap().calls.push(Call {
        method: method.to_string(),
        params,
        at,
        status,
    });
}

async fn get_updates(shared: &Shared, mut params: Value, at: Duration) -> Response {
    let offset = params.get("offset").and_then(Value::as_i64);
    let timeout = params
        .get("timeout")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(30);
    let limit = params.get("limit").and_then(Value::as_u64).unwrap_or(100) as usize;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        {
            let mut inner = shared.inner.lock().unwrap();
            // An offset past the next id is "in the future" (after the sequence
            // restarted lower): the server ignores it and returns the oldest updates.
            let future = offset.is_some_and(|o| o > inner.next_update_id + 1);
            if future {
                params["__future_offset"] = json!(true);
            }
            if let Some(offset) = offset.filter(|_| !future) {
                // An offset confirms every update before it: Telegram forgets them.
                inner
                    .updates
                    .retain(|u| u["update_id"].as_i64() >= Some(offset));
            }
            if let Some(asked) = params.get("allowed_updates").and_then(Value::as_array) {
                let asked = asked.iter().filter_map(Value::as_str).map(String::from);
                inner.allowed_updates = Some(asked.collect());
            }
            // Telegram never delivers a type the bot did not ask for.
            let allowed = inner.allowed_updates.clone();
            inner.updates.retain(|u| is_allowed(u, allowed.as_deref()));
            if !inner.updates.is_empty() || Instant::now() >= deadline {
                let batch: Vec<Value> = inner.updates.iter().take(limit).cloned().collect();
                if batch.is_empty() {
                    params["__empty"] = json!(true);
                } else {
                    params["__returned"] = json!(
                        batch
                            .iter()
                            .map(|u| u["update_id"].clone())
                            .collect::<Vec<_>>()
                    );
                }
                inner.calls.push(Call {
                    method: "getUpdates".into(),
                    params,
                    at,
                    status: 200,
                });
                return ok(Value::Array(batch));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether Telegram delivers `update` to a bot that asked for `allowed` (`None` or empty:
/// every type but the ones a bot must ask for by name).
fn is_allowed(update: &Value, allowed: Option<&[String]>) -> bool {
    const ON_REQUEST: [&str; 4] = [
        "chat_member",
        "message_reaction",
        "message_reaction_count",
        "stopped_message_generation",
    ];
    let Some(kind) = update
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "update_id"))
    else {
        return true;
    };
    match allowed {
        Some(allowed) if !allowed.is_empty() => allowed.iter().any(|a| a == kind),
        _ => !ON_REQUEST.contains(&kind.as_str()),
    }
}

/// The normal answer to a call: (status, response).
fn answer(inner: &mut Inner, method: &str, params: &Value) -> (u16, Response) {
    match method {
        "getMe" => (
            200,
            ok(
                json!({"id": BOT_ID, "is_bot": true, "first_name": "Fake LLM", "username": BOT_USERNAME,
                "can_join_groups": true, "can_read_all_group_messages": false,
                "supports_inline_queries": false, "can_connect_to_business": false,
                "has_main_web_app": false}),
            ),
        ),
        "getWebhookInfo" => webhook::webhook_info(inner),
        "deleteWebhook" => webhook::delete_webhook(inner, params),
        "setWebhook" => webhook::set_webhook(inner, params),
        "getFile" => {
            let id = params.get("file_id").and_then(Value::as_str).unwrap_or("");
            match inner.files.get(id) {
                None => (400, error(400, "Bad Request: invalid file_id", None)),
                Some(file) if file.size > DOWNLOAD_LIMIT => {
                    (400, error(400, "Bad Request: file is too big", None))
                }
                Some(file) => (
                    200,
                    ok(json!({"file_id": id, "file_unique_id": format!("u-{id}"),
                              "file_size": file.size, "file_path": file.path})),
                ),
            }
        }
        "setMyCommands" | "sendChatAction" | "answerCallbackQuery" => (200, ok(json!(true))),
        "sendMessageDraft" => {
            let chat_id = params.get("chat_id").and_then(Value::as_i64).unwrap_or(0);
            let draft_id = params.get("draft_id").and_then(Value::as_i64).unwrap_or(0);
            if draft_id == 0 {
                return (
                    400,
                    error(400, "Bad Request: draft_id must be non-zero", None),
                );
            }
            let private = inner.chats.get(&chat_id).map_or(chat_id > 0, |chat| {
                chat.get("type").and_then(Value::as_str) == Some("private")
            });
            if !private {
                return (400, error(400, "Bad Request: TEXTDRAFT_PEER_INVALID", None));
            }
            let text = params.get("text").and_then(Value::as_str).unwrap_or("");
            let html = params.get("parse_mode").and_then(Value::as_str) == Some("HTML");
            let visible = if html {
                match parse_html(text) {
                    Ok(visible) => visible,
                    Err(description) => return (400, error(400, &description, None)),
                }
            } else {
                text.to_string()
            };
            if visible.encode_utf16().count() > 4096 {
                return (400, error(400, "Bad Request: text is too long", None));
            }
            inner.drafts.insert(chat_id, (draft_id, visible));
            (200, ok(json!(true)))
        }
        "sendMessage" => {
            let Some(chat_id) = params.get("chat_id").and_then(Value::as_i64) else {
                return (400, error(400, "Bad Request: chat not found", None));
            };
            let text = params.get("text").and_then(Value::as_str).unwrap_or("");
            let html = params.get("parse_mode").and_then(Value::as_str) == Some("HTML");
            let visible = match check_text(text, html) {
                Ok(visible) => visible,
                Err(description) => return (400, error(400, &description, None)),
            };
            inner.next_message_id += 1;
            let id = inner.next_message_id;
            // Clients drop the chat's draft when the bot's message arrives.
            inner.drafts.remove(&chat_id);
            let thread = params.get("message_thread_id").and_then(Value::as_i64);
            let reply_to = params
                .get("reply_parameters")
                .and_then(|r| r.get("message_id"))
                .and_then(Value::as_i64);
            inner.messages.insert(
                (chat_id, id),
                BotMessage {
                    id,
                    text: text.to_string(),
                    html,
                    visible,
                    thread,
                    reply_to,
                    edits: 0,
                },
            );
            let chat = inner
                .chats
                .get(&chat_id)
                .cloned()
                .unwrap_or_else(|| private_chat(chat_id));
            let mut message = json!({"message_id": id, "date": now(), "chat": chat, "from": bot_user(), "text": text});
            if let Some(thread) = thread {
                message["message_thread_id"] = json!(thread);
                message["is_topic_message"] = json!(true);
            }
            (200, ok(message))
        }
        "editMessageText" => {
            let chat_id = params.get("chat_id").and_then(Value::as_i64).unwrap_or(0);
            let message_id = params
                .get("message_id")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let text = params.get("text").and_then(Value::as_str).unwrap_or("");
            let html = params.get("parse_mode").and_then(Value::as_str) == Some("HTML");
            let visible = match check_text(text, html) {
                Ok(visible) => visible,
                Err(description) => return (400, error(400, &description, None)),
            };
            let chat = inner
                .chats
                .get(&chat_id)
                .cloned()
                .unwrap_or_else(|| private_chat(chat_id));
            let Some(message) = inner.messages.get_mut(&(chat_id, message_id)) else {
                return (
                    400,
                    error(400, "Bad Request: message to edit not found", None),
                );
            };
            if message.text == text && message.html == html {
                return (
                    400,
                    error(
                        400,
                        "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
                        None,
                    ),
                );
            }
            message.text = text.to_string();
            message.html = html;
            message.visible = visible;
            message.edits += 1;
            (
                200,
                ok(
                    json!({"message_id": message_id, "date": now(), "edit_date": now(), "chat": chat, "from": bot_user(), "text": text}),
                ),
            )
        }
        _ => (404, error(404, "Not Found: method not found", None)),
    }
}

/// `GET /file/bot<token>/<file_path>`: the file's bytes (404 for anything else, as the
/// real server answers).
async fn download(
    State(shared): State<Arc<Shared>>,
    Path((bot, path)): Path<(String, String)>,
) -> Response {
    let at = shared.started.elapsed();
    let found = {
        let inner = shared.inner.lock().unwrap();
        (bot.strip_prefix("bot") == Some(shared.token.as_str()))
            .then(|| inner.files.values().find(|f| f.path == path).cloned())
            .flatten()
    };
    let status = if found.is_some() { 200 } else { 404 };
    record(&shared, "download", json!({"path": path}), at, status);
    match found {
        Some(file) => (StatusCode::OK, file.bytes).into_response(),
        None => error(404, "Not Found", None),
    }
}

/// Checks a message text as Telegram would; returns what the user sees.
fn check_text(text: &str, html: bool) -> Result<String, String> {
    let visible = if html {
        parse_html(text)?
    } else {
        text.to_string()
    };
    if visible.trim().is_empty() {
        return Err("Bad Request: message text is empty".into());
    }
    if visible.encode_utf16().count() > 4096 {
        return Err("Bad Request: message is too long".into());
    }
    Ok(visible)
}

/// Telegram's HTML subset: known tags, balanced; `&` only as an entity; `<` only as a tag.
fn parse_html(text: &str) -> Result<String, String> {
    const TAGS: [&str; 14] = [
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "a",
        "code",
        "pre",
        "span",
        "blockquote",
    ];
    let bad = |why: &str| Err(format!("Bad Request: can't parse entities: {why}"));
    let mut out = String::new();
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let Some(end) = rest.find('>') else {
                    return bad("unclosed start tag");
                };
                let tag = &rest[1..end];
                if let Some(name) = tag.strip_prefix('/') {
                    if stack.pop().as_deref() != Some(name.trim()) {
                        return bad(&format!("unmatched end tag {name}"));
                    }
                } else {
                    let name = tag.split_whitespace().next().unwrap_or("");
                    if !TAGS.contains(&name) {
                        return bad(&format!("unsupported start tag \"{name}\""));
                    }
                    stack.push(name.to_string());
                }
                rest = &rest[end + 1..];
            }
            '&' => {
                let Some(end) = rest.find(';') else {
                    return bad("unescaped &");
                };
                let decoded = match &rest[1..end] {
                    "lt" => "<",
                    "gt" => ">",
                    "amp" => "&",
                    "quot" => "\"",
                    _ => return bad("unknown entity"),
                };
                out.push_str(decoded);
                rest = &rest[end + 1..];
            }
            '>' => return bad("unescaped >"),
            c => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if !stack.is_empty() {
        return bad("unclosed tags");
    }
    Ok(out)
}
