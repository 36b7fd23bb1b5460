//! vtpmctl's library: the commands, on the admin protocol and host keys of
//! `vtpm_common` (no libtpms is linked).

#![deny(unsafe_code)]

use thiserror::Error;
pub use vtpm_common::admin::{call, ClientError};

#[derive(Debug, Error)]
pub enum CtlError {
    #[error(transparent)]
    Admin(#[from] ClientError),
    #[error("{0}")]
    Input(String),
}
