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
}

impl LocalProvider {
    /// A provider over `engine`.
    pub fn new(engine: EngineHandle) -> Self {
        Self { engine }
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
        Box::pin(async move {
            // Prepared here (a large request on the blocking pool), never on the engine thread.
            let stream = self.engine.submit_async(request, false).await?;
            Ok(stream
                .filter(|event| {
                    futures::future::ready(!matches!(event, Ok(StreamEvent::Prompt(_))))
                })
                .map(|event| event.map_err(ProviderError::from))
                .boxed())
        })
    }
}
