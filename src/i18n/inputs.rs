//! The bot's words about voice notes, files and photos.

use super::Lang;

/// Shown before the answer to a voice note: what the bot heard.
pub fn heard(lang: Lang, transcript: &str) -> String {
    // A long transcript is shown in part: the answer follows, and the whole is in the
    // conversation.
    const SHOWN: usize = 3000;
    let mut shown: String = transcript.chars().take(SHOWN).collect();
    if transcript.chars().count() > SHOWN {
        shown.push('…');
    }
    match lang {
        Lang::En => format!("🎤 «{shown}»"),
        Lang::Ru => format!("🎤 «{shown}»"),
    }
}

/// A voice note with no speech-to-text configured (said once per chat).
pub fn voice_needs_stt(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "I can't listen to voice messages here: the bot's operator has not set up speech-to-text \
             (--stt-base-url, or GROQ_API_KEY). Please type your message."
        }
        Lang::Ru => {
            "Здесь я не могу прослушать голосовые сообщения: оператор бота не настроил распознавание речи \
             (--stt-base-url или GROQ_API_KEY). Пожалуйста, напишите текстом."
        }
    }
}

/// A voice note longer than `--voice-max-seconds`.
pub fn voice_too_long(lang: Lang, seconds: u32, max: u32) -> String {
    match lang {
        Lang::En => format!(
            "This recording is {seconds} s long; I transcribe up to {max} s. Please send a shorter one or type it."
        ),
        Lang::Ru => format!(
            "Эта запись длится {seconds} с, а я распознаю не больше {max} с. Пришлите запись покороче или напишите текстом."
        ),
    }
}

/// A recording bigger than bots may download (20 MB).
pub fn audio_too_big(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "This recording is too big for me: Telegram lets bots download files up to 20 MB. Please send a shorter one."
        }
        Lang::Ru => {
            "Эта запись слишком большая: Telegram разрешает ботам скачивать файлы до 20 МБ. Пришлите запись покороче."
        }
    }
}

/// The transcription service failed (down, slow, rate limited, nonsense).
pub fn transcription_failed(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, I couldn't transcribe this voice message: the speech-recognition service is not answering. Please try again later or type it."
        }
        Lang::Ru => {
            "Извините, не удалось распознать голосовое сообщение: сервис распознавания речи не отвечает. Попробуйте позже или напишите текстом."
        }
    }
}

/// The transcription came back empty.
pub fn no_speech(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "I couldn't make out any speech in this recording.",
        Lang::Ru => "Я не расслышал(а) в этой записи никакой речи.",
    }
}

/// A file could not be fetched from Telegram.
pub fn download_failed(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Sorry, I couldn't download this file from Telegram. Please try again.",
        Lang::Ru => "Извините, не удалось скачать этот файл из Telegram. Попробуйте ещё раз.",
    }
}

/// A file bigger than `--document-max-bytes`.
pub fn file_too_big(lang: Lang, name: &str, max_bytes: u64) -> String {
    let max = human_size(max_bytes);
    match lang {
        Lang::En => format!(
            "“{name}” is too big for me: I read files up to {max}. Please send a smaller file, or paste the part that matters."
        ),
        Lang::Ru => format!(
            "Файл «{name}» слишком большой: я читаю файлы до {max}. Пришлите файл поменьше или вставьте нужную часть текстом."
        ),
    }
}

/// Why a file cannot be read, for [`file_unreadable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// A known binary format.
    Binary(&'static str),
    /// Bytes that are not text.
    NotText,
    /// A PDF without text.
    PdfWithoutText,
    /// An empty file.
    Empty,
}

/// A file that is not text.
pub fn file_unreadable(lang: Lang, name: &str, why: Unreadable) -> String {
    match (lang, why) {
        (Lang::En, Unreadable::Binary(what)) => format!(
            "“{name}” looks like a binary file ({what}), not text. I can read text files (plain text, Markdown, CSV, JSON, source code) and PDFs with a text layer."
        ),
        (Lang::Ru, Unreadable::Binary(what)) => format!(
            "Файл «{name}» похож на двоичный ({what}), а не на текст. Я читаю текстовые файлы (текст, Markdown, CSV, JSON, исходный код) и PDF с текстовым слоем."
        ),
        (Lang::En, Unreadable::NotText) => format!(
            "“{name}” is not a text file I can read (whatever its name says). I can read text files (plain text, Markdown, CSV, JSON, source code) and PDFs with a text layer."
        ),
        (Lang::Ru, Unreadable::NotText) => format!(
            "«{name}» — не текстовый файл, который я могу прочитать (что бы ни говорило его имя). Я читаю текстовые файлы (текст, Markdown, CSV, JSON, исходный код) и PDF с текстовым слоем."
        ),
        (Lang::En, Unreadable::PdfWithoutText) => format!(
            "I found no text in “{name}”: it may be a scan (images of pages), which I cannot read."
        ),
        (Lang::Ru, Unreadable::PdfWithoutText) => format!(
            "Я не нашёл текста в «{name}»: возможно, это скан (картинки страниц), а их я читать не умею."
        ),
        (Lang::En, Unreadable::Empty) => format!("“{name}” is empty."),
        (Lang::Ru, Unreadable::Empty) => format!("Файл «{name}» пустой."),
    }
}

/// A file sent without a question: read, kept, and what now?
pub fn file_kept(lang: Lang, name: &str) -> String {
    match lang {
        Lang::En => format!("I've read “{name}”. What should I do with it?"),
        Lang::Ru => format!("Я прочитал(а) «{name}». Что с ним сделать?"),
    }
}

/// Sent before the answer to a photo's caption.
pub fn cannot_see_images(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "(I can't see images; I'm answering the caption only.)",
        Lang::Ru => "(Я не вижу изображений и отвечаю только на подпись.)",
    }
}

/// Put before a photo's caption in the prompt, so the model does not pretend to see it.
pub fn photo_for_model(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "[The user sent a photo, which you cannot see, with this caption:]",
        Lang::Ru => "[Пользователь прислал фотографию, которую ты не видишь, с такой подписью:]",
    }
}

/// `bytes` as KiB or MiB for people.
fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{} KiB", (bytes / 1024).max(1))
    }
}
