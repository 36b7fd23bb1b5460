#!/usr/bin/env python3
"""The virtio-tpm guest over QEMU's generic vhost-user device and
`vtpmd vhost-user`, beyond the two boots run-tests.sh does: a guest reset
(QEMU system_reset), vtpmd restarted under a running guest, vtpmd killed
while a command is outstanding, whether QEMU migrates the device, and vtpmd
restarted while the guest is stopped.

Needs QEMU >= 10.2 (QEMU=..., kernel-tests/prepare-qemu11.sh makes one), the
kernel and an initramfs with the virtio_tpm module (run-tests.sh with
KT_DEVICES=vhost-user-tpm builds both).

The device is hot-added with device_add while the VM is still paused (-S),
after the chardev (reconnect-ms) has connected: QEMU's generic device does
not wait for a reconnecting chardev's first connection when it is created
from the command line ("Failed to set msg fds", vhost_backend_init fails).

Prints "PASS: ..." / "FAIL: ..." per check and "N passed, M failed" last.
"""
import os, re, shutil, signal, subprocess, sys, tempfile, time

from ktguest import LOGS, VTPMD, Guest, check, cleanup, procs, qemu_version, summary, wait_for

VIRTIO_ID = os.environ.get("KT_VIRTIO_ID", "45")
TIMEOUT_MS = 10000          # the guest driver's timeout in this test
WORK = tempfile.mkdtemp(prefix="vtpm-vu-")
NV = "0x1500017"


def known(ok, what, detail=""):
    """A check QEMU 11.1 is known to fail (not vtpmd's or the driver's
    doing): PASS if it holds, else a KNOWN line that does not fail the run."""
    if ok:
        return check(True, what)
    print("KNOWN: " + what + " -- does not hold with this QEMU" + ("" if not detail else ": " + str(detail)[:600]), flush=True)
    return False


class Vtpmd:
    """`vtpmd vhost-user` on one state directory; a restart keeps it."""

    def __init__(self, state, sock, n):
        self.sock = sock
        self.log = os.path.join(LOGS, "vu-backend-%d.log" % n)
        for f in (self.log, self.log + ".stderr"):
            if os.path.exists(f):
                os.remove(f)
        self.p = subprocess.Popen([VTPMD, "vhost-user", "--socket-path", sock, "--virtio-id", VIRTIO_ID,
                                   "--tpmstate", "dir=" + state, "--log", "file=%s,level=20" % self.log],
                                  stdout=subprocess.DEVNULL, stderr=open(self.log + ".stderr", "w"))
        procs.append(self.p)
        wait_for(lambda: os.path.exists(sock) or self.p.poll() is not None, 10, "vtpmd's socket")
        if self.p.poll() is not None:
            raise RuntimeError("vtpmd exited: " + open(self.log + ".stderr").read())

    def logtext(self):
        return open(self.log, errors="replace").read() if os.path.exists(self.log) else ""

    def term(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return "killed"


class VuGuest(Guest):
    """The test guest with the generic vhost-user device on the chardev at
    SOCK: hot-added later (hotplug, the chardev reconnects) or on the
    command line (no reconnect-ms). Starts paused; no -no-reboot (the test
    resets the guest)."""
    n = 0

    def __init__(self, sock, hotplug=True):
        VuGuest.n += 1
        args = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                "-machine", "q35,memory-backend=mem",
                "-device", "pcie-root-port,id=rp0,chassis=1",
                "-chardev", "socket,id=vtpm,path=%s%s" % (sock, ",reconnect-ms=500" if hotplug else "")]
        if not hotplug:  # as qemu-configs/vhost-user-tpm.args has it
            args += ["-device", "vhost-user-test-device-pci,chardev=vtpm,virtio-id=%s,num_vqs=1" % VIRTIO_ID]
        super().__init__("guest %d" % VuGuest.n, os.path.join(WORK, "g%d" % VuGuest.n),
                         os.path.join(LOGS, "vu-qemu-%d.log" % VuGuest.n), args, memory=512,
                         append=" vtpm.virtio_id=%s vtpm.timeout_ms=%d" % (VIRTIO_ID, TIMEOUT_MS),
                         paused=True, no_reboot=False)

    def add_device(self, add):
        """device_add, retried: vtpmd accepting the connection does not mean
        QEMU's main loop has seen it ("Failed to set msg fds"), and on a
        connection a removed device used, the vhost crate refuses a second
        SET_OWNER ("already claimed") and drops it, after which the chardev
        reconnects (reconnect-ms). Returns the errors of failed attempts."""
        errors = []
        for _ in range(10):
            out = self.hmp(add)
            if "rror" not in out:
                return errors
            errors.append(" | ".join(re.findall(r"(?:Error|Failed)[^\n]*", out)))
            time.sleep(1)
        raise RuntimeError("device_add failed 10 times: %s" % errors[-1])


PCR = "echo R:pcr=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{print $2}')"
COUNT = "echo R:count=$(tpm2_nvread %s -C o 2>/dev/null | od -An -tx1 | tr -d ' \\n')" % NV
WORKS = "tpm2_getrandom --hex 8 >/dev/null 2>/tmp/err && echo R:tpm=ok || echo R:tpm=$(tr '\\n' ' ' </tmp/err)"
ZERO = "0x" + "0" * 64


def main():
    os.makedirs(LOGS, exist_ok=True)
    print("vhost-user-test: " + qemu_version(), flush=True)
    state = os.path.join(WORK, "state")
    os.makedirs(state)
    sock = os.path.join(WORK, "vu.sock")
    g = None
    try:
        v = Vtpmd(state, sock, 1)
        g = VuGuest(sock)
        wait_for(lambda: "frontend connected" in v.logtext(), 20, "QEMU to connect to vtpmd")
        # The device is added once the chardev is up (see the docstring).
        add = "device_add vhost-user-test-device-pci,chardev=vtpm,virtio-id=%s,num_vqs=1,bus=rp0,id=vtpm0" % VIRTIO_ID
        errors = g.add_device(add)
        check(True, "QEMU: %s" % add)
        for e in errors:
            print("INFO: device_add retried after: %s" % e, flush=True)
        g.hmp("cont")
        g.read_until("VTPM-READY\n", 180)
        r = g.run("tpm2_pcrextend 16:sha256=$(printf reset-test | sha256sum | cut -d' ' -f1) && " + PCR + "; "
                  "tpm2_nvdefine %s -C o -s 8 -a 'nt=counter|ownerread|ownerwrite' >/dev/null && "
                  "tpm2_nvincrement %s -C o && %s; %s" % (NV, NV, COUNT, WORKS))
        check(r.get("tpm") == "ok" and r.get("pcr", ZERO) != ZERO and len(r.get("count", "")) == 16,
              "guest uses the TPM (PCR 16 extended, NV counter defined and incremented)", r)
        count1 = r.get("count")

        # 1. Guest reset: QEMU resets the device; vtpmd power-cycles the TPM.
        resets = v.logtext().count("device reset: power-cycling")
        g.hmp("system_reset")
        g.buf = ""
        g.read_until("VTPM-READY\n", 180)
        r = g.run("tpm2_nvincrement %s -C o && %s; %s; %s" % (NV, COUNT, PCR, WORKS))
        check(r.get("tpm") == "ok", "after system_reset the guest's TPM works", r)
        # QEMU's generic device sends no RESET_DEVICE on a device reset
        # (vhost-user-base has no get_vhost hook, so virtio_reset() does not
        # call vhost_reset_device()), so vtpmd cannot power-cycle the TPM.
        check(r.get("pcr") == ZERO, "after system_reset PCR 16 is reset (the TPM was power-cycled)", r)
        check(count1 and r.get("count") and int(r["count"], 16) == int(count1, 16) + 1,
              "after system_reset the NV counter kept its value (state kept)", (count1, r))
        known(v.logtext().count("device reset: power-cycling") > resets,
              "vtpmd got RESET_DEVICE for the guest reset", "vtpmd's log has no device reset")

        # 2. Migration of the generic vhost-user device.
        out = g.hmp('migrate -d "exec:cat >/dev/null"')
        time.sleep(1)
        info = g.hmp("info migrate")
        status = re.search(r"(?:Migration s|S)tatus:\s*(\S+)", info)
        blocked = "rror" in out or (status and status.group(1) == "failed")
        check(blocked, "QEMU refuses to migrate the generic vhost-user device", info)
        said = re.findall(r"Error: .*", out) or [info.strip().replace("\n", " | ")]
        print("INFO: QEMU's answer to migrate: %s" % said[-1], flush=True)
        if not blocked:
            g.hmp("migrate_cancel")
        r = g.run(WORKS)
        check(r.get("tpm") == "ok", "the TPM still works after the refused migration", r)

        # 3. vtpmd killed while a command is outstanding: SIGSTOP first so
        # the command is certainly in flight, then SIGKILL.
        v.p.send_signal(signal.SIGSTOP)
        t0 = time.time()
        g.send("tpm2_getrandom --hex 8 >/dev/null 2>/tmp/err; echo R:rc=$?; echo R:err=$(tr '\\n' ' ' </tmp/err)")
        time.sleep(2)
        v.p.send_signal(signal.SIGKILL)
        v.p.wait()
        out = g.read_until("VTPM-CMD-DONE\n", TIMEOUT_MS / 1000 + 60)
        took = time.time() - t0
        r = dict(re.findall(r"^R:([\w-]+)=(.*)$", out, re.M))
        check(r.get("rc") not in (None, "0") and TIMEOUT_MS / 1000 - 1 <= took < TIMEOUT_MS / 1000 + 30,
              "vtpmd killed mid-command: the guest command fails after %.0f s (driver timeout %d ms), no hang"
              % (took, TIMEOUT_MS), r)
        t0 = time.time()
        r = g.run("dmesg | grep -c 'no response from the device' | sed 's/^/R:timeouts=/'; "
                  "dmesg | grep 'virtio_tpm' | tail -n 3 | sed 's/^/R:dmesg=/'; " + WORKS, timeout=TIMEOUT_MS / 1000 + 60)
        check(r.get("timeouts", "0") != "0", "the driver logged the timeout", r)
        check(r.get("tpm") != "ok" and time.time() - t0 < 10,
              "with vtpmd gone the next command fails at once (the device still holds the abandoned request)", r)

        # 4. vtpmd back: does QEMU reconnect this device?
        v = Vtpmd(state, sock, 2)
        try:
            wait_for(lambda: "frontend connected" in v.logtext() or g.p.poll() is not None, 15, "QEMU to reconnect")
        except RuntimeError:
            pass
        time.sleep(2)
        alive = g.p.poll() is None
        if alive:
            r = g.run("%s; %s" % (WORKS, COUNT), timeout=TIMEOUT_MS / 1000 + 60)
            if r.get("tpm") != "ok":
                r = g.run("tpm2_startup -c; %s; %s" % (WORKS, COUNT), timeout=TIMEOUT_MS / 1000 + 60)
            check(r.get("tpm") == "ok", "after vtpmd restarts and QEMU reconnects the TPM works again", r)
        tail = open(g.log, errors="replace").read().strip().split("\n")[-4:]
        known(alive, "QEMU reconnects the generic vhost-user device to a restarted vtpmd",
              "QEMU exited with status %s: %s" % (g.p.returncode, " | ".join(tail)))
        if alive:
            g.send("poweroff")
            wait_for(lambda: g.p.poll() is not None, 30, "QEMU to exit after poweroff")
        check(v.term() == 0, "vtpmd stopped cleanly on SIGTERM")

        # 5. A new guest on the same state: it works, then vtpmd is restarted
        # while the guest is stopped.
        v = Vtpmd(state, sock, 3)
        g = VuGuest(sock)
        wait_for(lambda: "frontend connected" in v.logtext(), 20, "QEMU to connect to vtpmd")
        g.add_device(add)
        g.hmp("cont")
        g.read_until("VTPM-READY\n", 180)
        r = g.run("%s; %s" % (WORKS, COUNT))
        check(r.get("tpm") == "ok" and r.get("count") and int(r["count"], 16) == int(count1, 16) + 1,
              "a new guest on the same state directory: TPM works, NV counter kept", r)
        # The device removed under the guest (device_del, which the guest
        # completes through ACPI hotplug) and added again.
        g.hmp("device_del vtpm0")
        r = g.run("i=0; while [ -e /dev/tpm0 ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; "
                  "[ -e /dev/tpm0 ] && echo R:gone=no || echo R:gone=yes; " + WORKS, timeout=90)
        check(r.get("gone") == "yes" and r.get("tpm") != "ok",
              "device_del: the driver lets go, /dev/tpm0 disappears, TPM commands fail", r)
        time.sleep(2)
        # On the connection the removed device used, QEMU's new device sends
        # SET_OWNER again, which the vhost crate refuses ("already claimed")
        # and drops the connection; the chardev reconnects (reconnect-ms) and
        # the next device_add gets a fresh connection.
        for e in g.add_device(add):
            print("INFO: device_add again, retried after: %s" % e, flush=True)
        r = g.run("i=0; while [ ! -e /dev/tpmrm0 ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; "
                  "echo R:devs=$(ls /dev | grep tpm | tr '\\n' ' '); %s; %s" % (WORKS, COUNT), timeout=90)
        check(r.get("tpm") == "ok" and r.get("count") and int(r["count"], 16) == int(count1, 16) + 1,
              "device_add again: the driver binds again, the TPM works with its NV state", r)

        g.hmp("stop")
        check(v.term() == 0, "vtpmd stopped cleanly on SIGTERM while the guest was stopped")
        v = Vtpmd(state, sock, 4)
        time.sleep(3)
        alive = g.p.poll() is None
        if alive:
            g.hmp("cont")
            r = g.run("%s; %s" % (WORKS, COUNT), timeout=TIMEOUT_MS / 1000 + 60)
            if r.get("tpm") != "ok":
                r = g.run("tpm2_startup -c; %s; %s" % (WORKS, COUNT), timeout=TIMEOUT_MS / 1000 + 60)
            check(r.get("tpm") == "ok", "after a restart while the guest was stopped, the TPM works", r)
        tail = open(g.log, errors="replace").read().strip().split("\n")[-4:]
        known(alive, "QEMU survives vtpmd restarting while the guest is stopped",
              "QEMU exited with status %s: %s" % (g.p.returncode, " | ".join(tail)))
        if alive:
            g.send("poweroff")
            wait_for(lambda: g.p.poll() is not None, 30, "QEMU to exit after poweroff")
            check(g.p.returncode == 0, "guest powered off, QEMU exited 0", g.p.returncode)
        check(v.term() == 0, "vtpmd stopped cleanly on SIGTERM")

        # 6. The device on QEMU's command line, no reconnect-ms (the tested
        # configuration): vtpmd killed under a running guest.
        v = Vtpmd(state, sock, 5)
        g = VuGuest(sock, hotplug=False)
        g.hmp("cont")
        g.read_until("VTPM-READY\n", 180)
        r = g.run("%s; %s" % (WORKS, COUNT))
        check(r.get("tpm") == "ok" and r.get("count") and int(r["count"], 16) == int(count1, 16) + 1,
              "device from the command line: TPM works, NV counter kept", r)
        v.p.send_signal(signal.SIGSTOP)
        t0 = time.time()
        g.send("tpm2_getrandom --hex 8 >/dev/null 2>/tmp/err; echo R:rc=$?")
        time.sleep(2)
        v.p.send_signal(signal.SIGKILL)
        v.p.wait()
        r = dict(re.findall(r"^R:([\w-]+)=(.*)$", g.read_until("VTPM-CMD-DONE\n", TIMEOUT_MS / 1000 + 60), re.M))
        took = time.time() - t0
        check(r.get("rc") not in (None, "0") and TIMEOUT_MS / 1000 - 1 <= took < TIMEOUT_MS / 1000 + 30 and g.p.poll() is None,
              "device from the command line, vtpmd killed mid-command: the command fails after %.0f s, QEMU keeps running"
              % took, r)
        v = Vtpmd(state, sock, 6)
        time.sleep(3)
        check(g.p.poll() is None and "frontend connected" not in v.logtext(),
              "without reconnect-ms QEMU neither reconnects nor aborts when vtpmd is back")
        r = g.run(WORKS, timeout=TIMEOUT_MS / 1000 + 60)
        check(r.get("tpm") != "ok", "the guest's TPM commands keep failing (no hang)", r)
        g.send("poweroff")
        wait_for(lambda: g.p.poll() is not None, 30, "QEMU to exit after poweroff")
        check(g.p.returncode == 0, "guest powered off, QEMU exited 0", g.p.returncode)
        check(v.term() == 0, "vtpmd stopped cleanly on SIGTERM at the end")
    except Exception as e:  # a crashed step is a failure, not a pass
        import traceback
        traceback.print_exc()
        check(False, "vhost-user test aborted", e)
        if g:
            print("--- serial console tail:\n" + g.buf[-1500:])
    finally:
        if g:
            g.stop()
        cleanup()
        shutil.rmtree(WORK, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
