//! `make bench`: vtpmd against reference swtpm builds (same client, same
//! transport, alternating in turns) and against libtpms called in
//! process with no transport at all. `--smoke` runs a few iterations of each
//! row and small fleets so `make test` keeps the harness working; it asserts
//! no timings.
//!
//! Options: `--smoke`; `--swtpm [LABEL=]PATH` (repeatable) to choose the
//! reference swtpm builds (default: the system's swtpm, plus Debian sid's
//! through `build/swtpm-sid/swtpm` when `bench/prepare-swtpm-sid.sh` made
//! it). Environment: `VTPMD_BIN`, `VTPMCTL_BIN`, `VTPM_BENCH_ONLY=text`
//! (only rows whose name contains it), `VTPM_BENCH_PIN=0` (no pinning),
//! `VTPM_BENCH_BLOCK=N` (calls per turn; `rows::block`).

#![deny(unsafe_code)]

//!
//! * [`anchors`]: the reference backends;
//! * [`targets`]: the backends driven (processes over TCP, a socketpair or
//!   the TCTI's pattern; libtpms in process);
//! * [`rows`]: latency rows; [`durability`]: the durability floor and
//!   flush counts; [`scale`]: fleets of instances;
//! * [`report`]: statistics and the table.

mod anchors;
mod durability;
mod report;
mod rows;
mod scale;
mod targets;

use anchors::Anchor;
use report::{one, report, Row};
use rows::{cheap, command_rows, heavy, migration_rows, rss_row, startup_row, wanted, NV_WRITE};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use targets::{pin_client, InProcess, MemStore, Remote, Target, Tcti, Transport};
use vtpm_test_support::cmd as c;
use vtpmd::engine::{Libtpms, NvStore, TpmEngine};

pub(crate) struct Opts {
    pub(crate) smoke: bool,
    pub(crate) vtpmd: String,
    pub(crate) vtpmctl: String,
    pub(crate) anchors: Vec<Anchor>,
}

pub(crate) fn n(o: &Opts, full: usize) -> usize {
    if o.smoke {
        3
    } else {
        full
    }
}

static WORK: OnceLock<PathBuf> = OnceLock::new();

/// The directory every state directory and socket of this run lives in
/// (removed when `main` returns or unwinds).
pub(crate) fn work_base() -> &'static Path {
    WORK.get().expect("work directory")
}

/// Up to the hard limit: a fleet of instances means a descriptor each.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn parse_args(args: &[String]) -> (bool, Vec<String>) {
    let mut smoke = false;
    let mut swtpm = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--swtpm" => swtpm.push(
                it.next()
                    .expect("--swtpm needs [LABEL=]PATH, e.g. --swtpm /usr/bin/swtpm")
                    .clone(),
            ),
            other => match other.strip_prefix("--swtpm=") {
                Some(v) => swtpm.push(v.to_string()),
                None => panic!(
                    "unknown argument {other}: vtpm-bench [--smoke] [--swtpm [LABEL=]PATH]..."
                ),
            },
        }
    }
    (smoke, swtpm)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (smoke, swtpm) = parse_args(&args);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    raise_fd_limit();
    let work = tempfile::Builder::new()
        .prefix("vtpm-bench.")
        .tempdir()
        .expect("work directory");
    // The sid wrapper bind-mounts only this directory into its root.
    std::env::set_var("SWTPM_SID_DIRS", work.path());
    let _ = WORK.set(work.path().to_path_buf());
    let o = Opts {
        smoke,
        vtpmd: std::env::var("VTPMD_BIN")
            .unwrap_or_else(|_| root.join("target/release/vtpmd").display().to_string()),
        vtpmctl: std::env::var("VTPMCTL_BIN")
            .unwrap_or_else(|_| root.join("target/release/vtpmctl").display().to_string()),
        anchors: anchors::choose(&root, &swtpm, smoke),
    };
    let labels: Vec<String> = o.anchors.iter().map(|a| a.label.clone()).collect();
    eprintln!(
        "vtpm-bench{}: vtpmd {} vs {}, alternating",
        if o.smoke { " (smoke)" } else { "" },
        o.vtpmd,
        labels.join(", ")
    );
    // A binary that was just built sits in dirty page-cache pages, which
    // smaps counts as the process's private memory until written back.
    let _ = Command::new("sync").status();
    pin_client();
    let store: Arc<dyn NvStore> = Arc::new(MemStore::default());
    let mut tpm = Libtpms::take(store)
        .expect("libtpms free")
        .expect("libtpms");
    tpm.main_init().expect("MainInit");
    let mut ip = InProcess(tpm);
    assert_eq!(c::rc(&ip.cmd(&c::startup_clear())), 0);

    let mut rows = tcp_rows(&o, &mut ip);
    rows.extend(socketpair_rows(&o, &mut ip));
    if wanted("start-up until") {
        eprintln!("  start-up");
        rows.push(startup_row(&o));
    }
    if wanted("migration") {
        eprintln!("  migration");
        let keys = targets::workdir();
        rows.push(migration_rows(&o, keys.path()));
    }
    targets::unpin_client();
    rows.extend(scale_rows(&o));
    report(&rows, &labels, &root, o.smoke);
    drop(work);
}

/// Starts vtpmd and every reference on `transport`.
fn start_all(o: &Opts, transport: Transport, seed: u32) -> (Remote, Vec<Remote>) {
    let vt = Remote::start_with("vtpmd", &o.vtpmd, transport, &[], seed, true);
    let refs = o
        .anchors
        .iter()
        .enumerate()
        .map(|(k, a)| {
            Remote::start_with(&a.label, &a.bin, transport, &[], seed + 1 + k as u32, true)
        })
        .collect();
    (vt, refs)
}

/// Over TCP with a persistent connection: every command row, the
/// durability floor, flushes per NV_Write, RSS; then the tpm2-tss TCTI's
/// connection pattern on the same backends.
fn tcp_rows(o: &Opts, ip: &mut InProcess) -> Vec<Row> {
    let (mut vt, mut refs) = start_all(o, Transport::Tcp, 1);
    // The state the floor writes: swtpm's file with the NV index defined.
    rows::define_nv(&mut refs[0]);
    let size = durability::state_size(&refs[0].state_dir());
    let mut floor = durability::Floor::new(&vt.state_dir(), size);
    let mut specs = cheap();
    specs.extend(heavy());
    let mut rows = {
        let mut rt: Vec<&mut dyn Target> = refs.iter_mut().map(|r| r as &mut dyn Target).collect();
        command_rows(o, "", specs, &mut vt, &mut rt, ip, Some(&mut floor))
    };
    drop(floor);
    if let Some(nv) = rows.iter_mut().find(|r| r.name == NV_WRITE) {
        // How far above each reference vtpmd's NV_Write sits, counted in
        // durability floors (the floor timed in the same loop).
        let fl = nv
            .extra
            .iter()
            .find(|(k, _)| k == "durability floor")
            .map(|(_, s)| s.median);
        if let Some(fl) = fl {
            for (r, l) in nv.refs.clone().iter().zip(&o.anchors) {
                let margin = (nv.vtpmd.median - r.median) / fl;
                nv.extra
                    .push((format!("(vtpmd - {}) / floor", l.label), one(margin)));
            }
        }
    }
    if wanted("durability floor") {
        let size = durability::state_size(&refs[0].state_dir());
        eprintln!("  durability floor ({size} B + fdatasync)");
        let mut dirs = vec![vt.state_dir()];
        dirs.extend(refs.iter().map(|r| r.state_dir()));
        let mut st = durability::floor_row(&dirs, size, n(o, 300));
        let vtpmd = st.remove(0);
        rows.push(Row {
            name: format!("durability floor: write {size} B + fdatasync"),
            unit: "us",
            vtpmd,
            refs: st,
            extra: vec![],
        });
    }
    if wanted("flushes") {
        if durability::have_strace() {
            eprintln!("  flushes per NV_Write (strace)");
            let writes = n(o, 20);
            let count = |t: &mut Remote| {
                rows::define_nv(t);
                one(durability::flushes_per_write(t, rows::NV_INDEX, writes))
            };
            let vtpmd = count(&mut vt);
            let refs_n = refs.iter_mut().map(count).collect();
            rows.push(Row {
                name: "device flushes per NV_Write (strace -c)".into(),
                unit: "count",
                vtpmd,
                refs: refs_n,
                extra: vec![],
            });
        } else {
            eprintln!("vtpm-bench: strace missing, flushes not counted (scripts/install-deps.sh)");
        }
    }
    if wanted("resident memory") {
        let labels: Vec<String> = o.anchors.iter().map(|a| a.label.clone()).collect();
        rows.push(rss_row(&vt, &refs, &labels));
    }
    // The TCTI's pattern: the persistent connections are closed first
    // (swtpm serves one data connection at a time).
    for (init, prefix, names) in [
        (
            false,
            "TCTI, new connection: ",
            &["GetRandom(32)", "PCR_Read"][..],
        ),
        (true, "TCTI set-up + command: ", &["GetRandom(32)"][..]),
    ] {
        let specs: Vec<_> = cheap()
            .into_iter()
            .filter(|s| names.contains(&s.name))
            .collect();
        let mut vt_t = Tcti::new(&mut vt, init);
        let mut ref_t: Vec<Tcti> = refs.iter_mut().map(|r| Tcti::new(r, init)).collect();
        let mut rt: Vec<&mut dyn Target> = ref_t.iter_mut().map(|r| r as &mut dyn Target).collect();
        rows.extend(command_rows(o, prefix, specs, &mut vt_t, &mut rt, ip, None));
    }
    rows
}

/// QEMU's transport: the cheap commands over a socketpair handed over with
/// CMD_SET_DATAFD.
fn socketpair_rows(o: &Opts, ip: &mut InProcess) -> Vec<Row> {
    let prefix = "socketpair (SET_DATAFD): ";
    if !cheap()
        .iter()
        .any(|s| wanted(&format!("{prefix}{}", s.name)))
    {
        return Vec::new();
    }
    let (mut vt, mut refs) = start_all(o, Transport::DataFd, 40);
    let mut rt: Vec<&mut dyn Target> = refs.iter_mut().map(|r| r as &mut dyn Target).collect();
    command_rows(o, prefix, cheap(), &mut vt, &mut rt, ip, None)
}

/// Fleets: idle instances side by side, a start-up storm, and concurrent
/// NV writers.
fn scale_rows(o: &Opts) -> Vec<Row> {
    let anchors: Vec<(String, String)> = o
        .anchors
        .iter()
        .map(|a| (a.label.clone(), a.bin.clone()))
        .collect();
    let mut rows = Vec::new();
    let (small, large, writers, writes) = if o.smoke {
        (5, 10, 10, 3)
    } else {
        (50, 1000, 100, 50)
    };
    for count in [small, large] {
        if scale::fleet_names(count).iter().any(|n| wanted(n)) {
            eprintln!("  {count} idle instances");
            rows.extend(scale::fleet_rows(&o.vtpmd, &anchors, count));
        }
    }
    if scale::writers_names(writers).iter().any(|n| wanted(n)) {
        eprintln!("  {writers} instances writing NV");
        rows.extend(scale::writers_rows(&o.vtpmd, &anchors, writers, writes));
    }
    rows
}
