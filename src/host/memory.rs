//! The memory plan: how much RAM KV parking may use, from the memory this process may use
//! (its cgroup's limit, else `MemAvailable`) less what the model needs whatever the
//! traffic (weights, the KV cache of every slot, llama.cpp's compute buffers, one parked
//! state in transit, the rest of the process) and a safety margin. Decided once at
//! start-up ([`plan`]) and handed down as a number; under pressure the budget shrinks
//! ([`next_park_budget`]), never above the plan.
//!
//! Pure, except [`MemoryNeeds::of_model`] (reads the GGUF header) and [`HostMemory::read`].

use std::fmt;
use std::io::BufReader;
use std::path::Path;

use super::cgroup::{self, CgroupVersion, MemoryCgroup};
use crate::gguf::{self, GgufHeader, MetaValue};
use crate::kv_cache::{CacheType, KvCacheSettings};

const MIB: u64 = 1 << 20;

/// What `auto` gives when the host tells nothing about its memory (not Linux).
pub const UNKNOWN_HOST_PARK_RAM: u64 = 1024 * MIB;
/// The smallest safety margin.
pub const MIN_MARGIN: u64 = 64 * MIB;
/// The safety margin is this fraction (1/N) of the limit, when that is more.
pub const MARGIN_DIVISOR: u64 = 16;
/// The rest of the process: runtime, HTTP and Telegram clients, SQLite, logs, the binary.
pub const RUNTIME_BYTES: u64 = 64 * MIB;
/// llama.cpp plans compute buffers for micro-batches of at most this many tokens.
const MAX_UBATCH: u64 = 512;

/// `--kv-park-ram`: sized from the host, or a number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkRam {
    /// What fits (see [`plan`]).
    Auto,
    /// Exactly this many bytes, if they fit.
    Bytes(u64),
}

impl fmt::Display for ParkRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParkRam::Auto => f.write_str("auto"),
            ParkRam::Bytes(bytes) => write!(f, "{} MiB", bytes / MIB),
        }
    }
}

/// What the model needs in RAM whatever the traffic, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryNeeds {
    /// The weights (the file's size: loaded into memory, or mapped and resident).
    pub weights: u64,
    /// The KV cache of every slot (`--slots × --ctx-size` tokens).
    pub kv_cache: u64,
    /// llama.cpp's compute buffers (one micro-batch's activations and logits).
    pub compute: u64,
    /// One slot's full state on its way to or from a park file.
    pub transit: u64,
    /// The rest of the process ([`RUNTIME_BYTES`]).
    pub runtime: u64,
}

impl MemoryNeeds {
    /// The needs of a model of `weights` bytes with these shapes, run with `slots` ×
    /// `ctx_size` and `batch_size`. `kv_bytes_per_token` comes from one place
    /// ([`GgufHeader::kv_bytes_per_token`]) so that a change of cache type changes it here.
    pub fn estimate(
        weights: u64,
        shapes: &ModelShapes,
        slots: u64,
        ctx_size: u64,
        batch_size: u64,
    ) -> Self {
        let per_slot = shapes.kv_bytes_per_token.saturating_mul(ctx_size);
        // The activations of one micro-batch in f32: embeddings and attention (~4 × width),
        // the feed-forward (~2 × its width) and, worst case, a logit row per token. Checked
        // against llama.cpp's own "compute buffer size" log line (see the README).
        let ubatch = batch_size.clamp(1, MAX_UBATCH);
        let row = shapes
            .vocab
            .saturating_add(shapes.ffn_width.saturating_mul(2))
            .saturating_add(shapes.width.saturating_mul(4));
        Self {
            weights,
            kv_cache: per_slot.saturating_mul(slots),
            compute: ubatch.saturating_mul(row).saturating_mul(4),
            transit: per_slot,
            runtime: RUNTIME_BYTES,
        }
    }

    /// The needs of the model file at `path`, from its GGUF header (never the weights).
    pub fn of_model(
        path: &Path,
        slots: u64,
        ctx_size: u64,
        batch_size: u64,
        kv: &KvCacheSettings,
    ) -> Result<Self, NeedsError> {
        let file = std::fs::File::open(path).map_err(|e| NeedsError::Read(e.to_string()))?;
        let len = file
            .metadata()
            .map_err(|e| NeedsError::Read(e.to_string()))?
            .len();
        let header = gguf::read_header(&mut BufReader::new(file), len)
            .map_err(|e| NeedsError::Read(e.to_string()))?;
        let shapes =
            ModelShapes::of(&header, kv.type_k(), kv.type_v()).ok_or(NeedsError::Shapes)?;
        Ok(Self::estimate(len, &shapes, slots, ctx_size, batch_size))
    }

    /// All of it.
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.compute)
            .saturating_add(self.transit)
            .saturating_add(self.runtime)
    }
}

/// Why the model's needs could not be worked out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NeedsError {
    /// The file or its header could not be read.
    #[error("cannot read the model's header: {0}")]
    Read(String),
    /// The header lacks the shapes.
    #[error("the model's header lacks the shapes to size its KV cache")]
    Shapes,
}

/// The shapes of a model that size its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShapes {
    /// KV-cache bytes per token of context.
    pub kv_bytes_per_token: u64,
    /// Embedding width.
    pub width: u64,
    /// Feed-forward width.
    pub ffn_width: u64,
    /// Vocabulary size.
    pub vocab: u64,
}

impl ModelShapes {
    /// The shapes from a GGUF header; `None` when it lacks the KV shapes.
    pub fn of(header: &GgufHeader, type_k: CacheType, type_v: CacheType) -> Option<Self> {
        let width = header.arch_uint("embedding_length").unwrap_or(0);
        Some(Self {
            kv_bytes_per_token: header.kv_bytes_per_token(type_k, type_v)?,
            width,
            ffn_width: header
                .arch_uint("feed_forward_length")
                .unwrap_or(width.saturating_mul(4)),
            vocab: match header.metadata.get("tokenizer.ggml.tokens") {
                Some(MetaValue::Array(n)) => *n,
                _ => header.arch_uint("vocab_size").unwrap_or(0),
            },
        })
    }
}

/// Where the limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    /// The memory cgroup's limit.
    Cgroup(CgroupVersion),
    /// `MemAvailable` of `/proc/meminfo` (no cgroup limit, or a larger one).
    MemAvailable,
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitSource::Cgroup(CgroupVersion::V1) => {
                f.write_str("cgroup v1 memory.limit_in_bytes")
            }
            LimitSource::Cgroup(CgroupVersion::V2) => f.write_str("cgroup v2 memory.max"),
            LimitSource::MemAvailable => f.write_str("MemAvailable"),
        }
    }
}

/// The memory this process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryLimit {
    /// Bytes.
    pub bytes: u64,
    /// Where that figure comes from.
    pub source: LimitSource,
}

/// The host's memory as read at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// This process's memory cgroup, if one is mounted.
    pub cgroup: Option<MemoryCgroup>,
    /// Its limit (`None`: unlimited or no cgroup).
    pub cgroup_limit: Option<u64>,
    /// `MemAvailable`, where Linux tells.
    pub mem_available: Option<u64>,
}

impl HostMemory {
    /// Reads the cgroup and `/proc/meminfo`.
    pub fn read() -> Self {
        let cgroup = MemoryCgroup::of_self();
        Self {
            cgroup_limit: cgroup.as_ref().and_then(MemoryCgroup::limit),
            cgroup,
            mem_available: cgroup::mem_available(),
        }
    }

    /// The memory this process may use: the cgroup's limit, or `MemAvailable` when that
    /// is less (a limit above what the host has free protects nothing) or there is no limit.
    pub fn limit(&self) -> Option<MemoryLimit> {
        let version = self.cgroup.as_ref().map(|c| c.version);
        effective_limit(self.cgroup_limit.zip(version), self.mem_available)
    }

    /// How far this process is from its limit now: the cgroup's limit less its working
    /// set, or `MemAvailable`, whichever is less.
    pub fn headroom_now(&self) -> Option<u64> {
        let in_cgroup = match (&self.cgroup, self.cgroup_limit) {
            (Some(cgroup), Some(limit)) => {
                cgroup.working_set().map(|used| limit.saturating_sub(used))
            }
            _ => None,
        };
        in_cgroup.into_iter().chain(cgroup::mem_available()).min()
    }
}

/// The lower of a cgroup limit and `MemAvailable`, with its source.
pub fn effective_limit(
    cgroup: Option<(u64, CgroupVersion)>,
    mem_available: Option<u64>,
) -> Option<MemoryLimit> {
    let from_cgroup = |(bytes, version)| MemoryLimit {
        bytes,
        source: LimitSource::Cgroup(version),
    };
    match (cgroup, mem_available) {
        (Some((limit, version)), Some(available)) if limit <= available => {
            Some(from_cgroup((limit, version)))
        }
        (_, Some(available)) => Some(MemoryLimit {
            bytes: available,
            source: LimitSource::MemAvailable,
        }),
        (cgroup, None) => cgroup.map(from_cgroup),
    }
}

/// The safety margin kept free under `limit`.
pub fn safety_margin(limit: u64) -> u64 {
    (limit / MARGIN_DIVISOR).max(MIN_MARGIN)
}

/// What was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// The memory this process may use (`None`: the host does not say).
    pub limit: Option<MemoryLimit>,
    /// What the model needs whatever the traffic.
    pub needs: MemoryNeeds,
    /// Kept free under the limit.
    pub margin: u64,
    /// The RAM budget of parked KV states, in bytes.
    pub park_ram: u64,
    /// An explicit `--kv-park-ram` that did not fit, in bytes (then clamped to `park_ram`).
    pub clamped_from: Option<u64>,
}

impl MemoryPlan {
    /// Whether the model's own needs already exceed the limit (parking gets nothing, and
    /// the process may still be killed: fewer slots or a smaller window are needed).
    pub fn overcommitted(&self) -> bool {
        self.limit
            .is_some_and(|l| self.needs.total().saturating_add(self.margin) > l.bytes)
    }

    /// Free memory below which the pressure watch sheds parked states.
    pub fn reserve(&self) -> u64 {
        self.margin / 2
    }
}

/// The park RAM budget for `requested`: `auto` takes what is left of `limit` after the
/// model's needs and the safety margin; an explicit value wins when it fits and is
/// clamped to that otherwise. Without a known limit an explicit value stands and `auto`
/// is [`UNKNOWN_HOST_PARK_RAM`].
pub fn plan(limit: Option<MemoryLimit>, needs: MemoryNeeds, requested: ParkRam) -> MemoryPlan {
    let Some(known) = limit else {
        return MemoryPlan {
            limit,
            needs,
            margin: 0,
            park_ram: match requested {
                ParkRam::Auto => UNKNOWN_HOST_PARK_RAM,
                ParkRam::Bytes(bytes) => bytes,
            },
            clamped_from: None,
        };
    };
    let margin = safety_margin(known.bytes);
    let room = known
        .bytes
        .saturating_sub(needs.total())
        .saturating_sub(margin);
    let (park_ram, clamped_from) = match requested {
        ParkRam::Auto => (room, None),
        ParkRam::Bytes(bytes) if bytes <= room => (bytes, None),
        ParkRam::Bytes(bytes) => (room, Some(bytes)),
    };
    MemoryPlan {
        limit,
        needs,
        margin,
        park_ram,
        clamped_from,
    }
}

/// The park RAM budget for now, given `headroom` (free memory before the limit) and
/// `parked` (bytes parked in RAM): as much as keeps `reserve` free, never more than
/// `planned`. Below the reserve it is less than `parked`, so states spill to disk.
pub fn next_park_budget(planned: u64, parked: u64, headroom: u64, reserve: u64) -> u64 {
    parked
        .saturating_add(headroom)
        .saturating_sub(reserve)
        .min(planned)
}

/// Bytes as people write them: `512 B`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for MemoryPlan {
    /// One line for the log and `doctor`: the budget and how it was reached.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = &self.needs;
        let needs = format!(
            "weights {} + KV cache {} + compute {} + transit {} + runtime {}",
            human_bytes(n.weights),
            human_bytes(n.kv_cache),
            human_bytes(n.compute),
            human_bytes(n.transit),
            human_bytes(n.runtime)
        );
        match self.limit {
            None => write!(
                f,
                "park RAM {} (the host does not say how much memory there is; needs {needs})",
                human_bytes(self.park_ram)
            ),
            Some(limit) => write!(
                f,
                "park RAM {} = limit {} ({}) − needs {} ({needs}) − margin {}",
                human_bytes(self.park_ram),
                human_bytes(limit.bytes),
                limit.source,
                human_bytes(n.total()),
                human_bytes(self.margin)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn mistral_7b() -> MemoryNeeds {
        let shapes = ModelShapes {
            kv_bytes_per_token: 128 * 1024,
            width: 4096,
            ffn_width: 14336,
            vocab: 32768,
        };
        MemoryNeeds::estimate(4_372_755_040, &shapes, 4, 4096, 512)
    }

    fn cgroup(bytes: u64) -> Option<MemoryLimit> {
        Some(MemoryLimit {
            bytes,
            source: LimitSource::Cgroup(CgroupVersion::V2),
        })
    }

    #[test]
    fn the_8_gib_box_gets_a_budget_that_fits_beside_the_7b() {
        let needs = mistral_7b();
        assert_eq!(needs.kv_cache, 2 * GIB);
        assert_eq!(needs.transit, 512 * MIB);
        let plan = plan(cgroup(8 * GIB), needs, ParkRam::Auto);
        // 8 GiB − (4.07 + 2 + 0.15 + 0.5 + 0.06 GiB) − 0.5 GiB margin.
        assert!((600 * MIB..800 * MIB).contains(&plan.park_ram), "{plan}");
        assert!(!plan.overcommitted());
        // The old default would not fit: it is clamped, and says from what.
        let explicit = super::plan(cgroup(8 * GIB), needs, ParkRam::Bytes(4096 * MIB));
        assert_eq!(explicit.park_ram, plan.park_ram);
        assert_eq!(explicit.clamped_from, Some(4096 * MIB));
        assert!(
            explicit
                .to_string()
                .contains("limit 8.0 GiB (cgroup v2 memory.max)"),
            "{explicit}"
        );
    }

    #[test]
    fn too_little_memory_leaves_nothing_to_park_and_says_so() {
        let plan = plan(cgroup(6 * GIB), mistral_7b(), ParkRam::Auto);
        assert_eq!(plan.park_ram, 0);
        assert!(plan.overcommitted());
    }

    #[test]
    fn an_unknown_host_keeps_an_explicit_value() {
        let needs = mistral_7b();
        assert_eq!(plan(None, needs, ParkRam::Bytes(3 * GIB)).park_ram, 3 * GIB);
        assert_eq!(
            plan(None, needs, ParkRam::Auto).park_ram,
            UNKNOWN_HOST_PARK_RAM
        );
    }

    #[test]
    fn the_lower_of_cgroup_limit_and_available_memory_counts() {
        let v1 = Some((4 * GIB, CgroupVersion::V1));
        assert_eq!(
            effective_limit(v1, Some(8 * GIB)).unwrap().source,
            LimitSource::Cgroup(CgroupVersion::V1)
        );
        let low = effective_limit(v1, Some(GIB)).unwrap();
        assert_eq!((low.bytes, low.source), (GIB, LimitSource::MemAvailable));
        assert_eq!(effective_limit(v1, None).unwrap().bytes, 4 * GIB);
        assert_eq!(effective_limit(None, None), None);
    }

    fn needs() -> impl Strategy<Value = MemoryNeeds> {
        (0..64 * GIB, 0..64 * GIB, 0..GIB, 0..8 * GIB).prop_map(|(w, k, c, t)| MemoryNeeds {
            weights: w,
            kv_cache: k,
            compute: c,
            transit: t,
            runtime: RUNTIME_BYTES,
        })
    }

    fn requested() -> impl Strategy<Value = ParkRam> {
        prop_oneof![Just(ParkRam::Auto), (0..u64::MAX).prop_map(ParkRam::Bytes)]
    }

    proptest! {
        #[test]
        fn the_plan_never_exceeds_the_limit_and_an_explicit_value_only_shrinks(
            limit in proptest::option::of(0..u64::MAX),
            needs in needs(),
            requested in requested(),
        ) {
            let limit = limit.map(|bytes| MemoryLimit { bytes, source: LimitSource::MemAvailable });
            let plan = plan(limit, needs, requested);
            if let Some(limit) = limit {
                // Needs + margin + park RAM fit in the limit, or park RAM is 0.
                prop_assert!(
                    plan.park_ram == 0
                        || needs.total() as u128 + plan.margin as u128 + plan.park_ram as u128
                            <= limit.bytes as u128
                );
                prop_assert!(plan.margin >= MIN_MARGIN);
                prop_assert_eq!(plan.overcommitted(), plan.park_ram == 0
                    && needs.total() as u128 + plan.margin as u128 > limit.bytes as u128);
            }
            if let ParkRam::Bytes(bytes) = requested {
                prop_assert!(plan.park_ram <= bytes);
                prop_assert_eq!(plan.clamped_from.is_some(), plan.park_ram < bytes);
                prop_assert_eq!(plan.clamped_from.unwrap_or(bytes), bytes);
            } else {
                prop_assert_eq!(plan.clamped_from, None);
            }
            let _ = plan.to_string();
        }

        #[test]
        fn auto_grows_with_the_limit_and_shrinks_with_the_needs(
            a in 0..u64::MAX / 2,
            b in 0..u64::MAX / 2,
            needs in needs(),
            more in 0..GIB,
        ) {
            let (low, high) = (a.min(b), a.max(b));
            let at = |bytes| plan(Some(MemoryLimit { bytes, source: LimitSource::MemAvailable }), needs, ParkRam::Auto).park_ram;
            prop_assert!(at(low) <= at(high));
            let bigger = MemoryNeeds { kv_cache: needs.kv_cache + more, ..needs };
            let limit = Some(MemoryLimit { bytes: high, source: LimitSource::MemAvailable });
            prop_assert!(plan(limit, bigger, ParkRam::Auto).park_ram <= at(high));
        }

        #[test]
        fn under_pressure_the_budget_drops_below_what_is_parked_and_never_passes_the_plan(
            planned in 0..u64::MAX / 4,
            parked in 0..u64::MAX / 4,
            headroom in 0..u64::MAX / 4,
            reserve in 0..u64::MAX / 4,
        ) {
            let budget = next_park_budget(planned, parked, headroom, reserve);
            prop_assert!(budget <= planned);
            if headroom < reserve {
                // Shed exactly what is missing (or everything).
                prop_assert!(budget <= parked.saturating_sub(reserve - headroom));
            } else {
                // No pressure: nothing parked is shed.
                prop_assert!(budget >= parked.min(planned));
            }
        }
    }
}
