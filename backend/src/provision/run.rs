//! One provisioning run, in swtpm_setup's order: check the state directory
//! (`--not-overwrite`, `--overwrite`, `--reconfigure`), power the TPM on
//! in-process over the state directory, create the RSA EK (its certificate,
//! the platform certificate), then the ECC EK (its certificate), allocate
//! the PCR banks, shut the TPM down. A failure while creating a new TPM
//! removes the half-made state, as swtpm_setup does; a failed
//! `--reconfigure` leaves the existing state as it was.

use super::args::SetupArgs;
use super::cert::{Purpose, TpmInfo};
use super::conf::{self, Settings};
use super::ek::{self, EkKind, EkUse, PublicKey};
use super::localca::LocalCa;
use super::log::SetupLog;
use super::secret;
use super::tpm::{self, Bank, Tpm};
use super::SetupError;
use crate::engine::{Libtpms, NvError, NvStore, TpmEngine};
use crate::storage::{self, files, StateDir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vtpm_common::statedir;

/// The attributes of the certificate and template NV indices (swtpm's):
/// PLATFORMCREATE | AUTHREAD | OWNERREAD | PPREAD | PPWRITE | NO_DA |
/// WRITEDEFINE. `--lock-nvram` then sets WRITELOCKED, which with
/// WRITEDEFINE lasts until the platform deletes the index.
pub const CERT_NV_ATTRS: u32 =
    0x4000_0000 | 0x0004_0000 | 0x0002_0000 | 0x0001_0000 | 0x1 | 0x0200_0000 | 0x2000;
/// The platform certificate's NV index.
pub const PLATFORM_CERT_INDEX: u32 = 0x01c0_8000;
/// Mode of the state files vtpm-setup writes.
pub const STATE_FILE_MODE: u32 = 0o600;

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Provisioned,
    Reconfigured,
    /// `--not-overwrite` found existing state and left it alone.
    LeftAlone,
    /// The directory is reserved for an incoming sealed migration
    /// (`vtpmctl reserve-incoming`): its TPM arrives with the migration.
    Reserved,
}

/// Where libtpms may look when the TPM is not started (capabilities).
struct NoState;

impl NvStore for NoState {
    fn load(&self, _: &str) -> Result<Option<Vec<u8>>, NvError> {
        Err(NvError("no state directory".into()))
    }
    fn store(&self, _: &str, _: &[u8]) -> Result<(), NvError> {
        Err(NvError("no state directory".into()))
    }
    fn delete(&self, _: &str) -> Result<(), NvError> {
        Err(NvError("no state directory".into()))
    }
}

/// The RSA key sizes libtpms implements (TPMLIB_GetInfo TPMFeatures);
/// needs no running TPM.
pub fn rsa_key_sizes(engine: &mut dyn TpmEngine) -> Vec<u16> {
    let sizes = engine
        .info(4)
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .and_then(|v| {
            v["TPMFeatures"]["RSAKeySizes"].as_array().map(|a| {
                a.iter()
                    .filter_map(|n| n.as_u64().and_then(|n| u16::try_from(n).ok()))
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();
    if sizes.is_empty() {
        vec![2048]
    } else {
        sizes
    }
}

/// The process's libtpms, over `store`.
fn take_engine(store: Arc<dyn NvStore>) -> Result<Libtpms, SetupError> {
    Libtpms::take(store)
        .ok_or_else(|| SetupError::Engine("the TPM is already in use in this process".into()))?
        .map_err(|rc| SetupError::Engine(format!("libtpms set-up failed ({rc:#x})")))
}

/// The RSA key sizes, for `--print-capabilities` (no state involved).
pub fn supported_rsa_key_sizes() -> Vec<u16> {
    match take_engine(Arc::new(NoState)) {
        Ok(mut e) => rsa_key_sizes(&mut e),
        Err(_) => vec![2048],
    }
}

fn tpm_info(engine: &mut dyn TpmEngine) -> Result<TpmInfo, SetupError> {
    let json = engine
        .info(1 | 2)
        .ok_or_else(|| SetupError::Info("libtpms returned no TPM information".into()))?;
    let v: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| SetupError::Info(e.to_string()))?;
    let s = |a: &str, b: &str| {
        v[a][b]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| SetupError::Info(format!("no {a}.{b} in {json}")))
    };
    let n = |a: &str, b: &str| {
        v[a][b]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| SetupError::Info(format!("no {a}.{b} in {json}")))
    };
    Ok(TpmInfo {
        manufacturer: s("TPMAttributes", "manufacturer")?,
        model: s("TPMAttributes", "model")?,
        version: s("TPMAttributes", "version")?,
        spec_family: s("TPMSpecification", "family")?,
        spec_level: n("TPMSpecification", "level")?,
        spec_revision: n("TPMSpecification", "revision")?,
    })
}

/// The banks to activate: `None` for `-` (leave as they are).
pub fn parse_banks(list: &str) -> Result<Option<Vec<String>>, SetupError> {
    let names: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if names == ["-"] {
        return Ok(None);
    }
    if names.is_empty() {
        return Err(SetupError::Banks("--pcr-banks names no bank".into()));
    }
    for n in &names {
        if tpm::bank_alg(n).is_none() {
            return Err(SetupError::Banks(format!(
                "unknown PCR bank '{n}' (known: {}; '-' leaves all banks as they are)",
                tpm::BANKS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(Some(names))
}

/// The allocation that turns `wanted` on and every other bank off; the
/// names of the banks turned on.
fn allocation(all: &[Bank], wanted: &[String]) -> Result<(Vec<Bank>, Vec<String>), SetupError> {
    let mut on = Vec::new();
    let alloc: Vec<Bank> = all
        .iter()
        .map(|b| {
            let want = tpm::bank_name(b.alg).is_some_and(|n| wanted.iter().any(|w| w == n));
            if want {
                on.push(tpm::bank_name(b.alg).unwrap_or_default().to_string());
            }
            Bank {
                alg: b.alg,
                select: vec![if want { 0xff } else { 0 }; b.select.len()],
            }
        })
        .collect();
    if on.is_empty() {
        return Err(SetupError::Banks(format!(
            "none of the PCR banks {} is implemented by this TPM (it has {})",
            wanted.join(","),
            names(all)
        )));
    }
    Ok((alloc, on))
}

fn names(banks: &[Bank]) -> String {
    banks
        .iter()
        .map(|b| tpm::bank_name(b.alg).map_or_else(|| format!("{:#06x}", b.alg), str::to_string))
        .collect::<Vec<_>>()
        .join(",")
}

/// Strips swtpm_setup's `dir://` prefix; `file://` is refused.
pub fn state_path(arg: &str) -> Result<PathBuf, SetupError> {
    if arg.starts_with("file://") {
        return Err(SetupError::Unsupported(
            "--tpm-state file://: vtpmd keeps state in a directory; give the directory (dir://PATH or PATH)".into(),
        ));
    }
    Ok(PathBuf::from(arg.strip_prefix("dir://").unwrap_or(arg)))
}

/// The RSA EK size: 2048 (default), 3072 or max, if libtpms has it.
fn rsa_bits(arg: Option<&str>, sizes: &[u16]) -> Result<u16, SetupError> {
    let bits = match arg.unwrap_or("2048") {
        "max" => sizes
            .iter()
            .copied()
            .filter(|b| *b <= 3072)
            .max()
            .unwrap_or(2048),
        "2048" => 2048,
        "3072" => 3072,
        other => {
            return Err(SetupError::Unsupported(format!(
                "RSA key size {other}: use 2048, 3072 or max"
            )))
        }
    };
    if bits != 2048 && !sizes.contains(&bits) {
        return Err(SetupError::Unsupported(format!(
            "{bits} bit RSA keys are not supported by this libtpms"
        )));
    }
    Ok(bits)
}

fn now_text() -> String {
    match der::DateTime::from_system_time(std::time::SystemTime::now()) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minutes(),
            t.seconds()
        ),
        Err(_) => "unknown time".into(),
    }
}

fn whoami() -> String {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let group = nix::unistd::Group::from_gid(gid)
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name);
    format!("{user}:{group}")
}

/// Provisions (or reconfigures) the TPM as `a` says.
pub fn run(a: &SetupArgs, log: &mut SetupLog) -> Result<Outcome, SetupError> {
    let dir = state_path(a.tpm_state.as_deref().unwrap_or_default())?;
    let settings = conf::load(a.config.as_deref().map(Path::new))?;
    let banks = parse_banks(a.pcr_banks.as_deref().unwrap_or(&settings.default_banks))?;
    let cipher = a.cipher.as_deref().unwrap_or("aes-128-cbc");
    let key = match &a.secret {
        Some(src) => Some(secret::state_key(src, cipher)?),
        None => None,
    };
    if let Some(d) = &a.write_ek_cert_files {
        if !Path::new(d).is_dir() {
            return Err(SetupError::Unsupported(format!(
                "--write-ek-cert-files {d}: not a directory"
            )));
        }
    }

    log.info(&format!(
        "Starting vTPM {} as {} @ {}",
        if a.reconfigure {
            "reconfiguration"
        } else {
            "manufacturing"
        },
        whoami(),
        now_text()
    ));
    for note in &a.ignored {
        log.info(&format!("  Note: ignored {note}"));
    }
    for note in &settings.notes {
        log.info(&format!("  Note: {note}"));
    }
    if key.is_some() {
        log.info("  The TPM's state will be encrypted with a key derived from the given secret.");
    }

    if let Some(r) = reservation(&dir)? {
        log.info(&format!(
            "Leaving {} alone: it is reserved for incoming sealed migration {} \
             ({}); the TPM's state arrives with the migration. If no migration is \
             coming, remove the reservation: vtpmctl reserve-incoming --cancel --state-dir {}",
            dir.display(),
            r.migration_id,
            statedir::RESERVATION,
            dir.display()
        ));
        return Ok(Outcome::Reserved);
    }
    let store = Arc::new(StateDir::open(&dir, STATE_FILE_MODE, key)?);
    let mut engine = take_engine(store.clone())?;
    let rsa = rsa_bits(a.rsa_keysize.as_deref(), &rsa_key_sizes(&mut engine))?;
    let exists = store.has_blob(storage::PERMANENT);
    if a.reconfigure {
        if !exists {
            return Err(SetupError::NothingToReconfigure(dir.display().to_string()));
        }
    } else if exists {
        if a.not_overwrite {
            log.info("Not overwriting existing state file.");
            return Ok(Outcome::LeftAlone);
        }
        if !a.overwrite {
            return Err(SetupError::Existing(dir.display().to_string()));
        }
    }
    if !a.reconfigure {
        remove_state(&store)?;
    }
    let result = provision(
        a,
        &settings,
        &store,
        &mut engine,
        banks.as_deref(),
        rsa,
        log,
    );
    // swtpm_setup's output is swtpm's files: hand them over in swtpm's
    // format (vtpmd moves them to its slot files at its first write), so
    // a directory vtpm-setup made also serves with swtpm.
    let result = result.and_then(|()| Ok(store.convert_to_swtpm().map(|_| ())?));
    match result {
        Ok(()) => {
            log.info("Successfully authored TPM state.");
            log.info(&format!("Ending vTPM manufacturing @ {}", now_text()));
            Ok(if a.reconfigure {
                Outcome::Reconfigured
            } else {
                Outcome::Provisioned
            })
        }
        Err(e) => {
            if !a.reconfigure {
                let _ = remove_state(&store);
            }
            Err(e)
        }
    }
}

/// The reservation `vtpmctl reserve-incoming` left in `dir`, if any
/// (expired or not: only vtpmctl or the destination vtpmd removes it).
fn reservation(dir: &Path) -> Result<Option<statedir::Reservation>, SetupError> {
    statedir::read_json(dir, statedir::RESERVATION).map_err(|e| {
        SetupError::Unsupported(format!(
            "{e}; remove it (vtpmctl reserve-incoming --cancel --state-dir {}) and retry",
            dir.display()
        ))
    })
}

fn remove_state(store: &StateDir) -> Result<(), SetupError> {
    Ok(store.wipe()?)
}

/// The part that runs the TPM.
fn provision(
    a: &SetupArgs,
    settings: &Settings,
    store: &StateDir,
    engine: &mut Libtpms,
    banks: Option<&[String]>,
    rsa: u16,
    log: &mut SetupLog,
) -> Result<(), SetupError> {
    if let Err(rc) = engine.main_init() {
        let why = store
            .take_last_failure()
            .unwrap_or_else(|| format!("result {rc:#x}"));
        return Err(SetupError::Engine(format!(
            "the TPM did not start on {}: {why}",
            store.path().display()
        )));
    }
    let info = tpm_info(engine)?;
    let eks: Vec<EkKind> = if a.createek && !a.reconfigure {
        let rsa_kind = if rsa == 3072 {
            EkKind::Rsa3072
        } else {
            EkKind::Rsa2048
        };
        std::iter::once(rsa_kind)
            .chain(settings.ecc_eks.iter().copied())
            .collect()
    } else {
        Vec::new()
    };
    let mut tpm = Tpm::new(engine);
    tpm.startup_clear()?;

    if !a.reconfigure {
        let mut p = Provisioner {
            a,
            settings,
            info: &info,
            ca: None,
            log,
        };
        if a.create_spk {
            p.create_spk(&mut tpm, rsa)?;
        }
        // The RSA EK first: the platform certificate is for its key.
        for (i, &kind) in eks.iter().enumerate() {
            p.create_ek(&mut tpm, kind, i == 0 && a.create_platform_cert)?;
        }
    }
    if let Some(wanted) = banks {
        let all = tpm.pcr_banks()?;
        let (alloc, on) = allocation(&all, wanted)?;
        tpm.pcr_allocate(&alloc)?;
        log.info(&format!(
            "Successfully activated PCR banks {} among {}.",
            on.join(","),
            names(&all)
        ));
    }
    tpm.shutdown_clear()?;
    engine.terminate();
    if a.display {
        display(a, banks, &eks);
    }
    Ok(())
}

/// `--display`: what was made, on stdout.
fn display(a: &SetupArgs, banks: Option<&[String]>, eks: &[EkKind]) {
    let mut out = std::io::stdout().lock();
    for kind in eks {
        let _ = write!(
            out,
            "EK {}: handle {:#010x}",
            kind.describe(),
            kind.handle()
        );
        if a.create_ek_cert {
            let _ = write!(out, ", certificate in NV index {:#010x}", kind.cert_index());
        }
        let _ = writeln!(out);
    }
    if a.create_platform_cert {
        let _ = writeln!(
            out,
            "platform certificate in NV index {PLATFORM_CERT_INDEX:#010x}"
        );
    }
    if let Some(b) = banks {
        let _ = writeln!(out, "active PCR banks: {}", b.join(","));
    }
}

struct Provisioner<'a> {
    a: &'a SetupArgs,
    settings: &'a Settings,
    info: &'a TpmInfo,
    ca: Option<LocalCa>,
    log: &'a mut SetupLog,
}

impl Provisioner<'_> {
    fn ca(&mut self) -> Result<&LocalCa, SetupError> {
        if self.ca.is_none() {
            let ca = LocalCa::open_or_create(&self.settings.ca)?;
            if ca.created {
                self.log.info(&format!(
                    "Created the local CA in {} (trust anchor: {}).",
                    ca.paths().statedir.display(),
                    ca.paths().root_cert().display()
                ));
            }
            self.ca = Some(ca);
        }
        Ok(self.ca.as_ref().expect("set above"))
    }

    fn subject(&self) -> String {
        // swtpm-localca: no '+' or ',' in the common name.
        self.a
            .vmid
            .as_deref()
            .unwrap_or("unknown")
            .replace([',', '+'], "_")
    }

    fn create_spk(&mut self, tpm: &mut Tpm<'_>, rsa: u16) -> Result<(), SetupError> {
        let t = ek::spk_template(self.a.ecc, rsa);
        let c = tpm.create_primary(tpm::RH_OWNER, &t)?;
        tpm.evict_control(c.handle, ek::SPK_HANDLE)?;
        tpm.flush(c.handle)?;
        self.log.info(&format!(
            "Successfully created storage primary key with handle {:#x}.",
            ek::SPK_HANDLE
        ));
        Ok(())
    }

    fn usage(&self) -> EkUse {
        EkUse {
            sign: self.a.allow_signing,
            decrypt: self.a.decryption || !self.a.allow_signing,
        }
    }

    /// One EK, persistent, with its certificate (and the platform's).
    fn create_ek(
        &mut self,
        tpm: &mut Tpm<'_>,
        kind: EkKind,
        platform_cert: bool,
    ) -> Result<(), SetupError> {
        let usage = self.usage();
        let template = kind.template(usage);
        let c = tpm.create_primary(tpm::RH_ENDORSEMENT, &template)?;
        tpm.evict_control(c.handle, kind.handle())?;
        tpm.flush(c.handle)?;
        self.log.info(&format!(
            "Successfully created {} EK with handle {:#x}.",
            kind.describe(),
            kind.handle()
        ));
        if !usage.is_standard() {
            self.write_nv(tpm, kind.template_index(), &template, "EK template")?;
        }
        let public = PublicKey::parse(&c.public)?;
        let spki = public.spki_der()?;
        if self.a.create_ek_cert {
            let purpose = Purpose::Ek {
                tpm: self.info,
                ecc: kind.is_ecc(),
                sign: usage.sign,
                decrypt: usage.decrypt,
            };
            let der = self.issue(&spki, purpose)?;
            self.write_nv(
                tpm,
                kind.cert_index(),
                &der,
                &format!("{} EK certificate", kind.describe()),
            )?;
            if let Some(d) = &self.a.write_ek_cert_files {
                let path = Path::new(d).join(format!("ek-{}.crt", kind.describe()));
                let mut f = files::create_new(&path, 0o640).map_err(|source| SetupError::Io {
                    op: "create",
                    path: path.display().to_string(),
                    source,
                })?;
                f.write_all(&der).map_err(|source| SetupError::Io {
                    op: "write",
                    path: path.display().to_string(),
                    source,
                })?;
            }
        }
        if platform_cert {
            let platform = self.settings.platform.clone();
            let purpose = Purpose::Platform {
                platform: &platform,
                ecc: kind.is_ecc(),
            };
            let der = self.issue(&spki, purpose)?;
            self.write_nv(tpm, PLATFORM_CERT_INDEX, &der, "platform certificate")?;
        }
        Ok(())
    }

    fn issue(&mut self, spki: &[u8], purpose: Purpose<'_>) -> Result<Vec<u8>, SetupError> {
        let subject = self.subject();
        let ca = self.ca()?;
        let serial = ca.next_serial()?;
        let der = ca.issuer.issue(serial, &subject, spki, purpose)?;
        let what = match purpose {
            Purpose::Ek { .. } => "EK",
            Purpose::Platform { .. } => "platform",
        };
        self.log.info(&format!(
            "Successfully created {what} certificate locally (serial {serial})."
        ));
        Ok(der)
    }

    /// Defines, writes and (with `--lock-nvram`) write-locks an NV index.
    fn write_nv(
        &mut self,
        tpm: &mut Tpm<'_>,
        index: u32,
        data: &[u8],
        what: &str,
    ) -> Result<(), SetupError> {
        let size = u16::try_from(data.len())
            .map_err(|_| SetupError::Unsupported(format!("{what} is too large for NV")))?;
        tpm.nv_define(index, CERT_NV_ATTRS, size)?;
        tpm.nv_write(index, data)?;
        if self.a.lock_nvram {
            tpm.nv_write_lock(index)?;
        }
        self.log.info(&format!(
            "Successfully created NVRAM area {index:#x} for {what}."
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banks_parse() {
        assert_eq!(parse_banks("-").unwrap(), None);
        assert_eq!(
            parse_banks(" sha256, sha384 ,").unwrap().unwrap(),
            vec!["sha256", "sha384"]
        );
        let e = parse_banks("sha265").unwrap_err();
        assert!(
            e.to_string().contains("sha265") && e.to_string().contains("sha256"),
            "{e}"
        );
        assert!(parse_banks(",").is_err());
    }

    #[test]
    fn allocation_turns_others_off() {
        let all = vec![
            Bank {
                alg: 4,
                select: vec![0xff; 3],
            },
            Bank {
                alg: 0x0b,
                select: vec![0; 3],
            },
        ];
        let (alloc, on) = allocation(&all, &["sha256".into(), "sha3-256".into()]).unwrap();
        assert_eq!(on, vec!["sha256"]);
        assert_eq!(alloc[0].select, vec![0; 3]);
        assert_eq!(alloc[1].select, vec![0xff; 3]);
        assert!(allocation(&all, &["sm3-256".into()]).is_err());
    }

    #[test]
    fn state_paths() {
        assert_eq!(state_path("dir:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert_eq!(state_path("/a").unwrap(), PathBuf::from("/a"));
        assert!(state_path("file:///a").is_err());
    }
}
