//! vtpm-setup end to end: real libtpms, real files, real vtpmd. Each test
//! provisions a state directory with swtpm_setup's command line (as libvirt
//! calls it), then serves it with vtpmd and checks the result with
//! tpm2-tools through the swtpm TCTI and with openssl; one test runs the real
//! swtpm_setup 0.7.1 with the same flags and compares the two.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::LazyLock;
use vtpm_test_support as common;
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

const VMID: &str = "guest1:0d4c1a7e-5a3b-4f6e-8c2d-9e8f7a6b5c4d";

/// One local CA for the whole file (creating one costs two RSA-3072 keys).
static CA: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

struct Fixture {
    t: tempfile::TempDir,
    state: PathBuf,
    conf: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_ca(&CA.path().join("ca"))
    }

    fn with_ca(ca: &Path) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let opts = t.path().join("localca.options");
        std::fs::write(
            &opts,
            "--platform-manufacturer ACME\n--platform-version 2.1\n--platform-model QEMU\n",
        )
        .unwrap();
        let conf = t.path().join("setup.conf");
        std::fs::write(
            &conf,
            format!(
                "statedir = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                ca.display(),
                opts.display()
            ),
        )
        .unwrap();
        Fixture { t, state, conf }
    }

    fn ca_dir(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.conf).unwrap();
        let line = text.lines().find(|l| l.starts_with("statedir")).unwrap();
        PathBuf::from(line.split('=').nth(1).unwrap().trim())
    }

    fn log(&self) -> PathBuf {
        self.t.path().join("setup.log")
    }

    /// libvirt's first-start command line plus `extra`.
    fn libvirt_args(&self, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--vmid",
            VMID,
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--not-overwrite",
        ];
        v.extend_from_slice(extra);
        self.args(&v)
    }

    /// Minimal command line: state dir, config, log, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--tpm2",
            "--tpm-state",
            self.state.to_str().unwrap(),
            "--config",
            self.conf.to_str().unwrap(),
            "--logfile",
            self.log().to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn permall(&self) -> Option<Vec<u8>> {
        std::fs::read(self.state.join("tpm2-00.permall")).ok()
    }

    /// Serves the state with vtpmd given `--key <key>`.
    fn serve_with_key(&self, key: String) -> (common::TcpBackend, u16) {
        let log = self.t.path().join("vtpmd.log");
        common::start_tcp_with(&common::VTPMD, &self.state, &log, &["--key".into(), key])
    }

    fn serve(&self) -> (common::TcpBackend, u16) {
        common::start_tcp(
            &common::VTPMD,
            &self.state,
            &self.t.path().join("vtpmd.log"),
        )
    }
}

fn setup(args: &[String]) -> Output {
    Command::new(&*common::VTPM_SETUP)
        .args(args)
        .output()
        .expect("run vtpm-setup")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a tpm2-tools command against the backend on `port`.
fn tpm2(port: u16, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .env(
            "TPM2TOOLS_TCTI",
            format!("swtpm:host=127.0.0.1,port={port}"),
        )
        .output()
        .expect("run tpm2-tools")
}

fn tpm2_ok(port: u16, args: &[&str]) -> String {
    ok(&tpm2(port, args), &args.join(" "))
}

fn nv_read(port: u16, index: &str, out: &Path) -> Vec<u8> {
    tpm2_ok(
        port,
        &["tpm2_nvread", index, "-C", "o", "-o", out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

/// `openssl x509 -inform der` on `cert` (written to `work`) with `extra`.
fn x509(cert: &[u8], work: &Path, extra: &[&str]) -> String {
    let der = work.join("x509-in.der");
    std::fs::write(&der, cert).unwrap();
    let mut args = vec!["x509", "-inform", "der", "-in", der.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&openssl(&args), &args.join(" "))
}

/// `openssl verify` of DER `cert` against the CA in `ca_dir`.
fn verify(cert: &[u8], ca_dir: &Path, work: &Path) -> String {
    let pem = work.join("v.pem");
    x509(cert, work, &["-out", pem.to_str().unwrap()]);
    let root = ca_dir.join("swtpm-localca-rootca-cert.pem");
    let issuer = ca_dir.join("issuercert.pem");
    let o = openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        "-untrusted",
        issuer.to_str().unwrap(),
        pem.to_str().unwrap(),
    ]);
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// The certificate's public key as PEM (openssl's rendering).
fn cert_pubkey(cert: &[u8], work: &Path) -> String {
    x509(cert, work, &["-pubkey", "-noout"])
}

/// The public key of persistent `handle`, PEM, as tpm2_readpublic exports it.
fn tpm_pubkey(port: u16, handle: &str, work: &Path) -> String {
    let out = work.join(format!("{handle}.pem"));
    tpm2_ok(
        port,
        &[
            "tpm2_readpublic",
            "-c",
            handle,
            "-f",
            "pem",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let pem = std::fs::read_to_string(&out).unwrap();
    // Normalise through openssl, like cert_pubkey.
    let o = Command::new("openssl")
        .args(["pkey", "-pubin", "-in", out.to_str().unwrap()])
        .output()
        .unwrap();
    if o.status.success() {
        String::from_utf8_lossy(&o.stdout).into_owned()
    } else {
        pem
    }
}

/// `tpm2_getcap pcrs` as (bank, has PCRs selected).
fn pcr_banks(port: u16) -> Vec<(String, bool)> {
    tpm2_ok(port, &["tpm2_getcap", "pcrs"])
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("- ")?;
            let (bank, rest) = l.split_once(':')?;
            Some((bank.trim().to_string(), rest.contains('0')))
        })
        .collect()
}

fn active(banks: &[(String, bool)]) -> Vec<&str> {
    banks
        .iter()
        .filter(|(_, on)| *on)
        .map(|(b, _)| b.as_str())
        .collect()
}

/// Extension (OID, critical, value) of a certificate.
fn extensions(der: &[u8]) -> Vec<(String, bool, Vec<u8>)> {
    let c = Certificate::from_der(der).unwrap();
    c.tbs_certificate
        .extensions
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            (
                e.extn_id.to_string(),
                e.critical,
                e.extn_value.as_bytes().to_vec(),
            )
        })
        .collect()
}

fn ext_value(der: &[u8], oid: &str) -> Vec<u8> {
    extensions(der)
        .into_iter()
        .find(|(o, _, _)| o == oid)
        .unwrap_or_else(|| panic!("no extension {oid}"))
        .2
}

#[test]
fn libvirt_provisioning_serves_verified_certificates_and_locked_nv() {
    let f = Fixture::new();
    let out = ok(&setup(&f.libvirt_args(&[])), "vtpm-setup");
    assert!(
        out.is_empty(),
        "with --logfile nothing goes to stdout: {out}"
    );
    let log = std::fs::read_to_string(f.log()).unwrap();
    for line in [
        "Successfully created rsa2048 EK with handle 0x81010001.",
        "Successfully created NVRAM area 0x1c00002 for rsa2048 EK certificate.",
        "Successfully created NVRAM area 0x1c08000 for platform certificate.",
        "Successfully created secp256r1 EK with handle 0x81010002.",
        "Successfully created NVRAM area 0x1c0000a for secp256r1 EK certificate.",
        "Successfully activated PCR banks sha256 among sha1,sha256,sha384,sha512.",
        "Successfully authored TPM state.",
    ] {
        assert!(log.contains(line), "missing '{line}' in log:\n{log}");
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f.log()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "log created 0600");

    let (_vtpmd, port) = f.serve();
    let work = f.t.path();
    let handles = tpm2_ok(port, &["tpm2_getcap", "handles-persistent"]);
    assert!(
        handles.contains("0x81010001") && handles.contains("0x81010002"),
        "{handles}"
    );
    let ca = f.ca_dir();
    let rsa = nv_read(port, "0x1c00002", &work.join("rsa.der"));
    let ecc = nv_read(port, "0x1c0000a", &work.join("ecc.der"));
    let plat = nv_read(port, "0x1c08000", &work.join("plat.der"));
    for (name, cert, handle) in [
        ("RSA EK", &rsa, "0x81010001"),
        ("ECC EK", &ecc, "0x81010002"),
        ("platform", &plat, "0x81010001"),
    ] {
        let v = verify(cert, &ca, work);
        assert!(
            v.contains(": OK"),
            "{name} certificate does not verify: {v}"
        );
        assert_eq!(
            cert_pubkey(cert, work),
            tpm_pubkey(port, handle, work),
            "{name} certificate holds the key at {handle}"
        );
    }

    // What the certificates say.
    let c = Certificate::from_der(&rsa).unwrap();
    assert_eq!(c.tbs_certificate.subject.to_string(), format!("CN={VMID}"));
    let ext = extensions(&rsa);
    let crit = |oid: &str| ext.iter().find(|(o, _, _)| o == oid).map(|e| e.1);
    assert_eq!(crit("2.5.29.17"), Some(true), "SAN critical");
    assert_eq!(crit("2.5.29.15"), Some(true), "key usage critical");
    assert_eq!(crit("2.5.29.19"), Some(true), "basic constraints critical");
    assert_eq!(crit("2.5.29.9"), Some(false), "TPM specification");
    assert_eq!(
        ext_value(&rsa, "2.5.29.15"),
        [3, 2, 5, 0x20],
        "keyEncipherment"
    );
    assert_eq!(ext_value(&ecc, "2.5.29.15"), [3, 2, 3, 8], "keyAgreement");
    assert_eq!(
        ext_value(&rsa, "2.5.29.37"),
        [0x30, 7, 6, 5, 0x67, 0x81, 5, 8, 1]
    );
    assert_eq!(
        ext_value(&plat, "2.5.29.37"),
        [0x30, 7, 6, 5, 0x67, 0x81, 5, 8, 2]
    );
    let san = ext_value(&plat, "2.5.29.17");
    assert!(
        san.windows(4).any(|w| w == b"ACME"),
        "platform manufacturer from the options file"
    );

    // Locked: the platform cannot rewrite the certificate.
    let attrs = tpm2_ok(port, &["tpm2_nvreadpublic", "0x1c00002"]);
    assert!(attrs.contains("value: 0x62072801"), "{attrs}");
    let w = tpm2(
        port,
        &[
            "tpm2_nvwrite",
            "0x1c00002",
            "-C",
            "p",
            "-i",
            f.conf.to_str().unwrap(),
        ],
    );
    assert!(!w.status.success());
    assert!(String::from_utf8_lossy(&w.stderr).contains("locked"));
    assert_eq!(nv_read(port, "0x1c00002", &work.join("again.der")), rsa);

    // The guest's tool finds both certificates.
    let (a, b) = (work.join("get-rsa.der"), work.join("get-ecc.der"));
    tpm2_ok(
        port,
        &[
            "tpm2_getekcertificate",
            "-o",
            a.to_str().unwrap(),
            "-o",
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&a).unwrap(), rsa);
    assert_eq!(std::fs::read(&b).unwrap(), ecc);
    // The EK recreated from the standard template is the one certified.
    let ek = work.join("ek.pem");
    tpm2_ok(
        port,
        &[
            "tpm2_createek",
            "-c",
            "-",
            "-G",
            "rsa",
            "-u",
            ek.to_str().unwrap(),
            "-f",
            "pem",
        ],
    );
    assert_eq!(
        ok(
            &openssl(&["pkey", "-pubin", "-in", ek.to_str().unwrap()]),
            "openssl pkey"
        ),
        cert_pubkey(&rsa, work)
    );
    assert_eq!(active(&pcr_banks(port)), ["sha256"]);
}

#[test]
fn pcr_banks_are_allocated_and_reconfigure_only_changes_them() {
    let f = Fixture::new();
    ok(
        &setup(&f.args(&["--createek", "--pcr-banks", "sha256,sha384"])),
        "vtpm-setup",
    );
    let work = f.t.path();
    let ek_before = {
        let (_v, port) = f.serve();
        assert_eq!(active(&pcr_banks(port)), ["sha256", "sha384"]);
        tpm_pubkey(port, "0x81010001", work)
    };
    // libvirt's <active_pcr_banks> change.
    ok(
        &setup(&f.args(&["--pcr-banks", "sha1", "--reconfigure"])),
        "vtpm-setup --reconfigure",
    );
    let log = std::fs::read_to_string(f.log()).unwrap();
    assert!(log.contains("Starting vTPM reconfiguration"), "{log}");
    let (_v, port) = f.serve();
    assert_eq!(active(&pcr_banks(port)), ["sha1"]);
    assert_eq!(tpm_pubkey(port, "0x81010001", work), ek_before, "keys kept");
    // '-' leaves the banks alone.
    drop(_v);
    ok(
        &setup(&f.args(&["--pcr-banks", "-", "--reconfigure"])),
        "reconfigure -",
    );
    let (_v, port) = f.serve();
    assert_eq!(active(&pcr_banks(port)), ["sha1"]);
}

#[test]
fn existing_state_is_kept_refused_or_replaced_as_asked() {
    let f = Fixture::new();
    ok(&setup(&f.args(&["--createek"])), "first");
    let first = f.permall().unwrap();
    ok(
        &setup(&f.args(&["--createek", "--not-overwrite"])),
        "--not-overwrite",
    );
    assert_eq!(
        f.permall().unwrap(),
        first,
        "--not-overwrite left the state alone"
    );
    assert!(std::fs::read_to_string(f.log())
        .unwrap()
        .contains("Not overwriting existing state file."));
    let o = setup(&f.args(&["--createek"]));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--overwrite") && err.contains("--not-overwrite"),
        "{err}"
    );
    assert_eq!(f.permall().unwrap(), first);

    let work = f.t.path();
    let ek1 = {
        let (_v, port) = f.serve();
        tpm_pubkey(port, "0x81010001", work)
    };
    ok(
        &setup(&f.args(&["--createek", "--overwrite"])),
        "--overwrite",
    );
    let (_v, port) = f.serve();
    assert_ne!(
        tpm_pubkey(port, "0x81010001", work),
        ek1,
        "a new TPM, a new EK"
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_leaves_no_state() {
    let f = Fixture::new();
    let s = f.state.to_str().unwrap().to_string();
    let link = f.t.path().join("log-link");
    std::os::unix::fs::symlink(f.t.path().join("victim"), &link).unwrap();
    let bad_ca = f.t.path().join("badca");
    std::fs::create_dir(&bad_ca).unwrap();
    std::fs::write(bad_ca.join("signkey.pem"), "not a key").unwrap();
    std::fs::write(bad_ca.join("issuercert.pem"), "not a cert").unwrap();
    let bad_conf = f.t.path().join("bad.conf");
    std::fs::write(&bad_conf, format!("statedir = {}\n", bad_ca.display())).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--bogus".into()], "unknown option '--bogus'"),
        (vec!["--tpm-state".into(), s.clone()], "add --tpm2"),
        (vec!["--tpm2".into()], "--tpm-state DIR is required"),
        (
            f.args(&["--pcr-banks", "sha265"]),
            "unknown PCR bank 'sha265'",
        ),
        (
            f.args(&["--createek", "--rsa-keysize", "4096"]),
            "RSA key size 4096",
        ),
        (f.args(&["--cipher", "des-ede3"]), "unsupported cipher"),
        (f.args(&["--reconfigure"]), "no TPM state"),
        (
            f.args(&["--reconfigure", "--createek"]),
            "--reconfigure only changes",
        ),
        (f.args(&["--pwdfile-fd", "abc"]), "invalid file descriptor"),
        (f.args(&["--take-ownership"]), "TPM 1.2"),
        (
            vec![
                "--tpm2".into(),
                "--tpm-state".into(),
                "file:///tmp/x".into(),
            ],
            "keeps state in a directory",
        ),
        (
            vec![
                "--tpm2".into(),
                "--tpm-state".into(),
                "/nonexistent/vtpm".into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "--tpm2".into(),
                "--tpm-state".into(),
                s.clone(),
                "--config".into(),
                "/nonexistent/swtpm_setup.conf".into(),
            ],
            "cannot read configuration file",
        ),
        (
            vec![
                "--tpm2".into(),
                "--tpm-state".into(),
                s.clone(),
                "--logfile".into(),
                link.to_str().unwrap().into(),
            ],
            "symbolic link",
        ),
        (
            vec![
                "--tpm2".into(),
                "--tpm-state".into(),
                s.clone(),
                "--config".into(),
                bad_conf.to_str().unwrap().into(),
                "--create-ek-cert".into(),
            ],
            "no PEM block",
        ),
    ];
    for (args, want) in cases {
        let o = setup(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?} should fail: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(f.permall().is_none(), "{args:?} left state behind");
    }
    assert!(
        !f.t.path().join("victim").exists(),
        "the log symlink was not followed"
    );
    let o = Command::new(&*common::VTPM_SETUP)
        .args(["--tpm2", "--tpm-state"])
        .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/tmp/\xff"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not valid UTF-8"));

    // A directory a running vTPM holds is refused, and its state kept.
    ok(&setup(&f.args(&["--createek"])), "provision");
    let (_v, _port) = f.serve();
    let before = f.permall().unwrap();
    let o = setup(&f.args(&["--overwrite", "--createek"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another vTPM process"), "{err}");
    assert!(
        f.permall().unwrap() == before,
        "the served state was not touched"
    );
}

#[test]
fn works_when_installed_as_swtpm_setup() {
    let f = Fixture::new();
    let link = f.t.path().join("swtpm_setup");
    std::os::unix::fs::symlink(&*common::VTPM_SETUP, &link).unwrap();
    let caps = ok(
        &Command::new(&link)
            .arg("--print-capabilities")
            .output()
            .unwrap(),
        "--print-capabilities",
    );
    let v: serde_json::Value = serde_json::from_str(&caps).unwrap();
    assert_eq!(v["type"], "swtpm_setup");
    let features: Vec<String> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    for want in [
        "tpm-2.0",
        "cmdarg-reconfigure-pcr-banks",
        "cmdarg-create-config-files",
        "tpm2-rsa-keysize-2048",
    ] {
        assert!(features.iter().any(|f| f == want), "{want} not in {caps}");
    }
    assert!(!features.iter().any(|f| f == "tpm-1.2"), "{caps}");
    let version = ok(
        &Command::new(&link).arg("--version").output().unwrap(),
        "--version",
    );
    assert!(
        version.starts_with("TPM emulator setup tool version 0.7.1"),
        "{version}"
    );
    let help = ok(
        &Command::new(&link).arg("--help").output().unwrap(),
        "--help",
    );
    assert!(
        help.contains("swtpm_setup") && help.contains("--tpm-state"),
        "{help}"
    );
    ok(
        &Command::new(&link)
            .args(f.libvirt_args(&[]))
            .output()
            .unwrap(),
        "provisioning as swtpm_setup",
    );
    assert!(f.permall().is_some());

    // libvirt's session mode: per-user config files, then skip-if-exist.
    let home = f.t.path().join("home");
    let create = |opts: &str| {
        Command::new(&link)
            .args(["--create-config-files", opts])
            .env("XDG_CONFIG_HOME", &home)
            .output()
            .unwrap()
    };
    let o = create("skip-if-exist");
    assert!(!o.status.success(), "as root the 'root' word is needed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("'root'"));
    ok(&create("root"), "--create-config-files root");
    let conf = std::fs::read_to_string(home.join("swtpm-localca.conf")).unwrap();
    assert!(conf.contains(&format!(
        "statedir = {}",
        home.join("var/lib/swtpm-localca").display()
    )));
    ok(&create("root,skip-if-exist"), "skip-if-exist");
    assert!(!create("root").status.success(), "refuses to overwrite");
}

/// Runs the real swtpm_setup 0.7.1 with libvirt's flags on `state`, with its
/// local CA in `ca`.
fn swtpm_setup(t: &Path, state: &Path, ca: &Path, options: &Path) -> Output {
    let localca = t.join("swtpm-localca.conf");
    std::fs::write(
        &localca,
        format!(
            "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
            ca.display()
        ),
    )
    .unwrap();
    let conf = t.join("swtpm_setup.conf");
    std::fs::write(
        &conf,
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
            localca.display(),
            options.display()
        ),
    )
    .unwrap();
    Command::new("swtpm_setup")
        .args([
            "--tpm2",
            "--tpm-state",
            state.to_str().unwrap(),
            "--vmid",
            VMID,
            "--logfile",
            t.join("swtpm_setup.log").to_str().unwrap(),
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--not-overwrite",
            "--config",
            conf.to_str().unwrap(),
        ])
        .output()
        .expect("run swtpm_setup")
}

/// `tpm2_readpublic` without the lines that differ between two keys.
fn key_shape(port: u16, handle: &str) -> String {
    tpm2_ok(port, &["tpm2_readpublic", "-c", handle])
        .lines()
        .filter(|l| {
            !l.starts_with("name")
                && !l.starts_with("qualified name")
                && !l.starts_with("rsa:")
                && !l.starts_with("x:")
                && !l.starts_with("y:")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn side_by_side_with_swtpm_setup_0_7_1() {
    let t = tempfile::tempdir().unwrap();
    let swtpm_ca = t.path().join("swtpm-ca");
    let theirs = t.path().join("swtpm-state");
    std::fs::create_dir(&theirs).unwrap();
    // vtpm-setup uses the CA swtpm_setup created: one trust anchor for both.
    let f = Fixture::with_ca(&swtpm_ca);
    let options = f.t.path().join("localca.options");
    ok(
        &swtpm_setup(t.path(), &theirs, &swtpm_ca, &options),
        "swtpm_setup",
    );
    ok(&setup(&f.libvirt_args(&[])), "vtpm-setup");
    let work = f.t.path();

    let (_s, sport) = common::start_tcp("swtpm", &theirs, &t.path().join("swtpm.log"));
    let (_v, vport) = f.serve();

    let sh = tpm2_ok(sport, &["tpm2_getcap", "handles-persistent"]);
    let vh = tpm2_ok(vport, &["tpm2_getcap", "handles-persistent"]);
    assert!(
        sh.contains("0x81010001") && vh.contains("0x81010001"),
        "{sh} / {vh}"
    );
    // The one designed difference: swtpm 0.7.1's ECC EK is the high-range
    // P-384 key; vtpm-setup makes the profile's default P-256 key.
    assert!(
        sh.contains("0x81010016") && vh.contains("0x81010002"),
        "{sh} / {vh}"
    );
    assert_eq!(
        key_shape(sport, "0x81010001"),
        key_shape(vport, "0x81010001")
    );

    for index in ["0x1c00002", "0x1c08000"] {
        let attrs = |port| {
            tpm2_ok(port, &["tpm2_nvreadpublic", index])
                .lines()
                .filter(|l| !l.contains("name:") && !l.contains("size:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(attrs(sport), attrs(vport), "NV {index} attributes");
    }
    assert_eq!(pcr_banks(sport), pcr_banks(vport));

    let scert = nv_read(sport, "0x1c00002", &work.join("s-ek.der"));
    let vcert = nv_read(vport, "0x1c00002", &work.join("v-ek.der"));
    let splat = nv_read(sport, "0x1c08000", &work.join("s-plat.der"));
    let vplat = nv_read(vport, "0x1c08000", &work.join("v-plat.der"));
    for (name, s, v) in [("EK", &scert, &vcert), ("platform", &splat, &vplat)] {
        let oids = |d: &[u8]| {
            let mut e: Vec<(String, bool)> =
                extensions(d).into_iter().map(|(o, c, _)| (o, c)).collect();
            e.sort();
            e
        };
        assert_eq!(
            oids(s),
            oids(v),
            "{name} certificate extensions and criticality"
        );
        for oid in [
            "2.5.29.17",
            "2.5.29.37",
            "2.5.29.15",
            "2.5.29.19",
            "2.5.29.35",
        ] {
            assert_eq!(
                ext_value(s, oid),
                ext_value(v, oid),
                "{name} extension {oid}"
            );
        }
        let issuer = |d: &[u8]| {
            Certificate::from_der(d)
                .unwrap()
                .tbs_certificate
                .issuer
                .to_der()
                .unwrap()
        };
        assert_eq!(issuer(s), issuer(v), "{name}: same issuer");
        // swtpm encodes the CN as PrintableString, vtpm-setup as UTF8String.
        assert_eq!(
            Certificate::from_der(s)
                .unwrap()
                .tbs_certificate
                .subject
                .to_string(),
            Certificate::from_der(v)
                .unwrap()
                .tbs_certificate
                .subject
                .to_string()
        );
        let vr = verify(v, &swtpm_ca, work);
        assert!(
            vr.contains(": OK"),
            "vtpm-setup's {name} certificate under swtpm's CA: {vr}"
        );
        let sr = verify(s, &swtpm_ca, work);
        assert!(sr.contains(": OK"), "{sr}");
    }
    assert_eq!(
        ext_value(&scert, "2.5.29.9"),
        ext_value(&vcert, "2.5.29.9"),
        "TPM specification"
    );
    drop(_v);

    // ecc_ek_curves = secp384r1: swtpm_setup's ECC EK, the same way.
    let g = Fixture::with_ca(&swtpm_ca);
    let mut conf = std::fs::read_to_string(&g.conf).unwrap();
    conf.push_str("ecc_ek_curves = secp384r1\n");
    std::fs::write(&g.conf, conf).unwrap();
    ok(
        &setup(&g.libvirt_args(&[])),
        "vtpm-setup with ecc_ek_curves",
    );
    let (_v, vport) = g.serve();
    let vh = tpm2_ok(vport, &["tpm2_getcap", "handles-persistent"]);
    assert!(
        vh.contains("0x81010016") && !vh.contains("0x81010002"),
        "{vh}"
    );
    assert_eq!(
        key_shape(sport, "0x81010016"),
        key_shape(vport, "0x81010016")
    );
    let attrs =
        |port| tpm2_ok(port, &["tpm2_nvreadpublic", "0x1c00016"]).replace(char::is_whitespace, "");
    let (sa, va) = (attrs(sport), attrs(vport));
    assert_eq!(
        sa[sa.find("hashalgorithm").unwrap()..sa.find("size").unwrap()],
        va[va.find("hashalgorithm").unwrap()..va.find("size").unwrap()]
    );
    let secc = nv_read(sport, "0x1c00016", &work.join("s-ecc.der"));
    let vecc = nv_read(vport, "0x1c00016", &work.join("v-ecc.der"));
    for oid in [
        "2.5.29.17",
        "2.5.29.37",
        "2.5.29.15",
        "2.5.29.19",
        "2.5.29.9",
    ] {
        assert_eq!(
            ext_value(&secc, oid),
            ext_value(&vecc, oid),
            "ECC EK extension {oid}"
        );
    }
    assert_eq!(
        cert_pubkey(&vecc, work),
        tpm_pubkey(vport, "0x81010016", work)
    );
    assert!(verify(&vecc, &swtpm_ca, work).contains(": OK"));
}

#[test]
fn rsa_3072_signing_ek_storage_key_and_cert_files() {
    let f = Fixture::new();
    let files = f.t.path().join("certs");
    std::fs::create_dir(&files).unwrap();
    ok(
        &setup(&f.args(&[
            "--rsa-keysize",
            "3072",
            "--allow-signing",
            "--decryption",
            "--create-spk",
            "--ecc",
            "--create-ek-cert",
            "--lock-nvram",
            "--write-ek-cert-files",
            files.to_str().unwrap(),
            "--pcr-banks",
            "-",
        ])),
        "vtpm-setup",
    );
    let (_v, port) = f.serve();
    let work = f.t.path();
    let handles = tpm2_ok(port, &["tpm2_getcap", "handles-persistent"]);
    for h in ["0x81000001", "0x8101001C", "0x81010002"] {
        assert!(
            handles.to_uppercase().contains(&h.to_uppercase()),
            "{h} in {handles}"
        );
    }
    let spk = tpm2_ok(port, &["tpm2_readpublic", "-c", "0x81000001"]);
    assert!(
        spk.contains("value: ecc") && spk.contains("NIST p384"),
        "{spk}"
    );
    let ek = tpm2_ok(port, &["tpm2_readpublic", "-c", "0x8101001c"]);
    assert!(
        ek.contains("bits: 3072") && ek.contains("sign") && !ek.contains("restricted"),
        "{ek}"
    );
    // A non-standard EK publishes its template next to its certificate.
    let nv = tpm2_ok(port, &["tpm2_getcap", "handles-nv-index"]).to_uppercase();
    for i in ["0x1C0001C", "0x1C0001D", "0x1C0000A", "0x1C0000C"] {
        assert!(nv.contains(&i.to_uppercase()), "{i} in {nv}");
    }
    let cert = nv_read(port, "0x1c0001c", &work.join("rsa3072.der"));
    assert!(verify(&cert, &f.ca_dir(), work).contains(": OK"));
    assert_eq!(
        cert_pubkey(&cert, work),
        tpm_pubkey(port, "0x8101001c", work)
    );
    // digitalSignature | keyEncipherment
    assert_eq!(ext_value(&cert, "2.5.29.15"), [3, 2, 5, 0xa0]);
    assert_eq!(std::fs::read(files.join("ek-rsa3072.crt")).unwrap(), cert);
    assert!(files.join("ek-secp256r1.crt").exists());
    // '-' left every bank libtpms allocates by default.
    assert_eq!(active(&pcr_banks(port)).len(), 4);
}

const PASS: &[u8] = b"correct horse battery staple";

#[test]
fn encrypted_state_opens_in_vtpmd_and_swtpm_with_the_passphrase() {
    use std::os::fd::AsRawFd;
    let f = Fixture::new();
    let work = f.t.path();
    // libvirt's <encryption secret=...>: the passphrase on a pipe.
    let pipe = common::inheritable_pipe(PASS);
    let fd = pipe.as_raw_fd().to_string();
    ok(
        &setup(&f.libvirt_args(&["--pwdfile-fd", &fd, "--cipher", "aes-256-cbc"])),
        "vtpm-setup --pwdfile-fd",
    );
    drop(pipe);
    let permall = f.permall().unwrap();
    {
        // As swtpm_setup's output, it is in swtpm's format: swtpm serves it.
        let p = common::inheritable_pipe(PASS);
        let arg = format!("pwdfd={},mode=aes-256-cbc", p.as_raw_fd());
        let (_s, port) = common::start_tcp_with(
            "swtpm",
            &f.state,
            &work.join("swtpm0.log"),
            &["--key".into(), arg],
        );
        let handles = tpm2_ok(port, &["tpm2_getcap", "handles-persistent"]);
        assert!(handles.contains("0x81010001"), "swtpm: {handles}");
    }

    let key = |pass: &[u8]| {
        let p = common::inheritable_pipe(pass);
        let arg = format!("pwdfd={},mode=aes-256-cbc", p.as_raw_fd());
        (p, arg)
    };
    let cert = {
        let (_p, arg) = key(PASS);
        let (_v, port) = f.serve_with_key(arg);
        let handles = tpm2_ok(port, &["tpm2_getcap", "handles-persistent"]);
        assert!(handles.contains("0x81010001"), "{handles}");
        let cert = nv_read(port, "0x1c00002", &work.join("ek.der"));
        assert!(verify(&cert, &f.ca_dir(), work).contains(": OK"));
        cert
    };
    assert!(
        !permall.windows(64).any(|w| cert[..64] == *w),
        "the state on disk holds no plaintext certificate"
    );
    // A wrong passphrase does not open it.
    let (_p, arg) = key(b"wrong");
    let err = common::vtpmd_fails(work, &["--key", &arg]);
    assert!(err.contains("wrong key"), "{err}");
    // swtpm itself opens it too, once vtpmd hands it back in swtpm's
    // format (vtpm-setup's own output is already in it: checked above).
    let (_p, arg) = key(PASS);
    let out = std::process::Command::new(&*common::VTPMD)
        .args(["swtpm-export", "--tpmstate"])
        .arg(format!("dir={}", f.state.display()))
        .args(["--key", &arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (_p, arg) = key(PASS);
    let (_s, port) = common::start_tcp_with(
        "swtpm",
        &f.state,
        &work.join("swtpm.log"),
        &["--key".into(), arg],
    );
    assert_eq!(nv_read(port, "0x1c00002", &work.join("ek2.der")), cert);
    drop(_s);

    // The PCR reconfiguration libvirt runs on an encrypted domain.
    let pipe = common::inheritable_pipe(PASS);
    let fd = pipe.as_raw_fd().to_string();
    ok(
        &setup(&f.args(&[
            "--pwdfile-fd",
            &fd,
            "--cipher",
            "aes-256-cbc",
            "--pcr-banks",
            "sha384",
            "--reconfigure",
        ])),
        "encrypted --reconfigure",
    );
    let (_p, arg) = key(PASS);
    let (_v, port) = f.serve_with_key(arg);
    assert_eq!(active(&pcr_banks(port)), ["sha384"]);
}

#[test]
fn bad_secrets_are_clear_errors() {
    let f = Fixture::new();
    // A descriptor that is not open.
    let o = setup(&f.args(&["--createek", "--pwdfile-fd", "250"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--pwdfile-fd") && err.contains("not open"),
        "{err}"
    );
    // A key file that is not a key.
    let k = f.t.path().join("key");
    std::fs::write(&k, "not hex").unwrap();
    let o = setup(&f.args(&["--createek", "--keyfile", k.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--keyfile") && err.contains("hex"), "{err}");
    // A 256-bit key with the 128-bit default cipher names the fix.
    std::fs::write(
        &k,
        "00112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    )
    .unwrap();
    let o = setup(&f.args(&["--createek", "--keyfile", k.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("aes-256-cbc"), "{err}");
    assert!(f.permall().is_none());
    // The right one works, and vtpmd opens the state with the same key file.
    ok(
        &setup(&f.args(&[
            "--createek",
            "--keyfile",
            k.to_str().unwrap(),
            "--cipher",
            "aes-256-cbc",
        ])),
        "--keyfile",
    );
    let (_v, port) = f.serve_with_key(format!("file={},mode=aes-256-cbc", k.display()));
    assert!(tpm2_ok(port, &["tpm2_getcap", "handles-persistent"]).contains("0x81010001"));
}

#[test]
fn runas_drops_to_an_unprivileged_user() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to change user");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for p in [t.path(), state.as_path()] {
        nix::unistd::chown(p, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    let conf = t.path().join("setup.conf");
    std::fs::write(&conf, format!("statedir = {}/ca\n", t.path().display())).unwrap();
    let args: Vec<String> = [
        "--runas",
        "nobody",
        "--tpm2",
        "--tpm-state",
        state.to_str().unwrap(),
        "--config",
        conf.to_str().unwrap(),
        "--create-ek-cert",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ok(&setup(&args), "--runas nobody");
    use std::os::unix::fs::MetadataExt;
    for f in [
        "state/tpm2-00.permall",
        "ca/signkey.pem",
        "ca/issuercert.pem",
    ] {
        let m = std::fs::metadata(t.path().join(f)).unwrap();
        assert_eq!(m.uid(), nobody.uid.as_raw(), "{f} written as nobody");
    }
    let key_mode = std::fs::metadata(t.path().join("ca/signkey.pem"))
        .unwrap()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "CA key created 0600");
    let o = setup(&[
        "--runas".into(),
        "no-such-user".into(),
        "--tpm2".into(),
        "--tpm-state".into(),
        state.display().to_string(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such user"));
}

#[test]
fn a_directory_reserved_for_an_incoming_migration_is_left_alone() {
    // libvirt runs swtpm_setup --overwrite on an incoming migration's
    // directory; `vtpmctl reserve-incoming` put a reservation there first.
    let f = Fixture::new();
    let reservation = serde_json::json!({
        "migration_id": "ab".repeat(32),
        "host_key": "cd".repeat(32),
        "expires": 1u64,
    });
    let file = f.state.join("vtpmd-incoming.json");
    std::fs::write(&file, reservation.to_string()).unwrap();
    let incoming = f.args(&["--overwrite"]);
    ok(&setup(&incoming), "incoming migration, reserved");
    let names: Vec<_> = std::fs::read_dir(&f.state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["vtpmd-incoming.json"], "no TPM state was made");
    let log = std::fs::read_to_string(f.log()).unwrap();
    assert!(
        log.contains("reserved for incoming sealed migration") && log.contains(&"ab".repeat(32)),
        "{log}"
    );
    // A first start's command line is left alone as well.
    ok(&setup(&f.libvirt_args(&[])), "first start, reserved");
    assert!(f.permall().is_none());

    // A reservation that is not one is an error that names the fix.
    std::fs::write(&file, b"{\"migration_id\": 5").unwrap();
    let o = setup(&incoming);
    assert_eq!(o.status.code(), Some(1));
    let log = std::fs::read_to_string(f.log()).unwrap();
    assert!(log.contains("reserve-incoming --cancel"), "{log}");
    assert!(f.permall().is_none());
}
