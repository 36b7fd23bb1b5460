//! The rows: per-command latency, start-up, sealed and plain migration,
//! density. Each row times vtpmd and swtpm alternately.

use crate::report::{stat, us, Row, Stat};
use crate::targets::{connect, free_port, rss_of, smaps_kib, InProcess, Remote, Target};
use crate::{n, Opts};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vtpm_common::admin::{self, IncomingInfo, KeysPreloaded, Prepared, Request};
use vtpm_test_support::blobs;
use vtpm_test_support::cmd as c;

/// Times `make(i)` on every target, alternating targets per iteration.
/// `setup` runs once per target first; `after` (untimed) after each call.
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
    for i in 0..iters {
        // Rotate who goes first: whatever the previous call left behind
        // (cold caches, an idle core waking up) hits every target alike.
        for j in 0..n {
            let k = (i + j) % n;
            let t = &mut targets[k];
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
    samples.into_iter().map(stat).collect()
}

pub(crate) fn nothing(_: &mut dyn Target) -> u32 {
    0
}

pub(crate) fn no_after(_: &mut dyn Target, _: &[u8]) {}

pub(crate) fn flush_created(t: &mut dyn Target, r: &[u8]) {
    t.cmd(&c::flush(c::handle(r)));
}

pub(crate) fn command_rows(
    o: &Opts,
    vt: &mut Remote,
    sw: &mut Remote,
    ip: &mut InProcess,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut targets: Vec<&mut dyn Target> = vec![vt, sw, ip];
    let define_nv = |t: &mut dyn Target| {
        let r = t.cmd(&c::nv_define(0x0150_0100, 64));
        assert!(
            c::rc(&r) == 0 || c::rc(&r) == 0x14c,
            "NV define: {:#x}",
            c::rc(&r)
        );
        let _ = t.cmd(&c::nv_write(0x0150_0100, &[0; 64]));
        0
    };
    let signing_key = |t: &mut dyn Target| {
        let r = t.cmd(&c::create_primary("sign", 7));
        assert_eq!(c::rc(&r), 0, "signing key");
        c::handle(&r)
    };
    type Make = Box<dyn Fn(usize, u32) -> Vec<u8>>;
    type Setup = Box<dyn Fn(&mut dyn Target) -> u32>;
    type After = Box<dyn Fn(&mut dyn Target, &[u8])>;
    let specs: Vec<(&str, usize, Setup, Make, After)> = vec![
        (
            "GetRandom(32)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::get_random(32)),
            Box::new(no_after),
        ),
        (
            "PCR_Read",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::pcr_read(16)),
            Box::new(no_after),
        ),
        (
            "PCR_Extend(sha256)",
            2000,
            Box::new(nothing),
            Box::new(|i, _| c::pcr_extend(16, &[i as u8; 32])),
            Box::new(no_after),
        ),
        (
            "Hash(sha256, 64 B)",
            2000,
            Box::new(nothing),
            Box::new(|_, _| c::hash(&[0x33; 64])),
            Box::new(no_after),
        ),
        (
            "NV_Write 64 B (state write)",
            300,
            Box::new(define_nv),
            Box::new(|i, _| c::nv_write(0x0150_0100, &[(i % 251) as u8 + 1; 64])),
            Box::new(no_after),
        ),
        (
            "NV_Read 64 B",
            2000,
            Box::new(define_nv),
            Box::new(|_, _| c::nv_read(0x0150_0100, 64)),
            Box::new(no_after),
        ),
        (
            "CreatePrimary ECC P-256",
            100,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("ecc", i as u8)),
            Box::new(flush_created),
        ),
        (
            "CreatePrimary RSA-2048",
            12,
            Box::new(nothing),
            Box::new(|i, _| c::create_primary("rsa", i as u8)),
            Box::new(flush_created),
        ),
        (
            "ECDSA sign (loaded key)",
            300,
            Box::new(signing_key),
            Box::new(|_, h| c::sign_ecdsa(h)),
            Box::new(no_after),
        ),
        (
            "StartAuthSession + FlushContext",
            1000,
            Box::new(nothing),
            Box::new(|_, _| c::start_auth_session()),
            Box::new(flush_created),
        ),
    ];
    let only = std::env::var("VTPM_BENCH_ONLY").ok();
    for (name, full, setup, make, after) in specs {
        if only.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let iters = n(o, full);
        eprintln!("  {name} x{iters}");
        let mut st = latency_row(name, iters, &mut targets, &*setup, &*make, &*after);
        let ip = st.pop().unwrap();
        let sw = st.pop().unwrap();
        let vt = st.pop().unwrap();
        rows.push(Row {
            name: name.into(),
            unit: "us",
            vtpmd: vt,
            swtpm: sw,
            extra: vec![("in-process".into(), ip)],
        });
    }
    rows
}

pub(crate) fn startup_row(o: &Opts) -> Row {
    let iters = n(o, 20);
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..iters {
        for (k, bin) in [o.vtpmd.as_str(), "swtpm"].iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port(500 + i as u32 * 2 + k as u32);
            let start = Instant::now();
            let mut child = Command::new(bin)
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.path().display()))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut s = connect(port, Duration::from_secs(5)).expect("ctrl port");
            let caps = blobs::ctrl_cmd(&mut s, 1, &[], 8);
            samples[k].push(us(start.elapsed()) / 1000.0);
            assert_eq!(&caps[..4], &[0, 0, 0, 0]);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let [a, b] = samples;
    Row {
        name: "start-up until GET_CAPABILITY answers".into(),
        unit: "ms",
        vtpmd: stat(a),
        swtpm: stat(b),
        extra: vec![],
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
    let port = t.data.peer_addr().unwrap().port() + 1;
    connect(port, Duration::from_secs(2)).unwrap()
}

pub(crate) fn migration_rows(o: &Opts, keys: &Path) -> Row {
    let iters = n(o, 30);
    // swtpm plain and swtpm with a migration key.
    let mkey = keys.join("migration.key");
    std::fs::write(
        &mkey,
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .unwrap();
    let mk = format!("file={},format=hex,mode=aes-256-cbc", mkey.display());
    let mut results = Vec::new();
    for (label, extra) in [
        ("swtpm plain", vec![]),
        (
            "swtpm --migration-key",
            vec!["--migration-key", mk.as_str()],
        ),
    ] {
        let mut src = Remote::start("swtpm", "swtpm", &extra, 700 + results.len() as u32);
        populate(&mut src);
        let dst = Remote::start("swtpm", "swtpm", &extra, 710 + results.len() as u32);
        let (mut sc, mut dc) = (ctrl_of(&src), ctrl_of(&dst));
        let mut v = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            migrate_once(&mut sc, &mut dc);
            v.push(us(t.elapsed()));
        }
        results.push((label.to_string(), stat(v)));
    }
    // vtpmd sealed: a fresh destination per migration (its id is single use).
    let mut samples = Vec::new();
    let mut unloaded = Vec::new();
    let kd = tempfile::tempdir().unwrap();
    for h in ["a", "b"] {
        let st = Command::new(&o.vtpmctl)
            .args(["keygen", "--out"])
            .arg(keys.join(h))
            .output()
            .unwrap();
        assert!(st.status.success(), "keygen: {st:?}");
    }
    let src_admin = kd.path().join("src.admin");
    let hk = |h: &str| keys.join(h).join("host-key.pem").display().to_string();
    let src_args = [
        "--host-key".to_string(),
        hk("a"),
        "--admin".into(),
        format!("path={}", src_admin.display()),
    ];
    let sa: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let mut src = Remote::start("vtpmd", &o.vtpmd, &sa, 720);
    populate(&mut src);
    let mut sc = ctrl_of(&src);
    for i in 0..iters {
        let dst_admin = kd.path().join(format!("dst{i}.admin"));
        let dst_args = [
            "--host-key".to_string(),
            hk("b"),
            "--admin".into(),
            format!("path={}", dst_admin.display()),
            "--migration".into(),
            "incoming".into(),
        ];
        let da: Vec<&str> = dst_args.iter().map(String::as_str).collect();
        let dst = Remote::start_with("vtpmd", &o.vtpmd, &da, 730 + i as u32, false);
        let info: IncomingInfo = admin::call(&dst_admin, &Request::IncomingInfo).unwrap();
        let out: Prepared = admin::call(
            &src_admin,
            &Request::Outgoing {
                peer_key: info.public_key,
                migration_id: info.migration_id,
            },
        )
        .unwrap();
        // Every other migration, the destination unwraps the keys before
        // the VM stops (vtpmctl incoming-key), as docs/migration.md
        // recommends; the others unwrap them inside the timed window.
        let preload = i % 2 == 0;
        if preload {
            let _: KeysPreloaded = admin::call(
                &dst_admin,
                &Request::IncomingKey {
                    wrapped_key: out.wrapped_key,
                },
            )
            .unwrap();
        }
        let mut dc = ctrl_of(&dst);
        let t = Instant::now();
        migrate_once(&mut sc, &mut dc);
        if preload {
            samples.push(us(t.elapsed()));
        } else {
            unloaded.push(us(t.elapsed()));
        }
        // The source resumes, as after QEMU's LOCK_STORAGE.
        assert_eq!(blobs::ctrl_cmd(&mut sc, 0x13, &[0, 0, 0, 1], 4), vec![0; 4]);
    }
    let mut row = Row {
        name: "migration: GET x3 + SET x3 + INIT".into(),
        unit: "us",
        vtpmd: stat(samples),
        swtpm: results[0].1.clone(),
        extra: vec![],
    };
    row.extra.push(results.remove(1));
    row.extra
        .push(("vtpmd without incoming-key".into(), stat(unloaded)));
    row
}

pub(crate) fn density_row(o: &Opts) -> Row {
    let count = n(o, 50);
    let mut per = Vec::new();
    let mut rss = Vec::new();
    let mut private = Vec::new();
    for bin in [o.vtpmd.as_str(), "swtpm"] {
        let dirs: Vec<tempfile::TempDir> =
            (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut children: Vec<Child> = dirs
            .iter()
            .map(|d| {
                Command::new(bin)
                    .args(["socket", "--tpm2", "--tpmstate"])
                    .arg(format!("dir={}", d.path().display()))
                    .arg("--ctrl")
                    .arg(format!(
                        "type=unixio,path={}",
                        d.path().join("c.sock").display()
                    ))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for d in &dirs {
            let start = Instant::now();
            while !d.path().join("c.sock").exists() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        // PSS: the binary's and libraries' pages are in memory once for
        // all 50, and PSS charges each instance its share of them. RSS
        // would charge every instance the whole binary.
        per.push(stat(
            children
                .iter()
                .map(|c| smaps_kib(c.id(), "Pss") as f64)
                .collect(),
        ));
        rss.push(stat(
            children.iter().map(|c| rss_of(c.id()) as f64).collect(),
        ));
        private.push(stat(
            children
                .iter()
                .map(|c| smaps_kib(c.id(), "Private_Dirty") as f64)
                .collect(),
        ));
        let total: u64 = children.iter().map(|c| smaps_kib(c.id(), "Pss")).sum();
        eprintln!(
            "  {bin}: {count} idle instances, {} MiB in total (sum of PSS)",
            total / 1024
        );
        for ch in children.iter_mut() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
    let sw = per.pop().unwrap();
    let vt = per.pop().unwrap();
    let (sw_rss, vt_rss) = (rss.pop().unwrap(), rss.pop().unwrap());
    let (sw_priv, vt_priv) = (private.pop().unwrap(), private.pop().unwrap());
    Row {
        name: format!("memory (PSS) per idle instance, {count} side by side"),
        unit: "KiB",
        vtpmd: vt,
        swtpm: sw,
        extra: vec![
            ("vtpmd RSS".into(), vt_rss),
            ("swtpm RSS".into(), sw_rss),
            ("vtpmd private".into(), vt_priv),
            ("swtpm private".into(), sw_priv),
        ],
    }
}
