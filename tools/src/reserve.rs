//! `vtpmctl reserve-incoming`: the destination's half of a libvirt-driven
//! migration, run before `virsh migrate`. libvirt starts the destination
//! vtpmd itself, so the single-use migration id is issued ahead of it and
//! left in the state directory ([`statedir::Reservation`]); the next vtpmd
//! started there takes it and becomes a sealed destination for that id.
//!
//! The directory is made as libvirt makes it (parents 0711, the directory
//! 0700 and owned by the user the TPM runs as, `tss`), so libvirt finds
//! it ready; a directory that holds a TPM, a migration record or a running
//! TPM process is refused.

use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vtpm_common::hostkey::{self, HostKey, KeyError};
use vtpm_common::statedir::{self, Reservation, StateDirError};
use vtpm_common::{aead, hex};

/// Longest reservation accepted (`--expires`).
pub const MAX_EXPIRES: u64 = 24 * 3600;

/// Files that mean the directory holds (or held) a TPM.
const OCCUPIED: [&str; 6] = [
    "tpm2-00.permall",
    "tpm2-00.volatilestate",
    "vtpmd-00.permall",
    "vtpmd-00.volatilestate",
    statedir::MARKER,
    statedir::TOMBSTONE,
];

#[derive(Debug, Error)]
pub enum ReserveError {
    #[error("--expires {0}: give the reservation's lifetime in seconds, 1 to {MAX_EXPIRES}")]
    Expires(u64),
    #[error("--owner {0}: no such user or group on this host; give the user the TPM runs as (libvirt's swtpm_user, `tss` by default) as USER or USER:GROUP")]
    Owner(String),
    #[error("{0} is not a directory (a symlink or a file is there); remove it or give the real state directory")]
    NotADirectory(String),
    #[error("{dir} holds a TPM or a migration record ({file}); a reservation is for an empty directory. If this host should receive the TPM anyway, move the directory aside first (mv {dir} {dir}.old)")]
    Occupied { dir: String, file: String },
    #[error(
        "{0}; remove it with `vtpmctl reserve-incoming --cancel --state-dir DIR` and reserve again"
    )]
    BadReservation(StateDirError),
    #[error("a TPM process runs on {0} (its lock is held): the directory serves a domain on this host; stop that domain or reserve another directory")]
    Running(String),
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("host key: {0}; give one with --host-key FILE (vtpmctl keygen) or fix {1}")]
    HostKey(KeyError, String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot give {0} to the --owner user: run reserve-incoming as root (the TPM process libvirt starts runs as that user and must read it), or give --owner the user you run as")]
    NotOwner(String),
    #[error("no random numbers from the OS")]
    Random,
    #[error("{0} holds no reservation (a vtpmd started there took it, it was cancelled, or it was never made): run `vtpmctl reserve-incoming --state-dir DIR` first")]
    NoReservation(String),
    #[error("the reservation in {dir} is for migration {has}, not {given}: these keys belong to another migration")]
    OtherMigration {
        dir: String,
        has: String,
        given: String,
    },
    #[error("the reservation in {0} expired: reserve again and prepare the source for the new id")]
    Expired(String),
    #[error("--wrapped-key: give the `wrapped_key` that `vtpmctl outgoing` printed (hex, 1 to {MAX_WRAPPED} bytes)")]
    WrappedKey,
}

/// Largest wrapped key accepted (an RSA-8192 ciphertext is 1024 bytes).
pub const MAX_WRAPPED: usize = 1024;

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ReserveError + 'a {
    move |source| ReserveError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// What `reserve-incoming` prints: what the source needs, and the record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reserved {
    pub migration_id: String,
    /// This host's public key, PEM: the source wraps to it.
    pub public_key: String,
    pub key_fingerprint: String,
    pub expires: u64,
    pub state_dir: String,
    /// The id of a reservation this one replaced.
    pub replaced: Option<String>,
}

/// Where the host key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    /// The system location ([`hostkey::system_key_dir`]), made on first use.
    System,
}

/// `USER` or `USER:GROUP` → ids (the group defaults to the user's).
pub fn owner(spec: &str) -> Result<(Uid, Gid), ReserveError> {
    let bad = || ReserveError::Owner(spec.into());
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = User::from_name(user).ok().flatten().ok_or_else(bad)?;
    let gid = match group {
        Some(g) => Group::from_name(g).ok().flatten().ok_or_else(bad)?.gid,
        None => u.gid,
    };
    Ok((u.uid, gid))
}

/// Whether `dir` is there as a real directory (`false`: nothing there); a
/// symlink or a file in its place is refused, never followed.
fn is_dir(dir: &Path) -> Result<bool, ReserveError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(true),
        Ok(_) => Err(ReserveError::NotADirectory(dir.display().to_string())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("stat", dir)(e)),
    }
}

/// Makes `dir` as libvirt would (parents 0711, `dir` 0700 for `who`), or
/// checks the one that is there is a real directory.
fn make_dir(dir: &Path, who: (Uid, Gid)) -> Result<(), ReserveError> {
    if is_dir(dir)? {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(io_err("create", parent))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", dir))?;
    give(dir, who)
}

fn locked(dir: &Path) -> Result<fs::File, ReserveError> {
    statedir::lock(dir).map_err(|e| match e {
        StateDirError::Locked(d) => ReserveError::Running(d),
        e => e.into(),
    })
}

fn give(path: &Path, who: (Uid, Gid)) -> Result<(), ReserveError> {
    std::os::unix::fs::lchown(path, Some(who.0.as_raw()), Some(who.1.as_raw())).map_err(|e| {
        if e.kind() == ErrorKind::PermissionDenied {
            ReserveError::NotOwner(path.display().to_string())
        } else {
            io_err("chown", path)(e)
        }
    })
}

fn host_key(source: &KeySource, who: (Uid, Gid)) -> Result<HostKey, ReserveError> {
    match source {
        KeySource::File(p) => {
            HostKey::load(p).map_err(|e| ReserveError::HostKey(e, p.display().to_string()))
        }
        KeySource::System => {
            let dir = hostkey::system_key_dir();
            let named = |e| ReserveError::HostKey(e, dir.display().to_string());
            if !dir.exists() {
                // Made for the user the destination vtpmd runs as, which
                // reads the key from here.
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(io_err("create", &dir))?;
                give(&dir, who)?;
            }
            HostKey::load_or_create(&dir).map(|(k, _)| k).map_err(named)
        }
    }
}

/// Reserves `dir` for an incoming migration for `expires` seconds.
pub fn reserve(
    dir: &Path,
    expires: u64,
    key: &KeySource,
    who: (Uid, Gid),
) -> Result<Reserved, ReserveError> {
    if expires == 0 || expires > MAX_EXPIRES {
        return Err(ReserveError::Expires(expires));
    }
    let key = host_key(key, who)?;
    make_dir(dir, who)?;
    let lock = locked(dir)?;
    give(&dir.join(".lock"), who)?;
    if let Some(file) = OCCUPIED
        .iter()
        .find(|f| fs::symlink_metadata(dir.join(f)).is_ok())
    {
        return Err(ReserveError::Occupied {
            dir: dir.display().to_string(),
            file: file.to_string(),
        });
    }
    let old: Option<Reservation> =
        statedir::read_json(dir, statedir::RESERVATION).map_err(ReserveError::BadReservation)?;
    let mut id = [0u8; 32];
    aead::random_bytes(&mut id).map_err(|_| ReserveError::Random)?;
    let r = Reservation {
        migration_id: hex::encode(&id),
        host_key: key.fingerprint(),
        expires: vtpm_common::statedir::unix_now() + expires,
        wrapped_key: None,
    };
    statedir::write_json(dir, statedir::RESERVATION, &r)?;
    give(&dir.join(statedir::RESERVATION), who)?;
    drop(lock);
    Ok(Reserved {
        migration_id: r.migration_id,
        public_key: key.public_pem(),
        key_fingerprint: r.host_key,
        expires: r.expires,
        state_dir: dir.display().to_string(),
        replaced: old.map(|o| o.migration_id),
    })
}

/// What `--wrapped-key` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysLeft {
    pub migration_id: String,
    /// Size of the wrapped key now held by the reservation.
    pub wrapped_key_bytes: usize,
}

/// Leaves the source's wrapped instance keys (what `outgoing` printed)
/// with `dir`'s reservation for migration `id`: the destination vtpmd
/// unwraps them when it starts, not in the VM's downtime. The file keeps
/// its owner (the user the TPM process runs as).
pub fn leave_keys(dir: &Path, id: &str, wrapped_hex: &str) -> Result<KeysLeft, ReserveError> {
    let wrapped = hex::decode(wrapped_hex.trim())
        .ok()
        .filter(|w| !w.is_empty() && w.len() <= MAX_WRAPPED)
        .ok_or(ReserveError::WrappedKey)?;
    let shown = || dir.display().to_string();
    if !is_dir(dir)? {
        return Err(ReserveError::NoReservation(shown()));
    }
    let lock = locked(dir)?;
    let mut r: Reservation = statedir::read_json(dir, statedir::RESERVATION)
        .map_err(ReserveError::BadReservation)?
        .ok_or_else(|| ReserveError::NoReservation(shown()))?;
    if r.migration_id != id {
        return Err(ReserveError::OtherMigration {
            dir: shown(),
            has: r.migration_id,
            given: id.into(),
        });
    }
    if r.expires < vtpm_common::statedir::unix_now() {
        return Err(ReserveError::Expired(shown()));
    }
    let file = dir.join(statedir::RESERVATION);
    let meta = fs::symlink_metadata(&file).map_err(io_err("stat", &file))?;
    r.wrapped_key = Some(hex::encode(&wrapped));
    statedir::write_json(dir, statedir::RESERVATION, &r)?;
    give(
        &file,
        (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid())),
    )?;
    drop(lock);
    Ok(KeysLeft {
        migration_id: r.migration_id,
        wrapped_key_bytes: wrapped.len(),
    })
}

/// What `--cancel` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cancelled {
    /// The id whose reservation was removed (none if there was none).
    pub cancelled: Option<String>,
    /// Whether the directory, left empty, was removed too (libvirt then
    /// provisions a new TPM there as for a new domain).
    pub removed_dir: bool,
}

/// Removes `dir`'s reservation (a symlink or unreadable file included),
/// and the directory if nothing else is left in it.
pub fn cancel(dir: &Path) -> Result<Cancelled, ReserveError> {
    if !is_dir(dir)? {
        return Ok(Cancelled {
            cancelled: None,
            removed_dir: false,
        });
    }
    let lock = locked(dir)?;
    let id = statedir::read_json::<Reservation>(dir, statedir::RESERVATION)
        .ok()
        .flatten()
        .map(|r| r.migration_id);
    statedir::remove_durably(dir, statedir::RESERVATION)?;
    let others = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .filter_map(Result::ok)
        .any(|e| e.file_name() != ".lock");
    let mut removed_dir = false;
    if !others {
        statedir::remove_durably(dir, ".lock")?;
        drop(lock);
        removed_dir = fs::remove_dir(dir).is_ok();
    }
    Ok(Cancelled {
        cancelled: id,
        removed_dir,
    })
}
