//! What an update asks of the bot: commands, questions, things it cannot read, things not
//! meant for it. Pure: decided from the update, the bot's own identity and the access list.
//!
//! Groups: the bot answers only when addressed — a command of ours, an `@mention` of the
//! bot (stripped from the text), or a reply to one of its messages. With BotFather's
//! privacy mode on, Telegram delivers only those anyway (plain mentions excepted).

use teloxide::types::{
    ChatKind, Message, MessageId, MessageKind, PublicChatKind, ThreadId, Update, UpdateKind,
};

use super::{media, reply_context};
use crate::config::AllowedUser;
use crate::conversation::ConversationKey;
use crate::i18n::Lang;

/// Who the bot is, from `getMe`.
#[derive(Debug, Clone)]
pub struct BotIdentity {
    /// The bot's user id.
    pub id: u64,
    /// The bot's username, without `@`.
    pub username: String,
}

/// A command of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/start`.
    Start,
    /// `/help`.
    Help,
    /// `/reset` or `/new`.
    Reset,
    /// `/retry`.
    Retry,
    /// `/stop`.
    Stop,
    /// `/stats`.
    Stats,
    /// `/stats all`: the owner's view (admins only).
    StatsAll,
    /// `/mode`: the persona menu.
    Mode,
    /// `/system [text|reset]`: this conversation's system prompt.
    System(String),
    /// `/usage`: the sender's own figures.
    Usage,
    /// `/allow <who>` (admins only).
    Allow(String),
    /// `/deny <who>` (admins only).
    Deny(String),
}

/// What to do with an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Not for us: say nothing.
    Ignore,
    /// The sender may not use the bot: a short refusal.
    Refuse,
    /// A command.
    Command(Command),
    /// A question for the model (mention stripped).
    Ask(String),
    /// Empty or whitespace-only text: a hint.
    Empty,
    /// A sticker, a photo without caption, a location…: only text (and what `inputs`
    /// reads) is supported.
    NotText,
    /// An edited message: not answered again.
    Edited,
}

/// Where to answer and in which language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The chat.
    pub chat_id: i64,
    /// The forum topic to answer in, if the message was in one.
    pub thread: Option<ThreadId>,
    /// The message answered (replied to in groups).
    pub message_id: MessageId,
    /// Whether this is a private chat (pacing and reply style differ).
    pub private: bool,
    /// The sender's language.
    pub lang: Lang,
}

impl Origin {
    /// The conversation this message belongs to.
    pub fn conversation(&self) -> ConversationKey {
        ConversationKey {
            chat: self.chat_id,
            topic: self.thread.map(|t| t.0.0),
        }
    }
}

impl Action {
    /// A short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Ignore => "ignore",
            Action::Refuse => "refuse",
            Action::Command(_) => "command",
            Action::Ask(_) => "ask",
            Action::Empty => "empty",
            Action::NotText => "not_text",
            Action::Edited => "edited",
        }
    }
}

/// An update understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Where it came from; `None` for updates without a chat (never answered).
    pub origin: Option<Origin>,
    /// What to do.
    pub action: Action,
}

/// Decides what `update` asks for.
pub fn classify(update: &Update, me: &BotIdentity, allowed: &[AllowedUser]) -> Incoming {
    let (message, edited) = match &update.kind {
        UpdateKind::Message(m) => (m, false),
        UpdateKind::EditedMessage(m) => (m, true),
        _ => {
            return Incoming {
                origin: None,
                action: Action::Ignore,
            };
        }
    };
    let private = matches!(message.chat.kind, ChatKind::Private(_));
    let group = matches!(
        &message.chat.kind,
        ChatKind::Public(p) if !matches!(p.kind, PublicChatKind::Channel(_))
    );
    let origin = Origin {
        chat_id: message.chat.id.0,
        thread: if message.is_topic_message {
            message.thread_id
        } else {
            None
        },
        message_id: message.id,
        private,
        lang: Lang::from_code(
            message
                .from
                .as_ref()
                .and_then(|u| u.language_code.as_deref()),
        ),
    };
    let action = decide(message, edited, private, group, me, allowed);
    Incoming {
        origin: Some(origin),
        action,
    }
}

fn decide(
    message: &Message,
    edited: bool,
    private: bool,
    group: bool,
    me: &BotIdentity,
    allowed: &[AllowedUser],
) -> Action {
    let Some(from) = message.from.as_ref() else {
        return Action::Ignore;
    };
    if from.is_bot || !(private || group) {
        return Action::Ignore;
    }
    if !matches!(message.kind, MessageKind::Common(_)) {
        // Service messages: members joining, pins, topic changes…
        return Action::Ignore;
    }
    let replied_to_bot = message
        .reply_to_message()
        .and_then(|m| m.from.as_ref())
        .is_some_and(|u| u.id.0 == me.id);
    let text = message.text().or_else(|| message.caption());
    // In groups, find out whether the message is for us, and strip the mention.
    let (addressed, text) = match text {
        Some(text) if !private => match strip_mention(text, &me.username) {
            Some(stripped) => (true, Some(stripped)),
            None => (
                replied_to_bot || command_for_us(text, &me.username),
                Some(text.to_string()),
            ),
        },
        other => (private || replied_to_bot, other.map(str::to_string)),
    };
    if !addressed {
        return Action::Ignore;
    }
    if !is_allowed(allowed, from.id.0, from.username.as_deref()) {
        return Action::Refuse;
    }
    if edited {
        return Action::Edited;
    }
    // Voice notes, files and captioned photos are read (`inputs`); a reply or a file is
    // something to answer even without words of its own.
    let readable = media::attachment(message).is_some()
        || (media::is_photo(message) && text.as_deref().is_some_and(|t| !t.trim().is_empty()));
    if message.text().is_none() && !readable {
        return Action::NotText;
    }
    let has_content = readable || reply_context::replied(message, me).is_some();
    let text = text.unwrap_or_default();
    match parse_command(&text, &me.username) {
        Some(Parsed::Ours(command)) => Action::Command(command),
        Some(Parsed::Ask(question)) if question.trim().is_empty() && !has_content => Action::Empty,
        Some(Parsed::Ask(question)) => Action::Ask(question),
        Some(Parsed::OtherBot) => Action::Ignore,
        Some(Parsed::Unknown) | None if text.trim().is_empty() && !has_content => Action::Empty,
        Some(Parsed::Unknown) | None => Action::Ask(text.trim().to_string()),
    }
}

/// Whether a user may talk to the bot (an empty list lets everyone).
pub fn is_allowed(allowed: &[AllowedUser], id: u64, username: Option<&str>) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|entry| match entry {
            AllowedUser::Id(allowed_id) => *allowed_id == id,
            AllowedUser::Username(name) => username.is_some_and(|u| u.eq_ignore_ascii_case(name)),
        })
}

/// The text without `@username` if it mentions the bot; `None` if it does not.
///
/// Matching walks the original text character by character (Telegram usernames are
/// ASCII, compared without case), so every cut falls on a character boundary of the text
/// itself: no offset is ever carried over from a case-mapped copy, whose byte lengths can
/// differ (`İ`, the Kelvin sign, the ohm sign). A mention is `@name` not preceded by a
/// word character and not followed by one.
pub fn strip_mention(text: &str, username: &str) -> Option<String> {
    if username.is_empty() {
        return None;
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    let mut previous: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c == '@' && !previous.is_some_and(is_word) {
            // Try to match the username right after the `@`.
            let mut lookahead = chars.clone();
            let matched = username.chars().all(|want| {
                lookahead
                    .next()
                    .is_some_and(|(_, got)| got.eq_ignore_ascii_case(&want))
            });
            let word_end = !lookahead.peek().is_some_and(|&(_, next)| is_word(next));
            if matched && word_end {
                found = true;
                chars = lookahead;
                previous = Some('@');
                continue;
            }
        }
        out.push(c);
        previous = Some(c);
    }
    if !found {
        return None;
    }
    let cleaned = out.trim().trim_start_matches([',', ':']).trim().to_string();
    Some(cleaned)
}

enum Parsed {
    Ours(Command),
    Ask(String),
    Unknown,
    OtherBot,
}

/// Whether `text` starts with one of our commands meant for us (no `@` or our name).
fn command_for_us(text: &str, username: &str) -> bool {
    matches!(
        parse_command(text, username),
        Some(Parsed::Ours(_) | Parsed::Ask(_))
    )
}

fn parse_command(text: &str, username: &str) -> Option<Parsed> {
    let body = text.trim_start().strip_prefix('/')?;
    let (word, args) = match body.find(char::is_whitespace) {
        Some(i) => (&body[..i], body[i..].trim()),
        None => (body, ""),
    };
    let (name, target) = match word.split_once('@') {
        Some((name, target)) => (name, Some(target)),
        None => (word, None),
    };
    if target.is_some_and(|t| !t.eq_ignore_ascii_case(username)) {
        return Some(Parsed::OtherBot);
    }
    Some(match name.to_ascii_lowercase().as_str() {
        "start" => Parsed::Ours(Command::Start),
        "help" => Parsed::Ours(Command::Help),
        "reset" | "new" => Parsed::Ours(Command::Reset),
        "retry" => Parsed::Ours(Command::Retry),
        "stop" => Parsed::Ours(Command::Stop),
        "stats" if args.eq_ignore_ascii_case("all") => Parsed::Ours(Command::StatsAll),
        "stats" => Parsed::Ours(Command::Stats),
        "mode" => Parsed::Ours(Command::Mode),
        "system" => Parsed::Ours(Command::System(args.to_string())),
        "usage" => Parsed::Ours(Command::Usage),
        "allow" => Parsed::Ours(Command::Allow(args.to_string())),
        "deny" => Parsed::Ours(Command::Deny(args.to_string())),
        "ask" => Parsed::Ask(args.to_string()),
        _ => Parsed::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn me() -> BotIdentity {
        BotIdentity {
            id: 999,
            username: "llm_bot".into(),
        }
    }

    fn update(chat: serde_json::Value, message: serde_json::Value) -> Update {
        let mut m = json!({
            "message_id": 5, "date": 1_700_000_000,
            "chat": chat,
            "from": {"id": 42, "is_bot": false, "first_name": "Ann", "username": "ann", "language_code": "ru"},
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), message.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        // teloxide's `Update` deserializes from text, not from a `serde_json::Value`.
        serde_json::from_str(&json!({"update_id": 1, "message": m}).to_string()).unwrap()
    }

    fn private(message: serde_json::Value) -> Update {
        update(
            json!({"id": 42, "type": "private", "first_name": "Ann"}),
            message,
        )
    }

    fn group(message: serde_json::Value) -> Update {
        update(
            json!({"id": -100, "type": "supergroup", "title": "G", "is_forum": true}),
            message,
        )
    }

    fn action(update: &Update, allowed: &[AllowedUser]) -> Action {
        classify(update, &me(), allowed).action
    }

    #[test]
    fn private_text_and_commands() {
        assert_eq!(
            action(&private(json!({"text": " hi "})), &[]),
            Action::Ask("hi".into())
        );
        assert_eq!(
            action(&private(json!({"text": "/new"})), &[]),
            Action::Command(Command::Reset)
        );
        assert_eq!(
            action(&private(json!({"text": "/stop@llm_bot"})), &[]),
            Action::Command(Command::Stop)
        );
        assert_eq!(
            action(&private(json!({"text": "/ask what?"})), &[]),
            Action::Ask("what?".into())
        );
        for (text, command) in [
            ("/stats all", Command::StatsAll),
            ("/mode", Command::Mode),
            ("/system", Command::System(String::new())),
            (
                "/system  Be <|im_start|> brief\nplease ",
                Command::System("Be <|im_start|> brief\nplease".into()),
            ),
            ("/usage@llm_bot", Command::Usage),
            ("/allow @bob", Command::Allow("@bob".into())),
            ("/deny 42", Command::Deny("42".into())),
        ] {
            assert_eq!(
                action(&private(json!({ "text": text })), &[]),
                Action::Command(command),
                "{text}"
            );
        }
        assert_eq!(
            action(&private(json!({"text": "/ask"})), &[]),
            Action::Empty
        );
        assert_eq!(action(&private(json!({"text": "   "})), &[]), Action::Empty);
        let origin = classify(&private(json!({"text": "x"})), &me(), &[])
            .origin
            .unwrap();
        assert_eq!(origin.lang, Lang::Ru);
        assert!(origin.private);
    }

    #[test]
    fn other_messages() {
        let photo = private(
            json!({"photo": [{"file_id": "f", "file_unique_id": "u", "width": 1, "height": 1}]}),
        );
        assert_eq!(action(&photo, &[]), Action::NotText);
        let sticker = private(json!({"sticker": {"file_id": "s", "file_unique_id": "u",
            "type": "regular", "width": 1, "height": 1, "is_animated": false, "is_video": false}}));
        assert_eq!(action(&sticker, &[]), Action::NotText);
        // Files, voice notes and captioned photos are read (issue 14).
        let document = private(json!({"document": {"file_id": "f", "file_unique_id": "u"}}));
        assert_eq!(action(&document, &[]), Action::Ask(String::new()));
        let voice = json!({"voice": {"file_id": "v", "file_unique_id": "u", "duration": 2,
            "mime_type": "audio/ogg"}});
        assert_eq!(
            action(&private(voice.clone()), &[]),
            Action::Ask(String::new())
        );
        assert_eq!(action(&group(voice), &[]), Action::Ignore, "not addressed");
        let captioned = private(json!({"caption": "what is it?",
            "photo": [{"file_id": "f", "file_unique_id": "u", "width": 1, "height": 1}]}));
        assert_eq!(action(&captioned, &[]), Action::Ask("what is it?".into()));
        let mut edited = private(json!({"text": "x", "edit_date": 1_700_000_001}));
        if let UpdateKind::Message(m) = edited.kind.clone() {
            edited.kind = UpdateKind::EditedMessage(m);
        }
        assert_eq!(action(&edited, &[]), Action::Edited);
    }

    #[test]
    fn access_control_by_id_and_username() {
        let msg = private(json!({"text": "hi"}));
        assert_eq!(action(&msg, &[AllowedUser::Id(7)]), Action::Refuse);
        assert_eq!(
            action(&msg, &[AllowedUser::Id(42)]),
            Action::Ask("hi".into())
        );
        assert_eq!(
            action(&msg, &[AllowedUser::Username("ANN".to_lowercase())]),
            Action::Ask("hi".into())
        );
        assert!(is_allowed(&[], 1, None));
        assert!(!is_allowed(&[AllowedUser::Username("ann".into())], 1, None));
    }

    #[test]
    fn groups_answer_only_when_addressed() {
        assert_eq!(
            action(&group(json!({"text": "hello all"})), &[]),
            Action::Ignore
        );
        assert_eq!(
            action(&group(json!({"text": "@LLM_bot what is 2+2?"})), &[]),
            Action::Ask("what is 2+2?".into())
        );
        assert_eq!(
            action(&group(json!({"text": "@llm_bot_fan hi"})), &[]),
            Action::Ignore
        );
        assert_eq!(
            action(&group(json!({"text": "/ask why"})), &[]),
            Action::Ask("why".into())
        );
        assert_eq!(
            action(&group(json!({"text": "/stats@other_bot"})), &[]),
            Action::Ignore
        );
        assert_eq!(
            action(&group(json!({"text": "/unknown"})), &[]),
            Action::Ignore
        );
        let reply = group(json!({"text": "and then?", "reply_to_message": {
            "message_id": 4, "date": 1_700_000_000,
            "chat": {"id": -100, "type": "supergroup", "title": "G"},
            "from": {"id": 999, "is_bot": true, "first_name": "Bot", "username": "llm_bot"},
            "text": "earlier answer"}}));
        assert_eq!(action(&reply, &[]), Action::Ask("and then?".into()));
        // "@bot" or "/ask" alone, replying to someone's message, asks about it.
        let member = json!({"message_id": 3, "date": 1_700_000_000,
            "chat": {"id": -100, "type": "supergroup", "title": "G"},
            "from": {"id": 7, "is_bot": false, "first_name": "Bo"}, "text": "Hallo"});
        for text in ["@llm_bot", "/ask"] {
            let about = group(json!({"text": text, "reply_to_message": member}));
            assert_eq!(action(&about, &[]), Action::Ask(String::new()), "{text}");
        }
        assert_eq!(action(&group(json!({"text": "/ask"})), &[]), Action::Empty);
        // An unlisted user in a group is refused only when addressing the bot.
        assert_eq!(
            action(&group(json!({"text": "chat"})), &[AllowedUser::Id(1)]),
            Action::Ignore
        );
        assert_eq!(
            action(
                &group(json!({"text": "@llm_bot hi"})),
                &[AllowedUser::Id(1)]
            ),
            Action::Refuse
        );
        assert_eq!(
            action(&group(json!({"text": "@llm_bot"})), &[]),
            Action::Empty
        );
    }

    #[test]
    fn forum_topics_key_the_conversation() {
        let msg = group(
            json!({"text": "@llm_bot hi", "message_thread_id": 77, "is_topic_message": true}),
        );
        let origin = classify(&msg, &me(), &[]).origin.unwrap();
        assert_eq!(origin.thread.map(|t| t.0.0), Some(77));
        assert_eq!(
            origin.conversation(),
            ConversationKey {
                chat: -100,
                topic: Some(77)
            }
        );
        assert!(!origin.private);
    }

    #[test]
    fn mention_stripping() {
        assert_eq!(
            strip_mention("@llm_bot, hi there", "llm_bot").as_deref(),
            Some("hi there")
        );
        assert_eq!(
            strip_mention("hey @Llm_Bot how are you", "llm_bot").as_deref(),
            Some("hey  how are you")
        );
        assert_eq!(strip_mention("mail@llm_botx", "llm_bot"), None);
        assert_eq!(strip_mention("no mention", "llm_bot"), None);
        assert_eq!(
            strip_mention("Привет @llm_bot", "llm_bot").as_deref(),
            Some("Привет")
        );
        assert_eq!(strip_mention("mail@llm_bot hi", "llm_bot"), None);
        assert_eq!(
            strip_mention("@llm_bot@LLM_BOT x", "llm_bot").as_deref(),
            Some("x")
        );
    }

    /// Issue 7, found item 1: characters whose lowercase has another UTF-8 length shifted
    /// the offsets used to slice the original text, and the slicing panicked on the poll
    /// loop.
    #[test]
    fn case_mapping_that_changes_length_does_not_break_mentions() {
        for text in [
            "İİİİ @llm_bot what is this?",
            "\u{212A}elvin @LLM_BOT hi \u{2126}hm",
            "@llm_bot İstanbul \u{212A}\u{2126}",
            "ẞ ß İ @llm_bot",
            // İ grows by a byte when lowercased and the Kelvin sign shrinks by two: the
            // lowercased copy kept the length, but its offsets put the cut inside `…`.
            "İİ @llm_bot…\u{212A} what is this?",
        ] {
            let stripped = strip_mention(text, "llm_bot").unwrap();
            assert!(!stripped.to_lowercase().contains("@llm_bot"), "{stripped}");
            let incoming = classify(&group(json!({ "text": text })), &me(), &[]);
            assert!(matches!(incoming.action, Action::Ask(_)), "{text}");
        }
        assert_eq!(
            strip_mention("İ \u{212A} @llm_bot", "llm_bot").as_deref(),
            Some("İ \u{212A}")
        );
        // A username that only matches after Unicode case mapping is not ours.
        assert_eq!(strip_mention("@llm_bo\u{212A}", "llm_bok"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Telegram usernames: 5–32 of `[A-Za-z0-9_]`, starting with a letter.
        fn username() -> impl Strategy<Value = String> {
            "[A-Za-z][A-Za-z0-9_]{4,31}"
        }

        /// Text that leans on the awkward characters: case mappings that change length,
        /// `@`, word characters, combining marks, emoji.
        fn text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    any::<char>(),
                    prop::sample::select(vec![
                        'İ', '\u{212A}', '\u{2126}', 'ẞ', 'ß', 'ﬃ', '@', '_', 'a', ' ', '\u{301}',
                        '😀', 'Σ', 'ς',
                    ]),
                ],
                0..40,
            )
            .prop_map(|chars| chars.into_iter().collect())
        }

        /// Randomly upper- or lower-cases each ASCII letter.
        fn recase(name: &str, mask: u64) -> String {
            name.chars()
                .enumerate()
                .map(|(i, c)| {
                    if mask >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Never panics; whatever it returns is the text's own characters, in order.
            #[test]
            fn never_panics_and_invents_nothing(text in text(), name in username()) {
                if let Some(stripped) = strip_mention(&text, &name) {
                    let mut rest = text.chars();
                    for c in stripped.chars() {
                        prop_assert!(rest.any(|t| t == c), "{c:?} not in {text:?}");
                    }
                }
                // Arbitrary usernames too (the bot's own name comes from getMe).
                let _ = strip_mention(&text, &text);
            }

            /// A mention between arbitrary texts is found in any letter case and removed.
            #[test]
            fn a_mention_is_always_found(before in text(), after in text(), name in username(), mask in any::<u64>()) {
                let message = format!("{before} @{} {after}", recase(&name, mask));
                let stripped = strip_mention(&message, &name);
                prop_assert!(stripped.is_some(), "{message:?}");
                let stripped = stripped.unwrap_or_default();
                let expected_chars = message.chars().count() - name.chars().count() - 1;
                prop_assert!(stripped.chars().count() <= expected_chars);
            }

            /// Text without `@` never mentions anyone.
            #[test]
            fn no_at_sign_no_mention(text in text(), name in username()) {
                let text = text.replace('@', "");
                prop_assert_eq!(strip_mention(&text, &name), None);
            }

            /// Classifying any group or private text never panics.
            #[test]
            fn classify_never_panics(text in text(), private_chat in any::<bool>()) {
                let update = if private_chat {
                    private(json!({ "text": text }))
                } else {
                    group(json!({ "text": text }))
                };
                let _ = classify(&update, &me(), &[]);
            }
        }
    }
}
