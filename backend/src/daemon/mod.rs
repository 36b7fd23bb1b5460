//! The process around one vTPM instance, shared by every frontend: open the
//! state, load the keys, claim the engine, bind the admin socket, watch for
//! signals, and at the end power the TPM off cleanly and remove what the
//! process created. [`swtpm`] and [`vhost_user`] run the two frontends in it.
//!
//! This is the top of the house: it may use every layer below; nothing
//! imports it except `main.rs`.

pub mod confine;
pub mod detach;
pub mod keys;
pub mod swtpm;
pub mod vhost_user;

use crate::config::{InstanceConfig, PidTarget, SeccompMode};
use crate::engine::{Libtpms, TpmResult};
use crate::exit::{self, Exit, ExitTx};
use crate::instance::{InstanceError, Options, Vtpm};
use crate::migration::session::Session;
use crate::storage::at_rest::AtRestKey;
use crate::storage::{StateDir, StorageError};
use crate::transport::Listener;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use thiserror::Error;
use vtpm_common::hostkey::{HostKey, KeyError};

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Key(#[from] keys::KeyLoadError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    HostKey(#[from] KeyError),
    #[error("libtpms is already in use in this process")]
    EngineTaken,
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
    #[error("libtpms refused to start (TPM result {0:#x})")]
    Engine(TpmResult),
    #[error("{opt} fd={fd}: {why}")]
    InheritedFd {
        opt: &'static str,
        fd: i32,
        why: String,
    },
    #[error("--pid fd={0}: {1}")]
    PidFd(i32, String),
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

/// Mode of the control, data and vhost-user sockets unless `mode=` says
/// otherwise: the owner and its group (a VMM running as another user in
/// the group) may connect. swtpm's default, 0770, for drop-in use.
pub const DEFAULT_SOCKET_MODE: u32 = crate::config::channel::DEFAULT_UNIX_MODE;
/// Mode of the pid file.
const PID_FILE_MODE: u32 = 0o600;

/// Binds a unix socket at `path` with `mode` (see [`Listener::bind_unix`]).
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, RunError> {
    Listener::bind_unix(path, mode).map_err(io_err("listen on", path.display()))
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
    exits: ExitTx,
    stop: Receiver<Exit>,
    admin: Option<UnixListener>,
    /// Sockets to remove when the process stops.
    sockets: Vec<PathBuf>,
    pid: Option<PidTarget>,
    /// The pid file written, removed at exit.
    pid_written: Option<PathBuf>,
    state_dir: PathBuf,
    /// What confinement allows and how it is applied.
    confinement: (Option<String>, confine::FileAccess, SeccompMode),
}

impl Host {
    /// Opens (and locks, unless `--migration incoming` defers it) the state
    /// directory, loads the keys, claims libtpms and binds the admin socket.
    /// Starts no thread.
    pub fn open(cfg: &InstanceConfig, mut opts: Options) -> Result<Host, RunError> {
        // Whatever vtpmd creates is private until given an explicit mode.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let key = cfg
            .key
            .as_ref()
            .map(|k| keys::load("--key", k))
            .transpose()?
            .map(AtRestKey::new);
        opts.migration_key = cfg
            .migration_key
            .as_ref()
            .map(|k| keys::load("--migration-key", k))
            .transpose()?
            .map(Arc::new);
        opts.release_lock_outgoing = cfg.migration.release_lock_outgoing;
        let store = if cfg.migration.defer_lock {
            log::info!("--migration incoming: the state directory lock is taken when the state arrives or the TPM is first used");
            StateDir::open_unlocked(&cfg.state_dir, cfg.state_mode, key)?
        } else {
            StateDir::open(&cfg.state_dir, cfg.state_mode, key)?
        };
        let store = Arc::new(store);
        if cfg.incoming {
            store.require_empty()?;
        }
        let host_key = cfg
            .host_key
            .as_deref()
            .map(HostKey::load)
            .transpose()?
            .map(Arc::new);
        let mut session = Session::new(
            host_key,
            cfg.trusted_peers.clone(),
            cfg.allow_plaintext_migration,
            cfg.incoming,
        );
        if let Some(marker) = store.read_marker()? {
            session.restore(&marker).map_err(InstanceError::Migration)?;
        }
        if cfg.allow_plaintext_migration {
            log::warn!("--allow-plaintext-migration: the TPM state may be handed out unencrypted");
        }
        let tpm = match Libtpms::take(store.clone()) {
            None => return Err(RunError::EngineTaken),
            Some(Err(rc)) => return Err(RunError::Engine(rc)),
            Some(Ok(t)) => t,
        };
        let vtpm = Arc::new(Vtpm::new(Box::new(tpm), store, opts, session)?);
        let mut sockets = Vec::new();
        let admin = match &cfg.admin {
            Some(p) => {
                let l = bind_unix(p, 0o600)?;
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
            pid: cfg.pid.clone(),
            pid_written: None,
            confinement: (
                cfg.runas.clone(),
                confine::FileAccess {
                    state_dir: confine::absolute(&cfg.state_dir),
                    log_file: cfg
                        .log
                        .as_ref()
                        .and_then(|l| l.file())
                        .map(confine::absolute),
                    removable: Vec::new(),
                    readable: cfg
                        .trusted_peers
                        .iter()
                        .map(|p| confine::absolute(p))
                        .collect(),
                },
                cfg.seccomp,
            ),
            state_dir: cfg.state_dir.clone(),
        })
    }

    /// Where frontends report that the process should stop.
    pub fn exits(&self) -> ExitTx {
        self.exits.clone()
    }

    /// Removes `path` when the process stops.
    pub fn remove_at_exit(&mut self, path: PathBuf) {
        self.sockets.push(path);
    }

    /// Writes the pid file and starts the admin and signal threads.
    pub fn start_services(&mut self) -> Result<(), RunError> {
        match &self.pid {
            Some(PidTarget::File(p)) => {
                write_pid_file(p)?;
                self.pid_written = Some(p.clone());
            }
            Some(PidTarget::Fd(fd)) => self.pid_written = write_pid_fd(*fd)?,
            None => {}
        }
        detach::prepare()?;
        let mut signals =
            signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
                .map_err(io_err("install signal handlers", "SIGTERM"))?;
        // Confined from here on, before any thread starts, so every thread
        // inherits it.
        let (runas, mut access, seccomp) = self.confinement.clone();
        access.removable = self
            .sockets
            .iter()
            .chain(self.pid_written.iter())
            .map(|p| confine::absolute(p))
            .collect();
        confine::confine(
            runas.as_deref(),
            &access,
            seccomp,
            seccomp != SeccompMode::None,
        )?;
        if let Some(l) = self.admin.take() {
            let v = self.vtpm.clone();
            spawn("admin-listen", move || {
                crate::frontend::admin::serve_listener(l, v)
            })?;
        }
        let tx = self.exits.clone();
        spawn("signals", move || {
            if let Some(sig) = signals.forever().next() {
                exit::report(&tx, Exit::Signal(sig));
            }
        })?;
        log::info!(
            "vtpmd {} serving {} ({})",
            env!("CARGO_PKG_VERSION"),
            self.state_dir.display(),
            self.vtpm.describe_engine()
        );
        Ok(())
    }

    /// Blocks until a frontend or a signal says stop, then powers the TPM
    /// off (flushing its state) and removes the sockets and pid file.
    pub fn wait(self) -> Exit {
        let why = self.stop.recv().unwrap_or(Exit::Signal(0));
        log::info!("stopping: {why:?}");
        self.vtpm.power_off();
        why
    }
}

impl Drop for Host {
    /// Whether the process stops normally or start-up failed half-way, the
    /// sockets it bound and its pid file go.
    fn drop(&mut self) {
        for p in &self.sockets {
            let _ = fs::remove_file(p);
        }
        if let Some(p) = &self.pid_written {
            let _ = fs::remove_file(p);
        }
    }
}

/// `--pid fd=N`: writes the pid into the inherited descriptor of a regular
/// file and closes it. Returns the file's name, to remove it at exit as
/// swtpm does (if the descriptor still names one).
fn write_pid_fd(fd: i32) -> Result<Option<PathBuf>, RunError> {
    let owned = crate::fdpass::inherited_fd(fd).map_err(|e| RunError::PidFd(fd, e.to_string()))?;
    let mut f = fs::File::from(owned);
    let meta = f
        .metadata()
        .map_err(|e| RunError::PidFd(fd, e.to_string()))?;
    if !meta.is_file() {
        return Err(RunError::PidFd(
            fd,
            "not a regular file (give an open file, e.g. 3>pidfile)".into(),
        ));
    }
    let path = fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute() && p.exists());
    writeln!(f, "{}", std::process::id())
        .and_then(|()| f.sync_all())
        .map_err(|e| RunError::PidFd(fd, e.to_string()))?;
    Ok(path)
}

/// Writes the pid file atomically: a new temporary file (never through a
/// planted link), then a rename over the old one.
fn write_pid_file(path: &Path) -> Result<(), RunError> {
    let tmp = path.with_extension("tmp");
    let mut f = crate::storage::files::create_new(&tmp, PID_FILE_MODE)
        .map_err(io_err("write the pid file", path.display()))?;
    let r = writeln!(f, "{}", std::process::id())
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(io_err("write the pid file", path.display()))
}
