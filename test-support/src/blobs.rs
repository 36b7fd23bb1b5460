//! QEMU's state-blob sequence on a control connection, written once: the
//! source's pre_save (GET_STATEBLOB ×3) and the destination's post_load
//! (STOP, SET_STATEBLOB ×3 skipping empty blobs, INIT with
//! DELETE_VOLATILE).

use std::io::{Read, Write};

/// One blob as GET_STATEBLOB returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    pub blob_type: u32,
    pub flags: u32,
    /// GET_STATEBLOB's result code.
    pub result: u32,
    pub data: Vec<u8>,
}

/// The big-endian u32 at `at` (the wire's byte order).
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Sends one control command and reads its reply: the 4-byte result, and
/// the rest of the `fixed`-byte reply when it succeeded (GET_STATEBLOB's
/// 16-byte header always comes whole).
pub fn ctrl_cmd<S: Read + Write>(s: &mut S, code: u32, body: &[u8], fixed: usize) -> Vec<u8> {
    let mut m = code.to_be_bytes().to_vec();
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
    let mut r = vec![0u8; 4];
    s.read_exact(&mut r).unwrap();
    if be32(&r, 0) == 0 || code == 0x0c {
        r.resize(fixed, 0);
        s.read_exact(&mut r[4..]).unwrap();
    }
    r
}

/// GET_STATEBLOB for types 1, 2 and 3 with the DECRYPTED flag, as QEMU's
/// pre_save sends them.
pub fn get_blobs<S: Read + Write>(s: &mut S) -> Vec<StateBlob> {
    (1u32..=3)
        .map(|ty| {
            let mut body = 1u32.to_be_bytes().to_vec();
            body.extend_from_slice(&ty.to_be_bytes());
            body.extend_from_slice(&0u32.to_be_bytes());
            let hdr = ctrl_cmd(s, 0x0c, &body, 16);
            let mut data = vec![0u8; be32(&hdr, 12) as usize];
            s.read_exact(&mut data).unwrap();
            StateBlob {
                blob_type: ty,
                flags: be32(&hdr, 4),
                result: be32(&hdr, 0),
                data,
            }
        })
        .collect()
}

/// QEMU's post_load on a destination: STOP, SET_STATEBLOB for every
/// non-empty blob, INIT(DELETE_VOLATILE). Returns the first SET error, or
/// INIT's result.
pub fn put_blobs<S: Read + Write>(s: &mut S, blobs: &[StateBlob]) -> u32 {
    assert_eq!(be32(&ctrl_cmd(s, 0x0e, &[], 4), 0), 0, "STOP");
    for b in blobs.iter().filter(|b| !b.data.is_empty()) {
        let mut body = b.flags.to_be_bytes().to_vec();
        body.extend_from_slice(&b.blob_type.to_be_bytes());
        body.extend_from_slice(&(b.data.len() as u32).to_be_bytes());
        body.extend_from_slice(&b.data);
        let r = be32(&ctrl_cmd(s, 0x0d, &body, 4), 0);
        if r != 0 {
            return r;
        }
    }
    be32(&ctrl_cmd(s, 0x02, &[0, 0, 0, 1], 4), 0)
}
