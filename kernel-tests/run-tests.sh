#!/usr/bin/env bash
# The kernel tests: for tpm-crb and tpm-tis, boot a real Linux guest under
# QEMU (TCG) with a vTPM, run the scenario through /dev/tpmrm0, then boot a
# second time on the same state directory and check that NV contents and the
# persistent key were kept and the PCRs reset. A missing result line fails.
#
# Env: TPM_BACKEND_BIN (default target/release/vtpmd; swtpm works too),
#      KT_DEVICES (default "crb tis"), KT_TIMEOUT (seconds per boot).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
prepare_guest || exit 1

logs="$KT_BUILD/logs"
rm -rf "$logs" && mkdir -p "$logs"
passed=0 failed=0
ok() { echo "PASS: $*"; passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }

guest_checks="dev-tpm0 dev-tpmrm0 tpm-version-2"
expected() { echo $guest_checks; sh "$KT_HERE/scenario/tpm2-scenario.sh" --list "$1"; }

# check_boot DEVICE MODE: every expected line present and PASS.
check_boot() {
  local dev=$1 mode=$2 log="$logs/guest-$1-$2.log" name line
  for name in $(expected "$mode"); do
    line=$(grep -a "^VTPM-TEST $name " "$log" | head -n 1 | tr -d '\r')
    case "$line" in
      "VTPM-TEST $name PASS") ok "tpm-$dev boot $mode: $name" ;;
      "") bad "tpm-$dev boot $mode: $name: no result line" ;;
      *) bad "tpm-$dev boot $mode: ${line#VTPM-TEST }" ;;
    esac
  done
  grep -aq '^VTPM-DONE' "$log" && ok "tpm-$dev boot $mode: guest finished" \
    || bad "tpm-$dev boot $mode: guest did not finish"
}

info() { grep -a "^VTPM-INFO $2 " "$1" | head -n 1 | awk '{print $3}' | tr -d '\r'; }

for dev in ${KT_DEVICES:-crb tis}; do
  state=$(mktemp -d)
  for mode in first second; do
    start=$(date +%s)
    if bash "$KT_HERE/boot-guest.sh" "$dev" "$mode" "$state" "$logs"; then
      ok "tpm-$dev boot $mode: QEMU exited cleanly ($(( $(date +%s) - start )) s)"
    else
      bad "tpm-$dev boot $mode: QEMU failed"
    fi
    check_boot "$dev" "$mode"
  done
  for key in persistent-key-sha256 nv-sha256; do
    a=$(info "$logs/guest-$dev-first.log" "$key")
    b=$(info "$logs/guest-$dev-second.log" "$key")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then ok "tpm-$dev: $key kept across reboot"
    else bad "tpm-$dev: $key first '$a' second '$b'"; fi
  done
  rm -rf "$state"
  if [ "$failed" -gt 0 ]; then
    for f in "$logs"/guest-"$dev"-*.log; do echo "--- tail of $f"; tail -n 30 "$f"; done
  fi
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
