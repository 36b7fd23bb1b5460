//! Serving control connections.
//!
//! A request is read the way swtpm reads it: the first bytes are awaited for
//! as long as the client likes, the rest of the fixed part must follow within
//! 500 ms, and only SET_STATEBLOB / HASH_DATA stream more after it. Each
//! connection is served on its own thread, so a VMM that reconnects (a
//! cloud-hypervisor reboot) is served even while its old connection lingers,
//! and CANCEL_TPM_CMD is answered while a TPM command runs.

use super::commands;
use super::data::{DataChannel, DataFdError};
use super::wire::{self, cmd, rc, DecodeError, Request, Response};
use crate::exit::{self, Exit, ExitTx};
use crate::instance::{Vtpm, MAX_STATE_BLOB};
use crate::transport::{is_timeout, Listener, Stream};
use std::io::{self, ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Time allowed for the rest of a request once its first bytes arrived.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Time allowed for padding after a locality byte that is usable as it is.
const PADDING_TIMEOUT: Duration = Duration::from_millis(1);
/// Time allowed between pieces of streamed SET_STATEBLOB / HASH_DATA data.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// HASH_DATA is streamed through; more than this in one request is refused.
const MAX_HASH_DATA: u32 = 64 * 1024 * 1024;
/// Control connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// What the control server needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub vtpm: Arc<Vtpm>,
    pub data: Arc<DataChannel>,
    pub exits: ExitTx,
    /// `--ctrl ...,terminate`: exit when a control client disconnects.
    pub exit_on_close: bool,
}

enum Next {
    Request(Request, Vec<u8>),
    Reply(Response),
    Closed,
}

/// Reads one request. Leftover bytes past the fixed part are returned for
/// the streaming commands.
fn read_request(c: &mut Stream, fds: &mut Vec<OwnedFd>) -> io::Result<Next> {
    let mut buf = vec![0u8; 4104];
    let mut have;
    c.set_read_timeout(None)?;
    loop {
        match c.recv(&mut buf, fds) {
            Ok(0) => return Ok(Next::Closed),
            Ok(n) => {
                have = n;
                break;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    loop {
        let final_read = match wire::decode(&buf[..have], false) {
            Ok(req) => {
                return Ok(Next::Request(
                    req.clone(),
                    buf[wire::fixed_len(&req)..have].to_vec(),
                ))
            }
            Err(DecodeError::Incomplete { need, usable, .. }) => {
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                c.set_read_timeout(Some(if usable {
                    PADDING_TIMEOUT
                } else {
                    REQUEST_TIMEOUT
                }))?;
                match c.recv(&mut buf[have..need], fds) {
                    Ok(0) => return Ok(Next::Closed),
                    Ok(n) => {
                        have += n;
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => true,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Ok(Next::Reply(reject(&buf[..have], &e))),
        };
        debug_assert!(final_read);
        return Ok(match wire::decode(&buf[..have], true) {
            Ok(req) => Next::Request(req, Vec::new()),
            Err(e) => Next::Reply(reject(&buf[..have], &e)),
        });
    }
}

fn reject(bytes: &[u8], e: &DecodeError) -> Response {
    let code = bytes
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    log::warn!(
        "control: bad request ({e}); answering {:#x}",
        e.result_code()
    );
    Response::error_for(code, e.result_code())
}

/// Reads the `len` streamed bytes that follow SET_STATEBLOB / HASH_DATA.
/// Returns None if the client went away or stalled.
fn read_stream(c: &mut Stream, mut data: Vec<u8>, len: usize) -> io::Result<Option<Vec<u8>>> {
    let have = data.len();
    data.resize(len.max(have), 0);
    let mut at = have;
    c.set_read_timeout(Some(STREAM_TIMEOUT))?;
    let mut ignored = Vec::new();
    while at < len {
        match c.recv(&mut data[at..len], &mut ignored) {
            Ok(0) => return Ok(None),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(data))
}

/// Drops incoming bytes until the client pauses.
fn drain(c: &mut Stream) -> io::Result<()> {
    c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut sink = vec![0u8; 65536];
    let mut ignored = Vec::new();
    loop {
        match c.recv(&mut sink, &mut ignored) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Serves requests on one connection until it closes or SHUTDOWN arrives.
pub fn serve(c: &mut Stream, ctx: &Context) -> io::Result<()> {
    loop {
        let mut fds = Vec::new();
        let (req, extra) = match read_request(c, &mut fds)? {
            Next::Closed => return Ok(()),
            Next::Reply(r) => {
                c.write_all(&r.encode())?;
                continue;
            }
            Next::Request(req, extra) => (req, extra),
        };
        log::debug!("control: {req:?}");
        let resp = match req {
            Request::SetStateBlob { len, .. } | Request::HashData { len } => {
                let limit = if req.code() == cmd::SET_STATEBLOB {
                    MAX_STATE_BLOB
                } else {
                    MAX_HASH_DATA
                };
                if len > limit {
                    log::error!("control: {len}-byte stream refused (limit {limit})");
                    drain(c)?;
                    Response::Result(rc::FAIL)
                } else if extra.len() > len as usize {
                    log::error!("control: more data than the announced {len} bytes");
                    Response::Result(rc::BAD_PARAMETER)
                } else {
                    match read_stream(c, extra, len as usize)? {
                        Some(data) => commands::execute(&ctx.vtpm, &req, &data),
                        None => {
                            log::error!("control: stream of {len} bytes ended early");
                            c.write_all(&Response::Result(rc::BAD_PARAMETER).encode())?;
                            return Ok(());
                        }
                    }
                }
            }
            Request::SetDataFd => Response::Result(set_data_fd(ctx, fds)),
            _ => commands::execute(&ctx.vtpm, &req, &[]),
        };
        c.write_all(&resp.encode())?;
        if req == Request::Shutdown {
            exit::report(&ctx.exits, Exit::Shutdown);
            return Ok(());
        }
    }
}

fn set_data_fd(ctx: &Context, mut fds: Vec<OwnedFd>) -> u32 {
    if fds.is_empty() {
        log::error!("SET_DATAFD without a descriptor attached");
        return rc::BAD_PARAMETER;
    }
    let fd = fds.remove(0);
    match ctx.data.install(fd) {
        Ok(()) => rc::SUCCESS,
        Err(why) => {
            log::error!("SET_DATAFD refused: {why}");
            match why {
                DataFdError::AlreadyOpen => rc::IOERROR,
                _ => rc::BAD_PARAMETER,
            }
        }
    }
}

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn spawn_conn(mut conn: Stream, ctx: &Context) {
    if ACTIVE.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        log::warn!("control: refusing a connection, {MAX_CONNECTIONS} already open");
        return;
    }
    let ctx = ctx.clone();
    let r = std::thread::Builder::new()
        .name("ctrl".into())
        .spawn(move || {
            if let Err(e) = serve(&mut conn, &ctx) {
                log::warn!("control connection: {e}");
            }
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
            if ctx.exit_on_close {
                exit::report(&ctx.exits, Exit::CtrlClosed);
            }
        });
    if r.is_err() {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        log::error!("control: cannot start a connection thread");
    }
}

/// Serves every control connection `l` accepts, each on its own thread.
pub fn serve_listener(l: Listener, ctx: Context) {
    l.serve("control", |s| spawn_conn(s, &ctx))
}
