#!/usr/bin/env bash
# run-qemu11-tests.sh: the QEMU 11 part of the kernel tests (`make
# kernel-tests`). QEMU 11.1 from a Debian sid root (prepare-qemu11.sh) boots
#
#   1. the virtio-tpm guest: `vtpmd vhost-user --virtio-id 45` behind QEMU's
#      generic vhost-user device (vhost-user-test-device-pci), our guest
#      driver (virtio-tpm-driver/) loaded from the initramfs; two boots on one
#      state directory with every guest check (run-tests.sh, device
#      vhost-user-tpm);
#   2. the tpm-crb and tpm-tis guests with `vtpmd socket` (run-tests.sh);
#   3. vhost-user-test.py: guest reset, vtpmd killed mid-command, reconnect,
#      migration refusal;
#   4. migration-test.py: sealed and plain live migration with QEMU 11
#      (KT_MIGRATION_LIVE_ONLY=1: the save-to-file, attack-matrix and
#      killed-destination parts run with the system QEMU only).
#
# Each part prints PASS/FAIL lines and "N passed, M failed"; this script
# ends with "qemu11: N of M parts failed" and fails if any did.
# Logs: build/kernel-tests/logs-qemu11/. Env: TPM_BACKEND_BIN (vtpmd),
# KT_VIRTIO_ID (45), QEMU11_SKIP_MIGRATION=1 skips the migration part, KT_QEMU11=0 skips
# everything (e.g. on a machine without access to Debian's registry).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
if [ "${KT_QEMU11:-1}" = 0 ]; then
  echo "qemu11: skipped (KT_QEMU11=0)"
  exit 0
fi

bash "$KT_HERE/prepare-qemu11.sh" || die "qemu11: preparing QEMU 11 failed"
bash "$KT_HERE/virtio-tpm-driver/build.sh" || die "qemu11: building the guest module failed"
prepare_guest || die "qemu11: preparing the guest failed"

export QEMU="$KT_BUILD/qemu11/qemu-system-x86_64"
export KT_LOGS="$KT_BUILD/logs-qemu11" KT_STATE="$KT_BUILD/state-qemu11"
mkdir -p "$KT_LOGS"
echo "qemu11: $(head -n 1 "$KT_BUILD/qemu11/version"), virtio id $KT_VIRTIO_ID, logs in $KT_LOGS"

part qemu11 "vhost-user-tpm, tpm-crb and tpm-tis guests" env KT_DEVICES="vhost-user-tpm tpm-crb tpm-tis" bash "$KT_HERE/run-tests.sh"
part qemu11 "vhost-user reset, failure and reconnect" python3 "$KT_HERE/vhost-user-test.py"
if [ "${QEMU11_SKIP_MIGRATION:-0}" != 1 ]; then
  part qemu11 "live migration (sealed and plain)" env KT_MIGRATION_LIVE_ONLY=1 python3 "$KT_HERE/migration-test.py"
fi
parts_summary qemu11
