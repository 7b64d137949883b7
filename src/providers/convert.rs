//! Chat history → the turns cloud APIs accept: one system text, then user/assistant turns
//! that alternate and start with the user (Mistral and Gemini reject anything else).

use crate::chat::{ChatMessage, Role};

/// A conversation as cloud APIs want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turns {
    /// Every system message, joined.
    pub system: Option<String>,
    /// Alternating user/assistant turns, the first a user's.
    pub turns: Vec<(Role, String)>,
}

/// Normalizes `messages`: system messages are joined into one; blank messages are dropped;
/// consecutive messages of one role are joined; assistant turns before the first user
/// turn (a greeting) are dropped.
pub fn normalize(messages: &[ChatMessage]) -> Turns {
    let mut system: Vec<&str> = Vec::new();
    let mut turns: Vec<(Role, String)> = Vec::new();
    for message in messages {
        let content = message.content.trim();
        if content.is_empty() {
            continue;
        }
        match message.role {
            Role::System => system.push(content),
            Role::Assistant if turns.is_empty() => {}
            role => match turns.last_mut() {
                Some((last, text)) if *last == role => {
                    text.push_str("\n\n");
                    text.push_str(content);
                }
                _ => turns.push((role, content.to_string())),
            },
        }
    }
    Turns {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        turns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_systems_merges_runs_and_starts_with_the_user() {
        let turns = normalize(&[
            ChatMessage::system("Be brief."),
            ChatMessage::assistant("Hello! How can I help?"),
            ChatMessage::user("Hi"),
            ChatMessage::user("  "),
            ChatMessage::user("Capital of France?"),
            ChatMessage::system("Answer in English."),
            ChatMessage::assistant("Paris."),
            ChatMessage::user("And Italy?"),
        ]);
        assert_eq!(
            turns.system.as_deref(),
            Some("Be brief.\n\nAnswer in English.")
        );
        assert_eq!(
            turns.turns,
            vec![
                (Role::User, "Hi\n\nCapital of France?".to_string()),
                (Role::Assistant, "Paris.".to_string()),
                (Role::User, "And Italy?".to_string()),
            ]
        );
    }

    #[test]
    fn no_system_message_is_none() {
        let turns = normalize(&[ChatMessage::user("hi")]);
        assert_eq!(turns.system, None);
        assert_eq!(turns.turns.len(), 1);
    }
}
