//! What the bench drives: a backend process ([`Remote`]) over one of the
//! transports its users use, the tpm2-tss swtpm TCTI's connection pattern
//! ([`Tcti`]), or libtpms in process ([`InProcess`], the floor under any
//! backend).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vtpm_test_support::Ctrl;
use vtpmd::engine::{Libtpms, NvError, NvStore, TpmEngine};

pub(crate) trait Target {
    fn name(&self) -> &str;
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8>;
}

/// A byte stream both ways (a TCP or unix data connection).
pub(crate) trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// How the bench reaches a backend's data channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// `--server type=tcp` and `--ctrl type=tcp` on the next port; one
    /// persistent data connection with TCP_NODELAY.
    Tcp,
    /// QEMU's way: a unix control socket only; the data channel is one end
    /// of a socketpair handed over with CMD_SET_DATAFD.
    DataFd,
}

pub(crate) struct Remote {
    pub(crate) name: String,
    pub(crate) child: Child,
    /// The persistent data connection (`None` once [`Tcti`] took over).
    pub(crate) data: Option<Box<dyn Duplex>>,
    /// TCP data port (the control port is the next one).
    pub(crate) port: Option<u16>,
    /// The control connection that handed over the data channel
    /// ([`Transport::DataFd`]), kept open as QEMU keeps it.
    pub(crate) _ctrl: Option<Ctrl>,
    /// The state directory (also holds the sockets and stderr).
    pub(crate) dir: tempfile::TempDir,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPUs this process could use when it started, counted once: after
/// [`pin_client`] it can use fewer, and so would every later count.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The CPU the backends are pinned to, if pinning is on and possible.
pub(crate) fn backend_cpu() -> Option<usize> {
    if std::env::var("VTPM_BENCH_PIN").as_deref() == Ok("0") {
        return None;
    }
    let cpus = cpus();
    let have_taskset = Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (cpus >= 2 && have_taskset).then_some(cpus - 1)
}

/// Pins this process's client thread away from the backends' CPU.
pub(crate) fn pin_client() {
    if let Some(cpu) = backend_cpu() {
        let others: Vec<String> = (0..cpu).map(|c| c.to_string()).collect();
        let _ = Command::new("taskset")
            .args([
                "-p",
                "-c",
                &others.join(","),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
    }
}

/// Lets this process (and the processes it starts from now on) use every
/// CPU again: fleets are not pinned.
pub(crate) fn unpin_client() {
    if backend_cpu().is_some() {
        let _ = Command::new("taskset")
            .args([
                "-p",
                "-c",
                &format!("0-{}", cpus() - 1),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
    }
}

pub(crate) fn free_port(seed: u32) -> u16 {
    20000 + ((std::process::id() * 13 + seed * 97) % 9000) as u16 / 2 * 2
}

pub(crate) fn connect(port: u16, within: Duration) -> Option<TcpStream> {
    connect_every(port, within, Duration::from_millis(2))
}

/// [`connect`], trying again every `every` until `within` has passed.
pub(crate) fn connect_every(port: u16, within: Duration, every: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
        std::thread::sleep(every);
    }
    None
}

/// Connects to a unix socket, waiting up to `within` for it to appear.
pub(crate) fn connect_unix(path: &Path, within: Duration) -> Option<UnixStream> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = UnixStream::connect(path) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// A fresh directory under the bench's work directory (which the sid
/// swtpm wrapper bind-mounts, so paths mean the same inside its root).
pub(crate) fn workdir() -> tempfile::TempDir {
    tempfile::tempdir_in(crate::work_base()).expect("temporary directory")
}

/// `bin`, pinned to the backends' CPU when pinning is on.
pub(crate) fn pinned(bin: &str) -> Command {
    match backend_cpu() {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), bin]);
            c
        }
        None => Command::new(bin),
    }
}

impl Remote {
    pub(crate) fn start(name: &str, bin: &str, extra: &[&str], seed: u32) -> Remote {
        Self::start_with(name, bin, Transport::Tcp, extra, seed, true)
    }

    /// `powered`: start the TPM right away (`--flags not-need-init,startup-clear`);
    /// a migration destination must not.
    pub(crate) fn start_with(
        name: &str,
        bin: &str,
        transport: Transport,
        extra: &[&str],
        seed: u32,
        powered: bool,
    ) -> Remote {
        let flags: &[&str] = if powered {
            &["--flags", "not-need-init,startup-clear"]
        } else {
            &[]
        };
        for attempt in 0..20 {
            let dir = workdir();
            let port = free_port(seed * 31 + attempt);
            // A port some other process (another bench, an instance still
            // running) answers on would have this start talk to it.
            if transport == Transport::Tcp
                && [port, port + 1]
                    .iter()
                    .any(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                continue;
            }
            let ctrl_path = dir.path().join("ctrl.sock");
            let endpoints: Vec<String> = match transport {
                Transport::Tcp => vec![
                    "--server".into(),
                    format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    "--ctrl".into(),
                    format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ],
                Transport::DataFd => vec![
                    "--ctrl".into(),
                    format!("type=unixio,path={}", ctrl_path.display()),
                ],
            };
            // Backends on the last CPU, this client (and in-process libtpms)
            // on the others: the same placement for vtpmd and swtpm, run
            // to run (VTPM_BENCH_PIN=0 turns it off).
            let mut child = pinned(bin)
                .args(["socket", "--tpm2"])
                .args(flags)
                .arg("--tpmstate")
                .arg(format!("dir={}", dir.path().display()))
                .args(&endpoints)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                .spawn()
                .expect("spawn backend");
            let connected: Option<(Box<dyn Duplex>, Option<Ctrl>)> = match transport {
                Transport::Tcp => connect(port, Duration::from_secs(3))
                    .map(|s| (Box::new(s) as Box<dyn Duplex>, None)),
                Transport::DataFd => {
                    connect_unix(&ctrl_path, Duration::from_secs(3)).and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                        let mut c = Ctrl { s };
                        let (rc, data) = c.set_datafd();
                        assert_eq!(rc, 0, "{name}: SET_DATAFD");
                        Some((Box::new(data) as Box<dyn Duplex>, Some(c)))
                    })
                }
            };
            if let Some((data, ctrl)) = connected {
                if child.try_wait().ok().flatten().is_none() {
                    return Remote {
                        name: name.into(),
                        child,
                        data: Some(data),
                        port: (transport == Transport::Tcp).then_some(port),
                        _ctrl: ctrl,
                        dir,
                    };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "{bin} on port {port}: {}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        panic!("{bin} did not start");
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        rss_of(self.child.id())
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// A `/proc/PID/smaps_rollup` field in KiB: `Pss` is the process's fair
/// share of memory (pages shared with other processes, such as the binary
/// and libraries in the page cache, are divided among the sharers);
/// `Private_Dirty` is what the process alone holds.
pub(crate) fn smaps_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A numeric field of `/proc/PID/status` ("VmRSS", "Threads").
pub(crate) fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn rss_of(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
}

/// Open file descriptors of a process.
pub(crate) fn fds_of(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

pub(crate) fn read_response<S: Read + ?Sized>(s: &mut S) -> Vec<u8> {
    let mut h = [0u8; 10];
    s.read_exact(&mut h).expect("response header");
    let size = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
    let mut r = h.to_vec();
    r.resize(size, 0);
    s.read_exact(&mut r[10..]).expect("response body");
    r
}

impl Target for Remote {
    fn name(&self) -> &str {
        &self.name
    }
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8> {
        let data = self.data.as_mut().expect("persistent data connection");
        data.write_all(cmd).unwrap();
        read_response(&mut **data)
    }
}

/// tpm2-tss's swtpm TCTI (src/tss2-tcti/tcti-swtpm.c) against a
/// [`Transport::Tcp`] backend: every TPM command on a new data connection
/// (connect, send, read the 10-byte header and the rest, close), without
/// TCP_NODELAY as the TCTI sets none. With `init`, every command is also a
/// whole TCTI set-up first, as each tpm2-tools invocation does: a probe
/// connection to the data port closed at once, then CMD_SET_LOCALITY(0)
/// (a 1-byte body) on a new control connection, closed after its reply.
pub(crate) struct Tcti<'a> {
    pub(crate) remote: &'a mut Remote,
    pub(crate) init: bool,
}

impl<'a> Tcti<'a> {
    /// Takes over `remote`, closing its persistent data connection first
    /// (swtpm serves one data connection at a time).
    pub(crate) fn new(remote: &'a mut Remote, init: bool) -> Tcti<'a> {
        remote.data = None;
        Tcti { remote, init }
    }

    fn open(&self, port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("TCTI connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

impl Target for Tcti<'_> {
    fn name(&self) -> &str {
        &self.remote.name
    }
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8> {
        let port = self.remote.port.expect("TCTI pattern needs a TCP backend");
        if self.init {
            drop(self.open(port));
            let mut c = self.open(port + 1);
            c.write_all(&[0, 0, 0, 5, 0]).unwrap();
            let mut r = [0u8; 4];
            c.read_exact(&mut r).expect("SET_LOCALITY reply");
            assert_eq!(r, [0; 4], "{}: SET_LOCALITY(0)", self.remote.name);
        }
        let mut s = self.open(port);
        s.write_all(cmd).unwrap();
        read_response(&mut s)
    }
}

/// libtpms with NV kept in memory: the floor under any backend.
#[derive(Default)]
pub(crate) struct MemStore(Mutex<HashMap<String, Vec<u8>>>);

impl NvStore for MemStore {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, NvError> {
        Ok(self.0.lock().unwrap().get(name).cloned())
    }
    fn store(&self, name: &str, data: &[u8]) -> Result<(), NvError> {
        self.0.lock().unwrap().insert(name.into(), data.to_vec());
        Ok(())
    }
    fn delete(&self, name: &str) -> Result<(), NvError> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
}

pub(crate) struct InProcess(pub(crate) Libtpms);

impl Target for InProcess {
    fn name(&self) -> &str {
        "in-process"
    }
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.0.process(cmd).expect("libtpms").to_vec()
    }
}
