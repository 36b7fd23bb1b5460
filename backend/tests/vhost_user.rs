//! `vtpmd vhost-user` driven by a test VMM built on the `vhost` crate's
//! frontend: real vtpmd processes, a memfd-backed guest memory table, a
//! split virtqueue, kick and call eventfds, and real TPM 2.0 commands.

use vtpm_common::admin::{self, IncomingInfo, Prepared, Receipt, Request, Status, Tombstone};
use vtpm_test_support as common;
use vtpm_test_support::vmm;

use common::{cmd, state_dir, Daemon};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use vmm::{readable, writable, TestVmm, CMD_BUF, RSP_BUF};

const RC_SUCCESS: u32 = 0;
const RC_INITIALIZE: u32 = 0x100;
const RC_FAILURE: u32 = 0x101;
const RC_COMMAND_SIZE: u32 = 0x142;
const NV_INDEX: u32 = 0x0150_0020;

fn ok(rsp: &[u8], what: &str) {
    assert!(rsp.len() >= 10, "{what}: short response {rsp:?}");
    assert_eq!(
        cmd::rc(rsp),
        RC_SUCCESS,
        "{what}: TPM rc {:#x}",
        cmd::rc(rsp)
    );
}

fn extended(old: [u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

fn pcr16(v: &mut TestVmm) -> [u8; 32] {
    let rsp = v.tpm(&cmd::pcr_read(16));
    ok(&rsp, "PCR_Read");
    cmd::pcr_value(&rsp)
}

/// Startup, an extend of PCR 16 and an NV index holding `secret`.
fn provision(v: &mut TestVmm, secret: &[u8]) -> [u8; 32] {
    ok(&v.tpm(&cmd::startup_clear()), "Startup");
    let before = pcr16(v);
    let digest = [0x5a; 32];
    ok(&v.tpm(&cmd::pcr_extend(16, &digest)), "PCR_Extend");
    let after = pcr16(v);
    assert_eq!(after, extended(before, &digest), "PCR 16 after one extend");
    ok(
        &v.tpm(&cmd::nv_define(NV_INDEX, secret.len() as u16)),
        "NV_DefineSpace",
    );
    ok(&v.tpm(&cmd::nv_write(NV_INDEX, secret)), "NV_Write");
    after
}

fn nv_secret(v: &mut TestVmm, len: usize) -> Vec<u8> {
    let rsp = v.tpm(&cmd::nv_read(NV_INDEX, len as u16));
    ok(&rsp, "NV_Read");
    cmd::nv_data(&rsp)
}

#[test]
fn tpm_commands_through_the_virtqueue() {
    let t = state_dir();
    let d = Daemon::start_vhost_user(t.path(), &[]);
    let mut v = TestVmm::start(&d.ctrl);

    let rsp = v.tpm(&cmd::get_random(32));
    assert_eq!(cmd::rc(&rsp), RC_INITIALIZE, "a command before Startup");
    ok(&v.tpm(&cmd::startup_clear()), "Startup");

    let rsp = v.tpm(&cmd::get_random(32));
    ok(&rsp, "GetRandom");
    assert_eq!(rsp.len(), 10 + 2 + 32);
    assert_eq!(u16::from_be_bytes([rsp[10], rsp[11]]), 32);
    assert_ne!(v.tpm(&cmd::get_random(32)), rsp, "two random draws agree");

    let before = pcr16(&mut v);
    assert_eq!(before, [0; 32]);
    let digest: [u8; 32] = Sha256::digest(b"vhost-user").into();
    ok(&v.tpm(&cmd::pcr_extend(16, &digest)), "PCR_Extend");
    assert_eq!(pcr16(&mut v), extended(before, &digest));

    let rsp = v.tpm(&cmd::create_primary("ecc", 1));
    ok(&rsp, "CreatePrimary ECC");
    let handle = cmd::handle(&rsp);
    assert_eq!(handle >> 24, 0x80, "transient handle {handle:#x}");
    ok(&v.tpm(&cmd::flush(handle)), "FlushContext");

    ok(&v.tpm(&cmd::nv_define(NV_INDEX, 32)), "NV_DefineSpace");
    let secret = [0xc3u8; 32];
    ok(&v.tpm(&cmd::nv_write(NV_INDEX, &secret)), "NV_Write");
    assert_eq!(nv_secret(&mut v, 32), secret);
}

/// Starts `vtpmd vhost-user --fd N` on a listening socket created here and
/// inherited by the child, as a parent process (libvirt) would.
fn start_vhost_user_fd(dir: &Path) -> Daemon {
    use std::os::fd::AsRawFd;
    let sock = dir.join("vhost-fd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let args = ["vhost-user".to_string(), "--fd".into(), fd.to_string()];
    let d = Daemon::spawn(&common::VTPMD, dir, sock, &args);
    // The child has its copy; this process's is closed here.
    drop(listener);
    d
}

#[test]
fn inherited_listening_socket() {
    let t = state_dir();
    let mut d = start_vhost_user_fd(t.path());
    let mut v = TestVmm::start(&d.ctrl);
    ok(
        &v.tpm(&cmd::startup_clear()),
        "Startup over an inherited socket",
    );
    ok(&v.tpm(&cmd::get_random(16)), "GetRandom");
    drop(v);
    assert!(d.alive());
    // Not a listening socket: refused with a clear error at start-up.
    std::fs::create_dir(t.path().join("other")).unwrap();
    let out = std::process::Command::new(&*common::VTPMD)
        .args(["vhost-user", "--fd", "0", "--tpmstate"])
        .arg(format!("dir={}", t.path().join("other").display()))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--fd") && err.contains("fd 0"), "{err}");
}

#[test]
fn malformed_chains_get_a_defined_result_and_the_queue_goes_on() {
    let t = state_dir();
    let mut d = Daemon::start_vhost_user(t.path(), &[]);
    let mut v = TestVmm::start(&d.ctrl);
    ok(&v.tpm(&cmd::startup_clear()), "Startup");
    let random = cmd::get_random(32);
    v.mem_write(CMD_BUF, &random);

    let cases: Vec<(&str, Vec<vmm::Desc>)> = vec![
        (
            "no writable descriptor",
            vec![readable(CMD_BUF, random.len())],
        ),
        (
            "writable buffer smaller than the response",
            vec![readable(CMD_BUF, random.len()), writable(RSP_BUF, 20)],
        ),
        (
            "writable before readable",
            vec![writable(RSP_BUF, 4096), readable(CMD_BUF, random.len())],
        ),
        (
            "buffer outside guest memory",
            vec![readable(CMD_BUF, random.len()), writable(0x7fff_0000, 4096)],
        ),
        (
            "only 4 writable bytes",
            vec![readable(CMD_BUF, random.len()), writable(RSP_BUF, 4)],
        ),
    ];
    for (what, descs) in cases {
        let (len, _) = v.request(&descs);
        assert_eq!(len, 0, "{what}: used length");
        let rsp = v.tpm(&random);
        ok(&rsp, &format!("GetRandom after '{what}'"));
    }

    // A command over 4096 bytes (its header says so too).
    let mut big = vec![0u8; 5000];
    big[..10].copy_from_slice(&cmd::get_random(32)[..10]);
    big[2..6].copy_from_slice(&5000u32.to_be_bytes());
    v.mem_write(CMD_BUF, &big);
    let (len, rsp) = v.request(&[readable(CMD_BUF, big.len()), writable(RSP_BUF, 4096)]);
    assert_eq!(len, 10);
    assert_eq!(cmd::rc(&rsp), RC_COMMAND_SIZE, "oversized command");

    // Garbage: a size field that disagrees with the bytes sent, bytes that
    // are no command at all, a command cut short, an empty command.
    let cut = &cmd::pcr_extend(16, &[1; 32])[..20];
    for (what, bytes) in [
        ("size field disagrees", vec![0xffu8; 64]),
        ("truncated command", cut.to_vec()),
        ("nine bytes", vec![0x80, 1, 0, 0, 0, 9, 0, 0, 1]),
    ] {
        v.mem_write(CMD_BUF, &bytes);
        let (len, rsp) = v.request(&[readable(CMD_BUF, bytes.len()), writable(RSP_BUF, 4096)]);
        assert_eq!(len, 10, "{what}");
        assert_eq!(cmd::rc(&rsp), RC_COMMAND_SIZE, "{what}");
    }
    let (len, rsp) = v.request(&[writable(RSP_BUF, 4096)]);
    assert_eq!((len, cmd::rc(&rsp)), (10, RC_COMMAND_SIZE), "empty command");
    // Well framed but not a TPM command: the TPM answers with an error.
    let mut junk = vec![0x12u8, 0x34, 0, 0, 0, 16, 0xde, 0xad, 0xbe, 0xef];
    junk.extend_from_slice(&[0xab; 6]);
    v.mem_write(CMD_BUF, &junk);
    let (len, rsp) = v.request(&[readable(CMD_BUF, junk.len()), writable(RSP_BUF, 4096)]);
    assert!(len >= 10);
    assert_ne!(cmd::rc(&rsp), RC_SUCCESS, "junk command");

    // The command split over three readable descriptors and the response
    // over two writable ones is a well-formed request.
    let ext = cmd::pcr_extend(16, &[7; 32]);
    v.mem_write(CMD_BUF, &ext[..5]);
    v.mem_write(CMD_BUF + 0x100, &ext[5..30]);
    v.mem_write(CMD_BUF + 0x200, &ext[30..]);
    let (len, rsp) = v.request(&[
        readable(CMD_BUF, 5),
        readable(CMD_BUF + 0x100, 25),
        readable(CMD_BUF + 0x200, ext.len() - 30),
        writable(RSP_BUF, 4),
        writable(RSP_BUF + 4, 4092),
    ]);
    assert!(len >= 10);
    ok(&rsp, "PCR_Extend over scattered descriptors");
    ok(&v.tpm(&random), "GetRandom at the end");
    assert!(d.alive(), "vtpmd died: {}", d.log_text());
    assert!(d.log_text().contains("writable"), "errors are logged");
}

#[test]
fn garbage_on_the_vhost_user_socket_drops_only_that_connection() {
    let t = state_dir();
    let mut d = Daemon::start_vhost_user(t.path(), &[]);
    let mut v = TestVmm::start(&d.ctrl);
    let value = provision(&mut v, b"survives bad frontends");
    drop(v);
    // Garbage, a header announcing an oversized message, a truncated
    // header, and an unknown request code.
    let unknown = [0xffu8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let mut huge = vec![1u8, 0, 0, 0, 1, 0, 0, 0];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    for bytes in [
        &[0xa5u8; 300][..],
        &huge[..],
        &[1u8, 0, 0][..],
        &unknown[..],
    ] {
        let mut s = UnixStream::connect(&d.ctrl).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    }
    assert!(d.alive(), "vtpmd died: {}", d.log_text());
    let mut v = TestVmm::start(&d.ctrl);
    assert_eq!(pcr16(&mut v), value);
    assert_eq!(nv_secret(&mut v, 22), b"survives bad frontends");
}

#[test]
fn reconnect_keeps_the_tpm_state() {
    let t = state_dir();
    let mut d = Daemon::start_vhost_user(t.path(), &[]);
    let mut v = TestVmm::start(&d.ctrl);
    let value = provision(&mut v, b"kept across frontends");
    drop(v);
    for round in 0..2 {
        // The second frontend negotiates EVENT_IDX.
        let mut v = TestVmm::connect_with(&d.ctrl, false, round == 1);
        v.start_ring();
        assert_eq!(pcr16(&mut v), value, "PCR 16 after reconnect {round}");
        assert_eq!(nv_secret(&mut v, 21), b"kept across frontends");
    }
    assert!(d.alive());

    // A device reset is the guest rebooting: the TPM is power-cycled and
    // needs TPM2_Startup again, which clears PCR 16; NV stays.
    let mut v = TestVmm::connect(&d.ctrl, true);
    v.start_ring();
    v.reset_device();
    v.start_ring_after_reset();
    assert_eq!(cmd::rc(&v.tpm(&cmd::pcr_read(16))), RC_INITIALIZE);
    ok(&v.tpm(&cmd::startup_clear()), "Startup after reset");
    assert_eq!(pcr16(&mut v), [0; 32]);
    assert_eq!(nv_secret(&mut v, 21), b"kept across frontends");
    drop(v);

    // SIGTERM: a clean stop with the state flushed, socket removed.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = d
        .wait_exit(Duration::from_secs(10))
        .expect("exit on SIGTERM");
    assert!(st.success(), "{st}");
    assert!(!d.ctrl.exists(), "socket left behind");
    let d = Daemon::start_vhost_user(t.path(), &[]);
    let mut v = TestVmm::start(&d.ctrl);
    ok(&v.tpm(&cmd::startup_clear()), "Startup after restart");
    assert_eq!(nv_secret(&mut v, 21), b"kept across frontends");
}

/// A host key in `dir` (as `vtpmctl keygen` writes it).
fn host_key(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    vtpm_common::hostkey::HostKey::generate()
        .unwrap()
        .save(dir)
        .unwrap();
    dir.join("host-key.pem").display().to_string()
}

/// Prepares `src` to migrate to `dst`; returns the migration id.
fn prepare(src: &Path, dst: &Path) -> String {
    let info: IncomingInfo = admin::call(dst, &Request::IncomingInfo).unwrap();
    let _: Prepared = admin::call(
        src,
        &Request::Outgoing {
            peer_key: info.public_key,
            migration_id: info.migration_id.clone(),
        },
    )
    .unwrap();
    info.migration_id
}

#[test]
fn sealed_device_state_migration_between_two_processes() {
    let (ts, td) = (state_dir(), state_dir());
    let (src_admin, dst_admin) = (ts.path().join("admin.sock"), td.path().join("admin.sock"));
    let src_key = host_key(&ts.path().join("keys"));
    let dst_key = host_key(&td.path().join("keys"));
    let mut src = Daemon::start_vhost_user(
        ts.path(),
        &[
            "--host-key",
            &src_key,
            "--admin",
            &format!("path={}", src_admin.display()),
        ],
    );
    let mut dst = Daemon::start_vhost_user(
        td.path(),
        &[
            "--host-key",
            &dst_key,
            "--admin",
            &format!("path={}", dst_admin.display()),
            "--migration",
            "incoming",
        ],
    );
    let secret = b"sealed device-state migration secret";
    let mut a = TestVmm::start(&src.ctrl);
    let value = provision(&mut a, secret);
    a.stop_ring();

    // Without a prepared migration a SAVE is a save sealed to the source's
    // own host key (the same device state a `virsh save` gets), not a
    // migration; the source keeps running.
    let (bytes, ok_) = a.save_state();
    assert!(ok_, "unprepared SAVE is a save sealed to this host");
    assert!(bytes.windows(8).any(|w| w == b"VTPMSAV1"));
    assert!(!bytes.windows(8).any(|w| w == b"VTPMMIG1"));
    assert!(!bytes.windows(secret.len()).any(|w| w == secret));
    a.resume_ring();
    assert_eq!(pcr16(&mut a), value, "source still serves after the SAVE");
    // The device LOADs its own save back (a restore on this host): the
    // TPM ran since, so it is a rollback, allowed by default and recorded.
    a.stop_ring();
    assert!(
        a.load_state(&bytes),
        "LOAD of its own save: {}",
        src.log_text()
    );
    a.resume_ring();
    assert_eq!(pcr16(&mut a), value, "restored from the save");
    let rec = vtpm_common::statedir::read_rollbacks(&ts.path().join("state")).unwrap();
    assert_eq!(rec.len(), 1, "the restore after the TPM ran is recorded");
    a.stop_ring();

    let _id = prepare(&src_admin, &dst_admin);
    let (stream, saved) = a.save_state();
    assert!(saved, "SAVE failed: {}", src.log_text());
    assert!(
        !stream.windows(secret.len()).any(|w| w == secret),
        "the NV secret travels in clear"
    );
    // The source is locked now: its TPM answers nothing.
    a.resume_ring();
    assert_eq!(cmd::rc(&a.tpm(&cmd::pcr_read(16))), RC_FAILURE);

    // A flipped byte: CHECK_DEVICE_STATE fails and the destination stays
    // locked.
    let mut b = TestVmm::connect(&dst.ctrl, false);
    let mut bad = stream.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    assert!(!b.load_state(&bad), "a tampered stream was accepted");
    b.start_ring();
    assert_eq!(cmd::rc(&b.tpm(&cmd::pcr_read(16))), RC_FAILURE);
    assert!(dst.log_text().contains("refused"), "{}", dst.log_text());
    // The untampered stream is bound to the failed attempt's id: refused.
    b.stop_ring();
    assert!(
        !b.load_state(&stream),
        "a stream for a spent id was accepted"
    );

    // The operator retries: a new id from the destination, the source
    // released and prepared again.
    let _: Status = admin::call(&src_admin, &Request::Abort).unwrap();
    let _id = prepare(&src_admin, &dst_admin);
    a.stop_ring();
    let (stream, saved) = a.save_state();
    assert!(saved, "second SAVE failed: {}", src.log_text());
    assert!(b.load_state(&stream), "LOAD failed: {}", dst.log_text());
    b.start_ring();
    assert_eq!(pcr16(&mut b), value, "PCR 16 after migration");
    assert_eq!(nv_secret(&mut b, secret.len()), secret);
    // The same stream again: refused (single-use id, destination running).
    drop(b);
    let mut c = TestVmm::connect(&dst.ctrl, false);
    assert!(!c.load_state(&stream), "replay accepted");
    drop(c);
    let mut b = TestVmm::start(&dst.ctrl);
    assert_eq!(pcr16(&mut b), value, "destination unharmed by the replay");

    // The destination's receipt lets the source erase its copy.
    let receipt: Receipt = admin::call(&dst_admin, &Request::Receipt).unwrap();
    let _: Tombstone = admin::call(&src_admin, &Request::Complete { receipt }).unwrap();
    let left: Vec<_> = std::fs::read_dir(ts.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".lock")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        left,
        ["tpm2-00.permall", "vtpmd-tombstone.json"],
        "tombstone and swtpm stub"
    );
    assert!(src.alive() && dst.alive());
}

#[test]
fn same_state_directory_lock_and_at_rest_encryption_as_the_socket_frontend() {
    let t = state_dir();
    let key = t.path().join("key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let keyarg = format!("file={}", key.display());
    let mut d = Daemon::start_vhost_user(t.path(), &["--key", &keyarg]);
    let secret = b"vhost-user secret kept encrypted on disk";
    let mut v = TestVmm::start(&d.ctrl);
    let value = provision(&mut v, secret);

    // While it runs, neither frontend may open the same state directory.
    for sub in ["socket", "vhost-user"] {
        let mut c = std::process::Command::new(&*common::VTPMD);
        c.arg(sub)
            .arg("--tpmstate")
            .arg(format!("dir={}", t.path().join("state").display()));
        if sub == "socket" {
            c.args(["--tpm2", "--ctrl"]).arg(format!(
                "type=unixio,path={}",
                t.path().join("c2").display()
            ));
        } else {
            c.arg("--socket-path").arg(t.path().join("v2"));
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "second {sub} instance started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lock"), "{sub}: {err}");
    }
    drop(v);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());

    let permall = std::fs::read(t.path().join("state/vtpmd-00.permall")).unwrap();
    assert!(
        permall.windows(8).any(|w| w == b"VTPMSEAL"),
        "state not sealed"
    );
    assert!(
        !permall.windows(16).any(|w| w == &secret[..16]),
        "plaintext NV on disk"
    );
    // The socket frontend opens what the vhost-user frontend wrote: one
    // state format.
    let d = Daemon::start(t.path(), &["--key", &keyarg]);
    let mut c = common::Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    ok(
        &common::tpm(&mut s, &cmd::startup_clear()),
        "Startup (socket frontend)",
    );
    let rsp = common::tpm(&mut s, &cmd::nv_read(NV_INDEX, secret.len() as u16));
    ok(&rsp, "NV_Read (socket frontend)");
    assert_eq!(cmd::nv_data(&rsp), secret);
    assert_ne!(
        cmd::pcr_value(&common::tpm(&mut s, &cmd::pcr_read(16))),
        value,
        "Startup(CLEAR) resets PCR 16"
    );
}
