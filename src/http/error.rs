//! [`ApiError`]: every way an HTTP request can fail, and the ONE mapping from those to a
//! status code and an OpenAI-style JSON body
//! (`{"error":{"message","type","param","code"}}`).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
            | ApiError::UnreadableBody => StatusCode::BAD_REQUEST,
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
        ];
        for (error, status) in cases {
            assert_eq!(
                error.clone().into_response().status().as_u16(),
                status,
                "{error:?}"
            );
        }
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_and_not_ready_says_when() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::NotReady.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
