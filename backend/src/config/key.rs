//! `--key` and `--migration-key`, with swtpm 0.7.1's syntax and defaults:
//!
//! ```text
//! file=PATH|fd=N[,format=hex|binary][,mode=aes-128-cbc|aes-256-cbc][,remove[=true|false]]
//! pwdfile=PATH|pwdfd=N[,kdf=pbkdf2|sha512][,mode=...][,remove[=true|false]]
//! ```
//!
//! `mode` defaults to aes-128-cbc (alias aes-cbc), `format` to hex, `kdf`
//! to pbkdf2, as in swtpm; `remove` deletes the key or passphrase file once
//! read. What the key bytes mean is [`crate::storage::swtpm_key`]'s.
//! Exactly one of file=, fd=, pwdfile=, pwdfd= is taken (swtpm silently
//! picks one when several are given; vtpmd refuses).

use super::{invalid, parse_bool, parse_fd, parse_kv, ConfigError};
use crate::storage::swtpm_key::{Cipher, Kdf, KeyFormat};
use std::path::PathBuf;

/// Where the key or passphrase is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    /// An inherited descriptor, read to its end and closed.
    Fd(i32),
}

/// What the bytes read are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMaterial {
    Key(KeyFormat),
    Passphrase(Kdf),
}

/// A validated `--key` / `--migration-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub source: KeySource,
    pub material: KeyMaterial,
    /// `mode=` as given; `None`: swtpm's default (aes-128-cbc), except
    /// that a key file holding a 256-bit key is taken as AES-256.
    pub cipher: Option<Cipher>,
    /// Delete the file once read (`remove`).
    pub remove: bool,
}

impl KeySpec {
    /// The cipher a passphrase-derived key is for.
    pub fn passphrase_cipher(&self) -> Cipher {
        self.cipher.unwrap_or(Cipher::Aes128Cbc)
    }
}

/// Parses the value of `opt` (`--key` or `--migration-key`).
pub fn parse_key(opt: &'static str, s: &str) -> Result<KeySpec, ConfigError> {
    let kv = parse_kv(
        opt,
        s,
        &[
            "file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove",
        ],
    )?;
    let given: Vec<&str> = ["file", "fd", "pwdfile", "pwdfd"]
        .into_iter()
        .filter(|k| kv.contains_key(*k))
        .collect();
    let path = |k: &str| -> Result<PathBuf, ConfigError> {
        let p = &kv[k];
        if p.is_empty() {
            return Err(invalid(opt, format!("{k}= needs a path")));
        }
        Ok(PathBuf::from(p))
    };
    let (source, passphrase) =
        match given[..] {
            ["file"] => (KeySource::File(path("file")?), false),
            ["fd"] => (KeySource::Fd(parse_fd(opt, "fd", &kv["fd"])?), false),
            ["pwdfile"] => (KeySource::File(path("pwdfile")?), true),
            ["pwdfd"] => (KeySource::Fd(parse_fd(opt, "pwdfd", &kv["pwdfd"])?), true),
            [] => return Err(invalid(
                opt,
                "give the key with file=PATH or fd=N, or a passphrase with pwdfile=PATH or pwdfd=N",
            )),
            _ => {
                return Err(invalid(
                    opt,
                    format!(
                        "give only one of file=, fd=, pwdfile=, pwdfd= (got {})",
                        given.join(", ")
                    ),
                ))
            }
        };
    let format = match kv.get("format").map(String::as_str) {
        None | Some("hex") => KeyFormat::Hex,
        Some("binary") => KeyFormat::Binary,
        Some(f) => return Err(invalid(opt, format!("format '{f}': use hex or binary"))),
    };
    let cipher = kv
        .get("mode")
        .map(|m| {
            Cipher::parse(m).ok_or_else(|| {
                invalid(
                    opt,
                    format!("mode '{m}': use aes-128-cbc (or aes-cbc) or aes-256-cbc"),
                )
            })
        })
        .transpose()?;
    let kdf = match kv.get("kdf").map(String::as_str) {
        None | Some("pbkdf2") => Kdf::Pbkdf2,
        Some("sha512") => Kdf::Sha512,
        Some(k) => return Err(invalid(opt, format!("kdf '{k}': use pbkdf2 or sha512"))),
    };
    let remove = kv
        .get("remove")
        .map(|v| parse_bool(opt, "remove", v))
        .transpose()?
        .unwrap_or(false);
    if remove && matches!(source, KeySource::Fd(_)) {
        return Err(invalid(
            opt,
            "remove applies to file= and pwdfile=, not to a descriptor",
        ));
    }
    Ok(KeySpec {
        source,
        material: if passphrase {
            KeyMaterial::Passphrase(kdf)
        } else {
            KeyMaterial::Key(format)
        },
        cipher,
        remove,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_and_swtpm_forms() {
        let k = parse_key("--key", "pwdfd=12,mode=aes-256-cbc").unwrap();
        assert_eq!(k.source, KeySource::Fd(12));
        assert_eq!(k.material, KeyMaterial::Passphrase(Kdf::Pbkdf2));
        assert_eq!(k.cipher, Some(Cipher::Aes256Cbc));
        let k = parse_key("--key", "pwdfile=/p,kdf=sha512").unwrap();
        assert_eq!(k.material, KeyMaterial::Passphrase(Kdf::Sha512));
        assert_eq!(
            k.passphrase_cipher(),
            Cipher::Aes128Cbc,
            "swtpm's default mode"
        );
        let k = parse_key("--key", "file=/k,format=binary,mode=aes-cbc,remove").unwrap();
        assert_eq!(k.material, KeyMaterial::Key(KeyFormat::Binary));
        assert_eq!(k.cipher, Some(Cipher::Aes128Cbc));
        assert!(k.remove);
        let k = parse_key("--migration-key", "fd=3,remove=false").unwrap();
        assert_eq!(k.material, KeyMaterial::Key(KeyFormat::Hex));
        assert!(!k.remove);
        assert!(parse_key("--key", "file=/k,remove=TRUE").unwrap().remove);
    }

    #[test]
    fn refusals_name_the_fix() {
        let cases = [
            ("", "give the key with file=PATH"),
            ("mode=aes-256-cbc", "give the key with file=PATH"),
            ("file=/a,pwdfd=3", "give only one of"),
            ("file=", "file= needs a path"),
            ("fd=-1", "fd=-1"),
            ("fd=x", "fd=x"),
            ("fd=99999999999", "fd=99999999999"),
            ("pwdfd=3,remove", "not to a descriptor"),
            ("file=/k,mode=aes-192-cbc", "aes-192-cbc"),
            ("file=/k,format=base64", "base64"),
            ("file=/k,kdf=scrypt", "scrypt"),
            ("file=/k,remove=maybe", "remove=maybe"),
            ("file=/k,cipher=x", "unknown parameter 'cipher'"),
            ("file=/k,file=/j", "given twice"),
        ];
        for (arg, want) in cases {
            let e = parse_key("--key", arg).unwrap_err().to_string();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(e.starts_with("--key"), "{arg}: {e}");
        }
        let huge = format!("file={}", "a".repeat(100_000));
        assert!(
            parse_key("--key", &huge).is_ok(),
            "a long path is the OS's to refuse"
        );
        assert!(parse_key("--key", &"file=/k,".repeat(1000)).is_err());
    }
}
