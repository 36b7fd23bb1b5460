//! Key material given the way swtpm 0.7.1 takes it (`--key`,
//! `--migration-key`): a key file, hex or binary, or a passphrase run
//! through a KDF, for AES-128-CBC or AES-256-CBC.
//!
//! ```text
//!  file=/fd=   format=hex     optional 0x, then 32 or 64 hex digits, ended by
//!                             whitespace or the end of the file (the rest is ignored)
//!              format=binary  the raw bytes: 16 or 32 of them
//!  pwdfile=/pwdfd=            every byte of the file is the passphrase (no
//!                             newline stripped); kdf=pbkdf2 (default):
//!                             PBKDF2-HMAC-SHA512, salt "swtpm", 1000 rounds;
//!                             kdf=sha512: the first bytes of SHA-512(passphrase)
//!  mode=                      aes-128-cbc (swtpm's default; alias aes-cbc) or
//!                             aes-256-cbc: the key length
//! ```
//!
//! One deviation, where swtpm refuses: without `mode=`, a key file holding
//! a 256-bit key (64 hex digits, 32 bytes) is taken as AES-256 rather than
//! refused. Everything swtpm accepts means the same key here. As in swtpm,
//! `format=binary` with `mode=aes-256-cbc` and a 16-byte file gives an
//! AES-128 key.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha512};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// The most a passphrase may hold (swtpm sets no limit; nobody types this).
pub const MAX_PASSPHRASE: usize = 64 * 1024;
/// swtpm reads at most this much of a key file.
const KEY_FILE_READ: usize = 2 + 64 + 1;
const PBKDF2_SALT: &[u8] = b"swtpm";
const PBKDF2_ROUNDS: u32 = 1000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the hex key must be 32 hex digits (AES-128) or 64 (AES-256), optionally after 0x, ended by whitespace or the end of the file{0}")]
    BadHex(&'static str),
    #[error("the key is {have} bits but mode={mode} needs {need} bits (give mode=aes-{have}-cbc, or a {need}-bit key)")]
    WrongLength {
        have: usize,
        need: usize,
        mode: &'static str,
    },
    #[error("the binary key is {0} bytes; it must be 16 (AES-128) or 32 (AES-256)")]
    BadBinaryLength(usize),
    #[error("the passphrase is longer than {MAX_PASSPHRASE} bytes")]
    PassphraseTooLong,
}

/// The cipher a key is for (`mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Cbc,
    Aes256Cbc,
}

impl Cipher {
    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Cbc => 16,
            Cipher::Aes256Cbc => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Cbc => "aes-128-cbc",
            Cipher::Aes256Cbc => "aes-256-cbc",
        }
    }

    /// swtpm's `mode=` names.
    pub fn parse(s: &str) -> Option<Cipher> {
        match s {
            "aes-cbc" | "aes-128-cbc" => Some(Cipher::Aes128Cbc),
            "aes-256-cbc" => Some(Cipher::Aes256Cbc),
            _ => None,
        }
    }
}

/// How a key file is written (`format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    Hex,
    Binary,
}

/// How a passphrase becomes a key (`kdf=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kdf {
    Sha512,
    /// swtpm's default.
    #[default]
    Pbkdf2,
}

/// An AES key of 16 or 32 bytes, zeroized when dropped.
#[derive(Clone)]
pub struct SwtpmKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SwtpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwtpmKey(<{} bits, redacted>)", self.0.len() * 8)
    }
}

impl SwtpmKey {
    /// A key of exactly 16 or 32 bytes.
    pub fn from_raw(bytes: &[u8]) -> Result<SwtpmKey, KeyError> {
        match bytes.len() {
            16 | 32 => Ok(SwtpmKey(Zeroizing::new(bytes.to_vec()))),
            n => Err(KeyError::BadBinaryLength(n)),
        }
    }

    /// The key in a key file's bytes. `cipher`: the `mode=` given, if any.
    pub fn from_key_file(
        content: &[u8],
        format: KeyFormat,
        cipher: Option<Cipher>,
    ) -> Result<SwtpmKey, KeyError> {
        let content = &content[..content.len().min(KEY_FILE_READ)];
        let key = match format {
            KeyFormat::Binary => {
                if let Some(c) = cipher {
                    if content.len() > c.key_len() {
                        return Err(wrong_length(content.len(), c));
                    }
                }
                SwtpmKey::from_raw(content)?
            }
            KeyFormat::Hex => {
                let key = parse_hex(content)?;
                if let Some(c) = cipher {
                    if key.len() != c.key_len() {
                        return Err(wrong_length(key.len(), c));
                    }
                }
                key
            }
        };
        Ok(key)
    }

    /// The key derived from a passphrase, as long as `cipher` needs.
    pub fn from_passphrase(pass: &[u8], kdf: Kdf, cipher: Cipher) -> Result<SwtpmKey, KeyError> {
        if pass.len() > MAX_PASSPHRASE {
            return Err(KeyError::PassphraseTooLong);
        }
        let mut out = Zeroizing::new(vec![0u8; cipher.key_len()]);
        match kdf {
            Kdf::Sha512 => {
                let mut digest = Sha512::digest(pass);
                out.copy_from_slice(&digest[..cipher.key_len()]);
                digest.as_mut_slice().zeroize();
            }
            Kdf::Pbkdf2 => pbkdf2_sha512_one_block(pass, &mut out),
        }
        Ok(SwtpmKey(out))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// 16 or 32.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn cipher(&self) -> Cipher {
        if self.0.len() == 32 {
            Cipher::Aes256Cbc
        } else {
            Cipher::Aes128Cbc
        }
    }
}

fn wrong_length(bytes: usize, c: Cipher) -> KeyError {
    KeyError::WrongLength {
        have: bytes * 8,
        need: c.key_len() * 8,
        mode: c.name(),
    }
}

/// swtpm's hex key: optional `0x`, then digit pairs up to whitespace or
/// the end; 32 or 64 digits.
fn parse_hex(content: &[u8]) -> Result<SwtpmKey, KeyError> {
    let s = content.strip_prefix(b"0x").unwrap_or(content);
    let end = s
        .iter()
        .position(|c| c.is_ascii_whitespace() || *c == 0)
        .unwrap_or(s.len());
    let digits = &s[..end];
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(KeyError::BadHex(
            " (found a character that is not a hex digit)",
        ));
    }
    if digits.len() != 32 && digits.len() != 64 {
        return Err(KeyError::BadHex(""));
    }
    let text = std::str::from_utf8(digits).map_err(|_| KeyError::BadHex(""))?;
    let bytes = Zeroizing::new(vtpm_common::hex::decode(text).map_err(|_| KeyError::BadHex(""))?);
    SwtpmKey::from_raw(&bytes)
}

/// PBKDF2 (RFC 8018) with HMAC-SHA512, for outputs of at most one block
/// (64 bytes), which is all a 16- or 32-byte key needs.
fn pbkdf2_sha512_one_block(pass: &[u8], out: &mut [u8]) {
    type HmacSha512 = Hmac<Sha512>;
    let prf = HmacSha512::new_from_slice(pass).expect("HMAC takes any key length");
    let mut mac = prf.clone();
    mac.update(PBKDF2_SALT);
    mac.update(&1u32.to_be_bytes());
    let mut u = Zeroizing::new(mac.finalize().into_bytes().to_vec());
    let mut t = u.clone();
    for _ in 1..PBKDF2_ROUNDS {
        let mut mac = prf.clone();
        mac.update(&u);
        u = Zeroizing::new(mac.finalize().into_bytes().to_vec());
        for (a, b) in t.iter_mut().zip(u.iter()) {
            *a ^= b;
        }
    }
    out.copy_from_slice(&t[..out.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn hex_keys_as_swtpm_reads_them() {
        let k = SwtpmKey::from_key_file(HEX64.as_bytes(), KeyFormat::Hex, None).unwrap();
        assert_eq!(k.len(), 32);
        assert_eq!(k.bytes()[1], 0x11);
        let with_0x = format!("0x{HEX64}\n# a comment after whitespace is ignored");
        let k2 = SwtpmKey::from_key_file(with_0x.as_bytes(), KeyFormat::Hex, None).unwrap();
        assert_eq!(k.bytes(), k2.bytes());
        let k128 = SwtpmKey::from_key_file(
            &HEX64.as_bytes()[..32],
            KeyFormat::Hex,
            Some(Cipher::Aes128Cbc),
        )
        .unwrap();
        assert_eq!(k128.cipher(), Cipher::Aes128Cbc);
        // mode and key length must agree, as in swtpm.
        let e = SwtpmKey::from_key_file(HEX64.as_bytes(), KeyFormat::Hex, Some(Cipher::Aes128Cbc))
            .unwrap_err();
        assert!(e.to_string().contains("mode=aes-128-cbc needs 128"), "{e}");
        let e = SwtpmKey::from_key_file(
            &HEX64.as_bytes()[..32],
            KeyFormat::Hex,
            Some(Cipher::Aes256Cbc),
        )
        .unwrap_err();
        assert!(e.to_string().contains("give mode=aes-128-cbc"), "{e}");
    }

    #[test]
    fn hex_truncated_oversized_garbage() {
        for n in 0..HEX64.len() {
            if n == 32 {
                continue;
            }
            assert!(
                SwtpmKey::from_key_file(&HEX64.as_bytes()[..n], KeyFormat::Hex, None).is_err(),
                "{n} digits accepted"
            );
        }
        let long = format!("{HEX64}00");
        assert!(SwtpmKey::from_key_file(long.as_bytes(), KeyFormat::Hex, None).is_err());
        let bad = HEX64.replace('a', "g");
        let e = SwtpmKey::from_key_file(bad.as_bytes(), KeyFormat::Hex, None).unwrap_err();
        assert!(e.to_string().contains("not a hex digit"), "{e}");
        assert!(SwtpmKey::from_key_file(b"", KeyFormat::Hex, None).is_err());
        assert!(SwtpmKey::from_key_file(&[0xff; 4096], KeyFormat::Hex, None).is_err());
        assert!(SwtpmKey::from_key_file(b"0x0x", KeyFormat::Hex, None).is_err());
        let spaced = format!(" {HEX64}");
        assert!(SwtpmKey::from_key_file(spaced.as_bytes(), KeyFormat::Hex, None).is_err());
    }

    #[test]
    fn binary_keys() {
        let k = SwtpmKey::from_key_file(&[7; 32], KeyFormat::Binary, None).unwrap();
        assert_eq!(k.cipher(), Cipher::Aes256Cbc);
        let k =
            SwtpmKey::from_key_file(&[7; 16], KeyFormat::Binary, Some(Cipher::Aes256Cbc)).unwrap();
        assert_eq!(
            k.cipher(),
            Cipher::Aes128Cbc,
            "swtpm: a 16-byte key is AES-128"
        );
        assert!(
            SwtpmKey::from_key_file(&[7; 32], KeyFormat::Binary, Some(Cipher::Aes128Cbc)).is_err()
        );
        for n in [0, 1, 15, 17, 31, 33, 67, 100_000] {
            assert!(
                SwtpmKey::from_key_file(&vec![1; n], KeyFormat::Binary, None).is_err(),
                "{n} bytes accepted"
            );
        }
    }

    /// Known answers computed independently (Python's hashlib).
    #[test]
    fn kdfs_match_independent_implementations() {
        let k = SwtpmKey::from_passphrase(b"password", Kdf::Pbkdf2, Cipher::Aes256Cbc).unwrap();
        assert_eq!(
            vtpm_common::hex::encode(k.bytes()),
            "e7e0e1e00b313f678bfda581bf72a7e25053d797e2180b6ca57b3a359123865a"
        );
        let k = SwtpmKey::from_passphrase(b"password", Kdf::Pbkdf2, Cipher::Aes128Cbc).unwrap();
        assert_eq!(vtpm_common::hex::encode(k.bytes()).len(), 32);
        let k = SwtpmKey::from_passphrase(b"password", Kdf::Sha512, Cipher::Aes256Cbc).unwrap();
        assert_eq!(
            vtpm_common::hex::encode(k.bytes()),
            "b109f3bbbc244eb82441917ed06d618b9008dd09b3befd1b5e07394c706a8bb9"
        );
        assert_eq!(
            SwtpmKey::from_passphrase(&vec![0; MAX_PASSPHRASE + 1], Kdf::Sha512, Cipher::Aes128Cbc)
                .unwrap_err(),
            KeyError::PassphraseTooLong
        );
        // The trailing newline is part of the passphrase.
        let a = SwtpmKey::from_passphrase(b"pw\n", Kdf::Pbkdf2, Cipher::Aes256Cbc).unwrap();
        let b = SwtpmKey::from_passphrase(b"pw", Kdf::Pbkdf2, Cipher::Aes256Cbc).unwrap();
        assert_ne!(a.bytes(), b.bytes());
    }
}
