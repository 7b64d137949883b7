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

    fn reports_start(&self) -> bool {
        true
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            // Prepared here (a large request on the blocking pool), never on the engine thread.
            // The engine sends the prompt when the request leaves the queue for a slot: that
            // event tells the chain a timeout before it was a wait in the queue (busy), not a
            // failure. Rendering the pieces costs about a microsecond per prompt token.
            let stream = self.engine.submit_async(request, true).await?;
            Ok(stream
                .map(|event| {
                    event
                        .map(|event| match event {
                            StreamEvent::Prompt(_) => StreamEvent::Prompt(Vec::new()),
                            other => other,
                        })
                        .map_err(ProviderError::from)
                })
                .boxed())
        })
    }
}
