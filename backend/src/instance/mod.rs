//! The instance core: one vTPM (its engine, state directory and migration
//! session) and the typed operations every frontend drives. It knows no
//! wire format: the swtpm control channel, vhost-user and the admin socket
//! each map their requests onto these calls and [`InstanceError`] onto
//! their own results.
//!
//! ```text
//!            power_on                          power_off / power_on / shutdown
//!  Stopped ───────────▶ Running ─────────────────────────────────────────▶ Stopped
//!    ▲  import_blob, set_buffer_size        process, export_blob, store_volatile,
//!    └─ allowed only here                   hash_*, established, ...
//! ```
//!
//! Leaving Running sends TPM2_Shutdown(STATE) first (unless the guest's last
//! command was a Shutdown, or `disable-auto-shutdown`), as swtpm does, so a
//! reset does not count as a dictionary-attack event. While the migration
//! session is locked (a source that exported, a destination waiting for its
//! state) no TPM command runs; see [`crate::migration::session`].
//!
//! * [`state_blob`]: export and import of state blobs (sealed or plain).
//! * [`saves`]: saves sealed to this host, their identity and rollbacks.
//! * [`admin`]: the admin operations (vtpmctl).

mod admin;
mod error;
mod saves;
mod state_blob;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_saves;

pub use error::InstanceError;

use crate::engine::tpm2::{self, StartupType};
use crate::engine::{BufferSizes, EngineControls, StateType, TpmEngine};
use crate::migration::save::Saves;
use crate::migration::session::{Handover, Session};
use crate::storage::swtpm_key::SwtpmKey;
use crate::storage::{StateDir, PERMANENT, VOLATILE};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vtpm_common::admin::Phase;

/// Largest state blob an import accepts (swtpm's limit).
pub const MAX_STATE_BLOB: u32 = 512 * 1024;
/// libtpms's default and largest I/O buffer for TPM 2.
pub const DEFAULT_BUFFER_SIZE: u32 = 4096;

/// Behaviour switches from the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub disable_auto_shutdown: bool,
    /// swtpm's `--migration-key`: plain-path state blobs go out encrypted
    /// with it, and blobs encrypted with it are taken in.
    pub migration_key: Option<Arc<SwtpmKey>>,
    /// `--migration release-lock-outgoing`: give the state directory lock
    /// up once the last blob was handed out.
    pub release_lock_outgoing: bool,
    /// `--rollback refuse`: a restore of an older save is refused unless
    /// the operator allowed that generation (also settable per state
    /// directory with `vtpmctl rollback-policy`).
    pub rollback_refuse: bool,
    /// More keys saves may be wrapped to (`--restore-keys`), for restores
    /// only.
    pub restore_keys: Vec<Arc<vtpm_common::hostkey::LazyHostKey>>,
}

/// How often, 10 ms apart, a released or deferred state directory lock is
/// tried again before a TPM command or power-on (swtpm's 1 s).
const RELOCK_RETRIES: u32 = 100;

/// How a power-on treats the saved volatile state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitFlags {
    /// Delete the volatile state file once the TPM is up.
    pub delete_volatile: bool,
}

/// The state blobs an instance hands out and takes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    Permanent,
    Volatile,
    SaveState,
}

impl BlobKind {
    pub const ALL: [BlobKind; 3] = [BlobKind::Permanent, BlobKind::Volatile, BlobKind::SaveState];

    /// The migration blob number (1, 2, 3), as the sealed format numbers them.
    pub fn number(self) -> u32 {
        match self {
            BlobKind::Permanent => 1,
            BlobKind::Volatile => 2,
            BlobKind::SaveState => 3,
        }
    }

    pub fn from_number(n: u32) -> Option<BlobKind> {
        BlobKind::ALL.into_iter().find(|k| k.number() == n)
    }

    fn state_type(self) -> StateType {
        match self {
            BlobKind::Permanent => StateType::Permanent,
            BlobKind::Volatile => StateType::Volatile,
            BlobKind::SaveState => StateType::SaveState,
        }
    }
}

/// Everything guarded by the instance lock: the engine, the power flags
/// and the migration session.
#[derive(Debug)]
struct TpmState {
    tpm: Box<dyn TpmEngine>,
    running: bool,
    /// Requested buffer size, re-applied before every power-on.
    buffer_size: u32,
    last_was_shutdown: bool,
    /// A permanent blob was imported since the last power-on: persist it after.
    permanent_set: bool,
    /// Failure mode was logged since the last power-on.
    failure_reported: bool,
    session: Session,
    saves: Saves,
}

/// Hands a received permanent state (and volatile state, if any) to the
/// engine, for the power-on that follows.
fn load_into_engine(
    st: &mut TpmState,
    perm: &[u8],
    vol: &[u8],
) -> std::result::Result<(), crate::engine::TpmResult> {
    st.tpm
        .set_state(StateType::Permanent, Some(perm))
        .and_then(|()| {
            st.tpm
                .set_state(StateType::Volatile, (!vol.is_empty()).then_some(vol))
        })
}

/// A vTPM shared by the frontends.
#[derive(Debug)]
pub struct Vtpm {
    state: Mutex<TpmState>,
    controls: Arc<dyn EngineControls>,
    store: Arc<StateDir>,
    opts: Options,
    running: AtomicBool,
    established: AtomicBool,
    io_size: AtomicU32,
    /// No TPM command ran since the last save or restore: the state is
    /// still that save's generation.
    unchanged_since_save: AtomicBool,
    /// A migrated state went live and waits to be written durably (its
    /// migration id): started by [`Vtpm::start_pending_durability`] once
    /// INIT's answer is out.
    durable_pending: Mutex<Option<String>>,
    /// Whether `durable_pending` holds an id: the check every command and
    /// control answer makes without taking the mutex.
    durable_due: AtomicBool,
}

type Result<T> = std::result::Result<T, InstanceError>;

impl Vtpm {
    /// Wraps `tpm` (whose store is `store`) and checks that existing state
    /// loads.
    pub fn new(
        mut tpm: Box<dyn TpmEngine>,
        store: Arc<StateDir>,
        opts: Options,
        session: Session,
    ) -> Result<Vtpm> {
        if store.has_blob(PERMANENT) {
            if let Err(rc) = tpm.validate_state(StateType::Permanent) {
                return Err(InstanceError::BadState {
                    dir: store.path().display().to_string(),
                    rc,
                    cause: store.take_last_failure(),
                });
            }
        }
        let size = tpm.set_buffer_size(0).size;
        let saves = Saves::new(session.host_key()).with_restore_keys(opts.restore_keys.clone());
        Ok(Vtpm {
            controls: tpm.controls(),
            state: Mutex::new(TpmState {
                tpm,
                running: false,
                buffer_size: 0,
                last_was_shutdown: false,
                permanent_set: false,
                failure_reported: false,
                session,
                saves,
            }),
            store,
            opts,
            running: AtomicBool::new(false),
            established: AtomicBool::new(false),
            io_size: AtomicU32::new(size),
            unchanged_since_save: AtomicBool::new(false),
            durable_pending: Mutex::new(None),
            durable_due: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TpmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether no command or request holds the TPM right now (a hint: it
    /// can change at once). The accept loop answers on its own thread only
    /// then, so it never waits behind a long command.
    pub fn is_idle(&self) -> bool {
        !matches!(
            self.state.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        )
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether state files are encrypted at rest (`--key`).
    pub fn state_encrypted(&self) -> bool {
        self.store.has_key()
    }

    /// The migration lifecycle phase.
    pub fn phase(&self) -> Phase {
        self.lock().session.phase()
    }

    /// Largest command or response a frontend may carry.
    pub fn io_size(&self) -> u32 {
        self.io_size.load(Ordering::SeqCst)
    }

    /// The engine's version line, for the start-up log.
    pub fn describe_engine(&self) -> String {
        self.lock().tpm.describe()
    }

    /// Powers the TPM on (as `--flags not-need-init`), optionally followed
    /// by TPM2_Startup.
    pub fn start(&self, startup: Option<StartupType>) -> Result<()> {
        self.power_on(InitFlags::default())?;
        if let Some(s) = startup {
            let mut out = Vec::new();
            self.process(&tpm2::startup_command(s.su()), &mut out);
            let code = tpm2::response_code(&out);
            if code != tpm2::RC_SUCCESS && code != tpm2::RC_INITIALIZE {
                return Err(InstanceError::Startup(code));
            }
        }
        Ok(())
    }

    /// Runs one TPM command; the response is left in `out`. A command the
    /// TPM cannot run now gets a bare TPM_RC_FAILURE response.
    pub fn process(&self, command: &[u8], out: &mut Vec<u8>) {
        out.clear();
        self.start_pending_durability();
        let mut st = self.lock();
        if !st.running {
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            return;
        }
        if !st.session.unlocked() {
            log::warn!(
                "TPM command refused: the instance is {:?}",
                st.session.phase()
            );
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            return;
        }
        if !self.store.is_locked() {
            // The lock was given up for a migration on shared storage, or
            // deferred for one coming in: take it before the TPM writes.
            if let Err(e) = self.relock() {
                log::error!("TPM command refused: {e}");
                out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
                return;
            }
        }
        if self.store.is_fenced() {
            // A TPM command after an outgoing state hand-off: the VM kept
            // running here, so this copy is the live one again.
            log::warn!("TPM command after a state export: taking the state back");
            self.store.set_fenced(false);
        }
        if self.unchanged_since_save.load(Ordering::Relaxed) {
            self.note_moved_past_saves();
        }
        let max = self.io_size() as usize;
        match st.tpm.process(command) {
            Ok(resp) if resp.len() >= tpm2::HEADER_LEN && resp.len() <= max => {
                out.extend_from_slice(resp);
            }
            Ok(resp) => {
                log::error!(
                    "the engine produced a {}-byte response (limit {max}); answering TPM_RC_FAILURE",
                    resp.len()
                );
                out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            }
            Err(rc) => {
                log::error!("the engine failed to process a command: {rc:#x}");
                out.extend_from_slice(&tpm2::error_response(tpm2::RC_FAILURE));
            }
        }
        let code = tpm2::command_code(command);
        let rc = tpm2::response_code(out);
        st.last_was_shutdown = code == Some(tpm2::CC_SHUTDOWN) && rc == tpm2::RC_SUCCESS;
        if rc == tpm2::RC_FAILURE && !st.failure_reported {
            st.failure_reported = true;
            log::error!(
                "the TPM answered command {:#x} with TPM_RC_FAILURE: it is in failure mode (often after its state could not be stored; see earlier errors) and stays there until power-cycled",
                code.unwrap_or(0)
            );
        }
    }

    /// Powers the TPM on, or power-cycles a running one (CMD_INIT). A
    /// destination waiting for its migration unlocks here, if the state it
    /// received verified.
    pub fn power_on(&self, flags: InitFlags) -> Result<()> {
        let mut st = self.lock();
        if !self.store.is_locked() {
            self.relock()?;
            self.store.set_fenced(false);
        }
        if !st.session.unlocked() {
            if st.session.phase() != Phase::DestinationLocked {
                return Err(InstanceError::Locked(st.session.phase()));
            }
            return self.unlock_destination(&mut st, flags);
        }
        if st.saves.restoring() {
            return self.finish_restore(&mut st, flags);
        }
        self.power_off_locked(&mut st);
        self.power_on_locked(&mut st, flags)
    }

    /// The migrated state verified: load it and start.
    ///
    /// Nothing touches the disk before INIT is answered: the received
    /// state becomes the directory's state in memory (deferred writes),
    /// the engine loads it from there as it loads a state from disk (one
    /// unmarshalling, in its start-up; handing it over with
    /// `TPMLIB_SetState` would unmarshal the permanent state three times),
    /// and the frontend starts the durable write once INIT's answer is
    /// out ([`Vtpm::start_pending_durability`]). The receipt waits for it.
    fn unlock_destination(&self, st: &mut TpmState, flags: InitFlags) -> Result<()> {
        let (perm, vol, id) = st.session.take_verified()?;
        self.power_off_locked(st);
        self.store.defer_writes();
        let held = self.hold_migrated_state(&perm, &vol);
        drop((perm, vol));
        // The store holds the received permanent state: nothing to persist
        // after the power-on.
        st.permanent_set = false;
        match held.and_then(|()| self.power_on_locked(st, flags)) {
            Ok(()) => {
                let id = vtpm_common::hex::encode(&id);
                log::info!("migration {id}: digest verified, destination unlocked");
                *self
                    .durable_pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(id);
                self.durable_due.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                st.session.relock_destination();
                self.store.discard_deferred();
                Err(e)
            }
        }
    }

    /// Puts the received state into the (deferred) store for the engine's
    /// start-up to load. Nothing was handed to the engine with `set_state`
    /// on a destination (that would shadow the store; even `None` would,
    /// as an explicitly absent blob).
    fn hold_migrated_state(&self, perm: &[u8], vol: &[u8]) -> Result<()> {
        let held = if vol.is_empty() {
            self.store.remove_blob(VOLATILE)
        } else {
            self.store.write_blob(VOLATILE, vol)
        };
        held.and_then(|()| self.store.write_blob(PERMANENT, perm))
            .map_err(InstanceError::Persist)
    }

    /// Starts writing a migrated state durably, on a thread of its own, if
    /// one went live since the last call. Frontends call this once their
    /// answer to the power-on is out, so neither the thread's start nor its
    /// disk work delays that answer; TPM commands call it too, so the
    /// write starts at the latest with the first command.
    pub fn start_pending_durability(&self) {
        if !self.durable_due.swap(false, Ordering::SeqCst) {
            return;
        }
        let pending = self
            .durable_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(id) = pending {
            self.make_durable_soon(id);
        }
    }

    /// Writes the received state to disk on a thread of its own (or
    /// inline if no thread can be started).
    fn make_durable_soon(&self, id: String) {
        fn commit(store: &StateDir, id: &str) {
            match store.commit_deferred() {
                Ok(()) => log::info!("migration {id}: the received state is durable"),
                Err(e) => log::error!(
                    "migration {id}: making the received state durable failed: {e}; no receipt is issued until it succeeds (vtpmctl receipt retries)"
                ),
            }
        }
        let store = self.store.clone();
        let tid = id.clone();
        let spawned = std::thread::Builder::new()
            .name("vtpmd-durable".into())
            .spawn(move || commit(&store, &tid));
        if spawned.is_err() {
            commit(&self.store, &id);
        }
    }

    fn power_on_locked(&self, st: &mut TpmState, flags: InitFlags) -> Result<()> {
        if st.buffer_size != 0 {
            let want = st.buffer_size;
            st.tpm.set_buffer_size(want);
        }
        let _ = self.store.take_last_failure();
        if let Err(rc) = st.tpm.main_init() {
            st.tpm.terminate();
            return Err(InstanceError::PowerOn {
                rc,
                cause: self.store.take_last_failure(),
            });
        }
        if let Some(cause) = self.store.take_last_failure() {
            // The engine came up but could not store its state (libtpms
            // carries on in memory): a TPM whose state would vanish at the
            // next restart is not started.
            st.tpm.terminate();
            return Err(InstanceError::PowerOn {
                rc: crate::engine::TPM_FAIL,
                cause: Some(cause),
            });
        }
        st.running = true;
        st.last_was_shutdown = false;
        st.failure_reported = false;
        self.running.store(true, Ordering::SeqCst);
        let size = st.tpm.set_buffer_size(0).size;
        self.io_size.store(size, Ordering::SeqCst);
        if std::mem::take(&mut st.permanent_set) {
            // The state was imported: make it this directory's state now, or
            // a crash would bring back the old one.
            if let Err(e) = self.persist_permanent(st) {
                self.power_off_locked(st);
                return Err(e);
            }
        }
        if flags.delete_volatile {
            if let Err(err) = self.store.remove_blob(VOLATILE) {
                log::warn!("power-on: could not delete the volatile state: {err}");
            }
        }
        self.refresh_established(st);
        log::info!("TPM powered on (I/O buffer {size} bytes)");
        Ok(())
    }

    fn persist_permanent(&self, st: &mut TpmState) -> Result<()> {
        let s = st
            .tpm
            .get_state(StateType::Permanent)
            .map_err(InstanceError::Engine)?;
        // The engine usually stored it itself while starting up: then it
        // is on disk already, durably.
        let on_disk = self.store.read_blob(PERMANENT).ok().flatten();
        if on_disk.as_deref().map(|d| &d[..]) == Some(&s[..]) {
            return Ok(());
        }
        self.store
            .write_blob(PERMANENT, &s)
            .map_err(InstanceError::Persist)
    }

    /// Stops the TPM (CMD_STOP, process exit).
    pub fn power_off(&self) {
        let mut st = self.lock();
        self.power_off_locked(&mut st);
    }

    fn power_off_locked(&self, st: &mut TpmState) {
        if !st.running {
            return;
        }
        if !self.opts.disable_auto_shutdown && !st.last_was_shutdown && !self.store.is_fenced() {
            for su in [tpm2::SU_STATE, tpm2::SU_CLEAR] {
                let rc = st
                    .tpm
                    .process(&tpm2::shutdown_command(su))
                    .map(tpm2::response_code);
                if matches!(rc, Ok(tpm2::RC_SUCCESS | tpm2::RC_INITIALIZE)) {
                    break;
                }
            }
        }
        st.tpm.terminate();
        st.running = false;
        self.running.store(false, Ordering::SeqCst);
        log::info!("TPM powered off");
    }

    /// The VMM is quitting (CMD_SHUTDOWN). After a completed sealed export
    /// the state stays, locked and marked, until the destination's receipt
    /// (`vtpmctl complete`) erases it: never a second live TPM, never an
    /// erase before the destination's copy is durable.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        match st.session.on_vmm_quit() {
            Handover::Keep(marker) => match self.store.write_marker(&marker) {
                Ok(()) => log::warn!(
                    "migration {}: the VMM quit after the export; this copy stays locked until `vtpmctl complete --receipt FILE` (erase it) or `vtpmctl abort` (the VM did not resume on the destination)",
                    marker.migration_id
                ),
                Err(e) => log::error!(
                    "migration {}: recording the hand-over failed: {e}",
                    marker.migration_id
                ),
            },
            Handover::Forget => self.forget_handover(),
            Handover::Nothing => {}
        }
        self.power_off_locked(&mut st);
    }

    /// At a clean exit of a drop-in `swtpm` (libvirt's emulator backend):
    /// hands the state back in swtpm's files, so swtpm can take the domain
    /// again at any time (`vtpm-libvirt disable`). Not while a migration
    /// holds the state, and not for vtpmd's own sealed format, which swtpm
    /// cannot read anyway.
    pub fn leave_swtpm_files(&self) {
        let st = self.lock();
        if st.running || st.session.phase() != Phase::Running || self.store.is_fenced() {
            return;
        }
        if !self.store.writes_swtpm_format() || !self.store.has_slot_files() {
            return;
        }
        match self.store.convert_to_swtpm() {
            Ok(_) => log::info!("state left in swtpm's files (started as swtpm)"),
            Err(e) => log::warn!("could not leave the state in swtpm's files: {e}"),
        }
    }

    /// The prepared migration is off: the state directory forgets it.
    fn forget_handover(&self) {
        if let Err(e) = self.store.remove_marker() {
            log::error!("removing the migration marker failed: {e}");
        }
    }

    /// A guest reset reported by a frontend that has no CMD_INIT
    /// (vhost-user RESET_DEVICE): power-cycle the TPM. While the instance is
    /// locked for a migration nothing happens.
    pub fn reset(&self) -> Result<()> {
        let phase = self.phase();
        if !matches!(phase, Phase::Running | Phase::Prepared) {
            log::warn!("device reset ignored: the instance is locked for a migration");
            return Err(InstanceError::Locked(phase));
        }
        self.power_on(InitFlags::default())
    }

    /// Runs `f` on the engine if the TPM is running, then refreshes the
    /// established flag.
    fn running_op<T>(
        &self,
        f: impl FnOnce(&mut dyn TpmEngine) -> std::result::Result<T, u32>,
    ) -> Result<T> {
        let mut st = self.lock();
        if !st.running {
            return Err(InstanceError::NotRunning);
        }
        let r = f(st.tpm.as_mut()).map_err(InstanceError::Engine);
        self.refresh_established(&mut st);
        r
    }

    fn refresh_established(&self, st: &mut TpmState) {
        if st.running {
            let v = st.tpm.established().unwrap_or(false);
            self.established.store(v, Ordering::SeqCst);
        }
    }

    /// The TPM-established flag (answered without waiting for a command).
    pub fn established(&self) -> Result<bool> {
        if !self.is_running() {
            return Err(InstanceError::NotRunning);
        }
        Ok(self.established.load(Ordering::SeqCst))
    }

    /// The locality for the following commands (answered without waiting).
    pub fn set_locality(&self, loc: u8) -> Result<()> {
        if loc > 4 {
            return Err(InstanceError::BadLocality(loc));
        }
        self.controls.set_locality(loc);
        Ok(())
    }

    /// Abandons the command in flight (answered without waiting for it).
    pub fn cancel(&self) -> Result<()> {
        if !self.is_running() {
            return Err(InstanceError::NotRunning);
        }
        self.controls.cancel();
        Ok(())
    }

    pub fn hash_start(&self) -> Result<()> {
        self.running_op(|t| t.hash_start())
    }

    pub fn hash_data(&self, data: &[u8]) -> Result<()> {
        self.running_op(|t| t.hash_data(data))
    }

    pub fn hash_end(&self) -> Result<()> {
        self.running_op(|t| t.hash_end())
    }

    /// Clears the TPM-established flag as locality `loc`.
    pub fn reset_established(&self, loc: u8) -> Result<()> {
        if loc > 4 {
            return Err(InstanceError::BadLocality(loc));
        }
        self.running_op(|t| t.reset_established(loc))
    }

    /// Writes the volatile state to the state directory now.
    pub fn store_volatile(&self) -> Result<()> {
        let mut st = self.lock();
        if !st.running {
            return Err(InstanceError::NotRunning);
        }
        let v = st.tpm.volatile_store().map_err(InstanceError::Engine)?;
        Ok(self.store.write_blob(VOLATILE, &v)?)
    }

    /// Sets (only while stopped) or queries (`0`) the I/O buffer size.
    pub fn set_buffer_size(&self, wanted: u32) -> Result<BufferSizes> {
        let mut st = self.lock();
        if wanted > 0 && st.running {
            return Err(InstanceError::Running);
        }
        let sizes = st.tpm.set_buffer_size(wanted);
        if wanted > 0 {
            st.buffer_size = sizes.size;
            self.io_size.store(sizes.size, Ordering::SeqCst);
        }
        Ok(sizes)
    }

    /// The engine's JSON self-description for `flags`.
    pub fn info(&self, flags: u32) -> Result<String> {
        self.lock()
            .tpm
            .info(flags)
            .ok_or(InstanceError::NoInfo(flags))
    }

    /// Takes the state directory lock, trying for [`RELOCK_RETRIES`] × 10 ms.
    fn relock(&self) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.store.lock() {
                Ok(()) => {
                    log::info!("state directory lock taken");
                    return Ok(());
                }
                Err(err) if attempt >= RELOCK_RETRIES => return Err(InstanceError::LockBusy(err)),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            attempt += 1;
        }
    }

    /// `--migration release-lock-outgoing`: the last blob went out, so the
    /// destination on shared storage may take the directory. Nothing is
    /// written here until the lock is taken back.
    fn release_after_export(&self) {
        if self.opts.release_lock_outgoing {
            self.store.set_fenced(true);
            self.store.unlock();
            log::info!("state handed out: state directory lock released (--migration release-lock-outgoing)");
        }
    }

    /// Takes the state directory lock again (QEMU on the source after a
    /// failed migration, or on a destination with shared storage); a source
    /// locked for a migration resumes.
    pub fn lock_storage(&self, retries: u32) -> Result<()> {
        if self.lock().session.resume_source() {
            // The VM resumed here after a failed migration: carry on.
            self.store.set_fenced(false);
            self.forget_handover();
        }
        let mut attempt = 0;
        loop {
            match self.store.lock() {
                Ok(()) => {
                    self.store.set_fenced(false);
                    return Ok(());
                }
                Err(err) if attempt == retries => return Err(InstanceError::LockBusy(err)),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            attempt += 1;
        }
    }
}
