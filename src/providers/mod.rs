//! Who answers: the [`Provider`] trait, the providers, and the fallback [`Chain`] that tries
//! them in order so that every message gets an answer.
//!
//! Front-ends (Telegram, HTTP) call [`Chain::reply`], which never fails: when every
//! provider fails, the canned apology answers. A provider that fails before any text is
//! delivered hands over to the next one; a stream that breaks after text was delivered
//! ends with what was delivered plus a short notice (no second answer).

mod canned;
mod local;

use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};

pub use canned::CannedProvider;
pub use local::LocalProvider;

use crate::chat::{ChatRequest, Completion, FinishReason, StreamEvent, Timings, Usage};
use crate::i18n::{self, Lang};

/// A provider's reply as it arrives: text deltas, then `Done`.
pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

/// Why a provider did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider is at capacity (the local queue is full).
    #[error("overloaded")]
    Overloaded,
    /// The provider failed.
    #[error("failed: {0}")]
    Failed(String),
}

impl ProviderError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Overloaded => "overloaded",
            ProviderError::Failed(_) => "error",
        }
    }
}

/// Something that can answer a chat.
pub trait Provider: Send + Sync {
    /// The provider's name in logs and metrics (`local`, `groq`, …).
    fn name(&self) -> &'static str;

    /// Starts a reply.
    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>>;
}

/// An answer from the chain: who gave it and its events (text deltas, then `Done`).
/// Dropping `events` cancels the reply (the local engine frees the slot).
pub struct Reply {
    /// The provider that answered.
    pub provider: &'static str,
    /// The reply's events; never an error.
    pub events: BoxStream<'static, StreamEvent>,
}

/// Providers in order of preference.
pub struct Chain {
    providers: Vec<Box<dyn Provider>>,
}

impl Chain {
    /// A chain trying `providers` in order, then the canned apology.
    pub fn new(providers: Vec<Box<dyn Provider>>) -> Self {
        Self { providers }
    }

    /// The answer of the first provider that gives one; the canned apology in `lang` if
    /// none does.
    pub async fn reply(&self, request: ChatRequest, lang: Lang) -> Reply {
        for provider in &self.providers {
            let mut events = match provider.stream(request.clone()).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(provider = provider.name(), error = %e, "provider failed; trying the next");
                    continue;
                }
            };
            // A provider counts as answering once it produced text; an error or an empty
            // reply before that hands over to the next provider.
            let mut first = Vec::new();
            loop {
                match events.next().await {
                    Some(Ok(StreamEvent::Delta(text))) if !text.is_empty() => {
                        first.push(StreamEvent::Delta(text));
                        break;
                    }
                    Some(Ok(StreamEvent::Delta(_) | StreamEvent::Prompt(_))) => {}
                    Some(Ok(StreamEvent::Done(_))) | None => {
                        tracing::warn!(
                            provider = provider.name(),
                            "provider gave an empty reply; trying the next"
                        );
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(provider = provider.name(), error = %e, "provider failed; trying the next");
                        break;
                    }
                }
            }
            if first.is_empty() {
                continue;
            }
            let name = provider.name();
            let rest = events.scan(false, move |ended, event| {
                let out = match (*ended, event) {
                    (true, _) => None,
                    (false, Ok(event)) => {
                        *ended = matches!(event, StreamEvent::Done(_));
                        Some(vec![event])
                    }
                    (false, Err(e)) => {
                        tracing::warn!(provider = name, error = %e, "reply broke off midway");
                        *ended = true;
                        Some(vec![
                            StreamEvent::Delta(i18n::interrupted_notice(lang).to_string()),
                            StreamEvent::Done(Completion {
                                finish_reason: FinishReason::Stop,
                                usage: Usage::default(),
                                timings: Timings::default(),
                            }),
                        ])
                    }
                };
                futures::future::ready(out)
            });
            return Reply {
                provider: name,
                events: stream::iter(first)
                    .chain(rest.flat_map(stream::iter))
                    .boxed(),
            };
        }
        let canned = CannedProvider::new(lang);
        Reply {
            provider: canned.name(),
            events: canned.events(),
        }
    }
}
