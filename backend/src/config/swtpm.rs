//! `vtpmd socket`: the swtpm-compatible control and data channels.
//!
//! Takes the `swtpm socket` options people and tools already use
//! (`--tpmstate dir=...`, `--ctrl type=unixio,path=...`, ...), so the two are
//! interchangeable on a QEMU or cloud-hypervisor command line. Options of
//! swtpm that vtpmd does not implement are refused by name.

use super::channel::{parse_endpoint, Channel, Endpoint};
use super::{invalid, ConfigError, InstanceArgs, InstanceConfig};
use clap::Args;

// `vtpmd socket`'s options: the shared ones, then the socket's own, in
// two flattened halves so that clap builds them one after the other. A
// derived `augment_args` keeps every `Arg` it builds in a stack slot of
// its own (13 KiB for each half); one half nested in the other left 12 KiB
// more of the main thread's stack resident for the life of the process
// (docs/PERFORMANCE.md, "Memory per instance"). No doc comments on either
// struct: see `config::Command`.
#[derive(Debug, Args)]
pub struct SocketArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub socket: SocketOptions,
}

// The options only `vtpmd socket` has.
#[derive(Debug, Args)]
pub struct SocketOptions {
    /// Emulate a TPM 2.0 (required: TPM 1.2 is not supported).
    #[arg(long)]
    pub tpm2: bool,
    /// Control channel: type=unixio,path=PATH[,mode=0770],
    /// type=tcp,port=PORT[,bindaddr=127.0.0.1], or an inherited socket:
    /// type=unixio|tcp,fd=N (listening) or type=unixio,clientfd=N (a
    /// connected client); [,terminate]: exit when the client disconnects.
    #[arg(long, value_name = "type=unixio|tcp,...")]
    pub ctrl: Option<String>,
    /// Data channel: [type=tcp,]port=PORT[,bindaddr=127.0.0.1],
    /// type=unixio,path=PATH[,mode=0770], or an inherited socket fd=N
    /// (listening: accepts clients; connected: the one data connection,
    /// vtpmd exits when it closes). QEMU does not need it (it passes its
    /// own socket with SET_DATAFD); tpm2-tss's swtpm TCTI does.
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
    /// swtpm's older form of `--server type=tcp,port=PORT`.
    #[arg(long, short = 'p', value_name = "PORT")]
    pub port: Option<String>,
    /// swtpm's older form of `--server type=tcp,fd=FD`.
    #[arg(long, short = 'f', value_name = "FD")]
    pub fd: Option<String>,
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
    pub locality: Option<String>,
    #[arg(long, hide = true)]
    pub chroot: Option<String>,
    #[arg(long, hide = true)]
    pub profile: Option<String>,
    #[arg(long, hide = true)]
    pub vtpm_proxy: bool,
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

impl SocketArgs {
    /// Validates the arguments into a configuration.
    pub fn validate(&self) -> Result<SocketConfig, ConfigError> {
        let opts = &self.socket;
        let refused: [(&str, bool); 4] = [
            ("--locality", opts.locality.is_some()),
            ("--chroot", opts.chroot.is_some()),
            ("--profile", opts.profile.is_some()),
            ("--vtpm-proxy", opts.vtpm_proxy),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, given)| *given) {
            return Err(ConfigError::Unsupported(name.to_string()));
        }
        if !opts.tpm2 {
            return Err(ConfigError::NeedTpm2);
        }
        let instance = self.instance.validate()?;
        let (ctrl, ctrl_terminate) = match &opts.ctrl {
            Some(s) => {
                let (ep, t) = parse_endpoint(Channel::Ctrl, s)?;
                (Some(ep), t)
            }
            None => (None, false),
        };
        if let Some(v) = opts
            .port
            .iter()
            .chain(opts.fd.iter())
            .find(|v| v.contains(','))
        {
            return Err(invalid("--port/--fd", format!("'{v}' is not a number")));
        }
        let server = match (&opts.server, &opts.port, &opts.fd) {
            (Some(s), None, None) => Some(s.clone()),
            (None, Some(p), None) => Some(format!("type=tcp,port={p}")),
            (None, None, Some(fd)) => Some(format!("type=tcp,fd={fd}")),
            (None, None, None) => None,
            _ => {
                return Err(invalid(
                    "--server",
                    "give the data channel once: --server, --port or --fd",
                ))
            }
        };
        let server = server
            .as_deref()
            .map(|s| parse_endpoint(Channel::Server, s).map(|(e, _)| e))
            .transpose()?;
        if ctrl.is_none() && server.is_none() {
            return Err(ConfigError::NoChannels);
        }
        let fds: Vec<(&'static str, i32)> = [("--ctrl", &ctrl), ("--server", &server)]
            .into_iter()
            .filter_map(|(o, e)| e.as_ref().and_then(Endpoint::fd).map(|fd| (o, fd)))
            .collect();
        instance.check_fds(&fds)?;
        let mut cfg = SocketConfig {
            instance,
            ctrl,
            ctrl_terminate,
            server,
            not_need_init: false,
            startup: None,
            disable_auto_shutdown: false,
            terminate: opts.terminate,
            daemon: opts.daemon,
        };
        if let Some(flags) = &opts.flags {
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

/// What `--print-capabilities` lists: only what vtpmd implements.
/// (libvirt checks `cmdarg-pwd-fd` before passing `--key pwdfd=`,
/// `cmdarg-migration` before `--migration`, and `tpm-2.0`.)
pub const FEATURES: &[&str] = &[
    "tpm-2.0",
    "flags-opt-startup",
    "flags-opt-disable-auto-shutdown",
    "ctrl-opt-terminate",
    "cmdarg-seccomp",
    "cmdarg-key-fd",
    "cmdarg-pwd-fd",
    "cmdarg-print-states",
    "cmdarg-migration",
    "nvram-backend-dir",
];

/// The JSON `--print-capabilities` prints (the shape libvirt and
/// swtpm_setup read). `rsa_key_sizes`: what the TPM engine supports, listed
/// as swtpm lists them (`rsa-keysize-2048`, ...).
pub fn capabilities_json(rsa_key_sizes: &[u32]) -> String {
    let list = FEATURES
        .iter()
        .map(|f| f.to_string())
        .chain(rsa_key_sizes.iter().map(|n| format!("rsa-keysize-{n}")))
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
    use super::super::{Cli, Command, LogTarget, PidTarget};
    use super::*;
    use crate::config::channel::Family;
    use crate::config::{KeyMaterial, KeySource};
    use clap::Parser;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::path::PathBuf;

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
                mode: 0o770
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
                mode: 0o600
            })
        );
        assert_eq!(c.instance.log.unwrap().level, 20);
        assert!(c.terminate);
        assert_eq!(
            c.instance.pid,
            Some(PidTarget::File(PathBuf::from("/run/x.pid")))
        );
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
        assert!(e.contains("path= does not go with clientfd="), "{e}");
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
        v.extend(["--key", "pwdfile=/k,file=/j"]);
        assert!(args(&v).unwrap_err().contains("give only one of"));
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
        let j = capabilities_json(&[2048, 3072]);
        assert!(j.starts_with("{ \"type\": \"swtpm\""));
        assert!(j.contains("\"tpm-2.0\""));
        assert!(j.contains("\"cmdarg-pwd-fd\", "));
        assert!(j.contains("\"rsa-keysize-2048\", \"rsa-keysize-3072\" ]"));
        assert!(!j.contains("tpm-1.2"));
        assert!(!j.contains("nvram-backend-file"));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["features"].as_array().unwrap().len(), FEATURES.len() + 2);
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
        assert_eq!((log.target, log.level), (LogTarget::Stderr, 5));
        let mut v = BASE.to_vec();
        v.extend(["--log", "truncate"]);
        assert!(args(&v)
            .unwrap_err()
            .contains("file=PATH, fd=N and/or level=N"));
    }

    #[test]
    fn swtpm_setup_command_line() {
        // What swtpm_setup 0.7.1 runs (plus --key when asked to encrypt).
        let c = args(&[
            "--flags",
            "not-need-init,startup-clear",
            "--tpmstate",
            "backend-uri=dir:///var/lib/swtpm/x",
            "--pid",
            "file=/tmp/.swtpm_setup.pidfile.abc",
            "--tpm2",
            "--key",
            "pwdfd=9,mode=aes-256-cbc",
            "--log",
            "file=/var/log/swtpm_setup.log",
            "--ctrl",
            "type=unixio,clientfd=5",
            "--server",
            "type=tcp,fd=7",
        ])
        .unwrap();
        assert_eq!(c.ctrl, Some(Endpoint::ClientFd(5)));
        assert_eq!(
            c.server,
            Some(Endpoint::Fd {
                fd: 7,
                family: Family::Tcp
            })
        );
        let k = c.instance.key.unwrap();
        assert_eq!(k.source, KeySource::Fd(9));
        assert!(matches!(k.material, KeyMaterial::Passphrase(_)));
        assert_eq!(
            c.instance.log.unwrap().level,
            1,
            "swtpm: file= alone logs at level 1"
        );
    }

    #[test]
    fn libvirt_encrypted_shared_storage_command_line() {
        let mut v = BASE.to_vec();
        v.extend([
            "--key",
            "pwdfd=20,mode=aes-256-cbc",
            "--migration-key",
            "pwdfd=21,mode=aes-256-cbc",
            "--migration",
            "release-lock-outgoing,incoming",
        ]);
        let c = args(&v).unwrap();
        assert!(c.instance.migration_key.is_some());
        let m = c.instance.migration;
        assert!(m.release_lock_outgoing && m.defer_lock && !m.sealed_incoming);
        assert!(
            !c.instance.incoming,
            "no --host-key: swtpm's meaning of incoming"
        );
        v.extend(["--host-key", "/k.pem"]);
        let c = args(&v).unwrap();
        assert!(c.instance.incoming && !c.instance.migration.defer_lock);
        let mut v = BASE.to_vec();
        v.extend(["--migration", "outgoing"]);
        assert!(args(&v)
            .unwrap_err()
            .contains("unknown parameter 'outgoing'"));
    }

    #[test]
    fn log_and_pid_descriptors() {
        let mut v = BASE.to_vec();
        v.extend(["--log", "fd=4,level=2,prefix=[tpm]", "--pid", "fd=5"]);
        let c = args(&v).unwrap();
        let log = c.instance.log.unwrap();
        assert_eq!(log.target, LogTarget::Fd(4));
        assert_eq!(log.prefix.as_deref(), Some("[tpm]"));
        assert_eq!(c.instance.pid, Some(PidTarget::Fd(5)));
        for (opt, val, want) in [
            ("--log", "fd=4,file=/x", "not both"),
            ("--log", "fd=x", "fd=x"),
            ("--log", "level=-1", "level '-1'"),
            ("--log", "level=99999999999", "level '99999999999'"),
            ("--log", "fd=3,truncate", "truncate needs file="),
            ("--log", "file=", "file= needs a path"),
            ("--pid", "fd=-2", "fd=-2"),
            ("--pid", "file=/a,fd=3", "not both"),
            ("--pid", "", "file=PATH or fd=N is required"),
        ] {
            let mut v = BASE.to_vec();
            v.extend([opt, val]);
            let e = args(&v).unwrap_err();
            assert!(e.contains(want), "{opt} {val}: {e}");
        }
        let long_prefix = format!("level=1,prefix={}", "p".repeat(300));
        let mut v = BASE.to_vec();
        v.extend(["--log", long_prefix.as_str()]);
        assert!(args(&v).unwrap_err().contains("prefix="));
    }

    #[test]
    fn one_descriptor_for_two_options_is_refused() {
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "--ctrl",
            "type=unixio,clientfd=5",
            "--server",
            "type=tcp,fd=5",
        ])
        .unwrap_err();
        assert!(
            e.contains("descriptor 5 is given to both --ctrl and --server"),
            "{e}"
        );
        let mut v = BASE.to_vec();
        v.extend(["--key", "pwdfd=6", "--log", "fd=6"]);
        assert!(args(&v).unwrap_err().contains("--key and --log"));
    }

    #[test]
    fn swtpm_short_and_older_forms() {
        let c = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "-p",
            "2321",
            "-t",
            "-r",
            "tss",
        ])
        .unwrap();
        assert_eq!(
            c.server,
            Some(Endpoint::Tcp("127.0.0.1:2321".parse().unwrap()))
        );
        assert!(c.terminate);
        assert_eq!(c.instance.runas.as_deref(), Some("tss"));
        let c = args(&["--tpm2", "--tpmstate", "dir=/x", "--fd", "4"]).unwrap();
        assert_eq!(
            c.server,
            Some(Endpoint::Fd {
                fd: 4,
                family: Family::Tcp
            })
        );
        let e = args(&[
            "--tpm2",
            "--tpmstate",
            "dir=/x",
            "--port",
            "1",
            "--server",
            "port=2",
        ]);
        assert!(e.unwrap_err().contains("give the data channel once"));
        let e = args(&["--tpm2", "--tpmstate", "dir=/x", "--port", "x"]).unwrap_err();
        assert!(e.contains("port 'x'"), "{e}");
        let e = args(&["--tpm2", "--tpmstate", "dir=/x", "-p", "1,bindaddr=0.0.0.0"]).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
    }
}
