//! The socket frontend's transport: one connection type over unix and TCP
//! streams, one listener with one accept loop, one timeout test.
//!
//! ```text
//!  Listener::{bind_unix, bind_tcp} ──serve(name, handler)──▶ Stream per connection
//!  Stream::recv(buf, fds)   unix: SCM_RIGHTS descriptors collected; TCP: none
//! ```

use crate::fdpass;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

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

    /// `None` waits for ever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
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
    /// kind of file), and applies `mode`.
    pub fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<UnixListener> {
        if let Ok(m) = fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                fs::remove_file(path)?;
            }
        }
        let l = UnixListener::bind(path)?;
        if let Some(mode) = mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
        Ok(l)
    }

    pub fn bind_tcp(addr: SocketAddr) -> io::Result<Listener> {
        TcpListener::bind(addr).map(Listener::Tcp)
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    /// The accept loop: hands every connection to `handler`, for ever.
    /// Accept errors (a client that left the backlog, descriptor
    /// exhaustion) are logged and paced, never fatal.
    pub fn serve(self, name: &str, mut handler: impl FnMut(Stream)) {
        loop {
            match self.accept() {
                Ok(s) => handler(s),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("{name}: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}
