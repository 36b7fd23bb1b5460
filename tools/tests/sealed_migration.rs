//! Sealed migration between two real vtpmd processes, driven like QEMU on the
//! control sockets and like an administrator through vtpmctl, plus the
//! attack matrix: every tampered, dropped, spliced, replayed, misdirected or
//! plaintext stream must fail closed.

use common::*;
use vtpm_test_support as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const VTPMCTL: &str = env!("CARGO_BIN_EXE_vtpmctl");
const NV: u32 = 0x0150_0040;
const PCR: u32 = 16;

fn ctl(args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(VTPMCTL)
        .args(args)
        .output()
        .expect("run vtpmctl");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("vtpmctl printed non-JSON: {:?}", out));
    (out.status.success(), v)
}

/// Two host keys made once with `vtpmctl keygen`.
fn host_keys() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static K: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    K.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        for h in ["a", "b"] {
            let (ok, v) = ctl(&["keygen", "--out", t.path().join(h).to_str().unwrap()]);
            assert!(ok, "{v}");
        }
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        (t, a, b)
    })
}

struct Node {
    _t: tempfile::TempDir,
    d: Daemon,
    admin: PathBuf,
}

fn node(key: &Path, incoming: bool) -> Node {
    let t = state_dir();
    let admin = t.path().join("admin.sock");
    let mut args = vec![
        "--host-key".to_string(),
        key.join("host-key.pem").display().to_string(),
        "--admin".to_string(),
        format!("path={}", admin.display()),
    ];
    if incoming {
        args.extend(["--migration".to_string(), "incoming".to_string()]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(t.path(), &a);
    Node { _t: t, d, admin }
}

impl Node {
    fn admin(&self) -> &str {
        self.admin.to_str().unwrap()
    }
    fn state(&self) -> String {
        ctl(&["status", "--admin", self.admin()]).1["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }
}

/// Fetches the three blobs as QEMU's pre_save does.
fn get_blobs(c: &mut Ctrl) -> Vec<(u32, Vec<u8>)> {
    common::blobs::get_blobs(&mut c.s)
        .into_iter()
        .map(|b| {
            assert_eq!(b.result, 0, "GET_STATEBLOB {}", b.blob_type);
            assert!(
                !b.data.is_empty(),
                "blob {} must never be empty",
                b.blob_type
            );
            (b.blob_type, b.data)
        })
        .collect()
}

/// QEMU's post_load on a destination (see `blobs::put_blobs`).
fn put_blobs(c: &mut Ctrl, blobs: &[(u32, Vec<u8>)]) -> u32 {
    let blobs: Vec<common::blobs::StateBlob> = blobs
        .iter()
        .map(|(t, d)| common::blobs::StateBlob {
            blob_type: *t,
            flags: 0,
            result: 0,
            data: d.clone(),
        })
        .collect();
    common::blobs::put_blobs(&mut c.s, &blobs)
}

/// A running source TPM with NV and PCR contents; returns the PCR value.
fn running_source(src: &Node) -> (Ctrl, std::os::unix::net::UnixStream, [u8; 32]) {
    let mut c = Ctrl::connect(&src.d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_define(NV, 8))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_write(NV, b"sealed!!"))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::pcr_extend(PCR, &[0x42; 32]))), 0);
    let pcr = cmd::pcr_value(&tpm(&mut data, &cmd::pcr_read(PCR)));
    (c, data, pcr)
}

/// `vtpmctl outgoing` on `src` with the migration id issued by `id_from`
/// and the public key of `key_of` (the same node, unless a test mixes them).
/// Returns what `outgoing` printed.
fn prepare(src: &Node, id_from: &Node, key_of: &Node) -> serde_json::Value {
    let (ok, info) = ctl(&["incoming-info", "--admin", id_from.admin()]);
    assert!(ok, "{info}");
    let key_info = if std::ptr::eq(id_from, key_of) {
        info.clone()
    } else {
        let (ok, k) = ctl(&["incoming-info", "--admin", key_of.admin()]);
        assert!(ok, "{k}");
        k
    };
    let peer = key_of._t.path().join("peer.pem");
    std::fs::write(&peer, key_info["public_key"].as_str().unwrap()).unwrap();
    let id = info["migration_id"].as_str().unwrap();
    let (ok, v) = ctl(&[
        "outgoing",
        "--admin",
        src.admin(),
        "--peer-key",
        peer.to_str().unwrap(),
        "--migration-id",
        id,
    ]);
    assert!(ok, "{v}");
    v
}

/// Destination issues an id, the source prepares for it and exports.
fn export_to(src: &Node, dst: &Node, c: &mut Ctrl) -> Vec<(u32, Vec<u8>)> {
    let _ = prepare(src, dst, dst);
    let blobs = get_blobs(c);
    assert_eq!(src.state(), "exported");
    blobs
}

/// The destination refused: INIT failed, TPM commands refused, still locked.
fn assert_dest_refuses(dst: &Node, init_rc: u32, what: &str) {
    assert_ne!(init_rc, 0, "{what}: destination accepted the stream");
    assert_eq!(dst.state(), "destination-locked", "{what}");
    let mut c = Ctrl::connect(&dst.d.ctrl);
    let (_, mut data) = c.set_datafd();
    let r = tpm(&mut data, &cmd::get_random(8));
    assert_ne!(rc(&r), 0, "{what}: destination served a TPM command");
}

/// The source resumes (QEMU's LOCK_STORAGE on `cont`) with its TPM intact.
fn assert_source_resumes(
    src: &Node,
    c: &mut Ctrl,
    data: &mut std::os::unix::net::UnixStream,
    pcr: &[u8; 32],
) {
    assert_eq!(c.result(0x13, &300u32.to_be_bytes()), 0);
    assert_eq!(src.state(), "running");
    assert_eq!(&cmd::pcr_value(&tpm(data, &cmd::pcr_read(PCR))), pcr);
    assert_eq!(cmd::nv_data(&tpm(data, &cmd::nv_read(NV, 8))), b"sealed!!");
}

#[test]
fn sealed_migration_end_to_end_with_receipt_and_tombstone() {
    let (_, ka, kb) = host_keys();
    let src = node(ka, false);
    let dst = node(kb, true);
    assert_eq!(dst.state(), "destination-locked");
    let (mut c, mut data, pcr) = running_source(&src);
    // The destination unwraps the keys before the VM stops (vtpmctl
    // incoming-key with what outgoing printed).
    let (ok, v) = ctl(&[
        "incoming-key",
        "--admin",
        dst.admin(),
        "--wrapped-key",
        "00",
    ]);
    assert!(!ok, "incoming-key before any id was issued: {v}");
    let out = prepare(&src, &dst, &dst);
    let wrapped = out["wrapped_key"]
        .as_str()
        .expect("outgoing prints wrapped_key");
    for bad in ["not hex", "00ff", &"ab".repeat(384)] {
        let (ok, v) = ctl(&["incoming-key", "--admin", dst.admin(), "--wrapped-key", bad]);
        assert!(!ok && v["error"].is_string(), "incoming-key {bad}: {v}");
    }
    let (ok, v) = ctl(&[
        "incoming-key",
        "--admin",
        dst.admin(),
        "--wrapped-key",
        wrapped,
    ]);
    assert!(ok, "{v}");
    let blobs = get_blobs(&mut c);
    assert_eq!(src.state(), "exported");
    // Locked source: no TPM command runs, nothing is written.
    assert_ne!(rc(&tpm(&mut data, &cmd::get_random(8))), 0);
    // Nothing in the stream is plaintext NV.
    assert!(blobs
        .iter()
        .all(|(_, b)| !b.windows(8).any(|w| w == b"sealed!!")));

    let mut cd = Ctrl::connect(&dst.d.ctrl);
    let (_, mut ddata) = cd.set_datafd();
    assert_eq!(put_blobs(&mut cd, &blobs), 0, "INIT on the destination");
    assert_eq!(dst.state(), "running");
    assert!(
        dst.d.log_text().contains("unwrapped ahead of time"),
        "the preloaded keys were not used: {}",
        dst.d.log_text()
    );
    assert_eq!(cmd::pcr_value(&tpm(&mut ddata, &cmd::pcr_read(PCR))), pcr);
    assert_eq!(
        cmd::nv_data(&tpm(&mut ddata, &cmd::nv_read(NV, 8))),
        b"sealed!!"
    );

    let receipt = dst._t.path().join("receipt.json");
    let (ok, r) = ctl(&[
        "receipt",
        "--admin",
        dst.admin(),
        "--out",
        receipt.to_str().unwrap(),
    ]);
    assert!(ok, "{r}");
    let (ok, t) = ctl(&[
        "complete",
        "--admin",
        src.admin(),
        "--receipt",
        receipt.to_str().unwrap(),
    ]);
    assert!(ok, "{t}");
    assert_eq!(src.state(), "migrated-out");
    let sdir = src._t.path().join("state");
    let left: Vec<String> = std::fs::read_dir(&sdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        left.iter()
            .all(|n| n == "vtpmd-tombstone.json" || n == ".lock" || n == "tpm2-00.permall"),
        "{left:?}"
    );
    // Restarting on the tombstoned directory fails with a clear message.
    let Node { _t: keep, d, .. } = src;
    drop(d);
    let out = Command::new(&*VTPMD)
        .args([
            "socket",
            "--tpm2",
            "--ctrl",
            "type=unixio,path=/tmp/never.sock",
            "--tpmstate",
        ])
        .arg(format!("dir={}", sdir.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("migrated away"),
        "{out:?}"
    );
    // swtpm started there does not make a blank TPM either: the stub at
    // its file name fails its INIT.
    let s = Daemon::start_bin("swtpm", keep.path(), &[]);
    let mut c = Ctrl::connect(&s.ctrl);
    assert_ne!(
        c.result(0x02, &[0, 0, 0, 0]),
        0,
        "swtpm started a blank TPM"
    );
    drop(c);
    drop(s);
    assert!(
        !sdir.join("vtpmd-00.permall").exists() && !sdir.join("tpm2-00.volatilestate").exists()
    );
    drop(keep);
}

#[test]
fn shutdown_after_export_holds_the_source_until_the_receipt() {
    let (_, ka, kb) = host_keys();
    let mut src = node(ka, false);
    let mut dst = node(kb, true);
    let (mut c, _data, pcr) = running_source(&src);
    let blobs = export_to(&src, &dst, &mut c);
    // QEMU quits on the source: vtpmd exits, the state stays, marked.
    assert_eq!(c.result(0x03, &[]), 0);
    assert!(src.d.wait_exit(std::time::Duration::from_secs(5)).is_some());
    let sdir = src._t.path().join("state");
    let sdir_s = sdir.to_str().unwrap();
    assert!(
        !sdir.join("vtpmd-tombstone.json").exists(),
        "no receipt yet"
    );
    assert!(sdir.join("vtpmd-00.permall").exists());
    let (ok, v) = ctl(&["status", "--state-dir", sdir_s]);
    assert!(
        ok && v["state"] == "awaiting-receipt" && v["exported"] == true,
        "{v}"
    );
    // A vtpmd started there holds the TPM and says how to resolve it.
    let restarted = Daemon::start(src._t.path(), &["--admin", "path=/tmp/never-admin.sock"]);
    let mut rc2 = Ctrl::connect(&restarted.ctrl);
    assert_ne!(rc2.result(0x02, &[0, 0, 0, 0]), 0, "INIT refused");
    assert!(
        restarted.log_text().contains("vtpmctl complete"),
        "{}",
        restarted.log_text()
    );
    // While it runs, the offline command refuses (the lock is held).
    let (ok, v) = ctl(&["abort", "--state-dir", sdir_s]);
    assert!(
        !ok && v["error"].as_str().unwrap().contains("in use"),
        "{v}"
    );
    drop(rc2);
    drop(restarted);
    // The destination takes the state; its receipt erases the source.
    let mut dc = Ctrl::connect(&dst.d.ctrl);
    let (_, mut ddata) = dc.set_datafd();
    assert_eq!(put_blobs(&mut dc, &blobs), 0);
    assert_eq!(&cmd::pcr_value(&tpm(&mut ddata, &cmd::pcr_read(PCR))), &pcr);
    let receipt = dst._t.path().join("receipt.json");
    let (ok, v) = ctl(&[
        "receipt",
        "--admin",
        dst.admin(),
        "--out",
        receipt.to_str().unwrap(),
    ]);
    assert!(ok, "{v}");
    let bad = dst._t.path().join("bad.json");
    let mut forged = v.clone();
    forged["digest"] = serde_json::json!("00".repeat(32));
    std::fs::write(&bad, forged.to_string()).unwrap();
    let (ok, v2) = ctl(&[
        "complete",
        "--state-dir",
        sdir_s,
        "--receipt",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !ok && v2["error"].as_str().unwrap().contains("receipt rejected"),
        "{v2}"
    );
    assert!(
        sdir.join("vtpmd-00.permall").exists(),
        "a bad receipt erases nothing"
    );
    let (ok, t) = ctl(&[
        "complete",
        "--state-dir",
        sdir_s,
        "--receipt",
        receipt.to_str().unwrap(),
    ]);
    assert!(ok, "{t}");
    assert_eq!(t["confirmed_by"], "receipt");
    assert!(sdir.join("vtpmd-tombstone.json").exists());
    assert!(!sdir.join("vtpmd-00.permall").exists());
    let (ok, v) = ctl(&["status", "--state-dir", sdir_s]);
    assert!(ok && v["state"] == "migrated-out", "{v}");
    dst.d.kill9();
    src.d.kill9();
}

#[test]
fn a_source_that_died_after_export_is_taken_back_by_offline_abort() {
    let (_, ka, kb) = host_keys();
    let mut src = node(ka, false);
    let dst = node(kb, true);
    let (mut c, _data, _) = running_source(&src);
    let _ = export_to(&src, &dst, &mut c);
    src.d.kill9();
    let sdir = src._t.path().join("state");
    let sdir_s = sdir.to_str().unwrap();
    let (ok, v) = ctl(&["status", "--state-dir", sdir_s]);
    assert!(ok && v["state"] == "awaiting-receipt", "{v}");
    let (ok, v) = ctl(&["abort", "--state-dir", sdir_s]);
    assert!(ok, "{v}");
    let (ok, v) = ctl(&["abort", "--state-dir", sdir_s]);
    assert!(
        !ok && v["error"]
            .as_str()
            .unwrap()
            .contains("no unresolved migration"),
        "{v}"
    );
    // The TPM runs again with its NV.
    let d = Daemon::start(src._t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(
        cmd::nv_data(&tpm(&mut data, &cmd::nv_read(NV, 8))),
        b"sealed!!"
    );
}

#[test]
fn attack_matrix_fails_closed() {
    let (_, ka, kb) = host_keys();
    let src = node(ka, false);
    let (mut c, mut data, pcr) = running_source(&src);

    type Tamper = fn(&mut Vec<(u32, Vec<u8>)>, &[(u32, Vec<u8>)]);
    let cases: Vec<(&str, Tamper)> = vec![
        ("byte flipped in permanent", |b, _| b[0].1[200] ^= 1),
        ("byte flipped in volatile", |b, _| {
            let n = b[1].1.len();
            b[1].1[n / 2] ^= 1
        }),
        ("byte flipped in final", |b, _| {
            let n = b[2].1.len();
            b[2].1[n - 40] ^= 1
        }),
        ("volatile dropped", |b, _| b[1].1.clear()),
        ("final dropped", |b, _| b[2].1.clear()),
        ("volatile spliced from another migration", |b, other| {
            b[1] = other[1].clone()
        }),
        ("plaintext blobs", |b, _| {
            for (_, blob) in b.iter_mut() {
                *blob = vtpmd::storage::blob::encode_migration(&[0u8; 64]);
            }
        }),
    ];
    // An earlier migration of the same VM, for splicing.
    let other_dst = node(kb, true);
    let other = export_to(&src, &other_dst, &mut c);
    assert_source_resumes(&src, &mut c, &mut data, &pcr);

    for (what, tamper) in cases {
        let dst = node(kb, true);
        let mut blobs = export_to(&src, &dst, &mut c);
        tamper(&mut blobs, &other);
        let mut cd = Ctrl::connect(&dst.d.ctrl);
        let r = put_blobs(&mut cd, &blobs);
        assert_dest_refuses(&dst, r, what);
        assert_source_resumes(&src, &mut c, &mut data, &pcr);
    }

    // The same stream into a second destination, and twice into one.
    let dst = node(kb, true);
    let blobs = export_to(&src, &dst, &mut c);
    let second = node(kb, true);
    let _ = ctl(&["incoming-info", "--admin", second.admin()]);
    let mut c2 = Ctrl::connect(&second.d.ctrl);
    let r = put_blobs(&mut c2, &blobs);
    assert_dest_refuses(&second, r, "stream loaded into a second destination");
    let mut cd = Ctrl::connect(&dst.d.ctrl);
    assert_eq!(
        put_blobs(&mut cd, &blobs),
        0,
        "the genuine destination still accepts it"
    );
    let r = put_blobs(&mut cd, &blobs);
    assert_ne!(r, 0, "the same stream loaded twice");

    // Wrapped for another host's key: the destination holds key A, the
    // source wrapped to B.
    assert_source_resumes(&src, &mut c, &mut data, &pcr);
    let wrong = node(ka, true);
    let genuine = node(kb, true);
    prepare(&src, &wrong, &genuine);
    let blobs = get_blobs(&mut c);
    let mut cw = Ctrl::connect(&wrong.d.ctrl);
    let r = put_blobs(&mut cw, &blobs);
    assert_dest_refuses(&wrong, r, "blobs wrapped for another host's key");
    assert_source_resumes(&src, &mut c, &mut data, &pcr);
}

#[test]
fn admin_socket_and_cli_bad_input() {
    let (_, ka, _) = host_keys();
    let src = node(ka, false);
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(&src.admin).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for bad in [
        "not json",
        "{}",
        "{\"op\": 5}",
        "{\"op\": \"explode\"}",
        "{\"op\": \"outgoing\"}",
        "[1,2]",
    ] {
        (&s).write_all(format!("{bad}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad} -> {line}");
        assert!(v["error"].as_str().unwrap().len() > 5);
    }
    // Oversized request: refused, connection closed, daemon keeps serving.
    // The daemon may answer and close before the whole line is written:
    // the rest of the write then fails with EPIPE, which is fine.
    let big = "x".repeat(70_000);
    let _ = (&s).write_all(big.as_bytes());
    let _ = (&s).write_all(b"\n");
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
    assert_eq!(src.state(), "running");
    let peer = src._t.path().join("junk.pem");
    std::fs::write(
        &peer,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let (ok, v) = ctl(&[
        "outgoing",
        "--admin",
        src.admin(),
        "--peer-key",
        peer.to_str().unwrap(),
        "--migration-id",
        "00",
    ]);
    assert!(!ok && v["error"].is_string(), "{v}");
    let (ok, v) = ctl(&["incoming-info", "--admin", src.admin()]);
    assert!(!ok, "a source issues no ids: {v}");
    let (ok, v) = ctl(&[
        "incoming-key",
        "--admin",
        src.admin(),
        "--wrapped-key",
        "00",
    ]);
    assert!(!ok, "a source takes no keys: {v}");
    let (ok, v) = ctl(&["status", "--admin", "/nonexistent.sock"]);
    assert!(
        !ok && v["error"].as_str().unwrap().contains("cannot reach"),
        "{v}"
    );
    assert_eq!(src.state(), "running");
}

#[test]
fn trusted_peers_limit_whom_the_source_wraps_to() {
    let (_, ka, kb) = host_keys();
    let t = state_dir();
    let trusted = t.path().join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    std::fs::copy(ka.join("host-key.pub.pem"), trusted.join("a.pem")).unwrap();
    let admin = t.path().join("admin.sock");
    let d = Daemon::start(
        t.path(),
        &[
            "--host-key",
            ka.join("host-key.pem").to_str().unwrap(),
            "--trusted-peers",
            trusted.to_str().unwrap(),
            "--admin",
            &format!("path={}", admin.display()),
        ],
    );
    let peer = kb.join("host-key.pub.pem");
    let id = "11".repeat(32);
    let args = [
        "outgoing",
        "--admin",
        admin.to_str().unwrap(),
        "--peer-key",
        peer.to_str().unwrap(),
        "--migration-id",
        &id,
    ];
    let (ok, v) = ctl(&args);
    assert!(
        !ok && v["error"]
            .as_str()
            .unwrap()
            .contains("not in the trusted peers"),
        "{v}"
    );
    std::fs::copy(&peer, trusted.join("b.pem")).unwrap();
    let (ok, v) = ctl(&args);
    assert!(ok, "{v}");
    assert_eq!(v["state"], "prepared");
    drop(d);
}
