//! swtpm's state-blob container: a 10-byte header followed by TLVs.
//!
//! vtpmd writes unencrypted state files and plain GET_STATEBLOB output in
//! exactly this layout, so a state directory or a migration stream can move
//! between swtpm and vtpmd in either direction.
//!
//! ```text
//! u8 version (2) | u8 min_version (1) | be16 hdrsize (10) | be16 flags | be32 totlen
//! then TLVs: be16 tag | be32 length | value[length]
//! ```

use thiserror::Error;
use vtpm_common::reader::{ByteReader, Truncated};

pub const HEADER_LEN: usize = 10;
const VERSION: u8 = 2;
const MIN_VERSION: u8 = 1;

/// The inner layer is encrypted with swtpm's state-file key.
pub const FLAG_ENCRYPTED: u16 = 0x01;
/// The blob is encrypted with swtpm's migration key.
pub const FLAG_MIGRATION_ENCRYPTED: u16 = 0x02;
/// Set on everything GET_STATEBLOB returns.
pub const FLAG_MIGRATION_DATA: u16 = 0x04;

pub const TAG_DATA: u16 = 1;
pub const TAG_MIGRATION_DATA: u16 = 4;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("blob is shorter than its header or a TLV says ({0})")]
    Truncated(&'static str),
    #[error("blob header size {0} is not 10")]
    BadHeaderSize(u16),
    #[error("blob needs format version {0}, this build reads up to 2")]
    BadVersion(u8),
    #[error("blob length field {field} does not match its {actual} bytes")]
    LengthMismatch { field: u32, actual: usize },
    #[error("blob is encrypted with a swtpm key (flags {0:#x}): give vtpmd the same key (--key for state files, --migration-key for migration blobs)")]
    SwtpmEncrypted(u16),
    #[error("blob holds no TPM state TLV")]
    NoData,
}

impl From<Truncated> for BlobError {
    fn from(t: Truncated) -> Self {
        BlobError::Truncated(t.what)
    }
}

pub(super) fn tlv(tag: u16, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

pub(super) fn with_header(flags: u16, payload: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(VERSION);
    out.push(MIN_VERSION);
    out.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&((HEADER_LEN + payload.len()) as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A state file as swtpm writes it without a key: header + TLV(DATA).
pub fn encode_file(state: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(6 + state.len());
    tlv(TAG_DATA, state, &mut p);
    with_header(0, p)
}

/// Plain GET_STATEBLOB output as swtpm sends it without a migration key:
/// header(MIGRATION_DATA) + TLV(MIGRATION_DATA, TLV(DATA, state)).
pub fn encode_migration(state: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(6 + state.len());
    tlv(TAG_DATA, state, &mut inner);
    let mut p = Vec::with_capacity(6 + inner.len());
    tlv(TAG_MIGRATION_DATA, &inner, &mut p);
    with_header(FLAG_MIGRATION_DATA, p)
}

/// Whether `bytes` starts like a swtpm blob header.
pub fn looks_like_blob(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[0] >= MIN_VERSION && bytes[2..4] == (HEADER_LEN as u16).to_be_bytes()
}

/// Iterates the TLVs of `p`, failing on any that runs past the end.
pub(super) fn tlvs(p: &[u8]) -> Result<Vec<(u16, &[u8])>, BlobError> {
    let mut r = ByteReader::new(p);
    let mut out = Vec::new();
    while !r.is_empty() {
        if r.remaining() < 6 {
            return Err(BlobError::Truncated("TLV header"));
        }
        let tag = r.u16("TLV header")?;
        out.push((tag, r.bytes_u32("TLV value")?));
    }
    Ok(out)
}

pub(super) fn find(list: &[(u16, &[u8])], tag: u16) -> Option<Vec<u8>> {
    list.iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, v)| v.to_vec())
}

/// Checks a blob's header; returns its flags and the TLVs after it.
pub(super) fn split_header(bytes: &[u8]) -> Result<(u16, &[u8]), BlobError> {
    let mut r = ByteReader::new(bytes);
    let _version = r.u8("header")?;
    let min_version = r.u8("header")?;
    let hdrsize = r.u16("header")?;
    let flags = r.u16("header")?;
    let totlen = r.u32("header")?;
    if min_version > VERSION {
        return Err(BlobError::BadVersion(min_version));
    }
    if usize::from(hdrsize) != HEADER_LEN {
        return Err(BlobError::BadHeaderSize(hdrsize));
    }
    if totlen as usize != bytes.len() {
        return Err(BlobError::LengthMismatch {
            field: totlen,
            actual: bytes.len(),
        });
    }
    Ok((flags, r.rest()))
}

/// Extracts the libtpms state from an unencrypted swtpm blob or state file.
pub fn decode_plain(bytes: &[u8]) -> Result<Vec<u8>, BlobError> {
    let (flags, payload) = split_header(bytes)?;
    if flags & (FLAG_ENCRYPTED | FLAG_MIGRATION_ENCRYPTED) != 0 {
        return Err(BlobError::SwtpmEncrypted(flags));
    }
    let outer = tlvs(payload)?;
    if let Some(data) = find(&outer, TAG_DATA) {
        return Ok(data);
    }
    let inner = find(&outer, TAG_MIGRATION_DATA).ok_or(BlobError::NoData)?;
    find(&tlvs(&inner)?, TAG_DATA).ok_or(BlobError::NoData)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip() {
        let f = encode_file(b"state");
        assert_eq!(&f[..6], &[2, 1, 0, 10, 0, 0]);
        assert_eq!(decode_plain(&f).unwrap(), b"state");
    }

    #[test]
    fn migration_layout_matches_swtpm() {
        let b = encode_migration(&[0xAB; 3]);
        // header, TLV4 of 9 bytes, TLV1 of 3 bytes
        assert_eq!(
            b,
            vec![
                2, 1, 0, 10, 0, 4, 0, 0, 0, 25, 0, 4, 0, 0, 0, 9, 0, 1, 0, 0, 0, 3, 0xAB, 0xAB,
                0xAB
            ]
        );
        assert_eq!(decode_plain(&b).unwrap(), vec![0xAB; 3]);
    }

    #[test]
    fn truncated_input_is_rejected_at_every_length() {
        let b = encode_migration(b"hello world");
        for n in 0..b.len() {
            assert!(decode_plain(&b[..n]).is_err(), "accepted {n} bytes");
        }
    }

    #[test]
    fn oversized_and_garbage_input() {
        let mut b = encode_file(b"x");
        b.push(0);
        assert!(matches!(
            decode_plain(&b),
            Err(BlobError::LengthMismatch { .. })
        ));
        assert!(decode_plain(&[0xff; 64]).is_err());
        let mut bad_tlv = encode_file(b"abc");
        bad_tlv[13] = 0xff; // TLV length runs past the end
        assert_eq!(
            decode_plain(&bad_tlv),
            Err(BlobError::Truncated("TLV value"))
        );
    }

    #[test]
    fn header_checks() {
        let mut b = encode_file(b"x");
        b[3] = 12;
        assert_eq!(decode_plain(&b), Err(BlobError::BadHeaderSize(12)));
        let mut b = encode_file(b"x");
        b[1] = 3;
        assert_eq!(decode_plain(&b), Err(BlobError::BadVersion(3)));
        let mut b = encode_file(b"x");
        b[5] = FLAG_ENCRYPTED as u8;
        assert_eq!(decode_plain(&b), Err(BlobError::SwtpmEncrypted(1)));
    }

    #[test]
    fn blob_without_data_tlv() {
        let b = with_header(0, vec![0, 9, 0, 0, 0, 0]);
        assert_eq!(decode_plain(&b), Err(BlobError::NoData));
    }
}
