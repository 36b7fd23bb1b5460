//! Host integration: tpm2-tools (through tpm2-tss's swtpm TCTI, TCP data +
//! control ports) runs the shared scenario against vtpmd and, in the same
//! run, against swtpm as a differential check. Each backend is restarted on
//! its state directory between the two halves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vtpm_test_support as common;

fn scenario() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-tests/scenario/tpm2-scenario.sh")
}

/// Runs one scenario mode; returns check results and INFO values.
fn run_mode(
    port: u16,
    mode: &str,
    work: &Path,
) -> (BTreeMap<String, String>, BTreeMap<String, String>, String) {
    let out = Command::new("busybox")
        .arg("sh")
        .arg(scenario())
        .arg(mode)
        .arg(work)
        .env(
            "TPM2TOOLS_TCTI",
            format!("swtpm:host=127.0.0.1,port={port}"),
        )
        .output()
        .expect("run scenario with busybox sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (mut tests, mut info) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        let mut w = line.splitn(3, ' ');
        match (w.next(), w.next(), w.next()) {
            (Some("VTPM-TEST"), Some(name), Some(rest)) => {
                tests.insert(name.to_string(), rest.to_string());
            }
            (Some("VTPM-INFO"), Some(k), Some(v)) => {
                info.insert(k.to_string(), v.to_string());
            }
            _ => {}
        }
    }
    (tests, info, text)
}

fn expected(mode: &str) -> Vec<String> {
    let out = Command::new("busybox")
        .arg("sh")
        .arg(scenario())
        .args(["--list", mode])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Both halves of the scenario against `bin`; returns a failure list.
fn scenario_against(bin: &str) -> Vec<String> {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut failures = Vec::new();
    let mut infos = Vec::new();
    for mode in ["first", "second"] {
        let (backend, port) = common::start_tcp(bin, &state, &t.path().join(format!("{mode}.log")));
        let (tests, info, text) = run_mode(port, mode, &t.path().join(mode));
        drop(backend);
        for name in expected(mode) {
            match tests.get(&name).map(String::as_str) {
                Some("PASS") => eprintln!("PASS: {bin} {mode} {name}"),
                Some(r) => failures.push(format!("{bin} {mode} {name}: {r}")),
                None => failures.push(format!("{bin} {mode} {name}: no result line\n{text}")),
            }
        }
        infos.push(info);
    }
    for key in ["persistent-key-sha256", "nv-sha256"] {
        let (a, b) = (infos[0].get(key), infos[1].get(key));
        if a.is_none() || a != b {
            failures.push(format!(
                "{bin}: {key} differs across the restart: {a:?} vs {b:?}"
            ));
        }
    }
    failures
}

#[test]
fn tpm2_tools_scenario_vtpmd_and_swtpm() {
    let ours = scenario_against(&common::VTPMD);
    let reference = scenario_against("swtpm");
    assert!(
        reference.is_empty(),
        "the scenario fails against swtpm itself: {reference:#?}"
    );
    assert!(
        ours.is_empty(),
        "vtpmd failed where swtpm passed: {ours:#?}"
    );
}
