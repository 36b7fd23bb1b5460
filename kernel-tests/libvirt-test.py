#!/usr/bin/env python3
"""vtpmd under a real libvirt daemon: Debian's libvirtd 9.0 started here,
without systemd, in a private mount namespace (its own /etc/libvirt, /run,
/var/lib, /var/log, /var/cache, /usr/local and /etc/systemd/system, all
tmpfs: the host's libvirt, if any, and the host's files are not touched),
running TCG domains with direct kernel boot of the kernel-tests guest.

1. External backend, following README "libvirt: external backend" word for
   word: `make install`, the by-hand commands (checked against the installed
   vtpmd@.service), qemu-configs/libvirt-external.xml. The guest sees the
   TPM through QEMU running as libvirt-qemu; NV and a persistent key survive
   `virsh destroy` / `start`; a socket only root can open is refused.
2. Emulator backend, following README "libvirt: emulator backend": `make
   install`, `vtpm-libvirt enable`, libvirtd restarted with the drop-in's
   PATH. libvirt provisions with vtpm-setup, runs vtpmd, stops it with
   vtpmctl as swtpm_ioctl. The EK and platform certificates read in the
   guest verify against the local CA (openssl); a guest reboot and `virsh
   destroy` / `start` keep NV and the persistent key; an <active_pcr_banks>
   change is applied at the next start; an <encryption secret=...> domain
   works across restarts and its state files hold no plaintext of the NV
   secret the guest wrote (the plain domain's do: the search works).
3. Switching: a domain swtpm made runs on vtpmd, `vtpm-libvirt disable`
   hands it back to swtpm.
4. Save, managedsave, snapshots (issue 12), vtpmd with default options (the
   system host key): `virsh save` / `restore`, `managedsave` / `start` and
   an internal memory snapshot on a qcow2 disk with `snapshot-revert` keep
   the guest's PCRs, a 64-byte NV secret and the persistent key (after a
   revert: as at the snapshot); the save files carry the TPM sealed
   (VTPMSAV1, no NV secret in their bytes; swtpm's do hold it: the search
   works); a save file restored under another host key and one with a byte
   flipped in the sealed TPM section are refused, the TPM state on disk
   untouched, vtpmd's reason in the domain's swtpm log; a revert is
   recorded in vtpmd-rollbacks.log and, with `vtpmctl rollback-policy
   refuse`, refused until `vtpmctl allow-rollback` allows it.
   `libvirt-test.py save` runs this part alone.

Guests boot one at a time; each boot serves several checks. Prints
"PASS: ..." / "FAIL: ..." per check and "N passed, M failed" last.
Logs (libvirtd, QEMU, backends, consoles) are copied to
KT_LOGS/libvirt-* at the end.
"""
import base64, glob, os, re, shlex, shutil, socket, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from ktlib import GuestShell, check, summary, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("KT_BUILD", os.path.join(ROOT, "build", "kernel-tests"))
LOGS = os.environ.get("KT_LOGS", os.path.join(BUILD, "logs"))
README = os.path.join(ROOT, "README.md")
NS_MARK = "VTPM_LIBVIRT_TEST_NS"
URI = "qemu:///system"
# A root shell's PATH: the README's commands run with it.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGES = "/var/lib/libvirt/images"
CONSOLES = "/run/vtpm-test"
# NV index, persistent key handle, TPM-side locations of the provisioned EK.
NV = "0x1500016"
PERSIST = "0x81000101"
EK_RSA, EK_CERT_NV, PLATFORM_CERT_NV = "0x81010001", "0x1c00002", "0x1c08000"
CA_DIR = "/var/lib/swtpm-localca"


def sh(cmd, **kw):
    """Runs a command (list or shell string) and returns CompletedProcess."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, shell=isinstance(cmd, str), **kw)


# ---------------------------------------------------------------- namespace

def enter_namespace():
    """Re-runs this script in a private mount namespace (first call), then
    gives libvirt and the README's paths fresh tmpfs directories."""
    if os.environ.get(NS_MARK) != "1":
        # The guest kernel and initramfs (cached), outside the namespace.
        for script in ("fetch-kernel.sh", "build-initramfs.sh"):
            subprocess.run(["bash", os.path.join(ROOT, "kernel-tests", script)], check=True, stdout=subprocess.DEVNULL)
        os.environ[NS_MARK] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                              sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    keep = {f: open(f).read() for f in glob.glob("/etc/libvirt/*.conf")}
    for d in ("/run", "/var/lib", "/var/log", "/var/cache", "/usr/local", "/etc/systemd/system", "/etc/libvirt"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
    for f, text in keep.items():  # the client configuration libvirt-clients ships
        open(f, "w").write(text)
    # QEMU's output goes to files (no virtlogd); TPM and command logging.
    open("/etc/libvirt/qemu.conf", "w").write('stdio_handler = "file"\n')
    open("/etc/libvirt/libvirtd.conf", "w").write(
        'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n'
        'log_filters = "1:qemu.qemu_tpm 1:util.tpm 1:util.command 1:qemu.qemu_extdevice 3:*"\n')
    # As swtpm-tools' package creates it: the local CA's directory, for tss.
    os.makedirs(CA_DIR, mode=0o750)
    shutil.chown(CA_DIR, "tss", "root")
    os.makedirs(IMAGES)
    os.makedirs(CONSOLES)
    os.makedirs("/var/log/libvirt/qemu")
    os.makedirs("/run/libvirt")
    for src, dst in (("vmlinuz", "vtpm-guest-vmlinuz"), ("initramfs.cpio.gz", "vtpm-guest-initramfs.cpio.gz")):
        shutil.copy(os.path.join(BUILD, src), os.path.join(IMAGES, dst))


# ---------------------------------------------------------------- libvirtd

class Libvirtd:
    PIDFILE = "/run/libvirt/libvirtd.pid"

    def __init__(self):
        self.pid = None

    def start(self, path):
        env = dict(os.environ, PATH=path)
        r = sh(["libvirtd", "--daemon", "--pid-file", self.PIDFILE], env=env)
        if r.returncode != 0:
            raise RuntimeError("libvirtd did not start: " + r.stderr)
        self.pid = int(wait_for(lambda: os.path.exists(self.PIDFILE) and open(self.PIDFILE).read().strip(), 30,
                                "libvirtd's pid file"))
        wait_for(lambda: virsh("version").returncode == 0, 60, "libvirtd to answer")
        self.path = path

    def stop(self):
        if self.pid is None:
            return
        try:
            os.kill(self.pid, 15)
            wait_for(lambda: not os.path.exists("/proc/%d" % self.pid) or
                     open("/proc/%d/stat" % self.pid).read().split()[2] == "Z", 30, "libvirtd to stop")
        except (ProcessLookupError, RuntimeError):
            pass
        self.pid = None

    def environ_path(self):
        """PATH as the running daemon has it (/proc/PID/environ)."""
        env = open("/proc/%d/environ" % self.pid, "rb").read().split(b"\0")
        return next((e[5:].decode() for e in env if e.startswith(b"PATH=")), "")


def virsh(*args, **kw):
    return sh(["virsh", "-c", URI, *args], **kw)


# ---------------------------------------------------------------- guests

class Console(GuestShell):
    """A domain and its guest's serial console, a unix socket libvirt binds
    (and logs); the guest runs in vtpm.mode=shell (guest-init)."""

    def __init__(self, name):
        self.name = name
        self.path = os.path.join(CONSOLES, name + ".sock")
        self.log = "/var/log/libvirt/qemu/%s-console.log" % name
        self.ser = None
        self.buf = ""

    def connect(self):
        self.ser = socket.socket(socket.AF_UNIX)
        wait_for(lambda: self.ser.connect_ex(self.path) == 0, 20, self.name + " console socket")
        self.buf = ""

    def wait_ready(self, timeout=180):
        # Output before the test connected is only in the log file.
        end = time.time() + timeout
        while time.time() < end:
            try:
                self.read_until("VTPM-READY\n", 2)
                return
            except RuntimeError as e:
                if "console closed" in str(e):
                    raise
            if self.boots() > self.seen_boots:
                self.buf = ""
                return
        raise RuntimeError(self.name + ": guest never became ready")

    def boots(self):
        try:
            return open(self.log, errors="replace").read().count("VTPM-READY")
        except OSError:
            return 0

    def start(self):
        """virsh start, then the console up to the guest's shell."""
        self.seen_boots = self.boots()
        r = virsh("start", self.name)
        if r.returncode != 0:
            raise RuntimeError("virsh start %s: %s" % (self.name, r.stderr.strip()))
        self.connect()
        self.wait_ready()

    def device_checks(self):
        """The guest's own VTPM-TEST lines of its latest boot (from the log)."""
        text = open(self.log, errors="replace").read().replace("\r", "")
        last = text.rsplit("VTPM-BOOT", 1)[-1]
        return dict(re.findall(r"^VTPM-TEST (\S+) (PASS|FAIL.*)$", last, re.M))

    def reboot(self):
        self.seen_boots = self.boots()
        self.send("reboot -f")
        self.buf = ""
        self.wait_ready()


def domain_xml(template, shell_console=True, banks=None, secret=None, name=None):
    """The domain in qemu-configs/TEMPLATE with the test's changes: the
    guest in shell mode on a unix-socket console (logged), and optionally
    PCR banks and an encryption secret for an emulator backend."""
    tree = ET.parse(os.path.join(ROOT, "qemu-configs", template))
    dom = tree.getroot()
    if name:
        dom.find("name").text = name
    name = dom.find("name").text
    known = virsh("domuuid", name)
    if known.returncode == 0:  # redefining keeps the domain (and its TPM state)
        ET.SubElement(dom, "uuid").text = known.stdout.strip()
    cmdline = dom.find("os/cmdline")
    cmdline.text = re.sub(r"vtpm\.mode=\S+", "vtpm.mode=shell", cmdline.text) + " quiet loglevel=3"
    devices = dom.find("devices")
    if shell_console:
        for tag in ("serial", "console"):
            for e in devices.findall(tag):
                devices.remove(e)
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=os.path.join(CONSOLES, name + ".sock"))
        ET.SubElement(serial, "log", file="/var/log/libvirt/qemu/%s-console.log" % name, append="on")
    backend = devices.find("tpm/backend")
    if banks:
        b = ET.SubElement(backend, "active_pcr_banks")
        for bank in banks:
            ET.SubElement(b, bank)
    if secret:
        ET.SubElement(backend, "encryption", secret=secret)
    path = "/run/vtpm-test/%s.xml" % name
    tree.write(path)
    return path


def define(path):
    r = virsh("define", "--validate", path)  # against libvirt's schema
    if r.returncode != 0:
        raise RuntimeError("virsh define: " + r.stderr.strip())


def boot(xml, name, who):
    """Defines the domain and starts it up to the guest's shell; None (and
    a failure) if libvirt or the guest does not get there."""
    con = Console(name)
    try:
        define(xml)
        con.start()
        return con
    except RuntimeError as e:
        check(False, "%s: virsh define and start %s" % (who, name), e)
        return None


def destroy(name):
    return virsh("destroy", name)


def cmdlines(this_namespace=True):
    """pid -> (argv, uid, exe) of every process in this mount namespace
    (the host's other processes are none of this test's business), or of
    all (libvirt starts QEMU in a mount namespace of its own)."""
    out = {}
    mine = os.readlink("/proc/self/ns/mnt")
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if this_namespace and os.readlink(d + "/ns/mnt") != mine:
                continue
            argv = open(d + "/cmdline", "rb").read().split(b"\0")
            uid = int(re.search(r"^Uid:\s+(\d+)", open(d + "/status").read(), re.M).group(1))
            exe = os.readlink(d + "/exe")
        except (OSError, AttributeError):
            continue
        out[int(d[6:])] = ([a.decode(errors="replace") for a in argv if a], uid, exe)
    return out


def processes_with(fragment):
    return {pid: v for pid, v in cmdlines().items() if any(fragment in a for a in v[0])}


def qemu_user(name):
    import pwd
    for pid, (argv, uid, exe) in cmdlines(this_namespace=False).items():
        if "qemu-system" in exe and "guest=%s,debug-threads=on" % name in argv:
            return pwd.getpwuid(uid).pw_name
    return None


# ---------------------------------------------------------------- guest scripts

WRITE = ("tpm2_getrandom -o /tmp/s 32 >/dev/null && tpm2_nvdefine {nv} -C o -s 32 -a 'ownerread|ownerwrite' >/dev/null && "
         "tpm2_nvwrite {nv} -C o -i /tmp/s && echo R:secret=$(od -An -tx1 -v /tmp/s | tr -d ' \\n'); "
         "tpm2_createprimary -Q -C o -G ecc256 -c /tmp/p.ctx && "
         "tpm2_create -Q -C /tmp/p.ctx -G ecc256 -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' "
         "-u /tmp/k.pub -r /tmp/k.priv && tpm2_load -Q -C /tmp/p.ctx -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx && "
         "tpm2_evictcontrol -Q -C o -c /tmp/k.ctx {key} && "
         "echo R:keyname=$(tpm2_readpublic -c {key} | awk '/^name:/ {{print $2}}'); "
         "tpm2_pcrextend 16:sha256=$(printf extended | sha256sum | cut -d' ' -f1) && "
         "echo R:pcr16=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{{print $2}}')").format(nv=NV, key=PERSIST)

READ = ("tpm2_nvread {nv} -C o -s 32 -o /tmp/n 2>/dev/null && echo R:secret=$(od -An -tx1 -v /tmp/n | tr -d ' \\n'); "
        "echo R:keyname=$(tpm2_readpublic -c {key} 2>/dev/null | awk '/^name:/ {{print $2}}'); "
        "printf signed > /tmp/m && tpm2_sign -c {key} -g sha256 -o /tmp/sig /tmp/m && "
        "tpm2_verifysignature -c {key} -g sha256 -m /tmp/m -s /tmp/sig && echo R:signs=yes; "
        "echo R:pcr16=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{{print $2}}'); "
        "echo R:banks=$(tpm2_getcap pcrs | awk '/- [a-z0-9]+: \\[ [0-9]/ {{sub(\":\", \"\", $2); printf \"%s,\", $2}}')"
        ).format(nv=NV, key=PERSIST)

CERTS = ("hex() {{ od -An -tx1 -v \"$1\" | tr -d ' \\n'; }}; "
         "tpm2_nvread {ek} -C o -o /tmp/ek.der 2>/dev/null && echo R:ekcert=$(hex /tmp/ek.der); "
         "tpm2_nvread {pc} -C o -o /tmp/pc.der 2>/dev/null && echo R:platcert=$(hex /tmp/pc.der); "
         "tpm2_getekcertificate -o /tmp/ek2.der >/dev/null 2>&1 && echo R:getek=$(hex /tmp/ek2.der); "
         "echo R:ekmod=$(tpm2_readpublic -c {rsa} 2>/dev/null | awk '/^rsa:/ {{print $2}}'); "
         "echo R:eklocked=$(tpm2_nvreadpublic {ek} | grep -c writelocked)"
         ).format(ek=EK_CERT_NV, pc=PLATFORM_CERT_NV, rsa=EK_RSA)

ZERO_PCR = "0x" + "0" * 64


def write_state(con, who):
    w = con.run(WRITE)
    check(len(w.get("secret", "")) == 64 and w.get("keyname") and len(w.get("pcr16", "")) == 66,
          "%s: guest wrote an NV secret, made a persistent key, extended PCR 16" % who, w)
    return w


def same_state(con, who, before, when, banks=None):
    r = con.run(READ)
    check(r.get("secret") == before.get("secret") and r.get("secret"), "%s: NV secret intact after %s" % (who, when),
          (before.get("secret"), r.get("secret")))
    check(r.get("keyname") == before.get("keyname") and r.get("signs") == "yes",
          "%s: persistent key intact after %s (same name, signs)" % (who, when), r)
    check(r.get("pcr16") == ZERO_PCR, "%s: PCR 16 reset by the %s (the TPM was reset, not kept running)" % (who, when),
          r.get("pcr16"))
    return r


def guest_sees_tpm(con, who):
    dev = con.device_checks()
    check(dev and all(v == "PASS" for v in dev.values()) and len(dev) == 3,
          "%s: guest sees the TPM (/dev/tpm0, /dev/tpmrm0, TPM 2.0)" % who, dev)


# ---------------------------------------------------------------- README

def readme_block(marker):
    """The fenced block after `<!-- libvirt-test: MARKER -->` in README.md,
    continuation lines joined: one command per entry."""
    text = open(README).read()
    m = re.search(r"<!-- libvirt-test: %s -->\s*```\w*\n(.*?)```" % re.escape(marker), text, re.S)
    if not m:
        raise RuntimeError("README.md has no block marked libvirt-test: " + marker)
    return [l.strip() for l in m.group(1).replace("\\\n", " ").splitlines() if l.strip() and not l.strip().startswith("#")]


def run_readme(commands, what):
    """Runs README commands as a root shell would, `make` in the source
    tree. Left out: systemctl (no systemd here: the caller does what it
    would) and `make build` (make kernel-tests built the tree already, and
    its dependency check needs the host's /var/lib/dpkg)."""
    for c in commands:
        c = re.sub(r"\s+#.*$", "", c)
        if c.startswith(("systemctl", "make build")):
            continue
        log = open(os.path.join(LOGS, "libvirt-readme.log"), "a")
        log.write("$ %s\n" % c)
        log.flush()
        r = subprocess.run(c, shell=True, cwd=ROOT, env=dict(os.environ, PATH=SYSTEM_PATH), stdout=log, stderr=log)
        if r.returncode != 0:
            raise RuntimeError("%s: README command failed (%d): %s (see %s)" % (what, r.returncode, c, log.name))


def unit_file():
    return "/usr/local/lib/systemd/system/vtpmd@.service"


def unit_value(key):
    return [l.split("=", 1)[1] for l in open(unit_file()).read().splitlines() if l.startswith(key + "=")]


# ---------------------------------------------------------------- 1. external

def external_part():
    print("== external backend (README word for word, vtpmd as the unit runs it)", flush=True)
    by_hand = readme_block("external-by-hand")
    # The README's by-hand commands are the unit's, instance vm1.
    exec_start = unit_value("ExecStart")[0].replace("%i", "vm1")
    readme_vtpmd = next((c.rstrip(" &") for c in by_hand if c.startswith("vtpmd ")), "")
    check(shlex.split(exec_start)[1:] == shlex.split(readme_vtpmd)[1:] and exec_start.startswith("/usr/local/bin/vtpmd "),
          "README's vtpmd command is the installed vtpmd@.service's ExecStart (%i=vm1)", (exec_start, readme_vtpmd))
    run_readme(by_hand, "external")
    sock = "/run/vtpm/vm1/ctrl.sock"
    try:
        wait_for(lambda: os.path.exists(sock), 10, "vtpmd's socket")
    except RuntimeError as e:
        check(False, "vtpmd started from the README's command", e)
        return
    # What RuntimeDirectory/StateDirectory/LogsDirectory would give.
    expect = {"/run/vtpm/vm1": (unit_value("RuntimeDirectoryMode")[0], "kvm"),
              "/var/lib/vtpm/vm1": (unit_value("StateDirectoryMode")[0], None),
              "/var/log/vtpm": (unit_value("LogsDirectoryMode")[0], None)}
    got = {d: ("%04o" % (os.stat(d).st_mode & 0o7777), os.stat(d).st_gid) for d in expect}
    import grp
    kvm = grp.getgrnam("kvm").gr_gid
    check(all(got[d][0] == m and (g is None or got[d][1] == kvm) for d, (m, g) in expect.items()),
          "README's directories have the unit's modes (run dir group kvm)", got)
    st = os.stat(sock)
    check(st.st_mode & 0o777 == 0o660 and st.st_gid == kvm, "control socket is root:kvm 0660",
          "%o gid %d" % (st.st_mode & 0o777, st.st_gid))

    con = boot(domain_xml("libvirt-external.xml"), "vm1", "external")
    if not con:
        return
    check(qemu_user("vm1") == "libvirt-qemu", "external: QEMU runs as libvirt-qemu (and reached the socket)", qemu_user("vm1"))
    guest_sees_tpm(con, "external")
    before = write_state(con, "external")
    destroy("vm1")
    check(gone(sock), "external: vtpmd exited by itself after virsh destroy (QEMU's SHUTDOWN)")
    # As Restart=always would: the README's commands again.
    run_readme(by_hand, "external restart")
    wait_for(lambda: os.path.exists(sock), 10, "vtpmd's socket again")
    con.start()
    guest_sees_tpm(con, "external, after destroy/start")
    same_state(con, "external", before, "virsh destroy / start")
    destroy("vm1")
    gone(sock)

    # The friction this fixes: a socket only root can open.
    old = shlex.split(readme_vtpmd.replace("mode=0660", "mode=0600"))
    p = subprocess.Popen(old, env=dict(os.environ, PATH=SYSTEM_PATH), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(sock), 10, "vtpmd's 0600 socket")
    r = virsh("start", "vm1")
    check(r.returncode != 0 and "Permission denied" in r.stderr,
          "external: a 0600 root socket is refused to QEMU (\"Permission denied\"), as the old README's was",
          r.stderr.strip()[-300:])
    p.terminate()
    p.wait()
    virsh("undefine", "vm1")


def gone(fragment, timeout=10):
    """True once no process has FRAGMENT in its arguments (within TIMEOUT)."""
    try:
        wait_for(lambda: not processes_with(fragment), timeout, "processes with " + fragment)
        return True
    except RuntimeError:
        return False


# ---------------------------------------------------------------- 2. emulator

DROPIN = "/etc/systemd/system/libvirtd.service.d/50-vtpmd.conf"
LINKS = "/usr/local/lib/vtpmd/swtpm"


def dropin_path():
    """PATH from the drop-in vtpm-libvirt wrote, as systemd would set it."""
    for line in open(DROPIN).read().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line[len("Environment="):]):
                if assignment.startswith("PATH="):
                    return assignment[5:]
    raise RuntimeError(DROPIN + " sets no PATH")


def tpm_process(name):
    """(argv, user, exe) of the TPM process libvirt runs for domain NAME."""
    import pwd
    for pid, (argv, uid, exe) in cmdlines().items():
        if any(a.endswith("-%s-swtpm.sock,mode=0600" % name) for a in argv):
            return argv, pwd.getpwuid(uid).pw_name, exe
    return None


def tpm_socket(name):
    proc = tpm_process(name)
    ctrl = next((a for a in proc[0] if a.startswith("type=unixio,path=")), "") if proc else ""
    return ctrl[len("type=unixio,path="):].split(",")[0]


def libvirtd_ran(tool, *words):
    """Lines of libvirtd's log where it ran TOOL with all of WORDS."""
    lines = [l for l in open("/var/log/libvirt/libvirtd.log", errors="replace").read().splitlines()
             if "%s/%s " % (LINKS, tool) in l and all(w in l for w in words)]
    return lines


def der_to_pem(hexstr, path):
    der = os.path.join("/run/vtpm-test", os.path.basename(path) + ".der")
    open(der, "wb").write(bytes.fromhex(hexstr))
    r = sh(["openssl", "x509", "-inform", "DER", "-in", der, "-out", path])
    return r.returncode == 0


def verify_certs(certs, who):
    root = os.path.join(CA_DIR, "swtpm-localca-rootca-cert.pem")
    issuer = os.path.join(CA_DIR, "issuercert.pem")
    ek, plat = "/run/vtpm-test/%s-ek.pem" % who, "/run/vtpm-test/%s-platform.pem" % who
    ok_ek = bool(certs.get("ekcert")) and der_to_pem(certs["ekcert"], ek)
    ok_plat = bool(certs.get("platcert")) and der_to_pem(certs["platcert"], plat)
    check(ok_ek and ok_plat, "%s: guest read the EK certificate (NV %s) and the platform certificate (NV %s)"
          % (who, EK_CERT_NV, PLATFORM_CERT_NV), {k: v[:40] for k, v in certs.items()})
    check(certs.get("getek") == certs.get("ekcert"), "%s: tpm2_getekcertificate in the guest returns the same EK certificate" % who)
    if not (ok_ek and ok_plat):
        return
    r = sh(["openssl", "verify", "-CAfile", root, "-untrusted", issuer, ek, plat])
    check(r.returncode == 0 and r.stdout.count(": OK") == 2,
          "%s: both certificates verify against the local CA (openssl verify, root %s)" % (who, root), r.stdout + r.stderr)
    mod = sh(["openssl", "x509", "-in", ek, "-noout", "-modulus"]).stdout.strip().split("=")[-1]
    check(mod and mod.lower() == certs.get("ekmod", "").lower(),
          "%s: the EK certificate certifies the TPM's RSA EK at %s (same modulus)" % (who, EK_RSA),
          (mod[:32], certs.get("ekmod", "")[:32]))
    check(certs.get("eklocked") == "1", "%s: EK certificate NV index is write-locked (--lock-nvram)" % who, certs.get("eklocked"))


def state_files(name):
    uuid = virsh("domuuid", name).stdout.strip()
    d = "/var/lib/libvirt/swtpm/%s/tpm2" % uuid
    return {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))}


def holds(files, hexstr):
    needle = bytes.fromhex(hexstr)
    return sorted(f for f, data in files.items() if needle in data)


def stop_guest(con, name):
    """The guest powers off (QEMU quits, libvirt stops the TPM)."""
    con.send("poweroff")
    wait_for(lambda: "shut off" in virsh("domstate", name).stdout, 120, name + " to shut off")


def emulator_part(daemon):
    print("== emulator backend (README: vtpm-libvirt enable; libvirt runs vtpm-setup, vtpmd, vtpmctl)", flush=True)
    run_readme(readme_block("emulator-enable"), "emulator")
    # What `systemctl try-restart libvirtd` does with the drop-in.
    daemon.stop()
    daemon.start(dropin_path())
    check(daemon.environ_path().startswith(LINKS + ":"), "libvirtd restarted with the drop-in's PATH (%s first)" % LINKS,
          daemon.environ_path())
    st = sh(["vtpm-libvirt", "status"], env=dict(os.environ, PATH=SYSTEM_PATH)).stdout
    check("backend: enabled" in st and "(/usr/local/bin/vtpmd)" in st and "(/usr/local/bin/vtpm-setup)" in st
          and "(/usr/local/bin/vtpmctl)" in st, "vtpm-libvirt status: swtpm, swtpm_setup, swtpm_ioctl are vtpmd's", st)

    con = boot(domain_xml("libvirt-emulator.xml"), "vm2", "emulator")
    if not con:
        return
    check(libvirtd_ran("swtpm_setup", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"),
          "emulator: libvirt provisioned the state with swtpm_setup = vtpm-setup (EK, certificates, --lock-nvram)")
    proc = tpm_process("vm2")
    check(proc and proc[2] == "/usr/local/bin/vtpmd" and proc[1] == "tss",
          "emulator: the TPM process libvirt started is vtpmd, running as tss", proc)
    guest_sees_tpm(con, "emulator")
    verify_certs(con.run(CERTS), "emulator")
    before = write_state(con, "emulator")
    check(before.get("keyname") and con.run(READ).get("banks") == "sha256,",
          "emulator: PCR banks as provisioned: sha256 only (swtpm_setup.conf's default)")
    con.reboot()
    guest_sees_tpm(con, "emulator, after the guest rebooted")
    same_state(con, "emulator", before, "guest reboot")
    # libvirt runs swtpm_ioctl only for a TPM process that outlived QEMU
    # (QEMU's SHUTDOWN normally ends it first); the link is exercised here.
    sock = tpm_socket("vm2")
    r = sh([LINKS + "/swtpm_ioctl", "--unix", sock, "-c"])
    check(r.returncode == 0 and r.stdout.startswith("ptm capability is 0x"),
          "emulator: %s/swtpm_ioctl --unix SOCK -c answers from libvirt's vtpmd" % LINKS, r.stdout + r.stderr)
    destroy("vm2")
    check(gone("-vm2-swtpm.sock"), "emulator: vtpmd stopped after virsh destroy")

    # <active_pcr_banks>: applied at the next start (swtpm_setup --reconfigure).
    define(domain_xml("libvirt-emulator.xml", banks=["sha256", "sha384"]))
    con.start()
    check(libvirtd_ran("swtpm_setup", "--pcr-banks", "sha256,sha384", "--reconfigure"),
          "emulator: libvirt ran swtpm_setup --pcr-banks sha256,sha384 --reconfigure (vtpm-setup)")
    r = same_state(con, "emulator", before, "virsh destroy, PCR bank change, start")
    check(r.get("banks") == "sha256,sha384,", "emulator: <active_pcr_banks> sha256+sha384 applied: the guest's TPM has those banks",
          r.get("banks"))
    stop_guest(con, "vm2")
    check(gone("-vm2-swtpm.sock"), "emulator: vtpmd exited when the guest powered off")
    plain = state_files("vm2")
    check(holds(plain, before["secret"]) != [],
          "emulator: the unencrypted state holds the guest's NV secret in clear (so the search below can find it)",
          sorted(plain))
    virsh("undefine", "vm2", "--tpm")
    return before


SECRET_UUID = "5e3a9c1e-7d7e-4a8b-9c71-0b6f5a2d4e11"


def define_secret():
    """The libvirt secret (usage vtpm) the encrypted domains name."""
    path = "/run/vtpm-test/secret.xml"
    open(path, "w").write("<secret ephemeral='no' private='yes'><uuid>%s</uuid>"
                          "<usage type='vtpm'><name>vtpm-test</name></usage></secret>" % SECRET_UUID)
    r = virsh("secret-define", path)
    r2 = virsh("secret-set-value", "--secret", SECRET_UUID, "--base64",
               base64.b64encode(b"correct horse battery staple").decode())
    return check(r.returncode == 0 and r2.returncode == 0, "libvirt secret (usage vtpm) defined", r.stderr + r2.stderr)


def encrypted_part():
    print("== emulator backend with <encryption secret=...>", flush=True)
    uuid = SECRET_UUID
    con = boot(domain_xml("libvirt-emulator.xml", secret=uuid, name="vm3"), "vm3", "encrypted")
    if not con:
        return
    check(libvirtd_ran("swtpm_setup", "--pwdfile-fd", "--cipher", "aes-256-cbc"),
          "encrypted: libvirt provisioned with swtpm_setup --pwdfile-fd N --cipher aes-256-cbc (vtpm-setup)")
    proc = tpm_process("vm3")
    check(proc and proc[2] == "/usr/local/bin/vtpmd" and any(a.startswith("pwdfd=") for a in proc[0]),
          "encrypted: vtpmd runs with --key pwdfd=N (and --migration-key)", proc and proc[0])
    guest_sees_tpm(con, "encrypted")
    certs = con.run(CERTS)
    verify_certs(certs, "encrypted")
    before = write_state(con, "encrypted")
    # (Restarts of an encrypted domain on vtpmd: switch_part.)
    # libvirt's way to stop a TPM process that outlived QEMU.
    r = sh([LINKS + "/swtpm_ioctl", "--unix", tpm_socket("vm3"), "-s"])
    check(r.returncode == 0 and gone("-vm3-swtpm.sock"),
          "encrypted: swtpm_ioctl --unix SOCK -s (libvirt's stop command) ends libvirt's vtpmd", r.stderr)
    destroy("vm3")
    files = state_files("vm3")
    check(files and not holds(files, before["secret"]),
          "encrypted: no state file holds the guest's NV secret (searched %s)" % ", ".join(sorted(files)), holds(files, before["secret"]))
    check(certs.get("ekcert") and not holds(files, certs["ekcert"]),
          "encrypted: no state file holds the EK certificate in clear either")
    virsh("undefine", "vm3", "--tpm")


# ---------------------------------------------------------------- 3. switching

REWRITE = ("tpm2_getrandom -o /tmp/s2 32 >/dev/null && tpm2_nvwrite {nv} -C o -i /tmp/s2 && "
           "echo R:secret=$(od -An -tx1 -v /tmp/s2 | tr -d ' \\n')").format(nv=NV)


def swtpm_made_domain():
    """Before `vtpm-libvirt enable`: an encrypted domain that libvirt
    provisions with swtpm_setup and runs on swtpm, as existing hosts have
    them. Returns what its guest wrote."""
    print("== an encrypted domain made by swtpm (before vtpm-libvirt enable)", flush=True)
    con = boot(domain_xml("libvirt-emulator.xml", secret=SECRET_UUID, name="vm4"), "vm4", "switch")
    if not con:
        return None
    proc = tpm_process("vm4")
    check(proc and proc[2] == "/usr/bin/swtpm", "switch: before opting in, libvirt runs swtpm", proc and proc[2])
    before = write_state(con, "switch, on swtpm")
    stop_guest(con, "vm4")
    gone("-vm4-swtpm.sock")
    return before


def switch_part(daemon, before):
    """vtpmd takes over the swtpm-made encrypted state, then `vtpm-libvirt
    disable` hands it back to swtpm."""
    print("== the swtpm-made domain under vtpmd, then back to swtpm (vtpm-libvirt disable)", flush=True)
    con = boot(domain_xml("libvirt-emulator.xml", secret=SECRET_UUID, name="vm4"), "vm4", "switch")
    if not con:
        return
    proc = tpm_process("vm4")
    check(proc and proc[2] == "/usr/local/bin/vtpmd" and any(a.startswith("pwdfd=") for a in proc[0]),
          "switch: libvirt now runs vtpmd (--key pwdfd=N) on the state swtpm made", proc)
    same_state(con, "switch, swtpm -> vtpmd", before, "the move to vtpmd")
    again = con.run(REWRITE)
    check(len(again.get("secret", "")) == 64, "switch: the guest wrote a new NV secret through vtpmd", again)
    stop_guest(con, "vm4")
    gone("-vm4-swtpm.sock")
    files = state_files("vm4")
    check(files and not holds(files, again.get("secret", "00")) and not holds(files, before["secret"]),
          "switch: vtpmd kept the state encrypted (neither NV secret in clear)", sorted(files))

    run_readme(readme_block("emulator-disable"), "disable")
    check(not os.path.exists(DROPIN), "vtpm-libvirt disable removed the drop-in")
    daemon.stop()
    daemon.start(SYSTEM_PATH)  # systemd's PATH without the drop-in
    con = boot(domain_xml("libvirt-emulator.xml", secret=SECRET_UUID, name="vm4"), "vm4", "switch back")
    if not con:
        return
    proc = tpm_process("vm4")
    check(proc and proc[2] == "/usr/bin/swtpm", "switch back: after disable, libvirt runs swtpm again", proc and proc[2])
    r = con.run(READ)
    check(r.get("secret") == again.get("secret") and r.get("keyname") == before.get("keyname") and r.get("signs") == "yes",
          "switch back: swtpm reads what vtpmd wrote (new NV secret, same persistent key that signs)", r)
    stop_guest(con, "vm4")
    virsh("undefine", "vm4", "--tpm")


# ---------------------------------------------------------------- 4. save, managedsave, snapshots

NV64 = "0x1500017"  # a 64-byte NV secret (two 32-byte random draws)
# All 24 sha256 PCRs at once: the digest of tpm2_pcrread's listing.
PCRS = "echo R:pcrs=$(tpm2_pcrread sha256 | sha256sum | cut -c1-64)"
NV64_DEFINE = "tpm2_nvdefine {nv} -C o -s 64 -a 'ownerread|ownerwrite' >/dev/null && ".format(nv=NV64)
# The guest's own copies of the secret are overwritten in place once used
# (and its kernel runs with init_on_free=1), so a save file's RAM holds it
# no more: only the TPM's state can (swtpm_save_reference shows where).
SCRUB = "for f in {files}; do dd if=/dev/zero of=$f bs=64 count=1 conv=notrunc 2>/dev/null; rm -f $f; done"
NV64_WRITE = ("tpm2_getrandom -o /tmp/a 32 >/dev/null && tpm2_getrandom -o /tmp/b 32 >/dev/null && "
              "cat /tmp/a /tmp/b > /tmp/s64 && tpm2_nvwrite {nv} -C o -i /tmp/s64 && "
              "echo R:nv64=$(od -An -tx1 -v /tmp/s64 | tr -d ' \\n'); " + SCRUB.format(files="/tmp/a /tmp/b /tmp/s64") + "; "
              "tpm2_pcrextend 16:sha256=$(head -c 32 /dev/urandom | sha256sum | cut -d' ' -f1) && "
              "echo R:pcr16=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{{print $2}}'); " + PCRS).format(nv=NV64)
NV64_READ = ("tpm2_nvread {nv} -C o -s 64 -o /tmp/n64 2>/dev/null && echo R:nv64=$(od -An -tx1 -v /tmp/n64 | tr -d ' \\n'); " +
             SCRUB.format(files="/tmp/n64") + "; "
             "echo R:keyname=$(tpm2_readpublic -c {key} 2>/dev/null | awk '/^name:/ {{print $2}}'); "
             "printf signed > /tmp/m && tpm2_sign -c {key} -g sha256 -o /tmp/sig /tmp/m && "
             "tpm2_verifysignature -c {key} -g sha256 -m /tmp/m -s /tmp/sig && echo R:signs=yes; "
             "echo R:pcr16=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{{print $2}}'); " + PCRS).format(nv=NV64, key=PERSIST)
SEALED_MAGIC = b"VTPMSAV1"
HOST_KEY_DIR = "/var/lib/vtpm-hostkey"
SAVES = "/var/lib/libvirt/images"


def save_xml(name, disk=None):
    """The emulator domain NAME, its guest kernel wiping freed memory
    (init_on_free=1), and optionally a small qcow2 disk DISK (internal
    snapshots keep the memory, and with it the TPM's state, in a qcow2
    image)."""
    path = domain_xml("libvirt-emulator.xml", name=name)
    tree = ET.parse(path)
    cmdline = tree.getroot().find("os/cmdline")
    cmdline.text += " init_on_free=1"
    if disk is None:
        tree.write(path)
        return path
    devices = tree.getroot().find("devices")
    d = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="qcow2")
    ET.SubElement(d, "source", file=disk)
    ET.SubElement(d, "target", dev="vda", bus="virtio")
    tree.write(path)
    return path


def tpm_now(con):
    """The guest's TPM state: the 64-byte NV secret, the persistent key
    (name, and whether it signs), PCR 16 and a digest of all sha256 PCRs."""
    return con.run(NV64_READ)


def same_tpm(con, who, expect, when):
    """The TPM state after WHEN is EXPECT (nv64, keyname, pcr16, pcrs): nothing
    reset, nothing lost, nothing from another time."""
    r = tpm_now(con)
    ok_nv = len(expect.get("nv64", "")) == 128 and r.get("nv64") == expect.get("nv64")
    check(ok_nv, "%s: the guest's 64-byte NV secret is as expected after %s" % (who, when), (expect.get("nv64"), r.get("nv64")))
    check(r.get("keyname") == expect.get("keyname") and r.get("signs") == "yes",
          "%s: persistent key %s intact after %s (same name, signs)" % (who, PERSIST, when), r)
    check(r.get("pcr16") == expect.get("pcr16") and r.get("pcr16") != ZERO_PCR,
          "%s: PCR 16 as expected after %s (the TPM was not reset)" % (who, when), (expect.get("pcr16"), r.get("pcr16")))
    check(len(r.get("pcrs", "")) == 64 and r.get("pcrs") == expect.get("pcrs"),
          "%s: all 24 sha256 PCRs as expected after %s (digest of tpm2_pcrread sha256)" % (who, when),
          (expect.get("pcrs"), r.get("pcrs")))
    return r


def tpm_dir(name):
    uuid = virsh("domuuid", name).stdout.strip()
    return "/var/lib/libvirt/swtpm/%s/tpm2" % uuid


def dir_snapshot(d):
    """Name -> content of the regular files in D (the TPM state on disk)."""
    out = {}
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        if os.path.isfile(p) and not os.path.islink(p):
            out[f] = open(p, "rb").read()
    return out


def swtpm_log(name):
    try:
        return open("/var/log/swtpm/libvirt/qemu/%s-swtpm.log" % name, errors="replace").read()
    except OSError:
        return ""


def qemu_log(name):
    try:
        return open("/var/log/libvirt/qemu/%s.log" % name, errors="replace").read()
    except OSError:
        return ""


class LogMark:
    """What domain NAME's swtpm and QEMU logs gained since this mark."""

    def __init__(self, name):
        self.name = name
        self.tpm, self.qemu = len(swtpm_log(name)), len(qemu_log(name))

    def tpm_since(self):
        return swtpm_log(self.name)[self.tpm:]

    def qemu_since(self):
        return qemu_log(self.name)[self.qemu:]


def last_lines(text, n=4):
    return " | ".join(l.strip() for l in text.strip().splitlines()[-n:])


def occurrences(data, needle):
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + 1)
    return out


def tpm_section(data):
    """Offset of QEMU's tpm-emulator device section in a save image (its
    section header: length-prefixed idstr), or -1. Device sections follow
    the guest's RAM."""
    return data.rfind(b"\x0ctpm-emulator")


def where(data, hexstr):
    """Where the secret HEXSTR is in DATA, for messages."""
    at = occurrences(data, bytes.fromhex(hexstr))
    return "secret at offsets %s; tpm-emulator section at %d; %d bytes" % (at[:8], tpm_section(data), len(data))


def restored(con, r, what):
    """After virsh restore/start/snapshot-revert: the console again (QEMU
    re-bound the socket); the guest runs on from its saved memory."""
    if not check(r.returncode == 0, what, (r.stdout + r.stderr).strip()[-400:]):
        return False
    con.connect()
    return True


def refused(name, r, mark, words, what):
    """A restore-like command R that must fail: virsh fails, the domain does
    not run, and vtpmd's reason (one of WORDS) is in the domain's swtpm
    log. Prints what virsh and QEMU's log said (for the operator's view)."""
    tpm = mark.tpm_since()
    state = virsh("domstate", name).stdout.strip()
    check(r.returncode != 0 and state != "running", "%s: refused (virsh fails, domain %s)" % (what, state or "?"),
          (r.stdout + r.stderr).strip()[-400:])
    hit = [w for w in words if w.lower() in tpm.lower()]
    check(hit, "%s: the domain's swtpm log (vtpmd's stderr) names the cause (%s)" % (what, " / ".join(words)),
          last_lines(tpm, 6) or "(nothing new in the swtpm log)")
    print("INFO: %s: virsh said: %s" % (what, last_lines(r.stderr, 3)), flush=True)
    print("INFO: %s: QEMU's log: %s" % (what, last_lines(mark.qemu_since(), 3)), flush=True)
    print("INFO: %s: swtpm log: %s" % (what, last_lines(tpm, 3)), flush=True)


def write_nv64(con, who, define=False):
    r = con.run((NV64_DEFINE if define else "") + NV64_WRITE)
    check(len(r.get("nv64", "")) == 128 and len(r.get("pcr16", "")) == 66 and len(r.get("pcrs", "")) == 64,
          "%s: guest wrote a 64-byte NV secret at %s and extended PCR 16" % (who, NV64), r)
    return r


def swtpm_save_reference():
    """The same flow on swtpm (libvirt without vtpm-libvirt): the save
    file holds the guest's 64-byte NV secret in clear, so the search for
    it in vtpmd's save files can find what it looks for."""
    print("== save/restore with swtpm (reference for the save-file search)", flush=True)
    name = "vm5"
    con = boot(save_xml(name), name, "swtpm save")
    if not con:
        return
    proc = tpm_process(name)
    check(proc and proc[2] == "/usr/bin/swtpm", "swtpm save: libvirt runs swtpm for this domain", proc and proc[2])
    key = write_state(con, "swtpm save")
    state = dict(write_nv64(con, "swtpm save", define=True), keyname=key.get("keyname"))
    f = os.path.join(SAVES, name + ".save")
    r = virsh("save", name, f)
    if check(r.returncode == 0, "swtpm save: virsh save %s" % f, r.stderr.strip()):
        data = open(f, "rb").read()
        at, sect = occurrences(data, bytes.fromhex(state["nv64"])), tpm_section(data)
        check(sect >= 0 and any(a > sect for a in at),
              "swtpm save: the save file holds the guest's 64-byte NV secret in clear, in QEMU's tpm-emulator section "
              "(the search works)", where(data, state["nv64"]))
        check(not any(a < sect for a in at),
              "swtpm save: nowhere else (the guest's RAM in the file holds no copy: the search sees only the TPM's)",
              where(data, state["nv64"]))
        if restored(con, virsh("restore", f), "swtpm save: virsh restore"):
            same_tpm(con, "swtpm save", state, "virsh save / restore")
        os.remove(f)
    destroy(name)
    virsh("undefine", name, "--tpm")


def vtpmctl(*args):
    return sh(["vtpmctl", *args], env=dict(os.environ, PATH=SYSTEM_PATH))


def saves(d):
    """`vtpmctl saves --state-dir D` (through vtpmd's admin socket while it
    runs, else from the files): instance id, generation, policy."""
    import json
    r = vtpmctl("saves", "--state-dir", d)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stdout + r.stderr).strip()}


def generation_grew(d, before, what):
    """The save generation is above BEFORE's, the instance id the same."""
    now = saves(d)
    ok = isinstance(now.get("generation"), int) and now["generation"] > before.get("generation", 0) \
        and now.get("instance_id") and before.get("instance_id") in (None, now.get("instance_id"))
    check(ok, "%s: the save generation grew (%s -> %s), same instance id (vtpmctl saves)"
          % (what, before.get("generation"), now.get("generation")), now)
    return now


def rollback_lines(d):
    try:
        return [l for l in open(os.path.join(d, "vtpmd-rollbacks.log")).read().splitlines() if l.strip()]
    except OSError:
        return []


def sealed_save_file(f, secrets, who):
    """F (a libvirt save image) carries the TPM sealed: VTPMSAV1 in it, none
    of SECRETS (hex) in its bytes."""
    data = open(f, "rb").read()
    check(SEALED_MAGIC in data, "%s: the save file (%d bytes) carries the TPM state sealed (%s)" % (who, len(data), SEALED_MAGIC.decode()))
    check(not any(bytes.fromhex(s) in data for s in secrets),
          "%s: the save file does not hold the guest's 64-byte NV secrets (searched all %d bytes)" % (who, len(data)),
          "; ".join(where(data, s) for s in secrets))
    return data


def save_part(daemon):
    """virsh save / restore, managedsave / start, an internal memory snapshot
    and its revert, with vtpmd as libvirt's emulator backend and default
    options: the TPM leaves vtpmd sealed to this host (system host key)."""
    swtpm_save_reference()
    print("== save, managedsave, snapshots with vtpmd (vtpm-libvirt enable, system host key)", flush=True)
    if not os.path.exists(DROPIN):
        run_readme(readme_block("emulator-enable"), "emulator (save)")
        daemon.stop()
        daemon.start(dropin_path())
    name = "vm6"
    disk = os.path.join(IMAGES, name + ".qcow2")
    r = sh(["qemu-img", "create", "-f", "qcow2", disk, "16M"])
    if not check(r.returncode == 0, "qemu-img made a 16 MiB qcow2 disk for internal snapshots", r.stderr):
        return
    con = boot(save_xml(name, disk), name, "sealed")
    if not con:
        return
    proc = tpm_process(name)
    check(proc and proc[2] == "/usr/local/bin/vtpmd" and not any("host-key" in a or "plaintext" in a for a in proc[0]),
          "sealed: libvirt runs vtpmd with no key options (%s)" % " ".join(proc[0][1:] if proc else []), proc)
    tdir = tpm_dir(name)
    key = write_state(con, "sealed")
    at_snap = dict(write_nv64(con, "sealed", define=True), keyname=key.get("keyname"))

    # The snapshot (its TPM state: at_snap); the state then moves on.
    gen = saves(tdir)
    r = virsh("snapshot-create-as", name, "snap1", "--description", "TPM state at_snap")
    snap_ok = check(r.returncode == 0, "sealed: virsh snapshot-create-as (internal, with memory) on the running domain",
                    (r.stdout + r.stderr).strip())
    gen = generation_grew(tdir, gen, "snapshot")
    key_file = os.path.join(HOST_KEY_DIR, "host-key.pem")
    readable = sh(["runuser", "-u", "tss", "--", "test", "-r", key_file]).returncode == 0
    check(readable, "sealed: the system host key %s exists and the user libvirt runs vtpmd as (tss) can read it" % key_file,
          sh(["ls", "-la", HOST_KEY_DIR]).stdout if os.path.isdir(HOST_KEY_DIR) else "no " + HOST_KEY_DIR)
    now = dict(write_nv64(con, "sealed, after the snapshot"), keyname=key.get("keyname"))
    secrets = [at_snap["nv64"], now["nv64"]]

    # 1. virsh save + restore
    f1 = os.path.join(SAVES, name + "-1.save")
    r = virsh("save", name, f1)
    if check(r.returncode == 0, "sealed: virsh save %s" % f1, r.stderr.strip()):
        sealed_save_file(f1, secrets, "save")
        gen = generation_grew(tdir, gen, "save")
        if restored(con, virsh("restore", f1), "save: virsh restore of the sealed save file"):
            same_tpm(con, "save", now, "virsh save / restore")
        check(proc_running(name), "save: the TPM is served by vtpmd after the restore", tpm_process(name))

    # 2. virsh managedsave + start
    r = virsh("managedsave", name)
    if check(r.returncode == 0, "sealed: virsh managedsave", r.stderr.strip()):
        gen = generation_grew(tdir, gen, "managedsave")
        mf = "/var/lib/libvirt/qemu/save/%s.save" % name
        if os.path.exists(mf):
            sealed_save_file(mf, secrets, "managedsave")
        else:
            check(False, "managedsave: libvirt's managed save file is at " + mf, os.listdir(os.path.dirname(mf)))
        r = virsh("start", name)
        if restored(con, r, "managedsave: virsh start restores the managed save"):
            same_tpm(con, "managedsave", now, "virsh managedsave / start")

    # 4. and 5.: a save file on a host with another key; a flipped byte.
    f2 = os.path.join(SAVES, name + "-2.save")
    r = virsh("save", name, f2)
    if check(r.returncode == 0, "sealed: virsh save %s (for the refusals)" % f2, r.stderr.strip()):
        data = sealed_save_file(f2, secrets, "save 2")
        on_disk = dir_snapshot(tdir)
        other_host(name, f2, tdir, on_disk)
        tampered(name, f2, data, tdir, on_disk)
        if restored(con, virsh("restore", f2), "sealed: the unmodified save file restores afterwards (same host key)"):
            same_tpm(con, "sealed, after the refused restores", now, "the refused restores and a good one")

    # 3. and 6.: revert to the snapshot: a rollback (save generations came after it).
    if snap_ok:
        revert_part(con, name, tdir, at_snap)
    destroy(name)
    virsh("undefine", name, "--tpm", "--managed-save", "--snapshots-metadata")
    for f in (f1, f2):
        if os.path.exists(f):
            os.remove(f)


def proc_running(name):
    p = tpm_process(name)
    return p and p[2] == "/usr/local/bin/vtpmd"


def other_host(name, f, tdir, on_disk):
    """The save file restored where the system host key is another one, as
    on another host set up by the README: /var/lib/vtpm-hostkey moved away, then
    `vtpm-libvirt enable` again (it makes the host key libvirt's vtpmd uses)."""
    pub = os.path.join(HOST_KEY_DIR, "host-key.pub.pem")
    if not check(os.path.exists(pub), "other host key: this host's key is in %s" % HOST_KEY_DIR):
        return
    ours = open(pub).read()
    away = HOST_KEY_DIR + ".orig"
    os.rename(HOST_KEY_DIR, away)
    try:
        run_readme(readme_block("emulator-enable"), "emulator (another host key)")
        theirs = open(pub).read() if os.path.exists(pub) else ""
        check(theirs and theirs != ours, "other host key: vtpm-libvirt enable made another host key in %s" % HOST_KEY_DIR,
              os.listdir(HOST_KEY_DIR) if os.path.isdir(HOST_KEY_DIR) else "no " + HOST_KEY_DIR)
        mark = LogMark(name)
        r = virsh("restore", f)
        refused(name, r, mark, ["host key", "another host", "other host"], "other host key: virsh restore")
        destroy(name)
        check(dir_snapshot(tdir) == on_disk, "other host key: the TPM state on disk is untouched by the refused restore",
              changed_files(on_disk, dir_snapshot(tdir)))
    finally:
        shutil.rmtree(HOST_KEY_DIR, ignore_errors=True)
        os.rename(away, HOST_KEY_DIR)


def changed_files(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def sealed_layout(data, at):
    """(wrapped key start, its length, first piece's ciphertext start, its
    length) of the sealed blob at AT, from its header (docs/migration.md:
    magic 8, version 1, type 1, id 32, fingerprint 32, be16 wrapped length,
    wrapped key, be16 piece count; a piece: seq 4, kind 1, flags 1, plain
    length 4, iv 16, be32 ciphertext length, ciphertext, mac 32)."""
    wrapped_len = int.from_bytes(data[at + 74:at + 76], "big")
    piece = at + 76 + wrapped_len + 2
    ct_len = int.from_bytes(data[piece + 26:piece + 30], "big")
    return at + 76, wrapped_len, piece + 30, ct_len


def tampered(name, f, data, tdir, on_disk):
    """One byte flipped in the sealed TPM section: inside the first piece's
    ciphertext (the TPM's permanent state), then inside the wrapped key."""
    at = data.find(SEALED_MAGIC)
    if not check(at >= 0, "tampered: the save file has the sealed TPM section (%s at %d)" % (SEALED_MAGIC.decode(), at)):
        return
    wrapped, wrapped_len, ct, ct_len = sealed_layout(data, at)
    if not check(wrapped_len in (256, 384, 512) and 0 < ct_len < len(data) - ct,
                 "tampered: the sealed blob's header parses (wrapped key %d bytes, first ciphertext %d bytes at +%d)"
                 % (wrapped_len, ct_len, ct - at)):
        return
    for pos, part, words in ((ct + min(ct_len // 2, 300), "ciphertext", ["tamper", "altered", "authentic"]),
                             (wrapped + wrapped_len // 2, "wrapped key", ["damaged", "altered"])):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        bf = f + ".tampered"
        open(bf, "wb").write(bad)
        what = "tampered (byte %d after %s, in the %s, flipped): virsh restore" % (pos - at, SEALED_MAGIC.decode(), part)
        mark = LogMark(name)
        r = virsh("restore", bf)
        if words:
            refused(name, r, mark, words, what)
        else:
            state = virsh("domstate", name).stdout.strip()
            check(r.returncode != 0 and state != "running", "%s: refused (virsh fails, domain %s)" % (what, state),
                  (r.stdout + r.stderr).strip()[-400:])
            print("INFO: %s: swtpm log: %s" % (what, last_lines(mark.tpm_since(), 3)), flush=True)
        destroy(name)
        check(dir_snapshot(tdir) == on_disk, "tampered (%s): the TPM state on disk is untouched by the refused restore" % part,
              changed_files(on_disk, dir_snapshot(tdir)))
        os.remove(bf)


def revert_part(con, name, tdir, at_snap):
    before = rollback_lines(tdir)
    r = virsh("snapshot-revert", name, "snap1")
    if restored(con, r, "snapshot: virsh snapshot-revert to the memory snapshot"):
        same_tpm(con, "snapshot revert", at_snap, "the revert (as at the snapshot)")
    after = rollback_lines(tdir)
    check(len(after) == len(before) + 1, "snapshot revert: recorded as a rollback (one new line in %s/vtpmd-rollbacks.log)" % tdir,
          after[len(before):] or after)
    print("INFO: rollback record: %s" % (after[-1] if after else "(none)"), flush=True)
    try:
        print("INFO: vtpmd-identity.json: %s" % open(os.path.join(tdir, "vtpmd-identity.json")).read().strip(), flush=True)
    except OSError as e:
        print("INFO: vtpmd-identity.json: %s" % e, flush=True)
    generation = rollback_generation(after[-1] if after else "")

    # The refuse policy, set through the running vtpmd (its admin socket).
    r = vtpmctl("rollback-policy", "refuse", "--state-dir", tdir)
    if not check(r.returncode == 0, "rollback policy: vtpmctl rollback-policy refuse --state-dir DIR (vtpmd running)",
                 (r.stdout + r.stderr).strip()):
        return
    write_nv64(con, "rollback policy, state moved on")
    mark = LogMark(name)
    r = virsh("snapshot-revert", name, "snap1")
    refused(name, r, mark, ["rollback", "roll back", "older generation"], "rollback policy refuse: virsh snapshot-revert")
    destroy(name)
    if generation is None:
        generation = rollback_generation(mark.tpm_since())
    if not check(generation is not None, "rollback policy: the snapshot's generation is known (from the rollback record or the refusal)",
                 after[-1:] + [last_lines(mark.tpm_since())]):
        return
    r = vtpmctl("allow-rollback", "--generation", str(generation), "--state-dir", tdir)
    check(r.returncode == 0, "rollback policy: vtpmctl allow-rollback --generation %s --state-dir DIR (no vtpmd running)" % generation,
          (r.stdout + r.stderr).strip())
    n = len(rollback_lines(tdir))
    r = virsh("snapshot-revert", name, "snap1")
    if restored(con, r, "rollback policy: the allowed revert works"):
        same_tpm(con, "allowed revert", at_snap, "the allowed revert (as at the snapshot)")
    check(len(rollback_lines(tdir)) == n + 1, "allowed revert: recorded in vtpmd-rollbacks.log too", rollback_lines(tdir)[n:])
    mark = LogMark(name)
    destroy(name)
    r = virsh("snapshot-revert", name, "snap1")
    refused(name, r, mark, ["rollback", "roll back", "older generation"],
            "rollback policy: the allowance was for one revert; the next is refused again")
    destroy(name)


def rollback_generation(text):
    """The restored (older) generation a rollback record or message names."""
    import json
    for line in reversed(text.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            m = re.search(r"generation[ =:]+(\d+)", line)
            if m:
                return int(m.group(1))
            continue
        for k in ("restored_generation", "generation", "restored"):
            if isinstance(rec.get(k), int):
                return rec[k]
    return None


# ---------------------------------------------------------------- main

def collect_logs():
    for pattern, prefix in (("/var/log/libvirt/libvirtd.log", "libvirt-"), ("/var/log/libvirt/qemu/*", "libvirt-qemu-"),
                            ("/var/log/swtpm/libvirt/qemu/*", "libvirt-swtpm-"), ("/var/log/vtpm/*", "libvirt-vtpm-")):
        for f in glob.glob(pattern):
            try:
                shutil.copy(f, os.path.join(LOGS, prefix + os.path.basename(f)))
            except OSError:
                pass


def main():
    # `libvirt-test.py save`: only the save/managedsave/snapshot part.
    only = sys.argv[1] if len(sys.argv) > 1 else None
    if only not in (None, "save"):
        sys.exit("usage: libvirt-test.py [save]")
    os.makedirs(LOGS, exist_ok=True)
    enter_namespace()
    for f in glob.glob(os.path.join(LOGS, "libvirt-*")):
        os.remove(f)
    daemon = Libvirtd()
    try:
        run_readme(readme_block("install"), "install")
        daemon.start(SYSTEM_PATH)
        version = virsh("version").stdout
        check(re.search(r"Running hypervisor: QEMU \d", version) and "libvirt" in version,
              "libvirtd started without systemd in a private namespace; virsh reaches its QEMU driver (%s)"
              % " / ".join(l.strip() for l in version.splitlines() if l.strip()), version)
        if only is None:
            external_part()
            made = swtpm_made_domain() if define_secret() else None
            emulator_part(daemon)
            encrypted_part()
            if made:
                switch_part(daemon, made)
            virsh("secret-undefine", SECRET_UUID)
        save_part(daemon)
    except Exception as e:  # a crashed step is a failure, not a pass
        import traceback
        traceback.print_exc()
        check(False, "libvirt test aborted", e)
    finally:
        for line in virsh("list", "--name").stdout.split():
            destroy(line)
        daemon.stop()
        for pid, (argv, uid, exe) in cmdlines().items():
            if exe.endswith(("/vtpmd", "/swtpm", "qemu-system-x86_64")):
                os.kill(pid, 9)
        collect_logs()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
