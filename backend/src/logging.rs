//! A small `log` backend: timestamped lines to a file or stderr.
//! TPM command contents are never logged, only codes and sizes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "{} vtpmd[{}] {}: {}\n",
            timestamp(),
            std::process::id(),
            r.level(),
            r.args()
        );
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
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

/// Whether log lines already go to stderr (no `--log file=`), so a caller
/// reporting an error there need not print it twice.
pub fn logs_to_stderr() -> bool {
    TO_STDERR.load(Ordering::SeqCst)
}

/// Installs the logger: to a file at a level (created 0600, never
/// through a symlink), to stderr at a level (`--log level=N`), or, without
/// `--log`, warnings to stderr.
pub fn init(log: Option<(Option<&std::path::Path>, u32, bool)>) -> std::io::Result<()> {
    let (out, level): (Box<dyn Write + Send>, _) = match log {
        Some((Some(path), n, truncate)) => {
            let f = crate::storage::files::open_append(path, LOG_FILE_MODE, truncate)?;
            (Box::new(f), level_for(n))
        }
        Some((None, n, _)) => {
            TO_STDERR.store(true, Ordering::SeqCst);
            (Box::new(std::io::stderr()), level_for(n))
        }
        None => {
            TO_STDERR.store(true, Ordering::SeqCst);
            (Box::new(std::io::stderr()), log::LevelFilter::Warn)
        }
    };
    let logger = Logger {
        out: Mutex::new(out),
        level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
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
