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

use serde::Deserialize;
use serde_json::Value;
use teloxide::types::{Update, UpdateId, UpdateKind};

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
    }
    Some(update)
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

    proptest! {
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
