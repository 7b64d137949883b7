//! A front without a model over a fleet of real mistral-bot backends (issue 15): every
//! process is the real binary, the backends run the test model with one thread each.
//! Which backend answered is read from the backends' own counters, and whether a turn
//! reused the backend's cache from their `prompt_tokens_cached`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::bot_process::BotProcess;
use crate::util::test_model;

/// A port free now (the backend restarted on it must keep its URL).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One backend: the test model, one thread, the local engine only, on `port`.
async fn backend(port: u16, data: &Path) -> BotProcess {
    let args: Vec<String> = [
        "--model",
        &test_model().to_string_lossy(),
        "--chain",
        "local",
        "--threads",
        "1",
        "--ctx-size",
        "1024",
        "--max-tokens",
        "200",
        "--temperature",
        "0",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
    ]
    .map(String::from)
    .to_vec();
    BotProcess::serve_http(&args, data).await.0
}

/// The front: no model, the generic provider over `ports`.
async fn front(ports: &[u16], data: &Path) -> (BotProcess, String) {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/v1"))
        .collect();
    let args: Vec<String> = [
        "--chain",
        "openai",
        "--openai-base-url",
        &urls.join(","),
        "--openai-model",
        "SmolLM2-135M-Instruct",
        "--openai-timeout",
        "120",
        "--http-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    BotProcess::serve_http(&args, data).await
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
}

/// A backend's engine counters: (requests finished, prompt tokens found in its cache);
/// zeros for a backend that does not answer (killed).
async fn engine(client: &reqwest::Client, port: u16) -> (u64, u64) {
    let url = format!("http://127.0.0.1:{port}/dialogue_metrics");
    let Ok(response) = client.get(url).send().await else {
        return (0, 0);
    };
    let body: Value = response.json().await.unwrap_or_default();
    let engine = &body["data"]["engine"];
    (
        engine["requests_finished"].as_u64().unwrap_or(0),
        engine["prompt_tokens_cached"].as_u64().unwrap_or(0),
    )
}

/// What one turn of one chat got.
struct Turn {
    /// Index of the backend that answered.
    backend: usize,
    /// Prompt tokens that backend found in its cache.
    cached: u64,
    /// The reply.
    text: String,
    /// How long the front took.
    seconds: f64,
}

/// Sends `messages` to the front and finds which backend of `ports` answered.
async fn turn(
    client: &reqwest::Client,
    front: &str,
    ports: &[u16],
    alive: &[bool],
    messages: &[Value],
) -> Turn {
    let mut before = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        before.push(if alive[i] {
            engine(client, port).await
        } else {
            (0, 0)
        });
    }
    let started = Instant::now();
    let response = client
        .post(format!("{front}/v1/chat/completions"))
        .json(&json!({"messages": messages, "max_tokens": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let provider = response
        .headers()
        .get("x-mistral-bot-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = response.json().await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(provider, "openai", "answered by the fleet: {body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.trim().is_empty(), "{body}");
    // The backend's counters move once its reply is done: wait for exactly one to move.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut moved = Vec::new();
        for (i, &port) in ports.iter().enumerate() {
            if alive[i] {
                let now = engine(client, port).await;
                if now.0 > before[i].0 {
                    moved.push((i, now.0 - before[i].0, now.1 - before[i].1));
                }
            }
        }
        match moved.as_slice() {
            [(backend, 1, cached)] => {
                return Turn {
                    backend: *backend,
                    cached: *cached,
                    text,
                    seconds,
                };
            }
            [] if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("expected one backend to answer once, saw {other:?}"),
        }
    }
}

/// The opening of chat `i`: different for each chat (the front keys a conversation by it).
fn opening(i: usize) -> Value {
    json!({"role": "user", "content": format!("Chat {i}: name a colour and a number near {}.", i * 7)})
}

/// Figures of the front's fleet servers: (url, up, requests).
async fn fleet(client: &reqwest::Client, front: &str) -> Vec<(String, bool, u64)> {
    let body = get(client, &format!("{front}/dialogue_metrics")).await;
    body["data"]["fleet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["url"].as_str().unwrap().to_string(),
                s["up"].as_bool().unwrap(),
                s["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chat_returns_to_its_backend_moves_when_it_dies_and_comes_back() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut backends = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        backends.push(backend(port, dirs[i].path()).await);
    }
    let (front_process, front) = front(&ports, dirs[3].path()).await;
    let client = reqwest::Client::new();
    // Without a model the front is ready at once and says so.
    let ready = get(&client, &format!("{front}/ready")).await;
    assert_eq!(ready["local_model"], json!(false), "{ready}");
    let models = get(&client, &format!("{front}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], json!("SmolLM2-135M-Instruct"));

    const CHATS: usize = 8;
    let mut history: Vec<Vec<Value>> = (0..CHATS).map(|i| vec![opening(i)]).collect();
    let mut home = vec![usize::MAX; CHATS];
    let mut alive = vec![true; 3];
    let followups = [
        "And another one?",
        "Why that one?",
        "Say it again.",
        "Thanks!",
    ];
    // Three rounds: the first places each chat, the next two must find their caches.
    for (round, followup) in followups.iter().take(3).enumerate() {
        for chat in 0..CHATS {
            let got = turn(&client, &front, &ports, &alive, &history[chat]).await;
            if round == 0 {
                home[chat] = got.backend;
            } else {
                assert_eq!(
                    got.backend, home[chat],
                    "chat {chat} round {round} left its backend"
                );
                assert!(
                    got.cached > 0,
                    "chat {chat} round {round}: no cache hit on its backend"
                );
            }
            history[chat].push(json!({"role": "assistant", "content": got.text}));
            history[chat].push(json!({"role": "user", "content": followup}));
        }
    }
    let used: std::collections::BTreeSet<usize> = home.iter().copied().collect();
    assert!(used.len() > 1, "8 chats all on one backend: {home:?}");

    // The backend holding the most chats dies (kill -9) between two rounds.
    let dead = (0..3)
        .max_by_key(|b| home.iter().filter(|h| *h == b).count())
        .unwrap();
    backends[dead].kill();
    alive[dead] = false;
    let mut moved_seconds = Vec::new();
    let mut stayed_seconds = Vec::new();
    for chat in 0..CHATS {
        let got = turn(&client, &front, &ports, &alive, &history[chat]).await;
        if home[chat] == dead {
            assert_ne!(got.backend, dead);
            moved_seconds.push(got.seconds);
        } else {
            assert_eq!(
                got.backend, home[chat],
                "chat {chat} on a live backend moved"
            );
            assert!(got.cached > 0, "chat {chat}: no cache hit");
            stayed_seconds.push(got.seconds);
        }
        history[chat].push(json!({"role": "assistant", "content": got.text}));
        history[chat].push(json!({"role": "user", "content": followups[3]}));
    }
    let servers = fleet(&client, &front).await;
    assert!(
        !servers[dead].1,
        "the dead backend is marked down: {servers:?}"
    );
    eprintln!(
        "failover: {} chats moved off the dead backend; their first turns took {:?} s, the \
         others' {:?} s",
        moved_seconds.len(),
        moved_seconds,
        stayed_seconds
    );

    // It comes back on the same port: the front's probe finds it, its chats return.
    backends[dead] = backend(ports[dead], dirs[dead].path()).await;
    let restarted_at = Instant::now();
    alive[dead] = true;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fleet(&client, &front).await[dead].1 {
        assert!(
            Instant::now() < deadline,
            "the front never saw the backend come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "recovery: marked up {:.2} s after the restarted backend was ready",
        restarted_at.elapsed().as_secs_f64()
    );
    for chat in 0..CHATS {
        let got = turn(&client, &front, &ports, &alive, &history[chat]).await;
        assert_eq!(got.backend, home[chat], "chat {chat} did not return");
        // The ones that never moved still have their caches.
        if home[chat] != dead {
            assert!(got.cached > 0, "chat {chat}: no cache hit");
        }
    }
    let metrics = client
        .get(format!("{front}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "mistral_bot_fleet_server_up{{server=\"http://127.0.0.1:{}/v1\"}} 1",
            ports[dead]
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mistral_bot_fleet_server_errors_total"),
        "{metrics}"
    );
    drop(front_process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_new_chats_at_once_spread_within_the_load_bound() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut backends = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        backends.push(backend(port, dirs[i].path()).await);
    }
    let (_front_process, front) = front(&ports, dirs[3].path()).await;
    let client = reqwest::Client::new();
    const CHATS: usize = 20;
    let requests = (0..CHATS).map(|i| {
        let client = client.clone();
        let front = front.clone();
        async move {
            let response = client
                .post(format!("{front}/v1/chat/completions"))
                .json(&json!({"messages": [opening(100 + i)], "max_tokens": 24}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["provider"], json!("openai"), "{body}");
        }
    });
    futures::future::join_all(requests).await;
    let servers = fleet(&client, &front).await;
    let counts: Vec<u64> = servers.iter().map(|s| s.2).collect();
    assert_eq!(counts.iter().sum::<u64>(), CHATS as u64, "{servers:?}");
    // Each server's share of 20 is 6.67; the bound allows 1.25 times it, rounded up: 9.
    let bound = mistral_bot::providers::fleet::route::capacity(1.25, CHATS, 3) as u64;
    assert_eq!(bound, 9);
    for (i, &port) in ports.iter().enumerate() {
        let (finished, _) = engine(&client, port).await;
        assert_eq!(finished, counts[i], "backend {i} and the front disagree");
        assert!(
            finished <= bound,
            "backend {i} got {finished} of {CHATS}: {counts:?}"
        );
    }
    eprintln!("20 new chats over 3 backends: {counts:?} (bound {bound})");
}
