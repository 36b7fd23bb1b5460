//! A small deterministic TPM engine for the fuzz targets that need a
//! [`Vtpm`] (the vhost-user request layer, the admin handler): it answers
//! every command without libtpms, so the fuzzer spends its time in vtpmd's
//! own parsing and not in the TPM. The response echoes the command body
//! behind a success header; a command code with bit 31 set asks for a
//! response of `code & 0xffff` bytes, so responses larger than the guest's
//! buffers and than the I/O limit are reached too.

use std::sync::{Arc, OnceLock};
use vtpmd::engine::{BufferSizes, EngineControls, StateType, TpmEngine, TpmResult};
use vtpmd::instance::{InitFlags, Options, Vtpm};
use vtpmd::migration::session::Session;
use vtpmd::storage::StateDir;

/// I/O buffer size the echo engine reports (libtpms's default).
pub const IO_SIZE: u32 = 4096;

#[derive(Debug, Default)]
struct NoControls;

impl EngineControls for NoControls {
    fn cancel(&self) {}
    fn set_locality(&self, _loc: u8) {}
}

/// The engine: see the module documentation.
#[derive(Debug, Default)]
pub struct EchoEngine {
    resp: Vec<u8>,
}

impl EchoEngine {
    /// The response [`TpmEngine::process`] gives for `cmd`.
    pub fn response_for(cmd: &[u8]) -> Vec<u8> {
        let code = vtpmd::engine::tpm2::command_code(cmd).unwrap_or(0);
        let body = cmd.get(vtpmd::engine::tpm2::HEADER_LEN..).unwrap_or(&[]);
        let len = if code & 0x8000_0000 != 0 {
            (code & 0xffff) as usize
        } else {
            vtpmd::engine::tpm2::HEADER_LEN + body.len()
        };
        let mut out = vtpmd::engine::tpm2::Header {
            tag: 0x8001,
            size: len as u32,
            code: 0,
        }
        .encode()
        .to_vec();
        out.extend(
            body.iter()
                .copied()
                .cycle()
                .take(len.saturating_sub(out.len())),
        );
        out.truncate(len);
        out
    }
}

impl TpmEngine for EchoEngine {
    fn main_init(&mut self) -> Result<(), TpmResult> {
        Ok(())
    }
    fn terminate(&mut self) {}
    fn process(&mut self, cmd: &[u8]) -> Result<&[u8], TpmResult> {
        self.resp = Self::response_for(cmd);
        Ok(&self.resp)
    }
    fn volatile_store(&mut self) -> Result<Vec<u8>, TpmResult> {
        Ok(Vec::new())
    }
    fn set_buffer_size(&mut self, _wanted: u32) -> BufferSizes {
        BufferSizes {
            size: IO_SIZE,
            min: IO_SIZE,
            max: IO_SIZE,
        }
    }
    fn validate_state(&mut self, _st: StateType) -> Result<(), TpmResult> {
        Ok(())
    }
    fn set_state(&mut self, _st: StateType, _blob: Option<&[u8]>) -> Result<(), TpmResult> {
        Ok(())
    }
    fn get_state(&mut self, _st: StateType) -> Result<Vec<u8>, TpmResult> {
        Ok(Vec::new())
    }
    fn info(&mut self, _flags: u32) -> Option<String> {
        None
    }
    fn hash_start(&mut self) -> Result<(), TpmResult> {
        Ok(())
    }
    fn hash_data(&mut self, _data: &[u8]) -> Result<(), TpmResult> {
        Ok(())
    }
    fn hash_end(&mut self) -> Result<(), TpmResult> {
        Ok(())
    }
    fn established(&mut self) -> Result<bool, TpmResult> {
        Ok(false)
    }
    fn reset_established(&mut self, _loc: u8) -> Result<(), TpmResult> {
        Ok(())
    }
    fn controls(&self) -> Arc<dyn EngineControls> {
        Arc::new(NoControls)
    }
    fn describe(&self) -> String {
        "fuzz echo engine".into()
    }
}

/// One powered-on instance on the echo engine, shared by every run of a
/// process. Its state directory is removed again as soon as it is open
/// (the echo engine never stores anything), so nothing is left behind.
pub fn vtpm() -> &'static Vtpm {
    static V: OnceLock<Vtpm> = OnceLock::new();
    V.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vtpm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz state directory");
        let store = StateDir::open(&dir, 0o600, None).expect("open the fuzz state directory");
        let v = Vtpm::new(
            Box::new(EchoEngine::default()),
            Arc::new(store),
            Options::default(),
            Session::new(None, None, false, false),
        )
        .expect("instance on the echo engine");
        v.power_on(InitFlags::default())
            .expect("power on the echo engine");
        let _ = std::fs::remove_dir_all(&dir);
        v
    })
}
