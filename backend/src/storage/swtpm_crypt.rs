//! swtpm's encrypted containers, read and written byte for byte as swtpm
//! 0.7.1 does: state files under `--key` and GET/SET_STATEBLOB blobs under
//! `--migration-key`.
//!
//! ```text
//!  state file  header(flags ENCRYPTED [| ENCRYPTED_256BIT_KEY])
//!              TLV 2 ciphertext | TLV 3 HMAC | TLV 6 IV
//!  migration   header(flags MIGRATION_DATA | MIGRATION_ENCRYPTED [| MIGRATION_256BIT_KEY])
//!              TLV 5 ciphertext | TLV 3 HMAC | TLV 7 IV      (plain: TLV 1 state)
//!
//!  ciphertext = AES-128/256-CBC(key, IV[..16], plain padded to a multiple of
//!               the key length with n bytes of value n, 1 ≤ n ≤ key length)
//!  HMAC       = HMAC-SHA256(key, ciphertext ‖ IV)   (the IV has the key's length)
//! ```
//!
//! The HMAC is checked (in constant time) before anything is decrypted. It
//! does not cover the header or bind the blob's name; vtpmd's own sealed
//! format ([`super::sealing`]) does, which is why it is the default for new
//! state (see [`super::at_rest`]). An IV TLV may be absent (swtpm then used
//! zeros and left it out of the HMAC).

use super::blob::{self, BlobError, FLAG_ENCRYPTED, FLAG_MIGRATION_DATA, FLAG_MIGRATION_ENCRYPTED};
use super::swtpm_key::SwtpmKey;
use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

const TAG_ENCRYPTED_DATA: u16 = 2;
const TAG_HMAC: u16 = 3;
const TAG_ENCRYPTED_MIGRATION_DATA: u16 = 5;
const TAG_IVEC_ENCRYPTED_DATA: u16 = 6;
const TAG_IVEC_ENCRYPTED_MIGRATION_DATA: u16 = 7;
/// The state-file key was 256 bits.
pub const FLAG_ENCRYPTED_256BIT_KEY: u16 = 0x08;
/// The migration key was 256 bits.
pub const FLAG_MIGRATION_256BIT_KEY: u16 = 0x10;
const HMAC_LEN: usize = 32;
const BLOCK: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("the encrypted container has no {0} TLV")]
    Missing(&'static str),
    #[error("it was encrypted with a {file_bits}-bit key but the key given is {key_bits} bits (mode=aes-{file_bits}-cbc)")]
    KeySize { file_bits: usize, key_bits: usize },
    #[error("its IV is {0} bytes, not the key's length")]
    BadIv(usize),
    #[error("its HMAC is {0} bytes, not 32")]
    BadHmacLength(usize),
    #[error("authentication failed: wrong key, or the data was modified")]
    BadHmac,
    #[error("its ciphertext of {0} bytes is not whole AES blocks")]
    BadCiphertext(usize),
    #[error("it decrypted to invalid padding")]
    BadPadding,
    #[error("it is not encrypted (header flags {0:#x})")]
    NotEncrypted(u16),
    #[error("it is encrypted with a migration key: start vtpmd with the sender's --migration-key")]
    NeedMigrationKey,
    #[error("its state is still under the sender's state-file key (request decrypted blobs)")]
    StateKeyInside,
    #[error("no random numbers from the OS")]
    Random,
}

/// Which of swtpm's two encryption layers.
#[derive(Clone, Copy)]
struct Layer {
    data_tag: u16,
    iv_tag: u16,
    /// Header flag saying the key was 256 bits.
    wide_flag: u16,
}

const STATE: Layer = Layer {
    data_tag: TAG_ENCRYPTED_DATA,
    iv_tag: TAG_IVEC_ENCRYPTED_DATA,
    wide_flag: FLAG_ENCRYPTED_256BIT_KEY,
};

const MIGRATION: Layer = Layer {
    data_tag: TAG_ENCRYPTED_MIGRATION_DATA,
    iv_tag: TAG_IVEC_ENCRYPTED_MIGRATION_DATA,
    wide_flag: FLAG_MIGRATION_256BIT_KEY,
};

fn hmac(key: &SwtpmKey, ct: &[u8], iv: Option<&[u8]>) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()).expect("any key length");
    m.update(ct);
    if let Some(iv) = iv {
        m.update(iv);
    }
    m
}

fn cbc_encrypt(key: &SwtpmKey, iv: &[u8], padded: &[u8]) -> Vec<u8> {
    let iv = &iv[..BLOCK];
    match key.len() {
        32 => cbc::Encryptor::<aes::Aes256>::new_from_slices(key.bytes(), iv)
            .expect("32-byte key, 16-byte IV")
            .encrypt_padded_vec_mut::<NoPadding>(padded),
        _ => cbc::Encryptor::<aes::Aes128>::new_from_slices(key.bytes(), iv)
            .expect("16-byte key, 16-byte IV")
            .encrypt_padded_vec_mut::<NoPadding>(padded),
    }
}

fn cbc_decrypt(key: &SwtpmKey, iv: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let iv = &iv[..BLOCK];
    let r = match key.len() {
        32 => cbc::Decryptor::<aes::Aes256>::new_from_slices(key.bytes(), iv)
            .expect("32-byte key, 16-byte IV")
            .decrypt_padded_vec_mut::<NoPadding>(ct),
        _ => cbc::Decryptor::<aes::Aes128>::new_from_slices(key.bytes(), iv)
            .expect("16-byte key, 16-byte IV")
            .decrypt_padded_vec_mut::<NoPadding>(ct),
    };
    r.map(Zeroizing::new)
        .map_err(|_| CryptError::BadCiphertext(ct.len()))
}

/// Encrypts `plain` into the layer's three TLVs.
fn seal_layer(key: &SwtpmKey, plain: &[u8], layer: Layer) -> Result<Vec<u8>, CryptError> {
    let n = key.len();
    let pad = n - plain.len() % n;
    let mut padded = Zeroizing::new(Vec::with_capacity(plain.len() + pad));
    padded.extend_from_slice(plain);
    padded.resize(plain.len() + pad, pad as u8);
    let mut iv = vec![0u8; n];
    vtpm_common::aead::random_bytes(&mut iv).map_err(|_| CryptError::Random)?;
    let ct = cbc_encrypt(key, &iv, &padded);
    let mac = hmac(key, &ct, Some(&iv)).finalize().into_bytes();
    let mut out = Vec::with_capacity(3 * 6 + ct.len() + HMAC_LEN + n);
    blob::tlv(layer.data_tag, &ct, &mut out);
    blob::tlv(TAG_HMAC, &mac, &mut out);
    blob::tlv(layer.iv_tag, &iv, &mut out);
    Ok(out)
}

/// Verifies and decrypts the layer found in `payload` (TLVs).
fn open_layer(
    key: &SwtpmKey,
    payload: &[u8],
    flags: u16,
    layer: Layer,
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let file_len = if flags & layer.wide_flag != 0 { 32 } else { 16 };
    if file_len != key.len() {
        return Err(CryptError::KeySize {
            file_bits: file_len * 8,
            key_bits: key.len() * 8,
        });
    }
    let list = blob::tlvs(payload)?;
    let first = |tag| list.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
    let mac = first(TAG_HMAC).ok_or(CryptError::Missing("HMAC"))?;
    let ct = first(layer.data_tag).ok_or(CryptError::Missing("encrypted data"))?;
    let iv = first(layer.iv_tag);
    if mac.len() != HMAC_LEN {
        return Err(CryptError::BadHmacLength(mac.len()));
    }
    if let Some(iv) = iv {
        if iv.len() != key.len() {
            return Err(CryptError::BadIv(iv.len()));
        }
    }
    hmac(key, ct, iv)
        .verify_slice(mac)
        .map_err(|_| CryptError::BadHmac)?;
    if ct.len() < key.len() || ct.len() % BLOCK != 0 {
        return Err(CryptError::BadCiphertext(ct.len()));
    }
    let zero_iv = [0u8; BLOCK];
    let mut plain = cbc_decrypt(key, iv.unwrap_or(&zero_iv), ct)?;
    let pad = usize::from(*plain.last().ok_or(CryptError::BadPadding)?);
    if pad == 0
        || pad > key.len()
        || plain[plain.len() - pad..]
            .iter()
            .any(|b| usize::from(*b) != pad)
    {
        return Err(CryptError::BadPadding);
    }
    let keep = plain.len() - pad;
    plain.truncate(keep);
    Ok(plain)
}

/// Whether `bytes` starts like a swtpm state file encrypted with a
/// state-file key (a damaged one too: opening it says what is wrong).
pub fn is_encrypted_file(bytes: &[u8]) -> bool {
    // What swtpm checks of a header, minus the lengths: the header size
    // field, then the flag. (The version byte is not checked, as in swtpm.)
    bytes.len() >= 6
        && bytes[2..4] == (blob::HEADER_LEN as u16).to_be_bytes()
        && u16::from_be_bytes([bytes[4], bytes[5]]) & FLAG_ENCRYPTED != 0
}

/// A state file as swtpm writes it under `--key`.
pub fn encode_state_file(key: &SwtpmKey, state: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut flags = FLAG_ENCRYPTED;
    if key.len() == 32 {
        flags |= FLAG_ENCRYPTED_256BIT_KEY;
    }
    Ok(blob::with_header(flags, seal_layer(key, state, STATE)?))
}

/// The libtpms state in a swtpm state file encrypted under `key`.
pub fn decode_state_file(key: &SwtpmKey, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let (flags, payload) = blob::split_header(bytes)?;
    if flags & FLAG_ENCRYPTED == 0 {
        return Err(CryptError::NotEncrypted(flags));
    }
    open_layer(key, payload, flags, STATE)
}

/// GET_STATEBLOB output as swtpm sends it with `--migration-key`.
pub fn encode_migration(key: &SwtpmKey, state: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut inner = Zeroizing::new(Vec::with_capacity(6 + state.len()));
    blob::tlv(blob::TAG_DATA, state, &mut inner);
    let mut flags = FLAG_MIGRATION_DATA | FLAG_MIGRATION_ENCRYPTED;
    if key.len() == 32 {
        flags |= FLAG_MIGRATION_256BIT_KEY;
    }
    Ok(blob::with_header(
        flags,
        seal_layer(key, &inner, MIGRATION)?,
    ))
}

/// The libtpms state in a SET_STATEBLOB blob: encrypted under the migration
/// key (which must then be given) or plain, as swtpm accepts both.
pub fn decode_migration(
    key: Option<&SwtpmKey>,
    bytes: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let (flags, payload) = blob::split_header(bytes)?;
    if flags & FLAG_MIGRATION_ENCRYPTED == 0 {
        return Ok(Zeroizing::new(blob::decode_plain(bytes)?));
    }
    let key = key.ok_or(CryptError::NeedMigrationKey)?;
    if flags & FLAG_ENCRYPTED != 0 {
        return Err(CryptError::StateKeyInside);
    }
    let inner = open_layer(key, payload, flags, MIGRATION)?;
    let list = blob::tlvs(&inner)?;
    let state = list
        .iter()
        .find(|(t, _)| *t == blob::TAG_DATA)
        .ok_or(BlobError::NoData)?;
    Ok(Zeroizing::new(state.1.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize, b: u8) -> SwtpmKey {
        SwtpmKey::from_raw(&vec![b; n]).unwrap()
    }

    #[test]
    fn state_file_round_trip_both_key_sizes() {
        for n in [16, 32] {
            for len in [0, 1, 15, 16, 17, 31, 32, 33, 1000] {
                let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let f = encode_state_file(&key(n, 1), &plain).unwrap();
                assert!(is_encrypted_file(&f));
                assert_eq!(&decode_state_file(&key(n, 1), &f).unwrap()[..], &plain[..]);
                // swtpm does not check the version byte; neither the
                // recognition nor the decoding may (found by fuzzing).
                let mut v0 = f.clone();
                v0[0] = 0;
                assert!(is_encrypted_file(&v0));
                assert_eq!(&decode_state_file(&key(n, 1), &v0).unwrap()[..], &plain[..]);
                // The ciphertext is padded to the key length, as swtpm pads.
                let ct_len = u32::from_be_bytes(f[12..16].try_into().unwrap()) as usize;
                assert_eq!(ct_len, len + (n - len % n), "{n}/{len}");
            }
        }
    }

    #[test]
    fn wrong_key_or_size_and_every_bit_flip_fail() {
        let f = encode_state_file(&key(32, 1), b"tpm state").unwrap();
        assert_eq!(
            decode_state_file(&key(32, 2), &f).unwrap_err(),
            CryptError::BadHmac
        );
        assert!(matches!(
            decode_state_file(&key(16, 1), &f).unwrap_err(),
            CryptError::KeySize {
                file_bits: 256,
                key_bits: 128
            }
        ));
        // Every bit after the header is under the HMAC.
        for i in blob::HEADER_LEN..f.len() {
            for bit in [0x01, 0x80] {
                let mut t = f.clone();
                t[i] ^= bit;
                let r = decode_state_file(&key(32, 1), &t);
                assert!(r.is_err(), "flip {bit:#x} at {i} accepted");
            }
        }
        // swtpm's header is not: only its sizes and the flags that matter
        // are checked (min version, header size, total length, ENCRYPTED,
        // 256-bit key).
        for (i, bit) in [(1, 0x04), (3, 0x01), (9, 0x01), (5, 0x01), (5, 0x08)] {
            let mut t = f.clone();
            t[i] ^= bit;
            assert!(
                decode_state_file(&key(32, 1), &t).is_err(),
                "flip {bit:#x} at {i} accepted"
            );
        }
    }

    #[test]
    fn truncated_oversized_garbage() {
        let f = encode_state_file(&key(16, 3), &[9; 40]).unwrap();
        for n in 0..f.len() {
            assert!(
                decode_state_file(&key(16, 3), &f[..n]).is_err(),
                "{n} bytes accepted"
            );
        }
        let mut long = f.clone();
        long.push(0);
        assert!(decode_state_file(&key(16, 3), &long).is_err());
        assert!(decode_state_file(&key(16, 3), &[0xff; 100]).is_err());
        let plain = blob::encode_file(b"x");
        assert_eq!(
            decode_state_file(&key(16, 3), &plain).unwrap_err(),
            CryptError::NotEncrypted(0)
        );
        // A container without an IV decrypts with zeros, as swtpm wrote it
        // when it had no random numbers.
        let ct = cbc_encrypt(&key(16, 3), &[0; 16], &[16; 16]);
        let mac = hmac(&key(16, 3), &ct, None).finalize().into_bytes();
        let mut p = Vec::new();
        blob::tlv(TAG_ENCRYPTED_DATA, &ct, &mut p);
        blob::tlv(TAG_HMAC, &mac, &mut p);
        let f = blob::with_header(FLAG_ENCRYPTED, p);
        assert_eq!(decode_state_file(&key(16, 3), &f).unwrap().len(), 0);
    }

    #[test]
    fn bad_padding_is_refused_even_with_a_valid_hmac() {
        let k = key(16, 4);
        for last in [0u8, 17, 200] {
            let mut block = [5u8; 16];
            block[15] = last;
            let iv = [7u8; 16];
            let ct = cbc_encrypt(&k, &iv, &block);
            let mac = hmac(&k, &ct, Some(&iv)).finalize().into_bytes();
            let mut p = Vec::new();
            blob::tlv(TAG_ENCRYPTED_DATA, &ct, &mut p);
            blob::tlv(TAG_HMAC, &mac, &mut p);
            blob::tlv(TAG_IVEC_ENCRYPTED_DATA, &iv, &mut p);
            let f = blob::with_header(FLAG_ENCRYPTED, p);
            assert_eq!(
                decode_state_file(&k, &f).unwrap_err(),
                CryptError::BadPadding
            );
        }
    }

    #[test]
    fn migration_blobs() {
        let k = key(32, 5);
        let b = encode_migration(&k, b"permanent state").unwrap();
        assert_eq!(
            u16::from_be_bytes([b[4], b[5]]),
            FLAG_MIGRATION_DATA | FLAG_MIGRATION_ENCRYPTED | FLAG_MIGRATION_256BIT_KEY
        );
        assert_eq!(
            &decode_migration(Some(&k), &b).unwrap()[..],
            b"permanent state"
        );
        assert_eq!(
            decode_migration(None, &b).unwrap_err(),
            CryptError::NeedMigrationKey
        );
        assert_eq!(
            decode_migration(Some(&key(32, 6)), &b).unwrap_err(),
            CryptError::BadHmac
        );
        // Plain blobs are still taken with a migration key (as swtpm).
        let plain = blob::encode_migration(b"abc");
        assert_eq!(&decode_migration(Some(&k), &plain).unwrap()[..], b"abc");
        for n in 0..b.len() {
            assert!(
                decode_migration(Some(&k), &b[..n]).is_err(),
                "{n} bytes accepted"
            );
        }
        let mut nested = b.clone();
        nested[5] |= FLAG_ENCRYPTED as u8;
        assert_eq!(
            decode_migration(Some(&k), &nested).unwrap_err(),
            CryptError::StateKeyInside
        );
    }
}
