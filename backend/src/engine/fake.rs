//! A TPM engine for unit tests of the instance core: no libtpms, no
//! cryptography, but the same contract as [`super::Libtpms`]:
//!
//! * `main_init` loads "permall" through the [`NvStore`] (or a blob handed
//!   over with `set_state`, which it then stores itself, as libtpms does),
//!   and manufactures a new state when there is none;
//! * a saved or handed-over volatile state resumes a started TPM;
//! * TPM2_Startup, TPM2_Shutdown and TPM2_NV_Write (which appends its
//!   parameter bytes to the permanent state and stores it) are understood;
//!   every other command succeeds with a bare header;
//! * a permanent state that does not start with [`MAGIC`] fails to load.

use super::{
    tpm2, BufferSizes, EngineControls, NvStore, StateType, TpmEngine, TpmResult, TPM_FAIL,
};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

/// Every permanent state the fake makes or accepts starts with this.
pub const MAGIC: &[u8] = b"FAKETPM:";
/// TPM2_NV_Write's command code.
pub const CC_NV_WRITE: u32 = 0x137;

/// What the test can observe besides the store.
#[derive(Debug, Default)]
pub struct Probe {
    pub cancels: AtomicU32,
    pub locality: AtomicU8,
}

impl EngineControls for Probe {
    fn cancel(&self) {
        self.cancels.fetch_add(1, Ordering::SeqCst);
    }
    fn set_locality(&self, loc: u8) {
        self.locality.store(loc, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct Pending {
    permanent: Option<Option<Vec<u8>>>,
    volatile: Option<Option<Vec<u8>>>,
}

pub struct FakeEngine {
    store: Arc<dyn NvStore>,
    probe: Arc<Probe>,
    running: bool,
    started: bool,
    established: bool,
    hashing: bool,
    permanent: Vec<u8>,
    volatile: Vec<u8>,
    pending: Pending,
    resp: Vec<u8>,
}

impl std::fmt::Debug for FakeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeEngine(running: {})", self.running)
    }
}

impl FakeEngine {
    pub fn new(store: Arc<dyn NvStore>) -> (FakeEngine, Arc<Probe>) {
        let probe = Arc::new(Probe::default());
        let e = FakeEngine {
            store,
            probe: probe.clone(),
            running: false,
            started: false,
            established: false,
            hashing: false,
            permanent: Vec::new(),
            volatile: Vec::new(),
            pending: Pending::default(),
            resp: Vec::new(),
        };
        (e, probe)
    }

    fn respond(&mut self, rc: u32) -> &[u8] {
        self.resp = tpm2::error_response(rc).to_vec();
        &self.resp
    }
}

impl TpmEngine for FakeEngine {
    fn main_init(&mut self) -> Result<(), TpmResult> {
        let handed = self.pending.permanent.take();
        let perm = match handed {
            Some(Some(p)) => {
                self.store.store("permall", &p).map_err(|_| TPM_FAIL)?;
                p
            }
            _ => match self.store.load("permall").map_err(|_| TPM_FAIL)? {
                Some(p) => p,
                None => {
                    let p = [MAGIC, b"manufactured"].concat();
                    self.store.store("permall", &p).map_err(|_| TPM_FAIL)?;
                    p
                }
            },
        };
        if !perm.starts_with(MAGIC) {
            return Err(TPM_FAIL);
        }
        self.permanent = perm;
        self.volatile = match self.pending.volatile.take() {
            Some(v) => v.unwrap_or_default(),
            None => self
                .store
                .load("volatilestate")
                .map_err(|_| TPM_FAIL)?
                .unwrap_or_default(),
        };
        self.running = true;
        self.started = !self.volatile.is_empty();
        Ok(())
    }

    fn terminate(&mut self) {
        self.running = false;
        self.started = false;
    }

    fn process(&mut self, cmd: &[u8]) -> Result<&[u8], TpmResult> {
        if !self.running {
            return Err(TPM_FAIL);
        }
        let Some(h) = tpm2::Header::parse(cmd) else {
            return Ok(self.respond(tpm2::RC_COMMAND_SIZE));
        };
        match h.code {
            tpm2::CC_STARTUP if self.started => Ok(self.respond(tpm2::RC_INITIALIZE)),
            tpm2::CC_STARTUP => {
                self.started = true;
                Ok(self.respond(tpm2::RC_SUCCESS))
            }
            _ if !self.started => Ok(self.respond(tpm2::RC_INITIALIZE)),
            tpm2::CC_SHUTDOWN => {
                // As TPM2_Shutdown(STATE) does, leave a state to resume.
                if self
                    .store
                    .store("volatilestate", b"shutdown-state")
                    .is_err()
                {
                    return Ok(self.respond(tpm2::RC_FAILURE));
                }
                Ok(self.respond(tpm2::RC_SUCCESS))
            }
            CC_NV_WRITE => {
                self.permanent.extend_from_slice(&cmd[tpm2::HEADER_LEN..]);
                let p = self.permanent.clone();
                if self.store.store("permall", &p).is_err() {
                    return Ok(self.respond(tpm2::RC_FAILURE));
                }
                Ok(self.respond(tpm2::RC_SUCCESS))
            }
            _ => Ok(self.respond(tpm2::RC_SUCCESS)),
        }
    }

    fn volatile_store(&mut self) -> Result<Vec<u8>, TpmResult> {
        if !self.running {
            return Err(TPM_FAIL);
        }
        Ok(b"volatile".to_vec())
    }

    fn set_buffer_size(&mut self, wanted: u32) -> BufferSizes {
        let size = if wanted == 0 {
            4096
        } else {
            wanted.clamp(2048, 4096)
        };
        BufferSizes {
            size,
            min: 2048,
            max: 4096,
        }
    }

    fn validate_state(&mut self, st: StateType) -> Result<(), TpmResult> {
        let name = match st {
            StateType::Permanent => "permall",
            StateType::Volatile => "volatilestate",
            StateType::SaveState => "savestate",
        };
        match self.store.load(name) {
            Ok(Some(p)) if st != StateType::Permanent || p.starts_with(MAGIC) => Ok(()),
            _ => Err(TPM_FAIL),
        }
    }

    fn set_state(&mut self, st: StateType, blob: Option<&[u8]>) -> Result<(), TpmResult> {
        if self.running {
            return Err(TPM_FAIL);
        }
        let blob = blob.map(<[u8]>::to_vec);
        match st {
            StateType::Permanent if blob.as_ref().is_some_and(|b| !b.starts_with(MAGIC)) => {
                Err(TPM_FAIL)
            }
            StateType::Permanent => {
                self.pending.permanent = Some(blob);
                Ok(())
            }
            StateType::Volatile => {
                self.pending.volatile = Some(blob);
                Ok(())
            }
            StateType::SaveState => Ok(()),
        }
    }

    fn get_state(&mut self, st: StateType) -> Result<Vec<u8>, TpmResult> {
        match st {
            StateType::Permanent if self.running => Ok(self.permanent.clone()),
            // The live volatile state of a started TPM resumes as started.
            StateType::Volatile if self.running && self.started => Ok(b"live-volatile".to_vec()),
            StateType::Volatile if self.running => Ok(self.volatile.clone()),
            StateType::Permanent => self
                .store
                .load("permall")
                .map_err(|_| TPM_FAIL)?
                .ok_or(TPM_FAIL),
            _ => Ok(Vec::new()),
        }
    }

    fn info(&mut self, flags: u32) -> Option<String> {
        (flags != 0).then(|| format!("{{\"fake\":{flags}}}"))
    }

    fn hash_start(&mut self) -> Result<(), TpmResult> {
        self.hashing = true;
        Ok(())
    }

    fn hash_data(&mut self, _data: &[u8]) -> Result<(), TpmResult> {
        if self.hashing {
            Ok(())
        } else {
            Err(TPM_FAIL)
        }
    }

    fn hash_end(&mut self) -> Result<(), TpmResult> {
        if !std::mem::take(&mut self.hashing) {
            return Err(TPM_FAIL);
        }
        self.established = true;
        Ok(())
    }

    fn established(&mut self) -> Result<bool, TpmResult> {
        Ok(self.established)
    }

    fn reset_established(&mut self, loc: u8) -> Result<(), TpmResult> {
        if loc < 3 {
            return Err(0x3d);
        }
        self.established = false;
        Ok(())
    }

    fn controls(&self) -> Arc<dyn EngineControls> {
        self.probe.clone()
    }

    fn describe(&self) -> String {
        "fake engine".into()
    }
}
