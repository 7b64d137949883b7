//! The stage between a Telegram message and the responder for what is not plain typed
//! text: the message replied to ([`reply_context`]), voice notes, audio and video notes
//! (downloaded, transcribed by the [`SttClient`]), files (downloaded, read by
//! [`document`]) and photo captions. The hub calls [`Inputs::prepare`] in the
//! conversation's worker, so these run in the chat's order; the responder still sees only
//! a message: the question, with its context as text.
//!
//! # What goes into the question (and so into the stored turn)
//! - a reply: "In reply to this message from Ann:" and the replied text, quoted line by
//!   line (its transcript, or its file fenced, when it is a voice note or a file);
//! - a voice note: its transcript (shown to the user first, as a separate message);
//! - a file: its text fenced with its name, then the caption as the question. A file
//!   without a caption is kept as a turn of its own ("what should I do with it?"), so the
//!   next message can ask about it — after a restart too;
//! - a photo: a note that the model cannot see it, then the caption.
//!
//! Everything that goes wrong gets one polite, specific reply and nothing reaches the
//! model: no speech-to-text configured (said once per chat per day), a recording too long
//! or too big, the service down, slow, rate limited or answering nonsense, a binary or
//! oversized file.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use teloxide::types::{Update, UpdateKind};

use super::api::TelegramApi;
use super::document;
use super::incoming::{BotIdentity, Origin};
use super::media::{self, Attachment, DownloadError, TELEGRAM_DOWNLOAD_LIMIT};
use super::reply_context::{self, Replied};
use crate::config::InputConfig;
use crate::conversation::NewTurn;
use crate::i18n;
use crate::providers::stt::{Audio, SttClient};
use crate::responder::Responder;

/// How long a chat told that voice needs speech-to-text is not told again.
const NO_STT_QUIET: Duration = Duration::from_secs(24 * 3600);
/// Chats remembered as told (beyond it the oldest are forgotten).
const NO_STT_CHATS: usize = 10_000;
/// Characters per token assumed when sizing a file to the context window (Russian text
/// runs about 2.5, English about 4).
const CHARS_PER_TOKEN: usize = 3;

/// What a message brings besides its text, found when it is dispatched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The text or caption (a command's arguments, the mention stripped); may be empty.
    pub text: String,
    /// The message's own file.
    pub attachment: Option<Attachment>,
    /// The message it replies to.
    pub replied: Option<Replied>,
    /// Whether it is a photo (answered by its caption).
    pub photo: bool,
}

impl Request {
    /// The request of the message in `update`, whose question text is `text`.
    pub fn new(text: String, update: &Update, me: &BotIdentity) -> Self {
        let message = match &update.kind {
            UpdateKind::Message(m) | UpdateKind::EditedMessage(m) => m,
            _ => {
                return Self {
                    text,
                    ..Self::default()
                };
            }
        };
        Self {
            text,
            attachment: media::attachment(message),
            replied: reply_context::replied(message, me),
            photo: media::is_photo(message),
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Ask the model `question`, after sending `notice` (a transcript, the photo note).
    Ask {
        /// The whole question, context included.
        question: String,
        /// A message for the user before the answer.
        notice: Option<String>,
    },
    /// Answer with this text only.
    Say(String),
    /// Nothing to send (the chat was already told voice is not available).
    Nothing,
}

/// The inputs stage: speech to text, limits, and whom it told what.
pub struct Inputs {
    stt: Option<SttClient>,
    config: InputConfig,
    /// Tokens of a prompt, without the reply's: what a file may fill at most.
    prompt_room_tokens: usize,
    /// Chats told that voice needs speech-to-text, and when.
    told_no_stt: Mutex<HashMap<i64, Instant>>,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("stt", &self.stt)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A short failure to say instead of answering.
type Stop = Prepared;

impl Inputs {
    /// The stage for `config`, transcribing with `stt`; a file may fill at most
    /// `prompt_room_tokens` (the context window less the reply's tokens).
    pub fn new(config: InputConfig, stt: Option<SttClient>, prompt_room_tokens: usize) -> Self {
        Self {
            stt,
            config,
            prompt_room_tokens,
            told_no_stt: Mutex::new(HashMap::new()),
        }
    }

    /// Turns `request` into a question, or into the reply that replaces an answer.
    pub async fn prepare(
        &self,
        api: &TelegramApi,
        origin: &Origin,
        request: &Request,
        responder: &Responder,
    ) -> Prepared {
        match self.question(api, origin, request, responder).await {
            Ok(prepared) | Err(prepared) => prepared,
        }
    }

    async fn question(
        &self,
        api: &TelegramApi,
        origin: &Origin,
        request: &Request,
        responder: &Responder,
    ) -> Result<Prepared, Stop> {
        let lang = origin.lang;
        let mut parts = Vec::new();
        let mut notice = None;
        if let Some(replied) = &request.replied {
            parts.push(self.replied_block(api, origin, replied, responder).await?);
        }
        let mut text = request.text.trim().to_string();
        match &request.attachment {
            Some(attachment) if attachment.kind.is_audio() => {
                let transcript = self.transcribe(api, origin, attachment).await?;
                notice = Some(i18n::heard(lang, &transcript));
                // The transcript is the question; a caption, if any, follows it.
                text = [transcript, text]
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n\n");
            }
            Some(attachment) => {
                let file = self.read(api, origin, attachment, responder).await?;
                if text.is_empty() && request.replied.is_none() {
                    return Err(self.keep(origin, file, attachment, responder).await);
                }
                parts.push(file);
            }
            None if request.photo => {
                notice = Some(i18n::cannot_see_images(lang).to_string());
                text = format!("{}\n{text}", i18n::photo_for_model(lang));
            }
            None => {}
        }
        if !text.is_empty() {
            parts.push(text);
        }
        if parts.is_empty() {
            return Err(Prepared::Say(i18n::empty_hint(lang).to_string()));
        }
        Ok(Prepared::Ask {
            question: parts.join("\n\n"),
            notice,
        })
    }

    /// The context block of the message replied to; its voice note transcribed, its file
    /// read.
    async fn replied_block(
        &self,
        api: &TelegramApi,
        origin: &Origin,
        replied: &Replied,
        responder: &Responder,
    ) -> Result<String, Stop> {
        let lang = origin.lang;
        match &replied.attachment {
            Some(attachment) if attachment.kind.is_audio() => {
                let transcript = self.transcribe(api, origin, attachment).await?;
                let content = [replied.text.trim(), transcript.as_str()]
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n\n");
                Ok(reply_context::render(replied, &content, lang))
            }
            Some(attachment) => {
                let file = self.read(api, origin, attachment, responder).await?;
                Ok(format!(
                    "{}\n\n{file}",
                    reply_context::render(replied, &replied.text, lang)
                ))
            }
            None => Ok(reply_context::render(replied, &replied.text, lang)),
        }
    }

    /// The text spoken in `attachment`.
    async fn transcribe(
        &self,
        api: &TelegramApi,
        origin: &Origin,
        attachment: &Attachment,
    ) -> Result<String, Stop> {
        let lang = origin.lang;
        let started = Instant::now();
        let Some(stt) = &self.stt else {
            return Err(self.no_stt(origin));
        };
        let seconds = attachment.seconds.unwrap_or(0);
        if seconds > self.config.voice_max_seconds {
            return Err(Prepared::Say(i18n::voice_too_long(
                lang,
                seconds,
                self.config.voice_max_seconds,
            )));
        }
        let bytes = match media::download(api, attachment, TELEGRAM_DOWNLOAD_LIMIT).await {
            Ok(bytes) => bytes,
            Err(DownloadError::TooBig { .. }) => {
                return Err(Prepared::Say(i18n::audio_too_big(lang).into()));
            }
            Err(e) => {
                tracing::warn!(chat = origin.chat_id, error = %e, "cannot download a recording");
                return Err(Prepared::Say(i18n::download_failed(lang).into()));
            }
        };
        let audio = Audio {
            bytes,
            file_name: attachment.name.clone(),
            mime: attachment
                .mime
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
            seconds,
        };
        let transcript = stt
            .transcribe(audio)
            .await
            .map_err(|_| Prepared::Say(i18n::transcription_failed(lang).into()))?;
        if transcript.trim().is_empty() {
            return Err(Prepared::Say(i18n::no_speech(lang).into()));
        }
        tracing::info!(
            chat = origin.chat_id,
            kind = attachment.kind.label(),
            seconds,
            chars = transcript.chars().count(),
            // What a voice note adds before the model is asked: download and transcription.
            elapsed_ms = started.elapsed().as_millis() as u64,
            "transcribed"
        );
        Ok(transcript)
    }

    /// Says that voice needs speech-to-text, once per chat a day.
    fn no_stt(&self, origin: &Origin) -> Stop {
        let now = Instant::now();
        let mut told = self.told_no_stt.lock().unwrap_or_else(|e| e.into_inner());
        if told
            .get(&origin.chat_id)
            .is_some_and(|at| now.duration_since(*at) < NO_STT_QUIET)
        {
            tracing::info!(
                chat = origin.chat_id,
                "voice message without speech-to-text; the chat was told already"
            );
            return Prepared::Nothing;
        }
        if told.len() >= NO_STT_CHATS {
            told.retain(|_, at| now.duration_since(*at) < NO_STT_QUIET);
            if told.len() >= NO_STT_CHATS {
                told.clear();
            }
        }
        told.insert(origin.chat_id, now);
        Prepared::Say(i18n::voice_needs_stt(origin.lang).into())
    }

    /// The file's text fenced with its name, sized to what the window leaves after the
    /// conversation's history.
    async fn read(
        &self,
        api: &TelegramApi,
        origin: &Origin,
        attachment: &Attachment,
        responder: &Responder,
    ) -> Result<String, Stop> {
        let lang = origin.lang;
        let name = shown_name(&attachment.name);
        let max = self.config.document_max_bytes;
        let bytes = match media::download(api, attachment, max).await {
            Ok(bytes) => bytes,
            Err(DownloadError::TooBig { .. }) => {
                return Err(Prepared::Say(i18n::file_too_big(lang, &name, max)));
            }
            Err(e) => {
                tracing::warn!(chat = origin.chat_id, error = %e, "cannot download a file");
                return Err(Prepared::Say(i18n::download_failed(lang).into()));
            }
        };
        let size = bytes.len();
        // PDF parsing is CPU work: off the async workers.
        let extracted = tokio::task::spawn_blocking(move || document::extract(&bytes))
            .await
            .unwrap_or(Err(document::Unreadable::NotText));
        let file = match extracted {
            Ok(file) => file,
            Err(why) => {
                tracing::info!(chat = origin.chat_id, bytes = size, reason = ?why, "file not readable as text");
                return Err(Prepared::Say(i18n::file_unreadable(lang, &name, why)));
            }
        };
        let max_chars = self.file_chars(origin, responder).await;
        tracing::info!(
            chat = origin.chat_id,
            bytes = size,
            format = file.format.label(),
            chars = file.text.chars().count(),
            max_chars,
            "file read"
        );
        Ok(document::fenced(&name, &file.text, max_chars))
    }

    /// The characters a file may fill: the prompt's room less the stored history, and at
    /// least a quarter of the room (the engine then drops the oldest turns).
    async fn file_chars(&self, origin: &Origin, responder: &Responder) -> usize {
        let room = self.prompt_room_tokens * CHARS_PER_TOKEN;
        let history: usize = match responder.store().history(origin.conversation()).await {
            Ok(turns) => turns
                .iter()
                .map(|t| t.user.chars().count() + t.assistant.chars().count())
                .sum(),
            Err(_) => 0,
        };
        room.saturating_sub(history).max(room / 4)
    }

    /// A file without a question: its text is kept as a turn of its own, answered by
    /// "what should I do with it?", so the next message can ask about it.
    async fn keep(
        &self,
        origin: &Origin,
        file: String,
        attachment: &Attachment,
        responder: &Responder,
    ) -> Prepared {
        let answer = i18n::file_kept(origin.lang, &shown_name(&attachment.name));
        let key = origin.conversation();
        let source = Some(i64::from(origin.message_id.0));
        // Read again after a crash before the update was marked answered: one turn.
        let replaces = match responder.store().history(key).await {
            Ok(turns) => turns
                .last()
                .filter(|last| last.source == source)
                .map(|last| last.id),
            Err(_) => None,
        };
        let turn = NewTurn {
            user: file,
            assistant: answer.clone(),
            source,
            replaces,
        };
        match responder.store().commit(key, turn).await {
            Ok(_) => Prepared::Say(answer),
            Err(e) => {
                tracing::error!(chat = origin.chat_id, error = %e, "cannot keep a file in the history");
                Prepared::Say(i18n::history_unavailable(origin.lang).into())
            }
        }
    }
}

/// A file name as shown to the user: one line, at most 100 characters.
fn shown_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(100)
        .collect();
    let name = name.trim();
    if name.is_empty() {
        "file".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A shown file name is one line, short, never empty.
        #[test]
        fn shown_names_are_one_short_line(name in "\\PC{0,300}|[\\x00-\\x1f]{0,10}") {
            let shown = shown_name(&name);
            prop_assert!(!shown.is_empty());
            prop_assert!(shown.chars().count() <= 100);
            prop_assert!(!shown.chars().any(char::is_control));
        }
    }
}
