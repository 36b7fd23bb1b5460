//! Writes the seed corpus (valid inputs of every format) into
//! fuzz/corpus/<target>/seed-*. Not part of a normal run:
//! `cargo test -p vtpm-fuzz --test seeds -- --ignored` (docs/FUZZING.md).

use std::path::Path;
use vtpm_fuzz::targets::{self, encode_request, join_blobs, MEM};
use vtpmd::engine::tpm2;
use vtpmd::frontend::swtpm::wire::Request;
use vtpmd::migration::piece::{Exporter, Purpose};
use vtpmd::migration::stream;
use vtpmd::storage::{blob, sealing};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    (vtpm_fuzz::target(target).unwrap().run)(data);
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn tpm_cmd(code: u32, body: &[u8]) -> Vec<u8> {
    let mut v = tpm2::Header {
        tag: 0x8001,
        size: (tpm2::HEADER_LEN + body.len()) as u32,
        code,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
#[ignore]
fn write_seeds() {
    let reqs = [
        Request::GetCapability,
        Request::Init { flags: 1 },
        Request::Shutdown,
        Request::GetTpmEstablished,
        Request::SetLocality(3),
        Request::HashStart,
        Request::HashData { len: 5 },
        Request::HashEnd,
        Request::CancelTpmCmd,
        Request::StoreVolatile,
        Request::ResetTpmEstablished(3),
        Request::GetStateBlob {
            flags: 1,
            blob_type: 1,
            offset: 0,
        },
        Request::SetStateBlob {
            flags: 0,
            blob_type: 2,
            len: 3,
        },
        Request::Stop,
        Request::GetConfig,
        Request::SetDataFd,
        Request::SetBufferSize(4096),
        Request::GetInfo {
            flags: 3,
            offset: 0,
        },
        Request::LockStorage { retries: 10 },
    ];
    for (i, r) in reqs.iter().enumerate() {
        let mut b = encode_request(r);
        if matches!(r, Request::SetStateBlob { .. } | Request::HashData { .. }) {
            b.extend_from_slice(b"abc");
        }
        write("swtpm_ctrl", &format!("{i:02}"), &b);
    }
    write("swtpm_ctrl", "short-locality", &[0, 0, 0, 5, 2]);

    write("tpm_frame", "startup", &tpm2::startup_command(0));
    write("tpm_frame", "getrandom", &tpm_cmd(0x17b, &[0, 16]));
    write("tpm_frame", "short", &tpm_cmd(0x17b, &[0, 16])[..9]);

    let mut two = tpm2::startup_command(0);
    two.extend_from_slice(&tpm_cmd(0x17b, &[0, 16]));
    write("data_channel", "two", &two);
    let mut bad = tpm_cmd(0x17b, &[0; 20]);
    bad[2..6].copy_from_slice(&5000u32.to_be_bytes());
    bad.extend_from_slice(&tpm2::startup_command(1));
    write("data_channel", "oversized-then-startup", &bad);
    write(
        "data_channel",
        "big-response",
        &tpm_cmd(0x8000_1000, &[1, 2, 3]),
    );

    let key = sealing::StateKey::from_master(&targets::STATE_KEY);
    for (i, name) in targets::STATE_NAMES.iter().enumerate() {
        let state: Vec<u8> = (0..200u16).map(|x| (x as u8) ^ (i as u8)).collect();
        write(
            "state_file",
            &format!("sealed-{i}"),
            &key.seal(name, &state).unwrap(),
        );
    }
    write("state_file", "plain", &blob::encode_file(b"libtpms state"));
    for (n, k) in [
        (16, &targets::STATE_KEY[..16]),
        (32, &targets::STATE_KEY[..]),
    ] {
        let k = vtpmd::storage::swtpm_key::SwtpmKey::from_raw(k).unwrap();
        let st = vtpmd::storage::swtpm_crypt::encode_state_file(&k, b"libtpms state").unwrap();
        write("state_file", &format!("swtpm-key-{n}"), &st);
        let mig = vtpmd::storage::swtpm_crypt::encode_migration(&k, b"libtpms state").unwrap();
        write("state_file", &format!("swtpm-migration-key-{n}"), &mig);
    }
    write(
        "state_file",
        "migration",
        &blob::encode_migration(b"libtpms state"),
    );

    let host = targets::host_key();
    let id = [7u8; 32];
    let mut e = Exporter::new(id, host.public(), Purpose::Migration).unwrap();
    let b1 = e.seal_state(1, &[1u8; 300]).unwrap();
    let b2 = e.seal_state(2, &[2u8; 100]).unwrap();
    let b3 = e.seal_final().unwrap();
    write("migration_import", "one", &join_blobs(0, &[&b1]));
    write("migration_import", "two", &join_blobs(0, &[&b1, &b2]));
    write(
        "migration_import",
        "three",
        &join_blobs(0, &[&b1, &b2, &b3]),
    );
    let mut e = Exporter::new(id, host.public(), Purpose::Migration).unwrap();
    let b1 = e.seal_state(1, &[]).unwrap();
    let b2 = e.seal_state(2, &[]).unwrap();
    let b3 = e.seal_final().unwrap();
    write(
        "migration_import",
        "three-empty",
        &join_blobs(0, &[&b1, &b2, &b3]),
    );

    write(
        "device_stream",
        "three",
        &stream::encode(&[(1, vec![1; 40]), (2, vec![2; 7]), (3, vec![])]),
    );
    write("device_stream", "one", &stream::encode(&[(2, vec![9; 3])]));

    for (i, l) in [
        r#"{"op":"status"}"#,
        r#"{"op":"incoming-info"}"#,
        r#"{"op":"incoming-key","wrapped_key":"00ff"}"#,
        r#"{"op":"outgoing","peer_key":"-----BEGIN PUBLIC KEY-----","migration_id":"0707"}"#,
        r#"{"op":"abort"}"#,
        r#"{"op":"receipt"}"#,
        r#"{"op":"complete","receipt":{}}"#,
    ]
    .iter()
    .enumerate()
    {
        write("admin_request", &format!("{i}"), l.as_bytes());
    }

    // vhost-user: selector byte layout from targets::chain_of: sel%4 = 2
    // (address in region 0), (sel>>2)%4 = 1 (u16 length), 0x10 = writable.
    let cmd = tpm2::startup_command(0);
    let mut v = vec![2u8];
    v.push(0x06);
    v.extend_from_slice(&0u16.to_le_bytes()); // addr = MEM[0].0
    v.extend_from_slice(&(cmd.len() as u16).to_le_bytes());
    v.push(0x16);
    v.extend_from_slice(&0x800u16.to_le_bytes());
    v.extend_from_slice(&64u16.to_le_bytes());
    v.extend_from_slice(&cmd);
    let _ = MEM;
    write("vhost_request", "startup", &v);

    let mut c = vec![4u8, 4, 6, 0, 8];
    c.extend_from_slice(b"\x00\x00\x00\x02ab");
    write("common_codec", "reader", &c);
    write("common_codec", "hex", b"\x00DEADbeef00");
}
