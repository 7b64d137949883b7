//! A log writer that cuts secrets out of every line: the last line of defence, so that
//! a token inside a library's error text (a URL, a provider echoing the key it was sent)
//! never reaches the log even at `RUST_LOG=trace`. Secrets are also kept out at their
//! source (keys only in headers, [`Secret`](crate::config::Secret) never displayed, cloud
//! error bodies redacted); this catches what a dependency prints.
//!
//! A leaf: depends on nothing in the crate.

use std::io::{self, Write};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not redacted: replacing every `ab` in the log would
/// shred it and protect nothing.
const MIN_SECRET_LEN: usize = 4;

/// Makes writers over `inner` that replace each secret with [`REDACTED`].
#[derive(Clone)]
pub struct RedactingMakeWriter<M> {
    inner: M,
    secrets: Arc<[String]>,
}

impl<M> RedactingMakeWriter<M> {
    /// Redacts `secrets` (too short or blank ones ignored) from what `inner`'s writers get.
    pub fn new(inner: M, secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.trim().len() >= MIN_SECRET_LEN)
            .collect();
        // Longest first, so a token is replaced whole before its secret half is looked for.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            inner,
            secrets: secrets.into(),
        }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            inner: self.inner.make_writer(),
            secrets: Arc::clone(&self.secrets),
        }
    }
}

/// One writer: each `write` (tracing's fmt layer writes one whole event per call) is
/// redacted, then written in full.
pub struct RedactingWriter<W> {
    inner: W,
    secrets: Arc<[String]>,
}

/// `bytes` with every secret replaced by [`REDACTED`], or `None` if it holds none.
pub fn redact_bytes(bytes: &[u8], secrets: &[String]) -> Option<Vec<u8>> {
    let found = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .any(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()));
    if !found {
        return None;
    }
    let mut out = bytes.to_vec();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = replace_all(&out, secret.as_bytes(), REDACTED.as_bytes());
    }
    Some(out)
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match redact_bytes(buf, &self.secrets) {
            Some(clean) => self.inner.write_all(&clean)?,
            None => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    #[test]
    fn secrets_are_cut_from_log_events() {
        let sink = Sink::default();
        let make = RedactingMakeWriter::new(
            sink.clone(),
            [
                "123:AAE-secret".to_string(),
                "AAE-secret".to_string(),
                "ab".to_string(),
            ],
        );
        let subscriber = tracing_subscriber::fmt()
            .with_writer(make)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                url = "http://x/bot123:AAE-secret/getMe",
                "failed with AAE-secret; ab"
            );
        });
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains("AAE-secret"), "{log}");
        assert!(log.contains("http://x/bot[redacted]/getMe"), "{log}");
        assert!(log.contains("failed with [redacted]; ab"), "{log}");
    }

    proptest! {
        #[test]
        fn no_secret_survives_and_clean_text_is_untouched(
            before in ".{0,20}",
            after in ".{0,20}",
            secret in "[a-zA-Z0-9_:-]{4,24}",
        ) {
            let secrets = vec![secret.clone()];
            let text = format!("{before}{secret}{after}{secret}");
            let clean = redact_bytes(text.as_bytes(), &secrets).unwrap();
            let clean = String::from_utf8(clean).unwrap();
            prop_assert!(!clean.contains(&secret), "{}", clean);
            let plain = format!("{before}{after}");
            if !plain.contains(&secret) {
                prop_assert!(redact_bytes(plain.as_bytes(), &secrets).is_none());
            }
        }
    }
}
