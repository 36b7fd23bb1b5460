//! The secret that encrypts the state (`--pwdfile-fd N`, `--pwdfile F`,
//! `--keyfile F`, `--keyfile-fd N`, with `--cipher`), turned into the key
//! the state directory encrypts with.
//!
//! swtpm_setup hands these to swtpm as `--key pwdfd=N,mode=C` (and
//! `pwdfile=`, `file=`, `fd=`); vtpm-setup builds the same `--key`
//! specification and loads it with vtpmd's own loader
//! ([`crate::daemon::keys::load`]: swtpm's PBKDF2 derivation, hex key
//! files), so `vtpmd socket --key pwdfd=N,mode=C` given the same passphrase
//! opens what vtpm-setup wrote. A descriptor is read to its end and closed.
//!
//! The files are written in swtpm's encrypted format (not vtpmd's sealed
//! one), as swtpm_setup would have written them, so the directory stays
//! usable by swtpm too: switching a domain back needs nothing.

use super::args::SecretSource;
use crate::config::{KeyMaterial, KeySource, KeySpec};
use crate::daemon::keys::{self, KeyLoadError};
use crate::storage::at_rest::{AtRestKey, Format};
use crate::storage::swtpm_key::{Cipher, Kdf, KeyFormat};
use std::path::PathBuf;

/// Whether encrypted provisioning works in this build (announced by
/// `--print-capabilities` as cmdarg-pwdfile-fd / cmdarg-keyfile-fd).
pub const AVAILABLE: bool = true;

/// The `--key` specification swtpm_setup would pass to swtpm.
pub fn key_spec(src: &SecretSource, cipher: Cipher) -> (&'static str, KeySpec) {
    let (opt, source, material) = match src {
        SecretSource::KeyFile(p) => (
            "--keyfile",
            KeySource::File(PathBuf::from(p)),
            KeyMaterial::Key(KeyFormat::Hex),
        ),
        SecretSource::KeyFd(fd) => (
            "--keyfile-fd",
            KeySource::Fd(*fd),
            KeyMaterial::Key(KeyFormat::Hex),
        ),
        SecretSource::PwdFile(p) => (
            "--pwdfile",
            KeySource::File(PathBuf::from(p)),
            KeyMaterial::Passphrase(Kdf::Pbkdf2),
        ),
        SecretSource::PwdFd(fd) => (
            "--pwdfile-fd",
            KeySource::Fd(*fd),
            KeyMaterial::Passphrase(Kdf::Pbkdf2),
        ),
    };
    (
        opt,
        KeySpec {
            source,
            material,
            cipher: Some(cipher),
            remove: false,
        },
    )
}

/// The key the state is written with: the one place it is derived.
pub fn state_key(src: &SecretSource, cipher: &str) -> Result<AtRestKey, KeyLoadError> {
    // `cipher` was checked by SetupArgs::check; aes-128-cbc is swtpm_setup's default.
    let cipher = Cipher::parse(cipher).unwrap_or(Cipher::Aes128Cbc);
    let (opt, spec) = key_spec(src, cipher);
    let key = keys::load(opt, &spec)?;
    Ok(AtRestKey::forced(key, Format::Swtpm))
}
