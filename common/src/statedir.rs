//! What a state directory holds besides the TPM's blobs, shared by vtpmd
//! and by vtpmctl's offline commands (which run when no vtpmd does): its
//! file names, its lock, the pending-handover marker a migration source
//! keeps until the destination's receipt, and the erase that ends it.
//!
//! ```text
//!  .lock                  lock both vtpmd and swtpm take (OFD / fcntl)
//!  vtpmd-migration.json   a migration was prepared here and not resolved
//!  vtpmd-tombstone.json   the TPM migrated away: never start here again
//!  vtpmd-incoming.json    a migration id reserved for an incoming
//!                         migration (`vtpmctl reserve-incoming`): the next
//!                         vtpmd here starts as a sealed destination for it
//!  vtpmd-identity.json    this TPM's instance id and save generation
//!  vtpmd-rollbacks.log    one JSON line per restore of an older save
//!  vtpmd-rollback-allow.json  the one older generation the operator allowed
//!  vtpmd-admin.sock       default admin socket of a vtpmd run as swtpm
//!  tpm2-00.permall        a stub swtpm refuses to load (vtpmd's state is
//!                         in vtpmd-00.*), or swtpm's own state
//! ```
//!
//! Files are created symlink-safe ([`create_new`]) and made durable with
//! a flush of the file and of the directory.

use crate::admin::Receipt;
use crate::hex;
use crate::hostkey;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use thiserror::Error;

/// Left behind by a vTPM that migrated away.
pub const TOMBSTONE: &str = "vtpmd-tombstone.json";
/// A migration was prepared and is not resolved yet.
pub const MARKER: &str = "vtpmd-migration.json";
/// A migration id reserved for an incoming migration.
pub const RESERVATION: &str = "vtpmd-incoming.json";
/// The instance id and save generation.
pub const IDENTITY: &str = "vtpmd-identity.json";
/// Restores of older saves, one JSON line each.
pub const ROLLBACKS: &str = "vtpmd-rollbacks.log";
/// One older save generation the operator allowed to be restored.
pub const ROLLBACK_ALLOW: &str = "vtpmd-rollback-allow.json";
/// The admin socket a vtpmd started without `--admin` listens on when it
/// runs as swtpm (libvirt's emulator backend), inside the state directory.
pub const ADMIN_SOCKET: &str = "vtpmd-admin.sock";
/// vtpmd's own state files are `vtpmd-00.<blob>`.
pub const SLOT_PREFIX: &str = "vtpmd-00";
/// How swtpm's file names start when they hold one of vtpmd's stubs.
pub const STUB_MAGIC: &[u8] = b"VTPMD-STUB";
/// At swtpm's name while the state lives in vtpmd's slot files. swtpm
/// fails to start on it ("Could not initialize libtpms") rather than
/// making a blank TPM or loading an old state.
pub const STUB_TEXT: &str = "VTPMD-STUB: this TPM's state is in vtpmd-00.permall (vtpmd's \
format). To serve it with swtpm again, stop vtpmd and run \
`vtpmd swtpm-export --tpmstate dir=<this directory>`.\n";
/// At swtpm's name once the TPM migrated away.
pub const TOMBSTONE_STUB_TEXT: &str = "VTPMD-STUB: this TPM migrated away; see \
vtpmd-tombstone.json. Do not start a TPM on this directory.\n";
/// The blobs a state directory can hold.
pub const BLOBS: [&str; 2] = ["permall", "volatilestate"];
/// Largest marker file read (it holds an id, a PEM key and a digest).
const MAX_MARKER: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum StateDirError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("state directory {0} is in use by a running vtpmd or swtpm (lock on .lock is held); use its admin socket instead (vtpmctl ... --admin SOCKET)")]
    Locked(String),
    #[error("{0} is not a valid migration marker: {1}")]
    BadMarker(String, String),
    #[error("{0} has no unresolved migration (no {MARKER})")]
    NoMarker(String),
    #[error("receipt rejected: {0}")]
    Receipt(&'static str),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Creates `path` afresh with `mode`, replacing whatever entry was there:
/// a planted symlink is never followed and a planted file or hard link
/// never written through (it is unlinked, then the file created with
/// `O_EXCL`); the mode is set on the descriptor, whatever the umask.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc_flags())
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(f)
}

fn libc_flags() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits()
}

/// Writes `name` in `dir` atomically (temporary, flush, rename); the
/// caller flushes the directory.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let r = create_new(&tmp, mode).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    });
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Flushes the directory entry changes of `dir`.
pub fn sync_dir(dir: &Path) -> Result<(), StateDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Takes the directory's exclusive lock (an open-file-description lock on
/// `.lock`, which also conflicts with swtpm's fcntl lock); held while the
/// returned file stays open.
pub fn lock(dir: &Path) -> Result<File, StateDirError> {
    let path = dir.join(".lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(&path)
        .map_err(io_err("open", &path))?;
    let fl = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(f),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
            Err(StateDirError::Locked(dir.display().to_string()))
        }
        Err(e) => Err(io_err("lock", &path)(e.into())),
    }
}

/// A migration source's record of an unresolved hand-over: written when
/// the migration is prepared, completed with the digest when QEMU quits
/// after the export, removed on abort or replaced by the tombstone on
/// completion. While it exists the TPM does not start here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingHandover {
    pub migration_id: String,
    /// The destination's public key (PEM), which signs the receipt.
    pub peer_key: String,
    /// The exported state's digest, once all of it was handed out.
    pub digest: Option<String>,
    /// Whether the whole state was handed out (all three blobs).
    pub exported: bool,
}

impl PendingHandover {
    /// Checks the destination's receipt for this hand-over.
    pub fn check_receipt(&self, r: &Receipt) -> Result<(), StateDirError> {
        let peer = hostkey::parse_public(&self.peer_key, "peer key")
            .map_err(|_| StateDirError::Receipt("the marker's peer key does not parse"))?;
        let id = hex::decode(&self.migration_id)
            .map_err(|_| StateDirError::Receipt("the marker's id is not hex"))?;
        let digest = self
            .digest
            .as_deref()
            .map(hex::decode)
            .transpose()
            .map_err(|_| StateDirError::Receipt("the marker's digest is not hex"))?;
        verify_receipt(&id, &peer, digest.as_deref(), r).map_err(StateDirError::Receipt)
    }
}

/// An incoming migration reserved ahead of the destination vtpmd (libvirt
/// starts that one itself): the id the destination issued, single use.
/// The next vtpmd started on the directory takes it (and removes the file)
/// and starts as a sealed destination for that id, if it is not expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// 64 hex digits.
    pub migration_id: String,
    /// Fingerprint of the host key the source must wrap to.
    pub host_key: String,
    /// Seconds since the epoch after which the reservation is void.
    pub expires: u64,
    /// The source's instance keys wrapped to the host key (hex), once the
    /// source prepared (`vtpmctl migrate` adds them): the destination
    /// unwraps them at start, so no RSA work is left for the VM's
    /// downtime. No secret: the same bytes travel in the stream's blob 1,
    /// which wins if they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_key: Option<String>,
}

/// A TPM's identity for saves: restores are bound to `instance_id`, and
/// `generation` orders its states (see docs/migration.md, "Saves and
/// snapshots").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// 32 hex digits, random, made at the first save.
    pub instance_id: String,
    /// Grows with every save and whenever the TPM runs after one: a
    /// restore of an older generation rolls the TPM back.
    pub generation: u64,
    #[serde(default)]
    pub rollback: RollbackPolicy,
}

impl Identity {
    /// A new TPM identity: a random instance id, generation 0.
    pub fn fresh(rollback: RollbackPolicy) -> io::Result<Identity> {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(io::Error::other)?;
        Ok(Identity {
            instance_id: hex::encode(&id),
            generation: 0,
            rollback,
        })
    }
}

/// What a restore of an older generation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RollbackPolicy {
    /// Allowed (snapshot revert), logged and recorded.
    #[default]
    Allow,
    /// Refused unless the operator allowed that generation.
    Refuse,
}

/// The one older generation the operator allowed (`vtpmctl allow-rollback`);
/// used up by the restore it allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackAllowance {
    pub generation: u64,
}

/// One line of the rollback record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub unix_time: u64,
    pub restored_generation: u64,
    pub newest_generation: u64,
    /// "allowed" (policy allow), "allowed-by-operator" or "refused".
    pub decision: String,
}

/// Appends `record` as one line to the rollback record, durably.
pub fn append_rollback(dir: &Path, record: &RollbackRecord) -> Result<(), StateDirError> {
    let path = dir.join(ROLLBACKS);
    let mut line = serde_json::to_vec(record).unwrap_or_default();
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(&path)
        .map_err(io_err("open", &path))?;
    f.write_all(&line)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &path))?;
    sync_dir(dir)
}

/// Reads the rollback record (its last `MAX_MARKER` bytes at most).
pub fn read_rollbacks(dir: &Path) -> Result<Vec<RollbackRecord>, StateDirError> {
    let path = dir.join(ROLLBACKS);
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(&path)
    {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(io_err("open", &path))?,
    };
    let len = f.metadata().map_err(io_err("stat", &path))?.len();
    if len > MAX_MARKER {
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(len - MAX_MARKER))
            .map_err(io_err("seek", &path))?;
    }
    let mut text = Vec::new();
    f.take(MAX_MARKER)
        .read_to_end(&mut text)
        .map_err(io_err("read", &path))?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}

/// Now, in seconds since the Unix epoch: the clock the state directory's
/// records (reservations, rollbacks, saves) are stamped with.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads a JSON file of at most 64 KiB written by [`write_json`];
/// `Ok(None)` if there is none. A symlink is not followed.
pub fn read_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, StateDirError> {
    let path = dir.join(name);
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(&path)
    {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r.map_err(io_err("open", &path))?,
    };
    let mut text = Vec::new();
    f.take(MAX_MARKER)
        .read_to_end(&mut text)
        .map_err(io_err("read", &path))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| StateDirError::BadMarker(path.display().to_string(), e.to_string()))
}

/// Writes `name` in `dir` as pretty JSON, 0600, durably.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StateDirError> {
    let json = serde_json::to_vec_pretty(value).unwrap_or_default();
    replace_file(dir, name, &json, 0o600).map_err(io_err("write", &dir.join(name)))?;
    sync_dir(dir)
}

/// Removes `name` from `dir` durably; a missing file is not an error.
pub fn remove_durably(dir: &Path, name: &str) -> Result<(), StateDirError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &path)(e)),
        Ok(()) => sync_dir(dir),
    }
}

/// What the destination signs in a receipt.
pub fn receipt_message(id: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut m = b"vtpmd-receipt-v1".to_vec();
    m.extend_from_slice(id);
    m.extend_from_slice(digest);
    m
}

/// Checks receipt `r` for migration `id` to `peer`; `digest` is the
/// exported state's digest when known.
pub fn verify_receipt(
    id: &[u8],
    peer: &rsa::RsaPublicKey,
    digest: Option<&[u8]>,
    r: &Receipt,
) -> Result<(), &'static str> {
    if r.migration_id != hex::encode(id) {
        return Err("it is for another migration");
    }
    if digest.is_some_and(|d| r.digest != hex::encode(d)) {
        return Err("its digest differs from the exported state's");
    }
    if r.destination_key != hostkey::fingerprint(peer) {
        return Err("it is signed by another host");
    }
    let sig = hex::decode(&r.signature).map_err(|_| "signature is not hex")?;
    let signed_digest = hex::decode(&r.digest).map_err(|_| "digest is not hex")?;
    if !hostkey::verify(peer, &receipt_message(id, &signed_digest), &sig) {
        return Err("bad signature");
    }
    Ok(())
}

/// Reads the marker; `Ok(None)` if there is none.
pub fn read_marker(dir: &Path) -> Result<Option<PendingHandover>, StateDirError> {
    read_json(dir, MARKER)
}

/// Writes the marker durably.
pub fn write_marker(dir: &Path, m: &PendingHandover) -> Result<(), StateDirError> {
    write_json(dir, MARKER, m)
}

/// Removes the marker durably; a missing marker is not an error.
pub fn remove_marker(dir: &Path) -> Result<(), StateDirError> {
    remove_durably(dir, MARKER)
}

/// Ends a completed hand-over: writes the tombstone, removes the state
/// (vtpmd's and swtpm's files) and the marker, and leaves a stub at
/// swtpm's name that swtpm refuses to load.
pub fn erase_with_tombstone(dir: &Path, tombstone: &[u8]) -> Result<(), StateDirError> {
    replace_file(dir, TOMBSTONE, tombstone, 0o600)
        .map_err(io_err("write", &dir.join(TOMBSTONE)))?;
    for name in BLOBS {
        let p = dir.join(format!("{SLOT_PREFIX}.{name}"));
        match fs::remove_file(&p) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_err("remove", &p)(e)),
            _ => {}
        }
    }
    replace_file(
        dir,
        "tpm2-00.permall",
        TOMBSTONE_STUB_TEXT.as_bytes(),
        0o600,
    )
    .map_err(io_err("write", &dir.join("tpm2-00.permall")))?;
    let vol = dir.join("tpm2-00.volatilestate");
    match fs::remove_file(&vol) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_err("remove", &vol)(e)),
        _ => {}
    }
    // The marker, and what bound saves to this TPM: it lives elsewhere now.
    for name in [MARKER, IDENTITY, ROLLBACKS, ROLLBACK_ALLOW] {
        let p = dir.join(name);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_err("remove", &p)(e)),
            _ => {}
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn planted_symlink_and_hard_link_are_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let link = d.path().join("pid.tmp");
        symlink(&victim, &link).unwrap();
        create_new(&link, 0o600).unwrap().write_all(b"123").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let hard = d.path().join("state.tmp");
        fs::hard_link(&victim, &hard).unwrap();
        create_new(&hard, 0o600).unwrap().write_all(b"x").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let mode = fs::metadata(&hard).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn marker_round_trip_and_bad_markers() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_marker(d.path()).unwrap().is_none());
        let m = PendingHandover {
            migration_id: "00".repeat(32),
            peer_key: "pem".into(),
            digest: None,
            exported: false,
        };
        write_marker(d.path(), &m).unwrap();
        assert_eq!(read_marker(d.path()).unwrap(), Some(m));
        for junk in [&b""[..], b"{", b"{\"migration_id\": 5}", &[0xff; 70_000]] {
            fs::write(d.path().join(MARKER), junk).unwrap();
            assert!(matches!(
                read_marker(d.path()),
                Err(StateDirError::BadMarker(..))
            ));
        }
        remove_marker(d.path()).unwrap();
        remove_marker(d.path()).unwrap();
        assert!(read_marker(d.path()).unwrap().is_none());
    }

    #[test]
    fn identity_and_rollback_record() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_json::<Identity>(d.path(), IDENTITY).unwrap().is_none());
        let id = Identity {
            instance_id: "ab".repeat(16),
            generation: 7,
            rollback: RollbackPolicy::Refuse,
        };
        write_json(d.path(), IDENTITY, &id).unwrap();
        assert_eq!(read_json(d.path(), IDENTITY).unwrap(), Some(id));
        // An identity written before the policy existed reads as "allow".
        fs::write(
            d.path().join(IDENTITY),
            br#"{"instance_id":"00","generation":1}"#,
        )
        .unwrap();
        let old: Identity = read_json(d.path(), IDENTITY).unwrap().unwrap();
        assert_eq!(old.rollback, RollbackPolicy::Allow);
        assert!(read_rollbacks(d.path()).unwrap().is_empty());
        let r = RollbackRecord {
            unix_time: 1,
            restored_generation: 2,
            newest_generation: 5,
            decision: "allowed".into(),
        };
        append_rollback(d.path(), &r).unwrap();
        // A torn or garbage line is skipped, the rest read.
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(ROLLBACKS))
            .unwrap();
        f.write_all(b"{\"unix_ti\n").unwrap();
        append_rollback(d.path(), &r).unwrap();
        assert_eq!(read_rollbacks(d.path()).unwrap(), vec![r.clone(), r]);
        let mode = fs::metadata(d.path().join(ROLLBACKS))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn lock_excludes_a_second_holder() {
        let d = tempfile::tempdir().unwrap();
        let held = lock(d.path()).unwrap();
        assert!(matches!(lock(d.path()), Err(StateDirError::Locked(_))));
        drop(held);
        lock(d.path()).unwrap();
    }

    #[test]
    fn erase_leaves_only_tombstone_lock_and_stub() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "vtpmd-00.permall",
            "vtpmd-00.volatilestate",
            MARKER,
            IDENTITY,
            ROLLBACKS,
            ".lock",
        ] {
            fs::write(d.path().join(f), b"x").unwrap();
        }
        erase_with_tombstone(d.path(), b"{}").unwrap();
        let mut left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".lock", "tpm2-00.permall", TOMBSTONE]);
        let stub = fs::read(d.path().join("tpm2-00.permall")).unwrap();
        assert!(stub.starts_with(STUB_MAGIC));
    }
}
