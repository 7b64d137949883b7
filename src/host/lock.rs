//! One process per data directory: an exclusive `flock` on `<data-dir>/lock`, taken
//! before anything else in the directory is touched and held for the process's life.
//! The kernel releases it however the process ends (exit, crash, `kill -9`), so a lock
//! file left behind is never stale: only a living holder blocks. The holder writes its
//! pid into the file, so a second instance can say who has it.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "lock";

/// Holds the data directory's lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    /// The locked file: the lock lives as long as it is open.
    _file: File,
    /// The data directory.
    dir: PathBuf,
}

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "the data directory {} is in use by another mistral-bot ({}): one directory belongs \
         to one process at a time; stop that one first, or pass another --data-dir",
        dir.display(),
        holder.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"))
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The pid written in the lock file, if readable.
        holder: Option<u32>,
    },
    /// The directory or the lock file cannot be created or locked.
    #[error(
        "the data directory {} is not writable (cannot create or lock {}): pass --data-dir \
         (MISTRAL_BOT_DATA_DIR) naming a writable directory",
        dir.display(),
        lock_file.display()
    )]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock_file: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it, or fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let lock_file = dir.join(LOCK_FILE);
        let io_error = |source| LockError::Io {
            dir: dir.to_path_buf(),
            lock_file: lock_file.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_error)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_file)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder: read_pid(&mut file),
                });
            }
            Err(TryLockError::Error(source)) => return Err(io_error(source)),
        }
        // Ours now: say who holds it (a failure here only costs the message its pid).
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::warn!(file = %lock_file.display(), error = %e, "cannot write the pid into the data directory's lock file");
        }
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Who holds the lock on `dir` now, without taking it for longer than a check: `None`
/// when nobody does (or there is no lock file), `Some(pid)` (pid if known) otherwise.
pub fn holder(dir: &Path) -> Option<Option<u32>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .ok()?;
    match file.try_lock() {
        Ok(()) => None, // released when `file` is dropped
        Err(TryLockError::WouldBlock) => Some(read_pid(&mut file)),
        Err(TryLockError::Error(_)) => None,
    }
}

/// The pid in a lock file: its first line, if that is a number.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64).read_to_string(&mut text).ok()?;
    parse_pid(&text)
}

/// `"1234\n"` → 1234.
pub fn parse_pid(text: &str) -> Option<u32> {
    text.lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_second_lock_on_the_same_directory_fails_naming_it_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap();
        assert_eq!(first.dir(), data);
        // flock locks belong to the open file description: a second open in this process
        // conflicts just as another process's would.
        let err = DataDirLock::acquire(&data).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&data.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert_eq!(holder(&data), Some(Some(std::process::id())));
        drop(first);
        assert_eq!(holder(&data), None, "released with the handle");
        let again = DataDirLock::acquire(&data).unwrap();
        drop(again);
        // A lock file left behind is not a held lock.
        assert!(data.join(LOCK_FILE).exists());
        assert_eq!(holder(&data), None);
    }

    #[test]
    fn an_uncreatable_directory_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = DataDirLock::acquire(&file.join("data")).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(err.to_string().contains("data"), "{err}");
    }

    proptest! {
        #[test]
        fn any_lock_file_text_reads_as_a_pid_or_none(text in "\\PC{0,30}") {
            if let Some(pid) = parse_pid(&text) {
                prop_assert!(pid > 0);
                prop_assert!(text.lines().next().unwrap().contains(&pid.to_string()));
            }
        }
    }
}
