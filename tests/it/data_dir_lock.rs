//! One instance per data directory (issue 13): a second `mistral-bot` on the same
//! `--data-dir` (a manual run beside the systemd unit) exits at once, naming the directory
//! and the pid that holds it, while the first keeps answering, once.

use std::time::Duration;

use crate::restart::{echo_flags, en_user};
use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::BotProcess;
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};
use crate::util::fake_telegram::{FakeTelegram, private_chat};
use crate::util::test_model;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_data_dir_exits_naming_it_and_the_first_keeps_answering() {
    let _permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    let flags = echo_flags(&provider);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let first = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.send_text(
        &private_chat(80),
        &en_user(80),
        "before the second instance",
    );
    fake.wait_for("the first answer", LONG, |f| {
        f.messages(80).iter().any(|m| m.html)
    })
    .await;

    // The same command line again, as a manual run beside the service would be.
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"))
        .arg("--model")
        .arg(test_model())
        .args(&flags)
        .args(["--threads", "1", "--telegram-api-url", &fake.url])
        .args(["--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .env("TELEGRAM_BOT_TOKEN", &fake.token)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second instance exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    let report = format!(
        "--- second instance ---\n{stderr}\n--- first instance ---\n{}\n{}",
        first.stderr(),
        fake.dump()
    );
    assert!(!second.status.success(), "{report}");
    assert!(
        stderr.contains(&data_dir.path().display().to_string()),
        "the message names the directory\n{report}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "the message names the holder\n{report}"
    );
    assert!(
        !stderr.contains("model loaded") && !stderr.contains("conversation store open"),
        "the second instance touched nothing\n{report}"
    );
    let lock = std::fs::read_to_string(data_dir.path().join("lock")).unwrap();
    assert_eq!(lock.trim(), first.pid().to_string());

    // The first one still answers, exactly once.
    fake.send_text(&private_chat(80), &en_user(80), "after the second instance");
    fake.wait_for("the second answer", LONG, |f| {
        f.messages(80).iter().filter(|m| m.html).count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fake.texts(80),
        [
            "Echo: before the second instance",
            "Echo: after the second instance"
        ],
        "{report}"
    );
    assert_eq!(fake.unconfirmed(), 0, "every update confirmed\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_http_fronts_counting_cloud_budgets_cannot_share_a_data_dir() {
    // A front without a bot or a model still writes budgets.json under --data-dir.
    let provider = FakeProvider::start(Shape::OpenAi, Behavior::Echo).await;
    let data_dir = tempfile::tempdir().unwrap();
    let front = || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"));
        command
            .args([
                "--chain",
                "groq",
                "--groq-api-key",
                "test-key",
                "--groq-base-url",
            ])
            .arg(provider.base_url.as_str())
            .args(["--groq-daily-tokens", "1000000"])
            .args(["--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .env_remove("TELEGRAM_BOT_TOKEN")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut first = front().spawn().unwrap();
    let pid = first.id().unwrap().to_string();
    let lock = data_dir.path().join("lock");
    let deadline = std::time::Instant::now() + LONG;
    while std::fs::read_to_string(&lock).map_or(true, |l| l.trim() != pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first front never took the lock"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first front exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = tokio::time::timeout(Duration::from_secs(60), front().output())
        .await
        .expect("the second front exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first front keeps serving"
    );
    first.kill().await.unwrap();
}
