//! The polling state kept across restarts, so that no update is lost or answered twice.
//!
//! Telegram forgets updates once a `getUpdates` call confirms them (an `offset` past their
//! id), and the poller must keep polling while answers are written. So before the next
//! poll confirms a batch, the batch is written to `telegram-state.json` as *pending*; an
//! update leaves the pending list when its answer is fully delivered. After a restart the
//! pending updates are answered first, then polling resumes at the saved offset. An answer
//! cut off by the restart is written again in full (better twice than never); a finished
//! one is never repeated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use teloxide::types::Update;

/// The file name under the data directory.
pub const STATE_FILE: &str = "telegram-state.json";

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
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    /// The next `getUpdates` offset.
    offset: Option<i32>,
    /// Updates received and not yet fully answered, by id.
    pending: BTreeMap<u32, Update>,
}

/// The polling state, mirrored to disk on every change.
#[derive(Debug)]
pub struct PollState {
    path: PathBuf,
    data: OnDisk,
}

impl PollState {
    /// Loads the state from `data_dir` (creating the directory); empty if there is none.
    pub fn load(data_dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StateError::Io {
            action: "create",
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(STATE_FILE);
        let data = match std::fs::read(&path) {
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
        Ok(Self { path, data })
    }

    /// The offset for the next poll.
    pub fn offset(&self) -> Option<i32> {
        self.data.offset
    }

    /// The updates not yet answered, oldest first.
    pub fn pending(&self) -> Vec<Update> {
        self.data.pending.values().cloned().collect()
    }

    /// Updates not yet answered.
    pub fn pending_len(&self) -> usize {
        self.data.pending.len()
    }

    /// Records a received batch (before the next poll confirms it). Returns the updates
    /// that are new: an id below the offset was seen before and is dropped.
    pub fn receive(&mut self, batch: Vec<Update>) -> Result<Vec<Update>, StateError> {
        let mut fresh = Vec::new();
        for update in batch {
            let id = update.id.0;
            let Ok(signed) = i32::try_from(id) else {
                continue;
            };
            if self.data.offset.is_some_and(|offset| signed < offset) {
                continue;
            }
            self.data.offset = Some(signed.saturating_add(1));
            self.data.pending.insert(id, update.clone());
            fresh.push(update);
        }
        self.save()?;
        Ok(fresh)
    }

    /// Marks an update answered.
    pub fn done(&mut self, id: u32) -> Result<(), StateError> {
        if self.data.pending.remove(&id).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), StateError> {
        let io = |action, source| StateError::Io {
            action,
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&self.data).map_err(|e| io("encode", e.into()))?;
        // Write a temporary file and rename it: a crash never leaves half a file.
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replace", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(id: u32) -> Update {
        serde_json::from_str(
            &json!({"update_id": id, "message": {
            "message_id": id, "date": 1_700_000_000,
            "chat": {"id": 1, "type": "private", "first_name": "A"},
            "from": {"id": 1, "is_bot": false, "first_name": "A"},
            "text": format!("message {id}")}})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn pending_updates_and_offset_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = PollState::load(dir.path()).unwrap();
        assert_eq!(state.offset(), None);
        let fresh = state.receive(vec![update(10), update(11)]).unwrap();
        assert_eq!(fresh.len(), 2);
        state.done(10).unwrap();
        drop(state);

        let mut state = PollState::load(dir.path()).unwrap();
        assert_eq!(state.offset(), Some(12));
        let pending = state.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0],
            update(11),
            "an update round-trips through the file"
        );
        // A repeated delivery of an old update is not new.
        assert!(state.receive(vec![update(11)]).unwrap().is_empty());
        assert_eq!(state.receive(vec![update(12)]).unwrap().len(), 1);
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
}
