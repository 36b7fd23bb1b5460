#!/usr/bin/env bash
# boot-guest.sh DEVICE MODE STATEDIR LOGDIR: one guest boot with a vTPM.
# DEVICE is crb or tis, MODE is first, second or demo. The guest's serial
# output goes to LOGDIR/guest-DEVICE-MODE.log (and to stdout for demo).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
dev=$1 mode=$2 state=$3 logs=$4
mkdir -p "$logs"
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
sock="$run/ctrl.sock"
start_backend "$state" "$sock" "$logs/backend-$dev-$mode.log"
out="$logs/guest-$dev-$mode.log"
set +e
if [ "$mode" = demo ]; then
  eval timeout "$KT_TIMEOUT" "$(qemu_cmd "$dev" "$sock" "$mode")" < /dev/null | tee "$out"
  rc=${PIPESTATUS[0]}
else
  eval timeout "$KT_TIMEOUT" "$(qemu_cmd "$dev" "$sock" "$mode")" < /dev/null > "$out" 2>&1
  rc=$?
fi
set -e
stop_backend
[ "$rc" -eq 0 ] || echo "QEMU exited with status $rc (124 = timed out after $KT_TIMEOUT s)" >&2
exit "$rc"
