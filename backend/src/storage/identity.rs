//! The files that bind saves to this TPM (docs/migration.md, "Saves and
//! snapshots"): its identity and generation, the rollback record and the
//! operator's one-time allowance, each written durably and symlink-safe
//! through `vtpm_common::statedir`. They are not TPM state: the migration
//! fence does not apply to them.

use super::{StateDir, StorageError};
use vtpm_common::statedir::{
    self as layout, Identity, RollbackAllowance, RollbackRecord, IDENTITY, ROLLBACK_ALLOW,
};

impl StateDir {
    /// The identity, if this TPM ever saved or was restored.
    pub fn identity(&self) -> Result<Option<Identity>, StorageError> {
        Ok(layout::read_json(self.path(), IDENTITY)?)
    }

    pub fn write_identity(&self, id: &Identity) -> Result<(), StorageError> {
        self.check_same_dir()?;
        Ok(layout::write_json(self.path(), IDENTITY, id)?)
    }

    /// Appends a line to the rollback record.
    pub fn record_rollback(&self, r: &RollbackRecord) -> Result<(), StorageError> {
        self.check_same_dir()?;
        Ok(layout::append_rollback(self.path(), r)?)
    }

    pub fn rollbacks(&self) -> Result<Vec<RollbackRecord>, StorageError> {
        Ok(layout::read_rollbacks(self.path())?)
    }

    pub fn rollback_allowance(&self) -> Result<Option<RollbackAllowance>, StorageError> {
        Ok(layout::read_json(self.path(), ROLLBACK_ALLOW)?)
    }

    pub fn allow_rollback(&self, a: &RollbackAllowance) -> Result<(), StorageError> {
        self.check_same_dir()?;
        Ok(layout::write_json(self.path(), ROLLBACK_ALLOW, a)?)
    }

    /// Uses the allowance up if it is for `generation`.
    pub fn take_rollback_allowance(&self, generation: u64) -> Result<bool, StorageError> {
        match self.rollback_allowance()? {
            Some(a) if a.generation == generation => {
                self.check_same_dir()?;
                layout::remove_durably(self.path(), ROLLBACK_ALLOW)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
