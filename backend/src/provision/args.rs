//! swtpm_setup 0.7.1's command line, parsed as its getopt_long does:
//! `--name value` or `--name=value`, any unambiguous prefix of a long
//! name, `-h`/`-?`, later options overriding earlier ones (except
//! `--pcr-banks`, which add up).
//!
//! Every swtpm_setup option is recognised. Options that only make sense
//! for TPM 1.2 or for running a separate swtpm are accepted where swtpm_setup
//! ignores them too, and refused with the reason where they would change
//! the result ([`SetupArgs::check`]).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("unknown option '{0}' (see --help)")]
    Unknown(String),
    #[error("option '{given}' is ambiguous: it could be {candidates}")]
    Ambiguous { given: String, candidates: String },
    #[error("option '--{0}' needs a value")]
    MissingValue(&'static str),
    #[error("option '--{0}' takes no value")]
    UnexpectedValue(&'static str),
    #[error("unexpected argument '{0}': swtpm_setup takes options only (see --help)")]
    Positional(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Flag,
    Value,
    OptionalValue,
}

use Kind::{Flag, OptionalValue, Value};

/// swtpm_setup 0.7.1's long options.
const OPTIONS: &[(&str, Kind)] = &[
    ("tpm-state", Value),
    ("tpmstate", Value),
    ("tpm", Value),
    ("swtpm_ioctl", Value),
    ("tpm2", Flag),
    ("ecc", Flag),
    ("createek", Flag),
    ("create-spk", Flag),
    ("take-ownership", Flag),
    ("ownerpass", Value),
    ("owner-well-known", Flag),
    ("srkpass", Value),
    ("srk-well-known", Flag),
    ("create-ek-cert", Flag),
    ("create-platform-cert", Flag),
    ("lock-nvram", Flag),
    ("display", Flag),
    ("config", Value),
    ("vmid", Value),
    ("keyfile", Value),
    ("keyfile-fd", Value),
    ("pwdfile", Value),
    ("pwdfile-fd", Value),
    ("cipher", Value),
    ("runas", Value),
    ("logfile", Value),
    ("overwrite", Flag),
    ("not-overwrite", Flag),
    ("allow-signing", Flag),
    ("decryption", Flag),
    ("pcr-banks", Value),
    ("rsa-keysize", Value),
    ("write-ek-cert-files", Value),
    ("create-config-files", OptionalValue),
    ("tcsd-system-ps-file", Value),
    ("version", Flag),
    ("print-capabilities", Flag),
    ("reconfigure", Flag),
    ("help", Flag),
];

/// What the invocation asks for, besides provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Action {
    #[default]
    Setup,
    Help,
    Version,
    PrintCapabilities,
    CreateConfigFiles(Option<String>),
}

/// Where the secret protecting the state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    KeyFile(String),
    KeyFd(i32),
    PwdFile(String),
    PwdFd(i32),
}

/// The parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupArgs {
    pub action: Action,
    pub tpm_state: Option<String>,
    pub tpm2: bool,
    pub ecc: bool,
    pub createek: bool,
    pub create_spk: bool,
    pub take_ownership: bool,
    pub create_ek_cert: bool,
    pub create_platform_cert: bool,
    pub lock_nvram: bool,
    pub display: bool,
    pub config: Option<String>,
    pub vmid: Option<String>,
    pub secret: Option<SecretSource>,
    pub cipher: Option<String>,
    pub runas: Option<String>,
    pub logfile: Option<String>,
    pub overwrite: bool,
    pub not_overwrite: bool,
    pub allow_signing: bool,
    pub decryption: bool,
    pub pcr_banks: Option<String>,
    pub rsa_keysize: Option<String>,
    pub write_ek_cert_files: Option<String>,
    pub reconfigure: bool,
    /// Options accepted with no effect, for the log.
    pub ignored: Vec<String>,
}

fn lookup(name: &str, given: &str) -> Result<(&'static str, Kind), ArgError> {
    if let Some(&(n, k)) = OPTIONS.iter().find(|(n, _)| *n == name) {
        return Ok((n, k));
    }
    let matches: Vec<_> = OPTIONS
        .iter()
        .filter(|(n, _)| n.starts_with(name))
        .collect();
    match matches.as_slice() {
        [(n, k)] if !name.is_empty() => Ok((n, *k)),
        [] | [_] => Err(ArgError::Unknown(given.into())),
        many => Err(ArgError::Ambiguous {
            given: given.into(),
            candidates: many
                .iter()
                .map(|(n, _)| format!("--{n}"))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn fd(opt: &str, v: &str) -> Result<i32, ArgError> {
    v.parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ArgError::Invalid(format!("--{opt}: invalid file descriptor '{v}'")))
}

impl SetupArgs {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<SetupArgs, ArgError> {
        let mut a = SetupArgs::default();
        let mut it = args.into_iter().peekable();
        while let Some(arg) = it.next() {
            if arg == "-h" || arg == "-?" {
                a.action = Action::Help;
                continue;
            }
            let Some(body) = arg.strip_prefix("--") else {
                return Err(if arg.starts_with('-') && arg.len() > 1 {
                    ArgError::Unknown(arg)
                } else {
                    ArgError::Positional(arg)
                });
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let (name, kind) = lookup(name, &arg)?;
            let value = match kind {
                Flag if inline.is_some() => return Err(ArgError::UnexpectedValue(name)),
                Flag => None,
                Value => Some(match inline {
                    Some(v) => v,
                    None => it.next().ok_or(ArgError::MissingValue(name))?,
                }),
                OptionalValue => inline.or_else(|| it.next_if(|n| !n.starts_with('-'))),
            };
            a.apply(name, value)?;
        }
        Ok(a)
    }

    fn apply(&mut self, name: &'static str, value: Option<String>) -> Result<(), ArgError> {
        let v = || value.clone().unwrap_or_default();
        match name {
            "tpm-state" | "tpmstate" => self.tpm_state = Some(v()),
            "tpm" | "swtpm_ioctl" | "tcsd-system-ps-file" => self
                .ignored
                .push(format!("--{name} {} (the TPM runs inside vtpm-setup)", v())),
            "ownerpass" | "srkpass" | "owner-well-known" | "srk-well-known" => {
                self.ignored.push(format!("--{name} (TPM 1.2 only)"))
            }
            "tpm2" => self.tpm2 = true,
            "ecc" => self.ecc = true,
            "createek" => self.createek = true,
            "create-spk" => self.create_spk = true,
            "take-ownership" => {
                self.take_ownership = true;
                self.createek = true;
            }
            "create-ek-cert" => {
                self.create_ek_cert = true;
                self.createek = true;
            }
            "create-platform-cert" => {
                self.create_platform_cert = true;
                self.createek = true;
            }
            "lock-nvram" => self.lock_nvram = true,
            "display" => self.display = true,
            "config" => self.config = Some(v()),
            "vmid" => self.vmid = Some(v()),
            "keyfile" => self.secret = Some(SecretSource::KeyFile(v())),
            "keyfile-fd" => self.secret = Some(SecretSource::KeyFd(fd(name, &v())?)),
            "pwdfile" => self.secret = Some(SecretSource::PwdFile(v())),
            "pwdfile-fd" => self.secret = Some(SecretSource::PwdFd(fd(name, &v())?)),
            "cipher" => self.cipher = Some(v()),
            "runas" => self.runas = Some(v()),
            "logfile" => self.logfile = Some(v()),
            "overwrite" => self.overwrite = true,
            "not-overwrite" => self.not_overwrite = true,
            "allow-signing" => self.allow_signing = true,
            "decryption" => self.decryption = true,
            "pcr-banks" => {
                let add = v().trim().to_string();
                self.pcr_banks = Some(match self.pcr_banks.take() {
                    Some(prev) => format!("{prev},{add}"),
                    None => add,
                });
            }
            "rsa-keysize" => self.rsa_keysize = Some(v()),
            "write-ek-cert-files" => self.write_ek_cert_files = Some(v()),
            "create-config-files" => {
                if self.action != Action::Help {
                    self.action = Action::CreateConfigFiles(value)
                }
            }
            "version" => {
                if self.action == Action::Setup {
                    self.action = Action::Version
                }
            }
            "print-capabilities" => {
                if self.action == Action::Setup {
                    self.action = Action::PrintCapabilities
                }
            }
            "reconfigure" => self.reconfigure = true,
            "help" => self.action = Action::Help,
            _ => return Err(ArgError::Unknown(format!("--{name}"))),
        }
        Ok(())
    }

    /// Refuses combinations vtpm-setup cannot honour, naming the fix.
    pub fn check(&self) -> Result<(), ArgError> {
        let bad = |s: &str| Err(ArgError::Invalid(s.into()));
        if !self.tpm2 {
            return bad(
                "vtpm-setup provisions TPM 2.0 only; add --tpm2 (TPM 1.2 is not supported)",
            );
        }
        if self.take_ownership {
            return bad("--take-ownership is for TPM 1.2; a TPM 2.0 has no owner to take");
        }
        if self.tpm_state.is_none() {
            return bad("--tpm-state DIR is required: the directory the TPM state is written to");
        }
        if self.reconfigure && (self.createek || self.create_ek_cert || self.create_platform_cert) {
            return bad("--reconfigure only changes the PCR banks of an existing TPM; it cannot be combined with --createek, --create-ek-cert or --create-platform-cert");
        }
        if let Some(c) = &self.cipher {
            if !matches!(c.as_str(), "aes-128-cbc" | "aes-cbc" | "aes-256-cbc") {
                return Err(ArgError::Invalid(format!(
                    "unsupported cipher '{c}': use aes-128-cbc or aes-256-cbc"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<SetupArgs, ArgError> {
        SetupArgs::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn libvirt_command_lines_parse() {
        let a = p(&[
            "--tpm2",
            "--tpm-state",
            "/s",
            "--vmid",
            "vm:uuid",
            "--logfile",
            "/l",
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--not-overwrite",
        ])
        .unwrap();
        assert!(a.tpm2 && a.createek && a.create_ek_cert && a.create_platform_cert);
        assert!(a.lock_nvram && a.not_overwrite && !a.overwrite);
        assert_eq!(a.tpm_state.as_deref(), Some("/s"));
        assert_eq!(a.vmid.as_deref(), Some("vm:uuid"));
        a.check().unwrap();
        let r = p(&[
            "--tpm2",
            "--pwdfile-fd",
            "7",
            "--cipher",
            "aes-256-cbc",
            "--tpm-state",
            "/s",
            "--logfile",
            "/l",
            "--pcr-banks",
            "sha256,sha384",
            "--reconfigure",
        ])
        .unwrap();
        assert_eq!(r.secret, Some(SecretSource::PwdFd(7)));
        assert_eq!(r.pcr_banks.as_deref(), Some("sha256,sha384"));
        r.check().unwrap();
        assert_eq!(
            p(&["--create-config-files", "skip-if-exist"])
                .unwrap()
                .action,
            Action::CreateConfigFiles(Some("skip-if-exist".into()))
        );
        assert_eq!(
            p(&["--print-capabilities"]).unwrap().action,
            Action::PrintCapabilities
        );
    }

    #[test]
    fn getopt_forms() {
        let a = p(&[
            "--tpmstate=/x",
            "--pcr-banks",
            "sha1",
            "--pcr-banks= sha256 ",
            "--tpm2",
        ])
        .unwrap();
        assert_eq!(a.tpm_state.as_deref(), Some("/x"));
        assert_eq!(a.pcr_banks.as_deref(), Some("sha1,sha256"));
        // Unique prefixes work; exact names beat longer ones.
        assert!(p(&["--print-cap"]).unwrap().action == Action::PrintCapabilities);
        assert_eq!(p(&["--tpm", "/usr/bin/swtpm"]).unwrap().ignored.len(), 1);
        assert!(matches!(p(&["--create"]), Err(ArgError::Ambiguous { .. })));
        assert_eq!(p(&["-h"]).unwrap().action, Action::Help);
    }

    #[test]
    fn bad_command_lines_are_clear_errors() {
        assert!(matches!(p(&["--bogus"]), Err(ArgError::Unknown(_))));
        assert!(matches!(p(&["-x"]), Err(ArgError::Unknown(_))));
        assert!(matches!(p(&["stray"]), Err(ArgError::Positional(_))));
        assert_eq!(
            p(&["--tpm-state"]),
            Err(ArgError::MissingValue("tpm-state"))
        );
        assert_eq!(p(&["--tpm2=yes"]), Err(ArgError::UnexpectedValue("tpm2")));
        for bad in ["-1", "x", "", "99999999999"] {
            assert!(
                matches!(p(&["--pwdfile-fd", bad]), Err(ArgError::Invalid(_))),
                "{bad}"
            );
        }
        let e = p(&["--tpm-state", "/s"]).unwrap().check().unwrap_err();
        assert!(e.to_string().contains("--tpm2"), "{e}");
        let e = p(&["--tpm2"]).unwrap().check().unwrap_err();
        assert!(e.to_string().contains("--tpm-state"), "{e}");
        let e = p(&["--tpm2", "--tpmstate", "/s", "--reconfigure", "--createek"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("--reconfigure"), "{e}");
        let e = p(&["--tpm2", "--tpmstate", "/s", "--cipher", "des"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("aes-256-cbc"), "{e}");
        let e = p(&["--tpm2", "--tpmstate", "/s", "--take-ownership"])
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("TPM 1.2"), "{e}");
    }
}
