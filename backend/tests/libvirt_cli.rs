//! The command lines libvirt runs `swtpm` with, run against vtpmd: the
//! capability probe, an `<encryption secret=...>` domain (libvirt 9: key
//! and migration key as passphrases on pipes), an older libvirt's
//! `--daemon --pid file=`, and the way back from vtpmd's sealed format to
//! swtpm (`vtpmd convert-state`), checked with swtpm 0.7.1.

use common::*;
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vtpm_test_support as common;

const NV: u32 = 0x0150_0060;
const SECRET: &[u8] = b"domain NV kept under the libvirt secret";

fn features(bin: &str) -> BTreeSet<String> {
    let out = Command::new(bin)
        .args(["socket", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "swtpm");
    v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn print_capabilities_lists_what_vtpmd_implements() {
    let ours = features(&VTPMD);
    // What libvirt checks before passing the options it depends on.
    for f in [
        "tpm-2.0",
        "cmdarg-pwd-fd",
        "cmdarg-key-fd",
        "cmdarg-migration",
        "nvram-backend-dir",
    ] {
        assert!(ours.contains(f), "{f} missing: {ours:?}");
    }
    // Not implemented, so not announced.
    for f in [
        "tpm-1.2",
        "nvram-backend-file",
        "cmdarg-chroot",
        "tpm-send-command-header",
        "cmdarg-profile",
    ] {
        assert!(!ours.contains(f), "{f} announced: {ours:?}");
    }
    // The RSA key sizes are libtpms's, as swtpm (same libtpms) reports them.
    let out = Command::new("swtpm")
        .args(["socket", "--tpm2", "--print-capabilities"])
        .output()
        .unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rsa = |set: Vec<String>| -> Vec<String> {
        set.into_iter()
            .filter(|f| f.starts_with("rsa-keysize-"))
            .collect()
    };
    let swtpm_rsa = rsa(theirs["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect());
    assert!(!swtpm_rsa.is_empty());
    assert_eq!(rsa(ours.iter().cloned().collect()), swtpm_rsa);
    eprintln!("vtpmd --print-capabilities: {ours:?}");
}

/// Waits until the control socket accepts connections.
fn wait_for(path: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// libvirt 9's command line for `<tpm model='tpm-crb'><backend
/// type='emulator' version='2.0'><encryption secret='...'/></backend>`,
/// with the secret's value on two pipes.
fn libvirt_domain(bin: &str, dir: &Path, passphrase: &[u8]) -> std::process::Child {
    let key = inheritable_pipe(passphrase);
    let migkey = inheritable_pipe(passphrase);
    let child = Command::new(bin)
        .arg("socket")
        .arg("--ctrl")
        .arg(format!(
            "type=unixio,path={},mode=0600",
            dir.join("swtpm.sock").display()
        ))
        .arg("--tpmstate")
        .arg(format!("dir={},mode=0600", dir.join("state").display()))
        .arg("--log")
        .arg(format!("file={}", dir.join("swtpm.log").display()))
        .arg("--terminate")
        .arg("--tpm2")
        .arg("--key")
        .arg(format!("pwdfd={},mode=aes-256-cbc", key.as_raw_fd()))
        .arg("--migration-key")
        .arg(format!("pwdfd={},mode=aes-256-cbc", migkey.as_raw_fd()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop((key, migkey));
    wait_for(&dir.join("swtpm.sock"));
    child
}

/// QEMU's start, then NV: defined and written (`write`) or read back.
fn guest(dir: &Path, write: bool) -> Vec<u8> {
    let mut c = Ctrl::connect(&dir.join("swtpm.sock"));
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    if write {
        assert_eq!(
            rc(&tpm(&mut s, &cmd::nv_define(NV, SECRET.len() as u16))),
            0
        );
        assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, SECRET))), 0);
    }
    let r = tpm(&mut s, &cmd::nv_read(NV, SECRET.len() as u16));
    assert_eq!(rc(&r), 0, "NV_Read");
    assert_eq!(c.result(0x03, &[]), 0, "CMD_SHUTDOWN");
    cmd::nv_data(&r)
}

fn finish(mut child: std::process::Child) {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn encrypted_libvirt_domain_and_the_way_back_to_swtpm() {
    let t = state_dir();
    let secret = b"libvirt secret value";
    let d = libvirt_domain(&VTPMD, t.path(), secret);
    let sock_mode = std::fs::metadata(t.path().join("swtpm.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(sock_mode & 0o777, 0o600, "mode=0600 of --ctrl");
    assert_eq!(guest(t.path(), true), SECRET);
    finish(d);
    let slots = t.path().join("state/vtpmd-00.permall");
    let raw = std::fs::read(&slots).unwrap();
    assert!(
        raw.windows(8).any(|w| w == b"VTPMSEAL"),
        "a new directory is sealed"
    );
    assert!(
        !raw.windows(16).any(|w| w == &SECRET[..16]),
        "plaintext on disk"
    );
    let mode = std::fs::metadata(&slots).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode=0600 of --tpmstate");

    // Back to swtpm (docs/STORAGE.md): swtpm-export with the secret as
    // libvirt passes it writes swtpm's encrypted files.
    let pw = t.path().join("pw");
    let export = |pw_content: &[u8]| {
        std::fs::write(&pw, pw_content).unwrap();
        Command::new(&*VTPMD)
            .args(["swtpm-export", "--tpmstate"])
            .arg(format!("dir={}", t.path().join("state").display()))
            .arg("--key")
            .arg(format!("pwdfile={},mode=aes-256-cbc", pw.display()))
            .output()
            .unwrap()
    };
    // A wrong secret exports nothing and changes nothing.
    let out = export(b"wrong");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&slots).unwrap(), raw);
    let out = export(secret);
    assert!(out.status.success(), "{out:?}");
    let permall = t.path().join("state/tpm2-00.permall");
    assert_eq!(
        std::fs::read(&permall).unwrap()[5] & 0x09,
        0x09,
        "swtpm's format, 256-bit key"
    );
    let s = libvirt_domain("swtpm", t.path(), secret);
    assert_eq!(
        guest(t.path(), false),
        SECRET,
        "swtpm reads the exported state"
    );
    finish(s);
    // From a directory swtpm made, vtpmd keeps swtpm's encryption format.
    let d = libvirt_domain(&VTPMD, t.path(), secret);
    assert_eq!(guest(t.path(), false), SECRET);
    finish(d);
    let raw = std::fs::read(&slots).unwrap();
    assert!(!raw.windows(8).any(|w| w == b"VTPMSEAL"));
    assert!(!raw.windows(16).any(|w| w == &SECRET[..16]));
}

/// Older libvirt: `swtpm socket --daemon ... --pid file=`; it reads the pid
/// file as soon as the command returned.
#[test]
fn older_libvirt_daemon_command_line() {
    let t = state_dir();
    let pid = t.path().join("swtpm.pid");
    let out = Command::new(&*VTPMD)
        .args(["socket", "--daemon", "--ctrl"])
        .arg(format!(
            "type=unixio,path={},mode=0600",
            t.path().join("swtpm.sock").display()
        ))
        .arg("--tpmstate")
        .arg(format!(
            "dir={},mode=0600",
            t.path().join("state").display()
        ))
        .arg("--log")
        .arg(format!("file={}", t.path().join("swtpm.log").display()))
        .arg("--tpm2")
        .arg("--pid")
        .arg(format!("file={}", pid.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let n: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{n}/exe")).exists());
    assert_eq!(guest(t.path(), true), SECRET);
}
