//! A fake OpenAI-compatible speech-to-text server on a loopback port:
//! `POST /v1/audio/transcriptions` with a `multipart/form-data` body (`file`, `model`,
//! optional `language`, `response_format`), answering `{"text": "…"}` as OpenAI and Groq
//! do, and their error bodies (`{"error": {"message", "type", "code"}}`) otherwise.
//!
//! The body is parsed strictly as multipart (boundary from the `Content-Type`, CRLF
//! framing, `Content-Disposition` with `name` and `filename`): a client that sends
//! anything else gets the 400 a real server gives. The fake "hears" the text after the
//! four bytes `OggS` of a test voice note ([`voice_bytes`]), so a test controls what is
//! transcribed.
//!
//! It misbehaves on demand, as the real services do: 429 with `Retry-After`, a hang past
//! the client's timeout, a 200 that is not JSON, 5xx, a file over its 25 MB limit (413).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// The largest upload the fake takes (Groq's and OpenAI's 25 MB).
pub const MAX_UPLOAD: usize = 25 * 1024 * 1024;

/// What the fake does with the next requests.
#[derive(Debug, Clone)]
pub enum SttBehavior {
    /// Transcribes: the text after `OggS` in the file.
    Hear,
    /// 429 with `Retry-After` and OpenAI's rate-limit error.
    RateLimited,
    /// Never answers (the client's timeout must end it).
    Hang,
    /// 200 with an HTML page.
    Garbage,
    /// 503 with an error body.
    Unavailable,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct SttRequest {
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The form fields other than the file, by name.
    pub fields: Vec<(String, String)>,
    /// The file part's `filename`.
    pub file_name: Option<String>,
    /// The file part's `Content-Type`.
    pub file_type: Option<String>,
    /// The file's size in bytes.
    pub file_len: usize,
}

impl SttRequest {
    /// A form field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    key: Option<String>,
    behavior: Mutex<SttBehavior>,
    requests: Mutex<Vec<SttRequest>>,
}

/// A running fake speech-to-text server.
pub struct FakeStt {
    /// Its base URL (`…/v1`), for `--stt-base-url`.
    pub base_url: String,
    shared: Arc<Shared>,
}

/// The bytes of a test voice note that the fake hears as `text`.
pub fn voice_bytes(text: &str) -> Vec<u8> {
    let mut bytes = b"OggS".to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

impl FakeStt {
    /// Starts a fake requiring `key` as a bearer token (`None`: no key, as a self-hosted
    /// server).
    pub async fn start(key: Option<&str>) -> Self {
        let shared = Arc::new(Shared {
            key: key.map(str::to_string),
            behavior: Mutex::new(SttBehavior::Hear),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/audio/transcriptions", post(transcribe))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD * 2))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { base_url, shared }
    }

    /// A base URL where nothing listens (the service is down).
    pub async fn down_url() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    /// Sets what the next requests get.
    pub fn set(&self, behavior: SttBehavior) {
        *self.shared.behavior.lock().unwrap() = behavior;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SttRequest> {
        self.shared.requests.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response()
}

/// One multipart part: its headers' name, filename and type, and its bytes.
struct Part {
    name: String,
    file_name: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
}

/// Parses a `multipart/form-data` body strictly (RFC 7578): `--boundary CRLF`, headers,
/// CRLF, data, `CRLF --boundary`, … `--boundary--`.
fn parse_multipart(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    let (kind, params) = content_type
        .split_once(';')
        .ok_or("Content-Type has no boundary")?;
    if kind.trim() != "multipart/form-data" {
        return Err(format!("Content-Type is {kind}, not multipart/form-data"));
    }
    let boundary = params
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .ok_or("no boundary parameter")?
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let find = |haystack: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        haystack
            .get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut at = find(body, &delimiter, 0).ok_or("no opening boundary")?;
    let mut parts = Vec::new();
    loop {
        at += delimiter.len();
        if body.get(at..at + 2) == Some(b"--") {
            return Ok(parts);
        }
        if body.get(at..at + 2) != Some(b"\r\n") {
            return Err("a boundary is not followed by CRLF".into());
        }
        at += 2;
        let headers_end = find(body, b"\r\n\r\n", at).ok_or("a part has no blank line")?;
        let headers = std::str::from_utf8(&body[at..headers_end])
            .map_err(|_| "part headers are not UTF-8")?;
        let mut closing = delimiter.clone();
        closing.splice(0..0, *b"\r\n");
        let data_start = headers_end + 4;
        let data_end = find(body, &closing, data_start).ok_or("a part is not closed")?;
        let mut name = None;
        let mut file_name = None;
        let mut content_type = None;
        for line in headers.split("\r\n") {
            let (header, value) = line.split_once(':').ok_or("a bad part header")?;
            match header.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for param in value.split(';').map(str::trim) {
                        if let Some(v) = param.strip_prefix("name=") {
                            name = Some(v.trim_matches('"').to_string());
                        } else if let Some(v) = param.strip_prefix("filename=") {
                            file_name = Some(v.trim_matches('"').to_string());
                        }
                    }
                }
                "content-type" => content_type = Some(value.trim().to_string()),
                _ => {}
            }
        }
        parts.push(Part {
            name: name.ok_or("a part has no name")?,
            file_name,
            content_type,
            data: body[data_start..data_end].to_vec(),
        });
        at = data_end + 2;
    }
}

async fn transcribe(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(key) = &shared.key
        && authorization.as_deref() != Some(&format!("Bearer {key}"))
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "Invalid API Key",
            "invalid_request_error",
            Some("invalid_api_key"),
        );
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match parse_multipart(content_type, &body) {
        Ok(parts) => parts,
        Err(why) => {
            return error(StatusCode::BAD_REQUEST, &why, "invalid_request_error", None);
        }
    };
    let file = parts
        .iter()
        .find(|p| p.name == "file" && p.file_name.is_some());
    let recorded = SttRequest {
        authorization,
        fields: parts
            .iter()
            .filter(|p| p.name != "file")
            .map(|p| {
                (
                    p.name.clone(),
                    String::from_utf8_lossy(&p.data).into_owned(),
                )
            })
            .collect(),
        file_name: file.and_then(|f| f.file_name.clone()),
        file_type: file.and_then(|f| f.content_type.clone()),
        file_len: file.map_or(0, |f| f.data.len()),
    };
    shared.requests.lock().unwrap().push(recorded.clone());
    let Some(file) = file else {
        return error(
            StatusCode::BAD_REQUEST,
            "file is required",
            "invalid_request_error",
            None,
        );
    };
    if recorded.field("model").is_none_or(str::is_empty) {
        return error(
            StatusCode::BAD_REQUEST,
            "model is required",
            "invalid_request_error",
            None,
        );
    }
    if file.data.len() > MAX_UPLOAD {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request Entity Too Large",
            "invalid_request_error",
            Some("request_too_large"),
        );
    }
    let behavior = shared.behavior.lock().unwrap().clone();
    match behavior {
        SttBehavior::Hear => {
            let heard = file
                .data
                .strip_prefix(b"OggS")
                .map(|rest| String::from_utf8_lossy(rest).into_owned())
                .unwrap_or_default();
            let body: Value = json!({"text": format!(" {heard}"), "x_groq": {"id": "req_fake"}});
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        SttBehavior::RateLimited => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for model `whisper-large-v3-turbo`: Limit 7200, Used 7200, Requested 30. Please try again in 2s.",
                "audio_seconds",
                Some("rate_limit_exceeded"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, "2".parse().unwrap());
            response
        }
        SttBehavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            error(StatusCode::GATEWAY_TIMEOUT, "late", "server_error", None)
        }
        SttBehavior::Garbage => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>Bad gateway</body></html>",
        )
            .into_response(),
        SttBehavior::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            "server_error",
            None,
        ),
    }
}
