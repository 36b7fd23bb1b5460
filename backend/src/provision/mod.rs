//! `vtpm-setup`: vtpmd's provisioning tool, with swtpm_setup 0.7.1's
//! command line, so libvirt can run it as `swtpm_setup` (a symlink or a
//! copy under that name behaves the same).
//!
//! Unlike swtpm_setup it starts no TPM process: libtpms runs in-process
//! over the state directory ([`crate::storage::StateDir`], so the lock,
//! file format and encryption are vtpmd's), and certificates are issued by
//! a built-in local CA instead of swtpm_localca and swtpm_cert.
//!
//! | module | holds |
//! |---|---|
//! | [`args`] | the command line |
//! | [`conf`] | swtpm_setup.conf, swtpm-localca.conf, swtpm-localca.options |
//! | [`run`] | one provisioning run, in swtpm_setup's order |
//! | [`tpm`] | the TPM 2.0 commands it sends |
//! | [`ek`] | EK templates, handles and NV indices; public keys read back |
//! | [`localca`] | the local CA directory: keys, certificates, serial numbers |
//! | [`cert`] | EK, platform and CA certificates |
//! | [`secret`] | the key encrypted state is written with |
//! | [`log`] | `--logfile` |

pub mod args;
pub mod cert;
pub mod conf;
pub mod ek;
pub mod localca;
pub mod log;
pub mod run;
pub mod secret;
pub mod tpm;

use args::{Action, ArgError, SetupArgs};
use std::path::Path;
use std::process::ExitCode;
use thiserror::Error;

/// swtpm_setup's version this tool follows.
pub const SWTPM_SETUP_VERSION: &str = "0.7.1";

#[derive(Debug, Error)]
pub enum SetupError {
    #[error(transparent)]
    Args(#[from] ArgError),
    #[error(transparent)]
    Conf(#[from] conf::ConfError),
    #[error("local CA: {0}")]
    Ca(#[from] localca::CaError),
    #[error("certificate: {0}")]
    Cert(#[from] cert::CertError),
    #[error("endorsement key: {0}")]
    Ek(#[from] ek::EkError),
    #[error(transparent)]
    Tpm(#[from] tpm::TpmError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Secret(#[from] crate::daemon::keys::KeyLoadError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Banks(String),
    #[error("{0}")]
    Engine(String),
    #[error("reading the TPM's description: {0}")]
    Info(String),
    #[error("found existing TPM state in {0} (tpm2-00.permall); add --overwrite to replace it or --not-overwrite to keep it")]
    Existing(String),
    #[error("--reconfigure: no TPM state in {0} to reconfigure; provision it first (without --reconfigure)")]
    NothingToReconfigure(String),
    #[error("--runas {user}: {why}")]
    RunAs { user: String, why: String },
    #[error("cannot open the log file {path}: {source}")]
    LogFile {
        path: String,
        source: std::io::Error,
    },
}

/// The JSON `--print-capabilities` prints: what this tool really does.
pub fn capabilities_json(rsa_sizes: &[u16]) -> String {
    let mut features = vec!["tpm-2.0".to_string()];
    if secret::AVAILABLE {
        features.push("cmdarg-keyfile-fd".into());
        features.push("cmdarg-pwdfile-fd".into());
    }
    features.extend([
        "cmdarg-write-ek-cert-files".into(),
        "cmdarg-create-config-files".into(),
        "cmdarg-reconfigure-pcr-banks".into(),
    ]);
    for s in rsa_sizes.iter().filter(|s| **s >= 2048 && **s <= 3072) {
        features.push(format!("tpm2-rsa-keysize-{s}"));
    }
    serde_json::json!({
        "type": "swtpm_setup",
        "implementation": "vtpm-setup",
        "features": features,
        "version": SWTPM_SETUP_VERSION,
    })
    .to_string()
}

fn usage(prog: &str) -> String {
    format!(
        "vtpm-setup {version} (swtpm_setup {SWTPM_SETUP_VERSION} command line): provisions a TPM 2.0 state directory for vtpmd

Usage: {prog} --tpm2 --tpm-state DIR [options]

  --tpm-state DIR, --tpmstate DIR  state directory (also dir://DIR); must exist
  --tpm2                     required: vtpm-setup makes TPM 2.0 state only
  --createek                 create the EKs: RSA (0x81010001) and ECC P-256 (0x81010002;
                             ecc_ek_curves = secp384r1 in the config: swtpm's P-384, 0x81010016)
  --create-ek-cert           also their certificates (NV 0x01c00002, 0x01c0000a); implies --createek
  --create-platform-cert     also a platform certificate (NV 0x01c08000); implies --createek
  --lock-nvram               write-lock the certificate NV indices
  --rsa-keysize 2048|3072|max  RSA EK size (3072: high-range template at 0x8101001c)
  --allow-signing, --decryption  a signing (non-standard) EK; its template goes to NV
  --create-spk [--ecc]       storage primary key at 0x81000001 (RSA, or ECC P-384)
  --pcr-banks LIST           banks to activate, e.g. sha256,sha384; '-' leaves them
                             (default: active_pcr_banks in the config, else sha256)
  --reconfigure              only change the PCR banks of existing state
  --overwrite                replace existing state
  --not-overwrite            keep existing state and exit 0
  --vmid NAME                certificate subject (CN)
  --config FILE              swtpm_setup.conf (default ~/.config/swtpm_setup.conf, /etc/swtpm_setup.conf)
  --logfile FILE             append the log there (created 0600)
  --pwdfile-fd N, --pwdfile FILE  passphrase for encrypted state (swtpm's PBKDF2)
  --keyfile-fd N, --keyfile FILE  key (hex) for encrypted state
  --cipher aes-128-cbc|aes-256-cbc  cipher for encrypted state (default aes-128-cbc)
  --write-ek-cert-files DIR  also write ek-<type>.crt (DER) there
  --runas USER               drop to USER first (root only)
  --display                  print what was created
  --create-config-files [overwrite][,root][,skip-if-exist]  per-user config files
  --print-capabilities       JSON list of supported features
  --version, --help

The local CA signing the certificates lives where swtpm-localca.conf says
(default /var/lib/swtpm-localca) and is created on first use; its trust
anchor is swtpm-localca-rootca-cert.pem next to the signing key.
Accepted with no effect, as in swtpm_setup: --tpm, --swtpm_ioctl,
--tcsd-system-ps-file, --ownerpass, --srkpass, --owner-well-known, --srk-well-known.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

/// `--runas USER`: a name or a numeric uid (then gid = uid), as swtpm_setup.
fn run_as(user: &str) -> Result<(), SetupError> {
    use nix::unistd::{self, Gid, Uid, User};
    let err = |why: String| SetupError::RunAs {
        user: user.into(),
        why,
    };
    let (uid, gid) = match user.parse::<u32>() {
        Ok(n) => (Uid::from_raw(n), Gid::from_raw(n)),
        Err(_) => {
            let u = User::from_name(user)
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err("no such user".into()))?;
            let name = std::ffi::CString::new(u.name.clone()).map_err(|e| err(e.to_string()))?;
            unistd::initgroups(&name, u.gid).map_err(|e| err(format!("initgroups: {e}")))?;
            (u.uid, u.gid)
        }
    };
    unistd::setgid(gid).map_err(|e| err(format!("setgid({gid}): {e}")))?;
    unistd::setuid(uid).map_err(|e| err(format!("setuid({uid}): {e}")))?;
    Ok(())
}

/// `--create-config-files [overwrite][,root][,skip-if-exist]`.
fn create_config_files(opts: Option<&str>) -> Result<(), String> {
    let words: Vec<&str> = opts
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|w| !w.is_empty())
        .collect();
    for w in &words {
        if !matches!(*w, "overwrite" | "root" | "skip-if-exist") {
            return Err(format!(
                "--create-config-files: unknown word '{w}' (overwrite, root, skip-if-exist)"
            ));
        }
    }
    let has = |w: &str| words.contains(&w);
    if has("overwrite") && has("skip-if-exist") {
        return Err("overwrite and skip-if-exist cannot both be used".into());
    }
    if nix::unistd::getuid().is_root() && !has("root") {
        return Err(
            "requiring the 'root' flag since the configuration files will shadow those in /etc"
                .into(),
        );
    }
    let dir = conf::user_config_dir().ok_or("neither XDG_CONFIG_HOME nor HOME is set")?;
    let uts = nix::sys::utsname::uname().map_err(|e| format!("uname: {e}"))?;
    let files = conf::user_files(
        &dir,
        &uts.sysname().to_string_lossy(),
        &uts.version().to_string_lossy(),
    );
    if !has("overwrite") {
        if let Some((p, _)) = files.iter().find(|(p, _)| p.exists()) {
            if has("skip-if-exist") {
                return Ok(());
            }
            return Err(format!(
                "file {} already exists; refusing to overwrite",
                p.display()
            ));
        }
    }
    let ca_dir = dir.join("var/lib/swtpm-localca");
    std::fs::create_dir_all(&ca_dir)
        .map_err(|e| format!("cannot create {}: {e}", ca_dir.display()))?;
    for (i, (path, text)) in files.iter().enumerate() {
        println!("Writing {}.", path.display());
        let written = crate::storage::files::create_new(path, 0o644)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
        if let Err(e) = written {
            for (p, _) in &files[..=i] {
                let _ = std::fs::remove_file(p);
            }
            return Err(format!("could not write {}: {e}", path.display()));
        }
    }
    Ok(())
}

/// The whole tool: `args` without the program name; `prog` for --help.
pub fn main(prog: &str, args: Vec<String>) -> ExitCode {
    let a = match SetupArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &a.action {
        Action::Help => {
            print!("{}", usage(prog));
            return ExitCode::SUCCESS;
        }
        Action::Version => {
            println!(
                "TPM emulator setup tool version {SWTPM_SETUP_VERSION} (vtpm-setup {})",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Action::PrintCapabilities => {
            println!("{}", capabilities_json(&run::supported_rsa_key_sizes()));
            return ExitCode::SUCCESS;
        }
        Action::CreateConfigFiles(opts) => {
            return match create_config_files(opts.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{prog}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Action::Setup => {}
    }
    if let Err(e) = a.check() {
        eprintln!("{prog}: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(user) = &a.runas {
        if let Err(e) = run_as(user) {
            eprintln!("{prog}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut log = match &a.logfile {
        Some(p) => match log::SetupLog::open(Path::new(p)) {
            Ok(l) => l,
            Err(source) => {
                eprintln!(
                    "{prog}: {}",
                    SetupError::LogFile {
                        path: p.clone(),
                        source
                    }
                );
                return ExitCode::FAILURE;
            }
        },
        None => log::SetupLog::console(),
    };
    match run::run(&a, &mut log) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log.error(&e.to_string());
            log.error("An error occurred. Authoring the TPM state failed.");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_name_what_libvirt_checks() {
        let j = capabilities_json(&[1024, 2048, 3072]);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        let f: Vec<&str> = v["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        for want in [
            "tpm-2.0",
            "cmdarg-create-config-files",
            "cmdarg-reconfigure-pcr-banks",
            "tpm2-rsa-keysize-2048",
            "tpm2-rsa-keysize-3072",
        ] {
            assert!(f.contains(&want), "{want} missing from {j}");
        }
        assert!(!f.contains(&"tpm-1.2") && !f.contains(&"tpm2-rsa-keysize-1024"));
        assert_eq!(v["type"], "swtpm_setup");
    }
}
