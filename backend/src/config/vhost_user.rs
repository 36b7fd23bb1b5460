//! `vtpmd vhost-user`: the virtio-tpm device served over a vhost-user socket.
//!
//! Follows QEMU's "backend program conventions" for vhost-user device
//! processes: `--socket-path` (vtpmd listens there) or `--fd` (an inherited,
//! already listening socket), `--print-capabilities`, SIGTERM to stop, no
//! daemonising.

use super::{invalid, ConfigError, InstanceArgs, InstanceConfig};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct VhostUserArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Listen for the vhost-user frontend on this unix socket (created, or
    /// replaced if a stale socket is there).
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Use this inherited file descriptor, a unix socket already bound and
    /// listening, instead of --socket-path.
    #[arg(long, value_name = "FD")]
    pub fd: Option<i32>,
    /// Print the vhost-user capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// The virtio device id to announce (62, crosvm's virtio-tpm, unless the
    /// VMM needs another: QEMU's generic device only takes ids it can name).
    /// vhost-user does not carry the id; the VMM is configured with the same
    /// one and the guest driver must bind to it.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VIRTIO_ID,
          value_parser = clap::value_parser!(u32).range(1..=0xffff))]
    pub virtio_id: u32,
}

/// crosvm's private virtio device id for a TPM (no VIRTIO spec id exists).
pub const DEFAULT_VIRTIO_ID: u32 = 62;

/// Where the frontend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostUserSocket {
    Path(PathBuf),
    Fd(i32),
}

/// A validated `vtpmd vhost-user` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    pub instance: InstanceConfig,
    pub socket: VhostUserSocket,
    pub virtio_id: u32,
}

impl VhostUserArgs {
    pub fn validate(&self) -> Result<VhostUserConfig, ConfigError> {
        let instance = self.instance.validate()?;
        let socket = match (&self.socket_path, self.fd) {
            (Some(p), None) if !p.as_os_str().is_empty() => VhostUserSocket::Path(p.clone()),
            (None, Some(fd)) if fd >= 0 => VhostUserSocket::Fd(fd),
            (None, Some(fd)) => {
                return Err(invalid("--fd", format!("{fd} is not a file descriptor")))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--socket-path",
                    "give --socket-path or --fd, not both",
                ))
            }
            _ => {
                return Err(invalid(
                    "--socket-path",
                    "--socket-path PATH (or --fd N) is required",
                ))
            }
        };
        if let VhostUserSocket::Fd(fd) = socket {
            instance.check_fds(&[("--fd", fd)])?;
        }
        Ok(VhostUserConfig {
            instance,
            socket,
            virtio_id: self.virtio_id,
        })
    }
}

/// What `--print-capabilities` prints. vhost-user defines no device type
/// name for a TPM, so the virtio device id is given as well.
pub fn capabilities_json(virtio_id: u32) -> String {
    format!(
        "{{ \"type\": \"tpm\", \"virtio-device-id\": {virtio_id}, \"implementation\": \"vtpmd\", \"features\": [ \"device-state\", \"reset-device\" ], \"version\": \"{}\" }}",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<VhostUserConfig, String> {
        let mut v = vec!["vtpmd", "vhost-user"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::VhostUser(a) = cli.command else {
            return Err("not vhost-user".into());
        };
        a.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn socket_path_or_fd() {
        let c = args(&["--socket-path", "/run/t.sock", "--tpmstate", "dir=/s"]).unwrap();
        assert_eq!(c.socket, VhostUserSocket::Path("/run/t.sock".into()));
        assert_eq!(c.instance.state_dir, PathBuf::from("/s"));
        let c = args(&["--fd", "3", "--tpmstate", "dir=/s"]).unwrap();
        assert_eq!(c.socket, VhostUserSocket::Fd(3));
    }

    #[test]
    fn virtio_id_defaults_to_crosvm_and_is_settable() {
        let c = args(&["-s", "/x", "--tpmstate", "dir=/s"]).unwrap();
        assert_eq!(c.virtio_id, 62);
        let c = args(&["-s", "/x", "--tpmstate", "dir=/s", "--virtio-id", "45"]).unwrap();
        assert_eq!(c.virtio_id, 45);
        assert!(capabilities_json(45).contains("\"virtio-device-id\": 45,"));
        for bad in ["0", "65536", "tpm", "-1"] {
            let e = args(&["-s", "/x", "--tpmstate", "dir=/s", "--virtio-id", bad]);
            assert!(e.is_err(), "--virtio-id {bad} accepted");
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = args(&["--tpmstate", "dir=/s"]).unwrap_err();
        assert!(e.contains("--socket-path PATH"), "{e}");
        let e = args(&["-s", "/x", "--fd", "3", "--tpmstate", "dir=/s"]).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = args(&["-s", "/x"]).unwrap_err();
        assert!(e.contains("--tpmstate"), "{e}");
        // Without --host-key, `incoming` has swtpm's meaning (the lock
        // waits for the state); with one, a sealed destination.
        let c = args(&[
            "-s",
            "/x",
            "--tpmstate",
            "dir=/s",
            "--migration",
            "incoming",
        ])
        .unwrap();
        assert!(c.instance.migration.defer_lock && !c.instance.incoming);
        let e = args(&["-s", "/x", "--tpmstate", "dir=/s", "--migration", "bogus"]).unwrap_err();
        assert!(e.contains("unknown parameter 'bogus'"), "{e}");
        let e = args(&["-s", "/x", "--tpmstate", "dir=/s", "--fd", "-1"]);
        assert!(e.is_err());
        assert!(args(&[
            "-s",
            "/x",
            "--tpmstate",
            "dir=/s",
            "--ctrl",
            "type=unixio,path=/c"
        ])
        .is_err());
    }
}
