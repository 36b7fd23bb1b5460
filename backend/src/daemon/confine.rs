//! Confinement, installed once the sockets are bound and the state is open:
//!
//! * `--runas USER`: the process drops to USER's uid, gid and groups.
//! * Landlock (where the kernel has it): from here on the process may
//!   touch files only under the state directory, the log and pid files,
//!   the directories of its sockets and pid file (to remove them at exit),
//!   the trusted-peers directory (read), and read system libraries and
//!   configuration (OpenSSL may load a provider or its config late).
//! * seccomp (`--seccomp action=kill|log|none`, default kill): a syscall
//!   outside [`ALLOWED`] kills the process (or is logged by the kernel,
//!   with `log`). The list is what vtpmd needs to serve, measured by
//!   running the whole test suite under strace; see README's
//!   "Confinement".
//!
//! To debug a kill: run with `--seccomp action=log` and read the kernel
//! log (`dmesg | grep 'type=1326'`, syscall=N), or run under
//! `strace -f` and look at the last syscall before SIGSYS.

use crate::config::SeccompMode;
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfineError {
    #[error("--runas {0}: no such user")]
    NoUser(String),
    #[error("--runas {user}: cannot drop privileges: {source}")]
    Runas {
        user: String,
        source: nix::errno::Errno,
    },
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    SeccompInstall(#[from] seccompiler::Error),
    #[error("cannot set up Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

/// Where the process may still reach the file system once confined.
#[derive(Debug, Clone, Default)]
pub struct FileAccess {
    /// Read and write everything beneath.
    pub state_dir: PathBuf,
    /// Write (append) only.
    pub log_file: Option<PathBuf>,
    /// Files created at start-up and removed at exit (sockets, pid file).
    pub removable: Vec<PathBuf>,
    /// Read only (trusted peers).
    pub readable: Vec<PathBuf>,
}

/// Syscalls vtpmd makes while serving: both frontends, libtpms and
/// OpenSSL, the admin socket, signals, state writes and clean exit.
pub const ALLOWED: &[libc::c_long] = &[
    // memory
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // threads, time, scheduling
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prctl,
    libc::SYS_access,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tgkill,
    // signals
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // the kernel resuming a timed wait (poll, futex, nanosleep) that a stop
    // signal or a tracer interrupted (SIGSTOP/SIGCONT, strace, gdb)
    libc::SYS_restart_syscall,
    // files (state writes, log, pid removal)
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_close,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_ftruncate,
    // sockets (accept, data, descriptor passing)
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // waiting (vhost-user epoll, poll for a hung-up data peer)
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
];

fn seccomp_program(mode: SeccompMode) -> Result<Option<BpfProgram>, ConfineError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Resource limits of this process only (the C library reads them).
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            0,
        )?])?],
    );
    let filter = SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into().map_err(|_| {
            seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into())
        })?,
    )?;
    Ok(Some(filter.try_into()?))
}

/// Drops to `user` (uid, primary gid, no supplementary groups).
pub fn run_as(user: &str) -> Result<(), ConfineError> {
    use nix::unistd::{setgid, setgroups, setuid, User};
    let u = User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(|| ConfineError::NoUser(user.into()))?;
    let err = |source| ConfineError::Runas {
        user: user.into(),
        source,
    };
    setgroups(&[u.gid]).map_err(err)?;
    setgid(u.gid).map_err(err)?;
    setuid(u.uid).map_err(err)?;
    log::info!("running as {user} (uid {}, gid {})", u.uid, u.gid);
    Ok(())
}

/// Limits file access to `access` where the kernel supports Landlock.
pub fn restrict_files(access: &FileAccess) -> Result<(), ConfineError> {
    let abi = ABI::V3;
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> =
        vec![(access.state_dir.clone(), all)];
    if let Some(l) = &access.log_file {
        rules.push((l.clone(), AccessFs::WriteFile | AccessFs::Truncate));
    }
    for p in &access.removable {
        if let Some(parent) = p.parent() {
            rules.push((parent.to_path_buf(), AccessFs::RemoveFile.into()));
        }
    }
    for p in &access.readable {
        rules.push((p.clone(), read));
    }
    for sys in ["/usr/lib", "/lib", "/etc/ssl"] {
        rules.push((PathBuf::from(sys), read));
    }
    let mut ruleset = Ruleset::default().handle_access(all)?.create()?;
    for (path, flags) in &rules {
        // A path that does not exist (an optional system directory) is
        // simply not granted.
        if let Ok(fd) = PathFd::new(path) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, *flags))?;
        }
    }
    let status = ruleset.restrict_self()?;
    match status.ruleset {
        RulesetStatus::NotEnforced => {
            log::warn!("Landlock is not available in this kernel: file access is not restricted")
        }
        s => log::info!("Landlock file access restriction: {s:?}"),
    }
    Ok(())
}

/// Installs the seccomp filter on every thread of the process.
pub fn install_seccomp(mode: SeccompMode) -> Result<(), ConfineError> {
    if let Some(prog) = seccomp_program(mode)? {
        seccompiler::apply_filter_all_threads(&prog)?;
        log::info!(
            "seccomp filter installed ({} syscalls, action {mode:?})",
            ALLOWED.len()
        );
    }
    Ok(())
}

/// Everything above, in order: drop privileges, restrict files, then
/// seccomp (last: the first two need syscalls the filter refuses).
pub fn confine(
    runas: Option<&str>,
    access: &FileAccess,
    seccomp: SeccompMode,
    landlock: bool,
) -> Result<(), ConfineError> {
    if let Some(u) = runas {
        run_as(u)?;
    }
    if landlock {
        restrict_files(access)?;
    }
    install_seccomp(seccomp)
}

/// Whether `p` is absolute (Landlock rules need real paths).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_for_every_mode() {
        assert!(seccomp_program(SeccompMode::None).unwrap().is_none());
        assert!(seccomp_program(SeccompMode::Kill).unwrap().is_some());
        assert!(seccomp_program(SeccompMode::Log).unwrap().is_some());
    }

    #[test]
    fn unknown_user_is_refused_by_name() {
        let e = run_as("no-such-user-vtpmd").unwrap_err();
        assert!(e.to_string().contains("no-such-user-vtpmd"), "{e}");
    }
}
