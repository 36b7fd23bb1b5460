//! What the bench drives: a backend process over TCP ([`Remote`]) or
//! libtpms in process ([`InProcess`], the floor under any backend).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vtpmd::engine::{Libtpms, NvError, NvStore, TpmEngine};

pub(crate) trait Target {
    fn name(&self) -> &str;
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8>;
}

pub(crate) struct Remote {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) data: TcpStream,
    pub(crate) _dir: tempfile::TempDir,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU the backends are pinned to, if pinning is on and possible.
pub(crate) fn backend_cpu() -> Option<usize> {
    if std::env::var("VTPM_BENCH_PIN").as_deref() == Ok("0") {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
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

pub(crate) fn free_port(seed: u32) -> u16 {
    20000 + ((std::process::id() * 13 + seed * 97) % 9000) as u16 / 2 * 2
}

pub(crate) fn connect(port: u16, within: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

impl Remote {
    pub(crate) fn start(name: &str, bin: &str, extra: &[&str], seed: u32) -> Remote {
        Self::start_with(name, bin, extra, seed, true)
    }

    /// `powered`: start the TPM right away (`--flags not-need-init,startup-clear`);
    /// a migration destination must not.
    pub(crate) fn start_with(
        name: &str,
        bin: &str,
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
            let dir = tempfile::tempdir().unwrap();
            let port = free_port(seed * 31 + attempt);
            // Backends on the last CPU, this client (and in-process libtpms)
            // on the others: the same placement for vtpmd and swtpm, run
            // to run (VTPM_BENCH_PIN=0 turns it off).
            let mut command = match backend_cpu() {
                Some(cpu) => {
                    let mut c = Command::new("taskset");
                    c.args(["-c", &cpu.to_string(), bin]);
                    c
                }
                None => Command::new(bin),
            };
            let mut child = command
                .args(["socket", "--tpm2"])
                .args(flags)
                .arg("--tpmstate")
                .arg(format!("dir={}", dir.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                .spawn()
                .expect("spawn backend");
            if let Some(data) = connect(port, Duration::from_secs(3)) {
                if child.try_wait().ok().flatten().is_none() {
                    return Remote {
                        name: name.into(),
                        child,
                        data,
                        _dir: dir,
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

pub(crate) fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn read_response<S: Read>(s: &mut S) -> Vec<u8> {
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
        self.data.write_all(cmd).unwrap();
        read_response(&mut self.data)
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
