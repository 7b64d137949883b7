//! The owner's chat policy flags for the Telegram bot — how answers stream
//! (`--telegram-streaming`), the personas menu (`--modes-file`), who administers the bot
//! (`--admin-users`) and the per-user fair-use limits (`--user-messages-per-hour`,
//! `--user-tokens-per-day`) — parsed by clap and validated once into [`ChatPolicy`].
//!
//! A leaf beside `config` (which flattens [`ChatPolicyArgs`] into its `Args`).

use std::path::PathBuf;

use crate::config::{AllowedUser, ConfigError};
use crate::usage::UserLimits;

/// How an answer is shown while it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Streaming {
    /// `sendMessageDraft` in private chats (an animated draft, then the message); edits in
    /// groups; edits in a chat whose Bot API server lacks drafts.
    #[default]
    Draft,
    /// One message, edited as the answer grows (every chat).
    Edit,
    /// "typing…" until the answer is complete, then the message.
    Off,
}

/// The chat policy flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatPolicyArgs {
    /// How answers stream in Telegram: `draft` (native drafts in private chats, edits in
    /// groups), `edit` (one message edited as it grows), `off` (the whole answer at once).
    #[arg(
        long,
        env = "MISTRAL_BOT_TELEGRAM_STREAMING",
        value_enum,
        default_value = "draft"
    )]
    pub telegram_streaming: Streaming,

    /// A TOML or YAML file of extra `/mode` personas: `[[mode]]` tables with `id`, `name`,
    /// `prompt` (and optional `name_ru`, `prompt_ru`).
    #[arg(long, env = "MISTRAL_BOT_MODES_FILE", value_name = "PATH")]
    pub modes_file: Option<PathBuf>,

    /// Bot admins (Telegram user ids and/or @usernames, comma-separated): exempt from the
    /// per-user limits; may use `/stats all`, `/allow @user` and `/deny @user`.
    #[arg(
        long,
        env = "MISTRAL_BOT_ADMIN_USERS",
        value_delimiter = ',',
        value_name = "ID|@NAME,..."
    )]
    pub admin_users: Vec<String>,

    /// Messages one user may send per sliding hour, across all chats (0: unlimited).
    #[arg(
        long,
        env = "MISTRAL_BOT_USER_MESSAGES_PER_HOUR",
        default_value_t = 0,
        value_name = "N"
    )]
    pub user_messages_per_hour: u32,

    /// Tokens (prompt + completion, every provider) one user's answers may cost per sliding
    /// day, across all chats (0: unlimited).
    #[arg(
        long,
        env = "MISTRAL_BOT_USER_TOKENS_PER_DAY",
        default_value_t = 0,
        value_name = "N"
    )]
    pub user_tokens_per_day: u64,
}

/// The validated chat policy.
#[derive(Debug, Clone, Default)]
pub struct ChatPolicy {
    /// How answers stream.
    pub streaming: Streaming,
    /// The owner's modes file, if any (read by [`crate::persona::Catalog::with_file`]).
    pub modes_file: Option<PathBuf>,
    /// The admins.
    pub admins: Vec<AllowedUser>,
    /// The per-user limits.
    pub limits: UserLimits,
}

impl TryFrom<ChatPolicyArgs> for ChatPolicy {
    type Error = ConfigError;

    fn try_from(args: ChatPolicyArgs) -> Result<Self, ConfigError> {
        let mut admins = Vec::new();
        for entry in &args.admin_users {
            admins.extend(AllowedUser::parse(entry)?);
        }
        Ok(Self {
            streaming: args.telegram_streaming,
            modes_file: args.modes_file.filter(|p| !p.as_os_str().is_empty()),
            admins,
            limits: UserLimits {
                messages_per_hour: args.user_messages_per_hour,
                tokens_per_day: args.user_tokens_per_day,
            },
        })
    }
}
