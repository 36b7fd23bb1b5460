//! Running `vtpmd socket`: the swtpm-compatible control and data channels
//! ([`crate::frontend::swtpm`]) around one instance.

use super::{bind_unix, io_err, Host, RunError};
use crate::config::{Endpoint, SocketConfig};
use crate::exit::Exit;
use crate::frontend::swtpm::ctrl::{self, Context};
use crate::frontend::swtpm::data::{self, DataChannel};
use crate::instance::Options;
use crate::transport::{Listener, Slots};

fn bind(ep: &Endpoint, host: &mut Host) -> Result<Listener, RunError> {
    match ep {
        Endpoint::Unix { path, mode } => {
            let l = bind_unix(path, mode.unwrap_or(super::DEFAULT_SOCKET_MODE))?;
            host.remove_at_exit(path.clone());
            Ok(Listener::Unix(l))
        }
        Endpoint::Tcp(addr) => Listener::bind_tcp(*addr).map_err(io_err("listen on", addr)),
    }
}

/// Runs the daemon until it is told to stop. Returns why it stopped.
pub fn run(cfg: &SocketConfig) -> Result<Exit, RunError> {
    let mut host = Host::open(
        &cfg.instance,
        Options {
            disable_auto_shutdown: cfg.disable_auto_shutdown,
        },
    )?;
    let ctrl = cfg.ctrl.as_ref().map(|e| bind(e, &mut host)).transpose()?;
    let data_server = cfg
        .server
        .as_ref()
        .map(|e| bind(e, &mut host))
        .transpose()?;
    if cfg.daemon {
        nix::unistd::daemon(true, false).map_err(|e| RunError::Io {
            what: "detach",
            target: "process".into(),
            source: e.into(),
        })?;
    }
    host.start_services()?;
    let vtpm = host.vtpm.clone();
    if cfg.not_need_init {
        vtpm.start(cfg.startup)?;
    }
    let data = DataChannel::new(vtpm.clone(), cfg.terminate, host.exits());
    if let Some(l) = ctrl {
        let ctx = Context {
            vtpm: vtpm.clone(),
            data: data.clone(),
            exits: host.exits(),
            exit_on_close: cfg.ctrl_terminate,
            slots: Slots::new("control", ctrl::MAX_CONNECTIONS),
        };
        host.accept(ctrl::acceptor(l, ctx));
    }
    if let Some(l) = data_server {
        let (v, t, x) = (vtpm.clone(), cfg.terminate, host.exits());
        host.accept(data::acceptor(l, v, t, x));
    }
    Ok(host.wait())
}
