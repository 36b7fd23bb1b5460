//! swtpm_setup's configuration files, read the way swtpm 0.7.1 reads them:
//!
//! * `swtpm_setup.conf` (`--config`, else `$XDG_CONFIG_HOME/swtpm_setup.conf`
//!   or `~/.config/swtpm_setup.conf`, else `/etc/swtpm_setup.conf`):
//!   `create_certs_tool_config` names the local CA's file,
//!   `create_certs_tool_options` its options file, `active_pcr_banks` the
//!   default banks. `create_certs_tool` is not run: vtpm-setup signs
//!   in-process (a tool other than swtpm_localca is reported in the log).
//! * `swtpm-localca.conf` (else the same search for `swtpm-localca.conf`):
//!   `statedir`, `signingkey`, `issuercert`, `certserial`,
//!   `signingkey_password`. vtpm-setup also takes these keys straight from
//!   swtpm_setup.conf: if it names any of them, the local CA's file is not
//!   read, and what it leaves out defaults to files under its `statedir`.
//! * vtpm-setup's own key in swtpm_setup.conf: `ecc_ek_curves` (default
//!   `secp256r1`, the TCG profile's default ECC EK; `secp384r1` is
//!   swtpm_setup 0.7.1's; both may be listed).
//! * `swtpm-localca.options`: `--platform-manufacturer M`,
//!   `--platform-model M`, `--platform-version V` for the platform
//!   certificate.
//!
//! A line is `key = value`; the first line for a key wins; `#` starts a
//! comment; `${NAME}` in a value is replaced by the environment variable.
//! Without any file the defaults are swtpm's: the CA in
//! `/var/lib/swtpm-localca`, PCR bank sha256.

use super::cert::PlatformInfo;
use super::ek::EkKind;
use super::localca::CaPaths;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const SETUP_CONF: &str = "swtpm_setup.conf";
pub const LOCALCA_CONF: &str = "swtpm-localca.conf";
pub const LOCALCA_OPTIONS: &str = "swtpm-localca.options";
pub const DEFAULT_CA_DIR: &str = "/var/lib/swtpm-localca";
pub const DEFAULT_PCR_BANKS: &str = "sha256";
const SYSCONFDIR: &str = "/etc";
/// Config files are small; anything larger is not one.
const MAX_CONF: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum ConfError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration file {0} is larger than 1 MiB; is it the right file?")]
    TooLarge(String),
    #[error("configuration file {0} is not text")]
    NotText(String),
    #[error(
        "{path}: ecc_ek_curves names '{curve}'; use secp256r1 and/or secp384r1 (comma-separated)"
    )]
    Curve { path: String, curve: String },
    #[error("{path}: option {opt} needs a value")]
    OptionValue { path: String, opt: String },
}

/// One `key = value` file.
#[derive(Debug, Clone, Default)]
pub struct ConfFile {
    lines: Vec<String>,
}

impl ConfFile {
    pub fn parse(text: &str) -> ConfFile {
        ConfFile {
            lines: text.lines().map(str::to_string).collect(),
        }
    }

    pub fn read(path: &Path) -> Result<ConfFile, ConfError> {
        read_text(path).map(|t| ConfFile::parse(&t))
    }

    /// The value of `key`: first matching line, comment cut, trailing
    /// space trimmed, `${VAR}` expanded.
    pub fn get(&self, key: &str) -> Option<String> {
        self.lines.iter().find_map(|line| {
            let rest = line.strip_prefix(key)?;
            let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
            let value = rest.split('#').next().unwrap_or_default();
            Some(expand_env(value.trim()))
        })
    }
}

fn read_text(path: &Path) -> Result<String, ConfError> {
    let shown = || path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| ConfError::Read {
        path: shown(),
        source,
    })?;
    if meta.len() > MAX_CONF {
        return Err(ConfError::TooLarge(shown()));
    }
    let bytes = std::fs::read(path).map_err(|source| ConfError::Read {
        path: shown(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| ConfError::NotText(shown()))
}

/// `${NAME}` → the variable's value (empty if unset); anything else as is.
fn expand_env(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&std::env::var(name).unwrap_or_default());
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    out
}

/// The per-user configuration directory (XDG, as GLib finds it).
pub fn user_config_dir() -> Option<PathBuf> {
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")),
    }
}

/// `name` in the user's config directory if readable, else in /etc if it
/// exists.
fn find_default(name: &str) -> Option<PathBuf> {
    let user = user_config_dir().map(|d| d.join(name));
    user.filter(|p| std::fs::File::open(p).is_ok())
        .or_else(|| Some(Path::new(SYSCONFDIR).join(name)).filter(|p| p.exists()))
}

/// What the configuration files say.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ca: CaPaths,
    pub platform: PlatformInfo,
    /// `active_pcr_banks`, or sha256.
    pub default_banks: String,
    /// The ECC EKs `--createek` makes (`ecc_ek_curves`, a vtpm-setup
    /// key): secp256r1 unless the file says otherwise.
    pub ecc_eks: Vec<EkKind>,
    /// The files read, for the log.
    pub read: Vec<PathBuf>,
    /// Things configured that vtpm-setup does differently, for the log.
    pub notes: Vec<String>,
}

/// The platform defaults when no options file names them.
pub fn default_platform() -> PlatformInfo {
    PlatformInfo {
        manufacturer: "vtpmd".into(),
        model: "vtpmd".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Reads the configuration: `explicit` (`--config`) must be readable; the
/// default files are optional.
pub fn load(explicit: Option<&Path>) -> Result<Settings, ConfError> {
    let mut read = Vec::new();
    let mut notes = Vec::new();
    let setup_path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => find_default(SETUP_CONF),
    };
    let setup = match &setup_path {
        Some(p) => {
            read.push(p.clone());
            ConfFile::read(p)?
        }
        None => ConfFile::default(),
    };
    if let Some(tool) = setup.get("create_certs_tool") {
        if !tool.ends_with("swtpm_localca") && !tool.is_empty() {
            notes.push(format!(
                "create_certs_tool {tool} is not run: vtpm-setup issues certificates with its built-in local CA"
            ));
        }
    }
    let ca_conf_path = setup
        .get("create_certs_tool_config")
        .map(PathBuf::from)
        .or_else(|| find_default(LOCALCA_CONF));
    let ca_conf = match &ca_conf_path {
        Some(p) => {
            read.push(p.clone());
            ConfFile::read(p)?
        }
        None => ConfFile::default(),
    };
    // The CA's keys come as a group: from swtpm_setup.conf if it names any
    // of them, else from the local CA's file.
    const CA_KEYS: [&str; 5] = [
        "statedir",
        "signingkey",
        "issuercert",
        "certserial",
        "signingkey_password",
    ];
    let src = if CA_KEYS.iter().any(|k| setup.get(k).is_some()) {
        &setup
    } else {
        &ca_conf
    };
    let get = |k: &str| src.get(k).filter(|v| !v.is_empty());
    let statedir = PathBuf::from(get("statedir").unwrap_or_else(|| DEFAULT_CA_DIR.into()));
    let mut ca = CaPaths::under(&statedir);
    if let Some(k) = get("signingkey") {
        ca.signingkey = k;
    }
    if let Some(c) = get("issuercert") {
        ca.issuercert = c.into();
    }
    if let Some(s) = get("certserial") {
        ca.certserial = s.into();
    }
    ca.signingkey_password = get("signingkey_password");
    if get("parentkey_password").is_some() {
        notes.push("parentkey_password is ignored: it is for TPM 1.2 signing keys".into());
    }

    let options_path = setup
        .get("create_certs_tool_options")
        .map(PathBuf::from)
        .or_else(|| find_default(LOCALCA_OPTIONS));
    let mut platform = default_platform();
    if let Some(p) = &options_path {
        read.push(p.clone());
        let text = read_text(p)?;
        parse_options(&text, p, &mut platform, &mut notes)?;
    }
    let default_banks = setup
        .get("active_pcr_banks")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| DEFAULT_PCR_BANKS.into());
    let ecc_eks = match setup.get("ecc_ek_curves").filter(|v| !v.is_empty()) {
        None => vec![EkKind::EccP256],
        Some(list) => ecc_curves(&list, setup_path.as_deref())?,
    };
    Ok(Settings {
        ca,
        platform,
        default_banks,
        ecc_eks,
        read,
        notes,
    })
}

fn ecc_curves(list: &str, path: Option<&Path>) -> Result<Vec<EkKind>, ConfError> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = EkKind::ecc_by_name(name).ok_or_else(|| ConfError::Curve {
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            curve: name.into(),
        })?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}

/// The swtpm-localca.options words vtpm-setup uses.
fn parse_options(
    text: &str,
    path: &Path,
    platform: &mut PlatformInfo,
    notes: &mut Vec<String>,
) -> Result<(), ConfError> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        let slot = match w {
            "--platform-manufacturer" => &mut platform.manufacturer,
            "--platform-model" => &mut platform.model,
            "--platform-version" => &mut platform.version,
            other => {
                notes.push(format!("{}: '{other}' is ignored", path.display()));
                continue;
            }
        };
        *slot = words
            .next()
            .ok_or_else(|| ConfError::OptionValue {
                path: path.display().to_string(),
                opt: w.into(),
            })?
            .to_string();
    }
    Ok(())
}

/// The files `--create-config-files` writes into the user's config dir.
pub fn user_files(config_dir: &Path, sysname: &str, version: &str) -> [(PathBuf, String); 3] {
    let ca_dir = config_dir.join("var/lib/swtpm-localca");
    let setup = config_dir.join(SETUP_CONF);
    let localca = config_dir.join(LOCALCA_CONF);
    let options = config_dir.join(LOCALCA_OPTIONS);
    let us = |s: &str| s.replace(' ', "_");
    [
        (
            setup,
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\n\
                 create_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\n\
                 # Comma-separated list (no spaces) of PCR banks to activate by default\n\
                 active_pcr_banks = {DEFAULT_PCR_BANKS}\n",
                localca.display(),
                options.display()
            ),
        ),
        (
            localca,
            format!(
                "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
                ca_dir.display()
            ),
        ),
        (
            options,
            format!(
                "--platform-manufacturer {}\n--platform-version {}\n--platform-model {}\n",
                us(sysname),
                us(version),
                us(sysname)
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_swtpm_rules() {
        let c = ConfFile::parse(
            "# comment\nstatedir = /a/b # trailing\nstatedir=/second\n statedirx = no\nsigningkey\t=\t/k.pem  \nempty =\n",
        );
        assert_eq!(c.get("statedir").as_deref(), Some("/a/b"));
        assert_eq!(c.get("signingkey").as_deref(), Some("/k.pem"));
        assert_eq!(c.get("empty").as_deref(), Some(""));
        assert_eq!(c.get("statedirx"), None, "keys start the line");
        assert_eq!(c.get("missing"), None);
    }

    #[test]
    fn env_vars_expand() {
        std::env::set_var("VTPM_SETUP_TEST_DIR", "/x");
        assert_eq!(expand_env("${VTPM_SETUP_TEST_DIR}/ca"), "/x/ca");
        assert_eq!(expand_env("${VTPM_SETUP_UNSET_VAR}y"), "y");
        assert_eq!(expand_env("${unterminated"), "${unterminated");
    }

    #[test]
    fn explicit_config_with_localca_keys_and_options() {
        let d = tempfile::tempdir().unwrap();
        let opts = d.path().join("opts");
        std::fs::write(
            &opts,
            "--platform-manufacturer ACME\n--platform-version 9\n--platform-model Box --unknown\n",
        )
        .unwrap();
        let conf = d.path().join("setup.conf");
        std::fs::write(
            &conf,
            format!(
                "create_certs_tool = /usr/bin/other\ncreate_certs_tool_options = {}\nstatedir = {}/ca\nactive_pcr_banks = sha384\n",
                opts.display(),
                d.path().display()
            ),
        )
        .unwrap();
        let s = load(Some(&conf)).unwrap();
        assert_eq!(s.ca.statedir, d.path().join("ca"));
        assert_eq!(s.ca.issuercert, d.path().join("ca/issuercert.pem"));
        assert_eq!(s.platform.manufacturer, "ACME");
        assert_eq!(s.platform.model, "Box");
        assert_eq!(s.platform.version, "9");
        assert_eq!(s.default_banks, "sha384");
        assert_eq!(s.ecc_eks, vec![EkKind::EccP256], "the profile's default");
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        std::fs::write(
            &conf,
            "statedir = /x\necc_ek_curves = secp384r1, secp256r1,secp384r1\n",
        )
        .unwrap();
        assert_eq!(
            load(Some(&conf)).unwrap().ecc_eks,
            vec![EkKind::EccP384, EkKind::EccP256]
        );
        std::fs::write(&conf, "ecc_ek_curves = secp521r1\n").unwrap();
        let e = load(Some(&conf)).unwrap_err();
        assert!(
            e.to_string().contains("secp521r1") && e.to_string().contains("secp384r1"),
            "{e}"
        );
        std::fs::write(
            &conf,
            format!("create_certs_tool_options = {}\n", opts.display()),
        )
        .unwrap();
        std::fs::write(&opts, "--platform-model").unwrap();
        assert!(matches!(
            load(Some(&conf)),
            Err(ConfError::OptionValue { .. })
        ));
        assert!(matches!(
            load(Some(&d.path().join("missing"))),
            Err(ConfError::Read { .. })
        ));
        std::fs::write(&conf, [0xff, 0xfe]).unwrap();
        assert!(matches!(load(Some(&conf)), Err(ConfError::NotText(_))));
    }
}
