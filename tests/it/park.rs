//! KV parking against the real llama.cpp and the test model: conversations that lose
//! their slot, move to disk, survive an engine restart, and bad park files.

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mistral_bot::chat::{ChatMessage, ChatRequest, Usage};
use mistral_bot::engine::park::file;
use mistral_bot::engine::{EngineConfig, EngineHandle, ParkConfig};

use crate::util::{engine_config, greedy, start_engine};

const MIB: u64 = 1 << 20;

/// A test engine with `slots` slots and parking under `dir`.
fn parking_config(slots: usize, dir: &Path, ram_bytes: u64, disk_bytes: u64) -> EngineConfig {
    let mut config = engine_config();
    config.slots = NonZeroUsize::new(slots).unwrap();
    config.park = Some(ParkConfig {
        dir: dir.to_path_buf(),
        ram_bytes,
        disk_bytes,
    });
    config
}

/// One conversation, as a front end keeps it.
#[derive(Clone)]
struct Chat {
    messages: Vec<ChatMessage>,
    /// The prompt tokens of its last turn (0 before the first).
    last_prompt_tokens: u32,
}

impl Chat {
    fn new() -> Self {
        Self {
            messages: Vec::new(),
            last_prompt_tokens: 0,
        }
    }

    /// Asks `question` (greedy, 16 tokens at most); returns the answer and its usage.
    async fn turn(&mut self, engine: &EngineHandle, question: &str) -> (String, Usage) {
        self.messages.push(ChatMessage::user(question));
        let request = ChatRequest::new(self.messages.clone(), greedy(16));
        let (answer, done) = engine.submit(request).unwrap().collect().await.unwrap();
        self.messages.push(ChatMessage::assistant(answer.trim()));
        self.last_prompt_tokens = done.usage.prompt_tokens;
        (answer, done.usage)
    }
}

fn opening(n: usize) -> String {
    format!(
        "Conversation number {n}. I am planning a small garden with tomatoes, basil and \
         {n} rows of beans, and I would like some simple advice before I start."
    )
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn park_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvpark"))
        .collect();
    files.sort();
    files
}

/// Turn 1 of chat A, then turn 2 of it in an engine where it never leaves its slot: the
/// reference every restored continuation must match.
async fn reference_turns() -> (Chat, String, Usage) {
    let engine = start_engine(engine_config()).await;
    let mut chat = Chat::new();
    chat.turn(&engine, &opening(1)).await;
    let mut second = chat.clone();
    let (answer, usage) = second
        .turn(&engine, "Which of them needs the most sun?")
        .await;
    (chat, answer, usage)
}

#[tokio::test]
async fn a_conversation_parked_in_ram_then_on_disk_continues_in_a_new_engine_as_if_it_never_left() {
    let (reference_chat, reference_answer, reference_usage) = reference_turns().await;
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    // One slot; RAM holds one parked conversation of this size (~60 tokens, ~1.4 MB), not two.
    let engine = start_engine(parking_config(1, &kv, 2 * MIB, 64 * MIB)).await;
    let mut a = Chat::new();
    let (_, usage) = a.turn(&engine, &opening(1)).await;
    assert_eq!(
        a.messages, reference_chat.messages,
        "same first turn as the reference"
    );
    let tokens_a = usage.prompt_tokens + usage.completion_tokens;

    // B takes the only slot: A is parked in RAM.
    Chat::new().turn(&engine, &opening(2)).await;
    let stats = engine.stats();
    assert!(stats.kv_park_ram_bytes > 0, "A is parked in RAM: {stats:?}");
    assert_eq!(stats.kv_park_disk_bytes, 0, "{stats:?}");
    eprintln!(
        "park size: {} bytes for about {tokens_a} tokens ({} bytes per token)",
        stats.kv_park_ram_bytes,
        stats.kv_park_ram_bytes / u64::from(tokens_a)
    );

    // C takes the slot: B is parked in RAM, pushing A out to disk.
    Chat::new().turn(&engine, &opening(3)).await;
    let stats = engine.stats();
    assert!(stats.kv_park_ram_bytes <= 2 * MIB, "{stats:?}");
    crate::util::wait_until("A is written to disk", Duration::from_secs(30), || {
        engine.stats().kv_park_disk_bytes > 0
    })
    .await;
    assert!(engine.park_all(Duration::from_secs(60)).await);
    assert!(!park_files(&kv).is_empty());
    drop(engine);

    // A new engine on the same directory: A's state comes back from its file.
    let engine = start_engine(parking_config(1, &kv, 2 * MIB, 64 * MIB)).await;
    assert!(engine.stats().kv_park_disk_bytes > 0);
    let (answer, usage) = a.turn(&engine, "Which of them needs the most sun?").await;
    let stats = engine.stats();
    assert_eq!(stats.kv_park_hits_disk, 1, "{stats:?}");
    assert_eq!(
        answer, reference_answer,
        "same greedy continuation as a chat that never left its slot"
    );
    assert_eq!(
        usage.processed_tokens, reference_usage.processed_tokens,
        "only the new tokens are processed, as in the slot: {usage:?} vs {reference_usage:?}"
    );
    assert!(
        usage.processed_tokens <= usage.prompt_tokens - reference_chat.last_prompt_tokens,
        "{usage:?}"
    );
    assert_eq!(
        stats.prompt_tokens_processed,
        u64::from(usage.processed_tokens)
    );
}

#[tokio::test]
async fn twelve_chats_on_two_slots_process_only_their_new_tokens_within_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    // RAM holds a few parked chats, disk all of them.
    let (ram, disk) = (8 * MIB, 80 * MIB);
    let engine = start_engine(parking_config(2, &kv, ram, disk)).await;
    let mut chats: Vec<Chat> = (0..12).map(|_| Chat::new()).collect();
    let questions = [
        "Which of them needs the most sun?",
        "And how often should I water them?",
    ];
    for round in 0..3 {
        // Two chats at a time, one per slot; every other round backwards, so that the
        // chats parked last (still in RAM) come back first.
        for step in 0..6 {
            let pair = if round % 2 == 1 { 5 - step } else { step };
            let (left, right) = chats.split_at_mut(2 * pair + 1);
            let (first, second) = (&mut left[2 * pair], &mut right[0]);
            let (q1, q2) = match round {
                0 => (opening(2 * pair), opening(2 * pair + 1)),
                r => (questions[r - 1].to_string(), questions[r - 1].to_string()),
            };
            let (before1, before2) = (first.last_prompt_tokens, second.last_prompt_tokens);
            let ((_, u1), (_, u2)) =
                futures::join!(first.turn(&engine, &q1), second.turn(&engine, &q2));
            if round > 0 {
                for (usage, before) in [(u1, before1), (u2, before2)] {
                    assert!(
                        usage.processed_tokens <= usage.prompt_tokens - before,
                        "round {round}, pair {pair}: only the new turn is processed: {usage:?}, \
                         previous prompt {before} tokens; {:?}",
                        engine.stats()
                    );
                }
            }
            let stats = engine.stats();
            assert!(stats.kv_park_ram_bytes <= ram, "{stats:?}");
            assert!(stats.kv_park_disk_bytes <= disk, "{stats:?}");
            assert!(dir_bytes(&kv) <= disk, "{} bytes on disk", dir_bytes(&kv));
        }
    }
    let stats = engine.stats();
    assert!(stats.kv_park_hits_ram > 0, "{stats:?}");
    assert!(stats.kv_park_hits_disk > 0, "{stats:?}");
    assert!(engine.park_all(Duration::from_secs(60)).await);
    assert!(dir_bytes(&kv) <= disk);
}

/// Parks chat A (after its first turn) in a file of its own under `kv` and returns it.
async fn park_chat_a_on_disk(kv: &Path) -> Chat {
    // No RAM: a parked state goes straight to disk.
    let engine = start_engine(parking_config(1, kv, 0, 64 * MIB)).await;
    let mut a = Chat::new();
    a.turn(&engine, &opening(1)).await;
    Chat::new().turn(&engine, &opening(2)).await;
    assert!(engine.park_all(Duration::from_secs(60)).await);
    a
}

/// Asks A's second turn in a fresh engine on `kv` (with `ctx_size`) and checks the answer
/// matches the reference and that no parked state was used.
async fn second_turn_ignores_the_files(
    kv: &Path,
    ctx_size: u32,
    mut a: Chat,
    reference: &str,
) -> EngineHandle {
    let mut config = parking_config(1, kv, 0, 64 * MIB);
    config.ctx_size = NonZeroU32::new(ctx_size).unwrap();
    let engine = start_engine(config).await;
    let (answer, usage) = a.turn(&engine, "Which of them needs the most sun?").await;
    assert_eq!(
        answer, reference,
        "a bad park file never changes the answer"
    );
    let stats = engine.stats();
    assert_eq!(stats.kv_park_hits_disk, 0, "{stats:?}");
    assert_eq!(
        usage.cached_tokens, 0,
        "the whole prompt is decoded: {usage:?}"
    );
    engine
}

#[tokio::test]
async fn truncated_corrupt_or_foreign_park_files_are_ignored_and_the_answer_is_right() {
    let (_, reference, _) = reference_turns().await;
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    let a = park_chat_a_on_disk(&kv).await;
    let files = park_files(&kv);
    assert_eq!(files.len(), 2, "A and B are on disk: {files:?}");

    // Truncated: dropped when the index is rebuilt.
    let truncated = dir.path().join("truncated");
    copy_dir(&kv, &truncated);
    for file in park_files(&truncated) {
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len - 1000).unwrap();
    }
    second_turn_ignores_the_files(&truncated, 1024, a.clone(), &reference).await;
    assert!(
        park_files(&truncated).is_empty(),
        "truncated files are deleted"
    );

    // Corrupt (one flipped byte in the state, length intact): caught by the checksum when
    // the file is read back, then deleted.
    let corrupt = dir.path().join("corrupt");
    copy_dir(&kv, &corrupt);
    for file in park_files(&corrupt) {
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    let engine = second_turn_ignores_the_files(&corrupt, 1024, a.clone(), &reference).await;
    assert!(
        engine.stats().kv_park_misses >= 1,
        "the failed restore counts as a miss"
    );
    assert_eq!(
        park_files(&corrupt).len(),
        1,
        "A's corrupt file is deleted once read; B's is not read yet"
    );
    drop(engine);

    // Another model: a valid file (checksum right) whose model identity differs.
    let other_model = dir.path().join("other-model");
    copy_dir(&kv, &other_model);
    for file in park_files(&other_model) {
        let decoded = file::decode(std::fs::read(&file).unwrap()).unwrap();
        let key = file::ParkKey {
            model: decoded.key.model ^ 1,
            context: decoded.key.context,
        };
        std::fs::write(&file, file::encode(key, &decoded.tokens, &decoded.state)).unwrap();
    }
    second_turn_ignores_the_files(&other_model, 1024, a.clone(), &reference).await;
    assert!(
        park_files(&other_model).is_empty(),
        "foreign files are deleted"
    );

    // Another context size: the files are someone else's too.
    let other_ctx = dir.path().join("other-ctx");
    copy_dir(&kv, &other_ctx);
    second_turn_ignores_the_files(&other_ctx, 2048, a, &reference).await;
    assert!(
        park_files(&other_ctx).is_empty(),
        "foreign files are deleted"
    );
}

/// Issue 17: a park file holds a state of one cache type and one attention layout (V is
/// transposed without flash attention). An engine with other settings ignores (and
/// deletes) it and reads the prompt; one with the same settings restores it.
#[tokio::test]
async fn park_files_of_another_cache_type_or_flash_attention_setting_are_ignored() {
    use mistral_bot::kv_cache::CacheType::{F16, Q8_0};
    use mistral_bot::kv_cache::{FlashAttn, KvCacheSettings};

    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv");
    // Written with the defaults: f16 keys and values, flash attention auto (on for the
    // test model's 64-element heads).
    let a = park_chat_a_on_disk(&kv).await;
    let others = [
        (FlashAttn::Off, F16, F16),
        (FlashAttn::Auto, Q8_0, Q8_0),
        (FlashAttn::Off, Q8_0, F16),
    ];
    for (i, (flash_attn, type_k, type_v)) in others.into_iter().enumerate() {
        let copy = dir.path().join(format!("other-{i}"));
        copy_dir(&kv, &copy);
        let mut config = parking_config(1, &copy, 0, 64 * MIB);
        config.kv = KvCacheSettings::new(flash_attn, type_k, type_v).unwrap();
        let engine = start_engine(config).await;
        let setting = format!("{flash_attn:?}, K {type_k}, V {type_v}");
        assert!(park_files(&copy).is_empty(), "{setting}: files deleted");
        let (answer, usage) = a
            .clone()
            .turn(&engine, "Which of them needs the most sun?")
            .await;
        assert!(!answer.trim().is_empty(), "{answer:?}");
        assert_eq!(engine.stats().kv_park_hits_disk, 0, "{setting}");
        assert_eq!(usage.cached_tokens, 0, "{usage:?}");
    }
    // The same settings restore it.
    let engine = start_engine(parking_config(1, &kv, 0, 64 * MIB)).await;
    let (_, usage) = a
        .clone()
        .turn(&engine, "Which of them needs the most sun?")
        .await;
    assert_eq!(engine.stats().kv_park_hits_disk, 1);
    assert!(usage.cached_tokens > 0, "{usage:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in park_files(from) {
        std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_the_kv_caches_to_disk_and_the_next_start_finds_them() {
    use crate::util::bot_process::BotProcess;
    use crate::util::fake_telegram::{FakeTelegram, private_chat, user};

    let fake = FakeTelegram::start("4242424242:AAE-park-test-token").await;
    let data_dir = tempfile::tempdir().unwrap();
    let kv = data_dir.path().join("kv");
    let mut bot = BotProcess::start(&fake, data_dir.path(), &[], "info").await;
    fake.send_text(&private_chat(71), &user(71, "user71", "en"), &opening(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !bot.stderr().contains("answer delivered") {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer\n{}\n{}",
            fake.dump(),
            bot.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        park_files(&kv).is_empty(),
        "nothing on disk before the exit"
    );
    assert!(bot.terminate().await, "a clean exit\n{}", bot.stderr());
    assert!(
        bot.stderr().contains("KV caches written to disk"),
        "{}",
        bot.stderr()
    );
    assert_eq!(park_files(&kv).len(), 1, "the chat's slot is on disk");
    drop(bot);

    let bot = BotProcess::start(&fake, data_dir.path(), &[], "info").await;
    let rebuilt = |log: &str| {
        log.lines()
            .any(|l| l.contains("KV park index rebuilt") && l.contains("files=1"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !rebuilt(&bot.stderr()) {
        assert!(std::time::Instant::now() < deadline, "{}", bot.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
