//! `mistral-bot doctor` as a user runs it (issue 8, part 2): the real binary against the fake
//! Bot API and fake cloud providers, with a healthy set-up and a broken one (wrong key,
//! missing model, a file that is no model, a data dir that cannot be written, a busy
//! address, a rejected token). Each problem is one ✗ line naming its fix; the exit code
//! says whether the bot can run; no secret is ever printed. Also the serve-mode start-up
//! check, which logs the same provider results.

use std::io::Write as _;
use std::process::Output;

use crate::util::fake_provider::{Behavior, FAKE_KEY, FakeProvider, Shape};
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram};
use crate::util::test_model;

const TOKEN: &str = "123456:doctor-secret-token";

async fn doctor(args: &[&str], token: &str, keys: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mistral-bot"));
    command
        .arg("doctor")
        .args(args)
        .env("TELEGRAM_BOT_TOKEN", token)
        .env_remove("RUST_LOG")
        .env_remove("GROQ_API_KEY")
        .env_remove("MISTRAL_API_KEY")
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_COMPAT_API_KEY");
    for (name, value) in keys {
        command.env(name, value);
    }
    command.output().await.expect("the binary runs")
}

/// The flags naming what the doctor checks in place: the model file, the data directory,
/// the HTTP address and the Bot API.
fn placed<'a>(model: &'a str, data: &'a str, http: &'a str, telegram: &'a str) -> [&'a str; 8] {
    [
        "--model",
        model,
        "--data-dir",
        data,
        "--http-addr",
        http,
        "--telegram-api-url",
        telegram,
    ]
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The line of check `name`.
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{report}"))
}

fn assert_no_secret(output: &Output, secrets: &[&str]) {
    let all = format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
    for secret in secrets {
        assert!(!all.contains(secret), "{secret} printed:\n{all}");
    }
}

#[tokio::test]
async fn doctor_passes_a_healthy_setup() {
    let telegram = FakeTelegram::start(TOKEN).await;
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    groq.set_models(&["openai/gpt-oss-120b"]);
    let data = tempfile::tempdir().unwrap();
    let model = test_model();
    let output = doctor(
        &[
            &placed(
                model.to_str().unwrap(),
                data.path().to_str().unwrap(),
                "127.0.0.1:0",
                &telegram.url,
            )[..],
            &[
                "--chain",
                "local,groq",
                "--groq-base-url",
                groq.base_url.as_str(),
                "--threads",
                "1",
                "--ctx-size",
                "1024",
                "--max-tokens",
                "200",
            ],
        ]
        .concat(),
        TOKEN,
        &[("GROQ_API_KEY", FAKE_KEY)],
    )
    .await;
    let report = stdout(&output);
    println!("{report}");
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let model_line = line(&report, "model");
    assert!(model_line.starts_with('✓'), "{model_line}");
    for fact in ["GGUF v3", "llama", "Q4_1", "M parameters"] {
        assert!(model_line.contains(fact), "{fact}: {model_line}");
    }
    assert!(
        line(&report, "context").contains("trained with 8192"),
        "{report}"
    );
    assert!(line(&report, "memory").contains("KV cache"), "{report}");
    assert!(
        line(&report, "telegram").contains(&format!("@{BOT_USERNAME}")),
        "{report}"
    );
    assert!(line(&report, "webhook").starts_with('✓'), "{report}");
    assert!(
        line(&report, "privacy").contains("privacy mode on"),
        "{report}"
    );
    assert!(line(&report, "groq").starts_with('✓'), "{report}");
    assert!(line(&report, "data").starts_with('✓'), "{report}");
    assert!(!report.contains('✗'), "{report}");
    assert_no_secret(&output, &[TOKEN, FAKE_KEY]);
    // Only getMe and getWebhookInfo: the doctor changes nothing at Telegram.
    let methods: Vec<_> = telegram.calls().iter().map(|c| c.method.clone()).collect();
    assert_eq!(methods, ["getMe", "getWebhookInfo"]);
}

#[tokio::test]
async fn doctor_names_every_problem_with_its_fix_and_fails() {
    let telegram = FakeTelegram::start("999:the-right-token").await;
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["x"])).await;
    gemini.set_models(&["gemini-3.5-flash-lite"]);
    let mut not_a_model = tempfile::NamedTempFile::new().unwrap();
    not_a_model
        .write_all(b"<html>404 Not Found</html>")
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    let data_dir = file.path().join("data");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let output = doctor(
        &[
            &placed(
                not_a_model.path().to_str().unwrap(),
                data_dir.to_str().unwrap(),
                &busy_addr,
                &telegram.url,
            )[..],
            &[
                "--chain",
                "groq,gemini,local",
                "--groq-base-url",
                groq.base_url.as_str(),
                "--gemini-base-url",
                gemini.base_url.as_str(),
                "--gemini-model",
                "gemini-2.5-flash",
            ],
        ]
        .concat(),
        TOKEN,
        &[
            ("GROQ_API_KEY", "gsk_wrong_key"),
            ("GEMINI_API_KEY", FAKE_KEY),
        ],
    )
    .await;
    let report = stdout(&output);
    println!("{report}");
    assert_eq!(output.status.code(), Some(1), "{report}");
    let expect = [
        ("model", "not a GGUF file"),
        ("data", "pass --data-dir DIR"),
        ("http", "pass --http-addr"),
        ("telegram", "set TELEGRAM_BOT_TOKEN"),
        ("groq", "set --groq-api-key (GROQ_API_KEY)"),
        (
            "gemini",
            "set --gemini-model (GEMINI_MODEL) (offered: gemini-3.5-flash-lite)",
        ),
    ];
    for (name, fix) in expect {
        let found = line(&report, name);
        assert!(found.starts_with('✗'), "{name}: {found}");
        assert!(found.contains(fix), "{name} should say {fix:?}: {found}");
    }
    assert_no_secret(&output, &[TOKEN, "gsk_wrong_key", FAKE_KEY]);
    drop(busy);
}

#[tokio::test]
async fn doctor_warns_about_a_webhook_and_a_missing_key() {
    let telegram = FakeTelegram::start(TOKEN).await;
    telegram.set_webhook("https://example.org/hook");
    let data = tempfile::tempdir().unwrap();
    let model = test_model();
    let output = doctor(
        &[
            &placed(
                model.to_str().unwrap(),
                data.path().to_str().unwrap(),
                "127.0.0.1:0",
                &telegram.url,
            )[..],
            &["--chain", "local,mistral", "--threads", "1"],
        ]
        .concat(),
        TOKEN,
        &[],
    )
    .await;
    let report = stdout(&output);
    assert!(
        output.status.success(),
        "warnings alone let the bot run:\n{report}"
    );
    assert!(line(&report, "webhook").starts_with('⚠'), "{report}");
    let mistral = line(&report, "mistral");
    assert!(
        mistral.starts_with('⚠') && mistral.contains("MISTRAL_API_KEY"),
        "{mistral}"
    );
}

#[tokio::test]
async fn the_startup_check_logs_each_provider_while_the_engine_loads() {
    let telegram = FakeTelegram::start(TOKEN).await;
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    groq.set_models(&["openai/gpt-oss-120b"]);
    let mistral = FakeProvider::start(Shape::OpenAi, Behavior::answer(&["x"])).await;
    let gemini = FakeProvider::start(Shape::Gemini, Behavior::answer(&["x"])).await;
    gemini.set_models(&["gemini-3.5-flash-lite"]);
    let data = tempfile::tempdir().unwrap();
    let bot = crate::util::bot_process::BotProcess::start_with_env(
        &telegram,
        data.path(),
        &[
            "--chain",
            "local,groq,mistral,gemini,openai",
            "--groq-base-url",
            groq.base_url.as_str(),
            "--mistral-base-url",
            mistral.base_url.as_str(),
            "--gemini-base-url",
            gemini.base_url.as_str(),
            "--gemini-model",
            "gemini-2.5-flash",
            "--groq-model",
            "openai/gpt-oss-120b",
        ],
        "info",
        &[
            ("GROQ_API_KEY", FAKE_KEY),
            ("MISTRAL_API_KEY", "wrong-mistral-key"),
            ("GEMINI_API_KEY", FAKE_KEY),
        ],
    )
    .await;
    crate::util::wait_until(
        "four start-up check lines",
        std::time::Duration::from_secs(30),
        || bot.stderr().matches("start-up check").count() >= 4,
    )
    .await;
    let log = bot.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("start-up check"))
        .collect();
    println!("{}", lines.join("\n"));
    let of = |provider: &str| {
        *lines
            .iter()
            .find(|l| {
                l.contains(&format!("provider=\"{provider}\""))
                    || l.contains(&format!("provider={provider}"))
            })
            .unwrap_or_else(|| panic!("no line for {provider}:\n{log}"))
    };
    assert!(
        of("groq").contains("INFO") && of("groq").contains("key accepted"),
        "{log}"
    );
    assert!(
        of("mistral").contains("ERROR") && of("mistral").contains("--mistral-api-key"),
        "{log}"
    );
    assert!(
        of("gemini").contains("--gemini-model (GEMINI_MODEL)"),
        "{log}"
    );
    assert!(
        of("openai").contains("WARN") && of("openai").contains("OPENAI_COMPAT_API_KEY"),
        "{log}"
    );
    assert!(!log.contains(FAKE_KEY) && !log.contains("wrong-mistral-key") && !log.contains(TOKEN));
}

#[tokio::test]
async fn a_hanging_provider_does_not_hold_up_the_start() {
    let telegram = FakeTelegram::start(TOKEN).await;
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::Hang).await;
    let data = tempfile::tempdir().unwrap();
    // `start` returns once the bot polls Telegram, i.e. once the engine is ready.
    let bot = crate::util::bot_process::BotProcess::start_with_env(
        &telegram,
        data.path(),
        &[
            "--chain",
            "local,groq",
            "--groq-base-url",
            groq.base_url.as_str(),
        ],
        "info",
        &[("GROQ_API_KEY", FAKE_KEY)],
    )
    .await;
    crate::util::wait_until(
        "the check of the hanging provider gives up",
        std::time::Duration::from_secs(30),
        || bot.stderr().contains("start-up check"),
    )
    .await;
    let log = bot.stderr();
    let line = log.lines().find(|l| l.contains("start-up check")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("no answer within 5 s"),
        "{line}"
    );
    assert!(line.contains("--groq-base-url (GROQ_BASE_URL)"), "{line}");
}
