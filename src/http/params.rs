//! The chat completion fields beyond the basics: sampling (`top_k`, `min_p`, penalties,
//! `logit_bias`), `logprobs` / `top_logprobs`, the response format (`response_format`,
//! llama-server's `grammar` and top-level `json_schema`), `stream_options` and the
//! `truncation` opt-in. Each is checked with OpenAI's range (llama-server's where OpenAI
//! has no such field) and written into [`GenerateParams`]. Pure: unit-tested without a
//! server.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::chat::{Constraint, GenerateParams, Overflow};
use crate::engine::sampling::MAX_TOP_LOGPROBS;

/// Most `logit_bias` entries a request may give.
const MAX_LOGIT_BIAS: usize = 1024;

/// Largest grammar or schema, in bytes.
const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// The extra fields as sent (flattened into the request).
#[derive(Debug, Default, Deserialize)]
pub struct ExtraFields {
    /// Keep the k most likely tokens (llama-server; 0 keeps all).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p sampling, 0 to 1 (llama-server).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// -2 to 2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Above 0, at most 2 (llama-server; 1 is off).
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// Token id (as a string) → bias, -100 to 100.
    #[serde(default)]
    pub logit_bias: Option<Map<String, Value>>,
    /// Report token log-probabilities.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0 to 20 (needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// `{"type": "text" | "json_object" | "json_schema", …}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// A GBNF grammar (llama-server).
    #[serde(default)]
    pub grammar: Option<String>,
    /// A JSON Schema the reply must follow (llama-server).
    #[serde(default)]
    pub json_schema: Option<Value>,
    /// `{"include_usage": bool}`; only with `stream`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// `"auto"` trims a conversation longer than the window (oldest turns first);
    /// `"disabled"` (the default) refuses it. The name and values of OpenAI's Responses
    /// API.
    #[serde(default)]
    pub truncation: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `"choices": []` and the usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// What the extra fields decide about the response itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseOptions {
    /// Stream a usage chunk at the end.
    pub include_usage: bool,
}

fn in_range(value: f32, param: &'static str, min: f32, max: f32) -> Result<f32, ApiError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid(
            param,
            format!("{param} must be {min} to {max}"),
        ))
    }
}

impl ExtraFields {
    /// Checks the fields and writes them into `params`; `stream` is whether the request
    /// streams.
    pub fn apply(
        self,
        params: &mut GenerateParams,
        stream: bool,
    ) -> Result<ResponseOptions, ApiError> {
        if let Some(k) = self.top_k {
            params.top_k = u32::try_from(k.max(0)).unwrap_or(u32::MAX);
        }
        if let Some(p) = self.min_p {
            params.min_p = in_range(p, "min_p", 0.0, 1.0)?;
        }
        if let Some(p) = self.frequency_penalty {
            params.frequency_penalty = in_range(p, "frequency_penalty", -2.0, 2.0)?;
        }
        if let Some(p) = self.presence_penalty {
            params.presence_penalty = in_range(p, "presence_penalty", -2.0, 2.0)?;
        }
        if let Some(p) = self.repeat_penalty {
            if p <= 0.0 {
                return Err(ApiError::invalid(
                    "repeat_penalty",
                    "repeat_penalty must be above 0 and at most 2",
                ));
            }
            params.repeat_penalty = in_range(p, "repeat_penalty", 0.0, 2.0)?;
        }
        if let Some(bias) = self.logit_bias {
            params.logit_bias = logit_bias(bias)?;
        }
        params.logprobs = logprobs(self.logprobs, self.top_logprobs)?;
        params.constraint = constraint(self.response_format, self.grammar, self.json_schema)?;
        params.overflow = match self.truncation.as_deref() {
            None | Some("disabled") => Overflow::Refuse,
            Some("auto") => Overflow::Trim,
            Some(_) => {
                return Err(ApiError::invalid(
                    "truncation",
                    "truncation must be \"auto\" or \"disabled\"",
                ));
            }
        };
        let include_usage = match self.stream_options {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options is only allowed when stream is true",
                ));
            }
            Some(options) => options.include_usage.unwrap_or(false),
        };
        Ok(ResponseOptions { include_usage })
    }
}

fn logit_bias(map: Map<String, Value>) -> Result<Vec<(i32, f32)>, ApiError> {
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "logit_bias",
            format!("at most {MAX_LOGIT_BIAS} logit_bias entries"),
        ));
    }
    map.into_iter()
        .map(|(key, value)| {
            let token: i32 = key.trim().parse().ok().filter(|&t| t >= 0).ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    "logit_bias keys must be token ids (non-negative integers)",
                )
            })?;
            let bias = value.as_f64().ok_or_else(|| {
                ApiError::invalid("logit_bias", "logit_bias values must be numbers")
            })?;
            Ok((token, in_range(bias as f32, "logit_bias", -100.0, 100.0)?))
        })
        .collect()
}

fn logprobs(enabled: Option<bool>, top: Option<u32>) -> Result<Option<u8>, ApiError> {
    let top = match top {
        None => 0,
        Some(n) if n <= u32::from(MAX_TOP_LOGPROBS) => n as u8,
        Some(_) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be 0 to {MAX_TOP_LOGPROBS}"),
            ));
        }
    };
    match enabled {
        Some(true) => Ok(Some(top)),
        _ if top > 0 => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        )),
        _ => Ok(None),
    }
}

fn constraint(
    response_format: Option<Value>,
    grammar: Option<String>,
    json_schema: Option<Value>,
) -> Result<Option<Constraint>, ApiError> {
    let from_format = match response_format {
        None | Some(Value::Null) => None,
        Some(format) => response_format_constraint(&format)?,
    };
    let from_grammar = grammar.map(Constraint::Grammar);
    let from_schema = json_schema.map(|schema| Constraint::JsonSchema {
        name: "schema".into(),
        schema,
        strict: false,
    });
    let mut given = [from_format, from_grammar, from_schema]
        .into_iter()
        .flatten();
    let first = given.next();
    if given.next().is_some() {
        return Err(ApiError::invalid(
            "response_format",
            "give one of response_format, grammar and json_schema",
        ));
    }
    let size = match &first {
        Some(Constraint::Grammar(g)) => g.len(),
        Some(Constraint::JsonSchema { schema, .. }) => schema.to_string().len(),
        _ => 0,
    };
    if size > MAX_CONSTRAINT_BYTES {
        return Err(ApiError::invalid(
            "response_format",
            format!("the schema or grammar is larger than {MAX_CONSTRAINT_BYTES} bytes"),
        ));
    }
    Ok(first)
}

/// OpenAI's `response_format` (and llama-server's `{"type":"json_object","schema":…}`).
fn response_format_constraint(format: &Value) -> Result<Option<Constraint>, ApiError> {
    let invalid = |message: &str| ApiError::invalid("response_format", message.to_string());
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(match format.get("schema") {
            Some(schema) if schema.is_object() => Constraint::JsonSchema {
                name: "schema".into(),
                schema: schema.clone(),
                strict: false,
            },
            _ => Constraint::JsonObject,
        })),
        Some("json_schema") => {
            let spec = format
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| invalid("response_format.json_schema must be an object"))?;
            let schema = spec
                .get("schema")
                .filter(|s| s.is_object() || s.is_boolean())
                .cloned()
                .ok_or_else(|| {
                    invalid("response_format.json_schema.schema must be a JSON Schema")
                })?;
            Ok(Some(Constraint::JsonSchema {
                name: spec
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("schema")
                    .chars()
                    .take(64)
                    .collect(),
                schema,
                strict: spec.get("strict").and_then(Value::as_bool).unwrap_or(false),
            }))
        }
        _ => Err(invalid(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn apply(fields: Value, stream: bool) -> Result<(GenerateParams, ResponseOptions), ApiError> {
        let extra: ExtraFields = serde_json::from_value(fields).unwrap();
        let mut params = GenerateParams::default();
        let options = extra.apply(&mut params, stream)?;
        Ok((params, options))
    }

    #[test]
    fn defaults_refuse_overflow_and_keep_llama_server_sampling() {
        let (params, options) = apply(json!({}), false).unwrap();
        assert_eq!(params.overflow, Overflow::Refuse);
        assert_eq!((params.top_k, params.min_p), (40, 0.05));
        assert_eq!(params.logprobs, None);
        assert_eq!(params.constraint, None);
        assert!(!options.include_usage);
        let (params, _) = apply(json!({"truncation": "auto"}), false).unwrap();
        assert_eq!(params.overflow, Overflow::Trim);
    }

    #[test]
    fn every_field_lands_in_the_params() {
        let (params, options) = apply(
            json!({"top_k": 1, "min_p": 0.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                   "repeat_penalty": 1.1, "logit_bias": {"42": -100, "7": 5.5},
                   "logprobs": true, "top_logprobs": 3,
                   "stream_options": {"include_usage": true},
                   "response_format": {"type": "json_object"}}),
            true,
        )
        .unwrap();
        assert_eq!(params.top_k, 1);
        assert_eq!(params.min_p, 0.1);
        assert_eq!(params.frequency_penalty, 0.5);
        assert_eq!(params.presence_penalty, -0.5);
        assert_eq!(params.repeat_penalty, 1.1);
        let mut bias = params.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, [(7, 5.5), (42, -100.0)]);
        assert_eq!(params.logprobs, Some(3));
        assert_eq!(params.constraint, Some(Constraint::JsonObject));
        assert!(options.include_usage);
    }

    #[test]
    fn response_formats_and_extensions_become_constraints() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let (params, _) = apply(
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "thing", "schema": schema, "strict": true}}}),
            false,
        )
        .unwrap();
        assert_eq!(
            params.constraint,
            Some(Constraint::JsonSchema {
                name: "thing".into(),
                schema: schema.clone(),
                strict: true
            })
        );
        let (params, _) = apply(json!({"json_schema": schema}), false).unwrap();
        assert!(matches!(
            params.constraint,
            Some(Constraint::JsonSchema { .. })
        ));
        let (params, _) = apply(json!({"grammar": "root ::= \"x\""}), false).unwrap();
        assert_eq!(
            params.constraint,
            Some(Constraint::Grammar("root ::= \"x\"".into()))
        );
        let (params, _) = apply(json!({"response_format": {"type": "text"}}), false).unwrap();
        assert_eq!(params.constraint, None);
    }

    #[test]
    fn out_of_range_fields_are_refused_naming_the_field() {
        let cases = [
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"repeat_penalty": 0}), "repeat_penalty"),
            (json!({"logit_bias": {"x": 1}}), "logit_bias"),
            (json!({"logit_bias": {"-1": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"logit_bias": {"5": "a"}}), "logit_bias"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (
                json!({"grammar": "root ::= \"a\"", "json_schema": {}}),
                "response_format",
            ),
            (json!({"truncation": "sometimes"}), "truncation"),
        ];
        for (fields, param) in cases {
            match apply(fields.clone(), false) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{fields}");
                }
                other => panic!("{fields}: {other:?}"),
            }
        }
        assert!(matches!(
            apply(json!({"stream_options": {"include_usage": true}}), false),
            Err(ApiError::InvalidRequest {
                param: Some("stream_options"),
                ..
            })
        ));
    }

    proptest! {
        /// A penalty is accepted exactly within OpenAI's -2..=2 and lands unchanged.
        #[test]
        fn penalties_follow_openais_range(p in -5.0f32..5.0) {
            let result = apply(json!({"frequency_penalty": p, "presence_penalty": p}), false);
            if (-2.0..=2.0).contains(&p) {
                let (params, _) = result.unwrap();
                prop_assert_eq!(params.frequency_penalty, p);
                prop_assert_eq!(params.presence_penalty, p);
            } else {
                prop_assert!(result.is_err());
            }
        }

        /// Any bias map within the limits round-trips; ids are never negative.
        #[test]
        fn logit_bias_round_trips(entries in proptest::collection::btree_map(0i32..100_000, -100i32..=100, 0..20)) {
            let map: Map<String, Value> = entries.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            let (params, _) = apply(json!({"logit_bias": map}), false).unwrap();
            let mut got = params.logit_bias.clone();
            got.sort_by_key(|b| b.0);
            let want: Vec<(i32, f32)> = entries.iter().map(|(&k, &v)| (k, v as f32)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
