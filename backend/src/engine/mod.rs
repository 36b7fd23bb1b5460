//! The TPM engine: libtpms behind a safe API ([`ffi`]) and the few TPM 2.0
//! wire facts the daemon itself needs ([`tpm2`]).

pub mod ffi;
pub mod tpm2;

pub use ffi::{cancel_command, library_version, Libtpms, NvStore, StateType, TpmResult};
