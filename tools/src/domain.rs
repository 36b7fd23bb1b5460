//! What `vtpmctl migrate` needs from a libvirt domain's XML (`virsh
//! dumpxml`): its UUID and its TPM's backend. libvirt writes that XML
//! itself (one element per line, quoted attributes), so a small scanner
//! is enough; anything it cannot read is an error naming the element.

use std::path::PathBuf;
use thiserror::Error;

/// libvirt's default swtpm storage directory (qemu.conf `swtpm_storage_dir`
/// unset): a domain's TPM 2.0 state is in `<this>/<uuid>/tpm2`.
pub const SWTPM_STORAGE_DIR: &str = "/var/lib/libvirt/swtpm";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("the domain XML has no <uuid>; is it `virsh dumpxml` output?")]
    NoUuid,
    #[error("<uuid>{0}</uuid> is not a UUID")]
    BadUuid(String),
    #[error(
        "the domain has no <tpm> device: nothing for vtpmctl to move; use virsh migrate directly"
    )]
    NoTpm,
    #[error("the domain has {0} <tpm> devices; vtpmctl migrate handles one")]
    ManyTpms(usize),
    #[error("the domain's TPM has backend type '{0}'; vtpmctl migrate handles 'emulator' (libvirt runs vtpmd) and 'external' (with --admin and --remote-state-dir)")]
    Backend(String),
    #[error("the domain's TPM is version {0}; vtpmd is a TPM 2.0 (version='2.0')")]
    Version(String),
}

/// How the domain's TPM is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// libvirt runs the TPM process (swtpm, or vtpmd under that name).
    Emulator,
    /// A TPM process libvirt does not manage, at a unix socket.
    External,
}

/// The facts of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub uuid: String,
    pub backend: Backend,
}

impl Domain {
    /// Reads `xml` (`virsh dumpxml DOMAIN`).
    pub fn parse(xml: &str) -> Result<Domain, DomainError> {
        let uuid = between(xml, "<uuid>", "</uuid>")
            .ok_or(DomainError::NoUuid)?
            .trim()
            .to_string();
        if !is_uuid(&uuid) {
            return Err(DomainError::BadUuid(uuid));
        }
        let tpms: Vec<&str> = xml.split("<tpm ").skip(1).collect();
        let tpm = match tpms.as_slice() {
            [] => return Err(DomainError::NoTpm),
            [one] => one.split("</tpm>").next().unwrap_or(one),
            many => return Err(DomainError::ManyTpms(many.len())),
        };
        let backend = tpm
            .split("<backend")
            .nth(1)
            .ok_or(DomainError::NoTpm)?
            .split('>')
            .next()
            .unwrap_or_default();
        let kind = attr(backend, "type").unwrap_or_default();
        let backend = match kind.as_str() {
            "emulator" => Backend::Emulator,
            "external" => Backend::External,
            other => return Err(DomainError::Backend(other.into())),
        };
        if backend == Backend::Emulator {
            match attr(tpm.split("<backend").nth(1).unwrap_or_default(), "version") {
                None => {}
                Some(v) if v == "2.0" => {}
                Some(v) => return Err(DomainError::Version(v)),
            }
        }
        Ok(Domain { uuid, backend })
    }

    /// Where libvirt keeps an emulator TPM's state on a host with the
    /// default configuration.
    pub fn emulator_state_dir(&self) -> PathBuf {
        PathBuf::from(SWTPM_STORAGE_DIR)
            .join(&self.uuid)
            .join("tpm2")
    }
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = s.find(open)? + open.len();
    let len = s[start..].find(close)?;
    Some(&s[start..start + len])
}

/// The value of attribute `name` in a start tag's text.
fn attr(tag: &str, name: &str) -> Option<String> {
    for quote in ['\'', '"'] {
        let key = format!(" {name}={quote}");
        if let Some(i) = tag.find(&key) {
            let rest = &tag[i + key.len()..];
            return rest.find(quote).map(|j| rest[..j].to_string());
        }
    }
    None
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMULATOR: &str = "<domain type='qemu' id='1'>
  <name>vm</name>
  <uuid>5e3a9c1e-7d7e-4a8b-9c71-0b6f5a2d4e11</uuid>
  <devices>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'>
        <active_pcr_banks><sha256/></active_pcr_banks>
      </backend>
      <alias name='tpm0'/>
    </tpm>
  </devices>
</domain>";

    #[test]
    fn emulator_domain() {
        let d = Domain::parse(EMULATOR).unwrap();
        assert_eq!(d.backend, Backend::Emulator);
        assert_eq!(
            d.emulator_state_dir(),
            PathBuf::from("/var/lib/libvirt/swtpm/5e3a9c1e-7d7e-4a8b-9c71-0b6f5a2d4e11/tpm2")
        );
    }

    #[test]
    fn external_domain_and_refusals() {
        let ext = EMULATOR.replace(
            "<backend type='emulator' version='2.0'>",
            "<backend type=\"external\"><source type='unix' mode='connect' path='/run/x'/>",
        );
        assert_eq!(Domain::parse(&ext).unwrap().backend, Backend::External);
        let cases = [
            (EMULATOR.replace("<uuid>", "<uid>"), DomainError::NoUuid),
            (
                EMULATOR.replace("5e3a9c1e-", "5e3a9c1e_"),
                DomainError::BadUuid("5e3a9c1e_7d7e-4a8b-9c71-0b6f5a2d4e11".into()),
            ),
            (EMULATOR.replace("<tpm ", "<tpmx "), DomainError::NoTpm),
            (
                EMULATOR.replace("</tpm>", "</tpm><tpm model='tpm-tis'></tpm>"),
                DomainError::ManyTpms(2),
            ),
            (
                EMULATOR.replace("type='emulator'", "type='passthrough'"),
                DomainError::Backend("passthrough".into()),
            ),
            (
                EMULATOR.replace("version='2.0'", "version='1.2'"),
                DomainError::Version("1.2".into()),
            ),
            (String::new(), DomainError::NoUuid),
            ("<uuid>".repeat(1000), DomainError::NoUuid),
        ];
        for (xml, want) in cases {
            assert_eq!(Domain::parse(&xml).unwrap_err(), want);
        }
    }
}
