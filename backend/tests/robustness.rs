//! Bad input on every channel: garbage, truncated and oversized requests,
//! unknown codes, commands in the wrong state. Each gets the protocol's
//! error, vtpmd keeps serving, and the TPM state is intact afterwards.

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vtpm_test_support as common;

const PCR: u32 = 16;
const NV: u32 = 0x0150_0020;

/// A running TPM with known NV and PCR contents.
fn prepared() -> (tempfile::TempDir, Daemon, Ctrl, UnixStream, [u8; 32]) {
    let t = state_dir();
    let d = Daemon::start(t.path(), &["--allow-plaintext-migration"]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_define(NV, 6))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::nv_write(NV, b"intact"))), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::pcr_extend(PCR, &[0x11; 32]))), 0);
    let pcr = cmd::pcr_value(&tpm(&mut data, &cmd::pcr_read(PCR)));
    (t, d, c, data, pcr)
}

fn assert_intact(d: &mut Daemon, data: &mut UnixStream, pcr: &[u8; 32]) {
    assert!(d.alive(), "vtpmd died: {}", d.log_text());
    assert_eq!(&cmd::pcr_value(&tpm(data, &cmd::pcr_read(PCR))), pcr);
    assert_eq!(cmd::nv_data(&tpm(data, &cmd::nv_read(NV, 6))), b"intact");
}

#[test]
fn control_unknown_codes_and_garbage() {
    let (_t, mut d, _c, mut data, pcr) = prepared();
    for code in [0u32, 0x14, 0x99, 0xdead_beef] {
        let mut c = Ctrl::connect(&d.ctrl);
        assert_eq!(c.result(code, &[]), 0x0a, "unknown code {code:#x}");
        // The same connection keeps working.
        assert_eq!(c.cmd(1, &[], 8)[..4], [0, 0, 0, 0]);
    }
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(c.raw(&[0xff; 32], 4), vec![0, 0, 0, 0x0a]);
    assert_intact(&mut d, &mut data, &pcr);
}

#[test]
fn control_truncated_and_oversized_requests() {
    let (_t, mut d, _c, mut data, pcr) = prepared();
    // Truncated: INIT with two of its four body bytes, then silence.
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(c.raw(&[0, 0, 0, 2, 0, 0], 4), vec![0, 0, 0, 3]);
    // Truncated GET_STATEBLOB still gets its 16-byte header.
    let r = c.raw(&[0, 0, 0, 0x0c, 0, 0, 0, 1], 16);
    assert_eq!(&r[..4], &[0, 0, 0, 3]);
    // Oversized: STOP with a body, INIT with eight body bytes.
    assert_eq!(c.raw(&[0, 0, 0, 0x0e, 1, 2, 3, 4], 4), vec![0, 0, 0, 3]);
    assert_eq!(
        c.raw(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0], 4),
        vec![0, 0, 0, 3]
    );
    // Neither STOP nor INIT ran: the TPM is running with its PCR intact.
    assert_intact(&mut d, &mut data, &pcr);
    // A SET_STATEBLOB announcing more than 512 KiB is refused.
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(
        c.raw(&[0, 0, 0, 0x0d, 0, 0, 0, 0, 0, 0, 0, 1, 0x10, 0, 0, 0], 4),
        vec![0, 0, 0, 9]
    );
    // A SET_STATEBLOB whose data stops short: error, connection closed.
    let mut c = Ctrl::connect(&d.ctrl);
    c.s.write_all(&[0, 0, 0, 0x0d, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 100, 1, 2, 3])
        .unwrap();
    c.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut r = [0u8; 4];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(r, [0, 0, 0, 3]);
    // Disconnecting in the middle of a request is harmless.
    let mut c = Ctrl::connect(&d.ctrl);
    c.s.write_all(&[0, 0]).unwrap();
    drop(c);
    assert_intact(&mut d, &mut data, &pcr);
}

#[test]
fn control_bad_values() {
    let (_t, mut d, mut c, mut data, pcr) = prepared();
    assert_eq!(c.result(5, &[9, 0, 0, 0]), 0x3d, "locality 9");
    assert_eq!(
        c.result(0x0b, &[7, 0, 0, 0]),
        0x3d,
        "reset established at 7"
    );
    let hdr = c.cmd(0x0c, &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0], 16);
    assert_eq!(be32(&hdr, 0), 9, "unknown blob type");
    let hdr = c.cmd(0x0c, &[0, 0, 0, 1, 0, 0, 0, 1, 0x7f, 0, 0, 0], 16);
    assert_eq!(be32(&hdr, 0), 3, "offset past the end");
    // GET_INFO with an offset past the end.
    let r = c.cmd(
        0x12,
        &[0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 0, 0, 0, 0, 0, 0, 0],
        4,
    );
    assert_eq!(be32(&r, 0), 3);
    // SET_DATAFD without a descriptor.
    assert_eq!(c.result(0x10, &[]), 3);
    assert_intact(&mut d, &mut data, &pcr);
}

#[test]
fn set_stateblob_garbage_is_rejected_and_state_survives() {
    let (t, mut d, mut c, mut data, pcr) = prepared();
    assert_eq!(c.result(0x0e, &[]), 0, "STOP");
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("garbage", vec![0x42; 64], 0x2e),
        (
            "bad header size",
            vec![2, 1, 0, 12, 0, 4, 0, 0, 0, 12, 0, 0],
            0x2b,
        ),
        (
            "truncated TLV",
            vec![2, 1, 0, 10, 0, 4, 0, 0, 0, 16, 0, 1, 0, 0, 9, 9],
            3,
        ),
        (
            "swtpm-encrypted",
            vec![2, 1, 0, 10, 0, 6, 0, 0, 0, 10],
            0x0d,
        ),
        // A well-formed container whose content libtpms rejects.
        (
            "bad state",
            vec![
                2, 1, 0, 10, 0, 4, 0, 0, 0, 26, 0, 4, 0, 0, 0, 10, 0, 1, 0, 0, 0, 4, 1, 2, 3, 4,
            ],
            0,
        ),
    ];
    for (name, blob, want) in cases {
        let mut msg = 0x0du32.to_be_bytes().to_vec();
        msg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        msg.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        msg.extend_from_slice(&blob);
        let r = be32(&c.raw(&msg, 4), 0);
        if want == 0 {
            assert_ne!(r, 0, "{name} accepted");
        } else {
            assert_eq!(r, want, "{name}");
        }
    }
    // The stored state is untouched: INIT loads it and the NV data is there.
    assert_eq!(c.result(0x02, &[0; 4]), 0);
    assert_eq!(rc(&tpm(&mut data, &cmd::startup_state())), 0);
    assert_eq!(
        cmd::nv_data(&tpm(&mut data, &cmd::nv_read(NV, 6))),
        b"intact"
    );
    let _ = (pcr, &t);
    assert!(d.alive());
}

#[test]
fn data_channel_garbage_truncated_oversized() {
    let (_t, mut d, _c, mut data, pcr) = prepared();
    // Size below 10.
    data.write_all(&[0x80, 0x01, 0, 0, 0, 5, 0, 0, 1, 0x7b])
        .unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0x142);
    // Size above the buffer.
    data.write_all(&[0x80, 0x01, 0, 1, 0, 0, 0, 0, 1, 0x7b])
        .unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0x142);
    std::thread::sleep(Duration::from_millis(100));
    // Garbage with a coherent size: the TPM answers with its own error.
    let mut g = vec![0xde, 0xad, 0, 0, 0, 20];
    g.extend_from_slice(&[0xee; 14]);
    let r = tpm(&mut data, &g);
    assert_ne!(rc(&r), 0);
    // Truncated: header promises 20 bytes, 12 arrive, then silence.
    data.write_all(&[0x80, 0x01, 0, 0, 0, 20, 0, 0, 1, 0x7b, 0, 8])
        .unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0x142);
    assert_intact(&mut d, &mut data, &pcr);
}

#[test]
fn data_channel_commands_sharing_a_write_are_answered_in_order() {
    let (_t, mut d, _c, mut data, pcr) = prepared();
    // Two commands in one write: two responses, in order.
    let mut two = cmd::get_random(8);
    two.extend_from_slice(&cmd::pcr_read(PCR));
    data.write_all(&two).unwrap();
    let first = read_response(&mut data);
    assert_eq!((rc(&first), first.len()), (0, 20), "GetRandom(8)");
    assert_eq!(cmd::pcr_value(&read_response(&mut data)), pcr);
    // An oversized command whose body starts in the write of its header
    // and ends in the write of the next command: only the body is dropped.
    let size = 8192u32;
    let mut big = vec![0x80, 0x01];
    big.extend_from_slice(&size.to_be_bytes());
    big.extend_from_slice(&[0, 0, 1, 0x7b]);
    big.extend_from_slice(&[0x55; 100]);
    data.write_all(&big).unwrap();
    let mut rest = vec![0x55; size as usize - big.len()];
    rest.extend_from_slice(&cmd::get_random(8));
    data.write_all(&rest).unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0x142, "oversized");
    let r = read_response(&mut data);
    assert_eq!((rc(&r), r.len()), (0, 20), "the command after it");
    // A header announcing less than a header, then a command, in one
    // write: the bad header alone is dropped.
    let mut short = vec![0x80, 0x01, 0, 0, 0, 5, 0, 0, 1, 0x7b];
    short.extend_from_slice(&cmd::pcr_read(PCR));
    data.write_all(&short).unwrap();
    assert_eq!(rc(&read_response(&mut data)), 0x142);
    assert_eq!(cmd::pcr_value(&read_response(&mut data)), pcr);
    assert_intact(&mut d, &mut data, &pcr);
}

#[test]
fn data_server_survives_bad_clients() {
    let t = state_dir();
    let port = 20000 + (std::process::id() % 9000) as u16;
    let mut d = Daemon::start(
        t.path(),
        &[
            "--server",
            &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            "--flags",
            "not-need-init,startup-clear",
        ],
    );
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    // A client that sends half a header and leaves.
    let mut s = connect();
    s.write_all(&[0x80, 0x01, 0]).unwrap();
    drop(s);
    // A client that sends garbage sizes.
    let mut s = connect();
    s.write_all(&[0xff; 10]).unwrap();
    assert_eq!(rc(&read_response(&mut s)), 0x142);
    drop(s);
    // A client that disconnects while waiting for a response.
    let mut s = connect();
    s.write_all(&cmd::get_random(16)).unwrap();
    drop(s);
    // The next client is served.
    let mut s = connect();
    assert_eq!(rc(&tpm(&mut s, &cmd::get_random(16))), 0);
    assert!(d.alive());
}
