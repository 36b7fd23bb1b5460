//! The commands that act on a state directory while no vtpmd runs there:
//! resolving a migration whose source process has stopped (QEMU quit after
//! the export, or the process died). They take the directory's lock, so
//! they refuse while a vtpmd or swtpm serves it.

use crate::CtlError;
use std::path::Path;
use vtpm_common::admin::{Receipt, Tombstone};
use vtpm_common::hostkey;
use vtpm_common::statedir::{self, StateDirError};

fn pending(dir: &Path) -> Result<statedir::PendingHandover, CtlError> {
    statedir::read_marker(dir)?
        .ok_or_else(|| StateDirError::NoMarker(dir.display().to_string()).into())
}

/// Checks the destination's receipt, then erases the state and leaves the
/// tombstone.
pub fn complete(dir: &Path, r: &Receipt) -> Result<Tombstone, CtlError> {
    let _lock = statedir::lock(dir)?;
    let m = pending(dir)?;
    m.check_receipt(r)?;
    let peer = hostkey::parse_public(&m.peer_key, "peer key")
        .map_err(|e| CtlError::Input(e.to_string()))?;
    let t = Tombstone {
        migrated_out: true,
        migration_id: m.migration_id.clone(),
        destination_key: hostkey::fingerprint(&peer),
        digest: r.digest.clone(),
        confirmed_by: "receipt".into(),
        unix_time: vtpm_common::statedir::unix_now(),
    };
    let json = serde_json::to_vec_pretty(&t).unwrap_or_default();
    statedir::erase_with_tombstone(dir, &json)?;
    Ok(t)
}

/// Forgets the unresolved migration: the next vtpmd started here runs the
/// TPM again. Only right if the VM does not run on the destination.
pub fn abort(dir: &Path) -> Result<serde_json::Value, CtlError> {
    let _lock = statedir::lock(dir)?;
    let m = pending(dir)?;
    statedir::remove_marker(dir)?;
    Ok(serde_json::json!({
        "state": "running",
        "aborted_migration_id": m.migration_id,
        "tpm_running": false,
    }))
}

/// What the directory says about migrations.
pub fn status(dir: &Path) -> Result<serde_json::Value, CtlError> {
    if let Ok(t) = std::fs::read_to_string(dir.join(statedir::TOMBSTONE)) {
        let t: serde_json::Value = serde_json::from_str(&t).unwrap_or(serde_json::Value::Null);
        return Ok(serde_json::json!({ "state": "migrated-out", "tombstone": t }));
    }
    Ok(match statedir::read_marker(dir)? {
        Some(m) => serde_json::json!({
            "state": "awaiting-receipt",
            "migration_id": m.migration_id,
            "digest": m.digest,
            "exported": m.exported,
        }),
        None => serde_json::json!({ "state": "no-migration" }),
    })
}
