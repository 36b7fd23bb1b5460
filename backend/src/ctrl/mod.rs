//! The control channel: swtpm's `CMD_*` protocol.
//!
//! [`wire`] decodes requests and encodes responses; [`server`] reads them
//! from unix or TCP connections and hands them to the instance.

pub mod server;
pub mod wire;
