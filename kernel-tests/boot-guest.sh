#!/usr/bin/env bash
# boot-guest.sh DEVICE MODE STATEDIR LOGDIR: one guest boot with a vTPM.
#
#   DEVICE   tpm-crb, tpm-tis (QEMU arguments from qemu-configs/DEVICE.args)
#            or vhost-user-tpm (`vtpmd vhost-user`, QEMU >= 10.2: set QEMU)
#   MODE     first, second or demo (the guest's vtpm.mode=)
#   STATEDIR the backend's --tpmstate directory (created if missing)
#   LOGDIR   where the logs go:
#              guest-DEVICE-MODE.log         the guest's serial console
#              backend-DEVICE-MODE.log       the backend's --log (level 20)
#              backend-DEVICE-MODE.log.stderr  its stdout/stderr
#              boot-DEVICE-MODE.status       qemu_rc=, seconds=, backend=
#
# Starts $TPM_BACKEND_BIN (see lib.sh), boots QEMU under `timeout
# $KT_TIMEOUT`, then stops the backend (normally it has already exited on
# QEMU's shutdown). With KT_CONSOLE=1 the serial output is also shown.
# Exits with QEMU's status (124: timed out). Needs the kernel and initramfs
# (prepare_guest in lib.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ $# -eq 4 ] || die "usage: $0 tpm-crb|tpm-tis|vhost-user-tpm MODE STATEDIR LOGDIR"
dev=$(device_name "$1") || exit 1
mode=$2 state=$3 logs=$4
if [ ! -s "$KT_BUILD/vmlinuz" ] || [ ! -s "$KT_BUILD/initramfs.cpio.gz" ]; then
  die "boot-guest: no kernel/initramfs in $KT_BUILD; run fetch-kernel.sh and build-initramfs.sh"
fi

mkdir -p "$logs"
name="$dev-$mode"
run=$(mktemp -d /tmp/vtpm-kt.XXXXXX)   # short path: unix sockets allow ~107 bytes
trap 'rm -rf "$run"' EXIT
sock="$run/ctrl.sock"
serial="$logs/guest-$name.log"
status="$logs/boot-$name.status"
rm -f "$serial" "$status"

start_backend "$state" "$sock" "$logs/backend-$name.log" "$run/backend.pid" "$dev"
qemu_command "$dev" "$sock" "$mode"

start=$(date +%s.%N)
set +e
if [ "${KT_CONSOLE:-0}" = 1 ]; then
  timeout "$KT_TIMEOUT" "${QEMU_CMD[@]}" </dev/null 2>&1 | tee "$serial"
  rc=${PIPESTATUS[0]}
else
  timeout "$KT_TIMEOUT" "${QEMU_CMD[@]}" </dev/null >"$serial" 2>&1
  rc=$?
fi
set -e
seconds=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
stop_backend

printf 'qemu_rc=%s\nseconds=%s\nbackend=%s\n' "$rc" "$seconds" "$BACKEND_END" > "$status"
if [ "$rc" -eq 124 ]; then
  echo "boot-guest: $name: QEMU timed out after $KT_TIMEOUT s (KT_TIMEOUT)" >&2
elif [ "$rc" -ne 0 ]; then
  echo "boot-guest: $name: QEMU exited with status $rc; see $serial" >&2
fi
exit "$rc"
