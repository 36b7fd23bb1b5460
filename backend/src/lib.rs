//! vtpmd: a virtual TPM 2.0 backend for virtual machines.
//!
//! The house, top to bottom; a module imports only from layers below it
//! (checked by `scripts/check-layers.sh`, run by `make test`):
//!
//! ```text
//!  process     daemon (Host, runners), config                    ← main.rs
//!              provision (vtpm-setup)                            ← setup_main.rs
//!  frontends   frontend::{swtpm, vhost_user, admin}
//!  support     transport, exit, logging, fdpass
//!  core        instance (Vtpm: typed operations, InstanceError)
//!  bottom      engine (TpmEngine: libtpms | fake), storage, migration
//!  primitives  vtpm_common::{hex, reader, aead, hostkey, admin}
//! ```
//!
//! `unsafe` is denied everywhere except [`engine::libtpms`] and [`fdpass`].

#![deny(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod engine;
pub mod exit;
#[allow(unsafe_code)]
pub mod fdpass;
pub mod frontend;
pub mod instance;
pub mod logging;
pub mod migration;
pub mod provision;
pub mod storage;
pub mod transport;
