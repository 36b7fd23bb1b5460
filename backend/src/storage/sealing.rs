//! At-rest encryption of state files (`--key`).
//!
//! The `--key` key (128 or 256 bits, see [`super::swtpm_key`]) is expanded
//! with HKDF-SHA256 into an AES-256 key and a separate HMAC-SHA256 key. A
//! sealed file is
//!
//! ```text
//! "VTPMSEAL" | u8 version (1) | u8 cipher (1 = AES-256-CBC + HMAC-SHA256)
//! | be16 name_len | name | iv[16] | be32 ct_len | ciphertext | hmac[32]
//! ```
//!
//! The HMAC covers every byte before it, header and blob name included, so a
//! file cannot be renamed (volatile state passed off as permanent), truncated,
//! or have its header edited without detection.

use super::swtpm_crypt::CryptError;
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use vtpm_common::aead::{AeadError, AeadKey, IV_LEN, TAG_LEN};
use vtpm_common::reader::{ByteReader, Truncated};
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"VTPMSEAL";
const VERSION: u8 = 1;
const CIPHER_AES256_CBC_HMAC_SHA256: u8 = 1;

#[derive(Debug, Error)]
pub enum SealError {
    #[error("sealed state file is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("sealed state file is truncated: {0}")]
    Truncated(#[from] Truncated),
    #[error("sealed state file has unsupported version {0} or cipher {1}")]
    Unsupported(u8, u8),
    #[error("sealed state file is for blob '{found}', expected '{expected}'")]
    WrongName { found: String, expected: String },
    #[error("state file authentication failed: wrong --key, or the file was modified")]
    BadMac,
    #[error("state file decrypted to invalid padding")]
    BadPadding,
    #[error("no random numbers from the OS")]
    Random,
    #[error("(swtpm's encrypted format) {0}")]
    Swtpm(#[from] CryptError),
}

/// The keys derived from the `--key` key (an [`AeadKey`]: zeroized when
/// dropped).
pub struct StateKey(AeadKey);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(<redacted>)")
    }
}

impl StateKey {
    /// Derives the encryption and MAC keys from the key material.
    pub fn from_master(master: &[u8]) -> StateKey {
        let hk = Hkdf::<Sha256>::new(Some(b"vtpmd state at rest v1"), master);
        let mut enc = Zeroizing::new([0u8; 32]);
        let mut mac = Zeroizing::new([0u8; 32]);
        // Expanding 32 bytes from SHA-256 HKDF cannot fail.
        hk.expand(b"aes-256-cbc", &mut enc[..])
            .expect("hkdf length");
        hk.expand(b"hmac-sha256", &mut mac[..])
            .expect("hkdf length");
        StateKey(AeadKey::from_parts(*enc, *mac))
    }

    /// Encrypts and authenticates `plain` as blob `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let (iv, ct) = self.0.encrypt(plain).map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(8 + 4 + name.len() + IV_LEN + 4 + ct.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(CIPHER_AES256_CBC_HMAC_SHA256);
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&(ct.len() as u32).to_be_bytes());
        out.extend_from_slice(&ct);
        let tag = self.0.tag(&[&out]);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Verifies and decrypts a sealed file that must belong to blob `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let p = parse(sealed)?;
        if p.version != VERSION || p.cipher != CIPHER_AES256_CBC_HMAC_SHA256 {
            return Err(SealError::Unsupported(p.version, p.cipher));
        }
        self.0
            .verify(&[&sealed[..p.body_len]], &sealed[p.body_len..])
            .map_err(|_| SealError::BadMac)?;
        if p.name != name.as_bytes() {
            return Err(SealError::WrongName {
                found: String::from_utf8_lossy(p.name).into_owned(),
                expected: name.into(),
            });
        }
        self.0.decrypt(&p.iv, p.ct).map_err(|e| match e {
            AeadError::BadPadding => SealError::BadPadding,
            _ => SealError::BadMac,
        })
    }
}

/// Whether `bytes` is a sealed file (so it needs `--key`).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

struct Parts<'a> {
    version: u8,
    cipher: u8,
    name: &'a [u8],
    iv: [u8; IV_LEN],
    ct: &'a [u8],
    /// Bytes under the MAC; the tag follows them.
    body_len: usize,
}

fn parse(b: &[u8]) -> Result<Parts<'_>, SealError> {
    if !is_sealed(b) {
        return Err(SealError::Malformed("magic"));
    }
    let mut r = ByteReader::new(b);
    r.take(MAGIC.len(), "magic")?;
    let version = r.u8("version")?;
    let cipher = r.u8("cipher")?;
    let name = r.bytes_u16("name")?;
    let iv = r.array("iv")?;
    let ct = r.bytes_u32("ciphertext")?;
    let body_len = r.position();
    if r.remaining() != TAG_LEN {
        return Err(SealError::Malformed("length"));
    }
    Ok(Parts {
        version,
        cipher,
        name,
        iv,
        ct,
        body_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StateKey {
        StateKey::from_master(&[b; 32])
    }

    #[test]
    fn round_trip() {
        let s = key(1).seal("permall", b"tpm state").unwrap();
        assert!(is_sealed(&s));
        assert_eq!(&key(1).open("permall", &s).unwrap()[..], b"tpm state");
        assert!(!s.windows(9).any(|w| w == b"tpm state"));
    }

    #[test]
    fn wrong_key_and_tampering_fail() {
        let s = key(1).seal("permall", &[7; 100]).unwrap();
        assert!(matches!(key(2).open("permall", &s), Err(SealError::BadMac)));
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x01;
            assert!(key(1).open("permall", &t).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn renamed_blob_fails() {
        let s = key(1).seal("volatilestate", b"v").unwrap();
        assert!(matches!(
            key(1).open("permall", &s),
            Err(SealError::WrongName { .. })
        ));
    }

    #[test]
    fn truncated_oversized_garbage() {
        let s = key(1).seal("permall", b"abc").unwrap();
        for n in 0..s.len() {
            assert!(key(1).open("permall", &s[..n]).is_err());
        }
        let mut long = s.clone();
        long.push(0);
        assert!(matches!(
            key(1).open("permall", &long),
            Err(SealError::Malformed(_))
        ));
        assert!(key(1).open("permall", b"VTPMSEAL\xff\xff\xff\xff").is_err());
    }
}
