//! The state directory: where a vTPM's persistent state lives on disk.
//!
//! * File names follow swtpm (`tpm2-00.permall`, `tpm2-00.volatilestate`,
//!   `.lock`), and unencrypted files use swtpm's container ([`blob`]), so a
//!   directory can be handed between swtpm and vtpmd.
//! * Every write is atomic: temporary file, fsync, rename, fsync of the
//!   directory. A crash at any instant leaves the old or the new file.
//! * An exclusive lock (an open-file-description lock on `.lock`, which also
//!   conflicts with swtpm's fcntl lock) keeps a second daemon out.
//! * With `--key`, files are encrypted ([`at_rest`]: vtpmd's [`sealing`]
//!   or swtpm's own format, [`swtpm_crypt`]); a plaintext file found while a
//!   key is configured is refused rather than trusted.

pub mod at_rest;
pub mod blob;
pub mod files;
pub mod sealing;
pub mod swtpm_crypt;
pub mod swtpm_key;

use crate::engine::{NvError, NvStore};
use at_rest::AtRestKey;
use sealing::SealError;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use thiserror::Error;
use zeroize::Zeroizing;

/// The blobs libtpms stores.
pub const PERMANENT: &str = "permall";
pub const VOLATILE: &str = "volatilestate";
/// Left behind by a vTPM that migrated away.
pub const TOMBSTONE: &str = "vtpmd-tombstone.json";

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("state directory {0} does not exist (create it first, e.g. mkdir -m 0700 {0})")]
    NoDirectory(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error(
        "state directory {dir} is in use by another vTPM process (lock on {dir}/.lock is held)"
    )]
    Locked { dir: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    Sealed { path: String, source: SealError },
    #[error("state file {path} is encrypted, but no --key was given")]
    NeedKey { path: String },
    #[error("state file {path} is not encrypted, but --key was given; refusing to trust an unencrypted file (it could have been swapped in)")]
    UnexpectedPlaintext { path: String },
    #[error("state file {path}: {source}")]
    Format {
        path: String,
        source: blob::BlobError,
    },
    #[error("state directory is fenced for migration; refusing to write {0}")]
    Fenced(String),
    #[error("this vTPM migrated away and must not be started again here: {dir}/{TOMBSTONE} says {content}")]
    Tombstoned { dir: String, content: String },
    #[error("state directory {0} already holds a TPM; an incoming migration needs an empty one")]
    NotEmpty(String),
    #[error("state directory {0} was removed or replaced while vtpmd ran; refusing to write state into whatever is there now (restore the directory and restart vtpmd)")]
    Replaced(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    dir_handle: File,
    file_mode: u32,
    key: Option<AtRestKey>,
    lock: Mutex<Option<File>>,
    fenced: AtomicBool,
    last_failure: Mutex<Option<String>>,
}

impl StateDir {
    /// Opens `dir`, which must exist, and takes its lock.
    pub fn open(
        dir: &Path,
        file_mode: u32,
        key: Option<AtRestKey>,
    ) -> Result<StateDir, StorageError> {
        let sd = StateDir::open_unlocked(dir, file_mode, key)?;
        sd.lock()?;
        Ok(sd)
    }

    /// Opens `dir` without taking its lock yet (`--migration incoming` on
    /// shared storage: the source holds it until it hands the state over).
    pub fn open_unlocked(
        dir: &Path,
        file_mode: u32,
        key: Option<AtRestKey>,
    ) -> Result<StateDir, StorageError> {
        let shown = dir.display().to_string();
        match fs::metadata(dir) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StorageError::NoDirectory(shown))
            }
            Err(e) => return Err(io("stat", dir)(e)),
            Ok(m) if !m.is_dir() => return Err(StorageError::NotADirectory(shown)),
            Ok(_) => {}
        }
        if let Ok(content) = fs::read_to_string(dir.join(TOMBSTONE)) {
            let content = content.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(StorageError::Tombstoned {
                dir: shown,
                content,
            });
        }
        let dir_handle = File::open(dir).map_err(io("open", dir))?;
        let sd = StateDir {
            dir: dir.to_path_buf(),
            dir_handle,
            file_mode,
            key,
            lock: Mutex::new(None),
            fenced: AtomicBool::new(false),
            last_failure: Mutex::new(None),
        };
        Ok(sd)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// File name of a blob, as swtpm names it.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("tpm2-00.{name}"))
    }

    /// Takes the directory lock; succeeds at once if already held.
    pub fn lock(&self) -> Result<(), StorageError> {
        let mut held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            return Ok(());
        }
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io("open", &path))?;
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        match nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => {
                *held = Some(f);
                Ok(())
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
                Err(StorageError::Locked {
                    dir: self.dir.display().to_string(),
                })
            }
            Err(e) => Err(io("lock", &path)(e.into())),
        }
    }

    /// Gives the lock up (`--migration release-lock-outgoing`: the
    /// destination on shared storage takes it).
    pub fn unlock(&self) {
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether this process holds the lock.
    pub fn is_locked(&self) -> bool {
        self.lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// While fenced, every write is refused: the state belongs elsewhere.
    pub fn set_fenced(&self, on: bool) {
        self.fenced.store(on, Ordering::SeqCst);
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Reads blob `name`: `Ok(None)` only if its file does not exist.
    pub fn read_blob(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StorageError> {
        let path = self.file_of(name);
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
            Ok(b) => Zeroizing::new(b),
        };
        let shown = || path.display().to_string();
        match (&self.key, at_rest::is_encrypted(&bytes)) {
            (Some(key), true) => {
                key.open(name, &bytes)
                    .map(Some)
                    .map_err(|source| StorageError::Sealed {
                        path: shown(),
                        source,
                    })
            }
            (None, true) => Err(StorageError::NeedKey { path: shown() }),
            (Some(_), false) => Err(StorageError::UnexpectedPlaintext { path: shown() }),
            (None, false) => blob::decode_plain(&bytes)
                .map(|v| Some(Zeroizing::new(v)))
                .map_err(|source| StorageError::Format {
                    path: shown(),
                    source,
                }),
        }
    }

    /// Fails unless `path` still names the directory opened and locked at
    /// start-up (it may have been removed, or renamed and replaced).
    fn check_same_dir(&self) -> Result<(), StorageError> {
        use std::os::unix::fs::MetadataExt;
        let held = self.dir_handle.metadata().map_err(io("stat", &self.dir))?;
        let same =
            fs::metadata(&self.dir).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino());
        if same {
            Ok(())
        } else {
            Err(StorageError::Replaced(self.dir.display().to_string()))
        }
    }

    /// Writes blob `name` atomically and durably.
    pub fn write_blob(&self, name: &str, state: &[u8]) -> Result<(), StorageError> {
        if self.is_fenced() {
            return Err(StorageError::Fenced(name.into()));
        }
        if let Err(e) = self.check_same_dir() {
            self.note_failure(&e);
            return Err(e);
        }
        let bytes = match &self.key {
            Some(key) => key
                .seal(name, state)
                .map_err(|source| StorageError::Sealed {
                    path: self.file_of(name).display().to_string(),
                    source,
                })?,
            None => blob::encode_file(state),
        };
        let tmp = self.dir.join(format!("TMP2-00.{name}"));
        let dst = self.file_of(name);
        let r = self.write_then_rename(&tmp, &dst, &bytes);
        if r.is_err() {
            // A full disk or an I/O error must not leave a partial file.
            let _ = fs::remove_file(&tmp);
        }
        r.inspect_err(|e| self.note_failure(e))
    }

    fn write_then_rename(&self, tmp: &Path, dst: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        let mut f = files::create_new(tmp, self.file_mode).map_err(io("create", tmp))?;
        f.write_all(bytes).map_err(io("write", tmp))?;
        f.sync_all().map_err(io("fsync", tmp))?;
        drop(f);
        fs::rename(tmp, dst).map_err(io("rename", dst))?;
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))
    }

    /// Remembers why storage last failed, so a start-up that fails inside
    /// the engine can say why.
    fn note_failure(&self, e: &StorageError) {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Why storage last failed, if it did since the last call.
    pub fn take_last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Removes blob `name`; a missing file is not an error.
    pub fn remove_blob(&self, name: &str) -> Result<(), StorageError> {
        if self.is_fenced() {
            return Err(StorageError::Fenced(name.into()));
        }
        self.check_same_dir()?;
        let path = self.file_of(name);
        match fs::remove_file(&path) {
            // Nothing was there: the directory did not change.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
            Ok(()) => self.dir_handle.sync_all().map_err(io("fsync", &self.dir)),
        }
    }

    /// Fails if the directory already holds TPM state.
    pub fn require_empty(&self) -> Result<(), StorageError> {
        if self.file_of(PERMANENT).exists() {
            return Err(StorageError::NotEmpty(self.dir.display().to_string()));
        }
        Ok(())
    }

    /// After a completed outgoing migration: writes the tombstone, then
    /// removes the state. Bypasses the fence: this is the fence's purpose.
    pub fn erase_with_tombstone(&self, tombstone: &[u8]) -> Result<(), StorageError> {
        self.check_same_dir()?;
        let tmp = self.dir.join(format!("{TOMBSTONE}.tmp"));
        let dst = self.dir.join(TOMBSTONE);
        let mut f = files::create_new(&tmp, 0o600).map_err(io("create", &tmp))?;
        f.write_all(tombstone).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
        for name in [PERMANENT, VOLATILE] {
            let p = self.file_of(name);
            match fs::remove_file(&p) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(io("remove", &p)(e)),
                _ => {}
            }
        }
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))
    }

    /// The blobs present and their file sizes (for --print-states).
    pub fn list(dir: &Path) -> Vec<(String, u64)> {
        [PERMANENT, VOLATILE, "savestate"]
            .iter()
            .filter_map(|n| {
                let m = fs::metadata(dir.join(format!("tpm2-00.{n}"))).ok()?;
                Some((n.to_string(), m.len()))
            })
            .collect()
    }
}

impl From<StorageError> for NvError {
    fn from(e: StorageError) -> Self {
        NvError(Box::new(e))
    }
}

impl NvStore for StateDir {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, NvError> {
        let r = self.read_blob(name);
        if let Err(e) = &r {
            self.note_failure(e);
        }
        Ok(r?.map(|z| z.to_vec()))
    }

    fn store(&self, name: &str, data: &[u8]) -> Result<(), NvError> {
        Ok(self.write_blob(name, data)?)
    }

    fn delete(&self, name: &str) -> Result<(), NvError> {
        Ok(self.remove_blob(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn test_key(b: u8) -> AtRestKey {
        AtRestKey::new(swtpm_key::SwtpmKey::from_raw(&[b; 32]).unwrap())
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = StateDir::open(Path::new("/nonexistent/vtpm"), 0o600, None).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let d = tempfile::tempdir().unwrap();
        let a = StateDir::open(d.path(), 0o600, None).unwrap();
        let e = StateDir::open(d.path(), 0o600, None).unwrap_err();
        assert!(matches!(e, StorageError::Locked { .. }), "{e}");
        drop(a);
        StateDir::open(d.path(), 0o600, None).unwrap();
    }

    #[test]
    fn write_read_remove_plain_in_swtpm_format() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o640, None).unwrap();
        assert!(s.read_blob(PERMANENT).unwrap().is_none());
        s.write_blob(PERMANENT, b"abc").unwrap();
        let raw = fs::read(d.path().join("tpm2-00.permall")).unwrap();
        assert_eq!(raw, blob::encode_file(b"abc"));
        let mode = fs::metadata(d.path().join("tpm2-00.permall"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"abc");
        s.remove_blob(PERMANENT).unwrap();
        s.remove_blob(PERMANENT).unwrap();
        assert!(s.read_blob(PERMANENT).unwrap().is_none());
        assert!(!d.path().join("TMP2-00.permall").exists());
    }

    #[test]
    fn sealed_files_need_the_right_key() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o600, Some(test_key(1))).unwrap();
        s.write_blob(PERMANENT, b"secret").unwrap();
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"secret");
        drop(s);
        let wrong = StateDir::open(d.path(), 0o600, Some(test_key(2))).unwrap();
        assert!(matches!(
            wrong.read_blob(PERMANENT),
            Err(StorageError::Sealed { .. })
        ));
        drop(wrong);
        let none = StateDir::open(d.path(), 0o600, None).unwrap();
        assert!(matches!(
            none.read_blob(PERMANENT),
            Err(StorageError::NeedKey { .. })
        ));
        none.set_fenced(false);
        fs::write(
            d.path().join("tpm2-00.permall"),
            blob::encode_file(b"swapped"),
        )
        .unwrap();
        drop(none);
        let keyed = StateDir::open(d.path(), 0o600, Some(test_key(1))).unwrap();
        assert!(matches!(
            keyed.read_blob(PERMANENT),
            Err(StorageError::UnexpectedPlaintext { .. })
        ));
    }

    #[test]
    fn corrupt_plain_file_is_an_error_not_absent() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("tpm2-00.permall"), b"garbage").unwrap();
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        assert!(matches!(
            s.read_blob(PERMANENT),
            Err(StorageError::Format { .. })
        ));
        assert!(s.load(PERMANENT).is_err());
    }

    #[test]
    fn replaced_or_removed_directory_is_not_written() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        fs::create_dir(&dir).unwrap();
        let s = StateDir::open(&dir, 0o600, None).unwrap();
        s.write_blob(PERMANENT, b"old").unwrap();
        fs::rename(&dir, parent.path().join("moved")).unwrap();
        assert!(matches!(
            s.write_blob(PERMANENT, b"new"),
            Err(StorageError::Replaced(_))
        ));
        fs::create_dir(&dir).unwrap();
        assert!(matches!(
            s.write_blob(PERMANENT, b"new"),
            Err(StorageError::Replaced(_))
        ));
        assert!(
            fs::read_dir(&dir).unwrap().next().is_none(),
            "nothing written to the newcomer"
        );
        assert!(s.take_last_failure().unwrap().contains("replaced"));
    }

    #[test]
    fn fenced_directory_refuses_writes() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        s.set_fenced(true);
        assert!(matches!(
            s.write_blob(PERMANENT, b"x"),
            Err(StorageError::Fenced(_))
        ));
        assert!(!d.path().join("tpm2-00.permall").exists());
    }
}
