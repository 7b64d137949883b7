//! The message a user replies to, as context for the model: who wrote it and its text (or
//! caption), or only the part the user quoted (`quote`, Bot API 7.0+). A reply to a
//! message the bot cannot see (`external_reply`: another chat, another topic) carries only
//! what Telegram sends: the author, the quote, and an attachment. Pure.
//!
//! The replied text is the user's content, like their own message: it goes into the
//! user's turn and is never parsed for control tokens (the engine tokenizes message
//! content with special-token parsing off). It is bounded ([`MAX_REPLIED_CHARS`]) and
//! truncated with the engine's marker.

use teloxide::types::{ExternalReplyInfoKind, Message, MessageKind, MessageOrigin, User};

use super::document::bound;
use super::incoming::BotIdentity;
use super::media::{self, Attachment, AttachmentKind};
use crate::i18n::Lang;

/// The most characters of a replied-to message put into the prompt.
pub const MAX_REPLIED_CHARS: usize = 2000;

/// Who wrote the message replied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Author {
    /// The bot itself (the assistant).
    Bot,
    /// Someone else, by name.
    Named(String),
    /// Telegram did not say.
    Unknown,
}

/// A message replied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replied {
    /// Who wrote it.
    pub author: Author,
    /// Its text or caption, or the quoted part; may be empty (a voice note, a file).
    pub text: String,
    /// Whether `text` is only the part the user quoted.
    pub quoted: bool,
    /// A file it carries that can be read or transcribed.
    pub attachment: Option<Attachment>,
}

impl Replied {
    /// Whether there is anything to put before the question.
    pub fn has_content(&self) -> bool {
        !self.text.trim().is_empty() || self.attachment.is_some()
    }
}

fn user_name(user: &User) -> String {
    let name = user.full_name();
    if name.trim().is_empty() {
        user.username.clone().unwrap_or_default()
    } else {
        name
    }
}

fn author_of(message: &Message, me: &BotIdentity) -> Author {
    if let Some(from) = &message.from {
        if from.id.0 == me.id {
            return Author::Bot;
        }
        return Author::Named(user_name(from));
    }
    match message.sender_chat.as_ref().and_then(|c| c.title()) {
        Some(title) => Author::Named(title.to_string()),
        None => Author::Unknown,
    }
}

fn origin_author(origin: &MessageOrigin, me: &BotIdentity) -> Author {
    match origin {
        MessageOrigin::User { sender_user, .. } if sender_user.id.0 == me.id => Author::Bot,
        MessageOrigin::User { sender_user, .. } => Author::Named(user_name(sender_user)),
        MessageOrigin::HiddenUser {
            sender_user_name, ..
        } => Author::Named(sender_user_name.clone()),
        MessageOrigin::Chat { sender_chat, .. } => sender_chat
            .title()
            .map_or(Author::Unknown, |t| Author::Named(t.to_string())),
        MessageOrigin::Channel { chat, .. } => chat
            .title()
            .map_or(Author::Unknown, |t| Author::Named(t.to_string())),
    }
}

/// The attachment of an external reply, when it is one we read.
fn external_attachment(kind: &ExternalReplyInfoKind) -> Option<Attachment> {
    let (kind, file, seconds, name, mime) = match kind {
        ExternalReplyInfoKind::Voice(v) => (
            AttachmentKind::Voice,
            &v.file,
            Some(v.duration.seconds()),
            "voice.ogg".to_string(),
            Some("audio/ogg".to_string()),
        ),
        ExternalReplyInfoKind::Audio(a) => (
            AttachmentKind::Audio,
            &a.file,
            Some(a.duration.seconds()),
            a.file_name.clone().unwrap_or_else(|| "audio.mp3".into()),
            a.mime_type.as_ref().map(ToString::to_string),
        ),
        ExternalReplyInfoKind::VideoNote(v) => (
            AttachmentKind::VideoNote,
            &v.file,
            Some(v.duration.seconds()),
            "video_note.mp4".to_string(),
            Some("video/mp4".to_string()),
        ),
        ExternalReplyInfoKind::Document(d) => (
            AttachmentKind::Document,
            &d.file,
            None,
            d.file_name.clone().unwrap_or_else(|| "file".into()),
            d.mime_type.as_ref().map(ToString::to_string),
        ),
        _ => return None,
    };
    Some(Attachment {
        kind,
        file_id: file.id.0.clone(),
        size: (file.size != u32::MAX).then_some(u64::from(file.size)),
        seconds,
        name,
        mime,
    })
}

/// The message `message` replies to, if it replies to one with any content.
///
/// In forum topics every message "replies" to the topic's first (service) message; that
/// one has no content and gives `None`.
pub fn replied(message: &Message, me: &BotIdentity) -> Option<Replied> {
    let quote = message
        .quote()
        .map(|q| q.text.clone())
        .filter(|t| !t.trim().is_empty());
    let replied = if let Some(original) = message.reply_to_message() {
        if !matches!(original.kind, MessageKind::Common(_)) {
            return None;
        }
        let whole = original.text().or_else(|| original.caption()).unwrap_or("");
        Replied {
            author: author_of(original, me),
            quoted: quote.is_some(),
            text: quote.unwrap_or_else(|| whole.to_string()),
            attachment: media::attachment(original),
        }
    } else {
        let MessageKind::Common(common) = &message.kind else {
            return None;
        };
        let external = common.external_reply.as_ref()?;
        Replied {
            author: origin_author(&external.origin, me),
            quoted: quote.is_some(),
            text: quote.unwrap_or_default(),
            attachment: external_attachment(&external.kind),
        }
    };
    replied.has_content().then_some(replied)
}

/// The context block put before the user's question: who wrote the message replied to and
/// `content` (its text, its transcript or its file's text), every line quoted with `> `,
/// bounded to [`MAX_REPLIED_CHARS`] (`content` already holds a fenced file when one was
/// read: then it is not bounded again here).
pub fn render(replied: &Replied, content: &str, lang: Lang) -> String {
    let who = match (&replied.author, lang) {
        (Author::Bot, Lang::En) => "you (the assistant)".to_string(),
        (Author::Bot, Lang::Ru) => "ты (ассистент)".to_string(),
        (Author::Named(name), _) => one_line(name),
        (Author::Unknown, Lang::En) => "someone".to_string(),
        (Author::Unknown, Lang::Ru) => "кто-то".to_string(),
    };
    let intro = match (replied.quoted, lang) {
        (false, Lang::En) => format!("In reply to this message from {who}:"),
        (false, Lang::Ru) => format!("В ответ на сообщение, которое написал(а) {who}:"),
        (true, Lang::En) => format!("Quoting this part of a message from {who}:"),
        (true, Lang::Ru) => format!("Цитата из сообщения, которое написал(а) {who}:"),
    };
    let body = bound(content.trim(), MAX_REPLIED_CHARS);
    let mut out = intro;
    for line in body.lines() {
        out.push_str("\n> ");
        out.push_str(line);
    }
    out
}

/// A name on one line, at most 64 characters.
fn one_line(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(64)
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use teloxide::types::{Update, UpdateKind};

    fn me() -> BotIdentity {
        BotIdentity {
            id: 999,
            username: "llm_bot".into(),
        }
    }

    fn message(extra: Value) -> Message {
        let mut m = json!({
            "message_id": 5, "date": 1_700_000_000,
            "chat": {"id": -100, "type": "supergroup", "title": "G"},
            "from": {"id": 42, "is_bot": false, "first_name": "Ann"},
            "text": "translate this",
        });
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        let update: Update =
            serde_json::from_str(&json!({"update_id": 1, "message": m}).to_string()).unwrap();
        match update.kind {
            UpdateKind::Message(m) => m,
            other => panic!("not a message: {other:?}"),
        }
    }

    fn original(from: Value, extra: Value) -> Value {
        let mut m = json!({
            "message_id": 4, "date": 1_700_000_000,
            "chat": {"id": -100, "type": "supergroup", "title": "G"},
            "from": from,
        });
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    }

    #[test]
    fn a_reply_to_another_member_carries_their_text_and_name() {
        let m = message(json!({"reply_to_message": original(
            json!({"id": 7, "is_bot": false, "first_name": "Boris", "last_name": "K"}),
            json!({"text": "Der Hund schläft"}))}));
        let replied = replied(&m, &me()).unwrap();
        assert_eq!(replied.author, Author::Named("Boris K".into()));
        assert_eq!(replied.text, "Der Hund schläft");
        assert!(!replied.quoted);
        let block = render(&replied, &replied.text, Lang::En);
        assert_eq!(
            block,
            "In reply to this message from Boris K:\n> Der Hund schläft"
        );
    }

    #[test]
    fn a_quote_of_the_bots_answer_carries_only_the_quote() {
        let m = message(json!({
            "reply_to_message": original(
                json!({"id": 999, "is_bot": true, "first_name": "Bot", "username": "llm_bot"}),
                json!({"text": "Paris is the capital. Berlin is another."})),
            "quote": {"text": "Berlin is another.", "position": 22, "is_manual": true},
        }));
        let replied = replied(&m, &me()).unwrap();
        assert_eq!(replied.author, Author::Bot);
        assert!(replied.quoted);
        assert_eq!(replied.text, "Berlin is another.");
        assert!(render(&replied, &replied.text, Lang::Ru).starts_with("Цитата из сообщения"));
    }

    #[test]
    fn captions_voice_notes_and_files_count_and_service_messages_do_not() {
        let m = message(json!({"reply_to_message": original(
            json!({"id": 7, "is_bot": false, "first_name": "B"}),
            json!({"voice": {"file_id": "v1", "file_unique_id": "u", "duration": 3, "mime_type": "audio/ogg", "file_size": 2000}}))}));
        let attachment = replied(&m, &me()).unwrap().attachment.unwrap();
        assert_eq!(attachment.kind, AttachmentKind::Voice);
        assert_eq!(attachment.seconds, Some(3));
        let m = message(json!({"reply_to_message": original(
            json!({"id": 7, "is_bot": false, "first_name": "B"}),
            json!({"photo": [{"file_id": "p", "file_unique_id": "u", "width": 1, "height": 1}], "caption": "look"}))}));
        assert_eq!(replied(&m, &me()).unwrap().text, "look");
        let topic_start = message(json!({"reply_to_message": original(
            json!({"id": 7, "is_bot": false, "first_name": "B"}),
            json!({"forum_topic_created": {"name": "T", "icon_color": 7322096}}))}));
        assert_eq!(replied(&topic_start, &me()), None);
        assert_eq!(replied(&message(json!({})), &me()), None);
    }

    #[test]
    fn an_external_reply_uses_what_telegram_sends() {
        let m = message(json!({
            "external_reply": {
                "origin": {"type": "user", "date": 1_700_000_000,
                           "sender_user": {"id": 8, "is_bot": false, "first_name": "Vera"}},
                "chat": {"id": -200, "type": "supergroup", "title": "Other"},
                "message_id": 11,
                "document": {"file_id": "d1", "file_unique_id": "u", "file_name": "notes.txt", "file_size": 10},
            },
            "quote": {"text": "the quoted words", "position": 0},
        }));
        let replied = replied(&m, &me()).unwrap();
        assert_eq!(replied.author, Author::Named("Vera".into()));
        assert_eq!(replied.text, "the quoted words");
        assert_eq!(replied.attachment.unwrap().name, "notes.txt");
    }

    #[test]
    fn long_replied_text_is_bounded_with_the_marker() {
        let replied = Replied {
            author: Author::Unknown,
            text: String::new(),
            quoted: false,
            attachment: None,
        };
        let long = "слово ".repeat(2000);
        let block = render(&replied, &long, Lang::En);
        assert!(block.contains("message truncated"), "{block}");
        assert!(block.chars().count() < MAX_REPLIED_CHARS + 200);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Text leaning on control-token spellings and odd Unicode.
        fn hostile() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    any::<char>().prop_map(|c| c.to_string()),
                    prop::sample::select(vec![
                        "<s>",
                        "</s>",
                        "[INST]",
                        "[/INST]",
                        "<|im_start|>",
                        "<|im_end|>",
                        "<|endoftext|>",
                        "<|eot_id|>",
                        "<start_of_turn>",
                        "\u{202E}",
                        "\u{200D}",
                        "\u{0301}",
                        "İ",
                        "\u{FEFF}",
                        "\r\n",
                        "\n",
                        "> ",
                        "```",
                    ])
                    .prop_map(str::to_string),
                ],
                0..60,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            /// Any replied text and author name: no panic, the block starts with its
            /// intro, every following line is quoted, and it stays bounded.
            #[test]
            fn any_replied_text_renders_quoted_and_bounded(text in hostile(), name in hostile(), quoted in any::<bool>()) {
                let replied = Replied {
                    author: Author::Named(name),
                    text: text.clone(),
                    quoted,
                    attachment: None,
                };
                for lang in [Lang::En, Lang::Ru] {
                    let block = render(&replied, &text, lang);
                    let mut lines = block.split('\n');
                    let intro = lines.next().unwrap_or_default();
                    prop_assert!(intro.ends_with(':'));
                    prop_assert!(lines.all(|l| l.starts_with("> ")));
                    prop_assert!(block.chars().count() <= MAX_REPLIED_CHARS * 2 + 200);
                }
            }
        }
    }
}
