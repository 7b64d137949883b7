//! The updates the bot asks Telegram for, and how they are read.
//!
//! teloxide 0.17 reads updates itself, but it knows neither the `stopped_message_generation`
//! update (Bot API 10.3: the user pressed the stop button of a draft) nor how to ask for it
//! in `allowed_updates`. So `getUpdates` is called with our own list and each update read
//! here: what teloxide can read is read by teloxide; a stop press is kept whole inside
//! [`UpdateKind::Error`] (where teloxide would keep an empty object), so it travels the same
//! durable path as every update (its id confirmed, never fetched twice) and is recognised by
//! [`stopped`]. An update teloxide cannot read at all keeps its id, so the offset still moves
//! past it.
//!
//! # Messages teloxide cannot read
//! teloxide 0.17 fails on some messages the Bot API does send — a voice note without its
//! (optional) `mime_type`, an `external_reply` to a message in another chat — and keeps only
//! the envelope ([`MessageKind::Empty`]) or nothing ([`UpdateKind::Error`]): the user would
//! get no answer at all. Such
//! a message is read again with the fields the bot can do without removed one by one
//! ([`EXPENDABLE`]), down to its text: the user gets an answer (or a polite "can't read
//! this"), and the log says what was left out.

use serde::Deserialize;
use serde_json::Value;
use teloxide::types::{MessageKind, Update, UpdateId, UpdateKind};

/// The update types the bot asks for, polling or by webhook.
pub const ALLOWED_UPDATES: [&str; 4] = [
    "message",
    "edited_message",
    "callback_query",
    STOPPED_GENERATION,
];

/// The key of the update sent when the user presses a draft's stop button.
const STOPPED_GENERATION: &str = "stopped_message_generation";

/// The user pressed the stop button of the draft `draft_id` in `chat` (and thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationStopped {
    /// The chat the draft was shown in.
    pub chat: i64,
    /// The topic, if the draft was shown in one.
    pub thread: Option<i32>,
    /// The draft whose generation the user stopped.
    pub draft_id: i64,
}

/// The `stopped_message_generation` object, as the Bot API sends it.
#[derive(Deserialize)]
struct RawStopped {
    chat: RawChat,
    #[serde(default)]
    message_thread_id: Option<i32>,
    draft_id: i64,
}

#[derive(Deserialize)]
struct RawChat {
    id: i64,
}

/// Message fields the bot can answer without, in the order they are given up when teloxide
/// cannot read a message with them.
const EXPENDABLE: [&str; 9] = [
    "external_reply",
    "quote",
    "link_preview_options",
    "reply_markup",
    "caption_entities",
    "entities",
    "reply_to_message",
    "forward_origin",
    "via_bot",
];

/// The fields a message is answered from when nothing else can be read.
const ESSENTIAL: [&str; 8] = [
    "message_id",
    "date",
    "chat",
    "from",
    "message_thread_id",
    "is_topic_message",
    "text",
    "caption",
];

/// Reads one update of a `getUpdates` answer or a webhook request; `None` only when it has
/// no `update_id` (then there is nothing to confirm or answer).
pub fn read(value: Value) -> Option<Update> {
    let id = value
        .get("update_id")
        .and_then(Value::as_u64)
        .and_then(|id| u32::try_from(id).ok())?;
    let stopped = value.get(STOPPED_GENERATION).cloned();
    // From text, not from the `Value`: teloxide's update reader asks for borrowed keys
    // first, which a `Value` cannot lend (it then reads every update as unknown).
    let mut update = serde_json::from_str::<Update>(&value.to_string()).unwrap_or(Update {
        id: UpdateId(id),
        kind: UpdateKind::Error(Value::Object(serde_json::Map::new())),
    });
    if let (UpdateKind::Error(kept), Some(stopped)) = (&mut update.kind, stopped) {
        *kept = serde_json::json!({ STOPPED_GENERATION: stopped });
    } else if unread(&update) {
        if let Some((repaired, left_out)) = repair(id, &value) {
            tracing::warn!(
                update_id = id,
                left_out,
                "teloxide could not read this message; it is read without some fields"
            );
            update = repaired;
        } else if let Some(kind) = kind_of(&value).filter(|k| ALLOWED_UPDATES.contains(k)) {
            tracing::warn!(update_id = id, kind, "an update nobody can read is skipped");
        }
    }
    Some(update)
}

/// Whether teloxide gave up on `update`: an unknown kind, or a message whose content it
/// could not read (it then keeps only the envelope, as [`MessageKind::Empty`]).
fn unread(update: &Update) -> bool {
    match &update.kind {
        UpdateKind::Error(_) => true,
        UpdateKind::Message(m) | UpdateKind::EditedMessage(m) => {
            matches!(m.kind, MessageKind::Empty { .. })
        }
        _ => false,
    }
}

/// The update's type: its one key besides `update_id`.
fn kind_of(value: &Value) -> Option<&str> {
    value
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|k| *k != "update_id")
}

/// A message teloxide could not read, read again with [`EXPENDABLE`] fields removed (and a
/// voice note's missing `mime_type` filled in), then with only the [`ESSENTIAL`] ones; and
/// what was left out.
fn repair(id: u32, value: &Value) -> Option<(Update, String)> {
    let kind = ["message", "edited_message"]
        .into_iter()
        .find(|k| value.get(k).is_some_and(Value::is_object))?;
    let mut message = value.get(kind)?.clone();
    let fields = message.as_object_mut()?;
    let mut left_out = Vec::new();
    // Telegram voice notes are OGG/Opus; `mime_type` is optional in the Bot API.
    if let Some(voice) = fields.get_mut("voice").and_then(Value::as_object_mut)
        && !voice.contains_key("mime_type")
    {
        voice.insert("mime_type".into(), "audio/ogg".into());
    }
    let read = |message: &Value| -> Option<Update> {
        let update = serde_json::json!({"update_id": id, kind: message});
        serde_json::from_str::<Update>(&update.to_string())
            .ok()
            .filter(|u| {
                matches!(
                    u.kind,
                    UpdateKind::Message(_) | UpdateKind::EditedMessage(_)
                ) && !unread(u)
            })
    };
    if let Some(update) = read(&message) {
        return Some((update, "nothing".into()));
    }
    for field in EXPENDABLE {
        if message
            .as_object_mut()
            .and_then(|m| m.remove(field))
            .is_some()
        {
            left_out.push(field);
            if let Some(update) = read(&message) {
                return Some((update, left_out.join(",")));
            }
        }
    }
    let essential: serde_json::Map<String, Value> = message
        .as_object()?
        .iter()
        .filter(|(k, _)| ESSENTIAL.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    read(&Value::Object(essential)).map(|update| (update, "all but its text".into()))
}

/// The stop press `update` carries, if it is one.
pub fn stopped(update: &Update) -> Option<GenerationStopped> {
    let UpdateKind::Error(kept) = &update.kind else {
        return None;
    };
    let raw = RawStopped::deserialize(kept.get(STOPPED_GENERATION)?).ok()?;
    Some(GenerationStopped {
        chat: raw.chat.id,
        thread: raw.message_thread_id,
        draft_id: raw.draft_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn stop_press(id: u32, chat: i64, thread: Option<i32>, draft: i64) -> Value {
        let mut stopped = json!({"chat": {"id": chat, "type": "private", "first_name": "A"},
                                 "draft_id": draft});
        if let Some(thread) = thread {
            stopped["message_thread_id"] = json!(thread);
        }
        json!({"update_id": id, STOPPED_GENERATION: stopped})
    }

    #[test]
    fn a_stop_press_is_kept_and_recognised() {
        let update = read(stop_press(7, 42, Some(3), 4_097)).unwrap();
        assert_eq!(update.id.0, 7);
        assert_eq!(
            stopped(&update),
            Some(GenerationStopped {
                chat: 42,
                thread: Some(3),
                draft_id: 4_097
            })
        );
    }

    #[test]
    fn a_stop_press_saved_and_read_again_is_still_one() {
        let update = read(stop_press(8, 42, None, 65)).unwrap();
        let saved = serde_json::to_value(&update).unwrap();
        assert_eq!(stopped(&read(saved).unwrap()), stopped(&update));
    }

    #[test]
    fn messages_are_read_as_teloxide_reads_them() {
        let value = json!({"update_id": 9, "message": {
            "message_id": 1, "date": 0, "text": "hi",
            "chat": {"id": 5, "type": "private", "first_name": "A"},
            "from": {"id": 5, "is_bot": false, "first_name": "A"}}});
        let update = read(value.clone()).unwrap();
        assert!(matches!(update.kind, UpdateKind::Message(_)));
        assert_eq!(stopped(&update), None);
        assert_eq!(
            serde_json::to_value(&update).unwrap()["message"]["text"],
            "hi"
        );
    }

    #[test]
    fn unreadable_updates_keep_their_id_and_idless_ones_are_skipped() {
        let update = read(json!({"update_id": 11, "message": "not a message"})).unwrap();
        assert_eq!(update.id.0, 11);
        assert_eq!(stopped(&update), None);
        let update = read(json!({"update_id": 12, STOPPED_GENERATION: {"chat": 1}})).unwrap();
        assert_eq!(update.id.0, 12);
        assert_eq!(stopped(&update), None);
        assert!(read(json!({"message": {}})).is_none());
        assert!(read(json!({"update_id": -1})).is_none());
        assert!(read(json!([1, 2])).is_none());
    }

    fn private_text(extra: Value) -> Value {
        let mut message = json!({"message_id": 3, "date": 1_700_000_000, "text": "hello there",
            "chat": {"id": 5, "type": "private", "first_name": "A"},
            "from": {"id": 5, "is_bot": false, "first_name": "A", "language_code": "ru"}});
        for (k, v) in extra.as_object().unwrap() {
            message[k] = v.clone();
        }
        message
    }

    fn text_of(update: &Update) -> Option<&str> {
        match &update.kind {
            UpdateKind::Message(m) | UpdateKind::EditedMessage(m) => m.text(),
            _ => None,
        }
    }

    #[test]
    fn a_voice_note_without_mime_type_is_read() {
        let message = private_text(json!({"voice": {"file_id": "v", "file_unique_id": "u",
            "duration": 3, "file_size": 100}}));
        let message = {
            let mut m = message;
            m.as_object_mut().unwrap().remove("text");
            m
        };
        let update = read(json!({"update_id": 20, "message": message})).unwrap();
        let UpdateKind::Message(m) = &update.kind else {
            panic!("not read: {update:?}")
        };
        assert_eq!(m.voice().map(|v| v.file.id.0.as_str()), Some("v"));
    }

    #[test]
    fn a_text_with_an_external_reply_to_a_text_is_answered() {
        // What Telegram sends for a reply to a text message of another chat.
        let message = private_text(json!({
            "external_reply": {
                "origin": {"type": "channel", "date": 1_699_999_000, "message_id": 44,
                           "chat": {"id": -1001, "type": "channel", "title": "News"}},
                "chat": {"id": -1001, "type": "channel", "title": "News"},
                "message_id": 44,
                "link_preview_options": {"is_disabled": true}},
            "quote": {"text": "the quoted part", "position": 0}}));
        let update = read(json!({"update_id": 21, "message": message})).unwrap();
        assert_eq!(text_of(&update), Some("hello there"), "{update:?}");
    }

    proptest! {
        #[test]
        fn junk_in_fields_the_bot_can_do_without_never_loses_the_message(
            junk in proptest::collection::vec(
                (proptest::sample::select(EXPENDABLE.to_vec()), prop_oneof![
                    Just(json!(null)), Just(json!({})), Just(json!([{"type": 7}])),
                    Just(json!({"origin": "x"})), any::<i64>().prop_map(|n| json!(n)),
                    "[ -~]{0,12}".prop_map(|s| json!(s)),
                ]),
                0..4,
            ),
            edited in any::<bool>(),
        ) {
            let mut extra = serde_json::Map::new();
            for (field, value) in junk {
                extra.insert(field.to_string(), value);
            }
            let kind = if edited { "edited_message" } else { "message" };
            let message = private_text(Value::Object(extra));
            let update = read(json!({"update_id": 30, kind: message})).unwrap();
            prop_assert_eq!(text_of(&update), Some("hello there"));
        }

        #[test]
        fn any_update_with_an_id_is_read_with_that_id(
            id in any::<u32>(),
            key in "[a-z_]{1,24}",
            payload in prop_oneof![
                Just(json!(null)), Just(json!({})), Just(json!([1])),
                any::<i64>().prop_map(|n| json!(n)),
                "[ -~]{0,20}".prop_map(|s| json!(s)),
            ],
        ) {
            let update = read(json!({"update_id": id, key: payload})).unwrap();
            prop_assert_eq!(update.id.0, id);
            // Whatever was read can be saved and read back.
            let saved = serde_json::to_value(&update).unwrap();
            prop_assert_eq!(read(saved).map(|u| u.id.0), Some(id));
        }
    }
}
