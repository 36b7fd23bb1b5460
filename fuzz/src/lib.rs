//! Fuzz target bodies for every vtpmd parser that takes outside bytes.
//!
//! Each target is a plain `fn(&[u8])` that must not panic on any input and
//! asserts an invariant (a round trip, or a consistency rule) where one
//! exists. Two drivers call them: the libFuzzer binaries in
//! `fuzz/libfuzzer` (`make fuzz`), and `tests/replay.rs`, which runs every
//! kept input of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! under a plain `cargo test` (`make test`). See docs/FUZZING.md.

pub mod engine;
pub mod targets;

/// A fuzz target: its name (the libFuzzer binary and the corpus folder)
/// and its body.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "swtpm_ctrl",
        run: targets::swtpm_ctrl,
    },
    Target {
        name: "tpm_frame",
        run: targets::tpm_frame,
    },
    Target {
        name: "data_channel",
        run: targets::data_channel,
    },
    Target {
        name: "state_file",
        run: targets::state_file,
    },
    Target {
        name: "migration_import",
        run: targets::migration_import,
    },
    Target {
        name: "device_stream",
        run: targets::device_stream,
    },
    Target {
        name: "admin_request",
        run: targets::admin_request,
    },
    Target {
        name: "vhost_request",
        run: targets::vhost_request,
    },
    Target {
        name: "common_codec",
        run: targets::common_codec,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
