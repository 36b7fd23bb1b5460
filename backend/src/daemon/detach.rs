//! `--daemon`: run in the background, but let the command that started
//! vtpmd return only once the daemon serves (its sockets listen and its pid
//! file is written) or has failed, with the daemon's exit status.
//!
//! ```text
//!  vtpmd ... --daemon          (the process the caller started)
//!    └─ runs itself again with the same arguments, READY_FD_ENV=N, stderr shared
//!         child: setsid; opens state, binds sockets, writes the pid file, serves
//!           ├─ serving: stderr → /dev/null, writes "R" on fd N → the parent exits 0
//!           └─ fails:   prints why on the shared stderr and exits 1 → the parent
//!                       exits with the child's status (the message is printed once)
//! ```
//!
//! After detaching, log lines that went to stderr (no `--log file=/fd=`)
//! go to syslog (`/dev/log`, facility daemon; see [`crate::logging`]).
//! Re-running the program (rather than forking) keeps the process free of
//! `unsafe` and hands every inherited `fd=N` to the child untouched.

use super::{io_err, RunError};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;

/// The environment variable naming the readiness pipe in the child.
pub const READY_FD_ENV: &str = "VTPMD_DAEMON_READY_FD";

/// The child's end of the readiness pipe and what it needs to detach.
#[derive(Debug)]
struct Pending {
    pipe: File,
    devnull: Option<File>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// In the process the caller started: starts the daemon child and waits
/// for it to report. Returns the exit code for this process.
pub fn spawn_and_wait() -> ExitCode {
    match spawn_and_wait_inner() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vtpmd: --daemon: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_and_wait_inner() -> Result<ExitCode, RunError> {
    let (read_end, write_end) = nix::unistd::pipe().map_err(|e| RunError::Io {
        what: "create",
        target: "the readiness pipe".into(),
        source: e.into(),
    })?;
    // Only the write end goes to the child.
    nix::fcntl::fcntl(
        read_end.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| io_err("configure", "the readiness pipe")(e.into()))?;
    let exe = std::fs::read_link("/proc/self/exe")
        .or_else(|_| std::env::current_exe())
        .map_err(io_err("find", "the vtpmd executable"))?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io_err("start", "the daemon process"))?;
    drop(write_end);
    let mut got = Vec::new();
    let _ = File::from(read_end).take(16).read_to_end(&mut got);
    if got.first() == Some(&b'R') {
        return Ok(ExitCode::SUCCESS);
    }
    // The child failed (it said why on stderr) or died.
    let status = child
        .wait()
        .map_err(io_err("wait for", "the daemon process"))?;
    Ok(match status.code() {
        Some(0) => {
            eprintln!("vtpmd: the daemon exited before it was ready");
            ExitCode::FAILURE
        }
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => {
            eprintln!("vtpmd: the daemon process was killed ({status})");
            ExitCode::FAILURE
        }
    })
}

/// In a daemon child (READY_FD_ENV set): takes the readiness pipe and
/// leaves the caller's session. Returns false in any other process.
pub fn take_ready_pipe() -> Result<bool, RunError> {
    let Some(v) = std::env::var_os(READY_FD_ENV) else {
        return Ok(false);
    };
    let fd: i32 = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io_err("use", READY_FD_ENV)(std::io::ErrorKind::InvalidInput.into()))?;
    let pipe = File::from(
        crate::fdpass::inherited_fd(fd).map_err(io_err("use the readiness pipe", READY_FD_ENV))?,
    );
    // Leave the caller's session and terminal.
    let _ = nix::unistd::setsid();
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pending {
        pipe,
        devnull: None,
    });
    Ok(true)
}

/// Whether this process is a daemon child that has not reported yet.
pub fn pending() -> bool {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Before confinement: opens what detaching needs later (`/dev/null`, the
/// syslog socket), since neither may be opened once confined.
pub fn prepare() -> Result<(), RunError> {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = p.as_mut() {
        p.devnull = Some(
            File::options()
                .write(true)
                .open("/dev/null")
                .map_err(io_err("open", "/dev/null"))?,
        );
        crate::logging::prepare_syslog();
    }
    Ok(())
}

/// The daemon serves: stderr goes to /dev/null, log lines meant for stderr
/// to syslog, and the waiting parent is told to exit 0.
pub fn ready() {
    let Some(mut p) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    crate::logging::detach_from_stderr();
    if let Some(null) = &p.devnull {
        let _ = nix::unistd::dup3(
            null.as_raw_fd(),
            libc::STDERR_FILENO,
            nix::fcntl::OFlag::empty(),
        );
    }
    let _ = p.pipe.write_all(b"R");
}
