//! The request's extra fields (penalties, logit bias, response format, log-probabilities,
//! grammar) in each cloud API's own form, and what each API cannot honour: that is the
//! provider's refusal ([`ProviderError::Refused`], the request's fault), so the chain asks
//! the next provider and never silently drops what the client asked for.
//!
//! - OpenAI-compatible APIs (Groq, Mistral, the generic provider) get OpenAI's fields as
//!   they are: `frequency_penalty`, `presence_penalty`, `logit_bias` and `response_format`.
//!   Whether the API takes them is its own decision (Groq rejects `logit_bias` with 400,
//!   which the chain already reads as a refusal).
//! - Gemini gets `topK`, `presencePenalty`, `frequencyPenalty`, and `responseMimeType:
//!   application/json` with a `responseSchema` (Gemini's OpenAPI subset: converted here,
//!   and refused when the schema needs what that subset lacks).
//! - `top_k`, `min_p` and `repeat_penalty` are the local engine's (llama-server's) knobs; no
//!   OpenAI-compatible cloud API defines them, so they are not sent there.
//! - `n` and `logprobs` / `top_logprobs` go to OpenAI-compatible APIs as they are (Groq
//!   answers 400 to `n` > 1 and to `logprobs`: its refusal), and to Gemini as
//!   `candidateCount`, `responseLogprobs` and `logprobs` (its count of alternatives, 0-20
//!   as OpenAI's); the answers' choices and log-probabilities come back in OpenAI's shape
//!   (`choices`).
//! - Refused everywhere in the cloud: a GBNF `grammar` (llama.cpp's own format), and on
//!   Gemini `logit_bias` (it has no such field).

use serde_json::{Map, Value, json};

use super::{ProviderError, RequestFault};
use crate::chat::{Constraint, DEFAULT_TOP_K, GenerateParams};

fn refused(detail: impl Into<String>) -> ProviderError {
    ProviderError::Refused {
        kind: RequestFault::InvalidRequest,
        detail: detail.into(),
    }
}

/// What no cloud API here can do.
fn common_refusal(params: &GenerateParams) -> Result<(), ProviderError> {
    if matches!(params.constraint, Some(Constraint::Grammar(_))) {
        return Err(refused("a GBNF grammar is served by the local engine only"));
    }
    Ok(())
}

/// The OpenAI-form fields of `params` to add to a chat completions body, or the refusal.
pub fn openai_fields(params: &GenerateParams) -> Result<Map<String, Value>, ProviderError> {
    common_refusal(params)?;
    let mut fields = Map::new();
    if params.frequency_penalty != 0.0 {
        fields.insert("frequency_penalty".into(), json!(params.frequency_penalty));
    }
    if params.presence_penalty != 0.0 {
        fields.insert("presence_penalty".into(), json!(params.presence_penalty));
    }
    if params.n > 1 {
        fields.insert("n".into(), json!(params.n));
    }
    if let Some(top) = params.logprobs {
        fields.insert("logprobs".into(), json!(true));
        fields.insert("top_logprobs".into(), json!(top));
    }
    if !params.logit_bias.is_empty() {
        let bias: Map<String, Value> = params
            .logit_bias
            .iter()
            .map(|(token, bias)| (token.to_string(), json!(bias)))
            .collect();
        fields.insert("logit_bias".into(), Value::Object(bias));
    }
    match &params.constraint {
        None | Some(Constraint::Grammar(_)) => {}
        Some(Constraint::JsonObject) => {
            fields.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(Constraint::JsonSchema {
            name,
            schema,
            strict,
        }) => {
            fields.insert(
                "response_format".into(),
                json!({"type": "json_schema",
                       "json_schema": {"name": name, "schema": schema, "strict": strict}}),
            );
        }
    }
    Ok(fields)
}

/// The Gemini `generationConfig` fields of `params`, or the refusal.
pub fn gemini_fields(params: &GenerateParams) -> Result<Map<String, Value>, ProviderError> {
    common_refusal(params)?;
    if !params.logit_bias.is_empty() {
        return Err(refused("Gemini has no logit_bias"));
    }
    let mut fields = Map::new();
    if params.n > 1 {
        fields.insert("candidateCount".into(), json!(params.n));
    }
    if let Some(top) = params.logprobs {
        fields.insert("responseLogprobs".into(), json!(true));
        fields.insert("logprobs".into(), json!(top));
    }
    if params.top_k > 0 && params.top_k != DEFAULT_TOP_K {
        fields.insert("topK".into(), json!(params.top_k));
    }
    if params.frequency_penalty != 0.0 {
        fields.insert("frequencyPenalty".into(), json!(params.frequency_penalty));
    }
    if params.presence_penalty != 0.0 {
        fields.insert("presencePenalty".into(), json!(params.presence_penalty));
    }
    match &params.constraint {
        None | Some(Constraint::Grammar(_)) => {}
        Some(Constraint::JsonObject) => {
            fields.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(Constraint::JsonSchema { schema, .. }) => {
            fields.insert("responseMimeType".into(), json!("application/json"));
            fields.insert("responseSchema".into(), gemini_schema(schema, "")?);
        }
    }
    Ok(fields)
}

/// Keywords of Gemini's `Schema` (an OpenAPI 3.0 subset) kept as they are.
const GEMINI_KEPT: &[&str] = &[
    "format",
    "description",
    "title",
    "nullable",
    "enum",
    "required",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "propertyOrdering",
];

/// Keywords with no effect on validity, dropped.
const GEMINI_DROPPED: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "additionalProperties",
    "strict",
];

/// A JSON Schema as Gemini's `responseSchema`: a `type` list with `null` becomes
/// `nullable`, `const` a one-value `enum`; keywords it lacks (`$ref`, `allOf`, `not`, …)
/// are a refusal naming them.
pub(super) fn gemini_schema(schema: &Value, path: &str) -> Result<Value, ProviderError> {
    let Value::Object(map) = schema else {
        return Err(refused(format!(
            "Gemini's responseSchema needs an object at {path:?}"
        )));
    };
    let mut out = Map::new();
    for (key, value) in map {
        let here = format!("{path}/{key}");
        match key.as_str() {
            "type" => match value {
                Value::Array(types) => {
                    let named: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                    if named.len() != 1 {
                        return Err(refused(format!(
                            "Gemini's responseSchema takes one type at {here}"
                        )));
                    }
                    out.insert("type".into(), named[0].clone());
                    if named.len() < types.len() {
                        out.insert("nullable".into(), json!(true));
                    }
                }
                other => {
                    out.insert("type".into(), other.clone());
                }
            },
            "const" => {
                out.insert("enum".into(), json!([value]));
            }
            "properties" => {
                let Value::Object(children) = value else {
                    return Err(refused(format!("{here} must be an object")));
                };
                let mut converted = Map::new();
                for (name, child) in children {
                    converted.insert(
                        name.clone(),
                        gemini_schema(child, &format!("{here}/{name}"))?,
                    );
                }
                out.insert("properties".into(), Value::Object(converted));
            }
            "items" => {
                out.insert("items".into(), gemini_schema(value, &here)?);
            }
            "anyOf" => {
                let Value::Array(children) = value else {
                    return Err(refused(format!("{here} must be a list")));
                };
                let converted = children
                    .iter()
                    .enumerate()
                    .map(|(i, child)| gemini_schema(child, &format!("{here}/{i}")))
                    .collect::<Result<Vec<_>, _>>()?;
                out.insert("anyOf".into(), Value::Array(converted));
            }
            k if GEMINI_KEPT.contains(&k) => {
                out.insert(key.clone(), value.clone());
            }
            k if GEMINI_DROPPED.contains(&k) => {}
            _ => {
                return Err(refused(format!(
                    "Gemini's responseSchema does not support {here}"
                )));
            }
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(constraint: Option<Constraint>) -> GenerateParams {
        GenerateParams {
            constraint,
            ..GenerateParams::default()
        }
    }

    #[test]
    fn openai_apis_get_openais_fields() {
        let mut p = params(Some(Constraint::JsonSchema {
            name: "n".into(),
            schema: json!({"type": "object"}),
            strict: true,
        }));
        p.presence_penalty = 0.5;
        p.logit_bias = vec![(42, -100.0)];
        let fields = openai_fields(&p).unwrap();
        assert_eq!(fields["presence_penalty"], json!(0.5));
        assert_eq!(fields["logit_bias"], json!({"42": -100.0}));
        assert_eq!(
            fields["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": true}})
        );
        assert!(
            !fields.contains_key("frequency_penalty"),
            "defaults are not sent"
        );
        assert!(openai_fields(&params(None)).unwrap().is_empty());
    }

    #[test]
    fn choices_and_logprobs_pass_in_each_apis_form() {
        let p = GenerateParams {
            n: 3,
            logprobs: Some(2),
            ..GenerateParams::default()
        };
        let openai = openai_fields(&p).unwrap();
        assert_eq!(
            (&openai["n"], &openai["logprobs"], &openai["top_logprobs"]),
            (&json!(3), &json!(true), &json!(2))
        );
        let gemini = gemini_fields(&p).unwrap();
        assert_eq!(
            (
                &gemini["candidateCount"],
                &gemini["responseLogprobs"],
                &gemini["logprobs"]
            ),
            (&json!(3), &json!(true), &json!(2))
        );
        let one = GenerateParams::default();
        assert!(!openai_fields(&one).unwrap().contains_key("n"));
        assert!(!gemini_fields(&one).unwrap().contains_key("candidateCount"));
    }

    #[test]
    fn gemini_gets_its_own_forms() {
        let mut p = params(Some(Constraint::JsonSchema {
            name: "n".into(),
            schema: json!({"type": "object", "additionalProperties": false,
                "properties": {"a": {"type": ["string", "null"]}, "b": {"const": "x"}}}),
            strict: false,
        }));
        p.top_k = 5;
        p.frequency_penalty = 0.2;
        let fields = gemini_fields(&p).unwrap();
        assert_eq!(fields["topK"], json!(5));
        assert_eq!(fields["frequencyPenalty"], json!(0.2f32));
        assert_eq!(fields["responseMimeType"], "application/json");
        assert_eq!(
            fields["responseSchema"],
            json!({"type": "object", "properties": {
                "a": {"type": "string", "nullable": true}, "b": {"enum": ["x"]}}})
        );
    }

    #[test]
    fn what_an_api_cannot_honour_is_its_refusal() {
        let grammar = params(Some(Constraint::Grammar("root ::= \"a\"".into())));
        let bias = GenerateParams {
            logit_bias: vec![(1, 1.0)],
            ..GenerateParams::default()
        };
        let reference = params(Some(Constraint::JsonSchema {
            name: "n".into(),
            schema: json!({"$defs": {}, "$ref": "#/$defs/x"}),
            strict: false,
        }));
        for (p, openai_ok) in [(&grammar, false), (&bias, true), (&reference, true)] {
            assert_eq!(openai_fields(p).is_ok(), openai_ok, "{p:?}");
            let error = gemini_fields(p).unwrap_err();
            assert_eq!(
                error.fault(),
                super::super::Fault::Request(RequestFault::InvalidRequest),
                "{error}"
            );
        }
    }
}
