//! The local engine as a provider.

use futures::StreamExt;
use futures::future::BoxFuture;

use super::{EventStream, Provider, ProviderError};
use crate::chat::{ChatRequest, StreamEvent};
use crate::engine::{EngineError, EngineHandle};

/// Answers with the in-process llama.cpp engine.
#[derive(Clone)]
pub struct LocalProvider {
    engine: EngineHandle,
    /// Whether replies start with a [`StreamEvent::Prompt`] (`--verbose-prompt` in the
    /// console); the chain passes it on.
    show_prompt: bool,
}

impl LocalProvider {
    /// A provider over `engine`.
    pub fn new(engine: EngineHandle) -> Self {
        Self {
            engine,
            show_prompt: false,
        }
    }

    /// The same provider, its replies starting with the exact prompt tokens.
    pub fn showing_prompt(self) -> Self {
        Self {
            show_prompt: true,
            ..self
        }
    }
}

impl From<EngineError> for ProviderError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { .. } => ProviderError::Overloaded,
            other => ProviderError::Engine(other),
        }
    }
}

impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        let show_prompt = self.show_prompt;
        let submitted = if show_prompt {
            self.engine.submit_showing_prompt(request)
        } else {
            self.engine.submit(request)
        };
        Box::pin(async move {
            let stream = submitted?;
            Ok(stream
                .filter(move |event| {
                    futures::future::ready(
                        show_prompt || !matches!(event, Ok(StreamEvent::Prompt(_))),
                    )
                })
                .map(|event| event.map_err(ProviderError::from))
                .boxed())
        })
    }
}
