//! The bot's own words (greetings, help, errors, apologies) in the languages it speaks.
//! A leaf module: callers pick a [`Lang`] from the user's language code.

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
}
