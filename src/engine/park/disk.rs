//! The disk tier: park files under `--data-dir/kv/`, written, read and deleted on a
//! thread of their own (never the engine thread, never a tokio worker). The engine thread
//! reads the shared index to find matches and sends [`DiskOp`]s; loaded states come back
//! as [`Control::Loaded`](super::Control::Loaded).
//!
//! Accounting: a file's full length is reserved in the index before a byte of it is
//! written (evicting the least recently used files first), so the directory never holds
//! more than the budget, temporary files included.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::file::{self, FileError, HEADER_LEN, ParkKey};
use super::lru::{Lru, Weighted};
use super::{Control, Parked};
use crate::engine::SharedStats;

/// A park file's extension.
const EXTENSION: &str = "kvpark";
/// The extension of a file being written.
const TMP_EXTENSION: &str = "kvpark.tmp";

/// What the index knows about one file.
#[derive(Debug)]
pub struct DiskEntry {
    /// Hash of the tokens: names the file.
    pub fingerprint: u64,
    /// The exact tokens of its state.
    pub tokens: Vec<i32>,
    /// Length of the file in bytes.
    pub file_len: u64,
}

impl Weighted for DiskEntry {
    fn bytes(&self) -> u64 {
        self.file_len
    }
    fn tokens(&self) -> &[i32] {
        &self.tokens
    }
}

/// Work for the disk thread.
pub enum DiskOp {
    /// Write a state to a file (evicting old files to stay in budget).
    Store(Parked),
    /// Read the file with this fingerprint back and send it to the engine thread.
    Load(u64),
    /// Answer when every earlier operation is done.
    Flush(oneshot::Sender<()>),
}

/// The engine thread's side of the disk tier.
pub struct DiskHandle {
    /// A rendezvous channel: a send waits until the disk thread takes the operation, so a
    /// state handed over is never queued behind another (one in transit at most).
    ops_tx: std::sync::mpsc::SyncSender<DiskOp>,
    index: Arc<Mutex<Lru<DiskEntry>>>,
}

/// The 64-bit hash of a token sequence that names its file.
pub fn fingerprint(tokens: &[i32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

fn lock(index: &Mutex<Lru<DiskEntry>>) -> MutexGuard<'_, Lru<DiskEntry>> {
    // A panic elsewhere while holding the lock leaves a consistent index (every mutation
    // is one call), so a poisoned lock is still usable.
    index
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DiskHandle {
    /// Rebuilds the index from the files in `dir` (creating it if needed) and starts the
    /// disk thread.
    pub fn start(
        dir: &Path,
        key: ParkKey,
        budget: u64,
        stats: Arc<SharedStats>,
        control_tx: mpsc::UnboundedSender<Control>,
    ) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let index = Arc::new(Mutex::new(rebuild_index(dir, key, budget)?));
        stats
            .kv_park_disk_bytes
            .store(lock(&index).used(), Ordering::Relaxed);
        let (ops_tx, ops_rx) = std::sync::mpsc::sync_channel(0);
        let worker = DiskWorker {
            dir: dir.to_path_buf(),
            key,
            index: Arc::clone(&index),
            stats,
            control_tx,
        };
        std::thread::Builder::new()
            .name("mistral-bot-kv-disk".into())
            .spawn(move || worker.run(ops_rx))?;
        Ok(Self { ops_tx, index })
    }

    /// The file `prompt` shares the most leading tokens with: (fingerprint, shared tokens).
    pub fn best_match(&self, prompt: &[i32]) -> Option<(u64, usize)> {
        let index = lock(&self.index);
        let (i, common) = index.best_match(prompt)?;
        Some((index.get(i)?.fingerprint, common))
    }

    /// Calls `f` with the tokens of every file in the index.
    pub fn for_each_tokens(&self, mut f: impl FnMut(&[i32])) {
        let index = lock(&self.index);
        for i in 0..index.len() {
            if let Some(entry) = index.get(i) {
                f(&entry.tokens);
            }
        }
    }

    /// Hands work to the disk thread, waiting until it has finished the operation before
    /// (a write takes tens of milliseconds per state). A thread that is gone only loses
    /// a cache.
    pub fn send(&self, op: DiskOp) {
        if self.ops_tx.send(op).is_err() {
            tracing::warn!("the KV park disk thread has stopped; state not written");
        }
    }
}

/// Reads every park file's header and tokens. Files of another model or context, or
/// truncated, or not park files at all, are deleted with a warning; leftover temporary
/// files are deleted. Checksums are verified later, when a file is read to be restored.
fn rebuild_index(dir: &Path, key: ParkKey, budget: u64) -> io::Result<Lru<DiskEntry>> {
    let mut found: Vec<(SystemTime, DiskEntry)> = Vec::new();
    for dirent in fs::read_dir(dir)? {
        let dirent = dirent?;
        let path = dirent.path();
        let name = dirent.file_name().to_string_lossy().into_owned();
        if name.ends_with(TMP_EXTENSION) {
            remove_file(&path);
            continue;
        }
        if !name.ends_with(EXTENSION) || !dirent.file_type()?.is_file() {
            continue;
        }
        match read_entry(&path, key) {
            Ok((entry, modified)) => found.push((modified, entry)),
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "ignoring a KV park file; deleting it");
                remove_file(&path);
            }
        }
    }
    found.sort_by_key(|(modified, _)| *modified);
    let mut index: Lru<DiskEntry> = Lru::new(budget);
    for (_, entry) in found {
        let fingerprint = entry.fingerprint;
        if index.position(|e| e.fingerprint == fingerprint).is_some() {
            continue;
        }
        for evicted in index.insert(entry) {
            remove_file(&file_path(dir, evicted.fingerprint));
        }
    }
    tracing::info!(
        files = index.len(),
        bytes = index.used(),
        dir = %dir.display(),
        "KV park index rebuilt"
    );
    Ok(index)
}

/// Why a file found at start-up is not used.
#[derive(Debug, thiserror::Error)]
enum EntryError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Format(#[from] FileError),
    #[error("written for another model or context settings")]
    Foreign,
    #[error("its name does not match its tokens")]
    Misnamed,
}

fn read_entry(path: &Path, key: ParkKey) -> Result<(DiskEntry, SystemTime), EntryError> {
    let mut file = File::open(path)?;
    let metadata = file.metadata()?;
    let file_len = metadata.len();
    let mut header = vec![0u8; HEADER_LEN];
    read_up_to(&mut file, &mut header)?;
    let parsed = file::decode_header(&header)?;
    if parsed.key != key {
        return Err(EntryError::Foreign);
    }
    if file_len != parsed.file_len() {
        // decode_prefix says which (truncated or too long).
        file::decode_prefix(&header, file_len)?;
    }
    let mut prefix = header;
    prefix.resize(parsed.prefix_len(), 0);
    read_up_to(&mut file, &mut prefix[HEADER_LEN..])?;
    let (_, tokens) = file::decode_prefix(&prefix, file_len)?;
    let fingerprint = fingerprint(&tokens);
    if path.file_stem().and_then(|s| s.to_str()) != Some(&format!("{fingerprint:016x}")) {
        return Err(EntryError::Misnamed);
    }
    let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((
        DiskEntry {
            fingerprint,
            tokens,
            file_len,
        },
        modified,
    ))
}

/// Fills `buf` as far as the file goes (a short file shows up as a length mismatch).
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(())
}

fn file_path(dir: &Path, fingerprint: u64) -> PathBuf {
    dir.join(format!("{fingerprint:016x}.{EXTENSION}"))
}

fn remove_file(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot delete a KV park file");
    }
}

/// The disk thread's state.
struct DiskWorker {
    dir: PathBuf,
    key: ParkKey,
    index: Arc<Mutex<Lru<DiskEntry>>>,
    stats: Arc<SharedStats>,
    control_tx: mpsc::UnboundedSender<Control>,
}

impl DiskWorker {
    /// Serves operations until the engine thread drops its handle.
    fn run(self, ops_rx: std::sync::mpsc::Receiver<DiskOp>) {
        while let Ok(op) = ops_rx.recv() {
            match op {
                DiskOp::Store(parked) => self.store(parked),
                DiskOp::Load(fingerprint) => {
                    let parked = self.load(fingerprint);
                    let _ = self.control_tx.send(Control::Loaded {
                        fingerprint,
                        parked,
                    });
                }
                DiskOp::Flush(done_tx) => {
                    let _ = done_tx.send(());
                }
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let used = lock(&self.index).used();
        self.stats.kv_park_disk_bytes.store(used, Ordering::Relaxed);
    }

    fn store(&self, parked: Parked) {
        let fingerprint = fingerprint(&parked.tokens);
        let path = file_path(&self.dir, fingerprint);
        let prefix = file::encode_prefix(self.key, &parked.tokens, parked.state.len() as u64);
        let file_len = (prefix.len() + parked.state.len() + file::TRAILER_LEN) as u64;
        let evicted = {
            let mut index = lock(&self.index);
            if let Some(i) = index.position(|e| e.fingerprint == fingerprint) {
                if index.get(i).is_some_and(|e| e.tokens == parked.tokens) {
                    index.touch(i);
                    return; // already on disk
                }
                // A fingerprint collision: the new state replaces the old file.
                index.take(i);
            }
            // A file whose tokens start the new state's is of no more use.
            let mut gone = index.remove_where(|e| parked.tokens.starts_with(&e.tokens));
            let entry = DiskEntry {
                fingerprint,
                tokens: parked.tokens.clone(),
                file_len,
            };
            let mut evicted = index.insert(entry);
            if evicted.last().is_some_and(|e| e.fingerprint == fingerprint) {
                tracing::debug!(
                    bytes = file_len,
                    "a parked state is larger than --kv-park-disk; not written"
                );
                evicted.pop();
            }
            gone.append(&mut evicted);
            gone
        };
        for old in evicted {
            remove_file(&file_path(&self.dir, old.fingerprint));
        }
        if lock(&self.index)
            .position(|e| e.fingerprint == fingerprint)
            .is_none()
        {
            return;
        }
        let started = Instant::now();
        let tmp = path.with_extension(TMP_EXTENSION);
        let written =
            write_file(&tmp, &prefix, &parked.state).and_then(|()| fs::rename(&tmp, &path));
        match written {
            Ok(()) => tracing::debug!(
                tokens = parked.tokens.len(),
                bytes = file_len,
                ms = started.elapsed().as_millis() as u64,
                "KV state parked on disk"
            ),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot write a KV park file");
                remove_file(&tmp);
                let mut index = lock(&self.index);
                if let Some(i) = index.position(|e| e.fingerprint == fingerprint) {
                    index.take(i);
                }
            }
        }
    }

    /// Reads a file back, verified; a bad file is deleted with a warning.
    fn load(&self, fingerprint: u64) -> Option<Parked> {
        let expected = {
            let index = lock(&self.index);
            let i = index.position(|e| e.fingerprint == fingerprint)?;
            index.get(i)?.tokens.clone()
        };
        let path = file_path(&self.dir, fingerprint);
        let started = Instant::now();
        let result = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| file::decode(bytes).map_err(|e| e.to_string()))
            .and_then(|decoded| {
                if decoded.key != self.key {
                    Err("written for another model or context settings".to_string())
                } else if decoded.tokens != expected {
                    Err("its tokens changed since start-up".to_string())
                } else {
                    Ok(decoded)
                }
            });
        let mut index = lock(&self.index);
        let position = index.position(|e| e.fingerprint == fingerprint);
        match result {
            Ok(decoded) => {
                if let Some(i) = position {
                    index.touch(i);
                }
                drop(index);
                if let Ok(file) = File::options().write(true).open(&path) {
                    let _ = file.set_modified(SystemTime::now());
                }
                tracing::debug!(
                    tokens = decoded.tokens.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "KV park file read"
                );
                Some(Parked {
                    tokens: decoded.tokens,
                    state: decoded.state,
                })
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "ignoring a KV park file; deleting it");
                if let Some(i) = position {
                    index.take(i);
                }
                drop(index);
                remove_file(&path);
                None
            }
        }
    }
}

/// Writes one park file: `prefix` ([`file::encode_prefix`]), the state and the checksum,
/// then waits for the data to reach the disk.
pub fn write_file(path: &Path, prefix: &[u8], state: &[u8]) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(prefix)?;
    out.write_all(state)?;
    out.write_all(&file::checksum(prefix, state))?;
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_data()
}
