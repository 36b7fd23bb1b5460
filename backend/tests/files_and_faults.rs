//! Files vtpmd creates and a disk that fails under it, with real processes:
//! planted symlinks, modes whatever the umask, clean-up after a failed
//! start, and a full disk (a small tmpfs) in the middle of NV writes.
//! Each test is the regression test of a defect from issue 10 and fails on
//! a build without its fix (`VTPMD_BIN=old-vtpmd`).

use common::*;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use vtpm_test_support as common;

const NV: u32 = 0x0150_0040;

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs vtpmd under `sh -c 'umask U; exec vtpmd ...'` and returns the child.
fn spawn_with_umask(umask: &str, args: &[String]) -> std::process::Child {
    let mut line = format!("umask {umask}; exec {}", &*VTPMD);
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    Command::new("sh")
        .args(["-c", &line])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(p: &Path) {
    for _ in 0..500 {
        if p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not appear", p.display());
}

/// `vtpmd socket --tpm2 --tpmstate dir=STATE --ctrl type=unixio,path=CTRL`
/// and `extra`.
fn socket_args(state: &Path, ctrl: &Path, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        "socket".to_string(),
        "--tpm2".into(),
        "--tpmstate".into(),
        format!("dir={}", state.display()),
        "--ctrl".into(),
        format!("type=unixio,path={}", ctrl.display()),
    ];
    v.extend_from_slice(extra);
    v
}

/// Runs vtpmd to completion (killed after 10 s: these runs must fail fast).
fn run(args: &[String]) -> Output {
    let child = Command::new(&*VTPMD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    killer.join().unwrap();
    out
}

#[test]
fn pid_file_temporary_is_never_written_through_a_planted_symlink() {
    let t = state_dir();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let pid = t.path().join("vtpmd.pid");
    symlink(&victim, t.path().join("vtpmd.tmp")).unwrap();
    let d = Daemon::start(t.path(), &["--pid", &format!("file={}", pid.display())]);
    wait_for(&pid);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let written = std::fs::read_to_string(&pid).unwrap();
    assert_eq!(written.trim(), d.child.id().to_string());
    assert_eq!(mode_of(&pid), 0o600);
}

#[test]
fn log_file_symlink_is_refused_not_appended_to() {
    let t = state_dir();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = t.path().join("vtpmd.log");
    symlink(&victim, &link).unwrap();
    let out = run(&socket_args(
        &t.path().join("state"),
        &t.path().join("c.sock"),
        &["--log".into(), format!("file={},level=20", link.display())],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn modes_are_explicit_whatever_the_umask() {
    let t = state_dir();
    let (ctrl, log, pid) = (
        t.path().join("c.sock"),
        t.path().join("vtpmd.log"),
        t.path().join("vtpmd.pid"),
    );
    let mut child = spawn_with_umask(
        "000",
        &socket_args(
            &t.path().join("state"),
            &ctrl,
            &[
                "--log".into(),
                format!("file={},level=20", log.display()),
                "--pid".into(),
                format!("file={}", pid.display()),
                "--flags".into(),
                "not-need-init,startup-clear".into(),
            ],
        ),
    );
    wait_for(&pid);
    assert_eq!(mode_of(&ctrl), 0o770, "control socket (swtpm's default)");
    assert_eq!(mode_of(&log), 0o600, "log file");
    assert_eq!(mode_of(&pid), 0o600, "pid file");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn unloadable_state_says_why_on_stderr() {
    let t = state_dir();
    // The permanent state's name is taken by a directory.
    std::fs::create_dir(t.path().join("state/tpm2-00.permall")).unwrap();
    let out = run(&socket_args(
        &t.path().join("state"),
        &t.path().join("c.sock"),
        &[
            "--log".into(),
            format!("file={},level=20", t.path().join("vtpmd.log").display()),
        ],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Is a directory"),
        "stderr does not say why: {err}"
    );
}

#[test]
fn failed_start_says_why_on_stderr_and_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // A full state directory: the lock file (empty) can be made, but the
    // new TPM cannot be stored at INIT, after the control socket and the
    // pid file exist.
    mount_tmpfs(&state, "256k");
    let _unmount = Unmount(&state);
    fill(&state);
    let (ctrl, pid) = (t.path().join("c.sock"), t.path().join("vtpmd.pid"));
    let out = run(&socket_args(
        &state,
        &ctrl,
        &[
            "--pid".into(),
            format!("file={}", pid.display()),
            "--log".into(),
            format!("file={},level=20", t.path().join("vtpmd.log").display()),
            "--flags".into(),
            "not-need-init".into(),
        ],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left on device"),
        "stderr does not say why: {err}"
    );
    assert!(!ctrl.exists(), "control socket left behind");
    assert!(!pid.exists(), "pid file left behind");
}

fn mount_tmpfs(at: &Path, size: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
        .arg("tmpfs")
        .arg(at)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mount tmpfs (these tests run as root, as CI does)"
    );
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// Fills the file system at `dir` until a write fails.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = [0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn full_disk_keeps_preallocated_writes_fails_growth_cleanly_and_leaks_no_secret() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    mount_tmpfs(&state, "1m");
    let _unmount = Unmount(&state);
    let d = Daemon::spawn(
        &VTPMD,
        t.path(),
        t.path().join("c.sock"),
        &[
            "socket".into(),
            "--tpm2".into(),
            "--ctrl".into(),
            format!("type=unixio,path={}", t.path().join("c.sock").display()),
        ],
    );
    let mut d = d;
    for _ in 0..500 {
        if t.path().join("c.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_define(NV, 64))), 0);
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, &[0x11; 64]))), 0);
    fill(&state);
    // A recognisable secret that must appear nowhere but in the TPM.
    let secret: Vec<u8> = (0..64u8).map(|i| 0xa0 ^ i).collect();
    let r = tpm(&mut s, &cmd::nv_write(NV, &secret));
    assert_eq!(
        rc(&r),
        0,
        "a write into the preallocated state slots needs no new blocks"
    );
    // Growing the state beyond its slots needs a new file: that fails.
    let grew = (1..40u32).find(|i| rc(&tpm(&mut s, &cmd::nv_define(NV + i, 2048))) != 0);
    assert!(
        grew.is_some(),
        "the state outgrew its slots on a full disk and nothing failed"
    );
    // More commands in whatever state the TPM is in now (libtpms's failure
    // mode answers them and logs what it was sent).
    for _ in 0..3 {
        let _ = tpm(&mut s, &cmd::nv_write(NV, &secret));
        let _ = tpm(&mut s, &cmd::get_random(16));
    }
    let leftovers: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("TMP2-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(d.alive(), "vtpmd died on a full disk");
    // Nothing of the secret on stderr or in the log, raw or as hex.
    d.kill9();
    let mut err = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let log = d.log_text();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    for text in [&err, &log] {
        // Hex dumps come spaced and wrapped: compare without whitespace.
        let squeezed: String = text
            .to_lowercase()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        assert!(
            !squeezed.contains(&hex[..24]),
            "secret (hex) leaked:\n{text}"
        );
        assert!(
            !text.as_bytes().windows(12).any(|w| w == &secret[..12]),
            "secret (raw) leaked"
        );
    }
    // The disk has room again: the state loads, with the acknowledged write.
    std::fs::remove_file(state.join("filler")).unwrap();
    let d2 = Daemon::spawn(
        &VTPMD,
        t.path(),
        t.path().join("c2.sock"),
        &[
            "socket".into(),
            "--tpm2".into(),
            "--ctrl".into(),
            format!("type=unixio,path={}", t.path().join("c2.sock").display()),
        ],
    );
    for _ in 0..500 {
        if t.path().join("c2.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Ctrl::connect(&d2.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    let r = tpm(&mut s, &cmd::nv_read(NV, 64));
    assert_eq!(rc(&r), 0, "NV_Read after the disk failure");
    assert_eq!(cmd::nv_data(&r), secret);
}
