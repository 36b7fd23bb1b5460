//! Test support shared by the integration tests of every crate and the
//! bench (a `publish = false` crate, not `#[path]` includes):
//!
//! * this module: start real vtpmd (and swtpm) processes and talk to their
//!   control and data sockets like QEMU does;
//! * [`cmd`]: raw TPM 2.0 commands built by hand;
//! * [`blobs`]: QEMU's state-blob sequence (GET ×3, then STOP, SET ×3, INIT);
//! * [`vmm`]: a vhost-user VMM (memfd memory, a hand-driven split ring).
//!
//! The vtpmd binary is the workspace's release build (`cargo build
//! --release`, which `make test` runs first).

#![deny(unsafe_code)]
#![allow(missing_debug_implementations)]

pub mod blobs;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The vtpmd binary the tests run: `$VTPMD_BIN` if set (to check that a
/// regression test fails on an older build), else the workspace's release
/// build.
pub static VTPMD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("VTPMD_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/vtpmd").to_string()
    })
});

/// vtpm-setup, from the same build as [`VTPMD`] (`$VTPM_SETUP_BIN` if set).
/// Makes the host key the tests' vtpmd processes use by default
/// (`$VTPM_HOST_KEY_DIR`, set by the workspace's .cargo/config.toml) once,
/// before any of them starts, so parallel tests do not all generate one.
pub fn ensure_host_key() {
    static MADE: std::sync::Once = std::sync::Once::new();
    MADE.call_once(|| {
        if let Some(dir) = std::env::var_os(vtpm_common::hostkey::SYSTEM_KEY_DIR_ENV) {
            vtpm_common::hostkey::HostKey::load_or_create(Path::new(&dir))
                .expect("make the tests' host key");
        }
    });
}

pub static VTPM_SETUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("VTPM_SETUP_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/vtpm-setup").to_string()
    })
});

/// A backend serving TCP data and control ports (for tpm2-tss's swtpm
/// TCTI), killed when dropped.
pub struct TcpBackend {
    pub child: Child,
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin socket` (vtpmd or swtpm) on `state` with TCP data port P and
/// control port P+1 on 127.0.0.1, TPM started; tries other ports if taken.
/// `TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=P` then reaches it.
pub fn start_tcp(bin: &str, state: &Path, log: &Path) -> (TcpBackend, u16) {
    start_tcp_with(bin, state, log, &[])
}

/// [`start_tcp`] with extra arguments (e.g. `--key`).
pub fn start_tcp_with(bin: &str, state: &Path, log: &Path, extra: &[String]) -> (TcpBackend, u16) {
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicU32, Ordering};
    // Every call in this process gets its own ports (tests run in parallel).
    static CALLS: AtomicU32 = AtomicU32::new(0);
    for _ in 0..20u32 {
        let n = CALLS.fetch_add(1, Ordering::SeqCst);
        let port = 20000 + ((std::process::id() * 7 + n * 131) % 9000) as u16;
        let port = port - port % 2;
        let child = Command::new(bin)
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn backend");
        let mut b = TcpBackend { child };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = b.child.try_wait() {
                break; // port taken (or a start-up error): try the next one
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
            {
                // Someone else's server may own the ports while ours fails
                // to bind and exits: only a child still running counts.
                std::thread::sleep(Duration::from_millis(50));
                if let Ok(None) = b.child.try_wait() {
                    return (b, port);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("{bin} did not start on any port");
}

/// A running backend process, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub ctrl: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `vtpmd socket --tpm2` on state dir `dir` with a unix control
    /// socket, plus `extra` arguments.
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_bin(&VTPMD, dir, extra)
    }

    pub fn start_bin(bin: &str, dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_named(bin, dir, "ctrl.sock", extra)
    }

    /// As [`Daemon::start_bin`], with the control socket at `<dir>/<sock>`
    /// (two processes on one state directory).
    pub fn start_named(bin: &str, dir: &Path, sock: &str, extra: &[&str]) -> Daemon {
        Self::start_env(bin, dir, sock, extra, &[])
    }

    /// As [`Daemon::start_named`], with extra environment variables (e.g.
    /// another host key directory).
    pub fn start_env(
        bin: &str,
        dir: &Path,
        sock: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let ctrl = dir.join(sock);
        let mut args = vec![
            "socket".to_string(),
            "--tpm2".into(),
            "--ctrl".into(),
            format!("type=unixio,path={}", ctrl.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let _ = std::fs::remove_file(&ctrl);
        let mut d = Self::spawn_env(bin, dir, ctrl, &args, env);
        d.wait_for_socket(true);
        d
    }

    /// Starts `vtpmd vhost-user` on state dir `<dir>/state`, listening on
    /// `<dir>/vhost.sock` (kept in `ctrl`), plus `extra` arguments.
    pub fn start_vhost_user(dir: &Path, extra: &[&str]) -> Daemon {
        let sock = dir.join("vhost.sock");
        let mut args = vec![
            "vhost-user".to_string(),
            "--socket-path".into(),
            sock.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let _ = std::fs::remove_file(&sock);
        let mut d = Self::spawn(&VTPMD, dir, sock, &args);
        // Probing with a connection would look like a frontend: wait for
        // the socket file instead (it is listening once it exists).
        d.wait_for_socket(false);
        d
    }

    pub fn spawn(bin: &str, dir: &Path, socket: PathBuf, args: &[String]) -> Daemon {
        Self::spawn_env(bin, dir, socket, args, &[])
    }

    /// As [`Daemon::spawn`], with extra environment variables.
    pub fn spawn_env(
        bin: &str,
        dir: &Path,
        socket: PathBuf,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Daemon {
        ensure_host_key();
        let log = dir.join("vtpmd.log");
        let child = Command::new(bin)
            .envs(env.iter().copied())
            .args(&args[..1])
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.join("state").display()))
            .arg("--log")
            .arg(format!("file={},level=20", log.display()))
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn backend");
        Daemon {
            child,
            dir: dir.to_path_buf(),
            ctrl: socket,
            log,
        }
    }

    pub fn wait_for_socket(&mut self, probe: bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let ready = if probe {
                UnixStream::connect(&self.ctrl).is_ok()
            } else {
                self.ctrl.exists()
            };
            if ready {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "backend exited with {st} before listening: {err}\nlog: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("socket {} did not appear", self.ctrl.display());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vtpmd socket --tpm2` on `<dir>/state` with `extra`, expecting it
/// to refuse to start; returns its stderr.
pub fn vtpmd_fails(dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(&*VTPMD)
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.join("state").display()))
        .arg("--ctrl")
        .arg(format!(
            "type=unixio,path={}",
            dir.join("other.sock").display()
        ))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "vtpmd started but should not have");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Makes `<tmp>/state` and returns the temp dir.
pub fn state_dir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("state")).unwrap();
    t
}

/// A control-channel client.
pub struct Ctrl {
    pub s: UnixStream,
}

impl Ctrl {
    pub fn connect(path: &Path) -> Ctrl {
        let s = UnixStream::connect(path).expect("connect ctrl");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Ctrl { s }
    }

    /// Sends raw bytes and reads exactly `reply_len` bytes.
    pub fn raw(&mut self, bytes: &[u8], reply_len: usize) -> Vec<u8> {
        self.s.write_all(bytes).unwrap();
        let mut r = vec![0u8; reply_len];
        self.s.read_exact(&mut r).expect("control reply");
        r
    }

    pub fn cmd(&mut self, code: u32, body: &[u8], reply_len: usize) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        self.raw(&v, reply_len)
    }

    /// The be32 result of a result-only command.
    pub fn result(&mut self, code: u32, body: &[u8]) -> u32 {
        be32(&self.cmd(code, body, 4), 0)
    }

    /// SET_DATAFD with a fresh socketpair; returns our end.
    pub fn set_datafd(&mut self) -> (u32, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        vtpmd::fdpass::send_with_fd(&self.s, &0x10u32.to_be_bytes(), theirs.as_raw_fd()).unwrap();
        drop(theirs);
        let mut r = [0u8; 4];
        self.s.read_exact(&mut r).unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        (be32(&r, 0), ours)
    }

    /// QEMU's start-up: SET_DATAFD, probe, caps, STOP/SET_BUFFERSIZE x2, INIT.
    pub fn qemu_start(&mut self, bufsize: u32) -> UnixStream {
        let (rc, mut data) = self.set_datafd();
        assert_eq!(rc, 0, "SET_DATAFD");
        let probe = tpm(&mut data, &[0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81]);
        assert_eq!(&probe[..2], &[0x80, 0x01], "probe tag");
        let caps = self.cmd(1, &[], 8);
        assert_eq!(be32(&caps, 4) & 0x348f, 0x348f);
        assert_eq!(self.result(0x0e, &[]), 0);
        let bs = self.cmd(0x11, &[0; 4], 16);
        assert_eq!(be32(&bs, 0), 0);
        assert_eq!(self.result(0x0e, &[]), 0);
        let bs = self.cmd(0x11, &bufsize.to_be_bytes(), 16);
        assert_eq!(be32(&bs, 4), bufsize);
        assert_eq!(self.result(0x02, &[0; 4]), 0, "INIT");
        data
    }
}

/// A pipe holding `content`, whose read end (returned) a child process
/// inherits under the same number, as libvirt passes `--key pwdfd=N`. The
/// write end never leaks into a child (it is close-on-exec and closed
/// here), so the reader sees the end of the data.
pub fn inheritable_pipe(content: &[u8]) -> std::os::fd::OwnedFd {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    std::fs::File::from(w).write_all(content).unwrap();
    fcntl(r.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    r
}

/// Makes `fd` inheritable by children (clears close-on-exec).
pub fn inheritable<F: std::os::fd::AsRawFd + ?Sized>(fd: &F) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}

/// Sends a TPM command on a data stream and reads its whole response.
pub fn tpm<S: Read + Write>(s: &mut S, cmd: &[u8]) -> Vec<u8> {
    s.write_all(cmd).unwrap();
    read_response(s)
}

pub fn read_response<S: Read>(s: &mut S) -> Vec<u8> {
    let mut h = [0u8; 10];
    s.read_exact(&mut h).expect("response header");
    let size = be32(&h, 2) as usize;
    assert!((10..=4096).contains(&size), "response size {size}");
    let mut r = h.to_vec();
    r.resize(size, 0);
    s.read_exact(&mut r[10..]).unwrap();
    r
}

pub mod cmd;
pub mod vmm;
pub use cmd::rc;
