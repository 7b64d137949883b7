//! Splitting a long answer into Telegram-sized messages. Pure.
//!
//! Telegram accepts at most 4096 characters a message. Lengths here are counted in UTF-16
//! code units (what Telegram counts entity offsets in; never less than the characters), so
//! an emoji-heavy text can never overflow. Cuts fall on a paragraph break if one is in the
//! second half of the window, else a line break, else a sentence end, else a space, else
//! at a character boundary: never inside a UTF-8 character.

/// The most characters of one Telegram message.
pub const MESSAGE_LIMIT: usize = 4096;

/// The length of `text` as Telegram counts it (UTF-16 code units).
pub fn telegram_len(text: &str) -> usize {
    text.encode_utf16().count()
}

/// The byte index of the end of the longest prefix of `text` that fits in `limit` UTF-16
/// units (a character boundary).
fn fit(text: &str, limit: usize) -> usize {
    let mut units = 0;
    for (i, c) in text.char_indices() {
        units += c.len_utf16();
        if units > limit {
            return i;
        }
    }
    text.len()
}

/// Where to cut `text` so that the first part fits in `limit`: a byte index at a character
/// boundary, `text.len()` if all of it fits. The first part is never empty when `text`
/// is not (and `limit > 0`).
pub fn split_point(text: &str, limit: usize) -> usize {
    let end = fit(text, limit);
    if end == text.len() {
        return end;
    }
    let window = &text[..end];
    // A boundary in the first half would make many short messages; prefer a worse kind
    // of boundary late in the window.
    let min = end / 2;
    let after = |pos: Option<usize>, len: usize| pos.map(|p| p + len).filter(|&p| p > min);
    if let Some(p) = after(window.rfind("\n\n"), 2) {
        return p;
    }
    if let Some(p) = after(window.rfind('\n'), 1) {
        return p;
    }
    let sentence = [". ", "! ", "? ", "… ", "。"]
        .iter()
        .filter_map(|end| window.rfind(end).map(|p| p + end.len()))
        .max();
    if let Some(p) = after(sentence, 0) {
        return p;
    }
    if let Some(p) = after(window.rfind(char::is_whitespace), 1) {
        // The whitespace found is one byte (space, tab) or more (a wide space): step over
        // the whole character.
        let p = p - 1;
        let width = window[p..].chars().next().map_or(1, char::len_utf8);
        return p + width;
    }
    if end == 0 {
        // Only when `limit` is 0: take one character so the caller makes progress.
        return text.chars().next().map_or(0, char::len_utf8);
    }
    end
}

/// Splits `text` into parts of at most `limit` units each; whitespace at the cuts is
/// dropped, empty parts are omitted.
pub fn split_message(text: &str, limit: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let cut = split_point(rest, limit);
        let part = rest[..cut].trim_end();
        if !part.is_empty() {
            parts.push(part);
        }
        rest = rest[cut..].trim_start();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_message("hello", 4096), vec!["hello"]);
        assert!(split_message("   ", 10).is_empty());
    }

    #[test]
    fn prefers_paragraphs_then_lines_then_sentences_then_spaces() {
        let text = "aaaa aaaa.\n\nbbbb bbbb. cccc";
        assert_eq!(
            split_message(text, 14),
            vec!["aaaa aaaa.", "bbbb bbbb.", "cccc"]
        );
        assert_eq!(split_point("aaaa bbbb\ncccc dddd", 14), 10);
        assert_eq!(split_point("One two. Three four", 15), 9);
        assert_eq!(split_point("one two three four", 12), 8);
    }

    #[test]
    fn an_early_boundary_is_not_taken() {
        // The only paragraph break is in the first half: cut at a later space instead.
        let text = "a\n\nbbbbbbbbbb cccccccccc dddd";
        let cut = split_point(text, 20);
        assert!(cut > 10, "{cut}");
    }

    #[test]
    fn never_cuts_inside_a_character_and_every_part_fits() {
        let text = "Привет, мир! 😀😀😀 ".repeat(500);
        let parts = split_message(&text, MESSAGE_LIMIT);
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(telegram_len(part) <= MESSAGE_LIMIT);
        }
        let joined: String = parts.concat();
        let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let joined: String = joined.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(joined, squeezed, "nothing lost");
    }

    #[test]
    fn text_without_boundaries_is_cut_hard() {
        let text = "я".repeat(10_000);
        let parts = split_message(&text, MESSAGE_LIMIT);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].chars().count(), 4096);
        // A surrogate pair never straddles the limit.
        let emoji = "😀".repeat(3000);
        let first = split_point(&emoji, MESSAGE_LIMIT);
        assert_eq!(telegram_len(&emoji[..first]), 4096);
        assert!(emoji.is_char_boundary(first));
        let odd = format!("a{emoji}");
        assert_eq!(telegram_len(&odd[..split_point(&odd, MESSAGE_LIMIT)]), 4095);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Text with every kind of boundary and wide characters (surrogate pairs, ZWJ
        /// sequences, combining marks, CJK, wide spaces).
        fn text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    3 => prop::sample::select(vec![
                        "a", "word", " ", "\n", "\n\n", ". ", "! ", "… ", "。", "\u{3000}", "😀",
                        "👩\u{200d}💻", "e\u{301}", "я", "\t", "𝕏",
                    ]).prop_map(str::to_string),
                    1 => any::<char>().prop_map(String::from),
                ],
                0..200,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Cutting again and again at `split_point` (as the streamer does): every part
            /// fits the limit in UTF-16 units, no part is empty, the parts put together
            /// are the input exactly, and no cut falls inside a character (so never
            /// inside a surrogate pair).
            #[test]
            fn parts_fit_and_concatenate_to_the_input(text in text(), limit in 2usize..64) {
                let mut parts = Vec::new();
                let mut rest = text.as_str();
                while !rest.is_empty() {
                    let cut = split_point(rest, limit);
                    prop_assert!(cut > 0 && rest.is_char_boundary(cut));
                    let (part, tail) = rest.split_at(cut);
                    prop_assert!(telegram_len(part) <= limit, "{part:?} over {limit}");
                    parts.push(part);
                    rest = tail;
                }
                prop_assert_eq!(parts.concat(), text);
            }

            /// `split_message` drops only whitespace at the cuts.
            #[test]
            fn split_message_loses_only_whitespace(text in text(), limit in 2usize..64) {
                let parts = split_message(&text, limit);
                for part in &parts {
                    prop_assert!(telegram_len(part) <= limit);
                    prop_assert!(!part.trim().is_empty());
                }
                let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
                prop_assert_eq!(squeeze(&parts.concat()), squeeze(&text));
            }
        }
    }
}
