//! Issue 13, part 2: under systemd's default open-file limit (1024), slow clients never
//! lock the others out. The real binary is started with `RLIMIT_NOFILE` lowered in its
//! own process only (`ulimit` in the shell that execs it); 1100 clients send half a
//! request and hang, and re-connect a second after the server closes them, as an
//! attacker would. `/health`, a chat completion and a Telegram message (an outgoing
//! connection) are still answered, at once and 40 s later.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::{BotProcess, Launch};
use crate::util::fake_telegram::{FakeTelegram, private_chat, user};

/// The figures: 1100 half-sent requests under a limit of 1024.
const SLOW_CLIENTS: usize = 1100;
const LIMIT: &str = "ulimit -n 1024";
/// How long the attack lasts before the second round of checks.
const HOLD: Duration = Duration::from_secs(40);
/// A request head that never ends.
const HALF_REQUEST: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
const QUESTION: &str = "What is the capital of France? Answer in one word.";

/// What the slow clients see.
#[derive(Default)]
struct Attack {
    /// Connections open now (from the clients' side).
    open: AtomicUsize,
    /// Connections made so far.
    made: AtomicUsize,
    /// Connections the server closed.
    closed: AtomicUsize,
    /// Connection attempts that failed or timed out.
    failed: AtomicUsize,
}

/// One slow client: connects, sends half a request, waits for the server to close, and
/// starts again a second later.
async fn slow_client(addr: SocketAddr, attack: Arc<Attack>) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await {
            Ok(Ok(mut stream)) => {
                attack.made.fetch_add(1, Ordering::Relaxed);
                attack.open.fetch_add(1, Ordering::Relaxed);
                let _ = stream.write_all(HALF_REQUEST).await;
                let mut buf = [0u8; 512];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                attack.open.fetch_sub(1, Ordering::Relaxed);
                attack.closed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                attack.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long each kind of client waited for its answer.
struct Probe {
    health: Duration,
    completion: Duration,
    telegram: Duration,
    /// Slow connections open (clients' side) when the probe started.
    slow_open: usize,
    /// The bot's open file descriptors when the probe started.
    bot_fds: usize,
}

impl Probe {
    fn show(&self) -> String {
        format!(
            "/health {:.3} s, completion {:.2} s, Telegram answer {:.2} s ({} slow connections \
             open, the bot's open files {})",
            self.health.as_secs_f64(),
            self.completion.as_secs_f64(),
            self.telegram.as_secs_f64(),
            self.slow_open,
            self.bot_fds
        )
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// `/health`, a completion and a Telegram message in `chat`, one after the other.
async fn probe(
    base: &str,
    fake: &FakeTelegram,
    bot: &BotProcess,
    attack: &Attack,
    chat: i64,
) -> Probe {
    let slow_open = attack.open.load(Ordering::Relaxed);
    let bot_fds = open_fds(bot.pid());
    // A fresh client each time: a new connection has to get in.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let health = client
        .get(format!("{base}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("/health: {e}\n{}", bot.stderr()));
    assert_eq!(health.status(), 200);
    let health = started.elapsed();

    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|e| panic!("completion: {e}\n{}", bot.stderr()));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body.to_string().contains("Paris"), "{body}");
    let completion = started.elapsed();

    let started = Instant::now();
    fake.send_text(&private_chat(chat), &user(chat, "patient", "en"), QUESTION);
    fake.wait_for("a Telegram answer during the attack", LONG, |f| {
        f.texts(chat).iter().any(|t| t.contains("Paris"))
    })
    .await;
    let telegram = started.elapsed();
    Probe {
        health,
        completion,
        telegram,
        slow_open,
        bot_fds,
    }
}

/// Issue 13: 1100 half-sent requests under `RLIMIT_NOFILE` 1024 made the server log
/// `accept error: Too many open files` in a loop and time every other client out, and
/// 40 s later nothing had changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_beyond_the_file_limit_never_lock_the_others_out() {
    let _permit = BOTS.acquire().await.unwrap();
    // This test process holds the slow clients' sockets: it needs more than 1100.
    let own = mistral_bot::host::nofile::raise();
    assert!(
        own.soft
            .is_none_or(|soft| soft >= SLOW_CLIENTS as u64 + 256),
        "the test needs {} open files, its hard limit allows {own:?}",
        SLOW_CLIENTS + 256
    );
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        shell: Some(LIMIT),
        ..Launch::default()
    };
    let mut bot = BotProcess::spawn(&fake, data_dir.path(), &[], "info", &launch);
    let base = bot.http_url().await;
    fake.wait_for("the bot polls", LONG, |f| {
        f.calls().iter().any(|c| c.method == "getUpdates")
    })
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bot.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("1024"), "the limit was not lowered: {line}");
    assert!(
        bot.stderr().contains("http_connections=768"),
        "{}",
        bot.stderr()
    );

    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let attack = Arc::new(Attack::default());
    let mut clients = JoinSet::new();
    for _ in 0..SLOW_CLIENTS {
        clients.spawn(slow_client(addr, Arc::clone(&attack)));
    }
    let attack_started = Instant::now();
    while attack.made.load(Ordering::Relaxed) < SLOW_CLIENTS {
        assert!(
            attack_started.elapsed() < LONG,
            "the slow clients never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_once = probe(&base, &fake, &bot, &attack, 4201).await;
    tokio::time::sleep(HOLD.saturating_sub(attack_started.elapsed())).await;
    let later = probe(&base, &fake, &bot, &attack, 4202).await;
    let made = attack.made.load(Ordering::Relaxed);
    let closed = attack.closed.load(Ordering::Relaxed);
    let failed = attack.failed.load(Ordering::Relaxed);
    clients.shutdown().await;

    let stderr = bot.stderr();
    eprintln!(
        "{SLOW_CLIENTS} slow clients under `{LIMIT}` (cap 768 connections): at once {}; \
         after {:.0} s {}; connections made {made}, closed by the server {closed}, \
         failed to connect {failed}; accept-failure warnings {}",
        at_once.show(),
        attack_started.elapsed().as_secs_f64(),
        later.show(),
        stderr.matches("HTTP accept failed").count()
    );
    assert!(bot.exited().is_none(), "{stderr}");
    assert!(
        closed > 0,
        "the server never closed a slow connection\n{stderr}"
    );
    assert!(bot.terminate().await, "exits cleanly\n{}", bot.stderr());
}

/// The soft limit is raised to the hard one at start, and both are logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_file_limit_is_raised_to_the_hard_one() {
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    let hard = mistral_bot::host::nofile::raise()
        .hard
        .map_or(4096, |hard| hard.min(4096));
    assert!(
        hard > 1024,
        "the hard limit ({hard}) leaves nothing to raise"
    );
    let shell = format!("ulimit -Sn 1024 && ulimit -Hn {hard}");
    let launch = Launch {
        shell: Some(&shell),
        ..Launch::default()
    };
    let mut bot = BotProcess::spawn(&fake, data_dir.path(), &[], "info", &launch);
    let deadline = Instant::now() + LONG;
    while !bot.stderr().contains("open-file limit") {
        assert!(bot.exited().is_none(), "{}", bot.stderr());
        assert!(Instant::now() < deadline, "{}", bot.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stderr = bot.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("open-file limit"))
        .unwrap();
    assert!(
        line.contains(&format!("soft_at_start=1024 soft={hard} hard={hard}")),
        "{line}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bot.pid())).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace()
                .filter(|w| *w == hard.to_string())
                .count()
                == 2),
        "{limits}"
    );
}
