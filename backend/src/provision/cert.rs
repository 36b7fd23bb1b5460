//! Certificates: the CA key that signs ([`CaKey`]: RSA with SHA-256, or
//! ECDSA P-256/P-384), and the certificates vtpm-setup issues.
//!
//! EK and platform certificates follow the TCG EK Credential Profile the
//! way swtpm_cert 0.7.1 fills it in:
//!
//! * subject `CN=<vmid>` (`CN=unknown` without `--vmid`), issuer the local
//!   CA, validity from now to 9999-12-31 23:59:59 (no expiry), version 3;
//! * EK: subjectAltName (critical) = directoryName with tcg-at-tpmManufacturer
//!   (2.23.133.2.1), tcg-at-tpmModel (.2), tcg-at-tpmVersion (.3); subject
//!   directory attributes with tcg-at-tpmSpecification (2.23.133.2.16:
//!   family, level, revision); extended key usage tcg-kp-EKCertificate
//!   (2.23.133.8.1);
//! * platform: subjectAltName (critical) = directoryName with
//!   tcg-at-platformManufacturerStr (2.23.133.5.1.1), platformModel (.4),
//!   platformVersion (.5); extended key usage tcg-kp-PlatformCertificate
//!   (2.23.133.8.2); its public key is the RSA EK's, as swtpm's;
//! * basicConstraints CA:FALSE (critical), authorityKeyIdentifier = the
//!   issuer's subjectKeyIdentifier, keyUsage (critical) keyEncipherment
//!   for an RSA key, keyAgreement for an ECC key, plus digitalSignature
//!   when the EK may sign.

use der::asn1::{Any, BitString, ObjectIdentifier as Oid, OctetString, SetOfVec, Utf8StringRef};
use der::{Decode, Encode, Tag};
use rsa::signature::{Keypair, SignatureEncoding, Signer};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use spki::{DynSignatureAlgorithmIdentifier, EncodePublicKey, SubjectPublicKeyInfoOwned};
use thiserror::Error;
use x509_cert::attr::{Attribute, AttributeTypeAndValue};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate, Version};

const OID_CN: Oid = Oid::new_unwrap("2.5.4.3");
const OID_SAN: Oid = Oid::new_unwrap("2.5.29.17");
const OID_SDA: Oid = Oid::new_unwrap("2.5.29.9");
const OID_BC: Oid = Oid::new_unwrap("2.5.29.19");
const OID_KU: Oid = Oid::new_unwrap("2.5.29.15");
const OID_EKU: Oid = Oid::new_unwrap("2.5.29.37");
const OID_SKI: Oid = Oid::new_unwrap("2.5.29.14");
const OID_AKI: Oid = Oid::new_unwrap("2.5.29.35");
const TPM_MANUFACTURER: Oid = Oid::new_unwrap("2.23.133.2.1");
const TPM_MODEL: Oid = Oid::new_unwrap("2.23.133.2.2");
const TPM_VERSION: Oid = Oid::new_unwrap("2.23.133.2.3");
const TPM_SPECIFICATION: Oid = Oid::new_unwrap("2.23.133.2.16");
const PLATFORM_MANUFACTURER: Oid = Oid::new_unwrap("2.23.133.5.1.1");
const PLATFORM_MODEL: Oid = Oid::new_unwrap("2.23.133.5.1.4");
const PLATFORM_VERSION: Oid = Oid::new_unwrap("2.23.133.5.1.5");
pub const KP_EK_CERTIFICATE: Oid = Oid::new_unwrap("2.23.133.8.1");
pub const KP_PLATFORM_CERTIFICATE: Oid = Oid::new_unwrap("2.23.133.8.2");

#[derive(Debug, Error)]
pub enum CertError {
    #[error("encoding the certificate: {0}")]
    Der(#[from] der::Error),
    #[error("the subject public key: {0}")]
    Spki(#[from] spki::Error),
    #[error("signing the certificate: {0}")]
    Sign(#[from] rsa::signature::Error),
    #[error("the issuer certificate has no subjectKeyIdentifier; an EK certificate must name its issuer's key")]
    NoIssuerKeyId,
}

/// A CA signing key.
pub enum CaKey {
    Rsa(Box<rsa::pkcs1v15::SigningKey<Sha256>>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaKey::Rsa(_) => "CaKey::Rsa(<redacted>)",
            CaKey::P256(_) => "CaKey::P256(<redacted>)",
            CaKey::P384(_) => "CaKey::P384(<redacted>)",
        })
    }
}

impl CaKey {
    /// The public key as a SubjectPublicKeyInfo.
    pub fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, CertError> {
        let der = match self {
            CaKey::Rsa(k) => k.verifying_key().to_public_key_der()?,
            CaKey::P256(k) => k.verifying_key().to_public_key_der()?,
            CaKey::P384(k) => k.verifying_key().to_public_key_der()?,
        };
        Ok(SubjectPublicKeyInfoOwned::from_der(der.as_bytes())?)
    }

    fn algorithm(&self) -> Result<spki::AlgorithmIdentifierOwned, CertError> {
        Ok(match self {
            CaKey::Rsa(k) => k.signature_algorithm_identifier()?,
            CaKey::P256(k) => k.signature_algorithm_identifier()?,
            CaKey::P384(k) => k.signature_algorithm_identifier()?,
        })
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CertError> {
        Ok(match self {
            CaKey::Rsa(k) => k.try_sign(msg)?.to_vec(),
            CaKey::P256(k) => Signer::<p256::ecdsa::DerSignature>::try_sign(k, msg)?.to_vec(),
            CaKey::P384(k) => Signer::<p384::ecdsa::DerSignature>::try_sign(k, msg)?.to_vec(),
        })
    }
}

/// A name with one common name.
pub fn common_name(cn: &str) -> Result<Name, CertError> {
    name_of(&[(OID_CN, cn)])
}

/// A name with one RDN per attribute, each a UTF8String.
fn name_of(attrs: &[(Oid, &str)]) -> Result<Name, CertError> {
    let mut rdns = Vec::new();
    for (oid, value) in attrs {
        let atv = AttributeTypeAndValue {
            oid: *oid,
            value: Any::from(Utf8StringRef::new(value)?),
        };
        rdns.push(RelativeDistinguishedName(SetOfVec::try_from(vec![atv])?));
    }
    Ok(RdnSequence(rdns))
}

fn ext<T: Encode>(oid: Oid, critical: bool, value: &T) -> Result<Extension, CertError> {
    Ok(Extension {
        extn_id: oid,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// subjectKeyIdentifier per RFC 5280 method 1: SHA-1 of the key bits.
pub fn key_id(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    Sha1::digest(spki.subject_public_key.raw_bytes()).to_vec()
}

/// What the TPM says about itself (CMD_GET_INFO / TPMLIB_GetInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmInfo {
    pub manufacturer: String,
    pub model: String,
    pub version: String,
    pub spec_family: String,
    pub spec_level: u32,
    pub spec_revision: u32,
}

/// The platform the TPM is part of (swtpm-localca.options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformInfo {
    pub manufacturer: String,
    pub model: String,
    pub version: String,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    Ek {
        tpm: &'a TpmInfo,
        ecc: bool,
        sign: bool,
        decrypt: bool,
    },
    Platform {
        platform: &'a PlatformInfo,
        ecc: bool,
    },
}

/// The issuer: the CA's key and certificate.
#[derive(Debug)]
pub struct Issuer {
    pub key: CaKey,
    pub cert: Certificate,
}

impl Issuer {
    fn key_identifier(&self) -> Result<Vec<u8>, CertError> {
        match self.cert.tbs_certificate.get::<SubjectKeyIdentifier>() {
            Ok(Some((_, ski))) => Ok(ski.0.as_bytes().to_vec()),
            _ => Err(CertError::NoIssuerKeyId),
        }
    }

    /// Issues an EK or platform certificate for `spki_der`; returns DER.
    pub fn issue(
        &self,
        serial: u64,
        subject_cn: &str,
        spki_der: &[u8],
        purpose: Purpose<'_>,
    ) -> Result<Vec<u8>, CertError> {
        let spki = SubjectPublicKeyInfoOwned::from_der(spki_der)?;
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(self.key_identifier()?)?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        let (san, eku, ecc, mut usage) = match purpose {
            Purpose::Ek {
                tpm,
                ecc,
                sign,
                decrypt,
            } => {
                let san = name_of(&[
                    (TPM_MANUFACTURER, &tpm.manufacturer),
                    (TPM_MODEL, &tpm.model),
                    (TPM_VERSION, &tpm.version),
                ])?;
                let usage = if sign {
                    KeyUsages::DigitalSignature.into()
                } else {
                    der::flagset::FlagSet::default()
                };
                let usage = if decrypt || !sign {
                    usage | enc_usage(ecc)
                } else {
                    usage
                };
                (san, KP_EK_CERTIFICATE, ecc, usage)
            }
            Purpose::Platform { platform, ecc } => {
                let san = name_of(&[
                    (PLATFORM_MANUFACTURER, &platform.manufacturer),
                    (PLATFORM_MODEL, &platform.model),
                    (PLATFORM_VERSION, &platform.version),
                ])?;
                (san, KP_PLATFORM_CERTIFICATE, ecc, enc_usage(ecc).into())
            }
        };
        if usage.is_empty() {
            usage = enc_usage(ecc).into();
        }
        let mut exts = vec![
            ext(
                OID_SAN,
                true,
                &SubjectAltName(vec![GeneralName::DirectoryName(san)]),
            )?,
            ext(
                OID_BC,
                true,
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
            )?,
        ];
        if let Purpose::Ek { tpm, .. } = purpose {
            exts.push(ext(OID_SDA, false, &tpm_specification(tpm)?)?);
        }
        exts.push(ext(OID_AKI, false, &aki)?);
        exts.push(ext(OID_KU, true, &KeyUsage(usage))?);
        exts.push(ext(OID_EKU, false, &ExtendedKeyUsage(vec![eku]))?);
        self.sign(serial, common_name(subject_cn)?, spki, Time::INFINITY, exts)
    }

    /// Signs a certificate for `subject` with `extensions`; returns DER.
    pub fn sign(
        &self,
        serial: u64,
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        not_after: Time,
        extensions: Vec<Extension>,
    ) -> Result<Vec<u8>, CertError> {
        sign_tbs(
            &self.key,
            serial,
            self.cert.tbs_certificate.subject.clone(),
            subject,
            spki,
            not_after,
            extensions,
        )
    }
}

fn enc_usage(ecc: bool) -> KeyUsages {
    if ecc {
        KeyUsages::KeyAgreement
    } else {
        KeyUsages::KeyEncipherment
    }
}

/// The subject directory attributes holding tcg-at-tpmSpecification.
fn tpm_specification(tpm: &TpmInfo) -> Result<Vec<Attribute>, CertError> {
    let mut inner = Utf8StringRef::new(&tpm.spec_family)?.to_der()?;
    inner.extend(tpm.spec_level.to_der()?);
    inner.extend(tpm.spec_revision.to_der()?);
    let spec = Any::new(Tag::Sequence, inner)?;
    Ok(vec![Attribute {
        oid: TPM_SPECIFICATION,
        values: SetOfVec::try_from(vec![spec])?,
    }])
}

/// The extensions of a CA certificate for `spki`, issued by `issuer_key_id`
/// (none for a self-signed root).
pub fn ca_extensions(
    spki: &SubjectPublicKeyInfoOwned,
    issuer_key_id: Option<Vec<u8>>,
) -> Result<Vec<Extension>, CertError> {
    let mut exts = vec![
        ext(
            OID_BC,
            true,
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
        )?,
        ext(
            OID_KU,
            true,
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
        )?,
        ext(
            OID_SKI,
            false,
            &SubjectKeyIdentifier(OctetString::new(key_id(spki))?),
        )?,
    ];
    if let Some(id) = issuer_key_id {
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(id)?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        exts.push(ext(OID_AKI, false, &aki)?);
    }
    Ok(exts)
}

/// Builds and signs a v3 certificate valid from now until `not_after`.
pub fn sign_tbs(
    key: &CaKey,
    serial: u64,
    issuer: Name,
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
    not_after: Time,
    extensions: Vec<Extension>,
) -> Result<Vec<u8>, CertError> {
    let algorithm = key.algorithm()?;
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::from(serial),
        signature: algorithm.clone(),
        issuer,
        validity: Validity {
            not_before: Time::try_from(std::time::SystemTime::now())?,
            not_after,
        },
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    let signature = key.sign(&tbs.to_der()?)?;
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(cert.to_der()?)
}
