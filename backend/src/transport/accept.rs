//! The accept loop: every listener of the process, and the connections it
//! answers itself, in one `poll` on one thread.
//!
//! ```text
//!  listener ready ─ accept ─▶ held ──one read: one whole quick request──▶ answered here,
//!                              ▲  │                                       held again
//!                              └──┘
//!                                 │ partial, streamed, several requests, descriptors,
//!                                 │ the TPM busy, a reply the client does not take,
//!                                 │ or a second request answered (a lasting client)
//!                                 ▼
//!                       Channel::hand_off(stream, Carry) ─▶ a thread of its own
//! ```
//!
//! A client that opens a connection per command (tpm2-tss) is thus served
//! with no thread hand-off, no timeout set and no descriptor duplicated. A
//! connection that comes back for more moves to a thread after its second
//! reply: there a request costs one blocking read, not a poll and a read.
//! The loop never waits on a client: reads and writes do not block, and a
//! request the channel cannot answer at once goes to a thread with what was
//! read. At most [`MAX_HELD`] connections per listener are held; a new one
//! closes the one idle longest. A held connection idle for
//! [`IDLE_TIMEOUT`] is closed. Each round serves at most one request per
//! connection, so no client starves another. While the loop runs a TPM
//! command it answers, new connections and signals wait in the kernel for
//! that one command (as every TPM request waits for the TPM anyway);
//! QEMU's connections, which carry CANCEL_TPM_CMD, are on threads of their
//! own by then (SET_DATAFD moves them), and a request that finds the TPM
//! busy goes to a thread rather than waiting on the loop.

use super::{Listener, Stream, IDLE_TIMEOUT};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Connections the loop holds per listener.
pub const MAX_HELD: usize = 8;
/// Requests answered on the loop before a connection moves to a thread.
const ANSWERED_ON_LOOP: u64 = 2;
/// One read on a held connection: a request that fills it is handed off
/// (more of it may be on the way).
const READ_SIZE: usize = 8192;

/// What the loop read from a connection before handing it to a thread,
/// which starts from it.
#[derive(Debug, Default)]
pub struct Carry {
    /// Bytes received and not answered: the start of the next request(s).
    pub received: Vec<u8>,
    /// Descriptors that came with them (unix sockets).
    pub fds: Vec<OwnedFd>,
    /// The part of a reply the client has not taken yet: written first.
    pub unsent: Vec<u8>,
}

/// How one listener's connections are served.
pub trait Channel: Send {
    /// `request` is everything one read returned on a held connection (no
    /// descriptors came with it). If it is exactly one whole request this
    /// channel can answer without waiting for anything, puts the reply in
    /// `reply` and returns true; false sends the connection to
    /// [`Channel::hand_off`] with the bytes.
    fn answer(&mut self, _request: &[u8], _reply: &mut Vec<u8>) -> bool {
        false
    }

    /// Serves `s` on a thread of its own from here on, starting from
    /// `carry`. Must not block.
    fn hand_off(&mut self, s: Stream, carry: Carry);

    /// A connection the loop held ended (closed by the client, idle,
    /// making room, or failed).
    fn closed(&mut self) {}
}

/// A listener and how its connections are served.
pub struct Acceptor {
    pub name: &'static str,
    pub listener: Listener,
    pub channel: Box<dyn Channel>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("name", &self.name)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// A connection waiting for its next request on the loop.
struct Held {
    stream: Stream,
    /// Index of its acceptor.
    from: usize,
    idle_since: Instant,
    /// Requests answered on it so far.
    answered: u64,
}

/// The loop's reusable buffers.
struct Buffers {
    read: Vec<u8>,
    reply: Vec<u8>,
}

/// The accept loop for all of a process's listeners, on the calling thread
/// (an idle daemon then needs no other thread): waits until a listener has
/// a connection, a held connection has a request, or `wake` (a non-blocking
/// socket signal handlers and exit reports write to) is readable, which is
/// drained before `stop()` decides whether to return. Accept errors (a
/// client that left the backlog, descriptor exhaustion) are logged and
/// paced, never fatal.
pub fn serve(acceptors: &mut [Acceptor], wake: &UnixStream, stop: impl FnMut() -> bool) {
    serve_idle(acceptors, wake, stop, IDLE_TIMEOUT)
}

/// [`serve`] with held connections closed after `idle`.
fn serve_idle(
    acceptors: &mut [Acceptor],
    wake: &UnixStream,
    mut stop: impl FnMut() -> bool,
    idle: Duration,
) {
    for a in acceptors.iter() {
        // Readiness can go stale (the client gave up): accept must not
        // then block the loop.
        if let Err(e) = a.listener.set_nonblocking() {
            log::warn!("{}: cannot make the listener non-blocking: {e}", a.name);
        }
    }
    let mut held: Vec<Held> = Vec::new();
    let mut bufs = Buffers {
        read: vec![0u8; READ_SIZE],
        reply: Vec::with_capacity(4096),
    };
    loop {
        let timeout = expire_idle(&mut held, acceptors, idle);
        let ready = match wait(acceptors, wake, &held, timeout) {
            Some(r) => r,
            None => continue,
        };
        let (listeners, rest) = ready.split_at(acceptors.len());
        let (woken, held_ready) = (rest[0], &rest[1..]);
        if woken {
            let mut sink = [0u8; 64];
            while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}
            if stop() {
                return;
            }
        }
        // Highest index first: swap_remove only moves an entry already
        // served this round, and new entries go to the end.
        for i in (0..held_ready.len()).rev().filter(|&i| held_ready[i]) {
            let h = held.swap_remove(i);
            let from = h.from;
            if let Some(h) = step(h, &mut acceptors[from], &mut bufs) {
                held.push(h);
            }
        }
        for (k, _) in listeners.iter().enumerate().filter(|(_, r)| **r) {
            let a = &mut acceptors[k];
            let stream = match a.listener.accept() {
                Ok(s) => s,
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                    continue
                }
                Err(e) => {
                    log::warn!("{}: accept failed: {e}", a.name);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            make_room(&mut held, k, a);
            let h = Held {
                stream,
                from: k,
                idle_since: Instant::now(),
                answered: 0,
            };
            // The request often came with the connection: try it now.
            if let Some(h) = step(h, a, &mut bufs) {
                held.push(h);
            }
        }
    }
}

/// Closes held connections idle for `idle`; returns how long until the
/// next one would be.
fn expire_idle(
    held: &mut Vec<Held>,
    acceptors: &mut [Acceptor],
    idle: Duration,
) -> Option<Duration> {
    let now = Instant::now();
    let mut i = 0;
    while i < held.len() {
        if now.duration_since(held[i].idle_since) >= idle {
            let h = held.swap_remove(i);
            let a = &mut acceptors[h.from];
            log::info!("{}: closing a connection idle for {idle:?}", a.name);
            a.channel.closed();
        } else {
            i += 1;
        }
    }
    held.iter()
        .map(|h| idle.saturating_sub(now.duration_since(h.idle_since)))
        .min()
}

/// Polls the listeners, `wake` and the held connections, in that order;
/// `None` when the wait failed (already paced).
fn wait(
    acceptors: &[Acceptor],
    wake: &UnixStream,
    held: &[Held],
    timeout: Option<Duration>,
) -> Option<Vec<bool>> {
    let mut fds: Vec<PollFd> = acceptors
        .iter()
        .map(|a| a.listener.as_fd())
        .chain(std::iter::once(wake.as_fd()))
        .chain(held.iter().map(|h| h.stream.as_fd()))
        .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    // Rounded up, so an expiry is never polled for at 0 ms over and over.
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => {
            let ms = t.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    if let Err(e) = poll(&mut fds, timeout) {
        if e != nix::errno::Errno::EINTR {
            log::warn!("waiting for connections failed: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        return None;
    }
    Some(
        fds.iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
    )
}

/// Before a new connection of acceptor `k` is held: when it already holds
/// [`MAX_HELD`], the one idle longest is closed.
fn make_room(held: &mut Vec<Held>, k: usize, a: &mut Acceptor) {
    let mine = held.iter().filter(|h| h.from == k).count();
    if mine < MAX_HELD {
        return;
    }
    let oldest = held
        .iter()
        .enumerate()
        .filter(|(_, h)| h.from == k)
        .min_by_key(|(_, h)| h.idle_since)
        .map(|(i, _)| i);
    if let Some(i) = oldest {
        let h = held.swap_remove(i);
        log::warn!(
            "{}: {MAX_HELD} connections open; closing the one idle longest ({:?})",
            a.name,
            h.idle_since.elapsed()
        );
        a.channel.closed();
    }
}

/// Serves what has arrived on `h`: nothing yet keeps it held; a whole
/// quick request is answered and keeps it held; anything else hands it
/// off. `None`: it is no longer the loop's.
fn step(mut h: Held, a: &mut Acceptor, bufs: &mut Buffers) -> Option<Held> {
    let mut fds = Vec::new();
    let n = match h.stream.try_recv(&mut bufs.read, &mut fds) {
        Ok(0) => {
            a.channel.closed();
            return None;
        }
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
            return Some(h)
        }
        Err(e) => {
            log::debug!("{}: connection failed: {e}", a.name);
            a.channel.closed();
            return None;
        }
    };
    let request = &bufs.read[..n];
    if n == bufs.read.len() || !fds.is_empty() || !a.channel.answer(request, &mut bufs.reply) {
        h.stream.no_delay();
        let carry = Carry {
            received: request.to_vec(),
            fds,
            unsent: Vec::new(),
        };
        a.channel.hand_off(h.stream, carry);
        return None;
    }
    h.answered += 1;
    if h.answered == ANSWERED_ON_LOOP {
        h.stream.no_delay();
    }
    match h.stream.try_send(&bufs.reply) {
        Ok(k) if k == bufs.reply.len() && h.answered < ANSWERED_ON_LOOP => {
            h.idle_since = Instant::now();
            Some(h)
        }
        Ok(k) if k == bufs.reply.len() => {
            a.channel.hand_off(h.stream, Carry::default());
            None
        }
        // The client is not taking replies: a thread waits for it, within
        // the write timeout.
        Ok(k) => {
            hand_off_unsent(h, a, bufs.reply[k..].to_vec());
            None
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
            hand_off_unsent(h, a, bufs.reply.clone());
            None
        }
        Err(e) => {
            log::debug!("{}: reply not sent: {e}", a.name);
            a.channel.closed();
            None
        }
    }
}

fn hand_off_unsent(h: Held, a: &mut Acceptor, unsent: Vec<u8>) {
    h.stream.no_delay();
    let carry = Carry {
        unsent,
        ..Carry::default()
    };
    a.channel.hand_off(h.stream, carry);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// What the test channel saw.
    #[derive(Debug)]
    enum Seen {
        /// A request answered on the loop, with the loop's thread.
        Answered(Vec<u8>, std::thread::ThreadId),
        HandedOff(Carry),
        Closed,
    }

    /// Answers "ping" with "pong", or with 256 KiB for "flood"; hands
    /// everything else off (and keeps it open, unserved).
    struct Echo(Sender<Seen>, Vec<Stream>);

    impl Channel for Echo {
        fn answer(&mut self, request: &[u8], reply: &mut Vec<u8>) -> bool {
            reply.clear();
            match request {
                b"ping" => reply.extend_from_slice(b"pong"),
                b"flood" => reply.resize(256 * 1024, 7),
                _ => return false,
            }
            let me = std::thread::current().id();
            self.0.send(Seen::Answered(request.to_vec(), me)).unwrap();
            true
        }

        fn hand_off(&mut self, s: Stream, carry: Carry) {
            self.1.push(s);
            self.0.send(Seen::HandedOff(carry)).unwrap();
        }

        fn closed(&mut self) {
            self.0.send(Seen::Closed).unwrap();
        }
    }

    /// A loop on its own thread over one unix listener; returns the
    /// socket path, what the channel saw, and the wake socket that stops
    /// it (with the loop's thread to join).
    fn start(
        idle: Duration,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Receiver<Seen>,
        UnixStream,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = Listener::bind_unix(&path, 0o600).unwrap();
        let (tx, rx) = channel();
        let (wake_tx, wake_rx) = UnixStream::pair().unwrap();
        wake_rx.set_nonblocking(true).unwrap();
        let t = std::thread::spawn(move || {
            let mut acceptors = [Acceptor {
                name: "test",
                listener: Listener::Unix(l),
                channel: Box::new(Echo(tx, Vec::new())),
            }];
            serve_idle(&mut acceptors, &wake_rx, || true, idle);
        });
        (dir, path, rx, wake_tx, t)
    }

    fn stop(mut wake: UnixStream, t: std::thread::JoinHandle<()>) {
        wake.write_all(b"x").unwrap();
        t.join().unwrap();
    }

    fn next(rx: &Receiver<Seen>) -> Seen {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the loop acted")
    }

    /// The next thing seen, which must be a hand-off: what it carried.
    fn handed_off(rx: &Receiver<Seen>) -> Carry {
        match next(rx) {
            Seen::HandedOff(carry) => carry,
            other => panic!("expected a hand-off, saw {other:?}"),
        }
    }

    fn exchange(c: &mut UnixStream, request: &[u8]) -> Vec<u8> {
        c.write_all(request).unwrap();
        let mut reply = [0u8; 4];
        c.read_exact(&mut reply).unwrap();
        reply.to_vec()
    }

    #[test]
    fn whole_quick_requests_are_answered_on_the_loop_thread() {
        let (_d, path, rx, wake, t) = start(IDLE_TIMEOUT);
        let mut tid = None;
        for _ in 0..3 {
            // One request per connection, as tpm2-tss: the loop answers
            // and closes when the client does.
            let mut c = UnixStream::connect(&path).unwrap();
            assert_eq!(exchange(&mut c, b"ping"), b"pong");
            match next(&rx) {
                Seen::Answered(r, id) => {
                    assert_eq!(r, b"ping");
                    assert_eq!(*tid.get_or_insert(id), id, "one thread answers all");
                    assert_ne!(id, std::thread::current().id());
                }
                other => panic!("expected an answer, saw {other:?}"),
            }
            drop(c);
            assert!(matches!(next(&rx), Seen::Closed));
        }
        // A connection that comes back: answered twice, then it moves to
        // a thread with nothing pending.
        let mut c = UnixStream::connect(&path).unwrap();
        for _ in 0..ANSWERED_ON_LOOP {
            assert_eq!(exchange(&mut c, b"ping"), b"pong");
            assert!(matches!(next(&rx), Seen::Answered(..)));
        }
        let carry = handed_off(&rx);
        assert!(carry.received.is_empty() && carry.unsent.is_empty());
        stop(wake, t);
    }

    #[test]
    fn anything_else_goes_to_a_thread_with_what_was_read() {
        let (_d, path, rx, wake, t) = start(IDLE_TIMEOUT);
        // Not a request the channel answers: handed off with the bytes.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"pin").unwrap();
        let carry = handed_off(&rx);
        assert_eq!(carry.received, b"pin");
        assert!(carry.fds.is_empty() && carry.unsent.is_empty());
        // A request that comes with a descriptor goes to a thread with
        // the descriptor, even if the bytes alone would be answered.
        let mut c = UnixStream::connect(&path).unwrap();
        let (passed, _keep) = UnixStream::pair().unwrap();
        crate::fdpass::send_with_fd(&c, b"ping", passed.as_raw_fd()).unwrap();
        let carry = handed_off(&rx);
        assert_eq!(carry.received, b"ping");
        assert_eq!(carry.fds.len(), 1);
        // More than one read's worth at once: handed off whole.
        let big = vec![b'p'; READ_SIZE + 100];
        c = UnixStream::connect(&path).unwrap();
        c.write_all(&big).unwrap();
        assert_eq!(handed_off(&rx).received.len(), READ_SIZE);
        stop(wake, t);
    }

    #[test]
    fn a_reply_the_client_does_not_take_goes_to_a_thread() {
        let (_d, path, rx, wake, t) = start(IDLE_TIMEOUT);
        let mut c = UnixStream::connect(&path).unwrap();
        // Never read: the replies fill the socket's buffer.
        let mut unsent = None;
        for _ in 0..64 {
            c.write_all(b"flood").unwrap();
            match next(&rx) {
                Seen::Answered(..) => {}
                Seen::HandedOff(carry) => {
                    unsent = Some(carry.unsent);
                    break;
                }
                Seen::Closed => panic!("closed instead of handed off"),
            }
        }
        let unsent = unsent.expect("a reply was left unsent");
        assert!(!unsent.is_empty() && unsent.len() <= 256 * 1024);
        assert!(unsent.iter().all(|b| *b == 7));
        stop(wake, t);
    }

    #[test]
    fn a_full_house_closes_the_connection_idle_longest() {
        let (_d, path, rx, wake, t) = start(IDLE_TIMEOUT);
        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(exchange(&mut first, b"ping"), b"pong");
        assert!(matches!(next(&rx), Seen::Answered(..)));
        let mut others: Vec<UnixStream> = Vec::new();
        for _ in 1..MAX_HELD {
            let mut c = UnixStream::connect(&path).unwrap();
            assert_eq!(exchange(&mut c, b"ping"), b"pong");
            assert!(matches!(next(&rx), Seen::Answered(..)));
            others.push(c);
        }
        // One more: the first, idle longest, is closed to make room.
        let mut last = UnixStream::connect(&path).unwrap();
        assert_eq!(exchange(&mut last, b"ping"), b"pong");
        let seen: Vec<Seen> = (0..2).map(|_| next(&rx)).collect();
        assert!(seen.iter().any(|s| matches!(s, Seen::Closed)), "{seen:?}");
        let mut buf = [0u8; 1];
        assert_eq!(first.read(&mut buf).unwrap(), 0, "the oldest was closed");
        for c in &mut others {
            assert_eq!(exchange(c, b"ping"), b"pong", "the others are still served");
            assert!(matches!(next(&rx), Seen::Answered(..)));
            assert!(matches!(next(&rx), Seen::HandedOff(..)), "a second request");
        }
        stop(wake, t);
    }

    #[test]
    fn an_idle_connection_is_closed_and_a_silent_one_too() {
        let (_d, path, rx, wake, t) = start(Duration::from_millis(200));
        let mut talker = UnixStream::connect(&path).unwrap();
        assert_eq!(exchange(&mut talker, b"ping"), b"pong");
        assert!(matches!(next(&rx), Seen::Answered(..)));
        // Connected, never sends anything.
        let mut silent = UnixStream::connect(&path).unwrap();
        assert!(matches!(next(&rx), Seen::Closed));
        assert!(matches!(next(&rx), Seen::Closed));
        let mut buf = [0u8; 1];
        assert_eq!(talker.read(&mut buf).unwrap(), 0);
        assert_eq!(silent.read(&mut buf).unwrap(), 0);
        stop(wake, t);
    }
}
