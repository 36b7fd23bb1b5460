//! Confinement on a real vtpmd: the seccomp filter is installed by default
//! (and not with action=none), Landlock keeps file access to what the
//! daemon needs, and --runas drops root, with the TPM working throughout.

use common::*;
use std::os::unix::fs::PermissionsExt;
use vtpm_test_support as common;

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn works(d: &Daemon) {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut s = c.qemu_start(4096);
    assert_eq!(rc(&tpm(&mut s, &cmd::startup_clear())), 0);
    assert_eq!(rc(&tpm(&mut s, &cmd::nv_define(0x0150_0060, 8))), 0);
    assert_eq!(
        rc(&tpm(&mut s, &cmd::nv_write(0x0150_0060, b"confined"))),
        0
    );
}

#[test]
fn seccomp_and_landlock_by_default_and_none_turns_them_off() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &[]);
    works(&d);
    assert_eq!(status_field(d.child.id(), "Seccomp:"), "2", "filter mode");
    let log = d.log_text();
    assert!(log.contains("seccomp filter installed"), "{log}");
    assert!(log.contains("Landlock"), "{log}");
    drop(d);
    let t = state_dir();
    let d = Daemon::start(t.path(), &["--seccomp", "action=none"]);
    works(&d);
    assert_eq!(status_field(d.child.id(), "Seccomp:"), "0");
}

#[test]
fn runas_drops_root_and_the_tpm_still_works() {
    let t = state_dir();
    let state = t.path().join("state");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&state, Some(nobody.uid), Some(nobody.gid)).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(t.path(), &["--runas", "nobody"]);
    works(&d);
    let uids = status_field(d.child.id(), "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == nobody.uid.to_string()),
        "uids {uids}"
    );
    let owner = std::fs::metadata(state.join("tpm2-00.permall")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&owner),
        nobody.uid.as_raw()
    );
}
