//! The polling state kept across restarts, so that no update is lost or answered twice.
//!
//! Telegram forgets updates once a `getUpdates` call confirms them (an `offset` past their
//! id), and the poller must keep polling while answers are written. So before the next
//! poll confirms a batch, the batch is written to `telegram-state.json` as *pending*; an
//! update leaves the pending list when its answer is fully delivered (or can never be:
//! the user blocked the bot, the chat is gone). After a restart the pending updates are
//! answered first, then polling resumes at the saved offset. An answer cut off by the
//! restart is written again in full (better twice than never); a finished one is never
//! repeated.
//!
//! # Update ids that restart lower
//! After a week without updates Telegram starts the `update_id` sequence again at a new
//! random number, and the Bot API server ignores an offset in the future: it returns the
//! oldest pending updates instead. An id below the offset we asked for therefore means
//! the sequence restarted: the state adopts the new sequence (the next offset follows the
//! batch's last id). Pending updates are keyed by a local sequence number, never by `update_id`, so
//! the two sequences cannot collide, and the last [`RECENT_KEYS`] messages received are
//! remembered by chat and message id, so a message is never answered twice whatever its
//! update id.
//!
//! # Writing
//! The in-memory state is the source of truth; the file is its mirror. Changes go to a
//! dedicated writer thread (never a tokio worker), which coalesces what arrived while it
//! wrote, then writes a temporary file, `fsync`s it, renames it over the state file and
//! `fsync`s the directory: a crash at any point leaves either the old file or the new
//! one, never a broken one. Callers that need durability (the poller, before its next
//! poll confirms a batch) wait on the returned [`Durable`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use serde::{Deserialize, Serialize};
use teloxide::types::{Update, UpdateKind};
use tokio::sync::oneshot;

/// The file name under the data directory.
pub const STATE_FILE: &str = "telegram-state.json";
/// How many received messages are remembered (by chat and message id) to refuse a
/// second delivery of the same message.
pub const RECENT_KEYS: usize = 4096;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid state.
    #[error("{} is not a valid state file (delete it to start afresh)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The writer thread cannot be started.
    #[error("cannot start the state writer thread")]
    Thread(#[source] std::io::Error),
    /// A write failed (the writer reports it once; later writes try again).
    #[error("the polling state was not saved: {0}")]
    NotSaved(Arc<StateError>),
    /// The writer thread is gone.
    #[error("the state writer thread stopped")]
    WriterGone,
}

/// The local number of a received update (unlike `update_id`, never reused).
pub type Seq = u64;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct OnDisk {
    /// The next `getUpdates` offset.
    offset: Option<i32>,
    /// Updates received and not yet fully answered, by local sequence number. (Files
    /// written before sequence numbers existed keyed this by `update_id`: the same
    /// order, and read the same way.)
    pending: BTreeMap<Seq, Update>,
    /// The next local sequence number.
    #[serde(default)]
    next_seq: Seq,
    /// Keys of the last messages received, oldest first.
    #[serde(default)]
    recent: VecDeque<String>,
}

/// One change of the state, applied in memory and then, in the same order, by the writer.
#[derive(Debug, Clone)]
enum Change {
    Received {
        offset: Option<i32>,
        added: Vec<(Seq, Update)>,
        keys: Vec<String>,
        next_seq: Seq,
    },
    Done(Seq),
}

impl OnDisk {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Received {
                offset,
                added,
                keys,
                next_seq,
            } => {
                self.offset = offset;
                self.next_seq = next_seq;
                self.pending.extend(added);
                self.recent.extend(keys);
                while self.recent.len() > RECENT_KEYS {
                    self.recent.pop_front();
                }
            }
            Change::Done(seq) => {
                self.pending.remove(&seq);
            }
        }
    }
}

/// The key that identifies a message across update-id sequences: the same message
/// delivered twice has the same key; each edit has its own.
fn message_key(update: &Update) -> Option<String> {
    match &update.kind {
        UpdateKind::Message(m) => Some(format!("m:{}:{}", m.chat.id.0, m.id.0)),
        UpdateKind::EditedMessage(m) => Some(format!(
            "e:{}:{}:{}",
            m.chat.id.0,
            m.id.0,
            m.edit_date().map_or(0, |d| d.timestamp())
        )),
        _ => None,
    }
}

/// What [`PollState::receive`] made of a batch.
#[derive(Debug)]
pub struct Received {
    /// The updates to answer, with their local sequence numbers.
    pub fresh: Vec<(Seq, Update)>,
    /// Updates dropped because they were seen before.
    pub duplicates: usize,
    /// `Some((asked, lowest))` when the batch showed that Telegram restarted its
    /// `update_id` sequence: we asked from `asked` and got `lowest`.
    pub restarted: Option<(i32, u32)>,
    /// Resolves once the batch is on disk.
    pub saved: Durable,
}

/// A pending write; [`Durable::wait`] resolves when it is on disk.
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), Arc<StateError>>>);

impl Durable {
    /// Waits until the change is on disk.
    pub async fn wait(self) -> Result<(), StateError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StateError::NotSaved(e)),
            Err(_) => Err(StateError::WriterGone),
        }
    }
}

/// One request to the writer thread: a change (none: just flush) and who waits for it.
struct Command {
    change: Option<Change>,
    ack: oneshot::Sender<Result<(), Arc<StateError>>>,
}

/// The polling state, in memory; a writer thread mirrors it to disk.
#[derive(Debug)]
pub struct PollState {
    data: OnDisk,
    /// Received message keys, for fast lookups (the same set as `data.recent`).
    recent: HashSet<String>,
    writer_tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("change", &self.change)
            .finish_non_exhaustive()
    }
}

impl PollState {
    /// Loads the state from `data_dir` (creating the directory; empty if there is no
    /// file) and starts its writer thread. Blocking: call it off the runtime.
    pub fn load(data_dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StateError::Io {
            action: "create",
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(STATE_FILE);
        let mut data: OnDisk = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk::default(),
            Err(source) => {
                return Err(StateError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        let after_pending = data.pending.keys().next_back().map_or(0, |last| last + 1);
        data.next_seq = data.next_seq.max(after_pending);
        let recent = data.recent.iter().cloned().collect();
        let (writer_tx, writer_rx) = mpsc::channel();
        let mirror = data.clone();
        std::thread::Builder::new()
            .name("telegram-state".into())
            .spawn(move || writer_thread(path, mirror, writer_rx))
            .map_err(StateError::Thread)?;
        Ok(Self {
            data,
            recent,
            writer_tx,
        })
    }

    /// The offset for the next poll.
    pub fn offset(&self) -> Option<i32> {
        self.data.offset
    }

    /// The updates not yet answered, oldest first.
    pub fn pending(&self) -> Vec<(Seq, Update)> {
        self.data
            .pending
            .iter()
            .map(|(seq, update)| (*seq, update.clone()))
            .collect()
    }

    /// Updates not yet answered.
    pub fn pending_len(&self) -> usize {
        self.data.pending.len()
    }

    /// Records a batch that `getUpdates(asked)` returned, before the next poll confirms
    /// it. Returns the updates to answer: a message seen before is dropped; an id below
    /// `asked` means Telegram restarted its id sequence, which is adopted.
    pub fn receive(&mut self, asked: Option<i32>, batch: Vec<Update>) -> Received {
        let lowest = batch.iter().map(|u| u.id.0).min();
        let restarted = match (asked, lowest) {
            (Some(asked), Some(lowest)) if i64::from(lowest) < i64::from(asked) => {
                Some((asked, lowest))
            }
            _ => None,
        };
        let mut offset = self.data.offset;
        let mut fresh = Vec::new();
        let mut keys = Vec::new();
        let mut duplicates = 0;
        let mut next_seq = self.data.next_seq;
        for update in batch {
            let id = i64::from(update.id.0);
            let below = restarted.is_none() && offset.is_some_and(|offset| id < i64::from(offset));
            let next = i32::try_from(id + 1).unwrap_or(i32::MAX);
            // After a restart the server's order is the truth (old pending updates,
            // then the new sequence); otherwise never move the offset back.
            offset = Some(match offset {
                Some(o) if restarted.is_none() => o.max(next),
                _ => next,
            });
            let key = message_key(&update);
            if below || key.as_ref().is_some_and(|k| self.recent.contains(k)) {
                duplicates += 1;
                continue;
            }
            if let Some(key) = key {
                self.recent.insert(key.clone());
                keys.push(key);
            }
            fresh.push((next_seq, update));
            next_seq += 1;
        }
        if fresh.is_empty() && keys.is_empty() && offset == self.data.offset {
            // An empty poll (or only duplicates at the same offset): nothing to write.
            return Received {
                fresh,
                duplicates,
                restarted,
                saved: self.send(None),
            };
        }
        let change = Change::Received {
            offset,
            added: fresh.clone(),
            keys,
            next_seq,
        };
        self.data.apply(change.clone());
        // Forget the keys that fell out of the bounded list.
        if self.recent.len() > self.data.recent.len() {
            self.recent = self.data.recent.iter().cloned().collect();
        }
        Received {
            fresh,
            duplicates,
            restarted,
            saved: self.send(Some(change)),
        }
    }

    /// Records one update pushed to the webhook. Returns it to answer unless it was
    /// received before (Telegram re-sends what got no 2xx, and may deliver concurrently,
    /// so out of order): a message is known by its chat and message id, any other update
    /// by its `update_id`. The polling offset is left alone: a webhook has none.
    pub fn receive_pushed(&mut self, update: Update) -> Received {
        let key = message_key(&update).unwrap_or_else(|| format!("u:{}", update.id.0));
        if self.recent.contains(&key) {
            // Answered "received" only once the first delivery is on disk.
            return Received {
                fresh: Vec::new(),
                duplicates: 1,
                restarted: None,
                saved: self.send(None),
            };
        }
        let seq = self.data.next_seq;
        let change = Change::Received {
            offset: self.data.offset,
            added: vec![(seq, update.clone())],
            keys: vec![key.clone()],
            next_seq: seq + 1,
        };
        self.recent.insert(key);
        self.data.apply(change.clone());
        if self.recent.len() > self.data.recent.len() {
            self.recent = self.data.recent.iter().cloned().collect();
        }
        Received {
            fresh: vec![(seq, update)],
            duplicates: 0,
            restarted: None,
            saved: self.send(Some(change)),
        }
    }

    /// Marks an update answered.
    pub fn done(&mut self, seq: Seq) -> Durable {
        if self.data.pending.contains_key(&seq) {
            let change = Change::Done(seq);
            self.data.apply(change.clone());
            self.send(Some(change))
        } else {
            self.send(None)
        }
    }

    /// Resolves once every change made so far is on disk.
    pub fn flush(&self) -> Durable {
        self.send(None)
    }

    fn send(&self, change: Option<Change>) -> Durable {
        let (ack, done) = oneshot::channel();
        // If the writer is gone, `ack` is dropped with the command and the wait reports it.
        let _ = self.writer_tx.send(Command { change, ack });
        Durable(done)
    }
}

/// The writer thread: applies changes to its mirror and writes it, once per burst.
fn writer_thread(path: PathBuf, mut mirror: OnDisk, commands: mpsc::Receiver<Command>) {
    let mut written = true;
    while let Ok(first) = commands.recv() {
        let mut acks = Vec::new();
        for command in std::iter::once(first).chain(commands.try_iter()) {
            if let Some(change) = command.change {
                mirror.apply(change);
                written = false;
            }
            acks.push(command.ack);
        }
        let result = if written {
            Ok(())
        } else {
            write_atomically(&path, &mirror).map_err(Arc::new)
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot save the Telegram polling state");
        } else {
            written = true;
        }
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }
}

/// Writes `data` to a temporary file, syncs it, renames it over `path` and syncs the
/// directory: a crash leaves the old file or the new one.
fn write_atomically(path: &Path, data: &OnDisk) -> Result<(), StateError> {
    let io = |action, source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec(data).map_err(|e| io("encode", e.into()))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    file.write_all(&bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io("replace", e))?;
    if let Some(dir) = path.parent() {
        // Makes the rename itself durable. Not possible on every platform: best effort.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A message update: `update_id` `id`, message id `message`, in chat 1.
    fn update_with(id: u32, message: u32) -> Update {
        serde_json::from_str(
            &json!({"update_id": id, "message": {
            "message_id": message, "date": 1_700_000_000,
            "chat": {"id": 1, "type": "private", "first_name": "A"},
            "from": {"id": 1, "is_bot": false, "first_name": "A"},
            "text": format!("message {message}")}})
            .to_string(),
        )
        .unwrap()
    }

    fn update(id: u32) -> Update {
        update_with(id, id)
    }

    fn ids(received: &Received) -> Vec<u32> {
        received.fresh.iter().map(|(_, u)| u.id.0).collect()
    }

    fn load(dir: &Path) -> PollState {
        PollState::load(dir).unwrap()
    }

    #[tokio::test]
    async fn pending_updates_and_offset_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        assert_eq!(state.offset(), None);
        let received = state.receive(None, vec![update(10), update(11)]);
        assert_eq!(ids(&received), [10, 11]);
        received.saved.wait().await.unwrap();
        let first = received.fresh[0].0;
        state.done(first).wait().await.unwrap();
        drop(state);

        let mut state = load(dir.path());
        assert_eq!(state.offset(), Some(12));
        let pending = state.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0].1,
            update(11),
            "an update round-trips through the file"
        );
        // A repeated delivery of an old update is not new.
        let again = state.receive(Some(12), vec![update(11)]);
        assert!(again.fresh.is_empty());
        assert_eq!(again.duplicates, 1);
        let next = state.receive(Some(12), vec![update(12)]);
        assert_eq!(ids(&next), [12]);
        assert!(
            next.fresh[0].0 > pending[0].0,
            "sequence numbers keep growing"
        );
    }

    #[tokio::test]
    async fn pushed_updates_are_kept_once_in_any_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        // Concurrent webhook connections deliver out of order; re-sends repeat.
        let mut fresh = Vec::new();
        for id in [12, 10, 12, 11, 10] {
            let received = state.receive_pushed(update(id));
            fresh.extend(ids(&received));
            received.saved.wait().await.unwrap();
        }
        assert_eq!(fresh, [12, 10, 11]);
        let button: Update = serde_json::from_value(json!({"update_id": 13, "callback_query": {
            "id": "q", "from": {"id": 1, "is_bot": false, "first_name": "A"},
            "chat_instance": "c", "data": "d"}}))
        .unwrap();
        assert_eq!(ids(&state.receive_pushed(button.clone())), [13]);
        assert!(state.receive_pushed(button).fresh.is_empty());
        assert_eq!(state.offset(), None, "a webhook has no offset");
        state.flush().wait().await.unwrap();
        drop(state);

        let mut state = load(dir.path());
        let pending: Vec<u32> = state.pending().iter().map(|(_, u)| u.id.0).collect();
        assert_eq!(pending, [12, 10, 11, 13], "in arrival order");
        assert!(
            state.receive_pushed(update(11)).fresh.is_empty(),
            "remembered across the restart"
        );
    }

    /// Issue 7, found item 2: after a week without updates Telegram restarts the ids
    /// lower, and the old offset dropped every update forever.
    #[tokio::test]
    async fn update_ids_restarting_lower_are_adopted_and_never_answered_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        let first = state.receive(None, vec![update_with(500_000, 1), update_with(500_001, 2)]);
        assert_eq!(first.fresh.len(), 2);
        assert_eq!(state.offset(), Some(500_002));
        // The server ignored our future offset and returned its oldest pending updates.
        let reset = state.receive(Some(500_002), vec![update_with(7, 3), update_with(8, 4)]);
        assert_eq!(reset.restarted, Some((500_002, 7)));
        assert_eq!(ids(&reset), [7, 8]);
        assert_eq!(state.offset(), Some(9), "the new sequence is adopted");
        reset.saved.wait().await.unwrap();
        // The same messages under yet other ids (another reset) are not answered again.
        let again = state.receive(Some(9), vec![update_with(3, 3), update_with(4, 5)]);
        assert_eq!(ids(&again), [4]);
        assert_eq!(again.duplicates, 1);
        // Pending keys never collide across sequences.
        let mut seqs: Vec<Seq> = state.pending().iter().map(|(s, _)| *s).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), 5);
        state.flush().wait().await.unwrap();
        drop(state);
        let state = load(dir.path());
        assert_eq!(state.offset(), Some(5));
        assert_eq!(state.pending_len(), 5);
    }

    #[tokio::test]
    async fn a_file_from_before_sequence_numbers_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = json!({"offset": 12, "pending": {"11": update(11)}});
        std::fs::write(dir.path().join(STATE_FILE), old.to_string()).unwrap();
        let mut state = load(dir.path());
        assert_eq!(state.offset(), Some(12));
        assert_eq!(state.pending()[0].0, 11);
        let next = state.receive(Some(12), vec![update(12)]);
        assert_eq!(next.fresh[0].0, 12);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(
            PollState::load(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn a_crash_mid_write_leaves_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        state
            .receive(None, vec![update(1)])
            .saved
            .wait()
            .await
            .unwrap();
        drop(state);
        // A crash while the next write was under way left half a temporary file.
        std::fs::write(dir.path().join("telegram-state.json.tmp"), b"{\"offs").unwrap();
        let state = load(dir.path());
        assert_eq!(state.offset(), Some(2));
        assert_eq!(state.pending_len(), 1);
    }

    #[tokio::test]
    async fn changes_in_a_burst_are_all_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        let batch: Vec<Update> = (1..=200).map(update).collect();
        let received = state.receive(None, batch);
        let waits: Vec<Durable> = received
            .fresh
            .iter()
            .filter(|(_, u)| u.id.0 % 2 == 0)
            .map(|(seq, _)| state.done(*seq))
            .collect();
        for wait in waits {
            wait.wait().await.unwrap();
        }
        let on_disk: OnDisk =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(on_disk.pending.len(), 100);
        assert_eq!(on_disk.offset, Some(201));
        assert_eq!(on_disk.recent.len(), 200);
    }

    #[test]
    fn the_remembered_messages_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = load(dir.path());
        let n = u32::try_from(RECENT_KEYS).unwrap() + 10;
        let received = state.receive(None, (1..=n).map(update).collect());
        assert_eq!(received.fresh.len() as u32, n);
        assert_eq!(state.data.recent.len(), RECENT_KEYS);
        assert_eq!(state.recent.len(), RECENT_KEYS);
        futures::executor::block_on(state.flush().wait()).unwrap();
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One poll as the server answers it: maybe after an id restart (to any start,
        /// lower or higher), some new updates, maybe preceded by a re-delivery of the
        /// previous batch (our confirmation was lost).
        #[derive(Debug, Clone)]
        struct Poll {
            restart_at: Option<u32>,
            new: usize,
            redeliver: bool,
        }

        fn poll() -> impl Strategy<Value = Poll> {
            (
                prop::option::weighted(0.2, 1u32..1_000_000),
                1usize..5,
                prop::bool::weighted(0.2),
            )
                .prop_map(|(restart_at, new, redeliver)| Poll {
                    restart_at,
                    new,
                    redeliver,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Whatever the server does with its ids, every message is answered exactly
            /// once, and the next offset follows the last update received.
            #[test]
            fn every_message_is_fresh_exactly_once(start in 1u32..1_000_000, polls in prop::collection::vec(poll(), 1..20)) {
                let dir = tempfile::tempdir().unwrap();
                let mut state = PollState::load(dir.path()).unwrap();
                let mut next_id = start;
                let mut next_message = 1u32;
                let mut previous: Vec<Update> = Vec::new();
                let mut answered: Vec<u32> = Vec::new();
                for poll in polls {
                    if let Some(at) = poll.restart_at {
                        next_id = at;
                    }
                    let mut batch = if poll.redeliver { previous.clone() } else { Vec::new() };
                    let new: Vec<Update> = (0..poll.new)
                        .map(|_| {
                            let update = update_with(next_id, next_message);
                            next_id += 1;
                            next_message += 1;
                            update
                        })
                        .collect();
                    batch.extend(new.iter().cloned());
                    let received = state.receive(state.offset(), batch);
                    for (_, update) in &received.fresh {
                        if let UpdateKind::Message(m) = &update.kind {
                            answered.push(u32::try_from(m.id.0).unwrap());
                        }
                    }
                    prop_assert_eq!(state.offset(), Some(i32::try_from(next_id).unwrap()));
                    previous = new;
                }
                let expected: Vec<u32> = (1..next_message).collect();
                prop_assert_eq!(answered, expected);
                // Let the writer finish before the directory goes.
                futures::executor::block_on(state.flush().wait()).unwrap();
            }
        }
    }
}
