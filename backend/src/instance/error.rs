//! What an instance operation can refuse or fail with. Frontends map these
//! to their own wire results (the swtpm control channel to its result
//! codes, vhost-user to a failed transfer, the admin socket to its error
//! text); the core never speaks a wire format.

use super::BlobKind;
use crate::engine::TpmResult;
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
    #[error("no migration is prepared for this vTPM (run `vtpmctl outgoing` first); plaintext export needs --allow-plaintext-migration")]
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
