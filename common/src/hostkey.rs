//! Host migration keys: an RSA-3072 key pair per host. A source wraps each
//! migration's instance keys to the destination's public key (RSA-OAEP with
//! SHA-256); a destination signs its receipt with its private key (RSA-PSS
//! with SHA-256).
//!
//! Without `--host-key`, vtpmd uses the host's key in the system location
//! ([`system_key_dir`]: `/var/lib/vtpm-hostkey`, or `$VTPM_HOST_KEY_DIR`), made on
//! first use as swtpm_setup makes its local CA, so a fresh install seals by
//! default.

use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, Pss, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Where the host key lives when none is given.
pub const SYSTEM_KEY_DIR: &str = "/var/lib/vtpm-hostkey";
/// Environment variable that replaces [`SYSTEM_KEY_DIR`] (tests, packagers).
pub const SYSTEM_KEY_DIR_ENV: &str = "VTPM_HOST_KEY_DIR";
/// The private key's file name in a key directory (`vtpmctl keygen --out`).
pub const PRIVATE_FILE: &str = "host-key.pem";
/// The public key's file name next to it.
pub const PUBLIC_FILE: &str = "host-key.pub.pem";

/// The directory of the host key used when none is given.
pub fn system_key_dir() -> PathBuf {
    std::env::var_os(SYSTEM_KEY_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_KEY_DIR))
}

/// Size of newly generated host keys.
pub const HOST_KEY_BITS: usize = 3072;
/// Smallest peer key accepted.
pub const MIN_PEER_BITS: usize = 3072;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not a PEM {kind} key: {why}")]
    Parse {
        what: String,
        kind: &'static str,
        why: String,
    },
    #[error("peer key has {0} bits; at least {MIN_PEER_BITS} are required")]
    TooSmall(usize),
    #[error("RSA operation failed: {0}")]
    Rsa(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("peer key {0} is not in the trusted peers directory")]
    Untrusted(String),
}

/// SHA-256 of the public key's DER (SubjectPublicKeyInfo).
pub fn fingerprint_bytes(key: &RsaPublicKey) -> [u8; 32] {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    Sha256::digest(der).into()
}

/// [`fingerprint_bytes`] as lower-case hex: how keys are named to people.
pub fn fingerprint(key: &RsaPublicKey) -> String {
    crate::hex::encode(&fingerprint_bytes(key))
}

/// A host's private key.
#[derive(Clone)]
pub struct HostKey {
    private: RsaPrivateKey,
    public: RsaPublicKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostKey({})", fingerprint(&self.public))
    }
}

impl HostKey {
    pub fn generate() -> Result<HostKey, KeyError> {
        let private = RsaPrivateKey::new(&mut rand_core::OsRng, HOST_KEY_BITS)
            .map_err(|e| KeyError::Rsa(Box::new(e)))?;
        let public = private.to_public_key();
        Ok(HostKey { private, public })
    }

    pub fn load(path: &Path) -> Result<HostKey, KeyError> {
        let pem = read_pem(path)?;
        HostKey::parse(&pem, &path.display().to_string())
    }

    fn parse(pem: &str, what: &str) -> Result<HostKey, KeyError> {
        let private = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| KeyError::Parse {
            what: what.to_string(),
            kind: "PKCS#8 private",
            why: e.to_string(),
        })?;
        let public = private.to_public_key();
        Ok(HostKey { private, public })
    }

    /// Loads `dir`'s key, or makes one there if it has none: the
    /// directory is created 0700 if missing, the key files (0600 private,
    /// 0644 public) belong to the directory's owner. Two processes racing
    /// end up with the same key (the private file is published with a
    /// link, which never replaces). `Ok((key, true))` if it was made now.
    pub fn load_or_create(dir: &Path) -> Result<(HostKey, bool), KeyError> {
        let path = dir.join(PRIVATE_FILE);
        if path.exists() {
            return HostKey::load(&path).map(|k| (k, false));
        }
        let werr = |p: &Path| {
            let p = p.display().to_string();
            move |source| KeyError::Write { path: p, source }
        };
        match fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) => return Err(werr(dir)(e)),
        }
        let key = HostKey::generate()?;
        let owner = fs::metadata(dir).map_err(werr(dir))?;
        let tmp = dir.join(format!(".{PRIVATE_FILE}.{}", std::process::id()));
        let pem = key
            .private
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Rsa(Box::new(e)))?;
        let written = (|| {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&tmp)?;
            f.write_all(pem.as_bytes())?;
            give_to(&f, &owner)?;
            f.sync_all()?;
            fs::hard_link(&tmp, &path)
        })();
        let _ = fs::remove_file(&tmp);
        match written {
            Ok(()) => {}
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return HostKey::load(&path).map(|k| (k, false));
            }
            Err(e) => return Err(werr(&path)(e)),
        }
        let pub_tmp = dir.join(format!(".{PUBLIC_FILE}.{}", std::process::id()));
        let pub_path = dir.join(PUBLIC_FILE);
        (|| {
            let _ = fs::remove_file(&pub_tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&pub_tmp)?;
            f.write_all(key.public_pem().as_bytes())?;
            give_to(&f, &owner)?;
            f.sync_all()?;
            fs::rename(&pub_tmp, &pub_path)?;
            fs::File::open(dir)?.sync_all()
        })()
        .map_err(werr(&pub_path))?;
        Ok((key, true))
    }

    /// Writes `host-key.pem` (0600) and `host-key.pub.pem` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), KeyError> {
        let priv_path = dir.join("host-key.pem");
        let pub_path = dir.join("host-key.pub.pem");
        let werr = |p: &Path| {
            let p = p.display().to_string();
            move |source| KeyError::Write { path: p, source }
        };
        let pem = self
            .private
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Rsa(Box::new(e)))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&priv_path)
            .map_err(werr(&priv_path))?;
        f.write_all(pem.as_bytes()).map_err(werr(&priv_path))?;
        f.sync_all().map_err(werr(&priv_path))?;
        fs::write(&pub_path, self.public_pem()).map_err(werr(&pub_path))
    }

    pub fn public(&self) -> &RsaPublicKey {
        &self.public
    }

    pub fn public_pem(&self) -> String {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }

    /// Unwraps what a source wrapped to this host.
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        self.private
            .decrypt(Oaep::new::<Sha256>(), wrapped)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| KeyError::Rsa(Box::new(e)))
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = Sha256::digest(msg);
        self.private
            .sign_with_rng(&mut rand_core::OsRng, Pss::new::<Sha256>(), &digest)
            .map_err(|e| KeyError::Rsa(Box::new(e)))
    }
}

fn read_pem(path: &Path) -> Result<zeroize::Zeroizing<String>, KeyError> {
    // The text is wiped after parsing; only the parsed key stays.
    fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })
}

/// A host key loaded on first use: an idle vTPM that never saves or
/// migrates pays neither the file read nor the RSA key set-up.
pub struct LazyHostKey {
    path: PathBuf,
    key: std::sync::OnceLock<HostKey>,
}

impl std::fmt::Debug for LazyHostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyHostKey({})", self.path.display())
    }
}

impl LazyHostKey {
    /// A key already loaded (`--host-key`, checked at start).
    pub fn ready(key: HostKey, path: &Path) -> LazyHostKey {
        LazyHostKey {
            path: path.to_path_buf(),
            key: std::sync::OnceLock::from(key),
        }
    }

    /// The key in `path`, loaded at the first [`get`](Self::get).
    pub fn at(path: &Path) -> LazyHostKey {
        LazyHostKey {
            path: path.to_path_buf(),
            key: std::sync::OnceLock::new(),
        }
    }

    /// Where the key comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self) -> Result<&HostKey, KeyError> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let k = HostKey::load(&self.path)?;
        Ok(self.key.get_or_init(|| k))
    }
}

/// Makes `f` belong to the owner of `dir` (when run as root for a
/// directory that belongs to the TPM's user, such as `tss`).
fn give_to(f: &fs::File, dir: &fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mine = f.metadata()?;
    if mine.uid() == dir.uid() && mine.gid() == dir.gid() {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(dir.uid()), Some(dir.gid()))
}

/// Parses a peer's public key (PEM SubjectPublicKeyInfo).
pub fn parse_public(pem: &str, what: &str) -> Result<RsaPublicKey, KeyError> {
    let key = RsaPublicKey::from_public_key_pem(pem).map_err(|e| KeyError::Parse {
        what: what.to_string(),
        kind: "public",
        why: e.to_string(),
    })?;
    let bits = key.size() * 8;
    if bits < MIN_PEER_BITS {
        return Err(KeyError::TooSmall(bits));
    }
    Ok(key)
}

/// Wraps `secret` to `peer` with RSA-OAEP-SHA256.
pub fn wrap_key(peer: &RsaPublicKey, secret: &[u8]) -> Result<Vec<u8>, KeyError> {
    peer.encrypt(&mut rand_core::OsRng, Oaep::new::<Sha256>(), secret)
        .map_err(|e| KeyError::Rsa(Box::new(e)))
}

pub fn verify(peer: &RsaPublicKey, msg: &[u8], sig: &[u8]) -> bool {
    peer.verify(Pss::new::<Sha256>(), &Sha256::digest(msg), sig)
        .is_ok()
}

/// Checks `key` against the `*.pem` public keys in `dir`.
pub fn check_trusted(dir: &Path, key: &RsaPublicKey) -> Result<(), KeyError> {
    let want = fingerprint(key);
    let entries = fs::read_dir(dir).map_err(|source| KeyError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("pem") {
            continue;
        }
        if let Ok(pem) = fs::read_to_string(&p) {
            if let Ok(k) = RsaPublicKey::from_public_key_pem(&pem) {
                if fingerprint(&k) == want {
                    return Ok(());
                }
            }
        }
    }
    Err(KeyError::Untrusted(want))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// Two host keys shared by the tests (generation takes a while).
    fn keys() -> &'static (HostKey, HostKey) {
        static K: OnceLock<(HostKey, HostKey)> = OnceLock::new();
        K.get_or_init(|| (HostKey::generate().unwrap(), HostKey::generate().unwrap()))
    }

    #[test]
    fn wrap_unwrap_sign_verify() {
        let (a, b) = keys();
        let w = wrap_key(a.public(), b"instance keys").unwrap();
        assert_eq!(&a.unwrap_key(&w).unwrap()[..], b"instance keys");
        assert!(b.unwrap_key(&w).is_err());
        let sig = a.sign(b"receipt").unwrap();
        assert!(verify(a.public(), b"receipt", &sig));
        assert!(!verify(a.public(), b"receipt!", &sig));
        assert!(!verify(b.public(), b"receipt", &sig));
    }

    #[test]
    fn save_load_and_trust() {
        let (a, b) = keys();
        let d = tempfile::tempdir().unwrap();
        a.save(d.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(d.path().join("host-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(a.save(d.path()).is_err(), "never overwrites a key");
        let loaded = HostKey::load(&d.path().join("host-key.pem")).unwrap();
        assert_eq!(loaded.fingerprint(), a.fingerprint());
        let pem = fs::read_to_string(d.path().join("host-key.pub.pem")).unwrap();
        let pk = parse_public(&pem, "peer").unwrap();
        check_trusted(d.path(), &pk).unwrap();
        assert!(matches!(
            check_trusted(d.path(), b.public()),
            Err(KeyError::Untrusted(_))
        ));
    }

    #[test]
    fn load_or_create_makes_one_key_and_then_loads_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vtpm");
        let (made, created) = HostKey::load_or_create(&dir).unwrap();
        assert!(created);
        let (again, created) = HostKey::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(made.fingerprint(), again.fingerprint());
        let mode = |f: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &fs::metadata(dir.join(f)).unwrap().permissions(),
            ) & 0o777
        };
        assert_eq!(mode(PRIVATE_FILE), 0o600);
        assert_eq!(mode(PUBLIC_FILE), 0o644);
        assert_eq!(mode("."), 0o700);
        let pem = fs::read_to_string(dir.join(PUBLIC_FILE)).unwrap();
        assert_eq!(parse_public(&pem, "x").unwrap(), *made.public());
        let left: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file is left");
    }

    #[test]
    fn lazy_key_loads_on_first_use() {
        let (a, _) = keys();
        let d = tempfile::tempdir().unwrap();
        let lazy = LazyHostKey::at(&d.path().join(PRIVATE_FILE));
        assert!(lazy.get().is_err(), "not there yet");
        a.save(d.path()).unwrap();
        assert_eq!(lazy.get().unwrap().fingerprint(), a.fingerprint());
        fs::write(d.path().join("junk.pem"), "not a key").unwrap();
        let junk = LazyHostKey::at(&d.path().join("junk.pem"));
        let err = junk.get().unwrap_err().to_string();
        assert!(err.contains("junk.pem"), "{err}");
    }

    #[test]
    fn bad_public_keys() {
        assert!(parse_public("garbage", "x").is_err());
        assert!(parse_public("", "x").is_err());
        let small = RsaPrivateKey::new(&mut rand_core::OsRng, 1024)
            .unwrap()
            .to_public_key();
        let pem = small.to_public_key_pem(LineEnding::LF).unwrap();
        assert!(matches!(
            parse_public(&pem, "x"),
            Err(KeyError::TooSmall(1024))
        ));
    }
}
