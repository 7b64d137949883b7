//! The park file format: one parked sequence per file under `--data-dir/kv/`. Pure.
//!
//! ```text
//! magic    8 bytes  "MBKVPRK1"
//! version  u32 LE   1
//! model    16 bytes the model identity (see `ParkKey`)
//! context  u64 LE   the context settings that shape the state
//! n_tokens u32 LE
//! state    u64 LE   length of the llama.cpp state blob
//! tokens   n_tokens × i32 LE: the exact tokens the state holds, position by position
//! state    the llama.cpp sequence state (`llama_state_seq_get_data`)
//! checksum u64 LE   XXH3-64 of every byte before it
//! ```
//!
//! The header (everything up to the state) is read at start-up to rebuild the index; the
//! checksum is verified when a file is read back to be restored. Any mismatch is an error,
//! never a guess: a wrong state would give a wrong answer.

use xxhash_rust::xxh3::Xxh3;

/// The first bytes of every park file.
pub const MAGIC: &[u8; 8] = b"MBKVPRK1";
/// The format version written.
pub const VERSION: u32 = 1;
/// Bytes before the tokens.
pub const HEADER_LEN: usize = 8 + 4 + 16 + 8 + 4 + 8;
/// Bytes after the state.
pub const TRAILER_LEN: usize = 8;
/// More tokens than any context window; a header claiming more is corrupt.
pub const MAX_TOKENS: u32 = 1 << 24;

/// What a parked state belongs to: it restores only into an engine with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParkKey {
    /// The model file's identity (size, header, sampled weights).
    pub model: u128,
    /// The context settings that change the state's layout.
    pub context: u64,
}

/// The fixed part of a park file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Whose state it is.
    pub key: ParkKey,
    /// Tokens stored after the header.
    pub n_tokens: u32,
    /// Length of the state blob.
    pub state_len: u64,
}

impl FileHeader {
    /// The length the whole file must have.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + 4 * u64::from(self.n_tokens) + self.state_len + TRAILER_LEN as u64
    }

    /// Bytes of the header and the tokens: what start-up reads.
    pub fn prefix_len(&self) -> usize {
        HEADER_LEN + 4 * self.n_tokens as usize
    }
}

/// Why a park file was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// Shorter than its header says.
    #[error("truncated ({actual} bytes, expected {expected})")]
    Truncated {
        /// Bytes found.
        actual: u64,
        /// Bytes the header promises.
        expected: u64,
    },
    /// Longer than its header says.
    #[error("trailing bytes ({actual} bytes, expected {expected})")]
    TooLong {
        /// Bytes found.
        actual: u64,
        /// Bytes the header promises.
        expected: u64,
    },
    /// Not a park file.
    #[error("not a park file (bad magic)")]
    BadMagic,
    /// Written by another version of the format.
    #[error("park format version {0} is not supported")]
    Version(u32),
    /// A header that cannot be right.
    #[error("corrupt header ({0} tokens)")]
    BadHeader(u32),
    /// The checksum does not match the contents.
    #[error("checksum mismatch")]
    Checksum,
}

/// The header and token bytes of a file holding `tokens` and a state of `state_len` bytes.
pub fn encode_prefix(key: ParkKey, tokens: &[i32], state_len: u64) -> Vec<u8> {
    let n_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + 4 * tokens.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.model.to_le_bytes());
    out.extend_from_slice(&key.context.to_le_bytes());
    out.extend_from_slice(&n_tokens.to_le_bytes());
    out.extend_from_slice(&state_len.to_le_bytes());
    for token in tokens {
        out.extend_from_slice(&token.to_le_bytes());
    }
    out
}

/// The checksum trailer for a file made of `prefix` then `state`.
pub fn checksum(prefix: &[u8], state: &[u8]) -> [u8; 8] {
    let mut hasher = Xxh3::new();
    hasher.update(prefix);
    hasher.update(state);
    hasher.digest().to_le_bytes()
}

/// A whole park file in memory (for tests and small states; the disk thread streams).
pub fn encode(key: ParkKey, tokens: &[i32], state: &[u8]) -> Vec<u8> {
    let mut out = encode_prefix(key, tokens, state.len() as u64);
    let sum = checksum(&out, state);
    out.extend_from_slice(state);
    out.extend_from_slice(&sum);
    out
}

/// Reads the fixed header from the first [`HEADER_LEN`] bytes of a file.
pub fn decode_header(bytes: &[u8]) -> Result<FileHeader, FileError> {
    let truncated = || FileError::Truncated {
        actual: bytes.len() as u64,
        expected: HEADER_LEN as u64,
    };
    let header = bytes.get(..HEADER_LEN).ok_or_else(truncated)?;
    let (magic, rest) = header.split_at(8);
    if magic != MAGIC {
        return Err(FileError::BadMagic);
    }
    let mut reader = Reader(rest);
    let version = reader.u32();
    if version != VERSION {
        return Err(FileError::Version(version));
    }
    let model = reader.u128();
    let context = reader.u64();
    let n_tokens = reader.u32();
    let state_len = reader.u64();
    if n_tokens > MAX_TOKENS || state_len > u64::MAX / 2 {
        return Err(FileError::BadHeader(n_tokens));
    }
    Ok(FileHeader {
        key: ParkKey { model, context },
        n_tokens,
        state_len,
    })
}

/// Reads the header and the tokens from the start of a file whose full length is
/// `file_len` (checked against the header: a truncated file is refused here).
pub fn decode_prefix(bytes: &[u8], file_len: u64) -> Result<(FileHeader, Vec<i32>), FileError> {
    let header = decode_header(bytes)?;
    let expected = header.file_len();
    if file_len < expected {
        return Err(FileError::Truncated {
            actual: file_len,
            expected,
        });
    }
    if file_len > expected {
        return Err(FileError::TooLong {
            actual: file_len,
            expected,
        });
    }
    let token_bytes = bytes
        .get(HEADER_LEN..header.prefix_len())
        .ok_or(FileError::Truncated {
            actual: bytes.len() as u64,
            expected: header.prefix_len() as u64,
        })?;
    let tokens = token_bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((header, tokens))
}

/// A whole file, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Whose state it is.
    pub key: ParkKey,
    /// The tokens the state holds.
    pub tokens: Vec<i32>,
    /// The llama.cpp state blob.
    pub state: Vec<u8>,
}

/// Decodes and verifies a whole file. Consumes the buffer so the state is not copied.
pub fn decode(mut bytes: Vec<u8>) -> Result<Decoded, FileError> {
    let (header, tokens) = decode_prefix(&bytes, bytes.len() as u64)?;
    let prefix_len = header.prefix_len();
    let body_end = bytes.len() - TRAILER_LEN;
    let (body, trailer) = bytes.split_at(body_end);
    let (prefix, state) = body.split_at(prefix_len);
    if checksum(prefix, state) != trailer {
        return Err(FileError::Checksum);
    }
    bytes.truncate(body_end);
    let state = bytes.split_off(prefix_len);
    Ok(Decoded {
        key: header.key,
        tokens,
        state,
    })
}

/// Little-endian fields from a slice already checked to be long enough.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: ParkKey = ParkKey {
        model: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        context: 42,
    };

    #[test]
    fn a_file_round_trips() {
        let bytes = encode(KEY, &[1, -2, 300_000], b"state bytes");
        let (header, tokens) = decode_prefix(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(header.key, KEY);
        assert_eq!(header.file_len(), bytes.len() as u64);
        assert_eq!(tokens, vec![1, -2, 300_000]);
        let decoded = decode(bytes).unwrap();
        assert_eq!(decoded.state, b"state bytes");
        assert_eq!(decoded.tokens, vec![1, -2, 300_000]);
    }

    #[test]
    fn a_truncated_file_is_refused_by_its_length() {
        let bytes = encode(KEY, &[1, 2, 3], &[7; 100]);
        let short = bytes[..bytes.len() - 1].to_vec();
        assert!(matches!(
            decode_prefix(&short, short.len() as u64),
            Err(FileError::Truncated { .. })
        ));
        assert!(matches!(decode(short), Err(FileError::Truncated { .. })));
    }

    #[test]
    fn a_flipped_state_byte_fails_the_checksum() {
        let mut bytes = encode(KEY, &[1, 2, 3], &[7; 100]);
        bytes[HEADER_LEN + 12 + 50] ^= 1;
        assert_eq!(decode(bytes), Err(FileError::Checksum));
    }

    #[test]
    fn other_formats_are_refused() {
        let mut bytes = encode(KEY, &[1], &[1]);
        bytes[8] = 9;
        assert_eq!(decode(bytes.clone()), Err(FileError::Version(9)));
        bytes[0] = b'X';
        assert_eq!(decode(bytes), Err(FileError::BadMagic));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_header(&bytes);
            let _ = decode_prefix(&bytes, bytes.len() as u64);
            let _ = decode(bytes);
        }

        #[test]
        fn corrupting_a_valid_file_never_panics_and_never_passes_unnoticed(
            tokens in proptest::collection::vec(any::<i32>(), 0..40),
            state in proptest::collection::vec(any::<u8>(), 0..200),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = encode(KEY, &tokens, &state);
            let decoded = decode(bytes.clone()).unwrap();
            prop_assert_eq!(&decoded.tokens, &tokens);
            prop_assert_eq!(&decoded.state, &state);

            let mut flipped = bytes.clone();
            let i = position.index(flipped.len());
            flipped[i] ^= flip;
            prop_assert!(decode(flipped).is_err());

            let cut = cut.index(bytes.len());
            prop_assert!(decode(bytes[..cut].to_vec()).is_err());
        }
    }
}
