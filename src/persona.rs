//! Personas: the system prompt a conversation chose. Built-in modes (assistant, concise,
//! translator, code helper, tutor — English and Russian texts), the owner's modes from
//! `--modes-file` (TOML or YAML), or a custom prompt set with `/system`.
//!
//! A conversation's choice is a row in the conversation store (table `personas`, written
//! by the store's one thread; [`SCHEMA`], [`load`], [`save`]). Changing it deletes the
//! conversation's turns in the same transaction: the next prompt starts afresh, so a
//! history written under one persona is never continued under another (and the engine's
//! prompt cache, keyed by the exact token prefix, is never reused across them).
//!
//! The assistant mode *is* the default: it uses `--system-prompt` (or none). Every other
//! mode's prompt replaces it. Prompt text is message content like any other: typed control
//! tokens (`[INST]`, `<|im_start|>`) stay plain text (the engine tokenizes content with
//! special-token parsing off).
//!
//! A leaf module: `rusqlite` and `serde` only.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;

use crate::i18n::Lang;

/// The id of the default mode.
pub const DEFAULT_MODE: &str = "assistant";
/// The longest custom or file prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 4000;
/// The most modes in the menu (built-in and the owner's together).
pub const MAX_MODES: usize = 24;
/// The longest mode id (it travels in a callback's 64-byte `data`).
pub const MAX_ID_LEN: usize = 32;
/// The longest mode name shown on a button.
pub const MAX_NAME_CHARS: usize = 48;

/// The store's table of personas, created with the conversation store.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS personas (
     chat    INTEGER NOT NULL,
     topic   INTEGER NOT NULL,
     mode    TEXT,
     custom  TEXT,
     updated INTEGER NOT NULL,
     PRIMARY KEY (chat, topic)
 );";

/// One mode of the menu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mode {
    /// Its id (callback data, stored choice).
    pub id: String,
    /// Its name in English.
    pub name_en: String,
    /// Its name in Russian.
    pub name_ru: String,
    /// Its system prompt in English; `None`: `--system-prompt` (the assistant mode).
    pub prompt_en: Option<String>,
    /// Its system prompt in Russian.
    pub prompt_ru: Option<String>,
}

impl Mode {
    /// Its name in `lang`.
    pub fn name(&self, lang: Lang) -> &str {
        match lang {
            Lang::En => &self.name_en,
            Lang::Ru => &self.name_ru,
        }
    }

    /// Its prompt in `lang` (`None`: the configured default).
    pub fn prompt(&self, lang: Lang) -> Option<&str> {
        match lang {
            Lang::En => self.prompt_en.as_deref(),
            Lang::Ru => self.prompt_ru.as_deref().or(self.prompt_en.as_deref()),
        }
    }
}

/// What a conversation chose.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Persona {
    /// Nothing: the default (assistant) mode.
    #[default]
    Default,
    /// A mode of the menu, by id.
    Mode(String),
    /// A prompt of its own (`/system <text>`).
    Custom(String),
}

/// Why `--modes-file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModesFileError {
    /// The file cannot be read.
    #[error("--modes-file: cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither valid TOML nor valid YAML of the expected shape.
    #[error("--modes-file {}: not a modes file ({why}); expected [[mode]] tables with id, name, prompt", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        why: String,
    },
    /// A mode breaks a rule.
    #[error("--modes-file {}: mode `{id}`: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The mode's id as written (at most 40 characters of it).
        id: String,
        /// The rule.
        why: &'static str,
    },
    /// Too many modes for one menu.
    #[error("--modes-file {}: at most {MAX_MODES} modes in all (built-in ones count)", path.display())]
    TooMany {
        /// The file.
        path: PathBuf,
    },
}

/// One mode as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMode {
    id: String,
    name: String,
    #[serde(default)]
    name_ru: Option<String>,
    prompt: String,
    #[serde(default)]
    prompt_ru: Option<String>,
}

/// The file: `[[mode]]` tables (TOML) or a `mode:` list (YAML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModesFile {
    #[serde(default)]
    mode: Vec<FileMode>,
}

/// The modes of the menu: the built-in ones, then the owner's (an owner's mode with a
/// built-in id replaces it in place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    modes: Vec<Mode>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::builtin()
    }
}

fn builtin(id: &str, names: [&str; 2], prompts: Option<[&str; 2]>) -> Mode {
    Mode {
        id: id.into(),
        name_en: names[0].into(),
        name_ru: names[1].into(),
        prompt_en: prompts.map(|p| p[0].into()),
        prompt_ru: prompts.map(|p| p[1].into()),
    }
}

impl Catalog {
    /// The built-in modes.
    pub fn builtin() -> Self {
        Self {
            modes: vec![
                builtin(DEFAULT_MODE, ["Assistant", "Ассистент"], None),
                builtin(
                    "concise",
                    ["Concise", "Кратко"],
                    Some([
                        "You are a helpful assistant. Answer as briefly as possible: one or two sentences, no preamble.",
                        "Ты полезный ассистент. Отвечай как можно короче: одно-два предложения, без вступлений.",
                    ]),
                ),
                builtin(
                    "translator",
                    ["Translator", "Переводчик"],
                    Some([
                        "You are a translator. Translate each message: Russian into English, any other language into Russian. Reply with the translation only.",
                        "Ты переводчик. Переводи каждое сообщение: с русского на английский, с любого другого языка на русский. Отвечай только переводом.",
                    ]),
                ),
                builtin(
                    "code",
                    ["Code helper", "Помощник по коду"],
                    Some([
                        "You are an expert programmer. Answer with correct, idiomatic code in fenced code blocks and short explanations.",
                        "Ты опытный программист. Отвечай правильным идиоматичным кодом в блоках кода и короткими пояснениями.",
                    ]),
                ),
                builtin(
                    "tutor",
                    ["Tutor", "Репетитор"],
                    Some([
                        "You are a patient tutor. Explain step by step, check understanding with a short question, and do not just give away answers.",
                        "Ты терпеливый репетитор. Объясняй по шагам, проверяй понимание коротким вопросом и не выдавай готовые ответы сразу.",
                    ]),
                ),
            ],
        }
    }

    /// The built-in modes plus those of `path` (TOML, or YAML for `.yaml`/`.yml`).
    /// Blocking: call it at start-up.
    pub fn with_file(path: &Path) -> Result<Self, ModesFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModesFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::builtin().with_text(path, &text)
    }

    fn with_text(mut self, path: &Path, text: &str) -> Result<Self, ModesFileError> {
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let parsed: Result<ModesFile, String> = if yaml {
            serde_norway::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| e.to_string())
        };
        let file = parsed.map_err(|why| ModesFileError::Parse {
            path: path.to_path_buf(),
            why,
        })?;
        for mode in file.mode {
            let invalid = |why| ModesFileError::Invalid {
                path: path.to_path_buf(),
                id: mode.id.chars().take(40).collect(),
                why,
            };
            let id_ok = !mode.id.is_empty()
                && mode.id.len() <= MAX_ID_LEN
                && mode
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !id_ok {
                return Err(invalid("the id must be 1 to 32 of a-z, 0-9, _ and -"));
            }
            let name_ok = |n: &str| !n.trim().is_empty() && n.chars().count() <= MAX_NAME_CHARS;
            if !name_ok(&mode.name) || !mode.name_ru.as_deref().is_none_or(name_ok) {
                return Err(invalid("a name must be 1 to 48 characters"));
            }
            let prompt_ok = |p: &str| !p.trim().is_empty() && p.chars().count() <= MAX_PROMPT_CHARS;
            if !prompt_ok(&mode.prompt) || !mode.prompt_ru.as_deref().is_none_or(prompt_ok) {
                return Err(invalid("a prompt must be 1 to 4000 characters"));
            }
            let new = Mode {
                id: mode.id.to_ascii_lowercase(),
                name_ru: mode.name_ru.unwrap_or_else(|| mode.name.clone()),
                name_en: mode.name,
                prompt_en: Some(mode.prompt),
                prompt_ru: mode.prompt_ru,
            };
            match self.modes.iter_mut().find(|m| m.id == new.id) {
                Some(existing) => *existing = new,
                None => self.modes.push(new),
            }
            if self.modes.len() > MAX_MODES {
                return Err(ModesFileError::TooMany {
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(self)
    }

    /// Every mode, in menu order.
    pub fn modes(&self) -> &[Mode] {
        &self.modes
    }

    /// The mode `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<&Mode> {
        self.modes.iter().find(|m| m.id == id)
    }

    /// The system prompt of `persona` in `lang`: its own, or `default` (`--system-prompt`)
    /// for the default mode, the assistant mode, and a mode the file no longer has.
    pub fn system_prompt(
        &self,
        persona: &Persona,
        default: Option<&str>,
        lang: Lang,
    ) -> Option<String> {
        match persona {
            Persona::Default => default.map(str::to_string),
            Persona::Custom(text) => Some(text.clone()),
            Persona::Mode(id) => match self.get(id).and_then(|m| m.prompt(lang)) {
                Some(prompt) => Some(prompt.to_string()),
                None => default.map(str::to_string),
            },
        }
    }
}

/// The conversation's persona (the default when it chose none). Runs on the store's thread.
pub fn load(conn: &Connection, chat: i64, topic: i64) -> rusqlite::Result<Persona> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT mode, custom FROM personas WHERE chat = ?1 AND topic = ?2")?
        .query_row(params![chat, topic], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(match row {
        Some((_, Some(custom))) => Persona::Custom(custom),
        Some((Some(mode), None)) if mode != DEFAULT_MODE => Persona::Mode(mode),
        _ => Persona::Default,
    })
}

/// Sets the conversation's persona and forgets its turns, in one transaction (the
/// conversation starts afresh). Runs on the store's thread.
pub fn save(
    conn: &mut Connection,
    chat: i64,
    topic: i64,
    persona: &Persona,
    now: i64,
) -> rusqlite::Result<()> {
    let transaction = conn.transaction()?;
    match persona {
        Persona::Default => {
            transaction.execute(
                "DELETE FROM personas WHERE chat = ?1 AND topic = ?2",
                params![chat, topic],
            )?;
        }
        Persona::Mode(_) | Persona::Custom(_) => {
            let (mode, custom) = match persona {
                Persona::Mode(id) => (Some(id.as_str()), None),
                Persona::Custom(text) => (None, Some(text.as_str())),
                Persona::Default => (None, None),
            };
            transaction.execute(
                "INSERT INTO personas (chat, topic, mode, custom, updated) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (chat, topic) DO UPDATE SET mode = ?3, custom = ?4, updated = ?5",
                params![chat, topic, mode, custom, now],
            )?;
        }
    }
    transaction.execute(
        "DELETE FROM turns WHERE chat = ?1 AND topic = ?2",
        params![chat, topic],
    )?;
    transaction.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_modes_have_both_languages() {
        let catalog = Catalog::builtin();
        let ids: Vec<&str> = catalog.modes().iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["assistant", "concise", "translator", "code", "tutor"]);
        for mode in catalog.modes().iter().skip(1) {
            let (en, ru) = (
                mode.prompt(Lang::En).unwrap(),
                mode.prompt(Lang::Ru).unwrap(),
            );
            assert_ne!(en, ru);
            assert!(ru.chars().any(|c| ('а'..='я').contains(&c)), "{ru}");
            assert_ne!(mode.name(Lang::En), mode.name(Lang::Ru));
        }
        let default = Some("Be kind.");
        assert_eq!(
            catalog
                .system_prompt(&Persona::Default, default, Lang::En)
                .as_deref(),
            default
        );
        assert_eq!(
            catalog
                .system_prompt(&Persona::Mode("assistant".into()), default, Lang::Ru)
                .as_deref(),
            default
        );
        assert_eq!(
            catalog
                .system_prompt(&Persona::Mode("gone".into()), default, Lang::En)
                .as_deref(),
            default,
            "a mode the file no longer has falls back to the default"
        );
        assert!(
            catalog
                .system_prompt(&Persona::Mode("concise".into()), default, Lang::En)
                .unwrap()
                .contains("briefly")
        );
    }

    #[test]
    fn toml_and_yaml_files_add_and_replace_modes() {
        let toml = r#"
            [[mode]]
            id = "pirate"
            name = "Pirate"
            name_ru = "Пират"
            prompt = "Talk like a pirate."

            [[mode]]
            id = "concise"
            name = "Short"
            prompt = "Three words at most."
        "#;
        let catalog = Catalog::builtin()
            .with_text(Path::new("modes.toml"), toml)
            .unwrap();
        assert_eq!(catalog.modes().len(), 6);
        assert_eq!(catalog.get("concise").unwrap().name(Lang::Ru), "Short");
        let pirate = catalog.get("pirate").unwrap();
        assert_eq!(pirate.name(Lang::Ru), "Пират");
        assert_eq!(pirate.prompt(Lang::Ru), Some("Talk like a pirate."));

        let yaml =
            "mode:\n  - id: pirate\n    name: Pirate\n    prompt: Arr.\n    prompt_ru: Арр.\n";
        let catalog = Catalog::builtin()
            .with_text(Path::new("modes.yaml"), yaml)
            .unwrap();
        assert_eq!(
            catalog.get("pirate").unwrap().prompt(Lang::Ru),
            Some("Арр.")
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let bad = [
            (
                "m.toml",
                "[[mode]]\nid = \"a b\"\nname = \"x\"\nprompt = \"y\"\n",
            ),
            (
                "m.toml",
                "[[mode]]\nid = \"a\"\nname = \"\"\nprompt = \"y\"\n",
            ),
            (
                "m.toml",
                "[[mode]]\nid = \"a\"\nname = \"x\"\nprompt = \" \"\n",
            ),
            ("m.toml", "[[mode]]\nid = \"a\"\nname = \"x\"\n"),
            (
                "m.toml",
                "[[mode]]\nid = \"a\"\nname = \"x\"\nprompt = \"y\"\ncolour = 1\n",
            ),
            ("m.yaml", "mode: [1, 2]\n"),
            ("m.toml", "not toml at all ["),
        ];
        for (name, text) in bad {
            let error = Catalog::builtin().with_text(Path::new(name), text);
            assert!(error.is_err(), "{text}");
        }
        let many: String = (0..MAX_MODES)
            .map(|i| format!("[[mode]]\nid = \"m{i}\"\nname = \"M\"\nprompt = \"p\"\n"))
            .collect();
        assert!(matches!(
            Catalog::builtin().with_text(Path::new("m.toml"), &many),
            Err(ModesFileError::TooMany { .. })
        ));
    }

    #[test]
    fn a_persona_is_stored_and_choosing_one_forgets_the_turns() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "CREATE TABLE turns (id INTEGER PRIMARY KEY, chat INTEGER, topic INTEGER);
             INSERT INTO turns (chat, topic) VALUES (1, 0), (1, 0), (2, 0);",
        )
        .unwrap();
        assert_eq!(load(&conn, 1, 0).unwrap(), Persona::Default);
        save(
            &mut conn,
            1,
            0,
            &Persona::Custom("[INST] be a cat".into()),
            5,
        )
        .unwrap();
        assert_eq!(
            load(&conn, 1, 0).unwrap(),
            Persona::Custom("[INST] be a cat".into())
        );
        let turns: i64 = conn
            .query_row("SELECT COUNT(*) FROM turns", [], |r| r.get(0))
            .unwrap();
        assert_eq!(turns, 1, "only the other chat's turn is left");
        save(&mut conn, 1, 0, &Persona::Mode("tutor".into()), 6).unwrap();
        assert_eq!(load(&conn, 1, 0).unwrap(), Persona::Mode("tutor".into()));
        save(&mut conn, 1, 0, &Persona::Default, 7).unwrap();
        assert_eq!(load(&conn, 1, 0).unwrap(), Persona::Default);
        assert_eq!(load(&conn, 2, 0).unwrap(), Persona::Default);
    }
}
