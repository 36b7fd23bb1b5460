//! Sealed migration (seed 002): host keys ([`keys`]), the sealed piece
//! format ([`piece`]), the lifecycle ([`session`]) and the device-state
//! stream framing ([`stream`]).

pub mod keys;
pub mod piece;
pub mod session;
pub mod stream;
