//! Sealing and opening migration pieces: the wire format of sealed
//! GET_STATEBLOB / SET_STATEBLOB blobs (docs/migration.md).
//!
//! ```text
//! blob  = "VTPMMIG1" | u8 version (1) | u8 blob_type (1 permanent, 2 volatile, 3 final)
//!       | migration_id[32] | dest_fingerprint[32] | be16 wrapped_len | wrapped_key
//!       | be16 piece_count | piece*
//! piece = be32 seq | u8 kind | u8 flags | be32 plain_len | iv[16] | be32 ct_len | ct | mac[32]
//! ```
//!
//! * `wrapped_key` (blob 1 only) is RSA-OAEP-SHA256(destination key,
//!   enc_key || mac_key): fresh AES-256 and HMAC-SHA256 keys per migration.
//! * `ct` = AES-256-CBC(enc_key, iv, plaintext); `mac` = HMAC(mac_key,
//!   previous mac || migration_id || blob_type || the piece up to ct), so the
//!   pieces form one chain that starts at the key exchange: nothing can be
//!   reordered, dropped, or spliced in from another migration.
//! * The migration digest is SHA-256 folded over SHA-256(seq || kind ||
//!   plaintext) of every state piece. The final piece (blob 3) carries the
//!   source's digest and piece count; the destination unlocks only when its
//!   own digest matches.

use super::keys::{self, HostKey, KeyError};
use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::RsaPublicKey;
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const MAGIC: &[u8; 8] = b"VTPMMIG1";
const VERSION: u8 = 1;
pub const ID_LEN: usize = 32;
/// State is cut into pieces of at most this many bytes.
pub const CHUNK: usize = 64 * 1024;

pub const KIND_PERMANENT: u8 = 1;
pub const KIND_VOLATILE: u8 = 2;
pub const KIND_FINAL: u8 = 3;
const FLAG_LAST_IN_BLOB: u8 = 1;

pub type MigrationId = [u8; ID_LEN];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PieceError {
    #[error("not a sealed vtpmd migration blob: plaintext or swtpm-format state is refused while a host key is configured")]
    NotSealed,
    #[error("blob is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("unsupported sealed blob version {0}")]
    Version(u8),
    #[error(
        "blob type {got} arrived where {want} was expected (blobs dropped, reordered or spliced)"
    )]
    Order { got: u8, want: u8 },
    #[error("blob belongs to migration {got}, this destination expects {want} (replayed or spliced stream)")]
    WrongMigration { got: String, want: String },
    #[error("blob is wrapped for host key {got}, this host is {want}")]
    WrongHost { got: String, want: String },
    #[error("the wrapped instance key does not open with this host's key")]
    Unwrap,
    #[error("piece {0}: authentication failed (tampered, reordered or from another migration)")]
    BadMac(u32),
    #[error("piece {seq}: {why}")]
    BadPiece { seq: u32, why: &'static str },
    #[error("migration digest mismatch: the state is incomplete or altered")]
    Digest,
    #[error("an earlier blob of this migration failed; nothing more is accepted")]
    Poisoned,
    #[error("no random numbers from the OS")]
    Random,
    #[error(transparent)]
    Key(#[from] KeyErrorEq),
}

/// KeyError wrapped so PieceError can compare equal in tests.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct KeyErrorEq(pub String);

impl PartialEq for KeyErrorEq {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for KeyErrorEq {}

impl From<KeyError> for PieceError {
    fn from(e: KeyError) -> Self {
        PieceError::Key(KeyErrorEq(e.to_string()))
    }
}

#[derive(Zeroize, ZeroizeOnDrop)]
struct InstanceKeys {
    enc: [u8; 32],
    mac: [u8; 32],
}

impl InstanceKeys {
    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.mac).expect("any HMAC key length")
    }
}

/// Opens `enc_key || mac_key` wrapped to this host (an RSA private-key
/// operation: milliseconds).
fn open_wrapped(host: &HostKey, wrapped: &[u8]) -> Result<InstanceKeys, PieceError> {
    let secret = host.unwrap_key(wrapped).map_err(|_| PieceError::Unwrap)?;
    if secret.len() != 64 {
        return Err(PieceError::Unwrap);
    }
    let mut k = InstanceKeys {
        enc: [0; 32],
        mac: [0; 32],
    };
    k.enc.copy_from_slice(&secret[..32]);
    k.mac.copy_from_slice(&secret[32..]);
    Ok(k)
}

/// Instance keys the destination unwrapped before the stream arrived
/// (`vtpmctl incoming-key`, with the wrapped key `vtpmctl outgoing`
/// printed), so no RSA work is left for the VM's downtime. They are used
/// only if blob 1 carries exactly this wrapped key; otherwise blob 1's own
/// key is unwrapped as usual.
pub struct PreloadedKeys {
    wrapped: Vec<u8>,
    keys: InstanceKeys,
}

impl std::fmt::Debug for PreloadedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreloadedKeys")
    }
}

impl PreloadedKeys {
    pub fn open(host: &HostKey, wrapped: &[u8]) -> Result<PreloadedKeys, PieceError> {
        Ok(PreloadedKeys {
            wrapped: wrapped.to_vec(),
            keys: open_wrapped(host, wrapped)?,
        })
    }
}

/// Starting point of the MAC chain: binds the keys to this migration, the
/// wrapped key and the destination.
fn chain_start(
    k: &InstanceKeys,
    id: &MigrationId,
    wrapped: &[u8],
    dest_fpr: &[u8; 32],
) -> [u8; 32] {
    let mut m = k.mac();
    m.update(b"vtpmd-migration-v1");
    m.update(id);
    m.update(wrapped);
    m.update(dest_fpr);
    m.finalize().into_bytes().into()
}

fn fold_digest(digest: &mut [u8; 32], seq: u32, kind: u8, plain: &[u8]) {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    h.update([kind]);
    h.update(plain);
    let piece = h.finalize();
    let mut d = Sha256::new();
    d.update(*digest);
    d.update(piece);
    *digest = d.finalize().into();
}

fn fpr_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Some(v) = keys::unhex(hex) {
        if v.len() == 32 {
            out.copy_from_slice(&v);
        }
    }
    out
}

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// The source side of one migration.
pub struct Exporter {
    keys: InstanceKeys,
    id: MigrationId,
    wrapped: Vec<u8>,
    dest_fpr: [u8; 32],
    seq: u32,
    chain: [u8; 32],
    digest: [u8; 32],
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Exporter(migration {}, piece {})",
            keys::hex(&self.id),
            self.seq
        )
    }
}

impl Exporter {
    /// Fresh instance keys for migration `id`, wrapped to `peer`.
    pub fn new(id: MigrationId, peer: &RsaPublicKey) -> Result<Exporter, PieceError> {
        let mut k = InstanceKeys {
            enc: [0; 32],
            mac: [0; 32],
        };
        getrandom::getrandom(&mut k.enc).map_err(|_| PieceError::Random)?;
        getrandom::getrandom(&mut k.mac).map_err(|_| PieceError::Random)?;
        let mut secret = Zeroizing::new([0u8; 64]);
        secret[..32].copy_from_slice(&k.enc);
        secret[32..].copy_from_slice(&k.mac);
        let wrapped = keys::wrap_key(peer, &secret[..])?;
        let dest_fpr = fpr_bytes(&keys::fingerprint(peer));
        let chain = chain_start(&k, &id, &wrapped, &dest_fpr);
        Ok(Exporter {
            keys: k,
            id,
            wrapped,
            dest_fpr,
            seq: 0,
            chain,
            digest: [0; 32],
        })
    }

    /// The instance keys wrapped to the destination, as blob 1 carries them.
    pub fn wrapped_key(&self) -> &[u8] {
        &self.wrapped
    }

    /// The running migration digest (final once blob 3 is sealed).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    fn header(&self, blob_type: u8, with_key: bool, pieces: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(blob_type);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.dest_fpr);
        let wrapped: &[u8] = if with_key { &self.wrapped } else { &[] };
        out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(wrapped);
        out.extend_from_slice(&(pieces as u16).to_be_bytes());
        out
    }

    fn piece(
        &mut self,
        out: &mut Vec<u8>,
        blob_type: u8,
        kind: u8,
        flags: u8,
        plain: &[u8],
    ) -> Result<(), PieceError> {
        let mut iv = [0u8; 16];
        getrandom::getrandom(&mut iv).map_err(|_| PieceError::Random)?;
        let ct = Aes256CbcEnc::new(&self.keys.enc.into(), &iv.into())
            .encrypt_padded_vec_mut::<Pkcs7>(plain);
        let start = out.len();
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&(ct.len() as u32).to_be_bytes());
        out.extend_from_slice(&ct);
        let mut m = self.keys.mac();
        m.update(&self.chain);
        m.update(&self.id);
        m.update(&[blob_type]);
        m.update(&out[start..]);
        self.chain = m.finalize().into_bytes().into();
        out.extend_from_slice(&self.chain);
        if kind != KIND_FINAL {
            fold_digest(&mut self.digest, self.seq, kind, plain);
        }
        self.seq += 1;
        Ok(())
    }

    /// Seals one state blob (PERMANENT = 1 carries the wrapped key).
    pub fn seal_state(&mut self, blob_type: u8, state: &[u8]) -> Result<Vec<u8>, PieceError> {
        let kind = if blob_type == 1 {
            KIND_PERMANENT
        } else {
            KIND_VOLATILE
        };
        let chunks: Vec<&[u8]> = if state.is_empty() {
            vec![&[][..]]
        } else {
            state.chunks(CHUNK).collect()
        };
        let mut out = self.header(blob_type, blob_type == 1, chunks.len());
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i + 1 == n { FLAG_LAST_IN_BLOB } else { 0 };
            self.piece(&mut out, blob_type, kind, flags, c)?;
        }
        Ok(out)
    }

    /// Seals the final blob (type 3): the migration digest and piece count.
    pub fn seal_final(&mut self) -> Result<Vec<u8>, PieceError> {
        let mut plain = self.digest.to_vec();
        plain.extend_from_slice(&self.seq.to_be_bytes());
        let mut out = self.header(3, false, 1);
        self.piece(&mut out, 3, KIND_FINAL, FLAG_LAST_IN_BLOB, &plain)?;
        Ok(out)
    }
}

/// Reads the migration id out of a sealed blob without verifying anything.
pub fn peek_id(blob: &[u8]) -> Option<MigrationId> {
    if !blob.starts_with(MAGIC) {
        return None;
    }
    blob.get(10..10 + ID_LEN)?.try_into().ok()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PieceError> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or(PieceError::Malformed(what))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, PieceError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, PieceError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, PieceError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// The destination side of one migration.
pub struct Importer {
    id: MigrationId,
    keys: Option<InstanceKeys>,
    dest_fpr: [u8; 32],
    next_blob: u8,
    seq: u32,
    chain: [u8; 32],
    digest: [u8; 32],
    poisoned: bool,
    preloaded: Option<PreloadedKeys>,
    pub permanent: Zeroizing<Vec<u8>>,
    pub volatile: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Importer(migration {}, next blob {})",
            keys::hex(&self.id),
            self.next_blob
        )
    }
}

impl Importer {
    /// Expects migration `id`, the one this destination issued.
    pub fn new(id: MigrationId) -> Importer {
        Importer {
            id,
            keys: None,
            dest_fpr: [0; 32],
            next_blob: 1,
            seq: 0,
            chain: [0; 32],
            digest: [0; 32],
            poisoned: false,
            preloaded: None,
            permanent: Zeroizing::new(Vec::new()),
            volatile: Zeroizing::new(Vec::new()),
        }
    }

    /// As [`new`](Self::new), with keys unwrapped ahead of time.
    pub fn with_keys(id: MigrationId, preloaded: Option<PreloadedKeys>) -> Importer {
        Importer {
            preloaded,
            ..Importer::new(id)
        }
    }

    /// True once the final blob verified.
    pub fn complete(&self) -> bool {
        self.next_blob == 4 && !self.poisoned
    }

    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Verifies and opens one blob; any failure poisons the import.
    pub fn accept(
        &mut self,
        blob_type: u32,
        blob: &[u8],
        host: &HostKey,
    ) -> Result<(), PieceError> {
        if self.poisoned {
            return Err(PieceError::Poisoned);
        }
        let r = self.accept_inner(blob_type, blob, host);
        if r.is_err() {
            self.poisoned = true;
            self.permanent = Zeroizing::new(Vec::new());
            self.volatile = Zeroizing::new(Vec::new());
        }
        r
    }

    fn accept_inner(
        &mut self,
        blob_type: u32,
        blob: &[u8],
        host: &HostKey,
    ) -> Result<(), PieceError> {
        let mut r = Reader { b: blob, at: 0 };
        if r.take(8, "magic").ok() != Some(&MAGIC[..]) {
            return Err(PieceError::NotSealed);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(PieceError::Version(version));
        }
        let declared = r.u8("blob type")?;
        if u32::from(declared) != blob_type || declared != self.next_blob {
            return Err(PieceError::Order {
                got: declared,
                want: self.next_blob,
            });
        }
        let id: MigrationId = r
            .take(ID_LEN, "migration id")?
            .try_into()
            .map_err(|_| PieceError::Malformed("migration id"))?;
        if id != self.id {
            return Err(PieceError::WrongMigration {
                got: keys::hex(&id),
                want: keys::hex(&self.id),
            });
        }
        let dest_fpr: [u8; 32] = r
            .take(32, "fingerprint")?
            .try_into()
            .map_err(|_| PieceError::Malformed("fingerprint"))?;
        let wlen = usize::from(r.u16("wrapped length")?);
        let wrapped = r.take(wlen, "wrapped key")?;
        if declared == 1 {
            if dest_fpr != fpr_bytes(&host.fingerprint()) {
                return Err(PieceError::WrongHost {
                    got: keys::hex(&dest_fpr),
                    want: host.fingerprint(),
                });
            }
            let k = match self.preloaded.take() {
                Some(p) if p.wrapped == wrapped => {
                    log::info!(
                        "migration {}: instance keys were unwrapped ahead of time",
                        keys::hex(&id)
                    );
                    p.keys
                }
                Some(_) => {
                    log::warn!("migration {}: the stream's wrapped key is not the one given with incoming-key; unwrapping it now", keys::hex(&id));
                    open_wrapped(host, wrapped)?
                }
                None => open_wrapped(host, wrapped)?,
            };
            self.chain = chain_start(&k, &id, wrapped, &dest_fpr);
            self.keys = Some(k);
            self.dest_fpr = dest_fpr;
        } else if wlen != 0 {
            return Err(PieceError::Malformed("wrapped key outside blob 1"));
        } else if dest_fpr != self.dest_fpr {
            return Err(PieceError::WrongHost {
                got: keys::hex(&dest_fpr),
                want: keys::hex(&self.dest_fpr),
            });
        }
        let keys = self.keys.as_ref().ok_or(PieceError::Order {
            got: declared,
            want: 1,
        })?;
        let count = r.u16("piece count")?;
        if count == 0 || (declared == 3 && count != 1) {
            return Err(PieceError::Malformed("piece count"));
        }
        let want_kind = [KIND_PERMANENT, KIND_VOLATILE, KIND_FINAL][usize::from(declared - 1)];
        for i in 0..count {
            let start = r.at;
            let seq = r.u32("seq")?;
            let kind = r.u8("kind")?;
            let flags = r.u8("flags")?;
            let plain_len = r.u32("plain length")? as usize;
            let iv: [u8; 16] = r
                .take(16, "iv")?
                .try_into()
                .map_err(|_| PieceError::Malformed("iv"))?;
            let ct_len = r.u32("ciphertext length")? as usize;
            let ct = r.take(ct_len, "ciphertext")?;
            let body = &blob[start..r.at];
            let mac = r.take(32, "mac")?;
            let mut m = keys.mac();
            m.update(&self.chain);
            m.update(&id);
            m.update(&[declared]);
            m.update(body);
            m.verify_slice(mac).map_err(|_| PieceError::BadMac(seq))?;
            self.chain.copy_from_slice(mac);
            if seq != self.seq {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "out of sequence",
                });
            }
            let last = i + 1 == count;
            if kind != want_kind || (flags & FLAG_LAST_IN_BLOB != 0) != last {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "kind or flags do not fit the blob",
                });
            }
            let plain = Zeroizing::new(
                Aes256CbcDec::new(&keys.enc.into(), &iv.into())
                    .decrypt_padded_vec_mut::<Pkcs7>(ct)
                    .map_err(|_| PieceError::BadPiece {
                        seq,
                        why: "bad padding",
                    })?,
            );
            if plain.len() != plain_len {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "length mismatch",
                });
            }
            match kind {
                KIND_FINAL => {
                    if plain.len() != 36 {
                        return Err(PieceError::BadPiece {
                            seq,
                            why: "final piece size",
                        });
                    }
                    let carried_count =
                        u32::from_be_bytes([plain[32], plain[33], plain[34], plain[35]]);
                    if plain[..32] != self.digest || carried_count != self.seq {
                        return Err(PieceError::Digest);
                    }
                }
                KIND_PERMANENT => {
                    fold_digest(&mut self.digest, seq, kind, &plain);
                    self.permanent.extend_from_slice(&plain);
                }
                _ => {
                    fold_digest(&mut self.digest, seq, kind, &plain);
                    self.volatile.extend_from_slice(&plain);
                }
            }
            self.seq += 1;
        }
        if r.at != blob.len() {
            return Err(PieceError::Malformed("trailing bytes"));
        }
        self.next_blob += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::keys::tests::keys;

    fn export(id: MigrationId, perm: &[u8], vol: &[u8]) -> (Vec<Vec<u8>>, [u8; 32]) {
        let (_, dest) = keys();
        let mut e = Exporter::new(id, dest.public()).unwrap();
        let b1 = e.seal_state(1, perm).unwrap();
        let b2 = e.seal_state(2, vol).unwrap();
        let b3 = e.seal_final().unwrap();
        (vec![b1, b2, b3], e.digest())
    }

    fn import(id: MigrationId, blobs: &[Vec<u8>]) -> Result<Importer, PieceError> {
        let (_, dest) = keys();
        let mut imp = Importer::new(id);
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest)?;
        }
        Ok(imp)
    }

    #[test]
    fn keys_unwrapped_ahead_of_time() {
        let (_, dest) = keys();
        let id = [9; 32];
        let mut e = Exporter::new(id, dest.public()).unwrap();
        let pre = PreloadedKeys::open(dest, e.wrapped_key()).unwrap();
        let blobs = [
            e.seal_state(1, b"perm").unwrap(),
            e.seal_state(2, b"vol").unwrap(),
            e.seal_final().unwrap(),
        ];
        let mut imp = Importer::with_keys(id, Some(pre));
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest).unwrap();
        }
        assert!(imp.complete());
        assert_eq!(&imp.permanent[..], b"perm");
        // Keys preloaded for another preparation: blob 1's own key is
        // unwrapped instead, and the stream still verifies.
        let other = Exporter::new(id, dest.public()).unwrap();
        let pre = PreloadedKeys::open(dest, other.wrapped_key()).unwrap();
        let mut imp = Importer::with_keys(id, Some(pre));
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest).unwrap();
        }
        assert!(imp.complete());
        // Garbage or a key wrapped for someone else does not open.
        assert!(PreloadedKeys::open(dest, &[0x42; 384]).is_err());
        assert!(PreloadedKeys::open(dest, &[]).is_err());
        let (src, _) = keys();
        let foreign = Exporter::new(id, src.public()).unwrap();
        assert!(PreloadedKeys::open(dest, foreign.wrapped_key()).is_err());
    }

    #[test]
    fn round_trip_with_chunks() {
        let perm: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
        let (blobs, digest) = export([7; 32], &perm, b"volatile");
        let imp = import([7; 32], &blobs).unwrap();
        assert!(imp.complete());
        assert_eq!(&imp.permanent[..], &perm[..]);
        assert_eq!(&imp.volatile[..], b"volatile");
        assert_eq!(imp.digest(), digest);
        // Nothing in the blobs is plaintext.
        assert!(!blobs[1].windows(8).any(|w| w == b"volatile"));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (blobs, _) = export([1; 32], &[0x55; 300], &[0x66; 100]);
        for b in 0..3 {
            for i in 0..blobs[b].len() {
                let mut t = blobs.clone();
                t[b][i] ^= 0x01;
                assert!(
                    import([1; 32], &t).map(|x| x.complete()) != Ok(true),
                    "blob {b} byte {i}"
                );
            }
        }
    }

    #[test]
    fn drop_splice_replay_and_wrong_host() {
        let (a, _) = export([1; 32], b"perm-a", b"vol-a");
        let (b, _) = export([1; 32], b"perm-b", b"vol-b");
        let (c, _) = export([2; 32], b"perm-c", b"vol-c");
        // Dropped blob: 2 missing.
        assert!(matches!(
            import([1; 32], &[a[0].clone(), a[2].clone()]),
            Err(PieceError::Order { .. })
        ));
        // Final blob missing: not complete.
        assert!(!import([1; 32], &a[..2]).unwrap().complete());
        // Spliced from another export of the same migration id: MAC chain.
        assert!(matches!(
            import([1; 32], &[a[0].clone(), b[1].clone(), a[2].clone()]),
            Err(PieceError::BadMac(_))
        ));
        // Another migration's stream: id mismatch.
        assert!(matches!(
            import([1; 32], &c),
            Err(PieceError::WrongMigration { .. })
        ));
        // Wrapped for another host.
        let (other, _) = keys();
        let mut e = Exporter::new([1; 32], other.public()).unwrap();
        let w = vec![e.seal_state(1, b"x").unwrap()];
        assert!(matches!(
            import([1; 32], &w),
            Err(PieceError::WrongHost { .. })
        ));
        // Plaintext (swtpm-format) blob.
        let plain = crate::storage::blob::encode_migration(b"state");
        assert_eq!(
            import([1; 32], &[plain]).unwrap_err(),
            PieceError::NotSealed
        );
    }

    #[test]
    fn poisoned_after_failure() {
        let (a, _) = export([3; 32], b"p", b"v");
        let (_, dest) = keys();
        let mut imp = Importer::new([3; 32]);
        let mut bad = a[0].clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(imp.accept(1, &bad, dest).is_err());
        assert_eq!(imp.accept(1, &a[0], dest), Err(PieceError::Poisoned));
    }

    #[test]
    fn truncated_oversized_garbage() {
        let (a, _) = export([4; 32], b"perm", b"vol");
        for n in 0..a[0].len() {
            assert!(
                import([4; 32], &[a[0][..n].to_vec()]).is_err(),
                "truncated at {n}"
            );
        }
        let mut long = a[0].clone();
        long.push(0);
        assert_eq!(
            import([4; 32], &[long]).unwrap_err(),
            PieceError::Malformed("trailing bytes")
        );
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 200]);
        assert!(import([4; 32], &[garbage]).is_err());
        assert_eq!(peek_id(&a[0]), Some([4; 32]));
        assert_eq!(peek_id(b"junk"), None);
    }
}
