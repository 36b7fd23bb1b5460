//! Creating files an attacker on the same host cannot redirect: every file
//! vtpmd creates (state temporaries, tombstone, pid file) goes through
//! [`create_new`], the log through [`open_append`], lock files through
//! [`open_lock_file`].
//!
//! * A planted symlink is never followed (`O_NOFOLLOW`), and a planted file
//!   or hard link is never written through: whatever sits at the path is
//!   unlinked first (unlinking removes the link, not its target) and the
//!   file is then created exclusively (`O_EXCL`).
//! * The mode is explicit and set on the open descriptor, whatever the
//!   umask.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub use vtpm_common::statedir::create_new;

/// Opens (creating it 0600 if absent) a lock file, never through a link;
/// its content is left alone.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` for appending (or truncates it), creating it with `mode`;
/// a symlink at `path` is refused, not followed.
pub fn open_append(path: &Path, mode: u32, truncate: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(!truncate)
        .write(true)
        .truncate(truncate)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{} is a symbolic link; vtpmd does not follow links for files it writes",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn log_refuses_symlinks_and_sets_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let link = d.path().join("vtpmd.log");
        symlink(&victim, &link).unwrap();
        let e = open_append(&link, 0o600, false).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let log = d.path().join("real.log");
        open_append(&log, 0o600, false).unwrap();
        let mode = fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(open_append(d.path(), 0o600, false).is_err(), "a directory");
    }
}
