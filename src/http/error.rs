//! [`ApiError`]: every way an HTTP request can fail, and the ONE mapping from those to a
//! status code and an OpenAI-style JSON body
//! (`{"error":{"message","type","param","code"}}`).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;
use crate::engine::prompt::PromptError;
use crate::providers::{ProviderError, Refused, RequestFault};

/// Why an HTTP request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON does not describe a valid request.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The field at fault.
        param: Option<&'static str>,
    },
    /// The body is larger than the limit.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body could not be read.
    #[error("the request body could not be read")]
    UnreadableBody,
    /// A missing or wrong bearer key.
    #[error("missing or invalid API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// The model is still loading.
    #[error("the model is still loading; retry shortly")]
    NotReady,
    /// Too many chat completions in flight.
    #[error("too many requests in flight; retry shortly")]
    Busy,
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// A model refused the request for what it asks (too long, a parameter it rejects,
    /// blocked content): the client has to change it.
    #[error("{message}")]
    Refused {
        /// What is wrong.
        fault: RequestFault,
        /// What was refused and what to change.
        message: String,
    },
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        let fault = refused.fault();
        let provider = refused.provider;
        let message = match (&refused.error, fault) {
            (
                ProviderError::Engine(EngineError::Prompt(PromptError::TooLong { tokens, max })),
                _,
            ) => format!(
                "This model's context window leaves room for {max} prompt tokens (the window \
                 minus max_tokens), but the messages need at least {tokens}. Shorten or drop \
                 messages, or lower max_tokens."
            ),
            (ProviderError::Engine(EngineError::Constraint(error)), _) => format!(
                "The local model cannot follow the requested response format: {error}. \
                 Change response_format (or grammar / json_schema)."
            ),
            (ProviderError::Engine(error @ EngineError::TooManyChoices { .. }), _) => {
                format!("Too many choices: {error}. Ask for fewer (n).")
            }
            (ProviderError::Refused { detail, .. }, RequestFault::ContextLengthExceeded) => {
                format!(
                    "The messages are too long for the model ({provider}: {detail}). Shorten \
                     or drop messages, or lower max_tokens."
                )
            }
            (ProviderError::Refused { detail, .. }, RequestFault::ContentBlocked) => format!(
                "The model's content filter blocked the prompt ({provider}: {detail}). \
                 Rephrase the messages."
            ),
            (ProviderError::Refused { detail, .. }, RequestFault::InvalidRequest) => format!(
                "The model rejected the request ({provider}: {detail}). Check the messages \
                 and parameters."
            ),
            (other, _) => format!(
                "The model could not accept the messages ({provider}: {other}). Check the \
                 roles and contents of the messages."
            ),
        };
        ApiError::Refused { fault, message }
    }
}

impl ApiError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnreadableBody => "unreadable_body",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotReady => "not_ready",
            ApiError::Busy => "busy",
            ApiError::NotFound => "not_found",
            ApiError::Refused { fault, .. } => fault.code(),
        }
    }

    /// A request error about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest { .. }
            | ApiError::UnreadableBody
            | ApiError::Refused { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotReady | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "authentication_error",
            ApiError::NotReady | ApiError::Busy => "server_error",
            ApiError::NotFound => "not_found_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let param = match &self {
            ApiError::InvalidRequest { param, .. } => *param,
            ApiError::Refused {
                fault: RequestFault::ContextLengthExceeded | RequestFault::ContentBlocked,
                ..
            } => Some("messages"),
            _ => None,
        };
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "param": param,
            "code": self.kind(),
        }});
        let mut response = (self.status(), Json(body)).into_response();
        match self {
            ApiError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::NotReady | ApiError::Busy => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ApiError::InvalidJson("x".into()), 400),
            (ApiError::invalid("messages", "x"), 400),
            (ApiError::UnreadableBody, 400),
            (ApiError::BodyTooLarge { limit: 1 }, 413),
            (ApiError::Unauthorized, 401),
            (ApiError::NotReady, 503),
            (ApiError::Busy, 503),
            (ApiError::NotFound, 404),
            (
                ApiError::Refused {
                    fault: RequestFault::ContentBlocked,
                    message: "x".into(),
                },
                400,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(
                error.clone().into_response().status().as_u16(),
                status,
                "{error:?}"
            );
        }
    }

    fn body_of(error: ApiError) -> serde_json::Value {
        let response = error.into_response();
        let bytes =
            futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
                .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn refusals_say_what_to_change_with_openai_codes() {
        let too_long = ApiError::from(Refused {
            provider: "local",
            error: ProviderError::Engine(EngineError::Prompt(PromptError::TooLong {
                tokens: 900,
                max: 500,
            })),
        });
        let body = body_of(too_long);
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "messages");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("900") && message.contains("500"),
            "{message}"
        );
        assert!(message.contains("max_tokens"), "{message}");

        let blocked = ApiError::from(Refused {
            provider: "gemini",
            error: ProviderError::Refused {
                kind: RequestFault::ContentBlocked,
                detail: "prompt blocked: SAFETY".into(),
            },
        });
        let body = body_of(blocked);
        assert_eq!(body["error"]["code"], "content_filter");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("SAFETY")
        );

        let invalid = ApiError::from(Refused {
            provider: "groq",
            error: ProviderError::Refused {
                kind: RequestFault::InvalidRequest,
                detail: "'temperature' must be at most 2".into(),
            },
        });
        let body = body_of(invalid);
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("temperature")
        );
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_and_not_ready_says_when() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::NotReady.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
