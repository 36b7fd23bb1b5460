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
//! | [`ctrl`] | swtpm's control-channel command codes (the daemon serves them, vtpmctl's `swtpm_ioctl` sends them) |
//!
//! Nothing here imports from vtpmd; `hex`, `reader` and `ctrl` import nothing at all.

#![deny(unsafe_code)]

pub mod admin;
pub mod aead;
pub mod ctrl;
pub mod hex;
pub mod hostkey;
pub mod reader;
pub mod statedir;
