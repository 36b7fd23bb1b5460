//! vtpmd driven over its real control socket the way QEMU drives it:
//! SET_DATAFD with a socketpair, start-up, reset, migration blobs, reconnect.

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use vtpm_test_support as common;

const PCR: u32 = 16;
const NV: u32 = 0x0150_0016;

fn extend_and_read(data: &mut std::os::unix::net::UnixStream, byte: u8) -> [u8; 32] {
    assert_eq!(rc(&tpm(data, &cmd::pcr_extend(PCR, &[byte; 32]))), 0);
    cmd::pcr_value(&tpm(data, &cmd::pcr_read(PCR)))
}

#[test]
fn qemu_startup_sequence_and_tpm_commands() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    let r = tpm(&mut data, &cmd::get_random(32));
    assert_eq!(rc(&r), 0);
    assert_eq!(be16(&r, 10), 32);
    // GET_TPMESTABLISHED is always 8 bytes.
    assert_eq!(c.cmd(4, &[], 8)[..4], [0, 0, 0, 0]);
    // GET_CONFIG: no key.
    assert_eq!(c.cmd(0x0f, &[], 8), vec![0, 0, 0, 0, 0, 0, 0, 0]);
    // GET_INFO returns libtpms's JSON.
    let mut info = c.cmd(0x12, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], 12);
    let n = be32(&info, 8) as usize;
    info.resize(12 + n, 0);
    std::io::Read::read_exact(&mut c.s, &mut info[12..]).unwrap();
    assert!(String::from_utf8_lossy(&info[12..]).contains("TPMSpecification"));
}

#[test]
fn probe_before_init_gets_one_tagged_10_byte_error() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let (rc0, mut data) = c.set_datafd();
    assert_eq!(rc0, 0);
    data.write_all(&[0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81])
        .unwrap();
    let mut buf = [0u8; 64];
    // QEMU does a single read and needs the whole reply in it.
    let n = std::io::Read::read(&mut data, &mut buf).unwrap();
    assert_eq!(&buf[..n], &[0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01]);
    // Commands before INIT that need a running TPM: protocol errors.
    assert_eq!(c.result(0x09, &[]), 0x0a, "CANCEL before INIT");
    assert_eq!(
        c.cmd(4, &[], 8),
        vec![0, 0, 0, 0x0a, 0, 0, 0, 0],
        "GET_TPMESTABLISHED before INIT"
    );
    assert_eq!(
        c.cmd(0x0c, &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], 16)[..4],
        [0, 0, 0, 0x0a]
    );
}

#[test]
fn locality_and_buffer_size_survive_stop_and_init() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(c.result(5, &[3, 0, 0, 0]), 0);
    assert_eq!(c.result(5, &[5, 0, 0, 0]), 0x3d, "locality 5 refused");
    assert_eq!(c.result(0x0e, &[]), 0);
    assert_eq!(c.result(0x02, &[0; 4]), 0);
    // Buffer size query while running is allowed and reports the kept size.
    let bs = c.cmd(0x11, &[0; 4], 16);
    assert_eq!(be32(&bs, 4), 3968);
    // Setting it while running is refused with a 4-byte reply.
    assert_eq!(c.result(0x11, &[0, 0, 0x10, 0]), 0x0a);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    // Locality 3 is still in force: resetting the established flag works
    // only from locality 3 or 4, and RESET_TPMESTABLISHED uses its own.
    assert_eq!(c.result(0x0b, &[3, 0, 0, 0]), 0);
    assert_eq!(c.result(0x0b, &[0, 0, 0, 0]), 0x3d);
    // A command larger than the negotiated buffer is answered with
    // TPM_RC_COMMAND_SIZE, and the channel keeps working.
    let mut big = vec![0x80, 0x01];
    big.extend_from_slice(&4000u32.to_be_bytes());
    big.extend_from_slice(&0x17bu32.to_be_bytes());
    big.resize(4000, 0);
    let r = tpm(&mut data, &big);
    assert_eq!(rc(&r), 0x142);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rc(&tpm(&mut data, &cmd::get_random(8))), 0);
}

#[test]
fn vm_reset_keeps_nv_and_resets_pcrs() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_define(NV, 8))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_write(NV, b"persist!"))), 0);
    assert_ne!(extend_and_read(&mut data, 1), [0; 32]);
    // QEMU's reset: STOP, SET_BUFFERSIZE(0), STOP, SET_BUFFERSIZE(n), INIT.
    for body in [&[][..], &[0; 4], &[], &[0, 0, 0x0f, 0x80]] {
        let code = if body.is_empty() { 0x0e } else { 0x11 };
        let len = if code == 0x11 { 16 } else { 4 };
        assert_eq!(be32(&c.cmd(code, body, len), 0), 0);
    }
    assert_eq!(c.result(0x02, &[0; 4]), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(
        cmd::pcr_value(&tpm(&mut data, &cmd::pcr_read(PCR))),
        [0; 32]
    );
    assert_eq!(
        cmd::nv_data(&tpm(&mut data, &cmd::nv_read(NV, 8))),
        b"persist!"
    );
}

#[test]
fn plain_migration_between_two_daemons_and_swtpm_compatible_blobs() {
    let (ts, td) = (state_dir(), state_dir());
    let src = Daemon::start(ts.path(), &["--allow-plaintext-migration"]);
    // A destination takes swtpm's plaintext blobs only when told to (by
    // default it has the host key and takes sealed state only).
    let dst = Daemon::start(td.path(), &["--allow-plaintext-migration"]);
    let mut cs = Ctrl::connect(&src.ctrl);
    let mut data = cs.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_define(NV, 8))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_write(NV, b"migrated"))), 0);
    let pcr = extend_and_read(&mut data, 7);

    let mut blobs = Vec::new();
    for ty in 1u32..=3 {
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&ty.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        let hdr = cs.cmd(0x0c, &body, 16);
        let (result, total, len) = (be32(&hdr, 0), be32(&hdr, 8), be32(&hdr, 12));
        if ty == 3 {
            assert_eq!(result, 0x800, "TPM 2 has no savestate blob");
            continue;
        }
        assert_eq!(result, 0);
        assert_eq!(total, len);
        let mut blob = vec![0u8; len as usize];
        std::io::Read::read_exact(&mut cs.s, &mut blob).unwrap();
        // swtpm's layout: header v2, flags MIGRATION_DATA, TLV4(TLV1(state)).
        assert_eq!(&blob[..6], &[2, 1, 0, 10, 0, 4]);
        blobs.push((ty, blob));
    }

    let mut cd = Ctrl::connect(&dst.ctrl);
    let (r, mut ddata) = cd.set_datafd();
    assert_eq!(r, 0);
    assert_eq!(cd.result(0x0e, &[]), 0);
    assert_eq!(be32(&cd.cmd(0x11, &3968u32.to_be_bytes(), 16), 0), 0);
    for (ty, blob) in &blobs {
        let mut msg = 0x0du32.to_be_bytes().to_vec();
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&ty.to_be_bytes());
        msg.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        // QEMU writes the header and the blob separately.
        cd.s.write_all(&msg).unwrap();
        assert_eq!(cd.raw(blob, 4), vec![0, 0, 0, 0], "SET_STATEBLOB {ty}");
    }
    assert_eq!(cd.result(0x02, &[0, 0, 0, 1]), 0, "INIT(DELETE_VOLATILE)");
    // Resumed: no TPM2_Startup needed, PCR and NV as on the source.
    assert_eq!(cmd::pcr_value(&tpm(&mut ddata, &cmd::pcr_read(PCR))), pcr);
    assert_eq!(
        cmd::nv_data(&tpm(&mut ddata, &cmd::nv_read(NV, 8))),
        b"migrated"
    );
    // The received state was made durable in the destination's directory.
    assert!(td.path().join("state/tpm2-00.permall").exists());
    assert!(!ts.path().join("state/tpm2-00.volatilestate").exists());
    // A failed migration: the source resumes; LOCK_STORAGE is idempotent.
    assert_eq!(cs.result(0x13, &300u32.to_be_bytes()), 0);
    assert_eq!(cs.result(0x13, &300u32.to_be_bytes()), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::get_random(8))), 0);
}

#[test]
fn unprepared_get_stateblob_is_refused_without_a_host_key() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &["--no-host-key"]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    for ty in 1u32..=3 {
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&ty.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        let hdr = c.cmd(0x0c, &body, 16);
        // TPM_ENCRYPT_ERROR: QEMU prints "encryption error".
        assert_eq!(be32(&hdr, 0), 0x20, "type {ty}: refused");
        assert_eq!(be32(&hdr, 12), 0, "no data");
    }
    let log = d.log_text();
    assert!(log.contains("no migration is prepared"), "{log}");
    assert!(log.contains("--allow-plaintext-migration"), "{log}");
    // The source keeps running.
    assert_eq!(rc(&tpm(&mut data, &cmd::get_random(8))), 0);
}

#[test]
fn set_stateblob_while_running_is_refused_and_stream_stays_in_sync() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    let before = extend_and_read(&mut data, 9);
    let mut msg = 0x0du32.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 100]);
    msg.extend_from_slice(&[0x5a; 100]);
    assert_eq!(c.raw(&msg, 4), vec![0, 0, 0, 0x0a]);
    // The 100 blob bytes were consumed, not read as commands.
    assert_eq!(c.cmd(1, &[], 8)[..4], [0, 0, 0, 0]);
    assert_eq!(cmd::pcr_value(&tpm(&mut data, &cmd::pcr_read(PCR))), before);
}

#[test]
fn set_datafd_replacement_after_hangup_and_refusal_while_open() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    let pcr = extend_and_read(&mut data, 3);
    // While the first data connection is open, a second SET_DATAFD is refused.
    let (r, _spare) = c.set_datafd();
    assert_eq!(r, 0x1f);
    // cloud-hypervisor reboot: close the old data end, new control client,
    // new SET_DATAFD.
    drop(data);
    drop(c);
    let mut c2 = Ctrl::connect(&d.ctrl);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut data2 = loop {
        let (r, s) = c2.set_datafd();
        if r == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "replacement refused: {r:#x}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(cmd::pcr_value(&tpm(&mut data2, &cmd::pcr_read(PCR))), pcr);
}

#[test]
fn cancel_is_answered_while_a_long_command_runs() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    let mut done = 0;
    for unique in 0..3u8 {
        data.write_all(&cmd::create_primary("rsa", unique)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // The control channel answers while the data command is in flight.
        assert_eq!(c.result(0x09, &[]), 0);
        assert_eq!(c.cmd(1, &[], 8)[..4], [0, 0, 0, 0]);
        let r = read_response(&mut data);
        // Either cancelled (TPM_RC_CANCELED 0x909) or finished.
        assert!(rc(&r) == 0 || rc(&r) == 0x909, "rc {:#x}", rc(&r));
        done += 1;
    }
    assert_eq!(done, 3);
    assert_eq!(rc(&tpm(&mut data, &cmd::get_random(8))), 0);
}

#[test]
fn shutdown_replies_then_exits_and_state_reloads() {
    let t = state_dir();
    let mut d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_define(NV, 4))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_write(NV, b"kept"))), 0);
    assert_eq!(c.result(3, &[]), 0);
    let st = d
        .wait_exit(Duration::from_secs(5))
        .expect("vtpmd exits after SHUTDOWN");
    assert!(st.success());
    let d2 = Daemon::start(t.path(), &[]);
    let mut c2 = Ctrl::connect(&d2.ctrl);
    let mut data2 = c2.qemu_start(3968);
    // The orderly auto-shutdown saved state: Startup(STATE) resumes.
    assert_eq!(rc(&tpm(&mut data2, &cmd::startup_state())), 0);
    assert_eq!(
        cmd::nv_data(&tpm(&mut data2, &cmd::nv_read(NV, 4))),
        b"kept"
    );
}

#[test]
fn terminate_exits_when_the_data_client_leaves() {
    let t = state_dir();
    let mut d = Daemon::start(t.path(), &["--terminate"]);
    let mut c = Ctrl::connect(&d.ctrl);
    let data = c.qemu_start(3968);
    drop(data);
    assert!(d.wait_exit(Duration::from_secs(5)).is_some(), "--terminate");
}
