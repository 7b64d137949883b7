//! Memory limits (issue 13): the real binary in a real memory cgroup of its own, nested
//! under this test's cgroup (v1 or v2, as the host has it) and removed afterwards, driven
//! with more long chats than its park RAM can hold. It must stay alive, answer every
//! request, and keep parked states under the budget `--kv-park-ram auto` chose for that
//! limit. A host where no cgroup can be made prints why; as root or in CI that fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mistral_bot::host::cgroup::{CgroupVersion, MemoryCgroup, stat_value};
use mistral_bot::host::memory::{self, LimitSource, MemoryLimit, MemoryNeeds, ParkRam};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::util::prometheus;
use crate::util::test_model;

const MIB: u64 = 1 << 20;
/// Slots and window of the bot under test: few slots, so chats take turns.
const SLOTS: u64 = 2;
const CTX: u64 = 1024;
/// Chats of at least this many prompt tokens (~700 with the test model), more of them than
/// slots plus what fits parked.
const CHAT_TOKENS: usize = 450;
const CHATS: usize = 4;
/// What `auto` should leave for parking under the limit the test sets: more than one chat, less than two.
const PARK_TARGET: u64 = 24 * MIB;

/// A memory cgroup made for one test, under this process's own; removed on drop (after
/// killing what is still in it: only the bot this test started).
struct TestCgroup {
    dir: PathBuf,
    version: CgroupVersion,
}

impl TestCgroup {
    fn create(limit: u64) -> Result<Self, String> {
        let own = MemoryCgroup::of_self()
            .ok_or("no memory cgroup found through /proc/self/cgroup and /proc/self/mountinfo")?;
        let dir = own
            .dir
            .join(format!("mistral-bot-test-{}", std::process::id()));
        if own.version == CgroupVersion::V2 {
            // The memory controller must be enabled for the children of our cgroup; the
            // kernel refuses that while our cgroup holds processes itself, unless it is
            // the root ("no internal processes").
            let control = own.dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                std::fs::write(&control, "+memory").map_err(|e| {
                    format!(
                        "cannot enable the memory controller in {}: {e}",
                        control.display()
                    )
                })?;
            }
        }
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cgroup = Self {
            dir,
            version: own.version,
        };
        let limit_file = match cgroup.version {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        };
        let path = cgroup.dir.join(limit_file);
        std::fs::write(&path, limit.to_string())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if cgroup.version == CgroupVersion::V2 {
            // No swapping instead of the OOM killer (v1 without memsw does not swap more
            // than the host lets it; this host has no swap).
            let _ = std::fs::write(cgroup.dir.join("memory.swap.max"), "0");
        }
        Ok(cgroup)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Whether the kernel's OOM killer acted in this cgroup.
    fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| stat_value(&t, key))
            .unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = std::fs::read_to_string(self.procs()).unwrap_or_default();
            for pid in pids.split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", pid])
                    .status();
            }
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove the test cgroup {}", self.dir.display());
    }
}

/// Whether a cgroup that cannot be made is a failure here: as root (CI runs as root) or
/// with `CI=true`.
fn must_have_cgroups() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    root || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A chat's opening message of about [`CHAT_TOKENS`] tokens, different from the first word.
fn long_message(chat: usize) -> String {
    const THINGS: [&str; 8] = [
        "river", "lamp", "garden", "engine", "window", "forest", "letter", "bridge",
    ];
    let mut text = format!("Chat {chat}. Remember these notes.");
    for note in 0..CHAT_TOKENS / 10 {
        let thing = THINGS[(note * 7 + chat * 3) % THINGS.len()];
        text.push_str(&format!(
            " Note {note} of chat {chat}: the {thing} is {}.",
            note * 13 + chat
        ));
    }
    text
}

/// The bot's park RAM and its budget now, from `/metrics`.
async fn park_figures(client: &reqwest::Client, base: &str) -> Option<(f64, f64, f64)> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let samples = prometheus::parse(&text).ok()?;
    Some((
        prometheus::value(&samples, "mistral_bot_engine_kv_park_ram_bytes", &[])?,
        prometheus::value(&samples, "mistral_bot_engine_kv_park_ram_budget_bytes", &[])?,
        prometheus::value(&samples, "mistral_bot_memory_limit_bytes", &[])?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_memory_cgroup_the_bot_parks_within_its_budget_and_answers_every_chat() {
    let _permit = crate::telegram::BOTS.acquire().await.unwrap();
    // The limit that leaves `auto` about two chats' worth of parking: the model's needs
    // (as the binary works them out), the margin, and the target.
    let needs = MemoryNeeds::of_model(&test_model(), SLOTS, CTX, 512, &Default::default()).unwrap();
    let limit = (needs.total() + memory::MIN_MARGIN + PARK_TARGET).next_multiple_of(4096);
    let expected = memory::plan(
        Some(MemoryLimit {
            bytes: limit,
            source: LimitSource::Cgroup(CgroupVersion::V1),
        }),
        needs,
        ParkRam::Auto,
    );
    assert!(
        expected.park_ram > 0 && expected.park_ram < PARK_TARGET + MIB,
        "{expected}"
    );
    let cgroup = match TestCgroup::create(limit) {
        Ok(cgroup) => cgroup,
        Err(why) if !must_have_cgroups() => {
            eprintln!("SKIPPED (not root, not CI): cannot make a memory cgroup: {why}");
            return;
        }
        Err(why) => panic!("cannot make a memory cgroup for the test: {why}"),
    };
    let data_dir = tempfile::tempdir().unwrap();
    // The shell moves itself into the cgroup, then becomes the bot: the bot is limited
    // from its first instruction.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.procs())
        .arg(env!("CARGO_BIN_EXE_mistral-bot"))
        .arg("--model")
        .arg(test_model())
        .args([
            "--slots",
            &SLOTS.to_string(),
            "--ctx-size",
            &CTX.to_string(),
        ])
        .args(["--threads", "1", "--temperature", "0", "--max-tokens", "8"])
        .args(["--prefill-chunk", "512", "--chain", "local"])
        .args(["--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .env_remove("TELEGRAM_BOT_TOKEN")
        .env_remove("MISTRAL_BOT_KV_PARK_RAM")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,mistral_bot::engine::park=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(at) = line.find("listening on http://") {
                let url = &line[at + "listening on ".len()..];
                return Some(url.split_whitespace().next().unwrap().to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("the bot did not listen:\n{}", log.lock().unwrap()));
    let sink = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    let report = |what: &str| {
        format!(
            "{what}\nlimit {limit}, expected {expected}, OOM kills {}\n--- bot stderr ---\n{}",
            cgroup.oom_kills(),
            log.lock().unwrap()
        )
    };
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client.get(format!("{base}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            report("the bot exited while loading")
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            report("not ready")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The budget and the limit, as decided at start-up and shown on /metrics.
    let (_, budget, shown_limit) = park_figures(&client, &base)
        .await
        .unwrap_or_else(|| panic!("{}", report("no park figures on /metrics")));
    assert_eq!(shown_limit as u64, limit, "{}", report("the limit shown"));
    assert_eq!(
        budget as u64,
        expected.park_ram,
        "{}",
        report("the budget shown")
    );

    // Park RAM is watched all along, not only at the end.
    let watching = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let watcher = {
        let (client, base, watching) = (client.clone(), base.clone(), Arc::clone(&watching));
        tokio::spawn(async move {
            loop {
                if let Some((parked, budget, _)) = park_figures(&client, &base).await {
                    let mut seen = watching.lock().unwrap();
                    seen.0 = seen.0.max(parked as u64);
                    if parked > budget {
                        seen.1.push(format!("parked {parked} > budget {budget}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let ask = |messages: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let response = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": "any", "messages": messages, "temperature": 0, "max_tokens": 8}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if status != 200 || body["choices"][0]["finish_reason"].is_null() {
                return Err(format!("{status}: {body}"));
            }
            Ok(body)
        }
    };
    // Every chat opens, then every chat comes back: with two slots, most of them find
    // their state parked (in RAM while it fits, else on disk).
    let mut openings = Vec::new();
    for chat in 0..CHATS {
        let body = ask(json!([{"role": "user", "content": long_message(chat)}]))
            .await
            .unwrap_or_else(|e| panic!("{}", report(&format!("chat {chat} unanswered: {e}"))));
        assert!(
            body["usage"]["prompt_tokens"].as_u64().unwrap() as usize > CHAT_TOKENS * 8 / 10,
            "{body}"
        );
        openings.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for (chat, opening) in openings.iter().enumerate() {
        ask(json!([
            {"role": "user", "content": long_message(chat)},
            {"role": "assistant", "content": opening},
            {"role": "user", "content": "Which note came first?"}
        ]))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}",
                report(&format!("chat {chat} unanswered on return: {e}"))
            )
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();

    assert!(
        child.try_wait().unwrap().is_none(),
        "{}",
        report("the bot died")
    );
    assert_eq!(cgroup.oom_kills(), 0, "{}", report("the OOM killer acted"));
    let (max_parked, over) = watching.lock().unwrap().clone();
    assert!(over.is_empty(), "{}", report(&over.join("\n")));
    assert!(max_parked > 0, "{}", report("nothing was parked in RAM"));
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = prometheus::parse(&metrics).unwrap();
    let disk = prometheus::value(&samples, "mistral_bot_engine_kv_park_disk_bytes", &[]).unwrap();
    assert!(
        disk > 0.0,
        "{}",
        report("more chats than fit: some states spilled to disk")
    );
    eprintln!(
        "memory cgroup {limit} B: park RAM budget {budget} B, at most {max_parked} B parked in RAM, \
         {disk} B on disk"
    );
    let _ = child.kill().await;
    let _ = child.wait().await;
    drop(cgroup);
}
