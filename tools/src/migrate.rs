//! `vtpmctl migrate DOMAIN DEST_URI`: a libvirt live migration whose TPM
//! moves sealed, run on the source host. The steps (docs/migration.md,
//! "With libvirt"):
//!
//! 1. the domain's TPM (`virsh dumpxml`): its state directory and the
//!    source vtpmd's admin socket;
//! 2. on the destination, through the remote command: `vtpmctl
//!    reserve-incoming` (a fresh single-use id, the host key);
//! 3. `outgoing` on the source vtpmd (keys wrapped to that host key),
//!    and the wrapped keys left with the destination's reservation;
//! 4. `virsh migrate --live` (libvirt starts the destination vtpmd, which
//!    takes the reservation);
//! 5. the destination's signed receipt, then `complete` on the source.
//!
//! A failure before the VM runs on the destination undoes 2 and 3 (abort,
//! cancel); after it, nothing is undone and the way to finish is printed.

use crate::domain::{Backend, Domain, DomainError};
use crate::{offline, CtlError};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;
use vtpm_common::admin::{self, ClientError, Prepared, Receipt, Request, Status, Tombstone};
use vtpm_common::statedir::{self, StateDirError};

/// How long the destination's receipt and the source's release may take.
const SETTLE: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("{0} names no host to reach the destination by; give --remote CMD (the command prefix that runs a command on the destination, e.g. `ssh root@HOST`)")]
    NoHost(String),
    #[error("cannot run {cmd}: {source}; is it installed and in PATH?")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed: {stderr}")]
    Virsh { cmd: String, stderr: String },
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the domain is {0} on the source; vtpmctl migrate moves a running domain (virsh start it, or migrate it offline with virsh)")]
    NotRunning(String),
    #[error("the domain is transient on the source: libvirt deletes a transient domain's TPM state directory when it leaves, before the destination's receipt; make it persistent first (virsh dumpxml DOMAIN > d.xml; virsh define d.xml)")]
    Transient,
    #[error("--undefinesource makes libvirt delete the source's TPM state directory before the destination's receipt; leave it out (the source domain stays defined with a tombstoned TPM that will not start; `virsh undefine --tpm` it once the migration is done)")]
    UndefineSource,
    #[error("the domain's TPM has an external backend: give the source vtpmd's admin socket (--admin SOCK) and the destination's state directory (--remote-state-dir DIR)")]
    ExternalNeedsPaths,
    #[error("no vtpmd admin socket at {0}: the domain's TPM is not run by vtpmd (check `vtpm-libvirt status` and restart the domain after `vtpm-libvirt enable`), or the vtpmd is older than the default admin socket (restart the domain); with swtpm the TPM migrates unsealed, with plain virsh migrate")]
    NoAdminSocket(String),
    #[error("the source TPM is {0:?}, not running: an earlier migration is unresolved; finish it (vtpmctl complete) or drop it (vtpmctl abort --admin {1})")]
    SourceBusy(admin::Phase, String),
    #[error("source vtpmd ({0}): {1}")]
    Source(String, ClientError),
    #[error("on the destination, `{cmd}`: {error}")]
    Remote { cmd: String, error: String },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Ctl(#[from] Box<CtlError>),
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub domain: String,
    pub dest_uri: String,
    pub source_uri: String,
    /// The command prefix that runs a command on the destination host.
    pub remote: Vec<String>,
    /// vtpmctl's name on the destination.
    pub remote_vtpmctl: String,
    /// The source vtpmd's admin socket (external backend).
    pub admin: Option<PathBuf>,
    /// The destination's state directory (external backend).
    pub remote_state_dir: Option<PathBuf>,
    /// The source's state directory (external backend, for `complete`
    /// once the source vtpmd has exited).
    pub state_dir: Option<PathBuf>,
    /// The reservation's lifetime, seconds.
    pub expires: u64,
    /// More `virsh migrate` arguments.
    pub virsh_args: Vec<String>,
}

/// `ssh root@HOST` for a URI with a host (`qemu+ssh://[user@]host[:port]/system`).
pub fn default_remote(uri: &str) -> Result<Vec<String>, MigrateError> {
    let no_host = || MigrateError::NoHost(uri.into());
    let rest = uri.split_once("://").ok_or_else(no_host)?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => ("root", authority),
    };
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        hostport.split(':').next().unwrap_or_default()
    };
    if host.is_empty() {
        return Err(no_host());
    }
    Ok(vec!["ssh".into(), format!("{user}@{host}")])
}

/// Whether `virsh dominfo` says the domain is persistent.
fn persistent(dominfo: &str) -> bool {
    dominfo.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "Persistent" && v.trim() == "yes")
    })
}

fn step(n: u32, what: &str) {
    eprintln!("vtpmctl migrate [{n}/5] {what}");
}

fn note(what: &str) {
    eprintln!("vtpmctl migrate: {what}");
}

fn run(cmd: &[String]) -> Result<std::process::Output, MigrateError> {
    Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| MigrateError::Spawn {
            cmd: cmd[0].clone(),
            source,
        })
}

fn virsh(uri: &str, args: &[&str]) -> Result<String, MigrateError> {
    let mut cmd: Vec<String> = vec!["virsh".into(), "-c".into(), uri.into()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let out = run(&cmd)?;
    if !out.status.success() {
        return Err(MigrateError::Virsh {
            cmd: cmd.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Plan {
    /// Runs vtpmctl on the destination; its JSON result as `T`.
    fn remote<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, MigrateError> {
        let mut cmd = self.remote.clone();
        cmd.push(self.remote_vtpmctl.clone());
        cmd.extend(args.iter().map(|a| a.to_string()));
        let shown = cmd.join(" ");
        let out = run(&cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: Option<serde_json::Value> = serde_json::from_str(stdout.trim()).ok();
        let failed = |error: String| MigrateError::Remote {
            cmd: shown.clone(),
            error,
        };
        match value {
            Some(v) if out.status.success() => {
                serde_json::from_value(v).map_err(|e| failed(format!("unexpected output: {e}")))
            }
            Some(serde_json::Value::Object(o)) if o.contains_key("error") => Err(failed(
                o["error"].as_str().unwrap_or_default().to_string(),
            )),
            _ => Err(failed(format!(
                "exit status {}, no vtpmctl output (is vtpmctl installed there, and does the remote command work?): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// The whole migration; the final JSON on success.
    pub fn execute(&self) -> Result<serde_json::Value, MigrateError> {
        step(
            1,
            &format!("reading domain {} on {}", self.domain, self.source_uri),
        );
        let dom = Domain::parse(&virsh(&self.source_uri, &["dumpxml", &self.domain])?)?;
        let state = virsh(&self.source_uri, &["domstate", &self.domain])?;
        if state.trim() != "running" {
            return Err(MigrateError::NotRunning(state.trim().into()));
        }
        if self.virsh_args.iter().any(|a| a == "--undefinesource") {
            return Err(MigrateError::UndefineSource);
        }
        let info = virsh(&self.source_uri, &["dominfo", &self.domain])?;
        if dom.backend == Backend::Emulator && !persistent(&info) {
            return Err(MigrateError::Transient);
        }
        let (src_dir, admin, dest_dir) = match dom.backend {
            Backend::Emulator => {
                let d = dom.emulator_state_dir();
                let admin = self
                    .admin
                    .clone()
                    .unwrap_or_else(|| d.join(statedir::ADMIN_SOCKET));
                let dest = self.remote_state_dir.clone().unwrap_or_else(|| d.clone());
                (Some(self.state_dir.clone().unwrap_or(d)), admin, dest)
            }
            Backend::External => match (&self.admin, &self.remote_state_dir) {
                (Some(a), Some(r)) => (self.state_dir.clone(), a.clone(), r.clone()),
                _ => return Err(MigrateError::ExternalNeedsPaths),
            },
        };
        if !admin.exists() {
            return Err(MigrateError::NoAdminSocket(admin.display().to_string()));
        }
        let src = |e| MigrateError::Source(admin.display().to_string(), e);
        let status: Status = admin::call(&admin, &Request::Status).map_err(src)?;
        if status.state != admin::Phase::Running {
            return Err(MigrateError::SourceBusy(
                status.state,
                admin.display().to_string(),
            ));
        }
        note(&format!(
            "source TPM: vtpmd at {} (state {}), destination state directory {}",
            admin.display(),
            src_dir
                .as_deref()
                .map_or("-".into(), |d| d.display().to_string()),
            dest_dir.display()
        ));

        step(
            2,
            "reserving a migration id on the destination (vtpmctl reserve-incoming)",
        );
        let dest_dir_s = dest_dir.display().to_string();
        let expires = self.expires.to_string();
        let reserved: crate::reserve::Reserved = self.remote(&[
            "reserve-incoming",
            "--state-dir",
            &dest_dir_s,
            "--expires",
            &expires,
        ])?;
        note(&format!(
            "destination id {} (host key {}), valid {} s",
            reserved.migration_id, reserved.key_fingerprint, self.expires
        ));
        let cancel = || {
            match self.remote::<serde_json::Value>(&["reserve-incoming", "--cancel", "--state-dir", &dest_dir_s]) {
                Ok(_) => "the destination's reservation was cancelled".to_string(),
                Err(e) => format!("cancelling the destination's reservation failed ({e}): run `vtpmctl reserve-incoming --cancel --state-dir {dest_dir_s}` there"),
            }
        };

        step(3, "preparing the source TPM (vtpmctl outgoing)");
        let prepared: Prepared = match admin::call(
            &admin,
            &Request::Outgoing {
                peer_key: reserved.public_key.clone(),
                migration_id: reserved.migration_id.clone(),
            },
        ) {
            Ok(p) => p,
            Err(e) => {
                let undo = cancel();
                return Err(MigrateError::Failed(format!(
                    "the source vtpmd refused the migration: {e}; {undo}. Nothing else changed."
                )));
            }
        };
        note(&format!(
            "source prepared for {} (destination key {})",
            prepared.migration_id, prepared.peer_key
        ));
        // The destination vtpmd then unwraps the keys when libvirt starts
        // it, not in the VM's downtime; without them it unwraps blob 1's.
        let left = self.remote::<serde_json::Value>(&[
            "reserve-incoming",
            "--state-dir",
            &dest_dir_s,
            "--id",
            &reserved.migration_id,
            "--wrapped-key",
            &prepared.wrapped_key,
        ]);
        match left {
            Ok(_) => note("the wrapped keys are left with the destination's reservation: its vtpmd unwraps them at start"),
            Err(e) => note(&format!("could not leave the wrapped keys with the destination's reservation ({e}); the destination unwraps them from the stream instead, inside the downtime (an RSA decryption, about 5 ms)")),
        }

        if !self.virsh_args.iter().any(|a| a == "--persistent") {
            note("without --persistent the domain is transient on the destination, and libvirt deletes a transient domain's TPM state when it stops there; add `-- --persistent` unless you define it there yourself");
        }
        step(
            4,
            &format!("virsh migrate --live {} {}", self.domain, self.dest_uri),
        );
        let migrated = self.virsh_migrate();
        if let Err(why) = migrated {
            if self.runs_on_destination() {
                note(&format!(
                    "virsh migrate reported a failure ({why}), but the domain runs on the destination: finishing the hand-over"
                ));
            } else {
                let released = self.release(&admin, src_dir.as_deref());
                let undo = cancel();
                return Err(MigrateError::Failed(format!(
                    "virsh migrate failed: {why}. {released}; {undo}. The domain keeps running here with its TPM: fix the cause and run vtpmctl migrate again."
                )));
            }
        }

        step(
            5,
            "destination receipt, then erasing the source copy (vtpmctl receipt, complete)",
        );
        let receipt = self.receipt(&dest_dir_s).map_err(|e| {
            MigrateError::Failed(format!(
                "the domain runs on the destination, but its receipt could not be fetched: {e}. The source keeps its locked copy until then: on the destination run `vtpmctl receipt --state-dir {dest_dir_s} --out receipt.json`, copy receipt.json here and run `vtpmctl complete --state-dir {} --receipt receipt.json`",
                src_dir.as_deref().map_or("DIR".into(), |d| d.display().to_string())
            ))
        })?;
        let tombstone = self.complete(&admin, src_dir.as_deref(), &receipt).map_err(|e| {
            MigrateError::Failed(format!(
                "the domain runs on the destination, but the source did not take the receipt: {e}. Save this receipt as receipt.json and run `vtpmctl complete --state-dir {} --receipt receipt.json`: {}",
                src_dir.as_deref().map_or("DIR".into(), |d| d.display().to_string()),
                serde_json::to_string(&receipt).unwrap_or_default()
            ))
        })?;
        note("done: the TPM runs on the destination; the source holds only the tombstone");
        Ok(serde_json::json!({
            "migrated": true,
            "domain": self.domain,
            "destination": self.dest_uri,
            "migration_id": reserved.migration_id,
            "destination_key": reserved.key_fingerprint,
            "receipt": receipt,
            "tombstone": tombstone,
        }))
    }

    fn virsh_migrate(&self) -> Result<(), String> {
        let mut cmd: Vec<String> = vec![
            "virsh".into(),
            "-c".into(),
            self.source_uri.clone(),
            "migrate".into(),
            "--live".into(),
            self.domain.clone(),
            self.dest_uri.clone(),
        ];
        cmd.extend(self.virsh_args.iter().cloned());
        note(&format!("running {}", cmd.join(" ")));
        let out = run(&cmd).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn runs_on_destination(&self) -> bool {
        virsh(&self.dest_uri, &["domstate", &self.domain])
            .map(|s| s.trim() == "running")
            .unwrap_or(false)
    }

    /// Undoes `outgoing` on the source after a failed migration.
    fn release(&self, admin: &Path, dir: Option<&Path>) -> String {
        match admin::call::<Status>(admin, &Request::Abort) {
            Ok(_) => "The source TPM was released (vtpmctl abort)".into(),
            Err(e) => match dir.map(offline::abort) {
                Some(Ok(_)) => "The source's migration record was dropped (vtpmctl abort --state-dir)".into(),
                _ => format!(
                    "Releasing the source TPM failed ({e}): run `vtpmctl abort --admin {}` (or --state-dir DIR if its vtpmd stopped)",
                    admin.display()
                ),
            },
        }
    }

    fn receipt(&self, dest_dir: &str) -> Result<Receipt, MigrateError> {
        let end = Instant::now() + SETTLE;
        loop {
            match self.remote::<Receipt>(&["receipt", "--state-dir", dest_dir]) {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() > end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// `complete` through the admin socket while the source vtpmd runs,
    /// else on its state directory (libvirt stopped it with QEMU).
    fn complete(
        &self,
        admin: &Path,
        dir: Option<&Path>,
        r: &Receipt,
    ) -> Result<Tombstone, MigrateError> {
        let end = Instant::now() + SETTLE;
        loop {
            // Retried: the source vtpmd exiting (the lock still held) and
            // one that is not done with the export yet.
            let (retry, e) = match admin::call::<Tombstone>(
                admin,
                &Request::Complete { receipt: r.clone() },
            ) {
                Ok(t) => return Ok(t),
                Err(ClientError::Connect { .. }) => match dir {
                    Some(d) => match offline::complete(d, r) {
                        Ok(t) => return Ok(t),
                        Err(e @ CtlError::StateDir(StateDirError::Locked(_))) => {
                            (true, MigrateError::Ctl(Box::new(e)))
                        }
                        Err(e) => (false, MigrateError::Ctl(Box::new(e))),
                    },
                    None => (
                        false,
                        MigrateError::Failed(format!(
                            "the source vtpmd ({}) has exited; give its state directory with --state-dir",
                            admin.display()
                        )),
                    ),
                },
                Err(e) => (true, MigrateError::Source(admin.display().to_string(), e)),
            };
            if !retry || Instant::now() > end {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistence_from_dominfo() {
        assert!(persistent(
            "Id:  1\nPersistent:     yes\nAutostart:      disable\n"
        ));
        assert!(!persistent("Id:  1\nPersistent:     no\n"));
        assert!(!persistent(""));
    }

    #[test]
    fn remote_from_the_destination_uri() {
        let r = |u: &str| default_remote(u).map(|v| v.join(" "));
        assert_eq!(r("qemu+ssh://dst/system").unwrap(), "ssh root@dst");
        assert_eq!(r("qemu+ssh://ann@dst:2222/system").unwrap(), "ssh ann@dst");
        assert_eq!(
            r("qemu+tcp://10.77.0.2/system").unwrap(),
            "ssh root@10.77.0.2"
        );
        assert_eq!(
            r("qemu+tcp://[fd00::2]:16509/system").unwrap(),
            "ssh root@fd00::2"
        );
        for bad in ["qemu:///system", "garbage", "", "qemu+ssh:///system?x=1"] {
            assert!(
                matches!(default_remote(bad), Err(MigrateError::NoHost(_))),
                "{bad}"
            );
        }
    }
}
