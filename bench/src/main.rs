//! `make bench`: vtpmd against swtpm (same libtpms, same client, same
//! transport, alternating per iteration) and against libtpms called in
//! process with no transport at all. `--smoke` runs a few iterations of each
//! row so `make test` keeps the harness working; it asserts no timings.

#![deny(unsafe_code)]

//!
//! * [`targets`]: the backends driven (processes over TCP, libtpms in process);
//! * [`rows`]: what is measured;
//! * [`report`]: statistics and the table.

mod report;
mod rows;
mod targets;

use report::{report, stat, Row};
use rows::{command_rows, density_row, migration_rows, startup_row};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use targets::{pin_client, smaps_kib, InProcess, MemStore, Remote, Target};
use vtpm_test_support::cmd as c;
use vtpmd::engine::{Libtpms, NvStore, TpmEngine};

pub(crate) struct Opts {
    pub(crate) smoke: bool,
    pub(crate) vtpmd: String,
    pub(crate) vtpmctl: String,
}

pub(crate) fn n(o: &Opts, full: usize) -> usize {
    if o.smoke {
        3
    } else {
        full
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
