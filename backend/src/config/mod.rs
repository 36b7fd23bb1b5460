//! Command line → validated configuration.
//!
//! Two frontends share one set of instance options ([`InstanceArgs`]: state
//! directory, at-rest key, migration keys, admin socket, log, pid file):
//! [`key`] parses `--key`/`--migration-key`, [`channel`] `--ctrl`/`--server`.
//! * `vtpmd socket` ([`swtpm`]) takes the `swtpm socket` options people and
//!   tools already use, so the two are interchangeable on a QEMU or
//!   cloud-hypervisor command line. Options of swtpm that vtpmd does not
//!   implement are refused by name.
//! * `vtpmd vhost-user` ([`vhost_user`]) serves a virtio-tpm device to a
//!   vhost-user frontend (crosvm, cloud-hypervisor's generic device).

pub mod channel;
pub mod key;
pub mod swtpm;
pub mod vhost_user;

pub use channel::{Endpoint, Family};
pub use key::{KeyMaterial, KeySource, KeySpec};
pub use swtpm::{capabilities_json, SocketArgs, SocketConfig};
pub use vhost_user::{VhostUserArgs, VhostUserConfig, VhostUserSocket};

use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{opt}: unknown parameter '{key}' (accepted: {accepted})")]
    UnknownKey {
        opt: &'static str,
        key: String,
        accepted: String,
    },
    #[error("{opt}: {why}")]
    Invalid { opt: &'static str, why: String },
    #[error("option {0} is not supported by vtpmd")]
    Unsupported(String),
    #[error("vtpmd emulates TPM 2.0 only: add --tpm2 (TPM 1.2 is not supported)")]
    NeedTpm2,
    #[error("--tpmstate dir=DIR is required")]
    NoState,
    #[error("nothing to serve: give --ctrl and/or --server")]
    NoChannels,
    #[error("file descriptor {fd} is given to both {first} and {second}; each option needs its own descriptor")]
    FdTwice {
        fd: i32,
        first: &'static str,
        second: &'static str,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "vtpmd",
    version,
    about = "A swtpm-compatible virtual TPM 2.0 backend built on libtpms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. Only the one given is built (`defer`): clap builds
/// every `Arg` of a subcommand on the main thread's stack and heap, and
/// the pages touched stay resident in an idle daemon, so building the
/// other two as well cost each instance about 28 KiB (docs/PERFORMANCE.md,
/// "Memory per instance"). A deferred subcommand's arguments are added
/// after its variant's attributes, so the argument structs below carry no
/// doc comment: one would replace the variant's text in `--help`.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Serve a TPM over swtpm's control and data socket protocol (QEMU
    /// `-tpmdev emulator`, cloud-hypervisor `--tpm`, libvirt, tpm2-tss).
    Socket(SocketArgs),
    /// Serve a TPM as a vhost-user virtio-tpm device (virtio device id 62,
    /// as crosvm defines it) to crosvm, cloud-hypervisor's generic
    /// vhost-user device or any vhost-user frontend.
    VhostUser(VhostUserArgs),
    /// Write the state back in swtpm's file format (tpm2-00.permall,
    /// tpm2-00.volatilestate) for a user returning to swtpm; vtpmd's own
    /// files are removed. Run while no vtpmd serves the directory.
    SwtpmExport(SwtpmExportArgs),
}

// `vtpmd swtpm-export` (no doc comment: see `Command`).
#[derive(Debug, Args)]
pub struct SwtpmExportArgs {
    /// State directory: dir=DIR (as for `vtpmd socket`).
    #[arg(long, value_name = "dir=DIR")]
    pub tpmstate: String,
    /// The state's --key (swtpm syntax, as for `vtpmd socket`): the files
    /// are then written in swtpm's encrypted format for the same key.
    #[arg(long, value_name = "KEYSPEC")]
    pub key: Option<String>,
}

// Options every frontend shares: where the TPM state lives and how it is
// protected, migrated and administered (no doc comment: see `Command`).
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// State directory: dir=DIR[,mode=0600] or backend-uri=dir://DIR. The
    /// directory must exist; files are created with `mode`.
    #[arg(long, value_name = "dir=DIR[,mode=MODE]")]
    pub tpmstate: Option<String>,
    /// Log to a file (file=PATH[,truncate]) or an inherited descriptor
    /// (fd=N), or to stderr (level=N alone); [,level=N][,prefix=STRING].
    /// Level 0: errors, 1-4: info, 5-19: debug, 20+: trace (command codes
    /// and sizes, never contents). Without --log, warnings and errors go to
    /// stderr (with --daemon: stderr until started, then syslog).
    #[arg(long, value_name = "file=PATH|fd=N|level=N")]
    pub log: Option<String>,
    /// Write the process id to a file (file=PATH) or into an inherited
    /// descriptor of a regular file (fd=N).
    #[arg(long, value_name = "file=PATH|fd=N")]
    pub pid: Option<String>,
    /// Encrypt state at rest, with swtpm's syntax: a key
    /// (file=PATH|fd=N[,format=hex|binary]) or a passphrase
    /// (pwdfile=PATH|pwdfd=N[,kdf=pbkdf2|sha512]),
    /// [,mode=aes-128-cbc|aes-256-cbc][,remove]. Reads swtpm's encrypted
    /// state files as well as vtpmd's own (see docs/swtpm-compat.md).
    #[arg(long, value_name = "file=PATH|fd=N|pwdfile=PATH|pwdfd=N[,...]")]
    pub key: Option<String>,
    /// swtpm's migration key (same syntax as --key): state blobs handed out
    /// by GET_STATEBLOB are encrypted with it, and blobs encrypted with it
    /// are taken in, byte-compatible with swtpm. Allows such an export
    /// without --allow-plaintext-migration; a prepared sealed migration
    /// still takes precedence (docs/swtpm-compat.md, "Migration key").
    #[arg(long, value_name = "file=PATH|fd=N|pwdfile=PATH|pwdfd=N[,...]")]
    pub migration_key: Option<String>,
    /// This host's key (private RSA key, PEM, from `vtpmctl keygen`):
    /// sealed migration, saves sealed to this host; plaintext or
    /// swtpm-format blobs are then refused. Default: the host's key in
    /// /var/lib/vtpm-hostkey ($VTPM_HOST_KEY_DIR), made on first use.
    #[arg(long, value_name = "FILE", conflicts_with = "no_host_key")]
    pub host_key: Option<PathBuf>,
    /// Use no host key, not even the default one: state exports are then
    /// refused unless --allow-plaintext-migration or --migration-key.
    #[arg(long)]
    pub no_host_key: bool,
    /// What restoring an older save (a snapshot revert) does: allow
    /// (default; logged and recorded in vtpmd-rollbacks.log) or refuse
    /// (unless `vtpmctl allow-rollback` allowed that one).
    #[arg(long, value_name = "allow|refuse")]
    pub rollback: Option<String>,
    /// More private keys (*.pem) a save may be wrapped to, for restores
    /// only: an earlier host key, or another host's whose saves this host
    /// takes over. Default: restore/ next to the default host key.
    #[arg(long, value_name = "DIR")]
    pub restore_keys: Option<PathBuf>,
    /// Only wrap migrations to destination keys found (as *.pem) here.
    #[arg(long, value_name = "DIR")]
    pub trusted_peers: Option<PathBuf>,
    /// Administrator channel for vtpmctl: path=SOCK (created 0600). The
    /// VMM's channel cannot authorise a migration; this one can.
    #[arg(long, value_name = "path=SOCK")]
    pub admin: Option<String>,
    /// Comma list. `incoming`: a migration destination. With --host-key it
    /// starts locked on an empty state directory and unlocks only on a
    /// verified sealed migration; without, as swtpm: the state directory
    /// lock is taken only when the state arrives or the TPM is first used
    /// (shared storage). `release-lock-outgoing`: give the lock up once the
    /// last state blob was handed out, for a destination on shared storage.
    #[arg(long, value_name = "incoming,release-lock-outgoing")]
    pub migration: Option<String>,
    /// Allow exporting the state without a prepared sealed migration,
    /// handing it out unencrypted as swtpm does (savevm, snapshots,
    /// migration to swtpm). Off by default: the state would be readable and
    /// clonable.
    #[arg(long)]
    pub allow_plaintext_migration: bool,
    /// Syscall filter installed once serving: action=kill (default: a
    /// syscall outside vtpmd's allowlist kills the process), log (the
    /// kernel logs it) or none (no seccomp filter and no Landlock file
    /// restriction). See README, "Confinement".
    #[arg(long, value_name = "action=kill|log|none")]
    pub seccomp: Option<String>,
    /// Drop to this user's uid and gid after binding the sockets (the
    /// state directory must be writable by it).
    #[arg(long, short = 'r', value_name = "USER")]
    pub runas: Option<String>,
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    File {
        path: PathBuf,
        truncate: bool,
    },
    /// An inherited descriptor.
    Fd(i32),
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub target: LogTarget,
    pub level: u32,
    /// Put before every line (swtpm's prefix=).
    pub prefix: Option<String>,
}

impl LogConfig {
    /// The log file, if the log goes to a named file.
    pub fn file(&self) -> Option<&Path> {
        match &self.target {
            LogTarget::File { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Where the process id is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidTarget {
    File(PathBuf),
    /// An inherited descriptor of a regular file.
    Fd(i32),
}

/// `--migration`: how the state directory lock follows a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationFlags {
    /// `incoming` with `--host-key`: a sealed-migration destination.
    pub sealed_incoming: bool,
    /// `incoming` without `--host-key` (swtpm's meaning): the lock is taken
    /// only when the state arrives or the TPM is first used.
    pub defer_lock: bool,
    /// `release-lock-outgoing`: the lock is given up once the last blob
    /// was handed out.
    pub release_lock_outgoing: bool,
}

/// The validated [`InstanceArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    pub state_dir: PathBuf,
    pub state_mode: u32,
    pub log: Option<LogConfig>,
    pub pid: Option<PidTarget>,
    pub key: Option<KeySpec>,
    pub migration_key: Option<KeySpec>,
    pub host_key: Option<PathBuf>,
    /// No --host-key: use the host's key in the system location (not with
    /// --no-host-key, --allow-plaintext-migration or --migration-key).
    pub system_host_key: bool,
    pub rollback_refuse: bool,
    pub restore_keys: Option<PathBuf>,
    pub trusted_peers: Option<PathBuf>,
    pub admin: Option<PathBuf>,
    /// A sealed-migration destination (`--migration incoming` with
    /// `--host-key`).
    pub incoming: bool,
    pub migration: MigrationFlags,
    pub allow_plaintext_migration: bool,
    pub seccomp: SeccompMode,
    pub runas: Option<String>,
}

/// What a syscall outside vtpmd's allowlist does (`--seccomp action=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS): the default.
    #[default]
    Kill,
    /// The kernel logs the syscall and lets it run.
    Log,
    /// No confinement at all (no seccomp filter, no Landlock rules).
    None,
}

fn parse_seccomp(s: &str) -> Result<SeccompMode, ConfigError> {
    let kv = parse_kv("--seccomp", s, &["action", "profile"])?;
    if kv.contains_key("profile") {
        return Err(invalid(
            "--seccomp",
            "profile= is not supported (vtpmd has one allowlist)",
        ));
    }
    match kv.get("action").map(String::as_str) {
        None | Some("kill") => Ok(SeccompMode::Kill),
        Some("log") => Ok(SeccompMode::Log),
        Some("none") => Ok(SeccompMode::None),
        Some(other) => Err(invalid(
            "--seccomp",
            format!("action={other}: use kill, log or none"),
        )),
    }
}

impl InstanceArgs {
    /// Validates the shared options.
    pub fn validate(&self) -> Result<InstanceConfig, ConfigError> {
        let (state_dir, state_mode) = self.state()?;
        let migration = self
            .migration
            .as_deref()
            .map(|m| parse_migration(m, self.host_key.is_some()))
            .transpose()?
            .unwrap_or_default();
        let cfg = InstanceConfig {
            state_dir,
            state_mode,
            log: self.log.as_deref().map(parse_log).transpose()?,
            pid: self.pid.as_deref().map(parse_pid).transpose()?,
            key: self
                .key
                .as_deref()
                .map(|k| key::parse_key("--key", k))
                .transpose()?,
            migration_key: self
                .migration_key
                .as_deref()
                .map(|k| key::parse_key("--migration-key", k))
                .transpose()?,
            host_key: self.host_key.clone(),
            system_host_key: self.host_key.is_none()
                && !self.no_host_key
                && !self.allow_plaintext_migration
                && self.migration_key.is_none(),
            rollback_refuse: match self.rollback.as_deref() {
                None | Some("allow") => false,
                Some("refuse") => true,
                Some(other) => {
                    return Err(invalid(
                        "--rollback",
                        format!("'{other}': use allow or refuse"),
                    ))
                }
            },
            restore_keys: self.restore_keys.clone(),
            trusted_peers: self.trusted_peers.clone(),
            admin: self.admin.as_deref().map(parse_admin).transpose()?,
            seccomp: self
                .seccomp
                .as_deref()
                .map(parse_seccomp)
                .transpose()?
                .unwrap_or_default(),
            runas: self.runas.clone(),
            incoming: migration.sealed_incoming,
            migration,
            allow_plaintext_migration: self.allow_plaintext_migration,
        };
        cfg.check_fds(&[])?;
        if cfg.trusted_peers.is_some() && cfg.host_key.is_none() {
            return Err(invalid("--trusted-peers", "needs --host-key"));
        }
        Ok(cfg)
    }

    /// The state directory and file mode from `--tpmstate`.
    pub fn state(&self) -> Result<(PathBuf, u32), ConfigError> {
        Self::parse_state(self.tpmstate.as_deref())
    }

    /// Parses a `--tpmstate` value.
    pub fn parse_state(s: Option<&str>) -> Result<(PathBuf, u32), ConfigError> {
        const OPT: &str = "--tpmstate";
        let s = s.ok_or(ConfigError::NoState)?;
        let kv = parse_kv(OPT, s, &["dir", "mode", "backend-uri"])?;
        let dir = match (kv.get("dir"), kv.get("backend-uri")) {
            (Some(d), None) if !d.is_empty() => d.clone(),
            (None, Some(uri)) => match uri.strip_prefix("dir://") {
                Some(d) if !d.is_empty() => d.to_string(),
                _ => {
                    return Err(invalid(
                        OPT,
                        format!("backend-uri '{uri}': only dir:// is supported"),
                    ))
                }
            },
            (Some(_), Some(_)) => return Err(invalid(OPT, "give dir= or backend-uri=, not both")),
            _ => return Err(ConfigError::NoState),
        };
        let mode = kv
            .get("mode")
            .map(|m| parse_mode(OPT, m))
            .transpose()?
            .unwrap_or(0o640);
        Ok((PathBuf::from(dir), mode))
    }
}

/// Splits `a=1,b,c=3` into a map, refusing keys not in `accepted`.
pub fn parse_kv(
    opt: &'static str,
    s: &str,
    accepted: &[&str],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !accepted.contains(&k) {
            return Err(ConfigError::UnknownKey {
                opt,
                key: k.to_string(),
                accepted: accepted.join(", "),
            });
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ConfigError::Invalid {
                opt,
                why: format!("'{k}' given twice"),
            });
        }
    }
    Ok(out)
}

/// An inherited descriptor number (`fd=N`).
pub(crate) fn parse_fd(opt: &'static str, key: &str, v: &str) -> Result<i32, ConfigError> {
    v.parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| invalid(opt, format!("{key}={v} is not a file descriptor number")))
}

/// swtpm's booleans: the bare key, `true`/`1` or `false`/`0` (any case).
pub(crate) fn parse_bool(opt: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(opt, format!("{key}={v}: use true or false"))),
    }
}

impl InstanceConfig {
    /// Refuses a descriptor named by two options (taking it over twice
    /// would close it twice). `more`: the frontend's own (option, fd).
    pub fn check_fds(&self, more: &[(&'static str, i32)]) -> Result<(), ConfigError> {
        let fd_of = |k: &Option<KeySpec>| match k.as_ref().map(|k| &k.source) {
            Some(KeySource::Fd(fd)) => Some(*fd),
            _ => None,
        };
        let mut all: Vec<(&'static str, i32)> = [
            ("--key", fd_of(&self.key)),
            ("--migration-key", fd_of(&self.migration_key)),
            (
                "--log",
                match self.log.as_ref().map(|l| &l.target) {
                    Some(LogTarget::Fd(fd)) => Some(*fd),
                    _ => None,
                },
            ),
            (
                "--pid",
                match self.pid {
                    Some(PidTarget::Fd(fd)) => Some(fd),
                    _ => None,
                },
            ),
        ]
        .into_iter()
        .filter_map(|(o, fd)| fd.map(|fd| (o, fd)))
        .collect();
        all.extend_from_slice(more);
        for (i, (first, fd)) in all.iter().enumerate() {
            if let Some((second, _)) = all[i + 1..].iter().find(|(_, f)| f == fd) {
                return Err(ConfigError::FdTwice {
                    fd: *fd,
                    first,
                    second,
                });
            }
        }
        Ok(())
    }
}

fn parse_migration(s: &str, has_host_key: bool) -> Result<MigrationFlags, ConfigError> {
    const OPT: &str = "--migration";
    let kv = parse_kv(OPT, s, &["incoming", "release-lock-outgoing"])?;
    let flag = |k: &str| {
        kv.get(k)
            .map(|v| parse_bool(OPT, k, v))
            .transpose()
            .map(|b| b.unwrap_or(false))
    };
    let incoming = flag("incoming")?;
    Ok(MigrationFlags {
        sealed_incoming: incoming && has_host_key,
        defer_lock: incoming && !has_host_key,
        release_lock_outgoing: flag("release-lock-outgoing")?,
    })
}

pub(crate) fn invalid(opt: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        opt,
        why: why.into(),
    }
}

pub(crate) fn parse_mode(opt: &'static str, s: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            invalid(
                opt,
                format!("mode '{s}' is not an octal permission like 0600"),
            )
        })
}

fn parse_log(s: &str) -> Result<LogConfig, ConfigError> {
    const OPT: &str = "--log";
    let kv = parse_kv(OPT, s, &["file", "level", "truncate", "fd", "prefix"])?;
    let truncate = kv
        .get("truncate")
        .map(|v| parse_bool(OPT, "truncate", v))
        .transpose()?
        .unwrap_or(false);
    let target = match (kv.get("file"), kv.get("fd")) {
        (Some(_), Some(_)) => return Err(invalid(OPT, "give file= or fd=, not both")),
        (Some(f), None) if f.is_empty() => return Err(invalid(OPT, "file= needs a path")),
        (Some(f), None) => LogTarget::File {
            path: PathBuf::from(f),
            truncate,
        },
        (None, Some(fd)) => LogTarget::Fd(parse_fd(OPT, "fd", fd)?),
        (None, None) if kv.contains_key("level") => LogTarget::Stderr,
        (None, None) => return Err(invalid(OPT, "give file=PATH, fd=N and/or level=N")),
    };
    if truncate && !matches!(target, LogTarget::File { .. }) {
        return Err(invalid(OPT, "truncate needs file=PATH"));
    }
    // As swtpm: a log file or descriptor without level= logs at level 1.
    let level = match kv.get("level") {
        Some(l) => l.parse().map_err(|_| {
            invalid(
                OPT,
                format!("level '{l}' is not a number from 0 to 4294967295"),
            )
        })?,
        None => 1,
    };
    let prefix = kv.get("prefix").cloned();
    if prefix
        .as_ref()
        .is_some_and(|p| p.len() > 256 || p.contains('\n'))
    {
        return Err(invalid(
            OPT,
            "prefix= must be one line of at most 256 bytes",
        ));
    }
    Ok(LogConfig {
        target,
        level,
        prefix,
    })
}

fn parse_pid(s: &str) -> Result<PidTarget, ConfigError> {
    const OPT: &str = "--pid";
    let kv = parse_kv(OPT, s, &["file", "fd"])?;
    match (kv.get("file"), kv.get("fd")) {
        (Some(_), Some(_)) => Err(invalid(OPT, "give file= or fd=, not both")),
        (Some(f), None) if !f.is_empty() => Ok(PidTarget::File(PathBuf::from(f))),
        (None, Some(fd)) => Ok(PidTarget::Fd(parse_fd(OPT, "fd", fd)?)),
        _ => Err(invalid(OPT, "file=PATH or fd=N is required")),
    }
}

fn parse_admin(s: &str) -> Result<PathBuf, ConfigError> {
    let kv = parse_kv("--admin", s, &["path"])?;
    kv.get("path")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| invalid("--admin", "path=SOCK is required"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand's `--help` shows its variant's text, though its
    /// arguments are added later (`defer`), and the command is sound.
    #[test]
    fn deferred_subcommands_keep_their_help_text() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        cli.build();
        cli.clone().debug_assert();
        let about = |name: &str| {
            let sub = cli.find_subcommand(name).expect(name);
            assert!(sub.get_arguments().count() > 2, "{name}: arguments built");
            sub.get_about().map(|a| a.to_string()).unwrap_or_default()
        };
        assert!(about("socket").starts_with("Serve a TPM over swtpm's control and data socket"));
        assert!(about("vhost-user").starts_with("Serve a TPM as a vhost-user virtio-tpm device"));
        assert!(about("swtpm-export").starts_with("Write the state back in swtpm's file format"));
    }

    #[test]
    fn kv_parser_edge_cases() {
        assert!(parse_kv("--x", "a=1,a=2", &["a"]).is_err());
        assert_eq!(parse_kv("--x", "", &["a"]).unwrap().len(), 0);
        assert_eq!(
            parse_kv("--x", "a=1,,b", &["a", "b"])
                .unwrap()
                .get("b")
                .unwrap(),
            ""
        );
        assert!(parse_kv("--x", &"z".repeat(10000), &["a"]).is_err());
    }
}
