//! The state directory under real processes: exclusive lock, at-rest
//! encryption, refusal to replace unreadable state, and crash safety under
//! kill -9.

use common::*;
use std::process::Command;
use std::time::Duration;
use vtpm_test_support as common;

const NV: u32 = 0x0150_0030;

fn write_nv(d: &Daemon, data: &[u8], define: bool) {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    if define {
        assert_eq!(rc(&tpm(&mut s, &cmd::nv_define(NV, data.len() as u16))), 0);
    }
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, data))), 0);
}

fn read_nv(d: &Daemon, len: u16) -> Vec<u8> {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    let r = tpm(&mut s, &cmd::nv_read(NV, len));
    assert_eq!(rc(&r), 0, "NV_Read");
    cmd::nv_data(&r)
}

#[test]
fn second_daemon_on_the_same_directory_is_refused() {
    let t = state_dir();
    let _d = Daemon::start(t.path(), &[]);
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("in use by another"), "{err}");
}

#[test]
fn swtpm_and_vtpmd_exclude_each_other() {
    let t = state_dir();
    let _s = Daemon::start_bin("swtpm", t.path(), &[]);
    // swtpm takes its lock at INIT: start it.
    let mut c = Ctrl::connect(&t.path().join("ctrl.sock"));
    let _data = c.qemu_start(4096);
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("in use by another"), "{err}");
}

#[test]
fn missing_state_directory_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn corrupt_state_is_refused_not_replaced() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    write_nv(&d, b"original", true);
    drop(d);
    let permall = t.path().join("state/vtpmd-00.permall");
    let good = std::fs::read(&permall).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    bad.truncate(bad.len() - 100);
    std::fs::write(&permall, &bad).unwrap();
    let err = vtpmd_fails(t.path(), &[]);
    assert!(
        err.contains("cannot be loaded") || err.contains("state file"),
        "{err}"
    );
    // Nothing overwrote the damaged file with a fresh TPM.
    assert_eq!(std::fs::read(&permall).unwrap(), bad);
    std::fs::write(&permall, &good).unwrap();
    let d = Daemon::start(t.path(), &[]);
    assert_eq!(read_nv(&d, 8), b"original");
}

#[test]
fn encrypted_state_at_rest() {
    let t = state_dir();
    let key = t.path().join("key");
    let wrong = t.path().join("wrong");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    std::fs::write(
        &wrong,
        "ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let keyarg = format!("file={}", key.display());
    let d = Daemon::start(t.path(), &["--key", &keyarg]);
    let secret = b"0123456789abcdef-very-secret-nv-contents";
    write_nv(&d, secret, true);
    drop(d);
    let file = t.path().join("state/vtpmd-00.permall");
    let permall = std::fs::read(&file).unwrap();
    assert!(permall.starts_with(b"VTPMSLOT"));
    assert!(
        permall.windows(8).any(|w| w == b"VTPMSEAL"),
        "sealed records"
    );
    assert!(
        !permall.windows(16).any(|w| w == &secret[..16]),
        "plaintext NV on disk"
    );

    let err = vtpmd_fails(t.path(), &["--key", &format!("file={}", wrong.display())]);
    assert!(err.contains("wrong --key"), "{err}");
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("no --key was given"), "{err}");
    // Both slots tampered with: refused, never replaced by a blank TPM.
    let slot = u32::from_le_bytes(permall[12..16].try_into().unwrap()) as usize;
    let mut tampered = permall.clone();
    for at in [4096 + 200, 4096 + slot + 200] {
        tampered[at] ^= 1;
    }
    std::fs::write(&file, &tampered).unwrap();
    let err = vtpmd_fails(t.path(), &["--key", &keyarg]);
    assert!(err.contains("neither slot holds a valid record"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), tampered);
    std::fs::write(&file, &permall).unwrap();

    let d = Daemon::start(t.path(), &["--key", &keyarg]);
    assert_eq!(read_nv(&d, secret.len() as u16), secret);
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(
        c.cmd(0x0f, &[], 8),
        vec![0, 0, 0, 0, 0, 0, 0, 1],
        "GET_CONFIG reports the key"
    );
}

#[test]
fn kill_9_during_nv_writes_never_loses_the_state() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    write_nv(&d, &0u64.to_be_bytes(), true);
    drop(d);
    let mut last_acked = 0u64;
    let rounds = 25;
    for round in 0..rounds {
        let mut d = Daemon::start(t.path(), &[]);
        let mut c = Ctrl::connect(&d.ctrl);
        let mut s = c.qemu_start(4096);
        assert_eq!(
            rc(&tpm(&mut s, &cmd::startup_clear())),
            0,
            "round {round}: state did not load"
        );
        let r = tpm(&mut s, &cmd::nv_read(NV, 8));
        assert_eq!(rc(&r), 0, "round {round}: NV index lost");
        let v = u64::from_be_bytes(cmd::nv_data(&r).try_into().unwrap());
        // Every acknowledged write survives; at most the one in flight is
        // also there.
        assert!(
            v == last_acked || v == last_acked + 1,
            "round {round}: read {v}, last acknowledged {last_acked}"
        );
        // Write in a loop from a thread and kill -9 at a varying moment.
        let writer = std::thread::spawn(move || {
            let mut acked = v;
            for n in v + 1..v + 1000 {
                let _ = std::io::Write::write_all(&mut s, &cmd::nv_write(NV, &n.to_be_bytes()));
                let mut h = [0u8; 10];
                if std::io::Read::read_exact(&mut s, &mut h).is_err() {
                    break;
                }
                let mut rest = vec![0u8; be32(&h, 2) as usize - 10];
                if std::io::Read::read_exact(&mut s, &mut rest).is_err() {
                    break;
                }
                if be32(&h, 6) == 0 {
                    acked = n;
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(20 + (round as u64 * 7) % 60));
        d.kill9();
        last_acked = writer.join().unwrap();
        assert_ne!(
            t.path()
                .join("state/vtpmd-00.permall")
                .metadata()
                .unwrap()
                .len(),
            0
        );
    }
    let d = Daemon::start(t.path(), &[]);
    let v = u64::from_be_bytes(read_nv(&d, 8).try_into().unwrap());
    assert!(
        v == last_acked || v == last_acked + 1,
        "final read {v}, last acknowledged {last_acked}"
    );
    assert!(
        last_acked > rounds as u64,
        "the loop wrote too little to test anything: {last_acked}"
    );
    eprintln!(
        "{rounds} kill -9 rounds, {last_acked} acknowledged NV writes, state loaded every time"
    );
}

#[test]
fn swtpm_state_moves_to_vtpmd_and_back_and_swtpm_refuses_vtpmd_files() {
    let t = state_dir();
    let s = Daemon::start_bin("swtpm", t.path(), &[]);
    write_nv(&s, b"swtpm-01", true);
    drop(s);
    let d = Daemon::start(t.path(), &[]);
    assert_eq!(read_nv(&d, 8), b"swtpm-01", "vtpmd reads swtpm's files");
    write_nv(&d, b"vtpmd-02", false);
    drop(d);
    let stub = std::fs::read(t.path().join("state/tpm2-00.permall")).unwrap();
    assert!(
        stub.starts_with(b"VTPMD-STUB"),
        "swtpm's name holds the stub"
    );
    // swtpm on vtpmd's files fails INIT instead of making a blank TPM.
    let s = Daemon::start_bin("swtpm", t.path(), &[]);
    let mut c = Ctrl::connect(&s.ctrl);
    assert_ne!(c.result(0x02, &[0, 0, 0, 0]), 0, "swtpm started a TPM");
    drop(c);
    drop(s);
    assert_eq!(
        std::fs::read(t.path().join("state/tpm2-00.permall")).unwrap(),
        stub,
        "swtpm left the stub alone"
    );
    // The explicit way back.
    let out = Command::new(&*VTPMD)
        .args(["swtpm-export", "--tpmstate"])
        .arg(format!("dir={}", t.path().join("state").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!t.path().join("state/vtpmd-00.permall").exists());
    let s = Daemon::start_bin("swtpm", t.path(), &[]);
    assert_eq!(
        read_nv(&s, 8),
        b"vtpmd-02",
        "swtpm reads the exported state"
    );
    drop(s);
    // Nothing to export now is a clear error, not an empty success.
    let out = Command::new(&*VTPMD)
        .args(["swtpm-export", "--tpmstate"])
        .arg(format!("dir={}", t.path().join("nowhere").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn installed_as_swtpm_it_leaves_swtpms_files_at_a_clean_exit() {
    let t = state_dir();
    let link = t.path().join("swtpm");
    std::os::unix::fs::symlink(&*VTPMD, &link).unwrap();
    let mut d = Daemon::start_bin(link.to_str().unwrap(), t.path(), &[]);
    write_nv(&d, b"as-swtpm", true);
    assert!(
        t.path().join("state/vtpmd-00.permall").exists(),
        "slot files while it runs"
    );
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(c.result(0x03, &[]), 0, "CMD_SHUTDOWN");
    assert!(d.wait_exit(Duration::from_secs(5)).is_some());
    assert!(!t.path().join("state/vtpmd-00.permall").exists());
    let s = Daemon::start_bin("swtpm", t.path(), &[]);
    assert_eq!(
        read_nv(&s, 8),
        b"as-swtpm",
        "swtpm takes the state over as it is"
    );
}
