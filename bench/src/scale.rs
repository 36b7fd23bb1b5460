//! A host's scale: many instances of one backend at once.
//!
//! * [`fleet_rows`]: N idle instances started together (a host booting its
//!   VMs): the time until every one answers CMD_GET_CAPABILITY, then per
//!   instance PSS, private memory, descriptors and threads;
//! * [`writers_rows`]: M instances each taking NV_Writes from its own
//!   client thread at once: total throughput and per-write latency.
//!
//! Backends run one after another (vtpmd, then each reference swtpm), each
//! on fresh state directories; every process is killed and reaped before
//! the next starts.

use crate::report::{one, stat, us, Row, Stat};
use crate::targets::{fds_of, read_response, rss_of, smaps_kib, status_field, workdir};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vtpm_test_support::cmd as c;

/// Instances of one backend, killed and reaped when dropped.
struct Fleet {
    children: Vec<Child>,
    dirs: Vec<tempfile::TempDir>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for ch in &mut self.children {
            let _ = ch.kill();
        }
        for ch in &mut self.children {
            let _ = ch.wait();
        }
    }
}

impl Fleet {
    fn ctrl(&self, i: usize) -> PathBuf {
        self.dirs[i].path().join("c.sock")
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dirs[i].path().join("d.sock")
    }

    /// Why instance `i` is gone, if it is.
    fn check(&mut self, i: usize, bin: &str) {
        if let Ok(Some(st)) = self.children[i].try_wait() {
            let err =
                std::fs::read_to_string(self.dirs[i].path().join("stderr")).unwrap_or_default();
            panic!("{bin} instance {i} exited with {st}: {err}");
        }
    }
}

/// Starts `count` instances of `bin` as fast as they can be spawned, with a
/// unix control socket each (and, with `writers`, a unix data socket and a
/// powered TPM). Returns them once every one has answered GET_CAPABILITY,
/// and how long that took from the first spawn.
fn start_fleet(bin: &str, count: usize, writers: bool) -> (Fleet, Duration) {
    let dirs: Vec<tempfile::TempDir> = (0..count).map(|_| workdir()).collect();
    let mut fleet = Fleet {
        children: Vec::with_capacity(count),
        dirs,
    };
    let start = Instant::now();
    for i in 0..count {
        let d = fleet.dirs[i].path();
        let mut cmd = Command::new(bin);
        cmd.args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", d.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", fleet.ctrl(i).display()));
        if writers {
            cmd.args(["--flags", "not-need-init,startup-clear", "--server"])
                .arg(format!("type=unixio,path={}", fleet.data(i).display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .expect("spawn backend");
        fleet.children.push(child);
    }
    // Every instance: connect as soon as its socket exists, send
    // GET_CAPABILITY, collect the 8-byte reply without blocking on anyone.
    let mut waiting: Vec<(usize, Option<UnixStream>, Vec<u8>)> =
        (0..count).map(|i| (i, None, Vec::new())).collect();
    while !waiting.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{bin}: {} of {count} instances never answered GET_CAPABILITY",
            waiting.len()
        );
        let before = waiting.len();
        let mut k = 0;
        while k < waiting.len() {
            let (i, conn, got) = &mut waiting[k];
            if conn.is_none() {
                if let Ok(mut s) = UnixStream::connect(fleet.ctrl(*i)) {
                    s.write_all(&1u32.to_be_bytes()).unwrap();
                    s.set_nonblocking(true).unwrap();
                    *conn = Some(s);
                }
            }
            let mut done = false;
            if let Some(s) = conn {
                let mut buf = [0u8; 8];
                match s.read(&mut buf[..8 - got.len()]) {
                    Ok(0) => panic!("{bin} instance {i} closed its control connection"),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{bin} instance {i}: {e}"),
                }
                if got.len() == 8 {
                    assert_eq!(&got[..4], &[0; 4], "{bin}: GET_CAPABILITY result");
                    done = true;
                }
            }
            if done {
                waiting.swap_remove(k);
            } else {
                k += 1;
            }
        }
        if waiting.len() == before {
            for &(i, ..) in waiting.iter().take(16) {
                fleet.check(i, bin);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let took = start.elapsed();
    (fleet, took)
}

/// Per-backend results of one fleet.
struct FleetStats {
    storm_ms: f64,
    pss: Stat,
    private: Stat,
    rss: Stat,
    fds: Stat,
    threads: Stat,
}

fn idle_fleet(bin: &str, count: usize) -> FleetStats {
    let (fleet, took) = start_fleet(bin, count, false);
    // Let start-up work (thread exits, deferred frees) settle.
    std::thread::sleep(Duration::from_millis(500));
    let per =
        |f: &dyn Fn(u32) -> u64| stat(fleet.children.iter().map(|c| f(c.id()) as f64).collect());
    let s = FleetStats {
        storm_ms: took.as_secs_f64() * 1e3,
        pss: per(&|p| smaps_kib(p, "Pss")),
        private: per(&|p| smaps_kib(p, "Private_Dirty")),
        rss: per(&rss_of),
        fds: per(&fds_of),
        threads: per(&|p| status_field(p, "Threads")),
    };
    eprintln!(
        "  {bin}: {count} idle instances answered in {:.0} ms; {:.0} MiB in total (sum of PSS)",
        s.storm_ms,
        s.pss.median * count as f64 / 1024.0
    );
    s
}

/// The names of [`fleet_rows`]'s rows, in order.
pub(crate) fn fleet_names(count: usize) -> [String; 5] {
    [
        format!("start-up storm: {count} at once, all answer GET_CAP"),
        format!("memory (PSS) per idle instance, {count} running"),
        format!("private memory per idle instance, {count} running"),
        format!("file descriptors per idle instance, {count} running"),
        format!("threads per idle instance, {count} running"),
    ]
}

/// `count` idle instances of vtpmd and of each reference, side by side.
pub(crate) fn fleet_rows(vtpmd: &str, anchors: &[(String, String)], count: usize) -> Vec<Row> {
    let [storm, pss, private, fds, threads] = fleet_names(count);
    let v = idle_fleet(vtpmd, count);
    let refs: Vec<FleetStats> = anchors.iter().map(|(_, b)| idle_fleet(b, count)).collect();
    let pick = |f: &dyn Fn(&FleetStats) -> Stat| refs.iter().map(f).collect::<Vec<Stat>>();
    let rss_extra = std::iter::once(("vtpmd RSS".to_string(), v.rss.clone()))
        .chain(
            anchors
                .iter()
                .zip(&refs)
                .map(|((l, _), s)| (format!("{l} RSS"), s.rss.clone())),
        )
        .collect();
    vec![
        Row {
            name: storm,
            unit: "ms",
            vtpmd: one(v.storm_ms),
            refs: pick(&|s| one(s.storm_ms)),
            extra: vec![],
        },
        Row {
            name: pss,
            unit: "KiB",
            vtpmd: v.pss.clone(),
            refs: pick(&|s| s.pss.clone()),
            extra: rss_extra,
        },
        Row {
            name: private,
            unit: "KiB",
            vtpmd: v.private.clone(),
            refs: pick(&|s| s.private.clone()),
            extra: vec![],
        },
        Row {
            name: fds,
            unit: "fds",
            vtpmd: v.fds.clone(),
            refs: pick(&|s| s.fds.clone()),
            extra: vec![],
        },
        Row {
            name: threads,
            unit: "thr",
            vtpmd: v.threads.clone(),
            refs: pick(&|s| s.threads.clone()),
            extra: vec![],
        },
    ]
}

const WRITERS_INDEX: u32 = 0x0150_0300;

/// `count` powered instances, one client thread each doing `writes`
/// NV_Writes (64 B) as fast as answered, all released at once. Returns
/// writes per second over the whole run and every write's latency (µs).
fn writers(bin: &str, count: usize, writes: usize) -> (f64, Stat) {
    let (fleet, _) = start_fleet(bin, count, true);
    let conns: Vec<UnixStream> = (0..count)
        .map(|i| {
            let mut s = UnixStream::connect(fleet.data(i)).expect("data socket");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(&c::nv_define(WRITERS_INDEX, 64)).unwrap();
            assert_eq!(c::rc(&read_response(&mut s)), 0, "{bin}: NV_DefineSpace");
            s
        })
        .collect();
    let gate = Arc::new(Barrier::new(count + 1));
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait();
                (0..writes)
                    .map(|i| {
                        let t = Instant::now();
                        s.write_all(&c::nv_write(WRITERS_INDEX, &[(i % 251) as u8 + 1; 64]))
                            .unwrap();
                        let r = read_response(&mut s);
                        assert_eq!(c::rc(&r), 0, "NV_Write");
                        us(t.elapsed())
                    })
                    .collect::<Vec<f64>>()
            })
        })
        .collect();
    gate.wait();
    let start = Instant::now();
    let lat: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer thread"))
        .collect();
    let wall = start.elapsed().as_secs_f64();
    drop(fleet);
    let rate = (count * writes) as f64 / wall;
    eprintln!("  {bin}: {count} instances x {writes} NV_Writes: {rate:.0} writes/s");
    (rate, stat(lat))
}

/// The names of [`writers_rows`]'s rows, in order.
pub(crate) fn writers_names(count: usize) -> [String; 2] {
    [
        format!("{count} instances NV_Write at once: throughput (more=better)"),
        format!("{count} instances NV_Write at once: latency per write"),
    ]
}

/// `count` instances of vtpmd and of each reference writing NV at once.
pub(crate) fn writers_rows(
    vtpmd: &str,
    anchors: &[(String, String)],
    count: usize,
    writes: usize,
) -> Vec<Row> {
    let [rate_name, latency_name] = writers_names(count);
    let (vr, vl) = writers(vtpmd, count, writes);
    let refs: Vec<(f64, Stat)> = anchors
        .iter()
        .map(|(_, b)| writers(b, count, writes))
        .collect();
    vec![
        Row {
            name: rate_name,
            unit: "1/s",
            vtpmd: one(vr),
            refs: refs.iter().map(|(r, _)| one(*r)).collect(),
            extra: vec![],
        },
        Row {
            name: latency_name,
            unit: "us",
            vtpmd: vl,
            refs: refs.into_iter().map(|(_, l)| l).collect(),
            extra: vec![],
        },
    ]
}
