//! The conversation an API request belongs to, as its client names it: the
//! `x-session-id` header (what session-aware routers key on), else the body's
//! `prompt_cache_key` (OpenAI's field), else its `user`. It goes on hashed, as the
//! request's affinity key, so a fleet sends the conversation back to its cache. Pure.

use axum::http::HeaderMap;
use serde::Deserialize;

/// The longest session name used (longer ones are cut: it is only hashed).
const MAX_SESSION_CHARS: usize = 256;

/// The body fields that may name a session.
#[derive(Debug, Default, Deserialize)]
struct SessionFields {
    #[serde(default)]
    prompt_cache_key: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<serde_json::Value>,
}

/// The session `headers` and `body` name, if any (blank names are none).
pub fn session_of(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let clean = |value: &str| {
        let value = value.trim();
        (!value.is_empty()).then(|| value.chars().take(MAX_SESSION_CHARS).collect::<String>())
    };
    if let Some(header) = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .and_then(clean)
    {
        return Some(header);
    }
    // The body was already parsed and validated as a request; this only looks for two
    // optional strings in it, and a body that is not an object has neither.
    let fields: SessionFields = serde_json::from_slice(body).unwrap_or_default();
    [fields.prompt_cache_key, fields.user]
        .into_iter()
        .flatten()
        .find_map(|value| value.as_str().and_then(clean))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_header_wins_then_the_cache_key_then_the_user() {
        let mut headers = HeaderMap::new();
        let body = br#"{"messages":[],"prompt_cache_key":"pck","user":"u1"}"#;
        assert_eq!(session_of(&headers, body).as_deref(), Some("pck"));
        assert_eq!(
            session_of(&headers, br#"{"user":" u1 "}"#).as_deref(),
            Some("u1")
        );
        headers.insert("x-session-id", HeaderValue::from_static("s-9"));
        assert_eq!(session_of(&headers, body).as_deref(), Some("s-9"));
        headers.insert("x-session-id", HeaderValue::from_static("  "));
        assert_eq!(session_of(&headers, body).as_deref(), Some("pck"));
        assert_eq!(session_of(&HeaderMap::new(), br#"{"user":42}"#), None);
        assert_eq!(session_of(&HeaderMap::new(), b"[1,2]"), None);
    }

    proptest! {
        /// Any body: a short, non-blank name or none, never a panic.
        #[test]
        fn any_body_gives_a_bounded_name_or_none(body in proptest::collection::vec(any::<u8>(), 0..200), user in "\\PC{0,400}") {
            for body in [body, serde_json::to_vec(&serde_json::json!({"user": user})).unwrap()] {
                if let Some(name) = session_of(&HeaderMap::new(), &body) {
                    prop_assert!(!name.trim().is_empty());
                    prop_assert!(name.chars().count() <= MAX_SESSION_CHARS);
                }
            }
        }
    }
}
