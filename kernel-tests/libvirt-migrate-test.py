#!/usr/bin/env python3
"""`virsh migrate --live` between two libvirt daemons set up as two hosts on
this machine, the TPM on libvirt's emulator backend: swtpm first (the
baseline, plaintext), then vtpmd moved sealed by `vtpmctl migrate`.

The hosts: this process is the source ("vtpm-src", 10.77.0.1); the
destination ("vtpm-dst", 10.77.0.2) is a process in namespaces of its own.
Each has its own network, mount and UTS namespace, its own hostname and
libvirt host UUID, and fresh tmpfs /run, /var/lib, /var/log, /var/cache,
/etc/libvirt, /usr/local (libvirt-test.py's enter_namespace), so its own
libvirtd (TCP, no auth), `make install`, host key and swtpm state. A veth
pair joins them. Commands on the destination run through `nsenter -t PID
-m -n -u`, which is also `vtpmctl migrate --remote`.

QEMU's migration stream passes through a relay in this test that records
it. The guest extends an NV index of the "extend" type: the TPM computes
its value, the guest never reads it before the migration, so those 32 bytes
exist only inside the TPM (not in guest RAM, which the stream carries in
clear either way); the capture is searched for them.

Checks: the baseline migrates with swtpm, its stream holds the value and
loads into a third destination (a clone). With vtpmd: a plain `virsh
migrate` fails at the destination's TPM (its log says why) and the guest
keeps running with its TPM on the source; a `vtpmctl migrate` whose virsh
migrate fails undoes its steps; `vtpmctl migrate` moves the guest, which
keeps its TPM state (NV secret, persistent key, PCR 16, the extend index),
the stream holds no trace of the value, the source state directory holds
only the tombstone; the captured stream replayed into a third destination
(QEMU with the domain's command line, vtpmd on a fresh reservation) is
refused, and vtpmd's log says why. One guest boot per backend; about four
minutes under TCG.

Prints "PASS: ..." / "FAIL: ..." per check and "N passed, M failed" last.
Logs go to KT_LOGS/libvirt-migrate-*.
"""
import glob, hashlib, importlib.util, json, os, pwd, re, shlex, shutil, signal, socket, subprocess, sys, threading, time
from ktlib import check, summary, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("libvirt_test", os.path.join(HERE, "libvirt-test.py"))
lt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lt)

ROOT, BUILD, LOGS = lt.ROOT, lt.BUILD, lt.LOGS
MARK = "VTPM_MIGRATE_TEST_HOSTS"
SRC_ADDR, DST_ADDR = "10.77.0.1", "10.77.0.2"
DEST_URI = "qemu+tcp://%s/system" % DST_ADDR
HOST_UUIDS = {"vtpm-src": "6a1d3f0e-52c4-4b8e-9a3e-1f6f0c2d7a01", "vtpm-dst": "6a1d3f0e-52c4-4b8e-9a3e-1f6f0c2d7a02"}
# An NV index of type extend: its value is computed inside the TPM.
NV_EXT = "0x1500020"
EXT_DATA = "vtpm-migrate-test"
EXT_VALUE = hashlib.sha256(b"\0" * 32 + EXT_DATA.encode()).hexdigest()
EXTEND = ("printf {data} > /tmp/d && tpm2_nvdefine {nv} -C o -s 32 -g sha256 -a 'nt=extend|ownerread|ownerwrite' >/dev/null && "
          "tpm2_nvextend -C o -i /tmp/d {nv} && echo R:extended=yes").format(data=EXT_DATA, nv=NV_EXT)
READ_EXT = "tpm2_nvread {nv} -C o -s 32 -o /tmp/e 2>/dev/null && echo R:ext=$(od -An -tx1 -v /tmp/e | tr -d ' \\n')".format(nv=NV_EXT)


# ---------------------------------------------------------------- hosts

class Host:
    """One of the two hosts: this process (pid None) or the namespaces of
    the destination's anchor process."""

    def __init__(self, name, addr, pid=None):
        self.name, self.addr, self.pid = name, addr, pid

    def prefix(self):
        return [] if self.pid is None else ["nsenter", "-t", str(self.pid), "-m", "-n", "-u", "--"]

    def sh(self, argv, **kw):
        return lt.sh(self.prefix() + argv, **kw)

    def path(self, p):
        """P as this host sees it, from this process."""
        return p if self.pid is None else "/proc/%d/root%s" % (self.pid, p)

    def virsh(self, *args):
        return self.sh(["virsh", "-c", lt.URI, *args])

    def helper(self, *args):
        """Runs this script's host-side helper (below) on this host."""
        env = dict(os.environ, **{lt.NS_MARK: "1", MARK: "helper"})
        r = subprocess.run(self.prefix() + [sys.executable, os.path.abspath(__file__), *args], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("%s: %s failed: %s" % (self.name, " ".join(args), (r.stdout + r.stderr)[-1500:]))
        return r.stdout

    def start_libvirtd(self, path):
        pidfile = "/run/libvirt/libvirtd.pid"
        if os.path.exists(self.path(pidfile)):
            self.stop_libvirtd()
        r = self.sh(["env", path, "libvirtd", "--daemon", "--listen", "--pid-file", pidfile])
        if r.returncode != 0:
            raise RuntimeError("%s: libvirtd did not start: %s" % (self.name, r.stderr))
        wait_for(lambda: self.virsh("version").returncode == 0, 60, self.name + "'s libvirtd")

    def stop_libvirtd(self):
        pidfile = self.path("/run/libvirt/libvirtd.pid")
        try:
            pid = int(open(pidfile).read().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
                     open("/proc/%d/stat" % pid).read().split()[2] == "Z", 30, self.name + "'s libvirtd to stop")
        except (ProcessLookupError, RuntimeError):
            pass

    def net_ns(self):
        return os.readlink("/proc/%s/ns/net" % (self.pid or "self"))

    def kill_all(self):
        """Every process in this host's network namespace but this one."""
        ns = self.net_ns()
        for d in glob.glob("/proc/[0-9]*"):
            pid = int(d[6:])
            if pid in (os.getpid(), self.pid):
                continue
            try:
                if os.readlink(d + "/ns/net") == ns:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def host_setup(name):
    """On a host, once: libvirt-test.py's private directories, then this
    host's name, loopback and libvirtd's TCP listener and host UUID."""
    lt.enter_namespace()
    subprocess.run(["hostname", name], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/etc/libvirt/libvirtd.conf", "a") as f:
        f.write('listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nhost_uuid = "%s"\n' % HOST_UUIDS[name])


def helper_main(args):
    """The destination's side of host set-up, run there through nsenter."""
    if args[0] == "setup":
        host_setup(args[1])
    elif args[0] == "readme":
        lt.run_readme(lt.readme_block(args[1]), args[1])
    return 0


def make_hosts():
    """Enters the source's namespaces (re-exec), makes the destination's,
    joins them with a veth pair. Returns (src, dst)."""
    if os.environ.get(MARK) != "inside":
        for script in ("fetch-kernel.sh", "build-initramfs.sh"):
            subprocess.run(["bash", os.path.join(HERE, script)], check=True, stdout=subprocess.DEVNULL)
        os.environ[MARK] = "inside"
        os.environ[lt.NS_MARK] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--net", "--uts", "--propagation", "private",
                              sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    host_setup("vtpm-src")
    src = Host("vtpm-src", SRC_ADDR)
    anchor = subprocess.Popen(["unshare", "--mount", "--net", "--uts", "--propagation", "private", "sleep", "infinity"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mine = os.readlink("/proc/self/ns/net")
    wait_for(lambda: os.path.exists("/proc/%d/ns/net" % anchor.pid) and os.readlink("/proc/%d/ns/net" % anchor.pid) != mine
             and open("/proc/%d/cmdline" % anchor.pid).read().startswith("sleep"), 10, "the destination's namespaces")
    dst = Host("vtpm-dst", DST_ADDR, anchor.pid)
    dst.anchor = anchor
    dst.helper("setup", "vtpm-dst")
    for cmd in (["ip", "link", "add", "veth-src", "type", "veth", "peer", "name", "veth-dst", "netns", str(anchor.pid)],
                ["ip", "addr", "add", SRC_ADDR + "/24", "dev", "veth-src"], ["ip", "link", "set", "veth-src", "up"]):
        subprocess.run(cmd, check=True)
    for cmd in (["ip", "addr", "add", DST_ADDR + "/24", "dev", "veth-dst"], ["ip", "link", "set", "veth-dst", "up"]):
        r = dst.sh(cmd)
        if r.returncode != 0:
            raise RuntimeError(" ".join(cmd) + ": " + r.stderr)
    return src, dst


# ---------------------------------------------------------------- the stream

class Relay(threading.Thread):
    """Listens on the source's address, forwards the one connection QEMU
    makes to the destination's address, same port, recording what the
    source sends."""

    def __init__(self, port, capture):
        super().__init__(daemon=True)
        self.port, self.capture, self.bytes = port, capture, 0
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((SRC_ADDR, port))
        self.srv.listen(1)
        self.start()

    def uri(self):
        return "tcp://%s:%d" % (SRC_ADDR, self.port)

    def run(self):
        try:
            a, _ = self.srv.accept()
        except OSError:
            return
        b = socket.create_connection((DST_ADDR, self.port), timeout=30)
        b.settimeout(None)
        back = threading.Thread(target=self.pump, args=(b, a, None), daemon=True)
        back.start()
        with open(self.capture, "wb") as out:
            self.pump(a, b, out)
        back.join(5)

    def pump(self, frm, to, out):
        try:
            while True:
                data = frm.recv(1 << 16)
                if not data:
                    break
                if out:
                    out.write(data)
                    self.bytes += len(data)
                to.sendall(data)
        except OSError:
            pass
        for s in (to,):
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.srv.close()
        self.join(30)


def holds(path, hexstr):
    return bytes.fromhex(hexstr) in open(path, "rb").read()


# ---------------------------------------------------------------- guests

def console_on(host, name):
    """The domain's serial console as HOST has it."""
    con = lt.Console(name)
    con.path = host.path(os.path.join(lt.CONSOLES, name + ".sock"))
    con.log = host.path("/var/log/libvirt/qemu/%s-console.log" % name)
    con.connect()
    return con


def write_all(con, who):
    before = lt.write_state(con, who)
    r = con.run(EXTEND)
    check(r.get("extended") == "yes", "%s: guest extended NV index %s (type extend; its value never read)" % (who, NV_EXT), r)
    return before


def kept_state(con, who, before, when):
    """The TPM kept running across WHEN: NV, key, PCR 16 as they were."""
    r = con.run(lt.READ)
    check(r.get("secret") == before.get("secret") and r.get("secret"), "%s: NV secret intact after %s" % (who, when),
          (before.get("secret"), r.get("secret")))
    check(r.get("keyname") == before.get("keyname") and r.get("signs") == "yes",
          "%s: persistent key intact after %s (same name, signs)" % (who, when), r)
    check(r.get("pcr16") == before.get("pcr16"), "%s: PCR 16 as extended before %s (the TPM kept running)" % (who, when),
          (before.get("pcr16"), r.get("pcr16")))
    return r


def state_dir(host, name):
    uuid = host.virsh("domuuid", name).stdout.strip() or lt.virsh("domuuid", name).stdout.strip()
    return "/var/lib/libvirt/swtpm/%s/tpm2" % uuid


def migrate_plain(src, name, relay, extra=()):
    return src.virsh("migrate", "--live", "--persistent", name, DEST_URI, "--migrateuri", relay.uri(), *extra)


def define_boot(src, name, who):
    return lt.boot(lt.domain_xml("libvirt-emulator.xml", name=name), name, who)


# ---------------------------------------------------------------- parts

def baseline(src, dst):
    """swtpm on both hosts: libvirt's own migration, plaintext."""
    print("== baseline: swtpm on both hosts, plain virsh migrate", flush=True)
    con = define_boot(src, "vmswtpm", "baseline")
    if not con:
        return
    proc = lt.tpm_process("vmswtpm")
    check(proc and proc[2] == "/usr/bin/swtpm", "baseline: the source runs swtpm", proc and proc[2])
    before = write_all(con, "baseline")
    relay = Relay(49200, os.path.join(LOGS, "libvirt-migrate-swtpm.stream"))
    r = migrate_plain(src, "vmswtpm", relay)
    relay.close()
    check(r.returncode == 0, "baseline: virsh migrate --live to %s (swtpm)" % DEST_URI, r.stderr.strip())
    if r.returncode != 0:
        return
    check(dst.virsh("domstate", "vmswtpm").stdout.strip() == "running", "baseline: the domain runs on the destination")
    con2 = console_on(dst, "vmswtpm")
    kept_state(con2, "baseline", before, "the migration")
    check(con2.run(READ_EXT).get("ext") == EXT_VALUE, "baseline: the extend index has its value on the destination")
    check(relay.bytes > 1 << 20 and holds(relay.capture, EXT_VALUE),
          "baseline: the captured stream (%d bytes) holds the TPM's NV value in clear (so the search works)" % relay.bytes)
    replay(dst, "vmswtpm", relay.capture, "swtpm")
    dst.virsh("destroy", "vmswtpm")
    dst.virsh("undefine", "vmswtpm", "--tpm")
    src.virsh("undefine", "vmswtpm", "--tpm")


def use_vtpmd(src, dst):
    """README: vtpm-libvirt enable on both hosts, libvirtd restarted."""
    for h in (src, dst):
        if h.pid is None:
            lt.run_readme(lt.readme_block("emulator-enable"), "emulator-enable")
        else:
            h.helper("readme", "emulator-enable")
        # (vtpm-libvirt enable made the host key, for libvirt's TPM user.)
        key = h.path("/var/lib/vtpm-hostkey/host-key.pem")
        check(os.path.exists(key) and os.stat(key).st_uid == pwd.getpwnam("tss").pw_uid,
              "%s: vtpm-libvirt enable made the host key (/var/lib/vtpm-hostkey), owned by tss" % h.name)
        path = h.sh(["vtpm-libvirt", "path"], env=dict(os.environ, PATH=lt.SYSTEM_PATH)).stdout.strip()
        h.stop_libvirtd()
        h.start_libvirtd(path)


def vtpmd_part(src, dst):
    print("== vtpmd on both hosts: vtpmctl migrate", flush=True)
    use_vtpmd(src, dst)
    name = "vmvtpmd"
    con = define_boot(src, name, "vtpmd")
    if not con:
        return
    proc = lt.tpm_process(name)
    check(proc and proc[2] == "/usr/local/bin/vtpmd", "vtpmd: the source runs vtpmd", proc and proc[2])
    before = write_all(con, "vtpmd")
    sdir = state_dir(src, name)

    # Without the orchestrator: refused, the guest carries on here.
    relay = Relay(49201, os.path.join(LOGS, "libvirt-migrate-plain.stream"))
    r = migrate_plain(src, name, relay)
    relay.close()
    check(r.returncode != 0 and src.virsh("domstate", name).stdout.strip() == "running",
          "vtpmd: a plain virsh migrate fails and the domain keeps running on the source", r.stderr.strip()[-400:])
    qlog = open(dst.path("/var/log/libvirt/qemu/%s.log" % name), errors="replace").read().rsplit("starting up", 1)[-1]
    refused = [l for l in qlog.splitlines() if "tpm-emulator" in l]
    check(refused, "vtpmd: it failed at the TPM: the destination refused the state (QEMU there: %s)"
          % (refused[0].split(": ", 1)[-1] if refused else ""), qlog[-400:])
    tlog = open(dst.path("/var/log/swtpm/libvirt/qemu/%s-swtpm.log" % name), errors="replace").read()
    why = [l for l in tlog.splitlines() if " ERROR: " in l]
    check(why, "vtpmd: the destination vtpmd's log (libvirt's swtpm log) says why: %s"
          % (why[0].split(" ERROR: ", 1)[-1] if why else ""), tlog[-400:])
    kept_state(con, "vtpmd", before, "the refused plain migration")

    # vtpmctl migrate whose virsh migrate fails: both of its steps undone.
    r = lt.sh(["vtpmctl", "migrate", name, DEST_URI, "--remote", " ".join(dst.prefix()[:-1]), "--",
               "--persistent", "--migrateuri", "tcp://%s:49299" % SRC_ADDR], env=dict(os.environ, PATH=lt.SYSTEM_PATH))
    err = (json.loads(r.stdout or "{}") if r.stdout.strip().startswith("{") else {}).get("error", "")
    status = lt.sh(["vtpmctl", "status", "--state-dir", sdir], env=dict(os.environ, PATH=lt.SYSTEM_PATH))
    st = json.loads(status.stdout) if status.stdout.strip().startswith("{") else {}
    leftover = os.path.exists(dst.path(os.path.join(sdir, "vtpmd-incoming.json")))
    check(r.returncode == 1 and "virsh migrate failed" in err and "released" in err and "cancelled" in err
          and st.get("state") == "running" and st.get("tpm_running") is True and not leftover,
          "vtpmd: vtpmctl migrate with a failing virsh migrate undoes its steps (source running, no reservation left) "
          "and says so", (err[-500:], st, leftover))
    kept_state(con, "vtpmd", before, "the failed vtpmctl migrate")

    # With it.
    relay = Relay(49202, os.path.join(LOGS, "libvirt-migrate-vtpmd.stream"))
    cmd = ["vtpmctl", "migrate", name, DEST_URI, "--remote", " ".join(dst.prefix()[:-1]), "--",
           "--persistent", "--migrateuri", relay.uri()]
    r = lt.sh(cmd, env=dict(os.environ, PATH=lt.SYSTEM_PATH))
    relay.close()
    open(os.path.join(LOGS, "libvirt-migrate-vtpmctl.log"), "w").write("$ %s\n%s\n%s" % (" ".join(cmd), r.stderr, r.stdout))
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = {}
    check(r.returncode == 0 and out.get("migrated") is True, "vtpmd: vtpmctl migrate %s %s succeeded" % (name, DEST_URI),
          (r.stdout + r.stderr)[-600:])
    if r.returncode != 0:
        return
    check(dst.virsh("domstate", name).stdout.strip() == "running", "vtpmd: the domain runs on the destination")
    dproc = [p for p in cmdlines_of(dst) if p[1].endswith("/vtpmd")]
    check(dproc, "vtpmd: the destination's TPM process is vtpmd", dproc)
    dlog = open(dst.path("/var/log/swtpm/libvirt/qemu/%s-swtpm.log" % name), errors="replace").read()
    check("left with the reservation are unwrapped" in dlog and "instance keys were unwrapped ahead of time" in dlog,
          "vtpmd: the destination vtpmd unwrapped the keys vtpmctl migrate left with the reservation when libvirt "
          "started it, so the downtime held no RSA decryption", dlog[-600:])
    con2 = console_on(dst, name)
    kept_state(con2, "vtpmd", before, "vtpmctl migrate")
    check(con2.run(READ_EXT).get("ext") == EXT_VALUE, "vtpmd: the extend index has its value on the destination")
    check(relay.bytes > 1 << 20 and not holds(relay.capture, EXT_VALUE),
          "vtpmd: the captured stream (%d bytes) holds no trace of the TPM's NV value" % relay.bytes)
    # What the source keeps: the tombstone, the stub swtpm refuses, the lock.
    files = sorted(os.listdir(src.path(sdir)))
    stub = open(os.path.join(sdir, "tpm2-00.permall"), "rb").read() if "tpm2-00.permall" in files else b""
    tomb = json.load(open(os.path.join(sdir, "vtpmd-tombstone.json"))) if "vtpmd-tombstone.json" in files else {}
    contents = b"".join(open(os.path.join(sdir, f), "rb").read() for f in files)
    check(files == [".lock", "tpm2-00.permall", "vtpmd-tombstone.json"]
          and b"migrated away" in stub and tomb.get("migration_id") == out.get("migration_id")
          and bytes.fromhex(before["secret"]) not in contents,
          "vtpmd: after the receipt the source state directory holds only the tombstone (id %s...), the stub "
          "and the lock: %s" % (str(out.get("migration_id"))[:16], ", ".join(files)), files)
    replay(dst, name, relay.capture)


def cmdlines_of(host):
    """(argv, exe) of the processes in HOST's network namespace."""
    ns, out = host.net_ns(), []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if os.readlink(d + "/ns/net") == ns:
                out.append((open(d + "/cmdline", "rb").read().split(b"\0"), os.readlink(d + "/exe")))
        except OSError:
            pass
    return out


REPLAY = "/run/vtpm-test/replay"


def qemu_command(log):
    """QEMU's command line, as libvirt logged it at the domain's latest
    start (environment assignments left out)."""
    text = open(log, errors="replace").read()
    block = text.rsplit("starting up libvirt", 1)[-1].split("\n", 1)[1]
    lines = []
    for line in block.splitlines():
        lines.append(line.rstrip(" \\"))
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(lines))
    while argv and "=" in argv[0] and not argv[0].startswith("/"):
        argv.pop(0)
    return argv


def third_destination(argv, capture):
    """libvirt's destination command line, made a stand-alone one: its own
    monitor, serial and TPM sockets, the stream read from the capture
    (`-incoming exec:`, so without the sandbox that forbids it)."""
    out, it = [], iter(argv)
    for a in it:
        if a in ("-add-fd", "-sandbox"):
            next(it)
            continue
        if a in ("-chardev", "-incoming"):
            v = next(it)
            if a == "-incoming":
                v = "exec:cat " + shlex.quote(capture)
            elif "id=charmonitor" in v:
                v = "socket,id=charmonitor,path=%s/mon.sock,server=on,wait=off" % REPLAY
            elif "id=charserial0" in v:
                v = "socket,id=charserial0,path=%s/serial.sock,server=on,wait=off" % REPLAY
            elif "id=chrtpm" in v:
                v = "socket,id=chrtpm,path=%s/ctrl.sock" % REPLAY
            out += [a, v]
            continue
        out.append(a)
    return out


def qmp_status(path):
    """QEMU's run state through its QMP socket, once the incoming
    migration is over (None if it does not answer)."""
    try:
        q = socket.socket(socket.AF_UNIX)
        q.settimeout(10)
        q.connect(path)
        f = q.makefile("rw")
        f.readline()
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        q.close()
        return reply.get("return", {}).get("status")
    except (OSError, ValueError):
        return None


def replay(dst, name, capture, who="vtpmd"):
    """The captured stream into a third destination on the destination
    host: QEMU with the domain's own command line, its TPM started as
    libvirt starts one. vtpmd runs on a fresh reservation (a valid, unused
    id of the same host key) and must refuse; swtpm (the baseline) on an
    empty directory takes the stream: a clone."""
    print("== %s: replay of the captured stream into a third destination" % who, flush=True)
    os.makedirs(dst.path(REPLAY + "/tpm"))
    env = dict(os.environ, PATH=lt.SYSTEM_PATH)
    if who == "vtpmd":
        r = dst.sh(["vtpmctl", "reserve-incoming", "--state-dir", REPLAY + "/tpm", "--owner", "root"], env=env)
        check(r.returncode == 0, "replay: a fresh reservation on the destination host", r.stdout + r.stderr)
    vlog = REPLAY + "/tpm.log"
    tpm = subprocess.Popen(dst.prefix() + ["swtpm", "socket", "--ctrl",
                           "type=unixio,path=%s/ctrl.sock,mode=0600" % REPLAY, "--tpmstate",
                           "dir=%s/tpm,mode=0600" % REPLAY, "--log", "file=" + vlog, "--terminate", "--tpm2"],
                           env=dict(env, PATH=(lt.LINKS + ":" if who == "vtpmd" else "") + lt.SYSTEM_PATH),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qlog = open(os.path.join(LOGS, "libvirt-migrate-replay-%s-qemu.log" % who), "w")
    qemu = None
    try:
        wait_for(lambda: os.path.exists(dst.path(REPLAY + "/ctrl.sock")), 10, "the replay TPM's socket")
        argv = third_destination(qemu_command(dst.path("/var/log/libvirt/qemu/%s.log" % name)), capture)
        qlog.write(" ".join(shlex.quote(a) for a in argv) + "\n")
        qlog.flush()
        qemu = subprocess.Popen(dst.prefix() + argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
        try:
            code = qemu.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        qlog.flush()
        text = open(qlog.name, errors="replace").read()
        tlog = open(dst.path(vlog), errors="replace").read()
        if who != "vtpmd":
            status = qmp_status(dst.path(REPLAY + "/mon.sock")) if code is None else None
            loaded = status in ("paused", "running") and "tpm-emulator" not in text
            check(loaded, "baseline: the captured stream loads into a third destination with swtpm (a clone of the TPM; "
                  "QEMU there: %s)" % status, (code, status, text[-400:]))
            return
        check(code not in (None, 0) and "tpm-emulator" in text,
              "replay: the third destination's QEMU fails to load the captured stream at the TPM (exit %s)" % code,
              text[-600:])
        why = [l for l in tlog.splitlines() if re.search(r"WARN|ERROR", l)
               and re.search(r"belongs to migration|already used|authentication failed|refus", l)]
        check(why, "replay: vtpmd refused the blob and its log says why: %s" % (why[-1].split(": ", 1)[-1] if why else ""),
              tlog[-600:])
    finally:
        for p in (qemu, tpm):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        qlog.close()
        try:
            shutil.copy(dst.path(vlog), os.path.join(LOGS, "libvirt-migrate-replay-%s-tpm.log" % who))
        except OSError:
            pass
        shutil.rmtree(dst.path(REPLAY), ignore_errors=True)


# ---------------------------------------------------------------- main

def collect_logs(hosts):
    for h in hosts:
        for pattern in ("/var/log/libvirt/libvirtd.log", "/var/log/libvirt/qemu/*", "/var/log/swtpm/libvirt/qemu/*"):
            for f in glob.glob(h.path(pattern)):
                try:
                    shutil.copy(f, os.path.join(LOGS, "libvirt-migrate-%s-%s" % (h.name, os.path.basename(f))))
                except OSError:
                    pass


def main():
    if os.environ.get(MARK) == "helper":
        return helper_main(sys.argv[1:])
    os.makedirs(LOGS, exist_ok=True)
    if os.environ.get(MARK) != "inside":
        for f in glob.glob(os.path.join(LOGS, "libvirt-migrate-*")):
            os.remove(f)
    src = dst = None
    try:
        src, dst = make_hosts()
        lt.run_readme(lt.readme_block("install"), "install")
        dst.helper("readme", "install")
        for h in (src, dst):
            h.start_libvirtd("PATH=" + lt.SYSTEM_PATH)
        names = [h.sh(["hostname"]).stdout.strip() for h in (src, dst)]
        up = dst.sh(["virsh", "-c", "qemu+tcp://%s/system" % SRC_ADDR, "version"])
        check(names == ["vtpm-src", "vtpm-dst"] and up.returncode == 0,
              "two hosts (%s, %s): own namespaces, libvirtd each, reachable over TCP across the veth pair" % tuple(names),
              up.stderr)
        if os.environ.get("KT_MIGRATE_BASELINE", "1") == "1":
            baseline(src, dst)
        vtpmd_part(src, dst)
    except Exception as e:
        import traceback
        traceback.print_exc()
        check(False, "libvirt migrate test aborted", e)
    finally:
        hosts = [h for h in (src, dst) if h]
        for h in hosts:
            for line in h.virsh("list", "--name").stdout.split():
                h.virsh("destroy", line)
            h.stop_libvirtd()
        collect_logs(hosts)
        for h in hosts:
            h.kill_all()
        if dst:
            dst.anchor.kill()
            dst.anchor.wait()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
