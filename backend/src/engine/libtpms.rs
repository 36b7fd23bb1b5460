//! The libtpms C ABI, and the only place in vtpmd that calls it: the
//! [`TpmEngine`] the daemon runs.
//!
//! libtpms keeps every bit of TPM state in C globals, so there is exactly one
//! TPM per process. [`Libtpms::take`] hands out the single handle; every call
//! that touches the TPM goes through `&mut Libtpms`, which serialises them.
//! The one call meant to come from another thread, cancelling a command
//! ([`EngineControls::cancel`]), only sets a flag inside libtpms.
//!
//! libtpms reads and writes its persistent state through callbacks that carry
//! no user pointer, so the storage they use ([`NvStore`]) and the locality
//! live in process globals here.

use super::{
    BufferSizes, EngineControls, NvStore, StateType, TpmEngine, TpmResult, TPM_FAIL, TPM_RETRY,
    TPM_SUCCESS,
};
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::panic::catch_unwind;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

fn raw_state_type(st: StateType) -> c_int {
    match st {
        StateType::Permanent => 1,
        StateType::Volatile => 2,
        StateType::SaveState => 4,
    }
}

mod sys {
    use std::ffi::{c_char, c_int, c_uint};

    pub type Result = u32;

    #[repr(C)]
    pub struct Callbacks {
        pub size_of_struct: c_int,
        pub nvram_init: Option<extern "C" fn() -> Result>,
        pub nvram_loaddata:
            Option<extern "C" fn(*mut *mut u8, *mut u32, u32, *const c_char) -> Result>,
        pub nvram_storedata: Option<extern "C" fn(*const u8, u32, u32, *const c_char) -> Result>,
        pub nvram_deletename: Option<extern "C" fn(u32, *const c_char, u8) -> Result>,
        pub io_init: Option<extern "C" fn() -> Result>,
        pub io_getlocality: Option<extern "C" fn(*mut u32, u32) -> Result>,
        pub io_getphysicalpresence: Option<extern "C" fn(*mut u8, u32) -> Result>,
    }

    extern "C" {
        pub fn TPMLIB_GetVersion() -> u32;
        pub fn TPMLIB_ChooseTPMVersion(ver: c_int) -> Result;
        pub fn TPMLIB_MainInit() -> Result;
        pub fn TPMLIB_Terminate();
        pub fn TPMLIB_Process(
            resp: *mut *mut u8,
            resp_len: *mut u32,
            resp_buf_size: *mut u32,
            cmd: *mut u8,
            cmd_len: u32,
        ) -> Result;
        pub fn TPMLIB_VolatileAll_Store(buf: *mut *mut u8, len: *mut u32) -> Result;
        pub fn TPMLIB_CancelCommand() -> Result;
        pub fn TPMLIB_GetInfo(flags: c_int) -> *mut c_char;
        pub fn TPMLIB_RegisterCallbacks(cbs: *mut Callbacks) -> Result;
        pub fn TPMLIB_SetDebugFD(fd: c_int);
        pub fn TPMLIB_SetDebugLevel(level: c_uint);
        pub fn TPMLIB_SetBufferSize(wanted: u32, min: *mut u32, max: *mut u32) -> u32;
        pub fn TPMLIB_ValidateState(st: c_int, flags: c_uint) -> Result;
        pub fn TPMLIB_SetState(st: c_int, buf: *const u8, len: u32) -> Result;
        pub fn TPMLIB_GetState(st: c_int, buf: *mut *mut u8, len: *mut u32) -> Result;
        pub fn TPM_IO_Hash_Start() -> Result;
        pub fn TPM_IO_Hash_Data(data: *const u8, len: u32) -> Result;
        pub fn TPM_IO_Hash_End() -> Result;
        pub fn TPM_IO_TpmEstablished_Get(out: *mut u8) -> Result;
        pub fn TPM_IO_TpmEstablished_Reset() -> Result;
    }
}

const TPMLIB_TPM_VERSION_2: c_int = 1;

static TAKEN: AtomicBool = AtomicBool::new(false);
static NV_STORE: RwLock<Option<Arc<dyn NvStore>>> = RwLock::new(None);
static LOCALITY: AtomicU32 = AtomicU32::new(0);

/// Cancel and locality: process globals libtpms reads, so they need no
/// handle and no lock.
#[derive(Debug)]
struct Controls;

impl EngineControls for Controls {
    fn cancel(&self) {
        // SAFETY: TPMLIB_CancelCommand takes no arguments and only writes a
        // plain int flag inside libtpms; calling it while another thread runs
        // TPMLIB_Process is its documented purpose.
        unsafe { sys::TPMLIB_CancelCommand() };
    }

    fn set_locality(&self, loc: u8) {
        LOCALITY.store(u32::from(loc), Ordering::SeqCst);
    }
}

/// The libtpms version as 0xMMmmuu.
pub fn library_version() -> u32 {
    // SAFETY: a pure getter with no arguments and no global side effects.
    unsafe { sys::TPMLIB_GetVersion() }
}

/// The RSA key sizes libtpms's TPM 2.0 supports (its TPMFeatures info),
/// for `--print-capabilities`. Only before an instance claimed libtpms.
pub fn rsa_key_sizes() -> Vec<u32> {
    const TPMLIB_INFO_TPMFEATURES: c_int = 4;
    if TAKEN.load(Ordering::SeqCst) {
        return Vec::new();
    }
    // SAFETY: plain call with an enum value libtpms defines; no TPM runs.
    if unsafe { sys::TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2) } != TPM_SUCCESS {
        return Vec::new();
    }
    // SAFETY: returns a malloc'd NUL-terminated string or NULL.
    let p = unsafe { sys::TPMLIB_GetInfo(TPMLIB_INFO_TPMFEATURES) };
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: p is a valid NUL-terminated string owned by us.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: p came from malloc and is not used afterwards.
    unsafe { libc::free(p.cast()) };
    serde_json::from_str::<serde_json::Value>(&s)
        .ok()
        .and_then(|v| {
            v["TPMFeatures"]["RSAKeySizes"].as_array().map(|a| {
                a.iter()
                    .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Copies a malloc'd buffer from libtpms into a Vec and frees it.
///
/// # Safety
/// `buf` must be NULL or a pointer from libc malloc owning `len` bytes.
unsafe fn take_c_buffer(buf: *mut u8, len: u32) -> Vec<u8> {
    if buf.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller guarantees `buf` owns `len` initialised bytes.
    let v = unsafe { std::slice::from_raw_parts(buf, len as usize) }.to_vec();
    // SAFETY: `buf` came from malloc (libtpms allocates with malloc) and is
    // not used after this point.
    unsafe { libc::free(buf.cast()) };
    v
}

fn name_of(name: *const c_char) -> Option<&'static str> {
    if name.is_null() {
        return None;
    }
    // SAFETY: libtpms passes one of its static NUL-terminated names
    // ("permall", "volatilestate", "savestate"), valid for the program's life.
    unsafe { CStr::from_ptr(name) }.to_str().ok()
}

fn with_store<T>(f: impl FnOnce(&dyn NvStore) -> T) -> Option<T> {
    let guard = NV_STORE.read().unwrap_or_else(|e| e.into_inner());
    guard.as_deref().map(f)
}

extern "C" fn cb_nvram_init() -> sys::Result {
    TPM_SUCCESS
}

extern "C" fn cb_nvram_loaddata(
    data: *mut *mut u8,
    length: *mut u32,
    _tpm_number: u32,
    name: *const c_char,
) -> sys::Result {
    let run = || {
        let Some(name) = name_of(name) else {
            return TPM_FAIL;
        };
        match with_store(|s| s.load(name)) {
            None => {
                log::error!("libtpms asked for '{name}' before a state store was set");
                TPM_FAIL
            }
            Some(Ok(None)) => TPM_RETRY,
            Some(Ok(Some(bytes))) => {
                let Ok(len) = u32::try_from(bytes.len()) else {
                    return TPM_FAIL;
                };
                // SAFETY: malloc of a positive size (at least 1 byte so a
                // zero-length blob still yields a valid pointer).
                let buf = unsafe { libc::malloc(bytes.len().max(1)) }.cast::<u8>();
                if buf.is_null() {
                    return TPM_FAIL;
                }
                // SAFETY: `buf` holds at least bytes.len() bytes and does not
                // overlap `bytes`; `data` and `length` are libtpms's out
                // pointers, valid for one write each. libtpms frees `buf`.
                unsafe {
                    ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
                    *data = buf;
                    *length = len;
                }
                TPM_SUCCESS
            }
            Some(Err(e)) => {
                // Reported once, by whoever started the engine: the
                // failure is kept (`StateDir::take_last_failure`) and
                // becomes part of that error.
                log::debug!("loading TPM state '{name}' failed: {e}");
                TPM_FAIL
            }
        }
    };
    catch_unwind(run).unwrap_or(TPM_FAIL)
}

extern "C" fn cb_nvram_storedata(
    data: *const u8,
    length: u32,
    _tpm_number: u32,
    name: *const c_char,
) -> sys::Result {
    let run = || {
        let Some(name) = name_of(name) else {
            return TPM_FAIL;
        };
        let bytes = if data.is_null() {
            &[][..]
        } else {
            // SAFETY: libtpms hands us `length` readable bytes at `data` for
            // the duration of this call.
            unsafe { std::slice::from_raw_parts(data, length as usize) }
        };
        match with_store(|s| s.store(name, bytes)) {
            Some(Ok(())) => TPM_SUCCESS,
            Some(Err(e)) => {
                log::error!("storing TPM state '{name}' failed: {e}");
                TPM_FAIL
            }
            None => TPM_FAIL,
        }
    };
    catch_unwind(run).unwrap_or(TPM_FAIL)
}

extern "C" fn cb_nvram_deletename(_tpm_number: u32, name: *const c_char, _must: u8) -> sys::Result {
    let run = || {
        let Some(name) = name_of(name) else {
            return TPM_FAIL;
        };
        match with_store(|s| s.delete(name)) {
            Some(Ok(())) => TPM_SUCCESS,
            Some(Err(e)) => {
                log::error!("deleting TPM state '{name}' failed: {e}");
                TPM_FAIL
            }
            None => TPM_FAIL,
        }
    };
    catch_unwind(run).unwrap_or(TPM_FAIL)
}

extern "C" fn cb_io_init() -> sys::Result {
    TPM_SUCCESS
}

extern "C" fn cb_io_getlocality(loc: *mut u32, _tpm_number: u32) -> sys::Result {
    if !loc.is_null() {
        // SAFETY: libtpms passes a valid out pointer for one u32.
        unsafe { *loc = LOCALITY.load(Ordering::SeqCst) };
    }
    TPM_SUCCESS
}

/// The one handle to the process's TPM.
#[derive(Debug)]
pub struct Libtpms {
    /// libtpms's response buffer, reused across commands (malloc'd by libtpms).
    resp: *mut u8,
    resp_cap: u32,
}

// SAFETY: the raw pointer is a heap buffer owned exclusively by this handle;
// libtpms has no thread affinity, and `&mut self` serialises every use.
unsafe impl Send for Libtpms {}

impl Libtpms {
    /// Claims the process's TPM, selects TPM 2.0 and installs the callbacks.
    /// Returns None if it was already claimed.
    pub fn take(store: Arc<dyn NvStore>) -> Option<Result<Libtpms, TpmResult>> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return None;
        }
        *NV_STORE.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
        let mut cbs = sys::Callbacks {
            size_of_struct: std::mem::size_of::<sys::Callbacks>() as c_int,
            nvram_init: Some(cb_nvram_init),
            nvram_loaddata: Some(cb_nvram_loaddata),
            nvram_storedata: Some(cb_nvram_storedata),
            nvram_deletename: Some(cb_nvram_deletename),
            io_init: Some(cb_io_init),
            io_getlocality: Some(cb_io_getlocality),
            io_getphysicalpresence: None,
        };
        // SAFETY: libtpms copies the struct into its own global; `cbs` only
        // needs to live for the call. The function pointers are 'static.
        let rc = unsafe { sys::TPMLIB_RegisterCallbacks(&mut cbs) };
        if rc != TPM_SUCCESS {
            return Some(Err(rc));
        }
        let mut tpm = Libtpms {
            resp: ptr::null_mut(),
            resp_cap: 0,
        };
        tpm.silence_diagnostics();
        Some(tpm.choose_tpm2().map(|()| tpm))
    }

    fn choose_tpm2(&self) -> Result<(), TpmResult> {
        // SAFETY: plain call with an enum value libtpms defines.
        check(unsafe { sys::TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2) })
    }

    /// Routes libtpms's own debug output to `fd` at `level` (0 = off).
    pub fn set_debug(&mut self, fd: c_int, level: c_uint) {
        // SAFETY: libtpms only stores the values; an invalid fd makes its
        // writes fail harmlessly.
        unsafe {
            sys::TPMLIB_SetDebugFD(fd);
            sys::TPMLIB_SetDebugLevel(level);
        }
    }

    /// libtpms's own diagnostics go to /dev/null: entering failure mode,
    /// it prints the whole command that caused it as hex (an NV_Write's
    /// secret, a key's sensitive part) to stderr, which libvirt keeps in
    /// the domain's log. vtpmd logs the event itself, without content.
    fn silence_diagnostics(&mut self) {
        static SINK: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
        let sink = SINK.get_or_init(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .ok()
        });
        match sink {
            Some(f) => {
                use std::os::fd::AsRawFd;
                self.set_debug(f.as_raw_fd(), 0);
            }
            None => log::warn!("cannot open /dev/null: libtpms diagnostics stay on stderr"),
        }
    }
}

impl TpmEngine for Libtpms {
    /// Powers the TPM on: loads state through the store or manufactures one.
    fn main_init(&mut self) -> Result<(), TpmResult> {
        self.choose_tpm2()?;
        // SAFETY: no arguments; state is reached through our callbacks.
        check(unsafe { sys::TPMLIB_MainInit() })
    }

    /// Powers the TPM off and frees libtpms's state.
    fn terminate(&mut self) {
        // SAFETY: valid whether or not the TPM is running.
        unsafe { sys::TPMLIB_Terminate() }
    }

    /// Runs one TPM command and returns the response bytes. Errors inside the
    /// TPM come back as a response with a non-zero code, not as Err.
    fn process(&mut self, cmd: &[u8]) -> Result<&[u8], TpmResult> {
        let mut cmd_copy = cmd.to_vec();
        let cmd_len = u32::try_from(cmd_copy.len()).map_err(|_| TPM_FAIL)?;
        let mut resp_len: u32 = 0;
        // SAFETY: `self.resp`/`self.resp_cap` describe a malloc'd buffer (or
        // NULL/0) that libtpms may realloc; the command buffer is a live Vec of
        // `cmd_len` bytes that libtpms only reads during the call.
        let rc = unsafe {
            sys::TPMLIB_Process(
                &mut self.resp,
                &mut resp_len,
                &mut self.resp_cap,
                cmd_copy.as_mut_ptr(),
                cmd_len,
            )
        };
        check(rc)?;
        if self.resp.is_null() || resp_len > self.resp_cap {
            return Err(TPM_FAIL);
        }
        // SAFETY: libtpms wrote `resp_len` bytes into the buffer of
        // `resp_cap` bytes it owns through us; the slice borrows `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.resp, resp_len as usize) })
    }

    /// Serialises the running TPM's volatile state.
    fn volatile_store(&mut self) -> Result<Vec<u8>, TpmResult> {
        let mut buf: *mut u8 = ptr::null_mut();
        let mut len: u32 = 0;
        // SAFETY: out pointers are valid; on success libtpms returns a
        // malloc'd buffer that take_c_buffer frees.
        let rc = unsafe { sys::TPMLIB_VolatileAll_Store(&mut buf, &mut len) };
        // SAFETY: buf is NULL or malloc'd with `len` bytes.
        let v = unsafe { take_c_buffer(buf, len) };
        check(rc).map(|()| v)
    }

    /// Sets (or queries, with 0) the I/O buffer size. Returns (in use, min, max).
    fn set_buffer_size(&mut self, wanted: u32) -> BufferSizes {
        let (mut min, mut max) = (0u32, 0u32);
        // SAFETY: out pointers are valid; TPM 2 was chosen in take().
        let size = unsafe { sys::TPMLIB_SetBufferSize(wanted, &mut min, &mut max) };
        BufferSizes { size, min, max }
    }

    /// Test-loads a state blob through the store without starting the TPM.
    fn validate_state(&mut self, st: StateType) -> Result<(), TpmResult> {
        // SAFETY: plain call; flags must be 0.
        check(unsafe { sys::TPMLIB_ValidateState(raw_state_type(st), 0) })
    }

    /// Hands libtpms a blob for the next MainInit (`None`: act as if absent).
    fn set_state(&mut self, st: StateType, blob: Option<&[u8]>) -> Result<(), TpmResult> {
        let (p, len) = match blob {
            Some(b) => (b.as_ptr(), u32::try_from(b.len()).map_err(|_| TPM_FAIL)?),
            None => (ptr::null(), 0),
        };
        // SAFETY: `p` is NULL or points at `len` readable bytes; libtpms
        // copies them before returning.
        check(unsafe { sys::TPMLIB_SetState(raw_state_type(st), p, len) })
    }

    /// Serialises a state blob (live state when running).
    fn get_state(&mut self, st: StateType) -> Result<Vec<u8>, TpmResult> {
        let mut buf: *mut u8 = ptr::null_mut();
        let mut len: u32 = 0;
        // SAFETY: out pointers are valid; libtpms returns a malloc'd buffer.
        let rc = unsafe { sys::TPMLIB_GetState(raw_state_type(st), &mut buf, &mut len) };
        // SAFETY: buf is NULL or malloc'd with `len` bytes.
        let v = unsafe { take_c_buffer(buf, len) };
        check(rc).map(|()| v)
    }

    /// libtpms's JSON description for the GetInfo flags.
    fn info(&mut self, flags: u32) -> Option<String> {
        // SAFETY: returns a malloc'd NUL-terminated string or NULL.
        let p = unsafe { sys::TPMLIB_GetInfo(flags as c_int) };
        if p.is_null() {
            return None;
        }
        // SAFETY: p is a valid NUL-terminated string owned by us.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: p came from malloc and is not used afterwards.
        unsafe { libc::free(p.cast()) };
        Some(s)
    }

    fn hash_start(&mut self) -> Result<(), TpmResult> {
        // SAFETY: plain call on the running TPM.
        check(unsafe { sys::TPM_IO_Hash_Start() })
    }

    fn hash_data(&mut self, data: &[u8]) -> Result<(), TpmResult> {
        let len = u32::try_from(data.len()).map_err(|_| TPM_FAIL)?;
        // SAFETY: `data` is readable for `len` bytes during the call.
        check(unsafe { sys::TPM_IO_Hash_Data(data.as_ptr(), len) })
    }

    fn hash_end(&mut self) -> Result<(), TpmResult> {
        // SAFETY: plain call on the running TPM.
        check(unsafe { sys::TPM_IO_Hash_End() })
    }

    fn established(&mut self) -> Result<bool, TpmResult> {
        let mut b: u8 = 0;
        // SAFETY: valid out pointer for one byte.
        check(unsafe { sys::TPM_IO_TpmEstablished_Get(&mut b) }).map(|()| b != 0)
    }

    /// Clears the established flag as locality `loc`; libtpms checks the
    /// locality through its callback, so it is switched for the call.
    fn reset_established(&mut self, loc: u8) -> Result<(), TpmResult> {
        let saved = LOCALITY.swap(u32::from(loc), Ordering::SeqCst);
        // SAFETY: plain call; the locality is read through our callback.
        let r = check(unsafe { sys::TPM_IO_TpmEstablished_Reset() });
        LOCALITY.store(saved, Ordering::SeqCst);
        r
    }

    fn controls(&self) -> Arc<dyn EngineControls> {
        Arc::new(Controls)
    }

    fn describe(&self) -> String {
        format!("libtpms {:#08x}", library_version())
    }
}

impl Drop for Libtpms {
    fn drop(&mut self) {
        if !self.resp.is_null() {
            // SAFETY: the response buffer was allocated by libtpms with malloc
            // and nothing else refers to it.
            unsafe { libc::free(self.resp.cast()) };
            self.resp = ptr::null_mut();
        }
    }
}

fn check(rc: TpmResult) -> Result<(), TpmResult> {
    if rc == TPM_SUCCESS {
        Ok(())
    } else {
        Err(rc)
    }
}
