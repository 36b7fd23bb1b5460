//! `vtpmctl`: arguments → one admin request (or a local key operation) →
//! JSON on stdout. Exit status 1 with `{"error": ...}` when refused.
//! Started as `swtpm_ioctl` (a link of that name) or as `vtpmctl
//! swtpm-ioctl ARGS`, it is swtpm_ioctl instead ([`vtpmctl::ioctl`]).

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vtpm_common::admin::{
    IncomingInfo, KeysPreloaded, Prepared, Receipt, Request, SaveStatus, Status, Tombstone,
};
use vtpm_common::hostkey::HostKey;
use vtpm_common::statedir::RollbackPolicy;
use vtpmctl::{call, ioctl, migrate, offline, peer_key_pem, reserve, saves, CtlError};

#[derive(Debug, Parser)]
#[command(
    name = "vtpmctl",
    version,
    about = "Administer vtpmd instances and run sealed migrations"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create this host's RSA-3072 migration key pair in DIR
    /// (host-key.pem, mode 0600, and host-key.pub.pem).
    Keygen {
        /// Directory to write the key pair into (created if missing).
        #[arg(long, value_name = "DIR", required_unless_present = "system")]
        out: Option<PathBuf>,
        /// Make (or show) the host's default key, the one vtpmd uses
        /// without --host-key: /var/lib/vtpm-hostkey ($VTPM_HOST_KEY_DIR).
        #[arg(long, conflicts_with = "out")]
        system: bool,
    },
    /// Destination: issue a fresh single-use migration id and show this
    /// host's public key (vtpmd must run with --migration incoming).
    IncomingInfo {
        #[command(flatten)]
        at: Online,
    },
    /// Destination, optional: unwrap the migration's keys ahead of time, so
    /// no RSA work is left for the VM's downtime. WRAPPED is the
    /// `wrapped_key` that `vtpmctl outgoing` printed on the source (not a
    /// secret: only this host's private key opens it).
    IncomingKey {
        #[command(flatten)]
        at: Online,
        #[arg(long, value_name = "WRAPPED")]
        wrapped_key: String,
    },
    /// Source: prepare a migration to the destination that issued the id.
    Outgoing {
        #[command(flatten)]
        at: Online,
        /// The destination's public key: a PEM file, or the JSON file
        /// `vtpmctl incoming-info` printed on the destination.
        #[arg(long)]
        peer_key: PathBuf,
        /// The migration id the destination issued (`incoming-info`).
        #[arg(long, value_name = "HEX")]
        migration_id: String,
    },
    /// Lifecycle state, migration id and digest.
    Status {
        #[command(flatten)]
        at: Target,
    },
    /// Destination, after the migration: write the signed receipt.
    Receipt {
        #[command(flatten)]
        at: Online,
        /// Where to write the receipt (JSON) for `vtpmctl complete` (it is
        /// printed either way).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Source: check the destination's receipt, then erase the local copy.
    Complete {
        #[command(flatten)]
        at: Target,
        /// The receipt file `vtpmctl receipt` wrote on the destination.
        #[arg(long, value_name = "FILE")]
        receipt: PathBuf,
    },
    /// Source: abandon a prepared or exported migration; the TPM carries on
    /// here. Only right if the VM does not run on the destination.
    Abort {
        #[command(flatten)]
        at: Target,
    },
    /// Saves of this TPM: instance id, generation, rollback policy, the
    /// allowed older generation, how many rollbacks were recorded.
    Saves {
        #[command(flatten)]
        at: Target,
    },
    /// What restoring an older save (a snapshot revert) does: `allow`
    /// (default: logged and recorded in vtpmd-rollbacks.log) or `refuse`
    /// (until `vtpmctl allow-rollback` allows that generation).
    RollbackPolicy {
        #[arg(value_parser = ["allow", "refuse"])]
        policy: String,
        #[command(flatten)]
        at: Target,
    },
    /// Allow one restore of an older save under the policy `refuse` (the
    /// generation vtpmd's refusal named).
    AllowRollback {
        #[arg(long)]
        generation: u64,
        #[command(flatten)]
        at: Target,
    },
    /// Destination of a libvirt-driven migration, before `virsh migrate`:
    /// reserve a fresh single-use migration id in the state directory
    /// libvirt will start vtpmd on (created, owned by --owner, if
    /// missing), and print it with this host's public key. The next vtpmd
    /// started there takes the reservation. `vtpmctl migrate` runs this
    /// through its remote command.
    ReserveIncoming {
        /// The state directory, e.g. /var/lib/libvirt/swtpm/UUID/tpm2.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// The reservation's lifetime in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        expires: u64,
        /// This host's private key (default: the system host key in
        /// /var/lib/vtpm-hostkey or $VTPM_HOST_KEY_DIR, made on first use).
        #[arg(long, value_name = "FILE")]
        host_key: Option<PathBuf>,
        /// Who the TPM process runs as (libvirt's swtpm_user): USER or
        /// USER:GROUP.
        #[arg(long, value_name = "USER", default_value = "tss")]
        owner: String,
        /// Remove the reservation instead (and the directory if it is
        /// otherwise empty).
        #[arg(long, conflicts_with = "wrapped_key")]
        cancel: bool,
        /// Instead of reserving: leave the source's wrapped keys (the
        /// `wrapped_key` `outgoing` printed) with the reservation for --id,
        /// so the destination vtpmd unwraps them when it starts rather
        /// than in the VM's downtime. `vtpmctl migrate` does this.
        #[arg(long, value_name = "HEX", requires = "id")]
        wrapped_key: Option<String>,
        /// The migration id the reservation must be for (with --wrapped-key).
        #[arg(long, value_name = "ID", requires = "wrapped_key")]
        id: Option<String>,
    },
    /// Source of a libvirt-driven migration: move the running DOMAIN to
    /// DEST_URI with `virsh migrate --live`, its vtpmd TPM sealed to the
    /// destination (reserve-incoming there, outgoing here, virsh migrate,
    /// receipt there, complete here). Each step is printed; a failure
    /// before the VM runs on the destination is undone.
    Migrate {
        /// The domain (name or UUID).
        domain: String,
        /// The destination libvirt, e.g. qemu+ssh://dst/system.
        dest_uri: String,
        /// Command prefix that runs a command on the destination host
        /// (split on spaces; default `ssh root@HOST` from DEST_URI).
        #[arg(long, value_name = "CMD")]
        remote: Option<String>,
        /// The source libvirt.
        #[arg(long, value_name = "URI", default_value = "qemu:///system")]
        source_uri: String,
        /// The source vtpmd's admin socket (external backend; default for
        /// the emulator backend: STATEDIR/vtpmd-admin.sock).
        #[arg(long, value_name = "SOCK")]
        admin: Option<PathBuf>,
        /// The source's state directory (external backend: to complete
        /// once its vtpmd exited).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The destination's state directory (external backend; default:
        /// the same path as here).
        #[arg(long, value_name = "DIR")]
        remote_state_dir: Option<PathBuf>,
        /// vtpmctl on the destination.
        #[arg(long, value_name = "PATH", default_value = "vtpmctl")]
        remote_vtpmctl: String,
        /// Lifetime of the destination's reservation, seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        expires: u64,
        /// More `virsh migrate` arguments, after `--`.
        #[arg(last = true, value_name = "VIRSH_ARGS")]
        virsh_args: Vec<String>,
    },
    /// swtpm_ioctl's command line on a control socket, e.g.
    /// `vtpmctl swtpm-ioctl --unix SOCK -s` (stop the TPM and vtpmd).
    /// Plain text output as swtpm_ioctl's; `swtpm-ioctl --help` lists it.
    /// vtpmctl started under the name `swtpm_ioctl` does the same.
    #[command(disable_help_flag = true)]
    SwtpmIoctl {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
}

/// A running vtpmd (its admin socket) or, when none runs, its state
/// directory.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
    #[arg(long, value_name = "SOCK")]
    admin: Option<PathBuf>,
    /// The state directory: through the admin socket a vtpmd run as swtpm
    /// keeps there (vtpmd-admin.sock) if one runs, else on the files while
    /// no vtpmd runs (after QEMU quit on a migration source, vtpmd has
    /// exited and holds the state until the receipt).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Where a command goes.
enum At {
    Admin(PathBuf),
    Offline(PathBuf),
}

impl Target {
    fn resolve(self) -> At {
        match (self.admin, self.state_dir) {
            (Some(admin), _) => At::Admin(admin),
            (None, Some(dir)) => match vtpmctl::running_admin(&dir) {
                Some(sock) => At::Admin(sock),
                None => At::Offline(dir),
            },
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

/// A running vtpmd: its admin socket, or the state directory whose
/// default admin socket (`vtpmd-admin.sock`, a vtpmd run as swtpm) to use.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Online {
    /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
    #[arg(long, value_name = "SOCK")]
    admin: Option<PathBuf>,
    /// The state directory of a vtpmd libvirt runs (its admin socket is
    /// DIR/vtpmd-admin.sock).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl Online {
    fn socket(self) -> PathBuf {
        match (self.admin, self.state_dir) {
            (Some(a), _) => a,
            (None, Some(d)) => d.join(vtpm_common::statedir::ADMIN_SOCKET),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

fn read(path: &PathBuf) -> Result<String, CtlError> {
    std::fs::read_to_string(path)
        .map_err(|e| CtlError::Input(format!("cannot read {}: {e}", path.display())))
}

fn json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, CtlError> {
    serde_json::to_value(v).map_err(|e| CtlError::Input(e.to_string()))
}

fn run(cmd: Cmd) -> Result<serde_json::Value, CtlError> {
    match cmd {
        Cmd::Keygen { system: true, .. } => {
            let dir = vtpm_common::hostkey::system_key_dir();
            let (key, made) = HostKey::load_or_create(&dir).map_err(|e| {
                CtlError::Input(format!("{e} (the host key lives in {})", dir.display()))
            })?;
            Ok(serde_json::json!({
                "private_key": dir.join(vtpm_common::hostkey::PRIVATE_FILE),
                "public_key": dir.join(vtpm_common::hostkey::PUBLIC_FILE),
                "fingerprint": key.fingerprint(),
                "created": made,
            }))
        }
        Cmd::Keygen { out, .. } => {
            let out = out.unwrap_or_default();
            std::fs::create_dir_all(&out)
                .map_err(|e| CtlError::Input(format!("cannot create {}: {e}", out.display())))?;
            let key = HostKey::generate().map_err(|e| CtlError::Input(e.to_string()))?;
            key.save(&out).map_err(|e| CtlError::Input(e.to_string()))?;
            Ok(serde_json::json!({
                "private_key": out.join("host-key.pem"),
                "public_key": out.join("host-key.pub.pem"),
                "fingerprint": key.fingerprint(),
            }))
        }
        Cmd::IncomingInfo { at } => {
            json(call::<IncomingInfo>(&at.socket(), &Request::IncomingInfo)?)
        }
        Cmd::IncomingKey { at, wrapped_key } => json(call::<KeysPreloaded>(
            &at.socket(),
            &Request::IncomingKey { wrapped_key },
        )?),
        Cmd::Outgoing {
            at,
            peer_key,
            migration_id,
        } => json(call::<Prepared>(
            &at.socket(),
            &Request::Outgoing {
                peer_key: peer_key_pem(&read(&peer_key)?)?,
                migration_id,
            },
        )?),
        Cmd::Status { at } => match at.resolve() {
            At::Admin(admin) => json(call::<Status>(&admin, &Request::Status)?),
            At::Offline(dir) => offline::status(&dir),
        },
        Cmd::Receipt { at, out } => {
            let r = json(call::<Receipt>(&at.socket(), &Request::Receipt)?)?;
            if let Some(out) = out {
                std::fs::write(&out, format!("{r:#}\n"))
                    .map_err(|e| CtlError::Input(format!("cannot write {}: {e}", out.display())))?;
            }
            Ok(r)
        }
        Cmd::Complete { at, receipt } => {
            let r: Receipt = serde_json::from_str(&read(&receipt)?).map_err(|e| {
                CtlError::Input(format!("{} is not a receipt: {e}", receipt.display()))
            })?;
            match at.resolve() {
                At::Admin(admin) => json(call::<Tombstone>(
                    &admin,
                    &Request::Complete { receipt: r },
                )?),
                At::Offline(dir) => json(offline::complete(&dir, &r)?),
            }
        }
        Cmd::Abort { at } => match at.resolve() {
            At::Admin(admin) => json(call::<Status>(&admin, &Request::Abort)?),
            At::Offline(dir) => offline::abort(&dir),
        },
        Cmd::Saves { at } => match at.resolve() {
            At::Admin(admin) => json(call::<SaveStatus>(&admin, &Request::Saves)?),
            At::Offline(dir) => json(saves::status(&dir)?),
        },
        Cmd::RollbackPolicy { policy, at } => {
            let policy = if policy == "refuse" {
                RollbackPolicy::Refuse
            } else {
                RollbackPolicy::Allow
            };
            match at.resolve() {
                At::Admin(admin) => json(call::<SaveStatus>(
                    &admin,
                    &Request::RollbackPolicy { policy },
                )?),
                At::Offline(dir) => json(saves::set_policy(&dir, policy)?),
            }
        }
        Cmd::AllowRollback { generation, at } => match at.resolve() {
            At::Admin(admin) => json(call::<SaveStatus>(
                &admin,
                &Request::AllowRollback { generation },
            )?),
            At::Offline(dir) => json(saves::allow(&dir, generation)?),
        },
        Cmd::ReserveIncoming {
            state_dir,
            expires,
            host_key,
            owner,
            cancel,
            wrapped_key,
            id,
        } => {
            if cancel {
                return json(reserve::cancel(&state_dir)?);
            }
            if let (Some(wrapped), Some(id)) = (wrapped_key, id) {
                return json(reserve::leave_keys(&state_dir, &id, &wrapped)?);
            }
            let who = reserve::owner(&owner)?;
            let key = host_key.map_or(reserve::KeySource::System, reserve::KeySource::File);
            json(reserve::reserve(&state_dir, expires, &key, who)?)
        }
        Cmd::Migrate {
            domain,
            dest_uri,
            remote,
            source_uri,
            admin,
            state_dir,
            remote_state_dir,
            remote_vtpmctl,
            expires,
            virsh_args,
        } => {
            let remote = match remote {
                Some(r) => r.split_whitespace().map(str::to_string).collect::<Vec<_>>(),
                None => migrate::default_remote(&dest_uri)?,
            };
            if remote.is_empty() {
                return Err(CtlError::Input(
                    "--remote is empty; give the command prefix that runs a command on the destination, e.g. `ssh root@dst`".into(),
                ));
            }
            let plan = migrate::Plan {
                domain,
                dest_uri,
                source_uri,
                remote,
                remote_vtpmctl,
                admin,
                remote_state_dir,
                state_dir,
                expires,
                virsh_args,
            };
            Ok(plan.execute()?)
        }
        Cmd::SwtpmIoctl { .. } => unreachable!("handled in main"),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some("swtpm_ioctl".as_ref()) {
        return ExitCode::from(ioctl::main(&args.collect::<Vec<_>>()));
    }
    let cmd = Cli::parse().cmd;
    if let Cmd::SwtpmIoctl { args } = cmd {
        return ExitCode::from(ioctl::main(&args));
    }
    match run(cmd) {
        Ok(v) => {
            println!("{v:#}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{:#}", serde_json::json!({ "error": e.to_string() }));
            ExitCode::FAILURE
        }
    }
}
