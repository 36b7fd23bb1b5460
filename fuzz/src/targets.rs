//! The target bodies. Every one takes arbitrary bytes, must not panic, and
//! checks what can be checked about the parser's answer.

use crate::engine::{self, EchoEngine};
use arbitrary::Unstructured;
use std::sync::OnceLock;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vtpm_common::hostkey::HostKey;
use vtpm_common::reader::ByteReader;
use vtpm_common::{admin, hex};
use vtpmd::engine::tpm2;
use vtpmd::frontend::swtpm::wire::{self, cmd, rc, DecodeError, Request, Response};
use vtpmd::frontend::vhost_user::request::{self, Buffers, ChainError};
use vtpmd::migration::piece::{self, Importer};
use vtpmd::migration::stream;
use vtpmd::storage::{blob, sealing};

/// The request's fixed part as a client would send it.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut out = req.code().to_be_bytes().to_vec();
    let mut put = |v: &[u8]| out.extend_from_slice(v);
    match *req {
        Request::Init { flags } => put(&flags.to_be_bytes()),
        Request::SetLocality(l) | Request::ResetTpmEstablished(l) => put(&[l, 0, 0, 0]),
        Request::HashData { len } => put(&len.to_be_bytes()),
        Request::GetStateBlob {
            flags,
            blob_type,
            offset,
        } => {
            put(&flags.to_be_bytes());
            put(&blob_type.to_be_bytes());
            put(&offset.to_be_bytes());
        }
        Request::SetStateBlob {
            flags,
            blob_type,
            len,
        } => {
            put(&flags.to_be_bytes());
            put(&blob_type.to_be_bytes());
            put(&len.to_be_bytes());
        }
        Request::SetBufferSize(s) => put(&s.to_be_bytes()),
        Request::GetInfo { flags, offset } => {
            put(&flags.to_be_bytes());
            put(&offset.to_be_bytes());
            put(&[0; 4]); // swtpm's struct padding
        }
        Request::LockStorage { retries } => put(&retries.to_be_bytes()),
        _ => {}
    }
    out
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Control channel: `wire::decode` as the reader calls it (more may come,
/// then no more will), and the encoding of the replies built from it.
pub fn swtpm_ctrl(data: &[u8]) {
    let partial = wire::decode(data, false);
    let last = wire::decode(data, true);
    for (final_read, r) in [(false, &partial), (true, &last)] {
        match r {
            Ok(req) => {
                let code = be32(data);
                assert_eq!(req.code(), code);
                let fixed = wire::fixed_len(req);
                let short_locality = matches!(code, cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED)
                    && data.len() < fixed;
                assert!(
                    data.len() >= fixed || (final_read && short_locality),
                    "decoded {req:?} from {} of {fixed} bytes",
                    data.len()
                );
                if data.len() > fixed {
                    assert!(
                        matches!(req, Request::SetStateBlob { .. } | Request::HashData { .. }),
                        "{req:?} accepted with {} trailing bytes",
                        data.len() - fixed
                    );
                }
                // The fields are the bytes that were sent (padding aside).
                let enc = encode_request(req);
                // Of a locality, only the first byte counts (padding is free).
                let locality = matches!(code, cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED);
                let n = if locality {
                    5
                } else if code == cmd::GET_INFO {
                    16 // the last 4 are struct padding
                } else {
                    fixed
                };
                assert_eq!(enc.len(), fixed);
                assert_eq!(&enc[..n], &data[..n], "{req:?}");
                if !short_locality {
                    assert_eq!(
                        wire::decode(&enc, final_read).as_ref(),
                        Ok(req),
                        "re-decoding {req:?}"
                    );
                }
                reply_checks(req, &data[fixed.min(data.len())..]);
            }
            Err(DecodeError::Incomplete { have, need, usable }) => {
                // Only a missing command code stays incomplete at the end.
                assert!(
                    !final_read || data.len() < 4,
                    "Incomplete on the final read"
                );
                assert_eq!(*have, data.len());
                assert!(need > have);
                if *usable {
                    assert!(last.is_ok(), "usable but not decodable: {last:?}");
                }
            }
            Err(e @ DecodeError::Unknown(c)) => {
                assert!(data.len() >= 4 && *c == be32(data));
                assert_eq!(e.result_code(), rc::BAD_ORDINAL);
            }
            Err(e @ DecodeError::BadLength { cmd: c, .. }) => {
                assert!(data.len() >= 4 && *c == be32(data));
                assert_eq!(e.result_code(), rc::BAD_PARAMETER);
                let er = Response::error_for(*c, e.result_code()).encode();
                assert_eq!(be32(&er), rc::BAD_PARAMETER);
            }
        }
    }
    // What decodes with no more data to come decodes the same at the end.
    if let Ok(req) = &partial {
        assert_eq!(last.as_ref(), Ok(req));
    }
}

/// The replies a decoded request can get: the error reply for its code, and
/// a success reply carrying the request's own trailing bytes; each must have
/// swtpm's layout.
fn reply_checks(req: &Request, extra: &[u8]) {
    let code = req.code();
    let err = Response::error_for(code, rc::FAIL).encode();
    let want_len = match code {
        cmd::GET_STATEBLOB => 16,
        cmd::GET_TPMESTABLISHED => 8,
        _ => 4,
    };
    assert_eq!(err.len(), want_len);
    assert_eq!(be32(&err), rc::FAIL);
    let resp = match *req {
        Request::GetStateBlob { flags, offset, .. } => Response::StateBlob {
            result: rc::SUCCESS,
            flags,
            total: offset,
            data: extra.to_vec(),
        },
        Request::GetInfo { offset, .. } => Response::Info {
            total: offset,
            chunk: extra.to_vec(),
        },
        Request::SetBufferSize(s) => Response::BufferSize {
            size: s,
            min: s / 2,
            max: s,
        },
        Request::GetTpmEstablished => Response::Established {
            result: rc::SUCCESS,
            established: !extra.is_empty(),
        },
        Request::GetCapability => Response::Capability(wire::CAPABILITIES),
        Request::GetConfig => Response::Config {
            flags: extra.len() as u32,
        },
        _ => Response::Result(rc::SUCCESS),
    };
    let enc = resp.encode();
    assert_eq!(be32(&enc), rc::SUCCESS);
    match resp {
        Response::StateBlob { data, .. } => {
            assert_eq!(enc.len(), 16 + data.len());
            assert_eq!(be32(&enc[12..]) as usize, data.len());
            assert_eq!(&enc[16..], &data[..]);
        }
        Response::Info { chunk, .. } => {
            assert_eq!(enc.len(), 12 + chunk.len());
            assert_eq!(be32(&enc[8..]) as usize, chunk.len());
        }
        Response::BufferSize { .. } => assert_eq!(enc.len(), 16),
        Response::Result(_) => assert_eq!(enc.len(), 4),
        _ => assert_eq!(enc.len(), 8),
    }
}

/// Data channel framing: the TPM 2.0 header and the whole-command check
/// every frontend applies before a command reaches the TPM.
pub fn tpm_frame(data: &[u8]) {
    let h = tpm2::Header::parse(data);
    assert_eq!(h.is_some(), data.len() >= tpm2::HEADER_LEN);
    if let Some(h) = h {
        assert_eq!(&h.encode()[..], &data[..tpm2::HEADER_LEN]);
        assert_eq!(tpm2::command_code(data), Some(h.code));
        assert_eq!(tpm2::response_code(data), h.code);
    } else {
        assert_eq!(tpm2::command_code(data), None);
        assert_eq!(tpm2::response_code(data), tpm2::RC_FAILURE);
    }
    let first = data.first().copied().unwrap_or(0);
    let limits = [
        engine::IO_SIZE as usize,
        tpm2::HEADER_LEN,
        usize::from(first) * 17,
        data.len(),
        usize::MAX,
    ];
    for max in limits {
        let ok = tpm2::command_frame_ok(data, max);
        let want = h.is_some_and(|h| h.size as usize == data.len())
            && data.len() >= tpm2::HEADER_LEN
            && data.len() <= max;
        assert_eq!(ok, want, "max {max}");
        let size = h.map_or(0, |h| h.size as usize);
        assert_eq!(
            tpm2::command_size_ok(size, max),
            (tpm2::HEADER_LEN..=max).contains(&size)
        );
    }
    let er = tpm2::error_response(h.map_or(0, |h| h.code));
    assert!(tpm2::command_frame_ok(&er, tpm2::HEADER_LEN));
}

/// What the data channel answers to `input` sent in one go followed by
/// end-of-file: swtpm's framing, on the echo engine.
pub fn data_channel_model(input: &[u8]) -> Vec<u8> {
    let max = engine::IO_SIZE as usize;
    let mut out = Vec::new();
    let mut rest = input;
    while rest.len() >= tpm2::HEADER_LEN {
        let size = tpm2::Header::parse(rest).map_or(0, |h| h.size as usize);
        if !tpm2::command_size_ok(size, max) {
            rest = &rest[tpm2::HEADER_LEN..];
            if size > max {
                let skip = size - tpm2::HEADER_LEN;
                rest = &rest[skip.min(rest.len())..];
            }
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_COMMAND_SIZE));
            continue;
        }
        if rest.len() < size {
            break;
        }
        let resp = EchoEngine::response_for(&rest[..size]);
        if resp.len() < tpm2::HEADER_LEN || resp.len() > max {
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
        } else {
            out.extend_from_slice(&resp);
        }
        rest = &rest[size..];
    }
    out
}

/// The data channel's read loop (`frontend::swtpm::data::serve`) over a
/// real socket pair: the whole input, then end-of-file. What comes back
/// must be exactly what swtpm's framing gives (see [`data_channel_model`]).
pub fn data_channel(data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (mut peer, ours) = UnixStream::pair().expect("socketpair");
    peer.write_all(data).expect("send");
    peer.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // Read the replies while serve writes them: a few short commands can
    // ask for megabytes of responses, more than a socket buffer holds.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).expect("receive");
        got
    });
    let mut s = vtpmd::transport::Stream::Unix(ours);
    vtpmd::frontend::swtpm::data::serve(&mut s, engine::vtpm(), None).expect("serve");
    drop(s);
    let got = reader.join().expect("reader");
    assert_eq!(got, data_channel_model(data));
}

/// The fixed at-rest key the state-file target opens files with.
pub const STATE_KEY: [u8; 32] = [0x5a; 32];
/// The blob names a state directory holds.
pub const STATE_NAMES: [&str; 3] = [
    "tpm2-00.permall",
    "tpm2-00.volatilestate",
    "tpm2-00.savestate",
];

fn state_key() -> &'static sealing::StateKey {
    static K: OnceLock<sealing::StateKey> = OnceLock::new();
    K.get_or_init(|| sealing::StateKey::from_master(&STATE_KEY))
}

/// swtpm's `--key` / `--migration-key` containers with fixed keys of both
/// sizes: whatever opens re-encrypts and opens to the same bytes; a state
/// file opens with at most one of the two keys.
fn swtpm_containers(data: &[u8]) {
    use vtpmd::storage::swtpm_crypt;
    use vtpmd::storage::swtpm_key::SwtpmKey;
    let keys = [
        SwtpmKey::from_raw(&STATE_KEY[..16]).expect("16 bytes"),
        SwtpmKey::from_raw(&STATE_KEY).expect("32 bytes"),
    ];
    let mut opened = 0;
    for k in &keys {
        if let Ok(plain) = swtpm_crypt::decode_state_file(k, data) {
            assert!(swtpm_crypt::is_encrypted_file(data));
            opened += 1;
            let again = swtpm_crypt::encode_state_file(k, &plain).expect("encrypt");
            assert_eq!(swtpm_crypt::decode_state_file(k, &again).unwrap(), plain);
        }
        if let Ok(plain) = swtpm_crypt::decode_migration(Some(k), data) {
            let again = swtpm_crypt::encode_migration(k, &plain).expect("encrypt");
            assert_eq!(
                swtpm_crypt::decode_migration(Some(k), &again).unwrap(),
                plain
            );
        }
    }
    assert!(opened <= 1, "a swtpm state file opened with both key sizes");
    let file = swtpm_crypt::encode_state_file(&keys[1], data).expect("encrypt");
    assert_eq!(
        &swtpm_crypt::decode_state_file(&keys[1], &file).unwrap()[..],
        data
    );
    assert!(swtpm_crypt::decode_state_file(&keys[0], &file).is_err());
}

/// State files: a sealed file opened with a fixed key under each blob
/// name, swtpm's plain blob format, and swtpm's encrypted containers; every
/// format round-trips.
pub fn state_file(data: &[u8]) {
    swtpm_containers(data);
    let key = state_key();
    let mut opened = 0;
    for name in STATE_NAMES {
        if let Ok(plain) = key.open(name, data) {
            assert!(sealing::is_sealed(data));
            opened += 1;
            let again = key.seal(name, &plain).expect("seal");
            assert_eq!(&key.open(name, &again).expect("reopen")[..], &plain[..]);
        }
    }
    assert!(opened <= 1, "one sealed file opened under {opened} names");
    if let Ok(state) = blob::decode_plain(data) {
        assert!(!sealing::is_sealed(data) || data.len() >= 10);
        assert_eq!(
            blob::decode_plain(&blob::encode_file(&state)).unwrap(),
            state
        );
    }
    assert_eq!(blob::decode_plain(&blob::encode_file(data)).unwrap(), data);
    assert_eq!(
        blob::decode_plain(&blob::encode_migration(data)).unwrap(),
        data
    );
    let sealed = key.seal(STATE_NAMES[0], data).expect("seal");
    assert!(sealing::is_sealed(&sealed));
    assert_eq!(&key.open(STATE_NAMES[0], &sealed).unwrap()[..], data);
    assert!(key.open(STATE_NAMES[1], &sealed).is_err());
}

/// The destination host key the migration target opens blobs with: a
/// fixed RSA-2048 test key kept in `fuzz/keys/` (generating one takes
/// seconds, and the seed corpus is sealed to this one). It is smaller than
/// the 3072-bit keys vtpmd generates only to make each RSA unwrap cheaper
/// (about 3.4 times): the importer does not look at its own key's size.
pub fn host_key() -> &'static HostKey {
    static K: OnceLock<HostKey> = OnceLock::new();
    K.get_or_init(|| {
        HostKey::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/keys/fuzz-host-key.pem"
        )))
        .expect("fuzz/keys/fuzz-host-key.pem")
    })
}

/// Splits a migration-target input into (declared type, blob) pairs.
///
/// Layout: one control byte (bits 0-1: blob count - 1, capped at 3; bit
/// 2+i set: blob i is declared with a wrong type; bit 7: expect another
/// migration id), then every blob but the last as a be32 length and its
/// bytes, then the last blob.
pub fn split_blobs(data: &[u8]) -> (u8, Vec<(u32, &[u8])>) {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return (0, Vec::new());
    };
    let n = usize::from(ctl & 3).min(2) + 1;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ty = if ctl & (4 << i) != 0 {
            (i as u32 + 2) % 4
        } else {
            i as u32 + 1
        };
        let blob = if i + 1 == n {
            std::mem::take(&mut rest)
        } else {
            let mut r = ByteReader::new(rest);
            let len = r.u32("len").unwrap_or(0) as usize;
            let after = r.rest();
            let (b, tail) = after.split_at(len.min(after.len()));
            rest = tail;
            b
        };
        out.push((ty, blob));
    }
    (ctl, out)
}

/// The inverse of [`split_blobs`], for making seeds.
pub fn join_blobs(ctl: u8, blobs: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![(ctl & !3) | (blobs.len().saturating_sub(1) as u8)];
    for (i, b) in blobs.iter().enumerate() {
        if i + 1 < blobs.len() {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        }
        out.extend_from_slice(b);
    }
    out
}

/// Migration blobs and pieces: one to three blobs fed to an importer that
/// expects the migration id the first blob names (or another one), with
/// the fixed host key.
pub fn migration_import(data: &[u8]) {
    let (ctl, blobs) = split_blobs(data);
    let Some(&(_, first)) = blobs.first() else {
        return;
    };
    for (_, b) in &blobs {
        if let Some(id) = piece::peek_id(b) {
            assert!(b.starts_with(piece::MAGIC));
            assert!(b.windows(piece::ID_LEN).any(|w| w == id));
        }
    }
    let mut id = piece::peek_id(first).unwrap_or([0; piece::ID_LEN]);
    if ctl & 0x80 != 0 {
        id[0] ^= 1;
    }
    let host = host_key();
    let mut imp = Importer::new(id, piece::Purpose::Migration);
    let mut failed = false;
    for (ty, b) in &blobs {
        let r = imp.accept(*ty, b, host);
        if failed {
            assert!(
                matches!(r, Err(piece::PieceError::Poisoned)),
                "accepted after a failure: {r:?}"
            );
        }
        if r.is_err() {
            failed = true;
            assert!(imp.permanent.is_empty() && imp.volatile.is_empty());
            assert!(!imp.complete());
        }
    }
    if imp.complete() {
        assert!(!failed && blobs.len() == 3);
    }
}

/// The device-state stream: a decoded stream re-encodes to its bytes.
pub fn device_stream(data: &[u8]) {
    if let Ok(blobs) = stream::decode(data) {
        assert!(blobs.len() <= stream::MAX_BLOBS);
        let owned: Vec<(u32, Vec<u8>)> = blobs.iter().map(|(t, b)| (*t, b.to_vec())).collect();
        assert_eq!(stream::encode(&owned), data);
        for (i, (t, b)) in blobs.iter().enumerate() {
            assert!((1..=stream::MAX_BLOBS as u32).contains(t));
            assert!(b.len() <= stream::MAX_BLOB);
            assert!(blobs[..i].iter().all(|(u, _)| u != t));
        }
    }
}

/// The admin protocol: a parsed request re-serialises to an equal one, and
/// the daemon's line handler always answers one JSON object.
pub fn admin_request(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = admin::Request::parse(line) {
        let json = serde_json::to_string(&req).expect("serialise");
        assert_eq!(admin::Request::parse(&json).as_ref(), Ok(&req), "{json}");
        assert!(!req.op().is_empty());
    }
    let reply = vtpmd::frontend::admin::handle_line(engine::vtpm(), line.trim());
    assert!(!reply.contains('\n'), "reply spans lines: {reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).expect("reply is JSON");
    assert!(v.is_object(), "{reply}");
}

/// Guest memory of the vhost-user target: two regions with a hole between.
pub const MEM: [(u64, usize); 2] = [(0x1000, 0x4000), (0x8000, 0x2000)];
const F_WRITE: u16 = 2;

fn any_addr(u: &mut Unstructured<'_>, sel: u8) -> u64 {
    match sel % 4 {
        0 => u.arbitrary().unwrap_or(0),
        1 => MEM[1].0 + u64::from(u.arbitrary::<u16>().unwrap_or(0) % 0x2400),
        _ => MEM[0].0 + u64::from(u.arbitrary::<u16>().unwrap_or(0) % 0x4800),
    }
}

fn any_len(u: &mut Unstructured<'_>, sel: u8) -> u32 {
    match (sel >> 2) % 4 {
        0 => u.arbitrary().unwrap_or(0),
        1 => u32::from(u.arbitrary::<u16>().unwrap_or(0)),
        _ => u32::from(u.arbitrary::<u8>().unwrap_or(0)),
    }
}

/// The descriptors and memory fill a vhost-user input stands for.
pub fn chain_of(data: &[u8]) -> (Vec<Descriptor>, &[u8]) {
    let mut u = Unstructured::new(data);
    let n = u.int_in_range(0..=8u8).unwrap_or(0);
    let mut descs = Vec::new();
    for _ in 0..n {
        let sel: u8 = u.arbitrary().unwrap_or(0);
        let addr = any_addr(&mut u, sel);
        let len = any_len(&mut u, sel);
        let mut flags = if sel & 0x10 != 0 { F_WRITE } else { 0 };
        if sel & 0x20 != 0 {
            flags |= u.arbitrary::<u16>().unwrap_or(0);
        }
        descs.push(Descriptor::new(addr, len, flags, 0));
    }
    (descs, u.take_rest())
}

fn gather(mem: &GuestMemoryMmap, bufs: &[(u64, u32)], total: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; total];
    let mut at = 0;
    for &(a, l) in bufs {
        let n = (l as usize).min(total - at);
        mem.read_slice(&mut out[at..at + n], GuestAddress(a)).ok()?;
        at += n;
        if at == total {
            break;
        }
    }
    Some(out)
}

/// vhost-user descriptor chains through the request layer: arbitrary
/// descriptors over a small guest memory, served by a real [`vtpmd::instance::Vtpm`]
/// on the echo engine. Checks the used length and the bytes the guest finds.
pub fn vhost_request(data: &[u8]) {
    let (descs, fill) = chain_of(data);
    let mem = GuestMemoryMmap::<()>::from_ranges(
        &MEM.iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    )
    .expect("guest memory");
    let n = fill.len().min(MEM[0].1);
    mem.write_slice(&fill[..n], GuestAddress(MEM[0].0))
        .expect("fill");
    let split = Buffers::split(descs.iter().cloned());
    let mut out = Vec::new();
    let r = request::serve(engine::vtpm(), &mem, descs.iter().cloned(), &mut out);
    let readable: Vec<(u64, u32)> = descs
        .iter()
        .take_while(|d| !d.is_write_only())
        .map(|d| (d.addr().0, d.len()))
        .collect();
    let writable: Vec<(u64, u32)> = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr().0, d.len()))
        .collect();
    let space: usize = writable.iter().map(|&(_, l)| l as usize).sum();
    match &r {
        Err(e @ (ChainError::NoWritable | ChainError::Misordered | ChainError::TooSmall(_))) => {
            assert_eq!(split.as_ref().err(), Some(e));
        }
        Err(ChainError::BadAddress { .. }) | Err(ChainError::ResponseTooLarge(..)) => {
            assert!(split.is_ok());
        }
        Ok(used) => {
            assert!(split.is_ok());
            assert_eq!(*used as usize, out.len());
            assert!(out.len() <= space && out.len() >= tpm2::HEADER_LEN);
            // The guest finds the response in its buffers, unless it gave
            // overlapping ones (then later writes win, as on hardware).
            if disjoint(&writable, &writable) {
                assert_eq!(
                    gather(&mem, &writable, out.len()).as_deref(),
                    Some(&out[..])
                );
            }
            let total: usize = readable.iter().map(|&(_, l)| l as usize).sum();
            let expect = if total > request::MAX_MESSAGE {
                tpm2::error_response(tpm2::RC_COMMAND_SIZE).to_vec()
            } else {
                // Memory may have been overwritten by the response; the
                // command was read before, so only check when the
                // buffers do not overlap.
                match gather_if_disjoint(&mem, &readable, &writable, total) {
                    None => return,
                    Some(cmd) if tpm2::command_frame_ok(&cmd, engine::IO_SIZE as usize) => {
                        let resp = EchoEngine::response_for(&cmd);
                        if resp.len() < tpm2::HEADER_LEN || resp.len() > engine::IO_SIZE as usize {
                            tpm2::error_response(tpm2::RC_FAILURE).to_vec()
                        } else {
                            resp
                        }
                    }
                    Some(_) => tpm2::error_response(tpm2::RC_COMMAND_SIZE).to_vec(),
                }
            };
            assert_eq!(out, expect);
        }
    }
}

fn overlap((a, l): (u64, u32), (b, m): (u64, u32)) -> bool {
    a < b.saturating_add(u64::from(m)) && b < a.saturating_add(u64::from(l))
}

/// No buffer of `x` overlaps a different buffer of `y`.
fn disjoint(x: &[(u64, u32)], y: &[(u64, u32)]) -> bool {
    x.iter().enumerate().all(|(i, &p)| {
        y.iter()
            .enumerate()
            .all(|(j, &q)| (std::ptr::eq(x, y) && i == j) || !overlap(p, q))
    })
}

fn gather_if_disjoint(
    mem: &GuestMemoryMmap,
    readable: &[(u64, u32)],
    writable: &[(u64, u32)],
    total: usize,
) -> Option<Vec<u8>> {
    if !disjoint(readable, writable) {
        return None;
    }
    gather(mem, readable, total)
}

/// The shared primitives: the byte reader driven by an op list, and hex.
pub fn common_codec(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let (ops, buf) = rest.split_at(usize::from(k).min(rest.len()));
    let mut r = ByteReader::new(buf);
    let mut ops = ops.iter();
    while let Some(&op) = ops.next() {
        let pos = r.position();
        assert_eq!(pos + r.remaining(), buf.len());
        let left = &buf[pos..];
        let took = match op % 9 {
            0 => {
                let n = usize::from(ops.next().copied().unwrap_or(0));
                r.take(n, "t").map(|s| s.len())
            }
            1 => r.array::<3>("a").map(|a| a.len()),
            2 => r.u8("u8").map(|_| 1),
            3 => r.u16("u16").map(|_| 2),
            4 => r.u32("u32").map(|v| {
                assert_eq!(v, be32(left));
                4
            }),
            5 => r.u64("u64").map(|_| 8),
            6 => r.bytes_u16("b16").map(|s| 2 + s.len()),
            7 => r.bytes_u32("b32").map(|s| 4 + s.len()),
            _ => Ok(r.rest().len()),
        };
        match took {
            Ok(n) => assert!(r.position() >= pos && r.position() - pos <= n.max(8)),
            Err(t) => assert!(t.need > t.have && r.position() <= buf.len()),
        }
        assert!(r.position() <= buf.len());
    }
    let text = String::from_utf8_lossy(buf);
    if let Ok(v) = hex::decode(&text) {
        assert_eq!(hex::encode(&v), text.to_ascii_lowercase());
        assert_eq!(hex::decode_array::<32>(&text).is_some(), v.len() == 32);
    }
    assert_eq!(hex::decode(&hex::encode(data)).unwrap(), data);
}
