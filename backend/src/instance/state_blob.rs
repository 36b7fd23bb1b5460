//! State blobs in and out of a vTPM: what GET_STATEBLOB / SET_STATEBLOB and
//! vhost-user's device-state transfer carry.
//!
//! ```text
//!  export_blob ─┬─ migration prepared ──▶ sealed piece (the source locks from the 1st)
//!               ├─ --migration-key ──▶ swtpm's blob encrypted with it
//!               ├─ --allow-plaintext-migration ──▶ swtpm's plain blob (logged)
//!               ├─ host key ──▶ a save sealed to this host (`saves`; the TPM runs on)
//!               └─ otherwise ──▶ refused (ExportNotPrepared)
//!  import_blob ─┬─ a save ("VTPMSAV1") ──▶ verified by `saves`, loaded at INIT
//!               ├─ host key set ──▶ sealed migration pieces only, verified by the session
//!               └─ no host key ──▶ swtpm's blob, plain or under the migration
//!                                  key, for the next power-on
//! ```
//!
//! With `--migration release-lock-outgoing` the state directory lock is
//! given up once the savestate blob (the last) went out.

use super::{BlobKind, InitFlags, InstanceError, TpmState, Vtpm};
use crate::migration::piece::{PieceError, Purpose};
use crate::migration::session::SessionError;
use crate::storage::{blob, swtpm_crypt, VOLATILE};
use vtpm_common::admin::Phase;
use zeroize::Zeroizing;

type Result<T> = std::result::Result<T, InstanceError>;

impl Vtpm {
    /// The blob of `kind` for an outgoing state transfer. `decrypted`:
    /// the caller asked for the state without the state-file key (QEMU
    /// always does).
    pub fn export_blob(&self, kind: BlobKind, decrypted: bool) -> Result<Vec<u8>> {
        let mut st = self.lock();
        if !st.running {
            return Err(InstanceError::NotRunning);
        }
        if self.store.has_key() && !decrypted {
            return Err(InstanceError::ExportEncrypted);
        }
        let TpmState { tpm, session, .. } = &mut *st;
        let sealed = session.export(kind.number(), || {
            let perm = tpm.get_state(BlobKind::Permanent.state_type())?;
            let vol = tpm.get_state(BlobKind::Volatile.state_type())?;
            Ok((Zeroizing::new(perm), Zeroizing::new(vol)))
        })?;
        let out = match sealed {
            Some(blob) => {
                // From the first sealed blob on, this copy is frozen.
                self.store.set_fenced(true);
                Ok(blob)
            }
            None if st.session.allow_plain() || self.opts.migration_key.is_some() => {
                self.plain_blob(&mut st, kind)
            }
            None if st.saves.available() => self.export_save(&mut st, kind),
            None => Err(InstanceError::ExportNotPrepared),
        };
        if kind == BlobKind::SaveState && matches!(out, Ok(_) | Err(InstanceError::NoBlob(_))) {
            self.release_after_export();
        }
        out
    }

    /// swtpm's blob format: encrypted with the migration key if there is
    /// one, else plain (only with --allow-plaintext-migration).
    fn plain_blob(&self, st: &mut TpmState, kind: BlobKind) -> Result<Vec<u8>> {
        if kind == BlobKind::SaveState {
            return Err(InstanceError::NoBlob(kind));
        }
        let state = st
            .tpm
            .get_state(kind.state_type())
            .map_err(InstanceError::Engine)?;
        if state.is_empty() {
            return Err(InstanceError::NoBlob(kind));
        }
        let state = Zeroizing::new(state);
        if kind == BlobKind::Volatile {
            if let Err(err) = self.store.remove_blob(VOLATILE) {
                log::warn!("state export: could not delete the volatile state file: {err}");
            }
        }
        if let Some(key) = &self.opts.migration_key {
            log::info!("state export: the {kind:?} state, encrypted with the --migration-key");
            return swtpm_crypt::encode_migration(key, &state).map_err(blob_error);
        }
        log::warn!(
            "state export: handing out the {kind:?} state UNENCRYPTED (--allow-plaintext-migration)"
        );
        Ok(blob::encode_migration(&state))
    }

    /// Takes in one blob for the next power-on. `foreign_encrypted`: the
    /// sender says it is under a state-file key (which vtpmd never has).
    pub fn import_blob(&self, kind: BlobKind, data: &[u8], foreign_encrypted: bool) -> Result<()> {
        let mut st = self.lock();
        if st.running {
            return Err(InstanceError::Running);
        }
        if foreign_encrypted {
            return Err(InstanceError::ForeignEncrypted);
        }
        self.store.lock().map_err(InstanceError::StorageLock)?;
        if Purpose::of(data) == Some(Purpose::Save) {
            let phase = st.session.phase();
            if phase != Phase::Running {
                return Err(InstanceError::RestoreWhile(phase));
            }
            return st.saves.accept(kind.number(), data).map_err(|e| {
                log::error!("restore refused: {e}");
                InstanceError::Save(e)
            });
        }
        if st.session.has_host_key() {
            // Sealed migration only: no plaintext or swtpm blobs (no downgrade).
            if Purpose::of(data).is_none() {
                let e = SessionError::Piece(PieceError::NotSealed);
                log::error!("state import refused: {e}");
                return Err(e.into());
            }
            return Ok(st.session.import(kind.number(), data)?);
        }
        let result = if data.is_empty() {
            st.tpm.set_state(kind.state_type(), None)
        } else {
            let raw = swtpm_crypt::decode_migration(self.opts.migration_key.as_deref(), data)
                .map_err(blob_error)?;
            st.tpm.set_state(kind.state_type(), Some(&raw))
        };
        match result {
            Ok(()) => {
                if kind == BlobKind::Permanent {
                    st.permanent_set = !data.is_empty();
                }
                Ok(())
            }
            Err(r) => {
                st.permanent_set = false;
                Err(InstanceError::Engine(r))
            }
        }
    }

    /// Every blob an outgoing device-state transfer carries, in order.
    /// The same rules as [`Vtpm::export_blob`]; a plaintext export has no
    /// third blob.
    pub fn export_all(&self) -> Result<Vec<(BlobKind, Vec<u8>)>> {
        let mut blobs: Vec<(BlobKind, Vec<u8>)> = Vec::new();
        for kind in BlobKind::ALL {
            let sealed = blobs.first().is_some_and(|(_, b)| Purpose::of(b).is_some());
            if kind == BlobKind::SaveState && !sealed {
                break;
            }
            blobs.push((kind, self.export_blob(kind, true)?));
        }
        Ok(blobs)
    }

    /// An incoming device-state transfer: every blob, then power-on, as
    /// QEMU's SET_STATEBLOB ×3 + INIT. A sealed destination unlocks only
    /// when the migration digest matches; on failure it stays locked and
    /// forgets its migration id (`vtpmctl incoming-info` issues a new one).
    pub fn import_all(&self, blobs: &[(BlobKind, &[u8])]) -> Result<()> {
        let result = self.import_all_inner(blobs);
        if result.is_err() {
            self.abandon_import();
        }
        result
    }

    /// An incoming transfer failed before or while reaching the instance:
    /// a destination stays locked and forgets its migration id.
    pub fn abandon_import(&self) {
        let mut st = self.lock();
        st.saves.abandon();
        if st.session.phase() == Phase::DestinationLocked {
            st.session.relock_destination();
        }
    }

    fn import_all_inner(&self, blobs: &[(BlobKind, &[u8])]) -> Result<()> {
        {
            let st = self.lock();
            let phase = st.session.phase();
            let save = blobs
                .first()
                .is_some_and(|(_, b)| Purpose::of(b) == Some(Purpose::Save));
            if st.session.has_host_key() && phase != Phase::DestinationLocked && !save {
                return Err(InstanceError::NotIncoming(phase));
            }
        }
        if self.is_running() {
            // Only an instance without a host key gets here running (a
            // sealed destination starts powered off); the load replaces it.
            log::warn!("state import: replacing the running TPM's state");
            self.power_off();
        }
        for (kind, data) in blobs {
            self.import_blob(*kind, data, false)?;
        }
        self.power_on(InitFlags::default())?;
        self.start_pending_durability();
        Ok(())
    }
}

/// A swtpm blob that cannot be used, as the instance reports it.
fn blob_error(e: swtpm_crypt::CryptError) -> InstanceError {
    match e {
        swtpm_crypt::CryptError::Blob(b) => InstanceError::Blob(b),
        swtpm_crypt::CryptError::StateKeyInside => InstanceError::ForeignEncrypted,
        other => InstanceError::MigrationKey(other),
    }
}
