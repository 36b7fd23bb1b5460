//! Sealed migration (seed 002): host keys ([`keys`]) and the sealed piece
//! format ([`piece`]).

pub mod keys;
pub mod piece;
pub mod session;
