//! Receiving and sending file descriptors over unix sockets (SCM_RIGHTS), as
//! CMD_SET_DATAFD needs. The only unsafe code outside the libtpms FFI.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Reads into `buf` and collects any descriptors that came with the bytes.
/// Returns the byte count (0 at end of stream).
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
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
}
