//! A server-sent-events decoder (the `text/event-stream` format of OpenAI-compatible and
//! Gemini streaming APIs): bytes in, the `data` of each complete event out. Bounded: an
//! event larger than [`MAX_EVENT_BYTES`] is an error, not unbounded memory.
//! <https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>

use bytes::Bytes;
use futures::stream::{self, BoxStream, Stream, StreamExt};

use super::ProviderError;

/// The largest event accepted.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Splits a byte stream into events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line being read.
    line: Vec<u8>,
    /// `data` lines of the event being read, joined by newlines.
    data: String,
    /// Whether the event being read has a `data` field.
    has_data: bool,
}

impl SseDecoder {
    /// Feeds `bytes`; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, ProviderError> {
        let mut events = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
                    return Err(ProviderError::Malformed("stream event too large".into()));
                }
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8(line)
                .map_err(|_| ProviderError::Malformed("stream is not UTF-8".into()))?;
            if line.is_empty() {
                if self.has_data {
                    events.push(std::mem::take(&mut self.data));
                    self.has_data = false;
                }
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_str(), ""),
            };
            if field == "data" {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // Comments (`: keep-alive`), `event`, `id` and `retry` carry nothing we use.
        }
        Ok(events)
    }
}

/// The data of each event of `body`. A body that fails midway yields a `Cut` error; an
/// unfinished event at the end is dropped (as the SSE specification says).
pub fn data_stream<S, E>(body: S) -> BoxStream<'static, Result<String, ProviderError>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let mut decoder = SseDecoder::default();
    body.map(move |chunk| match chunk {
        Ok(bytes) => match decoder.push(&bytes) {
            Ok(events) => events.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        },
        Err(e) => vec![Err(ProviderError::Cut(e.to_string()))],
    })
    .flat_map(stream::iter)
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_across_chunk_boundaries_and_line_endings() {
        let mut decoder = SseDecoder::default();
        assert_eq!(decoder.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(
            decoder
                .push(b":1}\r\n\r\n: keep-alive\n\ndata: [DONE]\n")
                .unwrap(),
            vec!["{\"a\":1}".to_string()]
        );
        assert_eq!(decoder.push(b"\n").unwrap(), vec!["[DONE]".to_string()]);
    }

    #[test]
    fn multi_line_data_is_joined() {
        let mut decoder = SseDecoder::default();
        assert_eq!(
            decoder
                .push(b"event: x\ndata: one\ndata:two\nid: 3\n\n")
                .unwrap(),
            vec!["one\ntwo".to_string()]
        );
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut decoder = SseDecoder::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(matches!(
            decoder.push(&big),
            Err(ProviderError::Malformed(_))
        ));
    }
}
