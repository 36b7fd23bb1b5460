//! vtpmctl's library: talking to vtpmd's admin socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CtlError {
    #[error("cannot reach the admin socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("vtpmd answered something that is not JSON: {0}")]
    Reply(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Input(String),
}

/// Sends one request and returns its `result`.
pub fn request(sock: &Path, req: &serde_json::Value) -> Result<serde_json::Value, CtlError> {
    let s = UnixStream::connect(sock).map_err(|source| CtlError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    (&s).write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|_| CtlError::Reply(line.clone()))?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or_default())
    } else {
        Err(CtlError::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}
