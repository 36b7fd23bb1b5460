//! Running `vtpmd vhost-user`: the virtio-tpm device
//! ([`crate::frontend::vhost_user`]) served to one vhost-user frontend
//! after another. SIGTERM powers the TPM off, flushing its state, and
//! removes the socket.

use super::{bind_unix, io_err, spawn, Host, RunError};
use crate::config::{VhostUserConfig, VhostUserSocket};
use crate::exit::{self, Exit, ExitTx};
use crate::frontend::vhost_user::device::TpmDevice;
use crate::instance::{Options, Vtpm};
use std::sync::Arc;
use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Why the accept loop cannot go on.
#[derive(Debug, Error)]
enum ServeError {
    #[error("cannot create the device's exit event: {0}")]
    Device(#[source] std::io::Error),
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(DaemonError),
    #[error("cannot accept a frontend: {0}")]
    Accept(DaemonError),
}

/// Runs the device until SIGTERM. Returns why it stopped.
pub fn run(cfg: &VhostUserConfig) -> Result<Exit, RunError> {
    let mut host = Host::open(&cfg.instance, Options::default())?;
    let listener = match &cfg.socket {
        VhostUserSocket::Path(p) => {
            let l = bind_unix(p, super::DEFAULT_SOCKET_MODE)?;
            host.remove_at_exit(p.clone());
            l
        }
        VhostUserSocket::Fd(fd) => crate::fdpass::inherited_listener(*fd)
            .map_err(io_err("use the listening socket", "--fd"))?,
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
fn serve(mut listener: Listener, vtpm: Arc<Vtpm>, exits: ExitTx) {
    loop {
        if let Err(why) = serve_one(&mut listener, &vtpm) {
            log::error!("vhost-user: {why}");
            exit::report(&exits, Exit::Failed(why.to_string()));
            return;
        }
        log::info!("vhost-user: frontend disconnected; waiting for the next one");
    }
}

fn serve_one(listener: &mut Listener, vtpm: &Arc<Vtpm>) -> Result<(), ServeError> {
    let device = TpmDevice::new(vtpm.clone()).map_err(ServeError::Device)?;
    let mut daemon = VhostUserDaemon::new(
        "vhost-user-tpm".into(),
        Arc::new(device),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(ServeError::Daemon)?;
    daemon.start(listener).map_err(ServeError::Accept)?;
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
