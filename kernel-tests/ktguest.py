"""Shared by the Python kernel tests (migration-test.py, vhost-user-test.py):
PASS/FAIL counting, bounded waits, and the interactive test guest: QEMU with
the kernel and initramfs in `vtpm.mode=migrate`, its serial console and HMP
monitor on unix sockets.

Environment: QEMU (binary), QEMU_L (its data directories, space separated,
each passed as -L; QEMU_MODULE_DIR reaches QEMU as it is), KT_BUILD,
KT_LOGS, TPM_BACKEND_BIN (vtpmd).
"""
import os, re, signal, socket, subprocess, time

from ktlib import GuestShell, check, known, results, summary, wait_for  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("KT_BUILD", os.path.join(ROOT, "build", "kernel-tests"))
LOGS = os.environ.get("KT_LOGS", os.path.join(BUILD, "logs"))
VTPMD = os.environ.get("TPM_BACKEND_BIN", os.path.join(ROOT, "target", "release", "vtpmd"))
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
QEMU_L = os.environ.get("QEMU_L", "").split()

procs = []         # every process started, killed by cleanup()


def tpm_args(device, sock):
    """QEMU's arguments for DEVICE from qemu-configs/DEVICE.args."""
    with open(os.path.join(ROOT, "qemu-configs", device + ".args")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.strip().startswith("#")]
    return [l.replace("@SOCK@", sock) for l in lines]


def qemu_binary():
    """The QEMU binary and its -L arguments."""
    cmd = [QEMU]
    for d in QEMU_L:
        cmd += ["-L", d]
    return cmd


def qemu_version():
    """The first line of `QEMU --version` and the -L directories, for the log."""
    p = subprocess.run([QEMU, "--version"], capture_output=True, text=True)
    return (p.stdout + p.stderr).strip().split("\n")[0] + (" (-L %s)" % " ".join(QEMU_L) if QEMU_L else "")


class Guest(GuestShell):
    """QEMU running the test guest in the interactive mode ('migrate').

    args: the devices and options of this guest (TPM, -incoming, ...);
    append: more kernel parameters; paused: -S; no_reboot: -no-reboot (a
    guest that must survive system_reset has it off); may_exit: QEMU may
    quit before its sockets exist (a refused incoming migration), else that
    raises."""

    def __init__(self, name, workdir, log, args, memory=256, append="", paused=False, no_reboot=True,
                 may_exit=False):
        self.name = name
        os.makedirs(workdir, exist_ok=True)
        self.serial_path = os.path.join(workdir, "serial.sock")
        self.mon_path = os.path.join(workdir, "mon.sock")
        self.log = log
        cmd = qemu_binary() + ["-accel", "tcg", "-m", str(memory), "-smp", "1", "-display", "none", "-nic", "none",
                               "-kernel", os.path.join(BUILD, "vmlinuz"),
                               "-initrd", os.path.join(BUILD, "initramfs.cpio.gz"),
                               "-append", "console=ttyS0 panic=-1 quiet loglevel=3 vtpm.mode=migrate" + append,
                               "-serial", "unix:%s,server=on,wait=off" % self.serial_path,
                               "-monitor", "unix:%s,server=on,wait=off" % self.mon_path]
        cmd += (["-S"] if paused else []) + (["-no-reboot"] if no_reboot else []) + list(args)
        self.p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        procs.append(self.p)
        wait_for(lambda: (os.path.exists(self.serial_path) and os.path.exists(self.mon_path)) or self.p.poll() is not None,
                 30, name + ": QEMU's sockets")
        self.buf = ""
        self.ser = self.mon = None
        if self.p.poll() is not None:
            if may_exit:
                return
            raise RuntimeError("%s: QEMU exited: %s" % (name, open(log).read()))
        self.ser = socket.socket(socket.AF_UNIX)
        self.ser.connect(self.serial_path)
        self.mon = socket.socket(socket.AF_UNIX)
        self.mon.connect(self.mon_path)
        self.mon.settimeout(30)
        self._mon_read()

    def _mon_read(self):
        out = b""
        while not out.endswith(b"(qemu) "):
            chunk = self.mon.recv(65536)
            if not chunk:
                break
            out += chunk
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))

    def hmp(self, line):
        """An HMP command; its output without the echo and the prompt."""
        self.mon.sendall((line + "\n").encode())
        out = self._mon_read()
        return "\n".join(l for l in out.replace("\r", "").split("\n") if l.strip() and not l.startswith("(qemu)")
                         and l.strip() != line)

    def migration_status(self):
        m = re.search(r"(?:Migration s|S)tatus:\s*(\S+)", self.hmp("info migrate"))
        return m.group(1) if m else "?"

    def migrate(self, uri, timeout=120):
        """migrate -d URI; the final status (completed, failed, ...)."""
        self.hmp('migrate -d "%s"' % uri)
        end = time.time() + timeout
        while time.time() < end:
            status = self.migration_status()
            if status in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.2)
        return "timeout"

    def stop(self, quit_cmd=True):
        """quit on the monitor (unless quit_cmd is False), killed after 10 s."""
        if self.p.poll() is None and quit_cmd and self.mon:
            try:
                self.mon.sendall(b"quit\n")
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def cleanup():
    """Kills what is still running (stopped processes are continued first)."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
            except OSError:
                pass
            p.kill()
            p.wait()
