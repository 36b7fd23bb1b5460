//! Running `vtpmd socket`: open the state, bind the channels, serve until
//! told to stop, then power the TPM off cleanly.

use crate::config::{Endpoint, SocketConfig};
use crate::ctrl::server::{self, Context};
use crate::data::{self, DataChannel};
use crate::instance::{InstanceError, Options, Vtpm};
use crate::migration::keys::{HostKey, KeyError};
use crate::migration::session::Session;
use crate::storage::sealing::{SealError, StateKey};
use crate::storage::{StateDir, StorageError};
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use thiserror::Error;

/// Why the daemon stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// CMD_SHUTDOWN was answered.
    Shutdown,
    /// The data client went away and `--terminate` was given.
    DataClosed,
    /// The control client went away and `--ctrl ...,terminate` was given.
    CtrlClosed,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Key(#[from] SealError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    HostKey(#[from] KeyError),
    #[error("cannot {what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        source: std::io::Error,
    },
}

fn io_err(
    what: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> RunError {
    let target = target.to_string();
    move |source| RunError::Io {
        what,
        target,
        source,
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

fn bind(ep: &Endpoint) -> Result<Listener, RunError> {
    match ep {
        Endpoint::Unix { path, mode } => {
            if let Ok(m) = fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_socket() {
                    fs::remove_file(path).map_err(io_err("remove stale socket", path.display()))?;
                }
            }
            let l = UnixListener::bind(path).map_err(io_err("listen on", path.display()))?;
            if let Some(mode) = mode {
                fs::set_permissions(path, fs::Permissions::from_mode(*mode))
                    .map_err(io_err("chmod", path.display()))?;
            }
            Ok(Listener::Unix(l, path.clone()))
        }
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(io_err("listen on", addr))?;
            Ok(Listener::Tcp(l))
        }
    }
}

fn write_pid_file(path: &Path) -> Result<(), RunError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err("create", tmp.display()))?;
    writeln!(f, "{}", std::process::id()).map_err(io_err("write", tmp.display()))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path.display()))
}

/// Runs the daemon until it is told to stop. Returns why it stopped.
pub fn run(cfg: &SocketConfig) -> Result<Exit, RunError> {
    let key = cfg
        .key
        .as_ref()
        .map(|k| StateKey::from_file(&k.file, k.format))
        .transpose()?;
    let store = Arc::new(StateDir::open(&cfg.state_dir, cfg.state_mode, key)?);
    if cfg.incoming {
        store.require_empty()?;
    }
    let host_key = cfg
        .host_key
        .as_deref()
        .map(HostKey::load)
        .transpose()?
        .map(Arc::new);
    let session = Session::new(
        host_key,
        cfg.trusted_peers.clone(),
        cfg.allow_plaintext_migration,
        cfg.incoming,
    );
    if cfg.allow_plaintext_migration {
        log::warn!("--allow-plaintext-migration: GET_STATEBLOB may hand out this TPM's secrets unencrypted");
    }
    let vtpm = Arc::new(Vtpm::new(
        store,
        Options {
            disable_auto_shutdown: cfg.disable_auto_shutdown,
        },
        session,
    )?);
    let ctrl = cfg.ctrl.as_ref().map(bind).transpose()?;
    let data_server = cfg.server.as_ref().map(bind).transpose()?;
    let admin = cfg
        .admin
        .as_ref()
        .map(|p| {
            bind(&Endpoint::Unix {
                path: p.clone(),
                mode: Some(0o600),
            })
        })
        .transpose()?;

    if cfg.daemon {
        nix::unistd::daemon(true, false).map_err(|e| RunError::Io {
            what: "detach",
            target: "process".into(),
            source: e.into(),
        })?;
    }
    if let Some(p) = &cfg.pid_file {
        write_pid_file(p)?;
    }
    if cfg.not_need_init {
        vtpm.start(cfg.startup)?;
    }

    let (tx, rx) = mpsc::channel();
    let mut sockets = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(io_err("start thread", name))
    };
    let data = DataChannel::new(vtpm.clone(), cfg.terminate, tx.clone());
    if let Some(l) = ctrl {
        let ctx = Context {
            vtpm: vtpm.clone(),
            data: data.clone(),
            exits: tx.clone(),
            exit_on_close: cfg.ctrl_terminate,
        };
        match l {
            Listener::Unix(l, p) => {
                sockets.push(p);
                spawn(
                    "ctrl-listen",
                    Box::new(move || server::serve_unix_listener(l, ctx)),
                )?;
            }
            Listener::Tcp(l) => {
                spawn(
                    "ctrl-listen",
                    Box::new(move || server::serve_tcp_listener(l, ctx)),
                )?;
            }
        }
    }
    if let Some(l) = data_server {
        let (v, t, x) = (vtpm.clone(), cfg.terminate, tx.clone());
        match l {
            Listener::Unix(l, p) => {
                sockets.push(p);
                spawn(
                    "data-listen",
                    Box::new(move || data::serve_unix_listener(l, v, t, x)),
                )?;
            }
            Listener::Tcp(l) => {
                spawn(
                    "data-listen",
                    Box::new(move || data::serve_tcp_listener(l, v, t, x)),
                )?;
            }
        }
    }
    if let Some(Listener::Unix(l, p)) = admin {
        sockets.push(p);
        let v = vtpm.clone();
        spawn(
            "admin-listen",
            Box::new(move || crate::admin::serve_listener(l, v)),
        )?;
    }
    let sig_tx = tx.clone();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .map_err(io_err("install signal handlers", "SIGTERM"))?;
    spawn(
        "signals",
        Box::new(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = sig_tx.send(Exit::Signal(sig));
            }
        }),
    )?;
    log::info!(
        "vtpmd {} serving {} (libtpms {:#08x})",
        env!("CARGO_PKG_VERSION"),
        cfg.state_dir.display(),
        crate::engine::library_version()
    );

    let why = rx.recv().unwrap_or(Exit::Signal(0));
    log::info!("stopping: {why:?}");
    vtpm.power_off();
    for p in sockets {
        let _ = fs::remove_file(p);
    }
    if let Some(p) = &cfg.pid_file {
        let _ = fs::remove_file(p);
    }
    Ok(why)
}
