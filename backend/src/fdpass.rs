//! Receiving and sending file descriptors over unix sockets (SCM_RIGHTS), as
//! CMD_SET_DATAFD needs, and taking over descriptors the parent process left
//! open (`fd=N` options: sockets, key and passphrase pipes, log and pid
//! files). The only unsafe code outside the libtpms FFI.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// The most descriptors Linux passes in one message (SCM_MAX_FD).
const MAX_FDS: usize = 253;

/// Reads into `buf` and collects any descriptors that came with the bytes.
/// Returns the byte count (0 at end of stream).
///
/// The control buffer has room for as many descriptors as the kernel
/// passes in one message, so none is ever cut off; every one received is
/// adopted into `fds`, and whatever the caller does not keep is closed when
/// dropped.
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_flags(sock, buf, fds, MsgFlags::empty())
}

/// [`recv_with_fds`] without waiting: `WouldBlock` when nothing has
/// arrived (the socket itself stays blocking).
pub fn try_recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_flags(sock, buf, fds, MsgFlags::MSG_DONTWAIT)
}

fn recv_flags(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: MsgFlags,
) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this
                // message; nothing else owns it, so OwnedFd may take it over
                // (and closes it if we reject it).
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        log::warn!("control message truncated: some passed descriptors were dropped");
    }
    Ok(msg.bytes)
}

/// Sends `bytes` with `fd` attached (what a VMM does for SET_DATAFD).
pub fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: RawFd) -> io::Result<usize> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)
}

/// Takes over `fd`, inherited from the parent process, as a listening unix
/// socket. Refuses a descriptor that is not open, not a unix stream socket,
/// or not listening, rather than adopting something else's descriptor.
pub fn inherited_listener(fd: RawFd) -> io::Result<UnixListener> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd}: {why}"));
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| bad(format!("not an open descriptor ({e})")))?;
    // SAFETY: `fd` is open (checked above) and was handed to this process
    // to own by its parent; it is borrowed only for the checks below.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    getsockname::<UnixAddr>(fd).map_err(|e| bad(format!("not a unix socket ({e})")))?;
    if getsockopt(&borrowed, sockopt::SockType).map_err(|e| bad(e.to_string()))? != SockType::Stream
    {
        return Err(bad("not a stream socket".into()));
    }
    if !getsockopt(&borrowed, sockopt::AcceptConn).map_err(|e| bad(e.to_string()))? {
        return Err(bad("the socket is not listening".into()));
    }
    // SAFETY: `fd` is an open, listening unix stream socket (checked above)
    // that the parent gave this process; from here on the listener owns it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Takes over `fd`, inherited from the parent process. Refuses a number
/// that is not an open descriptor; from here on the returned value owns it
/// (and closes it when dropped). Callers make sure no descriptor is taken
/// twice (`config::InstanceConfig::check_fds`).
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{fd} is not a file descriptor"),
        ));
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "file descriptor {fd} is not open ({e}); the parent must leave it open for vtpmd"
            ),
        )
    })?;
    // SAFETY: `fd` is open (checked above) and was left to this process by
    // its parent for exactly this option; nothing else in the process owns
    // it, so OwnedFd may take it over.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not handed on to anything vtpmd might execute.
    nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(owned)
}

/// A socket's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFamily {
    Unix,
    Inet,
    Inet6,
    Other(i32),
}

/// What an inherited socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub family: SocketFamily,
    /// SOCK_STREAM.
    pub stream: bool,
    /// listen() was called on it.
    pub listening: bool,
    /// It has a peer.
    pub connected: bool,
}

/// Describes the socket `fd` (an error if it is not a socket).
pub fn socket_info(fd: &OwnedFd) -> io::Result<SocketInfo> {
    use nix::sys::socket::{
        getpeername, getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage,
    };
    let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        let kind = match stat.st_mode & libc::S_IFMT {
            libc::S_IFREG => "a regular file",
            libc::S_IFIFO => "a pipe",
            libc::S_IFCHR => "a character device",
            libc::S_IFDIR => "a directory",
            _ => "not a socket",
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("file descriptor {} is {kind}, not a socket", fd.as_raw_fd()),
        ));
    }
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd()).map_err(io::Error::from)?;
    let family = match addr.family() {
        Some(nix::sys::socket::AddressFamily::Unix) => SocketFamily::Unix,
        Some(nix::sys::socket::AddressFamily::Inet) => SocketFamily::Inet,
        Some(nix::sys::socket::AddressFamily::Inet6) => SocketFamily::Inet6,
        other => SocketFamily::Other(other.map(|f| f as i32).unwrap_or(-1)),
    };
    let stream = getsockopt(fd, sockopt::SockType).map_err(io::Error::from)? == SockType::Stream;
    let listening = getsockopt(fd, sockopt::AcceptConn).map_err(io::Error::from)?;
    let connected = getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok();
    Ok(SocketInfo {
        family,
        stream,
        listening,
        connected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn passes_a_socket_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut data_ours, data_theirs) = UnixStream::pair().unwrap();
        send_with_fd(&a, &[0, 0, 0, 0x10], data_theirs.as_raw_fd()).unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 4);
        assert_eq!(fds.len(), 1);
        let mut got = UnixStream::from(fds.pop().unwrap());
        data_ours.write_all(b"ping").unwrap();
        let mut r = [0u8; 4];
        got.read_exact(&mut r).unwrap();
        assert_eq!(&r, b"ping");
    }

    #[test]
    fn plain_bytes_carry_no_fds() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"abc").unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 3);
        assert!(fds.is_empty());
        drop(a);
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 0);
    }

    #[test]
    fn socket_info_tells_listening_connected_and_family() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let l = inherited_fd(l.into_raw_fd()).unwrap();
        let i = socket_info(&l).unwrap();
        assert_eq!(
            (i.family, i.stream, i.listening, i.connected),
            (SocketFamily::Unix, true, true, false)
        );
        let (a, _b) = UnixStream::pair().unwrap();
        let a = inherited_fd(a.into_raw_fd()).unwrap();
        let i = socket_info(&a).unwrap();
        assert!(i.connected && !i.listening);
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = inherited_fd(t.into_raw_fd()).unwrap();
        assert_eq!(socket_info(&t).unwrap().family, SocketFamily::Inet);
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let u = inherited_fd(u.into_raw_fd()).unwrap();
        assert!(!socket_info(&u).unwrap().stream);
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let f = inherited_fd(f.into_raw_fd()).unwrap();
        let e = socket_info(&f).unwrap_err();
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );
        let e = inherited_fd(9999).unwrap_err();
        assert!(e.to_string().contains("is not open"), "{e}");
        assert!(inherited_fd(-1).is_err());
    }

    #[test]
    fn inherited_listener_checks_the_descriptor() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let e = inherited_listener(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a unix socket"), "{e}");
        let (a, _b) = UnixStream::pair().unwrap();
        let e = inherited_listener(a.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
        let e = inherited_listener(9999).unwrap_err();
        assert!(e.to_string().contains("not an open descriptor"), "{e}");
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let fd = l.into_raw_fd();
        let l = inherited_listener(fd).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
    }
}
