//! The state directory: where a vTPM's persistent state lives on disk.
//!
//! ```text
//!  vtpmd-00.permall        the TPM's permanent state, two-slot file ([`slots`])
//!  vtpmd-00.volatilestate  its volatile state (written at CMD_STORE_VOLATILE)
//!  tpm2-00.permall         a stub that swtpm refuses to load (see STUB_TEXT)
//!  .lock                   the lock both vtpmd and swtpm take
//! ```
//!
//! * A commit is one write and one device flush, and a crash at any
//!   instant (kill -9 or power loss) leaves the last acknowledged state or
//!   the one in flight ([`slots`], docs/STORAGE.md).
//! * A directory made by swtpm (`tpm2-00.*` in swtpm's container,
//!   [`blob`]) is read as it is; the first write moves it to slot files.
//!   `vtpmd swtpm-export` writes swtpm's files back for a user returning
//!   to swtpm.
//! * An exclusive lock (an open-file-description lock on `.lock`, which also
//!   conflicts with swtpm's fcntl lock) keeps a second daemon out.
//! * With `--key`, files are encrypted ([`at_rest`]: vtpmd's [`sealing`]
//!   or swtpm's own format, [`swtpm_crypt`]); a plaintext file found while a
//!   key is configured is refused rather than trusted.

pub mod at_rest;
pub mod blob;
pub mod files;
mod identity;
pub mod sealing;
pub mod slots;
pub mod swtpm_crypt;
pub mod swtpm_key;

use crate::engine::{NvError, NvStore};
use at_rest::AtRestKey;
use sealing::SealError;
use slots::{SlotError, SlotFile};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;
use zeroize::Zeroizing;

/// The blobs libtpms stores.
pub const PERMANENT: &str = "permall";
pub const VOLATILE: &str = "volatilestate";
use vtpm_common::statedir::{self as layout, PendingHandover, StateDirError, STUB_TEXT};
pub use vtpm_common::statedir::{SLOT_PREFIX, STUB_MAGIC, TOMBSTONE};

/// Writes held in memory while deferred (`None`: deleted).
type Deferred = BTreeMap<String, Option<Zeroizing<Vec<u8>>>>;

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
    #[error("state file {path}: {source} (restore it from a backup; vtpmd will not start a blank TPM over it)")]
    Slot { path: String, source: SlotError },
    #[error("{path} is vtpmd's stub, but vtpmd's state file {slot} is missing (restore it from a backup; vtpmd will not start a blank TPM here)")]
    StubOnly { path: String, slot: String },
    #[error("state directory {0} holds no TPM state to export")]
    NothingToExport(String),
    #[error(transparent)]
    Layout(#[from] StateDirError),
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
    /// Slot files opened for writing, by blob name.
    slots: Mutex<HashMap<String, SlotFile>>,
    deferred: Mutex<Option<Deferred>>,
    writer: Mutex<()>,
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
            slots: Mutex::new(HashMap::new()),
            deferred: Mutex::new(None),
            writer: Mutex::new(()),
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

    /// File name of a blob's slot file.
    pub fn slot_file_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{SLOT_PREFIX}.{name}"))
    }

    /// Takes the directory lock; succeeds at once if already held.
    pub fn lock(&self) -> Result<(), StorageError> {
        let mut held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            return Ok(());
        }
        match layout::lock(&self.dir) {
            Ok(f) => {
                *held = Some(f);
                Ok(())
            }
            Err(StateDirError::Locked(_)) => Err(StorageError::Locked {
                dir: self.dir.display().to_string(),
            }),
            Err(e) => Err(StorageError::Layout(e)),
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

    /// Reads blob `name`: `Ok(None)` only if it was never written or was
    /// deleted. vtpmd's slot file wins; without one, swtpm's file is read
    /// (a directory made by swtpm).
    pub fn read_blob(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StorageError> {
        if let Some(pending) = self.deferred_lock().as_ref().and_then(|m| m.get(name)) {
            return Ok(pending.clone());
        }
        let path = self.slot_file_of(name);
        let opened = SlotFile::open(&path, false).map_err(|source| StorageError::Slot {
            path: path.display().to_string(),
            source,
        })?;
        let Some((_, rec)) = opened else {
            return self.read_swtpm_file(name);
        };
        if rec.flags & slots::FLAG_DELETED != 0 {
            return Ok(None);
        }
        let shown = || path.display().to_string();
        let sealed = rec.flags & slots::FLAG_SEALED != 0;
        match (&self.key, sealed) {
            (Some(key), true) => {
                key.open(name, &rec.payload)
                    .map(Some)
                    .map_err(|source| StorageError::Sealed {
                        path: shown(),
                        source,
                    })
            }
            (None, true) => Err(StorageError::NeedKey { path: shown() }),
            (Some(_), false) => Err(StorageError::UnexpectedPlaintext { path: shown() }),
            (None, false) => Ok(Some(rec.payload)),
        }
    }

    /// Reads swtpm's file for blob `name`.
    fn read_swtpm_file(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StorageError> {
        let path = self.file_of(name);
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
            Ok(b) => Zeroizing::new(b),
        };
        let shown = || path.display().to_string();
        if bytes.starts_with(STUB_MAGIC) {
            return Err(StorageError::StubOnly {
                path: shown(),
                slot: self.slot_file_of(name).display().to_string(),
            });
        }
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

    /// Whether the directory holds blob `name` (in either format; swtpm's
    /// stub counts, since it says the state is vtpmd's).
    pub fn has_blob(&self, name: &str) -> bool {
        let slot = self.slot_file_of(name);
        match SlotFile::open(&slot, false) {
            Ok(Some((_, rec))) => rec.flags & slots::FLAG_DELETED == 0,
            // Unreadable: something is there, and it is not ours to replace.
            Err(_) => true,
            Ok(None) => self.file_of(name).exists(),
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

    fn check_writable(&self, name: &str) -> Result<(), StorageError> {
        if self.is_fenced() {
            return Err(StorageError::Fenced(name.into()));
        }
        self.check_same_dir().inspect_err(|e| self.note_failure(e))
    }

    /// Writes blob `name` durably: one write and one device flush
    /// ([`slots`]), or held in memory while writes are deferred.
    pub fn write_blob(&self, name: &str, state: &[u8]) -> Result<(), StorageError> {
        let _serial = self.writer_lock();
        self.write_blob_locked(name, state)
    }

    fn write_blob_locked(&self, name: &str, state: &[u8]) -> Result<(), StorageError> {
        self.check_writable(name)?;
        if let Some(m) = self.deferred_lock().as_mut() {
            m.insert(name.to_string(), Some(Zeroizing::new(state.to_vec())));
            return Ok(());
        }
        let (flags, payload) = match &self.key {
            Some(key) => (
                slots::FLAG_SEALED,
                Zeroizing::new(
                    key.seal(name, state)
                        .map_err(|source| StorageError::Sealed {
                            path: self.slot_file_of(name).display().to_string(),
                            source,
                        })?,
                ),
            ),
            None => (0, Zeroizing::new(state.to_vec())),
        };
        self.commit(name, flags, &payload)
            .inspect_err(|e| self.note_failure(e))
    }

    /// Commits a record to `name`'s slot file, creating or growing it.
    fn commit(&self, name: &str, flags: u32, payload: &[u8]) -> Result<(), StorageError> {
        let path = self.slot_file_of(name);
        let slot_err = |source| StorageError::Slot {
            path: path.display().to_string(),
            source,
        };
        let mut open = self.slots_lock();
        if !open.contains_key(name) {
            if let Some((f, _)) = SlotFile::open(&path, true).map_err(slot_err)? {
                open.insert(name.to_string(), f);
            }
        }
        let generation = match open.get_mut(name) {
            Some(f) if f.fits(payload.len()) => return f.commit(flags, payload).map_err(slot_err),
            Some(f) => f.generation() + 1,
            None => 1,
        };
        open.remove(name);
        let tmp = self.dir.join(format!("TMP2-00.{name}"));
        let f = SlotFile::create(&path, &tmp, self.file_mode, flags, generation, payload)
            .map_err(slot_err)?;
        open.insert(name.to_string(), f);
        drop(open);
        if generation == 1 {
            // From now on the state lives in the slot file: swtpm's file
            // becomes a stub that swtpm refuses to load, so a swtpm started
            // here cannot bring back the old state or make a blank TPM.
            self.replace_swtpm_file(name, STUB_TEXT.as_bytes())?;
        }
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))
    }

    /// Puts `content` at swtpm's file name for `name` (permanent state) or
    /// removes swtpm's file (other blobs). The caller syncs the directory.
    fn replace_swtpm_file(&self, name: &str, content: &[u8]) -> Result<(), StorageError> {
        let dst = self.file_of(name);
        if name != PERMANENT {
            return match fs::remove_file(&dst) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io("remove", &dst)(e)),
                _ => Ok(()),
            };
        }
        layout::replace_file(
            &self.dir,
            &format!("tpm2-00.{name}"),
            content,
            self.file_mode,
        )
        .map_err(io("write", &dst))
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

    /// Removes blob `name`; a missing blob is not an error. In a slot file
    /// this is a commit of a "deleted" record (one flush, no rename).
    pub fn remove_blob(&self, name: &str) -> Result<(), StorageError> {
        let _serial = self.writer_lock();
        self.remove_blob_locked(name)
    }

    fn remove_blob_locked(&self, name: &str) -> Result<(), StorageError> {
        self.check_writable(name)?;
        if let Some(m) = self.deferred_lock().as_mut() {
            m.insert(name.to_string(), None);
            return Ok(());
        }
        if self.slots_lock().contains_key(name) || self.slot_file_of(name).exists() {
            return self.commit(name, slots::FLAG_DELETED, &[]);
        }
        let path = self.file_of(name);
        match fs::remove_file(&path) {
            // Nothing was there: the directory did not change.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
            Ok(()) => self.dir_handle.sync_all().map_err(io("fsync", &self.dir)),
        }
    }

    /// From now on writes and deletions are held in memory (and read back
    /// from there) until [`StateDir::commit_deferred`]: a migration
    /// destination loads its state without waiting for the disk.
    pub fn defer_writes(&self) {
        self.deferred_lock().get_or_insert_with(BTreeMap::new);
    }

    pub fn has_deferred(&self) -> bool {
        self.deferred_lock().is_some()
    }

    /// Writes everything held since [`StateDir::defer_writes`] durably and
    /// ends the deferral. On failure the writes stay held.
    pub fn commit_deferred(&self) -> Result<(), StorageError> {
        let _serial = self.writer_lock();
        let Some(held) = self.deferred_lock().take() else {
            return Ok(());
        };
        for (name, blob) in &held {
            let r = match blob {
                Some(b) => self.write_blob_locked(name, b),
                None => self.remove_blob_locked(name),
            };
            if let Err(e) = r {
                *self.deferred_lock() = Some(held);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drops writes held since [`StateDir::defer_writes`] (the state they
    /// belonged to was refused) and ends the deferral.
    pub fn discard_deferred(&self) {
        let _serial = self.writer_lock();
        self.deferred_lock().take();
    }

    /// Whether [`StateDir::convert_to_swtpm`] writes files swtpm can read:
    /// plain state, or a key writing swtpm's encrypted format.
    pub fn writes_swtpm_format(&self) -> bool {
        self.key
            .as_ref()
            .map_or(true, |k| k.write_format() == at_rest::Format::Swtpm)
    }

    /// Whether vtpmd's slot files hold the state (rather than swtpm's).
    pub fn has_slot_files(&self) -> bool {
        self.slot_file_of(PERMANENT).exists()
    }

    /// Removes every state file, vtpmd's and swtpm's (a provisioning that
    /// failed, or `--overwrite`): the directory then holds no TPM.
    pub fn wipe(&self) -> Result<(), StorageError> {
        let _serial = self.writer_lock();
        self.check_writable(PERMANENT)?;
        self.slots_lock().clear();
        self.deferred_lock().take();
        for name in [PERMANENT, VOLATILE, "savestate"] {
            for p in [self.slot_file_of(name), self.file_of(name)] {
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(io("remove", &p)(e)),
                    _ => {}
                }
            }
        }
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))
    }

    /// Fails if the directory already holds TPM state.
    pub fn require_empty(&self) -> Result<(), StorageError> {
        if self.has_blob(PERMANENT) {
            return Err(StorageError::NotEmpty(self.dir.display().to_string()));
        }
        Ok(())
    }

    /// After a completed outgoing migration: writes the tombstone, then
    /// removes the state, leaving a stub at swtpm's file name that swtpm
    /// refuses to load. Bypasses the fence: this is the fence's purpose.
    pub fn erase_with_tombstone(&self, tombstone: &[u8]) -> Result<(), StorageError> {
        self.check_same_dir()?;
        self.slots_lock().clear();
        self.deferred_lock().take();
        Ok(layout::erase_with_tombstone(&self.dir, tombstone)?)
    }

    /// The unresolved migration hand-over recorded here, if any.
    pub fn read_marker(&self) -> Result<Option<PendingHandover>, StorageError> {
        Ok(layout::read_marker(&self.dir)?)
    }

    /// Records a migration hand-over durably (bypasses the fence).
    pub fn write_marker(&self, m: &PendingHandover) -> Result<(), StorageError> {
        self.check_same_dir()?;
        Ok(layout::write_marker(&self.dir, m)?)
    }

    /// Forgets the hand-over durably (bypasses the fence).
    pub fn remove_marker(&self) -> Result<(), StorageError> {
        self.check_same_dir()?;
        Ok(layout::remove_marker(&self.dir)?)
    }

    /// Writes the state back in swtpm's format (`vtpmd swtpm-export`): the
    /// swtpm files first, durably, then the slot files go. With a key
    /// (forced to swtpm's format) the files are in swtpm's `--key` format.
    pub fn convert_to_swtpm(&self) -> Result<Vec<String>, StorageError> {
        let mut written = Vec::new();
        let mut found = Vec::new();
        for name in [PERMANENT, VOLATILE] {
            if let Some(b) = self.read_blob(name)? {
                found.push((name, b));
            }
        }
        if found.is_empty() {
            return Err(StorageError::NothingToExport(
                self.dir.display().to_string(),
            ));
        }
        self.check_same_dir()?;
        for (name, state) in &found {
            let dst = self.file_of(name);
            let bytes = match &self.key {
                // The key writes swtpm's encrypted format (AtRestKey::forced).
                Some(key) => key
                    .seal(name, state)
                    .map_err(|source| StorageError::Sealed {
                        path: dst.display().to_string(),
                        source,
                    })?,
                None => blob::encode_file(state),
            };
            let file = format!("tpm2-00.{name}");
            layout::replace_file(&self.dir, &file, &bytes, self.file_mode)
                .map_err(io("write", &dst))?;
            written.push(dst.display().to_string());
        }
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))?;
        self.slots_lock().clear();
        for name in [PERMANENT, VOLATILE] {
            if !found.iter().any(|(n, _)| *n == name) {
                let _ = fs::remove_file(self.file_of(name));
            }
            let p = self.slot_file_of(name);
            match fs::remove_file(&p) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(io("remove", &p)(e)),
                _ => {}
            }
        }
        self.dir_handle.sync_all().map_err(io("fsync", &self.dir))?;
        Ok(written)
    }

    /// The blobs present and their file sizes (for --print-states).
    pub fn list(dir: &Path) -> Vec<(String, u64)> {
        [PERMANENT, VOLATILE, "savestate"]
            .iter()
            .filter_map(|n| {
                let slot = dir.join(format!("{SLOT_PREFIX}.{n}"));
                let m = fs::metadata(slot)
                    .or_else(|_| fs::metadata(dir.join(format!("tpm2-00.{n}"))))
                    .ok()?;
                Some((n.to_string(), m.len()))
            })
            .collect()
    }

    fn slots_lock(&self) -> MutexGuard<'_, HashMap<String, SlotFile>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialises writers, so that committing deferred writes and a new
    /// write cannot reorder on disk.
    fn writer_lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deferred_lock(&self) -> MutexGuard<'_, Option<Deferred>> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
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
    fn write_read_remove_in_slot_files_with_a_stub_for_swtpm() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o640, None).unwrap();
        assert!(s.read_blob(PERMANENT).unwrap().is_none());
        assert!(!s.has_blob(PERMANENT));
        s.write_blob(PERMANENT, b"abc").unwrap();
        s.write_blob(PERMANENT, b"abcd").unwrap();
        let stub = fs::read(d.path().join("tpm2-00.permall")).unwrap();
        assert!(stub.starts_with(STUB_MAGIC), "swtpm's name holds the stub");
        let mode = |n: &str| fs::metadata(d.path().join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("vtpmd-00.permall"), 0o640);
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"abcd");
        s.remove_blob(PERMANENT).unwrap();
        s.remove_blob(PERMANENT).unwrap();
        assert!(s.read_blob(PERMANENT).unwrap().is_none());
        s.remove_blob(VOLATILE).unwrap();
        assert!(
            !d.path().join("vtpmd-00.volatilestate").exists(),
            "nothing to delete"
        );
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("TMP2"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_swtpm_directory_is_read_then_moved_to_slots_and_exported_back() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("tpm2-00.permall"), blob::encode_file(b"perm")).unwrap();
        fs::write(
            d.path().join("tpm2-00.volatilestate"),
            blob::encode_file(b"vol"),
        )
        .unwrap();
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        assert!(s.has_blob(PERMANENT));
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"perm");
        s.write_blob(PERMANENT, b"perm2").unwrap();
        s.write_blob(VOLATILE, b"vol2").unwrap();
        assert!(
            !d.path().join("tpm2-00.volatilestate").exists(),
            "no stale copy"
        );
        assert!(fs::read(d.path().join("tpm2-00.permall"))
            .unwrap()
            .starts_with(STUB_MAGIC));
        let written = s.convert_to_swtpm().unwrap();
        assert_eq!(written.len(), 2);
        assert!(!d.path().join("vtpmd-00.permall").exists());
        assert_eq!(
            blob::decode_plain(&fs::read(d.path().join("tpm2-00.permall")).unwrap()).unwrap(),
            b"perm2"
        );
        assert_eq!(&s.read_blob(VOLATILE).unwrap().unwrap()[..], b"vol2");
        // The stub alone (state file lost) is an error, never a blank TPM.
        fs::write(d.path().join("tpm2-00.permall"), STUB_TEXT).unwrap();
        assert!(matches!(
            s.read_blob(PERMANENT),
            Err(StorageError::StubOnly { .. })
        ));
        // A corrupt slot file is an error too, not "absent".
        fs::write(d.path().join("vtpmd-00.permall"), b"junk").unwrap();
        assert!(matches!(
            s.read_blob(PERMANENT),
            Err(StorageError::Slot { .. })
        ));
    }

    #[test]
    fn deferred_writes_stay_in_memory_until_committed() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        s.write_blob(VOLATILE, b"old").unwrap();
        s.defer_writes();
        s.write_blob(PERMANENT, b"p").unwrap();
        s.remove_blob(VOLATILE).unwrap();
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"p");
        assert!(s.read_blob(VOLATILE).unwrap().is_none());
        assert!(
            !d.path().join("vtpmd-00.permall").exists(),
            "not on disk yet"
        );
        assert!(s.has_deferred());
        s.commit_deferred().unwrap();
        assert!(!s.has_deferred());
        drop(s);
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"p");
        assert!(s.read_blob(VOLATILE).unwrap().is_none());
    }

    #[test]
    fn erase_leaves_tombstone_and_stub() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o600, None).unwrap();
        s.write_blob(PERMANENT, b"p").unwrap();
        s.write_blob(VOLATILE, b"v").unwrap();
        s.erase_with_tombstone(b"{}").unwrap();
        assert!(!d.path().join("vtpmd-00.permall").exists());
        assert!(!d.path().join("vtpmd-00.volatilestate").exists());
        let stub = fs::read_to_string(d.path().join("tpm2-00.permall")).unwrap();
        assert!(stub.contains("migrated away"), "{stub}");
        drop(s);
        assert!(matches!(
            StateDir::open(d.path(), 0o600, None),
            Err(StorageError::Tombstoned { .. })
        ));
    }

    #[test]
    fn sealed_files_need_the_right_key() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path(), 0o600, Some(test_key(1))).unwrap();
        s.write_blob(PERMANENT, b"secret").unwrap();
        assert_eq!(&s.read_blob(PERMANENT).unwrap().unwrap()[..], b"secret");
        let raw = fs::read(d.path().join("vtpmd-00.permall")).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
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
        // A plaintext state swapped in is refused when a key is set.
        let other = tempfile::tempdir().unwrap();
        let plain = StateDir::open(other.path(), 0o600, None).unwrap();
        plain.write_blob(PERMANENT, b"swapped").unwrap();
        fs::copy(
            other.path().join("vtpmd-00.permall"),
            d.path().join("vtpmd-00.permall"),
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
