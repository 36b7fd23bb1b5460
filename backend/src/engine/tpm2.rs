//! TPM 2.0 command and response headers: just enough to frame the data
//! channel, build the commands vtpmd sends on its own (Startup, Shutdown) and
//! answer with a well-formed error.

use vtpm_common::reader::ByteReader;

/// Size of every TPM 2.0 command and response header.
pub const HEADER_LEN: usize = 10;

pub const ST_NO_SESSIONS: u16 = 0x8001;
pub const ST_SESSIONS: u16 = 0x8002;

pub const CC_STARTUP: u32 = 0x144;
pub const CC_SHUTDOWN: u32 = 0x145;

pub const SU_CLEAR: u16 = 0;
pub const SU_STATE: u16 = 1;

/// TPM2_Startup's two start-up types (`--flags startup-clear|startup-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupType {
    Clear,
    State,
}

impl StartupType {
    /// The TPM_SU value.
    pub fn su(self) -> u16 {
        match self {
            StartupType::Clear => SU_CLEAR,
            StartupType::State => SU_STATE,
        }
    }
}

pub const RC_SUCCESS: u32 = 0;
pub const RC_INITIALIZE: u32 = 0x100;
pub const RC_FAILURE: u32 = 0x101;
pub const RC_COMMAND_SIZE: u32 = 0x142;

/// The fields of a command or response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u16,
    pub size: u32,
    /// commandCode in a command, responseCode in a response.
    pub code: u32,
}

impl Header {
    /// Parses the first ten bytes; None if fewer are given.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let mut r = ByteReader::new(bytes);
        Some(Header {
            tag: r.u16("tag").ok()?,
            size: r.u32("size").ok()?,
            code: r.u32("code").ok()?,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..2].copy_from_slice(&self.tag.to_be_bytes());
        out[2..6].copy_from_slice(&self.size.to_be_bytes());
        out[6..].copy_from_slice(&self.code.to_be_bytes());
        out
    }
}

/// Whether a command of `size` bytes may be executed with an I/O buffer of
/// `max` bytes.
pub fn command_size_ok(size: usize, max: usize) -> bool {
    (HEADER_LEN..=max).contains(&size)
}

/// Whether `cmd` is one whole command: its header's size is its length,
/// and that size is acceptable (see [`command_size_ok`]).
pub fn command_frame_ok(cmd: &[u8], max: usize) -> bool {
    Header::parse(cmd).is_some_and(|h| h.size as usize == cmd.len())
        && command_size_ok(cmd.len(), max)
}

/// A bare 10-byte response carrying only `rc`.
pub fn error_response(rc: u32) -> [u8; HEADER_LEN] {
    Header {
        tag: ST_NO_SESSIONS,
        size: HEADER_LEN as u32,
        code: rc,
    }
    .encode()
}

/// TPM2_Startup(su).
pub fn startup_command(su: u16) -> Vec<u8> {
    command_with_u16(CC_STARTUP, su)
}

/// TPM2_Shutdown(su).
pub fn shutdown_command(su: u16) -> Vec<u8> {
    command_with_u16(CC_SHUTDOWN, su)
}

fn command_with_u16(cc: u32, param: u16) -> Vec<u8> {
    let mut v = Header {
        tag: ST_NO_SESSIONS,
        size: (HEADER_LEN + 2) as u32,
        code: cc,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(&param.to_be_bytes());
    v
}

/// The response code of a response, or RC_FAILURE if it is too short.
pub fn response_code(resp: &[u8]) -> u32 {
    Header::parse(resp).map_or(RC_FAILURE, |h| h.code)
}

/// The command code of a command, if it has a header.
pub fn command_code(cmd: &[u8]) -> Option<u32> {
    Header::parse(cmd).map(|h| h.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_frames() {
        let su = startup_command(SU_CLEAR);
        assert!(command_frame_ok(&su, 4096));
        assert!(!command_frame_ok(&su[..11], 4096), "truncated");
        let mut long = su.clone();
        long.push(0);
        assert!(!command_frame_ok(&long, 4096), "trailing garbage");
        assert!(!command_frame_ok(&su, 11), "over the buffer size");
        assert!(!command_frame_ok(&[], 4096));
        assert!(!command_frame_ok(&[0xff; 10], 4096), "garbage header");
        assert!(command_size_ok(10, 10) && !command_size_ok(9, 4096));
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            tag: ST_SESSIONS,
            size: 0x1234,
            code: 0x17b,
        };
        assert_eq!(Header::parse(&h.encode()), Some(h));
    }

    #[test]
    fn short_header_is_none() {
        assert_eq!(Header::parse(&[0x80, 0x01, 0, 0, 0]), None);
        assert_eq!(response_code(&[0x80]), RC_FAILURE);
        assert_eq!(command_code(&[]), None);
    }

    #[test]
    fn failure_response_matches_qemu_probe_expectation() {
        assert_eq!(
            error_response(RC_FAILURE),
            [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01]
        );
    }

    #[test]
    fn startup_bytes() {
        assert_eq!(
            startup_command(SU_CLEAR),
            vec![0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]
        );
        assert_eq!(shutdown_command(SU_STATE)[9], 0x45);
    }
}
