//! Sealed migration (seed 002): the sealed piece format ([`piece`]), the
//! lifecycle ([`session`]) and the device-state stream framing
//! ([`stream`]). Host keys live in `vtpm_common::hostkey`, shared with
//! vtpmctl.

pub mod piece;
pub mod session;
pub mod stream;
