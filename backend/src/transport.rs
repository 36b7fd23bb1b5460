//! The socket frontend's transport: one connection type over unix and TCP
//! streams, one listener type, one accept loop for all of a process's
//! listeners, one timeout test.
//!
//! ```text
//!  Listener::{bind_unix, bind_tcp} ──serve(acceptors, wake, stop)──▶ Stream per connection
//!  Stream::recv(buf, fds)   unix: SCM_RIGHTS descriptors collected; TCP: none
//!  Slots::admit(stream)     at most `max` connections; when full, the one idle
//!                           longest (not pinned, not mid-request) is closed
//! ```
//!
//! Fairness rules every channel follows: a connection waits at most
//! [`IDLE_TIMEOUT`] for its next request unless it is pinned (the VMM's
//! control connection that handed over the data channel, and that data
//! channel); a started request must arrive within its channel's request
//! timeout; a reply waits at most [`WRITE_TIMEOUT`] for an unpinned client
//! to read it; and a full house never locks a new client out while some
//! connection is merely idle.

use crate::fdpass;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
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

/// A listener and what to do with each connection it accepts (the handler
/// must not block: it starts a connection's thread).
pub struct Acceptor {
    pub name: &'static str,
    pub listener: Listener,
    pub handler: Box<dyn FnMut(Stream) + Send>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("name", &self.name)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// The accept loop for all of a process's listeners, on the calling thread
/// (an idle daemon then needs no other thread): waits until a listener has
/// a connection, which goes to its handler, or `wake` (a non-blocking
/// socket signal handlers and exit reports write to) is readable, which is
/// drained before `stop()` decides whether to return. Accept errors (a
/// client that left the backlog, descriptor exhaustion) are logged and
/// paced, never fatal.
pub fn serve(acceptors: &mut [Acceptor], wake: &UnixStream, mut stop: impl FnMut() -> bool) {
    for a in acceptors.iter() {
        // Readiness can go stale (the client gave up): accept must not
        // then block the loop.
        if let Err(e) = a.listener.set_nonblocking() {
            log::warn!("{}: cannot make the listener non-blocking: {e}", a.name);
        }
    }
    loop {
        let mut fds: Vec<PollFd> = acceptors
            .iter()
            .map(|a| PollFd::new(a.listener.as_fd(), PollFlags::POLLIN))
            .chain(std::iter::once(PollFd::new(
                wake.as_fd(),
                PollFlags::POLLIN,
            )))
            .collect();
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                log::warn!("waiting for connections failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[acceptors.len()] {
            let mut sink = [0u8; 64];
            while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}
            if stop() {
                return;
            }
        }
        for (a, _) in acceptors.iter_mut().zip(&ready).filter(|(_, r)| **r) {
            match a.listener.accept() {
                Ok(s) => (a.handler)(s),
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                Err(e) => {
                    log::warn!("{}: accept failed: {e}", a.name);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// How long a connection thread waits for the next connection after its
/// own ended, before it exits.
pub const LINGER: Duration = Duration::from_millis(250);

type Job = Box<dyn FnOnce() + Send>;

/// The threads that serve one kind of connection. A thread whose
/// connection ended waits [`LINGER`] for the next one before it exits, so
/// a client that opens a connection per command (tpm2-tss) does not pay
/// for a new thread each time, while an idle daemon goes back to its one
/// thread.
#[derive(Debug)]
pub struct Workers {
    name: &'static str,
    /// Threads waiting for a connection, by id, each with its job inbox.
    idle: Mutex<Vec<(u64, std::sync::mpsc::Sender<Job>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Workers {
    pub fn new(name: &'static str) -> Arc<Workers> {
        Arc::new(Workers {
            name,
            idle: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(u64, std::sync::mpsc::Sender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on a waiting thread, or on a new one.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut job: Job = Box::new(job);
        {
            let mut idle = self.idle();
            // Handed over under the lock: a thread finds its inbox gone
            // from the list only once its next job is already in it.
            while let Some((_, inbox)) = idle.pop() {
                match inbox.send(job) {
                    Ok(()) => return Ok(()),
                    Err(back) => job = back.0,
                }
            }
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || me.serve(job))
            .map(drop)
    }

    fn serve(&self, mut job: Job) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, inbox) = std::sync::mpsc::channel();
        loop {
            job();
            self.idle().push((id, tx.clone()));
            job = match inbox.recv_timeout(LINGER) {
                Ok(next) => next,
                Err(_) => {
                    let mut idle = self.idle();
                    match idle.iter().position(|(i, _)| *i == id) {
                        Some(at) => {
                            idle.swap_remove(at);
                            return;
                        }
                        // Taken just now: the job is in the inbox.
                        None => match inbox.try_recv() {
                            Ok(next) => next,
                            Err(_) => return,
                        },
                    }
                }
            };
        }
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    last_active: Instant,
    busy: bool,
    pinned: bool,
    closer: Stream,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    live: Vec<Entry>,
}

/// The connections one channel serves at once (see the module rules).
#[derive(Debug)]
pub struct Slots {
    name: &'static str,
    max: usize,
    table: Mutex<Table>,
}

/// One admitted connection; leaving drops its slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    pub fn new(name: &'static str, max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            name,
            max,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections now held.
    pub fn len(&self) -> usize {
        self.table().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a slot for `s`. When all are taken, the connection idle the
    /// longest that is neither pinned nor in the middle of a request is
    /// closed to make room; if every one is busy or pinned, `s` is refused.
    pub fn admit(self: &Arc<Self>, s: &Stream) -> Option<Slot> {
        let closer = s.try_clone().ok()?;
        s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
        let mut t = self.table();
        if t.live.len() >= self.max {
            let victim = t
                .live
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.pinned && !e.busy)
                .min_by_key(|(_, e)| e.last_active)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    let e = t.live.swap_remove(i);
                    log::warn!(
                        "{}: {} connections open; closing the one idle longest ({:?})",
                        self.name,
                        self.max,
                        e.last_active.elapsed()
                    );
                    e.closer.shutdown();
                }
                None => {
                    log::warn!(
                        "{}: refusing a connection, all {} are busy or pinned",
                        self.name,
                        self.max
                    );
                    return None;
                }
            }
        }
        t.next_id += 1;
        let id = t.next_id;
        t.live.push(Entry {
            id,
            last_active: Instant::now(),
            busy: false,
            pinned: false,
            closer,
        });
        Some(Slot {
            slots: self.clone(),
            id,
        })
    }

    fn with(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.table().live.iter_mut().find(|e| e.id == id) {
            f(e);
        }
    }
}

impl Slot {
    /// A request started (`true`) or was answered (`false`).
    pub fn busy(&self, on: bool) {
        self.slots.with(self.id, |e| {
            e.busy = on;
            e.last_active = Instant::now();
        });
    }

    /// Pins this connection (the VMM's), unpinning any other of the
    /// channel: it is never closed for being idle or to make room.
    pub fn pin(&self) {
        for e in self.slots.table().live.iter_mut() {
            e.pinned = e.id == self.id;
            let t = if e.pinned { None } else { Some(WRITE_TIMEOUT) };
            let _ = e.closer.set_write_timeout(t);
        }
    }

    pub fn is_pinned(&self) -> bool {
        self.slots
            .table()
            .live
            .iter()
            .any(|e| e.id == self.id && e.pinned)
    }

    /// How long to wait for the next request on this connection.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (!self.is_pinned()).then_some(IDLE_TIMEOUT)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().live.retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), b)
    }

    #[test]
    fn a_worker_serves_the_next_job_then_leaves_when_idle() {
        use std::sync::mpsc::channel;
        let w = Workers::new("test");
        let (tx, rx) = channel();
        let t = tx.clone();
        w.run(move || t.send(std::thread::current().id()).unwrap())
            .unwrap();
        let first = rx.recv().unwrap();
        // Wait until the thread is back in the idle list, then the next job
        // goes to it instead of a new thread.
        while w.idle().is_empty() {
            std::thread::yield_now();
        }
        let t = tx.clone();
        w.run(move || t.send(std::thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the waiting thread took the job");
        // Two jobs at once get two threads.
        let gate = Arc::new(std::sync::Barrier::new(2));
        for _ in 0..2 {
            let (t, g) = (tx.clone(), gate.clone());
            w.run(move || {
                g.wait();
                t.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
        }
        assert_ne!(rx.recv().unwrap(), rx.recv().unwrap());
        // Idle past LINGER, every thread has left.
        let start = Instant::now();
        while !w.idle().is_empty() {
            assert!(start.elapsed() < LINGER * 40, "threads did not leave");
            std::thread::sleep(LINGER / 4);
        }
    }

    #[test]
    fn full_house_closes_the_longest_idle_unpinned_connection() {
        let slots = Slots::new("test", 2);
        let (a, _pa) = pair();
        let (b, _pb) = pair();
        let (c, _pc) = pair();
        let (d, _pd) = pair();
        let sa = slots.admit(&a).unwrap();
        let sb = slots.admit(&b).unwrap();
        sa.pin();
        sb.busy(true);
        // a is pinned, b is mid-request: nothing may be closed.
        assert!(slots.admit(&c).is_none());
        sb.busy(false);
        let _sc = slots.admit(&c).unwrap();
        // b was closed to make room: its reader sees end of stream.
        let mut b = b;
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert_eq!(slots.len(), 2);
        assert!(sa.is_pinned() && sa.idle_timeout().is_none());
        drop(sb);
        assert_eq!(slots.len(), 2, "b's slot was already given up");
        drop(sa);
        let sd = slots.admit(&d).unwrap();
        assert_eq!(sd.idle_timeout(), Some(IDLE_TIMEOUT));
    }
}
