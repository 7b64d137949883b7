//! Chat prompt → token ids, and fitting a conversation into the context window. Pure: the
//! vocabulary is reached through the [`Vocab`] trait, so this is unit-tested without a model.
//!
//! A prompt is built as **segments**: template scaffolding (`[INST]`, `<|im_start|>user\n`, …)
//! is tokenized with special-token parsing on, message content with it off. A user who
//! types `[INST]` or `</s>` gets those characters, never control tokens. Rendering the whole
//! chat to one string and tokenizing that with parsing on would turn typed control tokens
//! into real ones.

use super::tools::ToolDialect;
use crate::chat::{ChatMessage, Role};

/// A piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// The beginning-of-sequence token, if the model wants one.
    Bos,
    /// Template scaffolding: tokenized with special-token parsing on.
    Special(String),
    /// Message content: tokenized with special-token parsing off.
    Text(String),
}

/// The model's vocabulary, as prompt building needs it.
pub trait Vocab {
    /// Token ids of `text` (no BOS added); `parse_special` turns control-token text such as
    /// `<|im_start|>` into control tokens.
    fn tokenize(&self, text: &str, parse_special: bool) -> Vec<i32>;
    /// The BOS token, if prompts should start with one.
    fn bos(&self) -> Option<i32>;
}

/// A chat format: turns messages into segments.
pub trait ChatFormat {
    /// Renders `messages` ending with the opening of the assistant's turn.
    fn render(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>, PromptError>;
    /// Strings that end the assistant's turn when generated as plain text.
    fn stop_strings(&self) -> Vec<String>;
    /// How tools are rendered for this format over `vocab`: the generic text rendering
    /// unless the format has tool control tokens of its own.
    fn tool_dialect(&self, _vocab: &dyn Vocab) -> ToolDialect {
        ToolDialect::Generic
    }
}

/// Errors of prompt building.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    /// The request had no messages.
    #[error("the conversation has no messages")]
    Empty,
    /// llama.cpp could not apply the chat template.
    #[error("the chat template could not be applied (llama.cpp error {0})")]
    Template(i32),
    /// The rendered template lost track of message contents.
    #[error("the chat template rendered messages out of order")]
    TemplateMangled,
    /// Not even the scaffolding fits the window.
    #[error("the prompt needs {tokens} tokens but only {max} fit the context window")]
    TooLong {
        /// Tokens needed at the least.
        tokens: usize,
        /// Tokens available.
        max: usize,
    },
}

/// The format of DESIGN.md, used by Mistral Instruct:
/// `<s>[INST] {system}\n\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MistralFormat;

impl ChatFormat for MistralFormat {
    fn render(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>, PromptError> {
        // Tool calls and results in the history take v0.3's control tokens; only a
        // vocabulary that has them is given such messages (see `tool_dialect`).
        super::tools::render_mistral(messages, None)
    }

    fn tool_dialect(&self, vocab: &dyn Vocab) -> ToolDialect {
        ToolDialect::of(vocab)
    }

    fn stop_strings(&self) -> Vec<String> {
        vec!["[INST]".into(), "[/INST]".into(), "</s>".into()]
    }
}

/// The placeholder that stands for message `i` while a native template is rendered, so the
/// rendered string can be split back into scaffolding and content. Private-use characters:
/// no template writes them.
pub fn content_marker(i: usize) -> String {
    format!("\u{E000}{i}\u{E001}")
}

/// Splits a template rendered over [`content_marker`]s back into segments, putting each
/// message's real content in place of its marker. Markers must appear in order, at most
/// once each (a template may drop a message it has no place for).
pub fn segments_from_rendered(
    rendered: &str,
    messages: &[ChatMessage],
    bos_text: Option<&str>,
) -> Result<Vec<Segment>, PromptError> {
    let mut out = Vec::new();
    let mut rest = rendered;
    if let Some(bos) = bos_text.filter(|b| !b.is_empty()) {
        // llama.cpp's templates leave the first BOS to the tokenizer; some write it.
        rest = rest.strip_prefix(bos).unwrap_or(rest);
    }
    out.push(Segment::Bos);
    let mut next = 0;
    while let Some(start) = rest.find('\u{E000}') {
        let after = &rest[start + '\u{E000}'.len_utf8()..];
        let end = after.find('\u{E001}').ok_or(PromptError::TemplateMangled)?;
        let index: usize = after[..end]
            .parse()
            .map_err(|_| PromptError::TemplateMangled)?;
        if index < next || index >= messages.len() {
            return Err(PromptError::TemplateMangled);
        }
        next = index + 1;
        out.push(Segment::Special(rest[..start].to_string()));
        out.push(Segment::Text(messages[index].content.clone()));
        rest = &after[end + '\u{E001}'.len_utf8()..];
    }
    out.push(Segment::Special(rest.to_string()));
    Ok(merge(out))
}

/// Joins neighbouring segments of the same kind and drops empty ones, so tokenization
/// sees text as llama.cpp would see it in one string.
pub(super) fn merge(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for segment in segments {
        match (out.last_mut(), segment) {
            (_, Segment::Special(s) | Segment::Text(s)) if s.is_empty() => {}
            (Some(Segment::Special(a)), Segment::Special(b)) => a.push_str(&b),
            (Some(Segment::Text(a)), Segment::Text(b)) => a.push_str(&b),
            (_, segment) => out.push(segment),
        }
    }
    out
}

/// Token ids of rendered segments.
pub fn tokenize_segments(vocab: &dyn Vocab, segments: &[Segment]) -> Vec<i32> {
    let mut tokens = Vec::new();
    for segment in segments {
        match segment {
            Segment::Bos => tokens.extend(vocab.bos()),
            Segment::Special(s) => tokens.extend(vocab.tokenize(s, true)),
            Segment::Text(s) => tokens.extend(vocab.tokenize(s, false)),
        }
    }
    tokens
}

/// A prompt that fits its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FittedPrompt {
    /// The token ids.
    pub tokens: Vec<i32>,
    /// How many of the oldest messages were left out.
    pub dropped_messages: usize,
    /// Whether a message was cut short (with [`TRUNCATION_MARKER`] in it).
    pub truncated: bool,
}

/// Stands in the middle of a message that was too long for the context window.
pub const TRUNCATION_MARKER: &str =
    "\n\n[… message truncated: too long for the context window …]\n\n";

/// Renders and tokenizes `messages` so that the prompt has at most `budget` tokens.
///
/// A conversation that fits is kept whole. One that does not loses its oldest turns **in
/// blocks** of about half the room left after the system prompt, so the following turns
/// share the new prefix and a slot's KV cache is reused until the next block is due
/// (dropping one turn per message would change the prompt right after the system prompt
/// on every turn, and re-read everything). The cut points sit on a grid of token positions
/// counted from the start of the conversation, so the cut is a function of the
/// conversation alone: an HTTP client that resends the whole history gets the same cut
/// every turn until a whole block is due. The system messages at the start always stay;
/// a cut always starts at a user message.
///
/// When not even the last message fits beside the system prompt, the middle of one or
/// both is cut out and replaced by [`TRUNCATION_MARKER`]. Fails only when the template's
/// scaffolding alone exceeds the budget.
pub fn fit_prompt(
    vocab: &dyn Vocab,
    format: &dyn ChatFormat,
    messages: &[ChatMessage],
    budget: usize,
) -> Result<FittedPrompt, PromptError> {
    if messages.is_empty() {
        return Err(PromptError::Empty);
    }
    let fitter = Fitter {
        vocab,
        format,
        budget,
    };
    let whole = fitter.build(messages)?;
    if whole.len() <= budget {
        return Ok(FittedPrompt {
            tokens: whole,
            dropped_messages: 0,
            truncated: false,
        });
    }
    let system_count = messages
        .iter()
        .take_while(|m| m.role == Role::System)
        .count();
    let (system, turns) = messages.split_at(system_count);
    if !turns.is_empty() {
        let grid = cut_grid(vocab, format, system, turns, budget)?;
        // The smallest grid cut that fits; the fit is monotone in the cut (a shorter
        // suffix never needs more tokens), so a binary search finds it.
        if let Some(fitted) = fitter.first_fitting_cut(system, turns, &grid)? {
            return Ok(fitted);
        }
        // Not even the last block fits (its messages are large): drop single turns
        // after the last grid point.
        let after = grid.last().copied().unwrap_or(0);
        let fine: Vec<usize> = (after + 1..turns.len())
            .filter(|&i| turns[i].role == Role::User)
            .collect();
        if let Some(fitted) = fitter.first_fitting_cut(system, turns, &fine)? {
            return Ok(fitted);
        }
    }
    fitter.truncate(system, turns.last(), turns.len().saturating_sub(1))
}

/// The cut points of a conversation's turns that block trimming may use, ascending:
/// for k = 1, 2, …, the first user message at or after token position k × block, where
/// positions count estimated tokens from the first turn and a block is half the room
/// the system prompt leaves. Depends only on the conversation, the format and the budget,
/// and appending turns never changes the earlier points.
pub fn cut_grid(
    vocab: &dyn Vocab,
    format: &dyn ChatFormat,
    system: &[ChatMessage],
    turns: &[ChatMessage],
    budget: usize,
) -> Result<Vec<usize>, PromptError> {
    let per_message = message_overhead(vocab, format)?;
    let system_tokens = if system.is_empty() {
        0
    } else {
        let mut probe = system.to_vec();
        probe.push(ChatMessage::user(""));
        tokenize_segments(vocab, &format.render(&probe)?).len()
    };
    let block = (budget.saturating_sub(system_tokens) / 2).max(1);
    let mut grid = Vec::new();
    let mut position = 0;
    let mut line = block;
    for (i, turn) in turns.iter().enumerate() {
        if i > 0 && position >= line && turn.role == Role::User {
            grid.push(i);
            // A message longer than a block spans several grid lines: one cut point.
            line = (position / block + 1) * block;
        }
        position += vocab.tokenize(&turn.content, false).len() + per_message;
    }
    Ok(grid)
}

/// The format's scaffolding per message, estimated once per format from a probe chat,
/// so that grid positions do not depend on the rest of the conversation.
fn message_overhead(vocab: &dyn Vocab, format: &dyn ChatFormat) -> Result<usize, PromptError> {
    let one = vec![ChatMessage::user("")];
    let three = vec![
        ChatMessage::user(""),
        ChatMessage::assistant(""),
        ChatMessage::user(""),
    ];
    let short = tokenize_segments(vocab, &format.render(&one)?).len();
    let long = tokenize_segments(vocab, &format.render(&three)?).len();
    Ok(long.saturating_sub(short).div_ceil(2).max(1))
}

/// What fitting needs at hand.
struct Fitter<'a> {
    vocab: &'a dyn Vocab,
    format: &'a dyn ChatFormat,
    budget: usize,
}

impl Fitter<'_> {
    fn build(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, PromptError> {
        Ok(tokenize_segments(
            self.vocab,
            &self.format.render(messages)?,
        ))
    }

    /// The system messages plus `turns[cut..]`, if that fits.
    fn try_cut(
        &self,
        system: &[ChatMessage],
        turns: &[ChatMessage],
        cut: usize,
    ) -> Result<Option<FittedPrompt>, PromptError> {
        let kept: Vec<ChatMessage> = system.iter().chain(&turns[cut..]).cloned().collect();
        let tokens = self.build(&kept)?;
        Ok((tokens.len() <= self.budget).then_some(FittedPrompt {
            tokens,
            dropped_messages: cut,
            truncated: false,
        }))
    }

    /// The first of `cuts` (ascending) whose suffix fits, by binary search.
    fn first_fitting_cut(
        &self,
        system: &[ChatMessage],
        turns: &[ChatMessage],
        cuts: &[usize],
    ) -> Result<Option<FittedPrompt>, PromptError> {
        let (mut lo, mut hi) = (0, cuts.len());
        let mut best = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.try_cut(system, turns, cuts[mid])? {
                Some(fitted) => {
                    best = Some(fitted);
                    hi = mid;
                }
                None => lo = mid + 1,
            }
        }
        Ok(best)
    }

    /// Keeps the system messages and the last message, cutting the middle out of them
    /// until they fit: the last message keeps all of itself if it needs at most half the
    /// room, the system prompt likewise, and otherwise they share the room half and half.
    fn truncate(
        &self,
        system: &[ChatMessage],
        last: Option<&ChatMessage>,
        dropped: usize,
    ) -> Result<FittedPrompt, PromptError> {
        let original: Vec<ChatMessage> = system.iter().chain(last).cloned().collect();
        let mut scaffolding = original.clone();
        for message in &mut scaffolding {
            message.content.clear();
        }
        let overhead = self.build(&scaffolding)?.len();
        if overhead > self.budget {
            return Err(PromptError::TooLong {
                tokens: overhead,
                max: self.budget,
            });
        }
        let room = self.budget - overhead;
        let sizes: Vec<usize> = original
            .iter()
            .map(|m| self.vocab.tokenize(&m.content, false).len())
            .collect();
        let system_size: usize = sizes[..system.len()].iter().sum();
        let last_size = if last.is_some() {
            sizes[system.len()]
        } else {
            0
        };
        let (mut system_room, mut last_room) = if system_size + last_size <= room {
            (system_size, last_size)
        } else if last_size <= room / 2 {
            (room - last_size, last_size)
        } else if system_size <= room / 2 {
            (system_size, room - system_size)
        } else {
            (room / 2, room - room / 2)
        };
        // Token counts of pieces are not additive (merges across a cut, the marker's
        // neighbours): shrink by the overshoot until the whole fits.
        loop {
            let mut kept = original.clone();
            let mut left = system_room;
            for (message, &size) in kept.iter_mut().zip(&sizes).take(system.len()) {
                let allowed = size.min(left);
                left -= allowed;
                if allowed < size {
                    message.content = truncate_to_tokens(self.vocab, &message.content, allowed);
                }
            }
            if last.is_some() && last_room < last_size {
                let message = &mut kept[system.len()];
                message.content = truncate_to_tokens(self.vocab, &message.content, last_room);
            }
            let tokens = self.build(&kept)?;
            if tokens.len() <= self.budget {
                return Ok(FittedPrompt {
                    tokens,
                    dropped_messages: dropped,
                    truncated: kept != original,
                });
            }
            let over = tokens.len() - self.budget;
            if last_room > 0 {
                last_room = last_room.saturating_sub(over);
            } else if system_room > 0 {
                system_room = system_room.saturating_sub(over);
            } else {
                return Err(PromptError::TooLong {
                    tokens: tokens.len(),
                    max: self.budget,
                });
            }
        }
    }
}

/// Cuts the middle out of `text` (two thirds of what stays come from the start, one third
/// from the end, where a question after a long paste usually is) so that it has at most
/// `max_tokens` tokens, marker included.
fn truncate_to_tokens(vocab: &dyn Vocab, text: &str, max_tokens: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    let marker_tokens = vocab.tokenize(TRUNCATION_MARKER, false).len();
    if max_tokens <= marker_tokens {
        return String::new();
    }
    let total_tokens = vocab.tokenize(text, false).len().max(1);
    // Estimate the characters to keep from the average characters per token, then shrink
    // until it fits: tokenization is not linear in characters.
    let mut keep = chars.len() * (max_tokens - marker_tokens) / total_tokens;
    loop {
        let head = keep * 2 / 3;
        let tail = keep - head;
        let mut candidate: String = chars[..head].iter().collect();
        candidate.push_str(TRUNCATION_MARKER);
        candidate.extend(&chars[chars.len() - tail..]);
        if keep == 0 || vocab.tokenize(&candidate, false).len() <= max_tokens {
            return candidate;
        }
        keep = keep * 9 / 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: one token per character, and with parsing on each of a few
    /// control strings is one token (ids ≥ 1000).
    struct CharVocab;

    const CONTROL: [&str; 5] = ["[INST]", "[/INST]", "</s>", "<|im_start|>", "<|im_end|>"];

    impl Vocab for CharVocab {
        fn tokenize(&self, text: &str, parse_special: bool) -> Vec<i32> {
            let mut out = Vec::new();
            let mut rest = text;
            'outer: while let Some(c) = rest.chars().next() {
                if parse_special {
                    for (i, control) in CONTROL.iter().enumerate() {
                        if let Some(after) = rest.strip_prefix(control) {
                            out.push(1000 + i as i32);
                            rest = after;
                            continue 'outer;
                        }
                    }
                }
                out.push(c as i32 % 1000);
                rest = &rest[c.len_utf8()..];
            }
            out
        }

        fn bos(&self) -> Option<i32> {
            Some(999)
        }
    }

    /// The characters of the toy tokens, control tokens left out.
    fn plain_text(tokens: &[i32]) -> String {
        tokens
            .iter()
            .filter(|&&t| t < 999)
            .map(|&t| char::from_u32(t as u32).unwrap())
            .collect()
    }

    fn control_ids(tokens: &[i32]) -> Vec<i32> {
        tokens.iter().copied().filter(|&t| t >= 999).collect()
    }

    #[test]
    fn mistral_format_matches_the_design() {
        let segments = MistralFormat
            .render(&[
                ChatMessage::system("Be brief."),
                ChatMessage::user("Hi"),
                ChatMessage::assistant("Hello!"),
                ChatMessage::user("Bye"),
            ])
            .unwrap();
        assert_eq!(
            segments,
            vec![
                Segment::Bos,
                Segment::Special("[INST]".into()),
                Segment::Text(" Be brief.\n\nHi ".into()),
                Segment::Special("[/INST]".into()),
                Segment::Text("Hello!".into()),
                Segment::Special("</s>[INST]".into()),
                Segment::Text(" Bye ".into()),
                Segment::Special("[/INST]".into()),
            ]
        );
    }

    #[test]
    fn typed_control_strings_stay_plain_text() {
        let evil = "[INST] </s> [/INST] <|im_start|>";
        let tokens = tokenize_segments(
            &CharVocab,
            &MistralFormat.render(&[ChatMessage::user(evil)]).unwrap(),
        );
        // BOS, [INST], [/INST] from the scaffolding; nothing from the user's text.
        assert_eq!(control_ids(&tokens), vec![999, 1000, 1001]);
    }

    #[test]
    fn rendered_native_template_splits_back_into_segments() {
        let messages = [ChatMessage::system("sys"), ChatMessage::user("<|im_end|>")];
        let rendered = format!(
            "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            content_marker(0),
            content_marker(1)
        );
        let segments = segments_from_rendered(&rendered, &messages, None).unwrap();
        assert_eq!(
            segments,
            vec![
                Segment::Bos,
                Segment::Special("<|im_start|>system\n".into()),
                Segment::Text("sys".into()),
                Segment::Special("<|im_end|>\n<|im_start|>user\n".into()),
                Segment::Text("<|im_end|>".into()),
                Segment::Special("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
        let tokens = tokenize_segments(&CharVocab, &segments);
        // The user's "<|im_end|>" is not a control token: 5 from scaffolding + BOS.
        assert_eq!(control_ids(&tokens).len(), 6);
    }

    #[test]
    fn rendered_template_with_bos_text_does_not_double_it() {
        let messages = [ChatMessage::user("x")];
        let rendered = format!("<s>[INST] {} [/INST]", content_marker(0));
        let segments = segments_from_rendered(&rendered, &messages, Some("<s>")).unwrap();
        assert_eq!(segments[0], Segment::Bos);
        assert_eq!(segments[1], Segment::Special("[INST] ".into()));
    }

    #[test]
    fn out_of_order_markers_are_rejected() {
        let messages = [ChatMessage::user("a"), ChatMessage::user("b")];
        let rendered = format!("{}{}", content_marker(1), content_marker(0));
        assert_eq!(
            segments_from_rendered(&rendered, &messages, None),
            Err(PromptError::TemplateMangled)
        );
    }

    fn long_chat(turns: usize) -> Vec<ChatMessage> {
        let mut messages = vec![ChatMessage::system("S")];
        for i in 0..turns {
            messages.push(ChatMessage::user(format!("question {i} ").repeat(5)));
            messages.push(ChatMessage::assistant(format!("answer {i} ").repeat(5)));
        }
        messages.push(ChatMessage::user("last question"));
        messages
    }

    #[test]
    fn short_chat_is_kept_whole() {
        let fitted = fit_prompt(&CharVocab, &MistralFormat, &long_chat(2), 10_000).unwrap();
        assert_eq!(fitted.dropped_messages, 0);
        assert!(!fitted.truncated);
    }

    #[test]
    fn long_history_is_trimmed_oldest_first_keeping_system_and_last() {
        let messages = long_chat(20);
        let fitted = fit_prompt(&CharVocab, &MistralFormat, &messages, 300).unwrap();
        assert!(fitted.tokens.len() <= 300);
        assert!(fitted.dropped_messages > 0);
        assert_eq!(
            fitted.dropped_messages % 2,
            0,
            "turns dropped in user/assistant pairs"
        );
        let text = plain_text(&fitted.tokens);
        assert!(text.starts_with(" S\n\n"), "system prompt kept: {text:?}");
        assert!(text.contains("last question"));
        assert!(text.contains("answer 19"), "the newest turns survive");
        assert!(!text.contains("question 0 "), "the oldest turns go first");
    }

    #[test]
    fn overlong_single_message_is_truncated_with_marker() {
        let huge = format!("START {} END", "x".repeat(100_000));
        let fitted =
            fit_prompt(&CharVocab, &MistralFormat, &[ChatMessage::user(huge)], 1000).unwrap();
        assert!(fitted.truncated);
        assert!(fitted.tokens.len() <= 1000);
        assert!(fitted.tokens.len() > 900, "most of the window is used");
        let text = plain_text(&fitted.tokens);
        assert!(text.contains("START") && text.contains("END"));
        assert!(text.contains("message truncated"));
    }

    #[test]
    fn overlong_system_prompt_is_truncated_too() {
        let messages = [
            ChatMessage::system("s".repeat(5000)),
            ChatMessage::user("q?"),
        ];
        let fitted = fit_prompt(&CharVocab, &MistralFormat, &messages, 400).unwrap();
        assert!(fitted.truncated);
        assert!(fitted.tokens.len() <= 400);
    }

    #[test]
    fn a_window_smaller_than_the_scaffolding_is_an_error() {
        let result = fit_prompt(&CharVocab, &MistralFormat, &[ChatMessage::user("hi")], 3);
        assert!(matches!(result, Err(PromptError::TooLong { .. })));
    }

    #[test]
    fn empty_conversation_is_an_error() {
        assert_eq!(
            fit_prompt(&CharVocab, &MistralFormat, &[], 100),
            Err(PromptError::Empty)
        );
    }

    #[test]
    fn a_huge_message_beside_a_system_prompt_is_truncated_not_refused() {
        // Regression (issue 9): with a system message this failed as "too long".
        let huge = format!("START {} END", "x".repeat(100_000));
        let messages = [ChatMessage::system("Be brief."), ChatMessage::user(huge)];
        let fitted = fit_prompt(&CharVocab, &MistralFormat, &messages, 1000).unwrap();
        assert!(fitted.truncated);
        assert!(fitted.tokens.len() <= 1000);
        let text = plain_text(&fitted.tokens);
        assert!(text.starts_with(" Be brief.\n\nSTART"), "{text:?}");
        assert!(text.contains("END"));
    }

    #[test]
    fn a_growing_chat_is_cut_in_blocks_and_keeps_its_prefix_between_cuts() {
        let budget = 600;
        let mut messages = vec![ChatMessage::system("You are terse.")];
        let mut cuts = Vec::new();
        for i in 0..80 {
            messages.push(ChatMessage::user(format!("question number {i}?")));
            let fitted = fit_prompt(&CharVocab, &MistralFormat, &messages, budget).unwrap();
            assert!(fitted.tokens.len() <= budget);
            cuts.push(fitted.dropped_messages);
            messages.push(ChatMessage::assistant(format!("answer number {i}.")));
        }
        let changes = cuts.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(cuts.windows(2).all(|w| w[0] <= w[1]), "{cuts:?}");
        // 80 turns of ~45 tokens are ~3600 tokens: about one cut per ~300 tokens of chat.
        assert!((5..=15).contains(&changes), "{changes} cuts: {cuts:?}");
    }

    /// ChatML, written out: each message in its own `<|im_start|>role … <|im_end|>`.
    struct ChatMlFormat;

    impl ChatFormat for ChatMlFormat {
        fn render(&self, messages: &[ChatMessage]) -> Result<Vec<Segment>, PromptError> {
            if messages.is_empty() {
                return Err(PromptError::Empty);
            }
            let mut out = vec![Segment::Bos];
            for m in messages {
                out.push(Segment::Special(format!("<|im_start|>{}\n", m.role)));
                out.push(Segment::Text(m.content.clone()));
                out.push(Segment::Special("<|im_end|>\n".into()));
            }
            out.push(Segment::Special("<|im_start|>assistant\n".into()));
            Ok(merge(out))
        }

        fn stop_strings(&self) -> Vec<String> {
            Vec::new()
        }
    }

    fn contains_run(haystack: &[i32], needle: &[i32]) -> bool {
        needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn conversation() -> impl Strategy<Value = Vec<ChatMessage>> {
            (
                proptest::option::of("[a-z ]{0,300}"),
                proptest::collection::vec(("[a-z ]{0,120}", "[a-z ]{0,200}"), 0..30),
                "[a-z ?]{0,1500}",
            )
                .prop_map(|(system, turns, last)| {
                    let mut messages: Vec<ChatMessage> =
                        system.into_iter().map(ChatMessage::system).collect();
                    for (user, assistant) in turns {
                        messages.push(ChatMessage::user(user));
                        messages.push(ChatMessage::assistant(assistant));
                    }
                    messages.push(ChatMessage::user(last));
                    messages
                })
        }

        fn format(chatml: bool) -> &'static dyn ChatFormat {
            if chatml {
                &ChatMlFormat
            } else {
                &MistralFormat
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Never over budget; the system prompt and the last message are kept (cut
            /// in the middle with the marker when they cannot be kept whole); an error only
            /// when not even the empty scaffolding fits.
            #[test]
            fn fitting_stays_within_budget_and_keeps_system_and_last(
                messages in conversation(),
                budget in 8usize..2500,
                chatml in any::<bool>(),
            ) {
                let format = format(chatml);
                let marker = CharVocab.tokenize(TRUNCATION_MARKER, false);
                match fit_prompt(&CharVocab, format, &messages, budget) {
                    Ok(fitted) => {
                        prop_assert!(fitted.tokens.len() <= budget);
                        let last = messages.last().unwrap();
                        let mut must_keep: Vec<&ChatMessage> =
                            messages.iter().take_while(|m| m.role == Role::System).collect();
                        must_keep.push(last);
                        for message in must_keep {
                            let content = CharVocab.tokenize(&message.content, false);
                            prop_assert!(
                                contains_run(&fitted.tokens, &content)
                                    || (fitted.truncated
                                        && (contains_run(&fitted.tokens, &marker)
                                            || budget < 2 * marker.len() + 40)),
                                "lost {:?}", message
                            );
                        }
                    }
                    Err(PromptError::TooLong { .. }) => {
                        let scaffolding: Vec<ChatMessage> = messages
                            .iter()
                            .take_while(|m| m.role == Role::System)
                            .chain(messages.last())
                            .map(|m| ChatMessage::new(m.role, ""))
                            .collect();
                        let needed = tokenize_segments(&CharVocab, &format.render(&scaffolding).unwrap()).len();
                        prop_assert!(needed > budget, "refused though {needed} ≤ {budget}");
                    }
                    Err(e) => prop_assert!(false, "unexpected error {e:?}"),
                }
            }

            /// The cut is a function of the conversation: one more turn keeps the same cut
            /// unless the old cut no longer fits (a new block is due), and never moves it
            /// back, so a stateless client resending its history keeps the cached prefix.
            #[test]
            fn appending_a_turn_keeps_the_cut_until_a_block_is_due(
                messages in conversation(),
                reply in "[a-z ]{0,200}",
                next in "[a-z ?]{0,200}",
                budget in 200usize..2500,
                chatml in any::<bool>(),
            ) {
                let format = format(chatml);
                let Ok(before) = fit_prompt(&CharVocab, format, &messages, budget) else {
                    return Ok(());
                };
                let system_count = messages.iter().take_while(|m| m.role == Role::System).count();
                let (system, turns) = messages.split_at(system_count);
                let grid = cut_grid(&CharVocab, format, system, turns, budget).unwrap();
                // Only cuts on the grid are stable (the fine fallback serves huge messages).
                prop_assume!(
                    !before.truncated
                        && (before.dropped_messages == 0 || grid.contains(&before.dropped_messages))
                );
                let mut longer = messages.clone();
                longer.push(ChatMessage::assistant(reply));
                longer.push(ChatMessage::user(next));
                let Ok(after) = fit_prompt(&CharVocab, format, &longer, budget) else {
                    return Ok(());
                };
                prop_assert!(after.dropped_messages >= before.dropped_messages);
                let old_cut_fits = {
                    let kept: Vec<ChatMessage> = system
                        .iter()
                        .chain(&longer[system_count + before.dropped_messages..])
                        .cloned()
                        .collect();
                    tokenize_segments(&CharVocab, &format.render(&kept).unwrap()).len() <= budget
                };
                if old_cut_fits {
                    prop_assert_eq!(after.dropped_messages, before.dropped_messages);
                }
            }
        }
    }
}
