#!/usr/bin/env python3
"""Sealed live migration of a running Linux guest between two QEMU processes,
each with its own vtpmd, state directory and host key (vtpmctl prepares it),
a plain one (no host keys, --allow-plaintext-migration), a save to a file
and restores with default options (sealed to this host, rollback recorded,
refused under the policy refuse until allowed),
plus a save-to-file secrecy check against swtpm, the attack matrix through
QEMU's own migration stream, and a destination killed mid-migration.

The sealed migration runs with a tpm-crb device, the plain one with
tpm-tis, so both devices migrate. QEMU and QEMU_L pick the QEMU (see
ktguest.py).

Prints "PASS: ..." / "FAIL: ..." per check and "N passed, M failed" last.
"""
import json, os, shutil, subprocess, sys, tempfile, time

from ktguest import LOGS, ROOT, VTPMD, Guest, check, cleanup, procs, qemu_version, summary, tpm_args, wait_for

VTPMCTL = os.environ.get("VTPMCTL_BIN", os.path.join(ROOT, "target", "release", "vtpmctl"))
# KT_MIGRATION_LIVE_ONLY=1: only the sealed and the plain live migration
# (run-qemu10-tests.sh, run-qemu11-tests.sh; the rest does not depend on the
# QEMU version).
LIVE_ONLY = os.environ.get("KT_MIGRATION_LIVE_ONLY", "") == "1"
WORK = tempfile.mkdtemp(prefix="vtpm-mig-")
NV = "0x1500016"
PERSIST = "0x81000101"


def ctl(*args):
    p = subprocess.run([VTPMCTL, *args], capture_output=True, text=True)
    try:
        return p.returncode == 0, json.loads(p.stdout)
    except ValueError:
        return False, {"error": p.stdout + p.stderr}


class Backend:
    def __init__(self, name, binary=VTPMD, key=None, incoming=False, extra=()):
        self.dir = os.path.join(WORK, name)
        self.state = os.path.join(self.dir, "state")
        os.makedirs(self.state, exist_ok=True)
        self.ctrl = os.path.join(self.dir, "ctrl.sock")
        self.admin = os.path.join(self.dir, "admin.sock")
        self.log = os.path.join(LOGS, "mig-backend-%s.log" % name)
        cmd = [binary, "socket", "--tpm2", "--tpmstate", "dir=" + self.state, "--ctrl", "type=unixio,path=" + self.ctrl,
               "--log", "file=%s,level=20" % self.log, *extra]
        if key:
            cmd += ["--host-key", os.path.join(key, "host-key.pem"), "--admin", "path=" + self.admin]
        if incoming:
            cmd += ["--migration", "incoming"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log + ".stderr", "w"))
        procs.append(self.p)
        wait_for(lambda: os.path.exists(self.ctrl) or self.p.poll() is not None, 10, name + " control socket")
        if self.p.poll() is not None:
            raise RuntimeError("%s exited: %s" % (name, open(self.log + ".stderr").read()))

    def status(self):
        return ctl("status", "--admin", self.admin)[1].get("state")


def guest(name, backend, incoming=None, device="tpm-crb"):
    """The test guest on BACKEND's control socket (QEMU may quit early: a
    refused incoming stream)."""
    args = tpm_args(device, backend.ctrl) + (["-incoming", incoming] if incoming else [])
    return Guest(name, os.path.join(WORK, "q-" + name), os.path.join(LOGS, "mig-qemu-%s.log" % name), args,
                 may_exit=True)


SETUP = ("tpm2_pcrextend 16:sha256=$(printf 'before migration' | sha256sum | cut -d' ' -f1) >/dev/null && "
         "echo R:pcr=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{print $2}'); "
         "tpm2_getrandom -o /tmp/secret 64 && tpm2_nvdefine %s -C o -s 64 -a 'ownerread|ownerwrite' >/dev/null && "
         "tpm2_nvwrite %s -C o -i /tmp/secret && echo R:secret=$(od -An -tx1 -v /tmp/secret | tr -d ' \\n'); "
         "tpm2_createprimary -C o -G ecc256 -c /tmp/p.ctx >/dev/null && tpm2_create -C /tmp/p.ctx -G ecc256 "
         "-a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv >/dev/null && "
         "tpm2_load -C /tmp/p.ctx -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx >/dev/null && "
         "tpm2_evictcontrol -C o -c /tmp/k.ctx %s >/dev/null && tpm2_readpublic -c %s -o /tmp/before.pub >/dev/null && "
         "echo R:pub=$(sha256sum < /tmp/before.pub | cut -d' ' -f1)" % (NV, NV, PERSIST, PERSIST))

# Best effort to leave no raw copy of the secret in guest RAM (which QEMU
# migrates in clear whatever the vTPM does): overwrite the file in place,
# push a large command through the TPM's command buffer, and fill free
# memory with zeros so freed pages that held it are reused.
SCRUB = ("dd if=/dev/zero of=/tmp/secret bs=64 count=1 conv=notrunc 2>/dev/null; rm -f /tmp/secret; "
         "head -c 1000 /dev/zero > /tmp/z && tpm2_hash -g sha256 /tmp/z >/dev/null; "
         "avail=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo); "
         "dd if=/dev/zero of=/tmp/fill bs=1M count=$((avail - 24)) 2>/dev/null; rm -f /tmp/fill; "
         "echo R:scrubbed=$avail")

AFTER = ("echo R:pcr=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{print $2}'); "
         "tpm2_nvread %s -C o -s 64 -o /tmp/nv-after && echo R:secret=$(od -An -tx1 -v /tmp/nv-after | tr -d ' \\n'); "
         "printf 'signed after migration' > /tmp/m && tpm2_sign -c %s -g sha256 -o /tmp/s /tmp/m && "
         "tpm2_loadexternal -C n -u /tmp/before.pub -c /tmp/ext.ctx >/dev/null && "
         "tpm2_verifysignature -c /tmp/ext.ctx -g sha256 -m /tmp/m -s /tmp/s && echo R:verified=yes" % (NV, PERSIST))


def keygen(name):
    d = os.path.join(WORK, "keys-" + name)
    ok, v = ctl("keygen", "--out", d)
    if not ok:
        raise RuntimeError("keygen: %s" % v)
    return d


def prepare(src, dst):
    """Destination issues an id, source prepares; returns the wrapped key."""
    ok, info = ctl("incoming-info", "--admin", dst.admin)
    assert ok, info
    pem = os.path.join(dst.dir, "peer.pem")
    open(pem, "w").write(info["public_key"])
    ok, v = ctl("outgoing", "--admin", src.admin, "--peer-key", pem, "--migration-id", info["migration_id"])
    assert ok, v
    return v.get("wrapped_key", "")


def boot_source(name, backend, device="tpm-crb"):
    g = guest(name, backend, device=device)
    g.read_until("VTPM-READY\n", 120)
    return g


def live_migration(ka, kb):
    print("== live migration between two QEMU + vtpmd pairs (tpm-crb)", flush=True)
    src = Backend("live-src", key=ka)
    gs = boot_source("live-src", src)
    before = gs.run(SETUP)
    check(len(before.get("secret", "")) == 128 and len(before.get("pcr", "")) == 66 and len(before.get("pub", "")) == 64,
          "guest set up PCR, NV secret, persistent key", before)
    dst = Backend("live-dst", key=kb, incoming=True)
    mig = os.path.join(WORK, "live.sock")
    gd = guest("live-dst", dst, incoming="unix:" + mig)
    wrapped = prepare(src, dst)
    # The destination unwraps the migration keys before the VM stops.
    ok, v = ctl("incoming-key", "--admin", dst.admin, "--wrapped-key", wrapped)
    check(ok, "destination unwrapped the keys ahead of time (vtpmctl incoming-key)", v)
    status = gs.migrate("unix:" + mig)
    check(status == "completed", "live migration completed", status)
    # QEMU's source reports "completed" when it has sent the stream; the
    # destination may still be loading it.
    def unwrapped_early():
        return "unwrapped ahead of time" in open(dst.log).read()
    try:
        wait_for(unwrapped_early, 30, "the destination to load the TPM state")
    except RuntimeError:
        pass
    check(unwrapped_early(), "destination used the keys unwrapped ahead of time")
    after = gd.run(AFTER)
    check(after.get("pcr") == before.get("pcr"), "destination guest reads the PCR it extended before", (before.get("pcr"), after.get("pcr")))
    check(after.get("secret") == before.get("secret"), "destination guest reads the same NV contents")
    check(after.get("verified") == "yes", "persistent key signs after migration; verifies with the public key saved before")
    check(dst.status() == "running", "destination unlocked", dst.status())
    receipt = os.path.join(WORK, "receipt.json")
    ok, r = ctl("receipt", "--admin", dst.admin, "--out", receipt)
    check(ok, "destination issued a signed receipt", r)
    ok, t = ctl("complete", "--admin", src.admin, "--receipt", receipt)
    check(ok, "source verified the receipt and completed", t)
    left = sorted(os.listdir(src.state))
    check([f for f in left if f != ".lock"] == ["tpm2-00.permall", "vtpmd-tombstone.json"], "source state directory holds only the tombstone (and the stub swtpm refuses)", left)
    check(src.status() == "migrated-out", "source is migrated-out", src.status())
    gs.stop()
    gd.run("echo R:alive=yes")
    gd.stop()


def plain_migration():
    """vtpmd without host keys and with --allow-plaintext-migration: QEMU's
    ordinary GET/SET_STATEBLOB migration, as with swtpm."""
    print("== plain live migration (--allow-plaintext-migration, no host keys, tpm-tis)", flush=True)
    plain = ["--allow-plaintext-migration"]
    src = Backend("plain-src", extra=plain)
    gs = boot_source("plain-src", src, device="tpm-tis")
    before = gs.run(SETUP)
    check(len(before.get("secret", "")) == 128 and len(before.get("pub", "")) == 64, "plain: guest set up PCR, NV secret, key", before)
    dst = Backend("plain-dst", extra=plain)
    mig = os.path.join(WORK, "plain.sock")
    gd = guest("plain-dst", dst, incoming="unix:" + mig, device="tpm-tis")
    status = gs.migrate("unix:" + mig)
    check(status == "completed", "plain live migration completed", status)
    after = gd.run(AFTER)
    check(after.get("pcr") == before.get("pcr") and after.get("secret") == before.get("secret")
          and after.get("verified") == "yes",
          "plain: destination guest has the same PCR and NV contents and its key still signs", (before, after))
    gs.stop()
    gd.stop()


def read_file(p):
    with open(p, "rb") as f:
        return f.read()


def rollbacks(state):
    try:
        return [json.loads(l) for l in open(os.path.join(state, "vtpmd-rollbacks.log")) if l.strip()]
    except OSError:
        return []


def restore_into(name, path):
    """A fresh vtpmd with default options on the "save" directory and QEMU
    loading PATH (as `virsh restore` / managedsave + start do). Returns
    (backend, guest, loaded)."""
    b = Backend("save", extra=["--admin", "path=" + os.path.join(WORK, "save", "admin.sock")])
    g = guest(name, b, incoming="exec:cat " + path)
    try:
        g.p.wait(20)
        loaded = False
    except subprocess.TimeoutExpired:
        loaded = g.migration_status() != "failed"
    return b, g, loaded


def quit_both(b, g):
    g.stop(quit_cmd=g.p.poll() is None)
    b.p.terminate()
    b.p.wait(10)


def save_and_restore():
    """Default options (the host key in $VTPM_HOST_KEY_DIR): QEMU's migration
    to a file, as `virsh save` does, holds the TPM sealed to this host; a new
    QEMU and vtpmd restore it; a second restore of the same file after the
    guest ran is a rollback (recorded); under the policy refuse it is refused
    until vtpmctl allow-rollback."""
    print("== save to a file and restore with default options (sealed to this host)", flush=True)
    b = Backend("save", extra=["--admin", "path=" + os.path.join(WORK, "save", "admin.sock")])
    state = b.state
    g = boot_source("save", b)
    before = g.run(SETUP)
    g.run(SCRUB)
    secret = bytes.fromhex(before.get("secret", ""))
    path = os.path.join(WORK, "saved-default.mig")
    status = g.migrate("exec:cat > " + path)
    data = read_file(path)
    check(status == "completed" and b"VTPMSAV1" in data and len(secret) == 64 and secret not in data,
          "default vtpmd: the saved stream holds the TPM sealed (VTPMSAV1), not the guest's 64-byte NV secret",
          (status, len(data)))
    quit_both(b, g)
    b, g, loaded = restore_into("save-restore", path)
    after = g.run(AFTER) if loaded else {}
    check(loaded and after.get("pcr") == before.get("pcr") and after.get("secret") == before.get("secret")
          and after.get("verified") == "yes",
          "restored by a new QEMU + vtpmd: same PCR, NV and persistent key", after)
    check(rollbacks(state) == [], "save then restore with nothing in between is not a rollback", rollbacks(state))
    quit_both(b, g)
    # The guest ran after the restore: the same file again rolls it back.
    b, g, loaded = restore_into("save-again", path)
    rec = rollbacks(state)
    check(loaded and len(rec) == 1 and rec[0]["decision"] == "allowed",
          "restoring the same save after the guest ran: allowed by default, recorded in vtpmd-rollbacks.log", rec)
    check("ROLLBACK" in open(b.log).read(), "the rollback is in vtpmd's log")
    g.run("tpm2_getrandom --hex 8 >/dev/null && echo R:ok=1")
    quit_both(b, g)
    ok, v = ctl("rollback-policy", "refuse", "--state-dir", state)
    check(ok and v.get("rollback") == "refuse", "vtpmctl rollback-policy refuse --state-dir (offline)", v)
    b, g, loaded = restore_into("save-refused", path)
    qlog = open(g.log).read() if os.path.exists(g.log) else ""
    check(not loaded and "ROLLBACK REFUSED" in open(b.log).read(),
          "under the policy refuse the restore fails and vtpmd's log says why", qlog[-300:])
    generation = rollbacks(state)[-1]["restored_generation"] if rollbacks(state) else 0
    err = open(b.log + ".stderr").read()
    check("vtpmctl allow-rollback --generation %d" % generation in err,
          "vtpmd's stderr names the fix (vtpmctl allow-rollback --generation N)", err[-300:])
    quit_both(b, g)
    ok, v = ctl("allow-rollback", "--generation", str(generation), "--state-dir", state)
    check(ok and v.get("allowed_generation") == generation, "vtpmctl allow-rollback --generation N --state-dir (offline)", v)
    b, g, loaded = restore_into("save-allowed", path)
    r = g.run(AFTER) if loaded else {}
    check(loaded and r.get("secret") == before.get("secret"),
          "after vtpmctl allow-rollback the restore works, once", (rollbacks(state)[-1:], r.get("secret", "")[:16]))
    quit_both(b, g)


def secrecy_vs_swtpm(ka, kb):
    print("== migration saved to a file: vtpmd vs swtpm", flush=True)
    out = {}
    for kind in ("vtpmd", "swtpm"):
        if kind == "vtpmd":
            src = Backend("file-src-vtpmd", key=ka)
        else:
            src = Backend("file-src-swtpm", binary="swtpm")
        g = boot_source("file-" + kind, src)
        setup = g.run(SETUP)
        g.run(SCRUB)
        secret = bytes.fromhex(setup.get("secret", ""))
        if kind == "vtpmd":
            dst = Backend("file-dst", key=kb, incoming=True)
            prepare(src, dst)
        path = os.path.join(WORK, "saved-%s.mig" % kind)
        status = g.migrate("exec:cat > " + path)
        data = read_file(path)
        found = len(secret) == 64 and secret in data
        at = data.find(secret) if found else -1
        out[kind] = found
        print("   %s: migration %s, %d bytes; the guest's 64-byte NV secret %s in the file%s"
              % (kind, status, len(data), "IS" if found else "is NOT", " (at offset %d)" % at if found else ""), flush=True)
        g.hmp("cont")
        alive = g.run("tpm2_getrandom --hex 8 >/dev/null && echo R:tpm=ok")
        check(alive.get("tpm") == "ok", "%s source resumes after save-to-file (cont)" % kind)
        g.stop()
    check(out.get("vtpmd") is False, "vtpmd: the NV secret is not in the saved migration stream")
    check(out.get("swtpm") is True, "swtpm (reference): the NV secret is in the saved stream in clear (the difference vtpmd makes)")
    return os.path.join(WORK, "saved-swtpm.mig")


MAGIC = b"VTPMMIG1"


def blobs_in(data):
    """(offset of the u32 flags, size, offset of data) for the three TPM blobs."""
    found = []
    i = data.find(MAGIC)
    while i >= 0:
        size = int.from_bytes(data[i - 4:i], "big")
        found.append((i - 8, size, i))
        i = data.find(MAGIC, i + size)
    return found


def flip(n):
    def f(data, other):
        b = blobs_in(data)[n]
        pos = b[2] + b[1] // 2
        return data[:pos] + bytes([data[pos] ^ 1]) + data[pos + 1:]
    return f


def drop_volatile(data, other):
    flags_at, size, at = blobs_in(data)[1]
    return data[:flags_at + 4] + (0).to_bytes(4, "big") + data[at + size:]


def splice_volatile(data, other):
    flags_at, size, at = blobs_in(data)[1]
    oflags, osize, oat = blobs_in(other)[1]
    return data[:flags_at] + other[oflags:oat + osize] + data[at + size:]


def attack_matrix(ka, kb, swtpm_file):
    print("== attack matrix through QEMU's migration stream", flush=True)
    kc = keygen("c")
    src = Backend("atk-src", key=ka)
    g = boot_source("atk-src", src)
    base = g.run(SETUP)

    def export(dst, peer_pem=None, peer_id=None):
        if peer_pem:
            ok, v = ctl("outgoing", "--admin", src.admin, "--peer-key", peer_pem, "--migration-id", peer_id)
            assert ok, v
        else:
            prepare(src, dst)
        path = os.path.join(WORK, "atk-%d.mig" % time.time_ns())
        status = g.migrate("exec:cat > " + path)
        assert status == "completed", status
        g.hmp("cont")
        return read_file(path)

    def source_intact(what):
        r = g.run("echo R:pcr=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{print $2}'); "
                  "tpm2_nvread %s -C o -s 64 -o /tmp/x && echo R:secret=$(od -An -tx1 -v /tmp/x | tr -d ' \\n')" % NV)
        return len(r.get("pcr", "")) == 66 and r.get("pcr") == base.get("pcr") and r.get("secret") == base.get("secret")

    def load(name, dst, data):
        path = os.path.join(WORK, name + ".mig")
        open(path, "wb").write(data)
        gd = guest("atk-" + name, dst, incoming="exec:cat " + path)
        try:
            gd.p.wait(120)
            failed = gd.p.returncode != 0
        except subprocess.TimeoutExpired:
            failed = False
        gd.stop(quit_cmd=False)
        return failed

    # A stream of an earlier migration of the same VM, for splicing.
    other = export(Backend("atk-other", key=kb, incoming=True))
    cases = [("byte flipped in the permanent blob", flip(0)), ("byte flipped in the volatile blob", flip(1)),
             ("byte flipped in the final blob", flip(2)), ("volatile blob dropped", drop_volatile),
             ("volatile blob spliced from another migration of this VM", splice_volatile)]
    for i, (what, tamper) in enumerate(cases):
        dst = Backend("atk-dst-%d" % i, key=kb, incoming=True)
        data = export(dst)
        failed = load("case-%d" % i, dst, tamper(data, other))
        check(failed and dst.status() == "destination-locked" and source_intact(what),
              "%s: destination QEMU fails, vtpmd stays locked, source resumes intact" % what, dst.status())

    # The same stream into a second destination; then twice into one.
    dst = Backend("atk-genuine", key=kb, incoming=True)
    data = export(dst)
    second = Backend("atk-second", key=kb, incoming=True)
    ctl("incoming-info", "--admin", second.admin)
    failed = load("second-destination", second, data)
    check(failed and second.status() == "destination-locked", "same stream into a second destination is refused", second.status())
    path = os.path.join(WORK, "genuine.mig")
    open(path, "wb").write(data)
    gd = guest("atk-genuine", dst, incoming="exec:cat " + path)
    ok = wait_for(lambda: dst.status() == "running" or gd.p.poll() is not None, 120, "genuine load")
    check(dst.status() == "running", "the genuine destination accepts the stream", dst.status())
    gd.p.kill()
    gd.p.wait()
    failed = load("twice", dst, data)
    check(failed, "the same stream loaded twice into one destination is refused")
    check(source_intact("after replays"), "source still intact after the replays")

    # Wrapped for another host's key.
    wrong = Backend("atk-wrong-host", key=kc, incoming=True)
    ok, info = ctl("incoming-info", "--admin", wrong.admin)
    other_dst = Backend("atk-b-holder", key=kb, incoming=True)
    ok2, binfo = ctl("incoming-info", "--admin", other_dst.admin)
    pem_b = os.path.join(WORK, "b.pem")
    open(pem_b, "w").write(binfo["public_key"])
    data = export(None, peer_pem=pem_b, peer_id=info["migration_id"])
    failed = load("wrong-host", wrong, data)
    check(failed and wrong.status() == "destination-locked" and source_intact("wrong host"),
          "blobs wrapped for another host's key are refused", wrong.status())

    # Plaintext (swtpm) stream into a destination with a host key.
    plain_dst = Backend("atk-plain", key=kb, incoming=True)
    ctl("incoming-info", "--admin", plain_dst.admin)
    failed = load("plaintext", plain_dst, read_file(swtpm_file))
    check(failed and plain_dst.status() == "destination-locked", "plaintext blobs are refused by a destination with a host key",
          plain_dst.status())
    g.stop()


def killed_destination(ka, kb):
    print("== destination killed during the migration", flush=True)
    src = Backend("kill-src", key=ka)
    g = boot_source("kill-src", src)
    base = g.run(SETUP)
    dst = Backend("kill-dst", key=kb, incoming=True)
    mig = os.path.join(WORK, "kill.sock")
    gd = guest("kill-dst", dst, incoming="unix:" + mig)
    prepare(src, dst)
    g.hmp("migrate_set_parameter max-bandwidth 20M")
    g.hmp("migrate -d unix:" + mig)
    time.sleep(1.0)
    gd.p.kill()
    dst.p.kill()
    status = "?"
    end = time.time() + 60
    while time.time() < end:
        status = g.migration_status()
        if status in ("failed", "completed", "cancelled"):
            break
        time.sleep(0.2)
    check(status == "failed", "migration fails when the destination dies", status)
    g.hmp("cont")
    r = g.run("echo R:pcr=$(tpm2_pcrread sha256:16 | tail -n 1 | awk '{print $2}'); "
              "tpm2_nvread %s -C o -s 64 -o /tmp/x && echo R:secret=$(od -An -tx1 -v /tmp/x | tr -d ' \\n'); "
              "tpm2_getrandom --hex 8 >/dev/null && echo R:tpm=ok" % NV)
    check(r.get("tpm") == "ok" and r.get("pcr") == base.get("pcr") and r.get("secret") == base.get("secret"),
          "after cont the source guest's TPM works with its state unchanged", r)
    check(src.status() in ("running", "prepared"), "source not locked (the prepared id stays until abort)", src.status())
    ok, v = ctl("abort", "--admin", src.admin)
    check(ok and src.status() == "running", "vtpmctl abort drops the stale preparation", v)
    g.stop()


def main():
    os.makedirs(LOGS, exist_ok=True)
    print("migration-test: " + qemu_version(), flush=True)
    try:
        ka, kb = keygen("a"), keygen("b")
        live_migration(ka, kb)
        plain_migration()
        if not LIVE_ONLY:
            save_and_restore()
            swtpm_file = secrecy_vs_swtpm(ka, kb)
            attack_matrix(ka, kb, swtpm_file)
            killed_destination(ka, kb)
    except Exception as e:  # a crashed step is a failure, not a pass
        import traceback
        traceback.print_exc()
        check(False, "migration test aborted", e)
    finally:
        cleanup()
        shutil.rmtree(WORK, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
