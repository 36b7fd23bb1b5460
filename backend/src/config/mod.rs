//! Command line → validated configuration.
//!
//! Two frontends share one set of instance options ([`InstanceArgs`]: state
//! directory, at-rest key, migration keys, admin socket, log, pid file):
//! * `vtpmd socket` ([`swtpm`]) takes the `swtpm socket` options people and
//!   tools already use, so the two are interchangeable on a QEMU or
//!   cloud-hypervisor command line. Options of swtpm that vtpmd does not
//!   implement are refused by name.
//! * `vtpmd vhost-user` ([`vhost_user`]) serves a virtio-tpm device to a
//!   vhost-user frontend (crosvm, cloud-hypervisor's generic device).

pub mod swtpm;
pub mod vhost_user;

pub use swtpm::{capabilities_json, Endpoint, SocketArgs, SocketConfig};
pub use vhost_user::{VhostUserArgs, VhostUserConfig, VhostUserSocket};

use crate::storage::sealing::KeyFormat;
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
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

#[derive(Debug, Subcommand)]
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

/// `vtpmd swtpm-export`.
#[derive(Debug, Args)]
pub struct SwtpmExportArgs {
    /// State directory: dir=DIR (as for `vtpmd socket`).
    #[arg(long, value_name = "dir=DIR")]
    pub tpmstate: String,
}

/// Options every frontend shares: where the TPM state lives and how it is
/// protected, migrated and administered.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// State directory: dir=DIR[,mode=0600] or backend-uri=dir://DIR. The
    /// directory must exist; files are created with `mode`.
    #[arg(long, value_name = "dir=DIR[,mode=MODE]")]
    pub tpmstate: Option<String>,
    /// Log to a file: file=PATH[,level=N][,truncate], or to stderr at a
    /// level: level=N. Level 0: errors, 1-4: info, 5-19: debug, 20+: trace
    /// (command codes and sizes, never contents). Without --log, warnings
    /// and errors go to stderr.
    #[arg(long, value_name = "file=PATH[,level=N]")]
    pub log: Option<String>,
    /// Write the process id to a file: file=PATH.
    #[arg(long, value_name = "file=PATH")]
    pub pid: Option<String>,
    /// Encrypt state at rest: file=PATH[,format=hex|binary][,mode=aes-256-cbc].
    /// The file holds a 256-bit key; AES-256-CBC and HMAC-SHA256 keys are
    /// derived from it.
    #[arg(long, value_name = "file=PATH[,format=hex|binary]")]
    pub key: Option<String>,
    /// This host's migration key (private RSA key, PEM, from `vtpmctl
    /// keygen`). Enables sealed migration; plaintext or swtpm-format blobs
    /// are then refused.
    #[arg(long, value_name = "FILE")]
    pub host_key: Option<PathBuf>,
    /// Only wrap migrations to destination keys found (as *.pem) here.
    #[arg(long, value_name = "DIR")]
    pub trusted_peers: Option<PathBuf>,
    /// Administrator channel for vtpmctl: path=SOCK (created 0600). The
    /// VMM's channel cannot authorise a migration; this one can.
    #[arg(long, value_name = "path=SOCK")]
    pub admin: Option<String>,
    /// `incoming`: this instance is a migration destination; it starts
    /// locked on an empty state directory and unlocks only on a verified
    /// sealed migration (needs --host-key).
    #[arg(long, value_name = "incoming")]
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
    #[arg(long, value_name = "USER")]
    pub runas: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// None: stderr.
    pub file: Option<PathBuf>,
    pub level: u32,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub file: PathBuf,
    pub format: KeyFormat,
}

/// The validated [`InstanceArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    pub state_dir: PathBuf,
    pub state_mode: u32,
    pub log: Option<LogConfig>,
    pub pid_file: Option<PathBuf>,
    pub key: Option<KeyConfig>,
    pub host_key: Option<PathBuf>,
    pub trusted_peers: Option<PathBuf>,
    pub admin: Option<PathBuf>,
    pub incoming: bool,
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
        let cfg = InstanceConfig {
            state_dir,
            state_mode,
            log: self.log.as_deref().map(parse_log).transpose()?,
            pid_file: self.pid.as_deref().map(parse_pid).transpose()?,
            key: self.key.as_deref().map(parse_key).transpose()?,
            host_key: self.host_key.clone(),
            trusted_peers: self.trusted_peers.clone(),
            admin: self.admin.as_deref().map(parse_admin).transpose()?,
            seccomp: self
                .seccomp
                .as_deref()
                .map(parse_seccomp)
                .transpose()?
                .unwrap_or_default(),
            runas: self.runas.clone(),
            incoming: match self.migration.as_deref() {
                None => false,
                Some("incoming") => true,
                Some(other) => {
                    return Err(invalid(
                        "--migration",
                        format!("'{other}' is not supported (only 'incoming')"),
                    ))
                }
            },
            allow_plaintext_migration: self.allow_plaintext_migration,
        };
        if cfg.incoming && cfg.host_key.is_none() {
            return Err(invalid("--migration", "incoming needs --host-key"));
        }
        if cfg.trusted_peers.is_some() && cfg.host_key.is_none() {
            return Err(invalid("--trusted-peers", "needs --host-key"));
        }
        Ok(cfg)
    }

    /// The state directory and file mode from `--tpmstate`.
    pub fn state(&self) -> Result<(PathBuf, u32), ConfigError> {
        const OPT: &str = "--tpmstate";
        let s = self.tpmstate.as_deref().ok_or(ConfigError::NoState)?;
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
    if kv.contains_key("fd") || kv.contains_key("prefix") {
        return Err(invalid(
            OPT,
            "only file=, level= and truncate are supported",
        ));
    }
    // As swtpm: without file= the log goes to stderr, at the level given.
    let file = kv.get("file").filter(|f| !f.is_empty()).map(PathBuf::from);
    if file.is_none() && !kv.contains_key("level") {
        return Err(invalid(OPT, "give file=PATH and/or level=N"));
    }
    let level = match kv.get("level") {
        Some(l) => l
            .parse()
            .map_err(|_| invalid(OPT, format!("level '{l}' is not a number")))?,
        None => 1,
    };
    Ok(LogConfig {
        file,
        level,
        truncate: kv.contains_key("truncate"),
    })
}

fn parse_pid(s: &str) -> Result<PathBuf, ConfigError> {
    let kv = parse_kv("--pid", s, &["file", "fd"])?;
    if kv.contains_key("fd") {
        return Err(invalid("--pid", "fd= is not supported; use file=PATH"));
    }
    kv.get("file")
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| invalid("--pid", "file=PATH is required"))
}

fn parse_admin(s: &str) -> Result<PathBuf, ConfigError> {
    let kv = parse_kv("--admin", s, &["path"])?;
    kv.get("path")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| invalid("--admin", "path=SOCK is required"))
}

fn parse_key(s: &str) -> Result<KeyConfig, ConfigError> {
    const OPT: &str = "--key";
    let kv = parse_kv(
        OPT,
        s,
        &[
            "file", "format", "mode", "fd", "pwdfile", "pwdfd", "kdf", "remove",
        ],
    )?;
    for k in ["fd", "pwdfile", "pwdfd", "kdf", "remove"] {
        if kv.contains_key(k) {
            return Err(invalid(
                OPT,
                format!("'{k}' is not supported; give a 256-bit key with file=PATH"),
            ));
        }
    }
    let file = kv
        .get("file")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| invalid(OPT, "file=PATH is required"))?;
    let format = match kv.get("format").map(String::as_str) {
        None | Some("hex") => KeyFormat::Hex,
        Some("binary") => KeyFormat::Binary,
        Some(f) => return Err(invalid(OPT, format!("format '{f}' is not hex or binary"))),
    };
    match kv.get("mode").map(String::as_str) {
        None | Some("aes-256-cbc") => {}
        Some(m) => {
            return Err(invalid(
                OPT,
                format!("mode '{m}' is not supported; vtpmd uses aes-256-cbc"),
            ))
        }
    }
    Ok(KeyConfig {
        file: PathBuf::from(file),
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
