//! A GGUF header reader: the metadata and tensor table of a model file, read without
//! loading the weights (for `mistral-bot doctor`). Uses only [`kv_cache`](crate::kv_cache)
//! (a leaf); pure over any `Read + Seek`, bounded by the file's length so a corrupt count
//! cannot make it allocate or loop without end.
//!
//! Format (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>), little-endian:
//! magic `GGUF`, version u32 (2 or 3), tensor count u64, metadata count u64; each metadata
//! entry is a string key, a u32 type and a value; each tensor entry a string name, u32
//! dimension count, u64 dimensions, u32 ggml type and u64 offset. Strings are a u64 length
//! and UTF-8 bytes.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};

use crate::kv_cache::{CacheType, KvShape};

/// The longest string value kept (longer ones, e.g. a chat template, are kept cut).
const MAX_KEPT_STRING: usize = 64 * 1024;
/// The longest key accepted.
const MAX_KEY: u64 = 64 * 1024;
/// The most dimensions a tensor may have (ggml has 4).
const MAX_DIMS: u32 = 8;

/// Why a file's header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Reading failed (or the file ended inside the header).
    #[error("reading the header: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (it does not start with the GGUF magic bytes)")]
    NotGguf,
    /// A version this reader does not know.
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// The header contradicts itself or the file's length.
    #[error("corrupt header: {0}")]
    Corrupt(&'static str),
}

/// A scalar metadata value (arrays are skipped, only their length kept).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any integer type.
    Int(i128),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string (cut at 64 KiB).
    Str(String),
    /// An array: its element count.
    Array(u64),
}

/// One tensor's shape and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Its dimensions.
    pub dims: Vec<u64>,
    /// Its ggml type id.
    pub ggml_type: u32,
}

/// What the header says.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// The format version.
    pub version: u32,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor table.
    pub tensors: Vec<TensorInfo>,
}

impl GgufHeader {
    /// An integer value, if `key` holds one that fits a `u64`.
    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key)? {
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// A string value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key)? {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// `general.architecture` (`llama`, `gemma3`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.str("general.architecture")
    }

    /// An architecture-scoped integer, e.g. `context_length` → `llama.context_length`.
    pub fn arch_uint(&self, key: &str) -> Option<u64> {
        self.uint(&format!("{}.{key}", self.architecture()?))
    }

    /// The number of weights: the sum of every tensor's element count.
    pub fn parameters(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.dims.iter().fold(1u64, |n, d| n.saturating_mul(*d)))
            .fold(0u64, u64::saturating_add)
    }

    /// The quantization named by `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn quantization(&self) -> Option<&'static str> {
        file_type_name(self.uint("general.file_type")?)
    }

    /// The shape of the model's KV cache (layers, KV heads, key and value sizes); its bytes
    /// per token under given cache types are [`KvShape::bytes_per_token`]. `None` when the
    /// header lacks the shapes.
    pub fn kv_shape(&self) -> Option<KvShape> {
        let layers = self.arch_uint("block_count")?;
        let width = self.arch_uint("embedding_length")?;
        let heads = self.arch_uint("attention.head_count").filter(|h| *h > 0)?;
        let kv_heads = self.arch_uint("attention.head_count_kv").unwrap_or(heads);
        let key = self
            .arch_uint("attention.key_length")
            .unwrap_or(width / heads);
        let value = self
            .arch_uint("attention.value_length")
            .unwrap_or(width / heads);
        Some(KvShape {
            layers,
            kv_heads,
            key_length: key,
            value_length: value,
        })
    }
    /// KV-cache bytes per token of context with these cache types
    /// ([`KvShape::bytes_per_token`]); `None` when the header lacks the shapes.
    pub fn kv_bytes_per_token(&self, type_k: CacheType, type_v: CacheType) -> Option<u64> {
        self.kv_shape()
            .map(|shape| shape.bytes_per_token(type_k, type_v))
    }
}

/// llama.cpp's `llama_ftype` names (include/llama.h).
fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Reads the header of the GGUF file `reader`, which is `len` bytes long.
pub fn read_header<R: Read + Seek>(reader: &mut R, len: u64) -> Result<GgufHeader, GgufError> {
    let mut cursor = Cursor { reader, len };
    let mut magic = [0u8; 4];
    cursor.exact(&mut magic).map_err(|_| GgufError::NotGguf)?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf);
    }
    let version = cursor.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = cursor.u64()?;
    let kv_count = cursor.u64()?;
    // Each entry takes at least 12 (metadata) or 24 (tensor) bytes.
    let room = cursor.remaining()?;
    if kv_count > room / 12 || tensor_count > room / 24 {
        return Err(GgufError::Corrupt("more entries than the file can hold"));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = cursor.string(MAX_KEY)?;
        let kind = cursor.u32()?;
        let value = cursor.value(kind)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let name = cursor.string(MAX_KEY)?;
        let n_dims = cursor.u32()?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt("a tensor with too many dimensions"));
        }
        let dims = (0..n_dims)
            .map(|_| cursor.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = cursor.u32()?;
        let _offset = cursor.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
    })
}

struct Cursor<'a, R> {
    reader: &'a mut R,
    len: u64,
}

impl<R: Read + Seek> Cursor<'_, R> {
    fn exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.reader.read_exact(buf)
    }

    fn remaining(&mut self) -> Result<u64, GgufError> {
        Ok(self.len.saturating_sub(self.reader.stream_position()?))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Skips `n` bytes, which must be in the file.
    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        if n > self.remaining()? {
            return Err(GgufError::Corrupt("a value runs past the end of the file"));
        }
        let n = i64::try_from(n).map_err(|_| GgufError::Corrupt("a value too long"))?;
        self.reader.seek(SeekFrom::Current(n))?;
        Ok(())
    }

    /// A string of at most `max` bytes (longer: corrupt).
    fn string(&mut self, max: u64) -> Result<String, GgufError> {
        let n = self.u64()?;
        if n > max || n > self.remaining()? {
            return Err(GgufError::Corrupt("a string longer than allowed"));
        }
        let mut bytes = vec![0u8; usize::try_from(n).unwrap_or(0)];
        self.exact(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A string value: kept up to [`MAX_KEPT_STRING`] bytes, the rest skipped.
    fn long_string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        if n > self.remaining()? {
            return Err(GgufError::Corrupt("a string runs past the end of the file"));
        }
        let kept = n.min(MAX_KEPT_STRING as u64);
        let mut bytes = vec![0u8; usize::try_from(kept).unwrap_or(0)];
        self.exact(&mut bytes)?;
        self.skip(n - kept)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn value(&mut self, kind: u32) -> Result<MetaValue, GgufError> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut wide = [0u8; 16];
            wide[..b.len()].copy_from_slice(b);
            if signed && b.last().is_some_and(|last| last & 0x80 != 0) {
                wide[b.len()..].fill(0xff);
            }
            i128::from_le_bytes(wide)
        };
        let mut read = |n: usize| -> Result<Vec<u8>, GgufError> {
            let mut b = vec![0u8; n];
            self.exact(&mut b)?;
            Ok(b)
        };
        Ok(match kind {
            0 => MetaValue::Int(int(&read(1)?, false)),
            1 => MetaValue::Int(int(&read(1)?, true)),
            2 => MetaValue::Int(int(&read(2)?, false)),
            3 => MetaValue::Int(int(&read(2)?, true)),
            4 => MetaValue::Int(int(&read(4)?, false)),
            5 => MetaValue::Int(int(&read(4)?, true)),
            6 => {
                let b = read(4)?;
                MetaValue::Float(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            7 => MetaValue::Bool(read(1)?[0] != 0),
            8 => MetaValue::Str(self.long_string()?),
            9 => {
                let element = self.u32()?;
                let count = self.u64()?;
                self.skip_array(element, count)?;
                MetaValue::Array(count)
            }
            10 => MetaValue::Int(int(&read(8)?, false)),
            11 => MetaValue::Int(int(&read(8)?, true)),
            12 => {
                let b = read(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                MetaValue::Float(f64::from_le_bytes(a))
            }
            _ => return Err(GgufError::Corrupt("an unknown metadata type")),
        })
    }

    fn skip_array(&mut self, element: u32, count: u64) -> Result<(), GgufError> {
        let size: u64 = match element {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                // Strings: each at least its 8-byte length.
                if count > self.remaining()? / 8 {
                    return Err(GgufError::Corrupt("an array longer than the file"));
                }
                for _ in 0..count {
                    let n = self.u64()?;
                    self.skip(n)?;
                }
                return Ok(());
            }
            9 => return Err(GgufError::Corrupt("nested arrays are not supported")),
            _ => return Err(GgufError::Corrupt("an unknown array element type")),
        };
        let bytes = count
            .checked_mul(size)
            .ok_or(GgufError::Corrupt("an array longer than the file"))?;
        self.skip(bytes)
    }
}

/// Writes GGUF headers, for tests (here and in `tests/`).
pub mod write {
    /// A metadata value to write.
    #[derive(Debug, Clone)]
    pub enum Value {
        /// `u32`.
        U32(u32),
        /// `u64`.
        U64(u64),
        /// `i32`.
        I32(i32),
        /// `f32`.
        F32(f32),
        /// `bool`.
        Bool(bool),
        /// A string.
        Str(String),
        /// An array of strings.
        Strings(Vec<String>),
    }

    /// The shape metadata of Mistral 7B (llama architecture, Q4_K_M, 32 layers, width
    /// 4096, 32 heads, 8 KV heads, trained context 32768): 128 KiB of KV cache per token.
    pub fn mistral_7b_metadata() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::Str("llama".into())),
            ("general.file_type", Value::U32(15)),
            ("llama.context_length", Value::U32(32768)),
            ("llama.block_count", Value::U32(32)),
            ("llama.embedding_length", Value::U32(4096)),
            ("llama.attention.head_count", Value::U32(32)),
            ("llama.attention.head_count_kv", Value::U32(8)),
        ]
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A GGUF v3 header with `metadata` and `tensors` (name, dims, ggml type).
    pub fn header(metadata: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            string(&mut out, key);
            match value {
                Value::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::I32(v) => {
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bool(v) => {
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.push(u8::from(*v));
                }
                Value::Str(v) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut out, v);
                }
                Value::Strings(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for item in items {
                        string(&mut out, item);
                    }
                }
                Value::U64(v) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        for (name, dims, ggml_type) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ggml_type.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor as IoCursor;

    use proptest::prelude::*;

    use super::write::{Value, header};
    use super::*;

    fn read(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        read_header(&mut IoCursor::new(bytes), bytes.len() as u64)
    }

    fn mistral_7b_like() -> Vec<u8> {
        let mut metadata = super::write::mistral_7b_metadata();
        metadata.push((
            "tokenizer.ggml.tokens",
            Value::Strings(vec!["<s>".into(), "a".into()]),
        ));
        metadata.push(("general.name", Value::Str("Mistral".into())));
        header(
            &metadata,
            &[
                ("token_embd.weight", vec![4096, 32768], 12),
                ("output_norm.weight", vec![4096], 0),
            ],
        )
    }

    #[test]
    fn reads_shapes_quantization_and_kv_size() {
        let h = read(&mistral_7b_like()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.quantization(), Some("Q4_K_M"));
        assert_eq!(h.arch_uint("context_length"), Some(32768));
        assert_eq!(h.parameters(), 4096 * 32768 + 4096);
        assert_eq!(h.metadata["tokenizer.ggml.tokens"], MetaValue::Array(2));
        // The design's figure: Mistral 7B at f16 is 128 KiB per token.
        let shape = h.kv_shape().unwrap();
        use crate::kv_cache::CacheType::{F16, Q8_0};
        assert_eq!(shape.bytes_per_token(F16, F16), 128 * 1024);
        assert_eq!(shape.bytes_per_token(Q8_0, Q8_0), 68 * 1024);
    }

    #[test]
    fn not_gguf_and_bad_versions_are_named() {
        assert!(matches!(read(b"this is text"), Err(GgufError::NotGguf)));
        assert!(matches!(read(b"GG"), Err(GgufError::NotGguf)));
        let mut v1 = mistral_7b_like();
        v1[4] = 1;
        assert!(matches!(read(&v1), Err(GgufError::Version(1))));
    }

    #[test]
    fn huge_counts_are_corrupt_not_allocations() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read(&bytes), Err(GgufError::Corrupt(_))));
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_header_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&bytes);
        }

        #[test]
        fn any_cut_or_bit_flip_of_a_valid_header_never_panics(cut in 0usize..400, flip in 0usize..400, bit in 0u8..8) {
            let mut bytes = mistral_7b_like();
            if let Some(b) = bytes.get_mut(flip) {
                *b ^= 1 << bit;
            }
            bytes.truncate(cut);
            let _ = read(&bytes);
        }

        #[test]
        fn written_metadata_reads_back(
            values in proptest::collection::btree_map("[a-y.]{1,12}", any::<u32>(), 0..12),
            name in "\\PC{0,40}",
        ) {
            let mut metadata: Vec<(&str, Value)> =
                values.iter().map(|(k, v)| (k.as_str(), Value::U32(*v))).collect();
            metadata.push(("zz.name", Value::Str(name.clone())));
            let h = read(&header(&metadata, &[])).unwrap();
            for (k, v) in &values {
                prop_assert_eq!(h.uint(k), Some(u64::from(*v)));
            }
            prop_assert_eq!(h.str("zz.name"), Some(name.as_str()));
        }
    }
}
