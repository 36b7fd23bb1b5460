//! The administrator channel (`--admin path=SOCK`, mode 0600): what
//! vtpmctl talks to. QEMU reaches only the control socket, so it can run the
//! TPM but never authorise a migration.
//!
//! One JSON object per line in each direction; the protocol (typed
//! requests and replies) is `vtpm_common::admin`. See docs/migration.md.

use crate::instance::Vtpm;
use crate::transport::Stream;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;
use vtpm_common::admin::{encode_reply, Request, MAX_REQUEST};

/// Answers one request line.
pub fn handle_line(vtpm: &Vtpm, line: &str) -> String {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return encode_reply(Err(e)),
    };
    let op = req.op();
    log::info!("admin: {op}");
    encode_reply(vtpm.admin(req).map_err(|e| {
        log::warn!("admin: {op} refused: {e}");
        e.to_string()
    }))
}

fn serve(conn: Stream, vtpm: &Vtpm) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Stream::Unix(conn) = conn else {
        return Ok(());
    };
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let limit = MAX_REQUEST as u64;
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(limit + 1).read_line(&mut line)? as u64;
        if n == 0 {
            return Ok(());
        }
        let too_long = n > limit || !line.ends_with('\n') && n == limit + 1;
        let reply = if too_long {
            encode_reply(Err(format!("request longer than {MAX_REQUEST} bytes")))
        } else {
            handle_line(vtpm, line.trim())
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
        if too_long {
            return Ok(());
        }
    }
}

/// Serves admin connections, one at a time.
pub fn serve_listener(l: UnixListener, vtpm: Arc<Vtpm>) {
    crate::transport::Listener::Unix(l).serve("admin", |c| {
        if let Err(e) = serve(c, &vtpm) {
            log::warn!("admin connection: {e}");
        }
    })
}
