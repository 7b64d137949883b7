//! `mistral-bot doctor`: checks the set-up the same flags, environment and `.env` describe,
//! and prints one line per check with ✓ (fine), ⚠ (works, but look) or ✗ (will not work),
//! each problem with the exact fix. It reads the model's GGUF header (never the weights),
//! compares this build's CPU features with the CPU's, tries the data directory and the
//! HTTP address, asks Telegram who the bot is, and checks every cloud provider of the chain
//! with the code of the start-up check ([`probe`](crate::providers::probe)), all network
//! checks at once with short timeouts. Secrets are never printed.
//!
//! May use `config`, `gguf` and `providers` (the probe and the HTTP client).

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::{
    Args, Config, ConfigError, HttpConfig, ProviderKind, ProvidersConfig, Secret, WebhookError,
    max_tokens_limit, parse_park_ram,
};
use crate::gguf::{self, GgufHeader};
use crate::host::lock;
use crate::host::memory::{
    self, HostMemory, MemoryLimit, MemoryNeeds, ModelShapes, ParkRam, human_bytes,
};
use crate::providers::{self, probe};

/// How long the Telegram checks may take.
const TELEGRAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Telegram's own Bot API server.
const TELEGRAM_API: &str = "https://api.telegram.org";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but deserves a look.
    Warn,
    /// Will not work as configured.
    Fail,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Warn => "⚠",
            Status::Fail => "✗",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// How it came out.
    pub status: Status,
    /// What was checked (`model`, `telegram`, `groq`, …).
    pub name: String,
    /// What was found and, for a problem, the fix.
    pub message: String,
}

impl Check {
    fn new(status: Status, name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            name: name.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<13} {}",
            self.status.symbol(),
            self.name,
            self.message
        )
    }
}

/// Every check's result, in a fixed order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether the bot can run as configured: no check failed.
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(f, "{check}")?;
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        let (fails, warns) = (count(Status::Fail), count(Status::Warn));
        if fails == 0 {
            writeln!(f, "\nThe bot can run ({warns} warning(s)).")
        } else {
            writeln!(
                f,
                "\n{fails} problem(s) to fix before the bot can run as configured ({warns} warning(s))."
            )
        }
    }
}

/// Runs every check for `args` (the bot's own flags).
pub async fn run(args: Args) -> Report {
    let mut checks = Vec::new();
    // What `Config` refuses and no check below covers (e.g. --slots 0).
    let config = Config::try_from(args.clone());
    // (The model check below reports a missing model in its own words.)
    if let Err(e) = &config
        && !matches!(
            e,
            ConfigError::OpenWithoutKey { .. } | ConfigError::NoModel | ConfigError::Webhook(_)
        )
    {
        checks.push(Check::new(Status::Fail, "flags", e.to_string()));
    }
    let model = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || model_checks(&args))
    };
    let telegram = telegram_checks(&args);
    let cloud = cloud_checks(&args);
    let (model, telegram, cloud) = tokio::join!(model, telegram, cloud);
    match model {
        Ok(model) => checks.extend(model),
        Err(e) => checks.push(Check::new(
            Status::Fail,
            "model",
            format!("the check failed: {e}"),
        )),
    }
    checks.extend(build_checks(&args));
    checks.push(data_dir_check(&args.data_dir));
    checks.extend(http_checks(&args));
    let refused = match &config {
        Err(ConfigError::Webhook(e)) => Some(e),
        _ => None,
    };
    checks.extend(webhook_url_check(&args, refused));
    checks.extend(telegram);
    checks.extend(cloud);
    Report { checks }
}

/// The model file: exists, is GGUF, what it is, whether it fits in memory. Without
/// `--model`: fine when `local` is not in `--chain` (a front answering from elsewhere).
fn model_checks(args: &Args) -> Vec<Check> {
    let Some(path) = &args.model else {
        let local = ProvidersConfig::try_from(args.providers.clone())
            .map_or(true, |p| p.chain.contains(&ProviderKind::Local));
        return vec![if local {
            Check::new(Status::Fail, "model", ConfigError::NoModel.to_string())
        } else {
            Check::new(
                Status::Ok,
                "model",
                "none: `local` is not in --chain, so answers come from the chain's other providers",
            )
        }];
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![Check::new(
                Status::Fail,
                "model",
                format!(
                    "{} not found: pass --model PATH (MISTRAL_BOT_MODEL) to a GGUF file",
                    path.display()
                ),
            )];
        }
        Err(e) => {
            return vec![Check::new(
                Status::Fail,
                "model",
                format!("cannot open {}: {e}", path.display()),
            )];
        }
    };
    let len = match file.metadata() {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => {
            return vec![Check::new(
                Status::Fail,
                "model",
                format!(
                    "{} is not a file: pass --model PATH to a GGUF file",
                    path.display()
                ),
            )];
        }
        Err(e) => {
            return vec![Check::new(
                Status::Fail,
                "model",
                format!("cannot read {}: {e}", path.display()),
            )];
        }
    };
    let header = match gguf::read_header(&mut BufReader::new(file), len) {
        Ok(header) => header,
        Err(e) => {
            return vec![Check::new(
                Status::Fail,
                "model",
                format!(
                    "{}: {e}; download the model again or pass --model PATH to a GGUF file",
                    path.display()
                ),
            )];
        }
    };
    let mut checks = vec![describe_model(path, len, &header)];
    checks.extend(context_check(args, &header));
    checks.push(memory_check(args, len, &header, HostMemory::read().limit()));
    checks
}

fn describe_model(path: &Path, len: u64, header: &GgufHeader) -> Check {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let arch = header.architecture().unwrap_or("unknown architecture");
    let quant = header.quantization().unwrap_or("unknown quantization");
    let params = header.parameters();
    let Some(_) = header.architecture() else {
        return Check::new(
            Status::Fail,
            "model",
            format!(
                "{name}: GGUF v{} without general.architecture; llama.cpp cannot load it",
                header.version
            ),
        );
    };
    Check::new(
        Status::Ok,
        "model",
        format!(
            "{name}: GGUF v{}, {arch}, {quant}, {} parameters, {}",
            header.version,
            human_count(params),
            human_bytes(len)
        ),
    )
}

/// `--ctx-size` against the context the model was trained with, and against `--max-tokens`.
fn context_check(args: &Args, header: &GgufHeader) -> Option<Check> {
    let trained = header.arch_uint("context_length")?;
    let ctx = u64::from(args.ctx_size);
    let (status, advice) = if ctx > trained {
        (
            Status::Warn,
            format!(
                ": beyond it answers degrade; lower --ctx-size (MISTRAL_BOT_CTX_SIZE) to {trained} or less"
            ),
        )
    } else {
        (Status::Ok, String::new())
    };
    let limit = max_tokens_limit(args.ctx_size);
    let reply = if args.max_tokens > limit {
        format!(
            "; --max-tokens {} is over the {limit} this window allows",
            args.max_tokens
        )
    } else {
        String::new()
    };
    Some(Check::new(
        status,
        "context",
        format!("--ctx-size {ctx} per slot, trained with {trained}{advice}{reply}"),
    ))
}

/// Weights, the KV cache at `--slots × --ctx-size`, compute buffers and the park RAM that
/// `--kv-park-ram` comes to (the start-up plan, [`memory::plan`]) against the memory this
/// process may use (its cgroup's limit, else `MemAvailable`).
fn memory_check(
    args: &Args,
    weights: u64,
    header: &GgufHeader,
    limit: Option<MemoryLimit>,
) -> Check {
    let (type_k, type_v) = (args.cache_type_k, args.cache_type_v);
    let Some(shapes) = ModelShapes::of(header, type_k, type_v) else {
        return Check::new(
            Status::Warn,
            "memory",
            "the header lacks the shapes to size the KV cache; weights alone: ".to_string()
                + &human_bytes(weights),
        );
    };
    let needs = MemoryNeeds::estimate(
        weights,
        &shapes,
        args.slots as u64,
        u64::from(args.ctx_size),
        u64::from(args.batch_size),
    );
    // A bad value is reported by the flags check; size `auto` meanwhile.
    let requested = parse_park_ram(&args.kv_park_ram).unwrap_or(ParkRam::Auto);
    let plan = memory::plan(limit, needs, requested);
    let park = match (requested, plan.clamped_from) {
        (ParkRam::Auto, _) => "auto".to_string(),
        (ParkRam::Bytes(_), Some(asked)) => {
            format!("--kv-park-ram {} MiB clamped: it does not fit", asked >> 20)
        }
        (ParkRam::Bytes(_), None) => "--kv-park-ram".to_string(),
    };
    let sizing = format!(
        "needs ~{} (weights {} + KV cache {} for {} slots × {} tokens at {}/token, K {type_k} V {type_v} + compute, \
         transit and runtime {}) + parked KV states up to {} ({park})",
        human_bytes(needs.total()),
        human_bytes(needs.weights),
        human_bytes(needs.kv_cache),
        args.slots,
        args.ctx_size,
        human_bytes(shapes.kv_bytes_per_token),
        human_bytes(needs.compute + needs.transit + needs.runtime),
        human_bytes(plan.park_ram),
    );
    let Some(limit) = limit else {
        return Check::new(
            Status::Warn,
            "memory",
            format!("{sizing}; free memory unknown"),
        );
    };
    let of = format!("of {} ({})", human_bytes(limit.bytes), limit.source);
    let fix = "lower --slots or --ctx-size, or use a smaller quantization";
    if needs.total() > limit.bytes {
        Check::new(
            Status::Fail,
            "memory",
            format!("{sizing}: more than the {of} this process may use: {fix}"),
        )
    } else if plan.overcommitted() {
        Check::new(
            Status::Warn,
            "memory",
            format!("{sizing} {of}: no room for the safety margin or parked chats; {fix}"),
        )
    } else if plan.clamped_from.is_some() {
        Check::new(
            Status::Warn,
            "memory",
            format!("{sizing} {of}: lower --kv-park-ram, or leave it at auto"),
        )
    } else {
        Check::new(Status::Ok, "memory", format!("{sizing} {of}"))
    }
}

/// CPU features this build was compiled for against the CPU's; `--threads` against cores.
fn build_checks(args: &Args) -> Vec<Check> {
    let mut checks = vec![cpu_check()];
    let cpus = num_cpus::get();
    let threads = args.threads.unwrap_or(cpus);
    checks.push(if threads == 0 {
        Check::new(Status::Fail, "threads", "--threads 0: pass at least 1")
    } else if threads > cpus {
        Check::new(
            Status::Warn,
            "threads",
            format!(
                "--threads {threads} but this machine has {cpus} CPUs: llama.cpp's threads spin and \
                 slow each other down; set --threads (MISTRAL_BOT_THREADS) to {cpus} or less"
            ),
        )
    } else {
        Check::new(
            Status::Ok,
            "threads",
            format!("{threads} of {cpus} CPUs ({} physical cores)", num_cpus::get_physical()),
        )
    });
    checks
}

#[cfg(target_arch = "x86_64")]
fn cpu_check() -> Check {
    // (name, compiled in, present on this CPU)
    let features: [(&str, bool, bool); 6] = [
        (
            "AVX2",
            cfg!(target_feature = "avx2"),
            std::arch::is_x86_feature_detected!("avx2"),
        ),
        (
            "FMA",
            cfg!(target_feature = "fma"),
            std::arch::is_x86_feature_detected!("fma"),
        ),
        (
            "F16C",
            cfg!(target_feature = "f16c"),
            std::arch::is_x86_feature_detected!("f16c"),
        ),
        (
            "AVX512F",
            cfg!(target_feature = "avx512f"),
            std::arch::is_x86_feature_detected!("avx512f"),
        ),
        (
            "AVX512-VNNI",
            cfg!(target_feature = "avx512vnni"),
            std::arch::is_x86_feature_detected!("avx512vnni"),
        ),
        (
            "AVX512-BF16",
            cfg!(target_feature = "avx512bf16"),
            std::arch::is_x86_feature_detected!("avx512bf16"),
        ),
    ];
    let names = |pick: &dyn Fn(&(&str, bool, bool)) -> bool| {
        features
            .iter()
            .filter(|f| pick(f))
            .map(|f| f.0)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = names(&|f| f.1 && !f.2);
    let unused = names(&|f| !f.1 && f.2);
    let compiled = names(&|f| f.1);
    let compiled = if compiled.is_empty() {
        "baseline x86-64".to_string()
    } else {
        compiled
    };
    if !missing.is_empty() {
        Check::new(
            Status::Fail,
            "cpu",
            format!(
                "built for {compiled}, but this CPU lacks {missing}: it would crash with an illegal \
                 instruction; rebuild on this machine (cargo build --release)"
            ),
        )
    } else if !unused.is_empty() {
        Check::new(
            Status::Warn,
            "cpu",
            format!(
                "built for {compiled}; this CPU also has {unused}, unused: rebuild with \
                 RUSTFLAGS=\"-C target-cpu=native\" (the repo's .cargo/config.toml does) for faster prompts"
            ),
        )
    } else {
        Check::new(
            Status::Ok,
            "cpu",
            format!("built for {compiled}, all present on this CPU"),
        )
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_check() -> Check {
    Check::new(Status::Ok, "cpu", "not x86-64: no feature check")
}

/// `--data-dir`: a directory this process can write, or one it can create.
fn data_dir_check(dir: &Path) -> Check {
    let fix = "pass --data-dir DIR (MISTRAL_BOT_DATA_DIR) naming a writable directory";
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Check::new(
            Status::Fail,
            "data dir",
            format!("{} exists but is not a directory: {fix}", dir.display()),
        ),
        Ok(_) => {
            if let Some(pid) = lock::holder(dir) {
                return Check::new(
                    Status::Fail,
                    "data dir",
                    format!(
                        "{} is in use by a running mistral-bot ({}): one directory belongs to \
                         one process, so this configuration cannot start beside it; stop that \
                         one first, or pass another --data-dir",
                        dir.display(),
                        pid.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"))
                    ),
                );
            }
            match try_write(dir) {
                Ok(()) => Check::new(
                    Status::Ok,
                    "data dir",
                    format!("{} is writable", dir.display()),
                ),
                Err(e) => Check::new(
                    Status::Fail,
                    "data dir",
                    format!("{} is not writable ({e}): {fix}", dir.display()),
                ),
            }
        }
        Err(_) => {
            // It will be created: the nearest existing ancestor must take it.
            let ancestor = dir
                .ancestors()
                .skip(1)
                .find(|a| a.as_os_str().is_empty() || a.exists())
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .unwrap_or(Path::new("."));
            let writable = std::fs::metadata(ancestor)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if m.is_dir() {
                        try_write(ancestor).map_err(|e| e.to_string())
                    } else {
                        Err(format!("{} is not a directory", ancestor.display()))
                    }
                });
            match writable {
                Ok(()) => Check::new(
                    Status::Ok,
                    "data dir",
                    format!("{} does not exist yet and will be created", dir.display()),
                ),
                Err(e) => Check::new(
                    Status::Fail,
                    "data dir",
                    format!("{} cannot be created ({e}): {fix}", dir.display()),
                ),
            }
        }
    }
}

/// Creates and removes a file in `dir`.
fn try_write(dir: &Path) -> std::io::Result<()> {
    let probe: PathBuf = dir.join(format!(".mistral-bot-doctor-{}", std::process::id()));
    let mut file = File::create(&probe)?;
    let written = file.write_all(b"ok");
    drop(file);
    let removed = std::fs::remove_file(&probe);
    written.and(removed)
}

/// `--http-addr` free; `--api-key` set when the address is not loopback.
fn http_checks(args: &Args) -> Vec<Check> {
    let addr: SocketAddr = args.http.http_addr;
    let bind = match TcpListener::bind(addr) {
        Ok(listener) => {
            drop(listener);
            Check::new(Status::Ok, "http addr", format!("{addr} is free"))
        }
        Err(e) => Check::new(
            Status::Fail,
            "http addr",
            format!(
                "cannot listen on {addr} ({e}): stop what uses it or pass --http-addr \
                 (MISTRAL_BOT_HTTP_ADDR) another address"
            ),
        ),
    };
    let key = match HttpConfig::try_from(args.http.clone()) {
        Err(e) => Check::new(Status::Fail, "api key", e.to_string()),
        Ok(http) if http.api_key.is_some() => {
            Check::new(Status::Ok, "api key", "set: /v1/* needs the bearer key")
        }
        Ok(_) => Check::new(
            Status::Ok,
            "api key",
            format!("none needed: {} is a loopback address", addr.ip()),
        ),
    };
    vec![bind, key]
}

#[derive(Debug, Deserialize)]
struct BotApiAnswer<T> {
    ok: bool,
    result: Option<T>,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Me {
    username: Option<String>,
    #[serde(default)]
    can_read_all_group_messages: bool,
}

#[derive(Debug, Deserialize)]
struct WebhookInfo {
    #[serde(default)]
    url: String,
    #[serde(default)]
    pending_update_count: u64,
    last_error_message: Option<String>,
}

/// Webhook mode's URL (`--telegram-webhook-url`): one Telegram delivers to, a path the
/// HTTP API can serve, a mode that runs the HTTP API. Nothing without the flag.
/// `refused`: what the configuration said of webhook mode, if it refused it.
fn webhook_url_check(args: &Args, refused: Option<&WebhookError>) -> Option<Check> {
    let raw = args.webhook.telegram_webhook_url.as_deref()?.trim();
    if raw.is_empty() {
        return None;
    }
    let api_url = args
        .telegram_api_url
        .as_deref()
        .and_then(|u| Url::parse(u.trim()).ok());
    let checked = match refused {
        Some(e) => Err(e.clone()),
        None => crate::config::check_webhook_url(raw, api_url.as_ref()),
    };
    Some(match checked {
        Ok(url) => Check::new(
            Status::Ok,
            "webhook-url",
            format!(
                "{}://{} port {}: Telegram delivers there; the reverse proxy must forward the                  path unchanged to --http-addr {}",
                url.scheme(),
                url.host_str().unwrap_or_default(),
                url.port_or_known_default().unwrap_or_default(),
                args.http.http_addr
            ),
        ),
        Err(e) => Check::new(Status::Fail, "webhook-url", e.to_string()),
    })
}

/// What `getWebhookInfo` says, read for the mode asked.
fn webhook_info_check(args: &Args, info: &WebhookInfo) -> Check {
    let wanted = args
        .webhook
        .telegram_webhook_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let errors = info
        .last_error_message
        .as_deref()
        .map(|e| format!("; Telegram's last delivery error: {e}"))
        .unwrap_or_default();
    match wanted {
        None if info.url.is_empty() => {
            Check::new(Status::Ok, "webhook", "none set: long polling works")
        }
        None => Check::new(
            Status::Warn,
            "webhook",
            "a webhook is set: the bot deletes it at start to poll, so whatever receives it now              stops getting updates; run only one deployment per token",
        ),
        Some(_) if info.url.is_empty() => Check::new(
            Status::Ok,
            "webhook",
            "none set yet: the bot sets it at start",
        ),
        Some(wanted)
            if Url::parse(wanted).is_ok_and(|w| Url::parse(&info.url).is_ok_and(|i| i == w)) =>
        {
            let status = if errors.is_empty() {
                Status::Ok
            } else {
                Status::Warn
            };
            Check::new(
                status,
                "webhook",
                format!(
                    "set to --telegram-webhook-url, {} update(s) waiting{errors}",
                    info.pending_update_count
                ),
            )
        }
        Some(_) => Check::new(
            Status::Warn,
            "webhook",
            "another webhook URL is set: the bot replaces it at start, so whatever receives it              now stops getting updates; run only one deployment per token",
        ),
    }
}

/// The token accepted (`getMe`), no webhook in the way, the privacy mode.
async fn telegram_checks(args: &Args) -> Vec<Check> {
    let Some(token) = args
        .telegram_token
        .as_ref()
        .filter(|t| !t.expose().trim().is_empty())
    else {
        return vec![Check::new(
            Status::Warn,
            "telegram",
            "no token, so no Telegram bot (the HTTP API still runs): set TELEGRAM_BOT_TOKEN or \
             --telegram-token (from @BotFather)",
        )];
    };
    let base = match args
        .telegram_api_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        Some(raw) => match Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            _ => {
                return vec![Check::new(
                    Status::Fail,
                    "telegram",
                    format!("--telegram-api-url `{raw}` is not a valid http(s) URL"),
                )];
            }
        },
        None => match Url::parse(TELEGRAM_API) {
            Ok(url) => url,
            Err(e) => return vec![Check::new(Status::Fail, "telegram", e.to_string())],
        },
    };
    let client = match providers::http_client() {
        Ok(client) => client,
        Err(e) => return vec![Check::new(Status::Fail, "telegram", e.to_string())],
    };
    let me = bot_call::<Me>(&client, &base, token, "getMe").await;
    let me = match me {
        Ok(me) => me,
        Err(BotCallError::Refused {
            status,
            description,
        }) if status == 401 || status == 404 => {
            return vec![Check::new(
                Status::Fail,
                "telegram",
                format!(
                    "token rejected ({status} {description}): set TELEGRAM_BOT_TOKEN or \
                     --telegram-token to the token @BotFather gave"
                ),
            )];
        }
        Err(e) => {
            return vec![Check::new(
                Status::Fail,
                "telegram",
                format!("getMe failed ({e}); check the network or --telegram-api-url"),
            )];
        }
    };
    let name = me.username.as_deref().unwrap_or("(no username)");
    let mut checks = vec![Check::new(
        Status::Ok,
        "telegram",
        format!("token accepted: @{name}"),
    )];
    checks.push(
        match bot_call::<WebhookInfo>(&client, &base, token, "getWebhookInfo").await {
            Ok(info) => webhook_info_check(args, &info),
            Err(e) => Check::new(
                Status::Warn,
                "webhook",
                format!("getWebhookInfo failed ({e})"),
            ),
        },
    );
    checks.push(if me.can_read_all_group_messages {
        Check::new(
            Status::Ok,
            "privacy",
            "privacy mode off: in groups the bot reads every message (it still answers only \
             mentions, replies and /ask)",
        )
    } else {
        Check::new(
            Status::Ok,
            "privacy",
            "privacy mode on: in groups the bot sees only mentions, replies and commands, which \
             is all it answers; /setprivacy in @BotFather changes it",
        )
    });
    checks
}

#[derive(Debug, thiserror::Error)]
enum BotCallError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}: {description}")]
    Refused { status: u16, description: String },
    #[error("unexpected answer: {0}")]
    Malformed(String),
}

/// Calls `method` of the Bot API (POST, as the bot does). Errors never hold the URL, which
/// holds the token.
async fn bot_call<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base: &Url,
    token: &Secret,
    method: &str,
) -> Result<T, BotCallError> {
    let url = format!(
        "{}/bot{}/{method}",
        base.as_str().trim_end_matches('/'),
        token.expose()
    );
    let response = client
        .post(url)
        .timeout(TELEGRAM_TIMEOUT)
        .send()
        .await
        .map_err(|e| BotCallError::Transport(e.without_url().to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| BotCallError::Transport(e.without_url().to_string()))?;
    let answer: BotApiAnswer<T> =
        serde_json::from_slice(&body).map_err(|e| BotCallError::Malformed(e.to_string()))?;
    match (answer.ok, answer.result) {
        (true, Some(result)) => Ok(result),
        _ => Err(BotCallError::Refused {
            status,
            description: answer
                .description
                .unwrap_or_default()
                .replace(token.expose(), "***"),
        }),
    }
}

/// Each cloud provider of `--chain`: key present and accepted, model there.
async fn cloud_checks(args: &Args) -> Vec<Check> {
    let config = match ProvidersConfig::try_from(args.providers.clone()) {
        Ok(config) => config,
        Err(e) => return vec![Check::new(Status::Fail, "chain", e.to_string())],
    };
    let order: Vec<&str> = config.chain.iter().map(|k| k.name()).collect();
    let mut checks = vec![Check::new(
        Status::Ok,
        "chain",
        format!("{}, then the canned apology", order.join(" → ")),
    )];
    let client = match providers::http_client() {
        Ok(client) => client,
        Err(e) => {
            checks.push(Check::new(Status::Fail, "cloud", e.to_string()));
            return checks;
        }
    };
    let fleet = config.openai_fleet.len() > 1 && config.chain.contains(&ProviderKind::OpenAi);
    let status = |report: &probe::ProbeReport| match report.verdict() {
        probe::Verdict::Ok => Status::Ok,
        probe::Verdict::Warn => Status::Warn,
        probe::Verdict::Fail => Status::Fail,
    };
    for report in probe::probe_chain(&client, &config).await {
        // A fleet's servers are checked one by one below.
        if !(fleet && report.kind == ProviderKind::OpenAi) {
            checks.push(Check::new(
                status(&report),
                report.kind.name(),
                report.summary(),
            ));
        }
    }
    if fleet {
        let client = &client;
        let status = &status;
        let servers = config.openai_fleet.iter().map(|url| {
            let cloud = crate::config::CloudConfig {
                base_url: url.clone(),
                ..config.openai.clone()
            };
            async move {
                let report = probe::probe(client, ProviderKind::OpenAi, &cloud).await;
                Check::new(
                    status(&report),
                    format!("openai {}", url.as_str().trim_end_matches('/')),
                    report.summary(),
                )
            }
        });
        checks.extend(futures::future::join_all(servers).await);
    }
    checks
}

fn human_count(n: u64) -> String {
    match n {
        0..=999_999 => format!("{n}"),
        1_000_000..=999_999_999 => format!("{:.0} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::gguf::write::header;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["mistral-bot", "--model", "m.gguf"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn no_model_is_fine_only_without_local_in_the_chain() {
        let front = Args::try_parse_from(["mistral-bot", "--chain", "openai"]).unwrap();
        let checks = model_checks(&front);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, Status::Ok, "{}", checks[0].message);
        let local = Args::try_parse_from(["mistral-bot"]).unwrap();
        let checks = model_checks(&local);
        assert_eq!(checks[0].status, Status::Fail);
        assert!(
            checks[0].message.contains("--chain"),
            "{}",
            checks[0].message
        );
    }

    fn seven_b() -> GgufHeader {
        let bytes = header(&gguf::write::mistral_7b_metadata(), &[]);
        gguf::read_header(&mut std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap()
    }

    fn limit(bytes: u64) -> Option<MemoryLimit> {
        Some(MemoryLimit {
            bytes,
            source: memory::LimitSource::MemAvailable,
        })
    }

    #[test]
    fn memory_is_weights_plus_kv_for_every_slot_plus_what_parks() {
        const GIB: u64 = 1 << 30;
        let weights = 4_372_755_040;
        // 4 slots × 4096 tokens × 128 KiB = 2 GiB of KV cache.
        let fits = memory_check(&args(&[]), weights, &seven_b(), limit(24 * GIB));
        assert_eq!(fits.status, Status::Ok, "{fits}");
        assert!(fits.message.contains("KV cache 2.0 GiB"), "{fits}");
        // Parked RAM is counted: `auto` takes what is left, shown with the limit.
        assert!(
            fits.message.contains("parked KV states up to 15."),
            "{fits}"
        );
        assert!(
            fits.message.contains("(auto) of 24.0 GiB (MemAvailable)"),
            "{fits}"
        );
        let tight = memory_check(&args(&[]), weights, &seven_b(), limit(7 * GIB));
        assert_eq!(tight.status, Status::Warn, "{tight}");
        let clamped = memory_check(
            &args(&["--kv-park-ram", "4096"]),
            weights,
            &seven_b(),
            limit(8 * GIB),
        );
        assert_eq!(clamped.status, Status::Warn, "{clamped}");
        assert!(
            clamped.message.contains("--kv-park-ram 4096 MiB clamped"),
            "{clamped}"
        );
        let short = memory_check(
            &args(&["--slots", "16"]),
            weights,
            &seven_b(),
            limit(8 * GIB),
        );
        assert_eq!(short.status, Status::Fail, "{short}");
        assert!(short.message.contains("lower --slots"), "{short}");
    }

    #[test]
    fn a_data_dir_held_by_a_running_bot_fails_naming_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock::DataDirLock::acquire(dir.path()).unwrap();
        let check = data_dir_check(dir.path());
        assert_eq!(check.status, Status::Fail, "{check}");
        assert!(
            check
                .message
                .contains(&format!("pid {}", std::process::id())),
            "{check}"
        );
        drop(held);
        assert_eq!(data_dir_check(dir.path()).status, Status::Ok);
    }

    #[test]
    fn a_window_beyond_training_is_a_warning() {
        let check = context_check(&args(&["--ctx-size", "65536"]), &seven_b()).unwrap();
        assert_eq!(check.status, Status::Warn);
        assert!(check.message.contains("to 32768 or less"), "{check}");
        assert_eq!(
            context_check(&args(&[]), &seven_b()).unwrap().status,
            Status::Ok
        );
    }

    #[test]
    fn data_dir_that_is_a_file_or_under_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(data_dir_check(&file).status, Status::Fail);
        assert_eq!(data_dir_check(&file.join("data")).status, Status::Fail);
        assert_eq!(data_dir_check(dir.path()).status, Status::Ok);
        let fresh = data_dir_check(&dir.path().join("new/deeper"));
        assert_eq!(fresh.status, Status::Ok, "{fresh}");
        assert!(
            !dir.path().join("new").exists(),
            "the check creates nothing"
        );
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(128 * 1024), "128.0 KiB");
        assert_eq!(human_count(134_515_008), "135 M");
        assert_eq!(human_count(7_248_023_552), "7.25 B");
    }
}
