//! Reading `--key` / `--migration-key` material from where the options say
//! (a file or an inherited descriptor) and turning it into a key with
//! swtpm's rules ([`crate::storage::swtpm_key`]).

use crate::config::{KeyMaterial, KeySource, KeySpec};
use crate::storage::swtpm_key::{KeyError, SwtpmKey, MAX_PASSPHRASE};
use std::fs::File;
use std::io::Read;
use thiserror::Error;
use zeroize::Zeroizing;

#[derive(Debug, Error)]
pub enum KeyLoadError {
    #[error("{opt}: cannot read {what}: {source}")]
    Read {
        opt: &'static str,
        what: String,
        source: std::io::Error,
    },
    #[error("{opt}: {what}: {source}")]
    Key {
        opt: &'static str,
        what: String,
        source: KeyError,
    },
    #[error("{opt}: cannot remove {what} as remove= asked: {source}")]
    Remove {
        opt: &'static str,
        what: String,
        source: std::io::Error,
    },
}

/// Reads at most `limit` bytes, and one more to tell that there was more.
fn read_bounded(mut r: impl Read, limit: usize) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    r.by_ref().take(limit as u64 + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Loads the key `spec` describes; `opt` names the option in errors.
pub fn load(opt: &'static str, spec: &KeySpec) -> Result<SwtpmKey, KeyLoadError> {
    let what = match &spec.source {
        KeySource::File(p) => p.display().to_string(),
        KeySource::Fd(fd) => format!("file descriptor {fd}"),
    };
    let read_err = |source| KeyLoadError::Read {
        opt,
        what: what.clone(),
        source,
    };
    let file = match &spec.source {
        KeySource::File(p) => File::open(p).map_err(read_err)?,
        KeySource::Fd(fd) => File::from(crate::fdpass::inherited_fd(*fd).map_err(read_err)?),
    };
    // A key file is short; a passphrase may be longer (bounded).
    let limit = match spec.material {
        KeyMaterial::Key(_) => 4096,
        KeyMaterial::Passphrase(_) => MAX_PASSPHRASE,
    };
    let content = read_bounded(file, limit).map_err(read_err)?;
    let key = match spec.material {
        KeyMaterial::Key(format) => SwtpmKey::from_key_file(&content, format, spec.cipher),
        KeyMaterial::Passphrase(kdf) => {
            SwtpmKey::from_passphrase(&content, kdf, spec.passphrase_cipher())
        }
    }
    .map_err(|source| KeyLoadError::Key {
        opt,
        what: what.clone(),
        source,
    })?;
    if spec.remove {
        if let KeySource::File(p) = &spec.source {
            std::fs::remove_file(p).map_err(|source| KeyLoadError::Remove {
                opt,
                what: what.clone(),
                source,
            })?;
        }
    }
    Ok(key)
}
