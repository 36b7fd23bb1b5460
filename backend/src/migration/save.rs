//! Saves: the TPM state sealed to this host, for `virsh save`,
//! managedsave and snapshots (GET_STATEBLOB without a prepared migration).
//!
//! ```text
//!  GET 1 ─▶ seal perm + vol + final with fresh keys wrapped to this host's
//!           own key (Purpose::Save); blobs 2 and 3 come from that seal
//!  SET 1 ─▶ start a restore: the save id from blob 1's header; blobs 1..3
//!           verified as a migration's are (MAC chain, digest)
//!  INIT  ─▶ take_restored: the state, with its SaveId for the caller's
//!           identity and rollback checks
//! ```
//!
//! A save opens with this host's key or with one of the keys the operator
//! listed for restores (`--restore-keys DIR`, by default `restore/` next to
//! the host key: the keys of earlier hosts or of a replaced host key), the
//! one whose fingerprint the save names.
//!
//! A save's 32-byte id is `instance_id[16] | generation (be64) | nonce[8]`:
//! it goes into the MAC chain's start and every piece's MAC, so the
//! instance and generation a blob claims are authenticated with it. The
//! TPM keeps running: a save is a copy, not a move.

use super::piece::{
    peek_fingerprint, peek_id, Exporter, Importer, MigrationId, PieceError, Purpose,
};
use std::sync::Arc;
use thiserror::Error;
use vtpm_common::hex;
use vtpm_common::hostkey::{KeyError, LazyHostKey};
use zeroize::Zeroizing;

pub const INSTANCE_ID_LEN: usize = 16;
pub type InstanceId = [u8; INSTANCE_ID_LEN];

#[derive(Debug, Error)]
pub enum SaveError {
    #[error("no host key to seal the state to, so it is not handed out (a save file would hold the TPM's secrets in clear). Fix: make this host's key with `vtpmctl keygen --system` as root (in /var/lib/vtpm-hostkey, or $VTPM_HOST_KEY_DIR; `vtpm-libvirt enable` does it for libvirt), pass --host-key FILE, or pass --allow-plaintext-migration to hand it out unencrypted as swtpm does")]
    NoHostKey,
    #[error("the host key does not load: {0} (make it with `vtpmctl keygen --system` as root, or `vtpm-libvirt enable` for libvirt's TPM user, which must be able to read it)")]
    Key(#[from] KeyError),
    #[error("sealing or opening the saved state failed: {0}")]
    Piece(#[from] PieceError),
    #[error("no random numbers from the OS")]
    Random,
    #[error("unknown blob type {0} (1 permanent, 2 volatile, 3 final)")]
    UnknownBlobType(u32),
    #[error(
        "blob {0} of a saved state arrived without its blob 1 (restore the save file as a whole)"
    )]
    NotStarted(u32),
    #[error("the restored state is incomplete or failed verification (a damaged or altered save file); the TPM keeps the state it had")]
    Incomplete,
}

/// What a save is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveId {
    pub instance: InstanceId,
    pub generation: u64,
    pub nonce: [u8; 8],
}

impl SaveId {
    /// A new save of `instance` at `generation`.
    pub fn new(instance: InstanceId, generation: u64) -> Result<SaveId, SaveError> {
        let mut nonce = [0; 8];
        getrandom::getrandom(&mut nonce).map_err(|_| SaveError::Random)?;
        Ok(SaveId {
            instance,
            generation,
            nonce,
        })
    }

    fn to_id(self) -> MigrationId {
        let mut id = [0; 32];
        id[..16].copy_from_slice(&self.instance);
        id[16..24].copy_from_slice(&self.generation.to_be_bytes());
        id[24..].copy_from_slice(&self.nonce);
        id
    }

    fn from_id(id: &MigrationId) -> SaveId {
        let mut instance = [0; 16];
        instance.copy_from_slice(&id[..16]);
        let mut generation = [0; 8];
        generation.copy_from_slice(&id[16..24]);
        let mut nonce = [0; 8];
        nonce.copy_from_slice(&id[24..]);
        SaveId {
            instance,
            generation: u64::from_be_bytes(generation),
            nonce,
        }
    }

    pub fn instance_hex(&self) -> String {
        hex::encode(&self.instance)
    }
}

/// The blobs of the save being handed out.
struct Handout {
    blobs: Vec<Vec<u8>>,
    fetched: [bool; 3],
}

struct Restore {
    save: SaveId,
    importer: Importer,
    /// The key the save is wrapped to: this host's or a listed one.
    key: Arc<LazyHostKey>,
}

/// Saves and restores of one instance.
pub struct Saves {
    host: Option<Arc<LazyHostKey>>,
    /// Keys the operator listed for restores (not used to seal).
    restore_keys: Vec<Arc<LazyHostKey>>,
    handout: Option<Handout>,
    restore: Option<Restore>,
}

impl std::fmt::Debug for Saves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Saves(host key: {}, restoring: {})",
            self.host.is_some(),
            self.restore.is_some()
        )
    }
}

fn check_type(blob_type: u32) -> Result<usize, SaveError> {
    match blob_type {
        1..=3 => Ok(blob_type as usize - 1),
        t => Err(SaveError::UnknownBlobType(t)),
    }
}

impl Saves {
    pub fn new(host: Option<Arc<LazyHostKey>>) -> Saves {
        Saves {
            host,
            restore_keys: Vec::new(),
            handout: None,
            restore: None,
        }
    }

    /// Also opens saves wrapped to these keys.
    pub fn with_restore_keys(mut self, keys: Vec<Arc<LazyHostKey>>) -> Saves {
        self.restore_keys = keys;
        self
    }

    /// The key among this host's and the listed ones whose fingerprint is
    /// `fpr`; this host's if none is (the importer then says whose it is).
    fn key_for(&self, fpr: Option<[u8; 32]>) -> Result<Arc<LazyHostKey>, SaveError> {
        let host = self.host.clone().ok_or(SaveError::NoHostKey)?;
        let Some(fpr) = fpr else {
            return Ok(host);
        };
        for k in std::iter::once(&host).chain(&self.restore_keys) {
            match k.get() {
                Ok(key) if vtpm_common::hostkey::fingerprint_bytes(key.public()) == fpr => {
                    return Ok(k.clone())
                }
                Ok(_) => {}
                Err(e) => log::warn!("restore key {}: {e}", k.path().display()),
            }
        }
        Ok(host)
    }

    /// Whether states can be sealed to this host.
    pub fn available(&self) -> bool {
        self.host.is_some()
    }

    /// The fingerprint of the key saves are sealed to, if it loads.
    pub fn host_fingerprint(&self) -> Option<String> {
        self.host
            .as_ref()
            .and_then(|h| h.get().ok())
            .map(|k| k.fingerprint())
    }

    /// Blob `blob_type` (2 or 3) of the save being handed out; blob 1
    /// always starts a new save. Once all three went out the save is
    /// forgotten.
    pub fn handed_out(&mut self, blob_type: u32) -> Option<Vec<u8>> {
        let i = check_type(blob_type).ok().filter(|i| *i > 0)?;
        let h = self.handout.as_mut()?;
        h.fetched[i] = true;
        let blob = h.blobs[i].clone();
        if h.fetched.iter().all(|f| *f) {
            self.handout = None;
        }
        Some(blob)
    }

    /// Seals `perm` and `vol` as save `save` and returns blob
    /// `blob_type`; the other two wait for their GET_STATEBLOB.
    pub fn seal(
        &mut self,
        save: SaveId,
        perm: &[u8],
        vol: &[u8],
        blob_type: u32,
    ) -> Result<Vec<u8>, SaveError> {
        let i = check_type(blob_type)?;
        let lazy = self.host.clone().ok_or(SaveError::NoHostKey)?;
        let host = lazy.get()?;
        let mut e = Exporter::new(save.to_id(), host.public(), Purpose::Save)?;
        let blobs = vec![
            e.seal_state(1, perm)?,
            e.seal_state(2, vol)?,
            e.seal_final()?,
        ];
        let mut fetched = [false; 3];
        fetched[i] = true;
        let blob = blobs[i].clone();
        self.handout = Some(Handout { blobs, fetched });
        Ok(blob)
    }

    /// SET_STATEBLOB of a saved state: blob 1 starts a restore (and
    /// replaces an unfinished one), 2 and 3 continue it. A failure leaves
    /// the restore poisoned, so the INIT that follows fails.
    pub fn accept(&mut self, blob_type: u32, data: &[u8]) -> Result<(), SaveError> {
        check_type(blob_type)?;
        if self.host.is_none() {
            return Err(SaveError::NoHostKey);
        }
        if blob_type == 1 {
            let id = peek_id(data).ok_or(SaveError::Piece(PieceError::NotSealed))?;
            let key = self.key_for(peek_fingerprint(data))?;
            self.restore = Some(Restore {
                save: SaveId::from_id(&id),
                importer: Importer::new(id, Purpose::Save),
                key,
            });
        }
        let r = self
            .restore
            .as_mut()
            .ok_or(SaveError::NotStarted(blob_type))?;
        let key = r.key.get()?;
        r.importer.accept(blob_type, data, key)?;
        Ok(())
    }

    /// Whether a restore was started (INIT then finishes it).
    pub fn restoring(&self) -> bool {
        self.restore.is_some()
    }

    /// INIT after a restore: the verified state and what it is bound to.
    /// The restore is over either way.
    #[allow(clippy::type_complexity)]
    pub fn take_restored(
        &mut self,
    ) -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>, SaveId), SaveError> {
        let mut r = self.restore.take().ok_or(SaveError::Incomplete)?;
        if !r.importer.complete() {
            return Err(SaveError::Incomplete);
        }
        let perm = std::mem::take(&mut r.importer.permanent);
        let vol = std::mem::take(&mut r.importer.volatile);
        Ok((perm, vol, r.save))
    }

    /// Drops an unfinished restore (the TPM runs on its own state).
    pub fn abandon(&mut self) {
        self.restore = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::piece::test_keys::keys;
    use std::io::Write;

    fn lazy(which: usize) -> Arc<LazyHostKey> {
        let k = if which == 0 { &keys().0 } else { &keys().1 };
        Arc::new(LazyHostKey::ready(k.clone(), std::path::Path::new("test")))
    }

    fn save(s: &mut Saves, id: SaveId, perm: &[u8]) -> Vec<Vec<u8>> {
        let b1 = s.seal(id, perm, b"vol", 1).unwrap();
        vec![b1, s.handed_out(2).unwrap(), s.handed_out(3).unwrap()]
    }

    fn restore(s: &mut Saves, blobs: &[Vec<u8>]) -> Result<SaveId, SaveError> {
        for (i, b) in blobs.iter().enumerate() {
            s.accept(i as u32 + 1, b)?;
        }
        s.take_restored().map(|r| r.2)
    }

    #[test]
    fn round_trip_binds_instance_and_generation() {
        let mut s = Saves::new(Some(lazy(0)));
        let id = SaveId::new([7; 16], 42).unwrap();
        let blobs = save(&mut s, id, b"perm");
        assert!(s.handed_out(2).is_none(), "forgotten once all went out");
        assert_eq!(SaveId::from_id(&id.to_id()), id);
        let mut r = Saves::new(Some(lazy(0)));
        for (i, b) in blobs.iter().enumerate() {
            r.accept(i as u32 + 1, b).unwrap();
        }
        let (perm, vol, got) = r.take_restored().unwrap();
        assert_eq!((&perm[..], &vol[..], got), (&b"perm"[..], &b"vol"[..], id));
        assert!(!r.restoring());
    }

    #[test]
    fn another_host_a_flipped_byte_or_an_edited_header_is_refused() {
        let mut s = Saves::new(Some(lazy(0)));
        let id = SaveId::new([1; 16], 3).unwrap();
        let blobs = save(&mut s, id, &[0x5a; 2000]);
        let mut other = Saves::new(Some(lazy(1)));
        assert!(matches!(
            restore(&mut other, &blobs),
            Err(SaveError::Piece(PieceError::WrongHost { .. }))
        ));
        let mut r = Saves::new(Some(lazy(0)));
        for (b, at) in [(0, 600), (1, 100), (2, 90)] {
            let mut t = blobs.clone();
            t[b][at] ^= 1;
            assert!(restore(&mut r, &t).is_err(), "blob {b} byte {at}");
        }
        // Claiming another generation (bytes 26..34 of the header's id)
        // breaks the MAC chain.
        let mut t = blobs.clone();
        t[0][10 + 16 + 7] ^= 1;
        assert!(restore(&mut r, &t).is_err());
        assert!(restore(&mut r, &blobs).is_ok());
    }

    #[test]
    fn a_listed_restore_key_opens_saves_made_under_it() {
        // Saves made while this host had key 1 (or on the host with key 1).
        let mut old = Saves::new(Some(lazy(1)));
        let blobs = save(&mut old, SaveId::new([3; 16], 9).unwrap(), b"kept");
        let mut without = Saves::new(Some(lazy(0)));
        assert!(matches!(
            restore(&mut without, &blobs),
            Err(SaveError::Piece(PieceError::WrongHost { .. }))
        ));
        let mut listed = Saves::new(Some(lazy(0))).with_restore_keys(vec![lazy(1)]);
        assert_eq!(restore(&mut listed, &blobs).unwrap().generation, 9);
        // New saves are sealed to this host's own key, not a listed one.
        let fresh = save(&mut listed, SaveId::new([3; 16], 10).unwrap(), b"new");
        let mut only_own = Saves::new(Some(lazy(0)));
        assert!(restore(&mut only_own, &fresh).is_ok());
    }

    #[test]
    fn out_of_order_truncated_garbage_and_no_key() {
        let mut s = Saves::new(Some(lazy(0)));
        let blobs = save(&mut s, SaveId::new([2; 16], 1).unwrap(), b"p");
        let mut r = Saves::new(Some(lazy(0)));
        assert!(matches!(
            r.accept(2, &blobs[1]),
            Err(SaveError::NotStarted(2))
        ));
        assert!(matches!(
            r.accept(4, &blobs[0]),
            Err(SaveError::UnknownBlobType(4))
        ));
        // Blob 3 missing: INIT finds it incomplete.
        r.accept(1, &blobs[0]).unwrap();
        r.accept(2, &blobs[1]).unwrap();
        assert!(matches!(r.take_restored(), Err(SaveError::Incomplete)));
        for n in [0, 7, 8, 60, blobs[0].len() - 1] {
            assert!(r.accept(1, &blobs[0][..n]).is_err(), "truncated at {n}");
            assert!(r.take_restored().is_err());
        }
        let mut junk = b"VTPMSAV1".to_vec();
        junk.write_all(&[0xee; 500]).unwrap();
        assert!(r.accept(1, &junk).is_err());
        let mut none = Saves::new(None);
        assert!(matches!(
            none.seal(SaveId::new([0; 16], 1).unwrap(), b"", b"", 1),
            Err(SaveError::NoHostKey)
        ));
        assert!(matches!(
            none.accept(1, &blobs[0]),
            Err(SaveError::NoHostKey)
        ));
    }
}
