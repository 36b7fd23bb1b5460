//! Control-channel framing: decoding requests and encoding responses,
//! byte for byte as swtpm's `CMD_*` protocol (swtpm_ioctls(3)).
//!
//! A request is `be32 command` plus a body whose size the command fixes;
//! SET_STATEBLOB and HASH_DATA carry a length and stream their data after the
//! fixed part. A response is only the command's `resp` part. Errors are a
//! bare `be32 result`, except GET_STATEBLOB (always its 16-byte header),
//! GET_TPMESTABLISHED (always 8 bytes) and GET_CAPABILITY (never fails).

use thiserror::Error;
use vtpm_common::reader::ByteReader;

pub use vtpm_common::ctrl::cmd;

/// Result codes (TPM 1.2 values, as swtpm uses them for TPM 2 too).
pub mod rc {
    pub const SUCCESS: u32 = 0x00;
    pub const BAD_PARAMETER: u32 = 0x03;
    pub const FAIL: u32 = 0x09;
    pub const BAD_ORDINAL: u32 = 0x0a;
    pub const KEYNOTFOUND: u32 = 0x0d;
    /// TPM_SIZE: GET_INFO with flags the engine has nothing for.
    pub const SIZE: u32 = 0x17;
    /// TPM_BAD_DATASIZE: a state blob whose header size is not 10.
    pub const BAD_DATASIZE: u32 = 0x2b;
    /// TPM_BAD_VERSION: a state blob newer than this build reads.
    pub const BAD_VERSION: u32 = 0x2e;
    pub const IOERROR: u32 = 0x1f;
    pub const ENCRYPT_ERROR: u32 = 0x20;
    pub const DECRYPT_ERROR: u32 = 0x21;
    pub const BAD_LOCALITY: u32 = 0x3d;
    pub const RETRY: u32 = 0x800;
}

/// Capability bits for every command vtpmd implements: INIT through
/// LOCK_STORAGE. The TCG send-command header (bit 15) is not offered.
pub const CAPABILITIES: u32 = 0x0001_7FFF;

/// GET_STATEBLOB / SET_STATEBLOB blob types.
pub mod blob_type {
    pub const PERMANENT: u32 = 1;
    pub const VOLATILE: u32 = 2;
    pub const SAVESTATE: u32 = 3;
}

/// `state_flags` bit: hand out the state without the state-file key layer.
pub const STATE_FLAG_DECRYPTED: u32 = 1;
/// `state_flags` bit: the blob's inner layer is still encrypted.
pub const STATE_FLAG_ENCRYPTED: u32 = 2;
pub use vtpm_common::ctrl::INIT_FLAG_DELETE_VOLATILE;

/// A decoded control request. Streamed data (SET_STATEBLOB, HASH_DATA)
/// follows the fixed part and is read by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetCapability,
    Init {
        flags: u32,
    },
    Shutdown,
    GetTpmEstablished,
    SetLocality(u8),
    HashStart,
    HashData {
        len: u32,
    },
    HashEnd,
    CancelTpmCmd,
    StoreVolatile,
    ResetTpmEstablished(u8),
    GetStateBlob {
        flags: u32,
        blob_type: u32,
        offset: u32,
    },
    SetStateBlob {
        flags: u32,
        blob_type: u32,
        len: u32,
    },
    Stop,
    GetConfig,
    SetDataFd,
    SetBufferSize(u32),
    GetInfo {
        flags: u64,
        offset: u32,
    },
    LockStorage {
        retries: u32,
    },
}

impl Request {
    /// The command code this request was decoded from.
    pub fn code(&self) -> u32 {
        match self {
            Request::GetCapability => cmd::GET_CAPABILITY,
            Request::Init { .. } => cmd::INIT,
            Request::Shutdown => cmd::SHUTDOWN,
            Request::GetTpmEstablished => cmd::GET_TPMESTABLISHED,
            Request::SetLocality(_) => cmd::SET_LOCALITY,
            Request::HashStart => cmd::HASH_START,
            Request::HashData { .. } => cmd::HASH_DATA,
            Request::HashEnd => cmd::HASH_END,
            Request::CancelTpmCmd => cmd::CANCEL_TPM_CMD,
            Request::StoreVolatile => cmd::STORE_VOLATILE,
            Request::ResetTpmEstablished(_) => cmd::RESET_TPMESTABLISHED,
            Request::GetStateBlob { .. } => cmd::GET_STATEBLOB,
            Request::SetStateBlob { .. } => cmd::SET_STATEBLOB,
            Request::Stop => cmd::STOP,
            Request::GetConfig => cmd::GET_CONFIG,
            Request::SetDataFd => cmd::SET_DATAFD,
            Request::SetBufferSize(_) => cmd::SET_BUFFERSIZE,
            Request::GetInfo { .. } => cmd::GET_INFO,
            Request::LockStorage { .. } => cmd::LOCK_STORAGE,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// More bytes are needed; `need` is the total the fixed part takes.
    /// `usable`: what is there already decodes if no more arrives (a
    /// locality byte sent without its padding, as tpm2-tss does).
    #[error("request incomplete: have {have} of {need} bytes")]
    Incomplete {
        have: usize,
        need: usize,
        usable: bool,
    },
    #[error("unknown control command {0:#x}")]
    Unknown(u32),
    #[error("command {cmd:#x} takes a {expected}-byte body, got {got}")]
    BadLength {
        cmd: u32,
        expected: usize,
        got: usize,
    },
}

impl DecodeError {
    /// The result code to answer with (Incomplete only once no more data comes).
    pub fn result_code(&self) -> u32 {
        match self {
            DecodeError::Unknown(_) => rc::BAD_ORDINAL,
            _ => rc::BAD_PARAMETER,
        }
    }
}

/// Body size of each command's fixed part, None for unknown codes.
fn body_len(code: u32) -> Option<usize> {
    Some(match code {
        cmd::INIT | cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED | cmd::SET_BUFFERSIZE => 4,
        cmd::LOCK_STORAGE | cmd::HASH_DATA => 4,
        cmd::GET_STATEBLOB | cmd::SET_STATEBLOB => 12,
        cmd::GET_INFO => 16,
        cmd::GET_CAPABILITY | cmd::SHUTDOWN | cmd::GET_TPMESTABLISHED | cmd::HASH_START => 0,
        cmd::HASH_END | cmd::CANCEL_TPM_CMD | cmd::STORE_VOLATILE | cmd::STOP => 0,
        cmd::GET_CONFIG | cmd::SET_DATAFD => 0,
        _ => return None,
    })
}

/// Decodes one request from `buf`, which holds everything received so far.
///
/// `final_read` says no more bytes will arrive for this request: a short
/// locality byte (swtpm accepts one byte without padding) is then taken as
/// is, and anything else still incomplete is an error. For SET_STATEBLOB and
/// HASH_DATA, bytes past the fixed part are the start of the streamed data;
/// for every other command they make the request malformed.
pub fn decode(buf: &[u8], final_read: bool) -> Result<Request, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Incomplete {
            have: buf.len(),
            need: 4,
            usable: false,
        });
    }
    let code = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let expected = body_len(code).ok_or(DecodeError::Unknown(code))?;
    let body = &buf[4..];
    let streams = matches!(code, cmd::SET_STATEBLOB | cmd::HASH_DATA);
    let short_locality =
        matches!(code, cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED) && !body.is_empty();
    if body.len() < expected && !(final_read && short_locality) {
        return Err(if final_read {
            DecodeError::BadLength {
                cmd: code,
                expected,
                got: body.len(),
            }
        } else {
            DecodeError::Incomplete {
                have: buf.len(),
                need: 4 + expected,
                usable: short_locality,
            }
        });
    }
    if body.len() > expected && !streams {
        return Err(DecodeError::BadLength {
            cmd: code,
            expected,
            got: body.len(),
        });
    }
    // The length checks above guarantee every field below is present; the
    // reader checks again rather than trusting that.
    let bad = |_| DecodeError::BadLength {
        cmd: code,
        expected,
        got: body.len(),
    };
    let mut r = ByteReader::new(body);
    Ok(match code {
        cmd::GET_CAPABILITY => Request::GetCapability,
        cmd::INIT => Request::Init {
            flags: r.u32("flags").map_err(bad)?,
        },
        cmd::SHUTDOWN => Request::Shutdown,
        cmd::GET_TPMESTABLISHED => Request::GetTpmEstablished,
        cmd::SET_LOCALITY => Request::SetLocality(r.u8("locality").map_err(bad)?),
        cmd::HASH_START => Request::HashStart,
        cmd::HASH_DATA => Request::HashData {
            len: r.u32("length").map_err(bad)?,
        },
        cmd::HASH_END => Request::HashEnd,
        cmd::CANCEL_TPM_CMD => Request::CancelTpmCmd,
        cmd::STORE_VOLATILE => Request::StoreVolatile,
        cmd::RESET_TPMESTABLISHED => Request::ResetTpmEstablished(r.u8("locality").map_err(bad)?),
        cmd::GET_STATEBLOB => Request::GetStateBlob {
            flags: r.u32("flags").map_err(bad)?,
            blob_type: r.u32("type").map_err(bad)?,
            offset: r.u32("offset").map_err(bad)?,
        },
        cmd::SET_STATEBLOB => Request::SetStateBlob {
            flags: r.u32("flags").map_err(bad)?,
            blob_type: r.u32("type").map_err(bad)?,
            len: r.u32("length").map_err(bad)?,
        },
        cmd::STOP => Request::Stop,
        cmd::GET_CONFIG => Request::GetConfig,
        cmd::SET_DATAFD => Request::SetDataFd,
        cmd::SET_BUFFERSIZE => Request::SetBufferSize(r.u32("size").map_err(bad)?),
        cmd::GET_INFO => Request::GetInfo {
            flags: r.u64("flags").map_err(bad)?,
            offset: r.u32("offset").map_err(bad)?,
        },
        cmd::LOCK_STORAGE => Request::LockStorage {
            retries: r.u32("retries").map_err(bad)?,
        },
        _ => return Err(DecodeError::Unknown(code)),
    })
}

/// Length of the fixed part of `req` on the wire, including the code.
pub fn fixed_len(req: &Request) -> usize {
    4 + body_len(req.code()).unwrap_or(0)
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A bare result: every error, and the success of result-only commands.
    Result(u32),
    Capability(u32),
    /// Always 8 bytes, even on error.
    Established {
        result: u32,
        established: bool,
    },
    BufferSize {
        size: u32,
        min: u32,
        max: u32,
    },
    /// Always the 16-byte header; data only on success.
    StateBlob {
        result: u32,
        flags: u32,
        total: u32,
        data: Vec<u8>,
    },
    Config {
        flags: u32,
    },
    Info {
        total: u32,
        chunk: Vec<u8>,
    },
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        let mut put = |v: u32| out.extend_from_slice(&v.to_be_bytes());
        match self {
            Response::Result(r) => put(*r),
            Response::Capability(caps) => {
                put(rc::SUCCESS);
                put(*caps);
            }
            Response::Established {
                result,
                established,
            } => {
                put(*result);
                put(if *established { 0x0100_0000 } else { 0 });
            }
            Response::BufferSize { size, min, max } => {
                put(rc::SUCCESS);
                put(*size);
                put(*min);
                put(*max);
            }
            Response::StateBlob {
                result,
                flags,
                total,
                data,
            } => {
                put(*result);
                put(*flags);
                put(*total);
                put(data.len() as u32);
                out.extend_from_slice(data);
            }
            Response::Config { flags } => {
                put(rc::SUCCESS);
                put(*flags);
            }
            Response::Info { total, chunk } => {
                put(rc::SUCCESS);
                put(*total);
                put(chunk.len() as u32);
                out.extend_from_slice(chunk);
            }
        }
        out
    }

    /// The error response for command `code`, with the length rule above.
    pub fn error_for(code: u32, result: u32) -> Response {
        match code {
            cmd::GET_STATEBLOB => Response::StateBlob {
                result,
                flags: 0,
                total: 0,
                data: Vec::new(),
            },
            cmd::GET_TPMESTABLISHED => Response::Established {
                result,
                established: false,
            },
            _ => Response::Result(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn req(code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Every command with its canonical request bytes and decoding.
    fn all() -> Vec<(Vec<u8>, Request)> {
        vec![
            (req(1, &[]), Request::GetCapability),
            (req(2, &[0, 0, 0, 1]), Request::Init { flags: 1 }),
            (req(3, &[]), Request::Shutdown),
            (req(4, &[]), Request::GetTpmEstablished),
            (req(5, &[3, 0, 0, 0]), Request::SetLocality(3)),
            (req(6, &[]), Request::HashStart),
            (req(7, &[0, 0, 0, 5]), Request::HashData { len: 5 }),
            (req(8, &[]), Request::HashEnd),
            (req(9, &[]), Request::CancelTpmCmd),
            (req(10, &[]), Request::StoreVolatile),
            (req(11, &[4, 0, 0, 0]), Request::ResetTpmEstablished(4)),
            (
                req(12, &[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 7]),
                Request::GetStateBlob {
                    flags: 1,
                    blob_type: 2,
                    offset: 7,
                },
            ),
            (
                req(13, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 5, 0x29]),
                Request::SetStateBlob {
                    flags: 0,
                    blob_type: 1,
                    len: 0x529,
                },
            ),
            (req(14, &[]), Request::Stop),
            (req(15, &[]), Request::GetConfig),
            (req(16, &[]), Request::SetDataFd),
            (req(17, &[0, 0, 0x0f, 0x80]), Request::SetBufferSize(3968)),
            (
                req(18, &[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 0]),
                Request::GetInfo {
                    flags: 3,
                    offset: 9,
                },
            ),
            (
                req(19, &[0, 0, 1, 0x2c]),
                Request::LockStorage { retries: 300 },
            ),
        ]
    }

    #[test]
    fn decodes_every_command() {
        for (bytes, want) in all() {
            assert_eq!(decode(&bytes, false), Ok(want.clone()), "{bytes:02x?}");
            assert_eq!(fixed_len(&want), bytes.len());
            assert_eq!(want.code(), be32(&bytes, 0));
        }
    }

    #[test]
    fn truncated_requests_are_incomplete_then_rejected() {
        for (bytes, _) in all() {
            for n in 0..bytes.len() {
                let r = decode(&bytes[..n], false);
                assert!(
                    matches!(r, Err(DecodeError::Incomplete { .. })),
                    "{bytes:02x?}[..{n}] -> {r:?}"
                );
                if n >= 4 {
                    let code = be32(&bytes, 0);
                    let fin = decode(&bytes[..n], true);
                    let lenient =
                        n > 4 && matches!(code, cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED);
                    assert_eq!(fin.is_ok(), lenient, "{bytes:02x?}[..{n}] final -> {fin:?}");
                }
            }
        }
    }

    #[test]
    fn oversized_requests_are_bad_parameter() {
        for (mut bytes, want) in all() {
            bytes.push(0xaa);
            let r = decode(&bytes, false);
            match want {
                Request::SetStateBlob { .. } | Request::HashData { .. } => assert!(r.is_ok()),
                _ => {
                    let e = r.unwrap_err();
                    assert!(matches!(e, DecodeError::BadLength { .. }), "{e:?}");
                    assert_eq!(e.result_code(), rc::BAD_PARAMETER);
                }
            }
        }
    }

    #[test]
    fn garbage_and_unknown_codes() {
        assert_eq!(decode(&req(0, &[]), false), Err(DecodeError::Unknown(0)));
        assert_eq!(
            decode(&req(0x14, &[]), false),
            Err(DecodeError::Unknown(0x14))
        );
        assert_eq!(
            decode(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], false),
            Err(DecodeError::Unknown(0xdeadbeef))
        );
        assert_eq!(DecodeError::Unknown(0x14).result_code(), rc::BAD_ORDINAL);
    }

    #[test]
    fn response_sizes_follow_the_compatibility_rule() {
        assert_eq!(
            Response::Capability(CAPABILITIES).encode(),
            vec![0, 0, 0, 0, 0, 1, 0x7f, 0xff]
        );
        assert_eq!(Response::Result(0).encode().len(), 4);
        assert_eq!(
            Response::error_for(cmd::SET_BUFFERSIZE, rc::BAD_ORDINAL).encode(),
            vec![0, 0, 0, 0x0a]
        );
        assert_eq!(Response::error_for(cmd::INIT, rc::FAIL).encode().len(), 4);
        assert_eq!(
            Response::error_for(cmd::GET_STATEBLOB, rc::RETRY).encode(),
            vec![0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            Response::error_for(cmd::GET_TPMESTABLISHED, rc::BAD_ORDINAL)
                .encode()
                .len(),
            8
        );
        assert_eq!(
            Response::Established {
                result: 0,
                established: true
            }
            .encode(),
            vec![0, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(
            Response::BufferSize {
                size: 3968,
                min: 2808,
                max: 4096
            }
            .encode(),
            vec![0, 0, 0, 0, 0, 0, 0x0f, 0x80, 0, 0, 0x0a, 0xf8, 0, 0, 0x10, 0]
        );
        let blob = Response::StateBlob {
            result: 0,
            flags: 0,
            total: 3,
            data: vec![1, 2, 3],
        }
        .encode();
        assert_eq!(
            blob,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 1, 2, 3]
        );
        assert_eq!(
            Response::Config { flags: 1 }.encode(),
            vec![0, 0, 0, 0, 0, 0, 0, 1]
        );
        let info = Response::Info {
            total: 10,
            chunk: b"{}\0".to_vec(),
        }
        .encode();
        assert_eq!(&info[..12], &[0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 3]);
    }
}
