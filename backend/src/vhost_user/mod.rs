//! `vtpmd vhost-user`: the TPM as a vhost-user virtio-tpm device process.
//!
//! * [`request`]: one descriptor chain → one TPM command and its response.
//! * [`device`]: the vhost-user device (features, queue, reset, device-state
//!   transfer), one per frontend connection.
//!
//! The process keeps one TPM for its whole life. A frontend that
//! disconnects (VMM restart, reconnect) finds the TPM as it left it when it
//! or the next frontend connects; only a device reset (RESET_DEVICE, the
//! guest rebooting) power-cycles it. SIGTERM powers the TPM off, flushing
//! its state, and removes the socket.

pub mod device;
pub mod request;

use crate::config::{VhostUserConfig, VhostUserSocket};
use crate::daemon::{bind_unix, spawn, Exit, Host, RunError};
use crate::instance::Options;
use device::TpmDevice;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Runs the device until SIGTERM. Returns why it stopped.
pub fn run(cfg: &VhostUserConfig) -> Result<Exit, RunError> {
    let mut host = Host::open(&cfg.instance, Options::default())?;
    let listener = match &cfg.socket {
        VhostUserSocket::Path(p) => {
            let l = bind_unix(p, None)?;
            host.remove_at_exit(p.clone());
            l
        }
        VhostUserSocket::Fd(fd) => crate::fdpass::inherited_listener(*fd)
            .map_err(crate::daemon::io_err("use the listening socket", "--fd"))?,
    };
    host.start_services()?;
    if !cfg.instance.incoming {
        // No CMD_INIT comes over vhost-user: the TPM is powered on now and
        // the guest driver sends TPM2_Startup.
        host.vtpm.start(None)?;
    }
    let (vtpm, exits) = (host.vtpm.clone(), host.exits());
    spawn("vhost-user", move || {
        serve(Listener::from(listener), vtpm, exits)
    })?;
    Ok(host.wait())
}

/// Accepts frontends one after another, each with a fresh device on the
/// same TPM.
fn serve(mut listener: Listener, vtpm: Arc<crate::instance::Vtpm>, exits: Sender<Exit>) {
    loop {
        if let Err(why) = serve_one(&mut listener, &vtpm) {
            log::error!("vhost-user: {why}");
            let _ = exits.send(Exit::Failed(why));
            return;
        }
        log::info!("vhost-user: frontend disconnected; waiting for the next one");
    }
}

fn serve_one(listener: &mut Listener, vtpm: &Arc<crate::instance::Vtpm>) -> Result<(), String> {
    let device = TpmDevice::new(vtpm.clone())
        .map_err(|e| format!("cannot create the device's exit event: {e}"))?;
    let mut daemon = VhostUserDaemon::new(
        "vhost-user-tpm".into(),
        Arc::new(device),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
    daemon
        .start(listener)
        .map_err(|e| format!("cannot accept a frontend: {e}"))?;
    log::info!("vhost-user: frontend connected");
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => {
            // A protocol error from this frontend: drop it and wait for the
            // next one; the TPM is unaffected.
            log::warn!("vhost-user: connection ended with an error: {e}");
            Ok(())
        }
    }
}
