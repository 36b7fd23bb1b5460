//! swtpm's socket protocol, byte for byte.
//!
//! ```text
//!  control socket ──ctrl (read, stream, SET_DATAFD)──▶ wire::decode ──▶ commands::execute ──▶ Vtpm
//!  data socket    ──data (TPM framing, one-write replies)──────────────────────────────────▶ Vtpm::process
//! ```
//!
//! * [`wire`]: **where a control command is decoded** and its reply encoded.
//! * [`commands`]: control command → core call, and `InstanceError` → swtpm
//!   result code.
//! * [`ctrl`]: control connections (swtpm's read timing, streamed blobs,
//!   SET_DATAFD).
//! * [`data`]: the data channel.

pub mod commands;
pub mod ctrl;
pub mod data;
pub mod wire;
