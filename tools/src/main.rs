//! `vtpmctl`: arguments → one admin request (or a local key operation) →
//! JSON on stdout. Exit status 1 with `{"error": ...}` when refused.

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vtpm_common::admin::{
    IncomingInfo, KeysPreloaded, Prepared, Receipt, Request, Status, Tombstone,
};
use vtpm_common::hostkey::HostKey;
use vtpmctl::{call, CtlError};

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
        #[arg(long)]
        out: PathBuf,
    },
    /// Destination: issue a fresh single-use migration id and show this
    /// host's public key (vtpmd must run with --migration incoming).
    IncomingInfo {
        #[arg(long)]
        admin: PathBuf,
    },
    /// Destination, optional: unwrap the migration's keys ahead of time, so
    /// no RSA work is left for the VM's downtime. WRAPPED is the
    /// `wrapped_key` that `vtpmctl outgoing` printed on the source (not a
    /// secret: only this host's private key opens it).
    IncomingKey {
        #[arg(long)]
        admin: PathBuf,
        #[arg(long, value_name = "WRAPPED")]
        wrapped_key: String,
    },
    /// Source: prepare a migration to the destination that issued the id.
    Outgoing {
        #[arg(long)]
        admin: PathBuf,
        /// The destination's public key (PEM file).
        #[arg(long)]
        peer_key: PathBuf,
        #[arg(long)]
        migration_id: String,
    },
    /// Lifecycle state, migration id and digest.
    Status {
        #[arg(long)]
        admin: PathBuf,
    },
    /// Destination, after the migration: write the signed receipt.
    Receipt {
        #[arg(long)]
        admin: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Source: check the destination's receipt, then erase the local copy.
    Complete {
        #[arg(long)]
        admin: PathBuf,
        #[arg(long)]
        receipt: PathBuf,
    },
    /// Source: abandon a prepared or exported migration; the TPM carries on.
    Abort {
        #[arg(long)]
        admin: PathBuf,
    },
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
                peer_key: read(&peer_key)?,
                migration_id,
            },
        )?),
        Cmd::Status { admin } => json(call::<Status>(&admin, &Request::Status)?),
        Cmd::Receipt { admin, out } => {
            let r = json(call::<Receipt>(&admin, &Request::Receipt)?)?;
            std::fs::write(&out, format!("{r:#}\n"))
                .map_err(|e| CtlError::Input(format!("cannot write {}: {e}", out.display())))?;
            Ok(r)
        }
        Cmd::Complete { admin, receipt } => {
            let r: Receipt = serde_json::from_str(&read(&receipt)?).map_err(|e| {
                CtlError::Input(format!("{} is not a receipt: {e}", receipt.display()))
            })?;
            json(call::<Tombstone>(
                &admin,
                &Request::Complete { receipt: r },
            )?)
        }
        Cmd::Abort { admin } => json(call::<Status>(&admin, &Request::Abort)?),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
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
