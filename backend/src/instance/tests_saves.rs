//! Saves on the fake engine, in process: a save is a copy sealed to this
//! host, restored only into the TPM that made it, and a restore of an
//! older generation is recorded (or refused under the policy `refuse`).

use super::tests::{admin, cmd, fixture_in, rc_of, started, with, Fixture};
use super::*;
use crate::engine::fake::CC_NV_WRITE;
use crate::migration::piece::test_keys::keys;
use crate::migration::save::SaveError;
use vtpm_common::admin::{Reply, Request};
use vtpm_common::statedir::{self, Identity, RollbackPolicy, IDENTITY};

fn saving(refuse: bool) -> Fixture {
    let opts = Options {
        rollback_refuse: refuse,
        ..Options::default()
    };
    let f = with(Some(&keys().0), false, false, opts);
    started(&f);
    f
}

fn save(f: &Fixture) -> Vec<Vec<u8>> {
    BlobKind::ALL
        .iter()
        .map(|k| f.vtpm.export_blob(*k, true).unwrap())
        .collect()
}

/// QEMU's restore: STOP, SET ×3, INIT.
fn restore(f: &Fixture, blobs: &[Vec<u8>]) -> Result<()> {
    f.vtpm.power_off();
    for (k, b) in BlobKind::ALL.iter().zip(blobs) {
        f.vtpm.import_blob(*k, b, false)?;
    }
    f.vtpm.power_on(InitFlags {
        delete_volatile: true,
    })
}

fn identity(f: &Fixture) -> Identity {
    statedir::read_json(f.path(), IDENTITY).unwrap().unwrap()
}

fn nv(f: &Fixture, data: &[u8]) {
    assert_eq!(rc_of(&f.vtpm, &cmd(CC_NV_WRITE, data)), tpm2::RC_SUCCESS);
}

#[test]
fn a_save_is_a_sealed_copy_and_restores_into_the_tpm_that_made_it() {
    let f = saving(false);
    nv(&f, b"nv-secret-before-save");
    let blobs = save(&f);
    assert!(blobs.iter().all(|b| b.starts_with(b"VTPMSAV1")));
    assert!(!blobs.concat().windows(13).any(|w| w == b"nv-secret-bef"));
    // The TPM kept running, nothing was locked or erased.
    assert_eq!(f.vtpm.phase(), Phase::Running);
    assert!(f.vtpm.is_running());
    assert_eq!(identity(&f).generation, 1);
    // save + restore with nothing in between (virsh save / restore): not
    // a rollback.
    restore(&f, &blobs).unwrap();
    assert!(f.on_disk().unwrap().ends_with(b"nv-secret-before-save"));
    assert!(!f.path().join(statedir::ROLLBACKS).exists());
    // The TPM moves on; the same save again is a rollback, allowed by
    // default and recorded.
    nv(&f, b"written-after-the-save");
    assert_eq!(identity(&f).generation, 2);
    restore(&f, &blobs).unwrap();
    assert!(f.on_disk().unwrap().ends_with(b"nv-secret-before-save"));
    let rec = statedir::read_rollbacks(f.path()).unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        (rec[0].restored_generation, rec[0].newest_generation),
        (1, 2)
    );
    assert_eq!(rec[0].decision, "allowed");
    // The next save gets a generation never used before.
    nv(&f, b"x");
    save(&f);
    assert_eq!(identity(&f).generation, 4);
}

#[test]
fn another_host_another_tpm_or_a_damaged_save_is_refused_and_the_state_kept() {
    let f = saving(false);
    nv(&f, b"first");
    let blobs = save(&f);
    // Another host's key: refused at the first blob.
    let other_host = with(Some(&keys().1), false, false, Options::default());
    started(&other_host);
    other_host.vtpm.power_off();
    let e = other_host
        .vtpm
        .import_blob(BlobKind::Permanent, &blobs[0], false)
        .unwrap_err();
    assert!(e.to_string().contains("wrapped for host key"), "{e}");
    // Same host, another TPM that has saves of its own.
    let other_tpm = saving(false);
    save(&other_tpm);
    let before = other_tpm.on_disk();
    assert!(matches!(
        restore(&other_tpm, &blobs),
        Err(InstanceError::OtherInstance { .. })
    ));
    assert_eq!(other_tpm.on_disk(), before);
    // Same host, a TPM that never saved.
    let never = with(Some(&keys().0), false, false, Options::default());
    started(&never);
    assert!(matches!(
        restore(&never, &blobs),
        Err(InstanceError::NeverSaved { .. })
    ));
    // A flipped byte in the state: the restore fails, the disk keeps the
    // TPM's own state, and the genuine save still restores.
    nv(&f, b"second");
    let on_disk = f.on_disk();
    let mut bad = blobs.clone();
    let n = bad[0].len();
    bad[0][n - 40] ^= 1;
    assert!(matches!(
        restore(&f, &bad),
        Err(InstanceError::Save(SaveError::Piece(_)))
    ));
    assert_eq!(f.on_disk(), on_disk);
    // INIT after the failed SET does not start a half-restored TPM.
    assert!(f.vtpm.power_on(InitFlags::default()).is_err());
    assert_eq!(f.on_disk(), on_disk);
    restore(&f, &blobs).unwrap();
    assert!(f.on_disk().unwrap().ends_with(b"first"));
}

#[test]
fn an_empty_directory_adopts_the_save() {
    let f = saving(false);
    nv(&f, b"moving-house");
    let blobs = save(&f);
    let empty = with(Some(&keys().0), false, false, Options::default());
    restore(&empty, &blobs).unwrap();
    assert!(empty.on_disk().unwrap().ends_with(b"moving-house"));
    assert_eq!(identity(&empty).instance_id, identity(&f).instance_id);
}

#[test]
fn rollback_refused_until_the_operator_allows_that_generation() {
    let f = saving(true);
    nv(&f, b"at-the-snapshot");
    let snapshot = save(&f);
    nv(&f, b"after-the-snapshot");
    let on_disk = f.on_disk();
    let e = restore(&f, &snapshot).unwrap_err();
    assert!(matches!(
        e,
        InstanceError::RollbackRefused {
            restored: 1,
            newest: 2
        }
    ));
    assert!(e
        .to_string()
        .contains("vtpmctl allow-rollback --generation 1"));
    assert_eq!(f.on_disk(), on_disk, "a refused restore changes nothing");
    let rec = statedir::read_rollbacks(f.path()).unwrap();
    assert_eq!(rec.last().unwrap().decision, "refused");
    // Allowing another generation does not help; allowing this one does,
    // once.
    admin(&f.vtpm, Request::AllowRollback { generation: 7 }).unwrap();
    assert!(restore(&f, &snapshot).is_err());
    let Reply::SaveStatus(st) = admin(&f.vtpm, Request::AllowRollback { generation: 1 }).unwrap()
    else {
        panic!("not a save status");
    };
    assert_eq!(st.allowed_generation, Some(1));
    assert_eq!(st.rollback, RollbackPolicy::Refuse);
    restore(&f, &snapshot).unwrap();
    assert!(f.on_disk().unwrap().ends_with(b"at-the-snapshot"));
    nv(&f, b"again");
    assert!(matches!(
        restore(&f, &snapshot),
        Err(InstanceError::RollbackRefused { .. })
    ));
}

#[test]
fn rollback_policy_is_kept_in_the_state_directory() {
    let f = saving(false);
    admin(
        &f.vtpm,
        Request::RollbackPolicy {
            policy: RollbackPolicy::Refuse,
        },
    )
    .unwrap();
    nv(&f, b"a");
    let snap = save(&f);
    nv(&f, b"b");
    assert!(matches!(
        restore(&f, &snap),
        Err(InstanceError::RollbackRefused { .. })
    ));
    // A new process on the directory keeps the policy.
    let Fixture { _dir, vtpm, .. } = f;
    drop(vtpm);
    let again = fixture_in(_dir, Some(&keys().0), false, false, Options::default());
    assert!(matches!(
        restore(&again, &snap),
        Err(InstanceError::RollbackRefused { .. })
    ));
    let Reply::SaveStatus(st) = admin(&again.vtpm, Request::Saves).unwrap() else {
        panic!("not a save status");
    };
    assert_eq!(st.rollbacks, 2);
    assert_eq!(st.host_key, Some(keys().0.fingerprint()));
}

#[test]
fn without_a_host_key_nothing_leaves_and_a_save_is_not_taken() {
    let f = with(None, false, false, Options::default());
    started(&f);
    let e = f.vtpm.export_blob(BlobKind::Permanent, true).unwrap_err();
    assert!(matches!(e, InstanceError::ExportNotPrepared));
    assert!(e.to_string().contains("--allow-plaintext-migration"));
    let saver = saving(false);
    let blobs = save(&saver);
    f.vtpm.power_off();
    assert!(matches!(
        f.vtpm.import_blob(BlobKind::Permanent, &blobs[0], false),
        Err(InstanceError::Save(SaveError::NoHostKey))
    ));
}
