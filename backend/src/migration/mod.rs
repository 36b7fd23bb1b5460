//! Sealed migration (seed 002): the sealed piece format ([`piece`]), the
//! lifecycle ([`session`]), saves sealed to this host ([`save`]) and the
//! device-state stream framing ([`stream`]). Host keys live in `vtpm_common::hostkey`, shared with
//! vtpmctl.

pub mod piece;
pub mod save;
pub mod session;
pub mod stream;
