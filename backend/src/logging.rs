//! A small `log` backend: timestamped lines to a file, an inherited
//! descriptor or stderr, and, once a `--daemon` has detached from stderr,
//! to syslog. TPM command contents are never logged, only codes and sizes.
//! With `--log file=`, warnings and errors also go to stderr while it is
//! attached: whoever started vtpmd (libvirt keeps it for the domain's
//! swtpm log) sees why something was refused, whatever the log level.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the syslog socket is (`VTPMD_SYSLOG_SOCKET` overrides, for
/// containers without `/dev/log`).
pub const SYSLOG_SOCKET: &str = "/dev/log";

enum Sink {
    Stream(Box<dyn Write + Send>),
    /// A connected syslog datagram socket (RFC 3164 lines).
    Syslog(UnixDatagram),
    /// Detached, and no syslog: lines are dropped (the user was told).
    Nowhere,
}

struct Logger {
    out: Mutex<Sink>,
    level: log::LevelFilter,
    prefix: String,
    /// Copy warnings and errors to stderr (the log goes to a file).
    mirror: bool,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level || (self.mirror && m.level() <= log::Level::Warn)
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.mirror && r.level() <= log::Level::Warn && !STDERR_GONE.load(Ordering::SeqCst) {
            // Bounded, so a caller that never reads stderr (a pipe) cannot
            // stall the process: the log file has everything.
            let n = MIRRORED.fetch_add(1, Ordering::SeqCst);
            if n < MAX_MIRRORED {
                let _ = writeln!(
                    std::io::stderr(),
                    "{}vtpmd: {}: {}",
                    self.prefix,
                    r.level(),
                    r.args()
                );
            } else if n == MAX_MIRRORED {
                let _ = writeln!(
                    std::io::stderr(),
                    "vtpmd: further warnings and errors only in the log file"
                );
            }
        }
        if r.level() > self.level {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *out {
            Sink::Stream(w) => {
                let line = format!(
                    "{}{} vtpmd[{}] {}: {}\n",
                    self.prefix,
                    timestamp(),
                    std::process::id(),
                    r.level(),
                    r.args()
                );
                let _ = w.write_all(line.as_bytes());
                let _ = w.flush();
            }
            Sink::Syslog(s) => {
                // facility daemon (3); severity from the level.
                let severity = match r.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                let line = format!(
                    "<{}>vtpmd[{}]: {}{}",
                    3 * 8 + severity,
                    std::process::id(),
                    self.prefix,
                    r.args()
                );
                let _ = s.send(line.as_bytes());
            }
            Sink::Nowhere => {}
        }
    }

    fn flush(&self) {}
}

/// swtpm-style numeric level to a filter.
pub fn level_for(n: u32) -> log::LevelFilter {
    match n {
        0 => log::LevelFilter::Error,
        1..=4 => log::LevelFilter::Info,
        5..=19 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Mode of a log file vtpmd creates.
pub const LOG_FILE_MODE: u32 = 0o600;

static TO_STDERR: AtomicBool = AtomicBool::new(false);
/// Warnings and errors copied to stderr so far, and the most copied.
static MIRRORED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_MIRRORED: usize = 200;
/// A `--daemon` detached from the caller's stderr.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);
static LOGGER: std::sync::OnceLock<&'static Logger> = std::sync::OnceLock::new();
static SYSLOG: Mutex<Option<UnixDatagram>> = Mutex::new(None);

/// Whether log lines go to stderr (no `--log file=/fd=`), so a caller
/// reporting an error there need not print it twice.
pub fn logs_to_stderr() -> bool {
    TO_STDERR.load(Ordering::SeqCst)
}

/// Whether an error logged now also appears on stderr (the log goes there,
/// or a log file's errors are copied there), so a caller reporting it
/// need not print it twice.
pub fn errors_reach_stderr() -> bool {
    logs_to_stderr()
        || (LOGGER.get().is_some_and(|l| l.mirror)
            && !STDERR_GONE.load(Ordering::SeqCst)
            && MIRRORED.load(Ordering::SeqCst) < MAX_MIRRORED)
}

/// Where log lines go.
#[derive(Debug)]
pub enum Output {
    /// `--log file=`: created 0600, never through a symlink.
    File {
        path: std::path::PathBuf,
        truncate: bool,
    },
    /// `--log fd=N`, already taken over.
    Fd(std::fs::File),
    /// `--log level=N` alone, or no `--log` (then warnings and errors).
    Stderr,
}

/// Installs the logger. `level`: `None` without `--log`.
pub fn init(output: Output, level: Option<u32>, prefix: Option<&str>) -> std::io::Result<()> {
    let filter = level.map(level_for).unwrap_or(log::LevelFilter::Warn);
    let mirror = matches!(output, Output::File { .. });
    let out: Box<dyn Write + Send> = match output {
        Output::File { path, truncate } => Box::new(crate::storage::files::open_append(
            &path,
            LOG_FILE_MODE,
            truncate,
        )?),
        Output::Fd(f) => Box::new(f),
        Output::Stderr => {
            TO_STDERR.store(true, Ordering::SeqCst);
            Box::new(std::io::stderr())
        }
    };
    let prefix = prefix.map(|p| format!("{p} ")).unwrap_or_default();
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        out: Mutex::new(Sink::Stream(out)),
        level: filter,
        prefix,
        mirror,
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(if mirror {
            filter.max(log::LevelFilter::Warn)
        } else {
            filter
        });
        let _ = LOGGER.set(logger);
    }
    Ok(())
}

/// Before a `--daemon` confines itself: connects to syslog if log lines
/// go to stderr, which is about to be closed. Says on stderr (still the
/// caller's) if there is no syslog to go to.
pub fn prepare_syslog() {
    if !logs_to_stderr() {
        return;
    }
    let path = std::env::var_os("VTPMD_SYSLOG_SOCKET")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| SYSLOG_SOCKET.into());
    let sock = UnixDatagram::unbound().and_then(|s| s.connect(&path).map(|()| s));
    match sock {
        Ok(s) => *SYSLOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
        Err(e) => eprintln!(
            "vtpmd: warning: no syslog at {} ({e}): errors after start-up will not be recorded; add --log file=PATH",
            path.display()
        ),
    }
}

/// A `--daemon` detached: log lines meant for stderr go to syslog (or
/// nowhere, as [`prepare_syslog`] warned).
pub fn detach_from_stderr() {
    STDERR_GONE.store(true, Ordering::SeqCst);
    if !logs_to_stderr() {
        return;
    }
    if let Some(l) = LOGGER.get() {
        let sink = match SYSLOG.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(s) => Sink::Syslog(s),
            None => Sink::Nowhere,
        };
        *l.out.lock().unwrap_or_else(|e| e.into_inner()) = sink;
    }
    TO_STDERR.store(false, Ordering::SeqCst);
}

/// UTC time as 2026-11-22T12:00:00.123Z.
fn timestamp() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn levels() {
        assert_eq!(super::level_for(20), log::LevelFilter::Trace);
        assert_eq!(super::level_for(1), log::LevelFilter::Info);
    }
}
