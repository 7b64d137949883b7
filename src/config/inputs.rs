//! Flags of what the Telegram bot reads besides typed text: speech to text for voice
//! notes (`--stt-*`, `--voice-max-seconds`) and files (`--document-max-bytes`).

use std::time::Duration;

use url::Url;

use super::{ConfigError, Secret, parse_secret, seconds, secret};

/// Groq's OpenAI-compatible base URL, the speech-to-text default when `GROQ_API_KEY` is
/// set and no `--stt-base-url` is given.
pub const GROQ_STT_BASE_URL: &str = "https://api.groq.com/openai/v1";
/// The default transcription model: Groq's `whisper-large-v3-turbo` (multilingual,
/// transcription only, the cheapest and fastest of its Whisper models; see
/// <https://console.groq.com/docs/speech-to-text>).
pub const DEFAULT_STT_MODEL: &str = "whisper-large-v3-turbo";

/// Flags of voice notes and files.
#[derive(Debug, Clone, clap::Args)]
pub struct InputArgs {
    /// Speech-to-text for voice notes, audio and video notes: the base URL of an
    /// OpenAI-compatible API (`POST {base}/audio/transcriptions`), e.g.
    /// https://api.groq.com/openai/v1 or a self-hosted speaches server at
    /// http://127.0.0.1:8001/v1. Default: Groq when GROQ_API_KEY is set, else none (voice
    /// notes then get a reply saying so).
    #[arg(long, env = "STT_BASE_URL", value_name = "URL")]
    pub stt_base_url: Option<String>,

    /// The transcription model.
    #[arg(long, env = "STT_MODEL", default_value = DEFAULT_STT_MODEL)]
    pub stt_model: String,

    /// Bearer key of the speech-to-text API (default with Groq: GROQ_API_KEY).
    #[arg(
        long,
        env = "STT_API_KEY",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub stt_api_key: Option<Secret>,

    /// Seconds one transcription may take.
    #[arg(long, env = "STT_TIMEOUT", default_value_t = 60.0)]
    pub stt_timeout: f64,

    /// Longest voice note (or audio, or video note) transcribed, in seconds: bounds the
    /// cost of one message.
    #[arg(long, env = "MISTRAL_BOT_VOICE_MAX_SECONDS", default_value_t = 300)]
    pub voice_max_seconds: u32,

    /// Largest file read as text, in bytes (then cut to what fits the context window).
    #[arg(long, env = "MISTRAL_BOT_DOCUMENT_MAX_BYTES", default_value_t = 1 << 20)]
    pub document_max_bytes: u64,
}

/// A speech-to-text service.
#[derive(Debug, Clone)]
pub struct SttConfig {
    /// The API's base URL (`…/v1`).
    pub base_url: Url,
    /// Its key; `None` for a server that needs none.
    pub api_key: Option<Secret>,
    /// The model.
    pub model: String,
    /// Time allowed for one transcription.
    pub timeout: Duration,
}

/// What the bot reads besides typed text.
#[derive(Debug, Clone)]
pub struct InputConfig {
    /// Speech to text; `None` when not configured.
    pub stt: Option<SttConfig>,
    /// Longest audio transcribed, in seconds.
    pub voice_max_seconds: u32,
    /// Largest file read, in bytes.
    pub document_max_bytes: u64,
}

/// The largest `--document-max-bytes`: what bots may download from Telegram.
pub const MAX_DOCUMENT_BYTES: u64 = 20 * 1024 * 1024;

impl InputConfig {
    /// Validates `args`; `groq` is Groq's key and base URL, the speech-to-text default.
    pub fn from_args(args: InputArgs, groq: (Option<&Secret>, &Url)) -> Result<Self, ConfigError> {
        let timeout = seconds(args.stt_timeout, "stt-timeout")?;
        let model = args.stt_model.trim().to_string();
        if model.is_empty() {
            return Err(ConfigError::EmptyModel { flag: "stt-model" });
        }
        let explicit = args.stt_base_url.filter(|u| !u.trim().is_empty());
        let stt = match (explicit, groq.0) {
            (Some(raw), _) => match Url::parse(raw.trim()) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Some(SttConfig {
                    base_url: url,
                    api_key: secret(args.stt_api_key),
                    model,
                    timeout,
                }),
                _ => return Err(ConfigError::BadSttUrl { url: raw }),
            },
            (None, Some(groq_key)) => Some(SttConfig {
                base_url: groq.1.clone(),
                api_key: secret(args.stt_api_key).or_else(|| Some(groq_key.clone())),
                model,
                timeout,
            }),
            (None, None) => None,
        };
        if args.voice_max_seconds == 0 {
            return Err(ConfigError::Zero {
                flag: "voice-max-seconds",
            });
        }
        if !(1..=MAX_DOCUMENT_BYTES).contains(&args.document_max_bytes) {
            return Err(ConfigError::DocumentMaxBytes {
                value: args.document_max_bytes,
            });
        }
        Ok(Self {
            stt,
            voice_max_seconds: args.voice_max_seconds,
            document_max_bytes: args.document_max_bytes,
        })
    }

    /// The speech-to-text key, for the log writer to cut out.
    pub fn secret(&self) -> Option<&str> {
        self.stt
            .as_ref()
            .and_then(|s| s.api_key.as_ref())
            .map(Secret::expose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        inputs: InputArgs,
    }

    fn parse(argv: &[&str], groq_key: Option<&str>) -> Result<InputConfig, ConfigError> {
        let args = Wrap::parse_from(std::iter::once("x").chain(argv.iter().copied())).inputs;
        let key = groq_key.map(Secret::new);
        let groq_url = Url::parse(GROQ_STT_BASE_URL).unwrap();
        InputConfig::from_args(args, (key.as_ref(), &groq_url))
    }

    #[test]
    fn groq_is_the_default_only_when_its_key_is_set() {
        // These tests must not see the developer's environment.
        for var in ["STT_BASE_URL", "STT_API_KEY", "STT_MODEL"] {
            if std::env::var_os(var).is_some() {
                return;
            }
        }
        assert!(parse(&[], None).unwrap().stt.is_none());
        let groq = parse(&[], Some("gsk_x")).unwrap().stt.unwrap();
        assert_eq!(groq.base_url.as_str(), "https://api.groq.com/openai/v1");
        assert_eq!(groq.model, "whisper-large-v3-turbo");
        assert_eq!(groq.api_key.unwrap().expose(), "gsk_x");
        let own = parse(
            &[
                "--stt-base-url",
                "http://127.0.0.1:8001/v1",
                "--stt-model",
                "Systran/faster-whisper-small",
            ],
            Some("gsk_x"),
        )
        .unwrap()
        .stt
        .unwrap();
        assert_eq!(own.base_url.as_str(), "http://127.0.0.1:8001/v1");
        assert!(
            own.api_key.is_none(),
            "a self-hosted server gets no Groq key"
        );
        assert!(matches!(
            parse(&["--stt-base-url", "ftp://x"], None),
            Err(ConfigError::BadSttUrl { .. })
        ));
        assert!(parse(&["--stt-timeout", "0"], None).is_err());
        assert!(parse(&["--voice-max-seconds", "0"], None).is_err());
        assert!(parse(&["--document-max-bytes", "0"], None).is_err());
        assert!(parse(&["--document-max-bytes", "30000000"], None).is_err());
        assert_eq!(parse(&[], None).unwrap().document_max_bytes, 1 << 20);
    }
}
