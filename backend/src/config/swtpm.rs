//! `vtpmd socket`: the swtpm-compatible control and data channels.
//!
//! Takes the `swtpm socket` options people and tools already use
//! (`--tpmstate dir=...`, `--ctrl type=unixio,path=...`, ...), so the two are
//! interchangeable on a QEMU or cloud-hypervisor command line. Options of
//! swtpm that vtpmd does not implement are refused by name.

use super::{invalid, parse_kv, parse_mode, ConfigError, InstanceArgs, InstanceConfig};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SocketArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Emulate a TPM 2.0 (required: TPM 1.2 is not supported).
    #[arg(long)]
    pub tpm2: bool,
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
    /// Exit when the data-channel client disconnects.
    #[arg(long, short = 't')]
    pub terminate: bool,
    /// Detach and run in the background (default: stay in the foreground).
    #[arg(long, short = 'd')]
    pub daemon: bool,
    /// Print the supported features as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Print the state blobs present in --tpmstate as JSON and exit.
    #[arg(long)]
    pub print_states: bool,

    // swtpm options vtpmd does not implement: accepted by the parser only to
    // be refused by name.
    #[arg(long, hide = true)]
    pub migration_key: Option<String>,
    #[arg(long, hide = true)]
    pub locality: Option<String>,
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

/// A validated `vtpmd socket` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    pub instance: InstanceConfig,
    pub ctrl: Option<Endpoint>,
    pub ctrl_terminate: bool,
    pub server: Option<Endpoint>,
    pub not_need_init: bool,
    pub startup: Option<crate::engine::tpm2::StartupType>,
    pub disable_auto_shutdown: bool,
    pub terminate: bool,
    pub daemon: bool,
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
    // swtpm's default: `--server port=P` (no type) is TCP.
    let ty = match kv.get("type").map(String::as_str) {
        None if kv.contains_key("port") && opt == "--server" => "tcp",
        t => t.unwrap_or(""),
    };
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
        let refused: [(&str, bool); 5] = [
            ("--migration-key", self.migration_key.is_some()),
            ("--locality", self.locality.is_some()),
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
        let instance = self.instance.validate()?;
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
            instance,
            ctrl,
            ctrl_terminate,
            server,
            not_need_init: false,
            startup: None,
            disable_auto_shutdown: false,
            terminate: self.terminate,
            daemon: self.daemon,
        };
        if let Some(flags) = &self.flags {
            apply_flags(&mut cfg, flags)?;
        }
        if cfg.instance.incoming && cfg.not_need_init {
            return Err(invalid("--migration", "an incoming destination stays locked until the migration arrives; drop --flags not-need-init/startup-*"));
        }
        Ok(cfg)
    }
}

fn apply_flags(cfg: &mut SocketConfig, flags: &str) -> Result<(), ConfigError> {
    use crate::engine::tpm2::StartupType as Startup;
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
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<SocketConfig, String> {
        let mut v = vec!["vtpmd", "socket"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::Socket(a) = cli.command else {
            return Err("not socket".into());
        };
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
        assert_eq!(c.instance.state_dir, PathBuf::from("/tmp/s"));
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
        assert_eq!(c.instance.state_mode, 0o600);
        assert_eq!(
            c.ctrl,
            Some(Endpoint::Unix {
                path: "/run/x.sock".into(),
                mode: Some(0o600)
            })
        );
        assert_eq!(c.instance.log.unwrap().level, 20);
        assert!(c.terminate);
        assert_eq!(c.instance.pid_file, Some(PathBuf::from("/run/x.pid")));
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
        assert_eq!(c.startup, Some(crate::engine::tpm2::StartupType::Clear));
    }

    #[test]
    fn incoming_destination_cannot_power_on_at_start() {
        let mut v = BASE.to_vec();
        v.extend([
            "--host-key",
            "/k.pem",
            "--migration",
            "incoming",
            "--flags",
            "startup-clear",
        ]);
        let e = args(&v).unwrap_err();
        assert!(e.contains("stays locked"), "{e}");
        v.truncate(v.len() - 2);
        assert!(args(&v).unwrap().instance.incoming);
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
        v.extend(["--chroot", "/x"]);
        assert_eq!(
            args(&v).unwrap_err(),
            "option --chroot is not supported by vtpmd"
        );
        let mut v = BASE.to_vec();
        v.extend(["--seccomp", "action=maybe"]);
        assert!(args(&v).unwrap_err().contains("kill, log or none"));
        let mut v = BASE.to_vec();
        v.extend(["--seccomp", "action=log", "--runas", "tss"]);
        let c = args(&v).unwrap();
        assert_eq!(c.instance.seccomp, crate::config::SeccompMode::Log);
        assert_eq!(c.instance.runas.as_deref(), Some("tss"));
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
    fn capabilities_are_json_like_swtpm() {
        let j = capabilities_json();
        assert!(j.starts_with("{ \"type\": \"swtpm\""));
        assert!(j.contains("\"tpm-2.0\""));
        assert!(!j.contains("tpm-1.2"));
    }

    #[test]
    fn swtpm_defaults_server_port_alone_and_log_level_alone() {
        let c = args(&["--tpm2", "--tpmstate", "dir=/x", "--server", "port=2321"]).unwrap();
        assert_eq!(
            c.server,
            Some(Endpoint::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                2321
            )))
        );
        let e = args(&["--tpm2", "--tpmstate", "dir=/x", "--ctrl", "port=1"]).unwrap_err();
        assert!(e.contains("type= is required"), "{e}");
        let mut v = BASE.to_vec();
        v.extend(["--log", "level=5"]);
        let log = args(&v).unwrap().instance.log.unwrap();
        assert_eq!((log.file, log.level), (None, 5));
        let mut v = BASE.to_vec();
        v.extend(["--log", "truncate"]);
        assert!(args(&v).unwrap_err().contains("file=PATH and/or level=N"));
    }
}
