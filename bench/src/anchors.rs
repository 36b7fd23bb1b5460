//! The reference backends vtpmd is compared with ("anchors"): the system's
//! swtpm (Debian bookworm: 0.7.1) and, when `bench/prepare-swtpm-sid.sh`
//! has made its root, sid's swtpm (0.10.x) through the chroot wrapper.
//! `--swtpm [LABEL=]PATH` (repeatable) replaces that default list.

use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Clone, Debug)]
pub(crate) struct Anchor {
    /// "swtpm 0.7.1": the report's column name.
    pub(crate) label: String,
    /// Called exactly like `swtpm`.
    pub(crate) bin: String,
}

/// The version `bin --version` reports ("TPM emulator version 0.7.1, ..."),
/// if it runs.
pub(crate) fn version(bin: &str) -> Option<String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("version ")? + "version ".len();
    let v: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The sid wrapper made by `bench/prepare-swtpm-sid.sh`, if it is complete.
pub(crate) fn sid_wrapper(root: &Path) -> Option<String> {
    let dir = root.join("build/swtpm-sid");
    let ready = dir.join("root/.vtpm-prepared").is_file() && dir.join("swtpm").is_file();
    ready.then(|| dir.join("swtpm").display().to_string())
}

/// The anchors for this run. `specs` are the `--swtpm` values; empty means
/// the defaults. Anchors that do not run are reported and left out.
pub(crate) fn choose(root: &Path, specs: &[String], smoke: bool) -> Vec<Anchor> {
    let mut wanted: Vec<(Option<String>, String)> = specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((l, p)) if !l.contains('/') => (Some(l.to_string()), p.to_string()),
            _ => (None, s.clone()),
        })
        .collect();
    if wanted.is_empty() {
        wanted.push((None, "swtpm".into()));
        match sid_wrapper(root) {
            Some(w) => wanted.push((None, w)),
            None => eprintln!(
                "vtpm-bench: swtpm from Debian sid skipped: its root is not prepared \
                 (bash bench/prepare-swtpm-sid.sh{})",
                if smoke { "; `make bench` runs it" } else { "" }
            ),
        }
    }
    let mut out: Vec<Anchor> = Vec::new();
    for (label, bin) in wanted {
        let Some(v) = version(&bin) else {
            eprintln!("vtpm-bench: {bin} does not run (`{bin} --version` failed); left out");
            continue;
        };
        let mut label = label.unwrap_or_else(|| format!("swtpm {v}"));
        if out.iter().any(|a| a.label == label) {
            label = format!("{label} ({bin})");
        }
        out.push(Anchor { label, bin });
    }
    assert!(
        !out.is_empty(),
        "no reference swtpm runs: install swtpm (scripts/install-deps.sh)"
    );
    out
}
