//! Descriptors a parent hands over (`fd=N`, `clientfd=N`), as swtpm_setup,
//! libvirt and socket-activating service managers do, side by side with
//! swtpm 0.7.1 where swtpm takes the same command line; and the clear
//! refusal of a descriptor that is not what the option says.

use common::*;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vtpm_test_support as common;

/// The tests of this file run one at a time: a descriptor made inheritable
/// for one test's child would otherwise leak into a child another test
/// starts at the same moment, under a number that child was told means
/// something else.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `bin socket --tpm2 --tpmstate dir=<dir>/state` with `args`; the
/// descriptors in `keep` are inherited under their numbers.
fn spawn(bin: &str, dir: &Path, args: &[String], keep: &[&dyn AsRawFd]) -> Child {
    for fd in keep {
        inheritable(*fd);
    }
    Command::new(bin)
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.join("state").display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(c: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Kills `c` if it still runs, then returns what it wrote on stderr.
fn stderr_of(mut c: Child) -> String {
    let _ = c.kill();
    let _ = c.wait();
    let mut e = String::new();
    c.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    e
}

fn pair() -> (UnixStream, OwnedFd) {
    let (a, b) = UnixStream::pair().unwrap();
    (a, OwnedFd::from(b))
}

/// swtpm_setup's way: a socketpair for each channel, handed over as
/// `--ctrl type=unixio,clientfd=N --server type=tcp,fd=M`, TPM started by
/// `--flags not-need-init,startup-clear`; CMD_SHUTDOWN ends it. Closing the
/// data connection instead ends the process too.
#[test]
fn swtpm_setup_socketpairs_work_as_with_swtpm() {
    let _serial = serial();
    for bin in ["swtpm", VTPMD.as_str()] {
        for end_by_closing_data in [false, true] {
            let t = state_dir();
            let (ctrl, ctrl_theirs) = pair();
            let (mut data, data_theirs) = pair();
            let args = [
                "--flags".to_string(),
                "not-need-init,startup-clear".into(),
                "--ctrl".into(),
                format!("type=unixio,clientfd={}", ctrl_theirs.as_raw_fd()),
                "--server".into(),
                format!("type=tcp,fd={}", data_theirs.as_raw_fd()),
            ];
            let mut child = spawn(bin, t.path(), &args, &[&ctrl_theirs, &data_theirs]);
            drop((ctrl_theirs, data_theirs));
            ctrl.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            data.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let r = tpm(&mut data, &cmd::get_random(8));
            assert_eq!(rc(&r), 0, "{bin}: GetRandom on the inherited data socket");
            // TPM2_Startup was sent by the backend: a second one is refused.
            assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0x100, "{bin}");
            let mut c = Ctrl { s: ctrl };
            let caps = c.cmd(0x01, &[], 8);
            assert_eq!(be32(&caps, 0), 0, "{bin}: GET_CAPABILITY on clientfd");
            if end_by_closing_data {
                drop(data);
            } else {
                assert_eq!(c.result(0x03, &[]), 0, "{bin}: CMD_SHUTDOWN");
            }
            let st = wait_exit(&mut child, Duration::from_secs(10));
            assert!(
                st.is_some(),
                "{bin} (closing data: {end_by_closing_data}) did not exit"
            );
            assert!(
                t.path().join("state/tpm2-00.permall").exists(),
                "{bin}: no state"
            );
        }
    }
}

/// Socket activation: listening sockets handed over as `fd=N`.
#[test]
fn inherited_listening_sockets_serve_every_client() {
    let _serial = serial();
    let t = state_dir();
    let ctrl_path = t.path().join("ctrl.sock");
    let data_path = t.path().join("data.sock");
    let ctrl_l = UnixListener::bind(&ctrl_path).unwrap();
    let data_l = UnixListener::bind(&data_path).unwrap();
    let tcp_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp_l.local_addr().unwrap().port();
    // Two processes cannot share the data socket: the TCP one goes to a
    // second run below.
    let args = [
        "--flags".to_string(),
        "not-need-init,startup-clear".into(),
        "--ctrl".into(),
        format!("type=unixio,fd={}", ctrl_l.as_raw_fd()),
        "--server".into(),
        format!("type=unixio,fd={}", data_l.as_raw_fd()),
    ];
    let mut child = spawn(&VTPMD, t.path(), &args, &[&ctrl_l, &data_l]);
    drop((ctrl_l, data_l));
    for _ in 0..3 {
        let mut d = UnixStream::connect(&data_path).unwrap();
        assert_eq!(rc(&tpm(&mut d, &cmd::get_random(4))), 0);
        let mut c = Ctrl::connect(&ctrl_path);
        assert_eq!(be32(&c.cmd(0x01, &[], 8), 0), 0);
    }
    let mut c = Ctrl::connect(&ctrl_path);
    assert_eq!(c.result(0x03, &[]), 0);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).is_some());

    let args = [
        "--flags".to_string(),
        "not-need-init".into(),
        "--server".into(),
        format!("type=tcp,fd={}", tcp_l.as_raw_fd()),
    ];
    let child = spawn(&VTPMD, t.path(), &args, &[&tcp_l]);
    drop(tcp_l);
    for _ in 0..2 {
        let mut d = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        d.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(rc(&tpm(&mut d, &cmd::startup_clear())) & !0x100, 0);
    }
    drop(stderr_of(child));
}

/// Each wrong descriptor is refused before anything is served, naming the
/// option, the number and the fix.
#[test]
fn wrong_descriptors_are_refused_clearly() {
    let _serial = serial();
    let t = state_dir();
    let file = std::fs::File::create(t.path().join("plain")).unwrap();
    let listening = UnixListener::bind(t.path().join("l.sock")).unwrap();
    let (_ours, connected) = pair();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unbound = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let (r, _w) = nix::unistd::pipe().unwrap();
    // A number nothing in this process has open.
    let closed = 987;
    assert!(nix::fcntl::fcntl(closed, nix::fcntl::FcntlArg::F_GETFD).is_err());
    let cases: Vec<(String, String, &dyn AsRawFd, &str)> = vec![
        (
            "--ctrl".into(),
            format!("type=unixio,clientfd={}", file.as_raw_fd()),
            &file,
            "is a regular file, not a socket",
        ),
        (
            "--ctrl".into(),
            format!("type=unixio,clientfd={}", listening.as_raw_fd()),
            &listening,
            "is a listening socket, but clientfd= wants a connected one",
        ),
        (
            "--ctrl".into(),
            format!("type=unixio,fd={}", connected.as_raw_fd()),
            &connected,
            "is a connected socket, but fd= wants a listening one",
        ),
        (
            "--server".into(),
            format!("type=tcp,fd={}", udp.as_raw_fd()),
            &udp,
            "is not a stream socket",
        ),
        (
            "--server".into(),
            format!("type=unixio,fd={}", tcp.as_raw_fd()),
            &tcp,
            "is a TCP socket but type=unixio was given",
        ),
        (
            "--server".into(),
            format!("type=unixio,fd={}", unbound.as_raw_fd()),
            &unbound,
            "neither listening nor connected",
        ),
        (
            "--server".into(),
            format!("type=unixio,fd={}", r.as_raw_fd()),
            &r,
            "is a pipe, not a socket",
        ),
        (
            "--server".into(),
            format!("type=tcp,fd={closed}"),
            &r,
            "is not open",
        ),
        ("--key".into(), format!("pwdfd={closed}"), &r, "is not open"),
    ];
    let ctrl = format!("type=unixio,path={}", t.path().join("c.sock").display());
    for (opt, val, fd, want) in cases {
        let mut args = vec![opt.clone(), val.clone()];
        if opt == "--key" {
            args.extend(["--ctrl".to_string(), ctrl.clone()]);
        }
        let mut child = spawn(&VTPMD, t.path(), &args, &[fd]);
        let st = wait_exit(&mut child, Duration::from_secs(10)).expect("vtpmd kept running");
        assert!(!st.success(), "{opt} {val} accepted");
        let e = stderr_of(child);
        assert!(e.contains(want), "{opt} {val}: {e}");
        assert!(e.contains(&opt), "{opt} {val}: names the option: {e}");
        assert_eq!(e.lines().count(), 1, "{opt} {val}: said once: {e}");
    }
}

/// `--log fd=N` and `--pid fd=N` (inherited files), `--log level=N` alone
/// (stderr).
#[test]
fn log_and_pid_descriptors_and_log_to_stderr() {
    let _serial = serial();
    let t = state_dir();
    let log = std::fs::File::create(t.path().join("log")).unwrap();
    let pid = std::fs::File::create(t.path().join("pid")).unwrap();
    let sock = t.path().join("c.sock");
    let args = [
        "--ctrl".to_string(),
        format!("type=unixio,path={}", sock.display()),
        "--log".into(),
        format!("fd={},level=5,prefix=[vm7]", log.as_raw_fd()),
        "--pid".into(),
        format!("fd={}", pid.as_raw_fd()),
    ];
    let mut child = spawn(&VTPMD, t.path(), &args, &[&log, &pid]);
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Ctrl::connect(&sock);
    assert_eq!(be32(&c.cmd(0x01, &[], 8), 0), 0);
    let written = std::fs::read_to_string(t.path().join("pid")).unwrap();
    assert_eq!(written.trim(), child.id().to_string());
    assert_eq!(c.result(0x03, &[]), 0);
    assert!(wait_exit(&mut child, Duration::from_secs(10))
        .unwrap()
        .success());
    let text = std::fs::read_to_string(t.path().join("log")).unwrap();
    assert!(text.lines().all(|l| l.starts_with("[vm7] ")), "{text}");
    assert!(text.contains("serving"), "{text}");
    assert!(
        !t.path().join("pid").exists(),
        "the pid file is removed at exit, as swtpm does"
    );

    let args = [
        "--ctrl".to_string(),
        format!("type=unixio,path={}", sock.display()),
        "--log".into(),
        "level=2".into(),
    ];
    let mut child = spawn(&VTPMD, t.path(), &args, &[]);
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(Ctrl::connect(&sock).result(0x03, &[]), 0);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).is_some());
    let e = stderr_of(child);
    assert!(e.contains("INFO: vtpmd") && e.contains("serving"), "{e}");
}
