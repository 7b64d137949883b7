//! Fair use (issue 16): per-user limits checked before anything is queued, admins exempt,
//! `/usage`, `/stats all`, and `/allow` / `/deny` that survive a restart. The real binary
//! against the fake Bot API, with the test model.

use crate::telegram::{BOTS, LONG, TOKEN};
use crate::util::bot_process::BotProcess;
use crate::util::fake_telegram::{BOT_USERNAME, FakeTelegram, forum_group, private_chat, user};

/// Answers delivered so far.
fn delivered(bot: &BotProcess) -> usize {
    bot.stderr().matches("answer delivered").count()
}

/// Requests that reached the responder (`--verbose-prompt` logs each one).
fn requests(stderr: &str) -> usize {
    stderr.lines().filter(|l| l.contains("messages=[")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_politely_before_the_model_and_access_changes_survive_a_restart() {
    let permit = BOTS.acquire().await.unwrap();
    let fake = FakeTelegram::start(TOKEN).await;
    let data_dir = tempfile::tempdir().unwrap();
    let flags = [
        "--verbose-prompt",
        "--user-messages-per-hour",
        "2",
        "--admin-users",
        "@boss",
        "--max-tokens",
        "8",
    ];
    let mut bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    let report = |bot: &BotProcess| format!("{}\n--- stderr ---\n{}", fake.dump(), bot.stderr());

    // Three messages at once from one user: two answered, the third refused at once.
    let ann = user(401, "ann", "en");
    for q in ["What is 2+2?", "What is 3+3?", "What is 4+4?"] {
        fake.send_text(&private_chat(401), &ann, q);
    }
    fake.wait_for("two answers and a refusal", LONG, |f| {
        f.messages(401).len() == 3 && delivered(&bot) == 2
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let texts = fake.texts(401);
    let refusals: Vec<&String> = texts
        .iter()
        .filter(|t| t.contains("limit of 2 messages per hour"))
        .collect();
    assert_eq!(refusals.len(), 1, "{}", report(&bot));
    assert!(refusals[0].contains("write again in"), "{}", refusals[0]);
    assert_eq!(
        requests(&bot.stderr()),
        2,
        "the refused one never reached a model\n{}",
        report(&bot)
    );

    // The same user in a group is the same user.
    let group = forum_group(-4000);
    fake.send_text(&group, &ann, &format!("@{BOT_USERNAME} What is 5+5?"));
    fake.wait_for("the group refusal", LONG, |f| f.messages(-4000).len() == 1)
        .await;
    assert!(
        fake.texts(-4000)[0].contains("limit of 2"),
        "{}",
        report(&bot)
    );

    // /usage, and the engine's figures untouched by refusals.
    fake.send_text(&private_chat(401), &ann, "/usage");
    fake.wait_for("/usage", LONG, |f| f.messages(401).len() == 4)
        .await;
    fake.send_text(&private_chat(401), &ann, "/stats");
    fake.wait_for("/stats", LONG, |f| f.messages(401).len() == 5)
        .await;
    let texts = fake.texts(401);
    assert!(
        texts[3].contains("Messages in the last hour: 2 of 2"),
        "{}",
        report(&bot)
    );
    assert!(texts[4].contains("Answers given: 2"), "{}", report(&bot));
    assert_eq!(requests(&bot.stderr()), 2, "{}", report(&bot));

    // The admin is exempt; /stats all is theirs only; /deny takes effect.
    let boss = user(402, "Boss", "en");
    for q in ["Hi", "Hello", "Hey"] {
        fake.send_text(&private_chat(402), &boss, q);
    }
    fake.wait_for("three answers for the admin", LONG, |f| {
        f.messages(402).len() == 3 && delivered(&bot) == 5
    })
    .await;
    assert_eq!(requests(&bot.stderr()), 5, "{}", report(&bot));
    fake.send_text(&private_chat(402), &boss, "/deny @carol");
    fake.wait_for("/deny", LONG, |f| f.messages(402).len() == 4)
        .await;
    fake.send_text(&private_chat(402), &boss, "/stats all");
    fake.send_text(&private_chat(401), &ann, "/stats all");
    fake.wait_for("/stats all", LONG, |f| {
        f.messages(402).len() == 5 && f.messages(401).len() == 6
    })
    .await;
    let boss_texts = fake.texts(402);
    assert!(
        boss_texts[3].contains("@carol may no longer"),
        "{}",
        report(&bot)
    );
    assert!(
        boss_texts[4].contains("Active users: 2"),
        "{}",
        report(&bot)
    );
    assert!(boss_texts[4].contains("Messages: 5"), "{}", report(&bot));
    assert!(
        !boss_texts[4].contains("2+2"),
        "no message text in /stats all"
    );
    assert!(
        fake.texts(401)[5].contains("only the bot's admins"),
        "{}",
        report(&bot)
    );
    let carol = user(403, "carol", "ru");
    fake.send_text(&private_chat(403), &carol, "Привет");
    fake.wait_for("carol refused", LONG, |f| f.messages(403).len() == 1)
        .await;
    assert!(
        fake.texts(403)[0].contains("частный бот"),
        "{}",
        report(&bot)
    );

    // After a restart: the window and the /deny are still there; /allow lets carol in.
    assert!(bot.terminate().await, "{}", bot.stderr());
    drop(bot);
    let bot = BotProcess::start(&fake, data_dir.path(), &flags, "info").await;
    fake.send_text(&private_chat(401), &ann, "What is 6+6?");
    fake.send_text(&private_chat(403), &carol, "Привет");
    fake.wait_for("both refused", LONG, |f| {
        f.messages(401).len() == 7 && f.messages(403).len() == 2
    })
    .await;
    assert!(
        fake.texts(401)[6].contains("limit of 2"),
        "{}",
        report(&bot)
    );
    assert!(
        fake.texts(403)[1].contains("частный бот"),
        "{}",
        report(&bot)
    );
    fake.send_text(&private_chat(402), &boss, "/allow @Carol");
    fake.wait_for("allowed", LONG, |f| f.messages(402).len() == 6)
        .await;
    fake.send_text(&private_chat(403), &carol, "Привет");
    fake.wait_for("carol answered", LONG, |f| {
        f.messages(403).len() == 3 && delivered(&bot) == 1
    })
    .await;
    assert_eq!(
        requests(&bot.stderr()),
        1,
        "only carol's message reached a model\n{}",
        report(&bot)
    );
    drop(bot);
    drop(permit);
}
