//! The state file: a versioned, checksummed envelope around a serde payload.
//!
//! Layout (all integers little-endian):
//!
//! | offset    | size | field                                             |
//! |-----------|------|---------------------------------------------------|
//! | 0         | 8    | magic `b"MVMSTATE"`                               |
//! | 8         | 4    | format version (u32, currently 1)                 |
//! | 12        | 1    | length `n` of the minivmm version string (u8)     |
//! | 13        | n    | minivmm version, UTF-8                            |
//! | 13+n      | 8    | payload length (u64)                              |
//! | 21+n      | 4    | CRC-32 (IEEE) of the payload                      |
//! | 25+n      | 4    | CRC-32 (IEEE) of bytes `0 .. 25+n`                |
//! | 29+n      | len  | payload, encoded with postcard                    |
//!
//! Reading checks, in order: short file, magic, format version, header
//! checksum, payload length, payload checksum, decode.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::durable;
use crate::MINIVMM_VERSION;

/// Magic bytes that open every state file.
pub const STATE_MAGIC: [u8; 8] = *b"MVMSTATE";
/// Format version written by this build, and the only one it reads.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// Magic, format version and version-string length.
const PREFIX_LEN: usize = 8 + 4 + 1;
/// Payload length, payload CRC and header CRC, after the version string.
const SUFFIX_LEN: usize = 8 + 4 + 4;
/// Label used in errors for buffers that did not come from a file.
const IN_MEMORY: &str = "<in-memory>";

// The version string's length is stored in one byte.
const _: () = assert!(MINIVMM_VERSION.len() <= u8::MAX as usize);

/// The validated header of a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHeader {
    /// Format version of the envelope.
    pub format_version: u32,
    /// minivmm version that wrote the file.
    pub minivmm_version: String,
    /// Length of the payload in bytes.
    pub payload_len: u64,
    /// CRC-32 of the payload.
    pub payload_crc32: u32,
}

/// Why a state file could not be written, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O operation on the file failed.
    #[error("cannot {op} state file {}: {source}", .path.display())]
    Io {
        /// What was being done: "open", "write", "rename", ...
        op: &'static str,
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The file ends before its header does.
    #[error("state file {} is truncated: {len} bytes, the header needs {needed}", .path.display())]
    Truncated {
        /// File at fault.
        path: PathBuf,
        /// Bytes present.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// The file does not start with [`STATE_MAGIC`].
    #[error("{} is not a minivmm state file (magic {found:02x?})", .path.display())]
    BadMagic {
        /// File at fault.
        path: PathBuf,
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The envelope's format version is not the one this build reads.
    #[error(
        "state file {} has format version {found}, this minivmm supports version {supported}",
        .path.display()
    )]
    UnsupportedVersion {
        /// File at fault.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The header's CRC does not match its bytes.
    #[error(
        "state file {} header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}",
        .path.display()
    )]
    HeaderChecksum {
        /// File at fault.
        path: PathBuf,
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the header bytes read.
        computed: u32,
    },
    /// The payload is not as long as the header says.
    #[error(
        "state file {} payload length mismatch: expected {expected} bytes, found {actual}",
        .path.display()
    )]
    LengthMismatch {
        /// File at fault.
        path: PathBuf,
        /// Length recorded in the header.
        expected: u64,
        /// Bytes present after the header.
        actual: u64,
    },
    /// The payload's CRC does not match its bytes.
    #[error(
        "state file {} payload checksum mismatch: stored {stored:#010x}, computed {computed:#010x}",
        .path.display()
    )]
    PayloadChecksum {
        /// File at fault.
        path: PathBuf,
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the payload bytes read.
        computed: u32,
    },
    /// The payload is intact but is not a valid encoding of the requested type.
    #[error("cannot decode state file {}: {message}", .path.display())]
    Decode {
        /// File at fault.
        path: PathBuf,
        /// Codec's description of the problem.
        message: String,
    },
    /// The value could not be encoded.
    #[error("cannot encode state for {}: {message}", .path.display())]
    Encode {
        /// File being written.
        path: PathBuf,
        /// Codec's description of the problem.
        message: String,
    },
}

/// Encodes `value` into a complete state file image.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StateError> {
    encode_for(value, Path::new(IN_MEMORY))
}

/// Decodes a complete state file image, validating it first.
pub fn decode<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    decode_from(bytes, Path::new(IN_MEMORY))
}

/// Validates a state file image (header, length, payload checksum) without
/// decoding the payload.
pub fn check(bytes: &[u8]) -> Result<StateHeader, StateError> {
    parse(bytes, Path::new(IN_MEMORY)).map(|(header, _)| header)
}

/// Writes `value` to `path` atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory.
pub fn write_state<T: Serialize + ?Sized>(
    path: impl AsRef<Path>,
    value: &T,
) -> Result<(), StateError> {
    let path = path.as_ref();
    let bytes = encode_for(value, path)?;
    let tmp = temporary_path(path);
    if let Err(e) = durable::write_synced(&tmp, &bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write", &tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("rename", path, e));
    }
    durable::sync_parent_dir(path).map_err(|e| io_error("sync directory of", path, e))
}

/// Reads, validates and decodes the state file at `path`.
pub fn read_state<T: Serialize + DeserializeOwned>(
    path: impl AsRef<Path>,
) -> Result<T, StateError> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    decode_from(&bytes, path)
}

/// Validates the state file at `path` without decoding its payload.
pub fn check_state_file(path: impl AsRef<Path>) -> Result<StateHeader, StateError> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    parse(&bytes, path).map(|(header, _)| header)
}

/// Writes `value` to exactly `path` and fsyncs it, leaving the rename to the
/// caller (the template commit).
pub(crate) fn write_state_synced<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> Result<(), StateError> {
    let bytes = encode_for(value, path)?;
    durable::write_synced(path, &bytes).map_err(|e| io_error("write", path, e))
}

/// [`decode`] with errors naming `path`. The payload must be the value's
/// canonical encoding: some decoders are lenient (kvm-bindings' KVM structures
/// accept byte strings of any length, zero-filling or cutting them), so a
/// payload that decodes but does not encode back to itself is refused rather
/// than restored as something the writer never saved.
pub(crate) fn decode_from<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
) -> Result<T, StateError> {
    let (_, payload) = parse(bytes, path)?;
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| StateError::Decode {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(StateError::Decode {
            path: path.to_owned(),
            message: format!("{} trailing bytes after the value", rest.len()),
        });
    }
    let canonical = postcard::to_allocvec(&value).map_err(|e| StateError::Decode {
        path: path.to_owned(),
        message: format!("decoded value does not encode again: {e}"),
    })?;
    if let Some(at) = canonical
        .iter()
        .zip(payload)
        .position(|(a, b)| a != b)
        .or((canonical.len() != payload.len()).then_some(canonical.len().min(payload.len())))
    {
        return Err(StateError::Decode {
            path: path.to_owned(),
            message: format!(
                "payload is not the canonical encoding of its value (differs from payload byte {at} on: a field of the wrong size?)"
            ),
        });
    }
    Ok(value)
}

/// [`check`] with errors naming `path`.
pub(crate) fn check_from(bytes: &[u8], path: &Path) -> Result<StateHeader, StateError> {
    parse(bytes, path).map(|(header, _)| header)
}

fn encode_for<T: Serialize + ?Sized>(value: &T, path: &Path) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_allocvec(value).map_err(|e| StateError::Encode {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let version = MINIVMM_VERSION.as_bytes();
    let mut out = Vec::with_capacity(PREFIX_LEN + version.len() + SUFFIX_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    out.push(version.len() as u8);
    out.extend_from_slice(version);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validates the envelope and returns the header and the payload bytes.
fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(StateHeader, &'a [u8]), StateError> {
    let truncated = |needed: usize| StateError::Truncated {
        path: path.to_owned(),
        len: bytes.len() as u64,
        needed: needed as u64,
    };
    let mut reader = Reader { bytes, pos: 0 };
    if bytes.len() < PREFIX_LEN {
        return Err(truncated(PREFIX_LEN));
    }

    let magic: [u8; 8] = reader.array().ok_or_else(|| truncated(PREFIX_LEN))?;
    if magic != STATE_MAGIC {
        return Err(StateError::BadMagic {
            path: path.to_owned(),
            found: magic,
        });
    }
    let format_version = u32::from_le_bytes(reader.array().ok_or_else(|| truncated(PREFIX_LEN))?);
    if format_version != STATE_FORMAT_VERSION {
        return Err(StateError::UnsupportedVersion {
            path: path.to_owned(),
            found: format_version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    let [version_len] = reader.array().ok_or_else(|| truncated(PREFIX_LEN))?;
    let header_len = PREFIX_LEN + usize::from(version_len) + SUFFIX_LEN;
    if bytes.len() < header_len {
        return Err(truncated(header_len));
    }
    let version = reader
        .slice(usize::from(version_len))
        .ok_or_else(|| truncated(header_len))?;
    let payload_len = u64::from_le_bytes(reader.array().ok_or_else(|| truncated(header_len))?);
    let payload_crc32 = u32::from_le_bytes(reader.array().ok_or_else(|| truncated(header_len))?);
    let checked_len = reader.pos;
    let stored_header_crc =
        u32::from_le_bytes(reader.array().ok_or_else(|| truncated(header_len))?);
    let computed_header_crc = crc32fast::hash(&bytes[..checked_len]);
    if stored_header_crc != computed_header_crc {
        return Err(StateError::HeaderChecksum {
            path: path.to_owned(),
            stored: stored_header_crc,
            computed: computed_header_crc,
        });
    }

    let payload = reader.rest();
    if payload.len() as u64 != payload_len {
        return Err(StateError::LengthMismatch {
            path: path.to_owned(),
            expected: payload_len,
            actual: payload.len() as u64,
        });
    }
    let computed_payload_crc = crc32fast::hash(payload);
    if computed_payload_crc != payload_crc32 {
        return Err(StateError::PayloadChecksum {
            path: path.to_owned(),
            stored: payload_crc32,
            computed: computed_payload_crc,
        });
    }
    let header = StateHeader {
        format_version,
        minivmm_version: String::from_utf8_lossy(version).into_owned(),
        payload_len,
        payload_crc32,
    };
    Ok((header, payload))
}

/// Bounds-checked forward reader over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn slice(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.slice(N)?.try_into().ok()
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }
}

/// `<dir>/<name>.tmp`: same directory, so the rename is atomic.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use vmm_sys_util::tempdir::TempDir;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum DeviceState {
        Serial { ier: u8, lcr: u8 },
        Rng { activated: bool },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct VmState {
        vcpus: Vec<[u64; 4]>,
        clock_ns: u64,
        label: String,
        devices: Vec<DeviceState>,
    }

    fn sample() -> VmState {
        VmState {
            vcpus: vec![[1, 2, 3, u64::MAX], [0, 0x1000, 0x2000, 7]],
            clock_ns: 123_456_789,
            label: "template-a".into(),
            devices: vec![
                DeviceState::Serial { ier: 1, lcr: 3 },
                DeviceState::Rng { activated: true },
            ],
        }
    }

    fn header_len() -> usize {
        PREFIX_LEN + MINIVMM_VERSION.len() + SUFFIX_LEN
    }

    #[test]
    fn round_trip_in_memory() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<VmState>(&bytes).unwrap(), sample());
    }

    #[test]
    fn round_trip_through_a_file_leaves_no_temporary() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write_state(&path, &sample()).unwrap();
        assert_eq!(read_state::<VmState>(&path).unwrap(), sample());
        write_state(&path, &42u32).unwrap();
        assert_eq!(read_state::<u32>(&path).unwrap(), 42);
        let names: Vec<_> = fs::read_dir(dir.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("state")]);
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = encode(&sample()).unwrap();
        let n = MINIVMM_VERSION.len();
        assert_eq!(&bytes[0..8], b"MVMSTATE");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(usize::from(bytes[12]), n);
        assert_eq!(&bytes[13..13 + n], MINIVMM_VERSION.as_bytes());
        let payload = &bytes[header_len()..];
        assert_eq!(bytes[13 + n..21 + n], (payload.len() as u64).to_le_bytes());
        assert_eq!(
            bytes[21 + n..25 + n],
            crc32fast::hash(payload).to_le_bytes()
        );
        assert_eq!(
            bytes[25 + n..29 + n],
            crc32fast::hash(&bytes[..25 + n]).to_le_bytes()
        );
        let header = check(&bytes).unwrap();
        assert_eq!(header.minivmm_version, MINIVMM_VERSION);
        assert_eq!(header.payload_len, payload.len() as u64);
    }

    /// Writes `bytes` as a state file and returns the error reading it gives,
    /// checking that the error names the file.
    fn read_error(bytes: &[u8]) -> StateError {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, bytes).unwrap();
        let err = read_state::<VmState>(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        err
    }

    #[test]
    fn short_file_is_truncated() {
        let err = read_error(b"MVMST");
        assert!(
            matches!(
                err,
                StateError::Truncated {
                    len: 5,
                    needed: 13,
                    ..
                }
            ),
            "{err}"
        );
        let bytes = encode(&sample()).unwrap();
        let err = read_error(&bytes[..header_len() - 1]);
        assert!(matches!(err, StateError::Truncated { .. }), "{err}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0..8].copy_from_slice(b"QEVMSTAT");
        assert!(matches!(read_error(&bytes), StateError::BadMagic { .. }));
    }

    #[test]
    fn unsupported_version_says_found_and_supported() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let err = read_error(&bytes);
        assert!(matches!(
            err,
            StateError::UnsupportedVersion {
                found: 7,
                supported: 1,
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("version 7") && text.contains("supports version 1"),
            "{text}"
        );
    }

    #[test]
    fn corrupt_header_fails_header_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[13] ^= 0x20;
        assert!(matches!(
            read_error(&bytes),
            StateError::HeaderChecksum { .. }
        ));
    }

    #[test]
    fn extra_or_missing_payload_bytes_say_expected_and_actual() {
        let bytes = encode(&sample()).unwrap();
        let expected = (bytes.len() - header_len()) as u64;
        let mut longer = bytes.clone();
        longer.push(0);
        let err = read_error(&longer);
        assert!(
            matches!(err, StateError::LengthMismatch { expected: e, actual: a, .. } if e == expected && a == expected + 1)
        );
        let err = read_error(&bytes[..bytes.len() - 1]);
        assert!(matches!(err, StateError::LengthMismatch { actual: a, .. } if a == expected - 1));
        assert!(
            err.to_string()
                .contains(&format!("expected {expected} bytes")),
            "{err}"
        );
    }

    #[test]
    fn corrupt_payload_fails_payload_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            read_error(&bytes),
            StateError::PayloadChecksum { .. }
        ));
    }

    #[test]
    fn intact_payload_of_another_type_fails_decode() {
        // A varint whose continuation bit never ends: intact envelope, bad value.
        let bytes = encode(&[0xffu8, 0xff, 0xff]).unwrap();
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(StateError::Decode { .. })
        ));
        let bytes = encode(&(1u8, 2u8)).unwrap();
        assert!(matches!(
            decode::<u8>(&bytes),
            Err(StateError::Decode { .. })
        ));
        assert!(matches!(
            read_error(&encode(&1u8).unwrap()),
            StateError::Decode { .. }
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(
                decode::<VmState>(&bytes[..len]).is_err(),
                "truncated to {len}"
            );
            assert!(check(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= 1 << bit;
                assert!(decode::<VmState>(&corrupt).is_err(), "byte {i} bit {bit}");
                assert!(check(&corrupt).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn arbitrary_garbage_never_panics() {
        // Deterministic xorshift so the test is reproducible without a dependency.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bytes = encode(&sample()).unwrap();
            bytes.truncate((seed as usize) % (bytes.len() + 1));
            if round % 2 == 0 {
                bytes.extend(seed.to_le_bytes());
            }
            let _ = decode::<VmState>(&bytes);
        }
    }

    #[test]
    fn check_validates_without_knowing_the_type() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write_state(&path, &sample()).unwrap();
        let header = check_state_file(&path).unwrap();
        assert_eq!(header.format_version, STATE_FORMAT_VERSION);
        let err = check_state_file(dir.as_path().join("absent")).unwrap_err();
        assert!(matches!(err, StateError::Io { op: "read", .. }), "{err}");
    }
}
