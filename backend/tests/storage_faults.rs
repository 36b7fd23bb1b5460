//! The storage fault matrix on a real vtpmd: EIO on write and on fsync (an
//! LD_PRELOAD shim, `test-support/fault-shim/shim.c`), a state directory
//! that turns read-only under the running process (the shim's EROFS, as
//! errors=remount-ro does; a plain remount refuses while vtpmd holds its
//! lock file open), and a state directory removed or replaced while
//! running. (A full disk is in `files_and_faults.rs`.) In every case
//! the TPM command gets an error, the process stays up, no temporary file
//! is left, the log says what happened, and the old state loads again
//! once the fault is gone.

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use vtpm_test_support as common;

const NV: u32 = 0x0150_0050;
const OLD: [u8; 32] = [0x11; 32];
const NEW: [u8; 32] = [0x22; 32];

/// The shim, built once with the system C compiler.
fn shim() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("vtpmd-fault-shim-{}.so", std::process::id()));
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../test-support/fault-shim/shim.c"
        );
        let st = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(src)
            .arg("-ldl")
            .status()
            .expect("cc");
        assert!(st.success(), "building the fault shim");
        out
    })
}

struct Rig {
    dir: tempfile::TempDir,
    fault: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = state_dir();
        // Inside the state directory: under Landlock the shim, running in
        // vtpmd, can read nothing else.
        let fault = dir.path().join("state/fault-control");
        std::fs::write(&fault, "").unwrap();
        Rig { dir, fault }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self, name: &str) -> Daemon {
        let sock = self.dir.path().join(format!("{name}.sock"));
        let args = vec![
            "socket".to_string(),
            "--tpm2".into(),
            "--ctrl".into(),
            format!("type=unixio,path={}", sock.display()),
        ];
        let so = shim().display().to_string();
        let fault = self.fault.display().to_string();
        let mut d = Daemon::spawn_env(
            &VTPMD,
            self.dir.path(),
            sock,
            &args,
            &[("LD_PRELOAD", &so), ("VTPMD_FAULT_FILE", &fault)],
        );
        d.wait_for_socket(true);
        d
    }

    fn arm(&self, what: &str) {
        std::fs::write(&self.fault, what).unwrap();
    }

    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.state())
            .map(|it| {
                it.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| n.starts_with("TMP2-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn session(d: &Daemon) -> (Ctrl, std::os::unix::net::UnixStream) {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    (c, s)
}

/// Provisions OLD, arms `fault` via `inject`, tries to write NEW, then
/// checks what every fault must leave behind. `cause` is what the log has
/// to say.
fn fault_case(rig: &Rig, inject: impl FnOnce(), heal: impl FnOnce(), cause: &str) {
    let mut d = rig.start("a");
    let (_c, mut s) = session(&d);
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_define(NV, 32))), 0);
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, &OLD))), 0);
    inject();
    let r = tpm(&mut s, &cmd::nv_write(NV, &NEW));
    assert_ne!(rc(&r), 0, "a write that cannot be made durable succeeded");
    // The process answers on.
    let _ = tpm(&mut s, &cmd::get_random(8));
    assert!(d.alive(), "vtpmd died: {}", d.log_text());
    let mut fresh = Ctrl::connect(&d.ctrl);
    assert_eq!(fresh.cmd(1, &[], 8)[..4], [0, 0, 0, 0], "control channel");
    let log = d.log_text();
    assert!(
        log.contains(cause),
        "the log does not say '{cause}':\n{log}"
    );
    heal();
    assert!(
        rig.leftovers().is_empty(),
        "temporary files: {:?}",
        rig.leftovers()
    );
    d.kill9();
    rig.arm("");
    let d2 = rig.start("b");
    let (_c2, mut s2) = session(&d2);
    let r = tpm(&mut s2, &cmd::nv_read(NV, 32));
    assert_eq!(rc(&r), 0, "the old state does not load:\n{}", d2.log_text());
    assert_eq!(cmd::nv_data(&r), OLD.to_vec());
}

#[test]
fn eio_on_write() {
    let rig = Rig::new();
    fault_case(
        &rig,
        || rig.arm("write"),
        || rig.arm(""),
        "Input/output error",
    );
}

#[test]
fn eio_on_fsync() {
    let rig = Rig::new();
    fault_case(
        &rig,
        || rig.arm("fsync"),
        || rig.arm(""),
        "Input/output error",
    );
}

#[test]
fn state_directory_turned_read_only() {
    let rig = Rig::new();
    fault_case(
        &rig,
        || rig.arm("rofs"),
        || rig.arm(""),
        "Read-only file system",
    );
}

#[test]
fn state_directory_removed_while_running() {
    let rig = Rig::new();
    let (state, away) = (rig.state(), rig.dir.path().join("away"));
    fault_case(
        &rig,
        || std::fs::rename(&state, &away).unwrap(),
        || {
            assert!(!state.exists(), "vtpmd recreated the removed directory");
            std::fs::rename(&away, &state).unwrap();
        },
        "removed or replaced",
    );
}

#[test]
fn state_directory_replaced_while_running() {
    let rig = Rig::new();
    let (state, away) = (rig.state(), rig.dir.path().join("away"));
    fault_case(
        &rig,
        || {
            std::fs::rename(&state, &away).unwrap();
            std::fs::create_dir(&state).unwrap();
        },
        || {
            let written: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
            assert!(written.is_empty(), "state written into the newcomer");
            std::fs::remove_dir(&state).unwrap();
            std::fs::rename(&away, &state).unwrap();
        },
        "removed or replaced",
    );
}

/// Sends one NV_Write; `Some(rc)` if vtpmd answered, `None` if it died.
fn try_write(s: &mut std::os::unix::net::UnixStream, v: u64) -> Option<u32> {
    use std::io::{Read, Write};
    s.write_all(&cmd::nv_write(NV, &v.to_be_bytes())).ok()?;
    let mut h = [0u8; 10];
    s.read_exact(&mut h).ok()?;
    let mut rest = vec![0u8; (be32(&h, 2) as usize).saturating_sub(10)];
    s.read_exact(&mut rest).ok()?;
    Some(be32(&h, 6))
}

/// Crashes vtpmd (SIGKILL from inside, via the shim) at chosen points of
/// the state write path, many times: in the middle of the record (a torn
/// write), after the write and before the flush, and after the flush
/// before the answer. Every round restarts vtpmd and checks that the state
/// loads and holds the last acknowledged value (or the one in flight).
#[test]
fn crashes_inside_the_write_path_lose_no_acknowledged_write() {
    let rig = Rig::new();
    {
        let d = rig.start("setup");
        let (_c, mut s) = session(&d);
        assert_eq!(rc(&tpm(&mut s, &cmd::nv_define(NV, 8))), 0);
        assert_eq!(try_write(&mut s, 0), Some(0));
    }
    let points = ["tear", "crash-before-sync", "crash-after-sync"];
    let (mut acked, mut in_flight_survived, rounds) = (0u64, 0, 60);
    for round in 0..rounds {
        let point = points[round % points.len()];
        rig.arm("");
        let d = rig.start(&format!("r{round}"));
        let (_c, mut s) = session(&d);
        let r = tpm(&mut s, &cmd::nv_read(NV, 8));
        assert_eq!(
            rc(&r),
            0,
            "round {round}: state unreadable:\n{}",
            d.log_text()
        );
        let v = u64::from_be_bytes(cmd::nv_data(&r).try_into().unwrap());
        assert!(
            v == acked || v == acked + 1,
            "round {round} after {point}: read {v}, last acknowledged {acked}"
        );
        if v == acked + 1 {
            in_flight_survived += 1;
        }
        // A few acknowledged writes, then one that crashes at `point`.
        acked = v;
        for _ in 0..(1 + round % 3) {
            assert_eq!(try_write(&mut s, acked + 1), Some(0), "round {round}");
            acked += 1;
        }
        rig.arm(point);
        assert_eq!(
            try_write(&mut s, acked + 1),
            None,
            "round {round}: vtpmd answered a write that crashed at {point}"
        );
        let mut d = d;
        assert!(d.wait_exit(std::time::Duration::from_secs(5)).is_some());
    }
    rig.arm("");
    assert!(
        rig.leftovers().is_empty(),
        "temporary files: {:?}",
        rig.leftovers()
    );
    eprintln!(
        "{rounds} crashes inside the write path, {acked} acknowledged writes, 0 lost, \
         state loaded every time; the write in flight survived {in_flight_survived} times"
    );
}
