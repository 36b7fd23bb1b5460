//! swtpm's `--key` and `--migration-key`, against swtpm 0.7.1 itself:
//!
//! * state encrypted by swtpm (every key form swtpm takes: hex and binary
//!   key files, passphrase files with either KDF, key and passphrase on an
//!   inherited pipe) loads in vtpmd with the same option: NV contents and a
//!   persistent key intact; vtpmd keeps the directory in swtpm's format, so
//!   swtpm opens it again afterwards;
//! * a wrong key, a truncated or garbled file: a clear error, and the files
//!   are left exactly as they were;
//! * state blobs under a shared migration key move swtpm → vtpmd and
//!   vtpmd → swtpm; a missing or wrong migration key is refused with
//!   swtpm's own result codes.

use common::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vtpm_test_support as common;

const NV: u32 = 0x0150_0040;
const PERSISTENT: u32 = 0x8100_0005;
const SECRET: &[u8] = b"nv secret written through swtpm --key";
/// As long as SECRET (the NV index has that size).
const OTHER: &[u8] = b"written by vtpmd, read by swtpm again";

/// A QEMU-like session: SET_DATAFD, INIT, TPM2_Startup(CLEAR).
fn session(d: &Daemon) -> (Ctrl, UnixStream) {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0, "TPM2_Startup");
    (c, s)
}

/// CMD_SHUTDOWN, then waits for the process to exit.
fn stop(mut d: Daemon, mut c: Ctrl) {
    assert_eq!(c.result(0x03, &[]), 0, "CMD_SHUTDOWN");
    assert!(
        d.wait_exit(Duration::from_secs(10)).is_some(),
        "backend did not exit"
    );
}

/// Defines and writes the NV index and makes a signing key persistent;
/// returns the key's ReadPublic response (public area and name).
fn provision(d: Daemon) -> Vec<u8> {
    let (c, mut s) = session(&d);
    assert_eq!(
        rc(&tpm(&mut s, &cmd::nv_define(NV, SECRET.len() as u16))),
        0
    );
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, SECRET))), 0);
    let r = tpm(&mut s, &cmd::create_primary("sign", 9));
    assert_eq!(rc(&r), 0, "CreatePrimary");
    let h = cmd::handle(&r);
    assert_eq!(
        rc(&tpm(&mut s, &cmd::evict_control(h, PERSISTENT))),
        0,
        "EvictControl"
    );
    let public = tpm(&mut s, &cmd::read_public(PERSISTENT));
    assert_eq!(rc(&public), 0);
    stop(d, c);
    public
}

/// Checks NV holds `nv` and the persistent key is there and signs; then
/// writes `next` into NV.
fn check_and_write(d: Daemon, nv: &[u8], public: &[u8], next: &[u8]) {
    let (c, mut s) = session(&d);
    let r = tpm(&mut s, &cmd::nv_read(NV, nv.len() as u16));
    assert_eq!(rc(&r), 0, "NV_Read");
    assert_eq!(cmd::nv_data(&r), nv, "NV contents");
    assert_eq!(
        tpm(&mut s, &cmd::read_public(PERSISTENT)),
        public,
        "persistent key"
    );
    assert_eq!(
        rc(&tpm(&mut s, &cmd::sign_ecdsa(PERSISTENT))),
        0,
        "signing with it"
    );
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_write(NV, next))), 0);
    stop(d, c);
}

fn permall(dir: &Path) -> PathBuf {
    dir.join("state/tpm2-00.permall")
}

/// The header flags of a state file.
fn flags(file: &Path) -> u16 {
    let b = std::fs::read(file).unwrap();
    u16::from_be_bytes([b[4], b[5]])
}

/// How a test hands the key over.
enum Given {
    /// A file with these bytes; the option is `format!(opt, path)`.
    File(&'static [u8], &'static str),
    /// A pipe with these bytes, inherited; the option names its number.
    Pipe(&'static [u8], &'static str),
}

/// Builds the option value; the returned descriptor must live until the
/// process started.
fn key_arg(dir: &Path, g: &Given, name: &str) -> (String, Option<OwnedFd>) {
    match g {
        Given::File(bytes, opt) => {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            (opt.replace("{}", &p.display().to_string()), None)
        }
        Given::Pipe(bytes, opt) => {
            let fd = inheritable_pipe(bytes);
            (opt.replace("{}", &fd.as_raw_fd().to_string()), Some(fd))
        }
    }
}

fn start(bin: &str, dir: &Path, opt: &str, g: &Given, name: &str) -> Daemon {
    let (arg, _keep) = key_arg(dir, g, name);
    Daemon::start_bin(bin, dir, &[opt, &arg])
}

const HEX128: &[u8] = b"0x00112233445566778899aabbccddeeff\n";
const HEX256: &[u8] = b"00112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0\n";
const BIN256: &[u8] = b"0123456789abcdefghijklmnopqrstuv";
const PASS: &[u8] = b"correct horse battery staple\n";

#[test]
fn swtpm_encrypted_state_opens_in_vtpmd_and_back() {
    let cases = [
        (
            "hex key, swtpm's default mode (aes-128-cbc)",
            Given::File(HEX128, "file={}"),
        ),
        (
            "hex key, aes-256-cbc",
            Given::File(HEX256, "file={},mode=aes-256-cbc"),
        ),
        (
            "binary key",
            Given::File(BIN256, "file={},format=binary,mode=aes-256-cbc"),
        ),
        (
            "passphrase file, default kdf (pbkdf2) and mode",
            Given::File(PASS, "pwdfile={}"),
        ),
        (
            "passphrase file, kdf=sha512",
            Given::File(PASS, "pwdfile={},kdf=sha512,mode=aes-256-cbc"),
        ),
        (
            "passphrase on a pipe, as libvirt passes it",
            Given::Pipe(PASS, "pwdfd={},mode=aes-256-cbc"),
        ),
        (
            "key on a pipe",
            Given::Pipe(HEX256, "fd={},mode=aes-256-cbc"),
        ),
    ];
    assert_eq!(SECRET.len(), OTHER.len());
    for (what, given) in &cases {
        let t = state_dir();
        let public = provision(start("swtpm", t.path(), "--key", given, "k"));
        let f = flags(&permall(t.path()));
        assert_eq!(f & 0x01, 0x01, "{what}: swtpm did not encrypt");
        let raw = std::fs::read(permall(t.path())).unwrap();
        assert!(
            !raw.windows(16).any(|w| w == &SECRET[..16]),
            "{what}: plaintext on disk"
        );

        check_and_write(
            start(&VTPMD, t.path(), "--key", given, "k"),
            SECRET,
            &public,
            OTHER,
        );
        let slots = std::fs::read(t.path().join("state/vtpmd-00.permall")).unwrap();
        assert!(
            !slots.windows(8).any(|w| w == b"VTPMSEAL"),
            "{what}: vtpmd changed the encryption format"
        );
        assert!(
            !slots.windows(16).any(|w| w == &OTHER[..16]),
            "{what}: plaintext in vtpmd's files"
        );

        // Back to swtpm's files with the same key (docs/STORAGE.md).
        let (arg, _keep) = key_arg(t.path(), given, "k-export");
        let out = std::process::Command::new(&*VTPMD)
            .args(["swtpm-export", "--tpmstate"])
            .arg(format!("dir={}", t.path().join("state").display()))
            .args(["--key", &arg])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {out:?}");
        assert_eq!(
            flags(&permall(t.path())) & 0x09,
            f & 0x09,
            "{what}: same encryption flags"
        );

        // swtpm opens what vtpmd wrote.
        check_and_write(
            start("swtpm", t.path(), "--key", given, "k"),
            OTHER,
            &public,
            SECRET,
        );
        eprintln!("{what}: swtpm -> vtpmd -> swtpm, NV and persistent key intact");
    }
}

#[test]
fn wrong_key_truncated_or_garbled_files_are_refused_untouched() {
    let t = state_dir();
    let given = Given::File(PASS, "pwdfile={},mode=aes-256-cbc");
    let public = provision(start("swtpm", t.path(), "--key", &given, "k"));
    let good = std::fs::read(permall(t.path())).unwrap();
    let (right, _) = key_arg(t.path(), &given, "k");
    let wrong = Given::File(b"not the passphrase\n", "pwdfile={},mode=aes-256-cbc");
    let (wrong, _) = key_arg(t.path(), &wrong, "wrong");

    let e = vtpmd_fails(t.path(), &["--key", &wrong]);
    assert!(e.contains("authentication failed: wrong key"), "{e}");
    assert!(e.contains("tpm2-00.permall"), "names the file: {e}");
    let e = vtpmd_fails(t.path(), &["--key", &right.replace("aes-256", "aes-128")]);
    assert!(
        e.contains("256-bit key but the key given is 128 bits"),
        "{e}"
    );
    let e = vtpmd_fails(t.path(), &[]);
    assert!(e.contains("is encrypted, but no --key was given"), "{e}");
    assert_eq!(
        std::fs::read(permall(t.path())).unwrap(),
        good,
        "a refusal changed the file"
    );

    let mut garbled_ct = good.clone();
    garbled_ct[20] ^= 0x40;
    let mut wrong_size_flag = good.clone();
    wrong_size_flag[5] &= !0x08;
    let damaged: Vec<(&str, Vec<u8>, &str)> = vec![
        ("header only", good[..10].to_vec(), "length field"),
        (
            "cut inside a TLV",
            good[..good.len() / 2].to_vec(),
            "length field",
        ),
        (
            "one byte short, length fixed",
            {
                let mut b = good[..good.len() - 1].to_vec();
                let n = (b.len() as u32).to_be_bytes();
                b[6..10].copy_from_slice(&n);
                b
            },
            "TLV",
        ),
        ("ciphertext garbled", garbled_ct, "authentication failed"),
        (
            "256-bit flag cleared",
            wrong_size_flag,
            "128-bit key but the key given is 256 bits",
        ),
        ("garbage", vec![0x5a; 300], "state file"),
    ];
    for (what, bytes, want) in damaged {
        std::fs::write(permall(t.path()), &bytes).unwrap();
        let e = vtpmd_fails(t.path(), &["--key", &right]);
        assert!(e.contains(want), "{what}: {e}");
        assert!(e.contains("refusing to start a blank TPM"), "{what}: {e}");
        assert_eq!(
            std::fs::read(permall(t.path())).unwrap(),
            bytes,
            "{what}: file changed"
        );
    }
    std::fs::write(permall(t.path()), &good).unwrap();
    check_and_write(
        start(&VTPMD, t.path(), "--key", &given, "k"),
        SECRET,
        &public,
        SECRET,
    );
}

/// QEMU's pre_save on the source, post_load on the destination.
fn migrate(src: Daemon, dst: &Daemon) -> (Vec<blobs::StateBlob>, u32) {
    let (mut c, _s) = session(&src);
    let got = blobs::get_blobs(&mut c.s);
    let mut dc = Ctrl::connect(&dst.ctrl);
    let r = blobs::put_blobs(&mut dc.s, &got);
    drop(src);
    (got, r)
}

#[test]
fn migration_key_blobs_move_between_swtpm_and_vtpmd() {
    let mk = Given::File(PASS, "pwdfile={},mode=aes-256-cbc");
    for (from, to) in [("swtpm", VTPMD.as_str()), (VTPMD.as_str(), "swtpm")] {
        let a = state_dir();
        let b = state_dir();
        let public = provision(Daemon::start_bin(from, a.path(), &[]));
        let src = start(from, a.path(), "--migration-key", &mk, "mk");
        let dst = start(to, b.path(), "--migration-key", &mk, "mk");
        let (got, r) = migrate(src, &dst);
        for blob in &got[..2] {
            assert_eq!(blob.result, 0, "{from}: GET_STATEBLOB {}", blob.blob_type);
            let f = u16::from_be_bytes([blob.data[4], blob.data[5]]);
            assert_eq!(
                f,
                0x04 | 0x02 | 0x10,
                "{from}: migration data, encrypted, 256-bit key"
            );
        }
        assert_eq!(r, 0, "{from} -> {to}: SET_STATEBLOB/INIT");
        drop(dst);
        check_and_write(
            Daemon::start_bin(to, b.path(), &[]),
            SECRET,
            &public,
            SECRET,
        );
        eprintln!("{from} -> {to} with a shared migration key: state intact");
    }
}

#[test]
fn missing_or_wrong_migration_key_is_refused_as_swtpm_does() {
    let mk = Given::File(PASS, "pwdfile={},mode=aes-256-cbc");
    let other = Given::File(b"other\n", "pwdfile={},mode=aes-256-cbc");
    let a = state_dir();
    provision(Daemon::start_bin("swtpm", a.path(), &[]));
    let src = start("swtpm", a.path(), "--migration-key", &mk, "mk");
    let (mut c, _s) = session(&src);
    let got = blobs::get_blobs(&mut c.s);
    for bin in ["swtpm", VTPMD.as_str()] {
        let b = state_dir();
        let none = Daemon::start_bin(bin, b.path(), &[]);
        let r_none = blobs::put_blobs(&mut Ctrl::connect(&none.ctrl).s, &got);
        drop(none);
        let wrong = start(bin, b.path(), "--migration-key", &other, "mk");
        let r_wrong = blobs::put_blobs(&mut Ctrl::connect(&wrong.ctrl).s, &got);
        assert_eq!(
            (r_none, r_wrong),
            (0x0d, 0x21),
            "{bin}: KEYNOTFOUND, DECRYPT_ERROR"
        );
        drop(wrong);
        assert!(
            !permall(b.path()).exists(),
            "{bin}: a refused blob was stored"
        );
    }
}

#[test]
fn remove_deletes_the_key_file_once_read_as_swtpm_does() {
    for bin in ["swtpm", VTPMD.as_str()] {
        let t = state_dir();
        let pw = t.path().join("pw");
        std::fs::write(&pw, PASS).unwrap();
        let arg = format!("pwdfile={},remove", pw.display());
        let d = Daemon::start_bin(bin, t.path(), &["--key", &arg]);
        // swtpm reads its key after it bound the control socket: give it
        // a moment (vtpmd reads it before).
        let t0 = std::time::Instant::now();
        while pw.exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!pw.exists(), "{bin} left the passphrase file");
        provision(d);
        let raw = std::fs::read(permall(t.path())).unwrap();
        let encrypted = raw.starts_with(b"VTPMSEAL") || flags(&permall(t.path())) & 0x01 != 0;
        assert!(encrypted, "{bin}: state not encrypted");
    }
}
