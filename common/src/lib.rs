//! The bottom of vtpmd that needs no libtpms, shared by the daemon, vtpmctl,
//! the bench and the tests:
//!
//! | module | holds |
//! |---|---|
//! | [`hex`] | the one hex encoder/decoder |
//! | [`reader`] | the one bounds-checked byte reader every binary parser uses |
//! | [`aead`] | the one authenticated-encryption primitive (AES-256-CBC + HMAC-SHA256, encrypt-then-MAC) |
//! | [`hostkey`] | RSA-3072 host keys: wrap, unwrap, sign, verify, trusted peers |
//! | [`admin`] | the admin protocol (typed requests and replies) and its client |
//! | [`statedir`] | a state directory's names, lock, migration marker and erase |
//!
//! Nothing here imports from vtpmd; `hex` and `reader` import nothing at all.

#![deny(unsafe_code)]

pub mod admin;
pub mod aead;
pub mod hex;
pub mod hostkey;
pub mod reader;
pub mod statedir;
