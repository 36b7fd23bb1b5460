//! The socket frontends' transport: one connection type over unix and TCP
//! streams, one listener type, one accept loop for all of a process's
//! listeners, one timeout test.
//!
//! ```text
//!  Listener::{bind_unix, bind_tcp}
//!        │ accept::serve(acceptors, wake, stop): one thread, poll()
//!        ▼
//!  held connection ──whole quick request──▶ Channel::answer, on the loop
//!        │ anything else (partial, streamed, descriptors, busy TPM)
//!        ▼
//!  Channel::hand_off(stream, Carry) ──▶ Workers (a thread per connection)
//!                                       Slots::admit: at most `max` at once;
//!                                       when full, the one idle longest
//!                                       (not pinned, not mid-request) closes
//! ```
//!
//! Fairness rules every channel follows: a connection waits at most
//! [`IDLE_TIMEOUT`] for its next request unless it is pinned (the VMM's
//! control connection that handed over the data channel, and that data
//! channel); a started request must arrive within its channel's request
//! timeout; a reply waits at most [`WRITE_TIMEOUT`] for an unpinned client
//! to read it; and a full house never locks a new client out while some
//! connection is merely idle.

mod accept;
mod slots;
mod workers;

pub use accept::{serve, Acceptor, Carry, Channel};
pub use slots::{Slot, Slots};
pub use workers::{Workers, LINGER};

use crate::fdpass;
use nix::sys::socket::MsgFlags;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// How long an unpinned connection may sit between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reply may wait for an unpinned client to read it: a client
/// that sends requests but never reads cannot hold its slot (and a thread)
/// for ever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a read failed only because its timeout ran out.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// One connection.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Reads into `buf`; descriptors passed along (unix only) are appended
    /// to `fds`.
    pub fn recv(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => fdpass::recv_with_fds(s, buf, fds),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    /// Reads what has arrived without waiting ([`ErrorKind::WouldBlock`]
    /// when nothing has); descriptors as [`Stream::recv`].
    pub fn try_recv(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => fdpass::try_recv_with_fds(s, buf, fds),
            Stream::Tcp(s) => nix::sys::socket::recv(s.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from),
        }
    }

    /// Writes as much of `buf` as the socket takes without waiting.
    pub fn try_send(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.as_fd().as_raw_fd();
        nix::sys::socket::send(fd, buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
            .map_err(io::Error::from)
    }

    /// Sends small replies at once (TCP_NODELAY), for a connection that
    /// carries more than one request: a reply written while the previous
    /// one is unacknowledged is then not held back. A connection with a
    /// single request and reply (tpm2-tss's) never needs it.
    pub fn no_delay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }

    /// `None` waits for ever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// `None` waits for ever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection in both directions (a reader blocked on it
    /// returns at once).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a unix socket at `path`, replacing a stale socket (never another
    /// kind of file), and gives it `mode`. (The daemon runs with umask 077,
    /// so the socket is private until then.)
    pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
        if let Ok(m) = fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                fs::remove_file(path)?;
            }
        }
        let l = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        Ok(l)
    }

    pub fn bind_tcp(addr: SocketAddr) -> io::Result<Listener> {
        TcpListener::bind(addr).map(Listener::Tcp)
    }

    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }

    pub(crate) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}
