//! Per-conversation history: the user and assistant turns of each chat (and forum topic),
//! bounded in turns, characters and number of conversations. A leaf module: it knows
//! nothing of Telegram beyond a numeric chat id and an optional topic id.
//!
//! The engine trims the prompt to its token budget itself; the bounds here only keep
//! memory bounded (a long chat forgets its oldest turns here too).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::chat::ChatMessage;

/// Which conversation: a chat, and a forum topic within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    /// The chat id.
    pub chat: i64,
    /// The forum topic (message thread) id; `None` outside forum topics.
    pub topic: Option<i32>,
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Most messages (user + assistant) kept per conversation.
    pub max_messages: usize,
    /// Most characters kept per conversation.
    pub max_chars: usize,
    /// Most conversations kept; the least recently used is forgotten first.
    pub max_conversations: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_messages: 40,
            max_chars: 48_000,
            max_conversations: 10_000,
        }
    }
}

#[derive(Debug, Default)]
struct Conversation {
    messages: Vec<ChatMessage>,
    /// A logical clock value of the last use, for least-recently-used eviction.
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    conversations: HashMap<ConversationKey, Conversation>,
    clock: u64,
}

/// The history of every conversation, shared by the tasks answering them.
#[derive(Debug)]
pub struct ConversationStore {
    limits: HistoryLimits,
    // A std mutex: every critical section is short and never awaits.
    inner: Mutex<Inner>,
}

impl ConversationStore {
    /// An empty store with `limits`.
    pub fn new(limits: HistoryLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters more than losing the service, so a poisoned lock is used as is.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The conversation so far, oldest first.
    pub fn history(&self, key: ConversationKey) -> Vec<ChatMessage> {
        self.lock()
            .conversations
            .get(&key)
            .map(|c| c.messages.clone())
            .unwrap_or_default()
    }

    /// Appends one exchange (the user's message and the answer), then trims.
    pub fn push_exchange(&self, key: ConversationKey, user: &str, assistant: &str) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if !inner.conversations.contains_key(&key)
            && inner.conversations.len() >= self.limits.max_conversations
        {
            let oldest = inner
                .conversations
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                inner.conversations.remove(&oldest);
            }
        }
        let conversation = inner.conversations.entry(key).or_default();
        conversation.last_used = now;
        conversation.messages.push(ChatMessage::user(user));
        conversation
            .messages
            .push(ChatMessage::assistant(assistant));
        trim(&mut conversation.messages, &self.limits);
    }

    /// Removes and returns the last exchange's user message (for `/retry`).
    pub fn pop_last_exchange(&self, key: ConversationKey) -> Option<String> {
        let mut inner = self.lock();
        let messages = &mut inner.conversations.get_mut(&key)?.messages;
        let assistant = messages.pop()?;
        match messages.pop() {
            Some(user) => Some(user.content),
            None => {
                messages.push(assistant);
                None
            }
        }
    }

    /// Forgets a conversation (`/reset`).
    pub fn reset(&self, key: ConversationKey) {
        self.lock().conversations.remove(&key);
    }

    /// Conversations held now.
    pub fn len(&self) -> usize {
        self.lock().conversations.len()
    }

    /// Whether no conversation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the oldest exchanges until both limits hold (always keeping the last one).
fn trim(messages: &mut Vec<ChatMessage>, limits: &HistoryLimits) {
    let chars = |m: &[ChatMessage]| m.iter().map(|m| m.content.chars().count()).sum::<usize>();
    while messages.len() > 2
        && (messages.len() > limits.max_messages || chars(messages) > limits.max_chars)
    {
        // Exchanges go in pairs, so the history keeps starting with a user turn.
        messages.drain(..2.min(messages.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    fn key(chat: i64) -> ConversationKey {
        ConversationKey { chat, topic: None }
    }

    #[test]
    fn histories_are_per_chat_and_topic() {
        let store = ConversationStore::new(HistoryLimits::default());
        store.push_exchange(key(1), "hi", "hello");
        let topic = ConversationKey {
            chat: 1,
            topic: Some(7),
        };
        store.push_exchange(topic, "q", "a");
        assert_eq!(store.history(key(1)).len(), 2);
        assert_eq!(store.history(topic)[0].content, "q");
        assert!(store.history(key(2)).is_empty());
        store.reset(key(1));
        assert!(store.history(key(1)).is_empty());
        assert_eq!(store.history(topic).len(), 2);
    }

    #[test]
    fn retry_takes_back_the_last_exchange() {
        let store = ConversationStore::new(HistoryLimits::default());
        assert_eq!(store.pop_last_exchange(key(1)), None);
        store.push_exchange(key(1), "one", "1");
        store.push_exchange(key(1), "two", "2");
        assert_eq!(store.pop_last_exchange(key(1)).as_deref(), Some("two"));
        let history = store.history(key(1));
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].role, Role::User);
    }

    #[test]
    fn history_is_bounded_in_messages_and_chars() {
        let limits = HistoryLimits {
            max_messages: 4,
            max_chars: 100,
            max_conversations: 2,
        };
        let store = ConversationStore::new(limits);
        for i in 0..10 {
            store.push_exchange(key(1), &format!("q{i}"), "a");
        }
        let history = store.history(key(1));
        assert_eq!(history.len(), 4);
        assert_eq!(history[0].content, "q8");
        store.push_exchange(key(1), &"x".repeat(200), "y");
        assert_eq!(store.history(key(1)).len(), 2, "the last exchange is kept");
        store.push_exchange(key(2), "a", "b");
        store.push_exchange(key(3), "a", "b");
        assert_eq!(store.len(), 2);
        assert!(
            store.history(key(1)).is_empty(),
            "least recently used forgotten"
        );
    }
}
