//! The secret that encrypts the state (`--pwdfile-fd N`, `--pwdfile F`,
//! `--keyfile F`, `--keyfile-fd N`, with `--cipher`), turned into the key
//! the state directory encrypts with. [`state_key`] is the one place that
//! derives it.
//!
//! INTERIM: vtpmd's swtpm-compatible `--key` (reading the passphrase from a
//! descriptor, swtpm's PBKDF2 derivation, swtpm's encrypted file format) is
//! being written on branch `swcli`; until it lands, encrypted provisioning
//! is refused with this error rather than done with a second, different
//! derivation.

use super::args::SecretSource;
use crate::storage::at_rest::AtRestKey;
use thiserror::Error;

/// Whether encrypted provisioning works in this build (announced by
/// `--print-capabilities` as cmdarg-pwdfile-fd / cmdarg-keyfile-fd).
pub const AVAILABLE: bool = false;

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("{0}: encrypted state is not available in this build yet (needs vtpmd's swtpm-compatible --key support)")]
    Pending(&'static str),
}

/// The key the state is encrypted with.
pub fn state_key(src: &SecretSource, _cipher: &str) -> Result<AtRestKey, SecretError> {
    Err(SecretError::Pending(match src {
        SecretSource::KeyFile(_) => "--keyfile",
        SecretSource::KeyFd(_) => "--keyfile-fd",
        SecretSource::PwdFile(_) => "--pwdfile",
        SecretSource::PwdFd(_) => "--pwdfile-fd",
    }))
}
