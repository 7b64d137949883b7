//! The model's Markdown → Telegram HTML (`parse_mode = HTML`). Pure.
//!
//! Supported: fenced code blocks (an unclosed fence runs to the end), inline code,
//! `**bold**`/`__bold__`, `*italic*`/`_italic_`, `~~strike~~`, `[text](http…)` links,
//! `#` headings (bold) and `*`/`-` bullets (•). Everything else is escaped, and a marker
//! without its closing partner stays literal text, so the output is always well-formed:
//! tags are only emitted in matched pairs. Telegram may still reject it (it is stricter
//! about some nesting); the caller then falls back to plain text.

/// How deep inline markup may nest before the rest is taken literally.
const MAX_DEPTH: usize = 6;

/// Escapes text for Telegram HTML.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Renders Markdown as Telegram HTML.
pub fn markdown_to_html(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len() + markdown.len() / 8);
    let mut lines = markdown.split('\n').peekable();
    let mut first = true;
    while let Some(line) = lines.next() {
        if !first {
            out.push('\n');
        }
        first = false;
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            let lang: String = info
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '#' | '_'))
                .collect();
            let mut code = Vec::new();
            for code_line in lines.by_ref() {
                if code_line.trim_start().starts_with("```") {
                    break;
                }
                code.push(code_line);
            }
            let body = escape_html(&code.join("\n"));
            if lang.is_empty() {
                out.push_str(&format!("<pre>{body}</pre>"));
            } else {
                out.push_str(&format!(
                    "<pre><code class=\"language-{}\">{body}</code></pre>",
                    escape_html(&lang)
                ));
            }
            continue;
        }
        let hashes = trimmed.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && trimmed[hashes..].starts_with(' ') {
            out.push_str("<b>");
            out.push_str(&inline(trimmed[hashes..].trim(), 0));
            out.push_str("</b>");
            continue;
        }
        let indent = &line[..line.len() - trimmed.len()];
        if let Some(item) = trimmed
            .strip_prefix("* ")
            .or_else(|| trimmed.strip_prefix("- "))
        {
            out.push_str(indent);
            out.push_str("• ");
            out.push_str(&inline(item, 0));
            continue;
        }
        out.push_str(&inline(line, 0));
    }
    out
}

/// Inline markup of one line.
fn inline(text: &str, depth: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        if depth < MAX_DEPTH
            && let Some((html, used)) = span(rest, text, i, depth)
        {
            out.push_str(&html);
            i += used;
            continue;
        }
        let c = rest.chars().next().map_or(' ', |c| c);
        out.push_str(&escape_html(&rest[..c.len_utf8()]));
        i += c.len_utf8();
    }
    out
}

/// A span starting at `rest` (= `whole[at..]`): its HTML and the bytes it used.
fn span(rest: &str, whole: &str, at: usize, depth: usize) -> Option<(String, usize)> {
    if let Some(body) = rest.strip_prefix('`') {
        let end = body.find('`')?;
        if end == 0 {
            return None;
        }
        return Some((
            format!("<code>{}</code>", escape_html(&body[..end])),
            end + 2,
        ));
    }
    if rest.starts_with('[') {
        return link(rest, depth);
    }
    for (marker, tag) in [
        ("**", "b"),
        ("__", "b"),
        ("~~", "s"),
        ("*", "i"),
        ("_", "i"),
    ] {
        if !rest.starts_with(marker) {
            continue;
        }
        // `_` inside a word (snake_case) is not emphasis.
        if marker.starts_with('_')
            && whole[..at]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric)
        {
            return None;
        }
        let body = &rest[marker.len()..];
        if body.starts_with(char::is_whitespace) || body.starts_with(marker) {
            return None;
        }
        let end = closing(body, marker)?;
        let inner = &body[..end];
        return Some((
            format!("<{tag}>{}</{tag}>", inline(inner, depth + 1)),
            marker.len() * 2 + end,
        ));
    }
    None
}

/// The index in `body` of the marker closing a span: not after whitespace, and for `_`
/// not followed by a word character.
fn closing(body: &str, marker: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = body[from..].find(marker) {
        let end = from + pos;
        let after = &body[end + marker.len()..];
        let before_ok = end > 0 && !body[..end].ends_with(char::is_whitespace);
        let single_star_ok = !(marker == "*" && after.starts_with('*'));
        let word_ok = !marker.starts_with('_') || !after.starts_with(char::is_alphanumeric);
        if before_ok && single_star_ok && word_ok {
            return Some(end);
        }
        from = end + marker.len().max(1);
        if marker == "*" && after.starts_with('*') {
            // Skip a whole `**` so a single `*` span does not close inside a bold one.
            from += 1;
        }
    }
    None
}

/// `[text](url)` with an http(s) URL.
fn link(rest: &str, depth: usize) -> Option<(String, usize)> {
    let close = rest.find("](")?;
    let label = &rest[1..close];
    if label.is_empty() || label.contains('\n') {
        return None;
    }
    let after = &rest[close + 2..];
    let end = after.find(')')?;
    let url = &after[..end];
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.contains(char::is_whitespace)
    {
        return None;
    }
    Some((
        format!(
            "<a href=\"{}\">{}</a>",
            escape_html(url),
            inline(label, depth + 1)
        ),
        close + 2 + end + 1,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_is_not_markup() {
        assert_eq!(
            markdown_to_html("a < b && c > d \"q\""),
            "a &lt; b &amp;&amp; c &gt; d &quot;q&quot;"
        );
    }

    #[test]
    fn renders_emphasis_code_and_links() {
        assert_eq!(
            markdown_to_html("**bold** and *it* and _it_ and ~~s~~"),
            "<b>bold</b> and <i>it</i> and <i>it</i> and <s>s</s>"
        );
        assert_eq!(
            markdown_to_html("use `a<b>` now"),
            "use <code>a&lt;b&gt;</code> now"
        );
        assert_eq!(
            markdown_to_html("see [the *docs*](https://x.org/a?b=1&c=2)"),
            "see <a href=\"https://x.org/a?b=1&amp;c=2\">the <i>docs</i></a>"
        );
        assert_eq!(
            markdown_to_html("**bold with *italic* inside**"),
            "<b>bold with <i>italic</i> inside</b>"
        );
    }

    #[test]
    fn unbalanced_markers_stay_literal() {
        assert_eq!(markdown_to_html("2 * 3 = 6"), "2 * 3 = 6");
        assert_eq!(markdown_to_html("**unclosed bold"), "**unclosed bold");
        assert_eq!(markdown_to_html("a *b"), "a *b");
        assert_eq!(markdown_to_html("snake_case_name"), "snake_case_name");
        assert_eq!(markdown_to_html("`"), "`");
        assert_eq!(
            markdown_to_html("[x](javascript:alert)"),
            "[x](javascript:alert)"
        );
    }

    #[test]
    fn code_blocks_keep_their_text_escaped() {
        let md = "Here:\n```c\n#include <stdio.h>\nint main() { return 1 && 2; }\n```\nDone *now*";
        assert_eq!(
            markdown_to_html(md),
            "Here:\n<pre><code class=\"language-c\">#include &lt;stdio.h&gt;\nint main() { return 1 &amp;&amp; 2; }</code></pre>\nDone <i>now</i>"
        );
        // An unclosed fence (a reply cut in two) runs to the end.
        assert_eq!(markdown_to_html("```\nx < y"), "<pre>x &lt; y</pre>");
    }

    #[test]
    fn headings_and_bullets() {
        assert_eq!(
            markdown_to_html("## Title\n* one\n- two **2**"),
            "<b>Title</b>\n• one\n• two <b>2</b>"
        );
    }

    #[test]
    fn output_tags_are_always_balanced() {
        for md in [
            "***a**",
            "**a*",
            "*a**b*",
            "__a_b__",
            "_a __b_ c__",
            "~~~a~~",
            "[a](http://x",
            "[*a](http://x) *",
            "``a``",
            "****",
            "*\n*",
            "** a **",
            "*a*b*c*d*",
        ] {
            let html = markdown_to_html(md);
            for tag in ["b", "i", "s", "code", "pre", "a"] {
                let open = html.matches(&format!("<{tag}>")).count()
                    + html.matches(&format!("<{tag} ")).count();
                let close = html.matches(&format!("</{tag}>")).count();
                assert_eq!(open, close, "{md:?} → {html:?}");
            }
        }
    }

    mod properties {
        use super::*;
        use crate::telegram::split::telegram_len;
        use proptest::prelude::*;

        /// Checks `html` as Telegram's HTML parse mode would, stricter where Telegram is
        /// lenient: only the tags we may emit, properly nested and closed, `pre`/`code`
        /// holding no other tag (but `<pre><code class>`), only the four entities.
        /// Returns the visible text.
        fn telegram_visible(html: &str) -> Result<String, String> {
            let mut visible = String::new();
            let mut stack: Vec<&str> = Vec::new();
            let mut rest = html;
            while let Some(c) = rest.chars().next() {
                match c {
                    '<' => {
                        let end = rest.find('>').ok_or("unclosed tag")?;
                        let tag = &rest[1..end];
                        rest = &rest[end + 1..];
                        if let Some(name) = tag.strip_prefix('/') {
                            if stack.pop() != Some(name) {
                                return Err(format!("unmatched </{name}>"));
                            }
                            continue;
                        }
                        let (name, attrs) = tag.split_once(' ').unwrap_or((tag, ""));
                        let ok = match name {
                            "b" | "i" | "s" | "pre" => attrs.is_empty(),
                            "code" => {
                                attrs.is_empty()
                                    || (stack.last() == Some(&"pre")
                                        && attrs.starts_with("class=\"language-")
                                        && attrs.ends_with('"'))
                            }
                            "a" => attrs.starts_with("href=\"") && attrs.ends_with('"'),
                            _ => false,
                        };
                        if !ok {
                            return Err(format!("bad tag <{tag}>"));
                        }
                        if let Some(&outer) = stack.last()
                            && (outer == "code" || (outer == "pre" && name != "code"))
                        {
                            return Err(format!("<{name}> inside <{outer}>"));
                        }
                        if attrs.contains(['<', '>']) {
                            return Err("raw < or > in an attribute".into());
                        }
                        stack.push(name);
                    }
                    '&' => {
                        let end = rest.find(';').ok_or("bare &")?;
                        visible.push_str(match &rest[1..end] {
                            "lt" => "<",
                            "gt" => ">",
                            "amp" => "&",
                            "quot" => "\"",
                            other => return Err(format!("entity &{other};")),
                        });
                        rest = &rest[end + 1..];
                    }
                    '>' => return Err("raw >".into()),
                    c => {
                        visible.push(c);
                        rest = &rest[c.len_utf8()..];
                    }
                }
            }
            if let Some(open) = stack.pop() {
                return Err(format!("<{open}> never closed"));
            }
            Ok(visible)
        }

        /// Markdown-ish text: markers, brackets, fences, entities-to-be, any Unicode.
        fn markdown() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    3 => prop::sample::select(vec![
                        "*", "**", "_", "__", "~~", "`", "```", "```rust\n", "[", "](", "](http://x.org/?a=1&b=<2>)",
                        ")", "# ", "## ", "- ", "* ", "\n", " ", "<", ">", "&", "\"", "&amp;", "<b>",
                        "word", "snake_case", "İ", "😀", "\u{200d}", "\u{202e}",
                    ]).prop_map(str::to_string),
                    1 => any::<char>().prop_map(String::from),
                ],
                0..60,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Whatever the model writes, Telegram accepts the HTML, and the visible
            /// text is never longer than the Markdown (so a part that fits the message
            /// limit still fits once formatted).
            #[test]
            fn output_is_always_valid_telegram_html(md in markdown()) {
                let html = markdown_to_html(&md);
                let visible = telegram_visible(&html);
                prop_assert!(visible.is_ok(), "{md:?} → {html:?}: {visible:?}");
                let visible = visible.unwrap_or_default();
                prop_assert!(
                    telegram_len(&visible) <= telegram_len(&md),
                    "{md:?} → {html:?} shows {visible:?}"
                );
            }

            /// Text without markup comes out as itself, escaped.
            #[test]
            fn plain_text_is_only_escaped(text in "[a-zA-Z0-9 ,.!?<>&\"'()]{0,80}") {
                prop_assert_eq!(markdown_to_html(&text), escape_html(&text));
            }
        }
    }
}
