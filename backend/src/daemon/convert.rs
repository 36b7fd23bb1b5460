//! `vtpmd convert-state`: every state file of a directory read (in either
//! encrypted format) and written back in the format asked for, each write
//! atomic as always; the directory lock keeps a daemon out meanwhile.

use super::{keys, RunError};
use crate::config::convert::ConvertConfig;
use crate::storage::at_rest::{AtRestKey, Format};
use crate::storage::StateDir;

/// The blobs a state directory may hold.
const BLOBS: [&str; 3] = [
    crate::storage::PERMANENT,
    crate::storage::VOLATILE,
    "savestate",
];

/// Converts the directory; returns the names of the blobs rewritten.
pub fn run(cfg: &ConvertConfig) -> Result<Vec<&'static str>, RunError> {
    let key = keys::load("--key", &cfg.key)?;
    let store = StateDir::open(
        &cfg.state_dir,
        cfg.state_mode,
        Some(AtRestKey::forced(key, cfg.to)),
    )?;
    // Everything is read (and so checked against the key) before anything
    // is written: a wrong key or a damaged file changes nothing.
    let mut blobs = Vec::new();
    for name in BLOBS {
        if let Some(plain) = store.read_blob(name)? {
            blobs.push((name, plain));
        }
    }
    for (name, plain) in &blobs {
        store.write_blob(name, plain)?;
    }
    let what = match cfg.to {
        Format::Swtpm => "swtpm's --key format",
        Format::Sealed => "vtpmd's sealed format",
    };
    log::info!("{} rewritten in {what}", cfg.state_dir.display());
    Ok(blobs.into_iter().map(|(n, _)| n).collect())
}
