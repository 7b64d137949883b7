//! The KV cache's settings: which attention kernel runs (`--flash-attn`), the element types
//! of the keys and values (`--cache-type-k`, `--cache-type-v`), and what a token of context
//! costs in bytes under them. A leaf module, pure: the engine hands the settings to
//! llama.cpp, `doctor` and the memory budget size the cache with
//! [`KvShape::bytes_per_token`], and parking keys its files on [`KvCacheSettings::key`].
//!
//! Rules (llama.cpp's own, checked here first for a clear error): a quantized V cache needs
//! flash attention (llama.cpp keeps V transposed without it, and has no kernel for a
//! quantized transposed V); a quantized K does not. `auto` is this bot's choice, not
//! llama.cpp's: on this CPU flash attention off decoded ~13 % faster after a 1536-token
//! history on the Mistral-7B shape and tied on prompt chunks (llama-bench, 2 threads), and
//! llama.cpp's own `auto` resolves to on for a CPU; so `auto` is off, unless the V cache is
//! quantized, which needs it on.

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
    /// Off, unless the V cache is quantized (which needs it): see the module docs.
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
    flash_attn: bool,
    type_k: CacheType,
    type_v: CacheType,
}

impl Default for KvCacheSettings {
    /// f16 keys and values, flash attention off (the flags' defaults).
    fn default() -> Self {
        Self {
            flash_attn: false,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
        }
    }
}

impl KvCacheSettings {
    /// The settings the flags ask for, `auto` resolved; an error names what to change.
    pub fn new(
        flash_attn: FlashAttn,
        type_k: CacheType,
        type_v: CacheType,
    ) -> Result<Self, KvCacheError> {
        let flash_attn = match flash_attn {
            FlashAttn::On => true,
            FlashAttn::Off if type_v.is_quantized() => {
                return Err(KvCacheError::QuantizedVWithoutFlashAttn { type_v });
            }
            FlashAttn::Off => false,
            FlashAttn::Auto => type_v.is_quantized(),
        };
        Ok(Self {
            flash_attn,
            type_k,
            type_v,
        })
    }

    /// Whether flash attention runs (after `auto` was resolved).
    pub fn flash_attn(&self) -> bool {
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
            if self.flash_attn { "on" } else { "off" }
        )
    }
}

impl fmt::Display for KvCacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "K {}, V {}, flash attention {}",
            self.type_k,
            self.type_v,
            if self.flash_attn { "on" } else { "off" }
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
        assert!(!k_only.flash_attn());
    }

    #[test]
    fn auto_is_off_unless_v_is_quantized() {
        use CacheType::*;
        assert!(
            !KvCacheSettings::new(FlashAttn::Auto, F16, F16)
                .unwrap()
                .flash_attn()
        );
        assert!(
            !KvCacheSettings::new(FlashAttn::Auto, Q8_0, Bf16)
                .unwrap()
                .flash_attn()
        );
        assert!(
            KvCacheSettings::new(FlashAttn::Auto, F16, Q5_1)
                .unwrap()
                .flash_attn()
        );
        assert_eq!(
            KvCacheSettings::new(FlashAttn::Auto, F16, F16).unwrap(),
            KvCacheSettings::default()
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
