//! The host key an instance seals to, and an incoming migration reserved
//! before this process started (docs/migration.md).
//!
//! ```text
//!  --host-key FILE ──▶ that key, checked now
//!  --no-host-key / --allow-plaintext-migration / --migration-key ──▶ none
//!  otherwise ──▶ the host's key in /var/lib/vtpm-hostkey ($VTPM_HOST_KEY_DIR):
//!                loaded on first use; made now if missing, except when
//!                run as swtpm (libvirt gives the socket about a second)
//! ```

use super::RunError;
use crate::config::InstanceConfig;
use crate::migration::session::Session;
use crate::storage::{StateDir, PERMANENT};
use std::path::Path;
use std::sync::Arc;
use vtpm_common::hostkey::{self, HostKey, LazyHostKey, PRIVATE_FILE};
use vtpm_common::statedir::{self, Reservation, RESERVATION};

/// The key sealed migrations and saves use, if any.
pub fn host_key(cfg: &InstanceConfig) -> Result<Option<Arc<LazyHostKey>>, RunError> {
    if let Some(p) = &cfg.host_key {
        return Ok(Some(Arc::new(LazyHostKey::ready(HostKey::load(p)?, p))));
    }
    if !cfg.system_host_key {
        return Ok(None);
    }
    let dir = hostkey::system_key_dir();
    let file = dir.join(PRIVATE_FILE);
    if file.exists() {
        // Loaded when first needed: an idle vTPM never reads it.
        return Ok(Some(Arc::new(LazyHostKey::at(&file))));
    }
    if super::invoked_as_swtpm() {
        // Run by libvirt, which waits about a second for the socket: no
        // RSA key generation here (`vtpm-libvirt enable` makes the key).
        log::warn!(
            "no host key at {} yet: saves and snapshots are refused until it exists (make it with `vtpm-libvirt enable` or `vtpmctl keygen --system` as root, then restart the VM)",
            file.display()
        );
        return Ok(Some(Arc::new(LazyHostKey::at(&file))));
    }
    match HostKey::load_or_create(&dir) {
        Ok((k, made)) => {
            if made {
                log::warn!(
                    "made this host's key {} (fingerprint {}): saves and snapshots are sealed to it; back it up, they cannot be restored without it",
                    file.display(),
                    k.fingerprint()
                );
            }
            Ok(Some(Arc::new(LazyHostKey::ready(k, &file))))
        }
        Err(e) => {
            log::warn!(
                "no host key ({e}): the TPM state will not be handed out (save, snapshot, migration). Fix: make the key as root with `vtpmctl keygen --system` (it goes to {}) and give it to the user vtpmd runs as, or pass --host-key FILE; --allow-plaintext-migration hands the state out unencrypted",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// The keys listed for restores: `*.pem` in `--restore-keys DIR`, or in
/// `restore/` next to the default host key. Loaded when a save names one.
pub fn restore_keys(cfg: &InstanceConfig) -> Vec<Arc<LazyHostKey>> {
    let dir = match &cfg.restore_keys {
        Some(d) => d.clone(),
        None if cfg.system_host_key => hostkey::system_key_dir().join("restore"),
        None => return Vec::new(),
    };
    let mut files: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect(),
        Err(e) => {
            if cfg.restore_keys.is_some() {
                log::warn!("--restore-keys {}: {e}", dir.display());
            }
            Vec::new()
        }
    };
    files.sort();
    files.iter().map(|f| Arc::new(LazyHostKey::at(f))).collect()
}

/// Takes a reservation left in the state directory: if it is valid, for
/// this host's key and unexpired, and the directory holds no TPM yet, the
/// session becomes a sealed destination for its id. The file is removed
/// in every case (single use).
pub fn take_reservation(store: &StateDir, session: &mut Session) -> Result<bool, RunError> {
    let dir: &Path = store.path();
    let r: Reservation = match statedir::read_json(dir, RESERVATION) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(false),
        Err(e) => {
            log::error!("ignoring {RESERVATION}: {e}");
            let _ = statedir::remove_durably(dir, RESERVATION);
            return Ok(false);
        }
    };
    statedir::remove_durably(dir, RESERVATION).map_err(crate::storage::StorageError::from)?;
    let ours = session
        .host_key()
        .and_then(|k| k.get().ok().map(|k| k.fingerprint()));
    let why_not = if r.expires < vtpm_common::statedir::unix_now() {
        Some("it expired".to_string())
    } else if ours.as_deref() != Some(r.host_key.as_str()) {
        Some(format!(
            "it is for host key {}, this vtpmd has {}",
            r.host_key,
            ours.as_deref().unwrap_or("none")
        ))
    } else if store.has_blob(PERMANENT) {
        Some("the directory already holds a TPM".to_string())
    } else {
        None
    };
    if let Some(why) = why_not {
        log::error!(
            "ignoring the incoming-migration reservation {} ({why}); starting as an ordinary vTPM (run `vtpmctl reserve-incoming` again for a new migration)",
            r.migration_id
        );
        return Ok(false);
    }
    session
        .expect_reserved(&r.migration_id)
        .map_err(crate::instance::InstanceError::Migration)?;
    log::warn!(
        "incoming migration {}: reserved before start; this vTPM stays locked until that migration's verified state arrives",
        r.migration_id
    );
    if let Some(wrapped) = &r.wrapped_key {
        match session.preload_key(wrapped) {
            Ok(_) => log::info!(
                "incoming migration {}: the source's keys left with the reservation are unwrapped; no RSA work is left for the VM's downtime",
                r.migration_id
            ),
            Err(e) => log::warn!(
                "incoming migration {}: the keys left with the reservation do not open ({e}); the stream's own are unwrapped when it arrives",
                r.migration_id
            ),
        }
    }
    Ok(true)
}
