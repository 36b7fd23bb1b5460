//! A hostile or broken local client against real vtpmd processes: each
//! test is the regression test of one defect found by trying (issue 10),
//! and fails on a build without its fix (run with `VTPMD_BIN=old-vtpmd`).

use common::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};
use vtpm_test_support as common;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

/// A connection that answers GET_CAPABILITY within `within`.
fn answers(path: &Path, within: Duration) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    s.set_read_timeout(Some(within)).unwrap();
    if s.write_all(&1u32.to_be_bytes()).is_err() {
        return false;
    }
    let mut r = [0u8; 8];
    s.read_exact(&mut r).is_ok() && r[..4] == [0, 0, 0, 0]
}

#[test]
fn descriptors_beyond_four_get_a_reply_and_are_all_closed() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let pid = d.child.id();
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(c.cmd(1, &[], 8)[..4], [0, 0, 0, 0]);
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = [null.as_raw_fd(); 8];
    // The first request with descriptors moves the connection from the
    // accept loop to a thread of its own (which keeps one duplicate of
    // it to close it by): counted from there.
    send_with_fds(&c.s, &1u32.to_be_bytes(), &fds);
    let mut r = [0u8; 8];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], [0, 0, 0, 0]);
    let before = open_fds(pid);
    for round in 0..20 {
        send_with_fds(&c.s, &1u32.to_be_bytes(), &fds);
        let mut r = [0u8; 8];
        c.s.read_exact(&mut r)
            .unwrap_or_else(|e| panic!("no reply in round {round}: {e}"));
        assert_eq!(r[..4], [0, 0, 0, 0]);
    }
    let after = open_fds(pid);
    assert!(
        after <= before,
        "vtpmd holds {after} descriptors after 20 rounds of 8, {before} before"
    );
}

#[test]
fn set_datafd_refuses_a_datagram_socket_and_takes_a_stream_one_after() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let (dgram, _other) = UnixDatagram::pair().unwrap();
    send_with_fds(&c.s, &0x10u32.to_be_bytes(), &[dgram.as_raw_fd()]);
    let mut r = [0u8; 4];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r), 0x03, "a datagram socket is refused");
    drop(dgram);
    // The channel is still free for a proper data connection.
    let mut data = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
}

#[test]
fn set_datafd_while_open_answers_ioerror_whatever_is_sent() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let _data = c.qemu_start(4096);
    let null = std::fs::File::open("/dev/null").unwrap();
    send_with_fds(&c.s, &0x10u32.to_be_bytes(), &[null.as_raw_fd()]);
    let mut r = [0u8; 4];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r),
        0x1f,
        "swtpm checks the open connection first"
    );
}

#[test]
fn announced_stream_lengths_are_not_allocated_up_front() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let pid = d.child.id();
    let mut c = Ctrl::connect(&d.ctrl);
    let _data = c.qemu_start(4096);
    assert_eq!(c.result(0x06, &[]), 0, "HASH_START");
    let base = rss_kib(pid);
    // Eight clients each announce 60 MiB of HASH_DATA and send 4 bytes.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = UnixStream::connect(&d.ctrl).unwrap();
        let mut m = 0x07u32.to_be_bytes().to_vec();
        m.extend_from_slice(&(60u32 << 20).to_be_bytes());
        m.extend_from_slice(b"abcd");
        s.write_all(&m).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid).saturating_sub(base);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB for 32 bytes of streamed data"
    );
}

#[test]
fn idle_control_connections_cannot_lock_out_a_reconnecting_vmm() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    // The VMM's connection, pinned by its SET_DATAFD.
    let mut vmm = Ctrl::connect(&d.ctrl);
    let mut data = vmm.qemu_start(4096);
    // Squatters take every slot and sit idle.
    let squatters: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&d.ctrl).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    assert!(
        answers(&d.ctrl, Duration::from_secs(5)),
        "a new control client was locked out"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // The VMM's own connection and data channel were never the victims.
    assert_eq!(vmm.cmd(1, &[], 8)[..4], [0, 0, 0, 0]);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    drop(squatters);
}

#[test]
fn idle_or_dripping_admin_clients_cannot_keep_vtpmctl_out() {
    let t = state_dir();
    let admin = t.path().join("admin.sock");
    let d = Daemon::start(t.path(), &["--admin", &format!("path={}", admin.display())]);
    let _idle = UnixStream::connect(&admin).unwrap();
    let mut drip = UnixStream::connect(&admin).unwrap();
    drip.write_all(b"{").unwrap();
    let dripper = std::thread::spawn(move || {
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(500));
            if drip.write_all(b" ").is_err() {
                break;
            }
        }
    });
    let mut s = UnixStream::connect(&admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line)
        .expect("vtpmctl was kept out by idle and dripping clients");
    assert!(line.contains("\"ok\":true"), "{line}");
    dripper.join().unwrap();
    drop(d);
}

#[test]
fn clients_that_never_read_their_replies_cannot_lock_the_channel() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut vmm = Ctrl::connect(&d.ctrl);
    let _data = vmm.qemu_start(4096);
    // Eight clients pipeline GET_INFO requests (replies of up to 3 KiB)
    // and never read: vtpmd's writes fill their socket buffers and block.
    let mut get_info = 0x12u32.to_be_bytes().to_vec();
    get_info.extend_from_slice(&0xfu64.to_be_bytes());
    get_info.extend_from_slice(&0u32.to_be_bytes());
    get_info.extend_from_slice(&0u32.to_be_bytes());
    let flood: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = UnixStream::connect(&d.ctrl).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            for _ in 0..50_000 {
                if s.write_all(&get_info).is_err() {
                    break;
                }
            }
            s
        })
        .collect();
    // Once vtpmd gives up on those writes, a new client is served.
    let start = Instant::now();
    let mut served = false;
    while start.elapsed() < Duration::from_secs(40) {
        if answers(&d.ctrl, Duration::from_secs(2)) {
            served = true;
            break;
        }
    }
    assert!(served, "clients that never read locked the control channel");
    assert_eq!(
        vmm.cmd(1, &[], 8)[..4],
        [0, 0, 0, 0],
        "the VMM's connection"
    );
    drop(flood);
}

/// One TPM command on a new connection, tpm2-tss's way: the response, or
/// `None` if the connection was refused or closed.
fn one_shot(path: &Path, command: &[u8]) -> Option<Vec<u8>> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(command).ok()?;
    let mut head = [0u8; 10];
    s.read_exact(&mut head).ok()?;
    let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
    let mut resp = head.to_vec();
    resp.resize(size.max(10), 0);
    s.read_exact(&mut resp[10..]).ok()?;
    Some(resp)
}

#[test]
fn silent_connections_on_the_accept_loop_are_bounded_and_keep_no_one_out() {
    let t = state_dir();
    let data = t.path().join("data.sock");
    let server = format!("type=unixio,path={}", data.display());
    let d = Daemon::start(
        t.path(),
        &[
            "--server",
            &server,
            "--flags",
            "not-need-init,startup-clear",
        ],
    );
    let pid = d.child.id();
    // tpm2-tss's pattern: the accept loop answers each one itself.
    for _ in 0..50 {
        let r = one_shot(&data, &cmd::get_random(16)).expect("one-shot command answered");
        assert_eq!(rc(&r), 0);
    }
    let before = open_fds(pid);
    // Squatters connect to both listeners and never send a byte.
    let squatters: Vec<UnixStream> = (0..40)
        .flat_map(|_| [UnixStream::connect(&data), UnixStream::connect(&d.ctrl)])
        .map(Result::unwrap)
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // New clients on both are still served at once...
    let r = one_shot(&data, &cmd::get_random(16)).expect("a data client was locked out");
    assert_eq!(rc(&r), 0);
    assert!(
        answers(&d.ctrl, Duration::from_secs(5)),
        "a control client was locked out"
    );
    // ...the loop held at most 8 per listener, closing the oldest...
    let held = open_fds(pid);
    assert!(
        held <= before + 2 * 8,
        "vtpmd holds {held} descriptors for 80 silent connections ({before} before)"
    );
    let closed = squatters
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            matches!((&**s).read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert!(
        closed >= 80 - 2 * 8 - 2,
        "only {closed} of 80 squatters were closed"
    );
    // ...and a command split across two writes is still served (it moves
    // to a connection thread with its first half).
    let mut s = UnixStream::connect(&data).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let c = cmd::get_random(8);
    s.write_all(&c[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&c[5..]).unwrap();
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    assert_eq!(rc(&head), 0);
    drop(squatters);
}
