//! vtpmd: a virtual TPM 2.0 backend for virtual machines.
//!
//! Where things are:
//! * [`config`]: command line → validated configuration.
//! * [`ctrl::wire`]: where a control command is decoded and its reply encoded.
//! * [`ctrl::server`] and [`data`]: the control and data channel frontends,
//!   wired together by [`socket`] (`vtpmd socket`).
//! * [`vhost_user`]: the virtio-tpm device over vhost-user (`vtpmd vhost-user`).
//! * [`instance`]: the vTPM's power state machine, shared by the frontends.
//! * [`engine`]: libtpms (all its `unsafe` is in [`engine::ffi`]).
//! * [`storage`]: where state is written (atomically, optionally sealed).
//! * [`migration`]: sealed migration (where a piece is sealed: [`migration::piece`]).
//! * [`daemon`]: the process around an instance, shared by both frontends.

pub mod admin;
pub mod config;
pub mod ctrl;
pub mod daemon;
pub mod data;
pub mod engine;
pub mod fdpass;
pub mod instance;
pub mod logging;
pub mod migration;
pub mod socket;
pub mod storage;
pub mod vhost_user;
