//! The frontends: each speaks one protocol and drives the instance core
//! ([`crate::instance`]) through its typed operations.
//!
//! * [`swtpm`]: swtpm's control and data channels (QEMU, cloud-hypervisor,
//!   libvirt, tpm2-tss).
//! * [`vhost_user`]: the virtio-tpm device over vhost-user.
//! * [`admin`]: the JSON-lines admin socket vtpmctl talks to.

pub mod admin;
pub mod swtpm;
pub mod vhost_user;
