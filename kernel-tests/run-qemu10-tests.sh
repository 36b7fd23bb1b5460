#!/usr/bin/env bash
# run-qemu10-tests.sh: the QEMU 10.0 part of the kernel tests (`make
# kernel-tests`). QEMU 10.0 from Debian bookworm-backports, unpacked next to
# the system's QEMU 7.2 by prepare-qemu10.sh (run with its own -L data
# directories and QEMU_MODULE_DIR), runs the same checks as 7.2:
#
#   1. run-tests.sh: tpm-crb and tpm-tis guests, two boots each on one state
#      directory, every guest check and the host's comparisons;
#   2. migration-test.py with KT_MIGRATION_LIVE_ONLY=1: the sealed live
#      migration (tpm-crb) and the plain one (tpm-tis); the save-to-file,
#      attack-matrix and killed-destination parts do not depend on the QEMU
#      version and run with the system QEMU only.
#
# Each part prints PASS/FAIL lines and "N passed, M failed"; this script
# ends with "qemu10: N of M parts failed" and fails if any did.
# Logs: build/kernel-tests/logs-qemu10/, state: build/kernel-tests/state-qemu10/.
# Env: TPM_BACKEND_BIN (vtpmd), KT_QEMU10=0 skips everything (e.g. on a
# machine without access to Debian's registry).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
if [ "${KT_QEMU10:-1}" = 0 ]; then
  echo "qemu10: skipped (KT_QEMU10=0)"
  exit 0
fi

bash "$KT_HERE/prepare-qemu10.sh" || die "qemu10: preparing QEMU 10 failed"
prepare_guest || die "qemu10: preparing the guest failed"

# shellcheck source=/dev/null # written by prepare-qemu10.sh: QEMU, QEMU_L, QEMU_MODULE_DIR
source "$KT_BUILD/qemu10/env"
export KT_LOGS="$KT_BUILD/logs-qemu10" KT_STATE="$KT_BUILD/state-qemu10"
mkdir -p "$KT_LOGS"
echo "qemu10: $(head -n 1 "$KT_BUILD/qemu10/version"), logs in $KT_LOGS"

part qemu10 "tpm-crb and tpm-tis guests" env KT_DEVICES="tpm-crb tpm-tis" bash "$KT_HERE/run-tests.sh"
part qemu10 "live migration (sealed on tpm-crb, plain on tpm-tis)" env KT_MIGRATION_LIVE_ONLY=1 python3 "$KT_HERE/migration-test.py"
parts_summary qemu10
