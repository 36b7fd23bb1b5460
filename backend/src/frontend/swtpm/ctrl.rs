//! Serving control connections.
//!
//! A request is read the way swtpm reads it: the first bytes are awaited
//! (for as long as the VMM likes on its pinned connection, up to
//! `transport::IDLE_TIMEOUT` on any other), the rest of the fixed part must
//! follow within 500 ms, and only SET_STATEBLOB / HASH_DATA stream more
//! after it, read in 64 KiB pieces as they arrive. Each connection is served
//! on its own thread, so a VMM that reconnects (a cloud-hypervisor reboot) is
//! served even while its old connection lingers, and CANCEL_TPM_CMD is
//! answered while a TPM command runs. At most [`MAX_CONNECTIONS`] are held;
//! a new client takes the slot of the one idle longest
//! ([`crate::transport::Slots`]).

use super::commands;
use super::data::{DataChannel, DataFdError};
use super::wire::{self, cmd, rc, DecodeError, Request, Response};
use crate::exit::{self, Exit, ExitTx};
use crate::instance::{Vtpm, MAX_STATE_BLOB};
use crate::transport::{
    is_timeout, Acceptor, Carry, Channel, Listener, Slot, Slots, Stream, Workers,
};
use std::io::{self, ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// Time allowed for the rest of a request once its first bytes arrived.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Time allowed between pieces of streamed SET_STATEBLOB / HASH_DATA data.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// HASH_DATA is streamed through; more than this in one request is refused.
const MAX_HASH_DATA: u32 = 64 * 1024 * 1024;
/// Control connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Streamed data is read (and hashed) in pieces of at most this size.
const STREAM_CHUNK: usize = 64 * 1024;

/// What the control server needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub vtpm: Arc<Vtpm>,
    pub data: Arc<DataChannel>,
    pub exits: ExitTx,
    /// The control connections served at once (see [`Slots`]).
    pub slots: Arc<Slots>,
    /// `--ctrl ...,terminate`: exit when a control client disconnects.
    pub exit_on_close: bool,
}

enum Next {
    Request(Request, Vec<u8>),
    Reply(Response),
    Closed,
}

/// Reads one request, starting from `first` (bytes the accept loop read;
/// when empty, the first read waits up to `idle`). Leftover bytes past the
/// fixed part are returned for the streaming commands.
fn read_request(
    c: &mut Stream,
    fds: &mut Vec<OwnedFd>,
    idle: Option<Duration>,
    first: Vec<u8>,
) -> io::Result<Next> {
    let mut have = first.len();
    let mut buf = first;
    buf.resize(have.max(4104), 0);
    if have == 0 {
        c.set_read_timeout(idle)?;
    }
    while have == 0 {
        match c.recv(&mut buf, fds) {
            Ok(0) => return Ok(Next::Closed),
            Ok(n) => {
                have = n;
                break;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                log::info!("control: closing a connection idle for {idle:?}");
                return Ok(Next::Closed);
            }
            Err(e) => return Err(e),
        }
    }
    // The rest of a request gets REQUEST_TIMEOUT, set only when a request
    // did not come whole (a syscall saved on every other request).
    let mut timed = false;
    loop {
        let final_read = match wire::decode(&buf[..have], false) {
            Ok(req) => {
                return Ok(Next::Request(
                    req.clone(),
                    buf[wire::fixed_len(&req)..have].to_vec(),
                ))
            }
            // A locality byte usable as it is (tpm2-tss sends no padding):
            // what came with it is the whole request, as swtpm takes it.
            Err(DecodeError::Incomplete { usable: true, .. }) => true,
            Err(DecodeError::Incomplete { need, .. }) => {
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                if !timed {
                    c.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                    timed = true;
                }
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

/// Reads up to `want` streamed bytes (SET_STATEBLOB / HASH_DATA data) in
/// pieces of at most [`STREAM_CHUNK`], handing each to `sink`; memory
/// grows only with bytes actually received. `first` holds bytes that came
/// with the request. Returns false if the client went away or stalled.
fn read_stream(
    c: &mut Stream,
    first: Vec<u8>,
    want: usize,
    mut sink: impl FnMut(&[u8]),
) -> io::Result<bool> {
    let mut got = first.len();
    if !first.is_empty() {
        sink(&first);
    }
    c.set_read_timeout(Some(STREAM_TIMEOUT))?;
    let mut chunk = vec![0u8; STREAM_CHUNK.min(want.saturating_sub(got))];
    let mut ignored = Vec::new();
    while got < want {
        let n = chunk.len().min(want - got);
        match c.recv(&mut chunk[..n], &mut ignored) {
            Ok(0) => return Ok(false),
            Ok(k) => {
                got += k;
                sink(&chunk[..k]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        ignored.clear();
    }
    Ok(true)
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

/// The streamed part of SET_STATEBLOB (collected, at most
/// [`MAX_STATE_BLOB`] bytes) or HASH_DATA (hashed piece by piece as it
/// arrives, so memory never holds more than one piece). `None`: the stream
/// ended early and the connection is done.
fn streamed(
    c: &mut Stream,
    ctx: &Context,
    req: &Request,
    extra: Vec<u8>,
) -> io::Result<Option<Response>> {
    let (len, limit) = match *req {
        Request::SetStateBlob { len, .. } => (len, MAX_STATE_BLOB),
        Request::HashData { len } => (len, MAX_HASH_DATA),
        _ => unreachable!("only streaming requests come here"),
    };
    if len > limit {
        log::error!("control: {len}-byte stream refused (limit {limit})");
        drain(c)?;
        return Ok(Some(Response::Result(rc::FAIL)));
    }
    if extra.len() > len as usize {
        log::error!("control: more data than the announced {len} bytes");
        return Ok(Some(Response::Result(rc::BAD_PARAMETER)));
    }
    let complete;
    let resp = if req.code() == cmd::HASH_DATA {
        let mut first_failure = None;
        complete = read_stream(c, extra, len as usize, |piece| {
            if first_failure.is_none() {
                let r = commands::execute(&ctx.vtpm, req, piece);
                if r != Response::Result(rc::SUCCESS) {
                    first_failure = Some(r);
                }
            }
        })?;
        first_failure.unwrap_or(Response::Result(rc::SUCCESS))
    } else {
        let mut data = Vec::new();
        complete = read_stream(c, extra, len as usize, |piece| {
            data.extend_from_slice(piece)
        })?;
        commands::execute(&ctx.vtpm, req, &data)
    };
    if !complete {
        log::error!("control: stream of {len} bytes ended early");
        c.write_all(&Response::Result(rc::BAD_PARAMETER).encode())?;
        return Ok(None);
    }
    Ok(Some(resp))
}

/// Serves requests on one connection until it closes, sits idle too long
/// (unless pinned), or SHUTDOWN arrives; starts from what the accept loop
/// read or could not send (`carry`).
pub fn serve(c: &mut Stream, ctx: &Context, slot: &Slot, carry: Carry) -> io::Result<()> {
    c.write_all(&carry.unsent)?;
    let (mut first, mut first_fds) = (carry.received, carry.fds);
    loop {
        let mut fds = std::mem::take(&mut first_fds);
        let next = read_request(c, &mut fds, slot.idle_timeout(), std::mem::take(&mut first))?;
        slot.busy(true);
        let (req, extra) = match next {
            Next::Closed => return Ok(()),
            Next::Reply(r) => {
                fds.clear();
                c.write_all(&r.encode())?;
                slot.busy(false);
                continue;
            }
            Next::Request(req, extra) => (req, extra),
        };
        log::debug!("control: {req:?}");
        if req != Request::SetDataFd && !fds.is_empty() {
            log::warn!(
                "control: closing {} descriptor(s) sent with a request that takes none",
                fds.len()
            );
            fds.clear();
        }
        let resp = match req {
            Request::SetStateBlob { .. } | Request::HashData { .. } => {
                match streamed(c, ctx, &req, extra)? {
                    Some(r) => r,
                    None => return Ok(()),
                }
            }
            Request::SetDataFd => {
                let r = set_data_fd(ctx, fds);
                if r == rc::SUCCESS {
                    // The VMM's connection: never closed for idling.
                    slot.pin();
                }
                Response::Result(r)
            }
            _ => commands::execute(&ctx.vtpm, &req, &[]),
        };
        c.write_all(&resp.encode())?;
        // A migrated state that went live with this answer (INIT) is
        // written durably from now on, not before the answer.
        ctx.vtpm.start_pending_durability();
        slot.busy(false);
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

fn spawn_conn(mut conn: Stream, ctx: &Context, workers: &Arc<Workers>, pinned: bool, carry: Carry) {
    let Some(slot) = ctx.slots.admit(&conn) else {
        return;
    };
    if pinned {
        slot.pin();
    }
    let ctx = ctx.clone();
    let r = workers.run(move || {
        if let Err(e) = serve(&mut conn, &ctx, &slot, carry) {
            log::warn!("control: {e}");
        }
        drop(slot);
        if ctx.exit_on_close {
            exit::report(&ctx.exits, Exit::CtrlClosed);
        }
    });
    if r.is_err() {
        log::error!("control: cannot start a connection thread");
    }
}

/// Requests the accept loop answers itself when they arrive whole and the
/// TPM is free: short, no data streamed, no descriptor, no long work, and
/// the connection goes on as before. (tpm2-tss opens a control connection
/// for SET_LOCALITY at each start.)
fn answered_on_loop(req: &Request) -> bool {
    matches!(
        req,
        Request::GetCapability
            | Request::GetTpmEstablished
            | Request::SetLocality(_)
            | Request::ResetTpmEstablished(_)
            | Request::CancelTpmCmd
            | Request::GetConfig
            | Request::SetBufferSize(_)
            | Request::GetInfo { .. }
    )
}

/// Decodes `bytes` as one whole request, the way [`read_request`] would
/// take it from a single read.
fn whole_request(bytes: &[u8]) -> Option<Request> {
    match wire::decode(bytes, false) {
        Ok(req) if wire::fixed_len(&req) == bytes.len() => Some(req),
        Err(DecodeError::Incomplete { usable: true, .. }) => wire::decode(bytes, true).ok(),
        _ => None,
    }
}

/// The control listener's connections: see [`answered_on_loop`]; every
/// other request, and everything after it, on a thread of the
/// connection's own ([`Workers`]).
#[derive(Debug)]
struct CtrlChannel {
    ctx: Context,
    workers: Arc<Workers>,
}

impl Channel for CtrlChannel {
    fn answer(&mut self, request: &[u8], reply: &mut Vec<u8>) -> bool {
        let Some(req) = whole_request(request).filter(answered_on_loop) else {
            return false;
        };
        if !self.ctx.vtpm.is_idle() {
            return false;
        }
        log::debug!("control: {req:?}");
        reply.clear();
        reply.extend_from_slice(&commands::execute(&self.ctx.vtpm, &req, &[]).encode());
        true
    }

    fn hand_off(&mut self, s: Stream, carry: Carry) {
        spawn_conn(s, &self.ctx, &self.workers, false, carry)
    }

    fn closed(&mut self) {
        if self.ctx.exit_on_close {
            exit::report(&self.ctx.exits, Exit::CtrlClosed);
        }
    }
}

/// The daemon's accept loop's part for the control listener `l`.
pub fn acceptor(l: Listener, ctx: Context) -> Acceptor {
    Acceptor {
        name: "control",
        listener: l,
        channel: Box::new(CtrlChannel {
            ctx,
            workers: Workers::new("ctrl"),
        }),
    }
}

/// Serves the control client the parent handed over (`clientfd=`), on its
/// own thread: the owner's connection, never closed for idling.
pub fn serve_client(conn: Stream, ctx: &Context) {
    spawn_conn(conn, ctx, &Workers::new("ctrl"), true, Carry::default())
}
