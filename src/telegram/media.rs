//! Files in messages: which attachment a message carries ([`attachment`]) and fetching it
//! from Telegram ([`download`]: `getFile`, then `GET {api}/file/bot<token>/<file_path>`),
//! never more than a bound. Bots may download files up to 20 MB
//! ([`TELEGRAM_DOWNLOAD_LIMIT`]); a bigger one is refused before any call.
//!
//! The token is part of the download URL: teloxide hides it in the errors it returns, and
//! nothing here logs a URL.

use futures::StreamExt;
use teloxide::types::{FileId, Message};

use super::api::{ApiCallError, TelegramApi};

/// The largest file the Bot API lets a bot download.
pub const TELEGRAM_DOWNLOAD_LIMIT: u64 = 20 * 1024 * 1024;

/// What kind of file a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentKind {
    /// A voice note (OGG/Opus).
    Voice,
    /// An audio file (sent as music, or a document whose type is audio).
    Audio,
    /// A round video note (MP4): its sound is transcribed.
    VideoNote,
    /// Any other file: read as text when it is text.
    Document,
}

impl AttachmentKind {
    /// Whether its sound is transcribed (rather than its bytes read).
    pub fn is_audio(self) -> bool {
        !matches!(self, AttachmentKind::Document)
    }

    /// A short label for logs.
    pub fn label(self) -> &'static str {
        match self {
            AttachmentKind::Voice => "voice",
            AttachmentKind::Audio => "audio",
            AttachmentKind::VideoNote => "video_note",
            AttachmentKind::Document => "document",
        }
    }
}

/// A file attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// What it is.
    pub kind: AttachmentKind,
    /// Telegram's id, for `getFile`.
    pub file_id: String,
    /// Its size in bytes, when Telegram said.
    pub size: Option<u64>,
    /// Its length in seconds (sound and video).
    pub seconds: Option<u32>,
    /// The file name to show and to send on (always set: a default per kind).
    pub name: String,
    /// Its MIME type, when Telegram said.
    pub mime: Option<String>,
}

/// teloxide's stand-in for a missing `file_size`.
fn size(meta: &teloxide::types::FileMeta) -> Option<u64> {
    (meta.size != u32::MAX).then_some(u64::from(meta.size))
}

/// The file `message` carries, if it is one we can use.
pub fn attachment(message: &Message) -> Option<Attachment> {
    if let Some(voice) = message.voice() {
        return Some(Attachment {
            kind: AttachmentKind::Voice,
            file_id: voice.file.id.0.clone(),
            size: size(&voice.file),
            seconds: Some(voice.duration.seconds()),
            name: "voice.ogg".into(),
            mime: Some(
                voice
                    .mime_type
                    .as_ref()
                    .map_or_else(|| "audio/ogg".into(), ToString::to_string),
            ),
        });
    }
    if let Some(audio) = message.audio() {
        return Some(Attachment {
            kind: AttachmentKind::Audio,
            file_id: audio.file.id.0.clone(),
            size: size(&audio.file),
            seconds: Some(audio.duration.seconds()),
            name: audio
                .file_name
                .clone()
                .unwrap_or_else(|| "audio.mp3".into()),
            mime: audio.mime_type.as_ref().map(ToString::to_string),
        });
    }
    if let Some(note) = message.video_note() {
        return Some(Attachment {
            kind: AttachmentKind::VideoNote,
            file_id: note.file.id.0.clone(),
            size: size(&note.file),
            seconds: Some(note.duration.seconds()),
            name: "video_note.mp4".into(),
            mime: Some("video/mp4".into()),
        });
    }
    let document = message.document()?;
    let mime = document.mime_type.as_ref().map(ToString::to_string);
    let kind = if mime.as_deref().is_some_and(|m| m.starts_with("audio/")) {
        AttachmentKind::Audio
    } else {
        AttachmentKind::Document
    };
    Some(Attachment {
        kind,
        file_id: document.file.id.0.clone(),
        size: size(&document.file),
        seconds: None,
        name: document
            .file_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "file".into()),
        mime,
    })
}

/// Whether `message` is a photo (answered by its caption, if any).
pub fn is_photo(message: &Message) -> bool {
    message.photo().is_some()
}

/// Why a file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Bigger than allowed (Telegram's 20 MB, or our own bound).
    #[error("the file is larger than {limit} bytes")]
    TooBig {
        /// The bound it broke.
        limit: u64,
    },
    /// `getFile` failed.
    #[error("getFile failed: {0}")]
    GetFile(#[from] ApiCallError),
    /// The transfer failed.
    #[error("downloading the file failed: {0}")]
    Transfer(String),
}

/// Fetches `attachment` whole, refusing more than `limit` bytes (and more than Telegram
/// lets bots download).
pub async fn download(
    api: &TelegramApi,
    attachment: &Attachment,
    limit: u64,
) -> Result<Vec<u8>, DownloadError> {
    let limit = limit.min(TELEGRAM_DOWNLOAD_LIMIT);
    if attachment.size.is_some_and(|size| size > limit) {
        return Err(DownloadError::TooBig { limit });
    }
    let file = match api.get_file(FileId(attachment.file_id.clone())).await {
        Ok(file) => file,
        // Telegram's answer for a file past what bots may download.
        Err(ApiCallError::Refused(why)) if why.contains("too big") => {
            return Err(DownloadError::TooBig { limit });
        }
        Err(e) => return Err(e.into()),
    };
    if u64::from(file.meta.size) > limit && file.meta.size != u32::MAX {
        return Err(DownloadError::TooBig { limit });
    }
    let mut stream = api.download_stream(&file.path);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| DownloadError::Transfer(e.to_string()))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(DownloadError::TooBig { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
