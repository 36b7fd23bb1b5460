//! The TPM engine seam: what the instance core needs from a TPM 2.0
//! implementation, whatever runs it.
//!
//! ```text
//!  instance core ──▶ dyn TpmEngine ──┬─▶ Libtpms   (libtpms through FFI; the only libtpms unsafe)
//!        │                           └─▶ FakeEngine (unit tests of the core, no libtpms)
//!        └──────▶ dyn EngineControls    (cancel, locality: callable while a command runs)
//! ```
//!
//! The engine reads and writes its persistent state through an [`NvStore`]
//! it is given when created (the state directory, or anything a test
//! supplies). [`tpm2`] holds the few TPM 2.0 header facts the daemon itself
//! needs.

#[cfg(test)]
pub mod fake;
#[allow(unsafe_code)]
pub mod libtpms;
pub mod tpm2;

use std::sync::Arc;
use thiserror::Error;

pub use libtpms::{library_version, Libtpms};

/// A TPM 1.2-style result code, as libtpms returns it.
pub type TpmResult = u32;

pub const TPM_SUCCESS: TpmResult = 0;
pub const TPM_FAIL: TpmResult = 0x09;
pub const TPM_RETRY: TpmResult = 0x800;

/// Which state blob the engine serialises or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateType {
    Permanent,
    Volatile,
    SaveState,
}

/// Why an [`NvStore`] operation failed (logged by the engine, which then
/// reports a TPM failure).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct NvError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Where the engine keeps its persistent state. Names are libtpms's own:
/// "permall", "volatilestate", "savestate".
pub trait NvStore: Send + Sync {
    /// `Ok(None)` means "no such blob" and is the only answer that lets the
    /// engine manufacture a new TPM.
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, NvError>;
    fn store(&self, name: &str, data: &[u8]) -> Result<(), NvError>;
    fn delete(&self, name: &str) -> Result<(), NvError>;
}

/// The I/O buffer sizes an engine reports: in use, smallest, largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub size: u32,
    pub min: u32,
    pub max: u32,
}

/// Operations on the TPM itself. The core serialises every call (it holds
/// the engine under its lock).
pub trait TpmEngine: Send + std::fmt::Debug {
    /// Powers the TPM on: loads state through the store, or manufactures it.
    fn main_init(&mut self) -> Result<(), TpmResult>;
    /// Powers the TPM off and frees its volatile state.
    fn terminate(&mut self);
    /// Runs one command. TPM errors come back as a response with a non-zero
    /// code; `Err` means the engine itself failed.
    fn process(&mut self, cmd: &[u8]) -> Result<&[u8], TpmResult>;
    /// Serialises the running TPM's volatile state.
    fn volatile_store(&mut self) -> Result<Vec<u8>, TpmResult>;
    /// Sets (or queries, with 0) the I/O buffer size.
    fn set_buffer_size(&mut self, wanted: u32) -> BufferSizes;
    /// Test-loads a blob from the store without starting the TPM.
    fn validate_state(&mut self, st: StateType) -> Result<(), TpmResult>;
    /// Hands the engine a blob for the next power-on (`None`: as if absent).
    fn set_state(&mut self, st: StateType, blob: Option<&[u8]>) -> Result<(), TpmResult>;
    /// Serialises a blob (the live state while running).
    fn get_state(&mut self, st: StateType) -> Result<Vec<u8>, TpmResult>;
    /// The engine's JSON self-description for GET_INFO flags.
    fn info(&mut self, flags: u32) -> Option<String>;
    fn hash_start(&mut self) -> Result<(), TpmResult>;
    fn hash_data(&mut self, data: &[u8]) -> Result<(), TpmResult>;
    fn hash_end(&mut self) -> Result<(), TpmResult>;
    /// The TPM-established flag.
    fn established(&mut self) -> Result<bool, TpmResult>;
    /// Clears the TPM-established flag as locality `loc` (3 or 4 may).
    fn reset_established(&mut self, loc: u8) -> Result<(), TpmResult>;
    /// The handle for calls that must not wait for a running command.
    fn controls(&self) -> Arc<dyn EngineControls>;
    /// Version line for the start-up log.
    fn describe(&self) -> String;
}

/// Calls that may come from another thread while a command runs.
pub trait EngineControls: Send + Sync + std::fmt::Debug {
    /// Asks the engine to abandon the command in flight.
    fn cancel(&self);
    /// The locality the following commands run at (0..=4).
    fn set_locality(&self, loc: u8);
}
