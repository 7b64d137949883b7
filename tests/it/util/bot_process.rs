//! The real `mistral-bot` binary as a subprocess: started against a fake Bot API with the
//! test model, its stderr captured (to check logs, and to print on failure).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fake_provider::FAKE_MODEL;
use super::fake_telegram::FakeTelegram;
use super::test_model;

/// Flags every test bot gets: the test model, greedy decoding, small windows, and one
/// thread: llama.cpp's worker threads spin while they wait for each other, which on a
/// busy 2-core machine (parallel tests, other builds) made decoding ~50 times slower. The
/// cloud providers ask for the model the fakes offer ([`FAKE_MODEL`]): like the real
/// APIs, a fake answers 404 for a model it does not have, and the defaults are real models.
/// Answers stream with edits, in every chat, unless a test asks for drafts (the default of
/// the binary; `tests/it/drafts.rs`).
pub const BASE_ARGS: [&str; 20] = [
    "--groq-model",
    FAKE_MODEL,
    "--mistral-model",
    FAKE_MODEL,
    "--gemini-model",
    FAKE_MODEL,
    "--openai-model",
    FAKE_MODEL,
    "--temperature",
    "0",
    "--ctx-size",
    "1024",
    "--max-tokens",
    "200",
    "--threads",
    "1",
    "--slots",
    "4",
    "--telegram-streaming",
    "edit",
];

/// The base flags not overridden in `extra`, then `extra` (clap refuses a flag twice).
fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = BASE_ARGS
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .copied()
        .collect();
    out.extend_from_slice(extra);
    out
}

/// Removes terminal colour codes, so log lines can be matched as text.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How to start the binary, beyond its flags.
#[derive(Debug, Default)]
pub struct Launch<'a> {
    /// Environment (name, value) pairs (API keys).
    pub env: &'a [(&'a str, &'a str)],
    /// Shell commands run before the binary in the same process (`ulimit -n 1024`).
    pub shell: Option<&'a str>,
    /// The token to give instead of the one the fake accepts.
    pub token: Option<&'a str>,
}

/// A running bot process.
pub struct BotProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl BotProcess {
    /// Starts the binary against `fake` with `extra` flags (after the base ones, so they
    /// win) and its state in `data_dir`; the token goes in the environment. Returns once
    /// the bot polls for updates.
    pub async fn start(
        fake: &FakeTelegram,
        data_dir: &Path,
        extra: &[&str],
        rust_log: &str,
    ) -> Self {
        Self::start_with_env(fake, data_dir, extra, rust_log, &[]).await
    }

    /// As [`start`](Self::start), with `env` (name, value) pairs set too (API keys).
    pub async fn start_with_env(
        fake: &FakeTelegram,
        data_dir: &Path,
        extra: &[&str],
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let launch = Launch {
            env,
            ..Launch::default()
        };
        let mut bot = Self::spawn(fake, data_dir, extra, rust_log, &launch);
        bot.wait_polling(fake).await;
        bot
    }

    /// Starts the binary as [`start`](Self::start) does, as `launch` says, and returns at
    /// once (the fake may be down).
    pub fn spawn(
        fake: &FakeTelegram,
        data_dir: &Path,
        extra: &[&str],
        rust_log: &str,
        launch: &Launch<'_>,
    ) -> Self {
        let binary = env!("CARGO_BIN_EXE_mistral-bot");
        let mut command = match launch.shell {
            // `exec` keeps the pid: signals and /proc/<pid> reach the bot itself.
            Some(script) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!("{script} && exec \"$0\" \"$@\""))
                    .arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.envs(launch.env.iter().copied());
        // `extra` may point the bot elsewhere (a host that does not resolve).
        if !extra.contains(&"--telegram-api-url") {
            command.args(["--telegram-api-url", &fake.url]);
        }
        command
            .arg("--model")
            .arg(test_model())
            .args(flags(extra))
            .args(["--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("TELEGRAM_BOT_TOKEN", launch.token.unwrap_or(&fake.token))
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .env_remove("MISTRAL_BOT_ALLOWED_USERS")
            .env_remove("MISTRAL_BOT_SYSTEM_PROMPT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&strip_ansi(&line));
                sink.push('\n');
            }
        });
        Self { child, stderr }
    }

    /// Waits until the bot polls `fake` for updates.
    async fn wait_polling(&mut self, fake: &FakeTelegram) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !fake.calls().iter().any(|c| c.method == "getUpdates") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the bot exited with {status}:\n{}", self.stderr());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the bot did not start polling:\n{}\n{}",
                self.stderr(),
                fake.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The HTTP API's base URL (`http://127.0.0.1:port`), once the bot has logged it.
    pub async fn http_url(&mut self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(url) = self
                .stderr()
                .lines()
                .find_map(|l| l.split("HTTP API listening on ").nth(1))
            {
                return url.trim().to_string();
            }
            if let Some(status) = self.exited() {
                panic!("the bot exited with {status}:\n{}", self.stderr());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the bot logged no HTTP address:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status, if the bot has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the bot wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub async fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..3000 {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for BotProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer of `mistral-bot --prompt` with the base flags and `extra` flags.
pub fn reference_answer(prompt: &str, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .arg("--model")
        .arg(test_model())
        .args(flags(extra))
        .args(["--prompt", prompt])
        .env_remove("TELEGRAM_BOT_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "--prompt failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}
