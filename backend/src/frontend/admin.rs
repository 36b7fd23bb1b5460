//! The administrator channel (`--admin path=SOCK`, mode 0600): what
//! vtpmctl talks to. QEMU reaches only the control socket, so it can run the
//! TPM but never authorise a migration.
//!
//! One JSON object per line in each direction; the protocol (typed
//! requests and replies) is `vtpm_common::admin`. See docs/migration.md.
//! Connections are served concurrently (at most [`MAX_CONNECTIONS`]); a
//! request line must be complete within 10 s of its first byte, and a
//! connection idle for `transport::IDLE_TIMEOUT` is closed, so no client
//! keeps vtpmctl out.

use crate::instance::Vtpm;
use crate::transport::{
    is_timeout, Acceptor, Carry, Channel, Listener, Slot, Slots, Stream, Workers,
};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 4;
/// Time allowed for a whole request line once its first byte arrived.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Reads one request line into a String: waits up to `idle` for its
/// first byte, then allows [`REQUEST_DEADLINE`] for the rest (a client
/// dripping bytes is cut off). `pending` keeps bytes that arrived past the
/// line for the next call. `Ok(None)`: closed or idle.
fn read_line(
    conn: &mut UnixStream,
    pending: &mut Vec<u8>,
    idle: Option<Duration>,
) -> std::io::Result<Option<Result<String, String>>> {
    let mut chunk = [0u8; 4096];
    let mut deadline = (!pending.is_empty()).then(|| Instant::now() + REQUEST_DEADLINE);
    loop {
        if let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            return Ok(Some(
                String::from_utf8(line).map_err(|_| "request is not UTF-8".to_string()),
            ));
        }
        if pending.len() > MAX_REQUEST {
            return Ok(Some(Err(format!(
                "request longer than {MAX_REQUEST} bytes"
            ))));
        }
        let wait = match deadline {
            None => idle,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Some(Err(format!(
                        "request not complete within {REQUEST_DEADLINE:?}"
                    ))));
                }
                Some(left)
            }
        };
        conn.set_read_timeout(wait)?;
        match conn.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                deadline.get_or_insert_with(|| Instant::now() + REQUEST_DEADLINE);
            }
            Err(e) if is_timeout(&e) && deadline.is_none() => return Ok(None),
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn serve(mut conn: UnixStream, vtpm: &Vtpm, slot: &Slot, carry: Carry) -> std::io::Result<()> {
    conn.write_all(&carry.unsent)?;
    let mut pending = carry.received;
    loop {
        let line = read_line(&mut conn, &mut pending, slot.idle_timeout())?;
        slot.busy(true);
        let (reply, last) = match line {
            None => return Ok(()),
            Some(Ok(line)) => (handle_line(vtpm, line.trim()), false),
            Some(Err(why)) => (encode_reply(Err(why)), true),
        };
        conn.write_all(format!("{reply}\n").as_bytes())?;
        slot.busy(false);
        if last {
            return Ok(());
        }
    }
}

/// The admin listener's connections, each served on a thread of its own
/// ([`Workers`]); at most [`MAX_CONNECTIONS`] at once, an idle one closed
/// after `transport::IDLE_TIMEOUT` or when a new client needs its slot.
#[derive(Debug)]
struct AdminChannel {
    vtpm: Arc<Vtpm>,
    slots: Arc<Slots>,
    workers: Arc<Workers>,
}

impl Channel for AdminChannel {
    fn hand_off(&mut self, c: Stream, carry: Carry) {
        let Some(slot) = self.slots.admit(&c) else {
            return;
        };
        let Stream::Unix(conn) = c else {
            return;
        };
        let vtpm = self.vtpm.clone();
        let r = self.workers.run(move || {
            if let Err(e) = serve(conn, &vtpm, &slot, carry) {
                log::warn!("admin connection: {e}");
            }
        });
        if r.is_err() {
            log::error!("admin: cannot start a connection thread");
        }
    }
}

/// The daemon's accept loop's part for the admin listener `l`.
pub fn acceptor(l: UnixListener, vtpm: Arc<Vtpm>) -> Acceptor {
    Acceptor {
        name: "admin",
        listener: Listener::Unix(l),
        channel: Box::new(AdminChannel {
            vtpm,
            slots: Slots::new("admin", MAX_CONNECTIONS),
            workers: Workers::new("admin"),
        }),
    }
}
