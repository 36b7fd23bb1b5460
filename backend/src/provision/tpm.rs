//! The TPM 2.0 commands provisioning sends, built and answered in-process
//! against the libtpms engine: CreatePrimary, EvictControl, FlushContext,
//! NV_DefineSpace / NV_Write / NV_WriteLock, GetCapability(PCRS),
//! PCR_Allocate, Startup and Shutdown.
//!
//! Every command that needs authorisation uses the empty password session
//! (TPM_RS_PW): a freshly manufactured TPM has empty hierarchy auth values.
//! Responses are parsed with the bounds-checked reader; a short or
//! malformed response is an error naming the field, never a panic.

use crate::engine::tpm2::{self, Header, HEADER_LEN, ST_NO_SESSIONS, ST_SESSIONS};
use crate::engine::TpmEngine;
use thiserror::Error;
use vtpm_common::reader::{ByteReader, Truncated};

pub const RH_OWNER: u32 = 0x4000_0001;
pub const RH_ENDORSEMENT: u32 = 0x4000_000b;
pub const RH_PLATFORM: u32 = 0x4000_000c;
const RS_PW: u32 = 0x4000_0009;

const CC_EVICT_CONTROL: u32 = 0x120;
const CC_NV_DEFINE_SPACE: u32 = 0x12a;
const CC_PCR_ALLOCATE: u32 = 0x12b;
const CC_CREATE_PRIMARY: u32 = 0x131;
const CC_NV_WRITE: u32 = 0x137;
const CC_NV_WRITE_LOCK: u32 = 0x138;
const CC_FLUSH_CONTEXT: u32 = 0x165;
const CC_GET_CAPABILITY: u32 = 0x17a;

const CAP_PCRS: u32 = 5;

pub const ALG_SHA256: u16 = 0x000b;

/// The largest NV_Write chunk (libtpms's MAX_NV_BUFFER_SIZE).
pub const NV_WRITE_CHUNK: usize = 1024;

#[derive(Debug, Error)]
pub enum TpmError {
    #[error("{cmd}: libtpms failed to run the command (result {rc:#x})")]
    Engine { cmd: &'static str, rc: u32 },
    #[error("{cmd}: the TPM answered with error {rc:#x}")]
    Rc { cmd: &'static str, rc: u32 },
    #[error("{cmd}: malformed response: {source}")]
    Malformed {
        cmd: &'static str,
        source: Truncated,
    },
}

/// TPM 2.0 PCR banks by name, as swtpm_setup names them.
pub const BANKS: &[(&str, u16)] = &[
    ("sha1", 0x0004),
    ("sha256", 0x000b),
    ("sha384", 0x000c),
    ("sha512", 0x000d),
    ("sm3-256", 0x0012),
    ("sha3-256", 0x0027),
    ("sha3-384", 0x0028),
    ("sha3-512", 0x0029),
];

pub fn bank_name(alg: u16) -> Option<&'static str> {
    BANKS.iter().find(|(_, a)| *a == alg).map(|(n, _)| *n)
}

pub fn bank_alg(name: &str) -> Option<u16> {
    BANKS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// One PCR bank as TPM2_GetCapability(TPM_CAP_PCRS) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bank {
    pub alg: u16,
    /// The pcrSelect bitmap; all zero means the bank is allocated but off.
    pub select: Vec<u8>,
}

impl Bank {
    pub fn active(&self) -> bool {
        self.select.iter().any(|b| *b != 0)
    }
}

/// Sends commands to the engine and checks their responses.
pub struct Tpm<'e> {
    engine: &'e mut dyn TpmEngine,
}

impl std::fmt::Debug for Tpm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tpm")
    }
}

/// A command under construction: header patched with its size at the end.
struct Cmd(Vec<u8>);

impl Cmd {
    fn new(tag: u16, cc: u32) -> Cmd {
        let h = Header {
            tag,
            size: 0,
            code: cc,
        };
        Cmd(h.encode().to_vec())
    }
    fn u8(mut self, v: u8) -> Cmd {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Cmd {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Cmd {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Cmd {
        self.0.extend_from_slice(b);
        self
    }
    /// A TPM2B: be16 length, then the bytes.
    fn sized(self, b: &[u8]) -> Cmd {
        // Every TPM2B built here is far below 64 KiB (at most a template
        // or a 1 KiB NV chunk).
        self.u16(b.len() as u16).bytes(b)
    }
    /// The authorisation area: one empty password session.
    fn pw_session(self) -> Cmd {
        self.u32(9).u32(RS_PW).u16(0).u8(0).u16(0)
    }
    fn done(mut self) -> Vec<u8> {
        let n = self.0.len() as u32;
        self.0[2..6].copy_from_slice(&n.to_be_bytes());
        self.0
    }
}

/// What CreatePrimary returned.
#[derive(Debug, Clone)]
pub struct Created {
    pub handle: u32,
    /// The TPMT_PUBLIC of the new key (without its TPM2B size).
    pub public: Vec<u8>,
}

impl<'e> Tpm<'e> {
    pub fn new(engine: &'e mut dyn TpmEngine) -> Tpm<'e> {
        Tpm { engine }
    }

    /// Runs `cmd`; returns the response if its code is success.
    fn run(&mut self, name: &'static str, cmd: &[u8]) -> Result<Vec<u8>, TpmError> {
        let resp = self
            .engine
            .process(cmd)
            .map_err(|rc| TpmError::Engine { cmd: name, rc })?
            .to_vec();
        match tpm2::response_code(&resp) {
            0 if resp.len() >= HEADER_LEN => Ok(resp),
            0 => Err(TpmError::Malformed {
                cmd: name,
                source: Truncated {
                    what: "header",
                    need: HEADER_LEN,
                    have: resp.len(),
                },
            }),
            rc => Err(TpmError::Rc { cmd: name, rc }),
        }
    }

    pub fn startup_clear(&mut self) -> Result<(), TpmError> {
        self.run("TPM2_Startup", &tpm2::startup_command(tpm2::SU_CLEAR))
            .map(drop)
    }

    pub fn shutdown_clear(&mut self) -> Result<(), TpmError> {
        self.run("TPM2_Shutdown", &tpm2::shutdown_command(tpm2::SU_CLEAR))
            .map(drop)
    }

    /// TPM2_CreatePrimary under `hierarchy` with the TPMT_PUBLIC `template`.
    pub fn create_primary(&mut self, hierarchy: u32, template: &[u8]) -> Result<Created, TpmError> {
        const NAME: &str = "TPM2_CreatePrimary";
        let cmd = Cmd::new(ST_SESSIONS, CC_CREATE_PRIMARY)
            .u32(hierarchy)
            .pw_session()
            // inSensitive: empty userAuth and data
            .u16(4)
            .u16(0)
            .u16(0)
            .sized(template)
            // outsideInfo, creationPCR
            .u16(0)
            .u32(0)
            .done();
        let resp = self.run(NAME, &cmd)?;
        let bad = |source| TpmError::Malformed { cmd: NAME, source };
        let mut r = ByteReader::new(&resp[HEADER_LEN..]);
        let handle = r.u32("objectHandle").map_err(bad)?;
        r.u32("parameterSize").map_err(bad)?;
        let public = r.bytes_u16("outPublic").map_err(bad)?.to_vec();
        Ok(Created { handle, public })
    }

    /// TPM2_EvictControl: makes transient `object` persistent at `persistent`.
    pub fn evict_control(&mut self, object: u32, persistent: u32) -> Result<(), TpmError> {
        let cmd = Cmd::new(ST_SESSIONS, CC_EVICT_CONTROL)
            .u32(RH_OWNER)
            .u32(object)
            .pw_session()
            .u32(persistent)
            .done();
        self.run("TPM2_EvictControl", &cmd).map(drop)
    }

    pub fn flush(&mut self, handle: u32) -> Result<(), TpmError> {
        let cmd = Cmd::new(ST_NO_SESSIONS, CC_FLUSH_CONTEXT)
            .u32(handle)
            .done();
        self.run("TPM2_FlushContext", &cmd).map(drop)
    }

    /// TPM2_NV_DefineSpace by the platform hierarchy, empty auth and policy.
    pub fn nv_define(&mut self, index: u32, attrs: u32, size: u16) -> Result<(), TpmError> {
        let public = Cmd(Vec::new())
            .u32(index)
            .u16(ALG_SHA256)
            .u32(attrs)
            .u16(0)
            .u16(size)
            .0;
        let cmd = Cmd::new(ST_SESSIONS, CC_NV_DEFINE_SPACE)
            .u32(RH_PLATFORM)
            .pw_session()
            .u16(0)
            .sized(&public)
            .done();
        self.run("TPM2_NV_DefineSpace", &cmd).map(drop)
    }

    /// Writes `data` into `index` in chunks, as the platform.
    pub fn nv_write(&mut self, index: u32, data: &[u8]) -> Result<(), TpmError> {
        for (i, chunk) in data.chunks(NV_WRITE_CHUNK).enumerate() {
            let cmd = Cmd::new(ST_SESSIONS, CC_NV_WRITE)
                .u32(RH_PLATFORM)
                .u32(index)
                .pw_session()
                .sized(chunk)
                .u16((i * NV_WRITE_CHUNK) as u16)
                .done();
            self.run("TPM2_NV_Write", &cmd)?;
        }
        Ok(())
    }

    /// TPM2_NV_WriteLock as the platform: with TPMA_NV_WRITEDEFINE the
    /// lock lasts until the index is deleted.
    pub fn nv_write_lock(&mut self, index: u32) -> Result<(), TpmError> {
        let cmd = Cmd::new(ST_SESSIONS, CC_NV_WRITE_LOCK)
            .u32(RH_PLATFORM)
            .u32(index)
            .pw_session()
            .done();
        self.run("TPM2_NV_WriteLock", &cmd).map(drop)
    }

    /// The PCR banks the TPM implements and which PCRs each has active.
    pub fn pcr_banks(&mut self) -> Result<Vec<Bank>, TpmError> {
        const NAME: &str = "TPM2_GetCapability(PCRS)";
        let cmd = Cmd::new(ST_NO_SESSIONS, CC_GET_CAPABILITY)
            .u32(CAP_PCRS)
            .u32(0)
            .u32(64)
            .done();
        let resp = self.run(NAME, &cmd)?;
        parse_pcr_banks(&resp[HEADER_LEN..])
            .map_err(|source| TpmError::Malformed { cmd: NAME, source })
    }

    /// TPM2_PCR_Allocate: `banks` get every PCR, the others none. Takes
    /// effect at the next TPM reset.
    pub fn pcr_allocate(&mut self, banks: &[Bank]) -> Result<(), TpmError> {
        let mut cmd = Cmd::new(ST_SESSIONS, CC_PCR_ALLOCATE)
            .u32(RH_PLATFORM)
            .pw_session()
            .u32(banks.len() as u32);
        for b in banks {
            cmd = cmd.u16(b.alg).u8(b.select.len() as u8).bytes(&b.select);
        }
        let resp = self.run("TPM2_PCR_Allocate", &cmd.done())?;
        // allocationSuccess follows the parameterSize.
        let mut r = ByteReader::new(&resp[HEADER_LEN..]);
        let ok = r
            .u32("parameterSize")
            .and_then(|_| r.u8("allocationSuccess"))
            .map_err(|source| TpmError::Malformed {
                cmd: "TPM2_PCR_Allocate",
                source,
            })?;
        if ok == 0 {
            return Err(TpmError::Rc {
                cmd: "TPM2_PCR_Allocate (allocationSuccess = NO)",
                rc: 0,
            });
        }
        Ok(())
    }
}

/// Parses the body of a GetCapability(TPM_CAP_PCRS) response.
pub fn parse_pcr_banks(body: &[u8]) -> Result<Vec<Bank>, Truncated> {
    let mut r = ByteReader::new(body);
    r.u8("moreData")?;
    r.u32("capability")?;
    let count = r.u32("count")?;
    let mut banks = Vec::new();
    for _ in 0..count {
        let alg = r.u16("hash")?;
        let n = r.u8("sizeofSelect")?;
        let select = r.take(usize::from(n), "pcrSelect")?.to_vec();
        banks.push(Bank { alg, select });
    }
    Ok(banks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_sizes_are_patched() {
        let c = Cmd::new(ST_SESSIONS, CC_NV_WRITE_LOCK)
            .u32(RH_PLATFORM)
            .u32(0x01c0_0002)
            .pw_session()
            .done();
        assert_eq!(c.len(), 10 + 8 + 4 + 9);
        assert_eq!(
            u32::from_be_bytes(c[2..6].try_into().unwrap()) as usize,
            c.len()
        );
    }

    #[test]
    fn pcr_banks_parse_and_reject_truncation() {
        let body = [
            0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 4, 3, 0, 0, 0, 0, 0x0b, 3, 0xff, 0xff, 0xff,
        ];
        let b = parse_pcr_banks(&body).unwrap();
        assert_eq!(b.len(), 2);
        assert!(!b[0].active() && b[1].active());
        assert_eq!(bank_name(b[1].alg), Some("sha256"));
        for n in 0..body.len() {
            assert!(parse_pcr_banks(&body[..n]).is_err(), "{n}");
        }
        // A count far larger than the data cannot allocate or panic.
        assert!(parse_pcr_banks(&[0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
