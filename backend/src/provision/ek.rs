//! Endorsement keys: the TCG EK Credential Profile templates (TPM 2.0,
//! version 2.5), their persistent handles and certificate NV indices, and
//! the public key read back from a created key.
//!
//! | key | template | handle | cert index | template index |
//! |---|---|---|---|---|
//! | RSA 2048 | L-1 (SHA-256, AES-128, policy A, 256 zero bytes unique) | 0x81010001 | 0x01C00002 | 0x01C00004 |
//! | ECC NIST P-256 | L-2 (SHA-256, AES-128, policy A, 32+32 zero bytes) | 0x81010002 | 0x01C0000A | 0x01C0000C |
//! | RSA 3072 | H-3 (SHA-384, AES-256, policy B, empty unique) | 0x8101001C | 0x01C0001C | 0x01C0001D |
//! | ECC NIST P-384 | H-2 (SHA-384, AES-256, policy B, empty unique) | 0x81010016 | 0x01C00016 | 0x01C00017 |
//!
//! RSA 2048 and ECC P-256 are the profile's default ("low range")
//! templates, which `tpm2_createek` and `tpm2_getekcertificate` use.
//! swtpm_setup 0.7.1 makes the same RSA 2048 EK but its ECC EK is the
//! high-range P-384 key; `ecc_ek_curves = secp384r1` in swtpm_setup.conf
//! makes that one (or both, `secp256r1,secp384r1`).

use rsa::pkcs8::EncodePublicKey;
use thiserror::Error;
use vtpm_common::reader::{ByteReader, Truncated};

const ALG_RSA: u16 = 0x0001;
const ALG_ECC: u16 = 0x0023;
const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;
const ALG_NULL: u16 = 0x0010;
const ALG_SHA256: u16 = 0x000b;
const ALG_SHA384: u16 = 0x000c;
const CURVE_P256: u16 = 0x0003;
const CURVE_P384: u16 = 0x0004;

// TPMA_OBJECT bits.
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const USER_WITH_AUTH: u32 = 1 << 6;
const ADMIN_WITH_POLICY: u32 = 1 << 7;
const NO_DA: u32 = 1 << 10;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

/// PolicyA_SHA256 (TPM2_PolicySecret(TPM_RH_ENDORSEMENT)).
const POLICY_A_SHA256: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// PolicyB_SHA384 (PolicyOR of PolicyA and the NV-auth policy).
const POLICY_B_SHA384: [u8; 48] = [
    0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc, 0xf5, 0xfd, 0x3a, 0x1a,
    0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4, 0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca,
    0xcb, 0x47, 0xba, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
];

/// The storage primary key's handle (`--create-spk`).
pub const SPK_HANDLE: u32 = 0x8100_0001;

#[derive(Debug, Error)]
pub enum EkError {
    #[error("the TPM returned a malformed public area: {0}")]
    Malformed(#[from] Truncated),
    #[error("the TPM returned a public area of type {0:#06x}, expected RSA or ECC")]
    UnknownType(u16),
    #[error("the TPM returned an unusable {what} public key: {why}")]
    BadKey { what: &'static str, why: String },
}

/// Which endorsement key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkKind {
    Rsa2048,
    Rsa3072,
    EccP256,
    EccP384,
}

/// How the EK may be used (`--allow-signing`, `--decryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EkUse {
    pub sign: bool,
    pub decrypt: bool,
}

impl EkUse {
    /// The profile's EK: a restricted decryption key.
    pub const STANDARD: EkUse = EkUse {
        sign: false,
        decrypt: true,
    };
    pub fn is_standard(&self) -> bool {
        !self.sign
    }
}

impl EkKind {
    pub fn handle(self) -> u32 {
        match self {
            EkKind::Rsa2048 => 0x8101_0001,
            EkKind::EccP256 => 0x8101_0002,
            EkKind::EccP384 => 0x8101_0016,
            EkKind::Rsa3072 => 0x8101_001c,
        }
    }

    pub fn cert_index(self) -> u32 {
        match self {
            EkKind::Rsa2048 => 0x01c0_0002,
            EkKind::EccP256 => 0x01c0_000a,
            EkKind::EccP384 => 0x01c0_0016,
            EkKind::Rsa3072 => 0x01c0_001c,
        }
    }

    /// Where a non-standard template is published (`--allow-signing`).
    pub fn template_index(self) -> u32 {
        match self {
            EkKind::Rsa2048 => 0x01c0_0004,
            EkKind::EccP256 => 0x01c0_000c,
            EkKind::EccP384 => 0x01c0_0017,
            EkKind::Rsa3072 => 0x01c0_001d,
        }
    }

    /// The name swtpm_setup gives the key in file names and logs.
    pub fn describe(self) -> &'static str {
        match self {
            EkKind::Rsa2048 => "rsa2048",
            EkKind::Rsa3072 => "rsa3072",
            EkKind::EccP256 => "secp256r1",
            EkKind::EccP384 => "secp384r1",
        }
    }

    /// The ECC EK named `secp256r1` or `secp384r1`.
    pub fn ecc_by_name(name: &str) -> Option<EkKind> {
        [EkKind::EccP256, EkKind::EccP384]
            .into_iter()
            .find(|k| k.describe() == name)
    }

    pub fn is_ecc(self) -> bool {
        matches!(self, EkKind::EccP256 | EkKind::EccP384)
    }

    /// The TPMT_PUBLIC template for this key.
    pub fn template(self, usage: EkUse) -> Vec<u8> {
        let high = matches!(self, EkKind::Rsa3072 | EkKind::EccP384);
        let mut attrs = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY;
        if high {
            attrs |= USER_WITH_AUTH;
        }
        if usage.is_standard() {
            attrs |= RESTRICTED | DECRYPT;
        } else {
            attrs |= SIGN;
            if usage.decrypt {
                attrs |= DECRYPT;
            }
        }
        let (name_alg, policy, sym_bits): (u16, &[u8], u16) = if high {
            (ALG_SHA384, &POLICY_B_SHA384, 256)
        } else {
            (ALG_SHA256, &POLICY_A_SHA256, 128)
        };
        let alg = if self.is_ecc() { ALG_ECC } else { ALG_RSA };
        let mut t = Template::new(alg, name_alg, attrs, policy);
        if usage.is_standard() {
            t.u16(ALG_AES).u16(sym_bits).u16(ALG_CFB);
        } else {
            t.u16(ALG_NULL);
        }
        t.u16(ALG_NULL); // scheme
        match self {
            EkKind::Rsa2048 => {
                t.u16(2048).u32(0).zeros(256);
            }
            EkKind::Rsa3072 => {
                t.u16(3072).u32(0).zeros(0);
            }
            EkKind::EccP256 => {
                t.u16(CURVE_P256).u16(ALG_NULL).zeros(32).zeros(32);
            }
            EkKind::EccP384 => {
                t.u16(CURVE_P384).u16(ALG_NULL).zeros(0).zeros(0);
            }
        }
        t.0
    }
}

/// The storage primary key template (`--create-spk`): RSA of the EK's size
/// or, with `--ecc`, ECC NIST P-384, as swtpm_setup makes it.
pub fn spk_template(ecc: bool, rsa_bits: u16) -> Vec<u8> {
    let attrs = FIXED_TPM
        | FIXED_PARENT
        | SENSITIVE_DATA_ORIGIN
        | USER_WITH_AUTH
        | NO_DA
        | RESTRICTED
        | DECRYPT;
    if ecc {
        let mut t = Template::new(ALG_ECC, ALG_SHA384, attrs, &[]);
        t.u16(ALG_AES).u16(256).u16(ALG_CFB).u16(ALG_NULL);
        t.u16(CURVE_P384).u16(ALG_NULL).zeros(48).zeros(48);
        t.0
    } else {
        let sym = if rsa_bits >= 3072 { 256 } else { 128 };
        let mut t = Template::new(ALG_RSA, ALG_SHA256, attrs, &[]);
        t.u16(ALG_AES).u16(sym).u16(ALG_CFB).u16(ALG_NULL);
        t.u16(rsa_bits).u32(0).zeros(usize::from(rsa_bits / 8));
        t.0
    }
}

struct Template(Vec<u8>);

impl Template {
    fn new(alg: u16, name_alg: u16, attrs: u32, policy: &[u8]) -> Template {
        let mut t = Template(Vec::with_capacity(400));
        t.u16(alg).u16(name_alg).u32(attrs).u16(policy.len() as u16);
        t.0.extend_from_slice(policy);
        t
    }
    fn u16(&mut self, v: u16) -> &mut Template {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Template {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A TPM2B of `n` zero bytes.
    fn zeros(&mut self, n: usize) -> &mut Template {
        self.u16(n as u16);
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// The public part of a key the TPM created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa { modulus: Vec<u8>, exponent: u32 },
    Ecc { curve: u16, x: Vec<u8>, y: Vec<u8> },
}

impl PublicKey {
    /// Parses a TPMT_PUBLIC.
    pub fn parse(public: &[u8]) -> Result<PublicKey, EkError> {
        let mut r = ByteReader::new(public);
        let alg = r.u16("type")?;
        r.u16("nameAlg")?;
        r.u32("objectAttributes")?;
        r.bytes_u16("authPolicy")?;
        if r.u16("symmetric")? != ALG_NULL {
            r.u16("symmetric.keyBits")?;
            r.u16("symmetric.mode")?;
        }
        if r.u16("scheme")? != ALG_NULL {
            r.u16("scheme.hashAlg")?;
        }
        match alg {
            ALG_RSA => {
                r.u16("keyBits")?;
                let exponent = r.u32("exponent")?;
                let modulus = r.bytes_u16("unique.rsa")?.to_vec();
                Ok(PublicKey::Rsa { modulus, exponent })
            }
            ALG_ECC => {
                let curve = r.u16("curveID")?;
                if r.u16("kdf")? != ALG_NULL {
                    r.u16("kdf.hashAlg")?;
                }
                let x = r.bytes_u16("unique.x")?.to_vec();
                let y = r.bytes_u16("unique.y")?.to_vec();
                Ok(PublicKey::Ecc { curve, x, y })
            }
            other => Err(EkError::UnknownType(other)),
        }
    }

    /// The key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>, EkError> {
        let bad = |what: &'static str| {
            move |e: &dyn std::fmt::Display| EkError::BadKey {
                what,
                why: e.to_string(),
            }
        };
        match self {
            PublicKey::Rsa { modulus, exponent } => {
                let e = if *exponent == 0 { 65537 } else { *exponent };
                let key = rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(modulus),
                    rsa::BigUint::from(e),
                )
                .map_err(|e| bad("RSA")(&e))?;
                Ok(key
                    .to_public_key_der()
                    .map_err(|e| bad("RSA")(&e))?
                    .into_vec())
            }
            PublicKey::Ecc { curve, x, y } => {
                let size = match *curve {
                    CURVE_P256 => 32,
                    CURVE_P384 => 48,
                    c => {
                        return Err(EkError::BadKey {
                            what: "ECC",
                            why: format!("curve {c:#06x} is not supported"),
                        })
                    }
                };
                if x.len() > size || y.len() > size {
                    return Err(EkError::BadKey {
                        what: "ECC",
                        why: "coordinate longer than the curve".into(),
                    });
                }
                let mut point = vec![0x04];
                for c in [x, y] {
                    point.resize(point.len() + size - c.len(), 0);
                    point.extend_from_slice(c);
                }
                let der = if size == 32 {
                    p256::PublicKey::from_sec1_bytes(&point)
                        .map_err(|e| bad("ECC P-256")(&e))?
                        .to_public_key_der()
                } else {
                    p384::PublicKey::from_sec1_bytes(&point)
                        .map_err(|e| bad("ECC P-384")(&e))?
                        .to_public_key_der()
                };
                Ok(der.map_err(|e| bad("ECC")(&e))?.into_vec())
            }
        }
    }

    /// The key's parameters as swtpm_setup prints them in its log: the RSA
    /// modulus, or `x=..,y=..,id=curve`.
    pub fn describe(&self) -> String {
        use vtpm_common::hex::encode;
        match self {
            PublicKey::Rsa { modulus, .. } => encode(modulus),
            PublicKey::Ecc { curve, x, y } => {
                let id = if *curve == CURVE_P384 {
                    "secp384r1"
                } else {
                    "secp256r1"
                };
                format!("x={},y={},id={id}", encode(x), encode(y))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_low_template_matches_the_profile() {
        let t = EkKind::Rsa2048.template(EkUse::STANDARD);
        // type, nameAlg, attributes 0x000300b2, 32-byte policy
        assert_eq!(&t[..10], &[0, 1, 0, 0x0b, 0, 3, 0, 0xb2, 0, 32]);
        assert_eq!(&t[10..42], &POLICY_A_SHA256);
        // AES-128-CFB, NULL scheme, 2048 bits, exponent 0, 256 zero bytes
        assert_eq!(
            &t[42..58],
            &[0, 6, 0, 128, 0, 0x43, 0, 0x10, 8, 0, 0, 0, 0, 0, 1, 0]
        );
        assert_eq!(t.len(), 58 + 256);
    }

    #[test]
    fn ecc_low_template_matches_the_profile() {
        let t = EkKind::EccP256.template(EkUse::STANDARD);
        assert_eq!(&t[..10], &[0, 0x23, 0, 0x0b, 0, 3, 0, 0xb2, 0, 32]);
        assert_eq!(&t[42..54], &[0, 6, 0, 128, 0, 0x43, 0, 0x10, 0, 3, 0, 0x10]);
        assert_eq!(t.len(), 54 + 2 + 32 + 2 + 32);
    }

    #[test]
    fn signing_ek_has_no_symmetric_and_sign_bit() {
        let t = EkKind::Rsa2048.template(EkUse {
            sign: true,
            decrypt: true,
        });
        assert_eq!(&t[4..8], &0x0006_00b2u32.to_be_bytes());
        assert_eq!(&t[42..44], &[0, 0x10]);
    }

    #[test]
    fn public_parse_round_trips_a_template_and_rejects_truncation() {
        for kind in [
            EkKind::Rsa2048,
            EkKind::Rsa3072,
            EkKind::EccP256,
            EkKind::EccP384,
        ] {
            let t = kind.template(EkUse::STANDARD);
            let p = PublicKey::parse(&t).unwrap();
            match (kind, p) {
                (EkKind::EccP384, PublicKey::Ecc { curve, x, .. }) => {
                    assert_eq!((curve, x.len()), (CURVE_P384, 0))
                }
                (EkKind::EccP256, PublicKey::Ecc { curve, x, .. }) => {
                    assert_eq!((curve, x.len()), (CURVE_P256, 32))
                }
                (EkKind::Rsa2048, PublicKey::Rsa { modulus, .. }) => assert_eq!(modulus.len(), 256),
                (EkKind::Rsa3072, PublicKey::Rsa { modulus, .. }) => assert!(modulus.is_empty()),
                (k, p) => panic!("{k:?} parsed as {p:?}"),
            }
            for n in 0..t.len() {
                assert!(PublicKey::parse(&t[..n]).is_err(), "{kind:?} cut at {n}");
            }
        }
        assert!(matches!(
            PublicKey::parse(&[0, 8, 0, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x10]),
            Err(EkError::UnknownType(8))
        ));
    }

    #[test]
    fn zero_key_is_refused_not_encoded() {
        let p = PublicKey::Ecc {
            curve: CURVE_P256,
            x: vec![0; 32],
            y: vec![0; 32],
        };
        assert!(
            p.spki_der().is_err(),
            "the all-zero point is not on the curve"
        );
    }
}
