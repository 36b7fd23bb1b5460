//! What an instance operation can refuse or fail with. Frontends map these
//! to their own wire results (the swtpm control channel to its result
//! codes, vhost-user to a failed transfer, the admin socket to its error
//! text); the core never speaks a wire format.

use super::BlobKind;
use crate::engine::TpmResult;
use crate::migration::save::SaveError;
use crate::migration::session::SessionError;
use crate::storage::blob::BlobError;
use crate::storage::swtpm_crypt::CryptError;
use crate::storage::StorageError;
use thiserror::Error;
use vtpm_common::admin::Phase;

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("the existing TPM state in {dir} cannot be loaded (TPM result {rc:#x}{}); refusing to start a blank TPM in its place", cause.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
    BadState {
        dir: String,
        rc: TpmResult,
        /// What the state directory failed at, if it did.
        cause: Option<String>,
    },
    #[error("the TPM engine could not start the TPM (result {rc:#x}){}", cause.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
    PowerOn {
        rc: TpmResult,
        /// What the state directory last failed at, if anything.
        cause: Option<String>,
    },
    #[error("TPM2_Startup answered {0:#x}")]
    Startup(u32),
    #[error("the TPM is not running (send INIT first)")]
    NotRunning,
    #[error("the TPM is running (send STOP first)")]
    Running,
    #[error("{}", locked_message(*.0))]
    Locked(Phase),
    #[error("locality {0} is out of range (0..=4)")]
    BadLocality(u8),
    #[error("the TPM engine failed (result {0:#x})")]
    Engine(TpmResult),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot take the state directory lock: {0}")]
    StorageLock(#[source] StorageError),
    #[error("the state directory lock is held elsewhere: {0}")]
    LockBusy(#[source] StorageError),
    #[error("could not persist the received permanent state: {0}")]
    Persist(#[source] StorageError),
    #[error("recording the migration in the state directory failed: {0}")]
    Handover(#[source] StorageError),
    #[error(transparent)]
    Migration(#[from] SessionError),
    #[error("the TPM state is not handed out: no migration is prepared (`vtpmctl outgoing`) and there is no host key to seal a save to (vtpmd makes one in /var/lib/vtpm-hostkey, or $VTPM_HOST_KEY_DIR, unless --no-host-key; or pass --host-key FILE). --allow-plaintext-migration hands it out unencrypted, as swtpm does")]
    ExportNotPrepared,
    #[error(
        "exporting state still under the state-file key is not supported (request decrypted blobs)"
    )]
    ExportEncrypted,
    #[error("the blob is encrypted with a state-file key vtpmd does not have")]
    ForeignEncrypted,
    #[error("bad state blob: {0}")]
    Blob(#[from] BlobError),
    #[error("state blob under swtpm's migration key: {0}")]
    MigrationKey(#[source] CryptError),
    #[error("there is no {0:?} state to hand out")]
    NoBlob(BlobKind),
    #[error("the TPM engine has no information for flags {0:#x}")]
    NoInfo(u32),
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error("the save identity or rollback record in the state directory (vtpmd-identity.json, vtpmd-rollbacks.log, vtpmd-rollback-allow.json): {0}")]
    Identity(#[source] StorageError),
    #[error("vtpmd-identity.json in the state directory is damaged (its instance id is not 32 hex digits); restore it from a backup")]
    BadIdentity,
    #[error("no random numbers from the OS")]
    Random,
    #[error("this save belongs to another TPM (instance {theirs}); this state directory's TPM is instance {ours}. A save is restored only into the TPM that made it")]
    OtherInstance { ours: String, theirs: String },
    #[error("this save belongs to TPM instance {theirs}, but this state directory holds a TPM that never made a save. A save is restored only into the TPM that made it (or into an empty state directory)")]
    NeverSaved { theirs: String },
    #[error("ROLLBACK REFUSED: restoring generation {restored} would roll this TPM back (it has seen generation {newest}) and its rollback policy is refuse. If this revert is intended, allow it once with `vtpmctl allow-rollback --generation {restored}` (--state-dir DIR or --admin SOCK) and retry")]
    RollbackRefused { restored: u64, newest: u64 },
    #[error(
        "a saved state cannot be restored while the instance is {0:?} (a save is not a migration)"
    )]
    RestoreWhile(Phase),
    #[error("this instance is {0:?}, not waiting for an incoming migration (start it with --migration incoming); its TPM is left as it is")]
    NotIncoming(Phase),
}

fn locked_message(p: Phase) -> String {
    match p {
        Phase::AwaitingReceipt => "this vTPM was handed to a migration destination and is held until that is resolved: \
            if the VM runs on the destination, run `vtpmctl complete --receipt FILE` with the destination's receipt \
            (vtpmctl receipt there) to erase this copy; if it does not, run `vtpmctl abort` to take the TPM back \
            (both also work with --state-dir DIR while no vtpmd runs; vtpmctl status shows the migration)"
            .into(),
        p => format!(
            "the instance is {p:?}: it runs nothing until the migration completes or is aborted (vtpmctl status)"
        ),
    }
}
