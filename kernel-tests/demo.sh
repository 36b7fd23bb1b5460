#!/usr/bin/env bash
# make demo: boot a small Linux guest whose TPM is served by vtpmd and show
# tpm2-tools working inside it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
prepare_guest >/dev/null
state="$KT_BUILD/demo-state"
mkdir -p "$state"
echo "== Starting $(basename "$TPM_BACKEND_BIN") on state directory $state"
echo "== Booting a guest under QEMU (software emulation, ~10 s) with:"
echo "   $(tpm_args crb /path/to/ctrl.sock | tr '\n' ' ')"
bash "$KT_HERE/boot-guest.sh" crb demo "$state" "$KT_BUILD/logs" \
  | tr -d '\r' | sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' \
  | grep -av -e '^VTPM-DMESG' -e '^VTPM-BOOT' -e '^VTPM-DONE' -e 'reboot: Power down' -e '^$'
echo "== The guest powered off; its TPM state stays in $state for the next boot."
