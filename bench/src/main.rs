//! `make bench`: vtpmd against swtpm (same libtpms, same client, same
//! transport, alternating per iteration) and against libtpms called in
//! process with no transport at all. `--smoke` runs a few iterations of each
//! row so `make test` keeps the harness working; it asserts no timings.

#[path = "../../backend/tests/common/cmd.rs"]
mod tpm_cmds;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tpm_cmds as c;
use vtpmd::engine::{Libtpms, NvStore};

struct Opts {
    smoke: bool,
    vtpmd: String,
    vtpmctl: String,
}

fn n(o: &Opts, full: usize) -> usize {
    if o.smoke {
        3
    } else {
        full
    }
}

// ---- targets -------------------------------------------------------------

trait Target {
    fn name(&self) -> &str;
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8>;
}

struct Remote {
    name: String,
    child: Child,
    data: TcpStream,
    _dir: tempfile::TempDir,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU the backends are pinned to, if pinning is on and possible.
fn backend_cpu() -> Option<usize> {
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
fn pin_client() {
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

fn free_port(seed: u32) -> u16 {
    20000 + ((std::process::id() * 13 + seed * 97) % 9000) as u16 / 2 * 2
}

fn connect(port: u16, within: Duration) -> Option<TcpStream> {
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
    fn start(name: &str, bin: &str, extra: &[&str], seed: u32) -> Remote {
        Self::start_with(name, bin, extra, seed, true)
    }

    /// `powered`: start the TPM right away (`--flags not-need-init,startup-clear`);
    /// a migration destination must not.
    fn start_with(name: &str, bin: &str, extra: &[&str], seed: u32, powered: bool) -> Remote {
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

    fn rss_kib(&self) -> u64 {
        rss_of(self.child.id())
    }
}

/// A `/proc/PID/smaps_rollup` field in KiB: `Pss` is the process's fair
/// share of memory (pages shared with other processes, such as the binary
/// and libraries in the page cache, are divided among the sharers);
/// `Private_Dirty` is what the process alone holds.
fn smaps_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn read_response<S: Read>(s: &mut S) -> Vec<u8> {
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
struct MemStore(Mutex<HashMap<String, Vec<u8>>>);

impl NvStore for MemStore {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap().get(name).cloned())
    }
    fn store(&self, name: &str, data: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().insert(name.into(), data.to_vec());
        Ok(())
    }
    fn delete(&self, name: &str) -> Result<(), String> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
}

struct InProcess(Libtpms);

impl Target for InProcess {
    fn name(&self) -> &str {
        "in-process"
    }
    fn cmd(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.0.process(cmd).expect("libtpms").to_vec()
    }
}

// ---- statistics ------------------------------------------------------------

#[derive(Clone)]
struct Stat {
    median: f64,
    p99: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stat {
        median: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

struct Row {
    name: String,
    unit: &'static str,
    vtpmd: Stat,
    swtpm: Stat,
    extra: Vec<(String, Stat)>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---- rows ------------------------------------------------------------------

/// Times `make(i)` on every target, alternating targets per iteration.
/// `setup` runs once per target first; `after` (untimed) after each call.
fn latency_row(
    name: &str,
    iters: usize,
    targets: &mut [&mut dyn Target],
    setup: &dyn Fn(&mut dyn Target) -> u32,
    make: &dyn Fn(usize, u32) -> Vec<u8>,
    after: &dyn Fn(&mut dyn Target, &[u8]),
) -> Vec<Stat> {
    let ctx: Vec<u32> = targets.iter_mut().map(|t| setup(&mut **t)).collect();
    let mut samples = vec![Vec::with_capacity(iters); targets.len()];
    let n = targets.len();
    for i in 0..iters {
        // Rotate who goes first: whatever the previous call left behind
        // (cold caches, an idle core waking up) hits every target alike.
        for j in 0..n {
            let k = (i + j) % n;
            let t = &mut targets[k];
            let cmd = make(i, ctx[k]);
            let start = Instant::now();
            let r = t.cmd(&cmd);
            let el = start.elapsed();
            let code = c::rc(&r);
            assert!(code == 0, "{name} on {}: TPM rc {code:#x}", t.name());
            samples[k].push(us(el));
            after(&mut **t, &r);
        }
    }
    samples.into_iter().map(stat).collect()
}

fn nothing(_: &mut dyn Target) -> u32 {
    0
}

fn no_after(_: &mut dyn Target, _: &[u8]) {}

fn flush_created(t: &mut dyn Target, r: &[u8]) {
    t.cmd(&c::flush(c::handle(r)));
}

fn command_rows(o: &Opts, vt: &mut Remote, sw: &mut Remote, ip: &mut InProcess) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut targets: Vec<&mut dyn Target> = vec![vt, sw, ip];
    let define_nv = |t: &mut dyn Target| {
        let r = t.cmd(&c::nv_define(0x0150_0100, 64));
        assert!(
            c::rc(&r) == 0 || c::rc(&r) == 0x14c,
            "NV define: {:#x}",
            c::rc(&r)
        );
        let _ = t.cmd(&c::nv_write(0x0150_0100, &[0; 64]));
        0
    };
    let signing_key = |t: &mut dyn Target| {
        let r = t.cmd(&c::create_primary("sign", 7));
        assert_eq!(c::rc(&r), 0, "signing key");
        c::handle(&r)
    };
    type Make = Box<dyn Fn(usize, u32) -> Vec<u8>>;
    type Setup = Box<dyn Fn(&mut dyn Target) -> u32>;
    type After = Box<dyn Fn(&mut dyn Target, &[u8])>;
    let specs: Vec<(&str, usize, Setup, Make, After)> = vec![
        (
            "GetRandom(32)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::get_random(32)),
            Box::new(no_after),
        ),
        (
            "PCR_Read",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::pcr_read(16)),
            Box::new(no_after),
        ),
        (
            "PCR_Extend(sha256)",
            2000,
            Box::new(nothing),
            Box::new(|i, _| c::pcr_extend(16, &[i as u8; 32])),
            Box::new(no_after),
        ),
        (
            "Hash(sha256, 64 B)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::hash(&[0x33; 64])),
            Box::new(no_after),
        ),
        (
            "NV_Write 64 B (state write)",
            300,
            Box::new(define_nv),
            Box::new(|i, _| c::nv_write(0x0150_0100, &[(i % 251) as u8 + 1; 64])),
            Box::new(no_after),
        ),
        (
            "NV_Read 64 B",
            2000,
            Box::new(define_nv),
            Box::new(|_, _| c::nv_read(0x0150_0100, 64)),
            Box::new(no_after),
        ),
        (
            "CreatePrimary ECC P-256",
            100,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("ecc", i as u8)),
            Box::new(flush_created),
        ),
        (
            "CreatePrimary RSA-2048",
            12,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("rsa", i as u8)),
            Box::new(flush_created),
        ),
        (
            "ECDSA sign (loaded key)",
            300,
            Box::new(signing_key),
            Box::new(|_, h| c::sign_ecdsa(h)),
            Box::new(no_after),
        ),
        (
            "StartAuthSession + FlushContext",
            1000,
            Box::new(nothing),
            Box::new(|_, _| c::start_auth_session()),
            Box::new(flush_created),
        ),
    ];
    let only = std::env::var("VTPM_BENCH_ONLY").ok();
    for (name, full, setup, make, after) in specs {
        if only.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let iters = n(o, full);
        eprintln!("  {name} x{iters}");
        let mut st = latency_row(name, iters, &mut targets, &*setup, &*make, &*after);
        let ip = st.pop().unwrap();
        let sw = st.pop().unwrap();
        let vt = st.pop().unwrap();
        rows.push(Row {
            name: name.into(),
            unit: "us",
            vtpmd: vt,
            swtpm: sw,
            extra: vec![("in-process".into(), ip)],
        });
    }
    rows
}

fn ctrl_cmd(s: &mut TcpStream, code: u32, body: &[u8], fixed: usize) -> Vec<u8> {
    let mut m = code.to_be_bytes().to_vec();
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
    let mut r = vec![0u8; 4];
    s.read_exact(&mut r).unwrap();
    if u32::from_be_bytes([r[0], r[1], r[2], r[3]]) == 0 || code == 0x0c {
        r.resize(fixed, 0);
        s.read_exact(&mut r[4..]).unwrap();
    }
    r
}

fn startup_row(o: &Opts) -> Row {
    let iters = n(o, 20);
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..iters {
        for (k, bin) in [o.vtpmd.as_str(), "swtpm"].iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port(500 + i as u32 * 2 + k as u32);
            let start = Instant::now();
            let mut child = Command::new(bin)
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.path().display()))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut s = connect(port, Duration::from_secs(5)).expect("ctrl port");
            let caps = ctrl_cmd(&mut s, 1, &[], 8);
            samples[k].push(us(start.elapsed()) / 1000.0);
            assert_eq!(&caps[..4], &[0, 0, 0, 0]);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let [a, b] = samples;
    Row {
        name: "start-up until GET_CAPABILITY answers".into(),
        unit: "ms",
        vtpmd: stat(a),
        swtpm: stat(b),
        extra: vec![],
    }
}

/// GET_STATEBLOB x3 on `src`, then STOP, SET_STATEBLOB x3 (non-empty) and
/// INIT(DELETE_VOLATILE) on `dst`.
fn migrate_once(src: &mut TcpStream, dst: &mut TcpStream) {
    let mut blobs = Vec::new();
    for ty in 1u32..=3 {
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&ty.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        let hdr = ctrl_cmd(src, 0x0c, &body, 16);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]) as usize;
        let flags = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let mut blob = vec![0u8; len];
        src.read_exact(&mut blob).unwrap();
        blobs.push((ty, flags, blob));
    }
    assert_eq!(ctrl_cmd(dst, 0x0e, &[], 4), vec![0; 4]);
    for (ty, flags, blob) in blobs.iter().filter(|b| !b.2.is_empty()) {
        let mut body = flags.to_be_bytes().to_vec();
        body.extend_from_slice(&ty.to_be_bytes());
        body.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        body.extend_from_slice(blob);
        assert_eq!(
            ctrl_cmd(dst, 0x0d, &body, 4),
            vec![0; 4],
            "SET_STATEBLOB {ty}"
        );
    }
    assert_eq!(ctrl_cmd(dst, 0x02, &[0, 0, 0, 1], 4), vec![0; 4], "INIT");
}

fn populate(t: &mut Remote) {
    for k in 0..4u32 {
        assert_eq!(c::rc(&t.cmd(&c::nv_define(0x0150_0200 + k, 64))), 0);
        assert_eq!(
            c::rc(&t.cmd(&c::nv_write(0x0150_0200 + k, &[k as u8 + 1; 64]))),
            0
        );
    }
    let r = t.cmd(&c::create_primary("ecc", 1));
    let h = c::handle(&r);
    // EvictControl to a persistent handle.
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&0x8100_0001u32.to_be_bytes());
    let mut m = vec![0x80, 0x02];
    m.extend_from_slice(&((10 + b.len()) as u32).to_be_bytes());
    m.extend_from_slice(&0x120u32.to_be_bytes());
    m.extend_from_slice(&b);
    assert_eq!(c::rc(&t.cmd(&m)), 0, "EvictControl");
    t.cmd(&c::flush(h));
}

fn ctrl_of(t: &Remote) -> TcpStream {
    let port = t.data.peer_addr().unwrap().port() + 1;
    connect(port, Duration::from_secs(2)).unwrap()
}

fn admin(sock: &Path, req: serde_json::Value) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    v["result"].clone()
}

fn migration_rows(o: &Opts, keys: &Path) -> Row {
    let iters = n(o, 30);
    // swtpm plain and swtpm with a migration key.
    let mkey = keys.join("migration.key");
    std::fs::write(
        &mkey,
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .unwrap();
    let mk = format!("file={},format=hex,mode=aes-256-cbc", mkey.display());
    let mut results = Vec::new();
    for (label, extra) in [
        ("swtpm plain", vec![]),
        (
            "swtpm --migration-key",
            vec!["--migration-key", mk.as_str()],
        ),
    ] {
        let mut src = Remote::start("swtpm", "swtpm", &extra, 700 + results.len() as u32);
        populate(&mut src);
        let dst = Remote::start("swtpm", "swtpm", &extra, 710 + results.len() as u32);
        let (mut sc, mut dc) = (ctrl_of(&src), ctrl_of(&dst));
        let mut v = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            migrate_once(&mut sc, &mut dc);
            v.push(us(t.elapsed()));
        }
        results.push((label.to_string(), stat(v)));
    }
    // vtpmd sealed: a fresh destination per migration (its id is single use).
    let mut samples = Vec::new();
    let mut unloaded = Vec::new();
    let kd = tempfile::tempdir().unwrap();
    for h in ["a", "b"] {
        let st = Command::new(&o.vtpmctl)
            .args(["keygen", "--out"])
            .arg(keys.join(h))
            .output()
            .unwrap();
        assert!(st.status.success(), "keygen: {st:?}");
    }
    let src_admin = kd.path().join("src.admin");
    let hk = |h: &str| keys.join(h).join("host-key.pem").display().to_string();
    let src_args = [
        "--host-key".to_string(),
        hk("a"),
        "--admin".into(),
        format!("path={}", src_admin.display()),
    ];
    let sa: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let mut src = Remote::start("vtpmd", &o.vtpmd, &sa, 720);
    populate(&mut src);
    let mut sc = ctrl_of(&src);
    for i in 0..iters {
        let dst_admin = kd.path().join(format!("dst{i}.admin"));
        let dst_args = [
            "--host-key".to_string(),
            hk("b"),
            "--admin".into(),
            format!("path={}", dst_admin.display()),
            "--migration".into(),
            "incoming".into(),
        ];
        let da: Vec<&str> = dst_args.iter().map(String::as_str).collect();
        let dst = Remote::start_with("vtpmd", &o.vtpmd, &da, 730 + i as u32, false);
        let info = admin(&dst_admin, serde_json::json!({"op": "incoming-info"}));
        let out = admin(
            &src_admin,
            serde_json::json!({"op": "outgoing", "peer_key": info["public_key"], "migration_id": info["migration_id"]}),
        );
        // Every other migration, the destination unwraps the keys before
        // the VM stops (vtpmctl incoming-key), as docs/migration.md
        // recommends; the others unwrap them inside the timed window.
        let preload = i % 2 == 0;
        if preload {
            admin(
                &dst_admin,
                serde_json::json!({"op": "incoming-key", "wrapped_key": out["wrapped_key"]}),
            );
        }
        let mut dc = ctrl_of(&dst);
        let t = Instant::now();
        migrate_once(&mut sc, &mut dc);
        if preload {
            samples.push(us(t.elapsed()));
        } else {
            unloaded.push(us(t.elapsed()));
        }
        // The source resumes, as after QEMU's LOCK_STORAGE.
        assert_eq!(ctrl_cmd(&mut sc, 0x13, &[0, 0, 0, 1], 4), vec![0; 4]);
    }
    let mut row = Row {
        name: "migration: GET x3 + SET x3 + INIT".into(),
        unit: "us",
        vtpmd: stat(samples),
        swtpm: results[0].1.clone(),
        extra: vec![],
    };
    row.extra.push(results.remove(1));
    row.extra
        .push(("vtpmd without incoming-key".into(), stat(unloaded)));
    row
}

fn density_row(o: &Opts) -> Row {
    let count = n(o, 50);
    let mut per = Vec::new();
    let mut rss = Vec::new();
    let mut private = Vec::new();
    for bin in [o.vtpmd.as_str(), "swtpm"] {
        let dirs: Vec<tempfile::TempDir> =
            (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut children: Vec<Child> = dirs
            .iter()
            .map(|d| {
                Command::new(bin)
                    .args(["socket", "--tpm2", "--tpmstate"])
                    .arg(format!("dir={}", d.path().display()))
                    .arg("--ctrl")
                    .arg(format!(
                        "type=unixio,path={}",
                        d.path().join("c.sock").display()
                    ))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for d in &dirs {
            let start = Instant::now();
            while !d.path().join("c.sock").exists() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        // PSS: the binary's and libraries' pages are in memory once for
        // all 50, and PSS charges each instance its share of them. RSS
        // would charge every instance the whole binary.
        per.push(stat(
            children
                .iter()
                .map(|c| smaps_kib(c.id(), "Pss") as f64)
                .collect(),
        ));
        rss.push(stat(
            children.iter().map(|c| rss_of(c.id()) as f64).collect(),
        ));
        private.push(stat(
            children
                .iter()
                .map(|c| smaps_kib(c.id(), "Private_Dirty") as f64)
                .collect(),
        ));
        let total: u64 = children.iter().map(|c| smaps_kib(c.id(), "Pss")).sum();
        eprintln!(
            "  {bin}: {count} idle instances, {} MiB in total (sum of PSS)",
            total / 1024
        );
        for ch in children.iter_mut() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
    let sw = per.pop().unwrap();
    let vt = per.pop().unwrap();
    let (sw_rss, vt_rss) = (rss.pop().unwrap(), rss.pop().unwrap());
    let (sw_priv, vt_priv) = (private.pop().unwrap(), private.pop().unwrap());
    Row {
        name: format!("memory (PSS) per idle instance, {count} side by side"),
        unit: "KiB",
        vtpmd: vt,
        swtpm: sw,
        extra: vec![
            ("vtpmd RSS".into(), vt_rss),
            ("swtpm RSS".into(), sw_rss),
            ("vtpmd private".into(), vt_priv),
            ("swtpm private".into(), sw_priv),
        ],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Opts {
        smoke: args.iter().any(|a| a == "--smoke"),
        vtpmd: std::env::var("VTPMD_BIN")
            .unwrap_or_else(|_| root.join("target/release/vtpmd").display().to_string()),
        vtpmctl: std::env::var("VTPMCTL_BIN")
            .unwrap_or_else(|_| root.join("target/release/vtpmctl").display().to_string()),
    };
    eprintln!(
        "vtpm-bench{}: vtpmd {} vs swtpm, alternating",
        if o.smoke { " (smoke)" } else { "" },
        o.vtpmd
    );
    // A binary that was just built sits in dirty page-cache pages, which
    // smaps counts as the process's private memory until written back.
    let _ = Command::new("sync").status();
    pin_client();
    let mut vt = Remote::start("vtpmd", &o.vtpmd, &[], 1);
    let mut sw = Remote::start("swtpm", "swtpm", &[], 2);
    let store: Arc<dyn NvStore> = Arc::new(MemStore::default());
    let mut tpm = Libtpms::take(store)
        .expect("libtpms free")
        .expect("libtpms");
    tpm.main_init().expect("MainInit");
    let mut ip = InProcess(tpm);
    assert_eq!(c::rc(&ip.cmd(&c::startup_clear())), 0);

    let mut rows = command_rows(&o, &mut vt, &mut sw, &mut ip);
    let (vp, sp) = (vt.child.id(), sw.child.id());
    rows.push(Row {
        name: "resident memory (RSS) after the command mix".into(),
        unit: "KiB",
        vtpmd: stat(vec![vt.rss_kib() as f64]),
        swtpm: stat(vec![sw.rss_kib() as f64]),
        extra: vec![
            (
                "vtpmd private".into(),
                stat(vec![smaps_kib(vp, "Private_Dirty") as f64]),
            ),
            (
                "swtpm private".into(),
                stat(vec![smaps_kib(sp, "Private_Dirty") as f64]),
            ),
        ],
    });
    drop(vt);
    drop(sw);
    // VTPM_BENCH_ONLY=text runs only the rows whose name contains it.
    let only = std::env::var("VTPM_BENCH_ONLY").ok();
    let wanted = |row: &str| match only.as_deref() {
        Some(f) => row.contains(f),
        None => true,
    };
    if wanted("start-up") {
        eprintln!("  start-up");
        rows.push(startup_row(&o));
    }
    if wanted("migration") {
        eprintln!("  migration");
        let keys = tempfile::tempdir().unwrap();
        rows.push(migration_rows(&o, keys.path()));
    }
    if wanted("density") {
        eprintln!("  density");
        rows.push(density_row(&o));
    }
    report(&rows, &root, o.smoke);
}

fn report(rows: &[Row], root: &Path, smoke: bool) {
    println!(
        "\n{:<44} {:>5} {:>10} {:>10} {:>10} {:>10} {:>7}  other (p50)",
        "row", "unit", "vtpmd p50", "swtpm p50", "vtpmd p99", "swtpm p99", "ratio"
    );
    let mut json = Vec::new();
    for r in rows {
        let ratio = r.vtpmd.median / r.swtpm.median;
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(k, s)| format!("{k} {:.1}", s.median))
            .collect();
        println!(
            "{:<44} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2}  {}",
            r.name,
            r.unit,
            r.vtpmd.median,
            r.swtpm.median,
            r.vtpmd.p99,
            r.swtpm.p99,
            ratio,
            extra.join(", ")
        );
        let mut row = serde_json::json!({
            "row": r.name, "unit": r.unit, "iterations": r.vtpmd.n,
            "vtpmd": {"median": r.vtpmd.median, "p99": r.vtpmd.p99},
            "swtpm": {"median": r.swtpm.median, "p99": r.swtpm.p99},
            "ratio_vtpmd_over_swtpm": ratio,
        });
        for (k, s) in &r.extra {
            row[k.as_str()] = serde_json::json!({"median": s.median, "p99": s.p99});
            if k == "in-process" {
                row["vtpmd_overhead_us"] = (r.vtpmd.median - s.median).into();
                row["swtpm_overhead_us"] = (r.swtpm.median - s.median).into();
            }
        }
        json.push(row);
    }
    let dir = root.join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(if smoke {
        "report-smoke.json"
    } else if std::env::var_os("VTPM_BENCH_ONLY").is_some() {
        "report-partial.json"
    } else {
        "report.json"
    });
    std::fs::write(&file, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nreport: {}", file.display());
}
