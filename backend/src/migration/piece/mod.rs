//! Sealing and opening migration pieces: the wire format of sealed
//! GET_STATEBLOB / SET_STATEBLOB blobs (docs/migration.md).
//!
//! ```text
//! blob  = "VTPMMIG1"|"VTPMSAV1" | u8 version (1) | u8 blob_type (1 permanent, 2 volatile, 3 final)
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
//! * A **save** (`VTPMSAV1`, [`Purpose::Save`]: `virsh save`, snapshots)
//!   is the same format wrapped to this host's own key, with a chain that
//!   starts from another label, so a save never opens as a migration nor
//!   the other way round; its id is the instance id, generation and a
//!   nonce ([`crate::migration::save`]).

//!
//! Steps: [`seal`] builds blobs on the source; [`open`] takes each incoming
//! blob through parse (layout only), verify (host, order, MAC chain) and
//! apply (decrypt, digest, collect).

mod open;
mod seal;

pub use open::{Importer, PreloadedKeys};
pub use seal::Exporter;

use sha2::{Digest, Sha256};
use thiserror::Error;
use vtpm_common::aead::{AeadError, AeadKey, IV_LEN, TAG_LEN};
use vtpm_common::hex;
use vtpm_common::hostkey::{HostKey, KeyError};
use vtpm_common::reader::{ByteReader, Truncated};

pub const MAGIC: &[u8; 8] = b"VTPMMIG1";
pub const SAVE_MAGIC: &[u8; 8] = b"VTPMSAV1";
const VERSION: u8 = 1;
pub const ID_LEN: usize = 32;
/// State is cut into pieces of at most this many bytes.
pub const CHUNK: usize = 64 * 1024;

pub const KIND_PERMANENT: u8 = 1;
pub const KIND_VOLATILE: u8 = 2;
pub const KIND_FINAL: u8 = 3;
const FLAG_LAST_IN_BLOB: u8 = 1;

pub type MigrationId = [u8; ID_LEN];

/// What a sealed blob is for: it decides the magic and the MAC chain's
/// label, so one kind is never accepted as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A move to the destination that issued the id (seed 002).
    Migration,
    /// A copy sealed to this host (`virsh save`, managedsave, snapshots).
    Save,
}

impl Purpose {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            Purpose::Migration => MAGIC,
            Purpose::Save => SAVE_MAGIC,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Migration => b"vtpmd-migration-v1",
            Purpose::Save => b"vtpmd-save-v1",
        }
    }

    /// The purpose a blob announces by its magic (nothing verified).
    pub fn of(blob: &[u8]) -> Option<Purpose> {
        match blob.get(..8) {
            Some(m) if m == MAGIC => Some(Purpose::Migration),
            Some(m) if m == SAVE_MAGIC => Some(Purpose::Save),
            _ => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum PieceError {
    #[error("not a sealed vtpmd blob: plaintext or swtpm-format state is refused while vtpmd has a host key (no downgrade); to take swtpm's plaintext state, start this vtpmd with --allow-plaintext-migration")]
    NotSealed,
    #[error("blob is truncated or malformed ({0})")]
    Malformed(&'static str),
    #[error("unsupported sealed blob version {0}")]
    Version(u8),
    #[error(
        "blob type {got} arrived where {want} was expected (blobs dropped, reordered or spliced)"
    )]
    Order { got: u8, want: u8 },
    #[error("a {got:?} blob arrived where a {want:?} blob was expected (a save file is restored on the host that made it; a migration goes to the destination that issued its id)")]
    WrongPurpose { got: Purpose, want: Purpose },
    #[error("blob belongs to migration {got}, this destination expects {want} (replayed or spliced stream)")]
    WrongMigration { got: String, want: String },
    #[error("blob is wrapped for host key {got}, this host is {want}: a save restores only on the host that made it (with that host key), and a migration must be prepared to this host's key (vtpmctl outgoing with this host's incoming-info, or vtpmctl migrate)")]
    WrongHost { got: String, want: String },
    #[error("the wrapped instance key does not open with this host's key, though the blob names it: the blob is damaged or was altered")]
    Unwrap,
    #[error("piece {0}: authentication failed: the blob is damaged or was altered, or its pieces come from different migrations or saves")]
    BadMac(u32),
    #[error("piece {seq}: {why}")]
    BadPiece { seq: u32, why: &'static str },
    #[error("migration digest mismatch: the state is incomplete or altered")]
    Digest,
    #[error("an earlier blob of this migration failed; nothing more is accepted")]
    Poisoned,
    #[error("no random numbers from the OS")]
    Random,
    #[error("cannot wrap the instance keys to the destination: {0}")]
    Wrap(#[from] KeyError),
}

impl From<Truncated> for PieceError {
    fn from(t: Truncated) -> Self {
        PieceError::Malformed(t.what)
    }
}

impl From<AeadError> for PieceError {
    fn from(_: AeadError) -> Self {
        PieceError::Random
    }
}

/// Opens `enc_key || mac_key` wrapped to this host (an RSA private-key
/// operation: milliseconds).
fn open_wrapped(host: &HostKey, wrapped: &[u8]) -> Result<AeadKey, PieceError> {
    let secret = host.unwrap_key(wrapped).map_err(|_| PieceError::Unwrap)?;
    AeadKey::from_bytes(&secret).map_err(|_| PieceError::Unwrap)
}

/// Starting point of the MAC chain: binds the keys to this migration, the
/// wrapped key and the destination.
fn chain_start(
    purpose: Purpose,
    k: &AeadKey,
    id: &MigrationId,
    wrapped: &[u8],
    dest_fpr: &[u8; 32],
) -> [u8; 32] {
    k.tag(&[purpose.label(), id, wrapped, dest_fpr])
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

/// A blob's header, as laid out on the wire (nothing verified yet).
struct BlobHeader<'a> {
    purpose: Purpose,
    version: u8,
    blob_type: u8,
    id: MigrationId,
    dest_fpr: [u8; 32],
    wrapped: &'a [u8],
    pieces: u16,
}

impl BlobHeader<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 2 + ID_LEN + 32 + 2 + self.wrapped.len() + 2);
        out.extend_from_slice(self.purpose.magic());
        out.push(self.version);
        out.push(self.blob_type);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.dest_fpr);
        out.extend_from_slice(&(self.wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(self.wrapped);
        out.extend_from_slice(&self.pieces.to_be_bytes());
        out
    }

    fn parse<'a>(r: &mut ByteReader<'a>) -> Result<BlobHeader<'a>, PieceError> {
        let purpose = r
            .take(MAGIC.len(), "magic")
            .ok()
            .and_then(Purpose::of)
            .ok_or(PieceError::NotSealed)?;
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(PieceError::Version(version));
        }
        Ok(BlobHeader {
            purpose,
            version,
            blob_type: r.u8("blob type")?,
            id: r.array("migration id")?,
            dest_fpr: r.array("fingerprint")?,
            wrapped: r.bytes_u16("wrapped key")?,
            pieces: r.u16("piece count")?,
        })
    }
}

/// One piece as laid out on the wire (nothing verified yet).
struct RawPiece<'a> {
    seq: u32,
    kind: u8,
    flags: u8,
    plain_len: usize,
    iv: [u8; IV_LEN],
    ct: &'a [u8],
    /// Every byte of the piece before its MAC.
    body: &'a [u8],
    mac: &'a [u8],
}

impl<'a> RawPiece<'a> {
    fn parse(blob: &'a [u8], r: &mut ByteReader<'a>) -> Result<RawPiece<'a>, PieceError> {
        let start = r.position();
        let seq = r.u32("seq")?;
        let kind = r.u8("kind")?;
        let flags = r.u8("flags")?;
        let plain_len = r.u32("plain length")? as usize;
        let iv = r.array("iv")?;
        let ct = r.bytes_u32("ciphertext")?;
        let body = &blob[start..r.position()];
        let mac = r.take(TAG_LEN, "mac")?;
        Ok(RawPiece {
            seq,
            kind,
            flags,
            plain_len,
            iv,
            ct,
            body,
            mac,
        })
    }
}

/// Reads the migration id out of a sealed blob without verifying anything.
pub fn peek_id(blob: &[u8]) -> Option<MigrationId> {
    BlobHeader::parse(&mut ByteReader::new(blob))
        .ok()
        .map(|h| h.id)
}

/// Reads the fingerprint of the key a sealed blob is wrapped to, without
/// verifying anything.
pub fn peek_fingerprint(blob: &[u8]) -> Option<[u8; 32]> {
    BlobHeader::parse(&mut ByteReader::new(blob))
        .ok()
        .map(|h| h.dest_fpr)
}

fn id_hex(id: &MigrationId) -> String {
    hex::encode(id)
}

#[cfg(test)]
pub(crate) mod test_keys {
    use vtpm_common::hostkey::HostKey;

    /// Two host keys shared by the tests (generation takes a while).
    pub fn keys() -> &'static (HostKey, HostKey) {
        static K: std::sync::OnceLock<(HostKey, HostKey)> = std::sync::OnceLock::new();
        K.get_or_init(|| (HostKey::generate().unwrap(), HostKey::generate().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::keys;
    use super::*;

    fn export(id: MigrationId, perm: &[u8], vol: &[u8]) -> (Vec<Vec<u8>>, [u8; 32]) {
        let (_, dest) = keys();
        let mut e = Exporter::new(id, dest.public(), Purpose::Migration).unwrap();
        let b1 = e.seal_state(1, perm).unwrap();
        let b2 = e.seal_state(2, vol).unwrap();
        let b3 = e.seal_final().unwrap();
        (vec![b1, b2, b3], e.digest())
    }

    fn import(id: MigrationId, blobs: &[Vec<u8>]) -> Result<Importer, PieceError> {
        let (_, dest) = keys();
        let mut imp = Importer::new(id, Purpose::Migration);
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest)?;
        }
        Ok(imp)
    }

    #[test]
    fn keys_unwrapped_ahead_of_time() {
        let (_, dest) = keys();
        let id = [9; 32];
        let mut e = Exporter::new(id, dest.public(), Purpose::Migration).unwrap();
        let pre = PreloadedKeys::open(dest, e.wrapped_key()).unwrap();
        let blobs = [
            e.seal_state(1, b"perm").unwrap(),
            e.seal_state(2, b"vol").unwrap(),
            e.seal_final().unwrap(),
        ];
        let mut imp = Importer::with_keys(id, Purpose::Migration, Some(pre));
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest).unwrap();
        }
        assert!(imp.complete());
        assert_eq!(&imp.permanent[..], b"perm");
        // Keys preloaded for another preparation: blob 1's own key is
        // unwrapped instead, and the stream still verifies.
        let other = Exporter::new(id, dest.public(), Purpose::Migration).unwrap();
        let pre = PreloadedKeys::open(dest, other.wrapped_key()).unwrap();
        let mut imp = Importer::with_keys(id, Purpose::Migration, Some(pre));
        for (i, b) in blobs.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest).unwrap();
        }
        assert!(imp.complete());
        // Garbage or a key wrapped for someone else does not open.
        assert!(PreloadedKeys::open(dest, &[0x42; 384]).is_err());
        assert!(PreloadedKeys::open(dest, &[]).is_err());
        let (src, _) = keys();
        let foreign = Exporter::new(id, src.public(), Purpose::Migration).unwrap();
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
                    !import([1; 32], &t).is_ok_and(|x| x.complete()),
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
        let mut e = Exporter::new([1; 32], other.public(), Purpose::Migration).unwrap();
        let w = vec![e.seal_state(1, b"x").unwrap()];
        assert!(matches!(
            import([1; 32], &w),
            Err(PieceError::WrongHost { .. })
        ));
        // Plaintext (swtpm-format) blob.
        let plain = crate::storage::blob::encode_migration(b"state");
        assert!(matches!(
            import([1; 32], &[plain]).unwrap_err(),
            PieceError::NotSealed
        ));
    }

    #[test]
    fn a_save_never_opens_as_a_migration_nor_the_reverse() {
        let (_, dest) = keys();
        let id = [5; 32];
        let mut e = Exporter::new(id, dest.public(), Purpose::Save).unwrap();
        let save = [
            e.seal_state(1, b"perm").unwrap(),
            e.seal_state(2, b"vol").unwrap(),
            e.seal_final().unwrap(),
        ];
        assert_eq!(Purpose::of(&save[0]), Some(Purpose::Save));
        assert!(matches!(
            import(id, &save),
            Err(PieceError::WrongPurpose { .. })
        ));
        // Relabelled as a migration blob, the MAC chain fails.
        let mut relabelled = save.to_vec();
        for b in &mut relabelled {
            b[..8].copy_from_slice(MAGIC);
        }
        assert!(import(id, &relabelled).is_err());
        let mut imp = Importer::new(id, Purpose::Save);
        for (i, b) in save.iter().enumerate() {
            imp.accept(i as u32 + 1, b, dest).unwrap();
        }
        assert!(imp.complete());
        let (migration, _) = export(id, b"perm", b"vol");
        let mut imp = Importer::new(id, Purpose::Save);
        assert!(matches!(
            imp.accept(1, &migration[0], dest),
            Err(PieceError::WrongPurpose { .. })
        ));
    }

    #[test]
    fn poisoned_after_failure() {
        let (a, _) = export([3; 32], b"p", b"v");
        let (_, dest) = keys();
        let mut imp = Importer::new([3; 32], Purpose::Migration);
        let mut bad = a[0].clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(imp.accept(1, &bad, dest).is_err());
        assert!(matches!(
            imp.accept(1, &a[0], dest),
            Err(PieceError::Poisoned)
        ));
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
        assert!(matches!(
            import([4; 32], &[long]).unwrap_err(),
            PieceError::Malformed("trailing bytes")
        ));
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 200]);
        assert!(import([4; 32], &[garbage]).is_err());
        assert_eq!(peek_id(&a[0]), Some([4; 32]));
        assert_eq!(peek_id(b"junk"), None);
    }
}
