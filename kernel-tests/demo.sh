#!/usr/bin/env bash
# demo.sh (`make demo`): boots a small Linux guest whose TPM 2.0 is served
# by the vTPM backend and shows tpm2-tools working inside it.
#
# Env: TPM_BACKEND_BIN (default swtpm; `make demo` passes vtpmd),
#      KT_DEMO_STATE (the backend's state directory, kept between runs;
#      default build/kernel-tests/demo-state).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

state=${KT_DEMO_STATE:-$KT_BUILD/demo-state}
logs="$KT_BUILD/logs"

echo "== Preparing the guest: Debian's kernel (downloaded once) and a busybox + tpm2-tools initramfs"
prepare_guest | sed 's/^/   /'
echo
echo "== Starting the vTPM backend: $TPM_BACKEND_BIN socket --tpm2 --tpmstate dir=$state --ctrl type=unixio,path=<socket> ..."
echo "== Booting the guest under QEMU (software emulation, no KVM: about 10-20 s) with the TPM arguments"
echo "   $(tpm_args tpm-crb '<socket>' | tr '\n' ' ')  (qemu-configs/tpm-crb.args)"
echo

# Show the guest's console without the firmware's screen control codes and
# without the machine-readable VTPM-* lines.
KT_CONSOLE=1 bash "$KT_HERE/boot-guest.sh" tpm-crb demo "$state" "$logs" \
  | tr -d '\r' \
  | sed -u -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' \
  | grep -a --line-buffered -v -e '^VTPM-\(BOOT\|DMESG\|DONE\|INFO\)' -e '^VTPM-TEST .* PASS$' -e 'reboot: Power down' -e 'SeaBIOS' -e 'Booting from ROM' -e '^[[:space:]]*$' \
  | sed -u 's/^###/\n###/' \
  || { echo "demo: the guest boot failed; logs in $logs (guest-tpm-crb-demo.log, backend-tpm-crb-demo.log*)" >&2; exit 1; }

status="$logs/boot-tpm-crb-demo.status"
echo
echo "== The guest powered off after $(sed -n 's/^seconds=//p' "$status") s; the backend $(sed -n 's/^backend=//p' "$status")."
echo "== The vTPM's state (keys, NV, the boot counter) stays in $state; run 'make demo' again to see the counter go up."
