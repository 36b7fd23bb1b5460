"""Shared by the Python kernel tests (migration-test.py, vhost-user-test.py,
libvirt-test.py; ktguest.py builds the QEMU guest on it): the result lines ("PASS: ..." / "FAIL: ..." per check,
"KNOWN: ..." for a failure the VMM is known for, "N passed, M failed" last)
and the guest's interactive shell on its serial console.
"""
import re
import socket
import time

results = [0, 0]


def check(ok, what, detail=""):
    results[0 if ok else 1] += 1
    print(("PASS: " if ok else "FAIL: ") + what + ("" if ok or not detail else " -- " + str(detail)[:600]), flush=True)
    return ok


def known(ok, what, detail=""):
    """A check the VMM under test is known to fail (not vtpmd's or the
    driver's doing): PASS if it holds, else a KNOWN line that does not fail
    the run."""
    if ok:
        return check(True, what)
    print("KNOWN: " + what + " -- does not hold with this QEMU" + ("" if not detail else ": " + str(detail)[:600]), flush=True)
    return False


def wait_for(pred, timeout, what):
    """PRED's first true value within TIMEOUT seconds, else RuntimeError."""
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


def summary():
    """Prints the last line; the exit status (1 if anything failed)."""
    print("%d passed, %d failed" % tuple(results))
    return 0 if results[1] == 0 else 1


class GuestShell:
    """The guest in its interactive mode (guest-init's `migrate`/`shell`):
    it prints VTPM-READY, then runs each line typed on the serial console
    and prints VTPM-CMD-DONE. A subclass connects `self.ser` (the console's
    unix socket) and sets `self.buf = ""` and `self.name`."""

    name = "guest"

    def read_until(self, marker, timeout):
        """The console output up to MARKER (consumed), within TIMEOUT s."""
        self.ser.settimeout(1)
        end = time.time() + timeout
        while marker not in self.buf:
            if time.time() > end:
                raise RuntimeError("%s: no '%s' on the serial console; got: %s" % (self.name, marker.strip(), self.buf[-800:]))
            try:
                chunk = self.ser.recv(65536)
                if not chunk:
                    raise RuntimeError(self.name + ": serial console closed")
                self.buf += chunk.decode(errors="replace").replace("\r", "")
            except socket.timeout:
                pass
        i = self.buf.index(marker)
        out, self.buf = self.buf[:i], self.buf[i + len(marker):]
        return out

    def send(self, line):
        self.ser.sendall((line + "\n").encode())

    def run(self, script, timeout=120):
        """Runs a shell line in the guest; returns its R:key=value results."""
        self.send(script)
        out = self.read_until("VTPM-CMD-DONE\n", timeout)
        return dict(re.findall(r"^R:([\w-]+)=(.*)$", out, re.M))
