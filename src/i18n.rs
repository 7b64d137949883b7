//! The bot's own words (greetings, help, errors, apologies) in the languages it speaks.
//! A leaf module: callers pick a [`Lang`] from the user's language code.

mod inputs;

pub use inputs::*;

/// A language the bot speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// English, also the default.
    #[default]
    En,
    /// Russian.
    Ru,
}

impl Lang {
    /// The language for an IETF code such as Telegram's `language_code` (`ru`, `en-US`);
    /// English for anything else or nothing.
    pub fn from_code(code: Option<&str>) -> Self {
        match code.map(|c| {
            c.split(['-', '_'])
                .next()
                .unwrap_or("")
                .to_ascii_lowercase()
        }) {
            Some(primary) if primary == "ru" => Lang::Ru,
            _ => Lang::En,
        }
    }
}

/// The canned reply when no provider could answer.
pub fn canned_apology(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, I can't answer right now: all my language models are busy or unreachable. Please try again in a minute."
        }
        Lang::Ru => {
            "Извините, сейчас я не могу ответить: все языковые модели заняты или недоступны. Попробуйте ещё раз через минуту."
        }
    }
}

/// Appended when a reply broke off after part of it was delivered.
pub fn interrupted_notice(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "\n\n[The answer was interrupted.]",
        Lang::Ru => "\n\n[Ответ прервался.]",
    }
}

/// Appended when the provider's safety or copyright filter stopped a reply (Gemini
/// `SAFETY`/`RECITATION`/`PROHIBITED_CONTENT`…, OpenAI `content_filter`), so the user does
/// not take a cut answer for a whole one.
pub fn content_filtered_notice(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "\n\n[The answer was stopped by the model provider's content filter.]",
        Lang::Ru => "\n\n[Ответ остановлен фильтром содержимого поставщика модели.]",
    }
}

/// `/start`: who the bot is.
pub fn greeting(lang: Lang, model: &str) -> String {
    match lang {
        Lang::En => format!(
            "Hello! I am a chat bot running the language model {model} on my own server. \
             Write me anything and I will answer. /help lists the commands."
        ),
        Lang::Ru => format!(
            "Привет! Я чат-бот на языковой модели {model}, работающей на моём собственном сервере. \
             Напишите что угодно, и я отвечу. /help — список команд."
        ),
    }
}

/// `/help`: the commands.
pub fn help(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Write a message and I will answer; I remember this chat's conversation.\n\n\
             /new or /reset — forget the conversation\n\
             /retry — answer your last message again\n\
             /stop — stop the answer being written\n\
             /mode — choose a mode (persona) for this chat\n\
             /system <text> — set this chat's own system prompt (/system shows it, /system reset clears it)\n\
             /usage — your usage and limits\n\
             /stats — model and load figures\n\
             /help — this text\n\n\
             In groups, mention me, reply to my message, or use /ask <question>."
        }
        Lang::Ru => {
            "Напишите сообщение, и я отвечу; я помню разговор в этом чате.\n\n\
             /new или /reset — забыть разговор\n\
             /retry — ответить на последнее сообщение заново\n\
             /stop — остановить текущий ответ\n\
             /mode — выбрать режим (персону) для этого чата\n\
             /system <текст> — задать свой системный промпт чата (/system — показать, /system reset — сбросить)\n\
             /usage — ваше использование и лимиты\n\
             /stats — модель и нагрузка\n\
             /help — эта справка\n\n\
             В группах упомяните меня, ответьте на моё сообщение или напишите /ask <вопрос>."
        }
    }
}

/// The short descriptions registered with `setMyCommands`, in menu order.
pub fn command_menu(lang: Lang) -> [(&'static str, &'static str); 9] {
    match lang {
        Lang::En => [
            ("start", "What this bot is"),
            ("help", "Commands"),
            ("new", "Forget the conversation"),
            ("retry", "Answer the last message again"),
            ("stop", "Stop the current answer"),
            ("mode", "Choose a mode (persona)"),
            ("system", "Show or set this chat's system prompt"),
            ("usage", "Your usage and limits"),
            ("stats", "Model and load figures"),
        ],
        Lang::Ru => [
            ("start", "Что это за бот"),
            ("help", "Команды"),
            ("new", "Забыть разговор"),
            ("retry", "Ответить на последнее сообщение заново"),
            ("stop", "Остановить текущий ответ"),
            ("mode", "Выбрать режим (персону)"),
            ("system", "Показать или задать системный промпт чата"),
            ("usage", "Ваше использование и лимиты"),
            ("stats", "Модель и нагрузка"),
        ],
    }
}

/// `/reset` done.
pub fn reset_done(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Conversation forgotten. Let's start over.",
        Lang::Ru => "Разговор забыт. Начнём сначала.",
    }
}

/// The conversation store failed (a disk error): the message is not answered.
pub fn history_unavailable(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, I cannot reach this chat's history right now. Please try again in a minute."
        }
        Lang::Ru => "Извините, история этого чата сейчас недоступна. Попробуйте через минуту.",
    }
}

/// `/retry` with no earlier message.
pub fn nothing_to_retry(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "There is no earlier message to answer again.",
        Lang::Ru => "Нет предыдущего сообщения, на которое можно ответить заново.",
    }
}

/// The model's answer was blank (it stopped at once, or wrote only spaces).
pub fn empty_answer(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "The model gave an empty answer. Try /retry, or ask in other words.",
        Lang::Ru => "Модель дала пустой ответ. Попробуйте /retry или спросите иначе.",
    }
}

/// `/stop` done.
pub fn stopped(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Stopped.",
        Lang::Ru => "Остановлено.",
    }
}

/// `/stop` with nothing being written.
pub fn nothing_to_stop(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "I am not writing anything right now.",
        Lang::Ru => "Сейчас я ничего не пишу.",
    }
}

/// A user not on `--allowed-users`.
pub fn refused(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Sorry, this is a private bot and you are not on its list of users.",
        Lang::Ru => "Извините, это частный бот, и вас нет в списке его пользователей.",
    }
}

/// A message the bot cannot read: a sticker, a photo without caption, a location…
pub fn text_only(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, I can't read this kind of message. Send me text, a voice note, a file, \
             or a photo with a caption."
        }
        Lang::Ru => {
            "Извините, такие сообщения я не читаю. Пришлите текст, голосовое сообщение, файл \
             или фото с подписью."
        }
    }
}

/// An edited message (it is not answered again).
pub fn edited_ignored(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "I don't re-read edited messages; please send the new text as a new message.",
        Lang::Ru => "Я не перечитываю изменённые сообщения; пришлите новый текст новым сообщением.",
    }
}

/// Empty or whitespace-only text (for example a bare mention).
pub fn empty_hint(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Your message is empty: write your question as text.",
        Lang::Ru => "Сообщение пустое: напишите вопрос текстом.",
    }
}

/// Too many messages waiting in one chat.
pub fn chat_busy(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "I am still answering your earlier messages; please send this one again when I am done."
        }
        Lang::Ru => {
            "Я ещё отвечаю на предыдущие сообщения; пришлите это сообщение, когда я закончу."
        }
    }
}

/// The figures `/stats` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsFigures<'a> {
    /// The model's name.
    pub model: &'a str,
    /// Slots busy now.
    pub slots_busy: usize,
    /// Slots in all.
    pub slots: usize,
    /// Requests waiting for a slot.
    pub queue_len: usize,
    /// Answers this bot delivered since start.
    pub answers: u64,
    /// Average generation speed.
    pub tokens_per_second: f64,
}

/// `/stats`.
pub fn stats(lang: Lang, f: &StatsFigures<'_>) -> String {
    match lang {
        Lang::En => format!(
            "Model: {}\nSlots busy: {} of {}\nQueue: {}\nAnswers given: {}\nAverage speed: {:.1} tokens/s",
            f.model, f.slots_busy, f.slots, f.queue_len, f.answers, f.tokens_per_second
        ),
        Lang::Ru => format!(
            "Модель: {}\nЗанято слотов: {} из {}\nОчередь: {}\nОтветов дано: {}\nСредняя скорость: {:.1} токенов/с",
            f.model, f.slots_busy, f.slots, f.queue_len, f.answers, f.tokens_per_second
        ),
    }
}

/// The conversation does not fit any model's window.
pub fn too_long(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, your message is too long for me to read. Please send a shorter one, or start over with /new."
        }
        Lang::Ru => {
            "Извините, сообщение слишком длинное для меня. Пришлите покороче или начните заново с /new."
        }
    }
}

/// A model refused the request as malformed (odd characters, an unusual conversation).
pub fn invalid_request(lang: Lang) -> &'static str {
    match lang {
        Lang::En => {
            "Sorry, the language model could not accept this message. Please rephrase it, or start over with /new."
        }
        Lang::Ru => {
            "Извините, языковая модель не смогла принять это сообщение. Сформулируйте его иначе или начните заново с /new."
        }
    }
}

/// A model's safety filter blocked the message.
pub fn content_blocked(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Sorry, the language model's content filter declined this message.",
        Lang::Ru => "Извините, фильтр содержимого языковой модели отклонил это сообщение.",
    }
}

/// The bot could not be set up to answer (an internal failure, never a provider's words).
pub fn internal_error(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Sorry, something went wrong on my side. Please try again.",
        Lang::Ru => "Извините, у меня что-то сломалось. Попробуйте ещё раз.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_codes() {
        assert_eq!(Lang::from_code(Some("ru")), Lang::Ru);
        assert_eq!(Lang::from_code(Some("ru-RU")), Lang::Ru);
        assert_eq!(Lang::from_code(Some("en-US")), Lang::En);
        assert_eq!(Lang::from_code(Some("de")), Lang::En);
        assert_eq!(Lang::from_code(None), Lang::En);
    }

    #[test]
    fn every_text_exists_in_both_languages_and_differs() {
        for (en, ru) in [
            (help(Lang::En), help(Lang::Ru)),
            (reset_done(Lang::En), reset_done(Lang::Ru)),
            (refused(Lang::En), refused(Lang::Ru)),
            (text_only(Lang::En), text_only(Lang::Ru)),
            (empty_answer(Lang::En), empty_answer(Lang::Ru)),
            (empty_hint(Lang::En), empty_hint(Lang::Ru)),
            (chat_busy(Lang::En), chat_busy(Lang::Ru)),
            (stopped(Lang::En), stopped(Lang::Ru)),
            (too_long(Lang::En), too_long(Lang::Ru)),
            (invalid_request(Lang::En), invalid_request(Lang::Ru)),
            (content_blocked(Lang::En), content_blocked(Lang::Ru)),
        ] {
            assert!(!en.is_empty() && !ru.is_empty());
            assert_ne!(en, ru);
            assert!(ru.chars().any(|c| ('а'..='я').contains(&c)), "{ru}");
        }
        assert!(greeting(Lang::Ru, "SmolLM2").contains("SmolLM2"));
        let figures = StatsFigures {
            model: "m",
            slots_busy: 1,
            slots: 4,
            queue_len: 0,
            answers: 7,
            tokens_per_second: 12.345,
        };
        assert!(stats(Lang::En, &figures).contains("1 of 4"));
        assert!(stats(Lang::Ru, &figures).contains("12.3"));
    }
}
