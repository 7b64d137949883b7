//! The KV cache's settings: which attention kernel runs (`--flash-attn`), the element types
//! of the keys and values (`--cache-type-k`, `--cache-type-v`), and what a token of context
//! costs in bytes under them. A leaf module, pure: the engine hands the settings to
//! llama.cpp, `doctor` and the memory budget size the cache with
//! [`KvShape::bytes_per_token`], and parking keys its files on [`KvCacheSettings::key`].
//!
//! Rules (llama.cpp's own, checked here first for a clear error): a quantized V cache needs
//! flash attention (llama.cpp keeps V transposed without it, and has no kernel for a
//! quantized transposed V); a quantized K does not. `auto` is this bot's choice, not
//! llama.cpp's (whose `auto` is always on for a CPU): measured on this CPU
//! (`examples/llama_settings.rs`, 2 threads, benches/RESULTS.md), flash attention on was
//! faster in every phase on the test model (64-element heads: prompt +11-22 %, decode
//! +9-33 %), but on the Mistral-7B shape (128-element heads) it decoded 14-18 % slower
//! after 1500-4000 tokens of history (31 % slower with four streams at 4000) and won only
//! 2-5 % on prompts and at depth 0. So `auto` follows the model's head size
//! ([`KvCacheSettings::for_head_size`]), and is on whenever the V cache is quantized.

use std::fmt;

/// An element type of the K or V cache: of the types llama.cpp's own tools offer for
/// `--cache-type-k/-v`, those that passed the quality check (greedy continuations of 20
/// fixed prompts against f16, `examples/kv_quality.rs`, benches/RESULTS.md): q8_0 and q5_1
/// differed from f16 no more than bf16 or flash attention alone do; q5_0, q4_0, q4_1 and
/// iq4_nl agreed about half as long and are not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CacheType {
    /// 32-bit floats (4 bytes an element).
    #[value(name = "f32")]
    F32,
    /// 16-bit floats (2 bytes an element): llama.cpp's default, no loss.
    #[value(name = "f16")]
    F16,
    /// bfloat16 (2 bytes an element).
    #[value(name = "bf16")]
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale (34 bytes per 32 elements, ~53 % of f16).
    #[value(name = "q8_0")]
    Q8_0,
    /// 5-bit blocks with scale and minimum (24 bytes per 32, ~38 % of f16).
    #[value(name = "q5_1")]
    Q5_1,
}

impl CacheType {
    /// Every type, for tests and tables.
    pub const ALL: [CacheType; 5] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q5_1,
    ];

    /// The name llama.cpp and the flags use (`f16`, `q8_0`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q5_1 => "q5_1",
        }
    }

    /// Whether values are stored in quantized blocks (not plain floats).
    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }

    /// (bytes of a block, elements in a block): ggml's `type_size` and `blck_size`.
    fn block(self) -> (u64, u64) {
        match self {
            CacheType::F32 => (4, 1),
            CacheType::F16 | CacheType::Bf16 => (2, 1),
            CacheType::Q8_0 => (34, 32),
            CacheType::Q5_1 => (24, 32),
        }
    }

    /// Bytes of a row of `elements` values (ggml's `ggml_row_size`; a partial block counts
    /// whole, though llama.cpp refuses a head size its block does not divide).
    pub fn row_bytes(self, elements: u64) -> u64 {
        let (bytes, per_block) = self.block();
        elements.div_ceil(per_block).saturating_mul(bytes)
    }
}

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--flash-attn`: whether llama.cpp's fused flash-attention kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FlashAttn {
    /// On for models with attention heads of at most 64 elements, off for larger ones,
    /// always on when the V cache is quantized (which needs it): see the module docs.
    Auto,
    /// On.
    On,
    /// Off.
    Off,
}

impl FlashAttn {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttn::Auto => "auto",
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
        }
    }
}

/// Why the KV cache settings cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    /// A quantized V cache with flash attention forced off.
    #[error(
        "--cache-type-v {type_v} is quantized, which needs flash attention: use --flash-attn on \
         (or auto), or --cache-type-v f16"
    )]
    QuantizedVWithoutFlashAttn {
        /// The V type given.
        type_v: CacheType,
    },
}

/// The KV cache's settings, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheSettings {
    /// `None`: `auto` with an unquantized V, decided by the model ([`Self::for_head_size`]).
    flash_attn: Option<bool>,
    type_k: CacheType,
    type_v: CacheType,
}

/// The largest attention head, in elements of a key, for which `--flash-attn auto` turns
/// flash attention on (measured: on wins with 64, off with 128; see the module docs).
pub const AUTO_FLASH_ATTN_MAX_HEAD_SIZE: u64 = 64;

impl Default for KvCacheSettings {
    /// f16 keys and values, flash attention `auto` (the flags' defaults).
    fn default() -> Self {
        Self {
            flash_attn: None,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
        }
    }
}

impl KvCacheSettings {
    /// The settings the flags ask for; an error names what to change. `auto` with an
    /// unquantized V is decided once the model is known ([`Self::for_head_size`]).
    pub fn new(
        flash_attn: FlashAttn,
        type_k: CacheType,
        type_v: CacheType,
    ) -> Result<Self, KvCacheError> {
        let flash_attn = match flash_attn {
            FlashAttn::On => Some(true),
            FlashAttn::Off if type_v.is_quantized() => {
                return Err(KvCacheError::QuantizedVWithoutFlashAttn { type_v });
            }
            FlashAttn::Off => Some(false),
            FlashAttn::Auto => type_v.is_quantized().then_some(true),
        };
        Ok(Self {
            flash_attn,
            type_k,
            type_v,
        })
    }

    /// The settings for a model whose attention heads have `head_size` elements (of a
    /// key): an undecided `auto` becomes on up to [`AUTO_FLASH_ATTN_MAX_HEAD_SIZE`], off
    /// above; `on`, `off` and a quantized V's `auto` stay as they are.
    pub fn for_head_size(self, head_size: u64) -> Self {
        Self {
            flash_attn: Some(
                self.flash_attn
                    .unwrap_or(head_size <= AUTO_FLASH_ATTN_MAX_HEAD_SIZE),
            ),
            ..self
        }
    }

    /// Whether flash attention runs; `None` while `auto` waits for the model
    /// ([`Self::for_head_size`]).
    pub fn flash_attn(&self) -> Option<bool> {
        self.flash_attn
    }

    /// The K cache's element type.
    pub fn type_k(&self) -> CacheType {
        self.type_k
    }

    /// The V cache's element type.
    pub fn type_v(&self) -> CacheType {
        self.type_v
    }

    /// What parked states depend on: the types change the bytes of a state, and flash
    /// attention changes V's layout (transposed without it), so a state made under other
    /// settings must not be restored.
    pub fn key(&self) -> String {
        format!(
            "type_k {}; type_v {}; flash_attn {}",
            self.type_k,
            self.type_v,
            flash_attn_name(self.flash_attn)
        )
    }
}

fn flash_attn_name(flash_attn: Option<bool>) -> &'static str {
    match flash_attn {
        None => "auto",
        Some(true) => "on",
        Some(false) => "off",
    }
}

impl fmt::Display for KvCacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "K {}, V {}, flash attention {}",
            self.type_k,
            self.type_v,
            flash_attn_name(self.flash_attn)
        )
    }
}

/// The shape of a model's KV cache, from its GGUF header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Layers (blocks) with a KV cache.
    pub layers: u64,
    /// Key/value heads (fewer than query heads with grouped-query attention).
    pub kv_heads: u64,
    /// Elements of a key, per head.
    pub key_length: u64,
    /// Elements of a value, per head.
    pub value_length: u64,
}

impl KvShape {
    /// Bytes of KV cache one token of context takes with these types: per layer, a K row
    /// of `kv_heads × key_length` and a V row of `kv_heads × value_length` elements. The one
    /// place this is computed (doctor, the memory budget, the README's table). Mistral 7B at
    /// f16: 128 KiB; at q8_0: 68 KiB.
    pub fn bytes_per_token(&self, type_k: CacheType, type_v: CacheType) -> u64 {
        let k = type_k.row_bytes(self.kv_heads.saturating_mul(self.key_length));
        let v = type_v.row_bytes(self.kv_heads.saturating_mul(self.value_length));
        self.layers.saturating_mul(k.saturating_add(v))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MISTRAL_7B: KvShape = KvShape {
        layers: 32,
        kv_heads: 8,
        key_length: 128,
        value_length: 128,
    };

    #[test]
    fn mistral_7b_sizes_per_token() {
        use CacheType::*;
        assert_eq!(MISTRAL_7B.bytes_per_token(F16, F16), 128 * 1024);
        assert_eq!(MISTRAL_7B.bytes_per_token(Q8_0, Q8_0), 68 * 1024);
        assert_eq!(MISTRAL_7B.bytes_per_token(Q8_0, F16), 98 * 1024);
        assert_eq!(MISTRAL_7B.bytes_per_token(Q5_1, Q5_1), 48 * 1024);
        assert_eq!(MISTRAL_7B.bytes_per_token(F32, F32), 256 * 1024);
    }

    #[test]
    fn a_quantized_v_needs_flash_attention() {
        use CacheType::*;
        let err = KvCacheSettings::new(FlashAttn::Off, F16, Q8_0).unwrap_err();
        assert!(err.to_string().contains("--flash-attn on"), "{err}");
        assert!(KvCacheSettings::new(FlashAttn::On, F16, Q8_0).is_ok());
        // A quantized K alone does not.
        let k_only = KvCacheSettings::new(FlashAttn::Off, Q8_0, F16).unwrap();
        assert_eq!(k_only.flash_attn(), Some(false));
    }

    #[test]
    fn auto_follows_the_head_size_unless_v_is_quantized() {
        use CacheType::*;
        let auto = |k, v| KvCacheSettings::new(FlashAttn::Auto, k, v).unwrap();
        assert_eq!(auto(F16, F16), KvCacheSettings::default());
        assert_eq!(auto(F16, F16).flash_attn(), None, "decided by the model");
        // The test model's heads (64) and Mistral 7B's (128).
        assert_eq!(auto(F16, F16).for_head_size(64).flash_attn(), Some(true));
        assert_eq!(
            auto(Q8_0, Bf16).for_head_size(128).flash_attn(),
            Some(false)
        );
        // A quantized V needs it, whatever the heads.
        assert_eq!(auto(F16, Q5_1).flash_attn(), Some(true));
        assert_eq!(auto(F16, Q8_0).for_head_size(128).flash_attn(), Some(true));
        // `on` and `off` are kept.
        for head_size in [32, 64, 128, 256] {
            for (fa, want) in [(FlashAttn::On, true), (FlashAttn::Off, false)] {
                let kv = KvCacheSettings::new(fa, F16, F16).unwrap();
                assert_eq!(kv.for_head_size(head_size).flash_attn(), Some(want));
            }
        }
        // The key and the log line say which one runs.
        assert!(
            auto(F16, F16)
                .for_head_size(64)
                .key()
                .ends_with("flash_attn on")
        );
        assert!(
            auto(F16, F16)
                .for_head_size(128)
                .to_string()
                .ends_with("flash attention off")
        );
    }

    #[test]
    fn every_setting_has_its_own_park_key() {
        let mut keys = std::collections::HashSet::new();
        for fa in [FlashAttn::On, FlashAttn::Off] {
            for k in CacheType::ALL {
                for v in CacheType::ALL {
                    if let Ok(settings) = KvCacheSettings::new(fa, k, v) {
                        assert!(keys.insert(settings.key()), "{settings}");
                    }
                }
            }
        }
    }

    proptest! {
        /// Every pair of types, any shape of whole blocks: the size is the two rows per layer, never more
        /// than f32's, never less than a third of f16's, and it never overflows.
        #[test]
        fn size_is_between_4_bits_and_f32(
            layers in 0u64..200, heads in 0u64..128, key in 0u64..20, value in 0u64..20,
            k in 0usize..CacheType::ALL.len(), v in 0usize..CacheType::ALL.len(),
        ) {
            // Head sizes are whole blocks (llama.cpp refuses others for quantized types).
            let shape = KvShape {
                layers, kv_heads: heads, key_length: key * 32, value_length: value * 32,
            };
            let (k, v) = (CacheType::ALL[k], CacheType::ALL[v]);
            let size = shape.bytes_per_token(k, v);
            prop_assert!(size <= shape.bytes_per_token(CacheType::F32, CacheType::F32));
            prop_assert!(size * 3 >= shape.bytes_per_token(CacheType::F16, CacheType::F16));
            let huge = KvShape { layers: u64::MAX, ..shape };
            let _ = huge.bytes_per_token(k, v);
        }
    }
}
