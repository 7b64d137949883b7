//! The conversation store: the turns (user message + delivered answer) of every chat and
//! forum topic, in an embedded SQLite database under `--data-dir`, so that a chat continues
//! with its history after a restart — also after `kill -9`. A leaf module: it knows nothing
//! of Telegram beyond a numeric chat id and an optional topic id.
//!
//! # Threads
//! SQLite calls block on disk, so one dedicated OS thread owns the connection and runs every
//! operation, reads included, in arrival order; async callers talk to it through a bounded
//! channel and get their answers on oneshot channels. Arrival order is what keeps one
//! conversation consistent: a turn committed before the next question is read is in the
//! history that question sees.
//!
//! # Durability
//! WAL journal with `synchronous = FULL`: a committed turn survives a process crash and a
//! power cut. A database file that SQLite finds corrupt at start-up is renamed aside
//! (`conversations.sqlite3.corrupt-<unix seconds>`) with a loud error, and a fresh one is
//! started: losing the histories beats a bot that cannot start.
//!
//! # Bounds, pruned in blocks
//! `max_turns` per conversation and `max_age` per turn. Both are pruned in blocks, so the
//! start of a kept history does not move with every new turn (the engine's prompt cache
//! and KV parking reuse a conversation's work only while its prefix stays the same):
//! - more than `max_turns` turns: the oldest are dropped down to ¾ of `max_turns`;
//! - a turn older than `max_age`: every turn older than ¾ of `max_age` goes with it.
//!
//! A conversation is pruned when a turn is committed to it, and all of them on a timer.

use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

/// The database's file name inside `--data-dir`.
pub const DB_FILE: &str = "conversations.sqlite3";

/// Operations that may wait for the store's thread; one more waits for room.
const QUEUE: usize = 256;

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// Which conversation: a chat, and a forum topic within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    /// The chat id.
    pub chat: i64,
    /// The forum topic (message thread) id; `None` outside forum topics.
    pub topic: Option<i32>,
}

impl ConversationKey {
    /// The topic as stored: Telegram thread ids are positive, so 0 stands for "no topic".
    pub fn topic_column(self) -> i64 {
        self.topic.map_or(0, i64::from)
    }
}

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most turns kept per conversation; beyond it the oldest are dropped down to ¾.
    pub max_turns: NonZeroUsize,
    /// Oldest turn kept; when one is older, every turn older than ¾ of it is dropped.
    pub max_age: Duration,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_turns: NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN),
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl HistoryLimits {
    /// Turns kept after pruning an overlong conversation: ¾ of the maximum, at least one.
    pub fn keep_turns(&self) -> usize {
        (self.max_turns.get() * 3 / 4).max(1)
    }

    /// How often every conversation is pruned by age: an eighth of the age limit, between
    /// a minute and an hour.
    pub fn prune_interval(&self) -> Duration {
        (self.max_age / 8).clamp(Duration::from_secs(60), Duration::from_secs(3600))
    }

    fn max_age_secs(&self) -> i64 {
        i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX)
    }
}

/// The id of a stored turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TurnId(i64);

/// One exchange of a conversation: the user's message and the answer that was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Its id (turns of a conversation are ordered by it).
    pub id: TurnId,
    /// What the user wrote.
    pub user: String,
    /// The answer as delivered.
    pub assistant: String,
    /// The front end's id of the user's message (a Telegram message id), if it has one.
    pub source: Option<i64>,
}

/// A turn to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTurn {
    /// What the user wrote.
    pub user: String,
    /// The answer as delivered.
    pub assistant: String,
    /// The front end's id of the user's message, if it has one: a message answered again
    /// (after a crash between commit and acknowledgement) is then recognised.
    pub source: Option<i64>,
    /// The turn this one replaces, if it is still there: `/retry`, or the same message
    /// answered again.
    pub replaces: Option<TurnId>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `--data-dir` cannot be created or written.
    #[error("the data directory {path} is not writable (set --data-dir to a writable directory)")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The database cannot be opened or set up.
    #[error("cannot open the conversation store {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer mistral-bot.
    #[error(
        "the conversation store {path} has schema version {found}; this build knows up to {SCHEMA_VERSION} (upgrade mistral-bot or move the file away)"
    )]
    Schema {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
    },
    /// A corrupt database could not be moved aside.
    #[error("cannot move the corrupt conversation store {path} aside")]
    MoveAside {
        /// The database file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The store's thread could not be started.
    #[error("cannot start the conversation store's thread")]
    Thread(#[source] io::Error),
    /// A read or write failed.
    #[error("conversation store query failed")]
    Query(#[from] rusqlite::Error),
    /// The store's thread is gone (it panicked or the store is shutting down).
    #[error("the conversation store has stopped")]
    Stopped,
}

impl StoreError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::DataDir { .. } => "data_dir",
            StoreError::Open { .. } => "open",
            StoreError::Schema { .. } => "schema",
            StoreError::MoveAside { .. } => "move_aside",
            StoreError::Thread(_) => "thread",
            StoreError::Query(_) => "query",
            StoreError::Stopped => "stopped",
        }
    }
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Turns deleted.
    pub turns: usize,
}

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// A request to the store's thread.
enum Op {
    History {
        key: ConversationKey,
        answer: Answer<Vec<Turn>>,
    },
    Commit {
        key: ConversationKey,
        turn: NewTurn,
        answer: Answer<TurnId>,
    },
    Reset {
        key: ConversationKey,
        answer: Answer<usize>,
    },
    Prune {
        answer: Option<Answer<Pruned>>,
    },
    Conversations {
        answer: Answer<usize>,
    },
    /// Another module's rows (personas, usage): its own SQL on the store's connection.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// The conversation store. Cheap to clone; every clone talks to the same thread, which
/// ends when the last clone is dropped (after finishing what was asked of it).
#[derive(Debug, Clone)]
pub struct ConversationStore {
    ops_tx: mpsc::Sender<Op>,
    limits: HistoryLimits,
}

impl ConversationStore {
    /// Opens (or creates) the durable store in `data_dir`, which is created if missing.
    /// A corrupt database is moved aside and a fresh one started; a directory that cannot
    /// be written is an error. Prunes every conversation on a timer while the store lives.
    pub async fn open(data_dir: &Path, limits: HistoryLimits) -> Result<Self, StoreError> {
        let dir = data_dir.to_path_buf();
        Self::start(limits, move || Db::open_file(&dir, limits)).await
    }

    /// A store kept in memory only (the console; tests).
    pub async fn in_memory(limits: HistoryLimits) -> Result<Self, StoreError> {
        Self::start(limits, move || {
            let conn = Connection::open_in_memory()?;
            Db::new(conn, limits, Path::new(":memory:"))
        })
        .await
    }

    async fn start(
        limits: HistoryLimits,
        open: impl FnOnce() -> Result<Db, StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (ops_tx, ops_rx) = mpsc::channel(QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        thread::Builder::new()
            .name("conversation-store".into())
            .spawn(move || match open() {
                Ok(db) => {
                    let _ = ready_tx.send(Ok(()));
                    db.serve(ops_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(StoreError::Thread)?;
        ready_rx.await.map_err(|_| StoreError::Stopped)??;
        let store = Self { ops_tx, limits };
        store.spawn_pruning();
        Ok(store)
    }

    /// Prunes every conversation every [`HistoryLimits::prune_interval`] until the store
    /// is dropped.
    fn spawn_pruning(&self) {
        let weak = self.ops_tx.downgrade();
        let every = self.limits.prune_interval();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(ops_tx) = weak.upgrade() else { break };
                if ops_tx.send(Op::Prune { answer: None }).await.is_err() {
                    break;
                }
            }
        });
    }

    /// The limits the store keeps.
    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    async fn ask<T>(&self, op: impl FnOnce(Answer<T>) -> Op) -> Result<T, StoreError> {
        let (answer, answer_rx) = oneshot::channel();
        self.ops_tx
            .send(op(answer))
            .await
            .map_err(|_| StoreError::Stopped)?;
        answer_rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// The conversation's turns, oldest first.
    pub async fn history(&self, key: ConversationKey) -> Result<Vec<Turn>, StoreError> {
        self.ask(|answer| Op::History { key, answer }).await
    }

    /// Appends a delivered turn (removing the turn it replaces, if that is still there),
    /// then prunes the conversation. Durable once this returns.
    pub async fn commit(&self, key: ConversationKey, turn: NewTurn) -> Result<TurnId, StoreError> {
        self.ask(|answer| Op::Commit { key, turn, answer }).await
    }

    /// Forgets a conversation (`/reset`); returns how many turns were deleted.
    pub async fn reset(&self, key: ConversationKey) -> Result<usize, StoreError> {
        self.ask(|answer| Op::Reset { key, answer }).await
    }

    /// Prunes every conversation by age now (the timer does this too).
    pub async fn prune(&self) -> Result<Pruned, StoreError> {
        self.ask(|answer| Op::Prune {
            answer: Some(answer),
        })
        .await
    }

    /// How many conversations have a history.
    pub async fn conversations(&self) -> Result<usize, StoreError> {
        self.ask(|answer| Op::Conversations { answer }).await
    }

    /// Runs `op` on the store's thread, in arrival order with every other operation: how
    /// the modules that keep rows of their own in this database (`persona`, `usage`) read
    /// and write them.
    pub async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.ask(|answer| {
            Op::Run(Box::new(move |conn| {
                let _ = answer.send(op(conn).map_err(StoreError::from));
            }))
        })
        .await
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Why opening a database file failed.
enum OpenFailure {
    /// The file is damaged or not a database: move it aside.
    Corrupt(String),
    /// Anything else (permissions, disk full, …): a start-up error.
    Other(StoreError),
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// The connection and what the store's thread does with it. Synchronous: only the store's
/// thread (and unit tests) call it.
struct Db {
    conn: Connection,
    limits: HistoryLimits,
}

impl Db {
    /// Opens `data_dir/conversations.sqlite3`, moving a corrupt one aside.
    fn open_file(data_dir: &Path, limits: HistoryLimits) -> Result<Db, StoreError> {
        check_writable(data_dir)?;
        let path = data_dir.join(DB_FILE);
        match Self::try_open(&path, limits) {
            Ok(db) => Ok(db),
            Err(OpenFailure::Other(e)) => Err(e),
            Err(OpenFailure::Corrupt(why)) => {
                let moved = move_aside(&path)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved.display(),
                    why,
                    "THE CONVERSATION STORE IS CORRUPT: it was moved aside and a fresh, empty \
                     one started; every chat's history is gone (the old file is kept for \
                     recovery)"
                );
                Self::try_open(&path, limits).map_err(|failure| match failure {
                    OpenFailure::Other(e) => e,
                    OpenFailure::Corrupt(why) => StoreError::Open {
                        path: path.clone(),
                        source: rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                            Some(why),
                        ),
                    },
                })
            }
        }
    }

    fn try_open(path: &Path, limits: HistoryLimits) -> Result<Db, OpenFailure> {
        let failed = |source: rusqlite::Error| {
            if is_corruption(&source) {
                OpenFailure::Corrupt(source.to_string())
            } else {
                OpenFailure::Other(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let conn = Connection::open(path).map_err(failed)?;
        // Reading the journal mode is the first access to the file: a file that is not a
        // database fails here.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(failed)?;
        let check: String = conn
            .pragma_query_value(None, "quick_check", |row| row.get(0))
            .map_err(failed)?;
        if check != "ok" {
            return Err(OpenFailure::Corrupt(check));
        }
        Db::new(conn, limits, path).map_err(|e| match e {
            StoreError::Query(source) | StoreError::Open { source, .. } => failed(source),
            other => OpenFailure::Other(other),
        })
    }

    /// Sets `conn` up (pragmas, schema).
    fn new(conn: Connection, limits: HistoryLimits, path: &Path) -> Result<Db, StoreError> {
        let open = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path: path.to_path_buf(),
                found: version,
            });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS turns (
                 id        INTEGER PRIMARY KEY,
                 chat      INTEGER NOT NULL,
                 topic     INTEGER NOT NULL,
                 user      TEXT NOT NULL,
                 assistant TEXT NOT NULL,
                 source    INTEGER,
                 created   INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (chat, topic, id);
             CREATE INDEX IF NOT EXISTS turns_by_age ON turns (created);",
        )
        .map_err(open)?;
        // The rows other modules keep here (additions: older builds ignore them).
        conn.execute_batch(crate::persona::SCHEMA).map_err(open)?;
        conn.execute_batch(crate::usage::SCHEMA).map_err(open)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open)?;
        Ok(Db { conn, limits })
    }

    /// Answers operations until every sender is gone.
    fn serve(mut self, mut ops_rx: mpsc::Receiver<Op>) {
        while let Some(op) = ops_rx.blocking_recv() {
            let now = unix_now();
            match op {
                Op::History { key, answer } => {
                    let _ = answer.send(self.history(key));
                }
                Op::Commit { key, turn, answer } => {
                    let result = self.commit(key, &turn, now);
                    if let Err(e) = &result {
                        tracing::error!(chat = key.chat, error = %e, "cannot save a turn");
                    }
                    let _ = answer.send(result);
                }
                Op::Reset { key, answer } => {
                    let _ = answer.send(self.reset(key));
                }
                Op::Prune { answer } => {
                    let result = self.prune_all(now);
                    match (result, answer) {
                        (result, Some(answer)) => {
                            let _ = answer.send(result);
                        }
                        (Ok(pruned), None) if pruned.turns > 0 => {
                            tracing::info!(turns = pruned.turns, "old conversation turns pruned");
                        }
                        (Ok(_), None) => {}
                        (Err(e), None) => {
                            tracing::error!(error = %e, "cannot prune old conversation turns");
                        }
                    }
                }
                Op::Conversations { answer } => {
                    let _ = answer.send(self.conversations());
                }
                Op::Run(op) => op(&mut self.conn),
            }
        }
    }

    fn history(&self, key: ConversationKey) -> Result<Vec<Turn>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, user, assistant, source FROM turns WHERE chat = ?1 AND topic = ?2
             ORDER BY id",
        )?;
        let turns = statement
            .query_map(params![key.chat, key.topic_column()], |row| {
                Ok(Turn {
                    id: TurnId(row.get(0)?),
                    user: row.get(1)?,
                    assistant: row.get(2)?,
                    source: row.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(turns)
    }

    fn commit(
        &mut self,
        key: ConversationKey,
        turn: &NewTurn,
        now: i64,
    ) -> Result<TurnId, StoreError> {
        let (chat, topic) = (key.chat, key.topic_column());
        let transaction = self.conn.transaction()?;
        if let Some(TurnId(old)) = turn.replaces {
            transaction.execute(
                "DELETE FROM turns WHERE id = ?1 AND chat = ?2 AND topic = ?3",
                params![old, chat, topic],
            )?;
        }
        transaction.execute(
            "INSERT INTO turns (chat, topic, user, assistant, source, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![chat, topic, turn.user, turn.assistant, turn.source, now],
        )?;
        let id = TurnId(transaction.last_insert_rowid());
        prune_conversation(&transaction, key, self.limits, now)?;
        transaction.commit()?;
        Ok(id)
    }

    fn reset(&self, key: ConversationKey) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM turns WHERE chat = ?1 AND topic = ?2",
            params![key.chat, key.topic_column()],
        )?)
    }

    /// Prunes every conversation that has a turn older than the age limit.
    fn prune_all(&mut self, now: i64) -> Result<Pruned, StoreError> {
        let (expired, cutoff) = age_cutoffs(self.limits, now);
        let turns = self.conn.execute(
            "DELETE FROM turns WHERE created < ?2 AND (chat, topic) IN
                 (SELECT DISTINCT chat, topic FROM turns WHERE created < ?1)",
            params![expired, cutoff],
        )?;
        Ok(Pruned { turns })
    }

    fn conversations(&self) -> Result<usize, StoreError> {
        let count: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM (SELECT DISTINCT chat, topic FROM turns)",
            [],
            |row| row.get(0),
        )?;
        Ok(usize::try_from(count).unwrap_or(0))
    }
}

/// The age prune's two times: turns created before the first are expired, and when a
/// conversation has one, every turn created before the second goes too.
fn age_cutoffs(limits: HistoryLimits, now: i64) -> (i64, i64) {
    let max_age = limits.max_age_secs();
    let expired = now.saturating_sub(max_age);
    let cutoff = now.saturating_sub(max_age - max_age / 4);
    (expired, cutoff)
}

/// Applies both limits to one conversation, in blocks.
fn prune_conversation(
    conn: &Connection,
    key: ConversationKey,
    limits: HistoryLimits,
    now: i64,
) -> Result<usize, StoreError> {
    let (chat, topic) = (key.chat, key.topic_column());
    let (expired, cutoff) = age_cutoffs(limits, now);
    let mut deleted = 0;
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT MIN(created) FROM turns WHERE chat = ?1 AND topic = ?2",
            params![chat, topic],
            |row| row.get(0),
        )
        .optional()?
        .flatten();
    if oldest.is_some_and(|oldest| oldest < expired) {
        deleted += conn.execute(
            "DELETE FROM turns WHERE chat = ?1 AND topic = ?2 AND created < ?3",
            params![chat, topic, cutoff],
        )?;
    }
    let count: i64 = conn.query_row(
        "SELECT COUNT(*) FROM turns WHERE chat = ?1 AND topic = ?2",
        params![chat, topic],
        |row| row.get(0),
    )?;
    let count = usize::try_from(count).unwrap_or(0);
    if count > limits.max_turns.get() {
        let drop = i64::try_from(count - limits.keep_turns()).unwrap_or(i64::MAX);
        deleted += conn.execute(
            "DELETE FROM turns WHERE id IN
                 (SELECT id FROM turns WHERE chat = ?1 AND topic = ?2 ORDER BY id LIMIT ?3)",
            params![chat, topic, drop],
        )?;
    }
    Ok(deleted)
}

/// Creates `dir` if needed and checks that files can be created in it.
fn check_writable(dir: &Path) -> Result<(), StoreError> {
    let unwritable = |source| StoreError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    fs::write(&probe, b"").map_err(unwritable)?;
    fs::remove_file(&probe).map_err(unwritable)?;
    Ok(())
}

/// Renames a corrupt database (and its WAL and shared-memory files, which belong to it and
/// must not be applied to a fresh one) to `<name>.corrupt-<unix seconds>`; returns the new
/// name of the database file.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = unix_now();
    let mut target = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{}.corrupt-{stamp}-{n}", path.display()));
        n += 1;
    }
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let side_target = PathBuf::from(format!("{}{suffix}", target.display()));
            fs::rename(&side, &side_target).map_err(|source| StoreError::MoveAside {
                path: side.clone(),
                source,
            })?;
        }
    }
    fs::rename(path, &target).map_err(|source| StoreError::MoveAside {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 24 * 3600;

    fn key(chat: i64) -> ConversationKey {
        ConversationKey { chat, topic: None }
    }

    fn limits(max_turns: usize, max_age_days: u64) -> HistoryLimits {
        HistoryLimits {
            max_turns: NonZeroUsize::new(max_turns).unwrap(),
            max_age: Duration::from_secs(max_age_days * DAY as u64),
        }
    }

    fn memory_db(limits: HistoryLimits) -> Db {
        Db::new(
            Connection::open_in_memory().unwrap(),
            limits,
            Path::new(":memory:"),
        )
        .unwrap()
    }

    /// Commits a turn without a source.
    fn commit(
        db: &mut Db,
        key: ConversationKey,
        user: &str,
        assistant: &str,
        replaces: Option<TurnId>,
        now: i64,
    ) -> Result<TurnId, StoreError> {
        let turn = NewTurn {
            user: user.into(),
            assistant: assistant.into(),
            source: None,
            replaces,
        };
        db.commit(key, &turn, now)
    }

    fn users(db: &Db, key: ConversationKey) -> Vec<String> {
        db.history(key)
            .unwrap()
            .into_iter()
            .map(|t| t.user)
            .collect()
    }

    #[test]
    fn turns_come_back_in_order_per_chat_and_topic() {
        let mut db = memory_db(HistoryLimits::default());
        let topic = ConversationKey {
            chat: 1,
            topic: Some(7),
        };
        commit(&mut db, key(1), "one", "1", None, 0).unwrap();
        commit(&mut db, topic, "in a topic", "t", None, 0).unwrap();
        commit(&mut db, key(1), "two", "2", None, 0).unwrap();
        commit(&mut db, key(-100), "group", "g", None, 0).unwrap();
        assert_eq!(users(&db, key(1)), ["one", "two"]);
        assert_eq!(users(&db, topic), ["in a topic"]);
        assert_eq!(db.history(key(1)).unwrap()[1].assistant, "2");
        assert!(db.history(key(2)).unwrap().is_empty());
        assert_eq!(db.conversations().unwrap(), 3);
    }

    #[test]
    fn reset_forgets_one_conversation_only() {
        let mut db = memory_db(HistoryLimits::default());
        commit(&mut db, key(1), "a", "b", None, 0).unwrap();
        commit(&mut db, key(2), "c", "d", None, 0).unwrap();
        assert_eq!(db.reset(key(1)).unwrap(), 1);
        assert!(db.history(key(1)).unwrap().is_empty());
        assert_eq!(users(&db, key(2)), ["c"]);
        assert_eq!(db.reset(key(1)).unwrap(), 0);
    }

    #[test]
    fn a_retried_turn_replaces_the_old_one_at_the_end() {
        let mut db = memory_db(HistoryLimits::default());
        commit(&mut db, key(1), "one", "1", None, 0).unwrap();
        let last = commit(&mut db, key(1), "two", "2", None, 0).unwrap();
        commit(&mut db, key(1), "two", "2 again", Some(last), 0).unwrap();
        let history = db.history(key(1)).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].assistant, "2 again");
        // Another conversation's id is never deleted by mistake.
        commit(&mut db, key(2), "x", "y", Some(history[0].id), 0).unwrap();
        assert_eq!(db.history(key(1)).unwrap().len(), 2);
    }

    #[test]
    fn too_many_turns_are_pruned_in_blocks_down_to_three_quarters() {
        let mut db = memory_db(limits(8, 30));
        for i in 0..8 {
            commit(&mut db, key(1), &format!("q{i}"), "a", None, 0).unwrap();
        }
        assert_eq!(db.history(key(1)).unwrap().len(), 8, "at the limit: kept");
        commit(&mut db, key(1), "q8", "a", None, 0).unwrap();
        assert_eq!(users(&db, key(1)), ["q3", "q4", "q5", "q6", "q7", "q8"]);
        // The start then stays put for the next two turns.
        commit(&mut db, key(1), "q9", "a", None, 0).unwrap();
        commit(&mut db, key(1), "q10", "a", None, 0).unwrap();
        assert_eq!(users(&db, key(1))[0], "q3");
        assert_eq!(db.history(key(1)).unwrap().len(), 8);
    }

    #[test]
    fn old_turns_are_pruned_in_blocks_by_age() {
        let mut db = memory_db(limits(100, 8));
        for day in 0..10 {
            commit(&mut db, key(1), &format!("day {day}"), "a", None, day * DAY).unwrap();
        }
        // Day 9: "day 0" is older than 8 days (not strictly): nothing yet at day 8...
        // committing day 9 made day 0 9 days old, so every turn older than 6 days went.
        assert_eq!(
            users(&db, key(1)),
            [
                "day 3", "day 4", "day 5", "day 6", "day 7", "day 8", "day 9"
            ]
        );
        // The timer prunes idle conversations the same way.
        commit(&mut db, key(2), "idle", "a", None, 0).unwrap();
        commit(&mut db, key(3), "recent", "a", None, 9 * DAY).unwrap();
        assert_eq!(db.prune_all(9 * DAY).unwrap(), Pruned { turns: 1 });
        assert!(db.history(key(2)).unwrap().is_empty());
        assert_eq!(users(&db, key(3)), ["recent"]);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside_and_a_fresh_store_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let garbage = b"this is not a database, it is a text file".repeat(200);
        fs::write(&path, &garbage).unwrap();
        fs::write(dir.path().join(format!("{DB_FILE}-wal")), b"stale wal").unwrap();
        let mut db = Db::open_file(dir.path(), HistoryLimits::default()).unwrap();
        commit(&mut db, key(1), "works", "yes", None, 0).unwrap();
        let moved: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains(".corrupt-") && !name.ends_with("-wal"))
            .collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert_eq!(fs::read(dir.path().join(&moved[0])).unwrap(), garbage);
        // The stale WAL went aside with it (or SQLite dropped it): never applied to the
        // fresh store.
        let wal = fs::read(dir.path().join(format!("{DB_FILE}-wal"))).unwrap_or_default();
        assert!(!wal.starts_with(b"stale wal"));
    }

    #[test]
    fn a_database_with_damaged_pages_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut db = Db::open_file(dir.path(), HistoryLimits::default()).unwrap();
            for i in 0..200 {
                commit(
                    &mut db,
                    key(i),
                    &"question ".repeat(50),
                    &"answer ".repeat(50),
                    None,
                    0,
                )
                .unwrap();
            }
            db.conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        let path = dir.path().join(DB_FILE);
        let mut bytes = fs::read(&path).unwrap();
        assert!(bytes.len() > 5 * 4096, "{}", bytes.len());
        // Pages 3 and 4 (page size 4096) become noise; the header stays valid.
        for (i, byte) in bytes[2 * 4096..4 * 4096].iter_mut().enumerate() {
            *byte = (i * 7 + 13) as u8;
        }
        fs::write(&path, &bytes).unwrap();
        let db = Db::open_file(dir.path(), HistoryLimits::default()).unwrap();
        assert_eq!(db.conversations().unwrap(), 0, "a fresh store");
        assert!(fs::read_dir(dir.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".corrupt-")
        }));
    }

    #[test]
    fn an_unwritable_data_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let Err(e) = Db::open_file(&file.join("data"), HistoryLimits::default()) else {
            panic!("a data dir under a file cannot work");
        };
        assert!(matches!(e, StoreError::DataDir { .. }), "{e:?}");
        assert!(e.to_string().contains("a-file/data"), "{e}");
        assert!(e.to_string().contains("not writable"), "{e}");
    }

    #[test]
    fn a_newer_schema_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let Err(e) = Db::open_file(dir.path(), HistoryLimits::default()) else {
            panic!("a newer schema must not be opened");
        };
        assert!(matches!(e, StoreError::Schema { found: 99, .. }), "{e:?}");
    }

    fn new_turn(user: &str, source: Option<i64>) -> NewTurn {
        NewTurn {
            user: user.into(),
            assistant: "a".into(),
            source,
            replaces: None,
        }
    }

    #[tokio::test]
    async fn turns_survive_reopening_and_reset_stays_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::open(dir.path(), HistoryLimits::default())
            .await
            .unwrap();
        store
            .commit(key(1), new_turn("kept", Some(41)))
            .await
            .unwrap();
        store.commit(key(2), new_turn("reset", None)).await.unwrap();
        store.reset(key(2)).await.unwrap();
        drop(store);
        let store = ConversationStore::open(dir.path(), HistoryLimits::default())
            .await
            .unwrap();
        let history = store.history(key(1)).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].user, "kept");
        assert_eq!(history[0].source, Some(41));
        assert!(store.history(key(2)).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_chats_keep_their_own_order() {
        let store = ConversationStore::in_memory(limits(1000, 30))
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for chat in 0..16 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..20 {
                    let history = store.history(key(chat)).await.unwrap();
                    assert_eq!(history.len(), i, "chat {chat} sees its own earlier turns");
                    store
                        .commit(key(chat), new_turn(&format!("{chat}:{i}"), None))
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        for chat in 0..16 {
            let history = store.history(key(chat)).await.unwrap();
            let expected: Vec<String> = (0..20).map(|i| format!("{chat}:{i}")).collect();
            let got: Vec<String> = history.into_iter().map(|t| t.user).collect();
            assert_eq!(got, expected);
        }
        assert_eq!(store.conversations().await.unwrap(), 16);
    }

    #[derive(Debug, Clone)]
    enum Action {
        Commit { chat: i64, advance_hours: i64 },
        Reset { chat: i64 },
        Prune { advance_hours: i64 },
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            6 => (0..3i64, 0..60i64).prop_map(|(chat, advance_hours)| Action::Commit { chat, advance_hours }),
            1 => (0..3i64).prop_map(|chat| Action::Reset { chat }),
            1 => (0..200i64).prop_map(|advance_hours| Action::Prune { advance_hours }),
        ]
    }

    proptest! {
        /// Whatever happens, every history is a suffix of what was committed since the
        /// last reset, in order, never longer than `max_turns`, never holding a turn older
        /// than `max_age` right after a write or a prune, and pruning never drops below ¾
        /// of the limit except by age.
        #[test]
        fn history_stays_within_the_bounds(
            max_turns in 1usize..12,
            max_age_days in 1u64..6,
            actions in proptest::collection::vec(action(), 1..120),
        ) {
            let limits = limits(max_turns, max_age_days);
            let max_age = max_age_days as i64 * DAY;
            let mut db = memory_db(limits);
            let mut now = 0i64;
            // What was committed since the last reset: (text, created).
            let mut model: Vec<Vec<(String, i64)>> = vec![Vec::new(); 3];
            for (n, action) in actions.into_iter().enumerate() {
                let touched: Vec<i64> = match action {
                    Action::Commit { chat, advance_hours } => {
                        now += advance_hours * 3600;
                        let text = format!("m{n}");
                        commit(&mut db, key(chat), &text, "a", None, now).unwrap();
                        model[chat as usize].push((text, now));
                        vec![chat]
                    }
                    Action::Reset { chat } => {
                        db.reset(key(chat)).unwrap();
                        model[chat as usize].clear();
                        vec![]
                    }
                    Action::Prune { advance_hours } => {
                        now += advance_hours * 3600;
                        db.prune_all(now).unwrap();
                        vec![0, 1, 2]
                    }
                };
                for chat in 0..3i64 {
                    let history = db.history(key(chat)).unwrap();
                    let committed = &model[chat as usize];
                    prop_assert!(history.len() <= max_turns);
                    let texts: Vec<&str> = history.iter().map(|t| t.user.as_str()).collect();
                    let tail: Vec<&str> = committed[committed.len() - history.len()..]
                        .iter().map(|(t, _)| t.as_str()).collect();
                    prop_assert_eq!(&texts, &tail, "a suffix, in order");
                    prop_assert!(history.windows(2).all(|w| w[0].id < w[1].id));
                    if touched.contains(&chat) {
                        let kept = &committed[committed.len() - history.len()..];
                        prop_assert!(kept.iter().all(|(_, at)| now - at <= max_age),
                            "no expired turn right after a write or prune");
                        // What was dropped went by count or by age, never more.
                        let young = committed.iter().filter(|(_, at)| now - at < max_age - max_age / 4).count();
                        prop_assert!(history.len() >= young.min(limits.keep_turns()));
                    }
                }
            }
        }
    }
}
