//! The function-calling fields of a chat completion request, checked as OpenAI checks
//! them (<https://platform.openai.com/docs/api-reference/chat/create>): `tools` (function
//! tools: a name of `^[a-zA-Z0-9_-]{1,64}$`, unique; a description; `parameters`, a JSON
//! Schema object; `strict`), `tool_choice` (`"none"`, `"auto"`, `"required"` or
//! `{"type":"function","function":{"name":…}}` naming one of them), `parallel_tool_calls`,
//! an assistant message's `tool_calls` and a `tool` message's `tool_call_id`, which must
//! answer a call of the assistant message before it; every call must be answered before
//! the conversation goes on. Anything else is a 400 naming the field. Pure: unit-tested
//! without a server.

use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::chat::{ChatMessage, FunctionTool, Role, ToolCall, ToolChoice, Tools};

/// Most tools a request may offer (OpenAI's limit).
const MAX_TOOLS: usize = 128;

/// Most calls one assistant message may hold.
const MAX_CALLS: usize = 128;

/// Longest tool call id.
const MAX_ID_CHARS: usize = 256;

/// The fields as sent (flattened into the request).
#[derive(Debug, Default, Deserialize)]
pub struct ToolFields {
    /// `[{"type": "function", "function": {…}}, …]`.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `"none"`, `"auto"`, `"required"` or a named function.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether one answer may call several tools (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message.into())
}

/// Whether `name` is a valid function name: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A name as an error message may quote it.
fn quoted(text: &str) -> String {
    text.chars().take(64).collect()
}

impl ToolFields {
    /// The request's tools, checked; `None` when it offers none (and asks for no call).
    pub fn validate(self) -> Result<Option<Tools>, ApiError> {
        let functions = match self.tools {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => Some(functions(list)?),
            Some(_) => return Err(invalid("tools", "tools must be a list of tools")),
        };
        let choice = match self.tool_choice {
            None | Some(Value::Null) => None,
            Some(choice) => Some(tool_choice(&choice)?),
        };
        let Some(functions) = functions else {
            return match choice {
                None | Some(ToolChoice::None) => Ok(None),
                Some(_) => Err(invalid(
                    "tool_choice",
                    "tool_choice is only allowed when tools are specified",
                )),
            };
        };
        let choice = choice.unwrap_or(ToolChoice::Auto);
        if let ToolChoice::Function(name) = &choice
            && !functions.iter().any(|f| &f.name == name)
        {
            return Err(invalid(
                "tool_choice",
                format!(
                    "tool_choice names `{}`, which is not in tools",
                    quoted(name)
                ),
            ));
        }
        Ok(Some(Tools {
            functions,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        }))
    }
}

fn functions(list: Vec<Value>) -> Result<Vec<FunctionTool>, ApiError> {
    if list.is_empty() {
        return Err(invalid(
            "tools",
            "tools must not be empty (leave it out instead)",
        ));
    }
    if list.len() > MAX_TOOLS {
        return Err(invalid("tools", format!("at most {MAX_TOOLS} tools")));
    }
    let mut out: Vec<FunctionTool> = Vec::with_capacity(list.len());
    for (i, tool) in list.into_iter().enumerate() {
        let function = match (
            tool.get("type").and_then(Value::as_str),
            tool.get("function"),
        ) {
            (Some("function"), Some(function @ Value::Object(_))) => function,
            (Some("function"), _) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function must be an object"),
                ));
            }
            _ => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].type must be \"function\" (the only tool type supported)"),
                ));
            }
        };
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        if !valid_name(name) {
            return Err(invalid(
                "tools",
                format!(
                    "tools[{i}].function.name `{}` must be 1 to 64 letters, digits, _ or -",
                    quoted(name)
                ),
            ));
        }
        if out.iter().any(|f| f.name == name) {
            return Err(invalid(
                "tools",
                format!("tools[{i}].function.name `{name}` is given twice"),
            ));
        }
        let description = match function.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(_) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function.description must be a string"),
                ));
            }
        };
        let parameters = match function.get("parameters") {
            // OpenAI: omitting parameters defines a function with an empty parameter list.
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(schema @ Value::Object(_)) => schema.clone(),
            Some(_) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON Schema object"),
                ));
            }
        };
        let strict = match function.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(strict)) => *strict,
            Some(_) => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function.strict must be a boolean"),
                ));
            }
        };
        out.push(FunctionTool {
            name: name.to_string(),
            description,
            parameters,
            strict,
        });
    }
    Ok(out)
}

fn tool_choice(choice: &Value) -> Result<ToolChoice, ApiError> {
    match choice {
        Value::String(mode) => match mode.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(invalid(
                "tool_choice",
                "tool_choice must be \"none\", \"auto\", \"required\" or a named function",
            )),
        },
        Value::Object(_) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (choice.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => Ok(ToolChoice::Function(name.to_string())),
                _ => Err(invalid(
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                )),
            }
        }
        _ => Err(invalid(
            "tool_choice",
            "tool_choice must be a string or an object",
        )),
    }
}

/// An assistant message's `tool_calls`, checked: each `{"id", "type": "function",
/// "function": {"name", "arguments": "<JSON text>"}}`.
pub fn calls(value: Option<Value>, index: usize) -> Result<Vec<ToolCall>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(invalid(
                "messages",
                format!("messages[{index}].tool_calls must be a list"),
            ));
        }
    };
    if list.len() > MAX_CALLS {
        return Err(invalid(
            "messages",
            format!("messages[{index}].tool_calls: at most {MAX_CALLS} calls"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("messages[{index}].tool_calls[{j}]");
            let id = call.get("id").and_then(Value::as_str).unwrap_or("");
            if id.is_empty() || id.chars().count() > MAX_ID_CHARS {
                return Err(invalid(
                    "messages",
                    format!(
                        "{at}.id must be a non-empty string of at most {MAX_ID_CHARS} characters"
                    ),
                ));
            }
            if call.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid(
                    "messages",
                    format!("{at}.type must be \"function\""),
                ));
            }
            let function = call.get("function");
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("messages", format!("{at}.function.name is required")))?;
            let arguments = function
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        "messages",
                        format!("{at}.function.arguments must be a string (JSON text)"),
                    )
                })?;
            Ok(ToolCall {
                id: id.to_string(),
                name: name.to_string(),
                arguments: arguments.to_string(),
            })
        })
        .collect()
}

/// A `tool` message's `tool_call_id`, checked.
pub fn call_id(value: Option<Value>, index: usize) -> Result<String, ApiError> {
    match value {
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_ID_CHARS => Ok(id),
        _ => Err(invalid(
            "messages",
            format!(
                "messages[{index}]: a tool message needs its tool_call_id (a non-empty string)"
            ),
        )),
    }
}

/// Checks that every `tool` message answers a call of the assistant message before it,
/// and that every call is answered before the conversation goes on.
pub fn check_sequence(messages: &[ChatMessage]) -> Result<(), ApiError> {
    let mut pending: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role == Role::Tool {
            let id = message.tool_call_id.as_deref().unwrap_or("");
            let Some(at) = pending.iter().position(|p| *p == id) else {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{i}]: a tool message must answer a tool call of the assistant message before it; `{}` is not one (or is answered twice)",
                        quoted(id)
                    ),
                ));
            };
            pending.remove(at);
            continue;
        }
        if !pending.is_empty() {
            return Err(unanswered(&pending));
        }
        for (j, call) in message.tool_calls.iter().enumerate() {
            if message.tool_calls[..j].iter().any(|c| c.id == call.id) {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{i}]: tool call id `{}` is given twice",
                        quoted(&call.id)
                    ),
                ));
            }
            pending.push(&call.id);
        }
    }
    if pending.is_empty() {
        Ok(())
    } else {
        Err(unanswered(&pending))
    }
}

fn unanswered(pending: &[&str]) -> ApiError {
    let ids: Vec<String> = pending.iter().map(|id| quoted(id)).collect();
    invalid(
        "messages",
        format!(
            "an assistant message with tool_calls must be followed by tool messages answering each tool_call_id; unanswered: {}",
            ids.join(", ")
        ),
    )
}

/// The `tool_calls` of a completion's message.
pub fn calls_json(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect(),
    )
}

/// The stream deltas of call number `index` of a reply, as OpenAI streams a call: the
/// first names it (id, type, name, empty arguments), the next carries the arguments.
pub fn call_deltas(index: usize, call: &ToolCall) -> [Value; 2] {
    [
        json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}}]}),
        json!({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}),
    ]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fields(value: Value) -> Result<Option<Tools>, ApiError> {
        serde_json::from_value::<ToolFields>(value)
            .unwrap()
            .validate()
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    #[test]
    fn valid_tools_become_tools_with_auto_by_default() {
        let tools = fields(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(tools.choice, ToolChoice::Auto);
        assert!(tools.parallel);
        assert_eq!(tools.functions[0].name, "get_weather");
        let tools = fields(json!({"tools": [weather()], "parallel_tool_calls": false,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(tools.choice, ToolChoice::Function("get_weather".into()));
        assert!(!tools.parallel);
        let bare = fields(json!({"tools": [{"type": "function", "function": {"name": "x"}}]}))
            .unwrap()
            .unwrap();
        assert_eq!(
            bare.functions[0].parameters,
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(fields(json!({})).unwrap(), None);
        assert_eq!(fields(json!({"tool_choice": "none"})).unwrap(), None);
    }

    #[test]
    fn bad_tools_are_400s_naming_the_field() {
        let cases = [
            (json!({"tools": {}}), "tools"),
            (json!({"tools": []}), "tools"),
            (json!({"tools": [{"type": "code_interpreter"}]}), "tools"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "x".repeat(65)}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "x", "parameters": "s"}}]}),
                "tools",
            ),
            (json!({"tools": [weather(), weather()]}), "tools"),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
        ];
        for (value, param) in cases {
            match fields(value.clone()) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{value}")
                }
                other => panic!("{value}: {other:?}"),
            }
        }
    }

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: "{}".into(),
        }
    }

    #[test]
    fn tool_messages_must_answer_the_calls_before_them() {
        let ok = [
            ChatMessage::user("q"),
            ChatMessage::tool_calls("", vec![call("a"), call("b")]),
            ChatMessage::tool_result("b", "2"),
            ChatMessage::tool_result("a", "1"),
            ChatMessage::user("thanks"),
        ];
        assert!(check_sequence(&ok).is_ok());
        let stray = [ChatMessage::user("q"), ChatMessage::tool_result("a", "1")];
        assert!(check_sequence(&stray).is_err());
        let unanswered = [
            ChatMessage::user("q"),
            ChatMessage::tool_calls("", vec![call("a"), call("b")]),
            ChatMessage::tool_result("a", "1"),
            ChatMessage::user("next"),
        ];
        let error = check_sequence(&unanswered).unwrap_err();
        assert!(error.to_string().contains("unanswered: b"), "{error}");
        let twice = [
            ChatMessage::user("q"),
            ChatMessage::tool_calls("", vec![call("a")]),
            ChatMessage::tool_result("a", "1"),
            ChatMessage::tool_result("a", "1"),
        ];
        assert!(check_sequence(&twice).is_err());
        let duplicate = [
            ChatMessage::user("q"),
            ChatMessage::tool_calls("", vec![call("a"), call("a")]),
        ];
        assert!(check_sequence(&duplicate).is_err());
    }

    #[test]
    fn assistant_calls_need_openais_shape() {
        let good = json!([{"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        assert_eq!(calls(Some(good), 1).unwrap()[0].arguments, "{\"x\": 1}");
        for bad in [
            json!({}),
            json!([{"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
            json!([{"id": "c", "type": "other", "function": {"name": "f", "arguments": "{}"}}]),
            json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]),
            json!([{"id": "c", "type": "function", "function": {"arguments": "{}"}}]),
        ] {
            assert!(calls(Some(bad.clone()), 1).is_err(), "{bad}");
        }
    }

    proptest! {
        /// A name is accepted exactly when it matches OpenAI's pattern.
        #[test]
        fn names_follow_openais_pattern(name in "\\PC{0,70}") {
            let pattern = name.len() <= 64 && !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            let result = fields(json!({"tools": [{"type": "function", "function": {"name": name}}]}));
            prop_assert_eq!(result.is_ok(), pattern);
        }
    }
}
