//! The administrator channel (`--admin path=SOCK`, mode 0600): what
//! vtpmctl talks to. QEMU reaches only the control socket, so it can run the
//! TPM but never authorise a migration.
//!
//! Protocol: one JSON object per line in each direction.
//! Request `{"op": "status" | "incoming-info" | "outgoing" | "abort" |
//! "receipt" | "complete", ...arguments}`; reply `{"ok": true, "result": {...}}`
//! or `{"ok": false, "error": "..."}`. See docs/migration.md.

use crate::instance::Vtpm;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// Answers one request line.
pub fn handle_line(vtpm: &Vtpm, line: &str) -> serde_json::Value {
    let req: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return serde_json::json!({ "ok": false, "error": format!("request is not JSON: {e}") })
        }
    };
    let Some(op) = req.get("op").and_then(|o| o.as_str()) else {
        return serde_json::json!({ "ok": false, "error": "request needs an \"op\" string" });
    };
    log::info!("admin: {op}");
    match vtpm.admin(op, &req) {
        Ok(result) => serde_json::json!({ "ok": true, "result": result }),
        Err(error) => {
            log::warn!("admin: {op} refused: {error}");
            serde_json::json!({ "ok": false, "error": error })
        }
    }
}

fn serve(conn: UnixStream, vtpm: &Vtpm) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST + 1).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let reply = if n as u64 > MAX_REQUEST
            || !line.ends_with('\n') && n as u64 == MAX_REQUEST + 1
        {
            serde_json::json!({ "ok": false, "error": format!("request longer than {MAX_REQUEST} bytes") })
        } else {
            handle_line(vtpm, line.trim())
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
        if n as u64 > MAX_REQUEST {
            return Ok(());
        }
    }
}

pub fn serve_listener(l: UnixListener, vtpm: Arc<Vtpm>) {
    for conn in l.incoming() {
        match conn {
            Ok(c) => {
                if let Err(e) = serve(c, &vtpm) {
                    log::warn!("admin connection: {e}");
                }
            }
            Err(e) => log::warn!("admin accept: {e}"),
        }
    }
}
