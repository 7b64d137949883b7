//! Persona commands: `/mode` (a menu of modes as an inline keyboard; a press arrives as a
//! callback query, answered at once), `/system <text>` (a custom system prompt for this
//! conversation), `/system` (show it), `/system reset` (back to the default), and the
//! persona line of `/stats`.
//!
//! A change of persona goes through the conversation's queue like a message (so it never
//! lands in the middle of an answer) and starts the conversation afresh: the store forgets
//! the turns in the same transaction that records the persona, and the user is told.

use std::sync::Arc;

use teloxide::types::{CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup};
use tokio::time::Instant;

use super::api::DeliveryRetry;
use super::incoming::{self, Origin};
use super::limits::Sender;
use super::state::Seq;
use super::stream::DeliveryError;
use super::{BotCore, TaskInfo, Tasks, Work, guard};
use crate::i18n::{self, Lang};
use crate::persona::{Catalog, MAX_PROMPT_CHARS, Persona};

/// The callback data of a mode button: this prefix and the mode's id.
const MODE_DATA: &str = "mode:";

impl BotCore {
    fn catalog(&self) -> &Catalog {
        self.deps.responder.modes()
    }

    /// `/mode`: sends the menu (the current mode marked).
    pub(super) fn mode_menu(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        tasks: &mut Tasks,
    ) {
        let bot = Arc::clone(self);
        let info = TaskInfo {
            what: "mode menu",
            update_id: Some(update_id),
            origin: origin.clone(),
        };
        tasks.spawn(info, async move {
            let result = guard::guarded(async {
                let current = bot
                    .deps
                    .responder
                    .persona(origin.conversation())
                    .await
                    .unwrap_or_default();
                let keyboard = menu(bot.catalog(), &current, origin.lang);
                let mut retry = DeliveryRetry::default();
                loop {
                    match bot
                        .api
                        .send_menu(
                            Self::target(&origin),
                            menu_title(origin.lang),
                            keyboard.clone(),
                        )
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(e) => retry
                            .wait("sendMessage", e)
                            .await
                            .map_err(DeliveryError::from)?,
                    }
                }
            })
            .await;
            bot.settle(seq, update_id, &origin, result).await;
        });
    }

    /// A press on a menu button: answered at once, then the mode is set through the
    /// conversation's queue.
    pub(super) fn callback(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        query: &CallbackQuery,
        received: Instant,
        tasks: &mut Tasks,
    ) {
        let sender = Sender {
            id: query.from.id.0,
            username: query.from.username.clone(),
        };
        let lang = Lang::from_code(query.from.language_code.as_deref());
        let chosen = query
            .data
            .as_deref()
            .and_then(|d| d.strip_prefix(MODE_DATA))
            .and_then(|id| self.catalog().get(id))
            .map(|mode| (mode.id.clone(), mode.name(lang).to_string()));
        let origin = query.message.as_ref().map(|message| {
            let chat = message.chat();
            let thread = message
                .regular_message()
                .filter(|m| m.is_topic_message)
                .and_then(|m| m.thread_id);
            Origin {
                chat_id: chat.id.0,
                thread,
                message_id: message.id(),
                private: chat.is_private(),
                lang,
            }
        });
        let allowed = incoming::is_allowed(
            self.fair.allowed_for(Some(&sender)),
            sender.id,
            sender.username.as_deref(),
        ) && !self.fair.denied(Some(&sender));
        let note = match (&chosen, allowed) {
            (_, false) => i18n::refused(lang).to_string(),
            (Some((_, name)), true) => format!("✓ {name}"),
            (None, true) => String::new(),
        };
        // Telegram shows a spinner on the button until the query is answered.
        let bot = Arc::clone(self);
        let id = query.id.clone();
        let answer = async move {
            if let Err(e) = bot.api.answer_callback(id, &note).await {
                tracing::debug!(error = %e, "answerCallbackQuery failed");
            }
        };
        match (origin, chosen, allowed) {
            (Some(origin), Some((mode, _)), true) => {
                tasks.spawn(
                    TaskInfo {
                        what: "callback answer",
                        update_id: None,
                        origin: origin.clone(),
                    },
                    answer,
                );
                self.enqueue(
                    seq,
                    update_id,
                    origin,
                    Work::Persona(Persona::Mode(mode)),
                    received,
                    Some(sender),
                    tasks,
                );
            }
            (origin, _, _) => {
                let bot = Arc::clone(self);
                let info = TaskInfo {
                    what: "callback answer",
                    update_id: Some(update_id),
                    origin: origin.unwrap_or(Origin {
                        chat_id: i64::try_from(sender.id).unwrap_or(0),
                        thread: None,
                        message_id: teloxide::types::MessageId(0),
                        private: true,
                        lang,
                    }),
                };
                tasks.spawn(info, async move {
                    answer.await;
                    bot.done(seq).await;
                });
            }
        }
    }

    /// `/system …`: shows the prompt (no text), resets it (`reset`), or queues the change.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn system_command(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        text: String,
        received: Instant,
        sender: Option<Sender>,
        tasks: &mut Tasks,
    ) {
        let lang = origin.lang;
        let change = match text.trim() {
            "" => None,
            word if word.eq_ignore_ascii_case("reset") => Some(Persona::Default),
            custom if custom.chars().count() > MAX_PROMPT_CHARS => {
                return self.reply(
                    seq,
                    update_id,
                    origin,
                    std::future::ready(too_long(lang)),
                    tasks,
                );
            }
            custom => Some(Persona::Custom(custom.to_string())),
        };
        match change {
            Some(persona) => self.enqueue(
                seq,
                update_id,
                origin,
                Work::Persona(persona),
                received,
                sender,
                tasks,
            ),
            None => {
                let bot = Arc::clone(self);
                let key = origin.conversation();
                let text = async move {
                    match bot.deps.responder.persona(key).await {
                        Ok(persona) => bot.describe(&persona, lang),
                        Err(_) => i18n::history_unavailable(lang).to_string(),
                    }
                };
                self.reply(seq, update_id, origin, text, tasks);
            }
        }
    }

    /// Sets the conversation's persona (a job of its queue) and tells the user.
    pub(super) async fn set_persona(
        &self,
        origin: &Origin,
        persona: &Persona,
    ) -> Result<(), DeliveryError> {
        let lang = origin.lang;
        let key = origin.conversation();
        let text = match self.deps.responder.set_persona(key, persona.clone()).await {
            Ok(()) => {
                tracing::info!(
                    chat = key.chat,
                    persona = persona_kind(persona),
                    "persona changed; conversation started afresh"
                );
                changed(self.catalog(), persona, lang)
            }
            Err(e) => {
                tracing::error!(chat = key.chat, error = %e, "cannot save the persona");
                i18n::history_unavailable(lang).to_string()
            }
        };
        Ok(self.say(origin, &text).await?)
    }

    /// The persona line of `/stats`.
    pub(super) async fn persona_line(&self, origin: &Origin) -> String {
        let lang = origin.lang;
        match self.deps.responder.persona(origin.conversation()).await {
            Ok(Persona::Custom(text)) => match lang {
                Lang::En => format!(
                    "Persona: own system prompt ({} characters)",
                    text.chars().count()
                ),
                Lang::Ru => format!(
                    "Персона: свой системный промпт ({} символов)",
                    text.chars().count()
                ),
            },
            Ok(persona) => {
                let name = mode_name(self.catalog(), &persona, lang);
                match lang {
                    Lang::En => format!("Persona: {name}"),
                    Lang::Ru => format!("Персона: {name}"),
                }
            }
            Err(_) => String::new(),
        }
    }

    /// What `/system` shows.
    fn describe(&self, persona: &Persona, lang: Lang) -> String {
        let prompt = self.deps.responder.system_prompt(persona, lang);
        let shown = prompt.as_deref().unwrap_or(match lang {
            Lang::En => "(none)",
            Lang::Ru => "(нет)",
        });
        match (persona, lang) {
            (Persona::Custom(_), Lang::En) => format!(
                "This conversation's own system prompt:\n\n{shown}\n\n/system reset goes back to the default."
            ),
            (Persona::Custom(_), Lang::Ru) => format!(
                "Свой системный промпт этого разговора:\n\n{shown}\n\n/system reset — вернуть промпт по умолчанию."
            ),
            (_, Lang::En) => format!(
                "Mode: {}. System prompt:\n\n{shown}\n\n/system <text> sets this conversation's own; /mode chooses a mode.",
                mode_name(self.catalog(), persona, lang)
            ),
            (_, Lang::Ru) => format!(
                "Режим: {}. Системный промпт:\n\n{shown}\n\n/system <текст> — задать свой для этого разговора; /mode — выбрать режим.",
                mode_name(self.catalog(), persona, lang)
            ),
        }
    }
}

fn persona_kind(persona: &Persona) -> &'static str {
    match persona {
        Persona::Default => "default",
        Persona::Mode(_) => "mode",
        Persona::Custom(_) => "custom",
    }
}

/// The name of the mode `persona` uses (the default mode for a custom prompt).
fn mode_name(catalog: &Catalog, persona: &Persona, lang: Lang) -> String {
    let id = match persona {
        Persona::Mode(id) => id.as_str(),
        _ => crate::persona::DEFAULT_MODE,
    };
    catalog
        .get(id)
        .or_else(|| catalog.modes().first())
        .map_or_else(|| id.to_string(), |m| m.name(lang).to_string())
}

/// The menu: two buttons a row, the current mode marked.
fn menu(catalog: &Catalog, current: &Persona, lang: Lang) -> InlineKeyboardMarkup {
    let current_id = match current {
        Persona::Mode(id) => Some(id.as_str()),
        Persona::Default => Some(crate::persona::DEFAULT_MODE),
        Persona::Custom(_) => None,
    };
    let buttons: Vec<InlineKeyboardButton> = catalog
        .modes()
        .iter()
        .map(|mode| {
            let mark = if current_id == Some(mode.id.as_str()) {
                "• "
            } else {
                ""
            };
            InlineKeyboardButton::callback(
                format!("{mark}{}", mode.name(lang)),
                format!("{MODE_DATA}{}", mode.id),
            )
        })
        .collect();
    InlineKeyboardMarkup::new(buttons.chunks(2).map(<[_]>::to_vec))
}

fn menu_title(lang: Lang) -> &'static str {
    match lang {
        Lang::En => "Choose a mode for this conversation (choosing one starts it afresh):",
        Lang::Ru => "Выберите режим для этого разговора (выбор начинает его заново):",
    }
}

fn too_long(lang: Lang) -> String {
    match lang {
        Lang::En => {
            format!("That system prompt is too long: at most {MAX_PROMPT_CHARS} characters.")
        }
        Lang::Ru => {
            format!("Системный промпт слишком длинный: не больше {MAX_PROMPT_CHARS} символов.")
        }
    }
}

/// The confirmation of a change: what the conversation uses now, and that it starts afresh.
fn changed(catalog: &Catalog, persona: &Persona, lang: Lang) -> String {
    match (persona, lang) {
        (Persona::Custom(_), Lang::En) => {
            "System prompt set for this conversation. I have started the conversation afresh."
                .into()
        }
        (Persona::Custom(_), Lang::Ru) => {
            "Системный промпт для этого разговора задан. Я начал разговор заново.".into()
        }
        (Persona::Default, Lang::En) => {
            "Back to the default system prompt. I have started the conversation afresh.".into()
        }
        (Persona::Default, Lang::Ru) => {
            "Системный промпт снова по умолчанию. Я начал разговор заново.".into()
        }
        (Persona::Mode(_), Lang::En) => format!(
            "Mode: {}. I have started the conversation afresh.",
            mode_name(catalog, persona, lang)
        ),
        (Persona::Mode(_), Lang::Ru) => format!(
            "Режим: {}. Я начал разговор заново.",
            mode_name(catalog, persona, lang)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_menu_marks_the_current_mode_and_fits_callback_data() {
        let catalog = Catalog::builtin();
        let keyboard = menu(&catalog, &Persona::Mode("tutor".into()), Lang::Ru);
        let buttons: Vec<&InlineKeyboardButton> =
            keyboard.inline_keyboard.iter().flatten().collect();
        assert_eq!(buttons.len(), catalog.modes().len());
        assert!(keyboard.inline_keyboard.iter().all(|row| row.len() <= 2));
        let marked: Vec<&str> = buttons
            .iter()
            .filter(|b| b.text.starts_with('•'))
            .map(|b| b.text.as_str())
            .collect();
        assert_eq!(marked, ["• Репетитор"]);
        for button in buttons {
            let teloxide::types::InlineKeyboardButtonKind::CallbackData(data) = &button.kind else {
                panic!("a callback button");
            };
            assert!(data.len() <= 64, "Telegram's limit for callback data");
        }
        for lang in [Lang::En, Lang::Ru] {
            for persona in [
                Persona::Default,
                Persona::Mode("code".into()),
                Persona::Custom("x".into()),
            ] {
                assert!(changed(&catalog, &persona, lang).contains(match lang {
                    Lang::En => "afresh",
                    Lang::Ru => "заново",
                }));
            }
        }
    }
}
