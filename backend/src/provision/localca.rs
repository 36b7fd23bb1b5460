//! The local CA (swtpm-localca's role): a root CA and an intermediate
//! ("issuer") CA whose key signs the TPM certificates, kept in a directory
//! laid out as swtpm-localca lays it out, so either tool can use the other's:
//!
//! ```text
//! <statedir>/.lock.swtpm-localca          flock held while creating and numbering
//! <signingkey>                            issuer key, PEM (0600)       e.g. signkey.pem
//! <issuercert>                            issuer certificate, PEM      e.g. issuercert.pem
//! <signingkey dir>/swtpm-localca-rootca-privkey.pem   root key (0600)
//! <signingkey dir>/swtpm-localca-rootca-cert.pem      root certificate: the trust anchor
//! <certserial>                            last serial number issued, decimal
//! ```
//!
//! Both CA keys are created on first use (RSA 3072, as swtpm-localca's
//! certtool makes them). An existing swtpm-localca directory is used as it
//! is: its issuer key may be PKCS#1, PKCS#8 (encrypted with
//! `signingkey_password`) or SEC1 PEM, RSA or ECDSA P-256/P-384, with
//! certtool's text before the PEM block. Signing keys in PKCS#11 or a TPM
//! (`pkcs11:`, `tpmkey:`) are refused with an error.

use super::cert::{self, CaKey, CertError, Issuer};
use crate::storage::files;
use der::{Decode, DecodePem};
use nix::fcntl::{Flock, FlockArg};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use x509_cert::time::Time;
use x509_cert::Certificate;
use zeroize::Zeroizing;

/// File names of the root CA, next to the signing key (swtpm-localca's).
pub const ROOT_KEY: &str = "swtpm-localca-rootca-privkey.pem";
pub const ROOT_CERT: &str = "swtpm-localca-rootca-cert.pem";
const LOCK: &str = ".lock.swtpm-localca";
const ROOT_CN: &str = "vtpmd-localca-rootca";
const ISSUER_CN: &str = "vtpmd-localca";
const CA_RSA_BITS: usize = 3072;

#[derive(Debug, Error)]
pub enum CaError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("signing key {0}: keys in PKCS#11 tokens or TPMs are not supported; point signingkey at a PEM file")]
    ExternalKey(String),
    #[error("signing key {path}: {why}")]
    BadKey { path: String, why: String },
    #[error("issuer certificate {path}: {why}")]
    BadCert { path: String, why: String },
    #[error("signing key {key} does not belong to issuer certificate {cert}")]
    Mismatch { key: String, cert: String },
    #[error("{path} holds '{content}', not a serial number; fix or remove it")]
    BadSerial { path: String, content: String },
    #[error("creating the local CA: {0}")]
    Create(#[from] CertError),
    #[error("creating the local CA key: {0}")]
    KeyGen(String),
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |e| CaError::Io(format!("{op} {}", p.display()), e)
}

/// Where the CA lives (swtpm-localca.conf's statedir, signingkey,
/// issuercert, certserial, signingkey_password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub statedir: PathBuf,
    pub signingkey: String,
    pub issuercert: PathBuf,
    pub certserial: PathBuf,
    pub signingkey_password: Option<String>,
}

impl CaPaths {
    /// The swtpm-localca defaults under `statedir`.
    pub fn under(statedir: &Path) -> CaPaths {
        CaPaths {
            statedir: statedir.to_path_buf(),
            signingkey: statedir.join("signkey.pem").display().to_string(),
            issuercert: statedir.join("issuercert.pem"),
            certserial: statedir.join("certserial"),
            signingkey_password: None,
        }
    }

    fn key_dir(&self) -> PathBuf {
        Path::new(&self.signingkey)
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// The trust anchor: the root certificate next to the signing key.
    pub fn root_cert(&self) -> PathBuf {
        self.key_dir().join(ROOT_CERT)
    }
}

/// An open local CA.
#[derive(Debug)]
pub struct LocalCa {
    paths: CaPaths,
    pub issuer: Issuer,
    /// Whether this run created the CA.
    pub created: bool,
}

/// Holds the CA directory's lock while alive.
struct CaLock(#[allow(dead_code)] Flock<fs::File>);

fn lock(paths: &CaPaths) -> Result<CaLock, CaError> {
    make_dir(&paths.statedir)?;
    let path = paths.statedir.join(LOCK);
    let f = files::open_lock_file(&path).map_err(io("open", &path))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map(CaLock)
        .map_err(|(_, e)| io("lock", &path)(e.into()))
}

fn make_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(io("create directory", dir))
}

/// Writes `bytes` to `path` atomically, created with `mode`, never through
/// a link.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map_or_else(|| "ca".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = files::create_new(&tmp, mode).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename", path))
}

impl LocalCa {
    /// Opens the CA, creating its keys and certificates if absent.
    pub fn open_or_create(paths: &CaPaths) -> Result<LocalCa, CaError> {
        if paths.signingkey.starts_with("pkcs11:") || paths.signingkey.starts_with("tpmkey:") {
            return Err(CaError::ExternalKey(paths.signingkey.clone()));
        }
        let _lock = lock(paths)?;
        let key_path = Path::new(&paths.signingkey);
        let created = !key_path.exists() || !paths.issuercert.exists();
        if created {
            create(paths)?;
        }
        let issuer = load(paths)?;
        Ok(LocalCa {
            paths: paths.clone(),
            issuer,
            created,
        })
    }

    pub fn paths(&self) -> &CaPaths {
        &self.paths
    }

    /// The next serial number, recorded in the certserial file.
    pub fn next_serial(&self) -> Result<u64, CaError> {
        let _lock = lock(&self.paths)?;
        let path = &self.paths.certserial;
        let last = match fs::read_to_string(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => 1,
            Err(e) => return Err(io("read", path)(e)),
            Ok(s) if s.trim().is_empty() => 1,
            Ok(s) => s.trim().parse::<u64>().map_err(|_| CaError::BadSerial {
                path: path.display().to_string(),
                content: s.chars().take(40).collect(),
            })?,
        };
        let next = last.checked_add(1).ok_or_else(|| CaError::BadSerial {
            path: path.display().to_string(),
            content: last.to_string(),
        })?;
        if let Some(dir) = path.parent() {
            make_dir(dir)?;
        }
        write_serial(path, next)?;
        Ok(next)
    }
}

/// Records `serial` (under the CA lock). An existing file is rewritten in
/// place, as swtpm-localca does, so it keeps its owner: the CA may be shared
/// by root and the user libvirt runs vtpm-setup (or swtpm_localca) as.
fn write_serial(path: &Path, serial: u64) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = serial.to_string();
    match fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(text.as_bytes()).map_err(io("write", path))?;
            f.sync_all().map_err(io("fsync", path))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => write_new(path, text.as_bytes(), 0o644),
        Err(e) => Err(io("open", path)(e)),
    }
}

fn random_serial() -> Result<u64, CaError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| CaError::KeyGen(e.to_string()))?;
    Ok(u64::from_be_bytes(b) >> 1 | 1)
}

fn new_rsa_key() -> Result<(CaKey, Zeroizing<String>), CaError> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, CA_RSA_BITS)
        .map_err(|e| CaError::KeyGen(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem(der::pem::LineEnding::LF)
        .map_err(|e| CaError::KeyGen(e.to_string()))?;
    Ok((
        CaKey::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(key))),
        Zeroizing::new(pem.to_string()),
    ))
}

fn pem_cert(der: &[u8]) -> Result<String, CaError> {
    use der::EncodePem;
    let cert = Certificate::from_der(der).map_err(CertError::from)?;
    Ok(cert
        .to_pem(der::pem::LineEnding::LF)
        .map_err(CertError::from)?)
}

/// Creates the root and issuer CA (called under the lock).
fn create(paths: &CaPaths) -> Result<(), CaError> {
    let key_dir = paths.key_dir();
    make_dir(&key_dir)?;
    if let Some(d) = paths.issuercert.parent() {
        make_dir(d)?;
    }
    let (root_key, root_pem) = new_rsa_key()?;
    let root_spki = root_key.spki()?;
    let root_name = cert::common_name(ROOT_CN)?;
    let root_der = cert::sign_tbs(
        &root_key,
        random_serial()?,
        root_name.clone(),
        root_name.clone(),
        root_spki.clone(),
        Time::INFINITY,
        cert::ca_extensions(&root_spki, None)?,
    )?;
    let (issuer_key, issuer_pem) = new_rsa_key()?;
    let issuer_spki = issuer_key.spki()?;
    let issuer_der = cert::sign_tbs(
        &root_key,
        random_serial()?,
        root_name,
        cert::common_name(ISSUER_CN)?,
        issuer_spki.clone(),
        Time::INFINITY,
        cert::ca_extensions(&issuer_spki, Some(cert::key_id(&root_spki)))?,
    )?;
    write_new(&key_dir.join(ROOT_KEY), root_pem.as_bytes(), 0o600)?;
    write_new(
        &key_dir.join(ROOT_CERT),
        pem_cert(&root_der)?.as_bytes(),
        0o644,
    )?;
    // The issuer certificate last: its presence marks a complete CA.
    write_new(Path::new(&paths.signingkey), issuer_pem.as_bytes(), 0o600)?;
    write_new(&paths.issuercert, pem_cert(&issuer_der)?.as_bytes(), 0o644)?;
    Ok(())
}

/// The first PEM block in `text` (certtool writes a description first).
fn pem_block(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start..];
    let end_marker = rest.find("-----END ")?;
    let end = end_marker
        + rest[end_marker..]
            .find("\n")
            .map_or(rest.len() - end_marker, |n| n + 1);
    Some(&rest[..end])
}

fn load(paths: &CaPaths) -> Result<Issuer, CaError> {
    let key_path = Path::new(&paths.signingkey);
    let shown = paths.signingkey.clone();
    let bad_key = |why: String| CaError::BadKey {
        path: shown.clone(),
        why,
    };
    let text = Zeroizing::new(fs::read_to_string(key_path).map_err(io("read", key_path))?);
    let block = pem_block(&text).ok_or_else(|| bad_key("no PEM block found".into()))?;
    let key = parse_key(block, paths.signingkey_password.as_deref()).map_err(bad_key)?;

    let cert_path = &paths.issuercert;
    let bad_cert = |why: String| CaError::BadCert {
        path: cert_path.display().to_string(),
        why,
    };
    let text = fs::read_to_string(cert_path).map_err(io("read", cert_path))?;
    let block = pem_block(&text).ok_or_else(|| bad_cert("no PEM block found".into()))?;
    let cert = Certificate::from_pem(block).map_err(|e| bad_cert(e.to_string()))?;
    if cert.tbs_certificate.subject_public_key_info != key.spki()? {
        return Err(CaError::Mismatch {
            key: paths.signingkey.clone(),
            cert: cert_path.display().to_string(),
        });
    }
    Ok(Issuer { key, cert })
}

/// A private key from one PEM block.
fn parse_key(block: &str, password: Option<&str>) -> Result<CaKey, String> {
    let label = block
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("-----BEGIN ")
        .trim_end_matches("-----");
    match label {
        "RSA PRIVATE KEY" => rsa::RsaPrivateKey::from_pkcs1_pem(block)
            .map(|k| CaKey::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(k))))
            .map_err(|e| e.to_string()),
        "EC PRIVATE KEY" => {
            use p256::elliptic_curve::SecretKey;
            if let Ok(k) = SecretKey::<p256::NistP256>::from_sec1_pem(block) {
                Ok(CaKey::P256(k.into()))
            } else {
                SecretKey::<p384::NistP384>::from_sec1_pem(block)
                    .map(|k| CaKey::P384(k.into()))
                    .map_err(|_| "EC key is neither NIST P-256 nor P-384".into())
            }
        }
        "PRIVATE KEY" => {
            let (_, doc) = der::SecretDocument::from_pem(block).map_err(|e| e.to_string())?;
            key_from_pkcs8(doc.as_bytes())
        }
        "ENCRYPTED PRIVATE KEY" => {
            let pw = password.ok_or(
                "the key is encrypted: set signingkey_password in the local CA's configuration",
            )?;
            let (_, doc) = der::SecretDocument::from_pem(block).map_err(|e| e.to_string())?;
            let enc = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
                .map_err(|e| e.to_string())?;
            let plain = enc
                .decrypt(pw)
                .map_err(|e| format!("cannot decrypt with signingkey_password: {e}"))?;
            key_from_pkcs8(plain.as_bytes())
        }
        other => Err(format!("unsupported PEM type '{other}'")),
    }
}

fn key_from_pkcs8(der: &[u8]) -> Result<CaKey, String> {
    if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_der(der) {
        return Ok(CaKey::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(k))));
    }
    if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_der(der) {
        return Ok(CaKey::P256(k));
    }
    p384::ecdsa::SigningKey::from_pkcs8_der(der)
        .map(CaKey::P384)
        .map_err(|_| "PKCS#8 key is not RSA, ECDSA P-256 or P-384".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_block_skips_certtool_preamble() {
        let t = "Public Key Info:\n\tbits\n-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\ntrailer";
        assert_eq!(
            pem_block(t).unwrap(),
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"
        );
        assert!(pem_block("no pem here").is_none());
        assert!(pem_block("-----BEGIN X-----\ntruncated").is_none());
    }

    #[test]
    fn garbage_keys_are_errors() {
        for b in [
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        ] {
            assert!(parse_key(b, None).is_err(), "{b}");
        }
    }

    #[test]
    fn serials_count_up_and_bad_content_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let paths = CaPaths::under(d.path());
        let ca = LocalCa {
            paths: paths.clone(),
            issuer: Issuer {
                key: CaKey::P256(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)),
                cert: dummy_cert(),
            },
            created: false,
        };
        assert_eq!(ca.next_serial().unwrap(), 2, "swtpm-localca starts at 2");
        use std::os::unix::fs::MetadataExt;
        let inode = fs::metadata(&paths.certserial).unwrap().ino();
        assert_eq!(ca.next_serial().unwrap(), 3);
        assert_eq!(fs::read_to_string(&paths.certserial).unwrap(), "3");
        assert_eq!(
            fs::metadata(&paths.certserial).unwrap().ino(),
            inode,
            "rewritten in place: owner and mode kept"
        );
        fs::write(&paths.certserial, "abc").unwrap();
        assert!(matches!(ca.next_serial(), Err(CaError::BadSerial { .. })));
        fs::write(&paths.certserial, u64::MAX.to_string()).unwrap();
        assert!(ca.next_serial().is_err());
    }

    fn dummy_cert() -> Certificate {
        let key = CaKey::P256(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng));
        let spki = key.spki().unwrap();
        let name = cert::common_name("t").unwrap();
        let der =
            cert::sign_tbs(&key, 1, name.clone(), name, spki, Time::INFINITY, vec![]).unwrap();
        Certificate::from_der(&der).unwrap()
    }
}
