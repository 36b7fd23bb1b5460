#!/usr/bin/env bash
# run-tests.sh: the kernel tests (`make kernel-tests`, part of `make test`).
#
# For each device (tpm-crb, tpm-tis), on a fresh state directory:
#   boot 1, vtpm.mode=first:  device checks + the scenario's first part
#   boot 2, vtpm.mode=second: same state directory; NV index and persistent
#                             key must have survived, PCRs must be reset
# Every expected VTPM-TEST line must be present and PASS; a missing line is
# a failure. Expected names, read from the initramfs that was booted:
# GUEST_CHECKS in guest-init plus `scenario/tpm2-scenario.sh --list MODE`.
# The host then compares VTPM-INFO values that must not change between boots.
#
# Output: "PASS: ..." / "FAIL: ..." per check, then "N passed, M failed".
# Exit status 0 only if nothing failed.
#
# Env: TPM_BACKEND_BIN (default swtpm), KT_DEVICES (default "tpm-crb tpm-tis"),
#      KT_TIMEOUT (seconds per boot, 300), KT_BACKEND_ARGS (see lib.sh),
#      QEMU (binary), KT_LOGS (log directory), KT_STATE (state directories).
# Logs: build/kernel-tests/logs/{guest,backend,boot}-DEVICE-MODE.*
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# VTPM-INFO keys that must be present in both boots and equal.
SAME_ACROSS_BOOTS="persistent-key-sha256 nv-sha256"

passed=0 failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
summary() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; }

# Set-up problems end the run at once, still with a summary line.
if ! command -v "$TPM_BACKEND_BIN" >/dev/null; then
  fail "backend '$TPM_BACKEND_BIN' not found (set TPM_BACKEND_BIN)"
  summary; exit 1
fi
echo "run-tests: backend $(command -v "$TPM_BACKEND_BIN"), $("$QEMU" --version 2>&1 | head -n 1)${QEMU_L:+ (-L $QEMU_L)}"
if ! prepare_guest; then
  fail "could not prepare the guest kernel and initramfs (see above)"
  summary; exit 1
fi
logs=${KT_LOGS:-$KT_BUILD/logs}
mkdir -p "$logs"

# expected MODE: the VTPM-TEST names a boot in MODE must print, taken from
# the copies of guest-init and the scenario in the initramfs actually booted
# (build-initramfs.sh keeps its staging tree).
booted="$KT_BUILD/initramfs"
expected() {
  sed -n 's/^GUEST_CHECKS="\(.*\)"$/\1/p' "$booted/init" | tr ' ' '\n'
  sh "$booted/scenario/tpm2-scenario.sh" --list "$1"
}

# info LOG KEY: the value of "VTPM-INFO KEY value" in LOG.
info() { grep -a "^VTPM-INFO $2 " "$1" 2>/dev/null | head -n 1 | tr -d '\r' | awk '{print $3}' || true; }

# check_boot DEVICE MODE: the host checks of one boot.
check_boot() {
  local dev=$1 mode=$2 before=$failed name line names
  local log="$logs/guest-$dev-$mode.log" status="$logs/boot-$dev-$mode.status"
  local what="$dev boot $mode"
  local qemu_rc seconds backend
  qemu_rc=$(sed -n 's/^qemu_rc=//p' "$status" 2>/dev/null || true)
  seconds=$(sed -n 's/^seconds=//p' "$status" 2>/dev/null || true)
  backend=$(sed -n 's/^backend=//p' "$status" 2>/dev/null || true)

  if [ -z "$qemu_rc" ]; then
    fail "$what: the guest was not booted (backend or QEMU did not start; see above)"
  else
    if [ "$qemu_rc" = 0 ]; then pass "$what: QEMU powered off cleanly (${seconds} s)"
    elif [ "$qemu_rc" = 124 ]; then fail "$what: QEMU timed out after $KT_TIMEOUT s"
    else fail "$what: QEMU exited with status $qemu_rc"; fi
    if [ "$backend" = exited ]; then pass "$what: backend exited by itself after QEMU quit"
    elif [ "$backend" = terminated ]; then pass "$what: vhost-user backend stopped cleanly on SIGTERM after QEMU quit"
    elif [ "$dev" = vhost-user-tpm ]; then fail "$what: vhost-user backend did not stop cleanly on SIGTERM ($backend)"
    else fail "$what: backend still running 5 s after QEMU quit (killed)"; fi
  fi

  if ! names=$(expected "$mode") || [ -z "$names" ]; then
    fail "$what: cannot list the expected checks (tpm2-scenario.sh --list $mode)"
  fi
  for name in $names; do
    line=$(grep -a "^VTPM-TEST $name " "$log" 2>/dev/null | head -n 1 | tr -d '\r' || true)
    case "$line" in
      "VTPM-TEST $name PASS") pass "$what: $name" ;;
      "") fail "$what: $name: no result line" ;;
      *) fail "$what: ${line#VTPM-TEST }" ;;
    esac
  done
  # Failures the list does not know about (e.g. an unknown mode).
  while read -r line; do
    name=$(echo "$line" | awk '{print $2}')
    echo "$names" | grep -qxF "$name" || fail "$what: unexpected ${line#VTPM-TEST }"
  done < <(grep -a '^VTPM-TEST .* FAIL' "$log" 2>/dev/null | tr -d '\r' || true)

  if grep -aq '^VTPM-DONE' "$log" 2>/dev/null; then pass "$what: guest reached VTPM-DONE"
  else fail "$what: guest never printed VTPM-DONE"; fi

  if [ "$failed" -gt "$before" ]; then
    echo "--- last 40 lines of $log"
    tail -n 40 "$log" 2>/dev/null | tr -d '\r' || true
    echo "--- last 10 lines of $logs/backend-$dev-$mode.log.stderr"
    tail -n 10 "$logs/backend-$dev-$mode.log.stderr" 2>/dev/null || true
    echo "---"
  fi
}

for d in ${KT_DEVICES:-tpm-crb tpm-tis}; do
  dev=$(device_name "$d") || die "run-tests: bad KT_DEVICES entry '$d'"
  state="${KT_STATE:-$KT_BUILD/state}/$dev"
  rm -rf "$state"
  mkdir -p "$state"
  rm -f "$logs"/*-"$dev"-first* "$logs"/*-"$dev"-second*
  for mode in first second; do
    echo "run-tests: booting $dev, mode $mode (state $state)"
    bash "$KT_HERE/boot-guest.sh" "$dev" "$mode" "$state" "$logs" || true
    check_boot "$dev" "$mode"
  done
  for key in $SAME_ACROSS_BOOTS; do
    a=$(info "$logs/guest-$dev-first.log" "$key")
    b=$(info "$logs/guest-$dev-second.log" "$key")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then pass "$dev: $key unchanged across the reboot"
    else fail "$dev: $key differs across the reboot (first '$a', second '$b')"; fi
  done
done

summary
