//! The local engine as a provider.

use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::{EventStream, Provider, ProviderError};
use crate::chat::ChatRequest;
use crate::engine::{EngineError, EngineHandle};

/// Answers with the in-process llama.cpp engine.
#[derive(Clone)]
pub struct LocalProvider {
    engine: EngineHandle,
    /// Whether replies show their prompt, a [`StreamEvent::Prompt`](crate::chat::StreamEvent)
    /// (`--verbose-prompt` in the console); the chain passes it on.
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

    fn reports_start(&self) -> bool {
        true
    }

    fn estimated_wait<'a>(
        &'a self,
        request: &'a ChatRequest,
        limit: Duration,
    ) -> BoxFuture<'a, Option<Duration>> {
        Box::pin(self.engine.estimated_wait(request, limit))
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        let show_prompt = self.show_prompt;
        Box::pin(async move {
            // Prepared here (a large request on the blocking pool), never on the engine thread.
            // The engine sends `Started` when the request leaves its queue for a slot.
            let tools = request.params.tools.clone().filter(|t| t.callable());
            let stream = self.engine.submit_async(request, show_prompt).await?;
            let events = stream
                .map(|event| event.map_err(ProviderError::from))
                .boxed();
            // The model writes its calls as text: read them back as calls.
            Ok(match tools {
                Some(tools) => crate::engine::tools::read_calls(events, &tools),
                None => events,
            })
        })
    }
}
