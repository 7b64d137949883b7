//! The last resort: a fixed, localized apology that always succeeds.

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};

use super::{EventStream, Provider, ProviderError};
use crate::chat::{ChatRequest, Completion, FinishReason, StreamEvent, Timings, Usage};
use crate::i18n::{self, Lang};

/// Answers every request with an apology in one language.
#[derive(Debug, Clone, Copy)]
pub struct CannedProvider {
    lang: Lang,
}

impl CannedProvider {
    /// The apology in `lang`.
    pub fn new(lang: Lang) -> Self {
        Self { lang }
    }

    /// The apology as a reply stream.
    pub fn events(&self) -> BoxStream<'static, StreamEvent> {
        stream::iter([
            StreamEvent::Delta(i18n::canned_apology(self.lang).to_string()),
            StreamEvent::Done(Completion {
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
                timings: Timings::default(),
            }),
        ])
        .boxed()
    }
}

impl Provider for CannedProvider {
    fn name(&self) -> &'static str {
        "canned"
    }

    fn stream(&self, _request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        let events = self.events().map(Ok).boxed();
        Box::pin(async move { Ok(events) })
    }
}
