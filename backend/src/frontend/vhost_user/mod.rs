//! The TPM as a vhost-user virtio-tpm device.
//!
//! * [`request`]: one descriptor chain → one TPM command and its response.
//! * [`device`]: the vhost-user device (features, queue, reset, device-state
//!   transfer), one per frontend connection.
//!
//! The process keeps one TPM for its whole life. A frontend that
//! disconnects (VMM restart, reconnect) finds the TPM as it left it when it
//! or the next frontend connects; only a device reset (RESET_DEVICE, the
//! guest rebooting) power-cycles it. The accept loop is
//! `daemon::vhost_user`.

pub mod device;
pub mod request;
