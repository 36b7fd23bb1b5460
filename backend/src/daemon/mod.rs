//! The process around one vTPM instance, shared by every frontend: open the
//! state, load the keys, claim the engine, bind the admin socket, watch for
//! signals, and at the end power the TPM off cleanly and remove what the
//! process created. [`swtpm`] and [`vhost_user`] run the two frontends in it.
//!
//! The main thread accepts every listener's connections and sees signals
//! and exit reports ([`transport::serve`]), so an idle daemon is one
//! thread, as an idle swtpm is; each connection gets a thread of its own.
//!
//! This is the top of the house: it may use every layer below; nothing
//! imports it except `main.rs`.

pub mod confine;
pub mod detach;
pub mod keys;
pub mod sealing;
pub mod swtpm;
pub mod vhost_user;

use crate::config::{InstanceConfig, PidTarget, SeccompMode};
use crate::engine::{Libtpms, TpmResult};
use crate::exit::{Exit, ExitTx};
use crate::instance::{InstanceError, Options, Vtpm};
use crate::migration::session::Session;
use crate::storage::at_rest::AtRestKey;
use crate::storage::{StateDir, StorageError};
use crate::transport::{self, Acceptor, Listener};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use thiserror::Error;
use vtpm_common::hostkey::KeyError;

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

/// The signals that stop the daemon.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// One vTPM instance and the process state around it.
#[derive(Debug)]
pub struct Host {
    pub vtpm: Arc<Vtpm>,
    /// Installed as `swtpm` (libvirt's emulator backend): leave the state
    /// in swtpm's files at a clean exit, as swtpm would.
    swtpm_files_at_exit: bool,
    exits: ExitTx,
    stop: Receiver<Exit>,
    /// Read end of the wake-up socket exit reports and signals write to.
    wake: UnixStream,
    /// The last stop signal caught (0: none).
    signalled: Arc<AtomicUsize>,
    /// The listeners the main thread serves.
    acceptors: Vec<Acceptor>,
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
        opts.rollback_refuse = cfg.rollback_refuse;
        opts.restore_keys = sealing::restore_keys(cfg);
        let host_key = sealing::host_key(cfg)?;
        // Read when first needed, after confinement: it must stay readable.
        let key_file = host_key
            .as_ref()
            .and_then(|k| k.path().parent())
            .map(confine::absolute);
        let mut session = Session::new(
            host_key,
            cfg.trusted_peers.clone(),
            cfg.allow_plaintext_migration,
            cfg.incoming,
        );
        if let Some(marker) = store.read_marker()? {
            session.restore(&marker).map_err(InstanceError::Migration)?;
        } else if !cfg.incoming {
            sealing::take_reservation(&store, &mut session)?;
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
        // Run as swtpm (libvirt's emulator backend), where no --admin can
        // be passed, the admin socket is in the state directory.
        let admin_path = cfg.admin.clone().or_else(|| {
            invoked_as_swtpm().then(|| cfg.state_dir.join(vtpm_common::statedir::ADMIN_SOCKET))
        });
        let admin = match &admin_path {
            Some(p) => {
                let l = bind_unix(p, 0o600)?;
                sockets.push(p.clone());
                Some(l)
            }
            None => None,
        };
        let (tx, stop) = mpsc::channel();
        let (wake, wake_tx) = UnixStream::pair().map_err(io_err("create", "wake-up socket"))?;
        wake.set_nonblocking(true)
            .and_then(|()| wake_tx.set_nonblocking(true))
            .map_err(io_err("set up", "wake-up socket"))?;
        Ok(Host {
            vtpm,
            swtpm_files_at_exit: invoked_as_swtpm(),
            exits: ExitTx::new(tx, Arc::new(wake_tx)),
            stop,
            wake,
            signalled: Arc::new(AtomicUsize::new(0)),
            acceptors: Vec::new(),
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
                        .chain(key_file)
                        .chain(cfg.restore_keys.iter().map(|p| confine::absolute(p)))
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

    /// Serves `acceptor`'s listener on the main thread (see [`Host::wait`]).
    pub fn accept(&mut self, acceptor: Acceptor) {
        self.acceptors.push(acceptor);
    }

    /// Catches the stop signals: each records its number, then writes to
    /// the wake-up socket (in that order, so the waiter sees the number).
    fn catch_signals(&self) -> Result<(), RunError> {
        // The handlers write to the exit reports' socket, which stays open
        // for the life of the process (one reference is never dropped).
        let wake = self.exits.wake_socket();
        let raw = wake.as_raw_fd();
        std::mem::forget(wake);
        for sig in STOP_SIGNALS {
            signal_hook::flag::register_usize(sig, self.signalled.clone(), sig as usize)
                .and_then(|_| signal_hook::low_level::pipe::register_raw(sig, raw))
                .map_err(io_err("install signal handlers", sig))?;
        }
        Ok(())
    }

    /// Writes the pid file, catches the stop signals and confines the
    /// process; the admin socket joins the listeners served.
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
        self.catch_signals()?;
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
            let acceptor = crate::frontend::admin::acceptor(l, self.vtpm.clone());
            self.accept(acceptor);
        }
        log::info!(
            "vtpmd {} serving {} ({})",
            env!("CARGO_PKG_VERSION"),
            self.state_dir.display(),
            self.vtpm.describe_engine()
        );
        Ok(())
    }

    /// Serves the listeners on this thread until a frontend or a signal
    /// says stop, then powers the TPM off (flushing its state) and removes
    /// the sockets and pid file.
    pub fn wait(mut self) -> Exit {
        let mut acceptors = std::mem::take(&mut self.acceptors);
        let mut why = None;
        transport::serve(&mut acceptors, &self.wake, || {
            why = self.stop.try_recv().ok().or_else(|| {
                match self.signalled.swap(0, Ordering::SeqCst) {
                    0 => None,
                    sig => Some(Exit::Signal(sig as i32)),
                }
            });
            why.is_some()
        });
        // Listening stops before the TPM is powered off.
        drop(acceptors);
        let why = why.unwrap_or(Exit::Signal(0));
        log::info!("stopping: {why:?}");
        self.vtpm.power_off();
        if self.swtpm_files_at_exit {
            self.vtpm.leave_swtpm_files();
        }
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

/// Whether this process was started under the name `swtpm` (the link
/// `vtpm-libvirt enable` puts in libvirt's PATH).
fn invoked_as_swtpm() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "swtpm"))
        .unwrap_or(false)
}
