//! Does each cloud provider of the chain answer? One cheap authenticated call per provider
//! (OpenAI-compatible `GET {base}/models`, Gemini `GET {base}/models/{model}`), all at once,
//! each with a short timeout: is the key accepted, does the configured model exist. Serve
//! mode logs the results at start-up ([`log_startup_check`]) while the engine loads;
//! `mistral-bot doctor` prints them. Keys travel only in headers and never appear in a
//! result (a provider's message that repeats the key is redacted).

use std::time::Duration;

use futures::future::join_all;
use reqwest::header;
use serde::Deserialize;

use super::ProviderError;
use super::cloud::{self, MAX_RESPONSE_BODY};
use super::openai::endpoint;
use crate::config::{CloudConfig, ProviderKind, ProvidersConfig};

/// How long one provider's check may take in all.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many model names a "model not found" result suggests.
const SUGGESTIONS: usize = 5;

/// What checking one provider found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The key was accepted and the model exists.
    Ready,
    /// The server answered but keeps no model list to check against (a self-hosted server,
    /// which may ignore the model name anyway).
    Unlisted,
    /// No API key is configured: the chain leaves the provider out.
    NoKey,
    /// The provider refused the key.
    KeyRejected {
        /// HTTP status (401, 403; Gemini says 400).
        status: u16,
        /// The provider's message, key redacted.
        detail: String,
    },
    /// The key works but the model does not exist for it.
    ModelMissing {
        /// Models the provider does offer, closest names first.
        suggestions: Vec<String>,
    },
    /// Rate limited while checking: the key is accepted, the model unchecked.
    RateLimited,
    /// The provider could not be reached, or did not answer within [`PROBE_TIMEOUT`].
    Unreachable {
        /// Why, without the URL.
        reason: String,
    },
    /// Any other answer.
    Unexpected {
        /// HTTP status, or 0 for a malformed answer.
        status: u16,
        /// What it said, key redacted.
        detail: String,
    },
}

/// How bad a result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Works.
    Ok,
    /// Works partly, or could not be checked.
    Warn,
    /// Cannot work as configured.
    Fail,
}

/// One provider's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Which provider.
    pub kind: ProviderKind,
    /// The model checked.
    pub model: String,
    /// Whether it is a self-hosted server (no key needed).
    pub self_hosted: bool,
    /// What was found.
    pub outcome: ProbeOutcome,
}

impl ProbeReport {
    /// How bad the result is.
    pub fn verdict(&self) -> Verdict {
        match self.outcome {
            ProbeOutcome::Ready => Verdict::Ok,
            ProbeOutcome::KeyRejected { .. } | ProbeOutcome::ModelMissing { .. } => Verdict::Fail,
            ProbeOutcome::Unlisted
            | ProbeOutcome::NoKey
            | ProbeOutcome::RateLimited
            | ProbeOutcome::Unreachable { .. }
            | ProbeOutcome::Unexpected { .. } => Verdict::Warn,
        }
    }

    /// One line saying what was found and, for a problem, the setting to change.
    pub fn summary(&self) -> String {
        let kind = self.kind;
        let model = &self.model;
        match &self.outcome {
            ProbeOutcome::Ready if self.self_hosted => {
                format!("server answers, model `{model}` listed")
            }
            ProbeOutcome::Ready => format!("key accepted, model `{model}` available"),
            ProbeOutcome::Unlisted => format!(
                "server answers but lists no models; `{model}` unchecked (many self-hosted \
                 servers serve one model whatever the name)"
            ),
            ProbeOutcome::NoKey => format!(
                "no API key, so it is left out of the chain: set {}",
                kind.key_flag()
            ),
            ProbeOutcome::KeyRejected { status, detail } => format!(
                "key rejected (HTTP {status}: {detail}): set {} to a valid key",
                kind.key_flag()
            ),
            ProbeOutcome::ModelMissing { suggestions } if suggestions.is_empty() => format!(
                "key accepted, but model `{model}` does not exist: set {}",
                kind.model_flag()
            ),
            ProbeOutcome::ModelMissing { suggestions } => format!(
                "key accepted, but model `{model}` does not exist: set {} (offered: {})",
                kind.model_flag(),
                suggestions.join(", ")
            ),
            ProbeOutcome::RateLimited => {
                format!("key accepted but rate limited right now; model `{model}` unchecked")
            }
            ProbeOutcome::Unreachable { reason } => format!(
                "unreachable ({reason}); check the network or {}",
                kind.base_url_flag()
            ),
            ProbeOutcome::Unexpected { status, detail } => format!(
                "unexpected answer (HTTP {status}: {detail}); check {}",
                kind.base_url_flag()
            ),
        }
    }
}

/// The cloud providers of `config.chain`, in chain order, with their settings.
pub fn cloud_providers(config: &ProvidersConfig) -> Vec<(ProviderKind, &CloudConfig)> {
    config
        .chain
        .iter()
        .filter_map(|kind| {
            let cloud = match kind {
                ProviderKind::Local => return None,
                ProviderKind::Groq => &config.groq,
                ProviderKind::Mistral => &config.mistral,
                ProviderKind::Gemini => &config.gemini,
                ProviderKind::OpenAi => &config.openai,
            };
            Some((*kind, cloud))
        })
        .collect()
}

/// Checks every cloud provider of the chain at once, each within [`PROBE_TIMEOUT`].
pub async fn probe_chain(client: &reqwest::Client, config: &ProvidersConfig) -> Vec<ProbeReport> {
    join_all(
        cloud_providers(config)
            .into_iter()
            .map(|(kind, cloud)| probe(client, kind, cloud)),
    )
    .await
}

/// Checks one provider within [`PROBE_TIMEOUT`].
pub async fn probe(
    client: &reqwest::Client,
    kind: ProviderKind,
    cloud: &CloudConfig,
) -> ProbeReport {
    let outcome = if !cloud.is_configured() {
        ProbeOutcome::NoKey
    } else {
        let check = async {
            match kind {
                ProviderKind::Gemini => probe_gemini(client, cloud).await,
                _ => probe_openai(client, cloud).await,
            }
        };
        match tokio::time::timeout(PROBE_TIMEOUT, check).await {
            Ok(outcome) => outcome,
            Err(_) => ProbeOutcome::Unreachable {
                reason: format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            },
        }
    };
    let outcome = redact(outcome, cloud);
    ProbeReport {
        kind,
        model: cloud.model.clone(),
        self_hosted: !cloud.key_required,
        outcome,
    }
}

/// Logs each report at start-up, at a level matching its verdict.
pub fn log_startup_check(reports: &[ProbeReport]) {
    for report in reports {
        let provider = report.kind.name();
        let summary = report.summary();
        match report.verdict() {
            Verdict::Ok => tracing::info!(provider, "start-up check: {summary}"),
            Verdict::Warn => tracing::warn!(provider, "start-up check: {summary}"),
            Verdict::Fail => tracing::error!(provider, "start-up check: {summary}"),
        }
    }
}

/// `GET {base}/models` with the bearer key; the model must be listed (by id or alias).
async fn probe_openai(client: &reqwest::Client, cloud: &CloudConfig) -> ProbeOutcome {
    let url = match endpoint(&cloud.base_url, "models") {
        Ok(url) => url,
        Err(reason) => return ProbeOutcome::Unreachable { reason },
    };
    let mut request = client.get(url).header(header::ACCEPT, "application/json");
    if let Some(key) = &cloud.api_key {
        request = request.bearer_auth(key.expose());
    }
    let body = match fetch(request).await {
        Ok(body) => body,
        Err(ProviderError::Status { status: 404, .. }) if !cloud.key_required => {
            return ProbeOutcome::Unlisted;
        }
        Err(e) => return failure(e, false),
    };
    #[derive(Deserialize)]
    struct List {
        data: Vec<Listed>,
    }
    #[derive(Deserialize)]
    struct Listed {
        id: String,
        /// Mistral lists a model's other names here.
        #[serde(default)]
        aliases: Vec<String>,
    }
    let list: List = match serde_json::from_slice(&body) {
        Ok(list) => list,
        Err(e) => {
            return ProbeOutcome::Unexpected {
                status: 200,
                detail: format!("the model list is not what the API promises: {e}"),
            };
        }
    };
    let found = list
        .data
        .iter()
        .any(|m| m.id == cloud.model || m.aliases.contains(&cloud.model));
    if found {
        return ProbeOutcome::Ready;
    }
    let names = list.data.into_iter().map(|m| m.id);
    ProbeOutcome::ModelMissing {
        suggestions: closest(&cloud.model, names),
    }
}

/// `GET {base}/models/{model}` with `x-goog-api-key`; on 404, the list for suggestions.
async fn probe_gemini(client: &reqwest::Client, cloud: &CloudConfig) -> ProbeOutcome {
    let Some(key) = &cloud.api_key else {
        return ProbeOutcome::NoKey;
    };
    let get = |path: &str| {
        endpoint(&cloud.base_url, path).map(|url| {
            client
                .get(url)
                .header("x-goog-api-key", key.expose())
                .header(header::ACCEPT, "application/json")
        })
    };
    let request = match get(&format!("models/{}", cloud.model)) {
        Ok(request) => request,
        Err(reason) => return ProbeOutcome::Unreachable { reason },
    };
    match fetch(request).await {
        Ok(_) => ProbeOutcome::Ready,
        Err(ProviderError::Status { status: 404, .. }) => {
            let suggestions = match get("models?pageSize=1000") {
                Ok(request) => gemini_models(request).await,
                Err(_) => Vec::new(),
            };
            ProbeOutcome::ModelMissing {
                suggestions: closest(&cloud.model, suggestions.into_iter()),
            }
        }
        Err(e) => failure(e, true),
    }
}

/// The names (without `models/`) of the models that can `generateContent`.
async fn gemini_models(request: reqwest::RequestBuilder) -> Vec<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct List {
        #[serde(default)]
        models: Vec<Listed>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Listed {
        name: String,
        #[serde(default)]
        supported_generation_methods: Vec<String>,
    }
    let Ok(body) = fetch(request).await else {
        return Vec::new();
    };
    let Ok(list) = serde_json::from_slice::<List>(&body) else {
        return Vec::new();
    };
    list.models
        .into_iter()
        .filter(|m| {
            m.supported_generation_methods
                .iter()
                .any(|g| g == "generateContent")
        })
        .map(|m| m.name.trim_start_matches("models/").to_string())
        .collect()
}

/// Sends `request`; the body of a success, read up to [`MAX_RESPONSE_BODY`].
async fn fetch(request: reqwest::RequestBuilder) -> Result<Vec<u8>, ProviderError> {
    let response = cloud::send(request).await?;
    cloud::read_bounded(response, MAX_RESPONSE_BODY).await
}

/// A failed check as an outcome. Gemini answers a bad key with 400 `API_KEY_INVALID`.
fn failure(error: ProviderError, gemini: bool) -> ProbeOutcome {
    match error {
        ProviderError::Status {
            status: status @ (401 | 403),
            detail,
        } => ProbeOutcome::KeyRejected { status, detail },
        ProviderError::Status {
            status: 400,
            detail,
        } if gemini => ProbeOutcome::KeyRejected {
            status: 400,
            detail,
        },
        ProviderError::Status { status, detail } => ProbeOutcome::Unexpected { status, detail },
        ProviderError::RateLimited { .. } => ProbeOutcome::RateLimited,
        ProviderError::Timeout => ProbeOutcome::Unreachable {
            reason: "timed out".into(),
        },
        other => ProbeOutcome::Unreachable {
            reason: other.to_string(),
        },
    }
}

/// `outcome` with every copy of the key in a provider's message replaced by `***`.
fn redact(outcome: ProbeOutcome, cloud: &CloudConfig) -> ProbeOutcome {
    let Some(key) = cloud
        .api_key
        .as_ref()
        .map(|k| k.expose())
        .filter(|k| !k.is_empty())
    else {
        return outcome;
    };
    let clean = |text: String| text.replace(key, "***");
    match outcome {
        ProbeOutcome::KeyRejected { status, detail } => ProbeOutcome::KeyRejected {
            status,
            detail: clean(detail),
        },
        ProbeOutcome::Unexpected { status, detail } => ProbeOutcome::Unexpected {
            status,
            detail: clean(detail),
        },
        ProbeOutcome::Unreachable { reason } => ProbeOutcome::Unreachable {
            reason: clean(reason),
        },
        other => other,
    }
}

/// Up to [`SUGGESTIONS`] of `names`, those sharing the longest prefix with `model` first
/// (then alphabetically, so the answer does not depend on the provider's order).
fn closest(model: &str, names: impl Iterator<Item = String>) -> Vec<String> {
    let shared = |name: &str| {
        name.chars()
            .zip(model.chars())
            .take_while(|(a, b)| a == b)
            .count()
    };
    let mut names: Vec<String> = names.collect();
    names.sort_by(|a, b| shared(b).cmp(&shared(a)).then_with(|| a.cmp(b)));
    names.dedup();
    names.truncate(SUGGESTIONS);
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn cloud(key: Option<&str>) -> CloudConfig {
        CloudConfig {
            base_url: url::Url::parse("http://127.0.0.1:9/v1").unwrap(),
            api_key: key.map(Secret::new),
            key_required: true,
            model: "openai/gpt-oss-120b".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn suggestions_put_the_closest_names_first() {
        let names = [
            "whisper-large-v3",
            "openai/gpt-oss-20b",
            "llama-3.1-8b-instant",
            "openai/gpt-oss-120b-x",
        ];
        assert_eq!(
            closest("openai/gpt-oss-120b", names.iter().map(|s| s.to_string())),
            [
                "openai/gpt-oss-120b-x",
                "openai/gpt-oss-20b",
                "llama-3.1-8b-instant",
                "whisper-large-v3"
            ]
        );
        let many = (0..20).map(|i| format!("m{i}"));
        assert_eq!(closest("x", many).len(), SUGGESTIONS);
    }

    #[test]
    fn a_key_echoed_by_the_provider_is_redacted() {
        let outcome = ProbeOutcome::KeyRejected {
            status: 401,
            detail: "Incorrect API key provided: gsk_secret".into(),
        };
        let report = ProbeReport {
            kind: ProviderKind::Groq,
            model: "m".into(),
            self_hosted: false,
            outcome: redact(outcome, &cloud(Some("gsk_secret"))),
        };
        let summary = report.summary();
        assert!(!summary.contains("gsk_secret"), "{summary}");
        assert!(
            summary.contains("--groq-api-key (GROQ_API_KEY)"),
            "{summary}"
        );
        assert_eq!(report.verdict(), Verdict::Fail);
    }

    #[test]
    fn each_outcome_names_the_setting_to_change() {
        let report = |outcome| ProbeReport {
            kind: ProviderKind::Gemini,
            model: "gemini-2.5-flash".into(),
            self_hosted: false,
            outcome,
        };
        let missing = report(ProbeOutcome::ModelMissing {
            suggestions: vec!["gemini-3.5-flash-lite".into()],
        });
        assert_eq!(missing.verdict(), Verdict::Fail);
        assert!(missing.summary().contains("--gemini-model (GEMINI_MODEL)"));
        assert!(missing.summary().contains("gemini-3.5-flash-lite"));
        let no_key = report(ProbeOutcome::NoKey);
        assert_eq!(no_key.verdict(), Verdict::Warn);
        assert!(no_key.summary().contains("GEMINI_API_KEY"));
        let gone = report(ProbeOutcome::Unreachable {
            reason: "refused".into(),
        });
        assert!(gone.summary().contains("--gemini-base-url"));
        assert_eq!(report(ProbeOutcome::Ready).verdict(), Verdict::Ok);
    }

    #[test]
    fn only_cloud_providers_of_the_chain_are_checked() {
        let base = url::Url::parse("http://127.0.0.1:9/v1").unwrap();
        let cloud = |model: &str| CloudConfig {
            base_url: base.clone(),
            api_key: None,
            key_required: true,
            model: model.into(),
            timeout: Duration::from_secs(1),
        };
        let config = ProvidersConfig {
            chain: vec![
                ProviderKind::Local,
                ProviderKind::Gemini,
                ProviderKind::Groq,
            ],
            local_timeout: Duration::from_secs(1),
            local_max_wait: None,
            groq: cloud("g"),
            mistral: cloud("m"),
            gemini: cloud("ge"),
            openai: cloud("o"),
            openai_fleet: Vec::new(),
            budgets: crate::config::ProviderBudgets::default(),
            state_dir: None,
            breaker_failures: std::num::NonZeroU32::MIN,
            breaker_cooldown: Duration::from_secs(1),
        };
        let kinds: Vec<_> = cloud_providers(&config).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [ProviderKind::Gemini, ProviderKind::Groq]);
    }
}
