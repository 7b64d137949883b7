//! Tools in each cloud API's own form, and the calls they answer with read back.
//!
//! - OpenAI-compatible APIs (Groq, Mistral, generic) take OpenAI's `tools`, `tool_choice`,
//!   `parallel_tool_calls`, assistant `tool_calls` and `tool` messages as they are, with
//!   Mistral's two differences (<https://docs.mistral.ai/capabilities/function_calling/>):
//!   `tool_choice: "any"` for OpenAI's `"required"`, and call ids of exactly 9 letters and
//!   digits (OpenAI's `call_…` ids are hashed to such, the same way every time). Streamed
//!   calls arrive in pieces (`delta.tool_calls[].index`, the id and name first, the
//!   arguments in fragments): [`CallPieces`] joins them.
//! - Gemini (<https://ai.google.dev/api/caching#Tool>) takes `tools: [{functionDeclarations:
//!   [{name, description, parameters}]}]` (parameters in its OpenAPI schema subset, as
//!   `responseSchema`) and `toolConfig.functionCallingConfig` (`mode` `AUTO`, `ANY`,
//!   `NONE`; `allowedFunctionNames` for a named choice); an assistant's calls are
//!   `functionCall` parts of a `model` turn, results `functionResponse` parts of a `user`
//!   turn; it answers with `functionCall` parts (`args` an object), whole in one event.
//!   It has no switch for parallel calls: with `parallel_tool_calls: false` only the
//!   first call of an answer is kept.

use serde_json::{Map, Value, json};

use super::ProviderError;
use super::convert::Turn;
use super::passthrough::gemini_schema;
use crate::chat::{Role, ToolCall, ToolChoice, Tools};
use crate::engine::tools::{mistral_call_id, new_call_id};

/// Most calls one answer may carry.
const MAX_CALLS: usize = 128;

/// Longest arguments text of one call, in bytes.
const MAX_ARGUMENTS_BYTES: usize = 1 << 20;

/// The request fields for `tools` in OpenAI's form (`mistral`: Mistral's variant).
pub fn openai_fields(tools: &Tools, mistral: bool) -> Map<String, Value> {
    let mut fields = Map::new();
    let list: Vec<Value> = tools
        .functions
        .iter()
        .map(|f| {
            let mut function = json!({"name": f.name, "parameters": f.parameters});
            if let Some(description) = &f.description {
                function["description"] = json!(description);
            }
            if f.strict {
                function["strict"] = json!(true);
            }
            json!({"type": "function", "function": function})
        })
        .collect();
    fields.insert("tools".into(), Value::Array(list));
    let choice = match &tools.choice {
        ToolChoice::None => json!("none"),
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Required if mistral => json!("any"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
    };
    fields.insert("tool_choice".into(), choice);
    if !tools.parallel {
        fields.insert("parallel_tool_calls".into(), json!(false));
    }
    fields
}

/// A call id as the API takes it.
fn wire_id(id: &str, mistral: bool) -> String {
    if mistral {
        mistral_call_id(id)
    } else {
        id.to_string()
    }
}

/// One turn as an OpenAI chat message.
pub fn openai_message(turn: &Turn, mistral: bool) -> Value {
    match turn.role {
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": wire_id(turn.tool_call_id.as_deref().unwrap_or(""), mistral),
            "content": turn.text,
        }),
        Role::Assistant if !turn.tool_calls.is_empty() => {
            let calls: Vec<Value> = turn
                .tool_calls
                .iter()
                .map(|call| {
                    json!({"id": wire_id(&call.id, mistral), "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}})
                })
                .collect();
            let content = if turn.text.is_empty() {
                Value::Null
            } else {
                json!(turn.text)
            };
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        role => json!({"role": role.as_str(), "content": turn.text}),
    }
}

/// A call being streamed in pieces.
#[derive(Debug, Default)]
struct Piece {
    id: String,
    name: String,
    arguments: String,
}

/// Streamed `delta.tool_calls` joined by `index` into whole calls.
#[derive(Debug, Default)]
pub struct CallPieces {
    pieces: Vec<Piece>,
}

impl CallPieces {
    /// Adds the pieces of one delta's `tool_calls`.
    pub fn add(&mut self, deltas: &Value) -> Result<(), ProviderError> {
        let Some(deltas) = deltas.as_array() else {
            return Err(ProviderError::Malformed("tool_calls is not a list".into()));
        };
        for delta in deltas {
            let index = delta
                .get("index")
                .and_then(Value::as_u64)
                .map_or(self.pieces.len().saturating_sub(1), |i| i as usize);
            if index >= MAX_CALLS {
                return Err(ProviderError::Malformed(format!(
                    "more than {MAX_CALLS} tool calls"
                )));
            }
            if self.pieces.len() <= index {
                self.pieces.resize_with(index + 1, Piece::default);
            }
            let piece = &mut self.pieces[index];
            if let Some(id) = delta.get("id").and_then(Value::as_str) {
                piece.id = id.to_string();
            }
            let function = delta.get("function");
            if let Some(name) = function.and_then(|f| f.get("name")).and_then(Value::as_str) {
                piece.name.push_str(name);
            }
            if let Some(arguments) = function
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
            {
                if piece.arguments.len() + arguments.len() > MAX_ARGUMENTS_BYTES {
                    return Err(ProviderError::Malformed(
                        "tool call arguments too long".into(),
                    ));
                }
                piece.arguments.push_str(arguments);
            }
        }
        Ok(())
    }

    /// The whole calls, in index order (a call without a name is dropped; one without an
    /// id gets a fresh one).
    pub fn finish(&mut self) -> Vec<ToolCall> {
        std::mem::take(&mut self.pieces)
            .into_iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| ToolCall {
                id: if p.id.is_empty() { new_call_id() } else { p.id },
                name: p.name,
                arguments: if p.arguments.is_empty() {
                    "{}".into()
                } else {
                    p.arguments
                },
            })
            .collect()
    }
}

/// Gemini's `tools` and `toolConfig` for `tools`, or the refusal (a parameter schema
/// Gemini's subset cannot say).
pub fn gemini_fields(tools: &Tools) -> Result<(Value, Value), ProviderError> {
    let declarations = tools
        .functions
        .iter()
        .map(|f| {
            let mut declaration = json!({"name": f.name});
            if let Some(description) = &f.description {
                declaration["description"] = json!(description);
            }
            // Gemini refuses an OBJECT without properties: a function without parameters
            // declares none.
            let has_properties = f
                .parameters
                .get("properties")
                .and_then(Value::as_object)
                .is_some_and(|p| !p.is_empty());
            if has_properties {
                declaration["parameters"] =
                    gemini_schema(&f.parameters, &format!("/tools/{}/parameters", f.name))?;
            }
            Ok(declaration)
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    let config = match &tools.choice {
        ToolChoice::None => json!({"mode": "NONE"}),
        ToolChoice::Auto => json!({"mode": "AUTO"}),
        ToolChoice::Required => json!({"mode": "ANY"}),
        ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
    };
    Ok((
        json!([{"functionDeclarations": declarations}]),
        json!({"functionCallingConfig": config}),
    ))
}

/// A call as a Gemini `functionCall` part.
pub fn gemini_call_part(call: &ToolCall) -> Value {
    let args = match serde_json::from_str::<Value>(&call.arguments) {
        Ok(object @ Value::Object(_)) => object,
        _ => json!({}),
    };
    json!({"functionCall": {"name": call.name, "args": args}})
}

/// A tool's result (to the call of function `name`) as a Gemini `functionResponse`
/// part: its JSON when that is an object, else `{"content": …}`.
pub fn gemini_response_part(name: &str, content: &str) -> Value {
    let response = match serde_json::from_str::<Value>(content) {
        Ok(object @ Value::Object(_)) => object,
        Ok(other) => json!({"content": other}),
        Err(_) => json!({"content": content}),
    };
    json!({"functionResponse": {"name": name, "response": response}})
}

/// A Gemini `functionCall` as a call (Gemini's id when it sends one, else a fresh one).
pub fn gemini_call(function_call: &Value) -> Result<ToolCall, ProviderError> {
    let name = function_call
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ProviderError::Malformed("a functionCall without a name".into()))?;
    let args = function_call.get("args").cloned().unwrap_or(json!({}));
    Ok(ToolCall {
        id: function_call
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(new_call_id, str::to_string),
        name: name.to_string(),
        arguments: args.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::chat::FunctionTool;

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            functions: vec![
                FunctionTool {
                    name: "get_weather".into(),
                    description: Some("Weather".into()),
                    parameters: json!({"type": "object", "additionalProperties": false,
                        "properties": {"city": {"type": ["string", "null"]}}, "required": ["city"]}),
                    strict: true,
                },
                FunctionTool {
                    name: "now".into(),
                    description: None,
                    parameters: json!({"type": "object", "properties": {}}),
                    strict: false,
                },
            ],
            choice,
            parallel: false,
        }
    }

    #[test]
    fn openai_apis_get_tools_as_they_are_and_mistral_its_variant() {
        let fields = openai_fields(&tools(ToolChoice::Required), false);
        assert_eq!(fields["tool_choice"], "required");
        assert_eq!(fields["parallel_tool_calls"], false);
        assert_eq!(fields["tools"][0]["function"]["strict"], true);
        assert_eq!(fields["tools"][1]["function"].get("description"), None);
        assert_eq!(
            openai_fields(&tools(ToolChoice::Required), true)["tool_choice"],
            "any"
        );
        let named = openai_fields(&tools(ToolChoice::Function("now".into())), true);
        assert_eq!(named["tool_choice"]["function"]["name"], "now");
        let call = ToolCall {
            id: "call_abc".into(),
            name: "now".into(),
            arguments: "{}".into(),
        };
        let turn = Turn {
            role: Role::Assistant,
            text: String::new(),
            tool_calls: vec![call],
            tool_call_id: None,
        };
        let message = openai_message(&turn, true);
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["tool_calls"][0]["id"], mistral_call_id("call_abc"));
        let result = Turn {
            role: Role::Tool,
            text: "12:00".into(),
            tool_calls: Vec::new(),
            tool_call_id: Some("call_abc".into()),
        };
        assert_eq!(openai_message(&result, false)["tool_call_id"], "call_abc");
        assert_eq!(
            openai_message(&result, true)["tool_call_id"],
            mistral_call_id("call_abc")
        );
    }

    #[test]
    fn streamed_pieces_join_into_calls() {
        let mut pieces = CallPieces::default();
        pieces
            .add(&json!([{"index": 0, "id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": ""}}]))
            .unwrap();
        pieces
            .add(&json!([{"index": 0, "function": {"arguments": "{\"city\":"}}]))
            .unwrap();
        pieces
            .add(&json!([{"index": 0, "function": {"arguments": "\"Paris\"}"}}]))
            .unwrap();
        pieces
            .add(&json!([{"index": 1, "id": "call_2", "function": {"name": "now"}}]))
            .unwrap();
        let calls = pieces.finish();
        assert_eq!(
            calls,
            [
                ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\":\"Paris\"}".into()
                },
                ToolCall {
                    id: "call_2".into(),
                    name: "now".into(),
                    arguments: "{}".into()
                }
            ]
        );
        assert!(pieces.add(&json!([{"index": 100000}])).is_err());
    }

    #[test]
    fn gemini_gets_declarations_and_a_mode() {
        let (declared, config) = gemini_fields(&tools(ToolChoice::Function("now".into()))).unwrap();
        let declarations = &declared[0]["functionDeclarations"];
        assert_eq!(
            declarations[0]["parameters"],
            json!({"type": "object", "properties": {"city": {"type": "string", "nullable": true}},
                   "required": ["city"]})
        );
        assert_eq!(declarations[1], json!({"name": "now"}), "no empty OBJECT");
        assert_eq!(
            config,
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["now"]}})
        );
        for (choice, mode) in [
            (ToolChoice::None, "NONE"),
            (ToolChoice::Auto, "AUTO"),
            (ToolChoice::Required, "ANY"),
        ] {
            let (_, config) = gemini_fields(&tools(choice)).unwrap();
            assert_eq!(config["functionCallingConfig"]["mode"], mode);
        }
        let mut bad = tools(ToolChoice::Auto);
        bad.functions[0].parameters =
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}});
        assert!(
            gemini_fields(&bad).is_err(),
            "what Gemini cannot say is its refusal"
        );
    }

    #[test]
    fn gemini_parts_carry_calls_and_results() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        };
        assert_eq!(
            gemini_call_part(&call),
            json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}})
        );
        assert_eq!(
            gemini_response_part("get_weather", "{\"t\": 22}"),
            json!({"functionResponse": {"name": "get_weather", "response": {"t": 22}}})
        );
        assert_eq!(
            gemini_response_part("get_weather", "sunny"),
            json!({"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}})
        );
        let back = gemini_call(&json!({"name": "get_weather", "args": {"city": "Paris"}})).unwrap();
        assert_eq!(
            (back.name.as_str(), back.arguments.as_str()),
            ("get_weather", "{\"city\":\"Paris\"}")
        );
        assert!(back.id.starts_with("call_"));
        assert!(gemini_call(&json!({"args": {}})).is_err());
    }

    proptest! {
        /// A call's arguments survive the trip to Gemini and back.
        #[test]
        fn gemini_calls_round_trip(
            name in "[a-zA-Z0-9_-]{1,64}",
            args in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..5),
        ) {
            let arguments = serde_json::to_string(&args).unwrap();
            let call = ToolCall { id: "x".into(), name: name.clone(), arguments: arguments.clone() };
            let part = gemini_call_part(&call);
            let back = gemini_call(&part["functionCall"]).unwrap();
            prop_assert_eq!(back.name, name);
            let a: Value = serde_json::from_str(&back.arguments).unwrap();
            let b: Value = serde_json::from_str(&arguments).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
