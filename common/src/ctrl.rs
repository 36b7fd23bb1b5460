//! swtpm's control-channel command codes (swtpm_ioctls(3)): a request is
//! `be32 code` plus a body the code fixes. vtpmd's frontend serves them;
//! vtpmctl's `swtpm_ioctl` sends them.

/// Command codes.
pub mod cmd {
    pub const GET_CAPABILITY: u32 = 0x01;
    pub const INIT: u32 = 0x02;
    pub const SHUTDOWN: u32 = 0x03;
    pub const GET_TPMESTABLISHED: u32 = 0x04;
    pub const SET_LOCALITY: u32 = 0x05;
    pub const HASH_START: u32 = 0x06;
    pub const HASH_DATA: u32 = 0x07;
    pub const HASH_END: u32 = 0x08;
    pub const CANCEL_TPM_CMD: u32 = 0x09;
    pub const STORE_VOLATILE: u32 = 0x0a;
    pub const RESET_TPMESTABLISHED: u32 = 0x0b;
    pub const GET_STATEBLOB: u32 = 0x0c;
    pub const SET_STATEBLOB: u32 = 0x0d;
    pub const STOP: u32 = 0x0e;
    pub const GET_CONFIG: u32 = 0x0f;
    pub const SET_DATAFD: u32 = 0x10;
    pub const SET_BUFFERSIZE: u32 = 0x11;
    pub const GET_INFO: u32 = 0x12;
    pub const LOCK_STORAGE: u32 = 0x13;
}

/// INIT flag: delete the volatile state after loading it.
pub const INIT_FLAG_DELETE_VOLATILE: u32 = 1;

/// GET_INFO answers in chunks of at most this many bytes of JSON.
pub const INFO_CHUNK: usize = 3072;
