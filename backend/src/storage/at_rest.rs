//! At-rest encryption under `--key`: which of the two encrypted formats a
//! state file is read in, and which one vtpmd writes.
//!
//! * Reading: each file is recognised by its first bytes, vtpmd's sealed
//!   format ([`super::sealing`], `VTPMSEAL`) or swtpm's ([`super::swtpm_crypt`],
//!   a blob header with the ENCRYPTED flag), and opened with the same key.
//! * Writing follows the directory: once a state in swtpm's format has been
//!   read, records are sealed in swtpm's format (inside vtpmd's slot files,
//!   docs/STORAGE.md), so `vtpmd swtpm-export --key ...` can hand swtpm its
//!   files back unchanged in kind. A directory without encrypted state yet
//!   gets the sealed format, which binds each record to its blob name and
//!   derives separate cipher and MAC keys.

use super::sealing::{self, SealError, StateKey};
use super::swtpm_crypt;
use super::swtpm_key::SwtpmKey;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// An encrypted state-file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// vtpmd's sealed format.
    Sealed,
    /// swtpm's `--key` format.
    Swtpm,
}

impl Format {
    pub fn of(bytes: &[u8]) -> Option<Format> {
        if sealing::is_sealed(bytes) {
            Some(Format::Sealed)
        } else if swtpm_crypt::is_encrypted_file(bytes) {
            Some(Format::Swtpm)
        } else {
            None
        }
    }
}

/// Whether `bytes` is an encrypted state file of either format.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    Format::of(bytes).is_some()
}

/// The `--key` key, in both of its uses.
#[derive(Debug)]
pub struct AtRestKey {
    swtpm: SwtpmKey,
    sealed: StateKey,
    /// The format writes use; `None`: not decided by a file read yet.
    write: Mutex<Option<Format>>,
    /// Set by [`AtRestKey::forced`]: reads do not change `write`.
    forced: bool,
}

impl AtRestKey {
    /// A key whose write format follows the first encrypted file read.
    pub fn new(key: SwtpmKey) -> AtRestKey {
        AtRestKey {
            sealed: StateKey::from_master(key.bytes()),
            swtpm: key,
            write: Mutex::new(None),
            forced: false,
        }
    }

    /// A key that always writes `format` (conversion).
    pub fn forced(key: SwtpmKey, format: Format) -> AtRestKey {
        AtRestKey {
            forced: true,
            write: Mutex::new(Some(format)),
            ..AtRestKey::new(key)
        }
    }

    /// The format the next write uses.
    pub fn write_format(&self) -> Format {
        self.write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(Format::Sealed)
    }

    /// Opens an encrypted file that must hold blob `name`.
    pub fn open(&self, name: &str, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let format = Format::of(bytes).ok_or(SealError::Malformed("not encrypted"))?;
        let plain = match format {
            Format::Sealed => self.sealed.open(name, bytes)?,
            Format::Swtpm => swtpm_crypt::decode_state_file(&self.swtpm, bytes)?,
        };
        if !self.forced {
            let mut w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            if w.is_none() {
                if format == Format::Swtpm {
                    log::info!("state is in swtpm's encrypted format: keeping that format, so swtpm can still open it");
                }
                *w = Some(format);
            }
        }
        Ok(plain)
    }

    /// Encrypts blob `name` in the write format.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        match self.write_format() {
            Format::Sealed => self.sealed.seal(name, plain),
            Format::Swtpm => Ok(swtpm_crypt::encode_state_file(&self.swtpm, plain)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SwtpmKey {
        SwtpmKey::from_raw(&[b; 32]).unwrap()
    }

    #[test]
    fn new_directories_get_the_sealed_format() {
        let k = AtRestKey::new(key(1));
        let f = k.seal("permall", b"state").unwrap();
        assert_eq!(Format::of(&f), Some(Format::Sealed));
        assert_eq!(&k.open("permall", &f).unwrap()[..], b"state");
        assert_eq!(k.write_format(), Format::Sealed);
    }

    #[test]
    fn swtpm_files_keep_the_directory_in_swtpm_format() {
        let from_swtpm = swtpm_crypt::encode_state_file(&key(1), b"swtpm state").unwrap();
        let k = AtRestKey::new(key(1));
        assert_eq!(&k.open("permall", &from_swtpm).unwrap()[..], b"swtpm state");
        let written = k.seal("volatilestate", b"next").unwrap();
        assert_eq!(Format::of(&written), Some(Format::Swtpm));
        assert_eq!(
            &swtpm_crypt::decode_state_file(&key(1), &written).unwrap()[..],
            b"next"
        );
        // A sealed file still opens (a mixed directory loads).
        let sealed = AtRestKey::new(key(1)).seal("permall", b"s").unwrap();
        assert_eq!(&k.open("permall", &sealed).unwrap()[..], b"s");
        assert_eq!(k.write_format(), Format::Swtpm, "the first read decided");
    }

    #[test]
    fn forced_format_and_wrong_key() {
        let k = AtRestKey::forced(key(1), Format::Swtpm);
        let sealed = AtRestKey::new(key(1)).seal("permall", b"s").unwrap();
        k.open("permall", &sealed).unwrap();
        assert_eq!(
            Format::of(&k.seal("permall", b"x").unwrap()),
            Some(Format::Swtpm)
        );
        let e = AtRestKey::new(key(2)).open("permall", &sealed).unwrap_err();
        assert!(e.to_string().contains("wrong --key"), "{e}");
        let sw = swtpm_crypt::encode_state_file(&key(1), b"x").unwrap();
        let e = AtRestKey::new(key(2)).open("permall", &sw).unwrap_err();
        assert!(e.to_string().contains("swtpm's encrypted format"), "{e}");
        assert!(AtRestKey::new(key(1)).open("permall", b"plain").is_err());
    }
}
