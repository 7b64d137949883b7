//! Command line and environment → a validated [`Config`]. A leaf module.
//!
//! Every flag can also be set by an environment variable (shown in `--help`), and `main`
//! loads a `.env` file first. [`Args`] is what clap parses; [`Config`] is what the rest of
//! the program uses: checked once here, never re-read from the environment later.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use url::Url;

mod inputs;
mod webhook;

pub use inputs::{DEFAULT_STT_MODEL, GROQ_STT_BASE_URL, InputArgs, InputConfig, SttConfig};
pub use webhook::{
    WEBHOOK_PORTS, WebhookArgs, WebhookConfig, WebhookError, check_url as check_webhook_url,
};

use crate::chat::GenerateParams;
use crate::chat_policy::{ChatPolicy, ChatPolicyArgs};
use crate::conversation::HistoryLimits;
use crate::engine::{ChatTemplateChoice, EngineConfig, ParkConfig};
use crate::host::memory::ParkRam;
use crate::kv_cache::{CacheType, FlashAttn, KvCacheError, KvCacheSettings};
use crate::persona::Catalog;

/// mistral-bot: a local LLM (llama.cpp, in process) serving chats.
#[derive(Debug, Clone, Parser)]
#[command(
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MISTRAL_BOT_GIT_COMMIT"), ")"),
    about,
    long_about = None,
    after_help = "Commands:\n  doctor  Check the set-up (model, build, data dir, HTTP address, Telegram, cloud \
                  providers) and exit: `mistral-bot doctor [OPTIONS]`, with the same options, \
                  environment and .env"
)]
pub struct Args {
    /// GGUF model file (e.g. Mistral-7B-Instruct-v0.3.Q4_K_M.gguf). Needed when `local` is
    /// in --chain (and for --prompt, --console); a front without one answers from the
    /// other providers (e.g. --chain openai with a fleet in --openai-base-url).
    #[arg(long, short = 'm', env = "MISTRAL_BOT_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// Inference slots: replies generated at the same time, batched into one decode.
    #[arg(long, env = "MISTRAL_BOT_SLOTS", default_value_t = 4)]
    pub slots: usize,

    /// Context window of each slot, in tokens (prompt + reply).
    #[arg(long, env = "MISTRAL_BOT_CTX_SIZE", default_value_t = DEFAULT_CTX_SIZE)]
    pub ctx_size: u32,

    /// CPU threads for inference [default: number of CPUs].
    #[arg(long, env = "MISTRAL_BOT_THREADS")]
    pub threads: Option<usize>,

    /// Most tokens decoded in one step (llama.cpp n_batch).
    #[arg(long, env = "MISTRAL_BOT_BATCH_SIZE", default_value_t = 512)]
    pub batch_size: u32,

    /// Prompt tokens decoded in one step while other replies stream, until the engine has
    /// timed its own steps (then --prompt-step-ms sizes them), and always with
    /// --step-target-ms 0 (measured: worst stall 0.3 s at 32, 0.5 s at 64, 2.7 s at 512
    /// with the test model; see benches/fairness.rs).
    #[arg(long, env = "MISTRAL_BOT_PREFILL_CHUNK", default_value_t = 64)]
    pub prefill_chunk: u32,

    /// While a prompt is read, a streaming reply gets a token this often on average, in
    /// milliseconds: steps of replies only make up for longer prompt steps
    /// (--prompt-step-ms). 0: every step holds a fixed --prefill-chunk.
    #[arg(long, env = "MISTRAL_BOT_STEP_TARGET_MS", default_value_t = 500)]
    pub step_target_ms: u32,

    /// What a step holding prompt tokens beside streaming replies should take, in
    /// milliseconds: its prompt tokens are sized from the engine's own recent step times
    /// (at least 1). Longer steps read prompts faster on a slow CPU. 0 (auto): the larger
    /// of --step-target-ms and 40 steps of replies only (a 7B on 2 cores: ~6-7 s; the test
    /// model: --step-target-ms).
    #[arg(long, env = "MISTRAL_BOT_PROMPT_STEP_MS", default_value_t = 0)]
    pub prompt_step_ms: u32,

    /// Flash attention: `auto` follows the model's attention heads, as measured on this CPU:
    /// on up to 64 elements (small models: faster everywhere), off above (Mistral 7B's 128:
    /// off decodes 14-18 % faster past 1500 tokens); always on with a quantized V cache.
    #[arg(
        long,
        env = "MISTRAL_BOT_FLASH_ATTN",
        value_enum,
        default_value_t = FlashAttn::Auto
    )]
    pub flash_attn: FlashAttn,

    /// Element type of the KV cache's keys: f16, or q8_0 (about half the memory and park
    /// file size), q5_1, bf16, f32 (the 4-bit types failed the quality check).
    #[arg(
        long,
        env = "MISTRAL_BOT_CACHE_TYPE_K",
        value_enum,
        default_value_t = CacheType::F16
    )]
    pub cache_type_k: CacheType,

    /// Element type of the KV cache's values (a quantized one needs flash attention).
    #[arg(
        long,
        env = "MISTRAL_BOT_CACHE_TYPE_V",
        value_enum,
        default_value_t = CacheType::F16
    )]
    pub cache_type_v: CacheType,

    /// Most tokens of one reply.
    #[arg(long, env = "MISTRAL_BOT_MAX_TOKENS", default_value_t = 1000)]
    pub max_tokens: u32,

    /// Sampling temperature (0 = greedy, deterministic).
    #[arg(
        long,
        env = "MISTRAL_BOT_TEMPERATURE",
        default_value_t = 0.7,
        allow_negative_numbers = true
    )]
    pub temperature: f32,

    /// Nucleus sampling threshold, in (0, 1].
    #[arg(
        long,
        env = "MISTRAL_BOT_TOP_P",
        default_value_t = 0.95,
        allow_negative_numbers = true
    )]
    pub top_p: f32,

    /// Top-k sampling: keep the k most likely tokens (0 keeps all). llama-server's default.
    #[arg(long, env = "MISTRAL_BOT_TOP_K", default_value_t = crate::chat::DEFAULT_TOP_K)]
    pub top_k: u32,

    /// Min-p sampling: drop tokens less likely than this fraction of the most likely one,
    /// in [0, 1] (0 = off). llama-server's default.
    #[arg(
        long,
        env = "MISTRAL_BOT_MIN_P",
        default_value_t = crate::chat::DEFAULT_MIN_P,
        allow_negative_numbers = true
    )]
    pub min_p: f32,

    /// Repetition penalty over the last 64 tokens, in (0, 2] (1 = off), as llama-server's
    /// `--repeat-penalty`.
    #[arg(
        long,
        env = "MISTRAL_BOT_REPEAT_PENALTY",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub repeat_penalty: f32,

    /// Sampler seed, for reproducible sampling [default: random per request].
    #[arg(long, env = "MISTRAL_BOT_SEED")]
    pub seed: Option<u32>,

    /// Requests that may wait for a free slot; one more is refused at once as overloaded.
    #[arg(long, env = "MISTRAL_BOT_QUEUE_SIZE", default_value_t = 16)]
    pub queue_size: usize,

    /// Chat format: `auto` (the GGUF's template, else Mistral), `mistral`, or a template
    /// name llama.cpp knows (`chatml`, `llama3`, `gemma`, `mistral-v7`, …).
    #[arg(long, env = "MISTRAL_BOT_CHAT_TEMPLATE", default_value = "auto")]
    pub chat_template: String,

    /// System prompt put before every conversation.
    #[arg(long, env = "MISTRAL_BOT_SYSTEM_PROMPT")]
    pub system_prompt: Option<String>,

    /// Memory-map the model file. Off by default: the CPU backend repacks the weights at
    /// load, and mapped pages would stay resident as well (9.3 vs 6.1 GiB for a 7B).
    #[arg(long, env = "MISTRAL_BOT_MMAP")]
    pub mmap: bool,

    /// Let llama.cpp repack the weights at load for its own CPU kernels (on|off). On a
    /// Zen 4 CPU with a Mistral 7B Q4_K_M, off reads prompts 1.5-1.6x faster and decodes
    /// 0.8x as fast past 1500 tokens (benches/RESULTS.md, "Weight repacking").
    #[arg(
        long,
        env = "MISTRAL_BOT_REPACK",
        default_value = "on",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub repack: bool,

    /// Show llama.cpp's own log lines.
    #[arg(long, env = "MISTRAL_BOT_LLAMA_LOG")]
    pub llama_log: bool,

    /// Answer this one prompt on stdout and exit.
    #[arg(long, conflicts_with = "console", value_name = "TEXT")]
    pub prompt: Option<String>,

    /// Chat in the terminal (streamed; /reset forgets the history, /exit quits).
    #[arg(long)]
    pub console: bool,

    /// Print the final prompt's token ids and pieces to stderr before generating (in
    /// --prompt/--console; when serving, log the messages of each Telegram or HTTP request
    /// as JSON).
    #[arg(long, env = "MISTRAL_BOT_VERBOSE_PROMPT")]
    pub verbose_prompt: bool,

    /// Fallback providers.
    #[command(flatten)]
    pub providers: ProviderArgs,

    /// The HTTP API.
    #[command(flatten)]
    pub http: HttpArgs,

    /// Voice notes (speech to text) and files.
    #[command(flatten)]
    pub inputs: InputArgs,

    /// Telegram bot token from @BotFather. Without one (and without --console/--prompt)
    /// there is no Telegram bot.
    #[arg(
        long,
        env = "TELEGRAM_BOT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub telegram_token: Option<Secret>,

    /// Telegram Bot API server [default: https://api.telegram.org]; point it at a
    /// self-hosted telegram-bot-api server.
    #[arg(long, env = "TELEGRAM_API_URL", value_name = "URL")]
    pub telegram_api_url: Option<String>,

    /// Telegram's webhook mode.
    #[command(flatten)]
    pub webhook: WebhookArgs,

    /// Who may talk to the bot: Telegram user ids and/or @usernames, comma-separated.
    /// Empty: everyone.
    #[arg(
        long,
        env = "MISTRAL_BOT_ALLOWED_USERS",
        value_delimiter = ',',
        value_name = "ID|@NAME,..."
    )]
    pub allowed_users: Vec<String>,

    /// Personas, streaming and fair use in Telegram.
    #[command(flatten)]
    pub chat_policy: ChatPolicyArgs,

    /// Directory for state kept across restarts: the conversation histories
    /// (conversations.sqlite3), the Telegram polling offset and the updates not yet answered.
    #[arg(
        long,
        env = "MISTRAL_BOT_DATA_DIR",
        default_value = "data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// Most turns (a message and its answer) kept per conversation; past it the oldest are
    /// dropped down to three quarters of it at once.
    #[arg(long, env = "MISTRAL_BOT_HISTORY_MAX_TURNS", default_value_t = 100)]
    pub history_max_turns: usize,

    /// Oldest turn kept, as a number with a unit: `90s`, `45m`, `12h`, `30d`. When a
    /// conversation has an older turn, every turn older than three quarters of it goes.
    #[arg(
        long,
        env = "MISTRAL_BOT_HISTORY_MAX_AGE",
        default_value = "30d",
        value_name = "AGE"
    )]
    pub history_max_age: String,

    /// RAM for parked KV caches of conversations that lost their slot: `auto` (what the
    /// memory limit — cgroup, else MemAvailable — leaves after the model, its slots and a
    /// margin) or MiB (0: none; more than fits is clamped). Mistral 7B at f16 takes
    /// 128 KiB per token: a 1500-token chat ≈ 190 MiB.
    #[arg(
        long,
        env = "MISTRAL_BOT_KV_PARK_RAM",
        default_value = "auto",
        value_name = "auto|MIB"
    )]
    pub kv_park_ram: String,

    /// Disk for parked KV caches under --data-dir/kv, in MiB (0: none; then nothing
    /// survives a restart). Least recently used files are deleted first.
    #[arg(
        long,
        env = "MISTRAL_BOT_KV_PARK_DISK",
        default_value_t = 20480,
        value_name = "MIB"
    )]
    pub kv_park_disk: u64,
}

/// What the command line asks for: the bot (serve, `--prompt`, `--console`) or a subcommand.
#[derive(Debug, Clone)]
pub enum Command {
    /// Run the bot as the flags say.
    Run(Args),
    /// `mistral-bot doctor [OPTIONS]`: check the set-up the same options describe.
    Doctor(Args),
}

impl Command {
    /// The name of the doctor subcommand.
    pub const DOCTOR: &'static str = "doctor";

    /// Parses `argv` (program name first); prints help or the error and exits on bad
    /// input, as clap does. `doctor` as the first argument selects the subcommand; every
    /// other option is shared, so it is parsed by the same [`Args`] (its help lists the
    /// command), and `mistral-bot --model x` works as it always did.
    pub fn parse_from<I, T>(argv: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        if argv.get(1).is_some_and(|a| a == Self::DOCTOR) {
            argv.remove(1);
            Command::Doctor(Args::parse_from(argv))
        } else {
            Command::Run(Args::parse_from(argv))
        }
    }
}

/// Most turns `--history-max-turns` accepts.
pub const MAX_HISTORY_TURNS: usize = 100_000;
/// The shortest `--history-max-age`.
pub const MIN_HISTORY_AGE: Duration = Duration::from_secs(60);
/// The longest `--history-max-age` (100 years).
pub const MAX_HISTORY_AGE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses an age such as `90s`, `45m`, `12h` or `30d` (whole numbers; surrounding blanks
/// allowed) within [`MIN_HISTORY_AGE`]..=[`MAX_HISTORY_AGE`].
pub fn parse_history_age(value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::HistoryAge {
        value: value.chars().take(40).collect(),
    };
    let trimmed = value.trim();
    let unit_at = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(bad)?;
    let (number, unit) = trimmed.split_at(unit_at);
    let scale: u64 = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err(bad()),
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let age = Duration::from_secs(number.checked_mul(scale).ok_or_else(bad)?);
    if !(MIN_HISTORY_AGE..=MAX_HISTORY_AGE).contains(&age) {
        return Err(bad());
    }
    Ok(age)
}

fn parse_secret(value: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(value.trim()))
}

/// One entry of `--allowed-users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedUser {
    /// A numeric Telegram user id.
    Id(u64),
    /// A username, without the `@`, lowercased (Telegram usernames are case-insensitive).
    Username(String),
}

impl AllowedUser {
    /// Parses `123456` or `@name` (the `@` is optional for names).
    pub fn parse(entry: &str) -> Result<Option<Self>, ConfigError> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Ok(None);
        }
        if let Ok(id) = entry.parse::<u64>() {
            return Ok(Some(AllowedUser::Id(id)));
        }
        let name = entry.strip_prefix('@').unwrap_or(entry);
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ConfigError::BadAllowedUser {
                entry: entry.to_string(),
            });
        }
        Ok(Some(AllowedUser::Username(name.to_ascii_lowercase())))
    }
}

/// The Telegram bot's setup.
#[derive(Debug, Clone)]
pub struct TelegramConfig {
    /// The bot token (redacted in `Debug`).
    pub token: Secret,
    /// The Bot API server; `None` for Telegram's own.
    pub api_url: Option<Url>,
    /// Who may talk to the bot; empty for everyone.
    pub allowed_users: Vec<AllowedUser>,
    /// Where the polling state is kept across restarts.
    pub data_dir: PathBuf,
    /// Streaming, admins and per-user limits.
    pub policy: ChatPolicy,
    /// Webhook mode; `None`: long polling.
    pub webhook: Option<WebhookConfig>,
}

/// What the process was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer one prompt on stdout.
    Prompt(String),
    /// Interactive chat in the terminal.
    Console,
    /// Serve chats until shut down.
    Serve,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The engine's setup; `None` without `--model` (then `local` is not in the chain).
    pub engine: Option<EngineConfig>,
    /// Default generation parameters.
    pub generate: GenerateParams,
    /// System prompt for every conversation.
    pub system_prompt: Option<String>,
    /// What to do.
    pub mode: Mode,
    /// Print prompts as tokens before generating.
    pub verbose_prompt: bool,
    /// The fallback chain and the cloud providers.
    pub providers: ProvidersConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The Telegram bot, when a token is configured.
    pub telegram: Option<TelegramConfig>,
    /// Where state kept across restarts lives (`--data-dir`).
    pub data_dir: PathBuf,
    /// How much conversation history is kept.
    pub history: HistoryLimits,
    /// `--kv-park-ram` as asked; the bytes in `engine.park` are decided at start-up.
    pub kv_park_ram: ParkRam,
    /// What the Telegram bot reads besides text (speech to text, files).
    pub inputs: InputConfig,
    /// The modes a conversation may choose (`/mode`): built in, plus `--modes-file`.
    pub modes: Arc<Catalog>,
}

impl Config {
    /// Every secret configured (the Telegram token and its secret half, each cloud key,
    /// the HTTP API key), for the log writer to cut out of every line.
    pub fn secrets(&self) -> Vec<String> {
        let telegram = self.telegram.iter().flat_map(|t| {
            let token = t.token.expose();
            // `<bot id>:<secret>`: the bot id is public, the rest is not.
            [Some(token), token.split_once(':').map(|(_, secret)| secret)]
        });
        let p = &self.providers;
        let keys = [&p.groq, &p.mistral, &p.gemini, &p.openai]
            .into_iter()
            .map(|c| c.api_key.as_ref().map(Secret::expose))
            .chain([
                self.http.api_key.as_ref().map(Secret::expose),
                self.inputs.secret(),
            ]);
        telegram
            .chain(keys)
            .flatten()
            .map(str::to_string)
            .filter(|s| !s.trim().is_empty())
            .collect()
    }
}

/// A flag value that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A count that must be at least one.
    #[error("--{flag} must be at least 1")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// The reply budget leaves no room for a prompt.
    #[error(
        "--max-tokens {max_tokens} leaves too little room for the prompt in --ctx-size {ctx_size} \
         (at most {limit} with this window); lower --max-tokens or raise --ctx-size"
    )]
    ContextTooSmall {
        /// --max-tokens.
        max_tokens: u32,
        /// --ctx-size.
        ctx_size: u32,
        /// The largest --max-tokens this window allows.
        limit: u32,
    },
    /// A per-step prompt chunk larger than a batch.
    #[error("--prefill-chunk {chunk} is larger than --batch-size {batch}")]
    ChunkOverBatch {
        /// --prefill-chunk.
        chunk: u32,
        /// --batch-size.
        batch: u32,
    },
    /// More slots than one batch holds: each step decodes a token for every generating
    /// slot, so some would wait every other step.
    #[error(
        "--slots {slots} is larger than --batch-size {batch}: every step decodes one token per \
         generating slot; raise --batch-size to at least {slots} or lower --slots"
    )]
    SlotsOverBatch {
        /// --slots.
        slots: usize,
        /// --batch-size.
        batch: u32,
    },
    /// A sampling parameter out of range.
    #[error("--{flag} {value} is out of range ({range})")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f32,
        /// The allowed range.
        range: &'static str,
    },
    /// An empty chat template name.
    #[error(
        "--chat-template must not be empty (use `auto`, `mistral` or a llama.cpp template name)"
    )]
    EmptyTemplate,
    /// `--chain` names something that is not a provider, or names one twice.
    #[error("--chain: {0}")]
    Chain(String),
    /// A timeout that is not a positive number of seconds.
    #[error("--{flag} {value} must be a positive number of seconds")]
    Timeout {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f64,
    },
    /// An empty model name.
    #[error("--{flag} must not be empty")]
    EmptyModel {
        /// The flag.
        flag: &'static str,
    },
    /// The HTTP API would be open to the network without a key.
    #[error(
        "--http-addr {addr} is not a loopback address: set --api-key (MISTRAL_BOT_API_KEY) so \
         the API is not open to anyone who can reach it"
    )]
    OpenWithoutKey {
        /// The address.
        addr: SocketAddr,
    },
    /// An `--allowed-users` entry that is neither an id nor a username.
    #[error("--allowed-users: `{entry}` is neither a numeric user id nor a @username")]
    BadAllowedUser {
        /// The entry.
        entry: String,
    },
    /// A parking budget too large to be meant.
    #[error("--{flag} {mib} MiB is more than 1 PiB; give the budget in MiB")]
    ParkBudget {
        /// The flag.
        flag: &'static str,
        /// The value given.
        mib: u64,
    },
    /// `--kv-park-ram` neither `auto` nor a number of MiB.
    #[error("--kv-park-ram `{value}` is neither `auto` nor a number of MiB")]
    ParkRam {
        /// The value given (its start).
        value: String,
    },
    /// `--history-max-turns` out of range.
    #[error("--history-max-turns must be 1 to {MAX_HISTORY_TURNS}")]
    HistoryTurns,
    /// `--history-max-age` that is not an age in range.
    #[error(
        "--history-max-age `{value}` is not an age from 1 minute to 100 years, written as a \
         whole number with a unit: 90s, 45m, 12h, 30d"
    )]
    HistoryAge {
        /// The value given (at most 40 characters of it).
        value: String,
    },
    /// An `--openai-base-url` entry that is not an http(s) URL.
    #[error("--openai-base-url `{url}` is not a valid http(s) URL")]
    BadBaseUrl {
        /// The entry (at most 200 characters of it).
        url: String,
    },
    /// An `--openai-base-url` entry given twice.
    #[error("--openai-base-url names {url} twice")]
    DuplicateBaseUrl {
        /// The URL.
        url: String,
    },
    /// `local` in `--chain` without a model to run it.
    #[error(
        "--chain names `local` but no --model (MISTRAL_BOT_MODEL) is given: pass --model PATH \
         to a GGUF file, or leave `local` out of --chain (e.g. --chain openai,groq) to answer \
         from other servers only"
    )]
    NoModel,
    /// `--prompt` or `--console` without a model.
    #[error("--{flag} answers with the local model: pass --model PATH (MISTRAL_BOT_MODEL)")]
    NoModelFor {
        /// `prompt` or `console`.
        flag: &'static str,
    },
    /// KV cache settings that do not work together.
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
    /// A speech-to-text URL that does not parse.
    #[error("--stt-base-url `{url}` is not a valid http(s) URL")]
    BadSttUrl {
        /// The value given.
        url: String,
    },
    /// `--document-max-bytes` out of range.
    #[error("--document-max-bytes {value} must be 1 to 20971520 (what bots may download)")]
    DocumentMaxBytes {
        /// The value given.
        value: u64,
    },
    /// A Bot API URL that does not parse.
    #[error("--telegram-api-url `{url}` is not a valid http(s) URL")]
    BadApiUrl {
        /// The value given.
        url: String,
    },
    /// `--modes-file` cannot be used (the reason, with its causes).
    #[error("{0}")]
    Modes(String),
    /// Webhook mode cannot start as asked.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
}

/// An error and its causes, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn non_zero_usize(value: usize, flag: &'static str) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(value).ok_or(ConfigError::Zero { flag })
}

fn non_zero_u32(value: u32, flag: &'static str) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(value).ok_or(ConfigError::Zero { flag })
}

/// The largest parking budget accepted, in MiB (1 PiB).
const MAX_PARK_MIB: u64 = 1 << 30;

/// `--kv-park-ram` / `--kv-park-disk` in bytes.
fn park_budget(mib: u64, flag: &'static str) -> Result<u64, ConfigError> {
    if mib > MAX_PARK_MIB {
        return Err(ConfigError::ParkBudget { flag, mib });
    }
    Ok(mib << 20)
}

/// `--kv-park-ram`: `auto`, or MiB (at most 1 PiB).
pub fn parse_park_ram(value: &str) -> Result<ParkRam, ConfigError> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("auto") {
        return Ok(ParkRam::Auto);
    }
    let mib: u64 = value.parse().map_err(|_| ConfigError::ParkRam {
        value: value.chars().take(40).collect(),
    })?;
    park_budget(mib, "kv-park-ram").map(ParkRam::Bytes)
}

/// `--ctx-size` when none is given; also the window a front without a local model sizes
/// replied text and files for.
pub const DEFAULT_CTX_SIZE: u32 = 4096;

/// The largest reply budget a window allows: a quarter of it stays for the prompt.
pub fn max_tokens_limit(ctx_size: u32) -> u32 {
    ctx_size - ctx_size / 4
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let slots = non_zero_usize(args.slots, "slots")?;
        let ctx_size = non_zero_u32(args.ctx_size, "ctx-size")?;
        let threads = non_zero_usize(args.threads.unwrap_or_else(num_cpus::get), "threads")?;
        let batch_size = non_zero_u32(args.batch_size, "batch-size")?;
        let prefill_chunk = non_zero_u32(args.prefill_chunk, "prefill-chunk")?;
        let queue_size = non_zero_usize(args.queue_size, "queue-size")?;
        let max_tokens = non_zero_u32(args.max_tokens, "max-tokens")?.get();
        if prefill_chunk > batch_size {
            return Err(ConfigError::ChunkOverBatch {
                chunk: prefill_chunk.get(),
                batch: batch_size.get(),
            });
        }
        if slots.get() > batch_size.get() as usize {
            return Err(ConfigError::SlotsOverBatch {
                slots: slots.get(),
                batch: batch_size.get(),
            });
        }
        let limit = max_tokens_limit(ctx_size.get());
        if max_tokens > limit {
            return Err(ConfigError::ContextTooSmall {
                max_tokens,
                ctx_size: ctx_size.get(),
                limit,
            });
        }
        if !(0.0..=100.0).contains(&args.temperature) {
            return Err(ConfigError::OutOfRange {
                flag: "temperature",
                value: args.temperature,
                range: "0 to 100",
            });
        }
        if !(args.top_p > 0.0 && args.top_p <= 1.0) {
            return Err(ConfigError::OutOfRange {
                flag: "top-p",
                value: args.top_p,
                range: "above 0, at most 1",
            });
        }
        if !(0.0..=1.0).contains(&args.min_p) {
            return Err(ConfigError::OutOfRange {
                flag: "min-p",
                value: args.min_p,
                range: "0 to 1",
            });
        }
        if !(args.repeat_penalty > 0.0 && args.repeat_penalty <= 2.0) {
            return Err(ConfigError::OutOfRange {
                flag: "repeat-penalty",
                value: args.repeat_penalty,
                range: "above 0, at most 2",
            });
        }
        let chat_template = match args.chat_template.trim() {
            "" => return Err(ConfigError::EmptyTemplate),
            "auto" => ChatTemplateChoice::Auto,
            "mistral" => ChatTemplateChoice::Mistral,
            name => ChatTemplateChoice::Named(name.to_string()),
        };
        let kv = KvCacheSettings::new(args.flash_attn, args.cache_type_k, args.cache_type_v)?;
        let millis = |ms: u32| (ms > 0).then(|| Duration::from_millis(u64::from(ms)));
        let step_target = millis(args.step_target_ms);
        let prompt_step = millis(args.prompt_step_ms);
        let kv_park_ram = parse_park_ram(&args.kv_park_ram)?;
        let park_disk = park_budget(args.kv_park_disk, "kv-park-disk")?;
        // Only serve mode has many conversations; --prompt and --console hold one.
        let serving = args.prompt.is_none() && !args.console;
        let park = (serving && (kv_park_ram != ParkRam::Bytes(0) || park_disk > 0)).then(|| {
            ParkConfig {
                dir: args.data_dir.join("kv"),
                // `auto` is decided at start-up from the host (`host::plan_memory`).
                ram_bytes: match kv_park_ram {
                    ParkRam::Bytes(bytes) => bytes,
                    ParkRam::Auto => 0,
                },
                disk_bytes: park_disk,
            }
        });
        let mode = match (args.prompt, args.console) {
            (Some(prompt), _) => Mode::Prompt(prompt),
            (None, true) => Mode::Console,
            (None, false) => Mode::Serve,
        };
        let telegram = match args.telegram_token.filter(|t| !t.expose().is_empty()) {
            None => None,
            Some(token) => {
                let api_url = match args.telegram_api_url.filter(|u| !u.trim().is_empty()) {
                    None => None,
                    Some(raw) => match Url::parse(raw.trim()) {
                        Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
                        _ => return Err(ConfigError::BadApiUrl { url: raw }),
                    },
                };
                let mut allowed_users = Vec::new();
                for entry in &args.allowed_users {
                    allowed_users.extend(AllowedUser::parse(entry)?);
                }
                let webhook = WebhookConfig::from_args(&args.webhook, api_url.as_ref())?;
                Some(TelegramConfig {
                    token,
                    api_url,
                    allowed_users,
                    data_dir: args.data_dir.clone(),
                    policy: ChatPolicy::try_from(args.chat_policy.clone())?,
                    webhook,
                })
            }
        };
        webhook::needs_a_server(&args.webhook, telegram.is_some(), &mode)?;
        let inputs = InputConfig::from_args(
            args.inputs,
            (
                secret(args.providers.groq_api_key.clone()).as_ref(),
                &args.providers.groq_base_url,
            ),
        )?;
        let mut providers = ProvidersConfig::try_from(args.providers)?;
        // Budget counts are kept across restarts beside the other state.
        providers.state_dir = serving.then(|| args.data_dir.clone());
        if args.model.is_none() {
            match &mode {
                Mode::Prompt(_) => return Err(ConfigError::NoModelFor { flag: "prompt" }),
                Mode::Console => return Err(ConfigError::NoModelFor { flag: "console" }),
                Mode::Serve if providers.chain.contains(&ProviderKind::Local) => {
                    return Err(ConfigError::NoModel);
                }
                Mode::Serve => {}
            }
        }
        if !(1..=MAX_HISTORY_TURNS).contains(&args.history_max_turns) {
            return Err(ConfigError::HistoryTurns);
        }
        let history = HistoryLimits {
            max_turns: non_zero_usize(args.history_max_turns, "history-max-turns")?,
            max_age: parse_history_age(&args.history_max_age)?,
        };
        let modes = match &args.chat_policy.modes_file {
            Some(path) if !path.as_os_str().is_empty() => {
                Catalog::with_file(path).map_err(|e| ConfigError::Modes(error_chain(&e)))?
            }
            _ => Catalog::builtin(),
        };
        Ok(Config {
            modes: Arc::new(modes),
            engine: args.model.map(|model_path| EngineConfig {
                model_path,
                slots,
                ctx_size,
                threads,
                batch_size,
                prefill_chunk,
                step_target,
                prompt_step,
                kv,
                queue_size,
                mmap: args.mmap,
                repack: args.repack,
                chat_template,
                llama_log: args.llama_log,
                progress_bar: false,
                park,
            }),
            generate: GenerateParams {
                max_tokens,
                temperature: args.temperature,
                top_p: args.top_p,
                seed: args.seed,
                top_k: args.top_k,
                min_p: args.min_p,
                repeat_penalty: args.repeat_penalty,
                ..GenerateParams::default()
            },
            system_prompt: args.system_prompt.filter(|s| !s.trim().is_empty()),
            mode,
            verbose_prompt: args.verbose_prompt,
            providers,
            inputs,
            http: HttpConfig::try_from(args.http)?,
            telegram,
            data_dir: args.data_dir,
            history,
            kv_park_ram,
        })
    }
}

/// A secret (an API key): its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it (an HTTP header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret(value.to_string()))
    }
}

/// An empty or blank secret is no secret.
fn secret(value: Option<Secret>) -> Option<Secret> {
    value.filter(|v| !v.0.trim().is_empty())
}

/// Flags of the fallback chain and the cloud providers.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderArgs {
    /// Providers to try, in order, before the canned apology: `local`, `groq`, `mistral`,
    /// `gemini`, `openai` (comma-separated). Unconfigured providers are skipped.
    #[arg(
        long,
        env = "MISTRAL_BOT_CHAIN",
        default_value = "local,groq,mistral,gemini"
    )]
    pub chain: String,

    /// Seconds the local engine may take to start answering (queue wait and prompt
    /// included) before the next provider is tried; also the longest pause mid-reply.
    #[arg(long, env = "MISTRAL_BOT_LOCAL_TIMEOUT", default_value_t = 120.0)]
    pub local_timeout: f64,

    /// Seconds: when the local engine's estimated time to a request's first token (its
    /// queue, the prompts ahead of it and its own uncached tokens, at the engine's measured
    /// rates) is longer, and a later provider of the chain is available, that provider
    /// answers at once. 0: always wait for the local engine.
    #[arg(long, env = "MISTRAL_BOT_LOCAL_MAX_WAIT", default_value_t = 20.0)]
    pub local_max_wait: f64,

    /// Groq API key.
    #[arg(long, env = "GROQ_API_KEY", hide_env_values = true)]
    pub groq_api_key: Option<Secret>,
    /// Groq model.
    // Groq shut `llama-3.3-70b-versatile` down on 2026-08-16 (404 model_not_found since) and
    // names `openai/gpt-oss-120b` as its replacement:
    // https://console.groq.com/docs/deprecations ,
    // https://github.com/codedaily04/commit-craft/issues/1 ,
    // https://github.com/rvong65/ethical-decision-simulator/releases/tag/v1.0.1
    #[arg(long, env = "GROQ_MODEL", default_value = "openai/gpt-oss-120b")]
    pub groq_model: String,
    /// Groq OpenAI-compatible base URL.
    #[arg(
        long,
        env = "GROQ_BASE_URL",
        default_value = "https://api.groq.com/openai/v1"
    )]
    pub groq_base_url: Url,
    /// Seconds Groq may take to start answering; also the longest pause mid-reply.
    #[arg(long, env = "GROQ_TIMEOUT", default_value_t = 30.0)]
    pub groq_timeout: f64,

    /// Mistral La Plateforme API key.
    #[arg(long, env = "MISTRAL_API_KEY", hide_env_values = true)]
    pub mistral_api_key: Option<Secret>,
    /// Mistral model.
    // An alias Mistral keeps pointing at its current small model; reasoning versions may
    // stream `content` as chunks (text + thinking), which the client parses:
    // https://docs.mistral.ai/capabilities/reasoning/ , https://github.com/symfony/ai/issues/2422
    #[arg(long, env = "MISTRAL_MODEL", default_value = "mistral-small-latest")]
    pub mistral_model: String,
    /// Mistral base URL.
    #[arg(
        long,
        env = "MISTRAL_BASE_URL",
        default_value = "https://api.mistral.ai/v1"
    )]
    pub mistral_base_url: Url,
    /// Seconds Mistral may take to start answering; also the longest pause mid-reply.
    #[arg(long, env = "MISTRAL_TIMEOUT", default_value_t = 30.0)]
    pub mistral_timeout: f64,

    /// Gemini API key.
    #[arg(long, env = "GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<Secret>,
    /// Gemini model.
    // `gemini-2.5-flash` shuts down on 2026-12-01; Google's recommended replacement is
    // `gemini-3.5-flash-lite` (GA since 2026-07-21, thinking level `minimal` by default):
    // https://ai.google.dev/gemini-api/docs/deprecations ,
    // https://dev.to/aideprecations/what-to-do-before-gemini-25-pro-and-25-flash-are-retired-on-december-1-2026-5gg9 ,
    // https://ai.google.dev/gemini-api/docs/changelog (2026-07-21)
    #[arg(long, env = "GEMINI_MODEL", default_value = "gemini-3.5-flash-lite")]
    pub gemini_model: String,
    /// Gemini API base URL.
    #[arg(
        long,
        env = "GEMINI_BASE_URL",
        default_value = "https://generativelanguage.googleapis.com/v1beta"
    )]
    pub gemini_base_url: Url,
    /// Seconds Gemini may take to start answering; also the longest pause mid-reply.
    #[arg(long, env = "GEMINI_TIMEOUT", default_value_t = 30.0)]
    pub gemini_timeout: f64,

    /// API key of the generic OpenAI-compatible provider (optional when
    /// --openai-base-url points at a server without keys, e.g. a vLLM or llama-server fleet).
    #[arg(long, env = "OPENAI_COMPAT_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<Secret>,
    /// Model of the generic OpenAI-compatible provider.
    // OpenAI shuts `gpt-4o-mini` down on 2027-01-14 and names `gpt-6-luna` (a reasoning
    // model: `max_completion_tokens`, default sampling only) as its replacement:
    // https://developers.openai.com/api/docs/deprecations ,
    // https://dev.to/max_bob/openai-api-deprecations-2026-2027-every-shutdown-date-and-recommended-replacement-gpt-4o-2ffm
    #[arg(long, env = "OPENAI_COMPAT_MODEL", default_value = "gpt-6-luna")]
    pub openai_model: String,
    /// Base URL of the generic OpenAI-compatible provider [default: https://api.openai.com/v1].
    /// Several (comma-separated, or the flag repeated) make a fleet: each conversation
    /// goes to the server holding its cache (see README "Fleet").
    #[arg(
        long,
        env = "OPENAI_COMPAT_BASE_URL",
        value_delimiter = ',',
        value_name = "URL[,URL…]"
    )]
    pub openai_base_url: Vec<String>,
    /// Seconds the generic provider may take to start answering; also the longest pause.
    #[arg(long, env = "OPENAI_COMPAT_TIMEOUT", default_value_t = 30.0)]
    pub openai_timeout: f64,

    /// Groq's daily token budget (prompt + completion, as its API reports them; the day
    /// ends at 00:00 UTC): past it Groq is skipped until the next day.
    #[arg(long, env = "GROQ_DAILY_TOKENS", value_name = "TOKENS")]
    pub groq_daily_tokens: Option<u64>,
    /// Mistral's monthly token budget (its free tier: 2M a month; the month ends at 00:00
    /// UTC on the 1st): past it Mistral is skipped until the next month.
    #[arg(long, env = "MISTRAL_MONTHLY_TOKENS", value_name = "TOKENS")]
    pub mistral_monthly_tokens: Option<u64>,
    /// Gemini's daily request budget (requests sent; the day ends at 00:00 UTC): past it
    /// Gemini is skipped until the next day.
    #[arg(long, env = "GEMINI_DAILY_REQUESTS", value_name = "REQUESTS")]
    pub gemini_daily_requests: Option<u64>,
    /// The generic OpenAI-compatible provider's daily token budget (00:00 UTC).
    #[arg(long, env = "OPENAI_COMPAT_DAILY_TOKENS", value_name = "TOKENS")]
    pub openai_daily_tokens: Option<u64>,

    /// Consecutive failures after which a provider is skipped for --breaker-cooldown.
    #[arg(long, env = "MISTRAL_BOT_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,
    /// Seconds a failing provider is skipped before one probe request is let through.
    #[arg(long, env = "MISTRAL_BOT_BREAKER_COOLDOWN", default_value_t = 30.0)]
    pub breaker_cooldown: f64,
}

/// A provider that can be named in `--chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// The in-process llama.cpp engine.
    Local,
    /// Groq (OpenAI-compatible).
    Groq,
    /// Mistral La Plateforme (OpenAI-compatible).
    Mistral,
    /// Google Gemini.
    Gemini,
    /// Any OpenAI-compatible server.
    OpenAi,
}

impl ProviderKind {
    /// The name in `--chain`, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Groq => "groq",
            ProviderKind::Mistral => "mistral",
            ProviderKind::Gemini => "gemini",
            ProviderKind::OpenAi => "openai",
        }
    }

    /// The flag and environment variable naming this provider's model.
    pub fn model_flag(self) -> &'static str {
        match self {
            ProviderKind::Local => "--model (MISTRAL_BOT_MODEL)",
            ProviderKind::Groq => "--groq-model (GROQ_MODEL)",
            ProviderKind::Mistral => "--mistral-model (MISTRAL_MODEL)",
            ProviderKind::Gemini => "--gemini-model (GEMINI_MODEL)",
            ProviderKind::OpenAi => "--openai-model (OPENAI_COMPAT_MODEL)",
        }
    }

    /// The flag and environment variable holding this provider's API key.
    pub fn key_flag(self) -> &'static str {
        match self {
            ProviderKind::Local => "nothing",
            ProviderKind::Groq => "--groq-api-key (GROQ_API_KEY)",
            ProviderKind::Mistral => "--mistral-api-key (MISTRAL_API_KEY)",
            ProviderKind::Gemini => "--gemini-api-key (GEMINI_API_KEY)",
            ProviderKind::OpenAi => "--openai-api-key (OPENAI_COMPAT_API_KEY)",
        }
    }

    /// The flag and environment variable holding this provider's base URL.
    pub fn base_url_flag(self) -> &'static str {
        match self {
            ProviderKind::Local => "nothing",
            ProviderKind::Groq => "--groq-base-url (GROQ_BASE_URL)",
            ProviderKind::Mistral => "--mistral-base-url (MISTRAL_BASE_URL)",
            ProviderKind::Gemini => "--gemini-base-url (GEMINI_BASE_URL)",
            ProviderKind::OpenAi => "--openai-base-url (OPENAI_COMPAT_BASE_URL)",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            ProviderKind::Local,
            ProviderKind::Groq,
            ProviderKind::Mistral,
            ProviderKind::Gemini,
            ProviderKind::OpenAi,
        ]
        .into_iter()
        .find(|kind| kind.name() == name)
    }
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetUnit {
    /// Prompt and completion tokens, as the API's `usage` reports them.
    Tokens,
    /// Requests sent.
    Requests,
}

impl BudgetUnit {
    /// The name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetUnit::Tokens => "tokens",
            BudgetUnit::Requests => "requests",
        }
    }
}

/// The calendar window a budget is counted in (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    /// From 00:00 UTC to the next.
    Day,
    /// From 00:00 UTC on the 1st to the next 1st.
    Month,
}

impl BudgetWindow {
    /// The name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetWindow::Day => "day",
            BudgetWindow::Month => "month",
        }
    }
}

/// A provider's budget: at most `limit` of `unit` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most allowed per window.
    pub limit: u64,
    /// What is counted.
    pub unit: BudgetUnit,
    /// The window.
    pub window: BudgetWindow,
}

/// The cloud providers' budgets (none by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderBudgets {
    /// `--groq-daily-tokens`.
    pub groq: Option<Budget>,
    /// `--mistral-monthly-tokens`.
    pub mistral: Option<Budget>,
    /// `--gemini-daily-requests`.
    pub gemini: Option<Budget>,
    /// `--openai-daily-tokens`.
    pub openai: Option<Budget>,
}

fn budget(
    limit: Option<u64>,
    flag: &'static str,
    unit: BudgetUnit,
    window: BudgetWindow,
) -> Result<Option<Budget>, ConfigError> {
    match limit {
        None => Ok(None),
        Some(0) => Err(ConfigError::Zero { flag }),
        Some(limit) => Ok(Some(Budget {
            limit,
            unit,
            window,
        })),
    }
}

/// One cloud provider's settings.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Base URL (`…/v1` for OpenAI-compatible APIs, `…/v1beta` for Gemini).
    pub base_url: Url,
    /// API key; `None` when not configured.
    pub api_key: Option<Secret>,
    /// Whether the provider is unusable without a key (false only for a self-hosted
    /// OpenAI-compatible server).
    pub key_required: bool,
    /// Model name.
    pub model: String,
    /// Time allowed until the first text, and between two pieces of text.
    pub timeout: Duration,
}

impl CloudConfig {
    /// Whether the provider can be used (its key is set, or it needs none).
    pub fn is_configured(&self) -> bool {
        self.api_key.is_some() || !self.key_required
    }
}

/// The fallback chain's settings.
#[derive(Debug, Clone)]
pub struct ProvidersConfig {
    /// Providers in order (the canned apology always comes last).
    pub chain: Vec<ProviderKind>,
    /// Time allowed to the local engine until the first text, and between two pieces.
    pub local_timeout: Duration,
    /// A request whose estimated wait for the local engine's first token is longer goes
    /// to a later available provider at once; `None`: never.
    pub local_max_wait: Option<Duration>,
    /// Groq.
    pub groq: CloudConfig,
    /// Mistral La Plateforme.
    pub mistral: CloudConfig,
    /// Gemini.
    pub gemini: CloudConfig,
    /// The generic OpenAI-compatible provider (its `base_url` is the first server).
    pub openai: CloudConfig,
    /// Every server `--openai-base-url` names (empty for OpenAI itself); more than one
    /// make a fleet.
    pub openai_fleet: Vec<Url>,
    /// The cloud providers' budgets.
    pub budgets: ProviderBudgets,
    /// Where the budget counts are kept across restarts (the data dir); `None`: memory.
    pub state_dir: Option<PathBuf>,
    /// Consecutive failures that open a provider's circuit breaker.
    pub breaker_failures: NonZeroU32,
    /// How long an open breaker skips its provider before one probe.
    pub breaker_cooldown: Duration,
}

fn seconds(value: f64, flag: &'static str) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero() && value <= 86_400.0)
        .ok_or(ConfigError::Timeout { flag, value })
}

fn model(value: String, flag: &'static str) -> Result<String, ConfigError> {
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err(ConfigError::EmptyModel { flag });
    }
    Ok(value)
}

/// The default base URL of the generic OpenAI-compatible provider.
pub const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

impl TryFrom<ProviderArgs> for ProvidersConfig {
    type Error = ConfigError;

    fn try_from(args: ProviderArgs) -> Result<Self, Self::Error> {
        let mut chain = Vec::new();
        for name in args
            .chain
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            let kind = ProviderKind::parse(name).ok_or_else(|| {
                ConfigError::Chain(format!(
                    "unknown provider `{name}` (known: local, groq, mistral, gemini, openai)"
                ))
            })?;
            if chain.contains(&kind) {
                return Err(ConfigError::Chain(format!("`{name}` is named twice")));
            }
            chain.push(kind);
        }
        if chain.is_empty() {
            return Err(ConfigError::Chain("name at least one provider".into()));
        }
        let openai_fleet = base_urls(&args.openai_base_url)?;
        let self_hosted = !openai_fleet.is_empty();
        let openai_base_url = match openai_fleet.first() {
            Some(url) => url.clone(),
            None => Url::parse(OPENAI_DEFAULT_BASE_URL)
                .map_err(|e| ConfigError::Chain(format!("default OpenAI URL: {e}")))?,
        };
        Ok(ProvidersConfig {
            chain,
            local_timeout: seconds(args.local_timeout, "local-timeout")?,
            local_max_wait: if args.local_max_wait == 0.0 {
                None
            } else {
                Some(seconds(args.local_max_wait, "local-max-wait")?)
            },
            groq: CloudConfig {
                base_url: args.groq_base_url,
                api_key: secret(args.groq_api_key),
                key_required: true,
                model: model(args.groq_model, "groq-model")?,
                timeout: seconds(args.groq_timeout, "groq-timeout")?,
            },
            mistral: CloudConfig {
                base_url: args.mistral_base_url,
                api_key: secret(args.mistral_api_key),
                key_required: true,
                model: model(args.mistral_model, "mistral-model")?,
                timeout: seconds(args.mistral_timeout, "mistral-timeout")?,
            },
            gemini: CloudConfig {
                base_url: args.gemini_base_url,
                api_key: secret(args.gemini_api_key),
                key_required: true,
                model: model(args.gemini_model, "gemini-model")?,
                timeout: seconds(args.gemini_timeout, "gemini-timeout")?,
            },
            openai: CloudConfig {
                base_url: openai_base_url,
                api_key: secret(args.openai_api_key),
                key_required: !self_hosted,
                model: model(args.openai_model, "openai-model")?,
                timeout: seconds(args.openai_timeout, "openai-timeout")?,
            },
            openai_fleet,
            budgets: ProviderBudgets {
                groq: budget(
                    args.groq_daily_tokens,
                    "groq-daily-tokens",
                    BudgetUnit::Tokens,
                    BudgetWindow::Day,
                )?,
                mistral: budget(
                    args.mistral_monthly_tokens,
                    "mistral-monthly-tokens",
                    BudgetUnit::Tokens,
                    BudgetWindow::Month,
                )?,
                gemini: budget(
                    args.gemini_daily_requests,
                    "gemini-daily-requests",
                    BudgetUnit::Requests,
                    BudgetWindow::Day,
                )?,
                openai: budget(
                    args.openai_daily_tokens,
                    "openai-daily-tokens",
                    BudgetUnit::Tokens,
                    BudgetWindow::Day,
                )?,
            },
            state_dir: None,
            breaker_failures: non_zero_u32(args.breaker_failures, "breaker-failures")?,
            breaker_cooldown: seconds(args.breaker_cooldown, "breaker-cooldown")?,
        })
    }
}

/// The servers `--openai-base-url` lists (blank entries skipped), each an http(s) URL,
/// none twice.
fn base_urls(values: &[String]) -> Result<Vec<Url>, ConfigError> {
    let mut urls: Vec<Url> = Vec::new();
    for raw in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        let bad = || ConfigError::BadBaseUrl {
            url: raw.chars().take(200).collect(),
        };
        let url = Url::parse(raw).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad());
        }
        let same = |u: &Url| u.as_str().trim_end_matches('/') == url.as_str().trim_end_matches('/');
        if urls.iter().any(same) {
            return Err(ConfigError::DuplicateBaseUrl {
                url: url.to_string(),
            });
        }
        urls.push(url);
    }
    Ok(urls)
}

/// Flags of the HTTP API.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Address of the HTTP API (OpenAI-compatible chat, metrics, health).
    #[arg(long, env = "MISTRAL_BOT_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,

    /// Bearer key the HTTP API's `/v1/*` routes require; needed when --http-addr is not a
    /// loopback address.
    #[arg(long, env = "MISTRAL_BOT_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MISTRAL_BOT_HTTP_BODY_LIMIT", default_value_t = 1 << 20)]
    pub http_body_limit: usize,

    /// Chat completions answered at the same time; more get 503 with `Retry-After`.
    #[arg(long, env = "MISTRAL_BOT_HTTP_MAX_CONCURRENT", default_value_t = 256)]
    pub http_max_concurrent: usize,
}

/// The HTTP API's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The bearer key of `/v1/*`, if any.
    pub api_key: Option<Secret>,
    /// Largest request body, in bytes.
    pub body_limit: NonZeroUsize,
    /// Most chat completions in flight.
    pub max_concurrent: NonZeroUsize,
}

impl TryFrom<HttpArgs> for HttpConfig {
    type Error = ConfigError;

    fn try_from(args: HttpArgs) -> Result<Self, Self::Error> {
        let api_key = secret(args.api_key);
        if api_key.is_none() && !args.http_addr.ip().is_loopback() {
            return Err(ConfigError::OpenWithoutKey {
                addr: args.http_addr,
            });
        }
        Ok(HttpConfig {
            addr: args.http_addr,
            api_key,
            body_limit: non_zero_usize(args.http_body_limit, "http-body-limit")?,
            max_concurrent: non_zero_usize(args.http_max_concurrent, "http-max-concurrent")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["mistral-bot", "--model", "m.gguf"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).expect("clap accepts the flags"))
    }

    #[test]
    fn kv_parking_is_on_by_default_in_serve_mode_under_the_data_dir() {
        let park = parse(&["--data-dir", "/var/lib/bot"])
            .unwrap()
            .engine
            .unwrap()
            .park
            .unwrap();
        assert_eq!(park.dir, PathBuf::from("/var/lib/bot/kv"));
        assert_eq!(park.disk_bytes, 20480 << 20);
        let config = parse(&[]).unwrap();
        assert_eq!(config.kv_park_ram, ParkRam::Auto, "sized from the host");
        for (value, expected) in [
            ("AUTO", ParkRam::Auto),
            (" 512 ", ParkRam::Bytes(512 << 20)),
            ("0", ParkRam::Bytes(0)),
        ] {
            assert_eq!(parse_park_ram(value).unwrap(), expected, "{value}");
        }
        for bad in ["", "1.5", "-1", "4G", "18446744073709551615"] {
            assert!(parse_park_ram(bad).is_err(), "{bad}");
        }
        let park = parse(&["--kv-park-ram", "0", "--kv-park-disk", "10"])
            .unwrap()
            .engine
            .unwrap()
            .park
            .unwrap();
        assert_eq!((park.ram_bytes, park.disk_bytes), (0, 10 << 20));
    }

    #[test]
    fn kv_parking_is_off_when_both_budgets_are_zero_and_outside_serve_mode() {
        let off = parse(&["--kv-park-ram", "0", "--kv-park-disk", "0"]).unwrap();
        assert_eq!(off.engine.unwrap().park, None);
        assert_eq!(parse(&["--console"]).unwrap().engine.unwrap().park, None);
        assert_eq!(
            parse(&["--prompt", "hi"]).unwrap().engine.unwrap().park,
            None
        );
    }

    #[test]
    fn an_absurd_parking_budget_is_refused() {
        let err = parse(&["--kv-park-disk", "18446744073709551615"]).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::ParkBudget {
                flag: "kv-park-disk",
                ..
            }
        ));
    }

    #[test]
    fn defaults_match_the_design() {
        let config = parse(&[]).unwrap();
        let engine = config.engine.unwrap();
        assert_eq!(engine.slots.get(), 4);
        assert_eq!(engine.ctx_size.get(), 4096);
        assert_eq!(engine.queue_size.get(), 16);
        assert!(!engine.mmap, "mmap is off by default");
        assert_eq!(config.generate.max_tokens, 1000);
        assert_eq!(engine.chat_template, ChatTemplateChoice::Auto);
        assert_eq!(config.mode, Mode::Serve);
    }

    #[test]
    fn zero_slots_is_refused() {
        assert_eq!(
            parse(&["--slots", "0"]).unwrap_err().to_string(),
            "--slots must be at least 1"
        );
    }

    #[test]
    fn a_window_too_small_for_max_tokens_is_refused() {
        let err = parse(&["--ctx-size", "512", "--max-tokens", "1000"]).unwrap_err();
        assert!(
            matches!(err, ConfigError::ContextTooSmall { limit: 384, .. }),
            "{err}"
        );
    }

    #[test]
    fn sampling_ranges_are_checked() {
        assert!(parse(&["--top-p", "0"]).is_err());
        assert!(parse(&["--top-p", "1.5"]).is_err());
        assert!(parse(&["--temperature", "-1"]).is_err());
        assert!(parse(&["--temperature", "0"]).is_ok());
        assert!(parse(&["--min-p", "1.5"]).is_err());
        assert!(parse(&["--min-p", "-0.1"]).is_err());
        assert!(parse(&["--repeat-penalty", "0"]).is_err());
        assert!(parse(&["--repeat-penalty", "3"]).is_err());
        let config = parse(&["--top-k", "1", "--min-p", "0", "--repeat-penalty", "1.1"]).unwrap();
        assert_eq!(config.generate.top_k, 1);
        assert_eq!(config.generate.min_p, 0.0);
        assert_eq!(config.generate.repeat_penalty, 1.1);
        let defaults = parse(&[]).unwrap().generate;
        assert_eq!(
            (defaults.top_k, defaults.min_p),
            (40, 0.05),
            "llama-server's"
        );
    }

    #[test]
    fn slots_must_fit_a_batch() {
        // Regression (issue 7, item 7): more slots than a batch holds made every batch fail.
        let err = parse(&["--slots", "8", "--batch-size", "4", "--prefill-chunk", "4"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--slots 8 is larger than --batch-size 4"),
            "{err}"
        );
        assert!(parse(&["--slots", "4", "--batch-size", "4", "--prefill-chunk", "4"]).is_ok());
    }

    #[test]
    fn prefill_chunk_must_fit_a_batch() {
        assert!(parse(&["--batch-size", "64", "--prefill-chunk", "128"]).is_err());
    }

    #[test]
    fn kv_cache_flags_are_checked_against_each_other() {
        let defaults = parse(&[]).unwrap().engine.unwrap();
        assert_eq!(defaults.kv, KvCacheSettings::default());
        assert_eq!(defaults.kv.flash_attn(), None, "auto: decided by the model");
        assert_eq!(defaults.step_target, Some(Duration::from_millis(500)));
        let err = parse(&["--cache-type-v", "q8_0", "--flash-attn", "off"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("--cache-type-v q8_0 is quantized, which needs flash attention"),
            "{err}"
        );
        let q8 = parse(&["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"])
            .unwrap()
            .engine
            .unwrap()
            .kv;
        assert_eq!(
            q8.flash_attn(),
            Some(true),
            "auto turns it on for a quantized V"
        );
        assert_eq!(
            (q8.type_k(), q8.type_v()),
            (CacheType::Q8_0, CacheType::Q8_0)
        );
        let k_only = parse(&["--cache-type-k", "q5_1", "--flash-attn", "off"]).unwrap();
        assert_eq!(k_only.engine.unwrap().kv.flash_attn(), Some(false));
        assert_eq!(
            parse(&["--flash-attn", "on"])
                .unwrap()
                .engine
                .unwrap()
                .kv
                .flash_attn(),
            Some(true)
        );
        // Unknown values are clap's errors, listing the possible ones.
        let unknown = Args::try_parse_from(["mistral-bot", "-m", "x", "--cache-type-k", "q4_0"])
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("q8_0"), "{unknown}");
        assert!(Args::try_parse_from(["mistral-bot", "-m", "x", "--flash-attn", "yes"]).is_err());
    }

    #[test]
    fn repack_is_on_unless_turned_off() {
        assert!(parse(&[]).unwrap().engine.unwrap().repack);
        for off in ["off", "false", "no", "0"] {
            assert!(!parse(&["--repack", off]).unwrap().engine.unwrap().repack);
        }
        assert!(parse(&["--repack", "on"]).unwrap().engine.unwrap().repack);
        assert!(Args::try_parse_from(["mistral-bot", "-m", "x", "--repack", "maybe"]).is_err());
    }

    #[test]
    fn step_target_and_local_max_wait_zero_mean_off() {
        let defaults = parse(&[]).unwrap().engine.unwrap();
        assert_eq!(defaults.prompt_step, None, "auto");
        let config = parse(&["--prompt-step-ms", "2500"]).unwrap();
        assert_eq!(
            config.engine.unwrap().prompt_step,
            Some(Duration::from_millis(2500))
        );
        let config = parse(&["--step-target-ms", "0", "--local-max-wait", "0"]).unwrap();
        assert_eq!(config.engine.as_ref().unwrap().step_target, None);
        assert_eq!(config.providers.local_max_wait, None);
        let config = parse(&["--local-max-wait", "7.5"]).unwrap();
        assert_eq!(
            config.providers.local_max_wait,
            Some(Duration::from_millis(7500))
        );
        assert_eq!(
            parse(&[]).unwrap().providers.local_max_wait,
            Some(Duration::from_secs(20))
        );
        assert!(parse(&["--local-max-wait", "nan"]).is_err());
    }

    #[test]
    fn modes_and_templates() {
        assert_eq!(
            parse(&["--prompt", "hi"]).unwrap().mode,
            Mode::Prompt("hi".into())
        );
        assert_eq!(parse(&["--console"]).unwrap().mode, Mode::Console);
        assert!(
            Args::try_parse_from(["mistral-bot", "-m", "x", "--console", "--prompt", "a"]).is_err()
        );
        assert_eq!(
            parse(&["--chat-template", "chatml"])
                .unwrap()
                .engine
                .unwrap()
                .chat_template,
            ChatTemplateChoice::Named("chatml".into())
        );
        assert_eq!(
            parse(&["--chat-template", "mistral"])
                .unwrap()
                .engine
                .unwrap()
                .chat_template,
            ChatTemplateChoice::Mistral
        );
    }

    #[test]
    fn chain_is_parsed_and_checked() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.providers.chain,
            [
                ProviderKind::Local,
                ProviderKind::Groq,
                ProviderKind::Mistral,
                ProviderKind::Gemini
            ]
        );
        assert_eq!(
            parse(&["--chain", "groq, openai"]).unwrap().providers.chain,
            [ProviderKind::Groq, ProviderKind::OpenAi]
        );
        assert!(parse(&["--chain", "groq,grok"]).is_err());
        assert!(parse(&["--chain", "groq,groq"]).is_err());
        assert!(parse(&["--chain", ""]).is_err());
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let config = parse(&["--groq-api-key", "gsk_topsecret", "--api-key", "hunter2"]).unwrap();
        let args = Args::try_parse_from([
            "mistral-bot",
            "-m",
            "m.gguf",
            "--gemini-api-key",
            "AIza-topsecret",
        ])
        .unwrap();
        assert!(!format!("{args:?}").contains("AIza-topsecret"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("gsk_topsecret"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert_eq!(
            config.providers.groq.api_key.as_ref().map(Secret::expose),
            Some("gsk_topsecret")
        );
        assert_eq!(Secret::new("x").to_string(), "***");
    }

    #[test]
    fn providers_without_keys_are_unconfigured() {
        let config = parse(&["--groq-api-key", " "]).unwrap();
        assert!(!config.providers.groq.is_configured());
        let config = parse(&["--openai-base-url", "http://127.0.0.1:9/v1"]).unwrap();
        assert!(
            config.providers.openai.is_configured(),
            "a self-hosted server needs no key"
        );
    }

    #[test]
    fn timeouts_must_be_positive() {
        assert!(parse(&["--groq-timeout", "0"]).is_err());
        assert_eq!(
            parse(&["--groq-timeout", "0.25"])
                .unwrap()
                .providers
                .groq
                .timeout,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn non_loopback_http_needs_a_key() {
        assert!(matches!(
            parse(&["--http-addr", "0.0.0.0:8000"]).unwrap_err(),
            ConfigError::OpenWithoutKey { .. }
        ));
        assert!(parse(&["--http-addr", "0.0.0.0:8000", "--api-key", "k"]).is_ok());
        assert!(parse(&["--http-addr", "[::1]:8000"]).is_ok());
    }

    #[test]
    fn telegram_settings() {
        assert!(parse(&[]).unwrap().telegram.is_none());
        let config = parse(&[
            "--telegram-token",
            "123:secret-token",
            "--telegram-api-url",
            "http://127.0.0.1:9/",
            "--allowed-users",
            "42,@Alice, bob",
        ])
        .unwrap();
        let telegram = config.telegram.expect("a token gives a bot");
        assert_eq!(telegram.token.expose(), "123:secret-token");
        assert_eq!(
            telegram.allowed_users,
            vec![
                AllowedUser::Id(42),
                AllowedUser::Username("alice".into()),
                AllowedUser::Username("bob".into())
            ]
        );
        assert!(
            parse(&["--telegram-token", "t", "--allowed-users", "a-b"]).is_err(),
            "a name with a dash is no username"
        );
        assert!(parse(&["--telegram-token", "t", "--telegram-api-url", "ftp://x"]).is_err());
        let telegram = parse(&["--telegram-token", "t"]).unwrap().telegram.unwrap();
        assert_eq!(
            telegram.policy.streaming,
            crate::chat_policy::Streaming::Draft
        );
        assert!(!telegram.policy.limits.any(), "no limits by default");
        let telegram = parse(&[
            "--telegram-token",
            "t",
            "--telegram-streaming",
            "edit",
            "--admin-users",
            "7,@Boss",
            "--user-messages-per-hour",
            "20",
            "--user-tokens-per-day",
            "50000",
        ])
        .unwrap()
        .telegram
        .unwrap();
        assert_eq!(
            telegram.policy.streaming,
            crate::chat_policy::Streaming::Edit
        );
        assert_eq!(
            telegram.policy.admins,
            [AllowedUser::Id(7), AllowedUser::Username("boss".into())]
        );
        assert_eq!(telegram.policy.limits.messages_per_hour, 20);
        assert_eq!(telegram.policy.limits.tokens_per_day, 50_000);
        assert!(parse(&["--telegram-token", "t", "--admin-users", "a b"]).is_err());
        assert!(matches!(
            parse(&["--modes-file", "/nonexistent/modes.toml"]),
            Err(ConfigError::Modes(_))
        ));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let config = parse(&["--telegram-token", "123:secret-token"]).unwrap();
        let shown = format!("{config:?} {}", config.telegram.as_ref().unwrap().token);
        assert!(!shown.contains("secret-token"), "{shown}");
    }

    #[test]
    fn history_limits_are_parsed_and_checked() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.history.max_turns.get(), 100);
        assert_eq!(config.history.max_age, Duration::from_secs(30 * 24 * 3600));
        let config = parse(&["--history-max-turns", "8", "--history-max-age", "12h"]).unwrap();
        assert_eq!(config.history.max_turns.get(), 8);
        assert_eq!(config.history.max_age, Duration::from_secs(12 * 3600));
        assert!(matches!(
            parse(&["--history-max-turns", "0"]).unwrap_err(),
            ConfigError::HistoryTurns
        ));
        assert!(parse(&["--history-max-turns", "100001"]).is_err());
        for bad in ["", "30", "d", "1.5h", "30 days", "59s", "40000000d", "1w"] {
            let err = parse(&["--history-max-age", bad]).unwrap_err();
            assert!(
                err.to_string().contains("--history-max-age"),
                "{bad}: {err}"
            );
        }
        // (clap takes `-1d` for a flag; the parser refuses it too.)
        assert!(parse_history_age("-1d").is_err());
        assert_eq!(
            parse_history_age(" 90 m ").unwrap(),
            Duration::from_secs(5400)
        );
    }

    proptest::proptest! {
        /// Any text: an age in range or an error naming the flag, never a panic; a number
        /// with a unit is exactly that many seconds.
        #[test]
        fn history_age_parser_never_panics_and_is_exact(
            text in "\\PC{0,12}",
            number in 0u64..100_000,
            unit in proptest::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400)]),
        ) {
            if let Ok(age) = parse_history_age(&text) {
                proptest::prop_assert!((MIN_HISTORY_AGE..=MAX_HISTORY_AGE).contains(&age));
            }
            let expected = Duration::from_secs(number * unit.1);
            match parse_history_age(&format!("{number}{}", unit.0)) {
                Ok(age) => proptest::prop_assert_eq!(age, expected),
                Err(_) => proptest::prop_assert!(!(MIN_HISTORY_AGE..=MAX_HISTORY_AGE).contains(&expected)),
            }
        }
    }

    fn parse_without_model(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["mistral-bot"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).expect("clap accepts the flags"))
    }

    #[test]
    fn the_model_is_needed_only_by_the_local_provider() {
        let err = parse_without_model(&[]).unwrap_err();
        assert_eq!(err, ConfigError::NoModel);
        let text = err.to_string();
        assert!(
            text.contains("--model") && text.contains("--chain"),
            "{text}"
        );
        let front = parse_without_model(&["--chain", "openai,groq"]).unwrap();
        assert!(front.engine.is_none());
        assert_eq!(front.mode, Mode::Serve);
        assert!(matches!(
            parse_without_model(&["--chain", "groq", "--prompt", "hi"]).unwrap_err(),
            ConfigError::NoModelFor { flag: "prompt" }
        ));
        assert!(parse_without_model(&["--chain", "groq", "--console"]).is_err());
        // A model beside a cloud-only chain still loads (for /stats and the dashboard).
        assert!(parse(&["--chain", "groq"]).unwrap().engine.is_some());
    }

    #[test]
    fn budgets_are_optional_and_positive() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.providers.budgets, ProviderBudgets::default());
        assert_eq!(
            config.providers.state_dir.as_deref(),
            Some(std::path::Path::new("data"))
        );
        let config = parse(&[
            "--groq-daily-tokens",
            "500000",
            "--mistral-monthly-tokens",
            "2000000",
            "--gemini-daily-requests",
            "250",
            "--openai-daily-tokens",
            "1000",
        ])
        .unwrap();
        let b = config.providers.budgets;
        assert_eq!(
            b.mistral,
            Some(Budget {
                limit: 2_000_000,
                unit: BudgetUnit::Tokens,
                window: BudgetWindow::Month
            })
        );
        assert_eq!(
            b.gemini.map(|g| (g.limit, g.unit)),
            Some((250, BudgetUnit::Requests))
        );
        assert_eq!(b.groq.map(|g| g.window), Some(BudgetWindow::Day));
        assert_eq!(b.openai.map(|g| g.limit), Some(1000));
        assert!(matches!(
            parse(&["--groq-daily-tokens", "0"]).unwrap_err(),
            ConfigError::Zero {
                flag: "groq-daily-tokens"
            }
        ));
        assert_eq!(parse(&["--console"]).unwrap().providers.state_dir, None);
    }

    #[test]
    fn openai_base_urls_make_a_fleet() {
        let one = parse(&["--openai-base-url", "http://a:8080/v1"]).unwrap();
        assert_eq!(one.providers.openai_fleet.len(), 1);
        assert_eq!(one.providers.openai.base_url.as_str(), "http://a:8080/v1");
        let listed = parse(&["--openai-base-url", "http://a:8080/v1, http://b:8080/v1,"]).unwrap();
        let repeated = parse(&[
            "--openai-base-url",
            "http://a:8080/v1",
            "--openai-base-url",
            "http://b:8080/v1",
        ])
        .unwrap();
        for config in [listed, repeated] {
            let urls: Vec<&str> = config
                .providers
                .openai_fleet
                .iter()
                .map(Url::as_str)
                .collect();
            assert_eq!(urls, ["http://a:8080/v1", "http://b:8080/v1"]);
            assert!(
                config.providers.openai.is_configured(),
                "a fleet needs no key"
            );
        }
        assert!(parse(&[]).unwrap().providers.openai_fleet.is_empty());
        assert!(matches!(
            parse(&["--openai-base-url", "http://a/v1,http://a/v1/"]).unwrap_err(),
            ConfigError::DuplicateBaseUrl { .. }
        ));
        for bad in ["a:8080", "ftp://a/v1", "http://"] {
            assert!(
                matches!(
                    parse(&["--openai-base-url", bad]).unwrap_err(),
                    ConfigError::BadBaseUrl { .. }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn blank_system_prompt_is_none() {
        assert_eq!(
            parse(&["--system-prompt", "  "]).unwrap().system_prompt,
            None
        );
    }
}
