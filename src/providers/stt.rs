//! Speech to text: a client of the OpenAI-compatible `POST {base}/audio/transcriptions`
//! (multipart: `file`, `model`, `response_format=json`; Groq, OpenAI, and self-hosted
//! servers such as speaches speak it). It shares the cloud clients' HTTP client, error
//! sorting and key redaction ([`cloud::send`]); its figures go to the STT metrics
//! ([`SttMetrics`](crate::metrics::SttMetrics)), apart from the chat providers', and it is
//! not in the fallback chain, so its failures never open a chat provider's breaker.
//!
//! Telegram voice notes are OGG/Opus, which these APIs take as they are: nothing is
//! transcoded. The language is left to the server to detect (Whisper does).

use std::sync::Arc;
use std::time::Instant;

use reqwest::multipart::{Form, Part};

use super::cloud::{self, MAX_RESPONSE_BODY};
use super::openai::endpoint;
use super::{BuildError, ProviderError, http_client};
use crate::config::SttConfig;
use crate::metrics::Metrics;

/// The largest transcription response read.
const MAX_TRANSCRIPT_BODY: usize = MAX_RESPONSE_BODY;

/// One configured speech-to-text service.
pub struct SttClient {
    client: reqwest::Client,
    config: SttConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SttClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One sound file to transcribe.
#[derive(Debug, Clone)]
pub struct Audio {
    /// Its bytes, as Telegram stores them (OGG/Opus for voice notes).
    pub bytes: Vec<u8>,
    /// A file name whose extension says the format (`voice.ogg`).
    pub file_name: String,
    /// Its MIME type.
    pub mime: String,
    /// Its length in seconds, as Telegram says (for the metrics).
    pub seconds: u32,
}

impl SttClient {
    /// A client of the service `config` describes, recording into `metrics`.
    pub fn new(config: SttConfig, metrics: Arc<Metrics>) -> Result<Self, BuildError> {
        Ok(Self {
            client: http_client()?,
            config,
            metrics,
        })
    }

    /// The model asked for.
    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// The text spoken in `audio`; an empty string when nothing was made out.
    pub async fn transcribe(&self, audio: Audio) -> Result<String, ProviderError> {
        let started = Instant::now();
        let seconds = audio.seconds;
        self.metrics.stt().attempt();
        let result = self.request(audio).await;
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => self.metrics.stt().success(seconds, elapsed),
            Err(e) => self.metrics.stt().error(e.kind()),
        }
        if let Err(e) = &result {
            tracing::warn!(error = %e, elapsed_ms = elapsed.as_millis() as u64, "transcription failed");
        }
        result
    }

    async fn request(&self, audio: Audio) -> Result<String, ProviderError> {
        let url = endpoint(&self.config.base_url, "audio/transcriptions")
            .map_err(ProviderError::Malformed)?;
        // Telegram's MIME type is the sender's word: an odd one is not worth a failure.
        let mime = if is_plain_mime(&audio.mime) {
            audio.mime
        } else {
            "application/octet-stream".to_string()
        };
        let file = Part::bytes(audio.bytes)
            .file_name(audio.file_name)
            .mime_str(&mime)
            .map_err(|e| ProviderError::Malformed(e.to_string()))?;
        let form = Form::new()
            .part("file", file)
            .text("model", self.config.model.clone())
            .text("response_format", "json");
        let mut request = self
            .client
            .post(url)
            .multipart(form)
            .timeout(self.config.timeout);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = cloud::send(request).await?;
        let body = cloud::read_bounded(response, MAX_TRANSCRIPT_BODY).await?;
        parse_transcript(&body)
    }
}

/// The `text` of a transcription response: `{"text": "…"}` (`json` and `verbose_json`).
pub fn parse_transcript(body: &[u8]) -> Result<String, ProviderError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| ProviderError::Malformed("the transcription is not JSON".into()))?;
    value
        .get("text")
        .and_then(serde_json::Value::as_str)
        .map(|text| text.trim().to_string())
        .ok_or_else(|| ProviderError::Malformed("the transcription has no `text`".into()))
}

/// `type/subtype` in plain characters.
fn is_plain_mime(mime: &str) -> bool {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'))
    };
    mime.split_once('/')
        .is_some_and(|(kind, sub)| plain(kind) && plain(sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_are_read_and_garbage_is_malformed() {
        assert_eq!(
            parse_transcript(br#"{"text":" hi there "}"#).unwrap(),
            "hi there"
        );
        assert_eq!(
            parse_transcript(br#"{"text":"x","segments":[],"language":"ru"}"#).unwrap(),
            "x"
        );
        assert!(matches!(
            parse_transcript(b"<html>oops</html>"),
            Err(ProviderError::Malformed(_))
        ));
        assert!(matches!(
            parse_transcript(br#"{"transcript":"x"}"#),
            Err(ProviderError::Malformed(_))
        ));
    }
}
