//! UTF-8-safe incremental detokenization and stop-string matching. Pure: it sees token
//! pieces as bytes and knows nothing of llama.cpp.
//!
//! A token piece is a byte string, and one multi-byte character can span two or more
//! tokens (byte-fallback tokens carry single bytes of an emoji or a CJK character). Text is
//! released only up to the last complete character. Stop strings can span pieces too, so
//! text that could still become the start of a stop string is held back until it is clear.

/// Turns a stream of token pieces into text deltas, ending at the first stop string.
#[derive(Debug)]
pub struct Detokenizer {
    /// Bytes of an incomplete UTF-8 character at the end of the pieces seen so far.
    pending_bytes: Vec<u8>,
    /// Decoded text not yet released, because it may begin a stop string.
    held: String,
    /// Strings that end the reply; never empty strings.
    stops: Vec<String>,
    /// Set once a stop string was seen: nothing more is released.
    stopped: bool,
}

/// What one piece produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DetokOutput {
    /// Text safe to show now (possibly empty).
    pub text: String,
    /// A stop string was completed: the reply ends here, `text` is everything before it.
    pub stopped: bool,
}

impl Detokenizer {
    /// A detokenizer that ends at any of `stops` (empty strings are ignored).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            pending_bytes: Vec::new(),
            held: String::new(),
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s| !s.is_empty())
                .collect(),
            stopped: false,
        }
    }

    /// Feeds one token piece.
    pub fn push(&mut self, piece: &[u8]) -> DetokOutput {
        if self.stopped {
            return DetokOutput {
                text: String::new(),
                stopped: true,
            };
        }
        self.pending_bytes.extend_from_slice(piece);
        let complete = complete_utf8_prefix(&self.pending_bytes);
        let rest = self.pending_bytes.split_off(complete);
        let bytes = std::mem::replace(&mut self.pending_bytes, rest);
        self.held.push_str(&String::from_utf8_lossy(&bytes));
        self.release()
    }

    /// Ends the stream: releases everything still held (an incomplete character becomes
    /// U+FFFD, a partial stop string is ordinary text after all).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let bytes = std::mem::take(&mut self.pending_bytes);
        self.held.push_str(&String::from_utf8_lossy(&bytes));
        std::mem::take(&mut self.held)
    }

    fn release(&mut self) -> DetokOutput {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            self.pending_bytes.clear();
            return DetokOutput {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_suffix_len(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let tail = self.held.split_off(cut);
        DetokOutput {
            text: std::mem::replace(&mut self.held, tail),
            stopped: false,
        }
    }
}

/// Length of the longest prefix of `bytes` that does not end inside a UTF-8 character.
/// Invalid bytes count as complete (they become U+FFFD).
fn complete_utf8_prefix(bytes: &[u8]) -> usize {
    // Look at most 3 bytes back for the lead byte of an unfinished character.
    for back in 1..=bytes.len().min(3) {
        let i = bytes.len() - back;
        let b = bytes[i];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: keep looking for its lead
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if back < needed { i } else { bytes.len() };
    }
    bytes.len()
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, at a
/// character boundary.
fn partial_suffix_len(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns the concatenated output and whether it stopped.
    pub(super) fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let mut d = Detokenizer::new(stops.iter().copied());
        let mut out = String::new();
        for piece in pieces {
            let o = d.push(piece);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&d.finish());
        (out, false)
    }

    /// Splits `s` into single bytes, the worst case for multi-byte characters.
    fn bytewise(s: &str) -> Vec<&[u8]> {
        s.as_bytes().chunks(1).collect()
    }

    #[test]
    fn multibyte_characters_split_across_pieces_come_out_whole() {
        for text in ["Привет, мир", "emoji 🦀🎉 ok", "中文字符测试", "mixed é→😀"]
        {
            let mut d = Detokenizer::new(Vec::<String>::new());
            let mut out = String::new();
            for piece in bytewise(text) {
                let o = d.push(piece);
                // Every delta on its own is valid text: no half characters leak out.
                assert!(!o.text.contains('\u{FFFD}'), "{text:?}: {:?}", o.text);
                out.push_str(&o.text);
            }
            out.push_str(&d.finish());
            assert_eq!(out, text);
        }
    }

    #[test]
    fn a_four_byte_emoji_is_released_only_when_complete() {
        let crab = "🦀".as_bytes();
        let mut d = Detokenizer::new(Vec::<String>::new());
        assert_eq!(d.push(&crab[..1]).text, "");
        assert_eq!(d.push(&crab[1..3]).text, "");
        assert_eq!(d.push(&crab[3..]).text, "🦀");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a\xFFb"]).0, "a\u{FFFD}b");
        // A truncated character at the very end is flushed as U+FFFD by finish().
        assert_eq!(run(&[], &[b"ok", &"€".as_bytes()[..2]]).0, "ok\u{FFFD}");
    }

    #[test]
    fn stop_string_spanning_pieces_ends_the_text_before_it() {
        let (out, stopped) = run(&["[INST]"], &[b"Paris.", b" [", b"IN", b"ST] next"]);
        assert!(stopped);
        assert_eq!(out, "Paris. ");
    }

    #[test]
    fn partial_stop_string_is_released_when_it_does_not_complete() {
        let (out, stopped) = run(&["[INST]"], &[b"a [I", b"dea]"]);
        assert!(!stopped);
        assert_eq!(out, "a [Idea]");
    }

    #[test]
    fn partial_stop_string_at_end_is_released_by_finish() {
        let (out, stopped) = run(&["</s>"], &[b"x </"]);
        assert!(!stopped);
        assert_eq!(out, "x </");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, stopped) = run(&["END", "STOP"], &[b"one STOP two END"]);
        assert!(stopped);
        assert_eq!(out, "one ");
    }

    #[test]
    fn stop_string_with_multibyte_characters() {
        let (out, stopped) = run(&["Стоп"], &bytewise("да Стоп нет"));
        assert!(stopped);
        assert_eq!(out, "да ");
    }

    #[test]
    fn held_text_never_splits_a_character() {
        // "é" starts a stop string; the held suffix must be cut at a char boundary.
        let mut d = Detokenizer::new(["éx"]);
        let o = d.push("aé".as_bytes());
        assert_eq!(o.text, "a");
        assert_eq!(d.finish(), "é");
    }

    #[test]
    fn nothing_is_released_after_stopping() {
        let mut d = Detokenizer::new(["!"]);
        assert!(d.push(b"hi!").stopped);
        assert_eq!(d.push(b"more").text, "");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert_eq!(run(&[""], &[b"abc"]), ("abc".to_string(), false));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Text from an alphabet where characters of 1 to 4 bytes, combining marks and the
    /// brackets of control tokens meet often, so stop strings match and half-match.
    fn text() -> impl Strategy<Value = String> {
        let alphabet = prop::sample::select(vec![
            'a', 'b', ' ', '[', 'I', '/', '>', '<', '|', 'é', 'Я', '\u{0301}', '€', '中', '😀',
            '\u{200D}',
        ]);
        prop::collection::vec(alphabet, 0..40).prop_map(|chars| chars.into_iter().collect())
    }

    /// `bytes` cut at `cuts` (positions taken modulo the length): arbitrary pieces, most
    /// of them splitting a character.
    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
    }

    fn feed(stops: &[String], pieces: &[Vec<u8>]) -> (String, bool) {
        let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
        let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        super::tests::run(&stops, &pieces)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_byte_split_of_any_text_gives_the_same_text(
            text in any::<String>(),
            cuts in prop::collection::vec(any::<usize>(), 0..64),
        ) {
            let (out, stopped) = feed(&[], &split(text.as_bytes(), &cuts));
            prop_assert!(!stopped);
            prop_assert_eq!(out, text);
        }

        #[test]
        fn stop_strings_are_found_across_any_split(
            text in text(),
            stops in prop::collection::vec(text(), 0..4),
            cuts in prop::collection::vec(any::<usize>(), 0..64),
        ) {
            let first_stop = stops
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min();
            let expected = first_stop.map_or(text.as_str(), |at| &text[..at]);
            let (out, stopped) = feed(&stops, &split(text.as_bytes(), &cuts));
            prop_assert_eq!(stopped, first_stop.is_some());
            prop_assert_eq!(out.as_str(), expected);
        }

        #[test]
        fn no_delta_ever_holds_a_broken_character(
            text in text(),
            cuts in prop::collection::vec(any::<usize>(), 0..64),
        ) {
            let mut d = Detokenizer::new(["[INST]", "<|im_end|>"]);
            for piece in split(text.as_bytes(), &cuts) {
                let o = d.push(&piece);
                prop_assert!(!o.text.contains('\u{FFFD}'), "{:?}", o.text);
            }
        }
    }
}
