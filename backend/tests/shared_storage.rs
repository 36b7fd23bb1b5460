//! Migration on shared storage, as libvirt runs it for a TPM state
//! directory on NFS: the source with `--migration release-lock-outgoing`,
//! the destination on the same directory with
//! `--migration release-lock-outgoing,incoming` (swtpm's options). The
//! destination starts while the source holds the directory lock; the
//! source gives the lock up once the last blob went out; the destination
//! takes it at INIT; the source cannot take it back while the destination
//! runs, and can once it stopped (a failed migration resuming here).

use common::*;
use std::os::unix::net::UnixStream;
use std::path::Path;
use vtpm_test_support as common;

const NV: u32 = 0x0150_0050;
const SECRET: &[u8] = b"state on shared storage";

fn start(dir: &Path, sock: &str, extra: &[&str]) -> Daemon {
    Daemon::start_named(&VTPMD, dir, sock, extra)
}

fn nv_read(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let r = tpm(s, &cmd::nv_read(NV, SECRET.len() as u16));
    let code = rc(&r);
    (
        code,
        if code == 0 {
            cmd::nv_data(&r)
        } else {
            Vec::new()
        },
    )
}

#[test]
fn the_lock_follows_the_state_from_source_to_destination() {
    let t = state_dir();
    let mk_file = t.path().join("mk");
    std::fs::write(&mk_file, "shared migration passphrase").unwrap();
    let mk = format!("pwdfile={},mode=aes-256-cbc", mk_file.display());
    {
        let d = start(t.path(), "setup.sock", &[]);
        let mut c = Ctrl::connect(&d.ctrl);
        let mut s = c.qemu_start(4096);
        assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
        assert_eq!(
            rc(&tpm(&mut s, &cmd::nv_define(NV, SECRET.len() as u16))),
            0
        );
        assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, SECRET))), 0);
        assert_eq!(c.result(0x03, &[]), 0);
    }
    let src = start(
        t.path(),
        "src.sock",
        &[
            "--migration",
            "release-lock-outgoing",
            "--migration-key",
            &mk,
        ],
    );
    let mut sc = Ctrl::connect(&src.ctrl);
    let mut sdata = sc.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut sdata, &cmd::startup_clear())), 0);
    assert_eq!(nv_read(&mut sdata), (0, SECRET.to_vec()));

    // Without `incoming` a second process on the directory is refused...
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("in use by another vTPM process"), "{err}");
    // ...with it, the destination starts and waits for the state.
    let dst = start(
        t.path(),
        "dst.sock",
        &[
            "--migration",
            "release-lock-outgoing,incoming",
            "--migration-key",
            &mk,
        ],
    );

    let blobs = blobs::get_blobs(&mut sc.s);
    assert_eq!((blobs[0].result, blobs[1].result), (0, 0));
    let mut dc = Ctrl::connect(&dst.ctrl);
    assert_eq!(
        blobs::put_blobs(&mut dc.s, &blobs),
        0,
        "destination took the state and the lock"
    );
    let (rc_fd, mut ddata) = dc.set_datafd();
    assert_eq!(rc_fd, 0);
    assert_eq!(
        nv_read(&mut ddata),
        (0, SECRET.to_vec()),
        "destination serves the state"
    );

    // The source cannot take the directory back while the destination runs.
    let (code, _) = nv_read(&mut sdata);
    assert_eq!(code, 0x101, "the source ran a command without the lock");
    assert!(
        src.log_text().contains("lock released"),
        "{}",
        src.log_text()
    );

    // The destination stops; the source (a failed migration resuming
    // there) takes the lock back and carries on.
    assert_eq!(dc.result(0x03, &[]), 0);
    drop(dst);
    assert_eq!(nv_read(&mut sdata), (0, SECRET.to_vec()));
    assert_eq!(rc(&tpm(&mut sdata, &cmd::nv_write(NV, SECRET))), 0);
}

#[test]
fn a_source_whose_migration_failed_locks_again_on_lock_storage() {
    let t = state_dir();
    let src = start(
        t.path(),
        "src.sock",
        &[
            "--migration",
            "release-lock-outgoing",
            "--allow-plaintext-migration",
        ],
    );
    let mut c = Ctrl::connect(&src.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    let got = blobs::get_blobs(&mut c.s);
    assert_eq!(got[0].result, 0);
    // Released: another process can lock the directory now (it opens
    // and locks it at start).
    let other = start(t.path(), "other.sock", &[]);
    drop(other);
    // QEMU resumes the VM here and sends LOCK_STORAGE (retries 300).
    assert_eq!(c.result(0x13, &300u32.to_be_bytes()), 0, "LOCK_STORAGE");
    assert_eq!(rc(&tpm(&mut s, &cmd::get_random(8))), 0);
    let err = vtpmd_fails(t.path(), &[]);
    assert!(err.contains("in use by another vTPM process"), "{err}");
}
