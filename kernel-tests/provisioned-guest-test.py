#!/usr/bin/env python3
"""A guest reads the EK certificates vtpm-setup wrote.

vtpm-setup provisions a state directory with libvirt's command line (local
CA in a temporary directory); vtpmd serves it to a QEMU TCG guest (tpm-crb);
in the guest, tpm2_getekcertificate reads the RSA and ECC EK certificates
and tpm2_getcap lists the persistent EKs. The certificates the guest read
must be byte for byte the ones vtpm-setup issued (--write-ek-cert-files),
and those must verify against the local CA with openssl.

Env: TPM_BACKEND_BIN (vtpmd; vtpm-setup is taken next to it), QEMU,
KT_BUILD (kernel + initramfs). Exit 0 when every check passes.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VTPMD = os.environ.get("TPM_BACKEND_BIN", os.path.join(ROOT, "target/release/vtpmd"))
SETUP = os.path.join(os.path.dirname(VTPMD), "vtpm-setup")
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
BUILD = os.environ.get("KT_BUILD", os.path.join(ROOT, "build/kernel-tests"))
VMID = "guest1:0d4c1a7e-5a3b-4f6e-8c2d-9e8f7a6b5c4d"

GUEST = ("tpm2_getekcertificate -o /tmp/r.der -o /tmp/e.der && "
         "echo R:rsa=$(sha256sum < /tmp/r.der | cut -d' ' -f1) && "
         "echo R:ecc=$(sha256sum < /tmp/e.der | cut -d' ' -f1); "
         "echo R:handles=$(tpm2_getcap handles-persistent | tr -d ' -' | tr '\\n' ,)")

failures = []


def check(ok, what, detail=""):
    print("%s: %s%s" % ("PASS" if ok else "FAIL", what, "" if ok else " " + detail))
    if not ok:
        failures.append(what)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def serial_until(proc, marker, timeout, seen):
    """Reads the guest's console (QEMU's stdout) until `marker`."""
    os.set_blocking(proc.stdout.fileno(), False)
    end = time.time() + timeout
    while marker not in seen[0]:
        if time.time() > end or proc.poll() is not None:
            raise RuntimeError("no %r on the console; last output: %s" % (marker, seen[0][-600:]))
        chunk = proc.stdout.read()
        if chunk:
            seen[0] += chunk.decode(errors="replace").replace("\r", "")
        else:
            time.sleep(0.1)
    before, _, seen[0] = seen[0].partition(marker)
    return before


def main():
    work = tempfile.mkdtemp(prefix="vtpm-prov-")
    state, certs = os.path.join(work, "state"), os.path.join(work, "certs")
    os.makedirs(state)
    os.makedirs(certs)
    conf = os.path.join(work, "setup.conf")
    with open(conf, "w") as f:
        f.write("statedir = %s\n" % os.path.join(work, "ca"))
    subprocess.run([SETUP, "--tpm2", "--tpm-state", state, "--vmid", VMID, "--logfile",
                    os.path.join(work, "setup.log"), "--createek", "--create-ek-cert",
                    "--create-platform-cert", "--lock-nvram", "--not-overwrite", "--config", conf,
                    "--write-ek-cert-files", certs], check=True)
    ca = os.path.join(work, "ca")
    for name in ("ek-rsa2048.crt", "ek-secp256r1.crt"):
        pem = os.path.join(work, name + ".pem")
        subprocess.run(["openssl", "x509", "-inform", "der", "-in", os.path.join(certs, name), "-out", pem],
                       check=True)
        v = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(ca, "swtpm-localca-rootca-cert.pem"),
                            "-untrusted", os.path.join(ca, "issuercert.pem"), pem],
                           capture_output=True, text=True)
        check(v.returncode == 0, "host: %s verifies against the local CA" % name, v.stdout + v.stderr)

    sock = os.path.join(work, "ctrl.sock")
    backend = subprocess.Popen([VTPMD, "socket", "--tpm2", "--tpmstate", "dir=" + state,
                                "--ctrl", "type=unixio,path=" + sock,
                                "--log", "file=%s,level=2" % os.path.join(work, "vtpmd.log")])
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    qemu = subprocess.Popen([QEMU, "-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none",
                             "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
                             "-kernel", os.path.join(BUILD, "vmlinuz"),
                             "-initrd", os.path.join(BUILD, "initramfs.cpio.gz"),
                             "-append", "console=ttyS0 panic=-1 quiet loglevel=3 vtpm.mode=migrate",
                             "-chardev", "socket,id=chrtpm,path=" + sock,
                             "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = [""]
    try:
        serial_until(qemu, "VTPM-READY\n", 180, seen)
        qemu.stdin.write((GUEST + "\n").encode())
        qemu.stdin.flush()
        out = serial_until(qemu, "VTPM-CMD-DONE\n", 120, seen)
        r = dict(re.findall(r"^R:(\w+)=(.*)$", out, re.M))
        qemu.stdin.write(b"poweroff\n")
        qemu.stdin.flush()
        qemu.wait(60)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        backend.terminate()
        backend.wait(10)
    check(r.get("rsa") == sha256(os.path.join(certs, "ek-rsa2048.crt")),
          "guest: tpm2_getekcertificate reads the RSA EK certificate vtpm-setup issued", str(r))
    check(r.get("ecc") == sha256(os.path.join(certs, "ek-secp256r1.crt")),
          "guest: tpm2_getekcertificate reads the ECC EK certificate vtpm-setup issued", str(r))
    handles = r.get("handles", "")
    check("0x81010001" in handles and "0x81010002" in handles, "guest: EKs persistent at 0x81010001/2", handles)
    shutil.rmtree(work, ignore_errors=True)
    print("%d passed, %d failed" % (5 - len(failures), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
