//! Replays every kept fuzz input (fuzz/corpus/<target>/* and
//! fuzz/regressions/<target>/*) through the same target bodies libFuzzer
//! runs, on stable Rust, as part of `cargo test` (so `make test`).

use std::path::Path;
use vtpm_fuzz::TARGETS;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind);
    let mut n = 0;
    for t in TARGETS {
        for p in inputs(&root.join(t.name)) {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| (t.run)(&data));
            assert!(r.is_ok(), "{}: {} fails", t.name, p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn corpus_replays_clean() {
    let n = replay("corpus");
    // Every target keeps a corpus; an empty one means it was lost.
    for t in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(t.name);
        assert!(!inputs(&dir).is_empty(), "no corpus for {}", t.name);
    }
    eprintln!("replayed {n} corpus inputs");
}

#[test]
fn regressions_replay_clean() {
    let n = replay("regressions");
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn empty_and_tiny_inputs() {
    for t in TARGETS {
        for len in 0..16u8 {
            (t.run)(&(0..len).collect::<Vec<u8>>());
        }
    }
}

/// The migration seeds are a whole valid migration, so the fuzzer starts
/// from inputs that pass the RSA unwrap and the MAC chain.
#[test]
fn migration_seed_is_a_complete_migration() {
    use vtpm_fuzz::targets::{host_key, split_blobs};
    use vtpmd::migration::piece::{peek_id, Importer, Purpose};
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/migration_import/seed-three");
    let data = std::fs::read(p).unwrap();
    let (_, blobs) = split_blobs(&data);
    assert_eq!(blobs.len(), 3);
    let mut imp = Importer::new(peek_id(blobs[0].1).unwrap(), Purpose::Migration);
    for (ty, b) in blobs {
        imp.accept(ty, b, host_key()).unwrap();
    }
    assert!(imp.complete());
    assert_eq!(&imp.permanent[..], &[1u8; 300][..]);
}
