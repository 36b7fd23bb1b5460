//! `--daemon`: the command returns only once the daemon serves (pid file
//! written, sockets listening) or has failed, with its status and its
//! message printed once; after detaching, errors that went to stderr go to
//! syslog. And every start-up error is printed once, daemon or not.

use common::*;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vtpm_test_support as common;

/// Runs `vtpmd socket --tpm2 --daemon ...` and returns when it returns.
fn run_daemon(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(&*VTPMD)
        .args(["socket", "--tpm2", "--daemon", "--tpmstate"])
        .arg(format!("dir={}", dir.join("state").display()))
        .arg("--ctrl")
        .arg(format!(
            "type=unixio,path={}",
            dir.join("ctrl.sock").display()
        ))
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn pid_in(file: &Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("pid file {}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Whether `pid` still runs (a zombie waiting for init to reap it, as a
/// detached daemon's parent is init, does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// SIGTERM, then waits until the process is gone.
fn stop(pid: i32) {
    let raw = pid;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    while running(raw) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_pid_file_exists_and_the_socket_listens_when_daemon_returns() {
    let t = state_dir();
    let pidfile = t.path().join("vtpmd.pid");
    let pid_arg = format!("file={}", pidfile.display());
    let log_arg = format!("file={}", t.path().join("log").display());
    let tries = 30;
    for i in 0..tries {
        let out = run_daemon(t.path(), &["--pid", &pid_arg, "--log", &log_arg], &[]);
        assert!(out.status.success(), "try {i}: {out:?}");
        // Right after the command returned: no waiting, no retry.
        assert!(
            pidfile.exists(),
            "try {i}: no pid file when --daemon returned"
        );
        let pid = pid_in(&pidfile);
        let mut c = Ctrl::connect(&t.path().join("ctrl.sock"));
        assert_eq!(be32(&c.cmd(0x01, &[], 8), 0), 0, "try {i}: control socket");
        assert!(running(pid), "try {i}: the daemon is not running");
        drop(c);
        stop(pid);
        assert!(!pidfile.exists(), "try {i}: pid file left behind");
    }
    eprintln!(
        "{tries} of {tries} --daemon starts had the pid file and a listening socket on return"
    );
}

#[test]
fn a_failing_daemon_says_why_once_and_exits_non_zero() {
    let t = state_dir();
    // Fails while opening the state (before any socket is bound).
    std::fs::write(t.path().join("state/tpm2-00.permall"), b"not a TPM state").unwrap();
    let out = run_daemon(t.path(), &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("tpm2-00.permall").count(),
        1,
        "said once: {err}"
    );
    assert!(err.contains("refusing to start a blank TPM"), "{err}");
    std::fs::remove_file(t.path().join("state/tpm2-00.permall")).unwrap();

    // Fails late: the pid file cannot be written (after the sockets).
    let out = run_daemon(t.path(), &["--pid", "file=/nonexistent/dir/vtpmd.pid"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("/nonexistent/dir/vtpmd.pid").count(),
        1,
        "said once: {err}"
    );
    assert!(!t.path().join("ctrl.sock").exists(), "socket left behind");

    // With a log file: the reason is on stderr and in the log, once each.
    let log = t.path().join("log");
    let log_arg = format!("file={}", log.display());
    let out = run_daemon(
        t.path(),
        &["--log", &log_arg, "--key", "file=/nonexistent/key"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("/nonexistent/key").count(), 1, "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("/nonexistent/key").count(), 1, "{text}");

    // A bad command line is refused by the command itself (status 2).
    let out = run_daemon(t.path(), &["--log", "bogus=1"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn errors_in_the_foreground_are_printed_once() {
    let t = state_dir();
    std::fs::write(t.path().join("state/tpm2-00.permall"), b"garbage").unwrap();
    let err = vtpmd_fails(t.path(), &[]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("tpm2-00.permall").count(), 1, "{err}");
}

#[test]
fn after_detaching_errors_go_to_syslog() {
    let t = state_dir();
    let sys = t.path().join("syslog.sock");
    let syslog = UnixDatagram::bind(&sys).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let pidfile = t.path().join("pid");
    let pid_arg = format!("file={}", pidfile.display());
    let out = run_daemon(
        t.path(),
        &["--pid", &pid_arg],
        &[("VTPMD_SYSLOG_SOCKET", sys.to_str().unwrap())],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = pid_in(&pidfile);
    // SET_DATAFD without a descriptor: the daemon logs an error.
    let mut c = UnixStream::connect(t.path().join("ctrl.sock")).unwrap();
    std::io::Write::write_all(&mut c, &0x10u32.to_be_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = syslog.recv(&mut buf).expect("no syslog line");
    let line = String::from_utf8_lossy(&buf[..n]);
    assert!(line.starts_with(&format!("<27>vtpmd[{pid}]: ")), "{line}");
    assert!(line.contains("SET_DATAFD without a descriptor"), "{line}");
    stop(pid);

    // No syslog to go to: said before detaching.
    let out = run_daemon(
        t.path(),
        &["--pid", &pid_arg],
        &[("VTPMD_SYSLOG_SOCKET", "/nonexistent/log")],
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no syslog at /nonexistent/log") && err.contains("--log file="),
        "{err}"
    );
    stop(pid_in(&pidfile));
}
