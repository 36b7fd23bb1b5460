//! swtpm control commands onto the instance core, and the core's answers
//! (or [`InstanceError`]s) onto swtpm's result codes: the only place that
//! knows both.
//!
//! ```text
//!  wire::Request ──execute──▶ Vtpm::<typed call> ──Ok──▶ wire::Response
//!                                      └──Err(InstanceError)──result_code──▶ error_for(cmd, rc)
//! ```
//!
//! SET_DATAFD is the connection's business ([`super::ctrl`]) and never
//! reaches here.

use super::wire::{
    cmd, rc, Request, Response, CAPABILITIES, INIT_FLAG_DELETE_VOLATILE, STATE_FLAG_DECRYPTED,
    STATE_FLAG_ENCRYPTED,
};
use crate::instance::{BlobKind, InitFlags, InstanceError, Vtpm};
use crate::migration::piece::PieceError;
use crate::migration::save::SaveError;
use crate::migration::session::SessionError;
use crate::storage::blob::BlobError;
use crate::storage::swtpm_crypt::CryptError;
use vtpm_common::ctrl::INFO_CHUNK;

/// The swtpm result code for an instance error (swtpm's own code for the
/// same fault where it has one).
pub fn result_code(e: &InstanceError) -> u32 {
    match e {
        InstanceError::NotRunning | InstanceError::Running => rc::BAD_ORDINAL,
        InstanceError::BadLocality(_) => rc::BAD_LOCALITY,
        InstanceError::Engine(r) | InstanceError::PowerOn { rc: r, .. } => *r,
        InstanceError::StorageLock(_) => rc::IOERROR,
        InstanceError::ForeignEncrypted => rc::KEYNOTFOUND,
        InstanceError::NoBlob(_) => rc::RETRY,
        InstanceError::NoInfo(_) => rc::SIZE,
        InstanceError::Blob(b) => match b {
            BlobError::BadHeaderSize(_) => rc::BAD_DATASIZE,
            BlobError::BadVersion(_) => rc::BAD_VERSION,
            BlobError::SwtpmEncrypted(_) => rc::KEYNOTFOUND,
            _ => rc::BAD_PARAMETER,
        },
        InstanceError::MigrationKey(c) => match c {
            CryptError::NeedMigrationKey => rc::KEYNOTFOUND,
            CryptError::BadHmac | CryptError::BadPadding => rc::DECRYPT_ERROR,
            _ => rc::BAD_PARAMETER,
        },
        InstanceError::Migration(SessionError::UnknownBlobType(_)) => rc::FAIL,
        InstanceError::Migration(SessionError::Piece(p)) => piece_code(p),
        // QEMU prints its words for these codes next to the code: chosen
        // so that its log points at the cause (vtpmd's log says the rest).
        InstanceError::Save(e) => save_code(e),
        InstanceError::ExportNotPrepared => rc::ENCRYPT_ERROR,
        InstanceError::OtherInstance { .. } | InstanceError::NeverSaved { .. } => rc::BAD_PARAMETER,
        InstanceError::RollbackRefused { .. } => rc::BAD_VERSION,
        InstanceError::BadState { .. }
        | InstanceError::Startup(_)
        | InstanceError::Locked(_)
        | InstanceError::Storage(_)
        | InstanceError::LockBusy(_)
        | InstanceError::Persist(_)
        | InstanceError::Handover(_)
        | InstanceError::Migration(_)
        | InstanceError::Identity(_)
        | InstanceError::BadIdentity
        | InstanceError::Random
        | InstanceError::RestoreWhile(_)
        | InstanceError::ExportEncrypted
        | InstanceError::NotIncoming(_) => rc::FAIL,
    }
}

/// Answers request `req`, whose streamed data (if any) is `data`.
pub fn execute(vtpm: &Vtpm, req: &Request, data: &[u8]) -> Response {
    let code = req.code();
    match answer(vtpm, req, data) {
        Ok(resp) => resp,
        Err(e) => {
            let r = result_code(&e);
            log::error!("{}: {e} (answering {r:#x})", name(code));
            Response::error_for(code, r)
        }
    }
}

/// A refused save or restore: "key could not be found" for another
/// host's save, "decryption error" for a damaged or altered one,
/// "encryption error" when there is no key to seal to.
fn save_code(e: &SaveError) -> u32 {
    match e {
        SaveError::NoHostKey | SaveError::Key(_) => rc::ENCRYPT_ERROR,
        SaveError::Piece(p) => piece_code(p),
        SaveError::UnknownBlobType(_) | SaveError::Random | SaveError::NotStarted(_) => rc::FAIL,
        SaveError::Incomplete => rc::DECRYPT_ERROR,
    }
}

/// A refused sealed blob. A plaintext or swtpm-format blob where sealed
/// state is required gets swtpm's answer to a blob it has no key for.
fn piece_code(p: &PieceError) -> u32 {
    match p {
        PieceError::WrongHost { .. } | PieceError::Unwrap | PieceError::NotSealed => {
            rc::KEYNOTFOUND
        }
        PieceError::WrongPurpose { .. } | PieceError::Version(_) => rc::BAD_PARAMETER,
        PieceError::Random | PieceError::Wrap(_) => rc::FAIL,
        _ => rc::DECRYPT_ERROR,
    }
}

fn ok() -> Result<Response, InstanceError> {
    Ok(Response::Result(rc::SUCCESS))
}

fn blob_kind(ty: u32) -> Result<BlobKind, InstanceError> {
    BlobKind::from_number(ty).ok_or(InstanceError::Migration(SessionError::UnknownBlobType(ty)))
}

fn answer(vtpm: &Vtpm, req: &Request, data: &[u8]) -> Result<Response, InstanceError> {
    match *req {
        Request::GetCapability => Ok(Response::Capability(CAPABILITIES)),
        Request::Init { flags } => {
            vtpm.power_on(InitFlags {
                delete_volatile: flags & INIT_FLAG_DELETE_VOLATILE != 0,
            })?;
            ok()
        }
        Request::Shutdown => {
            vtpm.shutdown();
            ok()
        }
        Request::Stop => {
            vtpm.power_off();
            ok()
        }
        Request::GetTpmEstablished => Ok(Response::Established {
            result: rc::SUCCESS,
            established: vtpm.established()?,
        }),
        Request::SetLocality(loc) => vtpm.set_locality(loc).and_then(|()| ok()),
        Request::CancelTpmCmd => vtpm.cancel().and_then(|()| ok()),
        Request::HashStart => vtpm.hash_start().and_then(|()| ok()),
        Request::HashData { .. } => vtpm.hash_data(data).and_then(|()| ok()),
        Request::HashEnd => vtpm.hash_end().and_then(|()| ok()),
        Request::StoreVolatile => vtpm.store_volatile().and_then(|()| ok()),
        Request::ResetTpmEstablished(loc) => vtpm.reset_established(loc).and_then(|()| ok()),
        Request::GetStateBlob {
            flags,
            blob_type,
            offset,
        } => get_stateblob(vtpm, flags, blob_type, offset),
        Request::SetStateBlob {
            flags, blob_type, ..
        } => {
            if vtpm.is_running() {
                return Err(InstanceError::Running);
            }
            vtpm.import_blob(
                blob_kind(blob_type)?,
                data,
                flags & STATE_FLAG_ENCRYPTED != 0,
            )?;
            ok()
        }
        Request::GetConfig => Ok(Response::Config {
            flags: u32::from(vtpm.state_encrypted()),
        }),
        Request::SetDataFd => Ok(Response::Result(rc::FAIL)),
        Request::SetBufferSize(size) => {
            let s = vtpm.set_buffer_size(size)?;
            Ok(Response::BufferSize {
                size: s.size,
                min: s.min,
                max: s.max,
            })
        }
        Request::GetInfo { flags, offset } => get_info(vtpm, flags, offset),
        Request::LockStorage { retries } => vtpm.lock_storage(retries).and_then(|()| ok()),
    }
}

fn get_stateblob(vtpm: &Vtpm, flags: u32, ty: u32, offset: u32) -> Result<Response, InstanceError> {
    if !vtpm.is_running() {
        return Err(InstanceError::NotRunning);
    }
    let blob = vtpm.export_blob(blob_kind(ty)?, flags & STATE_FLAG_DECRYPTED != 0)?;
    let Some(rest) = blob.get(offset as usize..) else {
        return Ok(Response::error_for(cmd::GET_STATEBLOB, rc::BAD_PARAMETER));
    };
    Ok(Response::StateBlob {
        result: rc::SUCCESS,
        flags: 0,
        total: rest.len() as u32,
        data: rest.to_vec(),
    })
}

fn get_info(vtpm: &Vtpm, flags: u64, offset: u32) -> Result<Response, InstanceError> {
    let Ok(flags) = u32::try_from(flags) else {
        return Ok(Response::Result(rc::BAD_PARAMETER));
    };
    let mut bytes = vtpm.info(flags)?.into_bytes();
    bytes.push(0);
    let offset = offset as usize;
    if offset >= bytes.len() {
        return Ok(Response::Result(rc::BAD_PARAMETER));
    }
    let end = bytes.len().min(offset + INFO_CHUNK);
    Ok(Response::Info {
        total: bytes.len() as u32,
        chunk: bytes[offset..end].to_vec(),
    })
}

/// swtpm's name for a command, for log lines.
fn name(code: u32) -> &'static str {
    match code {
        cmd::INIT => "INIT",
        cmd::GET_TPMESTABLISHED => "GET_TPMESTABLISHED",
        cmd::SET_LOCALITY => "SET_LOCALITY",
        cmd::HASH_START => "HASH_START",
        cmd::HASH_DATA => "HASH_DATA",
        cmd::HASH_END => "HASH_END",
        cmd::CANCEL_TPM_CMD => "CANCEL_TPM_CMD",
        cmd::STORE_VOLATILE => "STORE_VOLATILE",
        cmd::RESET_TPMESTABLISHED => "RESET_TPMESTABLISHED",
        cmd::GET_STATEBLOB => "GET_STATEBLOB",
        cmd::SET_STATEBLOB => "SET_STATEBLOB",
        cmd::SET_BUFFERSIZE => "SET_BUFFERSIZE",
        cmd::GET_INFO => "GET_INFO",
        cmd::LOCK_STORAGE => "LOCK_STORAGE",
        _ => "control command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::blob::{decode_plain, encode_file, FLAG_ENCRYPTED};

    #[test]
    fn blob_faults_map_to_swtpm_codes() {
        let code = |b: &[u8]| result_code(&InstanceError::Blob(decode_plain(b).unwrap_err()));
        let mut b = encode_file(b"x");
        b[3] = 12;
        assert_eq!(code(&b), 0x2B);
        let mut b = encode_file(b"x");
        b[1] = 3;
        assert_eq!(code(&b), 0x2E);
        let mut b = encode_file(b"x");
        b[5] = FLAG_ENCRYPTED as u8;
        assert_eq!(code(&b), 0x0D);
        assert_eq!(code(b"short"), rc::BAD_PARAMETER);
    }

    #[test]
    fn state_faults_map_to_swtpm_codes() {
        assert_eq!(result_code(&InstanceError::NotRunning), rc::BAD_ORDINAL);
        assert_eq!(result_code(&InstanceError::Running), rc::BAD_ORDINAL);
        assert_eq!(
            result_code(&InstanceError::BadLocality(9)),
            rc::BAD_LOCALITY
        );
        assert_eq!(
            result_code(&InstanceError::ForeignEncrypted),
            rc::KEYNOTFOUND
        );
        assert_eq!(
            result_code(&InstanceError::ExportNotPrepared),
            rc::ENCRYPT_ERROR
        );
        assert_eq!(
            result_code(&InstanceError::Save(SaveError::Incomplete)),
            rc::DECRYPT_ERROR
        );
        assert_eq!(
            result_code(&InstanceError::RollbackRefused {
                restored: 1,
                newest: 2
            }),
            rc::BAD_VERSION
        );
        assert_eq!(
            result_code(&InstanceError::NoBlob(BlobKind::SaveState)),
            rc::RETRY
        );
        assert_eq!(result_code(&InstanceError::Engine(0x2e)), 0x2e);
    }
}
