//! Running `vtpmd socket`: the swtpm-compatible control and data channels
//! (see [`crate::ctrl`] and [`crate::data`]) around one instance.

use crate::config::{Endpoint, SocketConfig};
use crate::ctrl::server::{self, Context};
use crate::daemon::{bind_unix, io_err, spawn, Exit, Host, RunError};
use crate::data::{self, DataChannel};
use crate::instance::Options;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

fn bind(ep: &Endpoint, host: &mut Host) -> Result<Listener, RunError> {
    match ep {
        Endpoint::Unix { path, mode } => {
            let l = bind_unix(path, *mode)?;
            host.remove_at_exit(path.clone());
            Ok(Listener::Unix(l))
        }
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(io_err("listen on", addr))?;
            Ok(Listener::Tcp(l))
        }
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
        };
        match l {
            Listener::Unix(l) => spawn("ctrl-listen", move || server::serve_unix_listener(l, ctx))?,
            Listener::Tcp(l) => spawn("ctrl-listen", move || server::serve_tcp_listener(l, ctx))?,
        }
    }
    if let Some(l) = data_server {
        let (v, t, x) = (vtpm.clone(), cfg.terminate, host.exits());
        match l {
            Listener::Unix(l) => {
                spawn("data-listen", move || data::serve_unix_listener(l, v, t, x))?
            }
            Listener::Tcp(l) => spawn("data-listen", move || data::serve_tcp_listener(l, v, t, x))?,
        }
    }
    Ok(host.wait())
}
