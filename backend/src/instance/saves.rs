//! Saves and restores of this TPM (`virsh save`, managedsave, snapshots):
//! the state sealed to this host ([`crate::migration::save`]), bound to
//! the instance id and generation kept in the state directory, and the
//! rollback rule.
//!
//! ```text
//!  GET_STATEBLOB 1 (no migration prepared) ─▶ generation + 1 (durable),
//!        seal perm + vol as (instance, generation); the TPM keeps running
//!  first TPM command after a save/restore ─▶ generation + 1 (durable): the
//!        TPM has moved past every save so far
//!  SET_STATEBLOB 1..3 + INIT ─▶ same host key, same instance, verified;
//!        generation < newest seen: a rollback, recorded; refused under the
//!        policy `refuse` unless the operator allowed that generation
//! ```

use super::{BlobKind, InitFlags, InstanceError, TpmState, Vtpm};
use crate::engine::StateType;
use crate::migration::save::{SaveId, INSTANCE_ID_LEN};
use crate::storage::PERMANENT;
use std::sync::atomic::Ordering;
use vtpm_common::admin::SaveStatus;
use vtpm_common::hex;
use vtpm_common::statedir::{Identity, RollbackAllowance, RollbackPolicy, RollbackRecord};
use zeroize::Zeroizing;

type Result<T> = std::result::Result<T, InstanceError>;

fn parse_instance(id: &Identity) -> Result<[u8; INSTANCE_ID_LEN]> {
    hex::decode(&id.instance_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(InstanceError::BadIdentity)
}

impl Vtpm {
    /// GET_STATEBLOB without a prepared migration, with a host key: blob
    /// 1 seals a new save, 2 and 3 come from it.
    pub(super) fn export_save(&self, st: &mut TpmState, kind: BlobKind) -> Result<Vec<u8>> {
        if let Some(blob) = st.saves.handed_out(kind.number()) {
            return Ok(blob);
        }
        let mut ident = self.identity_or_fresh()?;
        ident.generation += 1;
        let save = SaveId::new(parse_instance(&ident)?, ident.generation)?;
        let perm = st
            .tpm
            .get_state(StateType::Permanent)
            .map_err(InstanceError::Engine)?;
        let vol = st
            .tpm
            .get_state(StateType::Volatile)
            .map_err(InstanceError::Engine)?;
        let (perm, vol) = (Zeroizing::new(perm), Zeroizing::new(vol));
        // The generation is on disk before the save leaves: a later save
        // never reuses it, whatever happens to this process.
        self.store
            .write_identity(&ident)
            .map_err(InstanceError::Identity)?;
        let blob = st.saves.seal(save, &perm, &vol, kind.number())?;
        self.unchanged_since_save.store(true, Ordering::SeqCst);
        log::info!(
            "state saved, sealed to this host (instance {}, generation {}); the TPM keeps running",
            ident.instance_id,
            ident.generation
        );
        Ok(blob)
    }

    /// This TPM's identity, or a new one (not yet written) if it has none.
    fn identity_or_fresh(&self) -> Result<Identity> {
        match self.store.identity().map_err(InstanceError::Identity)? {
            Some(i) => Ok(i),
            None => Identity::fresh(RollbackPolicy::Allow).map_err(|_| InstanceError::Random),
        }
    }

    /// The first TPM command after a save or restore: from here on the
    /// state is newer than every save, so restoring one rolls it back.
    pub(super) fn note_moved_past_saves(&self) {
        if !self.unchanged_since_save.swap(false, Ordering::SeqCst) {
            return;
        }
        let r = self.store.identity().and_then(|i| match i {
            Some(mut i) => {
                i.generation += 1;
                self.store.write_identity(&i)
            }
            None => Ok(()),
        });
        if let Err(e) = r {
            log::error!("recording that the TPM moved past its last save failed: {e}; a restore of that save will not be reported as a rollback");
        }
    }

    /// INIT after SET_STATEBLOB of a save: checks what it is bound to,
    /// then loads and starts it. On any refusal the TPM stays off with the
    /// state it had on disk.
    pub(super) fn finish_restore(&self, st: &mut TpmState, flags: InitFlags) -> Result<()> {
        let (perm, vol, save) = st.saves.take_restored()?;
        let ident = self.check_restore(&save)?;
        self.power_off_locked(st);
        if let Err(r) = super::load_into_engine(st, &perm, &vol) {
            log::error!("the engine rejected the restored state ({r:#x})");
            return Err(InstanceError::Engine(r));
        }
        st.permanent_set = true;
        self.power_on_locked(st, flags)?;
        if let Err(e) = self.store.write_identity(&ident) {
            log::error!("recording the restore in the state directory failed: {e}");
        }
        self.unchanged_since_save.store(true, Ordering::SeqCst);
        log::info!(
            "state restored from a save (instance {}, generation {})",
            ident.instance_id,
            save.generation
        );
        Ok(())
    }

    /// Whether `save` may be restored here; the identity to keep after.
    fn check_restore(&self, save: &SaveId) -> Result<Identity> {
        let theirs = save.instance_hex();
        let Some(mut ident) = self.store.identity().map_err(InstanceError::Identity)? else {
            if self.store.has_blob(PERMANENT) {
                return Err(InstanceError::NeverSaved { theirs });
            }
            log::warn!("restoring a save of TPM instance {theirs} into an empty state directory");
            return Ok(Identity {
                instance_id: theirs,
                generation: save.generation,
                rollback: RollbackPolicy::Allow,
            });
        };
        if ident.instance_id != theirs {
            return Err(InstanceError::OtherInstance {
                ours: ident.instance_id,
                theirs,
            });
        }
        if save.generation >= ident.generation {
            ident.generation = save.generation;
            return Ok(ident);
        }
        let refuse = self.opts.rollback_refuse || ident.rollback == RollbackPolicy::Refuse;
        let decision = if !refuse {
            "allowed"
        } else if self
            .store
            .take_rollback_allowance(save.generation)
            .map_err(InstanceError::Identity)?
        {
            "allowed-by-operator"
        } else {
            "refused"
        };
        let record = RollbackRecord {
            unix_time: vtpm_common::statedir::unix_now(),
            restored_generation: save.generation,
            newest_generation: ident.generation,
            decision: decision.into(),
        };
        self.store
            .record_rollback(&record)
            .map_err(InstanceError::Identity)?;
        if decision == "refused" {
            return Err(InstanceError::RollbackRefused {
                restored: save.generation,
                newest: ident.generation,
            });
        }
        log::warn!(
            "ROLLBACK: restoring generation {} of TPM instance {}, which has seen generation {} (snapshot revert or an older save; {decision}, recorded in vtpmd-rollbacks.log)",
            save.generation,
            ident.instance_id,
            ident.generation
        );
        Ok(ident)
    }

    /// The admin socket's `saves`.
    pub(super) fn save_status(&self, st: &TpmState) -> Result<SaveStatus> {
        let ident = self.store.identity().map_err(InstanceError::Identity)?;
        let allowed = self
            .store
            .rollback_allowance()
            .map_err(InstanceError::Identity)?;
        let rollbacks = self.store.rollbacks().map_err(InstanceError::Identity)?;
        Ok(SaveStatus {
            instance_id: ident.as_ref().map(|i| i.instance_id.clone()),
            generation: ident.as_ref().map_or(0, |i| i.generation),
            rollback: if self.opts.rollback_refuse {
                RollbackPolicy::Refuse
            } else {
                ident.as_ref().map_or_else(Default::default, |i| i.rollback)
            },
            allowed_generation: allowed.map(|a| a.generation),
            rollbacks: rollbacks.len(),
            host_key: st.saves.host_fingerprint(),
        })
    }

    /// The admin socket's `rollback-policy`.
    pub(super) fn set_rollback_policy(&self, policy: RollbackPolicy) -> Result<()> {
        let mut ident = self.identity_or_fresh()?;
        ident.rollback = policy;
        self.store
            .write_identity(&ident)
            .map_err(InstanceError::Identity)
    }

    /// The admin socket's `allow-rollback`.
    pub(super) fn allow_rollback(&self, generation: u64) -> Result<()> {
        self.store
            .allow_rollback(&RollbackAllowance { generation })
            .map_err(InstanceError::Identity)
    }
}
