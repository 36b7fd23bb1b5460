//! The core's state machine on the fake engine, in process: power cycle and
//! auto-shutdown, imported state persisted, the sealed destination's lock
//! and unlock, source fencing after export, erase and tombstone, and every
//! refusal.

use super::*;
use crate::engine::fake::{FakeEngine, Probe, CC_NV_WRITE, MAGIC};
use crate::migration::piece::test_keys::keys;
use crate::storage::slots::{self, SlotFile};
use crate::storage::{blob, STUB_MAGIC, TOMBSTONE};
use std::path::Path;
use vtpm_common::admin::{Reply, Request};
use vtpm_common::hostkey::{HostKey, LazyHostKey};
use vtpm_common::statedir::MARKER;

pub(super) struct Fixture {
    pub(super) _dir: tempfile::TempDir,
    pub(super) vtpm: Vtpm,
    pub(super) probe: Arc<Probe>,
}

impl Fixture {
    pub(super) fn path(&self) -> &Path {
        self._dir.path()
    }

    pub(super) fn on_disk(&self) -> Option<Vec<u8>> {
        self.blob_on_disk("permall")
    }

    /// A blob as a fresh process would find it in the directory.
    fn blob_on_disk(&self, name: &str) -> Option<Vec<u8>> {
        let path = self.path().join(format!("vtpmd-00.{name}"));
        let (_, rec) = SlotFile::open(&path, false).unwrap()?;
        (rec.flags & slots::FLAG_DELETED == 0).then(|| rec.payload.to_vec())
    }

    /// Only the tombstone and stubs are left.
    fn erased(&self) -> bool {
        let stub = std::fs::read(self.path().join("tpm2-00.permall")).unwrap_or_default();
        !self.path().join("vtpmd-00.permall").exists()
            && !self.path().join("vtpmd-00.volatilestate").exists()
            && stub.starts_with(STUB_MAGIC)
    }
}

pub(super) fn with(
    host: Option<&HostKey>,
    incoming: bool,
    allow_plain: bool,
    opts: Options,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    fixture_in(dir, host, incoming, allow_plain, opts)
}

pub(super) fn fixture_in(
    dir: tempfile::TempDir,
    host: Option<&HostKey>,
    incoming: bool,
    allow_plain: bool,
    opts: Options,
) -> Fixture {
    let store = Arc::new(StateDir::open(dir.path(), 0o600, None).unwrap());
    let (engine, probe) = FakeEngine::new(store.clone());
    let host = host.map(|k| Arc::new(LazyHostKey::ready(k.clone(), "test".as_ref())));
    let mut session = Session::new(host, None, allow_plain, incoming);
    if let Some(m) = store.read_marker().unwrap() {
        session.restore(&m).unwrap();
    }
    let vtpm = Vtpm::new(Box::new(engine), store, opts, session).unwrap();
    Fixture {
        _dir: dir,
        vtpm,
        probe,
    }
}

pub(super) fn plain() -> Fixture {
    with(None, false, false, Options::default())
}

pub(super) fn cmd(code: u32, body: &[u8]) -> Vec<u8> {
    let mut c = tpm2::Header {
        tag: tpm2::ST_NO_SESSIONS,
        size: (tpm2::HEADER_LEN + body.len()) as u32,
        code,
    }
    .encode()
    .to_vec();
    c.extend_from_slice(body);
    c
}

pub(super) fn rc_of(v: &Vtpm, c: &[u8]) -> u32 {
    let mut out = Vec::new();
    v.process(c, &mut out);
    tpm2::response_code(&out)
}

pub(super) fn started(f: &Fixture) {
    f.vtpm.start(Some(StartupType::Clear)).unwrap();
}

#[test]
fn power_cycle_and_commands_only_while_running() {
    let f = plain();
    assert!(!f.vtpm.is_running());
    assert_eq!(rc_of(&f.vtpm, &cmd(0x17b, &[])), tpm2::RC_FAILURE);
    assert!(matches!(
        f.vtpm.hash_start(),
        Err(InstanceError::NotRunning)
    ));
    assert!(matches!(
        f.vtpm.established(),
        Err(InstanceError::NotRunning)
    ));
    assert!(matches!(f.vtpm.cancel(), Err(InstanceError::NotRunning)));
    assert!(matches!(
        f.vtpm.store_volatile(),
        Err(InstanceError::NotRunning)
    ));
    assert!(matches!(
        f.vtpm.export_blob(BlobKind::Permanent, true),
        Err(InstanceError::NotRunning)
    ));
    f.vtpm.power_on(InitFlags::default()).unwrap();
    assert!(f.vtpm.is_running());
    assert_eq!(rc_of(&f.vtpm, &cmd(0x17b, &[])), tpm2::RC_INITIALIZE);
    assert_eq!(
        rc_of(&f.vtpm, &tpm2::startup_command(tpm2::SU_CLEAR)),
        tpm2::RC_SUCCESS
    );
    assert_eq!(rc_of(&f.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);
    assert!(
        f.on_disk().unwrap().starts_with(MAGIC),
        "manufactured and stored"
    );
    f.vtpm.power_off();
    assert!(!f.vtpm.is_running());
    // A power-on starts the TPM afresh: TPM2_Startup is needed again.
    f.vtpm.power_on(InitFlags::default()).unwrap();
    assert_eq!(
        rc_of(&f.vtpm, &cmd(0x17b, &[])),
        tpm2::RC_SUCCESS,
        "volatile state kept by auto-shutdown"
    );
}

#[test]
fn auto_shutdown_unless_disabled_or_guest_already_shut_down() {
    let f = plain();
    started(&f);
    f.vtpm.power_off();
    // Auto-shutdown ran TPM2_Shutdown(STATE): the fake kept a volatile state.
    f.vtpm.power_on(InitFlags::default()).unwrap();
    assert_eq!(rc_of(&f.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);

    let f = with(
        None,
        false,
        false,
        Options {
            disable_auto_shutdown: true,
            ..Options::default()
        },
    );
    started(&f);
    f.vtpm.power_off();
    f.vtpm.power_on(InitFlags::default()).unwrap();
    assert_eq!(
        rc_of(&f.vtpm, &cmd(0x17b, &[])),
        tpm2::RC_INITIALIZE,
        "no shutdown was sent, so nothing resumes"
    );
}

#[test]
fn nv_writes_reach_the_state_directory() {
    let f = plain();
    started(&f);
    assert_eq!(
        rc_of(&f.vtpm, &cmd(CC_NV_WRITE, b"hello")),
        tpm2::RC_SUCCESS
    );
    assert!(f.on_disk().unwrap().ends_with(b"hello"));
    f.vtpm.store_volatile().unwrap();
    assert!(f.blob_on_disk("volatilestate").is_some());
    f.vtpm
        .power_on(InitFlags {
            delete_volatile: true,
        })
        .unwrap();
    assert!(f.blob_on_disk("volatilestate").is_none());
    assert!(!f.path().join("tpm2-00.volatilestate").exists());
}

#[test]
fn controls_locality_buffer_size_and_info() {
    let f = plain();
    assert!(matches!(
        f.vtpm.set_locality(5),
        Err(InstanceError::BadLocality(5))
    ));
    f.vtpm.set_locality(3).unwrap();
    assert_eq!(f.probe.locality.load(Ordering::SeqCst), 3);
    let s = f.vtpm.set_buffer_size(3000).unwrap();
    assert_eq!(s.size, 3000);
    assert_eq!(f.vtpm.io_size(), 3000);
    started(&f);
    f.vtpm.cancel().unwrap();
    assert_eq!(f.probe.cancels.load(Ordering::SeqCst), 1);
    assert!(matches!(
        f.vtpm.set_buffer_size(2048),
        Err(InstanceError::Running)
    ));
    assert_eq!(
        f.vtpm.set_buffer_size(0).unwrap().size,
        4096,
        "a query is fine"
    );
    assert!(matches!(f.vtpm.info(0), Err(InstanceError::NoInfo(0))));
    assert!(f.vtpm.info(1).unwrap().contains("fake"));
    // HASH_* sets the established flag; resetting it needs locality 3 or 4.
    f.vtpm.hash_start().unwrap();
    f.vtpm.hash_data(b"x").unwrap();
    f.vtpm.hash_end().unwrap();
    assert!(f.vtpm.established().unwrap());
    assert!(matches!(
        f.vtpm.reset_established(1),
        Err(InstanceError::Engine(0x3d))
    ));
    assert!(matches!(
        f.vtpm.reset_established(7),
        Err(InstanceError::BadLocality(7))
    ));
    f.vtpm.reset_established(3).unwrap();
    assert!(!f.vtpm.established().unwrap());
}

#[test]
fn existing_state_that_does_not_load_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tpm2-00.permall"),
        blob::encode_file(b"not a fake state"),
    )
    .unwrap();
    let store = Arc::new(StateDir::open(dir.path(), 0o600, None).unwrap());
    let (engine, _) = FakeEngine::new(store.clone());
    let e = Vtpm::new(
        Box::new(engine),
        store,
        Options::default(),
        Session::new(None, None, false, false),
    )
    .unwrap_err();
    assert!(matches!(e, InstanceError::BadState { .. }), "{e}");
}

#[test]
fn plain_import_is_persisted_at_power_on() {
    let f = plain();
    let perm = [MAGIC, b"imported"].concat();
    let b = blob::encode_migration(&perm);
    f.vtpm.import_blob(BlobKind::Permanent, &b, false).unwrap();
    assert_ne!(
        f.on_disk().as_deref(),
        Some(&perm[..]),
        "nothing stored before INIT"
    );
    f.vtpm.power_on(InitFlags::default()).unwrap();
    assert_eq!(f.on_disk().as_deref(), Some(&perm[..]));
    // Refusals: while running, foreign-encrypted, garbage, unknown layout.
    assert!(matches!(
        f.vtpm.import_blob(BlobKind::Permanent, &b, false),
        Err(InstanceError::Running)
    ));
    f.vtpm.power_off();
    assert!(matches!(
        f.vtpm.import_blob(BlobKind::Permanent, &b, true),
        Err(InstanceError::ForeignEncrypted)
    ));
    assert!(matches!(
        f.vtpm.import_blob(BlobKind::Permanent, b"garbage", false),
        Err(InstanceError::Blob(_))
    ));
    let wrong = blob::encode_migration(b"not the engine's format");
    assert!(matches!(
        f.vtpm.import_blob(BlobKind::Permanent, &wrong, false),
        Err(InstanceError::Engine(_))
    ));
}

#[test]
fn export_without_preparation_is_refused_and_plaintext_only_when_allowed() {
    let f = plain();
    started(&f);
    assert!(matches!(
        f.vtpm.export_blob(BlobKind::Permanent, true),
        Err(InstanceError::ExportNotPrepared)
    ));
    assert_eq!(
        rc_of(&f.vtpm, &cmd(0x17b, &[])),
        tpm2::RC_SUCCESS,
        "still serving"
    );

    let f = with(None, false, true, Options::default());
    started(&f);
    let perm = f.vtpm.export_blob(BlobKind::Permanent, true).unwrap();
    assert!(blob::decode_plain(&perm).unwrap().starts_with(MAGIC));
    assert!(matches!(
        f.vtpm.export_blob(BlobKind::SaveState, true),
        Err(InstanceError::NoBlob(BlobKind::SaveState))
    ));
    let all = f.vtpm.export_all().unwrap();
    assert_eq!(all.len(), 2, "plaintext export has no third blob");
    // A copy, not a move: the TPM keeps running.
    assert_eq!(rc_of(&f.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);
}

pub(super) fn admin(v: &Vtpm, r: Request) -> Result<Reply> {
    v.admin(r)
}

/// Source and destination on the fake engine, the destination's id issued
/// and the source prepared.
fn prepared_pair() -> (Fixture, Fixture) {
    let (ka, kb) = keys();
    let src = with(Some(ka), false, false, Options::default());
    let dst = with(Some(kb), true, false, Options::default());
    started(&src);
    assert_eq!(rc_of(&src.vtpm, &cmd(CC_NV_WRITE, b"secret-nv")), 0);
    let Reply::IncomingInfo(info) = admin(&dst.vtpm, Request::IncomingInfo).unwrap() else {
        panic!("not incoming info")
    };
    admin(
        &src.vtpm,
        Request::Outgoing {
            peer_key: info.public_key,
            migration_id: info.migration_id,
        },
    )
    .unwrap();
    (src, dst)
}

#[test]
fn sealed_migration_locks_source_unlocks_destination_and_erases_on_receipt() {
    let (src, dst) = prepared_pair();
    // The destination runs nothing and refuses power-on before its state.
    assert_eq!(rc_of(&dst.vtpm, &cmd(0x17b, &[])), tpm2::RC_FAILURE);
    assert!(matches!(
        dst.vtpm.power_on(InitFlags::default()),
        Err(InstanceError::Migration(_))
    ));
    let blobs = src.vtpm.export_all().unwrap();
    assert_eq!(blobs.len(), 3);
    assert_eq!(src.vtpm.phase(), Phase::Exported);
    // The source is fenced and locked: no command, no power change.
    assert_eq!(rc_of(&src.vtpm, &cmd(0x17b, &[])), tpm2::RC_FAILURE);
    assert!(matches!(
        src.vtpm.power_on(InitFlags::default()),
        Err(InstanceError::Locked(Phase::Exported))
    ));
    assert!(matches!(src.vtpm.reset(), Err(InstanceError::Locked(_))));
    for (_, b) in &blobs {
        assert!(!b.windows(9).any(|w| w == b"secret-nv"), "sealed");
    }
    let refs: Vec<(BlobKind, &[u8])> = blobs.iter().map(|(k, b)| (*k, &b[..])).collect();
    dst.vtpm.import_all(&refs).unwrap();
    assert!(dst.vtpm.is_running());
    assert_eq!(dst.vtpm.phase(), Phase::Running);
    assert_eq!(rc_of(&dst.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);
    // Replaying into the now-running destination is refused, untouched.
    assert!(matches!(
        dst.vtpm.import_all(&refs),
        Err(InstanceError::NotIncoming(Phase::Running))
    ));
    let Reply::Receipt(r) = admin(&dst.vtpm, Request::Receipt).unwrap() else {
        panic!()
    };
    assert!(
        dst.on_disk().unwrap().ends_with(b"secret-nv"),
        "durable before the receipt"
    );
    let Reply::Tombstone(t) = admin(&src.vtpm, Request::Complete { receipt: r }).unwrap() else {
        panic!()
    };
    assert_eq!(t.confirmed_by, "receipt");
    assert!(src.path().join(TOMBSTONE).exists());
    assert!(src.erased());
    let Reply::Status(s) = admin(&src.vtpm, Request::Status).unwrap() else {
        panic!()
    };
    assert_eq!(s.state, Phase::MigratedOut);
    assert!(!s.tpm_running, "the source copy is powered off");
}

#[test]
fn destination_answers_init_before_any_disk_write_then_makes_it_durable() {
    let (src, dst) = prepared_pair();
    let blobs = src.vtpm.export_all().unwrap();
    // As QEMU drives it over the control channel: SET_STATEBLOB x3, INIT.
    for (kind, b) in &blobs {
        dst.vtpm.import_blob(*kind, b, false).unwrap();
    }
    dst.vtpm
        .power_on(InitFlags {
            delete_volatile: true,
        })
        .unwrap();
    // INIT is answered with the migrated state live and nothing written.
    assert_eq!(dst.vtpm.phase(), Phase::Running);
    assert_eq!(dst.on_disk(), None, "no disk write before INIT's answer");
    assert!(!dst.path().join("vtpmd-00.permall").exists());
    // The frontend's answer is out: the durable write starts.
    dst.vtpm.start_pending_durability();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dst.on_disk().is_none() {
        assert!(std::time::Instant::now() < deadline, "never made durable");
        std::thread::sleep(Duration::from_millis(5));
    }
    let on_disk = dst.on_disk().unwrap();
    assert!(on_disk.starts_with(MAGIC) && on_disk.ends_with(b"secret-nv"));
    assert_eq!(dst.blob_on_disk("volatilestate"), None, "DELETE_VOLATILE");
    // A TPM command runs on the migrated state; the receipt is signed.
    assert_eq!(rc_of(&dst.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);
    assert!(matches!(
        admin(&dst.vtpm, Request::Receipt),
        Ok(Reply::Receipt(_))
    ));
}

#[test]
fn tampered_stream_keeps_destination_locked_and_burns_the_id() {
    let (src, dst) = prepared_pair();
    let mut blobs = src.vtpm.export_all().unwrap();
    let n = blobs[1].1.len();
    blobs[1].1[n / 2] ^= 1;
    let refs: Vec<(BlobKind, &[u8])> = blobs.iter().map(|(k, b)| (*k, &b[..])).collect();
    assert!(dst.vtpm.import_all(&refs).is_err());
    assert!(!dst.vtpm.is_running());
    assert_eq!(dst.vtpm.phase(), Phase::DestinationLocked);
    assert!(dst.on_disk().is_none(), "nothing written");
    // The id is forgotten: even the genuine stream is refused now.
    blobs[1].1[n / 2] ^= 1;
    let refs: Vec<(BlobKind, &[u8])> = blobs.iter().map(|(k, b)| (*k, &b[..])).collect();
    assert!(matches!(
        dst.vtpm.import_all(&refs),
        Err(InstanceError::Migration(_))
    ));
    // Plaintext is refused by a destination with a host key (no downgrade).
    let plain = blob::encode_migration(&[MAGIC, b"x"].concat());
    assert!(dst
        .vtpm
        .import_all(&[(BlobKind::Permanent, &plain[..])])
        .is_err());
    assert_eq!(dst.vtpm.phase(), Phase::DestinationLocked);
}

#[test]
fn source_resumes_after_abort_or_lock_storage() {
    let (src, _dst) = prepared_pair();
    src.vtpm.export_blob(BlobKind::Permanent, true).unwrap();
    assert_eq!(src.vtpm.phase(), Phase::SourceLocked);
    src.vtpm.lock_storage(0).unwrap();
    assert_eq!(src.vtpm.phase(), Phase::Running);
    assert_eq!(rc_of(&src.vtpm, &cmd(CC_NV_WRITE, b"after")), 0);
    assert!(
        src.on_disk().unwrap().ends_with(b"after"),
        "writes allowed again"
    );

    let (src, _dst) = prepared_pair();
    src.vtpm.export_all().unwrap();
    let Reply::Status(s) = admin(&src.vtpm, Request::Abort).unwrap() else {
        panic!()
    };
    assert_eq!(s.state, Phase::Running);
    assert_eq!(rc_of(&src.vtpm, &cmd(0x17b, &[])), tpm2::RC_SUCCESS);
    assert!(matches!(
        admin(&src.vtpm, Request::Abort),
        Err(InstanceError::Migration(_))
    ));
}

/// The source's process as a restart would find it (marker restored).
pub(super) fn reopen(f: Fixture, host: &HostKey) -> Fixture {
    let Fixture { _dir, vtpm, .. } = f;
    drop(vtpm);
    fixture_in(_dir, Some(host), false, false, Options::default())
}

#[test]
fn shutdown_after_export_holds_the_state_until_receipt_or_abort() {
    let (ka, _) = keys();
    let (src, dst) = prepared_pair();
    assert!(src.path().join(MARKER).exists(), "marked when prepared");
    let blobs = src.vtpm.export_all().unwrap();
    src.vtpm.shutdown();
    assert!(!src.vtpm.is_running());
    assert!(
        !src.path().join(TOMBSTONE).exists(),
        "no erase without receipt"
    );
    assert!(src.on_disk().unwrap().ends_with(b"secret-nv"));
    // A restarted source holds the TPM and says how to resolve it.
    let src = reopen(src, ka);
    assert_eq!(src.vtpm.phase(), Phase::AwaitingReceipt);
    let e = src.vtpm.power_on(InitFlags::default()).unwrap_err();
    assert!(e.to_string().contains("vtpmctl complete"), "{e}");
    assert!(e.to_string().contains("vtpmctl abort"), "{e}");
    assert_eq!(rc_of(&src.vtpm, &cmd(0x17b, &[])), tpm2::RC_FAILURE);
    // The destination's receipt completes it, even in the new process.
    let refs: Vec<(BlobKind, &[u8])> = blobs.iter().map(|(k, b)| (*k, &b[..])).collect();
    dst.vtpm.import_all(&refs).unwrap();
    let Reply::Receipt(r) = admin(&dst.vtpm, Request::Receipt).unwrap() else {
        panic!()
    };
    let mut forged = r.clone();
    forged.signature = "00".repeat(384);
    assert!(admin(&src.vtpm, Request::Complete { receipt: forged }).is_err());
    assert!(src.on_disk().is_some(), "a bad receipt erases nothing");
    let Reply::Tombstone(t) = admin(&src.vtpm, Request::Complete { receipt: r }).unwrap() else {
        panic!()
    };
    assert_eq!(t.confirmed_by, "receipt");
    assert!(src.erased());
    assert!(!src.path().join(MARKER).exists());
    let Fixture { _dir, vtpm, .. } = src;
    drop(vtpm);
    assert!(
        StateDir::open(_dir.path(), 0o600, None).is_err(),
        "tombstoned"
    );
}

#[test]
fn an_unresolved_migration_is_taken_back_by_abort() {
    let (ka, _) = keys();
    let (src, _dst) = prepared_pair();
    src.vtpm.export_all().unwrap();
    // The process dies without SHUTDOWN: the marker from `outgoing` holds.
    let src = reopen(src, ka);
    assert_eq!(src.vtpm.phase(), Phase::AwaitingReceipt);
    assert!(src.vtpm.power_on(InitFlags::default()).is_err());
    admin(&src.vtpm, Request::Abort).unwrap();
    assert!(!src.path().join(MARKER).exists());
    started(&src);
    assert!(src.on_disk().unwrap().ends_with(b"secret-nv"));
    // A prepared migration that handed nothing out is forgotten at SHUTDOWN.
    let (src, _dst) = prepared_pair();
    src.vtpm.shutdown();
    assert!(!src.path().join(MARKER).exists());
    let src = reopen(src, ka);
    assert_eq!(src.vtpm.phase(), Phase::Running);
}

#[test]
fn shutdown_without_export_keeps_the_state() {
    let f = plain();
    started(&f);
    f.vtpm.shutdown();
    assert!(!f.vtpm.is_running());
    assert!(f.on_disk().is_some());
    assert!(!f.path().join(TOMBSTONE).exists());
}

#[test]
fn admin_refusals() {
    let f = plain();
    assert!(
        admin(&f.vtpm, Request::IncomingInfo).is_err(),
        "no host key"
    );
    let (ka, _) = keys();
    let src = with(Some(ka), false, false, Options::default());
    assert!(matches!(
        admin(&src.vtpm, Request::IncomingInfo),
        Err(InstanceError::Migration(_))
    ));
    assert!(
        admin(
            &src.vtpm,
            Request::Outgoing {
                peer_key: ka.public_pem(),
                migration_id: "00".repeat(32)
            }
        )
        .is_err(),
        "own key"
    );
    assert!(admin(&src.vtpm, Request::Receipt).is_err());
    assert!(admin(
        &src.vtpm,
        Request::IncomingKey {
            wrapped_key: "zz".into()
        }
    )
    .is_err());
}

#[test]
fn reset_power_cycles_and_keeps_nv() {
    let f = plain();
    started(&f);
    assert_eq!(rc_of(&f.vtpm, &cmd(CC_NV_WRITE, b"kept")), 0);
    f.vtpm.reset().unwrap();
    assert!(f.vtpm.is_running());
    assert!(f.on_disk().unwrap().ends_with(b"kept"));
}
