//! vtpmctl's library: the commands, on the admin protocol and host keys of
//! `vtpm_common` (no libtpms is linked), and [`ioctl`], swtpm_ioctl's
//! command line on a control socket.

#![deny(unsafe_code)]

pub mod ioctl;
pub mod offline;
pub mod saves;

use thiserror::Error;
pub use vtpm_common::admin::{call, ClientError};
use vtpm_common::statedir::StateDirError;

#[derive(Debug, Error)]
pub enum CtlError {
    #[error(transparent)]
    Admin(#[from] ClientError),
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("{0}")]
    Input(String),
}

/// The admin socket a vtpmd run as swtpm (libvirt's emulator backend)
/// listens on in `dir`, if one answers there.
pub fn running_admin(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let sock = dir.join(vtpm_common::statedir::ADMIN_SOCKET);
    std::os::unix::net::UnixStream::connect(&sock)
        .is_ok()
        .then_some(sock)
}

/// The destination's public key from what the operator was handed: a PEM
/// file, or the JSON `vtpmctl incoming-info` printed (its `public_key`).
pub fn peer_key_pem(text: &str) -> Result<String, CtlError> {
    let t = text.trim_start();
    if !t.starts_with('{') {
        return Ok(text.to_string());
    }
    let info: vtpm_common::admin::IncomingInfo = serde_json::from_str(t).map_err(|e| {
        CtlError::Input(format!(
            "--peer-key holds JSON that is not vtpmctl incoming-info's output: {e}"
        ))
    })?;
    Ok(info.public_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_from_pem_or_incoming_info_json() {
        let pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert_eq!(peer_key_pem(pem).unwrap(), pem);
        let json = serde_json::json!({
            "migration_id": "00",
            "public_key": pem,
            "key_fingerprint": "ff",
        })
        .to_string();
        assert_eq!(peer_key_pem(&json).unwrap(), pem);
        assert!(peer_key_pem("{\"x\": 1}")
            .unwrap_err()
            .to_string()
            .contains("incoming-info"));
    }
}
