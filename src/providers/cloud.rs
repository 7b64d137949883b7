//! What the cloud clients share: sending a request, turning an HTTP failure into a typed
//! [`ProviderError`] (429 with `Retry-After`, other statuses with the provider's message),
//! and bounded body reads. Keys travel only in headers, never in URLs or errors.

use std::time::{Duration, SystemTime};

use reqwest::{RequestBuilder, Response, StatusCode, header};

use super::ProviderError;

/// The most of an error body read (for its message).
const MAX_ERROR_BODY: usize = 16 * 1024;
/// The longest provider message kept in an error.
const MAX_DETAIL_CHARS: usize = 200;
/// The largest non-streamed response body read.
pub const MAX_RESPONSE_BODY: usize = 4 << 20;

/// Sends `request`; a non-success status becomes an error.
pub async fn send(request: RequestBuilder) -> Result<Response, ProviderError> {
    let response = request.send().await.map_err(transport_error)?;
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
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(ProviderError::RateLimited {
            retry_after: retry_header.or_else(|| json.as_ref().and_then(gemini_retry_delay)),
        });
    }
    let detail = json
        .as_ref()
        .and_then(error_message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(ProviderError::Status {
        status: status.as_u16(),
        detail: shorten(detail.trim()),
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
