//! Saves sealed to this host, with real vtpmd processes and QEMU's blob
//! sequence: a default vtpmd (the host key from $VTPM_HOST_KEY_DIR, which
//! the workspace points at target/test-host-key) hands out sealed saves
//! and keeps running; a process on the same directory restores them;
//! another host key, a flipped byte, a rollback under the policy `refuse`
//! are refused with the reason on stderr as well as in the log; a
//! reservation left by `vtpmctl reserve-incoming` makes the next vtpmd a
//! sealed destination for that id (admin socket in the state directory
//! when run as swtpm).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vtpm_common::admin::{call, Prepared, Receipt, Request, Status, Tombstone};
use vtpm_common::hostkey::{self, HostKey};
use vtpm_common::statedir::{self, Reservation};
use vtpm_test_support::blobs::{get_blobs, put_blobs, StateBlob};
use vtpm_test_support::{cmd, state_dir, tpm, Ctrl, Daemon, VTPMD};

const NV: u32 = 0x0150_0016;
const SECRET: &[u8; 64] = b"save-file-secret-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ!";

fn test_key_dir() -> PathBuf {
    PathBuf::from(std::env::var("VTPM_HOST_KEY_DIR").expect("set by .cargo/config.toml"))
}

/// Powered on, NV index written.
fn running_with_secret(d: &Daemon) -> (Ctrl, std::os::unix::net::UnixStream) {
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::nv_define(NV, 64))), 0);
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::nv_write(NV, SECRET))), 0);
    (c, data)
}

fn nv(data: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    cmd::nv_data(&tpm(data, &cmd::nv_read(NV, 64)))
}

fn stderr_of(mut d: Daemon) -> String {
    d.kill9();
    let mut err = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// QEMU quitting after a save: SHUTDOWN, then the process exits.
fn quit(mut c: Ctrl, d: &mut Daemon) {
    assert_eq!(c.result(0x03, &[]), 0);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn a_default_vtpmd_seals_saves_to_the_host_and_restores_them() {
    let t = state_dir();
    let mut d = Daemon::start(t.path(), &[]);
    let (c, data) = running_with_secret(&d);
    let blobs = get_blobs(&mut Ctrl::connect(&d.ctrl).s);
    for b in &blobs {
        assert_eq!(b.result, 0, "blob {}", b.blob_type);
        assert!(b.data.starts_with(b"VTPMSAV1"), "blob {}", b.blob_type);
    }
    let all: Vec<u8> = blobs.iter().flat_map(|b| b.data.clone()).collect();
    assert!(
        !all.windows(16).any(|w| w == &SECRET[..16]),
        "NV secret in clear"
    );
    // A save is a copy: the TPM runs on (GET_TPMESTABLISHED answers only
    // while it does; a TPM command here would move it past the save).
    assert_eq!(Ctrl::connect(&d.ctrl).cmd(4, &[], 8)[..4], [0, 0, 0, 0]);
    assert!(d.log_text().contains("sealed to this host"));
    drop(data);
    quit(c, &mut d);
    // virsh restore: a new process on the same directory.
    let d2 = Daemon::start(t.path(), &[]);
    let mut c2 = Ctrl::connect(&d2.ctrl);
    assert_eq!(put_blobs(&mut c2.s, &blobs), 0, "{}", d2.log_text());
    let (_, mut data2) = c2.set_datafd();
    assert_eq!(nv(&mut data2), SECRET);
    // Save, then restore with no TPM command in between: not a rollback.
    assert!(!t.path().join("state").join(statedir::ROLLBACKS).exists());
    let ident: statedir::Identity =
        statedir::read_json(&t.path().join("state"), statedir::IDENTITY)
            .unwrap()
            .unwrap();
    // Save 1, then the restored TPM ran a command: it is past save 1 now.
    assert_eq!(ident.generation, 2);
}

#[test]
fn another_host_or_a_damaged_save_is_refused_with_the_reason_on_stderr() {
    let t = state_dir();
    let mut d = Daemon::start(t.path(), &[]);
    let (c, _) = running_with_secret(&d);
    let blobs = get_blobs(&mut Ctrl::connect(&d.ctrl).s);
    quit(c, &mut d);
    // Another host's key (a vtpmd whose key directory is elsewhere).
    let other_keys = tempfile::tempdir().unwrap();
    let other = start_with_keys(t.path(), other_keys.path(), &[]);
    let mut c = Ctrl::connect(&other.ctrl);
    // TPM_KEYNOTFOUND: QEMU prints "key could not be found".
    assert_eq!(put_blobs(&mut c.s, &blobs), 0x0d);
    let err = stderr_of(other);
    assert!(err.contains("wrapped for host key"), "stderr: {err}");
    // A flipped byte inside blob 1's ciphertext: "decryption error", and
    // the state on disk is untouched.
    let d = Daemon::start(t.path(), &[]);
    let mut bad: Vec<StateBlob> = blobs.clone();
    bad[0].data[700] ^= 0x40;
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(put_blobs(&mut c.s, &bad), 0x21);
    assert_ne!(c.result(0x02, &[0; 4]), 0, "no half-restored TPM");
    let err = stderr_of(d);
    assert!(err.contains("authentication failed"), "stderr: {err}");
    let d = Daemon::start(t.path(), &[]);
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    assert_eq!(nv(&mut data), SECRET, "the TPM's own state survived");
}

/// `vtpmd socket` on `<dir>/state` with its host key in `keys`.
fn start_with_keys(dir: &Path, keys: &Path, extra: &[&str]) -> Daemon {
    let env = [(hostkey::SYSTEM_KEY_DIR_ENV, keys.to_str().unwrap())];
    Daemon::start_env(&VTPMD, dir, "ctrl.sock", extra, &env)
}

#[test]
fn a_replaced_host_key_listed_for_restores_still_opens_old_saves() {
    let (old_keys, new_keys, listed) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    HostKey::load_or_create(old_keys.path()).unwrap();
    HostKey::load_or_create(new_keys.path()).unwrap();
    let t = state_dir();
    let mut d = start_with_keys(t.path(), old_keys.path(), &[]);
    let (c, _) = running_with_secret(&d);
    let blobs = get_blobs(&mut Ctrl::connect(&d.ctrl).s);
    quit(c, &mut d);
    // The host key was replaced; the old one is listed for restores.
    std::fs::copy(
        old_keys.path().join(hostkey::PRIVATE_FILE),
        listed.path().join("old-host-key.pem"),
    )
    .unwrap();
    let d = start_with_keys(
        t.path(),
        new_keys.path(),
        &["--restore-keys", listed.path().to_str().unwrap()],
    );
    let mut c = Ctrl::connect(&d.ctrl);
    assert_eq!(put_blobs(&mut c.s, &blobs), 0, "{}", d.log_text());
    let (_, mut data) = c.set_datafd();
    assert_eq!(nv(&mut data), SECRET);
    // New saves go to the new key only.
    let fresh = get_blobs(&mut c.s);
    drop(d);
    let d = start_with_keys(t.path(), old_keys.path(), &[]);
    assert_eq!(put_blobs(&mut Ctrl::connect(&d.ctrl).s, &fresh), 0x0d);
}

#[test]
fn rollback_under_the_refuse_policy_waits_for_the_operator() {
    let t = state_dir();
    let admin = t.path().join("admin.sock");
    let admin_arg = format!("path={}", admin.display());
    let d = Daemon::start(t.path(), &["--rollback", "refuse", "--admin", &admin_arg]);
    let (mut c, mut data) = running_with_secret(&d);
    let snapshot = get_blobs(&mut c.s);
    // The guest goes on: the TPM moves past the snapshot.
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::nv_write(NV, &[0x11; 64]))), 0);
    // "TPM_BAD_VERSION": QEMU prints "bad version identifier".
    assert_eq!(put_blobs(&mut c.s, &snapshot), 0x2e);
    assert!(d
        .log_text()
        .contains("vtpmctl allow-rollback --generation 1"));
    let st: vtpm_common::admin::SaveStatus =
        call(&admin, &Request::AllowRollback { generation: 1 }).unwrap();
    assert_eq!(st.allowed_generation, Some(1));
    assert_eq!(put_blobs(&mut c.s, &snapshot), 0);
    // The VM's data channel carries on with the restored TPM.
    assert_eq!(nv(&mut data), SECRET, "as at the snapshot");
    let rec = statedir::read_rollbacks(&t.path().join("state")).unwrap();
    let decisions: Vec<&str> = rec.iter().map(|r| r.decision.as_str()).collect();
    assert_eq!(decisions, ["refused", "allowed-by-operator"]);
}

/// A directory named `swtpm` holding a link to vtpmd under that name, as
/// `vtpm-libvirt enable` puts in libvirt's PATH.
fn swtpm_link(dir: &Path) -> String {
    let link = dir.join("swtpm");
    std::os::unix::fs::symlink(&*VTPMD, &link).unwrap();
    link.display().to_string()
}

/// A vtpmd run as swtpm on `<dir>/state` whose host key is in `keys`.
fn start_as_swtpm(dir: &Path, keys: &Path) -> Daemon {
    let env = [(hostkey::SYSTEM_KEY_DIR_ENV, keys.to_str().unwrap())];
    Daemon::start_env(&swtpm_link(dir), dir, "ctrl.sock", &[], &env)
}

fn reserve(state: &Path, key: &HostKey, expires_in: i64) -> String {
    let mut id = [0u8; 32];
    getrandom::getrandom(&mut id).unwrap();
    let id = vtpm_common::hex::encode(&id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let r = Reservation {
        migration_id: id.clone(),
        host_key: key.fingerprint(),
        expires: (now + expires_in) as u64,
        wrapped_key: None,
    };
    statedir::write_json(state, statedir::RESERVATION, &r).unwrap();
    id
}

#[test]
fn a_reservation_makes_the_next_vtpmd_a_sealed_destination() {
    // The destination host's key, in a directory of its own.
    let dkeys = tempfile::tempdir().unwrap();
    let key = HostKey::load_or_create(dkeys.path()).unwrap().0;
    let (ts, td) = (state_dir(), state_dir());
    let dstate = td.path().join("state");
    let id = reserve(&dstate, &key, 600);
    let dst = start_as_swtpm(td.path(), dkeys.path());
    let dadmin = dstate.join(statedir::ADMIN_SOCKET);
    assert!(!dstate.join(statedir::RESERVATION).exists(), "single use");
    let st: Status = call(&dadmin, &Request::Status).unwrap();
    assert_eq!(st.migration_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        serde_json::to_value(st.state).unwrap(),
        "destination-locked"
    );
    // The source prepares to the reserved id and the destination's key.
    let sadmin = ts.path().join("admin.sock");
    let arg = format!("path={}", sadmin.display());
    let src = Daemon::start(ts.path(), &["--admin", &arg]);
    let (mut c, _) = running_with_secret(&src);
    outgoing(&sadmin, &key, &id);
    let blobs = get_blobs(&mut c.s);
    assert!(blobs[0].data.starts_with(b"VTPMMIG1"));
    let mut cd = Ctrl::connect(&dst.ctrl);
    assert_eq!(put_blobs(&mut cd.s, &blobs), 0, "{}", dst.log_text());
    let (_, mut data) = cd.set_datafd();
    assert_eq!(nv(&mut data), SECRET);
    let r: Receipt = call(&dadmin, &Request::Receipt).unwrap();
    let t: Tombstone = call(&sadmin, &Request::Complete { receipt: r }).unwrap();
    assert_eq!(t.migration_id, id);
    // The same reserved id cannot take the stream again (a replay into a
    // new destination with its own reservation fails the id check).
    drop(dst);
    let te = state_dir();
    let _id2 = reserve(&te.path().join("state"), &key, 600);
    let third = start_as_swtpm(te.path(), dkeys.path());
    let mut c3 = Ctrl::connect(&third.ctrl);
    assert_ne!(put_blobs(&mut c3.s, &blobs), 0);
    assert!(third.log_text().contains("belongs to migration"));
}

/// `outgoing` on the source at `admin`, to `peer` for migration `id`.
fn outgoing(admin: &Path, peer: &HostKey, id: &str) -> Prepared {
    call(
        admin,
        &Request::Outgoing {
            peer_key: peer.public_pem(),
            migration_id: id.into(),
        },
    )
    .unwrap()
}

/// What `vtpmctl migrate` does once the source prepared: the wrapped
/// keys go into the reservation.
fn leave_keys(state: &Path, wrapped: &str) {
    let mut r: Reservation = statedir::read_json(state, statedir::RESERVATION)
        .unwrap()
        .unwrap();
    r.wrapped_key = Some(wrapped.into());
    statedir::write_json(state, statedir::RESERVATION, &r).unwrap();
}

#[test]
fn keys_left_with_a_reservation_are_unwrapped_at_start_and_a_bad_one_costs_nothing() {
    let dkeys = tempfile::tempdir().unwrap();
    let key = HostKey::load_or_create(dkeys.path()).unwrap().0;
    let ts = state_dir();
    let sadmin = ts.path().join("admin.sock");
    let arg = format!("path={}", sadmin.display());
    let src = Daemon::start(ts.path(), &["--admin", &arg]);
    let (mut c, _) = running_with_secret(&src);
    // The destination's keys as `vtpmctl migrate` leaves them, then keys
    // that do not open (another host's): both migrations go through, the
    // second with blob 1's own key.
    let other = HostKey::generate().unwrap();
    for good in [true, false] {
        let td = state_dir();
        let dstate = td.path().join("state");
        let id = reserve(&dstate, &key, 600);
        let wrapped = if good {
            outgoing(&sadmin, &key, &id).wrapped_key
        } else {
            let foreign = outgoing(&sadmin, &other, &id).wrapped_key;
            let _: Status = call(&sadmin, &Request::Abort).unwrap();
            outgoing(&sadmin, &key, &id);
            foreign
        };
        leave_keys(&dstate, &wrapped);
        let dst = start_as_swtpm(td.path(), dkeys.path());
        let log = dst.log_text();
        if good {
            assert!(
                log.contains("left with the reservation are unwrapped"),
                "{log}"
            );
        } else {
            assert!(
                log.contains("left with the reservation do not open"),
                "{log}"
            );
        }
        let blobs = get_blobs(&mut c.s);
        let mut cd = Ctrl::connect(&dst.ctrl);
        assert_eq!(put_blobs(&mut cd.s, &blobs), 0, "{}", dst.log_text());
        let (_, mut data) = cd.set_datafd();
        assert_eq!(nv(&mut data), SECRET);
        assert_eq!(
            dst.log_text()
                .contains("instance keys were unwrapped ahead of time"),
            good,
            "{}",
            dst.log_text()
        );
        // The source resumes (as after a cancelled hand-over) for the
        // next round.
        let _: Status = call(&sadmin, &Request::Abort).unwrap();
    }
}

#[test]
fn an_expired_or_foreign_reservation_is_ignored_and_removed() {
    let key = HostKey::load_or_create(&test_key_dir()).unwrap().0;
    let t = state_dir();
    let state = t.path().join("state");
    reserve(&state, &key, -5);
    let d = Daemon::start(t.path(), &[]);
    assert!(!state.join(statedir::RESERVATION).exists());
    assert!(d.log_text().contains("it expired"), "{}", d.log_text());
    let mut c = Ctrl::connect(&d.ctrl);
    let mut data = c.qemu_start(3968);
    assert_eq!(cmd::rc(&tpm(&mut data, &cmd::startup_clear())), 0);
    drop(d);
    // For another host key.
    let other = HostKey::generate().unwrap();
    let t = state_dir();
    let state = t.path().join("state");
    reserve(&state, &other, 600);
    let d = Daemon::start(t.path(), &[]);
    assert!(
        d.log_text().contains("it is for host key"),
        "{}",
        d.log_text()
    );
    // Garbage.
    let t = state_dir();
    let state = t.path().join("state");
    std::fs::write(state.join(statedir::RESERVATION), b"{not json").unwrap();
    let d = Daemon::start(t.path(), &[]);
    assert!(!state.join(statedir::RESERVATION).exists());
    assert!(d.log_text().contains("ignoring"), "{}", d.log_text());
}
