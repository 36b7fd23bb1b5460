//! The data channel: raw TPM 2.0 commands in, responses out.
//!
//! A command is read exactly as its header's `commandSize` says; sizes below
//! 10 or above the negotiated buffer size are answered with
//! TPM_RC_COMMAND_SIZE and the stray bytes are discarded. Every response is
//! written in one piece (cloud-hypervisor reads it with a single recv).
//!
//! The channel is either a socket handed over by CMD_SET_DATAFD (QEMU,
//! cloud-hypervisor) or connections accepted from `--server` (tpm2-tss opens
//! one per command).

use crate::engine::tpm2;
use crate::exit::{self, Exit, ExitTx};
use crate::instance::Vtpm;
use crate::transport::{is_timeout, Acceptor, Carry, Channel, Listener, Slots, Stream, Workers};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a started command may take to arrive in full.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why SET_DATAFD's descriptor was not taken.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DataFdError {
    #[error("not a valid descriptor")]
    BadDescriptor,
    #[error("the descriptor is not a socket")]
    NotASocket,
    #[error("the socket is not a stream socket (a datagram socket cannot carry the data channel)")]
    NotAStream,
    #[error("a data connection is already open")]
    AlreadyOpen,
    #[error("cannot duplicate the descriptor")]
    Duplicate,
    #[error("cannot start the data thread")]
    Thread,
}

enum Fill {
    Full,
    Eof,
    TimedOut,
}

/// What a data connection received and has not used yet. A read takes
/// whatever has arrived, so a command sent in one piece costs one read (as
/// swtpm reads it); bytes past the current command are the start of the
/// next one and wait here for it.
struct Inbox {
    buf: Vec<u8>,
    have: usize,
}

impl Inbox {
    /// Holding `received` (what the accept loop read before handing the
    /// connection over), with room for a command of the usual size.
    fn new(received: Vec<u8>) -> Inbox {
        let have = received.len();
        let mut buf = received;
        buf.resize(have.max(4096), 0);
        Inbox { buf, have }
    }

    /// Reads until at least `want` bytes are held (the caller has checked
    /// `want` against the buffer size limit). Before the first byte of a
    /// command it waits up to `idle` (for ever with `None`), then reports
    /// end of stream; once a command has started, a read that times out
    /// abandons it.
    fn fill(
        &mut self,
        s: &mut Stream,
        want: usize,
        started: bool,
        idle: Option<Duration>,
    ) -> io::Result<Fill> {
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let since = Instant::now();
        while self.have < want {
            match s.read(&mut self.buf[self.have..]) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => self.have += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && self.have == 0 && !started => {
                    if idle.is_some_and(|t| since.elapsed() >= t) {
                        log::info!("data channel: closing a connection idle for {idle:?}");
                        return Ok(Fill::Eof);
                    }
                }
                Err(e) if is_timeout(&e) => return Ok(Fill::TimedOut),
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Full)
    }

    /// Drops the first `n` bytes held (a command answered or discarded);
    /// returns how many of them were not held yet.
    fn consume(&mut self, n: usize) -> usize {
        let held = n.min(self.have);
        self.buf.copy_within(held..self.have, 0);
        self.have -= held;
        n - held
    }
}

/// Drops the rest of an oversized command's `len`-byte body so the stream
/// stays in step: the `unread` bytes not received yet, or what arrives
/// before the client pauses when `len` is implausibly large (a garbage
/// header).
fn skip_body(s: &mut Stream, len: usize, unread: usize) -> io::Result<()> {
    const PLAUSIBLE: usize = 1 << 20;
    let pause = if len > PLAUSIBLE {
        Duration::from_millis(50)
    } else {
        COMMAND_TIMEOUT
    };
    s.set_read_timeout(Some(pause))?;
    let mut sink = [0u8; 4096];
    let mut left = if len > PLAUSIBLE { usize::MAX } else { unread };
    let r = loop {
        if left == 0 {
            break Ok(());
        }
        let n = left.min(sink.len());
        match s.read(&mut sink[..n]) {
            Ok(0) => break Ok(()),
            Ok(got) => left -= got,
            Err(e) if is_timeout(&e) => break Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    s.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    r
}

/// Serves TPM commands on `s` until the peer closes it or, with `idle`,
/// sends nothing for that long.
pub fn serve(s: &mut Stream, vtpm: &Vtpm, idle: Option<Duration>) -> io::Result<()> {
    serve_from(s, vtpm, idle, Carry::default())
}

/// [`serve`], starting from what the accept loop already read or could not
/// send (`carry`; descriptors are not used on the data channel and close).
fn serve_from(s: &mut Stream, vtpm: &Vtpm, idle: Option<Duration>, carry: Carry) -> io::Result<()> {
    s.write_all(&carry.unsent)?;
    s.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    let mut inbox = Inbox::new(carry.received);
    let mut out = Vec::with_capacity(4096);
    loop {
        match inbox.fill(s, tpm2::HEADER_LEN, false, idle)? {
            Fill::Full => {}
            Fill::Eof => return Ok(()),
            Fill::TimedOut => {
                log::warn!("data channel: command header cut short; discarding it");
                inbox.consume(inbox.have);
                s.write_all(&tpm2::error_response(tpm2::RC_COMMAND_SIZE))?;
                continue;
            }
        }
        let size = tpm2::Header::parse(&inbox.buf).map_or(0, |h| h.size) as usize;
        let max = vtpm.io_size() as usize;
        if !tpm2::command_size_ok(size, max) {
            log::warn!("data channel: command size {size} outside 10..={max}; answering TPM_RC_COMMAND_SIZE");
            // The header goes; an oversized command's body goes too, from
            // what is held and then from the stream.
            let announced = if size > max { size } else { tpm2::HEADER_LEN };
            let unread = inbox.consume(announced);
            if unread > 0 {
                skip_body(s, size - tpm2::HEADER_LEN, unread)?;
            }
            s.write_all(&tpm2::error_response(tpm2::RC_COMMAND_SIZE))?;
            continue;
        }
        match inbox.fill(s, size, true, None)? {
            Fill::Full => {}
            Fill::Eof => return Ok(()),
            Fill::TimedOut => {
                log::warn!(
                    "data channel: command announced {size} bytes but stopped short; discarding it"
                );
                inbox.consume(inbox.have);
                s.write_all(&tpm2::error_response(tpm2::RC_COMMAND_SIZE))?;
                continue;
            }
        }
        log::trace!(
            "data: command {:#x}, {size} bytes",
            tpm2::command_code(&inbox.buf).unwrap_or(0)
        );
        vtpm.process(&inbox.buf[..size], &mut out);
        inbox.consume(size);
        s.write_all(&out)?;
    }
}

struct Active {
    stream: UnixStream,
    generation: u64,
}

/// The data connection set by CMD_SET_DATAFD, and what to do when it ends.
#[derive(Debug)]
pub struct DataChannel {
    vtpm: Arc<Vtpm>,
    current: Mutex<Option<ActiveDebug>>,
    generation: AtomicU64,
    exit_on_close: bool,
    exits: ExitTx,
}

/// Wrapper so DataChannel can derive Debug.
struct ActiveDebug(Active);

impl std::fmt::Debug for ActiveDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "data connection #{}", self.0.generation)
    }
}

/// A data channel must be a connected stream socket (QEMU and
/// cloud-hypervisor pass one end of a unix socketpair): a datagram socket
/// or anything else is refused before it is adopted.
fn check_stream_socket(fd: &OwnedFd) -> Result<(), DataFdError> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|_| DataFdError::BadDescriptor)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(DataFdError::NotASocket);
    }
    match getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Stream) => Ok(()),
        _ => Err(DataFdError::NotAStream),
    }
}

/// Whether the peer of `s` has hung up.
fn hung_up(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        _ => false,
    }
}

impl DataChannel {
    pub fn new(vtpm: Arc<Vtpm>, exit_on_close: bool, exits: ExitTx) -> Arc<DataChannel> {
        Arc::new(DataChannel {
            vtpm,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            exit_on_close,
            exits,
        })
    }

    /// Takes over `fd` as the data connection. Refuses (TPM_IOERROR) while
    /// the previous connection is still open; one whose peer hung up is
    /// replaced, as a VMM that reconnects after a reboot needs.
    pub fn install(self: &Arc<Self>, fd: OwnedFd) -> Result<(), DataFdError> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // As swtpm: an open connection is checked first, whatever was sent.
        if let Some(old) = cur.as_ref() {
            if !hung_up(&old.0.stream) {
                return Err(DataFdError::AlreadyOpen);
            }
        }
        check_stream_socket(&fd)?;
        if let Some(old) = cur.as_ref() {
            log::info!(
                "replacing data connection #{} whose peer hung up",
                old.0.generation
            );
            let _ = old.0.stream.shutdown(std::net::Shutdown::Both);
        }
        let stream = UnixStream::from(fd);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let keep = stream.try_clone().map_err(|_| DataFdError::Duplicate)?;
        *cur = Some(ActiveDebug(Active {
            stream: keep,
            generation,
        }));
        drop(cur);
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("data-{generation}"))
            .spawn(move || me.run(stream, generation))
            .map_err(|_| DataFdError::Thread)?;
        Ok(())
    }

    fn run(&self, stream: UnixStream, generation: u64) {
        log::info!("data connection #{generation} opened");
        if let Err(e) = serve(&mut Stream::Unix(stream), &self.vtpm, None) {
            log::warn!("data connection #{generation}: {e}");
        }
        log::info!("data connection #{generation} closed");
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|a| a.0.generation == generation) {
            *cur = None;
            drop(cur);
            if self.exit_on_close {
                exit::report(&self.exits, Exit::DataClosed);
            }
        }
    }
}

/// Serves the data connection the parent handed over whole (`--server
/// ...,fd=N` on a connected socket, as swtpm_setup does): never closed for
/// idling; when it closes, the process stops (swtpm's behaviour).
pub fn serve_connection(mut s: Stream, vtpm: Arc<Vtpm>, exits: ExitTx) -> io::Result<()> {
    std::thread::Builder::new()
        .name("data-given".into())
        .spawn(move || {
            if let Err(e) = serve(&mut s, &vtpm, None) {
                log::warn!("data connection: {e}");
            }
            log::info!("the data connection handed over at start-up closed");
            exit::report(&exits, Exit::DataClosed);
        })
        .map(drop)
}

/// `--server` connections served at once.
pub const MAX_SERVER_CONNECTIONS: usize = 8;

/// Whether `request` is exactly one whole command of an acceptable size.
fn one_whole_command(request: &[u8], max: u32) -> bool {
    tpm2::Header::parse(request).is_some_and(|h| {
        h.size as usize == request.len() && tpm2::command_size_ok(request.len(), max as usize)
    })
}

/// The `--server` listener's connections: a command that arrives whole
/// while the TPM is free is answered on the accept loop; anything else
/// (a partial or oversized command, several at once, a busy TPM) is served
/// on a thread of the connection's own ([`Workers`]; TPM commands still
/// run one at a time). An idle client is closed after
/// `transport::IDLE_TIMEOUT`, and when all slots are taken the one idle
/// longest makes room.
#[derive(Debug)]
struct ServerChannel {
    vtpm: Arc<Vtpm>,
    slots: Arc<Slots>,
    workers: Arc<Workers>,
    exit_on_close: bool,
    exits: ExitTx,
}

impl Channel for ServerChannel {
    fn answer(&mut self, request: &[u8], reply: &mut Vec<u8>) -> bool {
        if !one_whole_command(request, self.vtpm.io_size()) || !self.vtpm.is_idle() {
            return false;
        }
        log::trace!(
            "data: command {:#x}, {} bytes",
            tpm2::command_code(request).unwrap_or(0),
            request.len()
        );
        self.vtpm.process(request, reply);
        true
    }

    fn hand_off(&mut self, mut s: Stream, carry: Carry) {
        let Some(slot) = self.slots.admit(&s) else {
            return;
        };
        let (vtpm, exits, exit_on_close) =
            (self.vtpm.clone(), self.exits.clone(), self.exit_on_close);
        let r = self.workers.run(move || {
            if let Err(e) = serve_from(&mut s, &vtpm, slot.idle_timeout(), carry) {
                log::warn!("data client: {e}");
            }
            drop(slot);
            if exit_on_close {
                exit::report(&exits, Exit::DataClosed);
            }
        });
        if r.is_err() {
            log::error!("data server: cannot start a connection thread");
        }
    }

    fn closed(&mut self) {
        if self.exit_on_close {
            exit::report(&self.exits, Exit::DataClosed);
        }
    }
}

/// The daemon's accept loop's part for the `--server` listener `l`.
pub fn acceptor(l: Listener, vtpm: Arc<Vtpm>, exit_on_close: bool, exits: ExitTx) -> Acceptor {
    Acceptor {
        name: "data server",
        listener: l,
        channel: Box::new(ServerChannel {
            vtpm,
            slots: Slots::new("data server", MAX_SERVER_CONNECTIONS),
            workers: Workers::new("data-client"),
            exit_on_close,
            exits,
        }),
    }
}
