//! A file a user sent, read as text for the model: sniffed by its bytes (magic numbers,
//! byte-order marks, NULs, control characters), decoded (UTF-8, UTF-16 with or without a
//! BOM, Windows-1251 and Latin-1 for legacy text files), the text layer of a PDF
//! extracted, and the result fenced with the file's name and bounded. Pure: bytes in,
//! text or a typed refusal out.
//!
//! PDF: [`lopdf`], a maintained pure-Rust PDF library (regular releases, MIT, no C
//! dependencies, used by `pdf-extract` itself underneath); its `extract_text` reads the
//! text layer through each font's `ToUnicode` map. A PDF without a text layer (a scan)
//! is refused as such. Parsing runs behind a panic boundary: a hostile PDF must not take
//! the bot down.
//!
//! May use: `engine` (the truncation marker), `i18n` (why a file is unreadable).

use crate::engine::prompt::TRUNCATION_MARKER;
pub use crate::i18n::Unreadable;

/// What a file turned out to be, when it is text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileText {
    /// The text, without a byte-order mark.
    pub text: String,
    /// How it was read (for logs and the fence's language).
    pub format: Format,
}

/// How a file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// UTF-8 (with or without a BOM).
    Utf8,
    /// UTF-16, little or big endian.
    Utf16,
    /// A single-byte legacy encoding (Windows-1251 Cyrillic, or Latin-1).
    Legacy,
    /// The text layer of a PDF.
    Pdf,
}

impl Format {
    /// A short label for logs.
    pub fn label(self) -> &'static str {
        match self {
            Format::Utf8 => "utf-8",
            Format::Utf16 => "utf-16",
            Format::Legacy => "single-byte",
            Format::Pdf => "pdf",
        }
    }
}

/// Known binary formats by their first bytes.
const MAGIC: [(&[u8], &str); 20] = [
    (b"\x89PNG", "PNG image"),
    (b"\xFF\xD8\xFF", "JPEG image"),
    (b"GIF8", "GIF image"),
    (b"RIFF", "RIFF media (WAV, WebP, AVI)"),
    (b"OggS", "Ogg audio"),
    (b"ID3", "MP3 audio"),
    (b"fLaC", "FLAC audio"),
    (b"\x1A\x45\xDF\xA3", "Matroska/WebM video"),
    (b"PK\x03\x04", "ZIP archive (also .docx, .xlsx, .odt)"),
    (b"PK\x05\x06", "ZIP archive"),
    (b"Rar!", "RAR archive"),
    (b"7z\xBC\xAF\x27\x1C", "7-Zip archive"),
    (b"\x1F\x8B", "gzip archive"),
    (b"BZh", "bzip2 archive"),
    (b"\xFD7zXZ\x00", "xz archive"),
    (b"\x7FELF", "ELF program"),
    (b"MZ", "Windows program"),
    (
        b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1",
        "old Microsoft Office document (.doc, .xls)",
    ),
    (b"SQLite format 3\x00", "SQLite database"),
    (b"\x00asm", "WebAssembly module"),
];

/// Reads `bytes` as text (see the module docs).
pub fn extract(bytes: &[u8]) -> Result<FileText, Unreadable> {
    let text = read(bytes)?;
    if text.text.trim().is_empty() {
        return Err(Unreadable::Empty);
    }
    Ok(text)
}

fn read(bytes: &[u8]) -> Result<FileText, Unreadable> {
    if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        return utf8(rest).ok_or(Unreadable::NotText);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return utf16(rest, u16::from_le_bytes);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return utf16(rest, u16::from_be_bytes);
    }
    if bytes.starts_with(b"%PDF-") {
        return pdf(bytes);
    }
    // Clean text first: a text file may begin with the letters of a magic number ("MZ…").
    if let Some(text) = utf8(bytes) {
        return Ok(text);
    }
    if let Some((_, what)) = MAGIC.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return Err(Unreadable::Binary(what));
    }
    if let Some(order) = bomless_utf16(bytes) {
        return utf16(bytes, order);
    }
    if bytes.contains(&0) {
        return Err(Unreadable::NotText);
    }
    legacy(bytes).ok_or(Unreadable::NotText)
}

/// UTF-8 text, if `bytes` are valid UTF-8 and look like text.
fn utf8(bytes: &[u8]) -> Option<FileText> {
    let text = std::str::from_utf8(bytes).ok()?;
    looks_like_text(text).then(|| FileText {
        text: text.to_string(),
        format: Format::Utf8,
    })
}

/// UTF-16 without a BOM: most of the first code units of ASCII-range text have one zero
/// byte, always on the same side.
fn bomless_utf16(bytes: &[u8]) -> Option<fn([u8; 2]) -> u16> {
    let sample = &bytes[..bytes.len().min(4096) & !1];
    let pairs = sample.len() / 2;
    if pairs < 2 {
        return None;
    }
    let zero_high = sample
        .chunks_exact(2)
        .filter(|p| p[1] == 0 && p[0] != 0)
        .count();
    let zero_low = sample
        .chunks_exact(2)
        .filter(|p| p[0] == 0 && p[1] != 0)
        .count();
    if zero_high * 10 >= pairs * 6 && zero_low == 0 {
        Some(u16::from_le_bytes)
    } else if zero_low * 10 >= pairs * 6 && zero_high == 0 {
        Some(u16::from_be_bytes)
    } else {
        None
    }
}

fn utf16(bytes: &[u8], order: fn([u8; 2]) -> u16) -> Result<FileText, Unreadable> {
    let units = bytes.chunks_exact(2).map(|p| order([p[0], p[1]]));
    let decoded: String = char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    let replaced = decoded.matches(char::REPLACEMENT_CHARACTER).count();
    if replaced * 20 > decoded.chars().count().max(1) || !looks_like_text(&decoded) {
        return Err(Unreadable::NotText);
    }
    Ok(FileText {
        text: decoded,
        format: Format::Utf16,
    })
}

/// Windows-1251 (what Russian Windows writes) when the non-ASCII bytes mostly come in
/// runs (Cyrillic words are all high bytes), else Latin-1 (where an accented letter sits
/// alone among ASCII ones); `None` when the result is not text.
fn legacy(bytes: &[u8]) -> Option<FileText> {
    let high = |i: usize| bytes.get(i).is_some_and(|b| *b >= 0x80);
    let (mut total, mut in_runs) = (0usize, 0usize);
    for i in 0..bytes.len() {
        if high(i) {
            total += 1;
            if (i > 0 && high(i - 1)) || high(i + 1) {
                in_runs += 1;
            }
        }
    }
    let text: String = if in_runs * 10 >= total * 6 {
        bytes.iter().map(|&b| cp1251(b)).collect()
    } else {
        bytes.iter().map(|&b| char::from(b)).collect()
    };
    looks_like_text(&text).then_some(FileText {
        text,
        format: Format::Legacy,
    })
}

/// One Windows-1251 byte as a character.
fn cp1251(byte: u8) -> char {
    const HIGH: [char; 64] = [
        'Ђ', 'Ѓ', '‚', 'ѓ', '„', '…', '†', '‡', '€', '‰', 'Љ', '‹', 'Њ', 'Ќ', 'Ћ', 'Џ', //
        'ђ', '‘', '’', '“', '”', '•', '–', '—', '\u{FFFD}', '™', 'љ', '›', 'њ', 'ќ', 'ћ', 'џ',
        '\u{A0}', 'Ў', 'ў', 'Ј', '¤', 'Ґ', '¦', '§', 'Ё', '©', 'Є', '«', '¬', '\u{AD}', '®', 'Ї',
        '°', '±', 'І', 'і', 'ґ', 'µ', '¶', '·', 'ё', '№', 'є', '»', 'ј', 'Ѕ', 'ѕ', 'ї',
    ];
    match byte {
        0..=0x7F => char::from(byte),
        0x80..=0xBF => HIGH[usize::from(byte - 0x80)],
        // А..я are contiguous from U+0410.
        _ => char::from_u32(0x0410 + u32::from(byte - 0xC0)).unwrap_or('\u{FFFD}'),
    }
}

/// Text, not binary that happens to decode: few control characters besides line breaks
/// and tabs.
fn looks_like_text(text: &str) -> bool {
    let mut total = 0usize;
    let mut control = 0usize;
    for c in text.chars().take(64 * 1024) {
        total += 1;
        if c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{0C}') {
            control += 1;
        }
    }
    control * 100 <= total
}

/// The text layer of a PDF, page by page.
fn pdf(bytes: &[u8]) -> Result<FileText, Unreadable> {
    let owned = bytes.to_vec();
    // A malformed PDF can make a parser panic; that must cost this file only.
    let parsed = std::panic::catch_unwind(move || {
        let document = lopdf::Document::load_mem(&owned).ok()?;
        let pages: Vec<u32> = document.get_pages().keys().copied().collect();
        let mut text = String::new();
        for page in pages {
            if let Ok(page_text) = document.extract_text(&[page]) {
                text.push_str(page_text.trim_end());
                text.push_str("\n\n");
            }
        }
        Some(text)
    });
    match parsed {
        Ok(Some(text)) if !text.trim().is_empty() => Ok(FileText {
            text: text.trim_end().to_string(),
            format: Format::Pdf,
        }),
        _ => Err(Unreadable::PdfWithoutText),
    }
}

/// The fence's language tag for a file name: its extension, when it is a plain word.
fn fence_language(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((_, ext))
            if (1..=10).contains(&ext.len()) && ext.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            ext
        }
        _ => "",
    }
}

/// `text` cut to at most `max_chars` characters (marker included) by taking out its
/// middle: two thirds kept from the start, one third from the end, as the engine does for
/// an overlong message. Cuts fall on character boundaries.
pub fn bound(text: &str, max_chars: usize) -> String {
    let count = text.chars().count();
    if count <= max_chars {
        return text.to_string();
    }
    let marker = TRUNCATION_MARKER.chars().count();
    let keep = max_chars.saturating_sub(marker);
    let head = keep * 2 / 3;
    let tail = keep - head;
    let mut out: String = text.chars().take(head).collect();
    out.push_str(TRUNCATION_MARKER);
    out.extend(text.chars().skip(count - tail));
    out
}

/// The file as the model sees it: its name, then its text in a fence longer than any run
/// of backticks inside it (so the text cannot close the fence), bounded to `max_chars`.
pub fn fenced(name: &str, text: &str, max_chars: usize) -> String {
    let text = bound(text, max_chars);
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat((longest + 1).max(3));
    // The name is the user's: one line, no fence of its own.
    let name: String = name
        .chars()
        .map(|c| if c.is_control() || c == '`' { ' ' } else { c })
        .take(200)
        .collect();
    format!(
        "File {name}:\n{fence}{}\n{}\n{fence}",
        fence_language(&name),
        text.trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_encodings_are_read() {
        assert_eq!(extract(b"hello\n").unwrap().text, "hello\n");
        let bom = extract(b"\xEF\xBB\xBFhi").unwrap();
        assert_eq!((bom.text.as_str(), bom.format), ("hi", Format::Utf8));
        let le: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain("Привет, мир".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert_eq!(extract(&le).unwrap().text, "Привет, мир");
        let be: Vec<u8> = [0xFE, 0xFF]
            .into_iter()
            .chain("a,b\n1,2".encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        assert_eq!(extract(&be).unwrap().text, "a,b\n1,2");
        let bomless: Vec<u8> = "name,qty\nfoo,1\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let read = extract(&bomless).unwrap();
        assert_eq!(
            (read.text.as_str(), read.format),
            ("name,qty\nfoo,1\n", Format::Utf16)
        );
        // "Привет" in Windows-1251.
        let cp = extract(b"\xCF\xF0\xE8\xE2\xE5\xF2 \xB8").unwrap();
        assert_eq!((cp.text.as_str(), cp.format), ("Привет ё", Format::Legacy));
        assert_eq!(extract(b"caf\xE9").unwrap().text, "café");
        assert_eq!(
            extract(b"MZ is a city code").unwrap().text,
            "MZ is a city code"
        );
    }

    #[test]
    fn binary_files_are_refused_by_what_they_are() {
        assert_eq!(
            extract(b"\x89PNG\r\n\x1a\nrest"),
            Err(Unreadable::Binary("PNG image"))
        );
        assert!(matches!(
            extract(b"PK\x03\x04\x14\x00"),
            Err(Unreadable::Binary(_))
        ));
        assert_eq!(
            extract(b"abc\x00\x01\x02\xff\xfe\x00"),
            Err(Unreadable::NotText)
        );
        let noise: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 32) as u8).collect();
        assert_eq!(extract(&noise), Err(Unreadable::NotText));
        assert_eq!(extract(b""), Err(Unreadable::Empty));
        assert_eq!(extract(b" \n\t "), Err(Unreadable::Empty));
        assert_eq!(
            extract(b"%PDF-1.4 garbage"),
            Err(Unreadable::PdfWithoutText)
        );
    }

    #[test]
    fn a_pdf_text_layer_is_read() {
        let bytes = test_pdf("Quarterly revenue grew 12 percent");
        let read = extract(&bytes).unwrap();
        assert_eq!(read.format, Format::Pdf);
        assert!(
            read.text.contains("Quarterly revenue grew 12 percent"),
            "{read:?}"
        );
    }

    /// A one-page PDF with `line` in Helvetica.
    fn test_pdf(line: &str) -> Vec<u8> {
        use lopdf::content::{Content, Operation};
        use lopdf::{Document, Object, Stream, dictionary};
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font_id = doc.add_object(dictionary! {
            "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
        });
        let resources_id = doc.add_object(dictionary! {
            "Font" => dictionary! { "F1" => font_id },
        });
        let content = Content {
            operations: vec![
                Operation::new("BT", vec![]),
                Operation::new("Tf", vec!["F1".into(), 24.into()]),
                Operation::new("Td", vec![100.into(), 600.into()]),
                Operation::new("Tj", vec![Object::string_literal(line)]),
                Operation::new("ET", vec![]),
            ],
        };
        let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
        });
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! {
                "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
                "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }),
        );
        let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog_id);
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    #[test]
    fn the_fence_outlasts_backticks_in_the_text_and_names_the_file() {
        let block = fenced("main.rs", "fn main() {}\n```\nnot the end", 10_000);
        assert!(block.starts_with("File main.rs:\n````rs\n"), "{block}");
        assert!(block.ends_with("\n````"), "{block}");
        let odd = fenced("a\nb`.txt", "x", 100);
        assert!(odd.starts_with("File a b .txt:\n```txt\n"), "{odd}");
    }

    #[test]
    fn long_text_is_cut_in_the_middle_with_the_marker() {
        let text: String = "а".repeat(5000);
        let cut = bound(&text, 1000);
        assert_eq!(cut.chars().count(), 1000);
        assert!(cut.contains(TRUNCATION_MARKER));
        assert_eq!(bound("short", 1000), "short");
    }

    proptest! {
        /// Any bytes: no panic, and text read is never empty.
        #[test]
        fn extract_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(read) = extract(&bytes) {
                prop_assert!(!read.text.trim().is_empty());
            }
            let mut pdf = b"%PDF-1.7\n".to_vec();
            pdf.extend_from_slice(&bytes);
            let _ = extract(&pdf);
        }

        /// Bounding never panics, respects the limit when it can, and keeps short text.
        #[test]
        fn bound_respects_the_limit(text in "\\PC{0,300}", max in 0usize..400) {
            let cut = bound(&text, max);
            let marker = TRUNCATION_MARKER.chars().count();
            prop_assert!(cut.chars().count() <= max.max(marker));
            if text.chars().count() <= max {
                prop_assert_eq!(cut, text);
            }
        }

        /// The text inside the fence never contains the fence.
        #[test]
        fn the_fence_is_never_closed_early(name in "\\PC{0,20}", text in "[`a\n]{0,40}") {
            let block = fenced(&name, &text, 1000);
            let mut lines = block.lines();
            let _title = lines.next();
            let open = lines.next().unwrap_or_default();
            let fence: String = open.chars().take_while(|c| *c == '`').collect();
            prop_assert!(fence.len() >= 3);
            let body: Vec<&str> = block.lines().skip(2).collect();
            let inner = &body[..body.len().saturating_sub(1)];
            prop_assert!(inner.iter().all(|l| !l.contains(fence.as_str())));
        }
    }
}
