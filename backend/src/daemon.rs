//! The process around one vTPM instance, shared by every frontend: open the
//! state, load the keys, bind the admin socket, watch for signals, and at the
//! end power the TPM off cleanly and remove what the process created.

use crate::config::InstanceConfig;
use crate::instance::{InstanceError, Options, Vtpm};
use crate::migration::keys::{HostKey, KeyError};
use crate::migration::session::Session;
use crate::storage::sealing::{SealError, StateKey};
use crate::storage::{StateDir, StorageError};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
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
    /// A frontend failed and cannot serve any more.
    Failed(String),
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

pub(crate) fn io_err(
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

/// Binds a unix socket at `path`, replacing a stale socket (never another
/// kind of file), and applies `mode`.
pub fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener, RunError> {
    if let Ok(m) = fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            fs::remove_file(path).map_err(io_err("remove stale socket", path.display()))?;
        }
    }
    let l = UnixListener::bind(path).map_err(io_err("listen on", path.display()))?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", path.display()))?;
    }
    Ok(l)
}

/// Starts a named thread.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(io_err("start thread", name))
}

/// One vTPM instance and the process state around it.
#[derive(Debug)]
pub struct Host {
    pub vtpm: Arc<Vtpm>,
    exits: Sender<Exit>,
    stop: Receiver<Exit>,
    admin: Option<UnixListener>,
    /// Sockets to remove when the process stops.
    sockets: Vec<PathBuf>,
    pid_file: Option<PathBuf>,
    state_dir: PathBuf,
}

impl Host {
    /// Opens (and locks) the state directory, loads the keys, claims
    /// libtpms and binds the admin socket. Starts no thread, so the caller
    /// may still detach (fork) afterwards.
    pub fn open(cfg: &InstanceConfig, opts: Options) -> Result<Host, RunError> {
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
            log::warn!("--allow-plaintext-migration: the TPM state may be handed out unencrypted");
        }
        let vtpm = Arc::new(Vtpm::new(store, opts, session)?);
        let mut sockets = Vec::new();
        let admin = match &cfg.admin {
            Some(p) => {
                let l = bind_unix(p, Some(0o600))?;
                sockets.push(p.clone());
                Some(l)
            }
            None => None,
        };
        let (exits, stop) = mpsc::channel();
        Ok(Host {
            vtpm,
            exits,
            stop,
            admin,
            sockets,
            pid_file: cfg.pid_file.clone(),
            state_dir: cfg.state_dir.clone(),
        })
    }

    /// Where frontends report that the process should stop.
    pub fn exits(&self) -> Sender<Exit> {
        self.exits.clone()
    }

    /// Removes `path` when the process stops.
    pub fn remove_at_exit(&mut self, path: PathBuf) {
        self.sockets.push(path);
    }

    /// Writes the pid file and starts the admin and signal threads.
    pub fn start_services(&mut self) -> Result<(), RunError> {
        if let Some(p) = &self.pid_file {
            write_pid_file(p)?;
        }
        if let Some(l) = self.admin.take() {
            let v = self.vtpm.clone();
            spawn("admin-listen", move || crate::admin::serve_listener(l, v))?;
        }
        let tx = self.exits.clone();
        let mut signals =
            signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
                .map_err(io_err("install signal handlers", "SIGTERM"))?;
        spawn("signals", move || {
            if let Some(sig) = signals.forever().next() {
                let _ = tx.send(Exit::Signal(sig));
            }
        })?;
        log::info!(
            "vtpmd {} serving {} (libtpms {:#08x})",
            env!("CARGO_PKG_VERSION"),
            self.state_dir.display(),
            crate::engine::library_version()
        );
        Ok(())
    }

    /// Blocks until a frontend or a signal says stop, then powers the TPM
    /// off (flushing its state) and removes the sockets and pid file.
    pub fn wait(self) -> Exit {
        let why = self.stop.recv().unwrap_or(Exit::Signal(0));
        log::info!("stopping: {why:?}");
        self.vtpm.power_off();
        for p in &self.sockets {
            let _ = fs::remove_file(p);
        }
        if let Some(p) = &self.pid_file {
            let _ = fs::remove_file(p);
        }
        why
    }
}

fn write_pid_file(path: &Path) -> Result<(), RunError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err("create", tmp.display()))?;
    writeln!(f, "{}", std::process::id()).map_err(io_err("write", tmp.display()))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path.display()))
}
