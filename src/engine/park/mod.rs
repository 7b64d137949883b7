//! KV parking: a conversation's KV state outlives its slot.
//!
//! When a slot is about to be reused by another conversation, the engine thread copies
//! the leaving sequence's state out (`llama_state_seq_get_data`, a memcpy) into a RAM LRU
//! bounded by `--kv-park-ram`; what falls out of RAM is written to files under
//! `--data-dir/kv/` bounded by `--kv-park-disk` (see [`disk`]). A request whose prompt
//! extends a parked state further than any free slot's cache gets that state copied
//! back into a free slot, and only the rest of its prompt is decoded.
//!
//! Keys: a state restores only into an engine with the same model identity (file size,
//! the first 8 MiB — the GGUF header with metadata, vocabulary and tensor table — and 17
//! samples of the weights), the same context settings, and only for the exact tokens it
//! was made from (stored with it and compared token by token; the hash of the tokens only
//! names the file). Anything else is ignored and the prompt decoded normally.
//!
//! The pure parts are [`lru`] (byte budgets, prefix match) and [`file`] (the file format).

pub(crate) mod disk;
pub mod file;
pub mod lru;

pub use disk::write_file;

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use xxhash_rust::xxh3::Xxh3;

use super::SharedStats;
use super::llama::Context;
use super::slot::Slot;
use crate::kv_cache::KvCacheSettings;
use disk::{DiskHandle, DiskOp};
use file::ParkKey;
use lru::{Lru, Weighted, common_prefix};

/// Where and how much to park.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkConfig {
    /// Directory of the park files (`--data-dir/kv`).
    pub dir: PathBuf,
    /// Most bytes of parked states kept in RAM (0: none; states go straight to disk).
    pub ram_bytes: u64,
    /// Most bytes of park files on disk (0: none; nothing survives a restart).
    pub disk_bytes: u64,
}

/// A leaving conversation is parked only if the new prompt drops at least this many of
/// its cached tokens (a shorter tail, such as a regenerated last answer, is not worth
/// the copy), and a parked state is restored only if it saves at least this many tokens
/// over the best free slot (chats that share only a system prompt stay where they are).
pub const MIN_PARKED_TAIL: usize = 16;

/// Bumped whenever the layout of llama.cpp's sequence state may change (the llama-cpp-2
/// version), so that old files are ignored rather than misread.
const STATE_LAYOUT: &str = "llama-cpp-2 0.1.160, llama_state_seq_get_data, flags 0";

/// A parked sequence: its exact tokens and its llama.cpp state.
#[derive(Debug)]
pub(crate) struct Parked {
    /// The tokens the state holds, position by position.
    pub tokens: Vec<i32>,
    /// The llama.cpp sequence state.
    pub state: Vec<u8>,
}

impl Weighted for Parked {
    fn bytes(&self) -> u64 {
        (self.state.len() + 4 * self.tokens.len()) as u64
    }
    fn tokens(&self) -> &[i32] {
        &self.tokens
    }
}

/// Messages to the engine thread other than requests.
pub(crate) enum Control {
    /// The disk thread read a file back (`None`: it was unusable and is deleted).
    Loaded {
        /// Which file.
        fingerprint: u64,
        /// Its state.
        parked: Option<Parked>,
    },
    /// Write every slot's cache and every state in RAM to disk, then answer.
    ParkAll(oneshot::Sender<()>),
    /// Keep at most this many bytes of parked states in RAM from now on (the memory
    /// pressure watch); what no longer fits spills to disk.
    RamBudget(u64),
}

/// A state read from disk for a request that waited for it.
pub(crate) enum Preload {
    /// Nothing was loaded for this request.
    None,
    /// The state it waited for.
    Loaded(Parked),
    /// The file could not be used: do not look on disk again for this request.
    Failed,
}

/// What [`Parking::prepare`] decided.
pub(crate) enum Prepared {
    /// Start the request on this slot (its cache may have just been restored).
    Slot(usize),
    /// The best state is on disk: the request waits until it is read.
    Wait(u64),
}

/// The identity of a model file: a hash of its size, its first 8 MiB (the GGUF header:
/// metadata, vocabulary and tensor table) and 17 samples of 64 KiB spread over the
/// weights. Computed once at start-up.
pub fn model_identity(path: &Path) -> io::Result<u128> {
    const HEAD: u64 = 8 << 20;
    const SAMPLE: u64 = 64 << 10;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Xxh3::new();
    hasher.update(&len.to_le_bytes());
    let mut buf = Vec::new();
    (&mut file).take(HEAD).read_to_end(&mut buf)?;
    hasher.update(&buf);
    for i in 0..=16 {
        let offset = len.saturating_sub(SAMPLE) / 16 * i;
        file.seek(SeekFrom::Start(offset))?;
        buf.clear();
        (&mut file).take(SAMPLE).read_to_end(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(hasher.digest128())
}

/// The context settings that shape a sequence state: a state made under other settings
/// is not restored. The KV cache's types change its bytes, and flash attention V's layout
/// (transposed without it): see [`KvCacheSettings::key`].
pub fn context_key(ctx_size: u32, slots: usize, kv: &KvCacheSettings) -> u64 {
    let settings = format!(
        "{STATE_LAYOUT}; mistral-bot {}; ctx {ctx_size}; seqs {slots}; {}; unified 0",
        env!("CARGO_PKG_VERSION"),
        kv.key()
    );
    xxhash_rust::xxh3::xxh3_64(settings.as_bytes())
}

/// The engine thread's parking: the RAM LRU and the handle to the disk tier.
pub(crate) struct Parking {
    ram: Lru<Parked>,
    disk: Option<DiskHandle>,
    stats: Arc<SharedStats>,
}

impl Parking {
    /// Rebuilds the disk index from `config.dir` and starts the disk thread.
    pub fn start(
        config: &ParkConfig,
        key: ParkKey,
        stats: Arc<SharedStats>,
        control_tx: mpsc::UnboundedSender<Control>,
    ) -> io::Result<Self> {
        let disk = if config.disk_bytes > 0 {
            Some(DiskHandle::start(
                &config.dir,
                key,
                config.disk_bytes,
                Arc::clone(&stats),
                control_tx,
            )?)
        } else {
            None
        };
        let parking = Self {
            ram: Lru::new(config.ram_bytes),
            disk,
            stats,
        };
        parking.publish();
        Ok(parking)
    }

    /// Calls `f` with the tokens of every park file on disk.
    pub fn for_each_on_disk(&self, f: impl FnMut(&[i32])) {
        if let Some(disk) = &self.disk {
            disk.for_each_tokens(f);
        }
    }

    fn publish(&self) {
        self.stats
            .kv_park_ram_bytes
            .store(self.ram.used(), Ordering::Relaxed);
        self.stats
            .kv_park_ram_budget_bytes
            .store(self.ram.budget(), Ordering::Relaxed);
    }

    /// Changes the RAM budget; what no longer fits spills to disk (or is dropped without
    /// a disk tier), least recently used first.
    pub fn set_ram_budget(&mut self, bytes: u64) {
        let spilled = self.ram.set_budget(bytes);
        if !spilled.is_empty() {
            tracing::debug!(
                states = spilled.len(),
                budget = bytes,
                "the park RAM budget shrank: states spill to disk"
            );
        }
        self.spill(spilled);
        self.publish();
    }

    /// Hands states that left RAM to the disk thread, one at a time: each send waits until
    /// the disk thread has finished the previous one, so at most one state is in transit
    /// outside the RAM budget. Without a disk tier they are dropped.
    fn spill(&self, states: Vec<Parked>) {
        if let Some(disk) = &self.disk {
            for parked in states {
                disk.send(DiskOp::Store(parked));
            }
        }
    }

    /// Chooses the slot for `prompt`, restoring a parked state into it when one extends
    /// the prompt further than the `chosen` slot's cache (the best free slot), and parking
    /// whatever cache the request is about to overwrite.
    pub fn prepare(
        &mut self,
        ctx: &mut Context<'_>,
        slots: &mut [Slot],
        chosen: usize,
        prompt: &[i32],
        preload: Preload,
    ) -> Prepared {
        // At least one prompt token is always decoded (its logits give the first reply token).
        let usable = prompt.len().saturating_sub(1);
        let in_slot = slots[chosen].reusable_prefix(prompt);
        let in_ram = self.ram.best_match(prompt);
        let ram_common = in_ram.map_or(0, |(_, common)| common.min(usable));
        let (parked, from_disk) = match preload {
            Preload::Loaded(parked)
                if common_prefix(&parked.tokens, prompt).min(usable)
                    >= in_slot.max(ram_common) + MIN_PARKED_TAIL =>
            {
                (parked, true)
            }
            preload => {
                let on_disk = match (&self.disk, preload) {
                    (Some(disk), Preload::None) => disk.best_match(prompt),
                    _ => None,
                };
                let disk_common = on_disk.map_or(0, |(_, common)| common.min(usable));
                if disk_common >= in_slot.max(ram_common) + MIN_PARKED_TAIL
                    && let (Some(disk), Some((fingerprint, _))) = (&self.disk, on_disk)
                {
                    disk.send(DiskOp::Load(fingerprint));
                    return Prepared::Wait(fingerprint);
                }
                match in_ram {
                    Some((index, _)) if ram_common >= in_slot + MIN_PARKED_TAIL => {
                        match self.ram.take(index) {
                            Some(parked) => (parked, false),
                            None => return self.reuse(ctx, slots, chosen, prompt),
                        }
                    }
                    _ => return self.reuse(ctx, slots, chosen, prompt),
                }
            }
        };
        self.publish();
        // The restored state replaces the least valuable free cache: the least recently used.
        let target = slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.is_idle())
            .min_by_key(|(_, slot)| slot.last_used)
            .map_or(chosen, |(i, _)| i);
        self.park_leaving(ctx, &slots[target], prompt);
        let seq_id = slots[target].seq_id;
        let started = Instant::now();
        if ctx.set_seq_state(seq_id, &parked.state) {
            tracing::debug!(
                tokens = parked.tokens.len(),
                bytes = parked.state.len(),
                from_disk,
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "KV state restored"
            );
            let hits = if from_disk {
                &self.stats.kv_park_hits_disk
            } else {
                &self.stats.kv_park_hits_ram
            };
            hits.fetch_add(1, Ordering::Relaxed);
            slots[target].cached = parked.tokens;
        } else {
            tracing::warn!(
                tokens = parked.tokens.len(),
                "llama.cpp refused a parked KV state; decoding the prompt instead"
            );
            ctx.forget(seq_id, 0);
            slots[target].clear();
        }
        Prepared::Slot(target)
    }

    /// The plain prefix-cache path: `chosen` takes the request, its leaving conversation
    /// parked first if the request drops a real part of it.
    fn reuse(
        &mut self,
        ctx: &mut Context<'_>,
        slots: &[Slot],
        chosen: usize,
        prompt: &[i32],
    ) -> Prepared {
        self.park_leaving(ctx, &slots[chosen], prompt);
        Prepared::Slot(chosen)
    }

    /// Parks `slot`'s cache if `prompt` would drop at least [`MIN_PARKED_TAIL`] of it.
    pub fn park_leaving(&mut self, ctx: &Context<'_>, slot: &Slot, prompt: &[i32]) {
        let dropped = slot.cached.len() - common_prefix(&slot.cached, prompt);
        if dropped >= MIN_PARKED_TAIL {
            self.park_slot(ctx, slot);
        }
    }

    /// Copies `slot`'s KV state out and keeps it in RAM (spilling the oldest to disk).
    /// Room is made, and what leaves written, before the copy exists: parked RAM never
    /// holds more than its budget plus the one state in transit.
    fn park_slot(&mut self, ctx: &Context<'_>, slot: &Slot) {
        // A state whose tokens start the new one's is of no more use.
        self.ram
            .remove_where(|old| slot.cached.starts_with(&old.tokens));
        let size = (ctx.seq_state_size(slot.seq_id) + 4 * slot.cached.len()) as u64;
        if size <= self.ram.budget() {
            let spilled = self.ram.make_room(size);
            self.spill(spilled);
        }
        let started = Instant::now();
        let Some(state) = ctx.seq_state(slot.seq_id) else {
            tracing::warn!(seq = slot.seq_id, "llama.cpp gave no KV state to park");
            return;
        };
        tracing::debug!(
            tokens = slot.cached.len(),
            bytes = state.len(),
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            "KV state parked in RAM"
        );
        let parked = Parked {
            tokens: slot.cached.clone(),
            state,
        };
        let spilled = self.ram.insert(parked);
        self.publish();
        self.spill(spilled);
    }

    /// Writes every slot's cache and every state in RAM to disk, then answers `done_tx`
    /// (from the disk thread, once the files are written).
    pub fn park_all(&mut self, ctx: &Context<'_>, slots: &[Slot], done_tx: oneshot::Sender<()>) {
        let Some(disk) = &self.disk else {
            let _ = done_tx.send(());
            return;
        };
        // Oldest first, slots last: if the disk budget is short, the hottest states stay.
        for parked in self.ram.drain_oldest_first() {
            disk.send(DiskOp::Store(parked));
        }
        let mut slots: Vec<&Slot> = slots.iter().collect();
        slots.sort_by_key(|slot| slot.last_used);
        for slot in slots {
            if slot.cached.len() < MIN_PARKED_TAIL {
                continue;
            }
            if let Some(state) = ctx.seq_state(slot.seq_id) {
                disk.send(DiskOp::Store(Parked {
                    tokens: slot.cached.clone(),
                    state,
                }));
            }
        }
        self.publish();
        disk.send(DiskOp::Flush(done_tx));
    }
}
