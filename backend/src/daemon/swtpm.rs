//! Running `vtpmd socket`: the swtpm-compatible control and data channels
//! ([`crate::frontend::swtpm`]) around one instance.
//!
//! A channel is a socket vtpmd binds (`path=`, `port=`) or one the parent
//! left open (`fd=`, `clientfd=`). An inherited one is checked before it
//! is used: it must be an open stream socket of the family the option
//! names (`type=tcp,fd=` also takes a unix socket, as swtpm_setup passes
//! one), listening, or connected where a connection is meant (`clientfd=`,
//! `--server ...,fd=`). A connected data socket is the one data
//! connection: vtpmd exits when it closes, as swtpm does.

use super::{bind_unix, detach, io_err, Host, RunError};
use crate::config::{Endpoint, Family, SocketConfig};
use crate::exit::Exit;
use crate::fdpass::{self, SocketFamily};
use crate::frontend::swtpm::ctrl::{self, Context};
use crate::frontend::swtpm::data::{self, DataChannel};
use crate::instance::Options;
use crate::transport::{Listener, Slots, Stream};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};

/// A channel ready to serve.
enum Channel {
    Listen(Listener),
    Connected(Stream),
}

fn bad_fd(opt: &'static str, fd: i32, why: impl Into<String>) -> RunError {
    RunError::InheritedFd {
        opt,
        fd,
        why: why.into(),
    }
}

/// Takes over inherited descriptor `fd` for `opt` and checks it is what the
/// option says. `connection`: a connected socket is wanted (`clientfd=`);
/// `None`: either kind.
fn inherited(
    opt: &'static str,
    fd: i32,
    family: Family,
    connection: Option<bool>,
) -> Result<Channel, RunError> {
    let owned = fdpass::inherited_fd(fd).map_err(|e| bad_fd(opt, fd, e.to_string()))?;
    let info = fdpass::socket_info(&owned).map_err(|e| bad_fd(opt, fd, e.to_string()))?;
    if !info.stream {
        return Err(bad_fd(
            opt,
            fd,
            "is not a stream socket (SOCK_STREAM is needed)",
        ));
    }
    let unix = match (info.family, family) {
        (SocketFamily::Unix, _) => true,
        (SocketFamily::Inet | SocketFamily::Inet6, Family::Tcp) => false,
        (SocketFamily::Inet | SocketFamily::Inet6, Family::Unix) => {
            return Err(bad_fd(
                opt,
                fd,
                "is a TCP socket but type=unixio was given (use type=tcp)",
            ))
        }
        (SocketFamily::Other(f), _) => {
            return Err(bad_fd(
                opt,
                fd,
                format!("is a socket of address family {f}, neither unix nor TCP"),
            ))
        }
    };
    match (info.listening, info.connected, connection) {
        (true, _, Some(true)) => Err(bad_fd(
            opt,
            fd,
            "is a listening socket, but clientfd= wants a connected one (use fd=)",
        )),
        (true, _, _) => Ok(Channel::Listen(if unix {
            Listener::Unix(UnixListener::from(owned))
        } else {
            Listener::Tcp(TcpListener::from(owned))
        })),
        (false, true, Some(false)) => Err(bad_fd(
            opt,
            fd,
            "is a connected socket, but fd= wants a listening one (use clientfd=)",
        )),
        (false, true, _) => Ok(Channel::Connected(if unix {
            Stream::Unix(UnixStream::from(owned))
        } else {
            Stream::Tcp(TcpStream::from(owned))
        })),
        (false, false, _) => Err(bad_fd(
            opt,
            fd,
            "is neither listening nor connected (call listen() or connect() before handing it over)",
        )),
    }
}

fn open_channel(opt: &'static str, ep: &Endpoint, host: &mut Host) -> Result<Channel, RunError> {
    match ep {
        Endpoint::Unix { path, mode } => {
            let l = bind_unix(path, *mode)?;
            host.remove_at_exit(path.clone());
            Ok(Channel::Listen(Listener::Unix(l)))
        }
        Endpoint::Tcp(addr) => Listener::bind_tcp(*addr)
            .map(Channel::Listen)
            .map_err(io_err("listen on", addr)),
        Endpoint::Fd { fd, family } => {
            // The control channel's fd= is a listening socket (a connected
            // client is clientfd=); the data channel's may be either.
            let connection = (opt == "--ctrl").then_some(false);
            inherited(opt, *fd, *family, connection)
        }
        Endpoint::ClientFd(fd) => inherited(opt, *fd, Family::Unix, Some(true)),
    }
}

/// Runs the daemon until it is told to stop. Returns why it stopped.
pub fn run(cfg: &SocketConfig) -> Result<Exit, RunError> {
    let mut host = Host::open(
        &cfg.instance,
        Options {
            disable_auto_shutdown: cfg.disable_auto_shutdown,
            ..Options::default()
        },
    )?;
    let ctrl = cfg
        .ctrl
        .as_ref()
        .map(|e| open_channel("--ctrl", e, &mut host))
        .transpose()?;
    let data_server = cfg
        .server
        .as_ref()
        .map(|e| open_channel("--server", e, &mut host))
        .transpose()?;
    host.start_services()?;
    let vtpm = host.vtpm.clone();
    if cfg.not_need_init {
        vtpm.start(cfg.startup)?;
    }
    // swtpm: a data connection handed over whole is the process's reason
    // to live; it exits when it closes.
    let data_given = matches!(data_server, Some(Channel::Connected(_)));
    let data = DataChannel::new(vtpm.clone(), cfg.terminate || data_given, host.exits());
    match ctrl {
        Some(Channel::Listen(l)) => {
            let ctx = context(cfg, &host, &data);
            host.accept(ctrl::acceptor(l, ctx));
        }
        Some(Channel::Connected(c)) => ctrl::serve_client(c, &context(cfg, &host, &data)),
        None => {}
    }
    match data_server {
        Some(Channel::Listen(l)) => {
            let (v, t, x) = (vtpm.clone(), cfg.terminate, host.exits());
            host.accept(data::acceptor(l, v, t, x));
        }
        Some(Channel::Connected(s)) => data::serve_connection(s, vtpm.clone(), host.exits())
            .map_err(io_err("start thread", "data-given"))?,
        None => {}
    }
    detach::ready();
    Ok(host.wait())
}

fn context(cfg: &SocketConfig, host: &Host, data: &std::sync::Arc<DataChannel>) -> Context {
    Context {
        vtpm: host.vtpm.clone(),
        data: data.clone(),
        exits: host.exits(),
        exit_on_close: cfg.ctrl_terminate,
        slots: Slots::new("control", ctrl::MAX_CONNECTIONS),
    }
}
