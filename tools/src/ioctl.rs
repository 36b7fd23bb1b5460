//! `swtpm_ioctl`'s command line over a control socket (vtpmd's or swtpm's).
//!
//! vtpmctl runs this when started under the name `swtpm_ioctl` (libvirt
//! stops its emulator backend with `swtpm_ioctl --unix SOCK -s`) or as
//! `vtpmctl swtpm-ioctl ARGS`. Options and output lines are swtpm_ioctl's:
//! one command per call, options with one or two dashes, `TPM result from
//! PTM_X: 0xN` and exit status 1 when the TPM refuses. Character devices
//! (`swtpm cuse`), `-h`, `--save` and `--load` are not offered: each is
//! refused by name.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;
use vtpm_common::ctrl::{cmd, INFO_CHUNK, INIT_FLAG_DELETE_VOLATILE};

/// swtpm_ioctl's default TCP port for `--tcp HOST` without a port.
const DEFAULT_TCP_PORT: u16 = 6546;
/// How long one reply may take before the call gives up (libvirt waits
/// for this tool while it stops a domain).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest GET_INFO document accepted, whatever the server announces.
const MAX_INFO: u32 = 64 * 1024;

#[derive(Debug, Error)]
pub enum IoctlError {
    #[error("unknown option '{0}' (swtpm_ioctl --help lists them)")]
    UnknownOption(String),
    #[error("option '{0}' needs a value")]
    MissingValue(&'static str),
    #[error("Only one command may be given.")]
    TwoCommands,
    #[error("No valid command.")]
    NoCommand,
    #[error("Error: Missing device name.")]
    NoTarget,
    #[error("Could not get locality number from {0}.")]
    BadLocality(String),
    #[error("Locality outside valid range of [0..4].")]
    LocalityRange,
    #[error("invalid number '{value}' for {option}")]
    BadNumber { option: &'static str, value: String },
    #[error("Invalid port '{0}'")]
    BadPort(String),
    #[error("{0} is not supported by vtpmctl's swtpm_ioctl (use swtpm's own swtpm_ioctl for it)")]
    Unsupported(&'static str),
    #[error(
        "'{0}' is a device path: vtpmctl's swtpm_ioctl talks to control sockets only \
         (--unix PATH or --tcp HOST:PORT), not to swtpm cuse devices"
    )]
    Device(String),
    #[error("Could not connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("Could not execute {name}: {source}")]
    Io {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("TPM result from {name}: {result:#x}")]
    Tpm { name: &'static str, result: u32 },
    #[error(
        "{name}: the server announced {size} bytes of information (at most {MAX_INFO} accepted)"
    )]
    InfoTooLarge { name: &'static str, size: u32 },
}

/// Where the control channel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp(String, u16),
}

/// One swtpm_ioctl command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `-c`: the capability bits.
    Capability,
    /// `-i`: INIT, deleting the volatile state it resumes from.
    Init,
    /// `--stop`: stop the TPM, keep the process.
    Stop,
    /// `-s`: SHUTDOWN: the backend stops the TPM and exits.
    Shutdown,
    /// `-e`: the tpmEstablished bit.
    Established,
    /// `-r LOC`: reset the tpmEstablished bit from a locality.
    ResetEstablished(u8),
    /// `-v`: store the volatile state.
    StoreVolatile,
    /// `-C`: cancel the running TPM command.
    Cancel,
    /// `-l LOC`: set the locality of the following TPM commands.
    Locality(u8),
    /// `-g`: the configuration flags (which keys are in use).
    Config,
    /// `-b SIZE`: set (0: only read) the TPM's I/O buffer size.
    BufferSize(u32),
    /// `--info FLAGS`: implementation details as JSON.
    Info(u64),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run { target: Target, command: Command },
    Help,
    Version,
}

/// Parses swtpm_ioctl's arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Parsed, IoctlError> {
    let mut target = None;
    let mut command = None;
    let mut device = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(stripped) = arg.strip_prefix('-').filter(|s| !s.is_empty()) else {
            device = Some(arg.clone());
            continue;
        };
        let stripped = stripped.strip_prefix('-').unwrap_or(stripped);
        let (name, inline) = match stripped.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (stripped, None),
        };
        let mut value = |option: &'static str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(IoctlError::MissingValue(option))
        };
        let next = match name {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            "unix" => {
                target = Some(Target::Unix(PathBuf::from(value("--unix")?)));
                continue;
            }
            "tcp" => {
                target = Some(tcp_target(&value("--tcp")?)?);
                continue;
            }
            "tpm-device" => return Err(IoctlError::Device(value("--tpm-device")?)),
            "c" => Command::Capability,
            "i" => Command::Init,
            "stop" => Command::Stop,
            "s" => Command::Shutdown,
            "e" => Command::Established,
            "v" => Command::StoreVolatile,
            "C" => Command::Cancel,
            "g" => Command::Config,
            "r" => Command::ResetEstablished(locality(&value("-r")?)?),
            "l" => Command::Locality(locality(&value("-l")?)?),
            "b" => Command::BufferSize(number("-b", &value("-b")?)?),
            "info" => Command::Info(number("--info", &value("--info")?)?),
            "h" => return Err(IoctlError::Unsupported("-h (hashing data)")),
            "save" | "load" => return Err(IoctlError::Unsupported("--save/--load of state blobs")),
            _ => return Err(IoctlError::UnknownOption(arg.clone())),
        };
        if command.replace(next).is_some_and(|prev| prev != next) {
            return Err(IoctlError::TwoCommands);
        }
    }
    let target = match (target, device) {
        (Some(t), _) => t,
        (None, Some(d)) => return Err(IoctlError::Device(d)),
        (None, None) => return Err(IoctlError::NoTarget),
    };
    let command = command.ok_or(IoctlError::NoCommand)?;
    Ok(Parsed::Run { target, command })
}

fn locality(s: &str) -> Result<u8, IoctlError> {
    let n: u32 = s
        .parse()
        .map_err(|_| IoctlError::BadLocality(s.to_string()))?;
    u8::try_from(n)
        .ok()
        .filter(|l| *l <= 4)
        .ok_or(IoctlError::LocalityRange)
}

fn number<T: std::str::FromStr>(option: &'static str, s: &str) -> Result<T, IoctlError> {
    s.parse().map_err(|_| IoctlError::BadNumber {
        option,
        value: s.to_string(),
    })
}

/// `HOST`, `:PORT`, `HOST:PORT` or `:` (swtpm_ioctl's forms; the host
/// defaults to 127.0.0.1, the port to 6546).
fn tcp_target(s: &str) -> Result<Target, IoctlError> {
    let (host, port) = match s.rsplit_once(':') {
        None => (s, DEFAULT_TCP_PORT),
        Some((h, "")) => (h, DEFAULT_TCP_PORT),
        Some((h, p)) => (
            h,
            p.parse().map_err(|_| IoctlError::BadPort(p.to_string()))?,
        ),
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok(Target::Tcp(host.to_string(), port))
}

trait Channel: Read + Write {}
impl<T: Read + Write> Channel for T {}

fn connect(target: &Target) -> Result<Box<dyn Channel>, IoctlError> {
    let failed = |source| IoctlError::Connect {
        target: match target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp(h, p) => format!("{h}:{p}"),
        },
        source,
    };
    Ok(match target {
        Target::Unix(path) => {
            let s = UnixStream::connect(path).map_err(failed)?;
            s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(failed)?;
            s.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(failed)?;
            Box::new(s)
        }
        Target::Tcp(host, port) => {
            let s = TcpStream::connect((host.as_str(), *port)).map_err(failed)?;
            s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(failed)?;
            s.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(failed)?;
            Box::new(s)
        }
    })
}

/// swtpm_ioctl's name for a command in its messages.
fn ptm_name(code: u32) -> &'static str {
    match code {
        cmd::GET_CAPABILITY => "PTM_GET_CAPABILITY",
        cmd::INIT => "PTM_INIT",
        cmd::SHUTDOWN => "PTM_SHUTDOWN",
        cmd::GET_TPMESTABLISHED => "PTM_GET_TPMESTABLISHED",
        cmd::SET_LOCALITY => "PTM_SET_LOCALITY",
        cmd::CANCEL_TPM_CMD => "PTM_CANCEL_TPM_CMD",
        cmd::STORE_VOLATILE => "PTM_STORE_VOLATILE",
        cmd::RESET_TPMESTABLISHED => "PTM_RESET_TPMESTABLISHED",
        cmd::STOP => "PTM_STOP",
        cmd::GET_CONFIG => "PTM_GET_CONFIG",
        cmd::SET_BUFFERSIZE => "PTM_SET_BUFFERSIZE",
        _ => "PTM_GET_INFO",
    }
}

/// One request on an open channel: sends `code` and `body`, checks the
/// result word and returns the `extra` bytes that follow it on success.
fn call(ch: &mut dyn Channel, code: u32, body: &[u8], extra: usize) -> Result<Vec<u8>, IoctlError> {
    let name = ptm_name(code);
    let io = |source| IoctlError::Io { name, source };
    let mut req = code.to_be_bytes().to_vec();
    req.extend_from_slice(body);
    ch.write_all(&req).map_err(io)?;
    let mut word = [0u8; 4];
    ch.read_exact(&mut word).map_err(io)?;
    let result = u32::from_be_bytes(word);
    // GET_CAPABILITY's 8 bytes are one u64 with no result word.
    if result != 0 && code != cmd::GET_CAPABILITY {
        return Err(IoctlError::Tpm { name, result });
    }
    let mut rest = vec![0u8; extra];
    ch.read_exact(&mut rest).map_err(io)?;
    if code == cmd::GET_CAPABILITY {
        rest.splice(0..0, word);
    }
    Ok(rest)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Runs `command` on `target`; returns what swtpm_ioctl prints on stdout.
pub fn run(target: &Target, command: Command) -> Result<String, IoctlError> {
    let mut ch = connect(target)?;
    let ch = ch.as_mut();
    Ok(match command {
        Command::Capability => {
            let r = call(ch, cmd::GET_CAPABILITY, &[], 4)?;
            let caps = u64::from_be_bytes(r[..8].try_into().unwrap_or_default());
            format!("ptm capability is {caps:#x}\n")
        }
        Command::Init => {
            call(ch, cmd::INIT, &INIT_FLAG_DELETE_VOLATILE.to_be_bytes(), 0)?;
            String::new()
        }
        Command::Stop | Command::Shutdown | Command::StoreVolatile | Command::Cancel => {
            let code = match command {
                Command::Stop => cmd::STOP,
                Command::Shutdown => cmd::SHUTDOWN,
                Command::StoreVolatile => cmd::STORE_VOLATILE,
                _ => cmd::CANCEL_TPM_CMD,
            };
            call(ch, code, &[], 0)?;
            String::new()
        }
        Command::Established => {
            let r = call(ch, cmd::GET_TPMESTABLISHED, &[], 4)?;
            format!("tpmEstablished is {}\n", r[0])
        }
        Command::ResetEstablished(loc) => {
            call(ch, cmd::RESET_TPMESTABLISHED, &[loc, 0, 0, 0], 0)?;
            String::new()
        }
        Command::Locality(loc) => {
            call(ch, cmd::SET_LOCALITY, &[loc, 0, 0, 0], 0)?;
            String::new()
        }
        Command::Config => {
            let r = call(ch, cmd::GET_CONFIG, &[], 4)?;
            format!("ptm configuration flags: {:#x}\n", be32(&r, 0))
        }
        Command::BufferSize(size) => {
            let r = call(ch, cmd::SET_BUFFERSIZE, &size.to_be_bytes(), 12)?;
            format!(
                "TPM buffersize: {}\nminimum size  : {}\nmaximum size  : {}\n",
                be32(&r, 0),
                be32(&r, 4),
                be32(&r, 8)
            )
        }
        Command::Info(flags) => info(ch, flags)?,
    })
}

/// GET_INFO, chunk by chunk: each answer is `total`, `length` and that
/// many bytes (at most one chunk); the document may not grow past
/// [`MAX_INFO`].
fn info(ch: &mut dyn Channel, flags: u64) -> Result<String, IoctlError> {
    let name = ptm_name(cmd::GET_INFO);
    let mut doc = Vec::new();
    loop {
        let mut body = flags.to_be_bytes().to_vec();
        body.extend_from_slice(&(doc.len() as u32).to_be_bytes());
        body.extend_from_slice(&[0; 4]);
        let head = call(ch, cmd::GET_INFO, &body, 8)?;
        let (total, len) = (be32(&head, 0), be32(&head, 4));
        if total > MAX_INFO {
            return Err(IoctlError::InfoTooLarge { name, size: total });
        }
        let len = (len as usize).min(INFO_CHUNK);
        let mut chunk = vec![0u8; len];
        ch.read_exact(&mut chunk)
            .map_err(|source| IoctlError::Io { name, source })?;
        doc.extend_from_slice(&chunk);
        if len == 0 || doc.len() >= total as usize {
            break;
        }
    }
    // The document is a C string: its NUL and anything after it go.
    let text = doc.split(|b| *b == 0).next().unwrap_or_default();
    Ok(format!("{}\n", String::from_utf8_lossy(text)))
}

/// swtpm_ioctl's `--help`.
pub const USAGE: &str = "\
Usage: swtpm_ioctl command (--unix <path> | --tcp [<host>]:[<port>])

vtpmctl as swtpm_ioctl: one command on a vTPM's control socket (vtpmd or swtpm).
--tcp [<host>]:[<prt>]: connect to TPM on given host and port;
                        default host is 127.0.0.1, default port is 6546
--unix <path>         : connect to TPM using UnixIO socket
-c                    : get ptm capabilities
-i                    : do a hardware TPM_Init; if volatile state is found,
                        it will resume the TPM with it and delete it
                        afterwards
--stop                : stop the TPM without exiting
-s                    : shutdown the TPM; stops and exits
-e                    : get the tpmEstablished bit
-r <loc>              : reset the tpmEstablished bit; use the given locality
-v                    : store the TPM's volatile data
-C                    : cancel an ongoing TPM command
-l <loc>              : set the locality to the given number; valid
                        localities are 0-4
-g                    : get configuration flags indicating which keys are in
                        use
-b <buffersize>       : set the buffer size of the TPM and get its current
                        size; get minimum and maximum supported sizes
--info <flags>        : get TPM implementation specific information;
                        flags must be an integer value
--version             : display version and exit
--help                : display help screen and exit

Not supported here (swtpm's own swtpm_ioctl has them): --tpm-device (swtpm
cuse), -h <data>, --save and --load.
";

/// The whole `swtpm_ioctl` personality: arguments in, exit status out.
pub fn main(args: &[String]) -> u8 {
    let outcome = parse(args).and_then(|p| match p {
        Parsed::Help => Ok(USAGE.to_string()),
        Parsed::Version => Ok(format!(
            "TPM emulator control tool (vtpmctl {}), swtpm_ioctl compatible\n",
            env!("CARGO_PKG_VERSION")
        )),
        Parsed::Run { target, command } => run(&target, command),
    });
    match outcome {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, IoctlError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn run_on(path: &str, command: Command) -> Parsed {
        Parsed::Run {
            target: Target::Unix(PathBuf::from(path)),
            command,
        }
    }

    #[test]
    fn libvirts_stop_command() {
        assert_eq!(
            p(&["--unix", "/run/x.sock", "-s"]).unwrap(),
            run_on("/run/x.sock", Command::Shutdown)
        );
        // One or two dashes, `=value`, options in any order.
        assert_eq!(
            p(&["-s", "-unix=/run/x.sock"]).unwrap(),
            run_on("/run/x.sock", Command::Shutdown)
        );
        assert_eq!(
            p(&["--s", "--unix", "/a"]).unwrap(),
            run_on("/a", Command::Shutdown)
        );
    }

    #[test]
    fn every_command() {
        let cases: &[(&[&str], Command)] = &[
            (&["-c"], Command::Capability),
            (&["-i"], Command::Init),
            (&["--stop"], Command::Stop),
            (&["-e"], Command::Established),
            (&["-r", "3"], Command::ResetEstablished(3)),
            (&["-v"], Command::StoreVolatile),
            (&["-C"], Command::Cancel),
            (&["-l", "4"], Command::Locality(4)),
            (&["-g"], Command::Config),
            (&["-b", "2048"], Command::BufferSize(2048)),
            (&["--info", "3"], Command::Info(3)),
        ];
        for (args, command) in cases {
            let mut v = vec!["--unix", "/s"];
            v.extend_from_slice(args);
            assert_eq!(p(&v).unwrap(), run_on("/s", *command), "{args:?}");
        }
        assert_eq!(p(&["--help"]).unwrap(), Parsed::Help);
        assert_eq!(p(&["--version", "-s"]).unwrap(), Parsed::Version);
    }

    #[test]
    fn tcp_forms() {
        let t = |s: &str| tcp_target(s).unwrap();
        assert_eq!(t("host"), Target::Tcp("host".into(), 6546));
        assert_eq!(t(":2322"), Target::Tcp("127.0.0.1".into(), 2322));
        assert_eq!(t("10.0.0.1:99"), Target::Tcp("10.0.0.1".into(), 99));
        assert_eq!(t(":"), Target::Tcp("127.0.0.1".into(), 6546));
        assert!(matches!(tcp_target("h:port"), Err(IoctlError::BadPort(_))));
        assert!(matches!(tcp_target("h:70000"), Err(IoctlError::BadPort(_))));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        let err = |args: &[&str]| p(args).unwrap_err().to_string();
        assert_eq!(err(&["-s"]), "Error: Missing device name.");
        assert_eq!(err(&["--unix", "/s"]), "No valid command.");
        assert_eq!(
            err(&["--unix", "/s", "-s", "-c"]),
            "Only one command may be given."
        );
        assert!(err(&["--unix"]).contains("needs a value"));
        assert_eq!(
            err(&["--unix", "/s", "-l", "5"]),
            "Locality outside valid range of [0..4]."
        );
        assert!(err(&["--unix", "/s", "-l", "x"]).contains("locality number from x"));
        assert!(err(&["--unix", "/s", "-b", "-1"]).contains("invalid number '-1' for -b"));
        assert!(err(&["--unix", "/s", "--bogus"]).contains("unknown option '--bogus'"));
        assert!(err(&["/dev/vtpm0", "-s"]).contains("not to swtpm cuse devices"));
        assert!(err(&["--tpm-device", "/dev/vtpm0", "-s"]).contains("control sockets only"));
        assert!(err(&["--unix", "/s", "--save", "permanent", "f"]).contains("not supported"));
        assert!(err(&["--unix", "/s", "-h", "data"]).contains("not supported"));
    }

    #[test]
    fn a_missing_socket_is_named() {
        let e = run(
            &Target::Unix("/nonexistent/vtpm.sock".into()),
            Command::Shutdown,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vtpm.sock"), "{e}");
    }
}
