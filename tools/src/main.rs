//! `vtpmctl`: arguments → one admin request (or a local key operation) →
//! JSON on stdout. Exit status 1 with `{"error": ...}` when refused.
//! Started as `swtpm_ioctl` (a link of that name) or as `vtpmctl
//! swtpm-ioctl ARGS`, it is swtpm_ioctl instead ([`vtpmctl::ioctl`]).

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vtpm_common::admin::{
    IncomingInfo, KeysPreloaded, Prepared, Receipt, Request, Status, Tombstone,
};
use vtpm_common::hostkey::HostKey;
use vtpmctl::{call, ioctl, offline, peer_key_pem, CtlError};

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
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
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
    /// The state directory, while no vtpmd runs on it (after QEMU quit on
    /// a migration source, vtpmd has exited and holds the state until the
    /// receipt).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
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
        Cmd::Keygen { out } => {
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
        Cmd::Status { at } => match (at.admin, at.state_dir) {
            (Some(admin), _) => json(call::<Status>(&admin, &Request::Status)?),
            (None, Some(dir)) => offline::status(&dir),
            (None, None) => unreachable!("clap requires one"),
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
            match (at.admin, at.state_dir) {
                (Some(admin), _) => json(call::<Tombstone>(
                    &admin,
                    &Request::Complete { receipt: r },
                )?),
                (None, Some(dir)) => json(offline::complete(&dir, &r)?),
                (None, None) => unreachable!("clap requires one"),
            }
        }
        Cmd::Abort { at } => match (at.admin, at.state_dir) {
            (Some(admin), _) => json(call::<Status>(&admin, &Request::Abort)?),
            (None, Some(dir)) => offline::abort(&dir),
            (None, None) => unreachable!("clap requires one"),
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
