//! The vTPM instance: the TPM engine, its state directory and the power
//! state machine every frontend drives.
//!
//! ```text
//!            INIT (MainInit)                 STOP / INIT / SHUTDOWN
//!  Stopped ───────────────────▶ Running ─────────────────────────▶ Stopped
//!    ▲  SET_STATEBLOB, SET_BUFFERSIZE(n)      TPM commands, GET_STATEBLOB,
//!    └─ allowed only here                     STORE_VOLATILE, HASH_*, ...
//! ```
//!
//! Leaving Running sends TPM2_Shutdown(STATE) first (unless the guest's last
//! command was a Shutdown, or `disable-auto-shutdown`), as swtpm does, so a
//! reset does not count as a dictionary-attack event.

use crate::ctrl::wire::{
    blob_type, cmd, rc, Request, Response, STATE_FLAG_DECRYPTED, STATE_FLAG_ENCRYPTED,
};
use crate::ctrl::wire::{CAPABILITIES, INIT_FLAG_DELETE_VOLATILE};
use crate::engine::{ffi, tpm2, Libtpms, StateType};
use crate::migration::session::{Phase, Receipt, Session};
use crate::migration::stream;
use crate::storage::{blob, StateDir, PERMANENT, VOLATILE};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use zeroize::Zeroizing;

/// Largest state blob SET_STATEBLOB accepts (swtpm's limit).
pub const MAX_STATE_BLOB: u32 = 512 * 1024;
/// GET_INFO hands out JSON in chunks of at most this size.
const INFO_CHUNK: usize = 3072;
/// libtpms's default and largest I/O buffer for TPM 2.
pub const DEFAULT_BUFFER_SIZE: u32 = 4096;

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("libtpms is already in use in this process")]
    EngineTaken,
    #[error("libtpms refused to start (TPM result {0:#x})")]
    Engine(u32),
    #[error("the existing TPM state in {dir} cannot be loaded (TPM result {rc:#x}); refusing to start a blank TPM in its place")]
    BadState { dir: String, rc: u32 },
    #[error("TPM start-up failed: {0}")]
    Startup(String),
}

/// Behaviour switches from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub disable_auto_shutdown: bool,
}

/// How a started TPM should be brought up (`--flags startup-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    Clear,
    State,
}

/// Everything guarded by the engine lock.
#[derive(Debug)]
struct Engine {
    tpm: Libtpms,
    running: bool,
    /// Requested buffer size, re-applied before every power-on.
    buffer_size: u32,
    last_was_shutdown: bool,
    /// A permanent blob was set since the last power-on: persist it after.
    permanent_set: bool,
    /// Migration lifecycle: while locked no TPM command runs.
    session: Session,
}

/// A vTPM shared by the control and data frontends.
#[derive(Debug)]
pub struct Vtpm {
    engine: Mutex<Engine>,
    store: Arc<StateDir>,
    opts: Options,
    running: AtomicBool,
    established: AtomicBool,
    io_size: AtomicU32,
}

impl Vtpm {
    /// Claims libtpms for `store` and checks that existing state loads.
    pub fn new(
        store: Arc<StateDir>,
        opts: Options,
        session: Session,
    ) -> Result<Vtpm, InstanceError> {
        let tpm = match Libtpms::take(store.clone()) {
            None => return Err(InstanceError::EngineTaken),
            Some(Err(rc)) => return Err(InstanceError::Engine(rc)),
            Some(Ok(t)) => t,
        };
        let mut engine = Engine {
            tpm,
            running: false,
            buffer_size: 0,
            last_was_shutdown: false,
            permanent_set: false,
            session,
        };
        if store.file_of(PERMANENT).exists() {
            if let Err(rc) = engine.tpm.validate_state(StateType::Permanent) {
                return Err(InstanceError::BadState {
                    dir: store.path().display().to_string(),
                    rc,
                });
            }
        }
        let (size, _, _) = engine.tpm.set_buffer_size(0);
        Ok(Vtpm {
            engine: Mutex::new(engine),
            store,
            opts,
            running: AtomicBool::new(false),
            established: AtomicBool::new(false),
            io_size: AtomicU32::new(size),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    pub fn store(&self) -> &StateDir {
        &self.store
    }

    /// Largest command or response the data channel may carry.
    pub fn io_size(&self) -> u32 {
        self.io_size.load(Ordering::SeqCst)
    }

    /// Powers the TPM on (as `--flags not-need-init`), optionally followed
    /// by TPM2_Startup.
    pub fn start(&self, startup: Option<Startup>) -> Result<(), InstanceError> {
        let r = self.init(0);
        if r != rc::SUCCESS {
            return Err(InstanceError::Startup(format!("INIT failed with {r:#x}")));
        }
        if let Some(s) = startup {
            let su = if s == Startup::Clear {
                tpm2::SU_CLEAR
            } else {
                tpm2::SU_STATE
            };
            let mut out = Vec::new();
            self.process(&tpm2::startup_command(su), &mut out);
            let code = tpm2::response_code(&out);
            if code != tpm2::RC_SUCCESS && code != tpm2::RC_INITIALIZE {
                return Err(InstanceError::Startup(format!(
                    "TPM2_Startup answered {code:#x}"
                )));
            }
        }
        Ok(())
    }

    /// Runs one data-channel command; the response is left in `out`.
    pub fn process(&self, command: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let mut e = self.lock();
        if !e.running {
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            return;
        }
        if !e.session.unlocked() {
            log::warn!(
                "TPM command refused: the instance is {:?}",
                e.session.phase()
            );
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            return;
        }
        if self.store.is_fenced() {
            // A TPM command after an outgoing state hand-off: the VM kept
            // running here, so this copy is the live one again.
            log::warn!("TPM command after GET_STATEBLOB(savestate): taking the state back");
            self.store.set_fenced(false);
        }
        let max = self.io_size() as usize;
        match e.tpm.process(command) {
            Ok(resp) if resp.len() >= tpm2::HEADER_LEN && resp.len() <= max => {
                out.extend_from_slice(resp);
            }
            Ok(resp) => {
                log::error!(
                    "libtpms produced a {}-byte response (limit {max}); answering TPM_RC_FAILURE",
                    resp.len()
                );
                out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            }
            Err(rc) => {
                log::error!("libtpms failed to process a command: {rc:#x}");
                out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            }
        }
        let code = tpm2::command_code(command);
        e.last_was_shutdown =
            code == Some(tpm2::CC_SHUTDOWN) && tpm2::response_code(out) == tpm2::RC_SUCCESS;
    }

    /// Answers a control request whose streamed data (if any) is `data`.
    /// SET_DATAFD is the frontend's business and is not handled here.
    pub fn control(&self, req: &Request, data: &[u8]) -> Response {
        let code = req.code();
        let result = match *req {
            Request::GetCapability => return Response::Capability(CAPABILITIES),
            Request::Init { flags } => self.init(flags),
            Request::Shutdown => {
                self.shutdown();
                rc::SUCCESS
            }
            Request::Stop => {
                self.power_off();
                rc::SUCCESS
            }
            Request::GetTpmEstablished => {
                if !self.is_running() {
                    return Response::error_for(code, rc::BAD_ORDINAL);
                }
                let established = self.established.load(Ordering::SeqCst);
                return Response::Established {
                    result: rc::SUCCESS,
                    established,
                };
            }
            Request::SetLocality(loc) => {
                if loc > 4 {
                    rc::BAD_LOCALITY
                } else {
                    ffi::set_locality(loc);
                    rc::SUCCESS
                }
            }
            Request::CancelTpmCmd => {
                if self.is_running() {
                    ffi::cancel_command();
                    rc::SUCCESS
                } else {
                    rc::BAD_ORDINAL
                }
            }
            Request::HashStart => self.running_op(|e| e.tpm.hash_start()),
            Request::HashData { .. } => self.running_op(|e| e.tpm.hash_data(data)),
            Request::HashEnd => self.running_op(|e| e.tpm.hash_end()),
            Request::StoreVolatile => self.store_volatile(),
            Request::ResetTpmEstablished(loc) => self.reset_established(loc),
            Request::GetStateBlob {
                flags,
                blob_type,
                offset,
            } => return self.get_stateblob(flags, blob_type, offset),
            Request::SetStateBlob {
                flags, blob_type, ..
            } => self.set_stateblob(flags, blob_type, data),
            Request::GetConfig => {
                return Response::Config {
                    flags: u32::from(self.store.has_key()),
                }
            }
            Request::SetDataFd => rc::FAIL,
            Request::SetBufferSize(size) => return self.set_buffer_size(size),
            Request::GetInfo { flags, offset } => return self.get_info(flags, offset),
            Request::LockStorage { retries } => self.lock_storage(retries),
        };
        if result == rc::SUCCESS {
            Response::Result(rc::SUCCESS)
        } else {
            Response::error_for(code, result)
        }
    }

    fn running_op(&self, f: impl FnOnce(&mut Engine) -> Result<(), u32>) -> u32 {
        let mut e = self.lock();
        if !e.running {
            return rc::BAD_ORDINAL;
        }
        let r = f(&mut e).err().unwrap_or(rc::SUCCESS);
        self.refresh_established(&mut e);
        r
    }

    fn refresh_established(&self, e: &mut Engine) {
        if e.running {
            let v = e.tpm.established().unwrap_or(false);
            self.established.store(v, Ordering::SeqCst);
        }
    }

    fn init(&self, flags: u32) -> u32 {
        let mut e = self.lock();
        if !e.session.unlocked() {
            if e.session.phase() != Phase::DestinationLocked {
                log::error!("INIT refused: the instance is {:?}", e.session.phase());
                return rc::FAIL;
            }
            let (perm, vol, id) = match e.session.take_verified() {
                Ok(v) => v,
                Err(err) => {
                    log::error!("INIT refused: {err}");
                    return rc::FAIL;
                }
            };
            self.power_off_locked(&mut e);
            let set = e
                .tpm
                .set_state(StateType::Permanent, Some(&perm))
                .and_then(|()| {
                    e.tpm
                        .set_state(StateType::Volatile, (!vol.is_empty()).then_some(&vol[..]))
                });
            if let Err(r) = set {
                log::error!("INIT: libtpms rejected the migrated state ({r:#x}); staying locked");
                e.session.relock_destination();
                return r;
            }
            e.permanent_set = true;
            let r = self.power_on_locked(&mut e, flags);
            if r == rc::SUCCESS {
                log::info!(
                    "migration {}: digest verified, destination unlocked",
                    crate::migration::keys::hex(&id)
                );
            } else {
                e.session.relock_destination();
            }
            return r;
        }
        self.power_off_locked(&mut e);
        self.power_on_locked(&mut e, flags)
    }

    fn power_on_locked(&self, e: &mut Engine, flags: u32) -> u32 {
        if e.buffer_size != 0 {
            let want = e.buffer_size;
            e.tpm.set_buffer_size(want);
        }
        if let Err(r) = e.tpm.main_init() {
            log::error!(
                "INIT: libtpms could not start the TPM (result {r:#x}); see earlier errors"
            );
            e.tpm.terminate();
            return r;
        }
        e.running = true;
        e.last_was_shutdown = false;
        self.running.store(true, Ordering::SeqCst);
        let (size, _, _) = e.tpm.set_buffer_size(0);
        self.io_size.store(size, Ordering::SeqCst);
        if e.permanent_set {
            e.permanent_set = false;
            // The state came through SET_STATEBLOB: make it this directory's
            // state now, or a crash would bring back the old one.
            let persisted = e
                .tpm
                .get_state(StateType::Permanent)
                .map_err(|r| format!("libtpms result {r:#x}"))
                .and_then(|s| {
                    // libtpms usually stored it itself while starting up:
                    // then it is on disk already, durably.
                    let on_disk = self.store.read_blob(PERMANENT).ok().flatten();
                    if on_disk.as_deref().map(|d| &d[..]) == Some(&s[..]) {
                        return Ok(());
                    }
                    self.store
                        .write_blob(PERMANENT, &s)
                        .map_err(|err| err.to_string())
                });
            if let Err(why) = persisted {
                log::error!("INIT: could not persist the received permanent state: {why}");
                self.power_off_locked(e);
                return rc::FAIL;
            }
        }
        if flags & INIT_FLAG_DELETE_VOLATILE != 0 {
            if let Err(err) = self.store.remove_blob(VOLATILE) {
                log::warn!("INIT: could not delete the volatile state: {err}");
            }
        }
        self.refresh_established(e);
        log::info!("TPM powered on (I/O buffer {size} bytes)");
        rc::SUCCESS
    }

    /// CMD_SHUTDOWN: after a completed export this is QEMU quitting at the
    /// end of a successful migration, so the source copy is erased.
    pub fn shutdown(&self) {
        let mut e = self.lock();
        if let Some(t) = e.session.shutdown_after_export() {
            self.erase_for_migration(&t);
        }
        self.power_off_locked(&mut e);
    }

    fn erase_for_migration(&self, t: &crate::migration::session::Tombstone) {
        let json = serde_json::to_vec_pretty(t).unwrap_or_default();
        match self.store.erase_with_tombstone(&json) {
            Ok(()) => log::warn!(
                "migration {}: TPM handed over to {}; local state erased, tombstone left",
                t.migration_id,
                t.destination_key
            ),
            Err(err) => log::error!(
                "migration {}: erasing the source state failed: {err}",
                t.migration_id
            ),
        }
    }

    /// Handles one admin-channel request (see `admin`).
    pub fn admin(&self, op: &str, args: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut e = self.lock();
        let s = |k: &str| {
            args.get(k)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("'{k}' (a string) is required"))
        };
        match op {
            "status" => {
                let mut v = e.session.status();
                v["tpm_running"] = e.running.into();
                Ok(v)
            }
            "incoming-info" => e.session.issue_incoming().map_err(|x| x.to_string()),
            "incoming-key" => e
                .session
                .preload_key(s("wrapped_key")?)
                .map_err(|x| x.to_string()),
            "outgoing" => e
                .session
                .prepare_outgoing(s("peer_key")?, s("migration_id")?)
                .map_err(|x| x.to_string()),
            "abort" => {
                e.session.abort().map_err(|x| x.to_string())?;
                self.store.set_fenced(false);
                Ok(e.session.status())
            }
            "receipt" => e
                .session
                .receipt()
                .map(|r| serde_json::json!(r))
                .map_err(|x| x.to_string()),
            "complete" => {
                let r: Receipt =
                    serde_json::from_value(args.get("receipt").cloned().unwrap_or_default())
                        .map_err(|x| format!("'receipt' is not a receipt: {x}"))?;
                let t = e.session.complete(&r).map_err(|x| x.to_string())?;
                self.erase_for_migration(&t);
                Ok(serde_json::json!(t))
            }
            other => Err(format!(
                "unknown op '{other}' (status, incoming-info, incoming-key, outgoing, abort, receipt, complete)"
            )),
        }
    }

    /// Stops the TPM (STOP, SHUTDOWN, process exit).
    pub fn power_off(&self) {
        let mut e = self.lock();
        self.power_off_locked(&mut e);
    }

    fn power_off_locked(&self, e: &mut Engine) {
        if !e.running {
            return;
        }
        if !self.opts.disable_auto_shutdown && !e.last_was_shutdown && !self.store.is_fenced() {
            for su in [tpm2::SU_STATE, tpm2::SU_CLEAR] {
                let rc = e
                    .tpm
                    .process(&tpm2::shutdown_command(su))
                    .map(tpm2::response_code);
                if matches!(rc, Ok(tpm2::RC_SUCCESS | tpm2::RC_INITIALIZE)) {
                    break;
                }
            }
        }
        e.tpm.terminate();
        e.running = false;
        self.running.store(false, Ordering::SeqCst);
        log::info!("TPM powered off");
    }

    fn store_volatile(&self) -> u32 {
        let mut e = self.lock();
        if !e.running {
            return rc::BAD_ORDINAL;
        }
        match e.tpm.volatile_store() {
            Ok(v) => match self.store.write_blob(VOLATILE, &v) {
                Ok(()) => rc::SUCCESS,
                Err(err) => {
                    log::error!("STORE_VOLATILE: {err}");
                    rc::FAIL
                }
            },
            Err(r) => r,
        }
    }

    fn reset_established(&self, loc: u8) -> u32 {
        if loc > 4 {
            return rc::BAD_LOCALITY;
        }
        self.running_op(|e| {
            let saved = ffi::locality();
            ffi::set_locality(loc);
            let r = e.tpm.reset_established();
            ffi::set_locality(saved);
            r
        })
    }

    fn get_stateblob(&self, flags: u32, ty: u32, offset: u32) -> Response {
        let fail = |r| Response::error_for(cmd::GET_STATEBLOB, r);
        let mut e = self.lock();
        if !e.running {
            return fail(rc::BAD_ORDINAL);
        }
        if self.store.has_key() && flags & STATE_FLAG_DECRYPTED == 0 {
            log::error!(
                "GET_STATEBLOB: exporting state still under the state-file key is not supported"
            );
            return fail(rc::FAIL);
        }
        let Engine { tpm, session, .. } = &mut *e;
        let sealed = session.export(ty, || {
            let perm = tpm
                .get_state(StateType::Permanent)
                .map_err(|r| format!("permanent state: {r:#x}"))?;
            let vol = tpm
                .get_state(StateType::Volatile)
                .map_err(|r| format!("volatile state: {r:#x}"))?;
            Ok((Zeroizing::new(perm), Zeroizing::new(vol)))
        });
        let wire = match sealed {
            Ok(Some(blob)) => {
                // From the first sealed blob on, this copy is frozen.
                self.store.set_fenced(true);
                blob
            }
            Ok(None) if e.session.allow_plain() => match self.plain_blob(&mut e, ty) {
                Ok(w) => w,
                Err(r) => return fail(r),
            },
            Ok(None) => {
                log::error!(
                    "GET_STATEBLOB refused: no migration is prepared for this vTPM (run `vtpmctl outgoing` \
                     first); plaintext export needs --allow-plaintext-migration"
                );
                return fail(rc::FAIL);
            }
            Err(err) => {
                log::error!("GET_STATEBLOB type {ty}: {err}");
                return fail(rc::FAIL);
            }
        };
        let Some(rest) = wire.get(offset as usize..) else {
            return fail(rc::BAD_PARAMETER);
        };
        Response::StateBlob {
            result: rc::SUCCESS,
            flags: 0,
            total: rest.len() as u32,
            data: rest.to_vec(),
        }
    }

    /// Device-state SAVE (vhost-user): the blobs GET_STATEBLOB hands out,
    /// laid end to end ([`stream`]). The same rules apply: sealed pieces for
    /// a prepared migration, after which this copy is locked; plaintext only
    /// with --allow-plaintext-migration; otherwise refused.
    pub fn export_state_stream(&self) -> Result<Vec<u8>, String> {
        let mut blobs = Vec::new();
        for ty in [
            blob_type::PERMANENT,
            blob_type::VOLATILE,
            blob_type::SAVESTATE,
        ] {
            if ty == blob_type::SAVESTATE && self.lock().session.phase() != Phase::SourceLocked {
                // Plaintext export has no third blob.
                break;
            }
            match self.get_stateblob(STATE_FLAG_DECRYPTED, ty, 0) {
                Response::StateBlob {
                    result: rc::SUCCESS,
                    data,
                    ..
                } => blobs.push((ty, data)),
                Response::StateBlob { result, .. } => {
                    return Err(format!(
                    "state blob type {ty} refused (result {result:#x}); the reason is logged above"
                ))
                }
                other => return Err(format!("state blob type {ty}: unexpected {other:?}")),
            }
        }
        Ok(stream::encode(&blobs))
    }

    /// Device-state LOAD (vhost-user): the stream's blobs go through
    /// SET_STATEBLOB, then INIT, exactly as QEMU sends them, so a sealed
    /// destination unlocks only when the migration digest matches. On
    /// failure a destination stays locked and can be given a new migration
    /// id (`vtpmctl incoming-info`) for another attempt.
    pub fn import_state_stream(&self, bytes: &[u8]) -> Result<(), String> {
        let result = self.import_blobs(bytes);
        if result.is_err() {
            let mut e = self.lock();
            if e.session.phase() == Phase::DestinationLocked {
                e.session.relock_destination();
            }
        }
        result
    }

    fn import_blobs(&self, bytes: &[u8]) -> Result<(), String> {
        let blobs = stream::decode(bytes).map_err(|e| e.to_string())?;
        {
            let e = self.lock();
            let phase = e.session.phase();
            if e.session.has_host_key() && phase != Phase::DestinationLocked {
                return Err(format!(
                    "this instance is {phase:?}, not waiting for an incoming migration \
                     (start it with --migration incoming); its TPM is left as it is"
                ));
            }
        }
        if self.is_running() {
            // Only an instance without a host key gets here running (a
            // sealed destination starts powered off); the load replaces it.
            log::warn!("device state LOAD: replacing the running TPM's state");
            self.power_off();
        }
        for (ty, data) in blobs {
            let r = self.set_stateblob(0, ty, data);
            if r != rc::SUCCESS {
                return Err(format!(
                    "state blob type {ty} refused (result {r:#x}); the reason is logged above"
                ));
            }
        }
        match self.init(0) {
            rc::SUCCESS => Ok(()),
            r => Err(format!(
                "the loaded state did not start (result {r:#x}); the reason is logged above"
            )),
        }
    }

    /// A guest reset reported by a frontend that has no CMD_INIT
    /// (vhost-user RESET_DEVICE): power-cycle the TPM as INIT does. While the
    /// instance is locked for a migration nothing happens.
    pub fn reset(&self) {
        if !self.lock().session.unlocked() {
            log::warn!("device reset ignored: the instance is locked for a migration");
            return;
        }
        let r = self.init(0);
        if r != rc::SUCCESS {
            log::error!("device reset: the TPM did not restart (result {r:#x})");
        }
    }

    /// swtpm's unprotected blob format, only with --allow-plaintext-migration.
    fn plain_blob(&self, e: &mut Engine, ty: u32) -> Result<Vec<u8>, u32> {
        let state = match ty {
            blob_type::PERMANENT => e.tpm.get_state(StateType::Permanent),
            blob_type::VOLATILE => e.tpm.get_state(StateType::Volatile),
            blob_type::SAVESTATE => return Err(rc::RETRY),
            _ => return Err(rc::FAIL),
        };
        let state = match state {
            Ok(s) if !s.is_empty() => Zeroizing::new(s),
            Ok(_) => return Err(rc::RETRY),
            Err(r) => return Err(r),
        };
        if ty == blob_type::VOLATILE {
            if let Err(err) = self.store.remove_blob(VOLATILE) {
                log::warn!("GET_STATEBLOB: could not delete the volatile state file: {err}");
            }
        }
        log::warn!("GET_STATEBLOB: handing out TPM state type {ty} UNENCRYPTED (--allow-plaintext-migration)");
        Ok(blob::encode_migration(&state))
    }

    fn set_stateblob(&self, flags: u32, ty: u32, data: &[u8]) -> u32 {
        let mut e = self.lock();
        if e.running {
            log::error!("SET_STATEBLOB refused: the TPM is running (send STOP first)");
            return rc::BAD_ORDINAL;
        }
        let st = match ty {
            blob_type::PERMANENT => StateType::Permanent,
            blob_type::VOLATILE => StateType::Volatile,
            blob_type::SAVESTATE => StateType::SaveState,
            _ => {
                log::error!("SET_STATEBLOB: unknown blob type {ty}");
                return rc::FAIL;
            }
        };
        if flags & STATE_FLAG_ENCRYPTED != 0 {
            log::error!(
                "SET_STATEBLOB: the blob is encrypted with a state-file key vtpmd does not have"
            );
            return rc::KEYNOTFOUND;
        }
        if let Err(err) = self.store.lock() {
            log::error!("SET_STATEBLOB: {err}");
            return rc::IOERROR;
        }
        if e.session.has_host_key() {
            // Sealed migration only: no plaintext or swtpm blobs (no downgrade).
            return match e.session.import(ty, data) {
                Ok(()) => rc::SUCCESS,
                Err(err) => {
                    log::error!("SET_STATEBLOB type {ty} refused: {err}");
                    rc::FAIL
                }
            };
        }
        let result = if data.is_empty() {
            e.tpm.set_state(st, None)
        } else {
            match blob::decode_plain(data) {
                Ok(raw) => e.tpm.set_state(st, Some(&raw)),
                Err(err) => {
                    log::error!("SET_STATEBLOB type {ty}: {err}");
                    return err.tpm_result();
                }
            }
        };
        match result {
            Ok(()) => {
                if st == StateType::Permanent {
                    e.permanent_set = !data.is_empty();
                }
                rc::SUCCESS
            }
            Err(r) => {
                log::error!("SET_STATEBLOB type {ty}: libtpms rejected the state (result {r:#x})");
                e.permanent_set = false;
                r
            }
        }
    }

    fn set_buffer_size(&self, wanted: u32) -> Response {
        let mut e = self.lock();
        if wanted > 0 && e.running {
            return Response::Result(rc::BAD_ORDINAL);
        }
        let (size, min, max) = e.tpm.set_buffer_size(wanted);
        if wanted > 0 {
            e.buffer_size = size;
            self.io_size.store(size, Ordering::SeqCst);
        }
        Response::BufferSize { size, min, max }
    }

    fn get_info(&self, flags: u64, offset: u32) -> Response {
        let mut e = self.lock();
        let Ok(flags) = u32::try_from(flags) else {
            return Response::Result(rc::BAD_PARAMETER);
        };
        let Some(json) = e.tpm.get_info(flags) else {
            return Response::Result(0x17);
        };
        let mut bytes = json.into_bytes();
        bytes.push(0);
        let offset = offset as usize;
        if offset >= bytes.len() {
            return Response::Result(rc::BAD_PARAMETER);
        }
        let end = bytes.len().min(offset + INFO_CHUNK);
        Response::Info {
            total: bytes.len() as u32,
            chunk: bytes[offset..end].to_vec(),
        }
    }

    fn lock_storage(&self, retries: u32) -> u32 {
        if self.lock().session.resume_source() {
            // The VM resumed here after a failed migration: carry on.
            self.store.set_fenced(false);
        }
        for attempt in 0..=retries {
            match self.store.lock() {
                Ok(()) => {
                    self.store.set_fenced(false);
                    return rc::SUCCESS;
                }
                Err(err) if attempt == retries => log::error!("LOCK_STORAGE: {err}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        rc::FAIL
    }
}
