//! The latency rows: per command over each transport, start-up, sealed and
//! plain migration. Each row times vtpmd and every reference swtpm
//! alternately (and libtpms in process where it applies).

use crate::durability::Floor;
use crate::report::{one, stat, us, Row, Stat};
use crate::targets::{connect, connect_every, free_port, workdir, InProcess, Remote, Target};
use crate::{n, Opts};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vtpm_common::admin::{self, IncomingInfo, KeysPreloaded, Prepared, Request};
use vtpm_test_support::blobs;
use vtpm_test_support::cmd as c;

/// Consecutive calls each target gets before the next target's turn.
///
/// The backends share one CPU (the client is on another), so a call's time
/// includes how the previous call on that CPU left it: still busy with the
/// previous backend's tail, or idle and slow to wake (a halted vCPU). With
/// one call per turn, each target always follows the same other one, and
/// the ratio measured that pairing (0.89-0.94 over the socketpair at 4, 16
/// or 64 calls per turn, 1.15-1.25 at 1; docs/PERFORMANCE.md). In a run of
/// calls each backend follows itself, as a guest's commands do; the turns
/// still alternate, so the machine's drift hits every target alike.
/// `VTPM_BENCH_BLOCK=N` changes it (for that experiment).
fn block(iters: usize) -> usize {
    let want = std::env::var("VTPM_BENCH_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16usize);
    // At least four turns per target, so the drift still interleaves.
    want.min(iters / 4).max(1)
}

/// Times `make(i)` on every target, in turns of [`block`] consecutive
/// calls, the target going first rotating per round. `setup` runs once
/// per target first; `after` (untimed) after each call.
pub(crate) fn latency_row(
    name: &str,
    iters: usize,
    targets: &mut [&mut dyn Target],
    setup: &dyn Fn(&mut dyn Target) -> u32,
    make: &dyn Fn(usize, u32) -> Vec<u8>,
    after: &dyn Fn(&mut dyn Target, &[u8]),
) -> Vec<Stat> {
    let ctx: Vec<u32> = targets.iter_mut().map(|t| setup(&mut **t)).collect();
    let mut samples = vec![Vec::with_capacity(iters); targets.len()];
    let n = targets.len();
    let per_turn = block(iters);
    for (round, first) in (0..iters).step_by(per_turn).enumerate() {
        let calls = first..(first + per_turn).min(iters);
        for j in 0..n {
            let k = (round + j) % n;
            let t = &mut targets[k];
            for i in calls.clone() {
                let cmd = make(i, ctx[k]);
                let start = Instant::now();
                let r = t.cmd(&cmd);
                let el = start.elapsed();
                let code = c::rc(&r);
                assert!(code == 0, "{name} on {}: TPM rc {code:#x}", t.name());
                samples[k].push(us(el));
                after(&mut **t, &r);
            }
        }
    }
    samples.into_iter().map(stat).collect()
}

pub(crate) fn nothing(_: &mut dyn Target) -> u32 {
    0
}

pub(crate) fn no_after(_: &mut dyn Target, _: &[u8]) {}

pub(crate) fn flush_created(t: &mut dyn Target, r: &[u8]) {
    t.cmd(&c::flush(c::handle(r)));
}

/// The NV index the command rows write and read.
pub(crate) const NV_INDEX: u32 = 0x0150_0100;

pub(crate) fn define_nv(t: &mut dyn Target) -> u32 {
    let r = t.cmd(&c::nv_define(NV_INDEX, 64));
    assert!(
        c::rc(&r) == 0 || c::rc(&r) == 0x14c,
        "NV define: {:#x}",
        c::rc(&r)
    );
    let _ = t.cmd(&c::nv_write(NV_INDEX, &[0; 64]));
    0
}

fn signing_key(t: &mut dyn Target) -> u32 {
    let r = t.cmd(&c::create_primary("sign", 7));
    assert_eq!(c::rc(&r), 0, "signing key");
    c::handle(&r)
}

type Make = Box<dyn Fn(usize, u32) -> Vec<u8>>;
type Setup = Box<dyn Fn(&mut dyn Target) -> u32>;
type After = Box<dyn Fn(&mut dyn Target, &[u8])>;

/// One command row: name, full iteration count, and how to run it.
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    iters: usize,
    setup: Setup,
    make: Make,
    after: After,
}

fn spec(name: &'static str, iters: usize, setup: Setup, make: Make, after: After) -> Spec {
    Spec {
        name,
        iters,
        setup,
        make,
        after,
    }
}

/// The cheap commands: transport and dispatch cost, next to no TPM work.
pub(crate) fn cheap() -> Vec<Spec> {
    vec![
        spec(
            "GetRandom(32)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::get_random(32)),
            Box::new(no_after),
        ),
        spec(
            "PCR_Read",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::pcr_read(16)),
            Box::new(no_after),
        ),
        spec(
            "PCR_Extend(sha256)",
            2000,
            Box::new(nothing),
            Box::new(|i, _| c::pcr_extend(16, &[i as u8; 32])),
            Box::new(no_after),
        ),
        spec(
            "Hash(sha256, 64 B)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::hash(&[0x33; 64])),
            Box::new(no_after),
        ),
        spec(
            "NV_Read 64 B",
            2000,
            Box::new(define_nv),
            Box::new(|_, _| c::nv_read(NV_INDEX, 64)),
            Box::new(no_after),
        ),
        spec(
            "StartAuthSession + FlushContext",
            1000,
            Box::new(nothing),
            Box::new(|_, _| c::start_auth_session()),
            Box::new(flush_created),
        ),
    ]
}

pub(crate) const NV_WRITE: &str = "NV_Write 64 B (state write)";

/// The commands that do TPM work: a state write and the crypto-bound ones.
pub(crate) fn heavy() -> Vec<Spec> {
    vec![
        spec(
            NV_WRITE,
            300,
            Box::new(define_nv),
            Box::new(|i, _| c::nv_write(NV_INDEX, &[(i % 251) as u8 + 1; 64])),
            Box::new(no_after),
        ),
        spec(
            "CreatePrimary ECC P-256",
            100,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("ecc", i as u8)),
            Box::new(flush_created),
        ),
        spec(
            "CreatePrimary RSA-2048",
            12,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("rsa", i as u8)),
            Box::new(flush_created),
        ),
        spec(
            "ECDSA sign (loaded key)",
            300,
            Box::new(signing_key),
            Box::new(|_, h| c::sign_ecdsa(h)),
            Box::new(no_after),
        ),
    ]
}

/// Whether `VTPM_BENCH_ONLY` (if set) selects `name`.
pub(crate) fn wanted(name: &str) -> bool {
    match std::env::var("VTPM_BENCH_ONLY") {
        Ok(f) => name.contains(&f),
        Err(_) => true,
    }
}

/// One row per spec, named `prefix` + the spec's name, on vtpmd, every
/// reference and libtpms in process. With `floor`, a durability floor
/// commit is timed alternately with the NV_Write row and shown beside it.
pub(crate) fn command_rows(
    o: &Opts,
    prefix: &str,
    specs: Vec<Spec>,
    vt: &mut dyn Target,
    refs: &mut [&mut dyn Target],
    ip: &mut InProcess,
    mut floor: Option<&mut Floor>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in specs {
        let name = format!("{prefix}{}", s.name);
        if !wanted(&name) {
            continue;
        }
        let iters = n(o, s.iters);
        eprintln!("  {name} x{iters}");
        let mut targets: Vec<&mut dyn Target> = vec![&mut *vt];
        targets.extend(refs.iter_mut().map(|r| &mut **r as &mut dyn Target));
        targets.push(&mut *ip);
        let with_floor = s.name == NV_WRITE && floor.is_some();
        if with_floor {
            targets.push(floor.as_deref_mut().unwrap());
        }
        let mut st = latency_row(&name, iters, &mut targets, &*s.setup, &*s.make, &*s.after);
        let mut extra = Vec::new();
        if with_floor {
            extra.push(("durability floor".to_string(), st.pop().unwrap()));
        }
        extra.insert(0, ("in-process".into(), st.pop().unwrap()));
        let vtpmd = st.remove(0);
        rows.push(Row {
            name,
            unit: "us",
            vtpmd,
            refs: st,
            extra,
        });
    }
    rows
}

/// One backend start until GET_CAPABILITY answers on its TCP control port.
/// The backend starts on the backends' CPU, through `taskset` like every
/// other backend (its exec is in every start alike; the client's tries
/// would otherwise take CPU time from the start they wait for).
fn start_once(bin: &str, seed: u32) -> f64 {
    let dir = workdir();
    let port = free_port(seed);
    let start = Instant::now();
    let mut child = crate::targets::pinned(bin)
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.path().display()))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Tried every 50 µs (a refused connection on loopback costs a few µs):
    // at `connect`'s 2 ms the row read 2.6-2.9 or 4.5-4.7 ms by which try
    // happened to succeed.
    let every = Duration::from_micros(50);
    let mut s = connect_every(port, Duration::from_secs(5), every).expect("ctrl port");
    let caps = blobs::ctrl_cmd(&mut s, 1, &[], 8);
    let ms = us(start.elapsed()) / 1000.0;
    assert_eq!(&caps[..4], &[0, 0, 0, 0]);
    let _ = child.kill();
    let _ = child.wait();
    ms
}

pub(crate) fn startup_row(o: &Opts) -> Row {
    let iters = n(o, 20);
    let bins: Vec<&str> = std::iter::once(o.vtpmd.as_str())
        .chain(o.anchors.iter().map(|a| a.bin.as_str()))
        .collect();
    let mut samples = vec![Vec::new(); bins.len()];
    let mut wrapper = Vec::new();
    for i in 0..iters {
        for (k, bin) in bins.iter().enumerate() {
            samples[k].push(start_once(bin, 500 + i as u32 * 8 + k as u32));
        }
        // The sid swtpm's start includes its chroot wrapper (a mount
        // namespace and a bind mount): timed alone with /bin/true.
        if let Some(w) = o
            .anchors
            .iter()
            .find(|a| a.bin.ends_with("swtpm-sid/swtpm"))
        {
            let t = Instant::now();
            let st = Command::new(&w.bin)
                .env("SWTPM_SID_EXEC", "/bin/true")
                .status()
                .expect("wrapper");
            assert!(
                st.success(),
                "{} with SWTPM_SID_EXEC=/bin/true: {st}",
                w.bin
            );
            wrapper.push(us(t.elapsed()) / 1000.0);
        }
    }
    let vtpmd = stat(samples.remove(0));
    let mut extra = Vec::new();
    if !wrapper.is_empty() {
        extra.push(("sid chroot wrapper alone".into(), stat(wrapper)));
    }
    Row {
        name: "start-up until GET_CAPABILITY answers".into(),
        unit: "ms",
        vtpmd,
        refs: samples.into_iter().map(stat).collect(),
        extra,
    }
}

/// QEMU's blob sequence: GET_STATEBLOB x3 on `src`, then STOP,
/// SET_STATEBLOB x3 (non-empty) and INIT(DELETE_VOLATILE) on `dst`.
pub(crate) fn migrate_once(src: &mut TcpStream, dst: &mut TcpStream) {
    // A blob the source has none of (swtpm's savestate) comes back empty
    // and is skipped, as QEMU does.
    let got = blobs::get_blobs(src);
    assert_eq!(blobs::put_blobs(dst, &got), 0, "SET_STATEBLOB/INIT");
}

/// After the timed window: the destination runs the migrated TPM, resumed
/// without a TPM2_Startup (INIT answering is not enough: a destination
/// that lost the volatile state answers TPM_RC_INITIALIZE here).
fn assert_resumed(dst: &mut Remote) {
    let rc = c::rc(&dst.cmd(&c::get_random(8)));
    assert_eq!(rc, 0, "{}: the migrated TPM did not resume", dst.name());
}

pub(crate) fn populate(t: &mut Remote) {
    for k in 0..4u32 {
        assert_eq!(c::rc(&t.cmd(&c::nv_define(0x0150_0200 + k, 64))), 0);
        assert_eq!(
            c::rc(&t.cmd(&c::nv_write(0x0150_0200 + k, &[k as u8 + 1; 64]))),
            0
        );
    }
    let r = t.cmd(&c::create_primary("ecc", 1));
    let h = c::handle(&r);
    // EvictControl to a persistent handle.
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&0x8100_0001u32.to_be_bytes());
    let mut m = vec![0x80, 0x02];
    m.extend_from_slice(&((10 + b.len()) as u32).to_be_bytes());
    m.extend_from_slice(&0x120u32.to_be_bytes());
    m.extend_from_slice(&b);
    assert_eq!(c::rc(&t.cmd(&m)), 0, "EvictControl");
    t.cmd(&c::flush(h));
}

pub(crate) fn ctrl_of(t: &Remote) -> TcpStream {
    connect(t.port.expect("TCP backend") + 1, Duration::from_secs(2)).unwrap()
}

/// The control connection of a migration destination as QEMU leaves it
/// before the migration stream arrives (`-incoming`: GET_CAPABILITY, then
/// the reset's STOP, SET_BUFFERSIZE(0), STOP, SET_BUFFERSIZE(3968) and no
/// INIT; docs in ../shared/reference/swtpm-qemu-protocol.md, section 3.1).
/// The same for every backend, before the timed window.
fn incoming_ctrl(t: &Remote) -> TcpStream {
    let mut c = ctrl_of(t);
    assert_eq!(blobs::be32(&blobs::ctrl_cmd(&mut c, 0x01, &[], 8), 0), 0);
    for size in [0u32, 3968] {
        assert_eq!(
            blobs::be32(&blobs::ctrl_cmd(&mut c, 0x0e, &[], 4), 0),
            0,
            "STOP"
        );
        let r = blobs::ctrl_cmd(&mut c, 0x11, &size.to_be_bytes(), 16);
        assert_eq!(blobs::be32(&r, 0), 0, "SET_BUFFERSIZE({size})");
    }
    c
}

/// A migration source and its fresh destinations, one per migration,
/// started before the timed window as QEMU's -incoming side starts them
/// (vtpmd's migration ids are single use; a destination reused warm
/// would measure a case no real migration has).
struct Migrations {
    bin: String,
    extra: Vec<String>,
    seed: u32,
    src: Remote,
    sc: TcpStream,
    done: u32,
}

impl Migrations {
    fn new(name: &str, bin: &str, extra: Vec<String>, seed: u32) -> Migrations {
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut src = Remote::start(name, bin, &args, seed);
        populate(&mut src);
        let sc = ctrl_of(&src);
        Migrations {
            bin: bin.into(),
            extra,
            seed,
            src,
            sc,
            done: 0,
        }
    }

    /// A destination process for the next migration, with `options`.
    fn destination(&mut self, options: &[String]) -> Remote {
        self.done += 1;
        let args: Vec<&str> = options.iter().map(String::as_str).collect();
        Remote::start_with(
            self.src.name(),
            &self.bin,
            crate::targets::Transport::Tcp,
            &args,
            self.seed * 1000 + self.done,
            false,
        )
    }

    /// The timed window into `dst`, then a check that it resumed.
    fn migrate(&mut self, dst: &mut Remote) -> f64 {
        let mut dc = incoming_ctrl(dst);
        let t = Instant::now();
        migrate_once(&mut self.sc, &mut dc);
        let took = us(t.elapsed());
        assert_resumed(dst);
        took
    }

    /// swtpm: one plain (or `--migration-key`) migration; the destination
    /// has the source's options.
    fn swtpm_once(&mut self) -> f64 {
        let options = self.extra.clone();
        let mut dst = self.destination(&options);
        self.migrate(&mut dst)
    }

    /// vtpmd sealed: the destination's id and key through the admin
    /// sockets, as `vtpmctl migrate` does; with `preload`, the destination
    /// unwraps the keys before the VM stops (vtpmctl incoming-key, as
    /// docs/migration.md recommends), else inside the timed window.
    fn vtpmd_once(&mut self, keys: &Path, admins: &Path, preload: bool) -> f64 {
        let dst_admin = admins.join(format!("dst{}.admin", self.done + 1));
        let more = [
            "--host-key".to_string(),
            keys.join("b/host-key.pem").display().to_string(),
            "--admin".into(),
            format!("path={}", dst_admin.display()),
            "--migration".into(),
            "incoming".into(),
        ];
        // Not the source's own --host-key/--admin (`extra`).
        let mut dst = self.destination(&more);
        let src_admin = admins.join("src.admin");
        let info: IncomingInfo = admin::call(&dst_admin, &Request::IncomingInfo).unwrap();
        let out: Prepared = admin::call(
            &src_admin,
            &Request::Outgoing {
                peer_key: info.public_key,
                migration_id: info.migration_id,
            },
        )
        .unwrap();
        if preload {
            let _: KeysPreloaded = admin::call(
                &dst_admin,
                &Request::IncomingKey {
                    wrapped_key: out.wrapped_key,
                },
            )
            .unwrap();
        }
        let took = self.migrate(&mut dst);
        // The source resumes, as after QEMU's LOCK_STORAGE.
        assert_eq!(
            blobs::ctrl_cmd(&mut self.sc, 0x13, &[0, 0, 0, 1], 4),
            vec![0; 4]
        );
        took
    }
}

/// Sealed migration with vtpmd against each reference's plain cycle (and
/// its `--migration-key` one), interleaved: every round migrates once on
/// each, the one going first rotating, so the machine's drift over the
/// run hits all alike.
pub(crate) fn migration_rows(o: &Opts, keys: &Path) -> Row {
    let iters = n(o, 30);
    let mkey = keys.join("migration.key");
    std::fs::write(
        &mkey,
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .unwrap();
    let mk = format!("file={},format=hex,mode=aes-256-cbc", mkey.display());
    for h in ["a", "b"] {
        let st = Command::new(&o.vtpmctl)
            .args(["keygen", "--out"])
            .arg(keys.join(h))
            .output()
            .unwrap();
        assert!(st.status.success(), "keygen: {st:?}");
    }
    let mut swtpms: Vec<[Migrations; 2]> = o
        .anchors
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let seed = 700 + 10 * k as u32;
            let keyed = vec!["--migration-key".to_string(), mk.clone()];
            [
                Migrations::new("swtpm", &a.bin, Vec::new(), seed),
                Migrations::new("swtpm", &a.bin, keyed, seed + 2),
            ]
        })
        .collect();
    let admins = workdir();
    let src_args = vec![
        "--host-key".to_string(),
        keys.join("a/host-key.pem").display().to_string(),
        "--admin".into(),
        format!("path={}", admins.path().join("src.admin").display()),
    ];
    let mut vt = Migrations::new("vtpmd", &o.vtpmd, src_args, 760);
    let mut plain = vec![Vec::new(); swtpms.len()];
    let mut keyed = vec![Vec::new(); swtpms.len()];
    let (mut samples, mut unloaded) = (Vec::new(), Vec::new());
    let sides = swtpms.len() + 1;
    for i in 0..iters {
        for k in (0..sides).map(|k| (k + i) % sides) {
            match swtpms.get_mut(k) {
                Some([p, m]) => {
                    plain[k].push(p.swtpm_once());
                    keyed[k].push(m.swtpm_once());
                }
                None => {
                    samples.push(vt.vtpmd_once(keys, admins.path(), true));
                    unloaded.push(vt.vtpmd_once(keys, admins.path(), false));
                }
            }
        }
    }
    let mut extra: Vec<(String, Stat)> = o
        .anchors
        .iter()
        .zip(keyed)
        .map(|(a, v)| (format!("{} --migration-key", a.label), stat(v)))
        .collect();
    extra.push(("vtpmd without incoming-key".into(), stat(unloaded)));
    Row {
        name: "migration: GET x3 + SET x3 + INIT".into(),
        unit: "us",
        vtpmd: stat(samples),
        refs: plain.into_iter().map(stat).collect(),
        extra,
    }
}

/// The RSS row after the command mix, with private memory beside it.
pub(crate) fn rss_row(vt: &Remote, refs: &[Remote], labels: &[String]) -> Row {
    let private = |r: &Remote| one(crate::targets::smaps_kib(r.child.id(), "Private_Dirty") as f64);
    let mut extra = vec![("vtpmd private".to_string(), private(vt))];
    for (r, l) in refs.iter().zip(labels) {
        extra.push((format!("{l} private"), private(r)));
    }
    Row {
        name: "resident memory (RSS) after the command mix".into(),
        unit: "KiB",
        vtpmd: one(vt.rss_kib() as f64),
        refs: refs.iter().map(|r| one(r.rss_kib() as f64)).collect(),
        extra,
    }
}
