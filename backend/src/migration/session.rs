//! The migration lifecycle of one vTPM instance (seed 002, FIG. 10-17):
//!
//! ```text
//! source:      running ─outgoing─▶ prepared ─1st GET_STATEBLOB─▶ source-locked
//!                 ▲                                                  │ all 3 fetched
//!                 └──── LOCK_STORAGE / abort ◀── exported ◀──────────┘
//!                 ▲                                │ SHUTDOWN (QEMU quits)
//!                 │ abort                          ▼
//!                 └──────────────────────── awaiting-receipt (also after a restart)
//!                                                  │ receipt (complete)
//!                                                  ▼
//!                                            migrated-out (state erased, tombstone)
//! destination: destination-locked ─incoming-info─▶ (id issued) ─SET ×3, digest ok, INIT─▶ running
//! ```
//!
//! A locked instance executes no TPM command. The destination unlocks only
//! when the digest it recomputed equals the one carried in the final piece;
//! its migration id is then consumed, so the same stream cannot load twice.
//! The source erases its copy only on the destination's signed receipt,
//! which the destination issues once the received state is durable; until
//! then a marker in the state directory ([`PendingHandover`]) keeps the
//! source from starting again, even across a restart.

use super::piece::{Exporter, Importer, MigrationId, PieceError, PreloadedKeys, Purpose, ID_LEN};
use crate::engine::TpmResult;
use rsa::RsaPublicKey;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;
use vtpm_common::admin::{
    IncomingInfo, KeysPreloaded, Phase, Prepared, Receipt, Status, Tombstone,
};
use vtpm_common::hex;
use vtpm_common::hostkey::{self as keys, KeyError, LazyHostKey};
use vtpm_common::statedir::{self, PendingHandover};
use zeroize::Zeroizing;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("no --host-key configured (make one with `vtpmctl keygen --out DIR` and start vtpmd with --host-key DIR/host-key.pem)")]
    NoHostKey,
    #[error("not waiting for an incoming migration (start vtpmd with --migration incoming)")]
    NotIncoming,
    #[error("an incoming migration is already being received")]
    AlreadyReceiving,
    #[error("not waiting for an incoming migration with an issued id (run vtpmctl incoming-info first), or its state is already arriving")]
    NoIssuedId,
    #[error(
        "'wrapped_key' is not a hex string (pass the wrapped_key that vtpmctl outgoing printed)"
    )]
    BadWrappedKey,
    #[error("no random numbers from the OS")]
    Random,
    #[error(
        "cannot prepare a migration while {0:?} (vtpmctl abort first, or wait for the running one)"
    )]
    CannotPrepare(Phase),
    #[error("the peer key is this host's own key (pass the destination's public_key from its vtpmctl incoming-info)")]
    OwnKey,
    #[error("unknown blob type {0} (1 permanent, 2 volatile, 3 final)")]
    UnknownBlobType(u32),
    #[error("reading the TPM state to seal failed (libtpms result {0:#x})")]
    Snapshot(TpmResult),
    #[error("state export refused while {0:?}")]
    ExportRefused(Phase),
    #[error("SET_STATEBLOB refused: this instance is {0:?}, not waiting for a migration")]
    NotDestination(Phase),
    #[error("no migration id issued yet (vtpmctl incoming-info)")]
    IdNotIssued,
    #[error("this migration id was already used (issue a new one with vtpmctl incoming-info)")]
    IdUsed,
    #[error("no incoming migration")]
    NoIncoming,
    #[error("destination locked: the incoming state is incomplete or failed verification (migration digest not matched)")]
    Unverified,
    #[error("nothing to abort while {0:?}")]
    NothingToAbort(Phase),
    #[error("no exported migration to complete ({0:?})")]
    NotExported(Phase),
    #[error("the export is not finished (QEMU has not fetched all three blobs)")]
    ExportUnfinished,
    #[error("no completed incoming migration")]
    NoCompletedIncoming,
    #[error("bad migration id: not hex")]
    BadIdHex,
    #[error("bad migration id: must be 32 bytes (64 hex digits)")]
    BadIdLength,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Piece(#[from] PieceError),
    #[error("receipt rejected: {0}")]
    Receipt(&'static str),
    #[error("the migration marker in the state directory is damaged: {0} (inspect it; `vtpmctl abort --state-dir DIR` forgets it if the VM does not run elsewhere)")]
    BadMarker(&'static str),
}

/// What the state directory must record when the VMM quits.
#[derive(Debug)]
pub enum Handover {
    /// The state was handed out: keep it, locked, until the receipt.
    Keep(PendingHandover),
    /// A prepared migration never handed the whole state out: forget it.
    Forget,
    /// Nothing to record.
    Nothing,
}

enum State {
    Running,
    Prepared {
        id: MigrationId,
        peer: RsaPublicKey,
        peer_pem: String,
        /// Instance keys made and wrapped at preparation, so the RSA work
        /// happens before the VM stops rather than in its downtime.
        exporter: Box<Exporter>,
    },
    Source {
        id: MigrationId,
        peer: RsaPublicKey,
        peer_pem: String,
        digest: [u8; 32],
        blobs: Vec<Vec<u8>>,
        fetched: [bool; 3],
    },
    /// The hand-over happened (or may have) and awaits the receipt.
    Held {
        id: MigrationId,
        peer: RsaPublicKey,
        peer_pem: String,
        digest: Option<[u8; 32]>,
    },
    MigratedOut {
        id: MigrationId,
    },
    Destination {
        issued: Option<MigrationId>,
        importer: Option<Box<Importer>>,
        /// Keys unwrapped ahead of the stream (`incoming-key`).
        preloaded: Option<PreloadedKeys>,
    },
}

/// Migration configuration and lifecycle of the instance.
pub struct Session {
    host: Option<Arc<LazyHostKey>>,
    trusted: Option<PathBuf>,
    allow_plain: bool,
    state: State,
    /// The last completed import, for the receipt.
    imported: Option<(MigrationId, [u8; 32])>,
    consumed: Vec<MigrationId>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({:?})", self.phase())
    }
}

fn parse_id(s: &str) -> Result<MigrationId, SessionError> {
    let v = hex::decode(s.trim()).map_err(|_| SessionError::BadIdHex)?;
    v.try_into().map_err(|_| SessionError::BadIdLength)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Session {
    pub fn new(
        host: Option<Arc<LazyHostKey>>,
        trusted: Option<PathBuf>,
        allow_plain: bool,
        incoming: bool,
    ) -> Session {
        let state = if incoming {
            State::Destination {
                issued: None,
                importer: None,
                preloaded: None,
            }
        } else {
            State::Running
        };
        Session {
            host,
            trusted,
            allow_plain,
            state,
            imported: None,
            consumed: Vec::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Running => Phase::Running,
            State::Prepared { .. } => Phase::Prepared,
            State::Source { fetched, .. } if fetched.iter().all(|f| *f) => Phase::Exported,
            State::Source { .. } => Phase::SourceLocked,
            State::MigratedOut { .. } => Phase::MigratedOut,
            State::Destination { .. } => Phase::DestinationLocked,
            State::Held { .. } => Phase::AwaitingReceipt,
        }
    }

    /// The marker the state directory keeps while a migration is
    /// unresolved (prepared, handed out or awaiting the receipt).
    pub fn marker(&self) -> Option<PendingHandover> {
        let (id, peer_pem, digest, exported) = match &self.state {
            State::Prepared { id, peer_pem, .. } => (id, peer_pem, None, false),
            State::Source {
                id,
                peer_pem,
                digest,
                fetched,
                ..
            } => (id, peer_pem, Some(*digest), fetched.iter().all(|f| *f)),
            State::Held {
                id,
                peer_pem,
                digest,
                ..
            } => (id, peer_pem, *digest, digest.is_some()),
            _ => return None,
        };
        Some(PendingHandover {
            migration_id: hex::encode(id),
            peer_key: peer_pem.clone(),
            digest: digest.filter(|_| exported).map(|d| hex::encode(&d)),
            exported,
        })
    }

    /// Start-up with a marker in the state directory: the previous process
    /// stopped with a migration unresolved, so this one holds the TPM
    /// until the receipt or an abort.
    pub fn restore(&mut self, m: &PendingHandover) -> Result<(), SessionError> {
        let id = parse_id(&m.migration_id).map_err(|_| SessionError::BadMarker("migration id"))?;
        let peer = keys::parse_public(&m.peer_key, "peer key")
            .map_err(|_| SessionError::BadMarker("peer key"))?;
        let digest = match &m.digest {
            None => None,
            Some(d) => Some(
                hex::decode(d)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or(SessionError::BadMarker("digest"))?,
            ),
        };
        log::warn!(
            "migration {} to {} is unresolved: the TPM stays stopped until `vtpmctl complete` (with the destination's receipt) or `vtpmctl abort`",
            m.migration_id,
            keys::fingerprint(&peer)
        );
        self.state = State::Held {
            id,
            peer,
            peer_pem: m.peer_key.clone(),
            digest,
        };
        Ok(())
    }

    /// Start-up on a directory with a reservation (`vtpmctl
    /// reserve-incoming`, made before libvirt started this process): a
    /// sealed destination for migration `id`, issued then.
    pub fn expect_reserved(&mut self, id: &str) -> Result<(), SessionError> {
        self.host()?;
        let id = parse_id(id)?;
        self.state = State::Destination {
            issued: Some(id),
            importer: None,
            preloaded: None,
        };
        Ok(())
    }

    /// Whether TPM commands and ordinary INITs may run.
    pub fn unlocked(&self) -> bool {
        matches!(self.state, State::Running | State::Prepared { .. })
    }

    /// The host key, shared with the instance's saves.
    pub fn host_key(&self) -> Option<Arc<LazyHostKey>> {
        self.host.clone()
    }

    pub fn has_host_key(&self) -> bool {
        self.host.is_some()
    }

    pub fn allow_plain(&self) -> bool {
        self.allow_plain
    }

    fn host(&self) -> Result<Arc<LazyHostKey>, SessionError> {
        self.host.clone().ok_or(SessionError::NoHostKey)
    }

    /// Destination: a fresh single-use migration id and this host's key.
    pub fn issue_incoming(&mut self) -> Result<IncomingInfo, SessionError> {
        let lazy = self.host()?;
        let host = lazy.get()?;
        match &self.state {
            State::Destination { importer: None, .. } => {}
            State::Destination {
                importer: Some(_), ..
            } => return Err(SessionError::AlreadyReceiving),
            _ => return Err(SessionError::NotIncoming),
        }
        let mut id = [0u8; ID_LEN];
        vtpm_common::aead::random_bytes(&mut id).map_err(|_| SessionError::Random)?;
        self.state = State::Destination {
            issued: Some(id),
            importer: None,
            preloaded: None,
        };
        Ok(IncomingInfo {
            migration_id: hex::encode(&id),
            public_key: host.public_pem(),
            key_fingerprint: host.fingerprint(),
        })
    }

    /// Destination: unwraps the instance keys `vtpmctl outgoing` printed
    /// (`wrapped_key`) before the stream arrives, so the RSA private-key
    /// operation happens while the VM still runs on the source instead of
    /// in its downtime. Optional: without it blob 1's key is unwrapped on
    /// arrival.
    pub fn preload_key(&mut self, wrapped_hex: &str) -> Result<KeysPreloaded, SessionError> {
        let lazy = self.host()?;
        let host = lazy.get()?;
        let State::Destination {
            issued: Some(id),
            importer: None,
            preloaded,
        } = &mut self.state
        else {
            return Err(SessionError::NoIssuedId);
        };
        let wrapped = hex::decode(wrapped_hex.trim()).map_err(|_| SessionError::BadWrappedKey)?;
        *preloaded = Some(PreloadedKeys::open(host, &wrapped)?);
        Ok(KeysPreloaded {
            state: Phase::DestinationLocked,
            migration_id: hex::encode(id),
            keys: "unwrapped".into(),
        })
    }

    /// Source: prepares a migration to exactly the destination that issued `id`.
    pub fn prepare_outgoing(&mut self, peer_pem: &str, id: &str) -> Result<Prepared, SessionError> {
        if !matches!(self.state, State::Running | State::Prepared { .. }) {
            return Err(SessionError::CannotPrepare(self.phase()));
        }
        let id = parse_id(id)?;
        let peer = keys::parse_public(peer_pem, "peer key")?;
        if let Some(dir) = &self.trusted {
            keys::check_trusted(dir, &peer)?;
        }
        if let Some(h) = &self.host {
            if keys::fingerprint(&peer) == h.get()?.fingerprint() {
                return Err(SessionError::OwnKey);
            }
        }
        let fpr = keys::fingerprint(&peer);
        let exporter = Box::new(Exporter::new(id, &peer, Purpose::Migration)?);
        let wrapped = hex::encode(exporter.wrapped_key());
        self.state = State::Prepared {
            id,
            peer,
            peer_pem: peer_pem.to_string(),
            exporter,
        };
        Ok(Prepared {
            state: Phase::Prepared,
            migration_id: hex::encode(&id),
            peer_key: fpr,
            wrapped_key: wrapped,
        })
    }

    /// Source, GET_STATEBLOB: the sealed blob of `blob_type` (1..=3). The
    /// first call locks the instance and seals everything from `snapshot`
    /// (permanent, volatile). `Ok(None)`: no migration prepared.
    pub fn export(
        &mut self,
        blob_type: u32,
        snapshot: impl FnOnce() -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>), TpmResult>,
    ) -> Result<Option<Vec<u8>>, SessionError> {
        if !(1..=3).contains(&blob_type) {
            return Err(SessionError::UnknownBlobType(blob_type));
        }
        if matches!(self.state, State::Prepared { .. }) {
            let (perm, vol) = snapshot().map_err(SessionError::Snapshot)?;
            let State::Prepared {
                id,
                peer,
                peer_pem,
                mut exporter,
            } = std::mem::replace(&mut self.state, State::Running)
            else {
                unreachable!("checked to be Prepared just above");
            };
            // Sealing is AES and HMAC only: the keys were wrapped when the
            // migration was prepared. A failure here drops the preparation.
            let blobs = vec![
                exporter.seal_state(1, &perm)?,
                exporter.seal_state(2, &vol)?,
                exporter.seal_final()?,
            ];
            log::info!(
                "migration {}: source locked, state sealed for {}",
                hex::encode(&id),
                keys::fingerprint(&peer)
            );
            self.state = State::Source {
                id,
                peer,
                peer_pem,
                digest: exporter.digest(),
                blobs,
                fetched: [false; 3],
            };
        }
        match &mut self.state {
            State::Source { blobs, fetched, .. } => {
                let i = blob_type as usize - 1;
                fetched[i] = true;
                Ok(Some(blobs[i].clone()))
            }
            State::Running => Ok(None),
            _ => Err(SessionError::ExportRefused(self.phase())),
        }
    }

    /// Destination, SET_STATEBLOB.
    pub fn import(&mut self, blob_type: u32, data: &[u8]) -> Result<(), SessionError> {
        let lazy = self.host()?;
        let host = lazy.get()?;
        let State::Destination {
            issued,
            importer,
            preloaded,
        } = &mut self.state
        else {
            return Err(SessionError::NotDestination(self.phase()));
        };
        let id = issued.ok_or(SessionError::IdNotIssued)?;
        if self.consumed.contains(&id) {
            return Err(SessionError::IdUsed);
        }
        let imp = importer.get_or_insert_with(|| {
            Box::new(Importer::with_keys(
                id,
                Purpose::Migration,
                preloaded.take(),
            ))
        });
        imp.accept(blob_type, data, host)?;
        Ok(())
    }

    /// Destination, INIT: the verified state, if the digests matched. On
    /// success the instance unlocks and the id is consumed.
    #[allow(clippy::type_complexity)]
    pub fn take_verified(
        &mut self,
    ) -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>, MigrationId), SessionError> {
        let State::Destination {
            issued, importer, ..
        } = &mut self.state
        else {
            return Err(SessionError::NoIncoming);
        };
        let Some(imp) = importer.as_mut().filter(|i| i.complete()) else {
            return Err(SessionError::Unverified);
        };
        let id = issued.ok_or(SessionError::IdNotIssued)?;
        let perm = std::mem::take(&mut imp.permanent);
        let vol = std::mem::take(&mut imp.volatile);
        self.imported = Some((id, imp.digest()));
        self.consumed.push(id);
        self.state = State::Running;
        Ok((perm, vol, id))
    }

    /// Destination: INIT failed after take_verified; stay locked.
    pub fn relock_destination(&mut self) {
        self.state = State::Destination {
            issued: None,
            importer: None,
            preloaded: None,
        };
        self.imported = None;
    }

    /// Source: the VM resumed here (LOCK_STORAGE) or the admin aborted.
    /// Returns true if a lock was released.
    pub fn resume_source(&mut self) -> bool {
        match &self.state {
            State::Source { id, .. } => {
                log::warn!(
                    "migration {}: abandoned, the source keeps its TPM",
                    hex::encode(id)
                );
                self.state = State::Running;
                true
            }
            _ => false,
        }
    }

    /// Admin abort: also forgets a prepared migration, or one a previous
    /// process left unresolved (the operator knows the VM did not resume
    /// on the destination).
    pub fn abort(&mut self) -> Result<(), SessionError> {
        match self.state {
            State::Prepared { .. } | State::Held { .. } => {
                self.state = State::Running;
                Ok(())
            }
            State::Source { .. } => {
                self.resume_source();
                Ok(())
            }
            _ => Err(SessionError::NothingToAbort(self.phase())),
        }
    }

    /// Source, `vtpmctl complete`: checks the destination's receipt; the
    /// caller then erases the state and writes the tombstone.
    pub fn complete(&mut self, r: &Receipt) -> Result<Tombstone, SessionError> {
        let (id, peer, digest) = match &self.state {
            State::Source {
                id, peer, digest, ..
            } if self.phase() == Phase::Exported => (*id, peer, Some(*digest)),
            State::Source { .. } => return Err(SessionError::ExportUnfinished),
            State::Held {
                id, peer, digest, ..
            } => (*id, peer, *digest),
            _ => return Err(SessionError::NotExported(self.phase())),
        };
        statedir::verify_receipt(&id, peer, digest.as_ref().map(|d| &d[..]), r)
            .map_err(SessionError::Receipt)?;
        let t = Tombstone {
            migrated_out: true,
            migration_id: hex::encode(&id),
            destination_key: keys::fingerprint(peer),
            digest: r.digest.clone(),
            confirmed_by: "receipt".into(),
            unix_time: now(),
        };
        self.state = State::MigratedOut { id };
        Ok(t)
    }

    /// Source, SHUTDOWN (the VMM quits): after a completed export the
    /// state stays, locked, until the receipt; a migration that never
    /// handed the whole state out is forgotten.
    pub fn on_vmm_quit(&mut self) -> Handover {
        match self.phase() {
            Phase::Exported => {
                let State::Source {
                    id,
                    peer,
                    peer_pem,
                    digest,
                    ..
                } = std::mem::replace(&mut self.state, State::Running)
                else {
                    unreachable!("Exported is a Source state");
                };
                self.state = State::Held {
                    id,
                    peer,
                    peer_pem,
                    digest: Some(digest),
                };
                self.marker().map_or(Handover::Nothing, Handover::Keep)
            }
            Phase::Prepared | Phase::SourceLocked => {
                self.state = State::Running;
                Handover::Forget
            }
            _ => Handover::Nothing,
        }
    }

    /// Destination, `vtpmctl receipt`.
    pub fn receipt(&self) -> Result<Receipt, SessionError> {
        let (id, digest) = self.imported.ok_or(SessionError::NoCompletedIncoming)?;
        let lazy = self.host()?;
        let host = lazy.get()?;
        let sig = host.sign(&statedir::receipt_message(&id, &digest))?;
        Ok(Receipt {
            migration_id: hex::encode(&id),
            digest: hex::encode(&digest),
            destination_key: host.fingerprint(),
            signature: hex::encode(&sig),
        })
    }

    pub fn status(&self, tpm_running: bool) -> Status {
        let (id, digest, peer) = match &self.state {
            State::Prepared { id, peer, .. } => (Some(*id), None, Some(keys::fingerprint(peer))),
            State::Source {
                id, peer, digest, ..
            } => (Some(*id), Some(*digest), Some(keys::fingerprint(peer))),
            State::MigratedOut { id } => (Some(*id), None, None),
            State::Held {
                id, peer, digest, ..
            } => (Some(*id), *digest, Some(keys::fingerprint(peer))),
            State::Destination { issued, .. } => (*issued, None, None),
            State::Running => (self.imported.map(|i| i.0), self.imported.map(|i| i.1), None),
        };
        Status {
            state: self.phase(),
            migration_id: id.map(|i| hex::encode(&i)),
            digest: digest.map(|d| hex::encode(&d)),
            peer_key: peer,
            host_key: self
                .host
                .as_ref()
                .and_then(|h| h.get().ok())
                .map(|h| h.fingerprint()),
            tpm_running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::piece::test_keys::keys as test_keys;

    fn pair() -> (Session, Session) {
        let (a, b) = test_keys();
        let a = Arc::new(LazyHostKey::ready(a.clone(), "a".as_ref()));
        let b = Arc::new(LazyHostKey::ready(b.clone(), "b".as_ref()));
        (
            Session::new(Some(a), None, false, false),
            Session::new(Some(b), None, false, true),
        )
    }

    type Snapshot = Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>), TpmResult>;

    fn snap() -> Snapshot {
        Ok((
            Zeroizing::new(b"permanent".to_vec()),
            Zeroizing::new(b"volatile".to_vec()),
        ))
    }

    fn migrate(src: &mut Session, dst: &mut Session) -> Vec<Vec<u8>> {
        let info = dst.issue_incoming().unwrap();
        src.prepare_outgoing(&info.public_key, &info.migration_id)
            .unwrap();
        (1..=3)
            .map(|t| src.export(t, snap).unwrap().unwrap())
            .collect()
    }

    #[test]
    fn full_lifecycle_with_receipt() {
        let (mut src, mut dst) = pair();
        assert_eq!(src.phase(), Phase::Running);
        assert_eq!(dst.phase(), Phase::DestinationLocked);
        let blobs = migrate(&mut src, &mut dst);
        assert_eq!(src.phase(), Phase::Exported);
        assert!(!src.unlocked());
        assert!(dst.take_verified().is_err(), "nothing imported yet");
        for (i, b) in blobs.iter().enumerate() {
            dst.import(i as u32 + 1, b).unwrap();
        }
        let (p, v, _) = dst.take_verified().unwrap();
        assert_eq!((&p[..], &v[..]), (&b"permanent"[..], &b"volatile"[..]));
        assert!(dst.unlocked());
        let r = dst.receipt().unwrap();
        let mut forged = r.clone();
        forged.digest = "00".repeat(32);
        assert!(matches!(
            src.complete(&forged),
            Err(SessionError::Receipt(_))
        ));
        let t = src.complete(&r).unwrap();
        assert_eq!(t.migration_id, r.migration_id);
        assert_eq!(src.phase(), Phase::MigratedOut);
    }

    #[test]
    fn unprepared_export_is_plain_path_and_resume_releases_the_lock() {
        let (mut src, mut dst) = pair();
        assert_eq!(src.export(1, snap).unwrap(), None);
        let _ = migrate(&mut src, &mut dst);
        assert!(src.resume_source());
        assert_eq!(src.phase(), Phase::Running);
        assert!(matches!(src.on_vmm_quit(), Handover::Nothing));
    }

    #[test]
    fn replay_into_second_destination_and_twice_into_one() {
        let (mut src, mut dst) = pair();
        let blobs = migrate(&mut src, &mut dst);
        let (_, b) = test_keys();
        let mut dst2 = Session::new(
            Some(Arc::new(LazyHostKey::ready(b.clone(), "b".as_ref()))),
            None,
            false,
            true,
        );
        dst2.issue_incoming().unwrap();
        assert!(
            dst2.import(1, &blobs[0]).is_err(),
            "another destination's id"
        );
        for (i, blob) in blobs.iter().enumerate() {
            dst.import(i as u32 + 1, blob).unwrap();
        }
        dst.take_verified().unwrap();
        assert!(
            dst.import(1, &blobs[0]).is_err(),
            "unlocked instance takes no blobs"
        );
    }

    #[test]
    fn bad_admin_input() {
        let (mut src, mut dst) = pair();
        assert!(src.prepare_outgoing("junk", &"00".repeat(32)).is_err());
        let info = dst.issue_incoming().unwrap();
        let pem = &info.public_key;
        assert!(matches!(
            src.prepare_outgoing(pem, "xyz"),
            Err(SessionError::BadIdHex)
        ));
        assert!(matches!(
            src.prepare_outgoing(pem, "00"),
            Err(SessionError::BadIdLength)
        ));
        assert!(
            src.issue_incoming().is_err(),
            "a running source issues no ids"
        );
        assert!(src
            .complete(&dst.receipt().unwrap_or(Receipt {
                migration_id: String::new(),
                digest: String::new(),
                destination_key: String::new(),
                signature: String::new()
            }))
            .is_err());
        assert!(src.abort().is_err());
    }
}
