//! Saves and rollbacks (`vtpmctl saves`, `rollback-policy`,
//! `allow-rollback`) on a state directory while no vtpmd runs there; with a
//! vtpmd running, the same requests go through its admin socket. They take
//! the directory's lock, so they refuse while a vtpmd or swtpm serves it.

use crate::CtlError;
use std::path::Path;
use vtpm_common::admin::SaveStatus;
use vtpm_common::hostkey::{self, HostKey, PRIVATE_FILE};
use vtpm_common::statedir::{
    self, Identity, RollbackAllowance, RollbackPolicy, IDENTITY, ROLLBACK_ALLOW,
};

/// What the directory says about its saves.
pub fn status(dir: &Path) -> Result<SaveStatus, CtlError> {
    let ident: Option<Identity> = statedir::read_json(dir, IDENTITY)?;
    let allowed: Option<RollbackAllowance> = statedir::read_json(dir, ROLLBACK_ALLOW)?;
    let host = HostKey::load(&hostkey::system_key_dir().join(PRIVATE_FILE)).ok();
    Ok(SaveStatus {
        instance_id: ident.as_ref().map(|i| i.instance_id.clone()),
        generation: ident.as_ref().map_or(0, |i| i.generation),
        rollback: ident.as_ref().map_or_else(Default::default, |i| i.rollback),
        allowed_generation: allowed.map(|a| a.generation),
        rollbacks: statedir::read_rollbacks(dir)?.len(),
        host_key: host.map(|k| k.fingerprint()),
    })
}

/// Sets the directory's rollback policy.
pub fn set_policy(dir: &Path, policy: RollbackPolicy) -> Result<SaveStatus, CtlError> {
    let _lock = statedir::lock(dir)?;
    let mut ident = match statedir::read_json::<Identity>(dir, IDENTITY)? {
        Some(i) => i,
        None => Identity::fresh(policy)
            .map_err(|e| CtlError::Input(format!("no random numbers from the OS: {e}")))?,
    };
    ident.rollback = policy;
    statedir::write_json(dir, IDENTITY, &ident)?;
    status(dir)
}

/// Allows the next restore of `generation` (one restore).
pub fn allow(dir: &Path, generation: u64) -> Result<SaveStatus, CtlError> {
    let _lock = statedir::lock(dir)?;
    statedir::write_json(dir, ROLLBACK_ALLOW, &RollbackAllowance { generation })?;
    status(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_policy_and_allowance() {
        let d = tempfile::tempdir().unwrap();
        let st = status(d.path()).unwrap();
        assert_eq!((st.instance_id, st.generation), (None, 0));
        let st = set_policy(d.path(), RollbackPolicy::Refuse).unwrap();
        assert_eq!(st.rollback, RollbackPolicy::Refuse);
        assert_eq!(st.instance_id.unwrap().len(), 32);
        let st = allow(d.path(), 3).unwrap();
        assert_eq!(st.allowed_generation, Some(3));
        // A held lock (a running vtpmd) is refused.
        let _held = statedir::lock(d.path()).unwrap();
        assert!(matches!(
            allow(d.path(), 4),
            Err(CtlError::StateDir(statedir::StateDirError::Locked(_)))
        ));
        // Garbage in the identity file is an error, not a new identity.
        drop(_held);
        std::fs::write(d.path().join(IDENTITY), b"{garbage").unwrap();
        assert!(set_policy(d.path(), RollbackPolicy::Allow).is_err());
    }
}
