//! What the cloud clients share: sending a request, turning an HTTP failure into a typed
//! [`ProviderError`] ([`status_error`]: 429 with `Retry-After`, the request's own faults
//! as [`ProviderError::Refused`], other statuses with the provider's message), and bounded
//! body reads. Keys travel only in headers, never in URLs or errors: a provider that
//! echoes the key in its error body has it cut out of the message.

use std::time::{Duration, SystemTime};

use reqwest::{RequestBuilder, Response, StatusCode, header};

use super::{ProviderError, RequestFault};

/// The most of an error body read (for its message).
const MAX_ERROR_BODY: usize = 16 * 1024;
/// The longest provider message kept in an error.
const MAX_DETAIL_CHARS: usize = 200;
/// The largest non-streamed response body read.
pub const MAX_RESPONSE_BODY: usize = 4 << 20;

/// Sends `request`; a non-success status becomes an error ([`status_error`]).
pub async fn send(request: RequestBuilder) -> Result<Response, ProviderError> {
    let (client, request) = request.build_split();
    let request = request.map_err(transport_error)?;
    // The key the request carries, to cut out of any error text the provider sends back.
    let secrets: Vec<String> = [header::AUTHORIZATION.as_str(), "x-goog-api-key"]
        .into_iter()
        .filter_map(|name| request.headers().get(name)?.to_str().ok())
        .map(|value| {
            value
                .strip_prefix("Bearer ")
                .unwrap_or(value)
                .trim()
                .to_string()
        })
        .filter(|secret| !secret.is_empty())
        .collect();
    let response = client.execute(request).await.map_err(transport_error)?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_header = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // The body only explains the status; failing to read it changes nothing.
    let body = read_bounded(response, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    Err(status_error(status, retry_header, &body, &secrets))
}

/// The error for a response with the non-success `status`, `Retry-After` header and
/// (error) `body`; `secrets` are cut out of the provider's message.
///
/// Whose fault it is decides what the chain does ([`ProviderError::fault`]):
/// - 429 → [`ProviderError::RateLimited`] (busy);
/// - 400, 413, 422 → [`ProviderError::Refused`]: the request itself (too long, a
///   parameter or message the API rejects, content a filter blocks), read from the
///   error's code, type and message. Except Gemini's 400s about the key or the account
///   (`API_KEY_INVALID`, `FAILED_PRECONDITION`): those are the provider's set-up;
/// - anything else (401, 402, 403, 404, 408, 5xx, …) → [`ProviderError::Status`]: the
///   provider or its configuration is at fault, which its circuit breaker should know.
pub fn status_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    secrets: &[String],
) -> ProviderError {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ProviderError::RateLimited {
            retry_after: retry_after.or_else(|| json.as_ref().and_then(gemini_retry_delay)),
        };
    }
    let message = json
        .as_ref()
        .and_then(error_message)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let detail = shorten(redact(&message, secrets).trim());
    let refusal = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Some(RequestFault::ContextLengthExceeded),
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            request_fault(json.as_ref(), &message)
        }
        _ => None,
    };
    match refusal {
        Some(kind) => ProviderError::Refused { kind, detail },
        None => ProviderError::Status {
            status: status.as_u16(),
            detail,
        },
    }
}

/// What a 400/422 body says is wrong with the request; `None` when it is the provider's
/// set-up instead (Gemini answers 400 to a bad key).
fn request_fault(body: Option<&serde_json::Value>, message: &str) -> Option<RequestFault> {
    let field = |pointer: &str| {
        body.and_then(|b| b.pointer(pointer))
            .and_then(|v| v.as_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default()
    };
    let code = field("/error/code");
    let kind = field("/error/type");
    let gemini_status = [field("/error/status"), field("/0/error/status")].concat();
    let reasons = body
        .and_then(|b| {
            b.pointer("/error/details")
                .or_else(|| b.pointer("/0/error/details"))
        })
        .and_then(|d| d.as_array())
        .map(|details| {
            details
                .iter()
                .filter_map(|d| d.get("reason")?.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let message = message.to_lowercase();
    if reasons.contains("API_KEY")
        || gemini_status == "failed_precondition"
        || gemini_status == "permission_denied"
        || gemini_status == "unauthenticated"
        || message.contains("api key")
        || message.contains("api_key")
    {
        return None;
    }
    const TOO_LONG: [&str; 9] = [
        "context_length",
        "context length",
        "context window",
        "maximum context",
        "too many tokens",
        "too long",
        "token count",
        "reduce the length",
        "exceeds the maximum",
    ];
    const BLOCKED: [&str; 4] = [
        "content_filter",
        "content_policy",
        "content management",
        "safety",
    ];
    if code.contains("context_length") || TOO_LONG.iter().any(|m| message.contains(m)) {
        Some(RequestFault::ContextLengthExceeded)
    } else if BLOCKED
        .iter()
        .any(|m| code.contains(m) || kind.contains(m) || message.contains(m))
    {
        Some(RequestFault::ContentBlocked)
    } else {
        Some(RequestFault::InvalidRequest)
    }
}

/// `text` with every (non-trivial) secret replaced by `[redacted]`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        // A one- or two-character "key" would shred the message without protecting much.
        .filter(|s| s.len() >= 4)
        .fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), "[redacted]")
        })
}

/// A reqwest failure as a provider error (without the URL).
pub fn transport_error(error: reqwest::Error) -> ProviderError {
    let error = error.without_url();
    if error.is_timeout() {
        ProviderError::Timeout
    } else if error.is_connect() {
        ProviderError::Connect(error.to_string())
    } else if error.is_body() || error.is_decode() {
        ProviderError::Cut(error.to_string())
    } else {
        ProviderError::Connect(error.to_string())
    }
}

/// Reads at most `limit` bytes of `response`'s body; more is an error.
pub async fn read_bounded(mut response: Response, limit: usize) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::Malformed(format!(
                "response body over {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Gemini puts the wait in the body: `error.details[].retryDelay` = `"30s"`.
fn gemini_retry_delay(body: &serde_json::Value) -> Option<Duration> {
    body.pointer("/error/details")?
        .as_array()?
        .iter()
        .filter_map(|d| d.get("retryDelay")?.as_str())
        .find_map(|d| Duration::try_from_secs_f64(d.strip_suffix('s')?.parse().ok()?).ok())
}

/// The message of an OpenAI-style (`error.message`), Mistral-style (`message`) or
/// Gemini-style (`[{error: {message}}]`) error body.
fn error_message(body: &serde_json::Value) -> Option<String> {
    [
        "/error/message",
        "/message",
        "/detail",
        "/0/error/message",
        "/error",
    ]
    .iter()
    .find_map(|p| body.pointer(p)?.as_str().map(str::to_string))
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 0.5 ", now),
            Some(Duration::from_millis(500))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(20));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(20))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(20));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn gemini_retry_delay_from_the_body() {
        let body = serde_json::json!({"error": {"code": 429, "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure"},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}
        ]}});
        assert_eq!(gemini_retry_delay(&body), Some(Duration::from_secs(31)));
    }

    fn error_of(status: u16, body: serde_json::Value) -> ProviderError {
        status_error(
            StatusCode::from_u16(status).unwrap(),
            None,
            body.to_string().as_bytes(),
            &["sk-live-secret".to_string()],
        )
    }

    fn refusal(error: &ProviderError) -> Option<RequestFault> {
        match error {
            ProviderError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    #[test]
    fn the_requests_own_faults_are_refusals_not_provider_failures() {
        use RequestFault::*;
        let cases = [
            // OpenAI / Groq.
            (
                400,
                serde_json::json!({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
                    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
                Some(ContextLengthExceeded),
            ),
            (
                400,
                serde_json::json!({"error": {"message": "Please reduce the length of the messages or completion.",
                    "type": "invalid_request_error", "code": null}}),
                Some(ContextLengthExceeded),
            ),
            (
                400,
                serde_json::json!({"error": {"message": "'temperature' must be less than or equal to 2",
                    "type": "invalid_request_error", "param": "temperature"}}),
                Some(InvalidRequest),
            ),
            (
                400,
                serde_json::json!({"error": {"message": "The response was filtered due to the prompt triggering content management policy.",
                    "type": null, "code": "content_filter"}}),
                Some(ContentBlocked),
            ),
            // Mistral validation errors are 422.
            (
                422,
                serde_json::json!({"object": "error", "message": "Prompt contains 40000 tokens, too large for model with 32768 maximum context length",
                    "type": "invalid_request_error"}),
                Some(ContextLengthExceeded),
            ),
            (
                422,
                serde_json::json!({"detail": [{"type": "missing", "loc": ["body", "messages"]}]}),
                Some(InvalidRequest),
            ),
            // Gemini.
            (
                400,
                serde_json::json!({"error": {"code": 400, "message": "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                    "status": "INVALID_ARGUMENT"}}),
                Some(ContextLengthExceeded),
            ),
            (
                413,
                serde_json::json!({"error": {"message": "Request Entity Too Large"}}),
                Some(ContextLengthExceeded),
            ),
            // The provider's set-up, not the request: these count against the provider.
            (
                400,
                serde_json::json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}}),
                None,
            ),
            (
                400,
                serde_json::json!({"error": {"code": 400, "message": "User location is not supported for the API use.",
                    "status": "FAILED_PRECONDITION"}}),
                None,
            ),
            (
                401,
                serde_json::json!({"error": {"message": "Invalid API Key"}}),
                None,
            ),
            (
                402,
                serde_json::json!({"error": {"message": "Insufficient credits"}}),
                None,
            ),
            (
                403,
                serde_json::json!({"error": {"message": "Forbidden"}}),
                None,
            ),
            (
                404,
                serde_json::json!({"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}),
                None,
            ),
            (408, serde_json::json!({}), None),
            (
                500,
                serde_json::json!({"error": {"message": "context length bookkeeping failed"}}),
                None,
            ),
            (
                503,
                serde_json::json!({"error": {"message": "over capacity"}}),
                None,
            ),
        ];
        for (status, body, expected) in cases {
            let error = error_of(status, body.clone());
            assert_eq!(refusal(&error), expected, "{status} {body}");
            assert_eq!(error.trips_breaker(), expected.is_none(), "{status} {body}");
        }
    }

    #[test]
    fn an_echoed_key_is_cut_out_of_the_message() {
        let error = error_of(
            500,
            serde_json::json!({"error": {"message": "bad key sk-live-secret (sk-live-secret)"}}),
        );
        let text = error.to_string();
        assert!(!text.contains("sk-live-secret"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        // Not JSON at all: the raw body is the message, redacted too.
        let raw = status_error(
            StatusCode::BAD_GATEWAY,
            None,
            b"upstream said: Bearer sk-live-secret",
            &["sk-live-secret".to_string()],
        );
        assert!(!raw.to_string().contains("sk-live-secret"), "{raw}");
    }

    #[test]
    fn error_messages_of_each_api() {
        let openai = serde_json::json!({"error": {"message": "Invalid API Key", "type": "x"}});
        assert_eq!(error_message(&openai).as_deref(), Some("Invalid API Key"));
        let mistral = serde_json::json!({"message": "Unauthorized", "request_id": "1"});
        assert_eq!(error_message(&mistral).as_deref(), Some("Unauthorized"));
        let gemini = serde_json::json!([{"error": {"code": 400, "message": "bad"}}]);
        assert_eq!(error_message(&gemini).as_deref(), Some("bad"));
        assert_eq!(
            shorten(&"é".repeat(300)).chars().count(),
            MAX_DETAIL_CHARS + 1
        );
    }
}
