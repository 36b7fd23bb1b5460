//! The device-state stream: the state blobs of one migration (the same
//! blobs GET_STATEBLOB hands QEMU, sealed pieces normally) laid end to end
//! for channels that carry one byte stream instead of typed blobs, such as
//! vhost-user's SET_DEVICE_STATE_FD.
//!
//! ```text
//! "VTPMDST1" | count: u32 BE | count × ( type: u32 BE | length: u32 BE | blob )
//! ```
//!
//! The framing carries no secrets and adds no protection of its own: each
//! blob is sealed and authenticated by [`crate::migration::piece`]. It only
//! has to refuse a stream it cannot split unambiguously.

use thiserror::Error;
use vtpm_common::reader::{ByteReader, Truncated};

pub const MAGIC: &[u8; 8] = b"VTPMDST1";
/// Blob types are the control channel's: 1 permanent, 2 volatile, 3 savestate.
pub const MAX_BLOBS: usize = 3;
/// Largest blob accepted (sealed pieces are a little larger than the
/// 512 KiB raw state limit).
pub const MAX_BLOB: usize = 1024 * 1024;
/// Largest stream accepted: a reader stops reading here.
pub const MAX_STREAM: usize = MAGIC.len() + 4 + MAX_BLOBS * (8 + MAX_BLOB);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("not a vtpmd device-state stream (bad magic)")]
    Magic,
    #[error("device-state stream is truncated ({0})")]
    Truncated(&'static str),
    #[error("device-state stream holds {0} blobs (at most {MAX_BLOBS})")]
    TooMany(u32),
    #[error("blob type {0} is not 1, 2 or 3")]
    BadType(u32),
    #[error("blob type {0} appears twice")]
    Duplicate(u32),
    #[error("blob of {0} bytes is over the {MAX_BLOB}-byte limit")]
    TooLarge(u32),
    #[error("{0} bytes follow the last blob")]
    Trailing(usize),
}

/// Lays `blobs` (type, bytes) out as a stream.
pub fn encode(blobs: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(MAGIC.len() + 4 + blobs.iter().map(|(_, b)| 8 + b.len()).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(blobs.len() as u32).to_be_bytes());
    for (ty, b) in blobs {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    out
}

impl From<Truncated> for StreamError {
    fn from(t: Truncated) -> Self {
        StreamError::Truncated(t.what)
    }
}

/// Splits a stream into its blobs, in stream order.
pub fn decode(s: &[u8]) -> Result<Vec<(u32, &[u8])>, StreamError> {
    let mut r = ByteReader::new(s);
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(StreamError::Magic);
    }
    let count = r.u32("blob count")?;
    if count as usize > MAX_BLOBS {
        return Err(StreamError::TooMany(count));
    }
    let mut out: Vec<(u32, &[u8])> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let ty = r.u32("blob type")?;
        if !(1..=MAX_BLOBS as u32).contains(&ty) {
            return Err(StreamError::BadType(ty));
        }
        if out.iter().any(|(t, _)| *t == ty) {
            return Err(StreamError::Duplicate(ty));
        }
        let len = r.u32("blob length")?;
        if len as usize > MAX_BLOB {
            return Err(StreamError::TooLarge(len));
        }
        out.push((ty, r.take(len as usize, "blob")?));
    }
    if !r.is_empty() {
        return Err(StreamError::Trailing(r.remaining()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&[(1, vec![1; 40]), (2, vec![2; 7]), (3, vec![])])
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let blobs = decode(&s).unwrap();
        assert_eq!(blobs.len(), 3);
        assert_eq!(blobs[0], (1, &[1u8; 40][..]));
        assert_eq!(blobs[1], (2, &[2u8; 7][..]));
        assert_eq!(blobs[2], (3, &[][..]));
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_is_refused() {
        let s = sample();
        for n in 0..s.len() {
            assert!(
                matches!(
                    decode(&s[..n]),
                    Err(StreamError::Truncated(_) | StreamError::Magic)
                ),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn garbage_and_oversized_input_is_refused() {
        assert_eq!(decode(b"VTPMMIG1\0\0\0\0"), Err(StreamError::Magic));
        assert_eq!(decode(&[0xff; 64]), Err(StreamError::Magic));
        let mut s = sample();
        s.push(0);
        assert_eq!(decode(&s), Err(StreamError::Trailing(1)));
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&4u32.to_be_bytes());
        assert_eq!(decode(&s), Err(StreamError::TooMany(4)));
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&s), Err(StreamError::TooMany(u32::MAX)));
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&1u32.to_be_bytes());
        s.extend_from_slice(&1u32.to_be_bytes());
        s.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&s), Err(StreamError::TooLarge(u32::MAX)));
        assert_eq!(
            decode(&encode(&[(4, vec![])])),
            Err(StreamError::BadType(4))
        );
        assert_eq!(
            decode(&encode(&[(0, vec![])])),
            Err(StreamError::BadType(0))
        );
        assert_eq!(
            decode(&encode(&[(1, vec![]), (1, vec![])])),
            Err(StreamError::Duplicate(1))
        );
    }
}
