//! vtpmctl as `swtpm_ioctl` (a link of that name, as libvirt finds it in
//! PATH) next to swtpm's own swtpm_ioctl, on real vtpmd and swtpm control
//! sockets: the same command line gives the same output and exit status.

use common::*;
use vtpm_test_support as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const VTPMCTL: &str = env!("CARGO_BIN_EXE_vtpmctl");
/// swtpm's tool (Debian's swtpm-tools), the reference.
const REFERENCE: &str = "/usr/bin/swtpm_ioctl";

/// A directory holding `swtpm_ioctl` → vtpmctl, as `vtpm-libvirt` installs it.
fn ours(dir: &Path) -> PathBuf {
    let link = dir.join("swtpm_ioctl");
    if !link.exists() {
        std::os::unix::fs::symlink(VTPMCTL, &link).unwrap();
    }
    link
}

/// (exit code, stdout, stderr)
fn run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run swtpm_ioctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Commands whose answers do not depend on which tool asked, in an order
/// that leaves the TPM as it found it; each is run by both tools.
const COMMANDS: &[&[&str]] = &[
    &["-c"],
    &["-e"],
    &["-g"],
    &["-b", "0"],
    &["--info", "1"],
    &["--info", "3"],
    &["-l", "0"],
    &["-C"],
    &["-v"],
    &["-r", "0"],
    &["--stop"],
    &["-b", "2048"],
    &["-i"],
    &["-b", "0"],
];

fn side_by_side(backend: &str, bin: &str) {
    let t = state_dir();
    let tools = tempfile::tempdir().unwrap();
    let ours = ours(tools.path());
    let mut d = Daemon::start_bin(bin, t.path(), &["--flags", "not-need-init"]);
    let sock = d.ctrl.to_str().unwrap().to_string();
    for args in COMMANDS {
        let mut full = vec!["--unix", sock.as_str()];
        full.extend_from_slice(args);
        let theirs = run(Path::new(REFERENCE), &full);
        let mine = run(&ours, &full);
        assert_eq!(
            (mine.0, &mine.1),
            (theirs.0, &theirs.1),
            "{backend}: swtpm_ioctl {args:?}: vtpmctl's exit/stdout differ from swtpm's (stderr: {} / {})",
            mine.2,
            theirs.2
        );
        if mine.0 != 0 {
            // Refusals name the same PTM command and result.
            assert_eq!(mine.2.trim(), theirs.2.trim(), "{backend}: {args:?}");
        }
    }
    // libvirt's stop: SHUTDOWN, the backend exits.
    let (rc, out, err) = run(&ours, &["--unix", &sock, "-s"]);
    assert_eq!((rc, out.as_str()), (0, ""), "{backend}: -s: {err}");
    assert!(
        d.wait_exit(Duration::from_secs(10)).is_some(),
        "{backend} still running after -s"
    );
    // Nothing listens any more: named, exit 1, as swtpm's tool does.
    let (rc, _, err) = run(&ours, &["--unix", &sock, "-s"]);
    assert_eq!(rc, 1);
    assert!(err.contains(&sock), "{err}");
    assert_eq!(run(Path::new(REFERENCE), &["--unix", &sock, "-s"]).0, 1);
}

#[test]
fn same_answers_as_swtpm_ioctl_on_vtpmd() {
    side_by_side("vtpmd", &VTPMD);
}

#[test]
fn same_answers_as_swtpm_ioctl_on_swtpm() {
    side_by_side("swtpm", "swtpm");
}

#[test]
fn subcommand_form_and_bad_command_lines() {
    let t = state_dir();
    let d = Daemon::start(t.path(), &["--flags", "not-need-init"]);
    let sock = d.ctrl.to_str().unwrap();
    let (rc, out, _) = run(Path::new(VTPMCTL), &["swtpm-ioctl", "--unix", sock, "-c"]);
    assert_eq!((rc, out.as_str()), (0, "ptm capability is 0x17fff\n"));
    // The TPM refuses: swtpm's message, exit 1, vtpmd keeps serving.
    let (rc, _, err) = run(
        Path::new(VTPMCTL),
        &["swtpm-ioctl", "--unix", sock, "-r", "0"],
    );
    assert_eq!(
        (rc, err.trim()),
        (1, "TPM result from PTM_RESET_TPMESTABLISHED: 0x3d")
    );
    let tools = tempfile::tempdir().unwrap();
    let ours = ours(tools.path());
    for (args, want) in [
        (&["-s"][..], "Error: Missing device name."),
        (&["--unix", sock], "No valid command."),
        (
            &["--unix", sock, "-s", "-c"],
            "Only one command may be given.",
        ),
        (
            &["--unix", sock, "-l", "9"],
            "Locality outside valid range of [0..4].",
        ),
        (
            &["--unix", sock, "--save", "permanent", "/tmp/x"],
            "not supported",
        ),
        (&["/dev/vtpmx", "-s"], "swtpm cuse"),
    ] {
        let (rc, out, err) = run(&ours, args);
        assert_eq!((rc, out.as_str()), (1, ""), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (rc, out, _) = run(&ours, &["--unix", sock, "-e"]);
    assert_eq!(
        (rc, out.as_str()),
        (0, "tpmEstablished is 0\n"),
        "still serving"
    );
    let (rc, out, _) = run(&ours, &["--help"]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("--unix <path>") && out.contains("-s "),
        "{out}"
    );
}

#[test]
fn a_server_that_stops_answering_or_lies_is_named() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("fake.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        // First client: reads the request and hangs up without answering.
        let (mut c, _) = l.accept().unwrap();
        let mut req = [0u8; 4];
        c.read_exact(&mut req).unwrap();
        drop(c);
        // Second: GET_INFO announcing a huge document.
        let (mut c, _) = l.accept().unwrap();
        let mut req = [0u8; 20];
        c.read_exact(&mut req).unwrap();
        c.write_all(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x0c, 0])
            .unwrap();
    });
    let tools = tempfile::tempdir().unwrap();
    let ours = ours(tools.path());
    let s = sock.to_str().unwrap();
    let (rc, _, err) = run(&ours, &["--unix", s, "-s"]);
    assert_eq!(rc, 1);
    assert!(err.contains("Could not execute PTM_SHUTDOWN"), "{err}");
    let (rc, _, err) = run(&ours, &["--unix", s, "--info", "1"]);
    assert_eq!(rc, 1);
    assert!(err.contains("at most 65536 accepted"), "{err}");
    server.join().unwrap();
}
