//! `vtpmctl reserve-incoming` (the destination's half of `vtpmctl
//! migrate`) on real directories: what it makes, what it refuses.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vtpm_common::statedir::{self, Reservation};

const VTPMCTL: &str = env!("CARGO_BIN_EXE_vtpmctl");

fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name
}

struct Fixture {
    t: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            t: tempfile::tempdir().unwrap(),
        }
    }

    /// libvirt's layout: swtpm/UUID/tpm2, none of it there yet.
    fn dir(&self) -> PathBuf {
        self.t
            .path()
            .join("swtpm/5e3a9c1e-7d7e-4a8b-9c71-0b6f5a2d4e11/tpm2")
    }

    fn keys(&self) -> PathBuf {
        self.t.path().join("hostkey")
    }

    fn vtpmctl(&self, args: &[&str]) -> Output {
        Command::new(VTPMCTL)
            .args(args)
            .env("VTPM_HOST_KEY_DIR", self.keys())
            .output()
            .unwrap()
    }

    fn reserve(&self, extra: &[&str]) -> Output {
        let dir = self.dir();
        let owner = me();
        let mut args = vec![
            "reserve-incoming",
            "--state-dir",
            dir.to_str().unwrap(),
            "--owner",
            &owner,
        ];
        args.extend_from_slice(extra);
        self.vtpmctl(&args)
    }

    fn cancel(&self) -> serde_json::Value {
        ok(&self.vtpmctl(&[
            "reserve-incoming",
            "--cancel",
            "--state-dir",
            self.dir().to_str().unwrap(),
        ]))
    }
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The refusal's text (exit status 1, `{"error": ...}`).
fn refused(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["error"].as_str().unwrap().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_fresh_reservation_is_made_as_libvirt_makes_the_directory() {
    let f = Fixture::new();
    let v = ok(&f.reserve(&["--expires", "60"]));
    let dir = f.dir();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(
        mode(dir.parent().unwrap()),
        0o711,
        "libvirt's per-domain directory"
    );
    let id = v["migration_id"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(v["public_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    assert!(v["replaced"].is_null());

    // The system key was made on first use in $VTPM_HOST_KEY_DIR.
    let key = vtpm_common::hostkey::HostKey::load(&f.keys().join("host-key.pem")).unwrap();
    assert_eq!(v["key_fingerprint"], key.fingerprint());

    let file = dir.join(statedir::RESERVATION);
    assert_eq!(mode(&file), 0o600);
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());
    let r: Reservation = statedir::read_json(&dir, statedir::RESERVATION)
        .unwrap()
        .unwrap();
    assert_eq!(r.migration_id, id);
    assert_eq!(r.host_key, key.fingerprint());
    assert!(
        r.expires >= now() + 55 && r.expires <= now() + 61,
        "{}",
        r.expires
    );

    // Again: a new id replaces the old one, with the same host key.
    let again = ok(&f.reserve(&[]));
    assert_ne!(again["migration_id"], v["migration_id"]);
    assert_eq!(again["replaced"], v["migration_id"]);
    assert_eq!(again["key_fingerprint"], v["key_fingerprint"]);

    // --cancel removes it, and the directory it left empty.
    let c = f.cancel();
    assert_eq!(c["cancelled"], again["migration_id"]);
    assert_eq!(c["removed_dir"], true);
    assert!(!dir.exists() && dir.parent().unwrap().exists());
    let c = f.cancel();
    assert!(c["cancelled"].is_null(), "nothing left to cancel: {c}");
}

#[test]
fn a_given_host_key_is_used() {
    let f = Fixture::new();
    let kd = f.t.path().join("given");
    ok(&f.vtpmctl(&["keygen", "--out", kd.to_str().unwrap()]));
    let key = vtpm_common::hostkey::HostKey::load(&kd.join("host-key.pem")).unwrap();
    let v = ok(&f.reserve(&["--host-key", kd.join("host-key.pem").to_str().unwrap()]));
    assert_eq!(v["key_fingerprint"], key.fingerprint());
    assert!(!f.keys().exists(), "no system key made when one is given");
    let e = refused(&f.reserve(&["--host-key", kd.join("nope.pem").to_str().unwrap()]));
    assert!(e.contains("--host-key FILE"), "{e}");
}

#[test]
fn bad_lifetimes_and_owners_are_refused_before_anything_is_made() {
    let f = Fixture::new();
    for bad in ["0", "86401"] {
        let e = refused(&f.reserve(&["--expires", bad]));
        assert!(e.contains("seconds, 1 to 86400"), "{e}");
    }
    let dir = f.dir();
    let o = f.vtpmctl(&[
        "reserve-incoming",
        "--state-dir",
        dir.to_str().unwrap(),
        "--owner",
        "no-such-user-here",
    ]);
    assert!(refused(&o).contains("swtpm_user"));
    assert!(!dir.exists());
}

#[test]
fn a_directory_holding_a_tpm_or_a_migration_record_is_refused() {
    for file in [
        "tpm2-00.permall",
        "vtpmd-00.permall",
        statedir::MARKER,
        statedir::TOMBSTONE,
    ] {
        let f = Fixture::new();
        std::fs::create_dir_all(f.dir()).unwrap();
        std::fs::write(f.dir().join(file), b"state").unwrap();
        let e = refused(&f.reserve(&[]));
        assert!(e.contains(file) && e.contains("mv "), "{e}");
        assert!(!f.dir().join(statedir::RESERVATION).exists());
        assert_eq!(std::fs::read(f.dir().join(file)).unwrap(), b"state");
        // --cancel leaves such a directory where it is.
        assert_eq!(f.cancel()["removed_dir"], false);
        assert!(f.dir().join(file).exists());
    }
}

#[test]
fn a_directory_a_tpm_process_holds_is_refused() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.dir()).unwrap();
    let held = statedir::lock(&f.dir()).unwrap();
    let e = refused(&f.reserve(&[]));
    assert!(e.contains("a TPM process runs on"), "{e}");
    let e = refused(&f.vtpmctl(&[
        "reserve-incoming",
        "--cancel",
        "--state-dir",
        f.dir().to_str().unwrap(),
    ]));
    assert!(e.contains("stop that domain"), "{e}");
    drop(held);
    ok(&f.reserve(&[]));
}

#[test]
fn symlinks_are_not_followed() {
    let f = Fixture::new();
    let victim = f.t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::create_dir_all(f.dir()).unwrap();
    let link = f.dir().join(statedir::RESERVATION);
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = refused(&f.reserve(&[]));
    assert!(e.contains("--cancel"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let e = refused(&f.leave_keys(&"01".repeat(32), &"ab".repeat(384)));
    assert!(e.contains("--cancel"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // --cancel removes the link, not its target.
    f.cancel();
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // The state directory itself a symlink, or a file.
    let g = Fixture::new();
    std::fs::create_dir_all(g.dir().parent().unwrap()).unwrap();
    let elsewhere = g.t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, g.dir()).unwrap();
    let e = refused(&g.reserve(&[]));
    assert!(e.contains("is not a directory"), "{e}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(g.dir()).unwrap();
    std::fs::write(g.dir(), b"").unwrap();
    assert!(refused(&g.reserve(&[])).contains("is not a directory"));
}

#[test]
fn a_reservation_that_is_not_one_is_refused_until_cancelled() {
    for junk in [
        &b""[..],
        b"{",
        b"{\"migration_id\": 5}",
        b"\xff\xfe garbage",
        &[b'x'; 70_000],
    ] {
        let f = Fixture::new();
        std::fs::create_dir_all(f.dir()).unwrap();
        std::fs::write(f.dir().join(statedir::RESERVATION), junk).unwrap();
        let e = refused(&f.reserve(&[]));
        assert!(
            e.contains("not a valid") && e.contains("reserve-incoming --cancel"),
            "{e}"
        );
        let c = f.cancel();
        assert!(c["cancelled"].is_null());
        ok(&f.reserve(&[]));
    }
    // An expired reservation is simply replaced.
    let f = Fixture::new();
    std::fs::create_dir_all(f.dir()).unwrap();
    let old = Reservation {
        migration_id: "ab".repeat(32),
        host_key: "cd".repeat(32),
        expires: 1,
        wrapped_key: None,
    };
    statedir::write_json(&f.dir(), statedir::RESERVATION, &old).unwrap();
    let v = ok(&f.reserve(&[]));
    assert_eq!(v["replaced"], old.migration_id);
}

#[test]
fn migrate_needs_a_way_to_reach_the_destination() {
    let f = Fixture::new();
    let e = refused(&f.vtpmctl(&["migrate", "vm", "qemu:///system"]));
    assert!(e.contains("--remote CMD"), "{e}");
    let e = refused(&f.vtpmctl(&["migrate", "vm", "qemu+ssh://dst/system", "--remote", " "]));
    assert!(e.contains("--remote is empty"), "{e}");
}

#[test]
fn state_dir_names_the_admin_socket_and_falls_back_to_the_directory() {
    use vtpm_test_support::{state_dir, Daemon};
    let t = state_dir();
    let dir = t.path().join("state");
    let sock = dir.join(statedir::ADMIN_SOCKET);
    let mut d = Daemon::start(
        t.path(),
        &[
            "--admin",
            &format!("path={}", sock.display()),
            "--no-host-key",
        ],
    );
    let f = Fixture::new();
    let dir_s = dir.to_str().unwrap();
    // A vtpmd listens there: the online answer (the TPM's phase).
    let v = ok(&f.vtpmctl(&["status", "--state-dir", dir_s]));
    assert_eq!(v["state"], "running", "{v}");
    assert!(v.get("tpm_running").is_some(), "online status: {v}");
    // Online-only commands take it too.
    let e = refused(&f.vtpmctl(&["receipt", "--state-dir", dir_s]));
    assert!(!e.contains("cannot reach"), "reached the admin socket: {e}");
    // vtpmd gone (its socket file left behind): the directory itself.
    d.kill9();
    let v = ok(&f.vtpmctl(&["status", "--state-dir", dir_s]));
    assert_eq!(v["state"], "no-migration", "offline status: {v}");
    let e = refused(&f.vtpmctl(&["receipt", "--state-dir", dir_s]));
    assert!(e.contains("cannot reach the admin socket"), "{e}");
}

#[test]
fn a_caller_that_cannot_give_the_directory_away_is_told_so() {
    // Run as nobody, asked to make the directory root's.
    if !nix::unistd::getuid().is_root() {
        return;
    }
    let f = Fixture::new();
    std::fs::set_permissions(f.t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let kd = f.t.path().join("given");
    ok(&f.vtpmctl(&["keygen", "--out", kd.to_str().unwrap()]));
    let key = kd.join("host-key.pem");
    std::fs::set_permissions(&kd, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", VTPMCTL])
        .args(["reserve-incoming", "--state-dir", f.dir().to_str().unwrap()])
        .args(["--owner", "root", "--host-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    let e = refused(&o);
    assert!(e.contains("run reserve-incoming as root"), "{e}");
}

impl Fixture {
    fn leave_keys(&self, id: &str, wrapped: &str) -> Output {
        self.vtpmctl(&[
            "reserve-incoming",
            "--state-dir",
            self.dir().to_str().unwrap(),
            "--id",
            id,
            "--wrapped-key",
            wrapped,
        ])
    }

    fn reservation(&self) -> Reservation {
        statedir::read_json(&self.dir(), statedir::RESERVATION)
            .unwrap()
            .unwrap()
    }
}

#[test]
fn wrapped_keys_are_left_with_the_reservation_for_their_id_only() {
    let f = Fixture::new();
    // Nothing reserved yet: no directory, then an empty one.
    let key = "ab".repeat(384);
    let e = refused(&f.leave_keys(&"01".repeat(32), &key));
    assert!(e.contains("holds no reservation"), "{e}");
    let id = ok(&f.reserve(&[]))["migration_id"]
        .as_str()
        .unwrap()
        .to_string();
    let file = f.dir().join(statedir::RESERVATION);
    let before = std::fs::read(&file).unwrap();
    // Garbage, truncated (odd length), empty and oversized keys.
    for bad in ["zz", "abc", "", &"ab".repeat(1025)] {
        let e = refused(&f.leave_keys(&id, bad));
        assert!(e.contains("--wrapped-key"), "{bad:?}: {e}");
    }
    // Another migration's id.
    let e = refused(&f.leave_keys(&"01".repeat(32), &key));
    assert!(e.contains(&id) && e.contains(&"01".repeat(32)), "{e}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "refusals change nothing"
    );
    // The right id: the key is added, nothing else changes.
    let v = ok(&f.leave_keys(&id, &key));
    assert_eq!(v["migration_id"], id.as_str());
    assert_eq!(v["wrapped_key_bytes"], 384);
    let r = f.reservation();
    assert_eq!(r.migration_id, id);
    assert_eq!(r.wrapped_key.as_deref(), Some(key.as_str()));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(
        std::fs::symlink_metadata(&file).unwrap().uid(),
        nix::unistd::getuid().as_raw()
    );
    // An expired reservation takes no keys.
    let mut r = f.reservation();
    r.expires = now() - 1;
    r.wrapped_key = None;
    statedir::write_json(&f.dir(), statedir::RESERVATION, &r).unwrap();
    let e = refused(&f.leave_keys(&id, &key));
    assert!(e.contains("expired"), "{e}");
    assert_eq!(f.reservation().wrapped_key, None);
    // After a cancel there is none to add to.
    f.cancel();
    let e = refused(&f.leave_keys(&id, &key));
    assert!(e.contains("holds no reservation"), "{e}");
    // --id and --wrapped-key go together, and not with --cancel.
    let dir = f.dir();
    let lone = f.vtpmctl(&[
        "reserve-incoming",
        "--state-dir",
        dir.to_str().unwrap(),
        "--wrapped-key",
        &key,
    ]);
    assert_eq!(lone.status.code(), Some(2));
    let both = f.vtpmctl(&[
        "reserve-incoming",
        "--cancel",
        "--state-dir",
        dir.to_str().unwrap(),
        "--id",
        &id,
        "--wrapped-key",
        &key,
    ]);
    assert_eq!(both.status.code(), Some(2));
}
