//! Two-slot state files: a durable commit costs one write and one device
//! flush (docs/STORAGE.md).
//!
//! ```text
//!  0                     4096                    4096 + S
//!  ┌─────────────────────┬───────────────────────┬───────────────────────┐
//!  │ file header         │ slot 0                │ slot 1                │
//!  │ magic, version, S   │ record ┆ spare room   │ record ┆ spare room   │
//!  └─────────────────────┴───────────────────────┴───────────────────────┘
//!  record: magic "VSLT" | flags u32 | generation u64 | len u32 | 0 u32
//!          | sha256(flags | generation | len | payload) | payload[len]
//! ```
//!
//! * A commit writes the record into the slot that does not hold the newest
//!   valid record, in place (`pwrite`), then `fdatasync`s. Every block of
//!   the file was written when it was created, so the commit changes no
//!   metadata the flush has to carry: one device flush.
//! * Loading reads both slots and keeps the valid record with the highest
//!   generation. A crash or power loss during a commit can tear only the
//!   slot being written; its checksum then fails and the other slot (the
//!   last acknowledged commit) wins.
//! * A record that does not fit grows the file: a new file with larger slots
//!   is written, flushed and renamed over the old one (two flushes; rare,
//!   since slots keep half their size again as spare room).
//! * A failed flush makes the record of unknown durability; the slot is
//!   then overwritten with zeros (best effort) so that the previous commit
//!   stays the newest, as the caller was told.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use thiserror::Error;
use zeroize::Zeroizing;

use super::files;

const FILE_MAGIC: &[u8; 8] = b"VTPMSLOT";
const FILE_VERSION: u32 = 1;
const FILE_HEADER: u64 = 4096;
const RECORD_MAGIC: &[u8; 4] = b"VSLT";
/// magic, flags, generation, len, reserved, checksum.
pub const RECORD_HEADER: usize = 4 + 4 + 8 + 4 + 4 + 32;
const PAGE: u64 = 4096;
/// Largest slot accepted from a file header (the state blobs libtpms
/// writes are far smaller; this bounds what a corrupt header can make us
/// allocate).
const MAX_SLOT: u64 = 16 * 1024 * 1024;
const MIN_SLOT: u64 = 16 * 1024;

/// The record is sealed with the state key (`--key`).
pub const FLAG_SEALED: u32 = 1;
/// The blob was deleted: loading finds nothing.
pub const FLAG_DELETED: u32 = 2;

#[derive(Debug, Error)]
pub enum SlotError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("not a vtpmd slot file (bad magic)")]
    BadMagic,
    #[error("slot file version {0} is newer than this vtpmd reads (1)")]
    BadVersion(u32),
    #[error("slot file header says slots of {0} bytes, which is not a plausible size")]
    BadSlotSize(u64),
    #[error("slot file is {actual} bytes, its header needs {need}")]
    Truncated { actual: u64, need: u64 },
    #[error("neither slot holds a valid record (both torn or corrupt)")]
    NoValidSlot,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> SlotError {
    move |source| SlotError::Io { op, source }
}

/// The newest valid record of a slot file.
#[derive(Debug)]
pub struct Record {
    pub flags: u32,
    pub generation: u64,
    pub payload: Zeroizing<Vec<u8>>,
}

fn checksum(flags: u32, generation: u64, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(flags.to_le_bytes());
    h.update(generation.to_le_bytes());
    h.update((payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize().into()
}

fn encode_record(flags: u32, generation: u64, payload: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut r = Zeroizing::new(Vec::with_capacity(RECORD_HEADER + payload.len()));
    r.extend_from_slice(RECORD_MAGIC);
    r.extend_from_slice(&flags.to_le_bytes());
    r.extend_from_slice(&generation.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&checksum(flags, generation, payload));
    r.extend_from_slice(payload);
    r
}

/// Parses one slot's bytes; `None` if it holds no valid record.
fn decode_record(slot: &[u8]) -> Option<Record> {
    if slot.len() < RECORD_HEADER || &slot[..4] != RECORD_MAGIC {
        return None;
    }
    let flags = u32::from_le_bytes(slot[4..8].try_into().ok()?);
    let generation = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(slot[16..20].try_into().ok()?) as usize;
    let payload = slot.get(RECORD_HEADER..RECORD_HEADER.checked_add(len)?)?;
    if checksum(flags, generation, payload)[..] != slot[24..56] {
        return None;
    }
    Some(Record {
        flags,
        generation,
        payload: Zeroizing::new(payload.to_vec()),
    })
}

/// The slot size for a payload of `len` bytes: room for half as much again.
fn slot_size_for(len: usize) -> u64 {
    let want = (RECORD_HEADER + len + len / 2) as u64;
    want.max(MIN_SLOT).div_ceil(PAGE) * PAGE
}

/// An open slot file.
#[derive(Debug)]
pub struct SlotFile {
    file: File,
    slot_size: u64,
    /// Slot index and generation of the newest valid record, if any.
    newest: Option<(u64, u64)>,
}

impl SlotFile {
    /// Opens an existing slot file; `Ok(None)` if there is none. Also
    /// returns its newest valid record.
    pub fn open(path: &Path, writable: bool) -> Result<Option<(SlotFile, Record)>, SlotError> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags_nofollow()
            .open(path)
        {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            r => r.map_err(io("open"))?,
        };
        let (sf, rec) = Self::load(file)?;
        Ok(Some((sf, rec)))
    }

    fn load(mut file: File) -> Result<(SlotFile, Record), SlotError> {
        let actual = file.metadata().map_err(io("stat"))?.len();
        let mut head = [0u8; 16];
        file.read_exact(&mut head).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => SlotError::Truncated {
                actual,
                need: FILE_HEADER,
            },
            _ => SlotError::Io {
                op: "read",
                source: e,
            },
        })?;
        if &head[..8] != FILE_MAGIC {
            return Err(SlotError::BadMagic);
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if version != FILE_VERSION {
            return Err(SlotError::BadVersion(version));
        }
        let slot_size = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as u64;
        if !(MIN_SLOT..=MAX_SLOT).contains(&slot_size) || slot_size % PAGE != 0 {
            return Err(SlotError::BadSlotSize(slot_size));
        }
        let need = FILE_HEADER + 2 * slot_size;
        if actual < need {
            return Err(SlotError::Truncated { actual, need });
        }
        let mut best: Option<(u64, Record)> = None;
        let mut buf = Zeroizing::new(vec![0u8; slot_size as usize]);
        for i in 0..2 {
            file.read_exact_at(&mut buf, FILE_HEADER + i * slot_size)
                .map_err(io("read"))?;
            if let Some(r) = decode_record(&buf) {
                if best
                    .as_ref()
                    .map_or(true, |(_, b)| r.generation > b.generation)
                {
                    best = Some((i, r));
                }
            }
        }
        let (slot, rec) = best.ok_or(SlotError::NoValidSlot)?;
        let newest = Some((slot, rec.generation));
        Ok((
            SlotFile {
                file,
                slot_size,
                newest,
            },
            rec,
        ))
    }

    /// Creates a slot file at `path` (through a temporary next to it,
    /// renamed into place) whose slot 0 holds `payload` as `generation`.
    /// The caller syncs the directory.
    pub fn create(
        path: &Path,
        tmp: &Path,
        mode: u32,
        flags: u32,
        generation: u64,
        payload: &[u8],
    ) -> Result<SlotFile, SlotError> {
        let slot_size = slot_size_for(payload.len());
        let total = FILE_HEADER + 2 * slot_size;
        let mut image = Zeroizing::new(vec![0u8; total as usize]);
        image[..8].copy_from_slice(FILE_MAGIC);
        image[8..12].copy_from_slice(&FILE_VERSION.to_le_bytes());
        image[12..16].copy_from_slice(&(slot_size as u32).to_le_bytes());
        let rec = encode_record(flags, generation, payload);
        let at = FILE_HEADER as usize;
        image[at..at + rec.len()].copy_from_slice(&rec);
        let r = (|| {
            let f = files::create_new(tmp, mode).map_err(io("create"))?;
            // Every block written (zeros included): later commits then
            // overwrite allocated blocks and change no metadata.
            f.write_all_at(&image, 0).map_err(io("write"))?;
            f.sync_all().map_err(io("fsync"))?;
            std::fs::rename(tmp, path).map_err(io("rename"))?;
            Ok(f)
        })();
        let file = match r {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(e);
            }
        };
        // The temporary was opened write-only; reopen for reading too.
        drop(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_nofollow()
            .open(path)
            .map_err(io("open"))?;
        Ok(SlotFile {
            file,
            slot_size,
            newest: Some((0, generation)),
        })
    }

    pub fn generation(&self) -> u64 {
        self.newest.map(|(_, g)| g).unwrap_or(0)
    }

    /// Whether a payload of `len` bytes fits a slot.
    pub fn fits(&self, len: usize) -> bool {
        (RECORD_HEADER + len) as u64 <= self.slot_size
    }

    /// Commits `payload` as the next generation: one write, one flush.
    pub fn commit(&mut self, flags: u32, payload: &[u8]) -> Result<(), SlotError> {
        debug_assert!(self.fits(payload.len()));
        let (slot, generation) = match self.newest {
            Some((s, g)) => (1 - s, g + 1),
            None => (0, 1),
        };
        let rec = encode_record(flags, generation, payload);
        let at = FILE_HEADER + slot * self.slot_size;
        let r = self
            .file
            .write_all_at(&rec, at)
            .map_err(io("write"))
            .and_then(|()| self.file.sync_data().map_err(io("fdatasync")));
        if r.is_err() {
            // The record may or may not be on disk: make sure it does not
            // win at the next load over the commit the caller still has.
            let blank = [0u8; RECORD_HEADER];
            if self.file.write_all_at(&blank, at).is_ok() {
                let _ = self.file.sync_data();
            }
            return r;
        }
        self.newest = Some((slot, generation));
        Ok(())
    }
}

/// `O_NOFOLLOW | O_CLOEXEC` on an `OpenOptions`.
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_file(dir: &Path, payload: &[u8]) -> SlotFile {
        SlotFile::create(&dir.join("f"), &dir.join("f.tmp"), 0o600, 0, 1, payload).unwrap()
    }

    fn newest(dir: &Path) -> Record {
        SlotFile::open(&dir.join("f"), false).unwrap().unwrap().1
    }

    #[test]
    fn commits_alternate_slots_and_the_newest_wins() {
        let d = tempfile::tempdir().unwrap();
        let mut f = new_file(d.path(), b"one");
        assert_eq!(&newest(d.path()).payload[..], b"one");
        f.commit(0, b"two").unwrap();
        f.commit(FLAG_SEALED, b"three").unwrap();
        let r = newest(d.path());
        assert_eq!(
            (&r.payload[..], r.generation, r.flags),
            (&b"three"[..], 3, 1)
        );
        let (mut again, _) = SlotFile::open(&d.path().join("f"), true).unwrap().unwrap();
        again.commit(0, b"four").unwrap();
        assert_eq!(newest(d.path()).generation, 4);
        assert!(!d.path().join("f.tmp").exists());
    }

    #[test]
    fn a_torn_newest_slot_falls_back_to_the_previous_commit() {
        let d = tempfile::tempdir().unwrap();
        let mut f = new_file(d.path(), b"acknowledged");
        f.commit(0, b"in flight").unwrap();
        // Tear the record just written (slot 1) at every length: the
        // previous commit must win each time, never garbage.
        let path = d.path().join("f");
        let good = std::fs::read(&path).unwrap();
        let slot = f.slot_size as usize;
        let at = FILE_HEADER as usize + slot;
        for cut in [
            0,
            1,
            4,
            20,
            RECORD_HEADER - 1,
            RECORD_HEADER,
            RECORD_HEADER + 5,
        ] {
            let mut torn = good.clone();
            // What a torn write leaves: the start of the new record over
            // the zeros (here: the old content beyond `cut` is zeroed).
            torn[at + cut..at + slot].fill(0);
            std::fs::write(&path, &torn).unwrap();
            let r = newest(d.path());
            if cut >= RECORD_HEADER + b"in flight".len() {
                assert_eq!(&r.payload[..], b"in flight");
            } else {
                assert_eq!(&r.payload[..], b"acknowledged", "cut at {cut}");
            }
        }
        // A flipped payload byte also fails the checksum.
        let mut flipped = good.clone();
        flipped[at + RECORD_HEADER] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(&newest(d.path()).payload[..], b"acknowledged");
    }

    #[test]
    fn garbage_truncated_and_oversized_headers_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let open = || SlotFile::open(&path, false).map(|o| o.map(|_| ()));
        assert!(open().unwrap().is_none(), "absent is not an error");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(open(), Err(SlotError::Truncated { .. })));
        std::fs::write(&path, vec![0x5a; 9000]).unwrap();
        assert!(matches!(open(), Err(SlotError::BadMagic)));
        let mut h = FILE_MAGIC.to_vec();
        h.extend_from_slice(&2u32.to_le_bytes());
        h.extend_from_slice(&(MIN_SLOT as u32).to_le_bytes());
        std::fs::write(&path, &h).unwrap();
        assert!(matches!(open(), Err(SlotError::BadVersion(2))));
        for size in [0u32, 4097, u32::MAX] {
            let mut h = FILE_MAGIC.to_vec();
            h.extend_from_slice(&1u32.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            std::fs::write(&path, &h).unwrap();
            assert!(matches!(open(), Err(SlotError::BadSlotSize(_))), "{size}");
        }
        let mut h = FILE_MAGIC.to_vec();
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&(MIN_SLOT as u32).to_le_bytes());
        h.resize(FILE_HEADER as usize + MIN_SLOT as usize, 0);
        std::fs::write(&path, &h).unwrap();
        assert!(
            matches!(open(), Err(SlotError::Truncated { .. })),
            "one slot only"
        );
        h.resize(FILE_HEADER as usize + 2 * MIN_SLOT as usize, 0);
        std::fs::write(&path, &h).unwrap();
        assert!(matches!(open(), Err(SlotError::NoValidSlot)));
    }

    #[test]
    fn record_lengths_beyond_the_slot_are_invalid_not_read() {
        let rec = encode_record(0, 7, b"abc");
        let mut lying = rec.to_vec();
        lying[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_record(&lying).is_none());
        assert!(decode_record(&rec[..RECORD_HEADER - 1]).is_none());
        assert_eq!(decode_record(&rec).unwrap().generation, 7);
    }

    #[test]
    fn slot_sizes_leave_room_and_are_page_multiples() {
        assert_eq!(slot_size_for(0), MIN_SLOT);
        let s = slot_size_for(100_000);
        assert!(s % PAGE == 0 && s >= 150_000);
        let d = tempfile::tempdir().unwrap();
        let f = new_file(d.path(), &[1; 10]);
        assert!(f.fits(MIN_SLOT as usize - RECORD_HEADER));
        assert!(!f.fits(MIN_SLOT as usize));
    }
}
