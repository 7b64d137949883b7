//! Chat history → the turns cloud APIs accept: one system text, then user/assistant turns
//! that alternate and start with the user (Mistral and Gemini reject anything else).

use crate::chat::{ChatMessage, Role, ToolCall};

/// A conversation as cloud APIs want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turns {
    /// Every system message, joined.
    pub system: Option<String>,
    /// Alternating user/assistant turns, the first a user's (tool calls and their
    /// results in between).
    pub turns: Vec<Turn>,
}

/// One turn of [`Turns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// User, assistant or tool.
    pub role: Role,
    /// Its text.
    pub text: String,
    /// An assistant's calls of tools.
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool turn answers.
    pub tool_call_id: Option<String>,
}

impl Turn {
    /// Whether it is a tool call or result (never joined with its neighbours, never
    /// dropped for being blank).
    pub fn is_tool(&self) -> bool {
        self.role == Role::Tool || !self.tool_calls.is_empty()
    }
}

/// Normalizes `messages`: system messages are joined into one; blank messages are dropped;
/// consecutive messages of one role are joined; assistant turns before the first user
/// turn (a greeting) are dropped. Tool calls and results are kept as they are.
pub fn normalize(messages: &[ChatMessage]) -> Turns {
    let mut system: Vec<&str> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for message in messages {
        let content = message.content.trim();
        let turn = Turn {
            role: message.role,
            text: content.to_string(),
            tool_calls: message.tool_calls.clone(),
            tool_call_id: message.tool_call_id.clone(),
        };
        if content.is_empty() && !turn.is_tool() {
            continue;
        }
        match message.role {
            Role::System => system.push(content),
            Role::Assistant if turns.is_empty() => {}
            role => match turns.last_mut() {
                Some(last) if last.role == role && !last.is_tool() && !turn.is_tool() => {
                    last.text.push_str("\n\n");
                    last.text.push_str(content);
                }
                _ => turns.push(turn),
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
        let plain: Vec<(Role, String)> =
            turns.turns.into_iter().map(|t| (t.role, t.text)).collect();
        assert_eq!(
            plain,
            vec![
                (Role::User, "Hi\n\nCapital of France?".to_string()),
                (Role::Assistant, "Paris.".to_string()),
                (Role::User, "And Italy?".to_string()),
            ]
        );
    }

    #[test]
    fn tool_calls_and_results_are_kept_apart() {
        let call = ToolCall {
            id: "c1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        };
        let turns = normalize(&[
            ChatMessage::user("q"),
            ChatMessage::tool_calls("", vec![call.clone()]),
            ChatMessage::tool_result("c1", ""),
            ChatMessage::assistant("done"),
        ]);
        assert_eq!(turns.turns.len(), 4);
        assert_eq!(turns.turns[1].tool_calls, [call]);
        assert_eq!(turns.turns[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(turns.turns[3].text, "done");
    }

    #[test]
    fn no_system_message_is_none() {
        let turns = normalize(&[ChatMessage::user("hi")]);
        assert_eq!(turns.system, None);
        assert_eq!(turns.turns.len(), 1);
    }
}
