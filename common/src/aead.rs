//! The one authenticated-encryption primitive: AES-256-CBC (PKCS#7) for
//! secrecy, HMAC-SHA256 for integrity, encrypt-then-MAC, with one key type
//! that holds both halves and is zeroized when dropped.
//!
//! ```text
//!   plain ──AES-256-CBC(enc, iv)──▶ ct
//!   header ‖ iv ‖ ct ──HMAC-SHA256(mac)──▶ tag      (verified before decrypting)
//! ```
//!
//! The formats built on it (sealed state files, migration pieces) decide
//! what the MAC covers; both put the header, the IV and the ciphertext under
//! it and check the tag before any byte is decrypted.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const IV_LEN: usize = 16;
pub const TAG_LEN: usize = 32;
/// Length of one half of the key; the whole key is twice this.
pub const HALF_KEY_LEN: usize = 32;

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AeadError {
    #[error("authentication failed (wrong key, or the data was modified)")]
    BadTag,
    #[error("decrypted to invalid padding")]
    BadPadding,
    #[error("a key must be 64 bytes, got {0}")]
    KeyLength(usize),
    #[error("no random numbers from the OS")]
    Random,
}

/// An encryption key and a MAC key.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct AeadKey {
    enc: [u8; HALF_KEY_LEN],
    mac: [u8; HALF_KEY_LEN],
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(..)")
    }
}

/// Fills `buf` from the OS's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), AeadError> {
    getrandom::getrandom(buf).map_err(|_| AeadError::Random)
}

impl AeadKey {
    pub fn from_parts(enc: [u8; HALF_KEY_LEN], mac: [u8; HALF_KEY_LEN]) -> AeadKey {
        AeadKey { enc, mac }
    }

    /// A fresh key from the OS's random source.
    pub fn random() -> Result<AeadKey, AeadError> {
        let mut k = AeadKey {
            enc: [0; HALF_KEY_LEN],
            mac: [0; HALF_KEY_LEN],
        };
        random_bytes(&mut k.enc)?;
        random_bytes(&mut k.mac)?;
        Ok(k)
    }

    /// `enc ‖ mac`, as it is wrapped for transport.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(2 * HALF_KEY_LEN));
        v.extend_from_slice(&self.enc);
        v.extend_from_slice(&self.mac);
        v
    }

    /// The inverse of [`AeadKey::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<AeadKey, AeadError> {
        if b.len() != 2 * HALF_KEY_LEN {
            return Err(AeadError::KeyLength(b.len()));
        }
        let mut k = AeadKey {
            enc: [0; HALF_KEY_LEN],
            mac: [0; HALF_KEY_LEN],
        };
        k.enc.copy_from_slice(&b[..HALF_KEY_LEN]);
        k.mac.copy_from_slice(&b[HALF_KEY_LEN..]);
        Ok(k)
    }

    /// Encrypts `plain` under a fresh random IV; returns (iv, ciphertext).
    pub fn encrypt(&self, plain: &[u8]) -> Result<([u8; IV_LEN], Vec<u8>), AeadError> {
        let mut iv = [0u8; IV_LEN];
        random_bytes(&mut iv)?;
        let ct =
            Aes256CbcEnc::new(&self.enc.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plain);
        Ok((iv, ct))
    }

    /// Decrypts a ciphertext whose tag was already verified.
    pub fn decrypt(&self, iv: &[u8; IV_LEN], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, AeadError> {
        Aes256CbcDec::new(&self.enc.into(), iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(ct)
            .map(Zeroizing::new)
            .map_err(|_| AeadError::BadPadding)
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut m = self.hmac();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks `tag` against `parts` in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> Result<(), AeadError> {
        let mut m = self.hmac();
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).map_err(|_| AeadError::BadTag)
    }

    fn hmac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.mac).expect("HMAC takes any key length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypt_then_mac_round_trip() {
        let k = AeadKey::random().unwrap();
        let (iv, ct) = k.encrypt(b"secret state").unwrap();
        assert!(!ct.windows(6).any(|w| w == b"secret"));
        let tag = k.tag(&[b"hdr", &iv, &ct]);
        k.verify(&[b"hdr", &iv, &ct], &tag).unwrap();
        assert_eq!(&k.decrypt(&iv, &ct).unwrap()[..], b"secret state");
        let mut bad = tag;
        bad[0] ^= 1;
        assert_eq!(k.verify(&[b"hdr", &iv, &ct], &bad), Err(AeadError::BadTag));
        assert_eq!(k.verify(&[b"hdR", &iv, &ct], &tag), Err(AeadError::BadTag));
        assert_eq!(
            k.verify(&[b"hdr", &iv, &ct], &tag[..31]),
            Err(AeadError::BadTag)
        );
    }

    #[test]
    fn key_bytes_and_wrong_key() {
        let k = AeadKey::random().unwrap();
        let k2 = AeadKey::from_bytes(&k.to_bytes()).unwrap();
        let (iv, ct) = k.encrypt(&[7; 100]).unwrap();
        assert_eq!(&k2.decrypt(&iv, &ct).unwrap()[..], &[7; 100][..]);
        assert_eq!(
            AeadKey::from_bytes(&[0; 63]).unwrap_err(),
            AeadError::KeyLength(63)
        );
        let other = AeadKey::from_parts([1; 32], [2; 32]);
        assert_ne!(other.tag(&[&ct]), k.tag(&[&ct]));
        assert!(
            other.decrypt(&iv, &ct).is_err() || other.decrypt(&iv, &ct).unwrap()[..] != [7; 100]
        );
        assert_eq!(k.decrypt(&iv, &ct[..15]), Err(AeadError::BadPadding));
    }
}
