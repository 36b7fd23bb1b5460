//! swtpm_setup's log: with `--logfile` every line is appended to the file
//! (created 0600, never through a symbolic link) and errors also go to
//! stderr; without it, progress goes to stdout and errors to stderr.
//! Secrets (passphrases, keys) are never passed here.

use crate::storage::files;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Mode of a log file vtpm-setup creates.
pub const LOG_MODE: u32 = 0o600;

#[derive(Debug)]
pub struct SetupLog {
    file: Option<File>,
}

impl SetupLog {
    /// Logs to stdout/stderr.
    pub fn console() -> SetupLog {
        SetupLog { file: None }
    }

    /// Appends to `path`. An existing file keeps its mode (libvirt creates
    /// it and hands it to the user it runs vtpm-setup as).
    pub fn open(path: &Path) -> std::io::Result<SetupLog> {
        let existed = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
        let f = if existed {
            std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| nofollow_error(path, e))?
        } else {
            files::open_append(path, LOG_MODE, false)?
        };
        Ok(SetupLog { file: Some(f) })
    }

    pub fn info(&mut self, msg: &str) {
        match &mut self.file {
            Some(f) => {
                let _ = writeln!(f, "{msg}");
            }
            None => println!("{msg}"),
        }
    }

    pub fn error(&mut self, msg: &str) {
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{msg}");
        }
        eprintln!("vtpm-setup: {msg}");
    }
}

fn nofollow_error(path: &Path, e: std::io::Error) -> std::io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; vtpm-setup does not follow links for files it writes",
                path.display()
            ),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn log_file_appends_refuses_links_and_keeps_existing_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("setup.log");
        SetupLog::open(&p).unwrap().info("one");
        SetupLog::open(&p).unwrap().error("two");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\ntwo\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        SetupLog::open(&p).unwrap().info("three");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = d.path().join("link.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = SetupLog::open(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
