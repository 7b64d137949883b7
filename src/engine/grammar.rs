//! Constrained output: a request's [`Constraint`] becomes a llama.cpp GBNF grammar for the
//! grammar sampler. JSON Schemas go through llama.cpp's own converter
//! (`common/json-schema-to-grammar.cpp`, what llama-server uses), after a check that the
//! schema stays within the subset that converter honours: it skips what it does not know
//! silently, and a reply that ignores part of the schema is worse than a clear refusal.
//!
//! The supported subset (llama.cpp's `grammars/README.md` lists the converter's limits):
//! `type` (one or a list), `properties`, `required`, `additionalProperties` (default
//! `false`, as in llama.cpp), `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`,
//! `oneOf`, `allOf`, local `$ref` into `$defs` / `definitions`, `minLength`, `maxLength`,
//! `pattern` (anchored with `^…$`), `format` (`date`, `time`, `date-time`, `uuid`), and
//! `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum` on integers; annotations
//! (`title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`, …) are
//! ignored. Everything else is refused by name.

use serde_json::Value;

use crate::chat::Constraint;

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema uses keywords outside the supported subset.
    #[error("the JSON schema uses unsupported keywords: {}", .0.join(", "))]
    Unsupported(Vec<String>),
    /// The schema is not a usable JSON Schema.
    #[error("the JSON schema is invalid: {0}")]
    InvalidSchema(String),
    /// The GBNF grammar does not parse (or has no `root` rule).
    #[error("the grammar does not parse (it needs a `root` rule; see llama.cpp's GBNF guide)")]
    InvalidGrammar,
}

/// Most nesting a schema may have.
const MAX_DEPTH: usize = 32;

/// Keywords that change what is valid, and are honoured.
const SUPPORTED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// Keywords that only describe, and are ignored.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "readOnly",
    "writeOnly",
    "deprecated",
    "strict",
];

/// String formats the converter knows.
const FORMATS: &[&str] = &["date", "time", "date-time", "uuid"];

/// The keywords of `schema` outside the supported subset, each with its JSON pointer
/// (`/properties/tags/uniqueItems`), in document order.
pub fn unsupported_keywords(schema: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk(schema, "", 0, &mut found);
    found
}

fn walk(schema: &Value, path: &str, depth: usize, found: &mut Vec<String>) {
    let Value::Object(map) = schema else {
        if !schema.is_boolean() {
            found.push(format!("{path} (a schema must be an object)"));
        }
        return;
    };
    if depth > MAX_DEPTH {
        found.push(format!("{path} (nested deeper than {MAX_DEPTH})"));
        return;
    }
    let integer = map.get("type").and_then(Value::as_str) == Some("integer");
    for (key, value) in map {
        let here = format!("{path}/{key}");
        match key.as_str() {
            k if ANNOTATIONS.contains(&k) => {}
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !integer => {
                found.push(format!("{here} (only on integers)"));
            }
            "format" if !value.as_str().is_some_and(|f| FORMATS.contains(&f)) => {
                found.push(format!("{here} (only {})", FORMATS.join(", ")));
            }
            "pattern"
                if !value
                    .as_str()
                    .is_some_and(|p| p.starts_with('^') && p.ends_with('$')) =>
            {
                found.push(format!("{here} (must be anchored with ^ and $)"));
            }
            "$ref"
                if !value.as_str().is_some_and(|r| {
                    r.starts_with("#/$defs/") || r.starts_with("#/definitions/")
                }) =>
            {
                found.push(format!("{here} (only local #/$defs/… references)"));
            }
            "anyOf" | "oneOf" if map.contains_key("properties") => {
                found.push(format!("{here} (beside properties)"));
            }
            "properties" | "$defs" | "definitions" => match value {
                Value::Object(children) => {
                    for (name, child) in children {
                        walk(child, &format!("{here}/{name}"), depth + 1, found);
                    }
                }
                _ => found.push(format!("{here} (must be an object)")),
            },
            "anyOf" | "oneOf" | "allOf" => match value {
                Value::Array(children) => {
                    for (i, child) in children.iter().enumerate() {
                        walk(child, &format!("{here}/{i}"), depth + 1, found);
                    }
                }
                _ => found.push(format!("{here} (must be a list)")),
            },
            "items" | "additionalProperties" => {
                if !value.is_boolean() {
                    walk(value, &here, depth + 1, found);
                }
            }
            k if SUPPORTED.contains(&k) => {}
            _ => found.push(here),
        }
    }
}

/// The GBNF grammar (root rule `root`) for `constraint`, with `to_grammar` converting a
/// JSON Schema (llama.cpp's converter, in `llama.rs`).
pub fn gbnf(
    constraint: &Constraint,
    to_grammar: impl Fn(&str) -> Option<String>,
) -> Result<String, ConstraintError> {
    let schema = match constraint {
        Constraint::Grammar(grammar) => return Ok(grammar.clone()),
        Constraint::JsonObject => {
            serde_json::json!({"type": "object", "additionalProperties": true})
        }
        Constraint::JsonSchema { schema, .. } => schema.clone(),
    };
    let unsupported = unsupported_keywords(&schema);
    if !unsupported.is_empty() {
        return Err(ConstraintError::Unsupported(unsupported));
    }
    to_grammar(&schema.to_string()).ok_or_else(|| {
        ConstraintError::InvalidSchema("llama.cpp's converter could not read it".into())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_supported_subset_passes() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "Person",
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 20, "description": "x"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                "born": {"type": "string", "format": "date"},
                "pet": {"$ref": "#/$defs/pet"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "either": {"anyOf": [{"type": "null"}, {"const": 3}]}
            },
            "required": ["name"],
            "additionalProperties": false,
            "$defs": {"pet": {"type": "object", "properties": {"kind": {"type": "string"}}}}
        });
        assert_eq!(unsupported_keywords(&schema), Vec::<String>::new());
    }

    #[test]
    fn unsupported_keywords_are_named_with_their_place() {
        let schema = json!({
            "type": "object",
            "properties": {
                "tags": {"type": "array", "uniqueItems": true, "items": {"not": {"const": 1}}},
                "score": {"type": "number", "minimum": 0, "multipleOf": 0.5},
                "mail": {"type": "string", "format": "email"}
            },
            "if": {"required": ["a"]}
        });
        let found = unsupported_keywords(&schema);
        for expected in [
            "/properties/tags/uniqueItems",
            "/properties/tags/items/not",
            "/properties/score/minimum (only on integers)",
            "/properties/score/multipleOf",
            "/properties/mail/format",
            "/if",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{expected} not in {found:?}"
            );
        }
        let error = gbnf(
            &Constraint::JsonSchema {
                name: "s".into(),
                schema,
                strict: false,
            },
            |_| Some(String::new()),
        )
        .unwrap_err();
        assert!(error.to_string().contains("uniqueItems"), "{error}");
    }

    #[test]
    fn a_non_object_schema_and_deep_nesting_are_refused() {
        assert!(!unsupported_keywords(&json!(5)).is_empty());
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(!unsupported_keywords(&deep).is_empty());
        assert!(unsupported_keywords(&json!(true)).is_empty());
    }
}
