//! Command line → validated configuration.
//!
//! `vtpmd socket` takes the `swtpm socket` options people and tools already
//! use (`--tpmstate dir=...`, `--ctrl type=unixio,path=...`, ...), so the two
//! are interchangeable on a QEMU or cloud-hypervisor command line. Options
//! of swtpm that vtpmd does not implement are refused by name.

use crate::storage::sealing::KeyFormat;
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
}

#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Emulate a TPM 2.0 (required: TPM 1.2 is not supported).
    #[arg(long)]
    pub tpm2: bool,
    /// State directory: dir=DIR[,mode=0600] or backend-uri=dir://DIR. The
    /// directory must exist; files are created with `mode`.
    #[arg(long, value_name = "dir=DIR[,mode=MODE]")]
    pub tpmstate: Option<String>,
    /// Control channel: type=unixio,path=PATH[,mode=0770][,terminate] or
    /// type=tcp,port=PORT[,bindaddr=ADDR][,terminate]. With `terminate`,
    /// vtpmd exits when the control client disconnects.
    #[arg(long, value_name = "type=unixio|tcp,...")]
    pub ctrl: Option<String>,
    /// Data channel server: type=tcp,port=PORT[,bindaddr=ADDR] or
    /// type=unixio,path=PATH[,mode=MODE]. QEMU does not need it (it passes
    /// its own socket with SET_DATAFD); tpm2-tss's swtpm TCTI does.
    #[arg(long, value_name = "type=tcp|unixio,...")]
    pub server: Option<String>,
    /// Comma list: not-need-init (power on without INIT), startup-clear /
    /// startup-state (also send TPM2_Startup), disable-auto-shutdown (no
    /// TPM2_Shutdown before a reset or stop).
    #[arg(long, value_name = "FLAG[,FLAG...]")]
    pub flags: Option<String>,
    /// Log to a file: file=PATH[,level=N][,truncate]. Level 1-4: info,
    /// 5-19: debug, 20+: trace (command codes and sizes, never contents).
    /// Without --log, warnings and errors go to stderr.
    #[arg(long, value_name = "file=PATH[,level=N]")]
    pub log: Option<String>,
    /// Write the process id to a file: file=PATH.
    #[arg(long, value_name = "file=PATH")]
    pub pid: Option<String>,
    /// Exit when the data-channel client disconnects.
    #[arg(long, short = 't')]
    pub terminate: bool,
    /// Detach and run in the background (default: stay in the foreground).
    #[arg(long, short = 'd')]
    pub daemon: bool,
    /// Encrypt state at rest: file=PATH[,format=hex|binary][,mode=aes-256-cbc].
    /// The file holds a 256-bit key; AES-256-CBC and HMAC-SHA256 keys are
    /// derived from it.
    #[arg(long, value_name = "file=PATH[,format=hex|binary]")]
    pub key: Option<String>,
    /// Print the supported features as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Print the state blobs present in --tpmstate as JSON and exit.
    #[arg(long)]
    pub print_states: bool,
    /// This host's migration key (private RSA key, PEM, from `vtpmctl
    /// keygen`). Enables sealed migration; plaintext or swtpm-format blobs
    /// are then refused on SET_STATEBLOB.
    #[arg(long, value_name = "FILE")]
    pub host_key: Option<PathBuf>,
    /// Only wrap migrations to destination keys found (as *.pem) here.
    #[arg(long, value_name = "DIR")]
    pub trusted_peers: Option<PathBuf>,
    /// Administrator channel for vtpmctl: path=SOCK (created 0600). QEMU's
    /// control socket cannot authorise a migration; this one can.
    #[arg(long, value_name = "path=SOCK")]
    pub admin: Option<String>,
    /// `incoming`: this instance is a migration destination; it starts
    /// locked on an empty state directory and unlocks only on a verified
    /// sealed migration (needs --host-key).
    #[arg(long, value_name = "incoming")]
    pub migration: Option<String>,
    /// Allow GET_STATEBLOB without a prepared sealed migration, handing the
    /// TPM state out unencrypted as swtpm does (savevm, snapshots, migration
    /// to swtpm). Off by default: the state would be readable and clonable.
    #[arg(long)]
    pub allow_plaintext_migration: bool,

    // swtpm options vtpmd does not implement: accepted by the parser only to
    // be refused by name.
    #[arg(long, hide = true)]
    pub migration_key: Option<String>,
    #[arg(long, hide = true)]
    pub locality: Option<String>,
    #[arg(long, hide = true)]
    pub seccomp: Option<String>,
    #[arg(long, hide = true)]
    pub runas: Option<String>,
    #[arg(long, hide = true)]
    pub chroot: Option<String>,
    #[arg(long, hide = true)]
    pub profile: Option<String>,
    #[arg(long, hide = true)]
    pub vtpm_proxy: bool,
}

/// Where a channel listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix { path: PathBuf, mode: Option<u32> },
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub file: PathBuf,
    pub level: u32,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub file: PathBuf,
    pub format: KeyFormat,
}

/// A validated `vtpmd socket` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    pub state_dir: PathBuf,
    pub state_mode: u32,
    pub ctrl: Option<Endpoint>,
    pub ctrl_terminate: bool,
    pub server: Option<Endpoint>,
    pub not_need_init: bool,
    pub startup: Option<crate::instance::Startup>,
    pub disable_auto_shutdown: bool,
    pub log: Option<LogConfig>,
    pub pid_file: Option<PathBuf>,
    pub terminate: bool,
    pub daemon: bool,
    pub key: Option<KeyConfig>,
    pub host_key: Option<PathBuf>,
    pub trusted_peers: Option<PathBuf>,
    pub admin: Option<PathBuf>,
    pub incoming: bool,
    pub allow_plaintext_migration: bool,
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

fn invalid(opt: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        opt,
        why: why.into(),
    }
}

fn parse_mode(opt: &'static str, s: &str) -> Result<u32, ConfigError> {
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

fn parse_endpoint(
    opt: &'static str,
    s: &str,
    with_terminate: bool,
) -> Result<(Endpoint, bool), ConfigError> {
    let mut accepted = vec!["type", "path", "mode", "port", "bindaddr"];
    if with_terminate {
        accepted.push("terminate");
    }
    let kv = parse_kv(opt, s, &accepted)?;
    let terminate = kv.contains_key("terminate");
    let ty = kv.get("type").map(String::as_str).unwrap_or("");
    let ep = match ty {
        "unixio" => {
            let path = kv
                .get("path")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| invalid(opt, "type=unixio needs path=PATH"))?;
            if kv.contains_key("port") || kv.contains_key("bindaddr") {
                return Err(invalid(opt, "port= and bindaddr= belong to type=tcp"));
            }
            let mode = kv.get("mode").map(|m| parse_mode(opt, m)).transpose()?;
            Endpoint::Unix {
                path: PathBuf::from(path),
                mode,
            }
        }
        "tcp" => {
            let port: u16 = kv
                .get("port")
                .ok_or_else(|| invalid(opt, "type=tcp needs port=N"))?
                .parse()
                .map_err(|_| invalid(opt, "port must be a number from 0 to 65535"))?;
            let addr: IpAddr = match kv.get("bindaddr") {
                Some(a) => a
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse()
                    .map_err(|_| invalid(opt, format!("bindaddr '{a}' is not an IP address")))?,
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            };
            if kv.contains_key("path") || kv.contains_key("mode") {
                return Err(invalid(opt, "path= and mode= belong to type=unixio"));
            }
            Endpoint::Tcp(SocketAddr::new(addr, port))
        }
        "" => return Err(invalid(opt, "type= is required (unixio or tcp)")),
        other => {
            return Err(invalid(
                opt,
                format!("type '{other}' is not supported (unixio or tcp)"),
            ))
        }
    };
    Ok((ep, terminate))
}

impl SocketArgs {
    /// Validates the arguments into a configuration.
    pub fn validate(&self) -> Result<SocketConfig, ConfigError> {
        let refused: [(&str, bool); 7] = [
            ("--migration-key", self.migration_key.is_some()),
            ("--locality", self.locality.is_some()),
            ("--seccomp", self.seccomp.is_some()),
            ("--runas", self.runas.is_some()),
            ("--chroot", self.chroot.is_some()),
            ("--profile", self.profile.is_some()),
            ("--vtpm-proxy", self.vtpm_proxy),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, given)| *given) {
            return Err(ConfigError::Unsupported(name.to_string()));
        }
        if !self.tpm2 {
            return Err(ConfigError::NeedTpm2);
        }
        let (state_dir, state_mode) = self.state()?;
        let (ctrl, ctrl_terminate) = match &self.ctrl {
            Some(s) => {
                let (ep, t) = parse_endpoint("--ctrl", s, true)?;
                (Some(ep), t)
            }
            None => (None, false),
        };
        let server = self
            .server
            .as_deref()
            .map(|s| parse_endpoint("--server", s, false).map(|(e, _)| e))
            .transpose()?;
        if ctrl.is_none() && server.is_none() {
            return Err(ConfigError::NoChannels);
        }
        let mut cfg = SocketConfig {
            state_dir,
            state_mode,
            ctrl,
            ctrl_terminate,
            server,
            not_need_init: false,
            startup: None,
            disable_auto_shutdown: false,
            log: self.log.as_deref().map(parse_log).transpose()?,
            pid_file: self.pid.as_deref().map(parse_pid).transpose()?,
            terminate: self.terminate,
            daemon: self.daemon,
            key: self.key.as_deref().map(parse_key).transpose()?,
            host_key: self.host_key.clone(),
            trusted_peers: self.trusted_peers.clone(),
            admin: self.admin.as_deref().map(parse_admin).transpose()?,
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
        if cfg.incoming && cfg.not_need_init {
            return Err(invalid("--migration", "an incoming destination stays locked until the migration arrives; drop --flags not-need-init/startup-*"));
        }
        if cfg.trusted_peers.is_some() && cfg.host_key.is_none() {
            return Err(invalid("--trusted-peers", "needs --host-key"));
        }
        if let Some(flags) = &self.flags {
            apply_flags(&mut cfg, flags)?;
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

fn apply_flags(cfg: &mut SocketConfig, flags: &str) -> Result<(), ConfigError> {
    use crate::instance::Startup;
    for f in flags.split(',').filter(|f| !f.is_empty()) {
        let startup = |s| (cfg.startup.is_none() || cfg.startup == Some(s)).then_some(Some(s));
        match f {
            "not-need-init" => cfg.not_need_init = true,
            "startup-clear" => cfg.startup = startup(Startup::Clear).ok_or_else(|| invalid("--flags", "only one startup-* flag"))?,
            "startup-state" => cfg.startup = startup(Startup::State).ok_or_else(|| invalid("--flags", "only one startup-* flag"))?,
            "startup-none" => {}
            "disable-auto-shutdown" => cfg.disable_auto_shutdown = true,
            other => {
                return Err(invalid(
                    "--flags",
                    format!("unknown flag '{other}' (accepted: not-need-init, startup-clear, startup-state, startup-none, disable-auto-shutdown)"),
                ))
            }
        }
    }
    if cfg.startup.is_some() {
        // swtpm: a startup-* flag implies not-need-init.
        cfg.not_need_init = true;
    }
    Ok(())
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
    let file = kv
        .get("file")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| invalid(OPT, "file=PATH is required"))?;
    let level = match kv.get("level") {
        Some(l) => l
            .parse()
            .map_err(|_| invalid(OPT, format!("level '{l}' is not a number")))?,
        None => 1,
    };
    Ok(LogConfig {
        file: PathBuf::from(file),
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

/// The JSON `--print-capabilities` prints (the shape libvirt and
/// swtpm_setup read), listing only what vtpmd implements.
pub fn capabilities_json() -> String {
    let features = [
        "tpm-2.0",
        "flags-opt-startup",
        "flags-opt-disable-auto-shutdown",
        "cmdarg-print-states",
        "nvram-backend-dir",
    ];
    let list = features
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{{ \"type\": \"swtpm\", \"implementation\": \"vtpmd\", \"features\": [ {list} ], \"version\": \"{}\" }}",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<SocketConfig, String> {
        let mut v = vec!["vtpmd", "socket"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::Socket(a) = cli.command;
        a.validate().map_err(|e| e.to_string())
    }

    const BASE: [&str; 5] = [
        "--tpm2",
        "--tpmstate",
        "dir=/tmp/s",
        "--ctrl",
        "type=unixio,path=/tmp/c.sock",
    ];

    #[test]
    fn qemu_docs_command_line() {
        let c = args(&BASE).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(
            c.ctrl,
            Some(Endpoint::Unix {
                path: "/tmp/c.sock".into(),
                mode: None
            })
        );
        assert!(!c.not_need_init && !c.daemon && !c.terminate);
    }

    #[test]
    fn libvirt_style_command_line() {
        let c = args(&[
            "--ctrl",
            "type=unixio,path=/run/x.sock,mode=0600",
            "--tpmstate",
            "dir=/var/lib/s,mode=0600",
            "--log",
            "file=/var/log/x.log,level=20",
            "--terminate",
            "--tpm2",
            "--pid",
            "file=/run/x.pid",
        ])
        .unwrap();
        assert_eq!(c.state_mode, 0o600);
        assert_eq!(
            c.ctrl,
            Some(Endpoint::Unix {
                path: "/run/x.sock".into(),
                mode: Some(0o600)
            })
        );
        assert_eq!(c.log.unwrap().level, 20);
        assert!(c.terminate);
        assert_eq!(c.pid_file, Some(PathBuf::from("/run/x.pid")));
    }

    #[test]
    fn tpm2_tss_tcp_command_line() {
        let c = args(&[
            "--tpm2",
            "--tpmstate",
            "backend-uri=dir:///tmp/s",
            "--server",
            "type=tcp,port=2321",
            "--ctrl",
            "type=tcp,port=2322,bindaddr=127.0.0.1,terminate",
            "--flags",
            "not-need-init,startup-clear",
        ])
        .unwrap();
        assert_eq!(
            c.server,
            Some(Endpoint::Tcp("127.0.0.1:2321".parse().unwrap()))
        );
        assert!(c.ctrl_terminate && c.not_need_init);
        assert_eq!(c.startup, Some(crate::instance::Startup::Clear));
    }

    #[test]
    fn startup_flag_implies_not_need_init() {
        let mut v = BASE.to_vec();
        v.extend(["--flags", "startup-state"]);
        assert!(args(&v).unwrap().not_need_init);
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = args(&["--tpmstate", "dir=/x", "--ctrl", "type=unixio,path=/c"]).unwrap_err();
        assert!(e.contains("--tpm2"), "{e}");
        let mut v = BASE.to_vec();
        v.extend(["--seccomp", "action=none"]);
        assert_eq!(
            args(&v).unwrap_err(),
            "option --seccomp is not supported by vtpmd"
        );
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "--ctrl",
            "type=unixio,path=/c,clientfd=4",
        ])
        .unwrap_err();
        assert!(e.contains("unknown parameter 'clientfd'"), "{e}");
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "--ctrl",
            "type=vsock,port=1",
        ])
        .unwrap_err();
        assert!(e.contains("type 'vsock' is not supported"), "{e}");
        let e = args(&["--tpm2", "--tpmstate", "dir=/x"]).unwrap_err();
        assert!(e.contains("nothing to serve"), "{e}");
        let e = args(&["--tpm2", "--ctrl", "type=unixio,path=/c"]).unwrap_err();
        assert!(e.contains("--tpmstate"), "{e}");
        let mut v = BASE.to_vec();
        v.extend(["--flags", "startup-bogus"]);
        assert!(args(&v)
            .unwrap_err()
            .contains("unknown flag 'startup-bogus'"));
        let mut v = BASE.to_vec();
        v.extend(["--key", "pwdfile=/k"]);
        assert!(args(&v).unwrap_err().contains("'pwdfile' is not supported"));
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x,mode=999",
            "--ctrl",
            "type=unixio,path=/c",
        ])
        .unwrap_err();
        assert!(e.contains("octal"), "{e}");
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "--server",
            "type=tcp,port=99999",
        ])
        .unwrap_err();
        assert!(e.contains("port"), "{e}");
        assert!(args(&["--bogus"]).is_err());
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

    #[test]
    fn capabilities_are_json_like_swtpm() {
        let j = capabilities_json();
        assert!(j.starts_with("{ \"type\": \"swtpm\""));
        assert!(j.contains("\"tpm-2.0\""));
        assert!(!j.contains("tpm-1.2"));
    }
}
