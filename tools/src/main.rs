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
use vtpmctl::{call, ioctl, offline, peer_key_pem, saves, CtlError};

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
        /// without --host-key: /var/lib/vtpm ($VTPM_HOST_KEY_DIR).
        #[arg(long, conflicts_with = "out")]
        system: bool,
    },
    /// Destination: issue a fresh single-use migration id and show this
    /// host's public key (vtpmd must run with --migration incoming).
    IncomingInfo {
        /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
        #[arg(long, value_name = "SOCK")]
        admin: PathBuf,
    },
    /// Destination, optional: unwrap the migration's keys ahead of time, so
    /// no RSA work is left for the VM's downtime. WRAPPED is the
    /// `wrapped_key` that `vtpmctl outgoing` printed on the source (not a
    /// secret: only this host's private key opens it).
    IncomingKey {
        /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
        #[arg(long, value_name = "SOCK")]
        admin: PathBuf,
        #[arg(long, value_name = "WRAPPED")]
        wrapped_key: String,
    },
    /// Source: prepare a migration to the destination that issued the id.
    Outgoing {
        /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
        #[arg(long, value_name = "SOCK")]
        admin: PathBuf,
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
        /// vtpmd's admin socket (the path given to `vtpmd --admin path=`).
        #[arg(long, value_name = "SOCK")]
        admin: PathBuf,
        /// Where to write the receipt (JSON) for `vtpmctl complete`.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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
        Cmd::IncomingInfo { admin } => json(call::<IncomingInfo>(&admin, &Request::IncomingInfo)?),
        Cmd::IncomingKey { admin, wrapped_key } => json(call::<KeysPreloaded>(
            &admin,
            &Request::IncomingKey { wrapped_key },
        )?),
        Cmd::Outgoing {
            admin,
            peer_key,
            migration_id,
        } => json(call::<Prepared>(
            &admin,
            &Request::Outgoing {
                peer_key: peer_key_pem(&read(&peer_key)?)?,
                migration_id,
            },
        )?),
        Cmd::Status { at } => match at.resolve() {
            At::Admin(admin) => json(call::<Status>(&admin, &Request::Status)?),
            At::Offline(dir) => offline::status(&dir),
        },
        Cmd::Receipt { admin, out } => {
            let r = json(call::<Receipt>(&admin, &Request::Receipt)?)?;
            std::fs::write(&out, format!("{r:#}\n"))
                .map_err(|e| CtlError::Input(format!("cannot write {}: {e}", out.display())))?;
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
