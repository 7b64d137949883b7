//! Flags of Telegram's webhook mode (`--telegram-webhook-url`,
//! `--telegram-webhook-max-connections`) and the one check of a webhook URL, shared by
//! the start-up validation and `doctor`.
//!
//! Telegram delivers webhooks over HTTPS only, to ports 443, 80, 88 and 8443
//! (<https://core.telegram.org/bots/api#setwebhook>). The bot itself serves plain HTTP
//! on `--http-addr`: a reverse proxy terminates TLS on one of those ports and forwards
//! the URL's path unchanged. The one exception is a self-hosted Bot API server on this
//! machine (`telegram-bot-api --local` accepts http, any port and local addresses): when
//! `--telegram-api-url` is a loopback URL, a loopback webhook URL may be http on any
//! port. Telegram's own servers can never reach a loopback address, so this cannot
//! weaken a deployment that talks to them.

use std::net::IpAddr;

use url::Url;

/// The ports Telegram delivers webhooks to.
pub const WEBHOOK_PORTS: [u16; 4] = [443, 80, 88, 8443];
/// Telegram's default and range of `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u8 = 40;
/// Paths the HTTP API serves itself: a webhook path must not be one of them (nor under
/// one).
pub const RESERVED_PATHS: [&str; 8] = [
    "/v1",
    "/chat/completions",
    "/models",
    "/health",
    "/ready",
    "/metrics",
    "/dialogue_metrics",
    "/dashboard",
];

/// Flags of webhook mode.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Receive Telegram updates by webhook instead of long polling: the public HTTPS URL
    /// Telegram posts them to, e.g. https://bot.example.org/telegram/<random path>, on port
    /// 443, 80, 88 or 8443. A reverse proxy terminates TLS there and forwards the path
    /// unchanged to the bot's HTTP API (--http-addr), which serves it. Without it: long
    /// polling (and any webhook left set is deleted).
    #[arg(long, env = "TELEGRAM_WEBHOOK_URL", value_name = "URL")]
    pub telegram_webhook_url: Option<String>,

    /// Most connections Telegram opens at once to deliver updates to the webhook (1-100).
    #[arg(
        long,
        env = "TELEGRAM_WEBHOOK_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS
    )]
    pub telegram_webhook_max_connections: u8,
}

/// Webhook mode, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The URL Telegram posts updates to.
    pub url: Url,
    /// Telegram's `max_connections`, 1-100.
    pub max_connections: u8,
}

impl WebhookConfig {
    /// The path the HTTP API serves the webhook on (the URL's path, as a proxy forwards
    /// it).
    pub fn path(&self) -> &str {
        self.url.path()
    }
}

/// Why webhook mode cannot start as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// Not a URL at all.
    #[error("--telegram-webhook-url `{url}` is not a valid URL")]
    NotAUrl {
        /// The value given.
        url: String,
    },
    /// Not https (and not the loopback exception).
    #[error(
        "--telegram-webhook-url `{url}` must be https://: Telegram sends webhooks over HTTPS \
         only (terminate TLS in a reverse proxy in front of --http-addr)"
    )]
    NotHttps {
        /// The value given.
        url: String,
    },
    /// A port Telegram does not deliver to.
    #[error(
        "--telegram-webhook-url port {port} is not one Telegram delivers to: use 443, 80, 88 \
         or 8443 on the reverse proxy (the bot's own --http-addr port may differ)"
    )]
    BadPort {
        /// The port given.
        port: u16,
    },
    /// A path the bot cannot serve: none, one of its own routes, or odd characters.
    #[error(
        "--telegram-webhook-url path `{path}` cannot be served: give a path of its own made \
         of letters, digits and - . _ ~ / (e.g. /telegram/<random>), not / nor one of the \
         HTTP API's routes (/v1, /health, /ready, /metrics, /dashboard, …)"
    )]
    BadPath {
        /// The path given.
        path: String,
    },
    /// A query or fragment, which the route would ignore.
    #[error("--telegram-webhook-url `{url}` must not have a query or a fragment")]
    QueryOrFragment {
        /// The value given.
        url: String,
    },
    /// `max_connections` out of Telegram's range.
    #[error("--telegram-webhook-max-connections {value} must be 1 to 100 (Telegram's range)")]
    MaxConnections {
        /// The value given.
        value: u8,
    },
    /// A webhook without a bot.
    #[error(
        "--telegram-webhook-url needs a Telegram bot: set --telegram-token (TELEGRAM_BOT_TOKEN)"
    )]
    NoBot,
    /// A mode that does not start the HTTP API, which serves the webhook.
    #[error(
        "--telegram-webhook-url needs the HTTP API (--http-addr), which --{flag} does not \
         start: drop one of the two"
    )]
    NoHttpServer {
        /// `console` or `prompt`.
        flag: &'static str,
    },
}

/// Whether `url`'s host is this machine.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Checks a webhook URL as Telegram would take it; `api_url` is `--telegram-api-url`
/// (`None`: Telegram's own servers).
pub fn check_url(raw: &str, api_url: Option<&Url>) -> Result<Url, WebhookError> {
    let raw = raw.trim();
    let url = Url::parse(raw).map_err(|_| WebhookError::NotAUrl { url: raw.into() })?;
    if url.host_str().is_none_or(str::is_empty) || url.cannot_be_a_base() {
        return Err(WebhookError::NotAUrl { url: raw.into() });
    }
    let local = api_url.is_some_and(is_loopback) && is_loopback(&url);
    match url.scheme() {
        "https" => {}
        "http" if local => {}
        _ => return Err(WebhookError::NotHttps { url: raw.into() }),
    }
    if let Some(port) = url.port_or_known_default()
        && !local
        && !WEBHOOK_PORTS.contains(&port)
    {
        return Err(WebhookError::BadPort { port });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(WebhookError::QueryOrFragment { url: raw.into() });
    }
    let path = url.path();
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~/%".contains(c);
    let reserved = RESERVED_PATHS.iter().any(|r| {
        path == *r
            || path
                .strip_prefix(r)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if path.len() < 2 || !path.chars().all(allowed) || reserved {
        return Err(WebhookError::BadPath { path: path.into() });
    }
    Ok(url)
}

impl WebhookConfig {
    /// Webhook mode as `args` ask (`None`: long polling).
    pub fn from_args(
        args: &WebhookArgs,
        api_url: Option<&Url>,
    ) -> Result<Option<Self>, WebhookError> {
        let Some(raw) = args
            .telegram_webhook_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            return Ok(None);
        };
        let url = check_url(raw, api_url)?;
        let max_connections = args.telegram_webhook_max_connections;
        if !(1..=100).contains(&max_connections) {
            return Err(WebhookError::MaxConnections {
                value: max_connections,
            });
        }
        Ok(Some(Self {
            url,
            max_connections,
        }))
    }
}

/// Refuses a webhook URL where nothing would serve it: no bot (no token), or a mode
/// without the HTTP API (`--console`, `--prompt`).
pub(super) fn needs_a_server(
    args: &WebhookArgs,
    has_bot: bool,
    mode: &super::Mode,
) -> Result<(), WebhookError> {
    if args
        .telegram_webhook_url
        .as_deref()
        .is_none_or(|u| u.trim().is_empty())
    {
        return Ok(());
    }
    match mode {
        super::Mode::Console => Err(WebhookError::NoHttpServer { flag: "console" }),
        super::Mode::Prompt(_) => Err(WebhookError::NoHttpServer { flag: "prompt" }),
        super::Mode::Serve if !has_bot => Err(WebhookError::NoBot),
        super::Mode::Serve => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(raw: &str) -> Result<Url, WebhookError> {
        check_url(raw, None)
    }

    #[test]
    fn telegram_takes_https_on_four_ports() {
        for ok in [
            "https://bot.example.org/telegram/s3cret",
            "https://bot.example.org:443/telegram/s3cret",
            "https://bot.example.org:80/t",
            "https://bot.example.org:88/t",
            "https://bot.example.org:8443/t-x_y.z~%20",
            "https://203.0.113.7/t",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            check("http://bot.example.org/t").unwrap_err(),
            WebhookError::NotHttps {
                url: "http://bot.example.org/t".into()
            }
        );
        assert_eq!(
            check("https://bot.example.org:8080/t").unwrap_err(),
            WebhookError::BadPort { port: 8080 }
        );
        for bad_path in [
            "https://bot.example.org",
            "https://bot.example.org/",
            "https://bot.example.org/health",
            "https://bot.example.org/v1/chat/completions",
            "https://bot.example.org/dashboard/data",
            "https://bot.example.org/a:b",
            "https://bot.example.org/a*b",
        ] {
            assert!(
                matches!(check(bad_path), Err(WebhookError::BadPath { .. })),
                "{bad_path}: {:?}",
                check(bad_path)
            );
        }
        assert!(check("https://bot.example.org/v1x").is_ok());
        assert!(matches!(
            check("https://bot.example.org/t?a=1"),
            Err(WebhookError::QueryOrFragment { .. })
        ));
        for junk in ["", "bot.example.org/t", "https://", "mailto:a@b.c"] {
            assert!(check(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn loopback_http_only_with_a_bot_api_server_on_loopback() {
        let local_api = Url::parse("http://127.0.0.1:8081").unwrap();
        let remote_api = Url::parse("https://api.telegram.org").unwrap();
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://localhost:1/hook",
            "http://[::1]:5/h",
        ] {
            assert!(check_url(url, Some(&local_api)).is_ok(), "{url}");
            assert!(check_url(url, Some(&remote_api)).is_err(), "{url}");
            assert!(check_url(url, None).is_err(), "{url}");
        }
        // A public host stays under the production rules whatever the Bot API server.
        assert!(check_url("http://bot.example.org/hook", Some(&local_api)).is_err());
        assert!(check_url("https://bot.example.org:8080/hook", Some(&local_api)).is_err());
    }

    #[test]
    fn flags_make_a_config() {
        let args = |url: Option<&str>, max| WebhookArgs {
            telegram_webhook_url: url.map(str::to_string),
            telegram_webhook_max_connections: max,
        };
        assert_eq!(WebhookConfig::from_args(&args(None, 40), None), Ok(None));
        assert_eq!(
            WebhookConfig::from_args(&args(Some(" "), 40), None),
            Ok(None)
        );
        let config = WebhookConfig::from_args(&args(Some("https://b.example/tg/x"), 40), None)
            .unwrap()
            .unwrap();
        assert_eq!(config.path(), "/tg/x");
        assert_eq!(config.max_connections, 40);
        for max in [0, 101, 255] {
            assert_eq!(
                WebhookConfig::from_args(&args(Some("https://b.example/x"), max), None),
                Err(WebhookError::MaxConnections { value: max })
            );
        }
    }

    #[test]
    fn a_webhook_needs_a_bot_and_the_http_api() {
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["mistral-bot", "--model", "m.gguf"];
            argv.extend_from_slice(extra);
            crate::config::Config::try_from(crate::config::Args::try_parse_from(argv).unwrap())
        };
        let url = "https://bot.example.org/tg/hook";
        let config = parse(&["--telegram-token", "1:t", "--telegram-webhook-url", url]).unwrap();
        let webhook = config.telegram.unwrap().webhook.unwrap();
        assert_eq!(webhook.url.as_str(), url);
        assert_eq!(webhook.max_connections, DEFAULT_MAX_CONNECTIONS);
        let no_bot = parse(&["--telegram-webhook-url", url]).unwrap_err();
        assert!(no_bot.to_string().contains("--telegram-token"), "{no_bot}");
        for (mode, flag) in [
            (&["--console"][..], "--console"),
            (&["--prompt", "hi"], "--prompt"),
        ] {
            let mut extra = vec!["--telegram-token", "1:t", "--telegram-webhook-url", url];
            extra.extend_from_slice(mode);
            let e = parse(&extra).unwrap_err().to_string();
            assert!(
                e.contains("--telegram-webhook-url") && e.contains(flag),
                "{e}"
            );
        }
        let e = parse(&[
            "--telegram-token",
            "1:t",
            "--telegram-webhook-url",
            "http://bot.example.org/tg/hook",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
    }

    proptest! {
        /// Whatever the text, the check never panics, and what it accepts is https on a
        /// port Telegram delivers to, with a path the HTTP API can route.
        #[test]
        fn accepted_urls_are_what_telegram_takes(raw in "\\PC{0,60}") {
            if let Ok(url) = check(&raw) {
                prop_assert_eq!(url.scheme(), "https");
                prop_assert!(WEBHOOK_PORTS.contains(&url.port_or_known_default().unwrap()));
                prop_assert!(url.path().len() > 1);
            }
        }

        /// Over schemes, ports and paths: accepted exactly when https, one of the four
        /// ports, and a path of its own.
        #[test]
        fn scheme_and_port_decide(
            https in any::<bool>(),
            port in any::<u16>(),
            path in "(/[a-zA-Z0-9_~-][a-zA-Z0-9._~-]{0,11}){1,3}",
        ) {
            let scheme = if https { "https" } else { "http" };
            let raw = format!("{scheme}://bot.example.org:{port}{path}");
            let reserved = RESERVED_PATHS.iter().any(|r| path == *r || path.starts_with(&format!("{r}/")));
            let effective = url::Url::parse(&raw).unwrap().port_or_known_default().unwrap();
            let expected = https && WEBHOOK_PORTS.contains(&effective) && !reserved;
            prop_assert_eq!(check(&raw).is_ok(), expected, "{}", raw);
        }
    }
}
