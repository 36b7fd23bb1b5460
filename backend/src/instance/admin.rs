//! The admin operations (what vtpmctl asks through the admin socket), on
//! the typed protocol of `vtpm_common::admin`.

use super::{InstanceError, Vtpm};
use vtpm_common::admin::{Reply, Request, Tombstone};

impl Vtpm {
    /// Carries out one admin request.
    pub fn admin(&self, req: Request) -> Result<Reply, InstanceError> {
        let mut st = self.lock();
        let running = st.running;
        Ok(match req {
            Request::Status => Reply::Status(st.session.status(running)),
            Request::IncomingInfo => Reply::IncomingInfo(st.session.issue_incoming()?),
            Request::IncomingKey { wrapped_key } => {
                Reply::KeysPreloaded(st.session.preload_key(&wrapped_key)?)
            }
            Request::Outgoing {
                peer_key,
                migration_id,
            } => {
                let prepared = st.session.prepare_outgoing(&peer_key, &migration_id)?;
                // Recorded before anything is handed out: if this process
                // dies from here on, it does not come back as a live TPM
                // without the operator's word.
                let marker = st
                    .session
                    .marker()
                    .expect("a prepared session has a marker");
                if let Err(e) = self.store.write_marker(&marker) {
                    let _ = st.session.abort();
                    return Err(InstanceError::Handover(e));
                }
                Reply::Prepared(prepared)
            }
            Request::Abort => {
                st.session.abort()?;
                self.store.set_fenced(false);
                self.store
                    .remove_marker()
                    .map_err(InstanceError::Handover)?;
                Reply::Status(st.session.status(running))
            }
            Request::Receipt => {
                // Signed only once the received state is on disk.
                self.store
                    .commit_deferred()
                    .map_err(InstanceError::Persist)?;
                Reply::Receipt(st.session.receipt()?)
            }
            Request::Complete { receipt } => {
                let t = st.session.complete(&receipt)?;
                self.erase_for_migration(&t);
                // The TPM now lives on the destination: power this copy off
                // so status and the process agree.
                self.power_off_locked(&mut st);
                Reply::Tombstone(t)
            }
            Request::Saves => Reply::SaveStatus(self.save_status(&st)?),
            Request::RollbackPolicy { policy } => {
                self.set_rollback_policy(policy)?;
                log::warn!("rollback policy set to {policy:?} by the administrator");
                Reply::SaveStatus(self.save_status(&st)?)
            }
            Request::AllowRollback { generation } => {
                self.allow_rollback(generation)?;
                log::warn!("the administrator allowed one restore of generation {generation}");
                Reply::SaveStatus(self.save_status(&st)?)
            }
        })
    }

    /// Erases the state directory after a completed outgoing migration,
    /// leaving the tombstone.
    pub(super) fn erase_for_migration(&self, t: &Tombstone) {
        let json = serde_json::to_vec_pretty(t).unwrap_or_default();
        match self.store.erase_with_tombstone(&json) {
            Ok(()) => log::warn!(
                "migration {}: TPM handed over to {}; local state erased, tombstone left",
                t.migration_id,
                t.destination_key
            ),
            Err(err) => log::error!(
                "migration {}: erasing the source state failed: {err}",
                t.migration_id
            ),
        }
    }
}
